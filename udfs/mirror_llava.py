"""MIRROR-LLaVA training records from the MIRROR pipeline's outputs (SPEC B1; the converter
the original never released).

Input: the kept dialogues of ``OUT/mirror_data.parquet`` (``jobs.mirror.export``: only
dialogues whose every filter and every client turn passed) and, when present, the per client
turn rows of ``OUT/expressions.parquet`` (``dialogue_id``, ``turn`` = index into
``proc_dialogue``, ``image``). Output: LLaVA-1.5 conversation records, one per therapist
turn that follows a client turn::

    {"question_id": "<dialogue>:<turn>:response",          # turn = the therapist turn's index
     "image": "<generated face of the client turn turn-1>",
     "conversations": [{"from": "human", "value": "<image>\\n..."},
                       {"from": "gpt", "value": "<therapist statement, no stage direction>"}]}

and, for ``ec_planning``, before it an emotion-recognition record
``"<dialogue>:<turn>:emotion_recognition"`` on the same image whose target is the client's
stage direction (format of ``nobel-postech/mirror@3bc4a9a:
mirror-llava/playground/data/train/mirror_{base,planning,ec_planning}-sample.json``, copied as
``../shared/data/counseling/mirror_llava_samples.jsonl``).

The human prompt follows SPEC B1's description in our own words: an image line, ``- Personal
Information:``, (ec_planning) ``- Client Emotional State:``, ``- Reason for Counseling:``,
(planning, ec_planning) ``- CBT technique: <name>`` and ``- Counseling planning:`` + the
numbered plan, a blank line, a line introducing the conversation, the last ``history``
utterances (default 6, as in the sample) as ``Therapist:``/``Client:`` lines without stage
directions, a blank line and the instruction to answer as a CBT therapist from the client's
face and body language. The field labels are kept as in the original because the counselor's
planning step (SPEC B4) parses them; the planning sample writes the technique on its own line
and the ec_planning sample on the label's line: we always use the one-line form.

Choices where the original is silent (documented, SPEC B1 "unknown"):

- the history window is the ``history`` utterances just before the therapist turn, the
  preceding client turn included; ``history=0`` leaves the conversation block out;
- the opening therapist turn (no client turn before it, so no face) gets no record;
- the CBT technique comes from a ``cbt_technique`` column (string) or ``cbt_techniques``
  (list / JSON / comma-separated; the first is used) when the table has one; MIRROR's
  ``mirror_data`` has neither, so it is derived from the plan: the one of
  ``udfs.mirror_completion.CBT_TECHNIQUES`` named first in ``cbt_plan`` (case-insensitive). A plan naming
  none is a reject for the planning types (reason names the dialogue and field).
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal

from udfs import io
from udfs.mirror_completion import CBT_TECHNIQUES
from udfs.mirror_intake import client_persona, extract_numbered_plan

__all__ = ["COT_TYPES", "CotType", "DEFAULT_HISTORY", "DialogueError", "Conversion", "question_id",
           "parse_dialogue", "personal_information", "client_gender_age", "cbt_technique", "history_lines",
           "response_prompt", "emotion_prompt", "turn_images", "dialogue_records", "convert", "resolve_image",
           # counselling sessions
           "CONTEXT_MESSAGES", "MAX_IMAGE_ATTEMPTS", "FIRST_SEED", "END_MARKER", "client_messages",
           "split_client_line", "session_history_lines", "planning_prompt", "parse_planning",
           "clean_counselor_reply", "attempt_seeds", "verified_image"]

COT_TYPES = ("base", "planning", "ec_planning")
CotType = Literal["base", "planning", "ec_planning"]
#: utterances of history before each therapist turn (the released samples show 6)
DEFAULT_HISTORY = 6

# Our own wording of SPEC B1's prompt parts (the original's sentences are not copied).
IMAGE_LINE = "The client appears in the picture above."
CONVERSATION_LINE = "Here is the recent exchange between the client and the psychotherapist."
RESPONSE_INSTRUCTION = ("Taking the client's facial expression and body language into account, give the "
                        "psychotherapist's next reply in a Cognitive Behavioral Therapy (CBT) session.")
EMOTION_INSTRUCTION = ("Study the picture and describe how the client is feeling right now, "
                       "in a few plain words.")


class DialogueError(ValueError):
    """A dialogue or one of its records cannot be converted; the message names the dialogue
    (and turn) and the field, e.g. ``dialogue 'cactus-3-x' turn 4 field 'image': ...``."""

    def __init__(self, dialogue_id: str, field_: str, problem: str, turn: int | None = None):
        where = f"dialogue {dialogue_id!r}" + (f" turn {turn}" if turn is not None else "")
        super().__init__(f"{where} field {field_!r}: {problem}")
        self.dialogue_id, self.field, self.problem, self.turn = dialogue_id, field_, problem, turn


def question_id(dialogue_id: str, turn: int, kind: Literal["response", "emotion_recognition"]) -> str:
    """``<dialogue>:<turn>:response|emotion_recognition`` (SPEC B1), ``turn`` = index of the
    therapist turn in ``proc_dialogue`` (both records of one turn share it)."""
    if kind not in ("response", "emotion_recognition"):
        raise ValueError(f"unknown record kind {kind!r}")
    return f"{dialogue_id}:{int(turn)}:{kind}"


def _text(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return " ".join(str(value).split())


def parse_dialogue(value: Any, dialogue_id: str) -> list[dict[str, str]]:
    """``proc_dialogue`` (JSON string or list of ``{speaker, stage_direction, statement}``)
    -> list of dicts with those three keys as stripped strings (speaker ``Therapist`` or
    ``Client``). Raises ``DialogueError`` for invalid JSON, a non-list, an unknown speaker or
    a turn without a statement."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise DialogueError(dialogue_id, "proc_dialogue", f"not valid JSON: {e}") from None
    if not isinstance(value, list) or not value:
        raise DialogueError(dialogue_id, "proc_dialogue", "expected a non-empty list of turns")
    turns = []
    for t, item in enumerate(value):
        if not isinstance(item, dict):
            raise DialogueError(dialogue_id, "proc_dialogue", f"turn is {type(item).__name__}, not an object", t)
        speaker = _text(item.get("speaker")).capitalize()
        if speaker not in ("Therapist", "Client"):
            raise DialogueError(dialogue_id, "proc_dialogue", f"unknown speaker {item.get('speaker')!r}", t)
        statement = _text(item.get("statement"))
        if not statement:
            raise DialogueError(dialogue_id, "proc_dialogue", "empty statement", t)
        turns.append({"speaker": speaker, "stage_direction": _text(item.get("stage_direction")),
                      "statement": statement})
    return turns


