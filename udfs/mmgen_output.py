"""MM-GEN pure logic, output side: the reply schema, reply parsing, LLaVA records, the loss filter.

Stage 3's reply of a vision LLM (SPEC D5/D6) is validated against ``reply_schema`` and turned
into clean items (``parse_items``) and per-mode LLaVA-format records (``records_for``);
stage 4 keeps the samples with the highest target-model loss (``select_highest``, SPEC D7).
Pure Python (no Ray, no model); the prompts and the input side live in ``udfs.mmgen``.
"""
from __future__ import annotations

import json
import math
import re
from typing import Any, Sequence

from udfs.mmgen import ANY_TAG, DESCRIPTION_MODES, ITEM_KEYS, LETTERS, OPTIONS_FORMATS, REPLY_KEY

# ----------------------------------------------------------------------------- output schema

#: most options a generated multiple-choice item may list in ``choices`` (A-F)
MAX_CHOICES = 6
#: longest string bound xgrammar 0.2.x compiles in a pattern with its cache on (see reply_schema)
MAX_PATTERN_CHARS = 128

#: printable ASCII without quote, backslash and angle brackets: decodes one token per char at
#: worst, so a grammar's token budget is bounded (notes/mmgen-vlm.md §3, traps T4/T6)
ASCII_CHARS = r"A-Za-z0-9 ,.?!'()%:;/+=*&#$@_-"


def reply_schema(mode: str, num: int, max_chars: int = 400, charset: str = "any",
                 max_items: int | None = None, options: str = "lines") -> dict[str, Any]:
    """JSON schema of a reply: an object ``{"items": [...]}`` (``REPLY_KEY``) whose array holds
    objects with the mode's keys, each a string of 1..``max_chars`` characters.

    The root is an object because OpenAI's and Azure's JSON mode (``response_format:
    json_object``) and strict structured outputs only ever return JSON objects; the
    original's bare top-level array (SPEC D6: "regex first [...] JSON array") cannot come back
    from them. ``parse_items`` still reads a bare array.

    ``options="choices"`` (see ``udfs.mmgen.OPTIONS_FORMATS``): items of the question modes
    also require ``"choices"``, a list of 0..``MAX_CHOICES`` option strings.

    ``charset="any"`` (API models): plain ``minLength``/``maxLength`` strings; the schema is
    open like the original's validation, which only required the mode's keys: items may carry
    more keys (a ``choices`` key is appended to the question by ``parse_items``) and the array
    may hold more items than asked (the original kept them and only logged the count
    mismatch, SPEC D6); ``max_items`` bounds it only when given.

    ``charset="ascii"`` (constrained decoding of small or random local models): closed (no
    other keys, 1..``max_items`` items, default ``2 * num``) and bounded inside a ``pattern``
    over ``ASCII_CHARS`` (xgrammar ignores ``maxLength`` next to a ``pattern``; a pattern also
    keeps control bytes, quotes and ``<image>`` out — notes/mmgen-vlm.md §3), so the grammar
    always fits ``max_tokens >= worst_case_tokens(...)``; a constrained decoder produces only
    what the grammar allows, so nothing the original kept is lost there. Such a pattern cannot
    produce a newline, hence ``options="choices"`` is required, and xgrammar 0.2.x (cache on,
    as ``actors.llm_hf`` uses it) fails to compile repetition bounds above
    ``MAX_PATTERN_CHARS`` = 128 (measured: 128 compiles, 130 raises "Check failed …
    per_rule_fsm_hashes").
    Raises ``ValueError`` for an unknown charset/options, ascii with ``options="lines"`` in a
    question mode, or ascii with ``max_chars > MAX_PATTERN_CHARS``.
    """
    if charset not in ("ascii", "any"):
        raise ValueError(f"charset must be 'ascii' or 'any', got {charset!r}")
    if options not in OPTIONS_FORMATS:
        raise ValueError(f"options must be one of {OPTIONS_FORMATS}, got {options!r}")
    closed = charset == "ascii"
    if closed:
        if options != "choices" and "Q" in ITEM_KEYS[mode]:
            raise ValueError("charset 'ascii' needs options 'choices': a pattern-constrained string cannot hold the "
                             "newlines that options as separate lines need")
        if max_chars > MAX_PATTERN_CHARS:
            raise ValueError(f"charset 'ascii' allows max_chars up to {MAX_PATTERN_CHARS} (xgrammar cannot compile "
                             f"longer pattern bounds), got {max_chars}")
        s = {"type": "string", "pattern": f"^[{ASCII_CHARS}]{{1,{max_chars}}}$"}
        max_items = max_items or 2 * num
    else:
        s = {"type": "string", "minLength": 1, "maxLength": max_chars}
    keys = ITEM_KEYS[mode]
    props: dict[str, Any] = {}
    for k in keys:  # choices right after the question (a grammar emits properties in this order)
        props[k] = dict(s)
        if k == "Q" and options == "choices":
            props["choices"] = {"type": "array", "maxItems": MAX_CHOICES, "items": dict(s)}
    item = {"type": "object", "required": list(props), "properties": props}
    items: dict[str, Any] = {"type": "array", "minItems": 1, "items": item}
    if max_items:
        items["maxItems"] = max_items
    root = {"type": "object", "required": [REPLY_KEY], "properties": {REPLY_KEY: items}}
    if closed:
        item["additionalProperties"] = root["additionalProperties"] = False
    return root


