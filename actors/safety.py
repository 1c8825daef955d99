"""Dialogue-safety stage: a Canary label for every utterance of a dialogue (MIRROR, SPEC A8/B5).

Labels: the five Canary classes ``udfs.safety.CANARY_LABELS`` (ProsocialDialog, Kim et al.
2022). The rule that turns labels into a verdict (which speakers count, which labels drop)
is the filter ``udfs.safety.safety_filter``; this stage labels, it does not decide.

Backends, chosen by the model spec's ``backend``:

- ``seq2seq``: an ``AutoModelForSeq2SeqLM`` (Canary is a T5-style model that generates the
  label, optionally followed by a rule of thumb). Generation is greedy and constrained to
  exactly one of the five labels: a trie over each label's token ids + EOS, applied through
  ``generate(prefix_allowed_tokens_fn=...)`` (32/32 valid labels from a random model, where
  xgrammar gave 31/32: ../shared/notes/mirror-text.md §2). No rule of thumb is generated.
  The checkpoint's own generation settings (sampling, beams, forced or suppressed tokens)
  are replaced by a plain greedy config, so they can neither break nor alter a label.
  ``batch_size`` utterances per ``generate`` call. Offline: ``placeholder:tiny-canary-t5``.
- ``sequence-classification``: an ``AutoModelForSequenceClassification`` whose ``id2label``
  are the five labels, run through ``pipeline("text-classification")`` with
  ``batch_size``. Offline: ``placeholder:tiny-canary-distilbert``.
- ``transformers``: either of the two, picked from the model's config
  (``is_encoder_decoder`` -> seq2seq).

Each utterance is classified alone (its statement text, as MIRROR's ``Canary.chirp`` call
did), never with the other speaker's text; utterances of all rows of a batch are pooled,
sorted by length (less padding) and split into ``batch_size`` groups.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from actors.batching import batch_len, error_text, object_column, row_ids, run_halving_on_oom, set_threads
from actors.models import load_spec
from udfs import rows
from udfs.safety import CANARY_LABELS, dialogue_utterances, speaker_selected

__all__ = ["DialogueSafetyClassifier", "label_trie", "trie_constraint"]

BACKENDS = ("seq2seq", "sequence-classification", "transformers")


def label_trie(tokenizer, labels: tuple[str, ...]) -> tuple[dict, dict[tuple[int, ...], str]]:
    """Token trie of ``labels`` for constrained decoding.

    Each label is tokenized without special tokens and followed by EOS. Returns ``(trie,
    by_ids)``: ``trie`` is nested ``{token_id: {...}}`` dicts (a leaf ``{}`` after EOS),
    ``by_ids`` maps each label's full id tuple (EOS included) back to the label.
    Raises ``ValueError`` when the tokenizer cannot spell a label (an ``<unk>`` piece) or
    spells two labels the same way.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the seq2seq tokenizer has no EOS token; a label trie needs one")
    trie: dict = {}
    by_ids: dict[tuple[int, ...], str] = {}
    for label in labels:
        ids = list(tokenizer(label, add_special_tokens=False).input_ids)
        if not ids or (tokenizer.unk_token_id is not None and tokenizer.unk_token_id in ids):
            raise ValueError(f"the tokenizer cannot spell the label {label!r}: "
                             f"{tokenizer.convert_ids_to_tokens(ids)}")
        seq = tuple(ids + [eos])
        if seq in by_ids:
            raise ValueError(f"labels {by_ids[seq]!r} and {label!r} have the same tokens {seq}")
        by_ids[seq] = label
        node = trie
        for t in seq:
            node = node.setdefault(t, {})
    return trie, by_ids


def trie_constraint(trie: dict, pad_token_id: int) -> Callable[[int, Any], list[int]]:
    """``prefix_allowed_tokens_fn`` for ``generate``: the next tokens the trie allows after the
    decoder prefix (its first token is the decoder start token and is skipped); only
    ``pad_token_id`` once a label and its EOS are complete."""

    def allowed(batch_id: int, prefix) -> list[int]:
        node = trie
        for t in prefix.tolist()[1:]:
            node = node.get(t)
            if node is None:
                return [pad_token_id]
        return list(node) or [pad_token_id]

    return allowed


def _depth(trie: dict) -> int:
    return 1 + max((_depth(child) for child in trie.values()), default=-1) if trie else 0


