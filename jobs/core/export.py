"""``python -m jobs export OUT --format hf``: a finished run's outputs as a Hugging Face dataset.

::

    python -m jobs export OUT --format hf [--to DIR] [--push-to-hub REPO [--private]]
        [--max-shard-rows N] [--max-shard-mb MB] [--exclude GLOB ...] [--missing-images fail|skip]

What is exported (the same for every pipeline and command, read from OUT itself): every data
file the run wrote — ``*.parquet``, ``*.jsonl``, ``*.json`` (a list of records, or an object
holding one list of records such as MM-GEN's ``generated.json``), ``*.csv`` — anywhere under
OUT except the run's state and bookkeeping (``_work/``, ``rejects/``, ``errors/``,
``manifest.json``) and earlier exports (a folder holding ``export.json``). A CSV beside a
Parquet file of the same name is the same table and is skipped. Each file becomes one split;
the files of one folder with the same columns form one config (Antidote's
``queries/{cpq,tpq,pope,desc}_list.jsonl`` -> config ``queries`` with four splits), any other
file is a config of its own (``captions_final``, MIRROR's ``mirror_data``, ``faces``,
``expressions``, MM-GEN's ``generated``, ``llava_train``, MIRROR-LLaVA's ``train``). Empty
files and JSON documents without records are listed as skipped in ``export.json``.

Images: a string column whose values all name image files (``.png``, ``.jpg``, ``.jpeg``,
``.webp``, ``.bmp``, ``.gif``; not ``http(s)://`` URLs) becomes a ``datasets.Image()`` feature
with the file's bytes embedded in the Parquet shard (``{"bytes", "path": file name}``); a null
stays null. A relative path is looked up relative to OUT, then to each ``image_folder`` that a
JSON output of the run names (MM-GEN), then to the working folder (input images such as
MIRROR's face pool). A missing or unreadable image raises ``ExportError`` naming the file,
the row id and the column; ``--missing-images skip`` drops such rows instead and lists every
dropped row (id, column, path) in ``export.json`` and the card.

Layout of DIR (default ``OUT/hf``; required when OUT is ``s3://``; a rerun replaces an earlier
export there and refuses a non-empty folder that is not one)::

    DIR/README.md                                    dataset card (jobs.core.card)
    DIR/<config>/<split>-00000-of-0000N.parquet      shards of at most --max-shard-rows rows
                                                     and about --max-shard-mb MB
    DIR/export.json                                  what was exported, skipped and dropped

``load_dataset(DIR, "<config>")`` (the card's ``configs``) or ``load_dataset("parquet",
data_files={split: DIR/<config>/<split>-*.parquet})`` read it back; ``--push-to-hub REPO``
uploads DIR as a dataset repository with ``huggingface_hub`` (token: ``$HF_TOKEN``, else the
cached login).

Errors (``ExportError``, a ``ValueError``: the CLI prints one line and exits 2): OUT without
``manifest.json``, a run that has not finished (a pipeline manifest without ``finished``, or the running marker of
a run that started after it: ``jobs.core.store.running``), a run that stopped early
(``manifest["stopped"]``) or has rows waiting for Batch API batches, no exportable file, a missing image.
"""
from __future__ import annotations

import argparse
import fnmatch
import io as stdio
import json
import os
import re
import shutil
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from jobs.core import card as C
from jobs.core import store
from udfs import io

DATA_EXTENSIONS = (".parquet", ".jsonl", ".json", ".csv")  # in order of preference for one stem
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
SKIP_DIRS = {"_work", "rejects", "errors"}
SKIP_FILES = {"manifest.json", "export.json"}
MARKER = "export.json"
DEFAULT_SHARD_ROWS = 10_000
DEFAULT_SHARD_MB = 500
ID_COLUMNS = ("id", "idx", "question_id", "sample_id")


class ExportError(ValueError):
    """The run folder cannot be exported: not a finished run, nothing to export, a missing image."""


