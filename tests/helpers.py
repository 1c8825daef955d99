"""Helpers shared by the model-stage tests: batches in Ray Data's numpy form, the shared COCO
photos, a private placeholder cache, and one run of an actor class as a Ray Data actor pool."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
COCO = SHARED / "data" / "captions" / "coco_mini_images"


def coco_images(n: int) -> list[str]:
    """The first ``n`` COCO photos of ../shared (sorted paths)."""
    files = sorted(str(p) for p in COCO.glob("*.jpg"))
    assert len(files) >= n, f"need {n} COCO images in {COCO}"
    return files[:n]


def numpy_batch(rows_: list[dict]) -> dict[str, np.ndarray]:
    """The batch Ray Data's numpy format gives an actor (object arrays, list cells as arrays)."""
    out = {}
    for key in rows_[0]:
        col = np.empty(len(rows_), dtype=object)
        for i, r in enumerate(rows_):
            v = r[key]
            col[i] = np.asarray(v, dtype=object) if isinstance(v, list) else v
        out[key] = col
    return out


def single(batch: dict, i: int) -> dict:
    """Row ``i`` of a batch as a batch of one."""
    return {k: v[i:i + 1] for k, v in batch.items()}


def placeholder_models(tmp_path_factory, label: str, specs: dict[str, dict]):
    """Generator for a fixture: builds the placeholder ``specs`` once into a private
    ``MMSYNTH_CACHE`` and yields ``{name: ResolvedModel dict}``; restores the environment after."""
    from actors.models import materialize, resolve

    mp = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp(label)
    mp.setenv("MMSYNTH_CACHE", str(root))
    models = {}
    for name, spec in specs.items():
        resolved = resolve(spec)
        assert resolved.placeholder and resolved.path.startswith(str(root))
        materialize(resolved)
        models[name] = resolved.model_dump()
    yield models
    mp.undo()


def run_ray(ray, actor_cls, model: dict, params: dict, items: list[dict], batch_size: int) -> list[dict]:
    """``items`` through ``actor_cls`` as a Ray Data actor pool of one; rows sorted by id."""
    import ray.data

    env = {"OMP_NUM_THREADS": "1", "KERAS_BACKEND": os.environ.get("KERAS_BACKEND", "torch")}
    if "MMSYNTH_CACHE" in os.environ:
        env["MMSYNTH_CACHE"] = os.environ["MMSYNTH_CACHE"]
    ds = ray.data.from_items(items).map_batches(
        actor_cls, fn_constructor_kwargs={"model": model, "params": params}, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=1), batch_size=batch_size, num_cpus=0.5,
        runtime_env={"env_vars": env})
    return sorted(ds.take_all(), key=lambda r: r["id"])