def personal_information(value: Any) -> str:
    """The ``- Personal Information:`` text: MIRROR's ``personal_info`` is a JSON object of
    the intake form's fields (``name``, ``age``, ...), rendered with ``udfs.mirror_intake.client_persona``;
    any other string is used as it is. Empty string when missing."""
    if isinstance(value, dict):
        return client_persona({str(k).lower(): v for k, v in value.items()})
    s = _text(value)
    if s.startswith("{"):
        try:
            obj = json.loads(str(value))
        except json.JSONDecodeError:
            return s
        if isinstance(obj, dict):
            return client_persona({str(k).lower(): v for k, v in obj.items()})
    return s


_AGE_GENDER = re.compile(r"\b(\d{1,3})[- ]year[- ]old\s+(male|female|man|woman)\b", re.I)


def client_gender_age(personal_info: Any) -> tuple[str | None, float | None]:
    """``(gender as written, age in years)`` of a client's ``personal_info``: a dict, a JSON
    object or a Python dict literal (MIRROR's ``mirror_data``/``mirror_test`` write the intake
    form's fields as one) with ``gender``/``age`` keys (any case), or a persona sentence
    ("... is a 34-year-old female ..."). ``None`` for what it does not give."""
    import ast

    from udfs.mirror_intake import parse_age

    value = personal_info
    if isinstance(value, str) and value.strip().startswith("{"):
        for load in (json.loads, ast.literal_eval):
            try:
                value = load(value.strip())
                break
            except (ValueError, SyntaxError, TypeError):
                continue
    if isinstance(value, dict):
        low = {str(k).strip().lower(): v for k, v in value.items()}
        gender = _text(low.get("gender")) or None
        return gender, parse_age(low.get("age"))
    m = _AGE_GENDER.search(_text(value))
    return (m.group(2).lower(), float(m.group(1))) if m else (None, None)


