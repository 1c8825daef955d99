"""MIRROR dataset construction, text side: client records, record completion, screenplay
prompts, the screenplay line parser and line grammar, and identity assignment (pure
functions; no Ray, no model). The dialogue filters live in ``udfs.mirror_dialogue``.

Sources (facts only; every prompt below is written in our own words from SPEC's
descriptions, nothing is copied from the reference repository, which has no licence):

- MIRROR (Kim et al., EMNLP 2025, arXiv 2504.13211), ``nobel-postech/mirror@3bc4a9a``:
  ``mirror/utils/cactus_utils.py`` (intake-form parsing), ``mirror/step2/run_step2.py`` and
  ``mirror/agent/*`` (persona, the 4 resistance traits, prompt layout, sampling, ids),
  ``mirror/step2/postprocess.py`` (line parser and its fallbacks), ``mirror/step3/
  preprocess_for_photomaker.py`` (``age_group = round(age / 10) * 10``), summarised in
  ../shared/SPEC.md A2-A4, A10;
- MIRROR-LLaVA's planning prompt (SPEC B4): the twelve CBT techniques;
- CBT-Bench (Zhang et al. 2024, ``mianzhang/CBT-Bench@0fb262c``): the ten distortion labels;
- Cactus (Lee et al., EMNLP Findings 2024, ``coding-groot/cactus@da8cafc``, GPL-2.0): the
  client records; ../shared/notes/mirror-text.md section 4 has the measured facts about the
  bundled evaluation file (values on the next line, 150 clients x 3 attitudes, no
  ``thought``/``patterns``/``cbt_plan``).

Record shapes used throughout: a *client record* is the ``dict`` that ``client_record``
returns (keys listed there); a *screenplay row* is what ``screenplay_rows`` returns; a
*turn* is ``{"speaker", "stage_direction", "statement"}`` (``parse_line``).
"""
from __future__ import annotations

import ast
import heapq
import json
import math
import re
from typing import Annotated, Any, Iterable, Literal

from pydantic import BaseModel, ConfigDict, Field

from udfs import rows as R

__all__ = [
    # client records
    "PERSONAL_KEYS", "IntakeFormError", "parse_personal_info", "split_intake_sections",
    "parse_intake_form", "normalize_gender", "parse_age", "age_group", "client_persona",
    "parse_patterns", "extract_numbered_plan", "template_plan", "plan_reject_reason", "client_key",
    "client_record", "dedupe_clients", "plan_filter", "PlanFilterParams",
    # record completion
    "CBT_TECHNIQUES", "DISTORTION_LABELS", "FALLBACK_TECHNIQUE", "DistortedThoughtReply",
    "DistortionReply", "CbtPlanReply", "heuristic_thought", "thought_messages", "validate_thought",
    "normalize_distortion", "distortion_messages", "parse_distortions", "plan_messages",
    "format_plan", "plan_from_reply", "apply_completion",
    # screenplay
    "RESISTANCE_TRAITS", "SCREENPLAY_SAMPLING", "SCREENPLAY_SYSTEM", "SCREENPLAY_FEW_SHOT",
    "default_screenplay_prompt", "client_block", "screenplay_messages", "screenplay_id",
    "screenplay_rows", "LINE_RE", "parse_line", "parse_screenplay", "screenplay_grammar",
    "screenplay_regex", "grammar_accepts",
    # identities
    "assign_identities",
]

# =============================================================================== client records

#: Personal-info keys of a Cactus intake form, lower-cased as MIRROR's ``parse_intake_forms``
#: stores them (``mirror/utils/cactus_utils.py``; SPEC A2). All 7 occur in all 150 bundled
#: clients (notes section 4).
PERSONAL_KEYS = ("name", "age", "gender", "occupation", "education", "marital status", "family details")

# "Key:" at the start of a line (lines are matched one at a time, so a bare "Key:" keeps
# its value, which sits on the next line in 149 of 150 bundled clients for Name/Age/Gender,
# notes section 4).
_KEY_RE = re.compile(r"^([A-Za-z][A-Za-z /'&-]{0,40}):[ \t]*(.*)$")
# "2. Presenting Problem" / "5. Academic/occupational functioning level: text on the same line"
_SECTION_RE = re.compile(r"^(\d{1,2})\.[ \t]+([^\n:]+?)[ \t]*(?::[ \t]*(.*))?$")


class IntakeFormError(ValueError):
    """An intake form that cannot be parsed (empty, or without any ``key: value`` line)."""


def parse_personal_info(block: str) -> dict[str, str]:
    """Parse the personal-info block of an intake form into ``{lower-cased key: value}``.

    Accepts ``Key: value`` lines and ``Key:`` lines whose value sits on the following line(s)
    (the bundled Cactus records, notes section 4); a bare key followed directly by another
    key gets ``""``. Continuation lines of a key that already has a value are appended with
    a space. Keys keep their inner spaces (``marital status``). Returns ``{}`` for a block
    without any key line. Never raises for a ``str``.
    """
    out: dict[str, str] = {}
    key = None
    for line in (ln.strip() for ln in block.splitlines()):
        if not line:
            continue
        m = _KEY_RE.match(line)
        if m and not _SECTION_RE.match(line):
            key = m.group(1).strip().lower()
            out[key] = m.group(2).strip()
        elif key is not None:
            out[key] = f"{out[key]} {line}".strip() if out[key] else line
    return out


def split_intake_sections(form: str) -> tuple[str, list[tuple[int, str, str]]]:
    """Split an intake form into ``(personal-info block, [(number, title, text), ...])``.

    A section starts at a line ``N. Title`` (optionally ``N. Title: text`` inline, as in
    section 5 of the Cactus forms). Only headings numbered higher than the previous one
    count, and only short titles without final punctuation (at most 8 words), so numbered
    items inside a section ("1. I tried ...") are not taken for headings; a skipped number is
    fine. When the form has a
    section 1 (``1. Client Information``) its text is the personal block; otherwise the text
    before the first heading is. Section text is stripped.
    """
    lines = form.splitlines()
    heads: list[tuple[int, int, str, str]] = []  # (line index, number, title, inline text)
    last = None
    for i, line in enumerate(lines):
        m = _SECTION_RE.match(line.strip())
        if not m:
            continue
        n, title = int(m.group(1)), m.group(2).strip()
        heading_like = len(title.split()) <= 8 and not title.endswith((".", "!", "?"))
        if heading_like and ((last is None and n <= 2) or (last is not None and n > last)):
            heads.append((i, n, m.group(2).strip(), (m.group(3) or "").strip()))
            last = n
    sections = []
    for k, (i, n, title, inline) in enumerate(heads):
        end = heads[k + 1][0] if k + 1 < len(heads) else len(lines)
        body = "\n".join([inline, *lines[i + 1:end]] if inline else lines[i + 1:end]).strip()
        sections.append((n, title, body))
    if sections and sections[0][0] == 1:
        personal = sections[0][2]
        if sections[0][1] and _KEY_RE.match(sections[0][1] + ":"):
            # "1. Name: ..." is a key line, not a heading
            personal = "\n".join(lines[:heads[1][0]] if len(heads) > 1 else lines)
            personal = re.sub(r"^\s*1\.[ \t]+", "", personal)
        return personal, sections[1:]
    head_end = heads[0][0] if heads else len(lines)
    return "\n".join(lines[:head_end]).strip(), sections


