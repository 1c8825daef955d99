"""Antidote data synthesis on Ray Data: caption pool → images → CPQ/TPQ/POPE/description queries.

One dataset from the caption pool to the query files (SPEC part C; Wu et al., CVPR 2025):
1-1 caption parsing (LLM, JSON schema) → deterministic rule pre-check → 1-2 LLM rule judge →
2-1 image generation (negative prompt = no-exist objects + quality negatives) → 2-2 Grounding
DINO on present and no-exist phrases → 2-3 factual filter → 3-3 description queries →
3-1 caption embedding, memory-bank lookup, CPQ/TPQ generation, pre-check and LLM judge →
3-2 POPE question with the LLM grammar fix. Two filters the original did not have are
separate stages, each with its own funnel row, switched off in the paper profile
(``enabled: false``): ``cpq_object_words`` (a question must contain its object word; before
the memory bank) and ``cpq_modal_questions`` (no CPQ starting with can/could/will/would/
should/has/have/had). Every row keeps its id; images are
``OUT/images/<id>.png``.

Outputs: ``OUT/queries/{cpq,tpq,pope,desc}_list.jsonl`` (original fields ``image``, ``text``,
``text_hint`` plus ``id``), ``OUT/captions_final.parquet`` (every caption that passed the
factual filter: the original final schema — ``caption`` the rewritten caption, ``present`` /
``no-exist`` the filtered lists, ``prompt``, ``prompt_neg`` — plus the pool caption, the
unfiltered lists and the detection evidence), ``OUT/steps/`` (the original's intermediate
files under its names: ``generated_captions.jsonl``, ``generated_captions_filtered.jsonl``,
``infer_grounding_res.jsonl``, ``generated_captions_final.jsonl``, ``query_cpq_tpq_list.jsonl``,
``query_tpq_cpq_list_filtered.jsonl``, ``query_pope_list.jsonl``,
``query_pope_list_filtered.jsonl``; ``idx`` = the row id), ``rejects/``, ``errors/``,
``manifest.json``.
"""
from __future__ import annotations

import json
import random

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from jobs.core.funnel import reached
from jobs.core.recipe import Recipe
from jobs.core.report import Gallery
from jobs.core.runtime import Stage, llm_stage
from jobs.core.store import read_table, work, write_table
from udfs import antidote as A
from udfs import io
from udfs import rows as R

INPUT_COLUMNS = ("caption",)


class AntidoteRecipe(Recipe):
    """Antidote recipe: caption-pool settings plus the stages below."""

    min_words: int = Field(8, ge=1, description="Keep captions with at least this many words (1_1 script)")
    shuffle: bool = Field(True, description="Shuffle the pool before taking total_num (1_1 script)")
    shuffle_seed: int = Field(12, description="Shuffle seed (the original used random.seed(12))")
    total_num: int | None = Field(12000, ge=1, description="Captions to process (original default 12,000); "
                                  "--limit takes precedence")
    bank_threshold: float = Field(0.8, description="Memory bank: caption cosine above which a stored CPQ is "
                                  "shown as an example to avoid (3_1_1: 0.8 for bge-m3). The value belongs to the "
                                  "embedder: for all-MiniLM-L6-v2 0.8 is near-paraphrase (12 % of same-image COCO "
                                  "caption pairs); 0.7 is the measured equivalent (udfs/memory_bank.py)")
    bank_min_entries: int = Field(500, ge=0, description="Memory bank activates at this size (3_1_1)")
    bank_top_k: int = Field(3, ge=0, description="At most this many avoid-examples (3_1_1)")


RECIPE = AntidoteRecipe
#: the run report's gallery: generated image, caption and questions, detection scores
REPORT = Gallery(image="image", text=("caption", "caption_rewritten", "hall_question", "truth_question",
                                       "pope_question"),
                 scores=("present_scores", "no_exist_scores"))


def bank_name(recipe: Recipe) -> str:
    """Name of the run's memory-bank actor (one per output folder)."""
    return "mmsynth-memory-bank-" + R.content_id(recipe.output or "")


def _embeddings(batch: dict) -> list[list[float]]:
    return [list(map(float, e)) for e in batch["caption_embedding"]]


def _memory_query(name: str):
    """Stage: avoid-examples for each caption from the run's memory-bank actor."""
    def memory_query(batch: dict, params) -> dict:
        import ray

        return {"avoid_questions": ray.get(ray.get_actor(name).query.remote(_embeddings(batch)))}
    return memory_query