def _first_listed(value: Any) -> str:
    if isinstance(value, str):
        s = value.strip()
        if s.startswith("["):
            try:
                value = json.loads(s)
            except json.JSONDecodeError:
                value = s.strip("[]").replace("'", "").replace('"', "").split(",")
        else:
            value = s.split(",")
    if value is None or isinstance(value, float):
        return ""
    items = [_text(v) for v in list(value)]
    return next((v for v in items if v), "")


def cbt_technique(row: dict[str, Any]) -> tuple[str, str]:
    """``(technique, source)`` of a mirror_data row: ``cbt_technique`` (string), else the
    first of ``cbt_techniques``, else the first of ``udfs.mirror_completion.CBT_TECHNIQUES`` named in
    ``cbt_plan`` (source ``"cbt_plan"``). ``("", "")`` when none is found."""
    for col in ("cbt_technique", "cbt_techniques"):
        if col in row:
            name = _text(row[col]) if col == "cbt_technique" else _first_listed(row[col])
            if name:
                return name, col
    plan = str(row.get("cbt_plan") or "").lower()
    found = [(plan.find(t.lower()), t) for t in CBT_TECHNIQUES if t.lower() in plan]
    return (min(found)[1], "cbt_plan") if found else ("", "")


def history_lines(turns: list[dict[str, str]], upto: int, window: int) -> list[str]:
    """``Therapist: ...`` / ``Client: ...`` lines (statements only, stage directions removed)
    of the ``window`` utterances just before turn ``upto`` (``turns[max(0, upto-window):upto]``)."""
    if window < 0:
        raise ValueError(f"history window must be >= 0, got {window}")
    return [f"{t['speaker']}: {t['statement']}" for t in turns[max(0, upto - window):upto]] if window else []


def response_prompt(cot: CotType, persona: str, reason: str, history: list[str], *, emotion: str = "",
                    technique: str = "", plan: str = "", image_token: str = "<image>") -> str:
    """Human value of a response record (SPEC B1, our wording). ``planning`` adds the technique
    and plan lines after the reason; ``ec_planning`` also ``- Client Emotional State:`` after the
    personal information. Raises ``ValueError`` when a field the CoT type needs is empty."""
    if cot not in COT_TYPES:
        raise ValueError(f"unknown cot {cot!r} (choose from {', '.join(COT_TYPES)})")
    lines = [f"{image_token}\n{IMAGE_LINE}", f"- Personal Information: {persona}"]
    if cot == "ec_planning":
        if not emotion:
            raise ValueError("ec_planning needs the client's emotional state")
        lines.append(f"- Client Emotional State: {emotion}")
    lines.append(f"- Reason for Counseling: {reason}")
    if cot in ("planning", "ec_planning"):
        if not technique or not plan:
            raise ValueError(f"{cot} needs a CBT technique and a numbered plan")
        lines += [f"- CBT technique: {technique}", f"- Counseling planning:\n{plan}"]
    text = "\n".join(lines) + "\n"
    if history:
        text += f"\n{CONVERSATION_LINE}\n" + "\n".join(history) + "\n"
    return text + f"\n{RESPONSE_INSTRUCTION}"


def emotion_prompt(image_token: str = "<image>") -> str:
    """Human value of an ec_planning emotion-recognition record (SPEC B1, our wording)."""
    return f"{image_token}\n{IMAGE_LINE}\n{EMOTION_INSTRUCTION}"


