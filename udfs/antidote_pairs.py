"""Antidote downstream (SPEC C9): response sampling prompts, preference pairing, the DPO export
formats, and the evaluation rules. Pure functions: no Ray, no model.

Source of every rule: the original's ``inference/1_infer.py`` (the target VLM answers each query
twice, with ``text`` and with ``text_hint``, temperature 0, seed 0, one user turn holding the
image then the question, no system message) and ``inference/2_preference_curation.py`` (cosine of
the two answers' bge-m3 embeddings; a pair whose cosine is **> 0.9** is dropped as having no
contrast; mode ``answer`` for TPQ and POPE, ``answer_hint`` for CPQ and desc; output
``{"query": "<image>\\n" + question, "response", "rejected_response", "images": [path]}``)
[Wu0409/Antidote@2b6aa0e; SPEC C9]. Output formats checked against the tools' documentation:

- ms-swift: "Query-Response format" ``{"query", "response", ...}`` plus ``rejected_response``
  "used for DPO and other RLHF training" and ``images`` ("paths or URLs", "preferably absolute
  paths"), with ``<image>`` marking where the image goes [modelscope/ms-swift
  docs/source_en/Customization/Custom-dataset.md, "Custom Dataset", RLHF and Multimodal
  sections]. ``swift_record`` writes exactly those four keys.
- TRL: conversational preference type ``{"prompt": [user message], "chosen": [assistant
  message], "rejected": [assistant message]}`` [huggingface/trl docs/source/dataset_formats.md,
  "Preference"], with the images in an ``images`` column that ``DPOTrainer`` hands to its vision
  collator, which puts one image placeholder before the first user turn's text
  (``trl.data_utils.prepare_multimodal_messages``, trl 1.16.0). ``trl_record`` writes that.

Evaluation (issue 19 item 4, after CP-Bench [Antidote benchmark/README.md, eval.py]): a CPQ
answer is right when it rejects the question's premise, a TPQ answer when it accepts it (LLM
judge, ``PremiseVerdict``); a POPE answer (all Antidote POPE questions ask about a present
object, SPEC C7) when it starts with "yes" (rule, ``pope_verdict``). Description queries get
no metric here (the paper scores them with CHAIR, which needs object annotations).
"""
from __future__ import annotations

import json
import re
from typing import Any, Literal

from pydantic import BaseModel

from udfs import rows as R

#: query files of an Antidote run (``OUT/queries/<type>_list.jsonl``), in this order
QUERY_TYPES = ("cpq", "tpq", "pope", "desc")
#: which answer is *chosen* per query type (the original's ``--mode``; SPEC C9): the plain answer
#: for TPQ and POPE (their hint is deliberately false), the hinted one for CPQ and desc
CHOSEN_FROM = {"cpq": "answer_hint", "tpq": "answer", "pope": "answer", "desc": "answer_hint"}
#: cosine above which a pair has no contrast and is dropped (2_preference_curation.py ``--thres``
#: default, bge-m3 CLS embeddings, strict ``>``)
SIMILARITY_THRESHOLD = 0.9
#: what an answer must do to count as right, per query type (CP-Bench: CPQ reject, TPQ accept)
EXPECTED = {"cpq": "reject", "tpq": "accept", "pope": "yes"}
IMAGE_TAG = "<image>"


def pair_id(query_type: str, query_id: str) -> str:
    """Stable row id of one query: ``<type>:<query id>`` (the same Antidote row gives a CPQ, a
    TPQ, a POPE and a description query, so the query id alone is not unique)."""
    return f"{query_type}:{query_id}"


# ----------------------------------------------------------------------------- ingest

