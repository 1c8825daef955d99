"""MM-GEN pure logic, input side: reference files, keyword partition, allocation, samplers, prompts.

MM-GEN (Joshi et al., 2025, "MM-GEN: Enhancing Task Performance Through Targeted Multimodal
Data Curation"; repository ``MM-Gen`` — SPEC part D) turns a few reference samples of a task
and a pool of candidate images into LLaVA-format training data: partition the references by
keyword with CLIP (stage 1) and the candidates the same way (stage 1b), allocate prompts to
subgroups in proportion to their references (stage 2), ask a strong VLM for question/answer
pairs or descriptions in the style of in-context examples from the same subgroup (stage 3),
and keep the samples a target model finds hardest (stage 4).

Everything here is pure Python (no Ray, no model); ``jobs.mmgen`` wires it into stages.
This module holds the input side (references, partition, allocation, prompts);
``udfs.mmgen_output`` the output side (reply schema, parsing, records, loss filter).
The prompts are written in our own words from SPEC D4/D5's descriptions of the original's.
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

from udfs.rows import seed_from_id

MODES = ("vqa", "vqa_nr", "tqa", "descript", "generic", "vqa_task_desc", "descript_task_desc")
#: modes whose prompts show in-context examples (SPEC D5 "ICL in prompt")
ICL_MODES = ("vqa", "vqa_nr", "tqa", "descript")
#: modes whose prompts end with the candidate image (all but tqa)
CANDIDATE_MODES = tuple(m for m in MODES if m != "tqa")
#: JSON keys of one generated item per mode (SPEC D5): Question, Reasoning, Answer, Image description
ITEM_KEYS = {"vqa": ("Q", "R", "A"), "vqa_nr": ("Q", "A"), "tqa": ("I", "Q", "R", "A"), "descript": ("A",),
             "generic": ("A",), "vqa_task_desc": ("Q", "A"), "descript_task_desc": ("A",)}
DESCRIPTION_MODES = ("descript", "generic", "descript_task_desc")
#: top-level key of a generation reply: ``{"items": [...]}`` (JSON modes return objects only)
REPLY_KEY = "items"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")

_ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth")
_IMAGE_TAG = re.compile(r"<image[^<>]*>", re.IGNORECASE)
#: any ``<…>`` tag (the original stripped them from example and generated text)
ANY_TAG = re.compile(r"<[^<>]*>")
#: option letters of multiple-choice questions
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


# ----------------------------------------------------------------------------- references

@dataclass
class References:
    """Reference samples of the task, normalized to MM-GEN's data-file layout (SPEC D1).

    ``image_folder``: folder (path or URI) that each sample's ``image_1`` is relative to;
    ``samples``: ``{"id", "image_1", "conversations"}`` dicts (conversations alternate
    ``human``/``gpt``); ``rejects``: ``{"id", "stage", "reason"}`` for malformed records;
    ``subgroups``: a task file's partition (SPEC D2/D3) when the input is one, else ``None``:
    ``{"keyword", "reference_sample_idx"}`` (indices into ``samples``) plus
    ``candidate_image_paths`` (resolved paths/URIs) when the file has them.
    """

    image_folder: str
    dataset_description: str
    samples: list[dict[str, Any]]
    rejects: list[dict[str, Any]] = field(default_factory=list)
    source_format: str = "mmgen"
    subgroups: list[dict[str, Any]] | None = None


def parent_uri(uri: str) -> str:
    """Folder of a path or URI (``s3://b/x/f.json`` → ``s3://b/x``; ``f.json`` → ``.``)."""
    head, sep, _ = uri.rstrip("/").rpartition("/")
    if not sep:
        return "."
    return head or "/"


def join_uri(base: str, rel: str) -> str:
    """``rel`` resolved against folder ``base``; absolute paths and URIs are returned as is."""
    if not rel:
        return base
    if rel.startswith("/") or "://" in rel or not base or base == ".":
        return rel
    while rel.startswith("./"):
        rel = rel[2:]
    return base.rstrip("/") + "/" + rel


def mcq_text(question: str, choices: Sequence[str] | None) -> str:
    """Question followed by lettered options, one per line (``A. ...``), as MM-GEN's prompts
    ask generated multiple-choice questions to be written."""
    if not choices:
        return question.strip()
    return question.strip() + "\n" + "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))


def mcq_answer(answer: Any, choices: Sequence[str] | None) -> str:
    """Answer text: ``"B. text"`` when ``answer`` is a choice index or one of the choices,
    else ``str(answer)``. Raises ``ValueError`` for an index outside the choices."""
    if choices:
        if isinstance(answer, bool):
            answer = str(answer).lower()
        if isinstance(answer, int):
            if not 0 <= answer < len(choices):
                raise ValueError(f"answer index {answer} outside {len(choices)} choices")
            return f"{LETTERS[answer]}. {choices[answer]}"
        if isinstance(answer, str) and answer in choices:
            k = list(choices).index(answer)
            return f"{LETTERS[k]}. {answer}"
    return str(answer).strip()


def _conversations_ok(conv: Any) -> bool:
    return (isinstance(conv, list) and len(conv) >= 2 and all(isinstance(t, dict) for t in conv)
            and str(conv[0].get("from")) in ("human", "user") and str(conv[1].get("from")) in ("gpt", "assistant")
            and isinstance(conv[0].get("value"), str) and isinstance(conv[1].get("value"), str))


def parse_references(uri: str, data: bytes, dataset_description: str | None = None,
                     image_folder: str | None = None) -> References:
    """Read a reference file in one of three formats.

    1. MM-GEN data file (JSON object): ``image_folder`` (relative to the file's folder),
       ``dataset_description``, ``samples`` with ``image_1`` and ``conversations`` (SPEC D1);
       a task file's ``subgroups`` (SPEC D2, with D3's ``candidate_image_paths``) are read
       too (``task_subgroups``).
    2. LLaVA JSON list: ``[{"id", "image", "conversations"}]``; images relative to the file's
       folder (or ``image_folder``).
    3. JSONL of ``{"image", "question", "choices", "answer"}`` (e.g. ScienceQA): the question
       gets lettered options and the answer is ``"<letter>. <choice>"`` (``answer`` may be an
       index or the choice text); images relative to the file's folder.

    ``dataset_description`` / ``image_folder`` override the file's. Malformed records go to
    ``References.rejects`` with the record number and field. Raises ``ValueError`` when the
    file is not valid JSON/JSONL, has no description at all, holds no valid sample, or has
    invalid ``subgroups``.
    """
    base = parent_uri(uri)
    low = uri.lower()
    rejects: list[dict] = []
    samples: list[dict] = []
    groups: list[dict] | None = None
    if low.endswith(".jsonl"):
        fmt, desc, folder = "jsonl", None, base
        for n, line in enumerate(data.decode("utf-8").splitlines(), 1):
            if not line.strip():
                continue
            rid = f"ref-line-{n}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                rejects.append({"id": rid, "stage": "ingest", "reason": f"{uri} line {n}: invalid JSON ({e.msg})"})
                continue
            rid = str(rec.get("id") or rid) if isinstance(rec, dict) else rid
            problem = None
            if not isinstance(rec, dict):
                problem = "record is not an object"
            elif not isinstance(rec.get("image"), str) or not rec["image"]:
                problem = "field 'image': missing or not a string"
            elif not isinstance(rec.get("question"), str) or not rec["question"].strip():
                problem = "field 'question': missing or empty"
            elif rec.get("answer") is None:
                problem = "field 'answer': missing"
            elif rec.get("choices") is not None and not (isinstance(rec["choices"], list)
                                                          and all(isinstance(c, str) for c in rec["choices"])):
                problem = "field 'choices': not a list of strings"
            if problem is None:
                try:
                    answer = mcq_answer(rec["answer"], rec.get("choices"))
                except ValueError as e:
                    problem = f"field 'answer': {e}"
            if problem:
                rejects.append({"id": rid, "stage": "ingest", "reason": f"{uri} line {n}: {problem}"})
                continue
            samples.append({"id": rid, "image_1": rec["image"], "conversations": [
                {"from": "human", "value": "<image>\n" + mcq_text(rec["question"], rec.get("choices"))},
                {"from": "gpt", "value": answer}]})
    else:
        try:
            obj = json.loads(data)
        except json.JSONDecodeError as e:
            raise ValueError(f"{uri}: invalid JSON at line {e.lineno}: {e.msg}") from None
        if isinstance(obj, dict):
            fmt = "mmgen"
            if not isinstance(obj.get("samples"), list):
                raise ValueError(f"{uri}: an MM-GEN data file needs a 'samples' list")
            desc = obj.get("dataset_description")
            folder = join_uri(base, str(obj.get("image_folder") or ""))
            raw, image_key = obj["samples"], "image_1"
        elif isinstance(obj, list):
            fmt, desc, folder, raw, image_key = "llava", None, base, obj, "image"
        else:
            raise ValueError(f"{uri}: expected an MM-GEN data file (object) or a LLaVA list")
        kept: dict[int, int] = {}  # position in the file's samples -> index in ``samples``
        for n, rec in enumerate(raw, 1):
            rid = str(rec.get("id")) if isinstance(rec, dict) and rec.get("id") is not None else f"ref-{n}"
            if not isinstance(rec, dict):
                problem = "record is not an object"
            elif not isinstance(rec.get(image_key), str) or not rec[image_key]:
                problem = f"field {image_key!r}: missing or not a string"
            elif not _conversations_ok(rec.get("conversations")):
                problem = "field 'conversations': needs a human turn followed by a gpt turn"
            else:
                problem = None
            if problem:
                rejects.append({"id": rid, "stage": "ingest", "reason": f"{uri} sample {n}: {problem}"})
                continue
            kept[n - 1] = len(samples)
            samples.append({"id": rid, "image_1": rec[image_key], "conversations": rec["conversations"]})
        if fmt == "mmgen" and obj.get("subgroups") is not None:
            groups = task_subgroups(uri, obj["subgroups"], kept, len(raw), base)
    if image_folder:
        folder = image_folder
    desc = dataset_description or desc
    if not desc or not str(desc).strip():
        raise ValueError(f"{uri}: no dataset_description in the file; pass --task-description")
    if not samples:
        raise ValueError(f"{uri}: no valid reference sample ({len(rejects)} malformed)")
    ids = [s["id"] for s in samples]
    if len(set(ids)) != len(ids):  # ids must be unique: fall back to positions
        for k, s in enumerate(samples):
            s["id"] = f"ref-{k}"
    return References(folder, str(desc).strip(), samples, rejects, fmt, groups)


def task_subgroups(uri: str, raw: Any, kept: dict[int, int], n_samples: int, base: str) -> list[dict[str, Any]]:
    """Validate a task file's ``subgroups`` (SPEC D2 output, D3's ``candidate_image_paths``).

    ``raw``: the file's list of ``{"keyword", "reference_sample_idx", ["candidate_image_paths"]}``;
    ``kept``: file position → index among the valid samples (indices of malformed samples,
    already rejected, are left out); ``n_samples``: number of samples in the file; ``base``:
    folder that relative candidate paths are resolved against (the file's folder, as
    ``image_folder`` is). Returns the subgroups with remapped indices and resolved paths.
    Raises ``ValueError`` naming ``subgroups[k].<field>`` for a non-list, an empty or duplicate
    keyword, an index that is not an int in ``[0, n_samples)``, or candidate paths that are not
    non-empty strings; also when only some subgroups carry ``candidate_image_paths``.
    """
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"{uri}: 'subgroups' must be a non-empty list")
    out, seen = [], set()
    for k, g in enumerate(raw):
        where = f"{uri}: subgroups[{k}]"
        if not isinstance(g, dict):
            raise ValueError(f"{where}: not an object")
        kw = g.get("keyword")
        if not isinstance(kw, str) or not kw.strip() or kw.strip() in seen:
            raise ValueError(f"{where}.keyword: missing, empty or repeated ({kw!r})")
        seen.add(kw.strip())
        idx = g.get("reference_sample_idx")
        if not isinstance(idx, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in idx):
            raise ValueError(f"{where}.reference_sample_idx: must be a list of ints")
        outside = [i for i in idx if not 0 <= i < n_samples]
        if outside:
            raise ValueError(f"{where}.reference_sample_idx: {outside} outside the {n_samples} samples")
        group: dict[str, Any] = {"keyword": kw.strip(), "reference_sample_idx": [kept[i] for i in idx if i in kept]}
        if "candidate_image_paths" in g:
            paths = g["candidate_image_paths"]
            if not isinstance(paths, list) or not all(isinstance(p, str) and p for p in paths):
                raise ValueError(f"{where}.candidate_image_paths: must be a list of non-empty strings")
            group["candidate_image_paths"] = [join_uri(base, p) for p in paths]
        out.append(group)
    if len({"candidate_image_paths" in g for g in out}) > 1:
        raise ValueError(f"{uri}: only some subgroups have 'candidate_image_paths'; give them for all or none")
    return out


