"""Text-to-image stage (diffusers): Antidote step 2-1, MIRROR-LLaVA image generation.

``Text2Image`` loads any diffusers text-to-image pipeline (``DiffusionPipeline.from_pretrained``
reads the pipeline class from ``model_index.json``: SD3-medium for Antidote, SD-Turbo for the
local profile, the tiny SD3 placeholder offline) once per actor and generates one image per
row, all rows of a batch in one pipeline call.

Determinism: each row gets its own ``torch.Generator("cpu").manual_seed(seed)`` with
``seed`` = the row's ``seed`` column or ``rows.seed_from_id(id)``; the initial latents of a
row depend only on its seed, never on its batch position, so a rerun (or regenerating a
single row) reproduces its image. Same id + same batch size + same thread count -> the same
PNG bytes. A different batch size can change low-order float bits in the batched matmuls
(NOTES identity-generation §5: <= 1/255 per pixel); tests compare across batch sizes with
that tolerance.

Generation cache (``cache={"uri": ...}``, ``actors.gen_cache``): a row's PNG is stored under a
key of the model identity, the row's prompt, negative prompt and seed, and every parameter that
changes the picture (steps, guidance, size, quality negatives, weighting, T5 length, extra call
arguments); a hit is written out like a fresh image without loading the pipeline, which loads
on the first miss only. Per row ``gen_cache_hits``/``gen_cache_misses`` (0 or 1) say which.

Weighted prompts: Antidote's LLM writes A1111-style weights ``(object:1.3)``. Where the
pipeline accepts prompt embeddings *and* ``compel`` supports its text encoders (Stable
Diffusion 1.x/2.x: ``CompelForSD``; SDXL: ``CompelForSDXL``), the weights are applied with
compel (the syntax is translated to compel's ``(object)1.3``). Compel has no SD3 support
(2.5.1; its fork ``compel5`` neither) and ``sd_embed`` is not on PyPI, so for SD3 and every
other pipeline the weights are stripped (``(object:1.3)`` -> ``object``) and the row says so
in ``prompt_weights_stripped``. The original Antidote also ignored the weights (SPEC
C11.10: it prompts with the plain ``caption``).
"""
from __future__ import annotations

import inspect
import warnings
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from actors.batching import (batch_len, error_text, is_missing, object_column, row_ids, run_halving_on_oom,
                             set_threads)
from actors.gen_cache import cache_key, model_identity, open_cache
from actors.models import load_spec
from udfs import io as uio
from udfs import rows
from udfs.images import encode_png, image_file_name
from udfs.prompt_weights import WEIGHT_RE, has_weights, strip_weights

__all__ = ["Text2Image", "T2IParams", "row_prompt_seed", "strip_weights", "to_compel_syntax", "has_weights",
           "image_file_name", "QUALITY_NEGATIVES"]

#: Quality negatives appended to every row's negative prompt (SPEC C3 lists the original's:
#: low quality, over-smoothing, over-saturation, bad anatomy, disconnected/extra limbs, extra
#: fingers, mutation, deformation, duplicates), written here in common prompt terms.
QUALITY_NEGATIVES = ("low quality, worst quality, blurry, overly smooth, oversaturated, bad anatomy, "
                     "disconnected limbs, extra limbs, extra fingers, mutated, deformed, duplicate")


