"""Generation cache: model replies stored by a hash of everything that decides them.

A run names a cache (recipe ``cache: URI`` or ``--cache URI``; a local folder or ``s3://``)
shared by every worker of every run. Each entry is one JSON object at
``URI/<key[:2]>/<key>.json`` where ``key`` is the SHA-256 of a canonical JSON document (sorted
keys, no whitespace) of the call: the model identity (``model_identity``), the rendered request
and the sampling and output-format settings. Entries are written through ``udfs.io``
(pyarrow.fs): locally to a unique temporary name and then renamed (``os.replace`` is atomic,
so two workers writing one key leave one complete entry, never a torn one); on S3 a PUT is
atomic by itself. A reader that meets an unreadable or truncated entry treats it as a miss.

What is stored is one *call*: a request and its raw reply (text, finish reason, token
counts), never a verdict. The LLM stage (``actors.llm.LLMStage``) looks each call of its
re-ask loop up here, validates a cached reply exactly like a fresh one, and stores every
reply the engine returned; failures (HTTP errors, timeouts, prompts too long) are never stored.
So a recipe whose validation changed but whose requests did not reuses the replies, and a
recipe whose prompt changed sends only the calls whose requests changed.

Only this module knows the storage layout; it has no Ray and no model dependency.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from collections import OrderedDict
from typing import Any

import pyarrow.fs as pafs

from udfs import io

#: bump when the key document or the entry layout changes (old entries are then never hit)
CACHE_FORMAT = 1
#: model-spec options that change how a call is transported, not what the model answers:
#: left out of the key so e.g. a new timeout or rate limit keeps the cache
TRANSPORT_OPTIONS = frozenset({"api_key_env", "azure_ad_token_env", "timeout_s", "max_retries", "backoff_s",
                               "max_backoff_s", "max_concurrency", "qps", "pace_from_headers",
                               "max_pacing_wait_s", "num_threads", "max_batch_size"})


def canonical_json(doc: Any) -> str:
    """``doc`` as compact JSON with sorted keys (the text that is hashed); non-JSON values
    (numpy scalars, paths) are written with ``str``."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def cache_key(doc: dict[str, Any]) -> str:
    """The hex SHA-256 (64 characters) of ``canonical_json(doc)`` plus ``CACHE_FORMAT``."""
    return hashlib.sha256(canonical_json({"cache_format": CACHE_FORMAT, **doc}).encode("utf-8")).hexdigest()


def model_identity(resolved: Any) -> dict[str, Any]:
    """What identifies a model's answers: backend, model id, revision, dtype, the options that
    are not transport settings (``TRANSPORT_OPTIONS``), and the resolved location with its
    version where one is known (package file and package version, local folder, hub id; for
    package models and placeholders nothing machine-specific, so workers whose venvs or model
    caches live in other folders share entries).
    ``resolved`` is an ``actors.models.ResolvedModel``."""
    spec = resolved.spec
    path = resolved.path
    if resolved.source == "package":  # the package's version and file name it; its folder is per venv
        path = None
    elif resolved.source == "placeholder" and path:  # the build's versioned name, not this machine's cache dir
        path = os.path.basename(path.rstrip("/"))
    return {"backend": spec.backend, "model": spec.model, "revision": spec.revision, "dtype": spec.dtype,
            "options": {k: v for k, v in sorted(spec.options.items()) if k not in TRANSPORT_OPTIONS},
            "source": resolved.source, "path": path, "file": resolved.file,
            "package_version": resolved.package_version}


