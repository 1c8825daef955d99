"""Where a run keeps its state and results, local or ``s3://``: the ``OUT/_work`` folders, Parquet
tables written and read back with unified schemas, JSON lines, and the run's ``manifest.json``.

Layout of an output folder: see ``jobs.core.driver``.
"""
from __future__ import annotations

import json
import sys

import pyarrow as pa
import pyarrow.dataset as pds
import pyarrow.parquet as pq

from udfs import io


def work(out: str, *parts: str) -> str:
    """URI of ``OUT/_work/<parts>`` (the run's internal state)."""
    return io.join(out, "_work", *parts)


def read_table(uri: str, columns: list[str] | None = None) -> pa.Table | None:
    """All parquet files under ``uri`` as one table, schemas unified (null → typed); None if absent.

    A file that cannot be read (cut short by a killed writer) is skipped with a warning: its
    rows count as not committed, so the next run computes them again.
    """
    files = io.list_files(uri, ".parquet")
    if not files:
        return None
    fs, _ = io.filesystem(uri)
    paths, schemas = [], []
    for f in files:
        path = io.filesystem(f)[1]
        try:
            schemas.append(pq.read_schema(path, filesystem=fs))
            paths.append(path)
        except (OSError, pa.ArrowInvalid) as e:
            print(f"warning: skipping unreadable {f}: {e}", file=sys.stderr)
    if not paths:
        return None
    schema = pa.unify_schemas(schemas, promote_options="permissive")
    if columns is not None:
        schema = pa.schema([schema.field(c) for c in columns if c in schema.names])
    return pds.dataset(paths, schema=schema, filesystem=fs, format="parquet").to_table()


def write_table(table: pa.Table, uri: str) -> None:
    """Write one parquet file at ``uri`` (local or s3)."""
    fs, path = io.filesystem(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    pq.write_table(table, path, filesystem=fs)


def write_jsonl(records: list[dict], uri: str) -> None:
    """Write records as JSON lines at ``uri``."""
    io.write_text(uri, "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in records))


def load_manifest(out: str) -> dict:
    """Read ``OUT/manifest.json``; raises ``FileNotFoundError`` naming the folder."""
    uri = io.join(out, "manifest.json")
    if not io.exists(uri):
        raise FileNotFoundError(f"no manifest.json in {out} (has the run finished?)")
    return json.loads(io.read_text(uri))


def running_marker(out: str) -> str:
    """URI of ``OUT/_work/running.json``: present from the start of a run until its manifest is
    written, so a run that was killed or is still going is never taken for a finished one."""
    return work(out, "running.json")


def mark_running(out: str, info: dict) -> None:
    """Write the running marker (``info``: when the run started, its command)."""
    io.write_text(running_marker(out), json.dumps(info, default=str))


def clear_running(out: str) -> None:
    """Remove the running marker once the manifest is written."""
    if io.exists(running_marker(out)):
        io.delete(running_marker(out))


def running(out: str) -> dict | None:
    """The running marker's content when a run of OUT has started and not written its manifest."""
    uri = running_marker(out)
    return json.loads(io.read_text(uri)) if io.exists(uri) else None