def resolve_image(path: Any, base: str) -> str:
    """Absolute path or URI of an image path from the MIRROR outputs: absolute paths and
    ``scheme://`` URIs are kept, relative paths are taken relative to the MIRROR output
    folder ``base``. Empty string for a missing value."""
    p = "" if path is None or (isinstance(path, float) and math.isnan(path)) else str(path).strip()
    if not p or "://" in p or os.path.isabs(p):
        return p
    return io.join(base, p) if io.is_remote(base) else os.path.abspath(os.path.join(io.filesystem(base)[1], p))


def turn_images(row: dict[str, Any], turns: list[dict[str, str]], expressions: list[dict[str, Any]] | None,
                base: str) -> dict[int, str]:
    """Client turn index -> image path/URI for one dialogue, always keyed by turn index.

    ``expressions``: this dialogue's rows of ``expressions.parquet`` (``turn``, ``image``);
    without them the ``images`` column: a JSON object ``{"<turn index>": path}`` as
    ``jobs.mirror.export`` writes it. A JSON *list* is refused (``DialogueError``): it would pair
    images with client turns by position, the original's silent misalignment when an image is
    missing (SPEC A, step 4 ``clip.py``). Missing entries map to ``""`` (the caller rejects
    those records)."""
    did = str(row.get("idx"))
    client_turns = [t for t, x in enumerate(turns) if x["speaker"] == "Client"]
    if expressions:
        by_turn = {int(e["turn"]): resolve_image(e.get("image"), base) for e in expressions}
        return {t: by_turn.get(t, "") for t in client_turns}
    raw = row.get("images")
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as e:
            raise DialogueError(did, "images", f"not valid JSON: {e}") from None
    if raw is None or isinstance(raw, float):
        raw = {}
    if not isinstance(raw, dict):
        raise DialogueError(did, "images", "a list pairs images with client turns by position; give "
                            "expressions.parquet or a {turn index: path} object")
    try:
        by_turn = {int(k): v for k, v in raw.items()}
    except (TypeError, ValueError):
        raise DialogueError(did, "images", f"keys must be turn indices, got {sorted(raw)[:3]}") from None
    return {t: resolve_image(by_turn.get(t), base) for t in client_turns}


@dataclass
class Conversion:
    """Result of converting dialogues: ``records`` (LLaVA dicts, in dialogue and turn order),
    ``rejects`` (``{question_id, dialogue_id, turn, field, reason}``) and counts."""

    records: list[dict[str, Any]] = field(default_factory=list)
    rejects: list[dict[str, Any]] = field(default_factory=list)
    dialogues: int = 0
    dialogues_with_records: int = 0
    opening_turns_skipped: int = 0
    technique_sources: dict[str, int] = field(default_factory=dict)

    def counts(self) -> dict[str, Any]:
        """Counts for the manifest."""
        kinds: dict[str, int] = {}
        for r in self.records:
            k = r["question_id"].rsplit(":", 1)[1]
            kinds[k] = kinds.get(k, 0) + 1
        return {"dialogues": self.dialogues, "dialogues_with_records": self.dialogues_with_records,
                "records": len(self.records), "records_by_kind": kinds, "rejects": len(self.rejects),
                "opening_turns_skipped": self.opening_turns_skipped, "technique_sources": self.technique_sources}


def _reject(out: Conversion, did: str, turn: int | None, kinds: Iterable[str], field_: str, reason: str) -> None:
    for kind in kinds:
        out.rejects.append({"question_id": question_id(did, turn, kind) if turn is not None else None,
                            "dialogue_id": did, "turn": turn, "field": field_, "reason": reason})


