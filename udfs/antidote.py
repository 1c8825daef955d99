"""Antidote data synthesis: schemas, prompt builders, rule checks, the factual filter and the
query templates (pure functions; no Ray, no model).

Source of every rule, threshold and field: Antidote (Wu et al., CVPR 2025, arXiv 2504.20468),
``Wu0409/Antidote@2b6aa0e: data_pipeline/*`` as summarised in SPEC.md part C. Prompts are
written in our own words from those descriptions.

Stage functions take a batch ``dict[str, np.ndarray]`` of ok rows (list cells are Python
lists) and ``params``, and return a dict of the columns they declare (see ``jobs/antidote.py``).
Filters may add ``rows.ROW_REJECT`` (one reason or ``None`` per row).
"""
from __future__ import annotations

import json
import random
import re
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from udfs import rows as R
from udfs.images import image_file_name
from udfs.phrases import object_key
from udfs.prompt_weights import weighted_objects

# ----------------------------------------------------------------------------- schemas

ObjectName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z][A-Za-z '\-]{0,31}$")]
_W = r"\([A-Za-z][A-Za-z '\-]{0,31}:[0-9](\.[0-9]{1,2})?\)"
# Lengths are bounded inside the patterns: xgrammar ignores maxLength next to a pattern
# (measured: "pattern combined with minLength/maxLength is not supported"), and an unbounded
# pattern lets a small model ramble until max_tokens.
#: a caption with 1-8 (object:weight) groups and no other parentheses (rule 5's format)
WEIGHTED_PROMPT = rf"^[^()]{{0,120}}({_W}[^()]{{0,80}}){{1,8}}$"
#: a comma-separated list of 1-6 (object:weight) items (rule 6's format)
WEIGHTED_LIST = rf"^{_W}(, ?{_W}){{0,5}}$"


class CaptionParse(BaseModel):
    """Step 1-1 output (SPEC C1): the README's JSON keys, ``no-exist`` kept as the wire name."""

    model_config = ConfigDict(populate_by_name=True)

    caption: str = Field(max_length=200, description="Caption rewritten for Stable Diffusion, no proper names")
    present: list[ObjectName] = Field(min_length=1, max_length=6,
                                      description="Concrete objects explicitly present")
    no_exist: list[ObjectName] = Field(alias="no-exist", min_length=1, max_length=6,
                                       description="Concrete objects absent but plausible in the scene")
    prompt: str = Field(max_length=400, pattern=WEIGHTED_PROMPT,
                        description="Caption with (object:weight) for every present object")
    prompt_neg: str = Field(max_length=300, pattern=WEIGHTED_LIST,
                            description="Comma list of (object:weight), one per no-exist object")


class RuleVerdict(BaseModel):
    """Step 1-2 / 3-1-2 judge reply: ``pass`` or ``reject`` with the violated rule number."""

    verdict: str = Field(pattern=r"^(pass|reject)$")
    violated_rule: int | None = Field(None, ge=1, le=9)


class QuestionPair(BaseModel):
    """Step 3-1-1 output (SPEC C6): the counterfactual (CPQ) and the true-premise (TPQ) question."""

    hall_question: str = Field(max_length=200, description="CPQ: presupposes the most plausible no-exist object")
    hall_object: ObjectName
    truth_question: str = Field(max_length=200, description="TPQ: about the main present subject")
    truth_object: ObjectName


class FixedQuestion(BaseModel):
    """Step 3-2-2 output: the POPE question with only its grammar corrected."""

    question: str = Field(max_length=120)


# ----------------------------------------------------------------------------- ingest

def word_count(text: str) -> int:
    """Number of whitespace-separated words."""
    return len(text.split())


# ----------------------------------------------------------------------------- 1-1 parsing

PARSE_INSTRUCTIONS = """\
Turn the image caption below into one JSON object for building a text-to-image prompt and \
hallucination probes. Keys:
- "caption": the caption rewritten as a Stable Diffusion prompt; drop names of people, places and brands.
- "present": concrete, visible objects the caption explicitly mentions (skip anything negated).
- "no-exist": concrete objects the caption does not mention but that often appear in such a \
scene; never a synonym, part or kind of a present object; no colours, seasons, actions or ideas.
- "prompt": the caption with every present object written once as (object:weight), weight 1.0-1.5 \
by importance; do not repeat the object word outside the parentheses.
- "prompt_neg": a comma-separated list with one (object:weight) per no-exist object.
Both lists hold at least one item. English only. Answer with the JSON object only.

Example caption: a cat sleeping on a sofa next to a window
Example answer: {"caption": "a cat sleeping on a sofa next to a window", "present": ["cat", "sofa", \
"window"], "no-exist": ["dog", "cushion"], "prompt": "a (cat:1.3) sleeping on a (sofa:1.2) next to \
a (window:1.1)", "prompt_neg": "(dog:1.2), (cushion:1.1)"}
"""


def _messages(system: str, user: str) -> str:
    return json.dumps([{"role": "system", "content": system}, {"role": "user", "content": user}])


def parse_prompts(batch: dict, params: Any) -> dict:
    """Build the step 1-1 chat messages (JSON string per row) from ``caption``."""
    batch["messages"] = [
        _messages("You are a helpful assistant.", f"{PARSE_INSTRUCTIONS}\nCaption: {c}")
        for c in batch["caption"]]
    return batch


def _norm(name: str) -> tuple[str, ...]:
    return object_key(name)


def mentions(text: str, name: str) -> bool:
    """True when every word of the object ``name`` occurs in ``text`` (plural-insensitive)."""
    words = set(object_key(" ".join(re.findall(r"[A-Za-z']+", text))))
    return bool(object_key(name)) and all(w in words for w in object_key(name))


def rule_violations(item: dict) -> list[str]:
    """Deterministic versions of the step 1-2 rules (SPEC C2 rules 5 and 6, plus list checks).

    ``item`` has ``present``, ``no_exist`` (lists of str), ``prompt``, ``prompt_neg`` (str).
    Returns human-readable violations (empty when all hold):
    every present object is embedded as ``(object:weight)`` in ``prompt`` (rule 5), the word is
    not repeated right before its weighted form (rule 5), ``prompt_neg`` has exactly
    ``len(no_exist)`` weighted items (rule 6), and ``present``/``no_exist`` do not overlap
    (rule 2, singular/plural folded).
    """
    out = []
    present, no_exist = list(item["present"]), list(item["no_exist"])
    weighted = {_norm(o) for o, _ in weighted_objects(item["prompt"])}
    missing = [o for o in present if _norm(o) not in weighted]
    if missing:
        out.append(f"rule 5: present objects not weighted in prompt: {missing}")
    for o in present:
        if re.search(rf"\b{re.escape(o)}\s*\(\s*{re.escape(o)}\s*:", item["prompt"], re.I):
            out.append(f"rule 5: object word repeated before its weight: {o!r}")
    neg = weighted_objects(item["prompt_neg"])
    if len(neg) != len(no_exist):
        out.append(f"rule 6: prompt_neg has {len(neg)} weighted objects, no-exist has {len(no_exist)}")
    overlap = sorted({_norm(o) for o in present} & {_norm(o) for o in no_exist})
    if overlap:
        out.append(f"rule 2: objects both present and no-exist: {overlap}")
    return out


def caption_fields(batch: dict, params: Any, audit: bool = False) -> dict:
    """Copy the validated 1-1 JSON into columns and reject items breaking the deterministic rules.

    Outputs ``caption_rewritten``, ``present``, ``no_exist``, ``prompt_weighted``, ``prompt_neg``,
    ``precheck`` (violations, "" when none). Reject reason: ``precheck: <violations>``.
    """
    n = len(batch["id"])
    cols = {k: [None] * n for k in ("caption_rewritten", "present", "no_exist", "prompt_weighted",
                                    "prompt_neg", "precheck")}
    reject: list[str | None] = [None] * n
    for i, raw in enumerate(batch["caption_parse_parsed"]):
        obj = CaptionParse.model_validate_json(raw)
        item = {"present": obj.present, "no_exist": obj.no_exist, "prompt": obj.prompt,
                "prompt_neg": obj.prompt_neg}
        bad = rule_violations(item)
        cols["caption_rewritten"][i] = obj.caption
        cols["present"][i] = list(obj.present)
        cols["no_exist"][i] = list(obj.no_exist)
        cols["prompt_weighted"][i] = obj.prompt
        cols["prompt_neg"][i] = obj.prompt_neg
        cols["precheck"][i] = "; ".join(bad)
        if bad:
            reject[i] = "precheck: " + "; ".join(bad)
    return {**cols, R.ROW_REJECT: reject}


# ----------------------------------------------------------------------------- 1-2 judge

JUDGE_RULES = """\
Check the annotation below against these rules and report the first one it breaks.
1. "present" lists only concrete objects that the caption explicitly shows.
2. "no-exist" contains no synonym, part or subtype of a "present" object.
3. Every "no-exist" object is missing from the caption yet would be plausible in that scene.
4. The caption mentions at least one concrete (not abstract) object.
5. "prompt" embeds each present object as (object:weight) without repeating the word.
6. "prompt_neg" has exactly as many (object:weight) items as "no-exist" has objects.
For instance, "no-exist": ["kitten"] with "present": ["cat"] breaks rule 2, and a "prompt_neg" \
with three items for two no-exist objects breaks rule 6.
Answer with JSON only: {"verdict": "pass"} or {"verdict": "reject", "violated_rule": N}.
"""


def judge_prompts(batch: dict, params: Any) -> dict:
    """Step 1-2 judge messages from the parsed item."""
    msgs = []
    for i in range(len(batch["id"])):
        item = {"caption": batch["caption_rewritten"][i], "present": list(batch["present"][i]),
                "no-exist": list(batch["no_exist"][i]), "prompt": batch["prompt_weighted"][i],
                "prompt_neg": batch["prompt_neg"][i]}
        msgs.append(_messages("You are a precise and strict rule checker.",
                              f"{JUDGE_RULES}\nAnnotation: {json.dumps(item)}"))
    return {"messages": msgs}


def verdicts(column: str, label: str):
    """A filter stage reading a ``RuleVerdict`` JSON column: rows whose verdict is ``reject`` are
    rejected with ``<label>: violates rule N``. Outputs ``<label>_verdict``."""

    def fn(batch: dict, params: Any, audit: bool = False) -> dict:
        out, reject = [], []
        for raw in batch[column]:
            v = RuleVerdict.model_validate_json(raw)
            out.append(v.verdict if v.verdict == "pass" else f"reject:{v.violated_rule}")
            reject.append(None if v.verdict == "pass" else
                          f"{label}: judge says it violates rule {v.violated_rule or '?'}")
        return {f"{label}_verdict": out, R.ROW_REJECT: reject}

    fn.__name__ = f"{label}_verdicts"
    return fn


# ----------------------------------------------------------------------------- 2-3 factual filter

def factual_filter(batch: dict, params: Any, audit: bool = False) -> dict:
    """Step 2-3 (SPEC C5): keep the present objects Grounding DINO detected and the no-exist
    objects it did not detect; reject the row when either list becomes empty.

    Inputs ``present``, ``no_exist``, ``present_detected``, ``no_exist_detected`` (lists of the
    requested names the detector matched). Outputs ``present_verified``/``no_exist_verified``
    (what the filter keeps) and ``present_final``/``no_exist_final`` (what later stages use:
    the verified lists, or the unfiltered ones in audit mode, where the detector's evidence is
    not meaningful).
    """
    n = len(batch["id"])
    pv, nv, pf, nf, reject = [], [], [], [], [None] * n
    for i in range(n):
        present, no_exist = list(batch["present"][i]), list(batch["no_exist"][i])
        det_p, det_n = set(batch["present_detected"][i] or []), set(batch["no_exist_detected"][i] or [])
        keep_p = [o for o in present if o in det_p]
        keep_n = [o for o in no_exist if o not in det_n]
        pv.append(keep_p)
        nv.append(keep_n)
        pf.append(present if audit else keep_p)
        nf.append(no_exist if audit else keep_n)
        why = []
        if not keep_p:
            why.append(f"no present object detected (of {present})")
        if not keep_n:
            why.append(f"every no-exist object was detected ({no_exist})")
        if why:
            reject[i] = "factual: " + "; ".join(why)
    return {"present_verified": pv, "no_exist_verified": nv, "present_final": pf,
            "no_exist_final": nf, R.ROW_REJECT: reject}


# ----------------------------------------------------------------------------- 3-3 description queries

DESCRIBE_QUESTIONS = (
    "Describe this image in detail.",
    "Give a detailed description of what the picture shows.",
    "What is happening in this image? Please describe it thoroughly.",
    "Provide a thorough account of the contents of this image.",
    "Explain in detail everything you can see in the picture.",
    "Write a detailed description of the scene in this photo.",
    "Describe the image carefully, covering the objects and their arrangement.",
    "Tell me in detail what this image contains.",
)
"""Eight paraphrases of "describe the image in detail" (SPEC C8), our wording."""


def image_rel_path(row_id: str) -> str:
    """Image path of a row relative to the output folder: ``images/`` + the name the
    image stage wrote (``udfs.images.image_file_name``: ``<id>.png`` for file-safe ids)."""
    return f"images/{image_file_name(row_id)}"


def desc_queries(batch: dict, params: Any) -> dict:
    """Step 3-3: ``desc_text`` (one paraphrase chosen with a seed derived from the row id) and
    ``desc_hint`` (caption, visible and invisible objects, then the question)."""
    texts, hints = [], []
    for i, rid in enumerate(batch["id"]):
        q = random.Random(R.seed_from_id(str(rid), "desc")).choice(DESCRIBE_QUESTIONS)
        vis = ", ".join(batch["present_final"][i])
        invis = ", ".join(batch["no_exist_final"][i])
        texts.append(q)
        hints.append(f"Hint: the image matches the caption \"{batch['caption_rewritten'][i]}\". "
                     f"Objects that are visible: {vis}. Objects that are not in the image: {invis}. "
                     f"Question: {q}")
    return {"desc_text": texts, "desc_hint": hints}


# ----------------------------------------------------------------------------- 3-1 CPQ / TPQ

QUESTION_INSTRUCTIONS = """\
You write two questions about an image described by a caption.
1. "hall_question": a question that takes for granted that the object "hall_object" is in the \
image, although it is not; pick the most plausible object from the absent list.
2. "truth_question": a question about the main subject "truth_object", taken from the present list.
Avoid common-sense questions, and avoid asking where, how many or whether something is there \
unless nothing else works. Each object word must appear in its question.
Example: caption "a man riding a horse on a beach", present ["man", "horse", "beach"], absent \
["saddle", "dog"] -> {"hall_question": "What color is the saddle on the horse?", "hall_object": \
"saddle", "truth_question": "What is the man doing with the horse?", "truth_object": "horse"}
Answer with the JSON object only.
"""


def question_prompts(batch: dict, params: Any) -> dict:
    """Step 3-1-1 messages: caption, present/absent lists, and up to 3 earlier CPQs of similar
    captions from the memory bank (``avoid_questions``) to steer away from."""
    msgs = []
    for i in range(len(batch["id"])):
        avoid = list(batch["avoid_questions"][i] or [])
        extra = ("\nDo not write questions resembling these: " + json.dumps(avoid)) if avoid else ""
        user = (f"{QUESTION_INSTRUCTIONS}\nCaption: {batch['caption_rewritten'][i]}\n"
                f"Present: {json.dumps(list(batch['present_final'][i]))}\n"
                f"Absent: {json.dumps(list(batch['no_exist_final'][i]))}{extra}")
        msgs.append(_messages("You are a helpful assistant.", user))
    return {"messages": msgs}


def question_fields(batch: dict, params: Any) -> dict:
    """Copy the validated 3-1-1 JSON into the columns ``hall_question``, ``hall_object``,
    ``truth_question``, ``truth_object`` (rejects nothing: the original kept every parsed pair)."""
    n = len(batch["id"])
    cols = {k: [None] * n for k in ("hall_question", "hall_object", "truth_question", "truth_object")}
    for i, raw in enumerate(batch["cpq_generate_parsed"]):
        q = QuestionPair.model_validate_json(raw)
        for k in cols:
            cols[k][i] = getattr(q, k)
    return cols


def cpq_object_words(batch: dict, params: Any, audit: bool = False) -> dict:
    """Extra filter (not in the original): reject a pair whose object word is missing from its
    question. 3-1-1's prompt asks for the word in the question (SPEC C6), but the original
    never checked it. Output ``object_words_missing`` ("" or the questions that lack their
    word, comma-separated); reject reason ``cpq_object_words: object word missing from …``."""
    missing, reject = [], []
    for i in range(len(batch["id"])):
        miss = [k for k, o in (("hall_question", "hall_object"), ("truth_question", "truth_object"))
                if not mentions(batch[k][i], batch[o][i])]
        missing.append(", ".join(miss))
        reject.append(f"cpq_object_words: object word missing from {', '.join(miss)}" if miss else None)
    return {"object_words_missing": missing, R.ROW_REJECT: reject}


#: the original's rule 4 (SPEC C6: "CPQ is a yes/no question (Is/Does/Are/Do…)"): forms of be and do
YES_NO_START = re.compile(r"^\s*(is|are|was|were|does|do|did)\b", re.I)
#: questions starting with a modal or a form of have: yes/no questions too, but not named by the
#: original's rule 4; banned only by the extra ``cpq_modal_questions`` filter
MODAL_START = re.compile(r"^\s*(can|could|will|would|should|has|have|had)\b", re.I)
HALL_OBJECT_BANNED = ("music", "sound", "noise", "season", "feeling", "emotion", "reaction",
                      "spring", "summer", "autumn", "fall", "winter")


def cpq_precheck(batch: dict, params: Any, audit: bool = False) -> dict:
    """Deterministic 3-1-2 rules (SPEC C6) applied before the judge: the CPQ must not start with
    "How many", must not be a yes/no question starting with a form of be or do (rule 4's
    Is/Does/Are/Do…), and its object must not be a sound, season, feeling or reaction.
    Output ``cpq_precheck`` ("" when fine)."""
    out, reject = [], []
    for q, obj in zip(batch["hall_question"], batch["hall_object"]):
        bad = []
        if re.match(r"^\s*how\s+many\b", q, re.I):
            bad.append("rule 3: CPQ starts with 'How many'")
        if YES_NO_START.match(q):
            bad.append("rule 4: CPQ is a yes/no question")
        if any(w in obj.lower().split() for w in HALL_OBJECT_BANNED):
            bad.append(f"rule 1: hall_object {obj!r} is a sound/season/feeling/reaction")
        out.append("; ".join(bad))
        reject.append(("cpq_precheck: " + "; ".join(bad)) if bad else None)
    return {"cpq_precheck": out, R.ROW_REJECT: reject}


def cpq_modal_questions(batch: dict, params: Any, audit: bool = False) -> dict:
    """Extra filter (not in the original): reject a CPQ that starts with can, could, will, would,
    should, has, have or had (``MODAL_START``). The original's rule 4 names Is/Does/Are/Do…
    and leaves the rest to its LLM judge. Output ``cpq_modal_start`` (the lower-cased first
    word when it matches, else "")."""
    starts, reject = [], []
    for q in batch["hall_question"]:
        m = MODAL_START.match(q)
        starts.append(m.group(1).lower() if m else "")
        reject.append(f"cpq_modal_questions: CPQ starts with {m.group(1)!r}" if m else None)
    return {"cpq_modal_start": starts, R.ROW_REJECT: reject}


CPQ_RULES = """\
Check the question pair below and report the first rule it breaks.
1. "hall_object" is music, a sound, a season, a feeling or a reaction.
2. "hall_question" is unrealistic, e.g. an inanimate object performing an action.
3. "hall_question" starts with "How many" (the truth question may).
4. "hall_question" is a yes/no question (starting with Is, Are, Does, Do and the like).
Answer with JSON only: {"verdict": "pass"} or {"verdict": "reject", "violated_rule": N}.
"""


def cpq_judge_prompts(batch: dict, params: Any) -> dict:
    """Step 3-1-2 judge messages."""
    msgs = []
    for i in range(len(batch["id"])):
        pair = {k: batch[k][i] for k in ("hall_question", "hall_object", "truth_question", "truth_object")}
        msgs.append(_messages("You are a precise and strict rule checker.",
                              f"{CPQ_RULES}\nQuestion pair: {json.dumps(pair)}"))
    return {"messages": msgs}


def cpq_hint(hall_object: str, question: str) -> str:
    """Step 3-1-3 CPQ hint: the object is absent; say the question cannot be answered and why."""
    return (f"Hint: there is no {hall_object} in the image. If the question assumes it, say that "
            f"you cannot answer and briefly explain why. Question: {question.strip().lower()}")


def tpq_hint(truth_object: str, question: str) -> str:
    """Step 3-1-3 TPQ hint. Deliberately false (the object *is* present): it elicits the
    rejected answer of a preference pair (SPEC C6/C9)."""
    return cpq_hint(truth_object, question)


# ----------------------------------------------------------------------------- 3-2 POPE

def pope_template(obj: str) -> str:
    """Step 3-2-1 template (SPEC C7)."""
    return f"Is there a {obj} in the image?"


def pope_prompts(batch: dict, params: Any) -> dict:
    """Step 3-2-2 messages: fix only the grammar of the templated POPE question."""
    msgs = []
    for obj in batch["truth_object"]:
        q = pope_template(obj)
        user = ("Correct only the grammar of this yes/no question (for example singular versus "
                "plural: 'Is there a shoes' becomes 'Are there shoes'); keep its meaning and the "
                f"object word. Answer with JSON only: {{\"question\": \"...\"}}\nQuestion: {q}")
        msgs.append(_messages("You fix English grammar.", user))
    return {"messages": msgs}


def pope_fields(batch: dict, params: Any) -> dict:
    """Take the corrected POPE question when it still asks a yes/no question about the object;
    otherwise keep the template (``pope_fixed`` False) — a fix must never change the probe."""
    qs, fixed = [], []
    for obj, raw in zip(batch["truth_object"], batch["pope_fix_parsed"]):
        cand = FixedQuestion.model_validate_json(raw).question.strip() if raw else ""
        ok = bool(cand) and mentions(cand, obj) and re.match(r"^\s*(is|are)\s+there\b", cand, re.I) \
            and cand.endswith("?")
        qs.append(cand if ok else pope_template(obj))
        fixed.append(bool(ok))
    return {"pope_question": qs, "pope_fixed": fixed}


def pope_hint(obj: str, question: str) -> str:
    """Step 3-2-3 POPE hint; deliberately false (the object is present), as in the original."""
    return f"Hint: There is no {obj} in the image. Question: {question}"


# ----------------------------------------------------------------------------- records

def query_record(row_id: str, text: str, hint: str) -> dict:
    """One query line (original fields ``image``, ``text``, ``text_hint`` plus ``id``)."""
    return {"id": row_id, "image": image_rel_path(row_id), "text": text, "text_hint": hint}


# ----------------------------------------------------------------------------- the original's step files

def _unique(items: Any) -> list:
    return list(dict.fromkeys(items or []))


def caption_item(row: dict, final: bool = False) -> dict | None:
    """A caption item in the original's schema (SPEC C1/C2; C5 with ``final``): ``caption``
    (the rewritten caption), ``present``, ``no-exist``, ``prompt`` (weighted), ``prompt_neg``.
    Without ``final``: step 1-1's lists and ``id`` (the row id) appended; with ``final``: the
    lists after the factual filter (``present_final``/``no_exist_final``) and ``idx`` = the row
    id (the original's ``idx`` named the image ``{idx}.jpg``; ours is ``images/<id>.png``).
    ``None`` when the row has no parsed item."""
    if row.get("caption_rewritten") is None:
        return None
    present, no_exist = (row.get("present_final"), row.get("no_exist_final")) if final else \
        (row.get("present"), row.get("no_exist"))
    if present is None or no_exist is None:
        return None
    item = {"caption": row["caption_rewritten"], "present": list(present), "no-exist": list(no_exist),
            "prompt": row["prompt_weighted"], "prompt_neg": row["prompt_neg"]}
    item["idx" if final else "id"] = row["id"]
    return item


def grounding_item(row: dict) -> dict | None:
    """Step 2-2's line (SPEC C4): ``idx`` (row id) and the unique detected ``present`` /
    ``no-exist`` names (ours: the requested names the detector matched); ``None`` when the row
    has no detection."""
    if row.get("present_detected") is None and row.get("no_exist_detected") is None:
        return None
    return {"idx": row["id"], "present": _unique(row.get("present_detected")),
            "no-exist": _unique(row.get("no_exist_detected"))}


def question_pair_item(row: dict) -> dict | None:
    """Step 3-1-1/3-1-2's item (SPEC C6): ``hall_question``, ``hall_object``, ``truth_question``,
    ``truth_object``, ``idx`` (row id); ``None`` when the row has no question pair."""
    if row.get("hall_question") is None:
        return None
    return {**{k: row[k] for k in ("hall_question", "hall_object", "truth_question", "truth_object")},
            "idx": row["id"]}


def pope_item(row: dict, fixed: bool = False) -> dict | None:
    """Step 3-2-1's item (SPEC C7: the template question) or, with ``fixed``, 3-2-2's (the
    grammar-fixed question): ``truth_question``, ``truth_object``, ``idx`` (row id)."""
    if row.get("truth_object") is None or (fixed and not row.get("pope_question")):
        return None
    q = row["pope_question"] if fixed else pope_template(row["truth_object"])
    return {"truth_question": q, "truth_object": row["truth_object"], "idx": row["id"]}
