"""Reading and writing local paths and ``s3://`` URIs through ``pyarrow.fs``.

S3 settings come from the standard AWS environment variables: ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION``/``AWS_DEFAULT_REGION`` and
``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL`` (for S3-compatible stores such as MinIO or moto).
"""
from __future__ import annotations

import os
from functools import lru_cache
from typing import Any, Callable
from urllib.parse import urlparse

import pyarrow.fs as pafs


def is_remote(uri: str) -> bool:
    """True for ``scheme://`` URIs other than ``file://``."""
    return "://" in uri and not uri.startswith("file://")


@lru_cache(maxsize=8)
def _s3(endpoint: str | None, region: str | None, key: str | None = None, secret: str | None = None,
        token: str | None = None) -> pafs.S3FileSystem:
    # Explicit credentials travel with the (pickled) filesystem to Ray workers whose
    # environment lacks them; without them each node uses its own credential chain.
    kwargs = {}
    if key and secret:
        kwargs.update(access_key=key, secret_key=secret, session_token=token)
    if endpoint:
        u = urlparse(endpoint)
        kwargs.update(endpoint_override=u.netloc or u.path, scheme=u.scheme or "https")
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """``(pyarrow filesystem, path inside it)`` for a local path, ``file://`` or ``s3://`` URI.

    Raises ``ValueError`` for other schemes.
    """
    if uri.startswith("s3://"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        return (_s3(endpoint, region, os.environ.get("AWS_ACCESS_KEY_ID"),
                    os.environ.get("AWS_SECRET_ACCESS_KEY"), os.environ.get("AWS_SESSION_TOKEN")),
                uri[len("s3://"):].rstrip("/"))
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    if "://" in uri:
        raise ValueError(f"unsupported URI scheme in {uri!r} (local paths and s3:// only)")
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def join(base: str, *parts: str) -> str:
    """Join URI/path parts with ``/`` (keeps the scheme)."""
    out = base.rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}"
    return out


def exists(uri: str) -> bool:
    """True if a file or folder exists at ``uri``."""
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(uri: str) -> bytes:
    """Whole file content. Raises ``FileNotFoundError`` naming the URI."""
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type != pafs.FileType.File:
        raise FileNotFoundError(f"no such file: {uri}")
    with fs.open_input_stream(path) as f:
        return f.read()


def read_text(uri: str) -> str:
    """File content decoded as UTF-8."""
    return read_bytes(uri).decode("utf-8")


def write_bytes(uri: str, data: bytes) -> str:
    """Write ``data`` to ``uri`` (parents created; replaces an existing file). Returns ``uri``.

    Local files are written to a temporary name and renamed, so readers never see a partial
    file; S3 objects are atomic by nature.
    """
    fs, path = filesystem(uri)
    parent = path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    else:
        with fs.open_output_stream(path) as f:
            f.write(data)
    return uri


def write_text(uri: str, text: str) -> str:
    """Write UTF-8 text to ``uri``; see ``write_bytes``."""
    return write_bytes(uri, text.encode("utf-8"))


def list_files(uri: str, suffix: str = "") -> list[str]:
    """Files under a folder (recursive), as URIs of the same form, sorted; [] if missing."""
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    prefix = "s3://" if uri.startswith("s3://") else ""
    return sorted(prefix + i.path for i in infos
                  if i.type == pafs.FileType.File and i.path.endswith(suffix))


def delete(uri: str) -> None:
    """Delete a file or a folder tree if it exists."""
    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)


def read_records(uri: str, stage: str = "ingest",
                 from_object: Callable[[dict], list] | None = None) -> tuple[list[tuple[int, Any]], list[dict]]:
    """Input records of the file at ``uri`` (local or ``s3://``), by extension: ``.jsonl`` (a
    JSON object a line; blank lines skipped), ``.json`` (a list of records, or an object that
    ``from_object`` turns into records), ``.csv`` or ``.parquet`` (a record a row).

    Returns ``[(n, record)]`` with ``n`` the 0-based position (the line index for JSONL) and
    the rejects ``{"id": "line-<n+1>", "stage": stage, "reason"}`` of JSONL lines that are not
    JSON objects, naming the file and line. Raises ``ValueError`` naming the file for an
    unsupported extension, a ``.json`` file that does not parse, or a JSON object without
    ``from_object``.
    """
    import io as _io
    import json

    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    data, low = read_bytes(uri), uri.lower()
    if low.endswith(".parquet"):
        return list(enumerate(pq.read_table(_io.BytesIO(data)).to_pylist())), []
    if low.endswith(".csv"):
        return list(enumerate(pacsv.read_csv(_io.BytesIO(data)).to_pylist())), []
    if low.endswith(".json"):
        try:
            obj = json.loads(data)
        except json.JSONDecodeError as e:
            raise ValueError(f"{uri}: invalid JSON at line {e.lineno}: {e.msg}") from None
        if isinstance(obj, dict) and from_object is not None:
            obj = from_object(obj)
        if not isinstance(obj, list):
            raise ValueError(f"{uri}: expected a JSON list of records")
        return list(enumerate(obj)), []
    if not low.endswith(".jsonl"):
        raise ValueError(f"{uri}: unsupported input format (use .jsonl, .json, .csv or .parquet)")
    out, bad = [], []
    for n, line in enumerate(data.decode("utf-8").splitlines()):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            bad.append({"id": f"line-{n + 1}", "stage": stage, "reason": f"{uri} line {n + 1}: invalid JSON ({e.msg})"})
            continue
        if not isinstance(rec, dict):
            bad.append({"id": f"line-{n + 1}", "stage": stage, "reason": f"{uri} line {n + 1}: not a JSON object"})
            continue
        out.append((n, rec))
    return out, bad
