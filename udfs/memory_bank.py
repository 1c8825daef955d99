"""Caption-similarity memory bank logic (Antidote step 3-1-1, SPEC C6), pure numpy.

The bank stores (caption embedding, CPQ question) pairs. For a new caption it returns up to
``top_k`` stored questions whose caption cosine similarity is ``> threshold`` — but only once
the bank holds at least ``min_entries`` entries. Defaults from the original: bge-m3 CLS
embeddings, L2-normalised; threshold 0.8; 500 entries; 3 examples.
"""
from __future__ import annotations

import numpy as np

THRESHOLD = 0.8
MIN_ENTRIES = 500
TOP_K = 3


def normalize(x: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation of a float array ``(n, d)``; zero rows stay zero."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms == 0, 1.0, norms)


def similar_questions(bank: np.ndarray, questions: list[str], queries: np.ndarray,
                      threshold: float = THRESHOLD, min_entries: int = MIN_ENTRIES,
                      top_k: int = TOP_K) -> list[list[str]]:
    """For each query embedding, the questions of the ``top_k`` most similar bank entries with
    cosine ``> threshold`` (most similar first).

    ``bank``: ``(n, d)`` float, rows L2-normalised; ``questions``: ``n`` strings;
    ``queries``: ``(m, d)`` float. Returns ``m`` lists; all empty while ``n < min_entries``.
    Raises ``ValueError`` when dimensions disagree.
    """
    m = len(queries)
    if len(bank) < max(1, min_entries):
        return [[] for _ in range(m)]
    if bank.shape[1] != queries.shape[1]:
        raise ValueError(f"embedding size {queries.shape[1]} does not match the bank's {bank.shape[1]}")
    sims = normalize(queries) @ bank.T
    out = []
    for row in sims:
        idx = np.argsort(-row, kind="stable")[:top_k]
        out.append([questions[j] for j in idx if row[j] > threshold])
    return out