def _section(sections: list[tuple[int, str, str]], prefix: str) -> str:
    for _, title, body in sections:
        if title.lower().startswith(prefix):
            return body
    return ""


def parse_intake_form(form: Any) -> dict[str, Any]:
    """Parse a Cactus intake form (MIRROR ``parse_intake_forms``, SPEC A2).

    Returns ``{"personal_info": dict[str, str] (lower-cased keys, see PERSONAL_KEYS),
    "presenting_problem": str, "reason_counseling": str, "sections": dict[str, str]}``
    (``sections``: lower-cased title -> text, for every numbered section after the personal
    block). Section 5's two spellings ("Academic/occupational functioning level",
    "Occupational Functioning Level") are kept as written.

    Raises ``IntakeFormError`` when ``form`` is not a non-empty string or has no
    ``key: value`` line in its personal block.
    """
    if not isinstance(form, str) or not form.strip():
        raise IntakeFormError(f"intake form must be a non-empty string, got {type(form).__name__}")
    personal, sections = split_intake_sections(form.replace("\r\n", "\n"))
    info = parse_personal_info(personal)
    if not info:
        raise IntakeFormError("intake form has no personal-info block of 'key: value' lines "
                              f"(starts with {form.strip()[:60]!r})")
    return {"personal_info": info,
            "presenting_problem": _section(sections, "presenting problem"),
            "reason_counseling": _section(sections, "reason for seeking counsel"),
            "sections": {title.lower(): body for _, title, body in sections}}


_GENDER_WORDS = {"female": "Woman", "woman": "Woman", "f": "Woman", "girl": "Woman",
                 "male": "Man", "man": "Man", "m": "Man", "boy": "Man"}


def normalize_gender(value: Any) -> Literal["Man", "Woman"] | None:
    """Map an intake-form gender (``female``/``male``/…) or a face label (``Woman``/``Man``)
    onto DeepFace's two classes (``udfs.faces.GENDERS``); ``None`` for anything else
    (non-binary, empty, missing): the identity assignment then records the mismatch."""
    if not isinstance(value, str):
        return None
    return _GENDER_WORDS.get(value.strip().lower())  # type: ignore[return-value]


def parse_age(value: Any) -> float | None:
    """First number in ``value`` (``"45"``, ``"45 years"``, ``32.0``) as float, or ``None``."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return None if math.isnan(float(value)) else float(value)
    m = re.search(r"\d+(?:\.\d+)?", str(value))
    return float(m.group()) if m else None


def age_group(age: Any) -> int | None:
    """Age group in decades: ``round(age / 10) * 10`` (MIRROR ``preprocess_for_photomaker.py``,
    SPEC A3), with halves rounded **up** (45 -> 50) instead of Python's banker's rounding
    (which sends 45 to 40 but 35 to 40), so every group spans the same five years.
    ``None`` when the age is unknown."""
    a = parse_age(age)
    return None if a is None else int(math.floor(a / 10 + 0.5)) * 10


def _clean(value: Any) -> str:
    s = "" if value is None else str(value).strip()
    return re.sub(r"^[-*\u2022]\s*", "", s)


def client_persona(info: dict[str, str]) -> str:
    """One-sentence client introduction from the personal info (SPEC A2: name, age, gender,
    occupation, then the optional education, marital status and family details).

    ``info``: lower-cased keys as from ``parse_personal_info``. Missing values are left out;
    a missing name reads "The client". Example: ``Laura Saunders is a 45-year-old female
    whose occupation is Office Job. Education: College Graduate. Marital status: Single.
    Family: Lives alone.``
    """
    name = _clean(info.get("name")) or "The client"
    age = parse_age(info.get("age"))
    gender = _clean(info.get("gender")).lower()
    desc = " ".join(p for p in (f"{age:g}-year-old" if age is not None else "", gender) if p)
    first = f"{name} is a {desc}" if desc else name
    occupation = _clean(info.get("occupation"))
    if occupation:
        first += f" whose occupation is {occupation}" if desc else f" works as {occupation}"
    elif not desc:
        first += " is a client"
    parts = [first.rstrip(".") + "."]
    for key, label in (("education", "Education"), ("marital status", "Marital status"),
                       ("family details", "Family")):
        v = _clean(info.get(key))
        if v:
            parts.append(f"{label}: {v.rstrip('.')}.")
    return " ".join(parts)


def parse_patterns(value: Any) -> list[str]:
    """Cactus ``patterns`` (a Python-literal list as a string, SPEC A2), a list, or a
    comma-separated string -> list of stripped non-empty strings. ``None``/NaN -> ``[]``.
    Uses ``ast.literal_eval`` (no code execution)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return []
    if isinstance(value, str):
        s = value.strip()
        if s.startswith("["):
            try:
                value = ast.literal_eval(s)
            except (ValueError, SyntaxError):
                value = s.strip("[]").replace("'", "").replace('"', "").split(",")
        else:
            value = s.split(",")
    return [str(v).strip() for v in list(value) if str(v).strip()]


_PLAN_START = re.compile(r"(?m)^[ \t]*1\.[ \t]+\S")


def extract_numbered_plan(text: Any) -> str | None:
    """The numbered plan inside ``text``: everything from the first line starting with
    ``1. `` (MIRROR ``run_step2.py`` skips a row whose ``cbt_plan`` has no ``"\\n1. "`` and keeps
    the text from the first ``1. ``; we also accept a plan that starts at the first line).
    ``None`` when there is no such line."""
    if not isinstance(text, str):
        return None
    m = _PLAN_START.search(text)
    return text[m.start():].strip() if m else None


def plan_reject_reason(plan: Any) -> str | None:
    """``None`` when ``plan`` holds a numbered CBT plan, else the reject reason."""
    if extract_numbered_plan(plan) is None:
        shown = repr(plan)[:80] if plan else "empty"
        return f"no numbered CBT plan after record completion (cbt_plan: {shown})"
    return None


def client_key(intake_form: str) -> str:
    """Identity of a client for de-duplication: content id of the intake form with all
    whitespace runs collapsed (the 3 attitude copies of a bundled client share the form)."""
    return R.content_id(" ".join(str(intake_form).split()))


def _techniques(value: Any) -> list[str]:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return []
    if isinstance(value, str):
        return parse_patterns(value)
    return [str(v).strip() for v in list(value) if str(v).strip()]


