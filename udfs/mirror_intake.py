"""MIRROR client records (SPEC A2): Cactus intake-form parsing, one client record per distinct
client, and the CBT-plan filter (pure functions; no Ray, no model). The rest of MIRROR's text side
lives beside it: ``udfs.mirror_completion`` (record completion), ``udfs.mirror_screenplay``
(screenplay prompts, line parser, line grammar), ``udfs.mirror_identity`` (face pool and identity
assignment), ``udfs.mirror_dialogue`` (the dialogue filters).

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
import json
import math
import re
from typing import Any, Iterable, Literal

from pydantic import BaseModel, ConfigDict

from udfs import rows as R


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


def _techniques(value: Any, single: bool = False) -> list[str]:
    """Technique names of a cell: a list, a list literal string, or (``single``) one name per
    string, else a comma-separated string."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return []
    if isinstance(value, str):
        s = value.strip()
        return parse_patterns(s) if s.startswith("[") or not single else ([s] if s else [])
    return [str(v).strip() for v in list(value) if str(v).strip()]


def source_techniques(row: dict[str, Any]) -> list[str]:
    """The CBT techniques a Cactus row names itself: its ``cbt_technique`` column (full Cactus
    rows, the technique its ``cbt_plan`` applies) when present and non-empty, else
    ``ground_truth_cbt`` (the bundled evaluation file). ``[]`` when neither has a name."""
    return _techniques(row.get("cbt_technique"), single=True) or _techniques(row.get("ground_truth_cbt"))


def client_record(row: dict[str, Any], row_index: int) -> dict[str, Any]:
    """Build the client record of one Cactus row.

    ``row``: a Cactus row with ``intake_form`` and optionally ``thought``, ``patterns``,
    ``cbt_plan``, ``cbt_technique`` (full Cactus), ``client_information``, ``reason_counseling``,
    ``ground_truth_cbt``, ``id`` (bundled evaluation file). ``row_index``: 0-based position
    in the input file (it forms the screenplay ids ``cactus-{row}-{trait}``).

    Returns a dict with ``client_id`` (the row's ``id`` or ``cactus-{row_index}``),
    ``row_index``, ``client_key``, ``name``, ``age`` (float|None), ``gender`` (as written,
    lower-cased), ``face_gender`` (``Man``|``Woman``|None), ``age_group`` (int|None),
    ``personal_info`` (JSON string of the lower-cased dict), ``client_persona``,
    ``presenting_problem``, ``reason_counseling``, ``thought`` (str|None), ``patterns``
    (list[str]), ``cbt_techniques`` (list[str], ``source_techniques``), ``cbt_plan``
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
        "cbt_techniques": source_techniques(row),
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
