"""Antidote preference pairs on Ray Data: the target VLM answers every query twice, and the answer
pairs become DPO data (SPEC C9; Wu et al., CVPR 2025; issue 19).

::

    python -m jobs antidote-pairs --input ANTIDOTE_OUT --output OUT [--model VLM] [--profile P]
        [--evaluate] [--baseline OTHER_PAIRS_OUT] [--limit N] [--set stage.key=value ...]

One Ray Data job over the four query files of an Antidote run (``ANTIDOTE_OUT/queries/
{cpq,tpq,pope,desc}_list.jsonl``; every row is identified by ``<type>:<query id>``, never by
position): the target VLM answers the plain question (``text``) and the hinted one
(``text_hint``) with the query's image, temperature 0 and seed 0 (``answer``, ``answer_hint``:
two LLM stages naming the same model, so one shared engine holds one copy of it), the recipe's
text embedder gives the two answers' cosine (``answer_similarity``), and ``pair_select`` drops
pairs with cosine > 0.9 (reason names the cosine) or an empty answer and assigns chosen/rejected
by query type (TPQ, POPE: chosen = plain answer; CPQ, desc: chosen = hinted answer).
Resumable, with the funnel, ``rejects/``, ``errors/``, ``manifest.json`` and ``report.html`` of
every run (``jobs.core.driver``).

``--model`` replaces the profile's target VLM in both answer stages: a hub id, a local model
folder, or an ``antidote-dpo-train`` / ``mirror-llava-train`` checkpoint (``CKPT/model``; a
checkpoint folder always runs on the transformers backend, which loads base + adapter).

``--evaluate`` adds the evaluation hook (issue 19 item 4, after CP-Bench): an LLM judge
(``premise_judge``, the recipe's judge model) classifies each CPQ and TPQ plain answer as
accepting or rejecting the question's premise, a rule reads POPE answers as yes/no, and
``OUT/eval.json`` gives per query type the share of right answers (CPQ: reject; TPQ: accept;
POPE: yes). Run it once with a fine-tuned checkpoint and once with the base model on held-out
queries (an Antidote run on other captions); ``--baseline`` names the other run's output and
adds both shares and their difference. With placeholder models (offline) this exercises the
machinery only: the shares are not measurements of anything.

Outputs in OUT: ``train/dpo_<type>_list.jsonl`` (ms-swift DPO records, the original's file
names), ``trl/`` (a ``datasets`` dataset in TRL's conversational preference format with an
``images`` column: ``datasets.load_from_disk(OUT/trl)``), ``pairs.parquet`` (one row per pair:
ids, query type, image, question, both answers, cosine, chosen, rejected, placeholder flags; what
``antidote-dpo-train`` reads), ``responses/res_<type>_list.jsonl`` (the original's 1_infer.py
output for every query that got both answers), ``eval.json`` with ``--evaluate``, ``rejects/``,
``errors/``, ``manifest.json``, ``report.html``.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

import pyarrow as pa
from pydantic import Field, model_validator

from jobs.core.funnel import reached
from jobs.core.recipe import Recipe
from jobs.core.report import Gallery
from jobs.core.runtime import Stage, llm_stage
from jobs.core.store import write_table
from udfs import antidote_pairs as P
from udfs import io
from udfs import rows as R

INPUT_COLUMNS = ("query_id", "query_type", "image", "text", "text_hint")
#: the two answer stages: they must name one model (one shared engine)
ANSWER_STAGES = ("answer", "answer_hint")
#: the evaluation hook's stages, enabled by ``evaluate``
EVAL_STAGES = ("judge_prompts", "premise_judge", "eval_verdict")
#: columns of ``pairs.parquet``: output name -> row column
PAIR_COLUMNS = {"id": "id", "query_id": "query_id", "query_type": "query_type", "image": "image",
                "question": "text", "text_hint": "text_hint", "answer": "answer_text",
                "answer_hint": "answer_hint_text", "cosine": "answer_cosine", "chosen": "chosen",
                "rejected": "rejected", "chosen_from": "chosen_from", R.PLACEHOLDER: R.PLACEHOLDER}


class AntidotePairsRecipe(Recipe):
    """Recipe of ``antidote-pairs``: the query types to read, the similarity threshold, the
    target model override and the evaluation switch, plus the stages below."""

    query_types: list[str] = Field(list(P.QUERY_TYPES), min_length=1,
                                   description="Query files to read (cpq, tpq, pope, desc; the original trained "
                                   "on all four)")
    similarity_threshold: float = Field(P.SIMILARITY_THRESHOLD, ge=-1.0, le=1.0,
                                        description="Drop a pair whose answer cosine is above this (SPEC C9: 0.9 "
                                        "for bge-m3 embeddings; not re-calibrated for all-MiniLM-L6-v2)")
    target_model: str | None = Field(None, description="Target VLM for both answer stages (--model): hub id, "
                                     "folder or a training checkpoint; None keeps the profile's")
    evaluate: bool = Field(False, description="Run the evaluation hook (--evaluate): judge stages and eval.json")
    baseline: str | None = Field(None, description="Output folder of another antidote-pairs --evaluate run to "
                                 "compare with (--baseline)")

    def input_uris(self) -> dict[str, list[str]]:
        """``--input`` (the Antidote output folder) and ``--baseline``'s ``eval.json``."""
        out = super().input_uris()
        if self.baseline:
            out["--baseline"] = [io.join(self.baseline, "eval.json")]
        return out

    @model_validator(mode="after")
    def _apply_switches(self):
        bad = [t for t in self.query_types if t not in P.QUERY_TYPES]
        if bad:
            raise ValueError(f"query_types: unknown {bad} (choose from {', '.join(P.QUERY_TYPES)})")
        if self.target_model:
            for name in ANSWER_STAGES:
                cfg = self.stages.get(name)
                if cfg is None:
                    continue
                spec = self.engines[cfg.engine].model if cfg.engine and cfg.engine in self.engines else cfg.model
                if spec is None:
                    continue
                update = {"model": self.target_model, "revision": None}
                if os.path.isfile(os.path.join(self.target_model, "base.json")):
                    update["backend"] = "transformers"  # base + adapter load on the transformers backend only
                new = spec.model_copy(update=update)
                if cfg.engine and cfg.engine in self.engines:
                    self.engines[cfg.engine].model = new
                else:
                    cfg.model = new
        for name in EVAL_STAGES:
            if name in self.stages:
                self.stages[name].enabled = self.evaluate
        if self.baseline and not self.evaluate:
            raise ValueError("baseline: --baseline needs --evaluate")
        return self