class T2IParams(BaseModel):
    """Parameters every text-to-image stage shares (``Text2Image``, ``actors.identity_t2i.
    IdentityText2Image``); each stage's ``Params`` adds its own and sets its pipeline's defaults.

    Negative prompts need classifier-free guidance: diffusers' SD 1.x/2.x, SDXL and SD3
    pipelines (and our PhotoMaker pipeline) use the negative prompt only when
    ``guidance_scale > 1`` (their ``do_classifier_free_guidance``); at or below 1 it is
    silently ignored (e.g. SD-Turbo's recommended ``guidance_scale 0.0``). Validation therefore
    raises ``ValueError`` — at planning, since the plan validates every stage's params — when
    ``guidance_scale <= 1`` and a negative prompt is configured (a ``negative_column`` set in
    the params, or a non-empty ``negative_suffix``), unless ``ignored_negative="warn"``, which
    emits a ``UserWarning`` instead, wherever the params are validated: at planning (driver)
    and when each actor starts (its log).
    """

    model_config = ConfigDict(extra="forbid")

    prompt_column: str = Field("prompt", description="Column holding the positive prompt.")
    negative_column: str = Field("negative_prompt", description="Optional column holding the per-row negative "
                                 "prompt; absent or null -> none.")
    seed_column: str = Field("seed", description="Optional int column with per-row seeds; absent or null -> "
                             "rows.seed_from_id(id).")
    height: int | None = Field(None, ge=8, description="Image height in px; None = the pipeline's default.")
    width: int | None = Field(None, ge=8, description="Image width in px; None = the pipeline's default.")
    num_inference_steps: int = Field(28, ge=1, description="Denoising steps.")
    guidance_scale: float = Field(7.5, ge=0.0, description="Classifier-free guidance scale.")
    negative_suffix: str = Field("", description="Appended to every row's negative prompt; empty = none.")
    output_dir: str = Field("", description="Folder (local path or s3:// URI) for the PNGs; empty = return "
                            "the PNG bytes in column `image_png` instead.")
    extra_call_kwargs: dict[str, Any] = Field(default_factory=dict, description="Extra keyword arguments for "
                                              "the pipeline call (e.g. {'clip_skip': 1}).")
    num_threads: int | None = Field(None, ge=1, description="torch.set_num_threads for this actor (None: "
                                    "leave Ray's per-actor setting; tiny models on small CPUs: 1).")
    ignored_negative: Literal["refuse", "warn"] = Field("refuse", description="A negative prompt (negative_column "
                                                        "set, or a negative_suffix) with guidance_scale <= 1, where "
                                                        "diffusers ignores it: 'refuse' = invalid params (the run "
                                                        "stops at planning); 'warn' = run anyway, warning loudly.")

    def ignored_negatives(self) -> list[str]:
        """The configured negative-prompt sources that ``guidance_scale <= 1`` makes diffusers
        ignore (empty when guidance is on or no negative prompt is configured)."""
        if self.guidance_scale > 1.0:
            return []
        found = []
        if "negative_column" in self.model_fields_set and self.negative_column:
            found.append(f"negative_column {self.negative_column!r}")
        if self.negative_suffix.strip():
            found.append("negative_suffix")
        return found

    @model_validator(mode="after")
    def _negative_needs_guidance(self):
        ignored = self.ignored_negatives()
        if ignored:
            msg = (f"guidance_scale {self.guidance_scale} <= 1 but a negative prompt is configured "
                   f"({', '.join(ignored)}): diffusers uses negative prompts only with classifier-free guidance "
                   f"(guidance_scale > 1), so it would be ignored. Raise guidance_scale, remove the negative "
                   f"prompt (negative_column: '', negative_suffix: ''), or set ignored_negative: warn")
            if self.ignored_negative == "refuse":
                raise ValueError(msg)
            warnings.warn(msg, UserWarning, stacklevel=2)
        return self


def _escape_compel(text: str) -> str:
    return text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")


def to_compel_syntax(text: str) -> str:
    """Translate A1111 weights to compel's syntax: ``"(bird house:1.3)"`` -> ``"(bird house)1.3"``.

    Parentheses outside weight groups are escaped so compel does not read them as syntax.
    """
    out, pos = [], 0
    for m in WEIGHT_RE.finditer(text or ""):
        out.append(_escape_compel(text[pos:m.start()]))
        weight = float(m.group(2))
        out.append(f"({_escape_compel(m.group(1))}){weight:g}")
        pos = m.end()
    out.append(_escape_compel((text or "")[pos:]))
    return "".join(out)


def _compel_wrapper(pipe):
    """(compel wrapper class, kind) for pipelines whose text encoders compel supports, else None."""
    try:
        import compel
    except ImportError:
        return None
    names = [c.__name__ for c in type(pipe).__mro__]
    if "StableDiffusionXLPipeline" in names and hasattr(compel, "CompelForSDXL"):
        return compel.CompelForSDXL, "sdxl"
    if "StableDiffusionPipeline" in names and hasattr(compel, "CompelForSD"):
        return compel.CompelForSD, "sd"
    return None


