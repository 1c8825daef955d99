"""Identity-conditioned text-to-image (MIRROR step 3d, SPEC A7): one face photo per row.

``IdentityText2Image`` generates one portrait per row that keeps the identity of the row's
source face, with one of two methods chosen by the model spec (``options.identity_method``,
or the ``identity.json`` a placeholder folder carries):

- ``photomaker`` (paper profile, SPEC A7): SDXL (RealVisXL V3.0) + PhotoMaker v1
  (TencentARC/PhotoMaker, ``photomaker-v1.bin``). diffusers has no PhotoMaker, so its ID
  encoder and delayed merge are rebuilt on the stock ``StableDiffusionXLPipeline``
  (``actors.photomaker_id``; notes/identity-generation.md §1): the trigger word ``img`` is
  added to both tokenizers; each prompt must read "... a man img ..." / "... a woman img ...";
  prompts are encoded with the trigger removed; the class word's embedding is replaced by
  ``fuse_module(class embedding, ID embedding of the row's face)``; steps ``0 ..
  start_merge_step`` use the text-only embeddings and the later steps the fused ones, switched
  by ``callback_on_step_end`` (PhotoMaker's ``i <= start_merge_step`` rule). The LoRA half of
  the checkpoint goes to ``pipe.load_lora_weights(..., adapter_name="photomaker")`` and is
  fused (MIRROR's ``run_step3.py`` calls ``fuse_lora()``). Per row by construction.
- ``ip_adapter`` (alternative; a documented deviation from the paper): diffusers' own
  ``load_ip_adapter`` with an h94/IP-Adapter image variant (plain ``ip-adapter_sd15`` /
  ``_sdxl``, or ``ip-adapter-plus-face_*`` reading the encoder's penultimate hidden states).
  **Trap** (notes §6.1): the stock pipelines repeat the IP-Adapter embeds for every row and
  silently mix per-row inputs, so this actor encodes each row's face itself and replaces the
  pipeline's ``prepare_ip_adapter_image_embeds`` (on this pipeline instance only) by one that
  returns those ``[2B, 1, D]`` (Plus: ``[2B, 1, T, D]``) embeds unchanged, negatives first.
  FaceID variants (insightface embeddings) are not supported: the pipeline must have a CLIP
  image encoder. The trigger word, if present, is removed from the prompt.

Rows of different clients are batched in one pipeline call; each row uses its own face (a
batch equals the single-row calls within float rounding, <= 1/255 per pixel, notes §5).

Determinism: one ``torch.Generator("cpu").manual_seed(seed)`` per row, ``seed`` = the row's
seed column or ``rows.seed_from_id(id)`` (the MIRROR original used one generator seeded 19
for the whole run, so its images depend on processing order: SPEC A7). Same id + same batch
size + same thread count -> same PNG bytes.

Sizes: generated at ``height x width`` (None = the pipeline default: SDXL 1024 px, SPEC A7
"pipeline default"), then resized with Lanczos to ``output_size`` (MIRROR: 336 x 336 px).
"""
from __future__ import annotations

import hashlib
import inspect
import json
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from actors.batching import batch_len, error_text, is_missing, object_column, row_ids, run_halving_on_oom, set_threads
from actors.models import load_spec
from actors.text2image import T2IParams, row_prompt_seed
from udfs import io as uio
from udfs import rows
from udfs.images import encode_png, image_file_name, load_image

__all__ = ["IdentityText2Image", "MIRROR_EXTRA_NEGATIVE", "IDENTITY_METHODS", "start_merge_step"]

IDENTITY_METHODS = ("photomaker", "ip_adapter")
#: Appended to every negative prompt by MIRROR's ``run_step3.py`` (SPEC A7 "extra negative").
MIRROR_EXTRA_NEGATIVE = "missing limbs, mutilated"
#: PhotoMaker caps the merge step at 30 (official pipeline; SPEC A7 "capped at 30").
MAX_MERGE_STEP = 30


def start_merge_step(num_steps: int, style_strength_ratio: float) -> int:
    """PhotoMaker's ``min(int(style_strength_ratio / 100 * num_steps), 30)``; paper: 20 %, 50 steps -> 10."""
    return min(int(float(style_strength_ratio) / 100 * num_steps), MAX_MERGE_STEP)


