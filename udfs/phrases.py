"""Map Grounding DINO's detected phrases back to the object names that were asked for.

Grounding DINO is prompted with the requested names joined as ``"cat. hot dog. zebu."``.
For every box above the box threshold it returns a *label*: the decoded text of the prompt
tokens whose probability for that box exceeds the text threshold. So a label is always a
sub-sequence of prompt tokens, and it is often not one of the requested names:

==================  =========================================================================
label               why
==================  =========================================================================
``"Cats"``          case / plural forms differ from the requested ``"cat"`` (LLM output lists)
``"cat. dog"``      tokens of two phrases both passed the text threshold (a *merged* label)
``"cat dog"``       the same without the separator token
``"dog"``           only the head word of ``"hot dog"`` passed (a *partial* label)
``"##eb"``          only inner word pieces of ``"zebu"`` (``z ##e ##b ##u``) passed
``"a cat. [SEP]"``  special tokens and articles in the label
==================  =========================================================================

The original Antidote filter (SPEC C5) keeps a requested name only if it is *exactly* one
of the returned phrases, which silently drops true detections (SPEC C11.6). Two modes:

``strict``
    Reproduces the original: GroundingDINO's ``predict`` removes every ``"."`` from the
    decoded label (``.replace('.', '')``) and the filter tests ``name in phrases`` (exact,
    case-sensitive string equality, no other normalisation).

``robust``
    1. Normalise both sides: lower case; ``[CLS] [SEP] [PAD] [MASK]`` removed; ``"##"``
       pieces glued to the previous piece (``"sand ##wich"`` -> ``"sandwich"``); ``.`` ``,``
       ``;`` split a label into segments (phrase separators); other punctuation becomes a
       space; a leading article (``a``, ``an``, ``the``) of a segment/name is dropped.
    2. Words are compared plural-insensitively with ``inflect`` (``people``/``person``,
       ``leaves``/``leaf``, ``buses``/``bus``, ``bird houses``/``bird house``).
    3. A word piece that is not a whole word (a leading ``"##eb"`` or a trailing prefix
       piece ``"sand"``) stands for the one requested word that contains it at that place;
       if several requested words contain it, it is ambiguous and matches nothing.
    4. The label is segmented into *runs*: consecutive label words that are consecutive
       words of one requested name. Runs are chosen greedily: complete names first, then
       longer runs, then runs that include the name's last (head) word. A label word is
       used by one run only, so ``"hot dog"`` is credited to ``"hot dog"`` and not also to a
       requested ``"dog"``, and ``"dog"`` alone is credited to ``"dog"`` (complete) rather
       than to ``"hot dog"`` (partial). Names equal after normalisation (``"cat"``,
       ``"Cats"``) share their runs.
    5. A run credits its name when it is complete, or when it is partial but contains the
       name's **head word** (the last word: ``"house"`` for ``"bird house"``, ``"racket"``
       for ``"tennis racket"``). A partial run without the head word (``"bird"`` of ``"bird
       house"``, ``"hot"`` of ``"hot dog"``) credits nothing: a modifier alone usually names
       another object. This is the one judgement call of the mode and it can be wrong for
       non-compositional names (``"dog"`` credits ``"hot dog"`` when ``"dog"`` itself was not
       requested); ``partial="none"`` disables partial credit, ``partial="any"`` credits
       every partial run.
    6. A merged label (``"cat. dog"``) credits every name it completely contains: the tokens
       of both names passed the text threshold for that box, which is Grounding DINO's own
       criterion for the phrase being grounded.

Pure functions, no model and no Ray. ``inflect`` is the only dependency.
"""
from __future__ import annotations

import re
from functools import lru_cache
from typing import Literal

__all__ = ["match_phrases", "normalize_name", "strict_label", "label_words", "same_word"]

SPECIAL_TOKENS = ("[CLS]", "[SEP]", "[PAD]", "[MASK]")
UNKNOWN = "[unk]"
ARTICLES = frozenset({"a", "an", "the"})
_SEGMENT_SPLIT = re.compile(r"[.,;]")
_PUNCT = re.compile(r"[^\w#\[\]' ]+")
_GLUE = re.compile(r"\s*##(?=\w)")

Mode = Literal["robust", "strict"]
Partial = Literal["head", "none", "any"]