def _memory_add(name: str):
    """Stage: add each caption's embedding and CPQ to the memory bank (ids added once)."""
    def memory_add(batch: dict, params) -> dict:
        import ray

        size = ray.get(ray.get_actor(name).add.remote([str(i) for i in batch["id"]], _embeddings(batch),
                                                      list(batch["hall_question"])))
        return {"bank_size": [size] * len(batch["id"])}
    return memory_add


def stages(recipe: AntidoteRecipe) -> list[Stage]:
    """The pipeline, in order. Stage names are the keys of the recipe's ``stages``."""
    images = io.join(recipe.output or "OUT", "images")
    name = bank_name(recipe)
    return [
        Stage("parse_prompts", A.parse_prompts, ("caption",), ("messages",)),
        llm_stage("caption_parse", "udfs.antidote:CaptionParse"),
        Stage("caption_fields", A.caption_fields, ("caption_parse_parsed",),
              ("caption_rewritten", "present", "no_exist", "prompt_weighted", "prompt_neg", "precheck"),
              filter=True),
        Stage("judge_prompts", A.judge_prompts,
              ("caption_rewritten", "present", "no_exist", "prompt_weighted", "prompt_neg"), ("messages",)),
        llm_stage("caption_judge", "udfs.antidote:RuleVerdict"),
        Stage("caption_verdict", A.verdicts("caption_judge_parsed", "caption_rules"),
              ("caption_judge_parsed",), ("caption_rules_verdict",), filter=True),
        # positive prompt = the rewritten caption (the original 2_1 script; set
        # generate_images.params.prompt_column=prompt_weighted for the weighted prompt);
        # negative prompt = the no-exist objects + the stage's quality negatives (SPEC C3)
        Stage("generate_images", "actors.text2image:Text2Image",
              defaults={"output_dir": images, "prompt_column": "caption_rewritten", "negative_column": "prompt_neg"}),
        Stage("detect_objects", "actors.detection:GroundingDINO",
              defaults={"phrase_columns": ["present", "no_exist"]}),
        Stage("factual_filter", A.factual_filter,
              ("present", "no_exist", "present_detected", "no_exist_detected"),
              ("present_verified", "no_exist_verified", "present_final", "no_exist_final"),
              filter=True, evidence=("generate_images", "detect_objects")),
        Stage("desc_queries", A.desc_queries, ("caption_rewritten", "present_final", "no_exist_final"),
              ("desc_text", "desc_hint")),
        Stage("caption_embed", "actors.embedding:TextEmbedder",
              defaults={"text_column": "caption_rewritten", "output_column": "caption_embedding"}),
        Stage("memory_lookup", _memory_query(name), ("caption_embedding",), ("avoid_questions",)),
        Stage("question_prompts", A.question_prompts,
              ("caption_rewritten", "present_final", "no_exist_final", "avoid_questions"), ("messages",)),
        llm_stage("cpq_generate", "udfs.antidote:QuestionPair"),
        Stage("cpq_fields", A.question_fields, ("cpq_generate_parsed",),
              ("hall_question", "hall_object", "truth_question", "truth_object")),
        # extra rule, not in the original (recipe: enabled false in the paper profile)
        Stage("cpq_object_words", A.cpq_object_words,
              ("hall_question", "hall_object", "truth_question", "truth_object"), ("object_words_missing",),
              filter=True),
        Stage("memory_add", _memory_add(name), ("caption_embedding", "hall_question"), ("bank_size",)),
        Stage("cpq_precheck", A.cpq_precheck, ("hall_question", "hall_object"), ("cpq_precheck",),
              filter=True),
        # extra rule, not in the original (recipe: enabled false in the paper profile)
        Stage("cpq_modal_questions", A.cpq_modal_questions, ("hall_question",), ("cpq_modal_start",),
              filter=True),
        Stage("cpq_judge_prompts", A.cpq_judge_prompts,
              ("hall_question", "hall_object", "truth_question", "truth_object"), ("messages",)),
        llm_stage("cpq_judge", "udfs.antidote:RuleVerdict"),
        Stage("cpq_verdict", A.verdicts("cpq_judge_parsed", "cpq_rules"), ("cpq_judge_parsed",),
              ("cpq_rules_verdict",), filter=True),
        Stage("pope_prompts", A.pope_prompts, ("truth_object",), ("messages",)),
        llm_stage("pope_fix", "udfs.antidote:FixedQuestion", filter=False),  # invalid fix -> template
        Stage("pope_fields", A.pope_fields, ("truth_object", "pope_fix_parsed"), ("pope_question", "pope_fixed")),
    ]


# ----------------------------------------------------------------------------- ingest