def dialogue_records(row: dict[str, Any], cot: CotType, *, history: int = DEFAULT_HISTORY,
                     expressions: list[dict[str, Any]] | None = None, base: str = ".",
                     image_exists=None, out: Conversion | None = None) -> Conversion:
    """Records of one kept dialogue (a ``mirror_data`` row as a dict), appended to ``out``.

    One response record per therapist turn ``t >= 1`` whose turn ``t-1`` is the client's
    (the image is that client turn's face); for ``ec_planning`` an emotion-recognition record
    first. ``image_exists``: optional ``path -> bool``; a record whose image is missing (no
    path, or the check fails) is rejected with the reason, as is every record of a dialogue
    whose ``proc_dialogue``/``images`` cannot be read, or (planning types) that has no
    technique or numbered plan. Raises ``ValueError`` for an unknown ``cot``.
    """
    if cot not in COT_TYPES:
        raise ValueError(f"unknown cot {cot!r} (choose from {', '.join(COT_TYPES)})")
    out = out if out is not None else Conversion()
    out.dialogues += 1
    did = _text(row.get("idx"))
    kinds = ("emotion_recognition", "response") if cot == "ec_planning" else ("response",)
    if not did:
        _reject(out, "", None, kinds, "idx", "dialogue without an id")
        return out
    try:
        turns = parse_dialogue(row.get("proc_dialogue"), did)
        images = turn_images(row, turns, expressions, base)
    except DialogueError as e:
        _reject(out, did, None, kinds, e.field, str(e))
        return out
    persona = personal_information(row.get("personal_info"))
    reason = _text(row.get("reason_for_seeking_counseling"))
    technique, plan = "", ""
    if cot != "base":
        technique, source = cbt_technique(row)
        plan = extract_numbered_plan(row.get("cbt_plan")) or ""
        problem = None
        if not technique:
            problem = ("cbt_technique", "no CBT technique: no cbt_technique/cbt_techniques column and the plan "
                       "names none of the techniques in udfs.mirror_completion.CBT_TECHNIQUES")
        elif not plan:
            problem = ("cbt_plan", "no numbered CBT plan (no line starting with '1. ')")
        if problem:
            _reject(out, did, None, kinds, problem[0], str(DialogueError(did, *problem)))
            return out
        out.technique_sources[source] = out.technique_sources.get(source, 0) + 1
    for field_, value in (("personal_info", persona), ("reason_for_seeking_counseling", reason)):
        if not value:
            _reject(out, did, None, kinds, field_, str(DialogueError(did, field_, "empty")))
            return out
    n_before = len(out.records)
    for t, turn in enumerate(turns):
        if turn["speaker"] != "Therapist":
            continue
        if t == 0 or turns[t - 1]["speaker"] != "Client":
            out.opening_turns_skipped += t == 0
            if t:
                _reject(out, did, t, kinds, "proc_dialogue",
                        str(DialogueError(did, "proc_dialogue", "the turn before is not the client's", t)))
            continue
        image = images.get(t - 1, "")
        problem = None
        if not image:
            problem = f"no generated image for client turn {t - 1}"
        elif image_exists is not None and not image_exists(image):
            problem = f"image of client turn {t - 1} not found: {image}"
        emotion = turns[t - 1]["stage_direction"]
        if problem is None and cot == "ec_planning" and not emotion:
            _reject(out, did, t, kinds, "stage_direction", str(DialogueError(
                did, "stage_direction", f"client turn {t - 1} has no stage direction", t)))
            continue
        if problem:
            _reject(out, did, t, kinds, "image", str(DialogueError(did, "image", problem, t)))
            continue
        if cot == "ec_planning":
            out.records.append({"question_id": question_id(did, t, "emotion_recognition"), "image": image,
                                "conversations": [{"from": "human", "value": emotion_prompt()},
                                                  {"from": "gpt", "value": emotion}]})
        prompt = response_prompt(cot, persona, reason, history_lines(turns, t, history), emotion=emotion,
                                 technique=technique, plan=plan)
        out.records.append({"question_id": question_id(did, t, "response"), "image": image,
                            "conversations": [{"from": "human", "value": prompt},
                                              {"from": "gpt", "value": turn["statement"]}]})
    out.dialogues_with_records += len(out.records) > n_before
    return out


