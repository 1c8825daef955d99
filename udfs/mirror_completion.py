"""MIRROR record completion (SPEC A2): the distorted thought, thinking traps and CBT plan a
Cactus record lacks, from the LLM (prompts, reply schemas, validators) or from rules, merged by
``apply_completion`` with every derived field recorded (pure functions; no Ray, no model).

Sources: see ``udfs.mirror_intake`` (MIRROR, MIRROR-LLaVA, CBT-Bench, Cactus). Every prompt is
written in our own words from SPEC's descriptions; nothing is copied from the reference repository.
"""
from __future__ import annotations

import json
import re
from typing import Annotated, Any, Iterable, Literal

from pydantic import BaseModel, Field

from udfs.mirror_intake import extract_numbered_plan


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
    (e.g. ``thought:llm``, ``thought:heuristic``, ``cbt_plan:llm``). ``technique`` is the
    technique of ``plan``: it is added to ``cbt_techniques`` (marked
    ``cbt_techniques:<method>``) only when this call fills ``cbt_plan`` and the record named
    no technique, so a record never pairs its source plan with another technique (issue 18
    item 2). ``missing_fields`` is updated to what is still missing.
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
    plan_filled = "cbt_plan" in (record.get("missing_fields") or []) and "cbt_plan" not in missing
    if technique and plan_filled and not out["cbt_techniques"]:
        out["cbt_techniques"] = [technique]
        out["derived_fields"].append(f"cbt_techniques:{method}")
    out["missing_fields"] = missing
    return out