def worst_case_tokens(mode: str, max_items: int, max_chars: int, options: str = "lines") -> int:
    """Upper bound on the tokens of a compact reply to ``reply_schema(..., charset="ascii")``
    (one token per character at worst, ``", "``/``": "`` separators):
    ``13 + N * (2 + sum over keys (8 + L) [+ 15 + C * (L + 4)]) + 2 (N - 1)``, where 13 is the
    wrapper ``{"items": [`` … ``]}`` and the bracket the ``choices`` list of at most
    C = ``MAX_CHOICES`` options (question modes with ``options="choices"``)."""
    per_item = 2 + sum(8 + max_chars for _ in ITEM_KEYS[mode])
    if options == "choices" and "Q" in ITEM_KEYS[mode]:
        per_item += len(', "choices": []') + MAX_CHOICES * (max_chars + 4)
    return len(f'{{"{REPLY_KEY}": []}}') + max_items * per_item + 2 * (max_items - 1)


def clean_generated(text: Any) -> str:
    """Generated text with ``<…>`` tags removed (the original stripped them; a leaked
    ``<image>`` would add a bogus image placeholder to a LLaVA record) and whitespace trimmed."""
    return ANY_TAG.sub("", str(text)).strip()


_LETTERED = re.compile(r"^\s*[A-Z][.)]\s+")  # an option that already starts with its letter


def parse_items(mode: str, parsed: Any, num: int) -> tuple[list[dict[str, str]], dict[str, Any]]:
    """Validated reply → clean items and a report.

    ``parsed``: the reply object ``{"items": [...]}``, a bare JSON array (the original's
    form), or a JSON string of either; any other object counts as one item. Every item keeps
    the mode's keys (tags
    stripped); a ``choices`` key, when present, is appended to the question as lettered lines
    (SPEC D6; a letter the option already has is not doubled). Items missing a key or left empty are dropped. Report: ``expected`` (= ``num``),
    ``returned``, ``kept``, ``count_mismatch`` (kept != expected; recorded, never rejected, as
    in the original which only logged it).
    """
    if isinstance(parsed, str):
        parsed = json.loads(parsed)
    if isinstance(parsed, dict):
        parsed = parsed[REPLY_KEY] if isinstance(parsed.get(REPLY_KEY), list) else [parsed]
    if not isinstance(parsed, list):
        raise ValueError(f"expected a JSON array of items, got {type(parsed).__name__}")
    keys = ITEM_KEYS[mode]
    items = []
    for it in parsed:
        if not isinstance(it, dict):
            continue
        clean = {k: clean_generated(it.get(k, "")) for k in keys}
        if "Q" in clean and it.get("choices"):
            ch = it["choices"]
            extra = "\n".join(f"{LETTERS[i]}. {_LETTERED.sub('', str(c))}" for i, c in enumerate(ch)) \
                if isinstance(ch, list) else str(ch)
            clean["Q"] = f"{clean['Q']}\n{clean_generated(extra)}"
        if all(clean[k] for k in keys):
            items.append(clean)
    report = {"expected": num, "returned": len(parsed), "kept": len(items), "count_mismatch": len(items) != num}
    return items, report


# ----------------------------------------------------------------------------- records

REASONING_REQUEST = "Think it through step by step, then give the answer."
CONCISE_REQUEST = "Answer briefly."