def query_row(query_type: str, line: int, rec: Any, source: str) -> dict:
    """One line of ``queries/<type>_list.jsonl`` as an input row: ``id`` (``pair_id``),
    ``query_id``, ``query_type``, ``image`` (as written, relative to the Antidote output),
    ``text``, ``text_hint`` (str).

    Raises ``rows.InputError`` naming the row (``<type>:<id>``, or ``<file> line N`` when the id
    is missing) and the field for a missing or empty ``id``, ``image``, ``text`` or ``text_hint``.
    """
    if not isinstance(rec, dict):
        raise R.InputError(f"{source} line {line}", "line", "not a JSON object")
    qid = rec.get("id")
    if qid is None or not str(qid).strip():
        raise R.InputError(f"{source} line {line}", "id", "missing (Antidote query files carry the row id)")
    rid = pair_id(query_type, str(qid))
    for field in ("image", "text", "text_hint"):
        v = rec.get(field)
        if not isinstance(v, str) or not v.strip():
            raise R.InputError(rid, field, "missing or not a non-empty string")
    return {R.ID: rid, "query_id": str(qid), "query_type": query_type, "image": rec["image"],
            "text": rec["text"], "text_hint": rec["text_hint"]}


def interleave(rows_by_type: dict[str, list[dict]], limit: int | None) -> tuple[list[dict], int]:
    """Rows of all types in a deterministic order that takes one of each type in turn (sorted by
    id within a type), so ``--limit N`` keeps every query type. Returns ``(rows, left out)``."""
    queues = {t: sorted(rows_by_type.get(t, []), key=lambda r: r[R.ID]) for t in QUERY_TYPES}
    out: list[dict] = []
    k = 0
    while any(len(q) > k for q in queues.values()):
        out += [q[k] for t, q in queues.items() if len(q) > k]
        k += 1
    n = len(out) if limit is None else min(limit, len(out))
    return out[:n], len(out) - n


# ----------------------------------------------------------------------------- response sampling

def answer_messages(image: str, question: str) -> str:
    """Chat messages (JSON string) of one answer request: one user turn holding the image (an
    OpenAI ``image_url`` part with the path/URI; the LLM stage reads it) and then the question,
    no system message (the layout of the original's ``1_infer.py``)."""
    return json.dumps([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                                    {"type": "text", "text": question}]}])


def answer_prompts(column: str):
    """Task stage: ``messages`` asking the target VLM the query in ``column`` (``text`` or
    ``text_hint``) about the row's ``image``."""

    def fn(batch: dict, params: Any) -> dict:
        return {"messages": [answer_messages(img, q) for img, q in zip(batch["image"], batch[column])]}

    fn.__name__ = f"{column}_prompts"
    return fn


# ----------------------------------------------------------------------------- preference curation

def cosine(a: Any, b: Any) -> float:
    """Cosine similarity of two vectors (sequences of floats); 0.0 when either has norm 0."""
    import numpy as np

    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    n = float(np.linalg.norm(x) * np.linalg.norm(y))
    return float(x @ y / n) if n else 0.0


def choose(query_type: str, answer: str, answer_hint: str, cos: float,
           threshold: float = SIMILARITY_THRESHOLD) -> tuple[str | None, str | None, str | None]:
    """The preference decision for one query: ``(chosen, rejected, None)`` or ``(None, None,
    reason)``.

    ``cos`` is the cosine of the two answers' embeddings. A pair with ``cos > threshold`` has no
    contrast (2_preference_curation.py: ``sim > thres`` drops; at exactly the threshold the pair
    is kept) and is rejected with the cosine in the reason. A pair whose plain or hinted answer
    is empty is rejected too (our rule: the original embedded empty strings; a DPO pair with an
    empty side teaches nothing about the question). Otherwise ``CHOSEN_FROM[query_type]`` says
    which answer is chosen. Raises ``ValueError`` for an unknown query type.
    """
    if query_type not in CHOSEN_FROM:
        raise ValueError(f"unknown query type {query_type!r} (expected one of {', '.join(QUERY_TYPES)})")
    if not (answer or "").strip():
        return None, None, "empty plain answer"
    if not (answer_hint or "").strip():
        return None, None, "empty hinted answer"
    if cos > threshold:
        return None, None, f"no contrast: answer cosine {cos:.4f} > {threshold}"
    if CHOSEN_FROM[query_type] == "answer":
        return answer, answer_hint, None
    return answer_hint, answer, None