def client_record(row: dict[str, Any], row_index: int) -> dict[str, Any]:
    """Build the client record of one Cactus row.

    ``row``: a Cactus row with ``intake_form`` and optionally ``thought``, ``patterns``,
    ``cbt_plan`` (full Cactus), ``client_information``, ``reason_counseling``,
    ``ground_truth_cbt``, ``id`` (bundled evaluation file). ``row_index``: 0-based position
    in the input file (it forms the screenplay ids ``cactus-{row}-{trait}``).

    Returns a dict with ``client_id`` (the row's ``id`` or ``cactus-{row_index}``),
    ``row_index``, ``client_key``, ``name``, ``age`` (float|None), ``gender`` (as written,
    lower-cased), ``face_gender`` (``Man``|``Woman``|None), ``age_group`` (int|None),
    ``personal_info`` (JSON string of the lower-cased dict), ``client_persona``,
    ``presenting_problem``, ``reason_counseling``, ``thought`` (str|None), ``patterns``
    (list[str]), ``cbt_techniques`` (list[str], from ``ground_truth_cbt``), ``cbt_plan``
    (numbered plan or None), ``derived_fields`` (list[str], empty here: ``apply_completion``
    fills it) and ``missing_fields`` (which of thought/patterns/cbt_plan the completion stage
    must derive).

    Raises ``IntakeFormError`` when the intake form cannot be parsed and there is no
    ``client_information`` block to fall back on.
    """
    form = row.get("intake_form")
    try:
        parsed = parse_intake_form(form)
    except IntakeFormError:
        if not isinstance(row.get("client_information"), str):
            raise
        parsed = {"personal_info": parse_personal_info(row["client_information"]),
                  "presenting_problem": "", "reason_counseling": "", "sections": {}}
        if not parsed["personal_info"]:
            raise
    info = parsed["personal_info"]
    if not any(info.get(k) for k in ("name", "age", "gender")) and isinstance(row.get("client_information"), str):
        info = parse_personal_info(row["client_information"]) or info
    reason = parsed["reason_counseling"] or _clean(row.get("reason_counseling"))
    thought = row.get("thought")
    thought = thought.strip() if isinstance(thought, str) and thought.strip() else None
    patterns = parse_patterns(row.get("patterns"))
    plan = extract_numbered_plan(row.get("cbt_plan"))
    missing = [k for k, v in (("thought", thought), ("patterns", patterns), ("cbt_plan", plan)) if not v]
    return {
        "client_id": str(row.get("id") or f"cactus-{row_index}"),
        "row_index": int(row_index),
        "client_key": client_key(form if isinstance(form, str) else json.dumps(info, sort_keys=True)),
        "name": _clean(info.get("name")),
        "age": parse_age(info.get("age")),
        "gender": _clean(info.get("gender")).lower(),
        "face_gender": normalize_gender(info.get("gender")),
        "age_group": age_group(info.get("age")),
        "personal_info": json.dumps(info, ensure_ascii=False),
        "client_persona": client_persona(info),
        "presenting_problem": parsed["presenting_problem"],
        "reason_counseling": reason,
        "thought": thought,
        "patterns": patterns,
        "cbt_techniques": _techniques(row.get("ground_truth_cbt")),
        "cbt_plan": plan,
        "derived_fields": [],
        "missing_fields": missing,
    }


def dedupe_clients(ids: Iterable[str], keys: Iterable[str]) -> list[str | None]:
    """One reject reason per record: ``None`` for the first record of each ``client_key``
    (in input order), ``"duplicate of <id>"`` for later copies. The bundled evaluation file
    holds each of its 150 clients three times, once per Cactus attitude (notes section 4)."""
    first: dict[str, str] = {}
    out: list[str | None] = []
    for rid, key in zip(ids, keys, strict=True):
        if key in first:
            out.append(f"duplicate of {first[key]}")
        else:
            first[key] = rid
            out.append(None)
    return out


class PlanFilterParams(BaseModel):
    """Params of ``plan_filter`` (none: the rule is MIRROR's, ``run_step2.py``)."""

    model_config = ConfigDict(extra="forbid")


def plan_filter(batch: dict, params: Any, audit: bool = False) -> dict:
    """Filter stage: reject records whose ``cbt_plan`` has no numbered plan after the
    record-completion stage (MIRROR skips such Cactus rows silently; we record the reason).
    Reads ``cbt_plan``; outputs ``has_numbered_plan`` (bool) and ``rows.ROW_REJECT``."""
    reasons = [plan_reject_reason(p) for p in batch["cbt_plan"]]
    return {"has_numbered_plan": [r is None for r in reasons], R.ROW_REJECT: reasons}


# =============================================================================== completion

#: The twelve CBT techniques MIRROR-LLaVA's planning prompt offers (SPEC B4,
#: ``mirror-llava/llava/chat/vlm.py``). Cactus ``ground_truth_cbt`` also uses two others
#: (Role-playing and Simulation, Self-Assertiveness Training; 1 client each in the bundled file).
CBT_TECHNIQUES = (
    "Efficiency Evaluation", "Pie Chart Technique", "Alternative Perspective", "Decatastrophizing",
    "Pros and Cons Analysis", "Evidence-Based Questioning", "Reality Testing", "Continuum Technique",
    "Changing Rules to Wishes", "Behavior Experiment", "Problem-Solving Skills Training",
    "Systematic Exposure",
)
#: The ten cognitive-distortion labels of CBT-Bench's distortion task, spelled as in its data
#: (``mianzhang/CBT-Bench@0fb262c: CBT_LLM_data/distortions_{seed,test}.json``; counts over
#: the 166 bundled rows in notes section 4).
DISTORTION_LABELS = (
    "all-or-nothing thinking", "overgeneralization", "mental filter", "mind reading",
    "fortune-telling", "magnification", "emotional reasoning", "should statements", "labeling",
    "personalization",
)
#: Technique used when ``ground_truth_cbt`` is empty and no LLM choice is available: the most
#: frequent technique of the bundled Cactus clients (54 of 150; notes section 4).
FALLBACK_TECHNIQUE = "Alternative Perspective"

# Our own one-line glosses of the labels (for the classification prompt).
_DISTORTION_GLOSS = {
    "all-or-nothing thinking": "seeing things in two extremes with nothing in between",
    "overgeneralization": "turning one event into a rule about everything or always",
    "mental filter": "dwelling on one negative detail and ignoring the rest",
    "mind reading": "assuming you know what others think of you without evidence",
    "fortune-telling": "predicting that things will turn out badly",
    "magnification": "blowing the importance of a problem out of proportion",
    "emotional reasoning": "treating a feeling as proof that something is true",
    "should statements": "rigid rules about how you or others must behave",
    "labeling": "attaching a global negative label to yourself or others",
    "personalization": "blaming yourself for events outside your control",
}
_DISTORTION_ALIASES = {
    "all or nothing": "all-or-nothing thinking", "black and white": "all-or-nothing thinking",
    "black-and-white thinking": "all-or-nothing thinking", "overgeneralizing": "overgeneralization",
    "over-generalization": "overgeneralization", "over generalization": "overgeneralization",
    "fortune telling": "fortune-telling", "jumping to conclusions: fortune-telling": "fortune-telling",
    "jumping to conclusions: mind reading": "mind reading", "mind-reading": "mind reading",
    "catastrophizing": "magnification", "magnification and minimization": "magnification",
    "should statement": "should statements", "labelling": "labeling", "mislabeling": "labeling",
    "filtering": "mental filter",
}


