"""Backend deployments of the MIRROR-LLaVA Serve application: the generator and verifier
replicas behind ``serve.batch`` (model calls in a worker thread, one batch at a time). The LLM
roles are shared engines (``actors.llm_engine.LLMEngine``), built by ``jobs.mirror_llava.serve``."""
from __future__ import annotations

import asyncio
import hashlib
import json
from collections import OrderedDict
from typing import Any

from ray import serve

from udfs.llm_output import to_python


def _column(values: list) -> Any:
    from actors.batching import object_column

    return object_column(values)


class _Batched:
    """Common part of the backends: ``serve.batch`` size/timeout from the recipe, the blocking
    model call in a worker thread (the replica's event loop keeps answering health checks), one
    batch at a time per replica (``max_concurrent_batches`` = 1: the actors are not thread-safe)."""

    def _configure(self, method, max_batch_size: int, wait_s: float) -> None:
        method.set_max_batch_size(int(max_batch_size))
        method.set_batch_wait_timeout_s(float(wait_s))

    def check_health(self) -> None:
        """Serve's periodic health check: the replica is alive (its model loaded in __init__)."""

    def ping(self) -> str:
        return "ok"


class GeneratorServer(_Batched):
    """``actors.identity_t2i.IdentityText2Image`` behind ``serve.batch`` (rows of different
    clients in one pipeline call, each with its own face and seed). ``generate(row)``:
    ``{"id", "prompt", "negative_prompt", "face_image": bytes, "seed": int | None}`` ->
    ``{"png": bytes | None, "seed", "identity_method", "steps", "width", "height", "error"}``."""

    def __init__(self, model: dict, params: dict, max_batch_size: int, wait_s: float):
        from actors.identity_t2i import IdentityText2Image

        params = {**params, "output_dir": ""}  # PNG bytes back, nothing written
        self.stage = IdentityText2Image(model, params)
        self._configure(self.generate, max_batch_size, wait_s)

    @serve.batch(max_batch_size=2, batch_wait_timeout_s=0.01)
    async def generate(self, rows: list[dict]) -> list[dict]:
        return await asyncio.to_thread(self._run, rows)

    def _run(self, rows: list[dict]) -> list[dict]:
        from udfs import rows as R

        p = self.stage.params
        batch = {"id": _column([r["id"] for r in rows]), p.prompt_column: _column([r["prompt"] for r in rows]),
                 p.negative_column: _column([r.get("negative_prompt") or None for r in rows]),
                 p.face_column: _column([r["face_image"] for r in rows]),
                 p.seed_column: _column([r.get("seed") for r in rows])}
        out = self.stage(batch)
        return [{"png": out["image_png"][i], "seed": to_python(out["seed"][i]),
                 "identity_method": to_python(out["identity_method"][i]), "steps": int(out["gen_steps"][i]),
                 "width": to_python(out["gen_width"][i]), "height": to_python(out["gen_height"][i]),
                 "error": to_python(out[R.ROW_ERROR][i])} for i in range(len(rows))]


class VerifierServer(_Batched):
    """Face analysis of the generated and source images, CLIP similarity and NSFW score of
    the generated image, in one replica. ``verify(row)``: ``{"id", "image": bytes,
    "source_image": bytes, "clip_text": str}`` -> ``{"faces": {FACE_COLUMNS}, "source_faces":
    {...}, "clip_scores": [float], "nsfw": bool, "nsfw_score": float, "nsfw_scores": {label:
    p}, "error": str | None}``. Verdicts are the ingress's (``verification_report``)."""

    CACHE = 256

    def __init__(self, faces: dict, clip: dict, nsfw: dict, max_batch_size: int, wait_s: float):
        from actors.clip import CLIPScorer
        from actors.faces import FaceAnalyzer
        from actors.nsfw import NSFWClassifier

        self.faces = FaceAnalyzer(faces["model"], {**faces["params"], "image_column": "image"})
        self.clip = CLIPScorer(clip["model"], {**clip["params"], "mode": "similarity", "image_column": "image",
                                               "text_column": "text"})
        self.nsfw = NSFWClassifier(nsfw["model"], {**nsfw["params"], "image_column": "image"})
        self._sources: OrderedDict[str, dict] = OrderedDict()
        self._configure(self.verify, max_batch_size, wait_s)

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.01)
    async def verify(self, rows: list[dict]) -> list[dict]:
        return await asyncio.to_thread(self._run, rows)

    def _face_row(self, out: dict, i: int) -> dict:
        from actors.faces import FACE_COLUMNS
        from udfs import rows as R

        d = {c: to_python(out[c][i]) for c in FACE_COLUMNS}
        d["error"] = to_python(out[R.ROW_ERROR][i])
        return d

    def _run(self, rows: list[dict]) -> list[dict]:
        from udfs import rows as R

        n = len(rows)
        keys = [hashlib.sha1(r["source_image"]).hexdigest() for r in rows]
        sources = {k: self._sources[k] for k in keys if k in self._sources}
        todo = {k: r["source_image"] for k, r in zip(keys, rows) if k not in sources}
        ids = [f"{r['id']}:image" for r in rows] + [f"source:{k[:16]}" for k in todo]
        images = [r["image"] for r in rows] + list(todo.values())
        fo = self.faces({"id": _column(ids), "image": _column(images)})
        for j, k in enumerate(todo):
            sources[k] = self._face_row(fo, n + j)
            if sources[k]["error"] is None:  # errors are not cached
                self._sources[k] = sources[k]
        for k in keys:
            if k in self._sources:
                self._sources.move_to_end(k)
        while len(self._sources) > self.CACHE:
            self._sources.popitem(last=False)
        gen = {"id": _column(ids[:n]), "image": _column(images[:n])}
        co = self.clip({**gen, "text": _column([r["clip_text"] for r in rows])})
        no = self.nsfw(gen)
        out = []
        for i, k in enumerate(keys):
            faces, src = self._face_row(fo, i), dict(sources[k])
            errs = [str(e) or "(no message)" for e in (faces.pop("error"), src.pop("error"), to_python(co[R.ROW_ERROR][i]),
                                to_python(no[R.ROW_ERROR][i])) if e is not None]
            scores = to_python(no["nsfw_scores"][i])
            out.append({"faces": faces, "source_faces": src, "clip_scores": to_python(co["clip_scores"][i]),
                        "nsfw": to_python(no["nsfw"][i]), "nsfw_score": to_python(no["nsfw_score"][i]),
                        "nsfw_scores": json.loads(scores) if scores else {}, "error": "; ".join(errs) or None})
        return out