def pair_select(batch: dict, params: Any, audit: bool = False) -> dict:
    """Filter stage: ``choose`` per row from ``query_type``, ``answer_text``,
    ``answer_hint_text`` and ``answer_cosine``; ``params["threshold"]`` (default
    ``SIMILARITY_THRESHOLD``). Outputs ``chosen``, ``rejected`` (str, None when rejected) and
    ``chosen_from`` (``answer``/``answer_hint``); rejected rows get the reason."""
    threshold = float((params or {}).get("threshold", SIMILARITY_THRESHOLD))
    chosen, rejected, source, reasons = [], [], [], []
    for t, a, h, c in zip(batch["query_type"], batch["answer_text"], batch["answer_hint_text"],
                          batch["answer_cosine"]):
        ch, rj, why = choose(str(t), a, h, float(c), threshold)
        chosen.append(ch)
        rejected.append(rj)
        source.append(None if why else CHOSEN_FROM[str(t)])
        reasons.append(why)
    return {"chosen": chosen, "rejected": rejected, "chosen_from": source, R.ROW_REJECT: reasons}


# ----------------------------------------------------------------------------- export formats

def swift_record(question: str, chosen: str, rejected: str, image: str) -> dict:
    """ms-swift DPO record (SPEC C9; ms-swift Custom-dataset.md): ``query`` = ``<image>\\n`` +
    the plain question, ``response`` = chosen, ``rejected_response`` = rejected, ``images`` =
    ``[image path]``; exactly these four keys."""
    return {"query": f"{IMAGE_TAG}\n{question}", "response": chosen, "rejected_response": rejected,
            "images": [image]}


def trl_record(question: str, chosen: str, rejected: str, image: str) -> dict:
    """TRL conversational preference record with its image (trl dataset_formats.md,
    "Preference"): ``prompt`` = ``[{"role": "user", "content": question}]``, ``chosen`` /
    ``rejected`` = one assistant message each, ``images`` = ``[image path]`` (the collator inserts
    the image placeholder before the question)."""
    return {"prompt": [{"role": "user", "content": question}],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
            "images": [image]}


def response_record(row: dict) -> dict:
    """The original's ``responses/res_<type>_list.jsonl`` line (1_infer.py output): ``question``,
    ``answer``, ``answer_hint``, ``image_id``; plus our ``id``."""
    return {"question": row["text"], "answer": row.get("answer_text"), "answer_hint": row.get("answer_hint_text"),
            "image_id": row["query_id"], "id": row[R.ID]}


def swift_to_trl(rec: dict, row_id: str) -> dict:
    """An ms-swift DPO record back to ``trl_record`` form (the prompt loses its ``<image>\\n``).
    Raises ``rows.InputError`` naming ``row_id`` and the field when a key is missing, the query
    has no ``<image>`` tag, or ``images`` is not a list of one path."""
    for key in ("query", "response", "rejected_response", "images"):
        if key not in rec:
            raise R.InputError(row_id, key, "missing (ms-swift DPO records have query, response, "
                               "rejected_response, images)")
    q = rec["query"]
    if not isinstance(q, str) or IMAGE_TAG not in q:
        raise R.InputError(row_id, "query", f"expected a string holding {IMAGE_TAG}")
    imgs = rec["images"]
    if not isinstance(imgs, list) or len(imgs) != 1 or not isinstance(imgs[0], str):
        raise R.InputError(row_id, "images", "expected a list of one image path")
    return trl_record(q.replace(f"{IMAGE_TAG}\n", "", 1).replace(IMAGE_TAG, "", 1).strip(),
                      str(rec["response"]), str(rec["rejected_response"]), imgs[0])


# ----------------------------------------------------------------------------- evaluation

class PremiseVerdict(BaseModel):
    """The judge's reply on one answer: does it accept or reject the question's premise?"""

    verdict: Literal["accept", "reject"]


