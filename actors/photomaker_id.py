"""PhotoMaker v1 identity encoder and delayed merge, re-built for diffusers' stock SDXL pipeline.

diffusers 0.42.1 has no PhotoMaker (notes/identity-generation.md §1). PhotoMaker v1
(TencentARC/PhotoMaker, Li et al., "PhotoMaker: Customizing Realistic Human Photos via
Stacked ID Embedding", CVPR 2024; Apache-2.0 code) conditions SDXL on a face photo by
replacing the text embedding of the *class word* that precedes the trigger word
("a woman img, ...") with a fusion of that embedding and a CLIP-image embedding of the face,
and by using the fused embeddings only after ``start_merge_step`` denoising steps. This module
re-implements the mechanism from that description (nothing copied); the parameter *names*
follow the official ``PhotoMakerIDEncoder`` so that ``load_state_dict(strict=True)`` accepts
the ``id_encoder`` dict of the official ``photomaker-v1.bin``:

- ``vision_model.*``, ``visual_projection.weight``: a ``CLIPVisionModelWithProjection``
  (v1: CLIP ViT-L/14, hidden 1024, 24 layers, 16 heads, 224 px, projection 768);
- ``visual_projection_2.weight``: Linear hidden -> 1280, no bias (1280 = width of SDXL's
  second text encoder; 768 + 1280 = 2048 = SDXL's concatenated text-embedding width);
- ``fuse_module.mlp1.{layernorm,fc1,fc2}``: MLP without residual on [class embedding ‖ id
  embedding] (2 x 2048 -> 2048 -> 2048), whose output is added to the class embedding;
  ``fuse_module.mlp2.*``: residual MLP (2048 -> 2048 -> 2048); ``fuse_module.layer_norm``.

Checkpoint layout (official): a torch ``.bin`` holding exactly ``{"id_encoder": state_dict,
"lora_weights": state_dict}``, or a ``.safetensors`` file with keys prefixed ``id_encoder.`` /
``lora_weights.``. The LoRA half is passed unchanged to ``pipe.load_lora_weights(...,
adapter_name="photomaker")`` (the official loader does the same; needs peft).

One ID image per row (MIRROR has one source photo per client); the official "stacked" form
(class token repeated once per ID image) is not implemented.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

#: CLIP ViT-L/14 config of PhotoMaker v1's ID encoder (TencentARC/PhotoMaker photomaker/model.py).
V1_VISION_CONFIG: dict[str, Any] = {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
                                    "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768,
                                    "image_size": 224}
#: The two top-level keys of the official checkpoint.
CHECKPOINT_KEYS = ("id_encoder", "lora_weights")
#: Trigger word of PhotoMaker v1 (official ``load_photomaker_adapter(trigger_word="img")``).
TRIGGER_WORD = "img"
#: Optional side file next to the checkpoint with a ``CLIPVisionConfig`` dict for non-v1 (tiny)
#: encoders; absent -> ``V1_VISION_CONFIG``. The official release has no such file.
CONFIG_FILE = "id_encoder_config.json"


class _MLP(nn.Module):
    """LayerNorm -> Linear -> GELU -> Linear (+ input when ``residual``); names as the official MLP."""

    def __init__(self, dim_in: int, dim_out: int, dim_hidden: int, residual: bool):
        super().__init__()
        if residual and dim_in != dim_out:
            raise ValueError("a residual MLP needs dim_in == dim_out")
        self.layernorm = nn.LayerNorm(dim_in)
        self.fc1 = nn.Linear(dim_in, dim_hidden)
        self.fc2 = nn.Linear(dim_hidden, dim_out)
        self.act_fn = nn.GELU()
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc2(self.act_fn(self.fc1(self.layernorm(x))))
        return x + y if self.residual else y


class FuseModule(nn.Module):
    """Fuse a class-word text embedding with an ID embedding (both ``[N, dim]`` -> ``[N, dim]``)."""

    def __init__(self, dim: int):
        super().__init__()
        self.mlp1 = _MLP(2 * dim, dim, dim, residual=False)
        self.mlp2 = _MLP(dim, dim, dim, residual=True)
        self.layer_norm = nn.LayerNorm(dim)

    def forward(self, class_embeds: torch.Tensor, id_embeds: torch.Tensor) -> torch.Tensor:
        id_embeds = id_embeds.to(class_embeds.dtype)
        x = self.mlp1(torch.cat([class_embeds, id_embeds], dim=-1)) + class_embeds
        return self.layer_norm(self.mlp2(x))


class PhotoMakerIDEncoder(CLIPVisionModelWithProjection):
    """CLIP vision tower + second projection + fuse module (PhotoMaker v1 parameter names).

    ``id_embeds(pixel_values [B, 3, S, S] float, CLIP-normalised)`` -> ``[B, P1 + P2]``: the
    pooled (post-LayerNorm CLS) output through both projections, concatenated. ``fuse_module``
    then maps ``([N, D], [N, D]) -> [N, D]`` with ``D = P1 + P2`` (v1: 768 + 1280 = 2048).
    """

    def __init__(self, config: CLIPVisionConfig, projection_dim_2: int = 1280):
        super().__init__(config)
        self.visual_projection_2 = nn.Linear(config.hidden_size, projection_dim_2, bias=False)
        self.fuse_module = FuseModule(config.projection_dim + projection_dim_2)

    @property
    def embed_dim(self) -> int:
        return self.config.projection_dim + self.visual_projection_2.out_features

    def id_embeds(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pooled = self.vision_model(pixel_values=pixel_values).pooler_output
        return torch.cat([self.visual_projection(pooled), self.visual_projection_2(pooled)], dim=-1)


def read_checkpoint(path: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    """``{"id_encoder": ..., "lora_weights": ...}`` from a ``.bin`` (torch, ``weights_only``)
    or ``.safetensors`` (prefixed keys) file.

    Raises ``ValueError`` when the file does not hold exactly the two official parts.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        flat = load_file(str(path))
        parts: dict[str, dict[str, torch.Tensor]] = {k: {} for k in CHECKPOINT_KEYS}
        for key, value in flat.items():
            head, _, rest = key.partition(".")
            if head not in parts:
                raise ValueError(f"{path}: unexpected key {key!r} (expected prefixes {CHECKPOINT_KEYS})")
            parts[head][rest] = value
    else:
        parts = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(parts, dict) or sorted(parts) != sorted(CHECKPOINT_KEYS):
        found = sorted(parts) if isinstance(parts, dict) else type(parts).__name__
        raise ValueError(f"{path}: a PhotoMaker checkpoint holds exactly {list(CHECKPOINT_KEYS)}, found {found}")
    return parts