RECIPE = AntidotePairsRecipe
#: the run report's gallery: the query image, question, both answers, the pair and the cosine
REPORT = Gallery(image="image", text=("text", "answer_text", "answer_hint_text", "chosen_from", "eval_verdict"),
                 scores=("answer_cosine",))


def stages(recipe: AntidotePairsRecipe) -> list[Stage]:
    """The pipeline, in order. Stage names are the keys of the recipe's ``stages``; the judge
    stages run only with ``evaluate`` (before the similarity filter, so every answered query is
    evaluated, paired or not)."""
    return [
        Stage("answer_prompts", P.answer_prompts("text"), ("image", "text"), ("messages",)),
        llm_stage("answer"),
        Stage("hint_prompts", P.answer_prompts("text_hint"), ("image", "text_hint"), ("messages",)),
        llm_stage("answer_hint"),
        Stage("judge_prompts", P.judge_prompts, ("query_type", "text", "answer_text"), ("messages",)),
        llm_stage("premise_judge", "udfs.antidote_pairs:PremiseVerdict", filter=False),
        Stage("eval_verdict", P.eval_verdicts, ("query_type", "answer_text", "premise_judge_parsed"),
              ("eval_verdict", "eval_correct")),
        Stage("answer_similarity", "actors.embedding:PairSimilarity",
              defaults={"first_column": "answer_text", "second_column": "answer_hint_text",
                        "output_column": "answer_cosine"}),
        # applied even with placeholder answers: identical or empty answers make no preference
        # pair whatever model wrote them
        Stage("pair_select", P.pair_select, ("query_type", "answer_text", "answer_hint_text", "answer_cosine"),
              ("chosen", "rejected", "chosen_from"), filter=True),
    ]


# ----------------------------------------------------------------------------- ingest

def _image_uri(base: str, image: str) -> str:
    """A query's image as an absolute path or URI (the original recommends absolute paths)."""
    if "://" in image or os.path.isabs(image):
        return image
    uri = io.join(base, image)
    return uri if io.is_remote(uri) else os.path.abspath(uri)