def question_answer(sample: dict[str, Any]) -> tuple[str, str]:
    """The first human turn and the first gpt turn of a reference sample."""
    conv = sample["conversations"]
    q = next(t["value"] for t in conv if str(t.get("from")) in ("human", "user"))
    a = next(t["value"] for t in conv if str(t.get("from")) in ("gpt", "assistant"))
    return q, a


def is_image_path(path: str) -> bool:
    """True for file names with a common image extension."""
    return path.lower().endswith(IMAGE_EXTENSIONS)


# ----------------------------------------------------------------------------- partition

def assign_keywords(similarities: np.ndarray) -> np.ndarray:
    """Index of the best keyword per image: ``argmax`` over cosine similarities.

    ``similarities``: float array ``[n_images, n_keywords]`` of cosines between L2-normalised
    image and keyword embeddings (MM-GEN stage 1: raw keywords, no prompt templates, no
    threshold, every image in exactly one subgroup — SPEC D2). Ties go to the keyword listed
    first (``numpy.argmax`` semantics). Returns ``int64 [n_images]``. Raises ``ValueError``
    for a non-2-D array or zero keywords.
    """
    s = np.asarray(similarities, dtype=np.float64)
    if s.ndim != 2 or s.shape[1] == 0:
        raise ValueError(f"similarities must be [n_images, n_keywords>0], got shape {s.shape}")
    return np.argmax(s, axis=1).astype(np.int64)