def build_id_encoder(state_dict: dict[str, torch.Tensor], config: dict | None = None) -> PhotoMakerIDEncoder:
    """A ``PhotoMakerIDEncoder`` holding ``state_dict`` (strict load; eval mode, float32, CPU).

    ``config``: ``CLIPVisionConfig`` kwargs; ``None`` -> ``V1_VISION_CONFIG``. The second
    projection's width is read from ``visual_projection_2.weight`` (v1: 1280). Raises
    ``RuntimeError`` (from ``load_state_dict``) on missing/unexpected keys or shape mismatches.
    """
    sd = {k: v for k, v in state_dict.items() if not k.endswith("embeddings.position_ids")}
    cfg = CLIPVisionConfig(**(config or V1_VISION_CONFIG))
    encoder = PhotoMakerIDEncoder(cfg, projection_dim_2=int(sd["visual_projection_2.weight"].shape[0]))
    encoder.load_state_dict(sd, strict=True)
    return encoder.eval()


def encoder_config_for(checkpoint: str | Path) -> dict | None:
    """The ``id_encoder_config.json`` next to ``checkpoint`` (tiny placeholders), else ``None`` (v1)."""
    side = Path(checkpoint).parent / CONFIG_FILE
    return json.loads(side.read_text()) if side.is_file() else None


def add_trigger_word(tokenizers: list, trigger: str = TRIGGER_WORD) -> None:
    """Add ``trigger`` as a special token to every tokenizer (so BPE never splits it).

    Its id never reaches a text encoder: prompts are encoded with the trigger removed.
    """
    for tok in tokenizers:
        if tok is not None:
            tok.add_tokens([trigger], special_tokens=True)


def split_trigger(tokenizer, prompt: str, trigger: str = TRIGGER_WORD) -> tuple[str, int]:
    """``(prompt without the trigger word, token index of the class word in it)``.

    The class word is the token just before the single trigger token ("portrait photo of a
    woman img, ..." -> index of ``woman``); the index counts the BOS token, i.e. it indexes the
    encoder's ``[77, D]`` output. Raises ``ValueError`` when the trigger is missing, repeated,
    not preceded by a word, truncated away, or when removing it would change the other tokens.
    """
    trig_id = tokenizer.convert_tokens_to_ids(trigger)
    ids = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids
    where = [k for k, t in enumerate(ids) if t == trig_id]
    if len(where) != 1:
        raise ValueError(f"prompt must contain the trigger word {trigger!r} exactly once after a class word "
                         f"(e.g. 'a woman {trigger}'), found it {len(where)} times within the first "
                         f"{tokenizer.model_max_length} tokens")
    k = where[0]
    if k < 2:
        raise ValueError(f"trigger word {trigger!r} must follow a class word such as 'man' or 'woman'")
    clean = re.sub(rf"\s*(?<![\w]){re.escape(trigger)}(?![\w])", "", prompt, count=1).strip()
    clean_ids = tokenizer(clean, truncation=True, max_length=tokenizer.model_max_length).input_ids
    expected = (ids[:k] + ids[k + 1:])
    n = min(len(clean_ids), len(expected)) - 1  # the last token may be EOS after truncation
    if clean_ids[:n] != expected[:n]:
        raise ValueError(f"removing the trigger word {trigger!r} changes the prompt's other tokens")
    return clean, k - 1


def strip_trigger(prompt: str, trigger: str = TRIGGER_WORD) -> str:
    """``prompt`` without the whole word ``trigger`` (for methods other than PhotoMaker)."""
    return re.sub(rf"\s*(?<![\w]){re.escape(trigger)}(?![\w])", "", prompt).strip()