def convert(rows: Iterable[dict[str, Any]], cot: CotType, *, history: int = DEFAULT_HISTORY,
            expressions: Iterable[dict[str, Any]] | None = None, base: str = ".",
            image_exists=None) -> Conversion:
    """All records of ``rows`` (kept ``mirror_data`` rows). ``expressions``: rows of
    ``expressions.parquet`` (grouped here by ``dialogue_id``). Duplicate dialogue ids are
    rejected after the first. See ``dialogue_records``."""
    by_dialogue: dict[str, list[dict[str, Any]]] = {}
    for e in expressions or ():
        by_dialogue.setdefault(str(e.get("dialogue_id")), []).append(e)
    out, seen = Conversion(), set()
    for row in rows:
        did = _text(row.get("idx"))
        if did and did in seen:
            out.dialogues += 1
            _reject(out, did, None, ("response",), "idx", str(DialogueError(did, "idx", "duplicate dialogue id")))
            continue
        seen.add(did)
        dialogue_records(row, cot, history=history, expressions=by_dialogue.get(did), base=base,
                         image_exists=image_exists, out=out)
    return out



# ====================================================================== counselling sessions (SPEC B3/B4)
# Pure helpers of ``jobs.mirror_llava.infer`` (issue 10 part 4): the simulated client's prompt,
# the client line parser, the counselor's planning step and reply clean-up, and the image retry
# loop. Wording is ours; the structure follows SPEC B3 (client.py, prompts/agent_client.txt,
# image_gen.py, therapy.py) and B4 (vlm.py).

#: messages of context the client and the counselor see (SPEC B3: ``ctx_len=16``)
CONTEXT_MESSAGES = 16
#: image attempts per client turn (SPEC B3 step 2: at most 10)
MAX_IMAGE_ATTEMPTS = 10
#: first generation seed of every client turn (SPEC B3 step 2: seed 19)
FIRST_SEED = 19
#: the client's end marker (SPEC B3 step 3)
END_MARKER = "[/END]"

CLIENT_SYSTEM = """\
You are playing a client in a first session of cognitive behavioural therapy.
- Personal information: {persona}
- Your personality during counselling: {personality}
- A thought that troubles you: {thought}
- Why you came: {reason}

Reply as the client only, on one line: "Client: [what your face and body do] what you say".
Stay in character and show the resistance your personality implies: partial agreement, \
hesitation or push-back where it fits. Do not repeat what you already said. Only when your \
negative thoughts feel resolved and you need no further counselling, end your line with {end}."""

CLIENT_OPENING = ("The counsellor has just greeted you and the session begins. Reply only with your "
                  "non-verbal reaction in square brackets, for example \"Client: [looks down at the floor]\"; "
                  "say nothing yet.")

PLANNING_INSTRUCTION = ("As a CBT counsellor, choose the one technique from this list that fits the client best: "
                        "{techniques}. Then write a short numbered plan for this session. Answer in exactly this "
                        "format:\nCBT technique: <technique>\nCounseling planning:\n1. <step>\n2. <step>")

_BRACKET = re.compile(r"\[([^\[\]]*)\]")
_CLIENT_PREFIX = re.compile(r"^\s*(?:\*\*)?client(?:\*\*)?\s*:\s*", re.I)
_COUNSELOR_LABEL = re.compile(r"(?:therapist|counsel+or)\s*:", re.I)