def row_prompt_seed(batch: dict, i: int, row_id: str, p: Any) -> tuple[str, str, int]:
    """Row ``i``'s ``(prompt, negative prompt, seed)`` for a text-to-image actor whose params
    ``p`` name ``prompt_column``, ``negative_column``, ``seed_column`` and ``negative_suffix``.

    The negative prompt is the row's (null -> empty) joined with ``p.negative_suffix``; the seed
    is the row's seed column or ``rows.seed_from_id(row_id)`` when absent or null. Raises
    ``InputError`` naming the row and field for an empty prompt, a non-string negative prompt,
    or a seed that is not an integer in [0, 2**63).
    """
    prompt = batch[p.prompt_column][i]
    if is_missing(prompt) or not isinstance(prompt, str) or not prompt.strip():
        raise rows.InputError(row_id, p.prompt_column, f"empty or missing prompt ({prompt!r})")
    neg = batch[p.negative_column][i] if p.negative_column in batch else None
    if is_missing(neg):
        neg = ""
    if not isinstance(neg, str):
        raise rows.InputError(row_id, p.negative_column, f"negative prompt is not a string ({neg!r})")
    negative = ", ".join(s for s in (neg.strip(), p.negative_suffix.strip()) if s)
    seed_val = batch[p.seed_column][i] if p.seed_column in batch else None
    if is_missing(seed_val):
        return prompt, negative, rows.seed_from_id(row_id)
    try:
        seed = int(seed_val)
        if isinstance(seed_val, (float, np.floating)) and seed != seed_val:
            raise ValueError(seed_val)
    except (TypeError, ValueError, OverflowError):
        raise rows.InputError(row_id, p.seed_column, f"seed {seed_val!r} is not an integer") from None
    if not 0 <= seed < 2 ** 63:
        raise rows.InputError(row_id, p.seed_column, f"seed {seed} out of range [0, 2**63)")
    return prompt, negative, seed