def ingest(recipe: AntidotePairsRecipe) -> tuple[pa.Table, list[dict], int]:
    """Read ``<input>/queries/<type>_list.jsonl`` for the recipe's query types.

    Returns the rows (``INPUT_COLUMNS`` + ``id`` = ``<type>:<query id>``, ``image`` made absolute),
    the rejects (malformed lines, missing fields, missing image files, duplicate ids: each names
    the row or file line and the field) and how many valid rows ``--limit`` left out (the limit
    takes the query types in turn, so a small run covers each). Raises ``FileNotFoundError`` when
    none of the query files exists.
    """
    base = recipe.input.rstrip("/")
    by_type: dict[str, list[dict]] = {}
    rejects: list[dict] = []
    seen: set[str] = set()
    found = 0
    for qtype in recipe.query_types:
        uri = io.join(base, "queries", f"{qtype}_list.jsonl")
        if not io.exists(uri):
            continue
        found += 1
        records, bad = io.read_records(uri)
        rejects += [{**b, "id": f"{qtype}:{b['id']}"} for b in bad]
        for n, rec in records:
            try:
                row = P.query_row(qtype, n + 1, rec, uri)
            except R.InputError as e:
                rejects.append({"id": e.row_id, "stage": "ingest", "reason": str(e)})
                continue
            if row["id"] in seen:
                rejects.append({"id": row["id"], "stage": "ingest", "reason": f"row {row['id']!r}: duplicate id"})
                continue
            row["image"] = _image_uri(base, row["image"])
            if not io.exists(row["image"]):
                rejects.append({"id": row["id"], "stage": "ingest",
                                "reason": f"row {row['id']!r} field 'image': no such file {row['image']}"})
                continue
            seen.add(row["id"])
            by_type.setdefault(qtype, []).append(row)
    if not found:
        raise FileNotFoundError(f"--input {base}: no query files queries/<type>_list.jsonl for types "
                                f"{', '.join(recipe.query_types)} (is it an Antidote output folder?)")
    keep, left_out = P.interleave(by_type, recipe.limit)
    table = pa.table({c: pa.array([r[c] for r in keep], pa.string()) for c in ("id", *INPUT_COLUMNS)})
    return table, rejects, left_out


# ----------------------------------------------------------------------------- export

def _through(rows: pa.Table, order: list[str], stage: str) -> list[dict]:
    return rows.filter(pa.array(reached(rows, order, stage, through=True))).to_pylist() if stage in order else []