def _read_pool(uri: str) -> tuple[list[dict], list[dict]]:
    """Caption records ``{"id", "caption"}`` from JSON ``{key: caption}`` / a JSON list, JSONL,
    Parquet or CSV (``id`` and ``caption`` columns). Malformed records become rejects naming
    the line and field."""
    records, bad = io.read_records(uri, "ingest", from_object=lambda obj: [  # the original's {key: caption}
        {"id": str(k), "caption": v} for k, v in obj.items()])
    good = []
    for n, (_, rec) in enumerate(records, 1):
        cap = rec.get("caption") if isinstance(rec, dict) else None
        rid = str(rec.get("id")) if isinstance(rec, dict) and rec.get("id") is not None else None
        if not isinstance(cap, str) or not cap.strip():
            bad.append({"id": rid or f"record-{n}", "stage": "ingest",
                        "reason": f"record {n} field 'caption': missing or not a string"})
            continue
        good.append({"id": rid or R.content_id(cap), "caption": cap.strip()})
    return good, bad


def ingest(recipe: AntidoteRecipe) -> tuple[pa.Table, list[dict], int]:
    """Read the pool, keep captions with ≥ ``min_words`` words, drop exact duplicates (later
    copies), shuffle with ``shuffle_seed``, take ``limit`` or ``total_num``.

    Returns the rows (``id``, ``caption``), the rejects (short, duplicate, malformed: each
    with ``id``, ``stage``, ``reason``) and how many valid captions the limit left out."""
    records, rejects = _read_pool(recipe.input)
    seen: dict[str, str] = {}
    ids: set[str] = set()
    keep = []
    for rec in records:
        if A.word_count(rec["caption"]) < recipe.min_words:
            rejects.append({"id": rec["id"], "stage": "ingest",
                            "reason": f"caption has {A.word_count(rec['caption'])} words (< {recipe.min_words})"})
        elif rec["caption"] in seen:
            rejects.append({"id": rec["id"], "stage": "ingest",
                            "reason": f"duplicate caption of {seen[rec['caption']]}"})
        elif rec["id"] in ids:
            rejects.append({"id": rec["id"], "stage": "ingest", "reason": "duplicate id"})
        else:
            seen[rec["caption"]] = rec["id"]
            ids.add(rec["id"])
            keep.append(rec)
    if recipe.shuffle:
        random.Random(recipe.shuffle_seed).shuffle(keep)
    n = recipe.limit or recipe.total_num or len(keep)
    not_selected = max(0, len(keep) - n)
    keep = keep[:n]
    table = pa.table({"id": pa.array([r["id"] for r in keep], pa.string()),
                      "caption": pa.array([r["caption"] for r in keep], pa.string())})
    return table, rejects, not_selected


def before_run(recipe: AntidoteRecipe, out: str) -> None:
    """Start the run's memory-bank actor and re-seed it from rows a previous run committed."""
    import ray

    from actors.memory_bank import MemoryBank

    global _BANK  # keep the handle alive for the whole run
    _BANK = ray.remote(MemoryBank).options(name=bank_name(recipe), get_if_exists=True, num_cpus=0).remote(
        recipe.bank_threshold, recipe.bank_min_entries, recipe.bank_top_k)
    done = read_table(work(out, "rows"), columns=["id", "caption_embedding", "hall_question"])
    if done is not None and "hall_question" in done.column_names and "caption_embedding" in done.column_names:
        done = done.filter(pc.is_valid(done.column("hall_question")))
        if done.num_rows:
            ray.get(_BANK.add.remote(done.column("id").to_pylist(), done.column("caption_embedding").to_pylist(),
                                     done.column("hall_question").to_pylist()))


_BANK = None


# ----------------------------------------------------------------------------- export

#: ``captions_final.parquet``: output column -> row column. The original's names carry the
#: original's meanings (SPEC C5: the rewritten caption and the lists after the factual filter);
#: our extra evidence has names of its own.
FINAL_COLUMNS = {"id": "id", "caption": "caption_rewritten", "present": "present_final",
                 "no-exist": "no_exist_final", "prompt": "prompt_weighted", "prompt_neg": "prompt_neg",
                 "image": "image", "pool_caption": "caption", "present_parsed": "present",
                 "no_exist_parsed": "no_exist", "present_verified": "present_verified",
                 "no_exist_verified": "no_exist_verified", "present_detected": "present_detected",
                 "present_scores": "present_scores", "present_boxes": "present_boxes",
                 "no_exist_detected": "no_exist_detected", "no_exist_scores": "no_exist_scores",
                 "no_exist_boxes": "no_exist_boxes", R.PLACEHOLDER: R.PLACEHOLDER, R.AUDIT: R.AUDIT}