class GenerationCache:
    """One cache store at ``uri`` (a local folder or ``s3://bucket/prefix``).

    ``get(key)`` returns the stored dict or None; ``put(key, value)`` stores a JSON-able dict.
    Both are safe from many threads and processes at once: the last complete write of a key
    wins, a reader never sees a partial entry. ``content_hash(ref)`` hashes an image (or any
    file) by its bytes, remembering up to ``hash_cache_size`` references per process. I/O
    errors of ``put`` propagate (a cache that cannot be written should be noticed);
    unreadable entries are misses.
    """

    def __init__(self, uri: str, hash_cache_size: int = 4096):
        if not uri:
            raise ValueError("a generation cache needs a URI (a local folder or s3://bucket/prefix)")
        self.uri = uri.rstrip("/")
        self._hashes: OrderedDict[str, str] = OrderedDict()
        self._hash_cache_size = int(hash_cache_size)
        self._lock = threading.Lock()

    def path(self, key: str) -> str:
        """The entry's URI: ``<uri>/<key[:2]>/<key>.json``."""
        if len(key) < 3 or not all(c in "0123456789abcdef" for c in key):
            raise ValueError(f"not a cache key (hex SHA-256 expected): {key!r}")
        return io.join(self.uri, key[:2], f"{key}.json")

    def get(self, key: str) -> dict[str, Any] | None:
        """The entry stored under ``key``, or None when there is none or it cannot be read."""
        uri = self.path(key)
        try:
            data = io.read_bytes(uri)
        except (FileNotFoundError, OSError):
            return None
        try:
            value = json.loads(data)
        except ValueError:  # a torn or foreign file: a miss (put overwrites it)
            return None
        return value if isinstance(value, dict) and value.get("key") == key else None

    def put(self, key: str, value: dict[str, Any]) -> None:
        """Store ``value`` (a JSON-able dict) under ``key``, replacing any older entry atomically."""
        self._write(self.path(key), canonical_json({**value, "key": key}).encode("utf-8"))

    def blob_path(self, key: str, suffix: str) -> str:
        """The URI of a binary entry beside the JSON one: ``<uri>/<key[:2]>/<key><suffix>``."""
        return self.path(key)[: -len(".json")] + suffix

    def get_blob(self, key: str, suffix: str) -> bytes | None:
        """The bytes stored by ``put_blob(key, ..., suffix)``, or None when there are none."""
        try:
            return io.read_bytes(self.blob_path(key, suffix))
        except (FileNotFoundError, OSError):
            return None

    def put_blob(self, key: str, data: bytes, suffix: str) -> None:
        """Store ``data`` (e.g. a PNG, ``suffix=".png"``) under ``key``, atomically like ``put``.
        Write the blob before the JSON entry that refers to it: a reader that finds the entry
        then finds its blob."""
        self._write(self.blob_path(key, suffix), data)

    def _write(self, uri: str, data: bytes) -> None:
        fs, path = io.filesystem(uri)
        if isinstance(fs, pafs.LocalFileSystem):
            parent = os.path.dirname(path)
            os.makedirs(parent, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".entry-", suffix=".tmp", dir=parent)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(tmp, path)
            except BaseException:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise
        else:
            io.write_bytes(uri, data)

    def content_hash(self, ref: str) -> str:
        """``"sha256:<hex>"`` of the bytes at ``ref`` (a path or URI); ``data:`` and ``http(s)://``
        references hash their own text. Raises ``FileNotFoundError``/``OSError`` when the file
        cannot be read."""
        if ref.startswith(("data:", "http://", "https://")):
            return digest(ref.encode("utf-8"))
        with self._lock:
            if ref in self._hashes:
                self._hashes.move_to_end(ref)
                return self._hashes[ref]
        value = digest(io.read_bytes(ref))
        with self._lock:
            self._hashes[ref] = value
            while len(self._hashes) > self._hash_cache_size:
                self._hashes.popitem(last=False)
        return value


def digest(data: bytes) -> str:
    """``"sha256:<hex>"`` of ``data``: how images enter cache keys (by content, not by name)."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def open_cache(config: dict[str, Any] | None) -> GenerationCache | None:
    """The store named by a stage's cache config (``{"uri": ..., ...}``), or None when the
    config is empty or names no URI (caching off)."""
    if not config or not config.get("uri"):
        return None
    return GenerationCache(config["uri"])


__all__ = ["GenerationCache", "open_cache", "digest", "cache_key", "canonical_json", "model_identity", "CACHE_FORMAT",
           "TRANSPORT_OPTIONS"]