def describe_request(mode: str, dataset_description: str) -> str:
    """Human turn of a description record. ``descript`` modes ask for a description as an
    expert in the task (the original meant to, but a bug gave every mode the generic request,
    SPEC D9.8); ``generic`` asks for a plain description."""
    if mode == "generic":
        return "Describe the image."
    return f"Describe the image as an expert in {dataset_description.strip().rstrip('.')}."


def records_for(mode: str, items: Sequence[dict[str, str]], prompt: dict[str, Any],
                dataset_description: str) -> list[dict[str, Any]]:
    """LLaVA-format records of one prompt's items (SPEC D5 record rules).

    ``prompt``: ``{"id", "keyword", "icl_indices", "image_1"}`` (``image_1`` relative to the
    export's ``image_folder``). Per item:

    - ``vqa``: two records, ``<image>`` Q + reasoning request → "R\\nA" and Q + concise request → A;
    - ``vqa_nr`` / ``vqa_task_desc``: one record ``<image>`` Q → A;
    - ``tqa``: two text-only records (no ``image_1``, no ``<image>``): description I, Q and the
      reasoning request → "R\\nA"; I, Q and the concise request → A. A tqa prompt shows no
      candidate image (its generator invents the image, SPEC D5), so none is attached: the
      original's second record had an image slot, but it held a broken path (the last
      in-context text taken for the candidate, SPEC D9.8); the description takes its place;
    - description modes: one record, ``describe_request`` → A.

    Record ids: ``<prompt id>-<item>-<record>``; every record carries ``keyword``,
    ``icl_indices``, ``mode`` and ``prompt_id``.
    """
    out = []

    def rec(k: int, r: int, human: str, gpt: str, image: bool = True) -> dict[str, Any]:
        d: dict[str, Any] = {"id": f"{prompt['id']}-{k}-{r}"}
        if image:
            d["image_1"] = prompt["image_1"]
        d["conversations"] = [{"from": "human", "value": ("<image>\n" if image else "") + human},
                              {"from": "gpt", "value": gpt}]
        d.update(keyword=prompt["keyword"], icl_indices=list(prompt["icl_indices"]), mode=mode,
                 prompt_id=prompt["id"])
        return d

    for k, it in enumerate(items):
        if mode == "vqa":
            out += [rec(k, 0, f"{it['Q']}\n{REASONING_REQUEST}", f"{it['R']}\n{it['A']}"),
                    rec(k, 1, f"{it['Q']}\n{CONCISE_REQUEST}", it["A"])]
        elif mode in ("vqa_nr", "vqa_task_desc"):
            out.append(rec(k, 0, it["Q"], it["A"]))
        elif mode == "tqa":
            out += [rec(k, 0, f"{it['I']}\n{it['Q']}\n{REASONING_REQUEST}", f"{it['R']}\n{it['A']}", image=False),
                    rec(k, 1, f"{it['I']}\n{it['Q']}\n{CONCISE_REQUEST}", it["A"], image=False)]
        elif mode in DESCRIPTION_MODES:
            out.append(rec(k, 0, describe_request(mode, dataset_description), it["A"]))
        else:
            raise ValueError(f"unknown mode {mode!r}")
    return out


def llava_record(rec: dict[str, Any]) -> dict[str, Any]:
    """Standard LLaVA training record: ``id``, ``image`` (omitted for text-only records),
    ``conversations``."""
    d = {"id": rec["id"]}
    if rec.get("image_1") is not None:
        d["image"] = rec["image_1"]
    d["conversations"] = rec["conversations"]
    return d


# ----------------------------------------------------------------------------- loss filter

def select_highest(losses: Sequence[float], keep_fraction: float, ids: Sequence[str] | None = None) -> list[bool]:
    """Keep mask of the ``ceil(keep_fraction * n)`` highest-loss samples (MM-GEN stage 4 keeps
    the top 50 % by the target model's loss, SPEC D7). Exactly that many are kept: ties are
    broken by ``ids`` (ascending), then by position. ``None`` losses are never kept. Raises
    ``ValueError`` for ``keep_fraction`` outside (0, 1]."""
    if not 0 < keep_fraction <= 1:
        raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
    valid = [i for i, v in enumerate(losses) if v is not None and not math.isnan(v)]
    k = math.ceil(keep_fraction * len(valid))
    order = sorted(valid, key=lambda i: (-float(losses[i]), ids[i] if ids is not None else "", i))
    keep = set(order[:k])
    return [i in keep for i in range(len(losses))]
