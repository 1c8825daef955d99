"""``python -m jobs mirror-llava-data``: MIRROR-LLaVA training records from the MIRROR
pipeline's outputs (SPEC B1; issue 10 part 1).

::

    python -m jobs mirror-llava-data --input MIRROR_OUT --output OUT --cot base|planning|ec_planning
        [--history 6] [--no-image-check]

Reads ``MIRROR_OUT/mirror_data.parquet`` (kept dialogues only) and
``MIRROR_OUT/expressions.parquet`` (turn -> image) and writes ``OUT/train.json`` (LLaVA-1.5
records, image paths absolute or URIs), ``OUT/rejects.jsonl`` (records that could not be made,
with the reason naming dialogue, turn and field) and ``OUT/manifest.json``. See
``udfs.mirror_llava``.
"""
from __future__ import annotations

import argparse
import hashlib
import io as _io
import json
import time

from jobs.core import report
from udfs import io


def _read_parquet(uri: str):
    import pyarrow.parquet as pq

    return pq.read_table(_io.BytesIO(io.read_bytes(uri)))


def parser() -> argparse.ArgumentParser:
    """Options of ``python -m jobs mirror-llava-data``."""
    from udfs.mirror_llava import COT_TYPES, DEFAULT_HISTORY

    ap = argparse.ArgumentParser(prog="python -m jobs mirror-llava-data",
                                 description="MIRROR outputs -> MIRROR-LLaVA training records (LLaVA-1.5 JSON)")
    ap.add_argument("--input", required=True, help="MIRROR output folder (mirror_data.parquet) or s3:// URI")
    ap.add_argument("--output", required=True, help="output folder or s3:// URI (train.json, rejects.jsonl)")
    ap.add_argument("--cot", required=True, choices=COT_TYPES, help="chain-of-thought type of the records")
    ap.add_argument("--history", type=int, default=DEFAULT_HISTORY,
                    help=f"utterances of history before each therapist turn (default {DEFAULT_HISTORY})")
    ap.add_argument("--no-image-check", action="store_true",
                    help="do not check that every image file exists (e.g. images copied later)")
    return ap


def main(argv: list[str]) -> int:
    """``python -m jobs mirror-llava-data``: write train.json, rejects.jsonl and manifest.json.
    Raises ``FileNotFoundError`` when the input has no mirror_data.parquet and ``ValueError``
    for bad options or when no record could be made (the rejects are written first)."""
    from udfs import mirror_llava as ML

    args = parser().parse_args(argv)
    if args.history < 0:
        raise ValueError("--history must be >= 0")
    t0 = time.time()
    data_uri = io.join(args.input, "mirror_data.parquet")
    if not io.exists(data_uri):
        raise FileNotFoundError(f"{args.input}: no mirror_data.parquet (run `python -m jobs mirror` first)")
    rows = _read_parquet(data_uri).to_pylist()
    expr_uri = io.join(args.input, "expressions.parquet")
    expressions = _read_parquet(expr_uri).select(["dialogue_id", "turn", "image"]).to_pylist() \
        if io.exists(expr_uri) else None
    checked: dict[str, bool] = {}

    def image_exists(path: str) -> bool:
        if path not in checked:
            checked[path] = io.exists(path)
        return checked[path]

    conv = ML.convert(rows, args.cot, history=args.history, expressions=expressions, base=args.input,
                      image_exists=None if args.no_image_check else image_exists)
    body = "[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in conv.records) + "\n]\n"
    io.write_text(io.join(args.output, "train.json"), body)
    io.write_text(io.join(args.output, "rejects.jsonl"),
                  "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in conv.rejects))
    manifest = {"command": "mirror-llava-data", "argv": argv, "input": args.input, "cot": args.cot,
                "history": args.history, "image_check": not args.no_image_check,
                "expressions_used": expressions is not None, **conv.counts(),
                "train_sha256": hashlib.sha256(body.encode()).hexdigest(), "wall_s": round(time.time() - t0, 2)}
    io.write_text(io.join(args.output, "manifest.json"), json.dumps(manifest, indent=2) + "\n")
    report.write_quietly(args.output)
    print(f"{len(conv.records)} records ({', '.join(f'{k} {v}' for k, v in manifest['records_by_kind'].items())}) "
          f"from {conv.dialogues_with_records}/{conv.dialogues} dialogues, {len(conv.rejects)} rejects "
          f"-> {io.join(args.output, 'train.json')}")
    if not conv.records:
        raise ValueError(f"no training records could be made; see {io.join(args.output, 'rejects.jsonl')}")
    return 0


def report_rows(out: str, manifest: dict) -> tuple[report.Gallery, list[dict], list[dict]]:
    """The run report's galleries of ``mirror-llava-data`` (``jobs.core.report``): training
    records (image, prompt, target) and rejected records with their reason."""
    records = json.loads(io.read_text(io.join(out, "train.json")))
    kept = [{"id": r["question_id"], "image": r.get("image"), "prompt": r["conversations"][0]["value"],
             "target": r["conversations"][-1]["value"]} for r in records]
    rejects = [{"id": r.get("question_id", ""), "_stage": r.get("field", ""), "_reason": r.get("reason", "")}
               for r in map(json.loads, io.read_text(io.join(out, "rejects.jsonl")).splitlines())]
    return report.Gallery(image="image", text=("prompt", "target")), kept, rejects
