"""The memory bank as one Ray actor: the only shared state of the Antidote pipeline.

Semantics under parallel execution: the actor executes one method call at a time, so every
``query`` sees exactly the entries whose ``add`` completed before it, and no update is ever
lost (the original mutated a Python list from up to 100 threads without a lock). A row's
"avoid" examples therefore come from captions whose questions were generated *earlier in
completion order* — as in the original's thread pool — and rows generated concurrently in
flight do not see each other. With one worker and a fixed input order the result is
deterministic; with several it depends on scheduling, like the original. A resumed run
re-seeds the bank from the committed rows before it starts.
"""
from __future__ import annotations

import numpy as np

from udfs.memory_bank import MIN_ENTRIES, THRESHOLD, TOP_K, normalize, similar_questions


class MemoryBank:
    """Holds ``(n, d)`` float32 caption embeddings and their CPQ questions."""

    def __init__(self, threshold: float = THRESHOLD, min_entries: int = MIN_ENTRIES, top_k: int = TOP_K):
        self.threshold, self.min_entries, self.top_k = threshold, min_entries, top_k
        self.ids: set[str] = set()
        self.emb = np.zeros((0, 0), dtype=np.float32)
        self.questions: list[str] = []

    def add(self, ids: list[str], embeddings: list[list[float]], questions: list[str]) -> int:
        """Add entries (ids already present are ignored, so a retried batch adds nothing twice).
        Returns the bank size."""
        keep = [k for k, i in enumerate(ids) if i not in self.ids and questions[k]]
        if keep:
            new = normalize(np.asarray([embeddings[k] for k in keep], dtype=np.float32))
            self.emb = new if self.emb.size == 0 else np.vstack([self.emb, new])
            self.questions.extend(questions[k] for k in keep)
            self.ids.update(ids[k] for k in keep)
        return len(self.questions)

    def query(self, embeddings: list[list[float]]) -> list[list[str]]:
        """Avoid-examples for each embedding (see ``udfs.memory_bank.similar_questions``)."""
        q = np.asarray(embeddings, dtype=np.float32)
        if self.emb.size == 0:
            return [[] for _ in range(len(q))]
        return similar_questions(self.emb, self.questions, q, self.threshold, self.min_entries, self.top_k)

    def size(self) -> int:
        """Number of stored entries."""
        return len(self.questions)