#: The original's intermediate files (SPEC C1-C7, names from its README), written to
#: ``OUT/steps/`` from the committed rows: (file, stages in pipeline order — a row is in the
#: file when it got through the last enabled one —, record builder returning None to skip).
STEP_FILES = (
    ("generated_captions.jsonl", ("caption_parse",), A.caption_item),
    ("generated_captions_filtered.jsonl", ("caption_parse", "caption_fields", "caption_judge", "caption_verdict"),
     A.caption_item),
    ("infer_grounding_res.jsonl", ("detect_objects",), A.grounding_item),
    ("generated_captions_final.jsonl", ("factual_filter",), lambda r: A.caption_item(r, final=True)),
    ("query_cpq_tpq_list.jsonl", ("cpq_generate", "cpq_fields"), A.question_pair_item),
    ("query_tpq_cpq_list_filtered.jsonl", ("cpq_fields", "cpq_object_words", "cpq_precheck", "cpq_modal_questions",
                                           "cpq_judge", "cpq_verdict"), A.question_pair_item),
    ("query_pope_list.jsonl", ("cpq_fields", "cpq_object_words", "cpq_precheck", "cpq_modal_questions",
                               "cpq_judge", "cpq_verdict"), A.pope_item),
    ("query_pope_list_filtered.jsonl", ("pope_fix", "pope_fields"), lambda r: A.pope_item(r, fixed=True)),
)


def _through(rows: pa.Table, order: list[str], stages_: tuple[str, ...]) -> pa.Table | None:
    """Rows that got through the last enabled stage of ``stages_`` (None if none is enabled)."""
    last = [s for s in stages_ if s in order]
    return rows.filter(pa.array(reached(rows, order, last[-1], through=True))) if last else None


def export(rows: pa.Table, recipe: AntidoteRecipe, out: str) -> dict:
    """Write the query files, ``captions_final.parquet`` (``FINAL_COLUMNS``) and the original's
    step files (``STEP_FILES``, in ``OUT/steps/``); returns counts per file."""
    order = [s.name for s in stages(recipe) if recipe.stages.get(s.name) is None or recipe.stages[s.name].enabled]
    counts = {}
    for name, through, build in STEP_FILES:
        sel = _through(rows, order, through)
        if sel is not None:
            recs = sorted((x for x in map(build, sel.to_pylist()) if x is not None),
                          key=lambda x: x.get("idx", x.get("id")))
            io.write_text(io.join(out, "steps", name), "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in recs))
            counts[f"steps/{name}"] = len(recs)
    if "factual_filter" in order:
        final = _through(rows, order, ("factual_filter",))
        table = pa.table({k: final.column(c) for k, c in FINAL_COLUMNS.items()
                          if c in final.column_names and k != "image"})
        if "image" in final.column_names:  # portable: relative to OUT
            table = table.add_column(table.column_names.index("prompt_neg") + 1, "image",
                                     pa.array([A.image_rel_path(i) for i in final.column("id").to_pylist()],
                                              pa.string()))
        write_table(table, io.join(out, "captions_final.parquet"))
        counts["captions_final"] = table.num_rows
        recs = final.select(["id", "desc_text", "desc_hint"]).to_pylist() if "desc_text" in final.column_names else []
        counts["desc_list"] = _write_queries(out, "desc_list", [A.query_record(r["id"], r["desc_text"], r["desc_hint"])
                                                               for r in recs if r["desc_text"]])
    if "cpq_verdict" in order:
        sel = _through(rows, order, ("cpq_verdict",)).to_pylist()
        counts["cpq_list"] = _write_queries(out, "cpq_list", [
            A.query_record(r["id"], r["hall_question"], A.cpq_hint(r["hall_object"], r["hall_question"])) for r in sel])
        counts["tpq_list"] = _write_queries(out, "tpq_list", [
            A.query_record(r["id"], r["truth_question"], A.tpq_hint(r["truth_object"], r["truth_question"]))
            for r in sel])
    if "pope_fields" in order:
        sel = rows.filter(pc.equal(rows.column(R.STATUS), R.OK)).to_pylist()
        counts["pope_list"] = _write_queries(out, "pope_list", [
            A.query_record(r["id"], r["pope_question"], A.pope_hint(r["truth_object"], r["pope_question"]))
            for r in sel if r.get("pope_question")])
    return counts


def _write_queries(out: str, name: str, records: list[dict]) -> int:
    records = sorted(records, key=lambda r: r["id"])
    io.write_text(io.join(out, "queries", f"{name}.jsonl"),
                  "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return len(records)