@lru_cache(maxsize=1)
def _engine():
    import inflect

    return inflect.engine()


@lru_cache(maxsize=8192)
def _singular(word: str) -> str:
    """Singular form of a noun, or the word itself (``inflect.singular_noun`` returns False)."""
    if not word or not word.isalpha() or len(word) < 3:
        return word
    try:
        s = _engine().singular_noun(word)
    except Exception:  # inflect validates types strictly; never fail a match on it
        return word
    return s or word


def same_word(a: str, b: str) -> bool:
    """Plural-insensitive word equality: ``a == b`` or one is the other's singular, or both
    have the same singular (``"buses"``/``"bus"``, ``"people"``/``"person"``)."""
    if a == b:
        return True
    sa, sb = _singular(a), _singular(b)
    return sa == b or sb == a or sa == sb


def _strip_article(words: list[str]) -> list[str]:
    return words[1:] if len(words) > 1 and words[0] in ARTICLES else words


def normalize_name(name: str) -> list[str]:
    """Words of a requested object name: lower case, punctuation to spaces, leading article
    dropped. ``"A Bird-House."`` -> ``["bird", "house"]``."""
    text = re.sub(r"[^\w' ]+", " ", str(name).lower())
    return _strip_article(text.split())


def _name_key(words: list[str]) -> tuple[str, ...]:
    return tuple(_singular(w) for w in words)


def object_key(name: str) -> tuple[str, ...]:
    """Case-, article- and plural-insensitive key of an object name:
    ``"The Bird-Houses"`` -> ``("bird", "house")``, ``"men"`` -> ``("man",)``."""
    return _name_key(normalize_name(name))


def label_words(label: str) -> list[list[tuple[str, str]]]:
    """Segments of a detected label, each a list of ``(kind, text)`` pieces.

    Rules: special tokens removed; ``" ##x"`` glued onto the previous piece; segments split
    at ``. , ;``; other punctuation removed; lower case; a leading article dropped. ``kind``
    is ``"word"``, ``"suffix"`` (a ``##`` piece that starts a segment: the inside or end of
    some word) or ``"unk"`` (``[UNK]``). Example: ``"a cat. hot dog ##s [SEP]"`` ->
    ``[[("word", "cat")], [("word", "hot"), ("word", "dogs")]]``; ``"##eb"`` ->
    ``[[("suffix", "eb")]]``.
    """
    text = str(label)
    for sp in SPECIAL_TOKENS:
        text = text.replace(sp, " ").replace(sp.lower(), " ")
    text = text.replace("[UNK]", f" {UNKNOWN} ").lower()
    segments = []
    for seg in _SEGMENT_SPLIT.split(text):
        seg = _PUNCT.sub(" ", seg)
        seg = _GLUE.sub(lambda m: "##" if m.start() == 0 or not seg[:m.start()].strip() else "", seg)
        pieces: list[tuple[str, str]] = []
        for tok in seg.split():
            if tok == UNKNOWN:
                pieces.append(("unk", tok))
            elif tok.startswith("##"):
                frag = tok.lstrip("#")
                if frag:
                    pieces.append(("suffix", frag))
            else:
                tok = tok.replace("#", "")
                if tok:
                    pieces.append(("word", tok))
        if len(pieces) > 1 and pieces[0][0] == "word" and pieces[0][1] in ARTICLES:
            pieces = pieces[1:]
        if pieces:
            segments.append(pieces)
    return segments


def strict_label(label: str) -> str:
    """The phrase string the original pipeline compared: GroundingDINO's
    ``get_phrases_from_posmap(...).replace('.', '')`` (no other normalisation)."""
    return str(label).replace(".", "")


# ---------------------------------------------------------------------------------------
# robust matching


class _Vocab:
    """Requested names grouped by normalised key, with a word-piece index."""

    def __init__(self, requested: list[str]):
        self.requested = requested
        self.keys: list[tuple[str, ...]] = []
        self.words: list[list[str]] = []
        self.members: list[list[int]] = []
        index: dict[tuple[str, ...], int] = {}
        for i, name in enumerate(requested):
            words = normalize_name(name)
            if not words:
                continue
            key = _name_key(words)
            if key not in index:
                index[key] = len(self.keys)
                self.keys.append(key)
                self.words.append(words)
                self.members.append([])
            self.members[index[key]].append(i)
        self._all_words = {w for ws in self.words for w in ws}

    def is_whole_word(self, piece: str) -> bool:
        return any(same_word(piece, w) for w in self._all_words)

    def piece_owner(self, piece: str, kind: str) -> set[str]:
        """Requested words that contain ``piece`` at a place consistent with its kind:
        ``suffix`` pieces after the first character, ``prefix`` pieces at the start."""
        if kind == "suffix":
            return {w for w in self._all_words if piece in w[1:] and piece != w}
        return {w for w in self._all_words if w.startswith(piece) and piece != w}


