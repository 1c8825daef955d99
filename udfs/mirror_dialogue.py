"""MIRROR step 4, dialogue side: the six text filters and the group-by-dialogue drop logic
(pure functions; no Ray, no model besides a small packaged POS tagger).

Rules, thresholds and their source (MIRROR ``nobel-postech/mirror@3bc4a9a:
mirror/notebook/filter_generated_dialogue.ipynb``, SPEC A8; the exact semantics were read in
``@728db4bf`` and are listed in ../shared/notes/mirror-text.md section 6):

======================  =====================================================================
filter                  rule (drop when ...)
======================  =====================================================================
``turn_count``          not 4 <= (non-empty raw lines) / 2 <= 20 (raw lines, not parsed ones)
``speakers``            more than 2 distinct ``^(\\w+):`` line prefixes
``word_repetition``     on some line, unique/total lower-cased words of the text after the
                        first ``:`` is < 0.5
``response_failure``    a ``Therapist`` line's text after ``:`` fully matches
                        ``(i don't know|uh+|hmm+|)`` (case-insensitive)
``pos_repetition``      some line has > 3 consecutive tokens with the same Penn Treebank tag
                        (text after ``:``, stage direction included; quote and bracket tokens
                        reset the run). MIRROR ran ``nltk.pos_tag``; we run the same averaged
                        perceptron algorithm (NLTK's ``PerceptronTagger``) with the WSJ-trained
                        weights packaged in ``textblob-aptagger==0.2.0`` (notes 1.1/1.2: PTB
                        tags, 90 % agreement with spaCy's tagger, no data download)
``copy_paste``          a parsed statement contains verbatim a sentence of the client record
                        (persona, personality, reason, distorted thought, CBT plan); sentences
                        starting ``0.``-``10.`` are exempt. Sentences are split by pysbd
                        (notes 1.3: 10/10 tricky cases) or, for parity, MIRROR's regex
                        ``(?<=[.!?])\\s+``
======================  =====================================================================

Line/turn numbers in reasons are 0-based: ``line N`` counts the non-empty raw lines of the
screenplay, ``turn N`` indexes the parsed turns (``proc_dialogue``); they coincide when every
line parsed (grammar-constrained generation).

Stage functions follow the runtime's filter contract (``jobs.core.runtime``): ``fn(batch, params,
audit=False) -> dict`` with the declared output columns plus ``rows.ROW_REJECT``.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import io
import json
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal

from pydantic import BaseModel, ConfigDict, Field

from udfs import rows as R

__all__ = [
    "FILTERS", "FilterResult", "DialogueFilterParams", "nonempty_lines", "split_sentences",
    "pos_tag", "check_turn_count", "check_speakers", "check_word_repetition",
    "check_response_failure", "check_pos_repetition", "check_copy_paste", "copy_sources",
    "run_filters", "failure_reason", "dialogue_filters", "group_dialogue_verdicts",
    "APTAGGER_PICKLE_SHA256", "SCORE_COLUMNS",
]

#: The filters in the order they run and are reported.
FILTERS = ("turn_count", "speakers", "word_repetition", "response_failure", "pos_repetition", "copy_paste")

#: sha256 of ``textblob_aptagger/trontagger-0.1.0.pickle`` inside the ``textblob-aptagger==0.2.0``
#: wheel (wheel sha256 ``1ed281f37b3646475503ce77347d0ed92a5f4de176a63c6ab4d1064636067dcc``);
#: checked before the pickle is read, and the unpickler only admits ``set``.
APTAGGER_PICKLE_SHA256 = "1109164b3d28dce58f96b763128bab2fd8754c3921fd3330de2724ac6d1ada7c"

_SPEAKER = re.compile(r"^(\w+):")
_MIRROR_SENT_SPLIT = re.compile(r"(?<=[.!?])\s+")
#: Tokens that reset a POS run (MIRROR: curly quotes and square brackets; NLTK's tokenizer turns
#: ASCII double quotes into `` and '', which we treat the same way).
_RUN_RESET = frozenset({"\u201c", "\u201d", "\u2019", "\u2018", "]", "[", "``", "''"})
_EXEMPT_SENTENCE = re.compile(r"^(?:10|[0-9])\.")


@dataclass
class FilterResult:
    """Outcome of one filter on one dialogue: ``score`` (the filter's measure), ``passed``,
    ``where`` (0-based line or turn numbers that failed; empty for dialogue-level filters),
    ``unit`` (``line`` or ``turn``) and ``detail`` (human-readable, "" when passed)."""

    filter: str
    score: float
    passed: bool
    where: list[int] = field(default_factory=list)
    unit: str = "line"
    detail: str = ""

    def reason(self) -> str | None:
        """``None`` when passed, else ``"<filter> (<unit>s N, M: detail)"``."""
        if self.passed:
            return None
        loc = ""
        if self.where:
            loc = f"{self.unit}{'s' if len(self.where) > 1 else ''} {', '.join(map(str, self.where))}"
        inner = "; ".join(p for p in (loc, self.detail) if p)
        return f"{self.filter} ({inner})" if inner else self.filter


class DialogueFilterParams(BaseModel):
    """Thresholds of the dialogue filters; defaults are MIRROR's (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    filters: list[Literal[FILTERS]] = Field(list(FILTERS), description="Filters to run, in order.")  # type: ignore[valid-type]
    min_turns: float = Field(4, description="Lowest (non-empty lines)/2 kept (MIRROR notebook: 4).")
    max_turns: float = Field(20, description="Highest (non-empty lines)/2 kept (MIRROR notebook: 20).")
    max_speakers: int = Field(2, ge=1, description="Most distinct 'Word:' speakers (MIRROR notebook: 2).")
    min_unique_word_ratio: float = Field(0.5, ge=0, le=1, description="Lowest unique/total word ratio "
                                         "of any line (MIRROR notebook: drop below 0.5).")
    failure_pattern: str = Field(r"(i don't know|uh+|hmm+|)", description="Therapist text (after ':') "
                                 "that full-matches this, case-insensitive, is a response failure "
                                 "(MIRROR notebook).")
    failure_ignore_stage_direction: bool = Field(False, description="Strip a leading [direction] "
                                                 "before matching (ours). False is MIRROR's rule: the text "
                                                 "after ':' is matched with its direction, so only a line "
                                                 "without direction and words fails; under a line grammar "
                                                 "that always writes a direction it can never fire, so the "
                                                 "offline and local recipes set true.")
    max_pos_run: int = Field(3, ge=1, description="Longest allowed run of equal PTB tags (MIRROR: "
                             "more than 3 drops).")
    pos_include_stage_direction: bool = Field(True, description="Tag the stage direction too (MIRROR did).")
    sentence_splitter: Literal["pysbd", "mirror_regex"] = Field("pysbd", description="Copy-paste "
                                                                "sentence splitter; mirror_regex is "
                                                                "MIRROR's (?<=[.!?])\\s+ for parity.")
    copy_fields: list[str] = Field(["client_persona", "personality", "reason_counseling", "thought",
                                    "cbt_plan"], description="Record columns whose sentences must not "
                                   "be copied (MIRROR: personal_info, personality, reason, "
                                   "distorted_thought, cbt_plan).")
    min_copy_chars: int = Field(1, ge=1, description="Shorter source sentences are ignored (MIRROR: "
                                "any non-empty sentence).")


# ----------------------------------------------------------------------------- text helpers

def nonempty_lines(text: Any) -> list[str]:
    """The stripped non-empty lines of a screenplay (``None`` -> ``[]``)."""
    return [ln.strip() for ln in str(text or "").splitlines() if ln.strip()]


def _after_colon(line: str) -> str:
    return line.partition(":")[2].strip()


@functools.lru_cache(maxsize=1)
def _segmenter():
    import pysbd

    return pysbd.Segmenter(language="en", clean=False)


def split_sentences(text: Any, method: Literal["pysbd", "mirror_regex"] = "pysbd") -> list[str]:
    """Sentences of ``text``, stripped, empty ones dropped. ``pysbd`` (rule-based, handles
    "Dr.", "U.S.", "e.g.", ellipses; notes 1.3) or ``mirror_regex`` (MIRROR's split after
    ``.!?`` + whitespace). Raises ``ValueError`` for an unknown method, ``ImportError`` when
    pysbd is not installed (pin ``pysbd==0.3.4``)."""
    s = str(text or "").strip()
    if not s:
        return []
    if method == "pysbd":
        parts: Iterable[str] = _segmenter().segment(s)
    elif method == "mirror_regex":
        parts = _MIRROR_SENT_SPLIT.split(s)
    else:
        raise ValueError(f"unknown sentence splitter {method!r}")
    return [p.strip() for p in parts if p and p.strip()]


class _SetOnlyUnpickler(pickle.Unpickler):
    """Unpickler for the tagger weights: dicts, lists, strings, floats and ``set`` only."""

    def find_class(self, module: str, name: str):
        if name == "set" and module in ("__builtin__", "builtins"):
            return set
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from the tagger weights")


@functools.lru_cache(maxsize=1)
def _ap_tagger():
    """NLTK ``PerceptronTagger`` holding the ``textblob-aptagger`` weights, and a tokenizer.
    Loaded once per process (about 0.5 s). Raises ``ImportError`` naming the packages when
    they are missing, ``RuntimeError`` when the weights' hash differs from the pin."""
    spec = importlib.util.find_spec("textblob_aptagger")
    if spec is None or spec.origin is None:
        raise ImportError("POS filter needs the packaged tagger weights: pip install "
                          "textblob-aptagger==0.2.0 --no-deps (and nltk==3.10.4)")
    try:
        from nltk.tag.perceptron import PerceptronTagger
        from nltk.tokenize import NLTKWordTokenizer
    except ImportError as e:
        raise ImportError("POS filter needs nltk==3.10.4 (no NLTK data download is used)") from e
    path = Path(spec.origin).parent / "trontagger-0.1.0.pickle"
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != APTAGGER_PICKLE_SHA256:
        raise RuntimeError(f"{path} has sha256 {digest}, expected {APTAGGER_PICKLE_SHA256} "
                           "(textblob-aptagger 0.2.0); refusing to unpickle it")
    weights, tagdict, classes = _SetOnlyUnpickler(io.BytesIO(data), encoding="latin1").load()
    tagger = PerceptronTagger(load=False)
    tagger.model.weights, tagger.tagdict = weights, tagdict
    tagger.classes = tagger.model.classes = set(classes)
    # NLTKWordTokenizer, not nltk.word_tokenize: the latter sentence-splits with punkt data first
    return tagger, NLTKWordTokenizer()


def pos_tag(text: str) -> list[tuple[str, str]]:
    """``[(token, Penn Treebank tag), ...]`` for ``text``, tokenised like ``nltk.word_tokenize``
    (sentence split, here by pysbd instead of punkt data, then NLTK's Treebank-style word
    tokenizer per sentence; ASCII double quotes become `` / ''). See ``_ap_tagger`` for the
    errors raised on a missing or altered tagger."""
    tagger, tokenizer = _ap_tagger()
    tokens = [tok for sent in split_sentences(text) for tok in tokenizer.tokenize(sent)]
    return tagger.tag(tokens) if tokens else []


# ----------------------------------------------------------------------------- the filters

def check_turn_count(text: Any, p: DialogueFilterParams) -> FilterResult:
    """Turn count over raw lines: score = non-empty lines / 2; passes when within
    ``[p.min_turns, p.max_turns]``."""
    score = len(nonempty_lines(text)) / 2
    ok = p.min_turns <= score <= p.max_turns
    return FilterResult("turn_count", score, ok,
                        detail="" if ok else f"{score:g} turns, expected {p.min_turns:g}-{p.max_turns:g}")


def check_speakers(text: Any, p: DialogueFilterParams) -> FilterResult:
    """Distinct ``Word:`` line prefixes; passes when at most ``p.max_speakers``."""
    names = sorted({m.group(1) for ln in nonempty_lines(text) if (m := _SPEAKER.match(ln))})
    ok = len(names) <= p.max_speakers
    return FilterResult("speakers", len(names), ok,
                        detail="" if ok else f"{len(names)} speakers {names}, max {p.max_speakers}")


def check_word_repetition(text: Any, p: DialogueFilterParams) -> FilterResult:
    """Per line, unique/total lower-cased whitespace words after the first ``:``; score = the
    lowest ratio (1.0 for a dialogue without words); lines below the threshold fail."""
    lowest, bad = 1.0, []
    for i, ln in enumerate(nonempty_lines(text)):
        words = _after_colon(ln).lower().split()
        if not words:
            continue
        ratio = len(set(words)) / len(words)
        lowest = min(lowest, ratio)
        if ratio < p.min_unique_word_ratio:
            bad.append(i)
    return FilterResult("word_repetition", lowest, not bad, bad,
                        detail="" if not bad else f"lowest unique-word ratio {lowest:.2f} < {p.min_unique_word_ratio:g}")


_LEADING_DIRECTION = re.compile(r"^\[[^\]]*\]\s*")


def check_response_failure(text: Any, p: DialogueFilterParams) -> FilterResult:
    """Therapist lines whose text after ``:`` full-matches ``p.failure_pattern``
    (case-insensitive; an empty text matches MIRROR's pattern); score = their count."""
    pat = re.compile(p.failure_pattern, re.I)
    bad = []
    for i, ln in enumerate(nonempty_lines(text)):
        m = _SPEAKER.match(ln)
        if not m or m.group(1) != "Therapist":
            continue
        said = _after_colon(ln)
        if p.failure_ignore_stage_direction:
            said = _LEADING_DIRECTION.sub("", said).strip()
        if pat.fullmatch(said):
            bad.append(i)
    return FilterResult("response_failure", len(bad), not bad, bad,
                        detail="" if not bad else "empty or non-answer therapist line")


def _longest_run(tags: Iterable[tuple[str, str]]) -> int:
    best = run = 0
    prev = None
    for token, tag in tags:
        if token in _RUN_RESET:
            prev, run = None, 0
            continue
        run = run + 1 if tag == prev else 1
        prev = tag
        best = max(best, run)
    return best


def check_pos_repetition(text: Any, p: DialogueFilterParams) -> FilterResult:
    """Longest run of equal PTB tags per line (text after ``:``; the leading stage direction is
    dropped when ``p.pos_include_stage_direction`` is False); score = the longest run in the
    dialogue; lines whose run exceeds ``p.max_pos_run`` fail."""
    longest, bad = 0, []
    for i, ln in enumerate(nonempty_lines(text)):
        said = _after_colon(ln)
        if not p.pos_include_stage_direction:
            said = _LEADING_DIRECTION.sub("", said)
        run = _longest_run(pos_tag(said)) if said else 0
        longest = max(longest, run)
        if run > p.max_pos_run:
            bad.append(i)
    return FilterResult("pos_repetition", longest, not bad, bad,
                        detail="" if not bad else f"{longest} consecutive tokens with one POS tag, max {p.max_pos_run}")


def copy_sources(record: dict[str, Any], fields: Iterable[str]) -> list[str]:
    """Texts of ``record[field]`` for the copy-paste filter (lists are joined with ``, ``,
    missing/None fields skipped)."""
    out = []
    for f in fields:
        v = record.get(f)
        if isinstance(v, (list, tuple)):
            v = ", ".join(str(x) for x in v)
        if v is not None and str(v).strip():
            out.append(str(v))
    return out


def check_copy_paste(turns: Iterable[dict[str, Any]] | None, sources: Iterable[str],
                     p: DialogueFilterParams) -> FilterResult:
    """Parsed statements that contain verbatim (case-sensitive) a sentence of ``sources``;
    sentences starting ``0.``-``10.`` (plan items) and ones shorter than ``p.min_copy_chars``
    are exempt. ``turns``: ``proc_dialogue`` (dicts with ``statement``). Score = number of
    distinct copied sentences; the failing units are turns."""
    sentences = {s for src in sources for s in split_sentences(src, p.sentence_splitter)
                 if len(s) >= p.min_copy_chars and not _EXEMPT_SENTENCE.match(s)}
    bad, copied = [], set()
    for i, t in enumerate([] if turns is None else turns):
        said = str((t.get("statement") if isinstance(t, dict) else "") or "")
        hits = [s for s in sentences if s in said]
        if hits:
            bad.append(i)
            copied.update(hits)
    detail = ""
    if copied:
        first = sorted(copied)[0]
        detail = f"copies {len(copied)} record sentence(s), e.g. {first[:60]!r}"
    return FilterResult("copy_paste", len(copied), not bad, bad, unit="turn", detail=detail)


def run_filters(text: Any, turns: Iterable[dict[str, Any]] | None, record: dict[str, Any],
                p: DialogueFilterParams) -> list[FilterResult]:
    """Run the filters named in ``p.filters`` on one dialogue: ``text`` is the raw screenplay,
    ``turns`` its ``proc_dialogue``, ``record`` a mapping holding ``p.copy_fields``."""
    out = []
    for name in p.filters:
        if name == "copy_paste":
            out.append(check_copy_paste(turns, copy_sources(record, p.copy_fields), p))
        else:
            out.append(_CHECKS[name](text, p))
    return out


_CHECKS = {"turn_count": check_turn_count, "speakers": check_speakers,
           "word_repetition": check_word_repetition, "response_failure": check_response_failure,
           "pos_repetition": check_pos_repetition}


def failure_reason(results: Iterable[FilterResult]) -> str | None:
    """Reject reason naming every failing filter with its lines/turns, e.g. ``dialogue
    filters failed: word_repetition (line 3; ...); copy_paste (turns 4, 6; ...)``; ``None``
    when all passed."""
    parts = [r.reason() for r in results if not r.passed]
    return "dialogue filters failed: " + "; ".join(parts) if parts else None  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- stage functions

#: score column of each filter
SCORE_COLUMNS = {"turn_count": "score_turn_count", "speakers": "score_speakers",
                 "word_repetition": "score_word_repetition", "response_failure": "score_response_failure",
                 "pos_repetition": "score_pos_repetition", "copy_paste": "score_copy_paste"}


def _records(batch: dict) -> list[dict[str, Any]]:
    n = len(batch["dialogue"])
    return [{k: v[i] for k, v in batch.items()} for i in range(n)]


def dialogue_filters(batch: dict, params: DialogueFilterParams, audit: bool = False) -> dict:
    """All dialogue filters in one stage. Reads ``dialogue`` (raw screenplay), ``proc_dialogue``
    (list of turns) and ``params.copy_fields``. Outputs one score column per filter
    (``SCORE_COLUMNS``; None for filters not run), ``dialogue_filter_failures`` (JSON list of
    ``{"filter", "unit", "where", "detail"}``) and ``rows.ROW_REJECT`` naming every failing
    filter and line/turn."""
    cols: dict[str, list] = {c: [] for c in SCORE_COLUMNS.values()}
    failures, reasons = [], []
    for rec in _records(batch):
        res = run_filters(rec["dialogue"], rec.get("proc_dialogue"), rec, params)
        got = {r.filter: r.score for r in res}
        for f, c in SCORE_COLUMNS.items():
            cols[c].append(got.get(f))
        failures.append(json.dumps([{"filter": r.filter, "unit": r.unit, "where": r.where, "detail": r.detail}
                                    for r in res if not r.passed]))
        reasons.append(failure_reason(res))
    return {**cols, "dialogue_filter_failures": failures, R.ROW_REJECT: reasons}


# ----------------------------------------------------------------------------- group by dialogue

def _flag(name: str, i: int, v: Any) -> bool:
    if isinstance(v, str) or v is None:
        raise TypeError(f"failed[{name!r}][{i}] is {v!r}: pass a boolean decided from the row's status, "
                        "not its reason text")
    return bool(v)


def _shown(reason: Any) -> str:
    if reason is None or (isinstance(reason, float) and reason != reason) or not str(reason).strip():
        return "no reason recorded"
    return str(reason)


def group_dialogue_verdicts(dialogue_ids: Iterable[str], turns: Iterable[Any], failed: dict[str, Iterable[bool]],
                            reasons: dict[str, Iterable[Any]] | None = None) -> dict[str, dict[str, Any]]:
    """Whole-dialogue verdicts from per-turn ones (MIRROR drops a dialogue if any of its
    images/utterances fails a filter, SPEC A8).

    ``dialogue_ids``/``turns``: one entry per row (a client turn); ``failed``: filter or stage
    name -> one boolean per row (aligned), True when the row failed it. The verdict is read
    from these flags only (a row's status), never from reason text: an error whose message is
    empty still drops its dialogue. ``reasons``: optional, same keys -> the text shown per row
    (None or empty: "no reason recorded"). Returns ``{dialogue_id: {"dropped": bool,
    "failures": {name: [turn, ...]}, "reason": str|None}}`` in first-seen order, where the
    reason names every failing name (in the order of ``failed``) with its turns (ascending)
    and the reason of its first failing row, e.g. ``clip (turns 1, 3: similarity 0.12 <
    0.2); nsfw (turn 5: ...)``. Raises ``ValueError`` when the columns have different lengths
    and ``TypeError`` when a flag is a string or None (a reason passed where a status belongs)."""
    ids, ts = list(dialogue_ids), list(turns)
    cols = {name: [_flag(name, i, v) for i, v in enumerate(col)] for name, col in failed.items()}
    texts = {name: list(v) for name, v in (reasons or {}).items()}
    if len(ts) != len(ids) or any(len(v) != len(ids) for v in [*cols.values(), *texts.values()]):
        raise ValueError(f"dialogue ids ({len(ids)}), turns ({len(ts)}) and verdict columns "
                         f"({ {k: len(v) for k, v in cols.items()} }) must have the same length")
    out: dict[str, dict[str, Any]] = {}
    first_reason: dict[tuple[str, str], str] = {}
    for i, did in enumerate(ids):
        entry = out.setdefault(did, {"dropped": False, "failures": {}, "reason": None})
        for name, col in cols.items():
            if col[i]:
                entry["failures"].setdefault(name, []).append(ts[i])
                first_reason.setdefault((did, name), _shown(texts[name][i] if name in texts else None))
    for did, entry in out.items():
        if entry["failures"]:
            parts = []
            # names in the order of ``failed``, turns ascending
            entry["failures"] = {name: sorted(entry["failures"][name], key=lambda t: (str(type(t)), t))
                                 for name in cols if name in entry["failures"]}
            for name, where in entry["failures"].items():
                unit = "turn" if len(where) == 1 else "turns"
                parts.append(f"{name} ({unit} {', '.join(map(str, where))}: {first_reason[(did, name)]})")
            entry["dropped"], entry["reason"] = True, "; ".join(parts)
    return out