@dataclass
class SourceFile:
    """One data file of the run: ``rel`` (path relative to OUT), its rows as ``table`` and the
    JSON object's other fields (``meta``, e.g. ``image_folder``)."""

    rel: str
    uri: str
    table: pa.Table | None = None
    meta: dict = field(default_factory=dict)

    @property
    def folder(self) -> str:
        return os.path.dirname(self.rel)

    @property
    def stem(self) -> str:
        return os.path.splitext(os.path.basename(self.rel))[0]


# ------------------------------------------------------------------------- run folder

def check_finished(out: str) -> dict:
    """The run's manifest; raises ``ExportError`` when OUT has no ``manifest.json``, when a
    pipeline manifest has no ``finished`` time, when a run of OUT started and has not written
    its manifest (``store.running``: still going, or killed), when the run stopped early
    (``manifest["stopped"]``, e.g. at its ``--max-cost`` budget: its outputs are partial), or
    when rows still wait for Batch API batches (``manifest["waiting"]``)."""
    if not io.exists(io.join(out, "manifest.json")):
        raise ExportError(f"{out}: no manifest.json — the run has not finished (or this is not a run folder)")
    manifest = store.load_manifest(out)
    if "recipe" in manifest and not manifest.get("finished"):
        raise ExportError(f"{out}: manifest.json has no 'finished' time — the run has not finished")
    marker = store.running(out)
    if marker is not None:
        raise ExportError(f"{out}: a run started at {marker.get('started')} has not finished (still running, or "
                          "stopped before its manifest); rerun its command to finish it")
    if manifest.get("stopped"):
        raise ExportError(f"{out}: the run stopped early ({manifest['stopped']}) and its outputs are partial; "
                          "rerun its command to finish it")
    if manifest.get("waiting"):
        raise ExportError(f"{out}: rows still wait for Batch API batches ({manifest['waiting']}); check them with "
                          "`python -m jobs status OUT` and rerun the command when they completed")
    return manifest


def discover(out: str, exclude: list[str] = (), skip_dirs: set[str] = frozenset()) -> tuple[list[str], list[dict]]:
    """Data files under OUT (paths relative to OUT, sorted) and the files left out with why.

    Skips ``SKIP_DIRS``, ``skip_dirs`` (relative folders), folders holding ``export.json``,
    ``SKIP_FILES``, paths matching an ``exclude`` glob, and a file whose stem has a preferred
    format in the same folder (``DATA_EXTENSIONS`` order)."""
    base = out.rstrip("/")
    rels = [f[len(base) + 1:] if f.startswith(base + "/") else os.path.relpath(f, base)
            for f in io.list_files(base)]
    exports = {os.path.dirname(r) for r in rels if os.path.basename(r) == MARKER and os.path.dirname(r)}
    chosen: dict[tuple[str, str], str] = {}
    skipped = []
    for rel in rels:
        parts = rel.split("/")
        ext = os.path.splitext(rel)[1].lower()
        if ext not in DATA_EXTENSIONS or parts[0] in SKIP_DIRS or rel in SKIP_FILES \
                or any(rel == d or rel.startswith(d + "/") for d in (*skip_dirs, *exports)) \
                or any(p.startswith(".") for p in parts):
            continue
        if any(fnmatch.fnmatch(rel, g) for g in exclude):
            skipped.append({"file": rel, "reason": "--exclude"})
            continue
        key = (os.path.dirname(rel), os.path.splitext(os.path.basename(rel))[0])
        if key in chosen:
            keep, drop = sorted([chosen[key], rel], key=lambda r: DATA_EXTENSIONS.index(os.path.splitext(r)[1].lower()))
            chosen[key] = keep
            skipped.append({"file": drop, "reason": f"same table as {keep}"})
        else:
            chosen[key] = rel
    return sorted(chosen.values()), skipped