class DistortedThoughtReply(BaseModel):
    """Reply of the distorted-thought extraction: one first-person sentence."""

    # no regex pattern: xgrammar 0.2.8 fails to compile bounded repeats above 128 (measured) and
    # ignores maxLength beside a pattern; validate_thought rejects multi-line replies
    thought: str = Field(min_length=8, max_length=300,
                         description="The client's central automatic negative thought, first person")


DistortionLabel = Literal[DISTORTION_LABELS]  # type: ignore[valid-type]


class DistortionReply(BaseModel):
    """Reply of the thinking-trap classification: 1-3 CBT-Bench labels (CBT-Bench rows hold
    1-3 labels each, notes section 4)."""

    distortions: list[DistortionLabel] = Field(min_length=1, max_length=3)  # type: ignore[valid-type]


class CbtPlanReply(BaseModel):
    """Reply of the plan expansion: the technique and 3-6 plan steps (MIRROR's plans have
    about 4-6 numbered steps, format reference ``mirror_llava_samples.jsonl``)."""

    technique: Literal[CBT_TECHNIQUES]  # type: ignore[valid-type]  # constrained decoding names one of the 12
    steps: list[Annotated[str, Field(min_length=12, max_length=160)]] = Field(min_length=3, max_length=6)


_THOUGHT_MARKER = re.compile(r"\b(?:belief|thought|fear|feeling|worry|conviction)s?\s+that\s+(.+?[.!?])(?=\s|$)",
                             re.I | re.S)
_SENT_END = re.compile(r"(?<=[.!?])\s+")


def heuristic_thought(presenting_problem: str) -> str | None:
    """Rule-based stand-in for the distorted thought (notes section 4): the clause after
    "belief/thought/fear/feeling that" when the presenting problem has one (20 of 150
    bundled clients), else its first sentence. ``None`` for an empty text."""
    text = " ".join(str(presenting_problem or "").split())
    if not text:
        return None
    m = _THOUGHT_MARKER.search(text)
    if m:
        clause = m.group(1).strip()
        return clause[0].upper() + clause[1:]
    return _SENT_END.split(text, maxsplit=1)[0].strip()


_THOUGHT_INSTRUCTIONS = """\
You help prepare material for cognitive behavioural therapy. Below is what a client wrote \
about the problem that brings them to counselling. Name the one automatic negative thought \
that drives the problem, phrased as the client would think it: first person, present tense, \
a single sentence of at most 30 words. Do not add advice, labels or explanations.
Answer with JSON only: {"thought": "<the thought>"}"""