def _write_jsonl(uri: str, records: list[dict]) -> int:
    io.write_text(uri, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return len(records)


def write_trl_dataset(pairs: list[dict], out: str) -> int:
    """``OUT/trl``: the pairs as a ``datasets`` dataset (``save_to_disk``) in TRL's conversational
    preference format (``udfs.antidote_pairs.trl_record``) with ``id`` and ``query_type``;
    ``images`` is a list of ``datasets.Image`` (paths, decoded when read). Written locally and
    copied for ``s3://`` outputs. Returns the number of rows."""
    from datasets import Dataset, Features, Image, List, Value

    msg = List({"role": Value("string"), "content": Value("string")})
    features = Features({"id": Value("string"), "query_type": Value("string"), "prompt": msg, "chosen": msg,
                         "rejected": msg, "images": List(Image())})
    recs = [{"id": p["id"], "query_type": p["query_type"],
             **P.trl_record(p["question"], p["chosen"], p["rejected"], p["image"])} for p in pairs]
    ds = Dataset.from_list(recs, features=features) if recs else Dataset.from_dict(
        {k: [] for k in features}, features=features)
    target = io.join(out, "trl")
    io.delete(target)
    tmp = tempfile.mkdtemp(prefix="antidote-trl-")
    try:
        ds.save_to_disk(tmp)
        for name in sorted(os.listdir(tmp)):
            with open(os.path.join(tmp, name), "rb") as f:
                io.write_bytes(io.join(target, name), f.read())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return len(recs)


def _evaluation(rows: list[dict], recipe: AntidotePairsRecipe, placeholder: bool) -> dict:
    summary = P.eval_summary(rows)
    report = {"by_type": summary, "rows": len(rows), "model": recipe.target_model,
              "placeholder": placeholder,
              "note": ("placeholder models: this exercises the evaluation machinery only; the shares measure "
                       "nothing" if placeholder else "CPQ: share rejecting the false premise; TPQ: share accepting "
                       "the true premise (LLM judge); POPE: share answering yes (rule)")}
    if recipe.baseline:
        base = json.loads(io.read_text(io.join(recipe.baseline, "eval.json")))
        report["baseline"] = {"output": recipe.baseline, "model": base.get("model"), "by_type": base["by_type"]}
        report["comparison"] = P.compare(summary, base["by_type"])
    return report


def export(rows: pa.Table, recipe: AntidotePairsRecipe, out: str) -> dict:
    """Write ``pairs.parquet``, the ms-swift files (``train/dpo_<type>_list.jsonl``), the TRL
    dataset (``trl/``), the responses (``responses/res_<type>_list.jsonl``) and, with
    ``evaluate``, ``eval.json``. Returns counts per file, ``by_type`` (queries, answered, pairs
    per query type) and extra funnel rows ``pairs: <type>`` (queries of a type in, pairs out)."""
    order = [s.name for s in stages(recipe) if recipe.stages.get(s.name) is None or recipe.stages[s.name].enabled]
    all_rows = rows.to_pylist()
    pairs = sorted((r for r in all_rows if r[R.STATUS] == R.OK and r.get("chosen") is not None), key=lambda r: r[R.ID])
    table = pa.table({k: pa.array([r.get(c) for r in pairs], pa.float64() if k == "cosine" else pa.string())
                      for k, c in PAIR_COLUMNS.items()})
    write_table(table, io.join(out, "pairs.parquet"))
    answered = _through(rows, order, "answer_hint")
    counts: dict = {"pairs": len(pairs)}
    funnel, by_type = [], {}
    for t in recipe.query_types:
        sel = [p for p in pairs if p["query_type"] == t]
        counts[f"train/dpo_{t}_list.jsonl"] = _write_jsonl(
            io.join(out, "train", f"dpo_{t}_list.jsonl"),
            [P.swift_record(p["text"], p["chosen"], p["rejected"], p["image"]) for p in sel])
        resp = sorted((r for r in answered if r["query_type"] == t), key=lambda r: r[R.ID])
        counts[f"responses/res_{t}_list.jsonl"] = _write_jsonl(
            io.join(out, "responses", f"res_{t}_list.jsonl"), [P.response_record(r) for r in resp])
        of_type = [r for r in all_rows if r["query_type"] == t]
        by_type[t] = {"queries": len(of_type), "answered": len(resp), "pairs": len(sel)}
        funnel.append({"stage": f"pairs: {t}", "in": len(of_type), "out": len(sel),
                       "rejected": sum(1 for r in of_type if r[R.STATUS] == R.REJECTED),
                       "errored": sum(1 for r in of_type if r[R.STATUS] == R.ERROR), "unit": "queries"})
    counts["trl"] = write_trl_dataset([{**p, "question": p["text"]} for p in pairs], out)
    counts["by_type"] = by_type
    if recipe.evaluate:
        evaluated = _through(rows, order, "eval_verdict")
        placeholder = any(r.get(R.PLACEHOLDER) for r in evaluated)
        report = _evaluation(evaluated, recipe, placeholder)
        io.write_text(io.join(out, "eval.json"), json.dumps(report, indent=2) + "\n")
        counts["eval"] = {t: v["share"] for t, v in report["by_type"].items() if v["share"] is not None}
    counts["funnel"] = funnel
    return counts


# ----------------------------------------------------------------------------- command line

def add_arguments(ap) -> None:
    """antidote-pairs' own options (``python -m jobs antidote-pairs --help``)."""
    ap.add_argument("--model", help="target VLM for both answers: hub id, folder or a training checkpoint "
                    "(default: the profile's)")
    ap.add_argument("--evaluate", action="store_true", default=None,
                    help="evaluation hook: judge CPQ/TPQ answers, rule for POPE; writes OUT/eval.json")
    ap.add_argument("--baseline", help="with --evaluate: output of the other model's antidote-pairs --evaluate "
                    "run on the same queries, to compare with")


def recipe_fields(args) -> dict:
    """Recipe fields from the command line (None = keep the recipe's). A local ``--model`` path
    is made absolute (a relative one would read as a hub id)."""
    model = args.model
    if model and os.path.exists(model):
        model = os.path.abspath(model)
    return {"target_model": model, "evaluate": args.evaluate, "baseline": args.baseline}