def _column(values: list) -> pa.Array:
    """One column of records; values of mixed types (a JSON field that is sometimes a string,
    sometimes an object) become JSON strings."""
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError):
        return pa.array([None if v is None else v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)
                         for v in values], pa.string())


def records_table(records: list[dict]) -> pa.Table:
    """Records (dicts) as a table: columns in first-seen order, missing keys null."""
    cols = list(dict.fromkeys(k for r in records for k in r))
    return pa.table({c: _column([r.get(c) for r in records]) for c in cols})


def read_source(out: str, rel: str) -> SourceFile:
    """Read one data file. JSON: a list of records, or an object with exactly one list of
    records (the other fields go to ``meta``); anything else gets ``table=None``."""
    uri = io.join(out, rel)
    ext = os.path.splitext(rel)[1].lower()
    src = SourceFile(rel, uri)
    if ext == ".parquet":
        fs, path = io.filesystem(uri)
        src.table = pq.read_table(path, filesystem=fs)
    elif ext == ".csv":
        src.table = pacsv.read_csv(stdio.BytesIO(io.read_bytes(uri)))
    elif ext == ".jsonl":
        lines = [ln for ln in io.read_text(uri).splitlines() if ln.strip()]
        src.table = records_table([json.loads(ln) for ln in lines])
    else:
        doc = json.loads(io.read_text(uri))
        if isinstance(doc, list) and all(isinstance(r, dict) for r in doc):
            src.table = records_table(doc)
        elif isinstance(doc, dict):
            lists = [k for k, v in doc.items() if isinstance(v, list) and v and all(isinstance(r, dict) for r in v)]
            if len(lists) == 1:
                src.table = records_table(doc[lists[0]])
                src.meta = {k: v for k, v in doc.items() if k != lists[0]}
            else:
                src.meta = doc
    return src


def _no_null_types(t: pa.DataType) -> pa.DataType:
    """``t`` with every null type (a column or list that was always empty/None) as string."""
    if pa.types.is_null(t):
        return pa.string()
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return pa.list_(_no_null_types(t.value_type))
    if pa.types.is_struct(t):
        return pa.struct([pa.field(f.name, _no_null_types(f.type)) for f in t])
    return t


def normalized(table: pa.Table) -> pa.Table:
    """``table`` with null-typed columns (and list/struct members) cast to string, so every
    feature has a concrete dtype on the Hub."""
    schema = pa.schema([pa.field(f.name, _no_null_types(f.type)) for f in table.schema])
    return table if schema.equals(table.schema) else table.cast(schema)


def image_columns(table: pa.Table) -> list[str]:
    """String columns whose non-null values all end with an image extension (at least one
    value; ``http(s)://`` URLs excluded: nothing is downloaded)."""
    cols = []
    for name in table.column_names:
        if not pa.types.is_string(table.schema.field(name).type) and \
                not pa.types.is_large_string(table.schema.field(name).type):
            continue
        vals = [v for v in table.column(name).to_pylist() if v is not None]
        if vals and all(v.lower().endswith(IMAGE_EXTENSIONS) and not v.startswith(("http://", "https://"))
                        for v in vals):
            cols.append(name)
    return cols


def _row_id(row: dict, k: int) -> str:
    for c in ID_COLUMNS:
        if row.get(c) not in (None, ""):
            return str(row[c])
    return f"#{k}"


def read_image(value: str, bases: list[str]) -> tuple[bytes, str]:
    """Bytes and URI of an image path: as given when absolute or ``s3://``, else the first of
    ``bases/value`` that exists; raises ``FileNotFoundError`` listing the places tried and
    ``ValueError`` when the file is not a readable image."""
    from PIL import Image

    tried = [value] if io.is_remote(value) or os.path.isabs(value) else [io.join(b, value) for b in bases]
    for uri in tried:
        if io.exists(uri):
            data = io.read_bytes(uri)
            try:
                Image.open(stdio.BytesIO(data)).verify()
            except Exception as e:  # noqa: BLE001 - any decoder error: not an image
                raise ValueError(f"{uri} is not a readable image ({type(e).__name__}: {e})") from None
            return data, uri
    raise FileNotFoundError(f"image {value!r} not found (tried {', '.join(tried)})")