def _chat(system: str, user: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def thought_messages(record: dict[str, Any]) -> list[dict[str, str]]:
    """Chat messages asking for the client's distorted thought (reply: ``DistortedThoughtReply``).
    ``record``: a client record (uses ``presenting_problem``, ``reason_counseling``)."""
    user = (f"Presenting problem:\n{record.get('presenting_problem') or '(not given)'}\n\n"
            f"Reason for seeking counselling:\n{record.get('reason_counseling') or '(not given)'}")
    return _chat(_THOUGHT_INSTRUCTIONS, user)


def validate_thought(text: Any) -> str:
    """Check an extracted thought: one line of 3-40 words. Returns it stripped of quotes;
    raises ``ValueError`` naming the problem."""
    if not isinstance(text, str):
        raise ValueError(f"thought must be a string, got {type(text).__name__}")
    t = text.strip().strip('"\u201c\u201d').strip()
    if "\n" in t:
        raise ValueError("thought spans several lines")
    n = len(t.split())
    if not 3 <= n <= 40:
        raise ValueError(f"thought has {n} words, expected 3-40")
    return t


def normalize_distortion(label: Any) -> str | None:
    """Map a label spelling (case, hyphens, common synonyms such as "catastrophizing" ->
    "magnification") onto ``DISTORTION_LABELS``; ``None`` when it is none of them."""
    if not isinstance(label, str):
        return None
    s = " ".join(label.strip().strip(".\"'").lower().replace("_", " ").split())
    if s in DISTORTION_LABELS:
        return s
    if s in _DISTORTION_ALIASES:
        return _DISTORTION_ALIASES[s]
    s2 = s.replace("-", " ")
    for lab in DISTORTION_LABELS:
        if s2 == lab.replace("-", " "):
            return lab
    return None


def distortion_messages(thought: str, context: str = "") -> list[dict[str, str]]:
    """Chat messages classifying a thought into 1-3 of the ten CBT-Bench distortion labels
    (reply: ``DistortionReply``). ``context``: the situation (presenting problem), optional."""
    glossary = "\n".join(f"- {lab}: {gloss}" for lab, gloss in _DISTORTION_GLOSS.items())
    system = ("You are a CBT clinician labelling thinking traps. Pick the one to three labels "
              "from the list that best describe the thought; use the labels exactly as spelled.\n"
              f"{glossary}\n"
              'Answer with JSON only, for example {"distortions": ["fortune-telling", "labeling"]}.')
    user = (f"Situation: {context.strip()}\n" if context and context.strip() else "") + f"Thought: {thought}"
    return _chat(system, user)


def parse_distortions(reply: Any) -> list[str]:
    """Labels from a classification reply: a ``DistortionReply`` JSON string/dict, a list, or
    free text naming labels. Unknown labels are dropped, duplicates removed, order kept, at
    most 3. Raises ``ValueError`` when no valid label remains."""
    items: list[Any]
    if isinstance(reply, dict):
        items = list(reply.get("distortions") or [])
    elif isinstance(reply, (list, tuple)):
        items = list(reply)
    else:
        text = str(reply or "")
        try:
            obj = json.loads(text)
            items = list(obj.get("distortions") or []) if isinstance(obj, dict) else list(obj)
        except (json.JSONDecodeError, AttributeError, TypeError):
            low = text.lower()
            found = [(low.find(k), v) for k, v in
                     [*((lab, lab) for lab in DISTORTION_LABELS), *_DISTORTION_ALIASES.items()] if k in low]
            items = [v for _, v in sorted(found)]
    out: list[str] = []
    for it in items:
        lab = normalize_distortion(it)
        if lab and lab not in out:
            out.append(lab)
    if not out:
        raise ValueError(f"no CBT-Bench distortion label in reply {str(reply)[:120]!r}")
    return out[:3]


def plan_messages(record: dict[str, Any], technique: str | None = None) -> list[dict[str, str]]:
    """Chat messages asking for a numbered CBT plan (reply: ``CbtPlanReply``).

    ``technique``: expand this technique (from Cactus ``ground_truth_cbt``); ``None``: the
    model first picks one of ``CBT_TECHNIQUES`` (SPEC B4's planning step). ``record``: a
    client record (persona, reason, thought, patterns)."""
    if technique:
        task = (f"The technique is fixed: {technique}. Put exactly this name in \"technique\".")
    else:
        task = ("Choose the one technique from this list that fits the client best and put its "
                "name, spelled as listed, in \"technique\": " + "; ".join(CBT_TECHNIQUES) + ".")
    system = ("You are a CBT counsellor preparing a first session. Write a short counselling plan "
              "that applies one technique to this client's distorted thought. " + task +
              " Give 3 to 6 steps in the order you would use them; each step is a short title, a "
              "colon, and one or two sentences addressed to the client (\"we will ...\"). Do not "
              "number the steps yourself.\n"
              'Answer with JSON only: {"technique": "...", "steps": ["Title: ...", "..."]}')
    pats = ", ".join(record.get("patterns") or []) or "(not classified)"
    user = (f"Client: {record.get('client_persona', '')}\n"
            f"Reason for seeking counselling: {record.get('reason_counseling', '')}\n"
            f"Distorted thought: {record.get('thought') or '(not given)'}\n"
            f"Thinking traps: {pats}")
    return _chat(system, user)


_LEADING_NUMBER = re.compile(r"^\s*(?:step\s*)?\d{1,2}\s*[.):-]\s*", re.I)


def format_plan(steps: Iterable[str]) -> str:
    """``["A: x", "B: y"]`` -> ``"1. A: x\\n2. B: y"`` (numbering the model may have added is
    replaced; newlines inside a step become spaces; empty steps are skipped)."""
    clean = [" ".join(_LEADING_NUMBER.sub("", str(s)).split()) for s in steps]
    return "\n".join(f"{i}. {s}" for i, s in enumerate((s for s in clean if s), start=1))


def plan_from_reply(reply: Any, technique: str | None = None) -> tuple[str, str]:
    """Validate a ``CbtPlanReply`` (JSON string, dict or model) -> ``(technique, numbered plan)``.

    The reply's technique is one of ``CBT_TECHNIQUES`` (the schema's enum); with ``technique``
    given the reply must name it (case-insensitive). Raises ``ValueError`` for an invalid reply
    (pydantic's message), a wrong technique or fewer than 3 non-empty steps."""
    if isinstance(reply, CbtPlanReply):
        obj = reply
    elif isinstance(reply, dict):
        obj = CbtPlanReply.model_validate(reply)
    else:
        obj = CbtPlanReply.model_validate_json(str(reply))
    name = obj.technique  # one of CBT_TECHNIQUES (the schema's enum)
    if technique:
        if name.lower() != technique.strip().lower():
            raise ValueError(f"plan names technique {name!r}, expected {technique!r}")
        name = technique.strip()
    plan = format_plan(obj.steps)
    if plan.count("\n") < 2:
        raise ValueError("plan has fewer than 3 non-empty steps")
    return name, plan


def template_plan(technique: str, thought: str | None) -> str:
    """A generic four-step numbered plan for ``technique`` (our own outline: introduce, practise
    on a recent situation, review, homework), used when the LLM gives no valid plan. The
    record marks it ``cbt_plan:template``, so it is never mistaken for a written plan."""
    focus = f'the thought "{thought.strip()}"' if thought and thought.strip() else "the distressing thought"
    return format_plan([
        f"Introduce {technique}: we will explain the technique and link it to {focus}.",
        f"Practise: we will apply {technique} to a recent situation in which the thought came up.",
        "Review: we will look at what the exercise showed and how strongly the thought is still believed.",
        f"Homework: we will agree on one use of {technique} before the next session and how to note the result.",
    ])


def apply_completion(record: dict[str, Any], *, thought: str | None = None, patterns: list[str] | None = None,
                     technique: str | None = None, plan: str | None = None,
                     method: str = "llm") -> dict[str, Any]:
    """Return a copy of ``record`` with the missing fields filled and marked as derived.

    Only fields listed in ``missing_fields`` are filled (given values never overwrite source
    data). Each filled field is appended to ``derived_fields`` as ``"<field>:<method>"``
    (e.g. ``thought:llm``, ``thought:heuristic``, ``cbt_plan:llm``); ``technique`` is added
    to ``cbt_techniques`` (marked ``cbt_techniques:<method>``) when the record had none.
    ``missing_fields`` is updated to what is still missing.
    """
    out = {**record, "derived_fields": list(record.get("derived_fields") or []),
           "cbt_techniques": list(record.get("cbt_techniques") or [])}
    missing = list(record.get("missing_fields") or [])
    values = {"thought": thought.strip() if isinstance(thought, str) and thought.strip() else None,
              "patterns": [p for p in (patterns or []) if p] or None,
              "cbt_plan": extract_numbered_plan(plan)}
    for f, v in values.items():
        if f in missing and v:
            out[f] = v
            out["derived_fields"].append(f"{f}:{method}")
            missing.remove(f)
    if technique and not out["cbt_techniques"]:
        out["cbt_techniques"] = [technique]
        out["derived_fields"].append(f"cbt_techniques:{method}")
    out["missing_fields"] = missing
    return out


# =============================================================================== screenplay

#: MIRROR's four resistance traits (names and slugs: ``mirror/agent/personality.py``; the
#: behavioural descriptions are our own 4-sentence summaries of SPEC A2's paraphrase).
RESISTANCE_TRAITS: dict[str, dict[str, str]] = {
    "emotional-resistance": {
        "name": "Emotional Resistance",
        "description": (
            "The client keeps feelings at arm's length and changes the subject when emotions come up. "
            "They answer questions about how they feel with facts or jokes. "
            "Naming a painful feeling makes them tense or defensive. "
            "They may admit a feeling only briefly before pulling back."),
    },
    "cognitive-resistance": {
        "name": "Cognitive Resistance",
        "description": (
            "The client holds firmly to a negative view of themselves. "
            "They argue with the therapist's suggestions and alternative explanations. "
            "They treat their own thoughts as facts and dismiss evidence against them. "
            "Reframes are often met with \"yes, but\"."),
    },
    "behavioral-resistance": {
        "name": "Behavioral Resistance",
        "description": (
            "The client is doubtful that therapy can help. "
            "They have skipped sessions or left homework undone before. "
            "They agree vaguely to tasks without committing to them. "
            "They look for reasons why a plan will not work in practice."),
    },
    "no-resistance": {
        "name": "No Resistance",
        "description": (
            "The client is open to the process and wants to change. "
            "They share thoughts and feelings readily. "
            "They try out new perspectives and ask questions when unsure. "
            "They commit to small next steps."),
    },
}

#: Sampling of MIRROR step 2 (``mirror/agent/counseling_gen.py``, ``mirror/utils/openai_utils.py``;
#: SPEC A2), direct and batch mode alike.
SCREENPLAY_SAMPLING = {"temperature": 0.7, "top_p": 0.9, "max_tokens": 1024,
                       "frequency_penalty": 0.2, "presence_penalty": 0.2}

SCREENPLAY_SYSTEM = """\
You write the script of a client's first session of cognitive behavioural therapy that \
focuses on cognitive reframing, based on the client report you are given.

Format: output only dialogue lines, one utterance per line, each written as
Therapist: [stage direction] what the therapist says
Client: [stage direction] what the client says
The therapist speaks first and the two speakers alternate. The stage direction in square \
brackets is a few words on the speaker's visible emotion or body language. Keep every \
utterance to one or two sentences. Write between 8 and 40 lines.

The client: act out the personality trait in the report consistently, in words and in the \
stage directions. If the resistance grows, the session may end early.

The therapist: follow the CBT plan one step at a time, starting from the distorted thought.
- When the client disagrees outright, do not argue: acknowledge the view and ask what \
would make it feel less true.
- When the client agrees only half-heartedly ("I guess so"), check what part still does \
not fit.
- When the client shows distress, slow down, name the feeling and offer a pause.
- When the client avoids a topic, goes quiet or disengages in small ways (short answers, \
looking away), reflect it gently and ask permission before going on.
- To close: name any impasse honestly, validate the effort, and point out small gains.
- Homework for a resistant client is chosen together, very small, and framed as an \
experiment rather than a test."""

_FEW_SHOT_USER_1 = """\
Client Information
Personal Information: Sam Ortiz is a 29-year-old male whose occupation is barista. Marital status: Single.
Personality Traits: Cognitive Resistance: The client holds firmly to a negative view of themselves. They argue with suggestions and dismiss evidence against their thoughts.
Distorted Thoughts: If I make one mistake at work, I will be fired.
Thinking Trap: fortune-telling, magnification
Reason for Seeking Counseling: I cannot sleep before my shifts because I keep replaying everything that could go wrong.

CBT Plan
1. Evidence review: We will list what has actually happened after past mistakes at work.
2. Alternative explanations: We will look for other ways a manager might react to one error.
3. Small test: We will plan one low-risk check of the prediction this week.

Keep every response to at most two lines.

First Session Counseling"""

_FEW_SHOT_ASSISTANT_1 = """\
Therapist: [leans forward, friendly] Thanks for coming in, Sam. What has been on your mind before your shifts?
Client: [arms crossed] That one mistake and I am out. That is just how it works.
Therapist: [calm, curious] It sounds very certain to you. Have you made a mistake at work before?
Client: [shrugs] Sure, I mixed up an order last month. I still think I got lucky.
Therapist: [nods slowly] What happened after that order got mixed up?
Client: [looks away] My manager told me to remake it. Nothing else, but next time will be different.
Therapist: [gentle] So one piece of evidence says a mistake led to a remake, not a firing.
Client: [sighs, unconvinced] Yes, but that does not mean anything.
Therapist: [patient] Fair enough. Would you be willing to note what happens after small slips this week, just as an experiment?
Client: [hesitant half smile] I guess I could write a few things down."""

_FEW_SHOT_USER_2 = """\
Client Information
Personal Information: Mei Lin is a 41-year-old female whose occupation is nurse. Family: Two teenage children.
Personality Traits: Behavioral Resistance: The client is doubtful that therapy can help. They agree vaguely to tasks without committing to them.
Distorted Thoughts: I am a bad mother because I work night shifts.
Thinking Trap: labeling, should statements
Reason for Seeking Counseling: My sister said I seem exhausted and guilty all the time.

CBT Plan
1. Rule spotting: We will find the rules behind the word "bad".
2. Continuum: We will place good and bad parenting on a scale with concrete examples.
3. Rules to wishes: We will turn one rigid rule into a preference.

Keep every response to at most two lines.

First Session Counseling"""

_FEW_SHOT_ASSISTANT_2 = """\
Therapist: [warm smile] Hello Mei, I am glad you made it. What would you like to focus on today?
Client: [glances at the clock] My sister made me come. I doubt talking changes my schedule.
Therapist: [nods] That is honest, thank you. What goes through your mind after a night shift?
Client: [tired voice] That a good mother would be home. So I am a bad one.
Therapist: [thoughtful] What would a good mother do, in your view?
Client: [frowns] Be there for breakfast, help with homework, not sleep all afternoon.
Therapist: [gently] Which of those things do you manage in a usual week?
Client: [pauses, softer] Homework on my days off. Breakfast twice, maybe.
Therapist: [encouraging] Could we try one small thing: note each time you do something for your kids this week?
Client: [noncommittal] Maybe. If I remember."""

#: Two invented few-shot pairs (user = client block, assistant = screenplay), our own words;
#: MIRROR uses two such pairs (``mirror/agent/examples/prompt_N.txt``/``output_N.txt``, SPEC A2).
SCREENPLAY_FEW_SHOT: tuple[tuple[str, str], ...] = (
    (_FEW_SHOT_USER_1, _FEW_SHOT_ASSISTANT_1),
    (_FEW_SHOT_USER_2, _FEW_SHOT_ASSISTANT_2),
)

_LENGTH_RULE = "Keep every response to at most two lines."


def default_screenplay_prompt() -> dict[str, Any]:
    """The screenplay prompt as JSON-serialisable data a recipe can hold:
    ``{"system": str, "few_shot": [[user, assistant], [user, assistant]], "length_rule": str}``."""
    return {"system": SCREENPLAY_SYSTEM, "few_shot": [list(p) for p in SCREENPLAY_FEW_SHOT],
            "length_rule": _LENGTH_RULE}


def client_block(record: dict[str, Any], trait: str, length_rule: str = _LENGTH_RULE) -> str:
    """The user query of the screenplay prompt (SPEC A2 layout: a "Client Information" block
    with personal information, personality trait, distorted thought, thinking trap and reason,
    then the numbered CBT plan, the length rule and a "First Session Counseling" header).

    ``record``: a client record after completion; ``trait``: a ``RESISTANCE_TRAITS`` slug.
    Raises ``KeyError`` for an unknown trait."""
    t = RESISTANCE_TRAITS[trait]
    traps = ", ".join(record.get("patterns") or []) or "(none given)"
    return (f"Client Information\n"
            f"Personal Information: {record.get('client_persona', '')}\n"
            f"Personality Traits: {t['name']}: {t['description']}\n"
            f"Distorted Thoughts: {record.get('thought') or '(none given)'}\n"
            f"Thinking Trap: {traps}\n"
            f"Reason for Seeking Counseling: {record.get('reason_counseling', '')}\n\n"
            f"CBT Plan\n{record.get('cbt_plan') or ''}\n\n"
            f"{length_rule}\n\nFirst Session Counseling")


def screenplay_messages(record: dict[str, Any], trait: str, prompt: dict[str, Any] | None = None) -> list[dict[str, str]]:
    """Chat messages for one screenplay: system, the few-shot pairs, then ``client_block``.
    ``prompt``: the recipe's prompt data (``default_screenplay_prompt()`` shape); default ours."""
    p = prompt or default_screenplay_prompt()
    msgs = [{"role": "system", "content": p["system"]}]
    for user, assistant in p.get("few_shot") or []:
        msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    msgs.append({"role": "user", "content": client_block(record, trait, p.get("length_rule", _LENGTH_RULE))})
    return msgs


def screenplay_id(row_index: int, trait: str) -> str:
    """``cactus-{row}-{trait}`` (MIRROR ``run_step2.py``, e.g. ``cactus-7658-emotional-resistance``).
    Raises ``KeyError`` for an unknown trait slug."""
    if trait not in RESISTANCE_TRAITS:
        raise KeyError(f"unknown resistance trait {trait!r}; known: {sorted(RESISTANCE_TRAITS)}")
    return f"cactus-{int(row_index)}-{trait}"


def screenplay_rows(record: dict[str, Any], traits: Iterable[str] = tuple(RESISTANCE_TRAITS)) -> list[dict[str, Any]]:
    """Cross a client record with the resistance traits: one row per trait with ``id``
    (``screenplay_id``), ``resistance`` (trait name; MIRROR's column wrongly kept the row
    number, SPEC A2), ``resistance_slug`` and ``personality`` (description), plus every field
    of the record."""
    return [{**record, R.ID: screenplay_id(record["row_index"], t), "resistance": RESISTANCE_TRAITS[t]["name"],
             "resistance_slug": t, "personality": RESISTANCE_TRAITS[t]["description"]} for t in traits]


#: MIRROR's line pattern (``mirror/step2/postprocess.py``, SPEC A2).
LINE_RE = re.compile(r"^(Therapist|Client):\s*\[(.*?)\]\s*(.*)")


def parse_line(line: str, client_name: str | None = None) -> dict[str, Any] | None:
    """Parse one screenplay line into ``{"speaker", "stage_direction", "statement"}``.

    Order (MIRROR ``postprocess.py``, SPEC A2 / notes section 6): (1) ``LINE_RE``;
    (2) the same with the client's name (full or first name) as speaker; (3) no bracket,
    ``Speaker: text`` -> ``stage_direction`` None. A line spoken under the client's name is
    given speaker ``Client`` (ours: downstream stages look for client turns). Returns ``None``
    for a line none of these match (empty lines, narration, ``The client: ...``)."""
    s = line.strip()
    if not s:
        return None
    m = LINE_RE.match(s)
    if m:
        return {"speaker": m.group(1), "stage_direction": m.group(2).strip(), "statement": m.group(3).strip()}
    names = []
    if client_name and client_name.strip():
        full = client_name.strip()
        names = [re.escape(full)] + ([re.escape(full.split()[0])] if " " in full else [])
        m = re.match(rf"^(?:{'|'.join(names)}):\s*\[(.*?)\]\s*(.*)", s)
        if m:
            return {"speaker": "Client", "stage_direction": m.group(1).strip(), "statement": m.group(2).strip()}
    m = re.match(rf"^(Therapist|Client{''.join('|' + n for n in names)}):\s*(.*)", s)
    if m:
        speaker = m.group(1) if m.group(1) in ("Therapist", "Client") else "Client"
        return {"speaker": speaker, "stage_direction": None, "statement": m.group(2).strip()}
    return None


def parse_screenplay(text: Any, client_name: str | None = None) -> tuple[list[dict[str, Any]], list[str]]:
    """Parse a generated screenplay: ``(turns, unparsed non-empty lines)``. ``turns`` is
    MIRROR's ``proc_dialogue``; ``len(turns) / 2`` is its ``turn`` column (SPEC A2)."""
    turns, bad = [], []
    for line in str(text or "").splitlines():
        if not line.strip():
            continue
        t = parse_line(line, client_name)
        (turns.append(t) if t else bad.append(line.strip()))
    return turns, bad


# Stage directions: a letter then letters, spaces and light punctuation, no brackets, braces
# or parentheses (notes 3.4: a looser class let SmolLM2 write "[nods) Yes, ...]").
_DIR_CHARS = "A-Za-z ,.'-"


def screenplay_grammar(min_pairs: int = 4, max_pairs: int = 20, max_direction: int = 40,
                       max_statement: int = 200) -> str:
    """xgrammar EBNF for a screenplay of ``min_pairs``..``max_pairs`` Therapist/Client line
    pairs, each ``Speaker: [direction] statement\\n``.

    Default bounds follow MIRROR's turn-count filter (4 <= lines/2 <= 20, SPEC A8) so a
    grammar-complete reply always passes it; ``max_direction``/``max_statement`` (characters)
    keep a small model from rambling (notes 3.4: SmolLM2 free-sampled lines parse 49 % of the
    time, under this kind of grammar 100 %). Statements contain no newline or square bracket.
    Raises ``ValueError`` for inconsistent bounds."""
    _check_bounds(min_pairs, max_pairs, max_direction, max_statement)
    return (f"root ::= pair{{{min_pairs},{max_pairs}}}\n"
            'pair ::= "Therapist: [" dir "] " stmt "\\n" "Client: [" dir "] " stmt "\\n"\n'
            f"dir ::= [A-Za-z] [{_DIR_CHARS}]{{0,{max_direction - 1}}}\n"
            f"stmt ::= [^\\n\\[\\] ] [^\\n\\[\\]]{{0,{max_statement - 1}}}\n")


def screenplay_regex(min_pairs: int = 4, max_pairs: int = 20, max_direction: int = 40,
                     max_statement: int = 200) -> str:
    """The same language as ``screenplay_grammar`` as a regular expression (for the LLM stage's
    ``regex`` output format: xgrammar/vLLM guided decoding and Python ``re.fullmatch``
    validation). The final newline is optional. Raises ``ValueError`` for inconsistent bounds."""
    _check_bounds(min_pairs, max_pairs, max_direction, max_statement)
    d = f"[A-Za-z][{_DIR_CHARS}]{{0,{max_direction - 1}}}"
    s = f"[^\\n\\[\\] ][^\\n\\[\\]]{{0,{max_statement - 1}}}"
    pair = f"Therapist: \\[{d}\\] {s}\\nClient: \\[{d}\\] {s}"
    head = f"(?:{pair}\\n){{{min_pairs - 1},{max_pairs - 1}}}" if max_pairs > 1 else ""
    return f"{head}{pair}\\n?"


def _check_bounds(min_pairs: int, max_pairs: int, max_direction: int, max_statement: int) -> None:
    if not 1 <= min_pairs <= max_pairs:
        raise ValueError(f"need 1 <= min_pairs <= max_pairs, got {min_pairs}, {max_pairs}")
    if max_direction < 1 or max_statement < 1:
        raise ValueError("max_direction and max_statement must be >= 1")


_GRAMMAR_CACHE: dict[tuple[str, str], Any] = {}


def grammar_accepts(grammar: str, text: str, kind: Literal["ebnf", "regex"] = "ebnf") -> bool:
    """True when xgrammar accepts ``text`` as a complete string of ``grammar`` (EBNF or regex).

    Compiles against a character-level vocabulary (printable ASCII, newline, stop token), so
    it needs no model tokenizer; compiled grammars are cached per (kind, grammar). Text with
    characters outside printable ASCII is rejected. Raises ``RuntimeError`` (xgrammar's) when
    the grammar does not compile."""
    import xgrammar as xgr

    vocab = [chr(i) for i in range(32, 127)] + ["\n", "<|stop|>"]
    stop = len(vocab) - 1
    key = (kind, grammar)
    if key not in _GRAMMAR_CACHE:
        compiler = xgr.GrammarCompiler(xgr.TokenizerInfo(vocab, stop_token_ids=[stop]))
        _GRAMMAR_CACHE[key] = (compiler.compile_regex(grammar) if kind == "regex"
                               else compiler.compile_grammar(grammar))
    if any(not (32 <= ord(c) < 127 or c == "\n") for c in text):
        return False
    matcher = xgr.GrammarMatcher(_GRAMMAR_CACHE[key])
    return bool(matcher.accept_string(text) and matcher.accept_token(stop) and matcher.is_terminated())


# =============================================================================== identities

def _norm_identity(entry: dict[str, Any]) -> tuple[str, str | None, float | None]:
    return str(entry.get("identity")), normalize_gender(entry.get("gender")), parse_age(entry.get("age"))


def assign_identities(dialogues: list[dict[str, Any]], identities: list[dict[str, Any]],
                      salt: str = "identity") -> list[dict[str, Any]]:
    """Give every dialogue a face identity of the client's gender and nearest age group.

    MIRROR never released this step (SPEC A3); the rule is ours:

    1. Client side (``dialogues``: dicts with ``id``, ``gender`` (intake-form ``female``/
       ``male`` or ``Woman``/``Man``) and ``age``): target = (gender, ``age_group(age)``).
    2. Candidates: the pool identities of that gender (all genders when the pool has none of
       it or the client's gender is unknown); among them those whose age group is nearest to
       the target (ties between an older and a younger group take both; all groups when the
       client's age is unknown).
    3. Dialogues are processed in the order of ``rows.seed_from_id(id, salt)`` (ties by id);
       each takes the least-used candidate so far, ties broken by ``seed_from_id(identity,
       salt)``. So dialogues spread evenly (use counts within one candidate set differ by at
       most 1), the choice looks random (dialogue order is a hash of the id), and the result
       depends only on the dialogue ids and the pool, never on input order. O(D log C).

    ``identities``: dicts with ``identity``, ``gender`` (``Man``|``Woman``; DeepFace spelling,
    ``actors/faces.py``) and ``age`` (years), plus any other fields (``img_path`` …). The first
    entry of an identity wins; entries with unknown gender or age are not used.

    Returns, per dialogue in input order: ``{"identity", "identity_gender", "identity_age",
    "identity_age_group", "client_gender", "client_age_group", "identity_mismatch" (None or
    e.g. "no Woman identity in the pool; no identity in age group 70 (nearest 40)"),
    "identity_record" (the chosen pool dict)}``. Raises ``ValueError`` when the pool has no
    usable identity (empty, or none with a known gender and age).
    """
    pool: dict[str, dict[str, Any]] = {}
    for e in identities:
        ident, g, a = _norm_identity(e)
        if ident not in pool and g is not None and a is not None and e.get("identity") is not None:
            pool[ident] = {"gender": g, "age": a, "group": age_group(a), "record": e}
    if not pool:
        raise ValueError(f"face pool has no usable identity ({len(identities)} entries; each needs "
                         "'identity', 'gender' Man|Woman and a numeric 'age')")
    by_gender: dict[str, dict[int, list[str]]] = {}
    for ident, p in pool.items():
        by_gender.setdefault(p["gender"], {}).setdefault(p["group"], []).append(ident)

    def candidates(g: str | None, grp: int | None) -> tuple[tuple[str, ...], list[str]]:
        notes = []
        if g in by_gender:
            groups = dict(by_gender[g])
        else:
            notes.append("client gender unknown" if g is None else f"no {g} identity in the pool")
            groups = {}
            for gg in by_gender.values():
                for k, v in gg.items():
                    groups.setdefault(k, []).extend(v)
        if grp is None:
            notes.append("client age unknown")
            chosen = sorted(groups)
        else:
            best = min(abs(k - grp) for k in groups)
            chosen = sorted(k for k in groups if abs(k - grp) == best)
            if best:
                notes.append(f"no identity in age group {grp} (nearest {', '.join(map(str, chosen))})")
        return tuple(sorted(i for k in chosen for i in groups[k])), notes

    prepared = []
    for pos, d in enumerate(dialogues):
        did = str(d.get(R.ID, d.get("id")))
        g, grp = normalize_gender(d.get("gender")), age_group(d.get("age"))
        cands, notes = candidates(g, grp)
        prepared.append((R.seed_from_id(did, salt), did, pos, g, grp, cands, notes))

    load = {i: 0 for i in pool}
    rank = {i: R.seed_from_id(i, salt) for i in pool}
    heaps: dict[tuple[str, ...], list[tuple[int, int, str]]] = {}
    out: list[dict[str, Any] | None] = [None] * len(dialogues)
    for _, did, pos, g, grp, cands, notes in sorted(prepared, key=lambda t: (t[0], t[1], t[2])):
        heap = heaps.get(cands)
        if heap is None:
            heap = heaps[cands] = [(load[i], rank[i], i) for i in cands]
            heapq.heapify(heap)
        # least-used candidate; a lazy heap: an entry whose identity was used through another
        # candidate set is stale (its load only grows) and is pushed back with the current load
        while heap[0][0] != load[heap[0][2]]:
            _, r, i = heapq.heappop(heap)
            heapq.heappush(heap, (load[i], r, i))
        _, r, pick = heapq.heappop(heap)
        load[pick] += 1
        heapq.heappush(heap, (load[pick], r, pick))
        p = pool[pick]
        out[pos] = {"identity": p["record"].get("identity"), "identity_gender": p["gender"],
                    "identity_age": p["age"], "identity_age_group": p["group"], "client_gender": g,
                    "client_age_group": grp, "identity_mismatch": "; ".join(notes) or None,
                    "identity_record": p["record"]}
    return out  # type: ignore[return-value]