class Text2Image:
    """Generate one image per row with a diffusers text-to-image pipeline.

    Input columns: ``id``; the prompt column (``prompt``); optional negative-prompt column
    (``negative_prompt``; a null cell means none); optional ``seed`` column (int; null ->
    ``seed_from_id(id)``).

    Output columns (one entry per row; ``None`` where the row failed):

    - ``image`` (str): URI of the PNG written to ``<output_dir>/<id>.png`` -- or, when
      ``output_dir`` is empty, ``image_png`` (bytes): the PNG itself;
    - ``seed`` (int): the seed used; ``gen_steps`` (int), ``gen_guidance_scale`` (float):
      the sampler settings used; ``gen_height`` / ``gen_width`` (int, px): the size of the
      generated image;
    - ``prompt_weights_stripped`` (bool): the row's prompt or negative prompt had
      ``(object:w)`` weights that this pipeline could not apply and were removed;
    - ``gen_cache_hits`` / ``gen_cache_misses`` (int, 0 or 1): the image came from the
      generation cache / was looked up there, generated and stored (both 0 without a cache);
    - ``rows.ROW_ERROR``: ``None``, or ``"InputError: row 'x' field 'prompt': ..."`` (missing
      prompt, bad seed), ``"OutOfMemoryError: ..."`` (did not fit even alone), or the write
      error for the output file.
    """

    class Params(T2IParams):
        prompt_column: str = Field("prompt", description="Column holding the positive prompt (Antidote: the "
                                   "rewritten `caption`, SPEC C3, not the weighted `prompt`).")
        negative_column: str = Field("negative_prompt", description="Optional column holding the per-row negative "
                                     "prompt (Antidote: `prompt_neg`, the no-exist objects); absent or null -> none.")
        num_inference_steps: int = Field(28, ge=1, description="Denoising steps (SPEC C3: Antidote/SD3-medium 28; "
                                         "SD-Turbo: 1-4).")
        guidance_scale: float = Field(7.5, ge=0.0, description="Classifier-free guidance scale (SPEC C3: 7.5; "
                                      "SD-Turbo: 0.0).")
        negative_suffix: str = Field(QUALITY_NEGATIVES, description="Quality negatives appended to each row's "
                                     "negative prompt (SPEC C3's list, reworded); empty = none.")
        weighted_prompts: bool = Field(True, description="Apply `(object:1.3)` weights with compel where the "
                                       "pipeline supports it (SD 1.x/2.x, SDXL); otherwise, or when False, the "
                                       "weights are stripped and `prompt_weights_stripped` is set.")
        max_sequence_length: int | None = Field(256, ge=1, description="T5 token limit for pipelines with a T5 "
                                                "encoder (SD3 default 256); ignored by pipelines without it.")

    @classmethod
    def columns(cls, params: dict) -> tuple[list[str], list[str]]:
        """(required input columns, output columns); the negative and seed columns are optional."""
        p = cls.Params.model_validate(params)
        image_col = "image" if p.output_dir else "image_png"
        return ([rows.ID, p.prompt_column],
                [image_col, "seed", "gen_steps", "gen_guidance_scale", "gen_height", "gen_width",
                 "prompt_weights_stripped", "gen_cache_hits", "gen_cache_misses"])

    #: the runtime passes the run's generation cache config (``cache=``)
    supports_cache = True

    def __init__(self, model: dict, params: dict, cache: dict | None = None):
        self.params = self.Params.model_validate(params)
        set_threads(self.params.num_threads)
        self.resolved, self.device, self.dtype, self._path = load_spec(model, ("diffusers",), "Text2Image")
        self.placeholder = self.resolved.placeholder
        self.cache = open_cache(cache)
        self._identity = model_identity(self.resolved)
        # every setting that changes the picture (part of each row's cache key)
        self._settings = self.params.model_dump(include={"num_inference_steps", "guidance_scale", "height", "width",
                                                         "negative_suffix", "weighted_prompts",
                                                         "max_sequence_length", "extra_call_kwargs"})
        self.pipe = None
        if self.cache is None:
            self._load()

    def _load(self) -> None:
        """Load the diffusers pipeline (and compel where it applies); once, at the first miss
        when a cache is on."""
        if self.pipe is not None:
            return
        import torch
        from diffusers import DiffusionPipeline

        path = self._path
        spec = self.resolved.spec
        opts = dict(spec.options)
        load_kwargs: dict[str, Any] = {"dtype": self.dtype}
        if spec.revision:
            load_kwargs["revision"] = spec.revision
        if opts.get("variant"):
            load_kwargs["variant"] = opts["variant"]
        for component in opts.get("drop_components", []):  # e.g. SD3 without T5: text_encoder_3, tokenizer_3
            load_kwargs[component] = None
        self.pipe = DiffusionPipeline.from_pretrained(path, **load_kwargs)
        if opts.get("cpu_offload") and self.device.type == "cuda":
            self.pipe.enable_model_cpu_offload()
        else:
            self.pipe.to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        self._call_params = set(inspect.signature(self.pipe.__call__).parameters)
        wrapper = _compel_wrapper(self.pipe) if self.params.weighted_prompts else None
        self.weights_supported = wrapper is not None
        self._compel = None
        self._compel_kind = None
        if wrapper is not None:
            cls, self._compel_kind = wrapper
            self._compel = cls(self.pipe, device=str(self.device))
        self._torch = torch

    # -- per-row inputs ------------------------------------------------------------------

    def _key(self, prompt: str, negative: str, seed: int) -> str:
        return cache_key({"kind": "text2image", "model": self._identity, "prompt": prompt, "negative": negative,
                          "seed": seed, "settings": self._settings})

    def _render(self, prompt: str, negative: str, seed: int) -> tuple[str, str, int, bool]:
        """The prompts as this pipeline takes them: compel syntax, or weights stripped (flagged)."""
        weighted = has_weights(prompt) or has_weights(negative)
        if self._compel is not None:
            return to_compel_syntax(prompt), to_compel_syntax(negative), seed, False
        return strip_weights(prompt), strip_weights(negative), seed, weighted

    # -- generation ----------------------------------------------------------------------

    def _generate(self, items: list[tuple[str, str, int]]):
        """One pipeline call for ``items`` = [(prompt, negative, seed)]; returns PIL images."""
        torch = self._torch
        p = self.params
        prompts = [x[0] for x in items]
        negatives = [x[1] for x in items]
        generators = [torch.Generator(device="cpu").manual_seed(x[2]) for x in items]
        kwargs: dict[str, Any] = dict(num_inference_steps=p.num_inference_steps, guidance_scale=p.guidance_scale,
                                      generator=generators, output_type="pil")
        if p.height:
            kwargs["height"] = p.height
        if p.width:
            kwargs["width"] = p.width
        if p.max_sequence_length and "max_sequence_length" in self._call_params:
            kwargs["max_sequence_length"] = p.max_sequence_length
        kwargs.update(p.extra_call_kwargs)
        with torch.inference_mode():
            if self._compel is not None:
                cond = self._compel(prompts, negative_prompt=negatives)
                kwargs.update(prompt_embeds=cond.embeds, negative_prompt_embeds=cond.negative_embeds)
                if self._compel_kind == "sdxl":
                    kwargs.update(pooled_prompt_embeds=cond.pooled_embeds,
                                  negative_pooled_prompt_embeds=cond.negative_pooled_embeds)
            else:
                kwargs.update(prompt=prompts, negative_prompt=negatives)
            out = self.pipe(**kwargs)
        return list(out.images)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        """Generate the batch's images (one pipeline call for the cache misses; halved on
        out-of-memory)."""
        p = self.params
        n = batch_len(batch)
        ids = row_ids(batch)
        errors: list[str | None] = [None] * n
        seeds: list[int | None] = [None] * n
        stripped = [False] * n
        hit = [False] * n
        pngs: list[bytes | None] = [None] * n
        sizes: list[tuple[int, int] | None] = [None] * n  # (width, height)
        keys: dict[int, str] = {}
        items: dict[int, tuple[str, str, int]] = {}
        for i, rid in enumerate(ids):
            try:
                prompt, negative, seed = row_prompt_seed(batch, i, rid, p)
            except rows.InputError as exc:
                errors[i] = error_text(exc)
                continue
            seeds[i] = seed
            if self.cache is not None:
                keys[i] = self._key(prompt, negative, seed)
                entry = self.cache.get(keys[i])
                png = self.cache.get_blob(keys[i], ".png") if entry is not None else None
                if png is not None:
                    pngs[i], hit[i] = png, True
                    sizes[i] = (int(entry["width"]), int(entry["height"]))
                    stripped[i] = bool(entry.get("weights_stripped"))
                    continue
            items[i] = (prompt, negative, seed)
        if items:
            self._load()
        order = list(items)
        rendered = {i: self._render(*items[i]) for i in order}
        images = run_halving_on_oom(self._generate, [rendered[i][:3] for i in order])
        for i, img in zip(order, images):
            if isinstance(img, BaseException):
                errors[i] = f"{type(img).__name__}: row {ids[i]!r}: out of memory even with batch size 1: {img}"
                continue
            pngs[i], sizes[i], stripped[i] = encode_png(img), img.size, rendered[i][3]
            if self.cache is not None:
                self.cache.put_blob(keys[i], pngs[i], ".png")  # the blob first: an entry always has its PNG
                self.cache.put(keys[i], {"width": img.size[0], "height": img.size[1],
                                         "weights_stripped": rendered[i][3]})
        out_image: list[Any] = [None] * n
        for i in range(n):
            if pngs[i] is None:
                continue
            if p.output_dir:
                uri = uio.join(p.output_dir, image_file_name(ids[i]))
                try:
                    out_image[i] = uio.write_bytes(uri, pngs[i])
                except (OSError, ValueError) as exc:
                    errors[i] = f"{type(exc).__name__}: row {ids[i]!r} field 'image': cannot write {uri}: {exc}"
            else:
                out_image[i] = pngs[i]
        out = dict(batch)
        out["image" if p.output_dir else "image_png"] = object_column(out_image)
        out["seed"] = object_column(seeds)
        out["gen_steps"] = np.full(n, p.num_inference_steps, dtype=np.int64)
        out["gen_guidance_scale"] = np.full(n, p.guidance_scale, dtype=np.float64)
        out["gen_height"] = object_column([None if sz is None else sz[1] for sz in sizes])
        out["gen_width"] = object_column([None if sz is None else sz[0] for sz in sizes])
        out["prompt_weights_stripped"] = np.asarray(stripped, dtype=bool)
        out["gen_cache_hits"] = np.asarray(hit, dtype=np.int64)
        out["gen_cache_misses"] = np.asarray([int(i in keys and not hit[i] and pngs[i] is not None) for i in range(n)],
                                             dtype=np.int64)
        out[rows.ROW_ERROR] = object_column(errors)
        return out