# ------------------------------------------------------------------------- writing

def _name(text: str) -> str:
    return re.sub(r"\W+", "_", text).strip("_") or "data"


def plan_configs(sources: list[SourceFile]) -> list[dict]:
    """Group sources into configs: one folder + identical columns/types -> one config named
    after the folder (``data`` at the top), a lone file -> a config named after the file
    (``<folder>_<stem>`` in a subfolder). Returns ``[{"name", "sources": [SourceFile],
    "image_columns"}]`` in file order; names are unique."""
    groups: dict[tuple, list[SourceFile]] = {}
    for s in sources:
        imgs = tuple(image_columns(s.table))
        groups.setdefault((s.folder, tuple(map(str, s.table.schema)), imgs), []).append(s)
    configs, used = [], set()
    for (folder, _, imgs), members in groups.items():
        name = _name(folder.replace("/", "_") if len(members) > 1 and folder else
                     "data" if len(members) > 1 else f"{folder}_{members[0].stem}" if folder else members[0].stem)
        if name in used:  # a second column set in the same folder: named after its first file
            name = _name(f"{name}_{members[0].stem}")
        base, k = name, 1
        while name in used:
            k += 1
            name = f"{base}_{k}"
        used.add(name)
        configs.append({"name": name, "sources": members, "image_columns": list(imgs)})
    return configs


def write_split(src: SourceFile, images: list[str], bases: list[str], dest: str, split: str,
                max_rows: int, max_bytes: int, missing: str, dropped: list[dict]):
    """Write one split as ``dest/<split>-0000k-of-0000n.parquet`` shards (rows in file order)
    with ``images`` as ``datasets.Image()`` (bytes embedded). Returns ``(files, rows written,
    features)``. ``missing``: ``"fail"`` raises ``ExportError`` naming the file, row id and
    column; ``"skip"`` drops the row and appends ``{"file", "id", "column", "error"}`` to ``dropped``."""
    from datasets import Dataset, Features, Image

    table = src.table
    features = Features.from_arrow_schema(table.schema)
    for c in images:
        features[c] = Image()
    per_row = (sum(table.column(c).nbytes for c in table.column_names if c not in images) / max(1, table.num_rows))
    shards, cur, cur_bytes, written = [], [], 0.0, 0

    def flush():
        if cur:
            path = os.path.join(dest, f".{split}-{len(shards):05d}.parquet")
            data = {c: [r[c] for r in cur] for c in table.column_names}
            Dataset.from_dict(data, features=features).to_parquet(path)
            shards.append(path)

    for k, row in enumerate(table.to_pylist()):
        size = per_row
        try:
            for c in images:
                if row[c] is not None:
                    data, uri = read_image(row[c], bases)
                    row[c] = {"bytes": data, "path": os.path.basename(uri)}
                    size += len(data)
        except (FileNotFoundError, ValueError) as e:
            rid = _row_id(row, k)
            if missing == "fail":
                raise ExportError(f"{src.rel}: row {rid}, column {c!r}: {e} "
                                  "(--missing-images skip drops such rows and lists them)") from None
            dropped.append({"file": src.rel, "id": rid, "column": c, "error": str(e)})
            continue
        if cur and (len(cur) >= max_rows or cur_bytes + size > max_bytes):
            flush()
            cur, cur_bytes = [], 0.0
        cur.append(row)
        cur_bytes += size
        written += 1
    flush()
    if not shards:  # every row dropped: an empty split keeps its columns
        path = os.path.join(dest, f".{split}-00000.parquet")
        Dataset.from_dict({c: [] for c in table.column_names}, features=features).to_parquet(path)
        shards.append(path)
    files = []
    for k, path in enumerate(shards):
        final = os.path.join(dest, f"{split}-{k:05d}-of-{len(shards):05d}.parquet")
        os.replace(path, final)
        files.append(final)
    return files, written, features