class DialogueSafetyClassifier:
    """Canary safety label of every utterance of each row's dialogue.

    Input columns: ``id`` and ``utterances_column`` (default ``utterances``): per row a list
    of utterance records ``{speaker_key: str, text_key: str, ...}`` in dialogue order
    (default keys ``speaker`` and ``statement``, MIRROR's parsed screenplay lines; extra keys
    such as ``stage_direction`` and ``t`` are ignored; a JSON string of that list is
    accepted; see ``udfs.safety.dialogue_utterances``).

    Output columns, each a list aligned with the row's utterances (``None`` where the row
    failed):

    - ``safety_labels`` (list[str | None]): the utterance's Canary label, ``None`` for
      utterances of speakers not in ``params.speakers``;
    - ``safety_scores`` (list[float | None]): probability of that label, 0..1.
      sequence-classification: its softmax probability over the five labels. seq2seq: the
      product of the per-step probabilities of the label's tokens under the trie-constrained
      distribution (each step renormalized over the tokens the trie allows), i.e. the
      model's probability of the label among the five along the greedy path;
    - ``safety_speakers`` (list[str]): the speaker of each utterance, copied, so the filter
      can read labels and speakers together;

    plus ``rows.ROW_ERROR`` (``"InputError: row 'd1' field 'utterances': utterance 2 has no
    'statement'"``).

    Usable outside Ray Data (e.g. as a Ray Serve replica):
    ``DialogueSafetyClassifier(model=resolve(spec).model_dump(), params={})({"id": [...],
    "utterances": [[{"speaker": "Therapist", "statement": "..."}]]})``.
    Raises at construction: ``ValueError`` for another backend, a classifier whose labels
    are not the five Canary labels, or a tokenizer that cannot spell them.
    """

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        utterances_column: str = Field("utterances", description="Column holding each row's list of "
                                       "utterance records.")
        speaker_key: str = Field("speaker", description="Key of an utterance record holding its speaker.")
        text_key: str = Field("statement", description="Key of an utterance record holding its text.")
        speakers: list[str] | None = Field(None, description="Classify only these speakers' utterances "
                                           "(case-insensitive); null = all. MIRROR's rule reads therapist "
                                           "lines only, so ['therapist'] halves the work there.")
        batch_size: int = Field(32, ge=1, description="Utterances per forward pass / generate call.")
        max_input_tokens: int = Field(512, ge=8, description="Utterances are truncated to this many tokens "
                                      "(and to the tokenizer's model_max_length when smaller).")
        num_threads: int | None = Field(None, ge=1, description="torch.set_num_threads for this actor (None: "
                                        "leave Ray's per-actor setting).")

    @classmethod
    def columns(cls, params: dict) -> tuple[list[str], list[str]]:
        """(required input columns, output columns)."""
        p = cls.Params.model_validate(params)
        return [rows.ID, p.utterances_column], ["safety_labels", "safety_scores", "safety_speakers"]

    def __init__(self, model: dict, params: dict):
        import torch
        from transformers import AutoConfig

        self.params = self.Params.model_validate(params)
        set_threads(self.params.num_threads)
        self.resolved, self.device, self.dtype, path = load_spec(model, BACKENDS, "DialogueSafetyClassifier")
        self.placeholder = self.resolved.placeholder
        spec = self.resolved.spec
        self._kwargs = {"revision": spec.revision} if spec.revision else {}
        self._torch = torch
        backend = spec.backend
        if backend == "transformers":
            cfg = AutoConfig.from_pretrained(path, **self._kwargs)
            backend = "seq2seq" if getattr(cfg, "is_encoder_decoder", False) else "sequence-classification"
        self.backend = backend
        if backend == "seq2seq":
            self._init_seq2seq(path)
        else:
            self._init_classifier(path)

    def _max_len(self, tokenizer) -> int:
        limit = getattr(tokenizer, "model_max_length", None) or self.params.max_input_tokens
        return int(min(self.params.max_input_tokens, limit))

    def _init_seq2seq(self, path: str) -> None:
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, GenerationConfig

        self.tokenizer = AutoTokenizer.from_pretrained(path, **self._kwargs)
        self.model = AutoModelForSeq2SeqLM.from_pretrained(path, dtype=self.dtype, **self._kwargs)
        self.model.to(self.device).eval()
        self.trie, self.label_by_ids = label_trie(self.tokenizer, CANARY_LABELS)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        self.pad_token_id = pad
        self.allowed = trie_constraint(self.trie, pad)
        # a clean greedy config: a checkpoint's own settings (min_length, no_repeat_ngram_size,
        # repetition_penalty, forced tokens, beams) could forbid or alter a label's spelling
        start = self.model.generation_config.decoder_start_token_id
        if start is None:
            start = self.model.config.decoder_start_token_id
        # (generate fills unset fields from model.generation_config, so replace that one too)
        self.generation_config = GenerationConfig(
            decoder_start_token_id=start, eos_token_id=self.tokenizer.eos_token_id, pad_token_id=pad,
            bos_token_id=self.model.generation_config.bos_token_id, max_new_tokens=_depth(self.trie),
            do_sample=False, num_beams=1, output_scores=True, return_dict_in_generate=True)
        self.model.generation_config = self.generation_config
        self.max_len = self._max_len(self.tokenizer)

    def _init_classifier(self, path: str) -> None:
        from transformers import pipeline

        self.pipe = pipeline("text-classification", model=path, device=self.device, dtype=self.dtype,
                             **self._kwargs)
        labels = sorted(self.pipe.model.config.id2label.values())
        if labels != sorted(CANARY_LABELS):
            raise ValueError(f"safety classifier {self.resolved.spec.model!r} has labels {labels}; "
                             f"expected the Canary labels {list(CANARY_LABELS)}")
        self.max_len = self._max_len(self.pipe.tokenizer)

    # -- model calls ---------------------------------------------------------------------

    def _generate(self, texts: list[str]) -> list[tuple[str, float]]:
        """seq2seq: ``batch_size`` texts per constrained greedy ``generate`` call."""
        torch = self._torch
        eos = self.tokenizer.eos_token_id
        out: list[tuple[str, float]] = []
        for k in range(0, len(texts), self.params.batch_size):
            chunk = texts[k:k + self.params.batch_size]
            enc = self.tokenizer(chunk, padding=True, truncation=True, max_length=self.max_len,
                                 return_tensors="pt").to(self.device)
            with torch.inference_mode():
                gen = self.model.generate(**enc, generation_config=self.generation_config,
                                          prefix_allowed_tokens_fn=self.allowed)
                logp = self.model.compute_transition_scores(gen.sequences, gen.scores, normalize_logits=True)
            steps = gen.sequences.shape[1] - logp.shape[1]  # the decoder start token(s)
            for seq, lp in zip(gen.sequences.tolist(), logp.float().tolist()):
                ids = seq[steps:]
                n = ids.index(eos) + 1 if eos in ids else 0
                label = self.label_by_ids.get(tuple(ids[:n]))
                if label is None:
                    raise RuntimeError(f"constrained generation left the label trie: {ids}")
                out.append((label, float(np.exp(sum(lp[:n])))))
        return out

    def _classify(self, texts: list[str]) -> list[tuple[str, float]]:
        """sequence-classification: the pipeline runs ``batch_size`` texts per forward pass."""
        res = self.pipe(texts, batch_size=self.params.batch_size, top_k=1, truncation=True,
                        max_length=self.max_len)
        return [(r[0]["label"], float(r[0]["score"])) for r in res]

    # -- batch ---------------------------------------------------------------------------

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        """Label every selected utterance of the batch (see the class docstring for columns)."""
        p = self.params
        n = batch_len(batch)
        ids = row_ids(batch)
        errors: list[str | None] = [None] * n
        dialogues: dict[int, list[tuple[str, str]]] = {}
        for i, rid in enumerate(ids):
            try:
                if p.utterances_column not in batch:
                    raise rows.InputError(rid, p.utterances_column, "utterances column missing from the batch")
                dialogues[i] = dialogue_utterances(batch[p.utterances_column][i], rid, p.utterances_column,
                                                   p.speaker_key, p.text_key)
            except rows.InputError as exc:
                errors[i] = error_text(exc)
        # pool the selected utterances of every row, shortest first (less padding per pass)
        todo = [(i, j, text) for i, utts in dialogues.items() for j, (speaker, text) in enumerate(utts)
                if speaker_selected(speaker, p.speakers)]
        todo.sort(key=lambda t: len(t[2]))
        fn = self._generate if self.backend == "seq2seq" else self._classify
        results = run_halving_on_oom(fn, [t[2] for t in todo])
        labels = {i: [None] * len(utts) for i, utts in dialogues.items()}
        scores = {i: [None] * len(utts) for i, utts in dialogues.items()}
        for (i, j, _), res in zip(todo, results):
            if isinstance(res, BaseException):
                errors[i] = f"{type(res).__name__}: row {ids[i]!r}: utterance {j}: out of memory even alone: {res}"
            else:
                labels[i][j], scores[i][j] = res
        lab_col, score_col, speaker_col = ([None] * n for _ in range(3))
        for i, utts in dialogues.items():
            if errors[i] is None:
                lab_col[i], score_col[i] = labels[i], scores[i]
                speaker_col[i] = [s for s, _ in utts]
        out = dict(batch)
        out["safety_labels"] = object_column(lab_col)
        out["safety_scores"] = object_column(score_col)
        out["safety_speakers"] = object_column(speaker_col)
        out[rows.ROW_ERROR] = object_column(errors)
        return out