def client_messages(client: dict[str, Any], history: list[dict[str, Any]], *,
                    context: int = CONTEXT_MESSAGES) -> list[dict[str, str]]:
    """Chat messages for the simulated client's next line (SPEC B3 step 1).

    ``client``: the session row (``personal_info``, ``personality``, ``distorted_thought``,
    ``reason_for_seeking_counseling``); ``history``: the session's turns so far
    (``{"role": "Client"|"Counselor", "content"}``), of which the last ``context`` are shown,
    the counsellor's as ``user`` and the client's own as ``assistant`` messages. With no
    history the client is asked for a non-verbal reaction only (turn 0)."""
    system = CLIENT_SYSTEM.format(persona=personal_information(client.get("personal_info")) or "(not given)",
                                  personality=_text(client.get("personality")) or "(not given)",
                                  thought=_text(client.get("distorted_thought")) or "(not given)",
                                  reason=_text(client.get("reason_for_seeking_counseling")) or "(not given)",
                                  end=END_MARKER)
    msgs = [{"role": "system", "content": system}]
    if not history:
        return msgs + [{"role": "user", "content": CLIENT_OPENING}]
    shown = history[-context:] if context else []
    if shown and shown[0]["role"] == "Client":  # chat templates want a user message first
        msgs.append({"role": "user", "content": "(The session continues.)"})
    for turn in shown:
        msgs.append({"role": "assistant" if turn["role"] == "Client" else "user", "content": turn["content"]})
    if msgs[-1]["role"] == "assistant":
        msgs.append({"role": "user", "content": "(Go on.)"})
    return msgs


def split_client_line(text: Any, *, nonverbal_only: bool = False) -> dict[str, Any]:
    """The simulated client's reply -> ``{content, stage_direction, statement, end}``.

    ``content`` is ``[direction] statement`` without the ``Client:`` label; ``stage_direction``
    the first bracketed text that is not the end marker (the original indexed ``[0]`` and raised
    when there was none, SPEC B6.7: here it is ``""``); ``statement`` the text with every
    bracket removed (what the counsellor hears, SPEC B3 step 4); ``end`` whether the end marker
    (or a bare ``END`` token, as the original's check) occurs. ``nonverbal_only`` (turn 0):
    the statement is dropped, and a reply without brackets becomes its own direction."""
    raw = " ".join(str(text or "").split())
    raw = _CLIENT_PREFIX.sub("", raw.splitlines()[0] if raw else "")
    end = END_MARKER in raw or re.search(r"\bEND\b", raw) is not None
    body = raw.replace(END_MARKER, "").strip()
    directions = [d.strip() for d in _BRACKET.findall(body) if d.strip() and d.strip().upper() != "/END"]
    direction = directions[0] if directions else ""
    statement = " ".join(_BRACKET.sub(" ", body).split())
    if nonverbal_only:
        direction = direction or statement[:200]
        return {"content": f"[{direction}]" if direction else "", "stage_direction": direction, "statement": "",
                "end": False}
    content = (f"[{direction}] {statement}" if direction else statement).strip()
    if end:
        content = f"{content} {END_MARKER}".strip()
    return {"content": content, "stage_direction": direction, "statement": statement, "end": end}


def session_history_lines(history: list[dict[str, Any]], context: int = CONTEXT_MESSAGES) -> list[str]:
    """``Therapist:``/``Client:`` lines (statements only) of the last ``context`` session turns,
    as the training prompts' conversation block (``history_lines``); turns with an empty
    statement (the non-verbal opening) are left out."""
    turns = [{"speaker": "Client" if t["role"] == "Client" else "Therapist", "statement": t.get("statement", "")
              if t["role"] == "Client" else t["content"]} for t in history[-context:] if context]
    return history_lines([t for t in turns if t["statement"]], len(turns), len(turns))


def planning_prompt(persona: str, reason: str, history: list[str], *, emotion: str = "",
                    image_token: str = "<image>") -> str:
    """The counsellor's planning request (SPEC B4, our wording): the client's information (and,
    for ``ec_planning``, the recognised emotional state), the conversation so far and the
    instruction to pick one of the twelve ``CBT_TECHNIQUES`` and write a numbered plan."""
    lines = [f"{image_token}\n{IMAGE_LINE}", f"- Personal Information: {persona}"]
    if emotion:
        lines.append(f"- Client Emotional State: {emotion}")
    lines.append(f"- Reason for Counseling: {reason}")
    text = "\n".join(lines) + "\n"
    if history:
        text += f"\n{CONVERSATION_LINE}\n" + "\n".join(history) + "\n"
    return text + "\n" + PLANNING_INSTRUCTION.format(techniques=", ".join(CBT_TECHNIQUES))