def task_file(refs: References, keywords: Sequence[str], assigned: Sequence[str] | None) -> dict[str, Any]:
    """MM-GEN's task file (SPEC D2 output schema): ``image_folder``, ``dataset_description``,
    ``subgroups`` (one per keyword, in keyword order, with ``reference_sample_idx`` — indices
    into ``samples``; empty subgroups kept) and the ``samples``. ``assigned[i]`` is the keyword
    of sample ``i``; ``assigned=None`` takes the subgroups read from an input task file
    (``refs.subgroups``, candidate paths left out). Raises ``ValueError`` on a length mismatch
    or an unknown keyword."""
    if assigned is None:
        if refs.subgroups is None:
            raise ValueError("no assignment given and the references have no subgroups")
        return {"image_folder": refs.image_folder, "dataset_description": refs.dataset_description,
                "subgroups": [{"keyword": g["keyword"], "reference_sample_idx": list(g["reference_sample_idx"])}
                              for g in refs.subgroups], "samples": refs.samples}
    if len(assigned) != len(refs.samples):
        raise ValueError(f"{len(assigned)} assignments for {len(refs.samples)} samples")
    groups: dict[str, list[int]] = {k: [] for k in keywords}
    for i, kw in enumerate(assigned):
        if kw not in groups:
            raise ValueError(f"sample {i}: keyword {kw!r} is not one of {list(keywords)}")
        groups[kw].append(i)
    return {"image_folder": refs.image_folder, "dataset_description": refs.dataset_description,
            "subgroups": [{"keyword": k, "reference_sample_idx": v} for k, v in groups.items()],
            "samples": refs.samples}