def _face_key(value: Any) -> str:
    """Cache key of a face cell within one batch (path string, or hash of the bytes)."""
    if isinstance(value, dict):
        return _face_key(value.get("bytes") if value.get("bytes") is not None else value.get("path"))
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "b:" + hashlib.sha1(bytes(value)).hexdigest()
    if isinstance(value, np.ndarray):
        return "b:" + hashlib.sha1(value.tobytes()).hexdigest()
    return "s:" + str(value)


class IdentityText2Image:
    """Generate one identity-conditioned image per row (PhotoMaker v1 or IP-Adapter).

    Input columns: ``id``; the prompt column (``prompt``, str; PhotoMaker: must contain "<class
    word> img" once, e.g. "portrait photo of a woman img, ..."); optional negative-prompt column
    (``negative_prompt``; null -> none); the face column (``face_image``: path/URI string,
    encoded bytes or ``{"bytes", "path"}``; one photo of the client, any size, RGB after
    decoding); optional ``seed`` column (int in [0, 2**63); null -> ``seed_from_id(id)``);
    optional output-name column (``output_name_column``, e.g. ``"<dialogue_id>/turn-3.png"``).

    Output columns (one entry per row; ``None`` where the row failed):

    - ``image_png`` (bytes, PNG RGB ``output_size`` x ``output_size``), or with ``output_dir``
      ``image`` (str): URI of the written PNG;
    - ``seed`` (int); ``identity_method`` (str: ``photomaker`` | ``ip_adapter``);
      ``gen_steps`` (int), ``gen_guidance_scale`` (float), ``gen_start_merge_step`` (int,
      PhotoMaker only, else ``None``), ``gen_height`` / ``gen_width`` (int, px: the size of the
      returned image);
    - ``rows.ROW_ERROR``: ``None`` or ``"InputError: row 'x' field 'face_image': image file not
      found: ..."`` (missing/undecodable face, missing prompt, PhotoMaker prompt without its
      trigger, bad seed or output name), ``"OutOfMemoryError: ..."``, or the write error.

    Model spec (``backend: diffusers``) options, each overriding the model folder's
    ``identity.json`` (placeholders carry one): ``identity_method``; ``adapter`` (hub repo id or
    folder; relative folders are looked up inside the model folder first);
    ``adapter_subfolder``; ``adapter_weight_name``; ``image_encoder_folder`` (IP-Adapter,
    default ``image_encoder``); ``trigger_word`` (default ``img``); ``fuse_lora`` (default
    true); ``scheduler`` (``ddim`` (default, SPEC A7) or ``default``); ``variant``,
    ``cpu_offload``.
    """

    class Params(T2IParams):
        prompt_column: str = Field("prompt", description="Column with the positive prompt (MIRROR step 3c: "
                                   "'portrait photo of a <man|woman> img' + quality tags + aligned expression).")
        negative_column: str = Field("negative_prompt", description="Optional column with the negative prompt "
                                     "(MIRROR: standard negatives + the contrasting expression); null -> none.")
        face_column: str = Field("face_image", description="Column with the source face photo (path/URI, bytes "
                                 "or {'bytes','path'}): MIRROR's CelebA/face-pool image of the assigned identity.")
        output_name_column: str = Field("", description="Optional column with the relative output file name "
                                        "under output_dir (e.g. '<dialogue_id>/turn-<t>.png'); empty or null -> "
                                        "'<id>.png'.")
        height: int | None = Field(None, ge=8, description="Generation height in px; None = the pipeline default "
                                   "(SDXL 1024: SPEC A7 'pipeline default').")
        output_size: int | None = Field(336, ge=8, description="Side of the square output in px after a Lanczos "
                                        "resize (SPEC A7: 336 x 336); None = keep the generated size.")
        num_inference_steps: int = Field(50, ge=1, description="DDIM steps (SPEC A7: 50).")
        guidance_scale: float = Field(5.0, ge=0.0, description="Classifier-free guidance (SPEC A7: pipeline "
                                      "default 5.0).")
        style_strength_ratio: float = Field(20.0, ge=0.0, le=100.0, description="PhotoMaker: percent of the steps "
                                            "run text-only before the identity is merged (SPEC A7: 20 -> "
                                            "start_merge_step = int(0.2 * 50) = 10, capped at 30).")
        start_merge_step: int | None = Field(None, ge=0, description="PhotoMaker: override of the merge step; steps "
                                             "0..start_merge_step are text-only; >= num_inference_steps - 1 "
                                             "never merges.")
        ip_adapter_scale: float = Field(0.6, ge=0.0, description="IP-Adapter: pipe.set_ip_adapter_scale (0.6 as "
                                        "in the diffusers IP-Adapter guide's face examples; 1.0 = full image "
                                        "prompt).")
        negative_suffix: str = Field(MIRROR_EXTRA_NEGATIVE, description="Appended to every negative prompt "
                                     "(SPEC A7: ', missing limbs, mutilated'); empty = none.")

    @classmethod
    def columns(cls, params: dict) -> tuple[list[str], list[str]]:
        """(required input columns, output columns); negative, seed and name columns are optional."""
        p = cls.Params.model_validate(params)
        return ([rows.ID, p.prompt_column, p.face_column],
                ["image" if p.output_dir else "image_png", "seed", "identity_method", "gen_steps",
                 "gen_guidance_scale", "gen_start_merge_step", "gen_height", "gen_width"])

    # -- loading -------------------------------------------------------------------------

    def __init__(self, model: dict, params: dict):
        import torch
        from diffusers import DiffusionPipeline

        self._torch = torch
        self.params = self.Params.model_validate(params)
        set_threads(self.params.num_threads)
        self.resolved, self.device, self.dtype, path = load_spec(model, ("diffusers",), "IdentityText2Image")
        self.placeholder = self.resolved.placeholder
        spec = self.resolved.spec
        self.base_dir = Path(path) if Path(path).is_dir() else None
        opts: dict[str, Any] = {}
        if self.base_dir is not None and (self.base_dir / "identity.json").is_file():
            opts.update(json.loads((self.base_dir / "identity.json").read_text()))
        opts.update(spec.options)
        self.options = opts
        self.method: str = opts.get("identity_method", "photomaker")
        if self.method not in IDENTITY_METHODS:
            raise ValueError(f"IdentityText2Image: identity_method must be one of {IDENTITY_METHODS}, "
                             f"got {self.method!r}")
        self.trigger = str(opts.get("trigger_word", "img"))
        load_kwargs: dict[str, Any] = {"dtype": self.dtype}
        if spec.revision:
            load_kwargs["revision"] = spec.revision
        if opts.get("variant"):
            load_kwargs["variant"] = opts["variant"]
        self.pipe = DiffusionPipeline.from_pretrained(path, **load_kwargs)
        if opts.get("scheduler", "ddim") == "ddim":  # SPEC A7: DDIM from the pipeline's config
            from diffusers import DDIMScheduler

            self.pipe.scheduler = DDIMScheduler.from_config(self.pipe.scheduler.config)
        if self.method == "photomaker":
            self._load_photomaker()
        else:
            self._load_ip_adapter()
        if opts.get("cpu_offload") and self.device.type == "cuda":
            self.pipe.enable_model_cpu_offload()
        else:
            self.pipe.to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        self._call_params = set(inspect.signature(self.pipe.__call__).parameters)

    def _adapter_location(self) -> tuple[str, bool]:
        """(local folder or hub repo id of the adapter, is_local). Trap (notes §6.4): a mistyped
        local path would otherwise be read as a hub id and fail with a connection error."""
        name = str(self.options.get("adapter") or "")
        if not name:
            raise ValueError(f"IdentityText2Image: model option 'adapter' (folder or hub id of the "
                             f"{self.method} weights) is required")
        if self.base_dir is not None and (self.base_dir / name).is_dir():
            return str(self.base_dir / name), True
        if name.startswith(("/", "./", "../", "~")):
            local = Path(name).expanduser()
            if not local.is_dir():
                raise FileNotFoundError(f"IdentityText2Image: adapter folder {name!r} does not exist")
            return str(local), True
        return name, False

    def _load_photomaker(self) -> None:
        from actors import photomaker_id as pm

        names = [c.__name__ for c in type(self.pipe).__mro__]
        if "StableDiffusionXLPipeline" not in names:
            raise ValueError(f"identity_method 'photomaker' needs an SDXL pipeline, got {type(self.pipe).__name__}")
        where, local = self._adapter_location()
        weight = str(self.options.get("adapter_weight_name", "photomaker-v1.bin"))
        sub = str(self.options.get("adapter_subfolder") or "")
        if local:
            ckpt = Path(where) / sub / weight
            if not ckpt.is_file():
                raise FileNotFoundError(f"IdentityText2Image: PhotoMaker checkpoint {ckpt} does not exist")
        else:
            from huggingface_hub import hf_hub_download

            ckpt = Path(hf_hub_download(repo_id=where, filename=weight, subfolder=sub or None))
        parts = pm.read_checkpoint(ckpt)
        cfg = self.options.get("id_encoder_config") or pm.encoder_config_for(ckpt)
        self.id_encoder = pm.build_id_encoder(parts["id_encoder"], cfg).to(self.device, self.dtype)
        width = self.pipe.text_encoder.config.hidden_size + self.pipe.text_encoder_2.config.hidden_size
        if self.id_encoder.embed_dim != width:
            raise ValueError(f"PhotoMaker ID embedding width {self.id_encoder.embed_dim} != the pipeline's text "
                             f"embedding width {width}")
        self.pipe.load_lora_weights(parts["lora_weights"], adapter_name="photomaker")
        if self.options.get("fuse_lora", True):
            self.pipe.fuse_lora()
        pm.add_trigger_word([self.pipe.tokenizer, self.pipe.tokenizer_2], self.trigger)
        from transformers import CLIPImageProcessor

        size = int(self.id_encoder.config.image_size)  # official: CLIPImageProcessor() defaults, 224 px
        self.face_processor = CLIPImageProcessor(size={"shortest_edge": size},
                                                 crop_size={"height": size, "width": size})

    def _load_ip_adapter(self) -> None:
        from diffusers.models.embeddings import ImageProjection

        where, _ = self._adapter_location()
        kwargs: dict[str, Any] = {"subfolder": str(self.options.get("adapter_subfolder") or ""),
                                  "weight_name": str(self.options.get("adapter_weight_name",
                                                                      "ip-adapter_sd15.safetensors"))}
        if self.options.get("image_encoder_folder"):
            kwargs["image_encoder_folder"] = self.options["image_encoder_folder"]
        self.pipe.load_ip_adapter(where, **kwargs)
        if getattr(self.pipe, "image_encoder", None) is None:
            raise ValueError("IdentityText2Image: the IP-Adapter has no CLIP image encoder (FaceID variants need "
                             "face-recognition embeddings, which this actor does not compute)")
        self.pipe.set_ip_adapter_scale(self.params.ip_adapter_scale)
        layers = self.pipe.unet.encoder_hid_proj.image_projection_layers
        if len(layers) != 1:
            raise ValueError(f"IdentityText2Image: exactly one IP-Adapter expected, got {len(layers)}")
        self.ip_variant = "plain" if isinstance(layers[0], ImageProjection) else "plus"
        self.pipe.prepare_ip_adapter_image_embeds = self._per_row_ip_embeds  # the per-row fix (notes §6.1b)

    @staticmethod
    def _per_row_ip_embeds(ip_adapter_image, ip_adapter_image_embeds, device, num_images_per_prompt,
                           do_classifier_free_guidance):
        """Replacement for the pipeline's ``prepare_ip_adapter_image_embeds``: returns the
        caller's per-row embeds unchanged instead of repeating them for every row (which mixes
        identities across rows: notes §6.1). Raises ``ValueError`` when none were given or the
        row count does not match."""
        if ip_adapter_image_embeds is None:
            raise ValueError("per-row IP-Adapter generation needs ip_adapter_image_embeds built by the actor")
        rows_expected = num_images_per_prompt * (2 if do_classifier_free_guidance else 1)
        for e in ip_adapter_image_embeds:
            if e.shape[0] != rows_expected:
                raise ValueError(f"IP-Adapter embeds have {e.shape[0]} rows, expected {rows_expected}")
        return [e.to(device) for e in ip_adapter_image_embeds]

    # -- per-row inputs ------------------------------------------------------------------

    def _row_inputs(self, batch: dict, i: int, row_id: str) -> dict[str, Any]:
        from actors import photomaker_id as pm

        p = self.params
        prompt, negative, seed = row_prompt_seed(batch, i, row_id, p)
        class_index = None
        if self.method == "photomaker":
            try:
                prompt, class_index = pm.split_trigger(self.pipe.tokenizer_2, prompt, self.trigger)
            except ValueError as exc:
                raise rows.InputError(row_id, p.prompt_column, str(exc)) from None
        else:
            prompt = pm.strip_trigger(prompt, self.trigger)
        if p.face_column not in batch:
            raise rows.InputError(row_id, p.face_column, "no face image column in the batch")
        face_cell = batch[p.face_column][i]
        face = load_image(face_cell, row_id, p.face_column)  # InputError names row, field and file
        name = None
        if p.output_dir:
            raw = batch[p.output_name_column][i] if p.output_name_column and p.output_name_column in batch else None
            if is_missing(raw) or raw == "":
                name = image_file_name(row_id)
            else:
                name = str(raw)
                parts = name.replace("\\", "/").split("/")
                if (name.startswith("/") or ":" in name or any(s in ("", ".", "..") for s in parts)
                        or not name.endswith(".png")):
                    raise rows.InputError(row_id, p.output_name_column, f"bad output name {name!r} (relative "
                                          "'.png' path without ':', '..' or empty parts)")
        return {"prompt": prompt, "negative": negative, "seed": seed, "face": face, "face_key": _face_key(face_cell),
                "class_index": class_index, "name": name}

    def _merge_step(self) -> int:
        p = self.params
        if p.start_merge_step is not None:
            return p.start_merge_step
        return start_merge_step(p.num_inference_steps, p.style_strength_ratio)

    # -- generation ----------------------------------------------------------------------

    def _unique_faces(self, items: list[dict]) -> tuple[list, list[int]]:
        keys: dict[str, int] = {}
        faces, index = [], []
        for it in items:
            if it["face_key"] not in keys:
                keys[it["face_key"]] = len(faces)
                faces.append(it["face"])
            index.append(keys[it["face_key"]])
        return faces, index

    def _base_kwargs(self, items: list[dict]) -> dict[str, Any]:
        torch = self._torch
        p = self.params
        kwargs: dict[str, Any] = dict(num_inference_steps=p.num_inference_steps, guidance_scale=p.guidance_scale,
                                      generator=[torch.Generator(device="cpu").manual_seed(x["seed"]) for x in items],
                                      output_type="pil")
        if p.height:
            kwargs["height"] = p.height
        if p.width:
            kwargs["width"] = p.width
        kwargs.update(p.extra_call_kwargs)
        return kwargs

    def _generate_photomaker(self, items: list[dict]):
        """One SDXL call: text-only embeddings until ``start_merge_step``, then the fused ones."""
        torch = self._torch
        pipe = self.pipe
        do_cfg = self.params.guidance_scale > 1.0
        faces, index = self._unique_faces(items)
        pixels = self.face_processor(images=faces, return_tensors="pt").pixel_values.to(self.device, self.dtype)
        id_embeds = self.id_encoder.id_embeds(pixels)[index]                       # [B, D]
        pe, npe, ppe, nppe = pipe.encode_prompt(prompt=[x["prompt"] for x in items], device=self.device,
                                                num_images_per_prompt=1, do_classifier_free_guidance=do_cfg,
                                                negative_prompt=[x["negative"] for x in items])
        rows_ = torch.arange(len(items), device=pe.device)
        cls = torch.tensor([x["class_index"] for x in items], device=pe.device)
        fused = pe.clone()                                                         # [B, 77, D]
        fused[rows_, cls] = self.id_encoder.fuse_module(pe[rows_, cls], id_embeds).to(pe.dtype)
        merged = torch.cat([npe, fused]) if do_cfg else fused
        merge_at = self._merge_step()

        def swap(_pipe, step, _t, callback_kwargs):  # the returned embeds are used from step + 1 on
            return {"prompt_embeds": merged} if step == merge_at else {}

        kwargs = self._base_kwargs(items)
        kwargs.update(prompt_embeds=pe, pooled_prompt_embeds=ppe, callback_on_step_end=swap,
                      callback_on_step_end_tensor_inputs=["prompt_embeds"])
        if do_cfg:
            kwargs.update(negative_prompt_embeds=npe, negative_pooled_prompt_embeds=nppe)
        return list(pipe(**kwargs).images)

    def _generate_ip_adapter(self, items: list[dict]):
        """One call with per-row IP-Adapter embeds ``[2B, 1, D]`` / ``[2B, 1, T, D]`` (neg first)."""
        torch = self._torch
        pipe = self.pipe
        do_cfg = self.params.guidance_scale > 1.0
        faces, index = self._unique_faces(items)
        pos, neg = pipe.encode_image(faces, self.device, 1, self.ip_variant == "plus")  # [U, D] or [U, T, D]
        pos, neg = pos[index].unsqueeze(1), neg[index].unsqueeze(1)
        embeds = torch.cat([neg, pos]) if do_cfg else pos
        kwargs = self._base_kwargs(items)
        kwargs.update(prompt=[x["prompt"] for x in items], negative_prompt=[x["negative"] for x in items],
                      ip_adapter_image_embeds=[embeds])
        return list(pipe(**kwargs).images)

    def _generate(self, items: list[dict]):
        with self._torch.inference_mode():
            if self.method == "photomaker":
                return self._generate_photomaker(items)
            return self._generate_ip_adapter(items)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        """Generate the batch's images (one pipeline call; halved on out-of-memory)."""
        from PIL import Image

        p = self.params
        n = batch_len(batch)
        ids = row_ids(batch)
        errors: list[str | None] = [None] * n
        seeds: list[int | None] = [None] * n
        items: dict[int, dict] = {}
        for i, rid in enumerate(ids):
            try:
                items[i] = self._row_inputs(batch, i, rid)
            except rows.InputError as exc:
                errors[i] = error_text(exc)
                continue
            seeds[i] = items[i]["seed"]
        order = list(items)
        images = run_halving_on_oom(self._generate, [items[i] for i in order])
        out_image: list[Any] = [None] * n
        heights: list[int | None] = [None] * n
        widths: list[int | None] = [None] * n
        for i, img in zip(order, images):
            if isinstance(img, BaseException):
                errors[i] = f"{type(img).__name__}: row {ids[i]!r}: out of memory even with batch size 1: {img}"
                continue
            if p.output_size and img.size != (p.output_size, p.output_size):
                img = img.resize((p.output_size, p.output_size), Image.Resampling.LANCZOS)
            png = encode_png(img)
            widths[i], heights[i] = img.size
            if p.output_dir:
                uri = uio.join(p.output_dir, items[i]["name"])
                try:
                    out_image[i] = uio.write_bytes(uri, png)
                except (OSError, ValueError) as exc:
                    errors[i] = f"{type(exc).__name__}: row {ids[i]!r} field 'image': cannot write {uri}: {exc}"
            else:
                out_image[i] = png
        merge = self._merge_step() if self.method == "photomaker" else None
        out = dict(batch)
        out["image" if p.output_dir else "image_png"] = object_column(out_image)
        out["seed"] = object_column(seeds)
        out["identity_method"] = object_column([self.method if i in items else None for i in range(n)])
        out["gen_steps"] = np.full(n, p.num_inference_steps, dtype=np.int64)
        out["gen_guidance_scale"] = np.full(n, p.guidance_scale, dtype=np.float64)
        out["gen_start_merge_step"] = object_column([merge] * n)
        out["gen_height"] = object_column(heights)
        out["gen_width"] = object_column(widths)
        out[rows.ROW_ERROR] = object_column(errors)
        return out