def _runs(vocab: _Vocab, segment: list[tuple[str, str]]):
    """All runs ``(key_index, start_in_name, start_in_segment, length)`` of a label segment.

    A run extends while label piece ``s+i`` stands for name word ``o+i``: a whole word
    plural-insensitively equal to it; a ``suffix`` piece (only as the run's first piece)
    that only this requested word contains after its first letter; or a prefix piece that is
    no requested word itself and begins only this requested word (it ends the run).
    """
    out = []
    n = len(segment)
    for k, words in enumerate(vocab.words):
        m = len(words)
        for s in range(n):
            for o in range(m):
                length = 0
                while s + length < n and o + length < m:
                    kind, piece = segment[s + length]
                    word = words[o + length]
                    if kind == "word" and same_word(piece, word):
                        length += 1
                        continue
                    if kind == "suffix" and length == 0 and vocab.piece_owner(piece, "suffix") == {word}:
                        length += 1
                        continue
                    if (kind == "word" and not vocab.is_whole_word(piece)
                            and vocab.piece_owner(piece, "prefix") == {word}):
                        length += 1
                    break
                if length:
                    out.append((k, o, s, length))
    return out


def _robust(requested: list[str], labels: list[str], partial: Partial) -> dict[str, list[int]]:
    vocab = _Vocab(requested)
    credited: list[list[int]] = [[] for _ in vocab.keys]
    for det, label in enumerate(labels):
        for segment in label_words(label):
            cands = []
            for k, o, s, length in _runs(vocab, segment):
                m = len(vocab.words[k])
                complete = o == 0 and length == m
                head = o + length == m
                cands.append((not complete, -length, not head, s, k, o, length))
            cands.sort()
            used = [False] * len(segment)
            for not_complete, _neg, not_head, s, k, o, length in cands:
                span = range(s, s + length)
                if any(used[i] for i in span):
                    # names equal after normalisation share runs; others may not overlap
                    continue
                if not_complete:
                    if partial == "none" or (partial == "head" and not_head):
                        continue
                for i in span:
                    used[i] = True
                if det not in credited[k]:
                    credited[k].append(det)
    out: dict[str, list[int]] = {name: [] for name in requested}
    for k, members in enumerate(vocab.members):
        for i in members:
            out[requested[i]] = sorted(set(out[requested[i]]) | set(credited[k]))
    return out


def match_phrases(requested: list[str], detected_labels: list[str], mode: Mode = "robust",
                  partial: Partial = "head") -> dict[str, list[int]]:
    """Map each requested name to the indices of the detections that ground it.

    Args:
        requested: object names asked for (e.g. an Antidote ``present`` list), in order;
            duplicates share one entry.
        detected_labels: one label per detection (box), as returned by Grounding DINO's
            post-processing (``text_labels``).
        mode: ``"robust"`` (default) or ``"strict"`` (the original's exact membership), see
            the module docstring.
        partial: robust mode only: which partial runs credit a name: ``"head"`` (default:
            runs that contain the name's last word), ``"none"`` or ``"any"``.

    Returns:
        ``{name: [detection index, ...]}`` for every requested name (ascending indices,
        empty list when not detected). Iteration order follows ``requested``.

    Raises:
        ValueError: unknown ``mode`` or ``partial``.
    """
    requested = [str(r) for r in requested]
    labels = [str(lab) for lab in detected_labels]
    if mode == "strict":
        phrases = [strict_label(lab) for lab in labels]
        return {name: [i for i, p in enumerate(phrases) if p == name] for name in requested}
    if mode != "robust":
        raise ValueError(f"unknown match mode {mode!r} (robust or strict)")
    if partial not in ("head", "none", "any"):
        raise ValueError(f"unknown partial policy {partial!r} (head, none or any)")
    return _robust(requested, labels, partial)