# ----------------------------------------------------------------------------- allocation

def allocate(reference_counts: dict[str, int], total_gen: int, min_gen_per_candidate: int = 1) -> dict[str, int]:
    """Prompts per subgroup: ``n_k = ceil(total_gen * p_k / min_gen_per_candidate)`` with
    ``p_k = |ref_k| / sum |ref|`` (SPEC D4; the total may exceed ``total_gen`` by rounding up).

    ``reference_counts``: keyword → number of reference samples (ints ≥ 0, sum > 0).
    Raises ``ValueError`` for a non-positive ``total_gen``/``min_gen_per_candidate`` or no
    references at all.
    """
    if total_gen < 1 or min_gen_per_candidate < 1:
        raise ValueError("total_gen and min_gen_per_candidate must be >= 1")
    total = sum(reference_counts.values())
    if total <= 0:
        raise ValueError("no reference samples in any subgroup")
    # exact rational arithmetic: a float share like 0.1 * 30 would round 3 up to 4
    return {k: -(-total_gen * c // (total * min_gen_per_candidate)) for k, c in reference_counts.items()}


class EpochSampler:
    """Draws items without replacement, reshuffling when the pool is exhausted (epoch cycling).

    MM-GEN stage 2 samples candidates (one per prompt) and in-context examples this way
    (SPEC D4); the original was unseeded, here ``rng`` (a ``random.Random``) makes it
    reproducible. Within an epoch no item repeats. ``take(k)`` with ``k <= len(items)`` never
    returns duplicates, also across an epoch boundary: items already drawn in the same call
    are moved to the end of the next epoch's order. Raises ``ValueError`` for an empty pool.
    """

    def __init__(self, items: Sequence[Any], rng: random.Random):
        if not items:
            raise ValueError("EpochSampler needs at least one item")
        self.items = list(items)
        self.rng = rng
        self.epoch = 0
        self._order: list[Any] = []
        self._pos = 0
        self._new_epoch([])

    def _new_epoch(self, avoid: list[Any]) -> None:
        order = self.items[:]
        self.rng.shuffle(order)
        if avoid:
            later = [x for x in order if x in avoid]
            order = [x for x in order if x not in avoid] + later
        self._order, self._pos = order, 0
        self.epoch += 1

    def take(self, k: int = 1) -> list[Any]:
        """The next ``k`` items."""
        out: list[Any] = []
        while len(out) < k:
            if self._pos >= len(self._order):
                self._new_epoch(out if k <= len(self.items) else [])
            out.append(self._order[self._pos])
            self._pos += 1
        return out


def subgroup_rng(seed: int, keyword: str, what: str) -> random.Random:
    """Independent seeded generator per (recipe seed, subgroup, purpose)."""
    return random.Random(seed_from_id(keyword, f"{seed}:{what}"))


def plan_prompts(task: dict[str, Any], candidates: dict[str, list[str]], total_gen: int,
                 min_gen_per_candidate: int = 1, num_icl_samples: int = 1, seed: int = 0
                 ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """MM-GEN stage 2 without the text: which candidate and which examples each prompt gets.

    For every subgroup (task order) ``allocate`` gives ``n_k``; candidates of the subgroup
    are drawn one per prompt and ``num_icl_samples`` reference indices of the **same**
    subgroup per prompt, both with seeded ``EpochSampler`` s. Returns ``(prompts, skipped)``:
    prompts ``{"id": "p<k>-<j>", "keyword", "subgroup", "candidate", "icl_indices"}``;
    ``skipped`` one ``{"id", "stage", "reason"}`` per subgroup that has references but no
    candidate image (its ``n_k`` prompts cannot be made).
    """
    counts = {g["keyword"]: len(g["reference_sample_idx"]) for g in task["subgroups"]}
    alloc = allocate(counts, total_gen, min_gen_per_candidate)
    prompts, skipped = [], []
    for k, g in enumerate(task["subgroups"]):
        kw, n = g["keyword"], alloc[g["keyword"]]
        if n == 0:
            continue
        pool = candidates.get(kw) or []
        if not pool:
            skipped.append({"id": f"subgroup-{k}", "stage": "ingest",
                            "reason": f"subgroup {kw!r} has {counts[kw]} references but no candidate image; "
                                      f"its {n} prompts were not generated"})
            continue
        cand = EpochSampler(sorted(pool), subgroup_rng(seed, kw, "candidates"))
        icl = EpochSampler(list(g["reference_sample_idx"]), subgroup_rng(seed, kw, "icl"))
        for j in range(n):
            prompts.append({"id": f"p{k:02d}-{j:06d}", "keyword": kw, "subgroup": k,
                            "candidate": cand.take(1)[0], "icl_indices": icl.take(num_icl_samples)})
    return prompts, skipped


# ----------------------------------------------------------------------------- prompts

def ordinal(n: int) -> str:
    """``1`` → ``first`` … ``10`` → ``tenth``, then ``11th``, ``12th``, ``13th``, ``21st`` …"""
    if 1 <= n <= len(_ORDINALS):
        return _ORDINALS[n - 1]
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def clean_example_text(text: str, image_position: int) -> str:
    """Reference text for an in-context example: the ``<image…>`` token becomes "Refer to the
    <ordinal> image." (the example's image is the ``image_position``-th image of the prompt)
    and other ``<…>`` tags are removed (SPEC D4)."""
    text = _IMAGE_TAG.sub(f"Refer to the {ordinal(image_position)} image.", text)
    return ANY_TAG.sub("", text).strip()


def icl_items(task: dict[str, Any], indices: Sequence[int]) -> list[dict[str, str]]:
    """Prompt items of the in-context examples: per example ``j`` (1-based) the text
    ``Example j``, its image (``image_folder`` joined with ``image_1``) and
    ``Q: <question>\\n A: <answer>`` (SPEC D4). Items are ``{"text": ...}`` or ``{"image": uri}``."""
    items: list[dict[str, str]] = []
    for j, idx in enumerate(indices, 1):
        sample = task["samples"][idx]
        q, a = question_answer(sample)
        items += [{"text": f"Example {j}"}, {"image": join_uri(task["image_folder"], sample["image_1"])},
                  {"text": f"Q: {clean_example_text(q, j)}\n A: {clean_example_text(a, j)}"}]
    return items


#: System prompts per mode, in our own words from SPEC D5's description of the original's;
#: ``{task}`` is replaced by the dataset description.
SYSTEM_PROMPTS = {
    "vqa": (
        "You are a specialist in the following task: {task}\n"
        "You will see one or more worked examples, each an image with a question and its answer, followed by a "
        "new image. Study how the example questions probe the image, then look closely at the new image and write "
        "new questions about it that test the same skills in the same style. When a question is multiple choice, "
        "put its options inside the question. For every question, first explain step by step how the image leads "
        "to the answer, then state the answer briefly."),
    "vqa_nr": (
        "You are a specialist in the following task: {task}\n"
        "You will see one or more worked examples, each an image with a question and its answer, followed by a "
        "new image. Study how the example questions probe the image, then look closely at the new image and write "
        "a varied set of new question-answer pairs about it that test the same skills in the same style. When a "
        "question is multiple choice, put its options inside the question. Give only the answers, without "
        "explanations."),
    "tqa": (
        "You are a specialist in the following task: {task}\n"
        "You will see one or more worked examples, each an image with a question and its answer. Invent a new "
        "image that would suit this task and describe it in enough detail that it can be reasoned about without "
        "seeing it. Then write a multiple-choice question about your described image in the style of the "
        "examples, explain step by step how the description leads to the answer, and state the answer briefly."),
    "descript": (
        "You are a specialist in the following task: {task}\n"
        "You will see one or more worked examples, each an image with a question and its answer, followed by a "
        "new image. Work out which skills the examples call for, then describe the new image the way an expert "
        "applying those skills would: point out every detail that such questions would depend on."),
    "generic": (
        "You describe images. Look carefully at the image and write detailed descriptions of what it shows: "
        "the objects, text, layout, colours and relations between its parts."),
    "vqa_task_desc": (
        "You are a specialist in the following task: {task}\n"
        "Look closely at the image and write question-answer pairs about it that a model working on this task "
        "should be able to answer. When a question is multiple choice, put its options inside the question."),
    "descript_task_desc": (
        "You are a specialist in the following task: {task}\n"
        "Look closely at the image and describe it in detail, paying most attention to what matters for this "
        "task."),
}

_KEY_NAMES = {"Q": "the question", "R": "the step-by-step reasoning", "A": "the answer", "I": "the image description"}

#: where generated multiple-choice options go: ``lines`` — inside the question, one lettered line
#: each (the original's instruction, SPEC D5); ``choices`` — in the item's own ``choices`` list,
#: lettered into lines by ``udfs.mmgen_output.parse_items`` (the original's parser appended such
#: a key too). Constrained decoding needs ``choices``: xgrammar's string patterns cannot emit a
#: newline (measured with xgrammar 0.2.x: neither ``\n`` escapes nor raw newlines are accepted).
OPTIONS_FORMATS = ("lines", "choices")
_INLINE_OPTIONS = "put its options inside the question."
_LISTED_OPTIONS = 'list its options in the item\'s "choices".'


def generation_instruction(mode: str, num: int, options: str = "lines") -> str:
    """The closing user text of a prompt (SPEC D5, our wording): how many items, the JSON keys,
    where multiple-choice options go (``options``, one of ``OPTIONS_FORMATS``), answers
    grounded in the image, variety; descriptions for the description modes. Raises
    ``ValueError`` for an unknown ``options``."""
    if options not in OPTIONS_FORMATS:
        raise ValueError(f"options must be one of {OPTIONS_FORMATS}, got {options!r}")
    keys = ITEM_KEYS[mode]
    names = dict(_KEY_NAMES, choices="the options")
    if options == "choices" and "Q" in keys:
        keys = tuple(x for k in keys for x in ((k, "choices") if k == "Q" else (k,)))
    layout = ", ".join(f'"{k}" ({names[k]})' for k in keys)
    subject = "the last image above" if mode in CANDIDATE_MODES and mode in ICL_MODES else \
        ("the image above" if mode in CANDIDATE_MODES else "your invented image")
    if mode in DESCRIPTION_MODES:
        body = (f"Write exactly {num} different descriptions of {subject}, each several sentences long and "
                "not repeating the others.")
    else:
        where = ("Write the options of a multiple-choice question as separate lines starting with A., B., C. and so "
                 "on." if options == "lines" else 'Put the options of a multiple-choice question, without letters, '
                 'in the item\'s list "choices" (an empty list for other questions).')
        body = (f"Write exactly {num} new items about {subject}. Vary the kinds of questions. {where} Every answer "
                "must follow from what the image shows.")
    return (f'{body}\nReply with a JSON object only, of the form {{"{REPLY_KEY}": [...]}}, with one object per '
            f"item in the list, each with the keys {layout}.")


def system_prompt(mode: str, dataset_description: str, options: str = "lines") -> str:
    """The mode's system prompt with the task description filled in; with ``options="choices"``
    it asks for options in the item's ``choices`` list instead of inside the question. Raises
    ``KeyError`` for an unknown mode."""
    text = SYSTEM_PROMPTS[mode].replace("{task}", dataset_description.strip())
    return text.replace(_INLINE_OPTIONS, _LISTED_OPTIONS) if options == "choices" else text


def prompt_items(mode: str, task: dict[str, Any], icl_indices: Sequence[int], candidate: str) -> list[dict[str, str]]:
    """Ordered prompt items (SPEC D4): the in-context examples for ICL modes, then the candidate
    image last for every mode but ``tqa``."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r} (choose from {', '.join(MODES)})")
    items = icl_items(task, icl_indices) if mode in ICL_MODES else []
    if mode in CANDIDATE_MODES:
        items.append({"image": candidate})
    return items


def chat_messages(mode: str, dataset_description: str, items: Sequence[dict[str, str]], num: int,
                  options: str = "lines") -> list[dict]:
    """OpenAI chat messages of one prompt: the system prompt, then one user turn whose parts
    are the items in order (images as ``image_url`` parts holding the path/URI; the LLM stage
    encodes them) and the generation instruction (``options``: see ``OPTIONS_FORMATS``)."""
    parts: list[dict[str, Any]] = []
    for it in items:
        if "image" in it:
            parts.append({"type": "image_url", "image_url": {"url": it["image"]}})
        else:
            parts.append({"type": "text", "text": it["text"]})
    parts.append({"type": "text", "text": generation_instruction(mode, num, options)})
    return [{"role": "system", "content": system_prompt(mode, dataset_description, options)},
            {"role": "user", "content": parts}]


def common_folder(uris: Iterable[str]) -> str:
    """Deepest folder containing every path/URI (``s3://b/x/a.png``, ``s3://b/y/c.png`` →
    ``s3://b``). Raises ``ValueError`` for an empty input or mixed schemes/buckets."""
    uris = list(uris)
    parts_list = [u.split("/") for u in uris]
    if not parts_list:
        raise ValueError("no paths")
    folders = [p[:-1] for p in parts_list]
    common = folders[0]
    for f in folders[1:]:
        n = 0
        while n < min(len(common), len(f)) and common[n] == f[n]:
            n += 1
        common = common[:n]
    root = "/".join(common)
    if any("://" in u for u in uris) and len(common) < 3:
        raise ValueError("image paths span several buckets or schemes; they need one common folder")
    return root or "/"


def relative_to(folder: str, uri: str) -> str:
    """``uri`` relative to ``folder`` (which must contain it). Raises ``ValueError`` otherwise."""
    prefix = folder.rstrip("/") + "/"
    if folder == "/":
        prefix = "/"
    if not uri.startswith(prefix):
        raise ValueError(f"{uri} is not inside {folder}")
    return uri[len(prefix):]