def parse_planning(reply: Any, thought: str = "") -> dict[str, str]:
    """The planning reply -> ``{technique, plan, source}``: the technique is the first of
    ``CBT_TECHNIQUES`` named after ``CBT technique:`` (else anywhere in the reply), the plan the
    numbered list (``udfs.mirror_intake.extract_numbered_plan``). What the reply lacks is filled from
    ``udfs.mirror_completion.FALLBACK_TECHNIQUE`` / ``template_plan`` and ``source`` says so (``reply``,
    ``reply+template_plan``, ``fallback``), so a meaningless reply is visible in the output."""
    from udfs.mirror_completion import FALLBACK_TECHNIQUE, template_plan

    text = str(reply or "")
    low = text.lower()
    head = low.split("cbt technique:", 1)[1][:200] if "cbt technique:" in low else low
    found = sorted((head.find(t.lower()), t) for t in CBT_TECHNIQUES if t.lower() in head)
    technique = found[0][1] if found else ""
    plan = extract_numbered_plan(text.split("Counseling planning:", 1)[-1]) or ""
    source = "reply" if technique and plan else "reply+template_plan" if technique else "fallback"
    technique = technique or FALLBACK_TECHNIQUE
    return {"technique": technique, "plan": plan if plan and source == "reply" else
            template_plan(technique, thought or None), "source": source}


def clean_counselor_reply(text: Any) -> str:
    """The counsellor's reply as the original post-processed it (SPEC B4): the text after the
    last ``Therapist:``/``Counselor:`` label, cut at ``Client:``, newlines and quotes removed."""
    s = str(text or "")
    labels = list(_COUNSELOR_LABEL.finditer(s))
    if labels:
        s = s[labels[-1].end():]
    s = re.split(r"client\s*:", s, maxsplit=1, flags=re.I)[0]
    return " ".join(s.replace('"', " ").split()).strip()


def attempt_seeds(key: str, n: int = MAX_IMAGE_ATTEMPTS, first: int = FIRST_SEED) -> list[int]:
    """``n`` distinct generation seeds for one client turn: ``first`` (SPEC B3: 19), then
    seeds derived from ``key`` (session and turn) by SHA-256. The original drew each retry from
    {42, 19, 24, 18}, so it could repeat a seed and would have had only 4 distinct images."""
    import hashlib

    seeds, k = [int(first)], 0
    while len(seeds) < n:
        s = int.from_bytes(hashlib.sha256(f"{key}:{k}".encode()).digest()[:6], "big")
        k += 1
        if s not in seeds:
            seeds.append(s)
    return seeds[:n]


def verified_image(generate, verify, seeds: list[int]) -> dict[str, Any]:
    """The image retry loop of one client turn (SPEC B3 step 2, fixing B6.2: the original's
    check was always truthy, so it never retried).

    ``generate(seed) -> dict`` with at least ``image`` (bytes); ``verify(image: bytes, gen: dict)
    -> dict`` with ``accepted`` (bool) and whatever scores it has. One attempt per seed until one
    is accepted; the last image is kept when none is (as the original). Returns ``{image, gen,
    seed, accepted, attempts: [{attempt, seed, accepted, report}]}``. Exceptions propagate."""
    if not seeds:
        raise ValueError("verified_image needs at least one seed")
    attempts: list[dict[str, Any]] = []
    gen: dict[str, Any] = {}
    for k, seed in enumerate(seeds):
        gen = generate(seed)
        report = verify(gen["image"], gen)
        ok = bool(report.get("accepted"))
        attempts.append({"attempt": k + 1, "seed": seed, "accepted": ok, "report": report})
        if ok:
            break
    return {"image": gen["image"], "gen": gen, "seed": attempts[-1]["seed"], "accepted": attempts[-1]["accepted"],
            "attempts": attempts}