def _prepare(dest: str) -> None:
    """Create ``dest`` (with an ``export.json`` saying it is being written), or empty it when
    it holds an earlier export (its ``export.json``, finished or not); raises ``ExportError`` for a non-empty folder that is not an export."""
    if os.path.isdir(dest) and os.listdir(dest):
        if not os.path.exists(os.path.join(dest, MARKER)):
            raise ExportError(f"{dest} is not empty and holds no earlier export ({MARKER}); choose another --to")
        shutil.rmtree(dest)
    os.makedirs(dest, exist_ok=True)
    with open(os.path.join(dest, MARKER), "w") as f:  # an interrupted export is replaced by the next one
        json.dump({"status": "writing"}, f)


def export_hf(out: str, to: str | None = None, max_shard_rows: int = DEFAULT_SHARD_ROWS,
              max_shard_mb: float = DEFAULT_SHARD_MB, exclude: list[str] = (), missing_images: str = "fail") -> dict:
    """Export the finished run in OUT to ``to`` (default ``OUT/hf``) and return the summary
    written to ``to/export.json``: ``{"source", "to", "pipeline", "configs": [{"name",
    "image_columns", "splits": [{"name", "source", "rows", "files"}]}], "skipped": [{"file",
    "reason"}], "dropped_rows": [...]}``. Raises ``ExportError`` (see the module docstring)."""
    import datasets
    from datasets import DatasetInfo, SplitInfo
    from datasets.info import DatasetInfosDict
    from datasets.splits import SplitDict

    out = out.rstrip("/")
    if missing_images not in {"fail", "skip"}:
        raise ExportError("--missing-images must be fail or skip")
    if max_shard_rows < 1 or max_shard_mb <= 0:
        raise ExportError("--max-shard-rows must be >= 1 and --max-shard-mb > 0")
    if to is None:
        if io.is_remote(out):
            raise ExportError(f"{out} is remote: name a local --to folder for the export")
        to = io.join(out, "hf")
    if io.is_remote(to):
        raise ExportError(f"--to {to}: the export is written to a local folder (push it with --push-to-hub)")
    to = os.path.abspath(to)
    manifest = check_finished(out)
    inside = os.path.relpath(to, out) if not io.is_remote(out) else ""
    skip = {inside} if inside and not inside.startswith("..") else set()
    rels, skipped = discover(out, list(exclude), skip)
    sources, read = [], [read_source(out, rel) for rel in rels]
    for src in read:
        rel = src.rel
        if src.table is None:
            skipped.append({"file": rel, "reason": "JSON without one list of records"})
        elif src.table.num_rows == 0:
            skipped.append({"file": rel, "reason": "no rows"})
        else:
            src.table = normalized(src.table)
            sources.append(src)
    if not sources:
        raise ExportError(f"{out}: no data file to export (skipped: {skipped or 'none found'})")
    folders = [s.meta["image_folder"] for s in read
               if isinstance(s.meta.get("image_folder"), str) and s.meta["image_folder"]]
    bases = [out, *dict.fromkeys(folders), os.getcwd()]
    _prepare(to)
    datasets.disable_progress_bars()
    configs, infos, dropped = [], DatasetInfosDict(), []
    for cfg in plan_configs(sources):
        dest = os.path.join(to, cfg["name"])
        os.makedirs(dest, exist_ok=True)
        splits, split_infos, features = [], {}, None
        for src in cfg["sources"]:
            split = _name(src.stem)
            files, n, features = write_split(src, cfg["image_columns"], bases, dest, split, max_shard_rows,
                                             int(max_shard_mb * 1024 * 1024), missing_images, dropped)
            splits.append({"name": split, "source": src.rel, "rows": n,
                           "files": [os.path.relpath(f, to) for f in files]})
            split_infos[split] = SplitInfo(name=split, num_examples=n,
                                           num_bytes=sum(os.path.getsize(f) for f in files))
        split_dict = SplitDict()
        for info in split_infos.values():
            split_dict.add(info)
        infos[cfg["name"]] = DatasetInfo(features=features, splits=split_dict, config_name=cfg["name"])
        configs.append({"name": cfg["name"], "image_columns": cfg["image_columns"], "splits": splits})
    summary = {"source": out, "to": to, "pipeline": manifest.get("pipeline") or manifest.get("command"),
               "configs": configs, "skipped": skipped, "dropped_rows": dropped}
    card = C.render(manifest, configs, infos, out, skipped=skipped, dropped=dropped)
    card.save(os.path.join(to, "README.md"))
    with open(os.path.join(to, MARKER), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def push_to_hub(folder: str, repo: str, private: bool = False) -> str:
    """Create the dataset repository ``repo`` (kept if it exists) and upload ``folder`` to it;
    the token is ``$HF_TOKEN`` (None: ``huggingface_hub``'s cached login). Returns the URL."""
    from huggingface_hub import HfApi

    token = os.environ.get("HF_TOKEN") or None
    api = HfApi(token=token)
    url = api.create_repo(repo, repo_type="dataset", private=private, exist_ok=True, token=token)
    api.upload_folder(repo_id=repo, folder_path=folder, repo_type="dataset", token=token,
                      commit_message="mmsynth export")
    return str(url)


def parser() -> argparse.ArgumentParser:
    """Options of ``python -m jobs export``."""
    ap = argparse.ArgumentParser(prog="python -m jobs export",
                                 description="Export a finished run's outputs as a Hugging Face dataset "
                                             "(Parquet shards, images embedded, dataset card).")
    ap.add_argument("output", help="the run's output folder (local or s3://)")
    ap.add_argument("--format", choices=["hf"], default="hf", help="export format (hf: Hugging Face datasets)")
    ap.add_argument("--to", help="local folder to write (default OUT/hf; required for s3:// runs)")
    ap.add_argument("--push-to-hub", metavar="REPO", help="upload the export to this dataset repo (token: $HF_TOKEN)")
    ap.add_argument("--private", action="store_true", help="create the Hub repository private")
    ap.add_argument("--max-shard-rows", type=int, default=DEFAULT_SHARD_ROWS, help="rows per Parquet shard at most")
    ap.add_argument("--max-shard-mb", type=float, default=DEFAULT_SHARD_MB,
                    help="start a new shard when a shard's rows (images included) pass this size")
    ap.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                    help="leave out data files matching this path glob (relative to OUT), e.g. 'steps/*'")
    ap.add_argument("--missing-images", choices=["fail", "skip"], default="fail",
                    help="a row whose image file is missing: fail naming it (default) or drop it (listed)")
    return ap


def main(argv: list[str]) -> int:
    """``python -m jobs export``: write the dataset, print its configs, optionally push it."""
    args = parser().parse_args(argv)
    summary = export_hf(args.output, args.to, args.max_shard_rows, args.max_shard_mb, args.exclude,
                        args.missing_images)
    for c in summary["configs"]:
        print(f"{c['name']}: " + ", ".join(f"{s['name']} {s['rows']}" for s in c["splits"])
              + (f" (images: {', '.join(c['image_columns'])})" if c["image_columns"] else ""))
    for s in summary["skipped"]:
        print(f"skipped {s['file']}: {s['reason']}")
    if summary["dropped_rows"]:
        print(f"dropped {len(summary['dropped_rows'])} rows with missing images (listed in export.json)")
    print(f"dataset in {summary['to']} (README.md, export.json)")
    if args.push_to_hub:
        print(f"uploaded to {push_to_hub(summary['to'], args.push_to_hub, args.private)}")
    return 0