JUDGE_SYSTEM = "You read a question about an image and a model's answer, and classify the answer."
#: our wording of CP-Bench's judge task (accept/reject of the question's premise; SPEC C10)
JUDGE_INSTRUCTIONS = (
    "A question about an image takes something for granted (its premise), for example that a "
    "certain object is in the image. Decide whether the answer goes along with that premise or "
    "refuses it.\n"
    "- reject: the answer says the thing the question assumes is not in the image, or that the "
    "question cannot be answered because of that.\n"
    "- accept: the answer treats the premise as true and answers the question.\n"
    "Judge only the answer's stance, not whether it is correct. Reply with JSON only: "
    '{"verdict": "accept"} or {"verdict": "reject"}.')


def judge_messages(question: str, answer: str) -> str:
    """Chat messages (JSON string) asking the judge LLM for a ``PremiseVerdict``."""
    user = f"{JUDGE_INSTRUCTIONS}\n\nQuestion: {question}\nAnswer: {answer}"
    return json.dumps([{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}])


def judge_prompts(batch: dict, params: Any) -> dict:
    """Task stage: judge ``messages`` for CPQ and TPQ rows (their plain answer); None for POPE
    and description rows, which make no judge call (the LLM stage skips null messages)."""
    out = []
    for t, q, a in zip(batch["query_type"], batch["text"], batch["answer_text"]):
        out.append(judge_messages(q, a or "") if t in ("cpq", "tpq") else None)
    return {"messages": out}


_YES_NO = re.compile(r"^\W*(yes|no)\b", re.IGNORECASE)


def pope_verdict(answer: str | None) -> str | None:
    """``"yes"``/``"no"`` when the answer starts with it (case and leading punctuation ignored;
    POPE's own rule), else None (counted as not agreeing)."""
    m = _YES_NO.match(answer or "")
    return m.group(1).lower() if m else None


def eval_verdicts(batch: dict, params: Any) -> dict:
    """Task stage: ``eval_verdict`` (the judge's ``accept``/``reject`` for CPQ/TPQ, ``yes``/``no``
    by rule for POPE, None when there is none) and ``eval_correct`` (bool: the verdict is
    ``EXPECTED`` for the type; None for description queries) from ``query_type``,
    ``answer_text`` and ``premise_judge_parsed``."""
    verdicts, correct = [], []
    for t, a, parsed in zip(batch["query_type"], batch["answer_text"], batch["premise_judge_parsed"]):
        if t == "pope":
            v = pope_verdict(a)
        elif t in ("cpq", "tpq"):
            v = PremiseVerdict.model_validate_json(parsed).verdict if parsed else None
        else:
            v = None
        verdicts.append(v)
        correct.append(None if t not in EXPECTED else v == EXPECTED[t])
    return {"eval_verdict": verdicts, "eval_correct": correct}


def eval_summary(rows_: list[dict]) -> dict[str, dict]:
    """Per query type: ``n`` (rows evaluated), ``correct``, ``share`` (correct / n, None when n
    is 0), ``no_verdict`` (rows whose judge or rule gave nothing) and ``expected`` (what counts as
    right). Rows are dicts with ``query_type``, ``eval_verdict``, ``eval_correct``; description
    rows are counted in ``n`` only."""
    out: dict[str, dict] = {}
    for t in QUERY_TYPES:
        sel = [r for r in rows_ if r.get("query_type") == t]
        ok = sum(1 for r in sel if r.get("eval_correct") is True)
        out[t] = {"n": len(sel), "expected": EXPECTED.get(t),
                  "correct": ok if t in EXPECTED else None,
                  "share": (ok / len(sel) if sel else None) if t in EXPECTED else None,
                  "no_verdict": sum(1 for r in sel if r.get("eval_verdict") is None) if t in EXPECTED else None}
    return out


def compare(current: dict[str, dict], baseline: dict[str, dict]) -> dict[str, dict]:
    """Per query type: this run's share, the baseline run's share and the difference
    (``delta`` = current - baseline, None when either is missing)."""
    out = {}
    for t in QUERY_TYPES:
        a, b = (current.get(t) or {}).get("share"), (baseline.get(t) or {}).get("share")
        out[t] = {"share": a, "baseline_share": b, "delta": None if a is None or b is None else a - b}
    return out
