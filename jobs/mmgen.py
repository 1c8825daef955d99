"""MM-GEN on Ray Data: a few reference samples + a pool of candidate images → LLaVA training data.

One job for the original's three hand-chained commands and its ``num_parallel`` subprocess
fan-out (SPEC part D; Joshi et al. 2025):

- ingest (stages 1, 1b, 2): read the references (MM-GEN data file, LLaVA list or
  ``image, question, choices, answer`` JSONL) and the candidate images (folders or file
  lists, local or ``s3://``); the ``partition`` stage (CLIP zero-shot over the raw keywords,
  ``actors.clip``; one embedding per distinct image) assigns every reference and candidate
  to a keyword; writes ``OUT/task.json`` (the original task-file schema, with the restored
  ``candidate_image_paths`` of stage 1b); allocates ``n_k = ceil(total_gen·p_k /
  min_gen_per_candidate)`` prompts per subgroup with seeded epoch-cycling samplers for
  candidates and same-subgroup in-context examples; writes ``OUT/prompts.json``. One row per
  prompt (``id`` = ``p<subgroup>-<index>``).
- ``build_messages`` → ``generate`` (the shared LLM stage with a vision model: a transformers
  VLM or a vLLM vision model in the run's shared engine (``engines:``; vLLM's vision models need
  torchvision, so on CPU only through the transformers backend), or any OpenAI-compatible
  endpoint with bounded base64 images; reply ``{"items": [...]}`` validated per mode,
  format-fixing re-ask, then rejects/) →
  ``make_records`` (per-mode record rules, count mismatches recorded) → ``loss_score``
  (per-sample answer loss under the target VLM, ``actors.vlm.AnswerLoss``).
- export: the loss filter keeps the ``keep_fraction`` highest-loss samples (stage 4; audit
  mode when the target is a placeholder), writes ``OUT/generated.json`` (the original's
  merged schema; ``image_folder`` joined with each ``image_1`` is the image),
  ``OUT/llava_train.json`` (standard LLaVA ``image`` key, same folder) and
  ``OUT/rejects/loss_filter.jsonl`` (samples dropped, with their loss).
"""
from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, field_validator, model_validator

from jobs.core import stats
from jobs.core.recipe import Recipe
from jobs.core.report import Gallery
from jobs.core.runtime import Stage, llm_stage
from udfs import io
from udfs import mmgen as M
from udfs import mmgen_output as MO
from udfs import rows as R

INPUT_COLUMNS = ("keyword", "subgroup", "mode", "candidate", "image_1", "icl_indices", "prompt", "num_gen",
                 "dataset_description")


class MMGenRecipe(Recipe):
    """MM-GEN recipe: generation settings (SPEC D4-D7) plus the stages."""

    candidates: list[str] = Field(default_factory=list, description="Candidate image sources: folders, image "
                                  "files or file lists (.txt one path per line, .json list), local or s3://")
    keywords: list[str] = Field(default_factory=list, description="Partition keywords, encoded raw by CLIP "
                                "(SPEC D2); one keyword = the 'no partition' ablation")
    mode: str = Field("vqa_nr", description=f"Generation mode: {', '.join(M.MODES)} (SPEC D5; vqa_nr = MM-Gen)")
    total_gen: int = Field(100, ge=1, description="Samples to generate in total (stage 2 --total_gen)")
    min_gen_per_candidate: int = Field(1, ge=1, description="Items asked per prompt (stage 2 "
                                       "--min_gen_per_candidate; the prompt's <NUM>)")
    num_icl_samples: int = Field(1, ge=0, description="In-context examples per prompt (default 1; ablations 3, 5)")
    task_description: str | None = Field(None, description="Task description; overrides the file's "
                                         "dataset_description (needed for LLaVA lists and JSONL)")
    image_folder: str | None = Field(None, description="Folder the references' image paths are relative to "
                                     "(default: the file's image_folder, else the file's folder)")
    exclude_references: bool = Field(True, description="Drop candidates that are reference images (not applied "
                                     "to an input task file's candidate_image_paths, which are used as given)")
    use_task_subgroups: bool = Field(True, description="When --input is a task file (SPEC D2) with 'subgroups', "
                                     "use its keyword groups of the references and, when present, its "
                                     "'candidate_image_paths' (SPEC D3; relative paths are relative to the file's "
                                     "folder) instead of re-partitioning with CLIP, so released task files and the "
                                     "imbalanced-reference ablation replay exactly. False: re-partition with "
                                     "--keywords as for any reference file")
    max_chars: int = Field(400, ge=8, description="Longest generated string (characters) in the reply schema")
    charset: str = Field("any", pattern="^(ascii|any)$", description="'ascii': bounded ASCII pattern (constrained "
                         "decoding of small/random models; max_chars <= 128, options_format choices); 'any': plain "
                         "bounded strings in an open schema (API models: extra keys and items kept, as the original)")
    options_format: str = Field("lines", pattern="^(lines|choices)$", description="Where generated multiple-choice "
                                "options go: 'lines' = inside the question as lettered lines (the original's "
                                "instruction); 'choices' = a separate 'choices' list, lettered into lines when the "
                                "reply is parsed (needed by charset ascii: a pattern-constrained string cannot hold "
                                "a newline)")
    keep_fraction: float = Field(0.5, gt=0, le=1, description="Loss filter: keep this fraction of the samples "
                                 "with the highest target-model loss (SPEC D7: 50 %)")

    def input_uris(self) -> dict[str, list[str]]:
        """``--input`` (the references) and every ``--candidates`` source."""
        return {**super().input_uris(), "--candidates": list(self.candidates)}

    @field_validator("mode")
    @classmethod
    def _mode(cls, v: str) -> str:
        if v not in M.MODES:
            raise ValueError(f"unknown mode {v!r} (choose from {', '.join(M.MODES)})")
        return v

    @model_validator(mode="after")
    def _reply_format(self):
        MO.reply_schema(self.mode, self.min_gen_per_candidate, self.max_chars, self.charset,
                        options=self.options_format)  # raises ValueError for combinations that cannot work
        return self

    @field_validator("keywords")
    @classmethod
    def _keywords(cls, v: list[str]) -> list[str]:
        v = [k.strip() for k in v if k and k.strip()]
        if len(set(v)) != len(v):
            raise ValueError(f"duplicate keywords in {v}")
        return v


RECIPE = MMGenRecipe
#: the run report's gallery: candidate image, generated question/answer items, answer losses
REPORT = Gallery(image="candidate", text=("keyword", "items"), scores=("answer_loss", "count_mismatch"))


def _num(recipe: MMGenRecipe) -> int:
    return recipe.min_gen_per_candidate


def ingest_stages(recipe: MMGenRecipe) -> list[Stage]:
    """The CLIP partition (stages 1 and 1b), run by ``ingest`` over the images."""
    return [Stage("partition", "actors.clip:CLIPScorer",
                  defaults={"mode": "zero_shot", "keywords": list(recipe.keywords), "image_column": "image"})]


def build_messages(batch: dict, params) -> dict:
    """Stage: each prompt's items → OpenAI chat messages (JSON string): the mode's system prompt,
    then the items (images as path/URI ``image_url`` parts) and the generation instruction;
    ``params["options_format"]`` (the recipe's) says where multiple-choice options go."""
    options = params.get("options_format", "lines")
    out = []
    for mode, prompt, num, desc in zip(batch["mode"], batch["prompt"], batch["num_gen"], batch["dataset_description"]):
        out.append(json.dumps(M.chat_messages(mode, desc, json.loads(prompt), int(num), options), ensure_ascii=False))
    return {"messages": out}


def make_records(batch: dict, params, audit: bool = False) -> dict:
    """Stage (filter): validated reply → clean items and LLaVA records (per-mode rules).

    Rejects a row none of whose items survives cleaning; a count different from the asked
    ``num_gen`` is recorded in ``count_mismatch`` (the original only logged it)."""
    res = {k: [] for k in ("items", "records", "n_items", "n_records", "count_mismatch", R.ROW_REJECT)}
    for i in range(len(batch["id"])):
        mode, num = batch["mode"][i], int(batch["num_gen"][i])
        items, report = MO.parse_items(mode, batch["generate_parsed"][i], num)
        prompt = {"id": batch["id"][i], "keyword": batch["keyword"][i], "image_1": batch["image_1"][i],
                  "icl_indices": [int(x) for x in batch["icl_indices"][i]]}
        recs = MO.records_for(mode, items, prompt, batch["dataset_description"][i])
        res["items"].append(json.dumps(items, ensure_ascii=False))
        res["records"].append(json.dumps(recs, ensure_ascii=False))
        res["n_items"].append(len(items))
        res["n_records"].append(len(recs))
        res["count_mismatch"].append(bool(report["count_mismatch"]))
        res[R.ROW_REJECT].append(None if items else
                                 f"no usable item in the reply ({report['returned']} returned, "
                                 f"all empty after removing tags or missing keys)")
    return res


def stages(recipe: MMGenRecipe) -> list[Stage]:
    """The row stages, in order. Stage names are the keys of the recipe's ``stages``."""
    num = _num(recipe)
    # open schema for API models (extra keys and items kept, as the original did); closed and
    # bounded for constrained decoding (charset ascii), see udfs.mmgen_output.reply_schema
    schema = MO.reply_schema(recipe.mode, num, recipe.max_chars, recipe.charset, options=recipe.options_format)
    gen_defaults = {"response_schema": schema}
    if recipe.charset == "ascii":  # a budget the grammar's worst case always fits (notes/mmgen-vlm.md §3)
        max_items = schema["properties"][M.REPLY_KEY]["maxItems"]
        gen_defaults["max_tokens"] = MO.worst_case_tokens(recipe.mode, max_items, recipe.max_chars,
                                                          recipe.options_format) + 8
    return [
        Stage("build_messages", build_messages, ("mode", "prompt", "num_gen", "dataset_description"), ("messages",),
              defaults={"options_format": recipe.options_format}),
        llm_stage("generate", None, True, **gen_defaults),
        Stage("make_records", make_records,
              ("id", "mode", "keyword", "image_1", "icl_indices", "num_gen", "dataset_description", "generate_parsed"),
              ("items", "records", "n_items", "n_records", "count_mismatch"), filter=True),
        Stage("loss_score", "actors.vlm:AnswerLoss", defaults={"records_column": "records",
                                                                 "image_column": "candidate"}),
    ]


# ----------------------------------------------------------------------------- ingest

def _abs(uri: str) -> str:
    return uri if io.is_remote(uri) else os.path.abspath(os.path.expanduser(uri))


def list_candidates(sources: list[str]) -> list[str]:
    """Candidate image URIs (absolute, sorted, unique) from folders (recursive, image
    extensions only), single image files, ``.txt`` lists (one path per line) or ``.json``
    lists; relative list entries are resolved against the list's folder. Raises
    ``FileNotFoundError`` naming a source that does not exist, ``ValueError`` for an empty pool."""
    from pyarrow import fs as pafs

    found: list[str] = []
    for src in sources:
        src = _abs(src)
        fs, path = io.filesystem(src)
        kind = fs.get_file_info(path).type
        if kind == pafs.FileType.NotFound:
            raise FileNotFoundError(f"--candidates: {src} does not exist")
        if kind == pafs.FileType.Directory:
            found += [f for f in io.list_files(src) if M.is_image_path(f)]
        elif M.is_image_path(src):
            found.append(src)
        else:
            text = io.read_text(src)
            entries = json.loads(text) if src.lower().endswith(".json") else \
                [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
            if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
                raise ValueError(f"--candidates: {src} must hold a list of image paths")
            found += [_abs(M.join_uri(M.parent_uri(src), e)) if not io.is_remote(src) else M.join_uri(M.parent_uri(src), e)
                      for e in entries]
    out = sorted(set(found))
    if not out:
        raise ValueError(f"no candidate images found in {sources}")
    return out


def _partition(recipe: MMGenRecipe, images: list[str]) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    """Run the partition stage over ``images`` on Ray Data; returns (image → keyword,
    image → JSON scores, image → error reason)."""
    import ray.data

    from actors.models import resolve
    from jobs.core.runtime import add_stage

    stage = ingest_stages(recipe)[0]
    cfg = recipe.stages["partition"]
    ids = [R.content_id(u) for u in images]
    table = pa.table({"id": ids, "image": images, R.STATUS: [R.OK] * len(ids),
                      **{c: [""] * len(ids) for c in R.CONTROL_COLUMNS if c != R.STATUS}})
    n_blocks = max(1, -(-len(ids) // max(1, cfg.batch_size)))
    ds = add_stage(ray.data.from_arrow(table).repartition(n_blocks), stage, cfg, resolve(cfg.model))
    res = pa.concat_tables(ray.get(ds.to_arrow_refs()))
    stats.record(stats.stage_table(ds, [stage.name]))
    by_id = dict(zip(ids, images))
    kw, scores, errors = {}, {}, {}
    for r in res.select(["id", R.STATUS, R.REASON, "keyword", "keyword_scores"]).to_pylist():
        img = by_id[r["id"]]
        if r[R.STATUS] == R.OK:
            kw[img], scores[img] = r["keyword"], r["keyword_scores"]
        else:
            errors[img] = json.loads(r[R.REASON]).get("message", r[R.REASON])
    return kw, scores, errors


def _interleaved(prompts: list[dict]) -> list[dict]:
    """Prompts ordered so that any prefix keeps the subgroup shares (for ``--limit``)."""
    sizes: dict[int, int] = {}
    for p in prompts:
        sizes[p["subgroup"]] = sizes.get(p["subgroup"], 0) + 1
    return sorted(prompts, key=lambda p: ((int(p["id"].split("-")[1]) + 0.5) / sizes[p["subgroup"]], p["subgroup"]))


def _task_source(recipe: MMGenRecipe, refs: M.References) -> tuple[list[str], bool, bool]:
    """(keywords, references grouped by the input task file, candidates given by it). Raises
    ``ValueError`` when keywords or candidates are missing or contradict the task file."""
    groups = refs.subgroups if recipe.use_task_subgroups else None
    if groups is None:
        if not recipe.keywords:
            raise ValueError("--keywords is required (comma-separated, e.g. 'map,diagram,photo')")
        if not recipe.candidates:
            raise ValueError("--candidates is required (folders or file lists of candidate images)")
        return list(recipe.keywords), False, False
    keywords = [g["keyword"] for g in groups]
    if recipe.keywords and list(recipe.keywords) != keywords:
        raise ValueError(f"--keywords {list(recipe.keywords)} differ from the task file's subgroups {keywords}; "
                         "drop --keywords or set use_task_subgroups=false to re-partition")
    given = "candidate_image_paths" in groups[0]
    if given and recipe.candidates:
        raise ValueError("the task file lists candidate_image_paths; drop --candidates (or set "
                         "use_task_subgroups=false to re-partition)")
    if not given and not recipe.candidates:
        raise ValueError("--candidates is required (the task file has no candidate_image_paths)")
    return keywords, True, given


def ingest(recipe: MMGenRecipe) -> tuple[pa.Table, list[dict], int]:
    """Stages 1, 1b and 2: references, candidates, CLIP partition, task file, prompts.

    An input task file's ``subgroups`` (SPEC D2) and ``candidate_image_paths`` (D3) are used
    as given when present (``use_task_subgroups``; e.g. the original's imbalanced-reference
    ablation files): only what the file does not fix is partitioned with CLIP.
    Writes ``OUT/task.json``, ``OUT/partition.jsonl`` (keyword, cosines and ``source`` —
    ``clip`` or ``task_file`` — per image) and ``OUT/prompts.json`` (the original's
    generated-prompts schema, each prompt with its id). Returns the prompt rows, the rejects
    (malformed references, unreadable images, subgroups without candidates) and the number
    of prompts ``--limit`` left out. Raises ``ValueError`` for missing keywords/candidates,
    keywords or candidates that contradict the task file, or an unusable reference file.
    """
    src = _abs(recipe.input)
    refs = M.parse_references(src, io.read_bytes(src), recipe.task_description,
                              _abs(recipe.image_folder) if recipe.image_folder else None)
    keywords, refs_given, cands_given = _task_source(recipe, refs)
    recipe = recipe.model_copy(update={"keywords": keywords})
    refs.image_folder = _abs(refs.image_folder)
    rejects = list(refs.rejects)
    ref_uris = [M.join_uri(refs.image_folder, s["image_1"]) for s in refs.samples]
    ref_set = set(ref_uris)  # built once: a per-candidate rebuild is |refs| x |candidates| insertions
    by_kw: dict[str, list[str]] = {k: [] for k in keywords}
    if cands_given:
        for g in refs.subgroups:
            by_kw[g["keyword"]] = [_abs(c) if not io.is_remote(c) else c for c in g["candidate_image_paths"]]
        candidates = []
    else:
        candidates = list_candidates(recipe.candidates)
        if recipe.exclude_references:
            candidates = [c for c in candidates if c not in ref_set]
    to_classify = set(candidates) if refs_given else ref_set | set(candidates)
    kw, scores, errors = _partition(recipe, sorted(to_classify)) if to_classify else ({}, {}, {})
    if not refs_given:
        keep = [k for k, u in enumerate(ref_uris) if u in kw]
        for k, u in enumerate(ref_uris):
            if u not in kw:
                rejects.append({"id": refs.samples[k]["id"], "stage": "partition",
                                "reason": f"reference image_1 {u}: {errors.get(u, 'not classified')}"})
        refs.samples = [refs.samples[k] for k in keep]
        ref_uris = [ref_uris[k] for k in keep]
        if not refs.samples:
            raise ValueError("no reference image could be read")
    for c in candidates:
        if c not in kw:
            rejects.append({"id": R.content_id(c), "stage": "partition", "reason": f"candidate {c}: {errors[c]}"})
        else:
            by_kw[kw[c]].append(c)
    task = M.task_file(refs, keywords, None if refs_given else [kw[u] for u in ref_uris])
    for g in task["subgroups"]:  # stage 1b, restored: written into the task file (SPEC D3)
        g["candidate_image_paths"] = by_kw[g["keyword"]] if cands_given else sorted(by_kw[g["keyword"]])
    out = recipe.output or "."
    io.write_text(io.join(out, "task.json"), json.dumps(task, indent=1, ensure_ascii=False))
    assigned = {u: (kw[u], json.loads(scores[u]), "clip") for u in kw}
    if refs_given:
        for g in task["subgroups"]:
            assigned.update({ref_uris[i]: (g["keyword"], None, "task_file") for i in g["reference_sample_idx"]})
    if cands_given:
        assigned.update({c: (k, None, "task_file") for k, cs in by_kw.items() for c in cs})
    io.write_text(io.join(out, "partition.jsonl"), "".join(
        json.dumps({"image": u, "role": "reference" if u in ref_set else "candidate", "keyword": a[0],
                    "scores": a[1], "source": a[2]}, ensure_ascii=False) + "\n" for u, a in sorted(assigned.items())))
    candidates = sorted({c for cs in by_kw.values() for c in cs})

    planned, skipped = M.plan_prompts(task, by_kw, recipe.total_gen, recipe.min_gen_per_candidate,
                                      recipe.num_icl_samples, recipe.seed)
    rejects += skipped
    planned = _interleaved(planned)
    n = len(planned) if recipe.limit is None else min(recipe.limit, len(planned))
    not_selected = len(planned) - n
    planned = planned[:n]
    if not planned:
        raise ValueError("no prompt could be planned (no candidate image in any subgroup with references)")
    folder = M.common_folder(candidates)
    for p in planned:
        p["prompt"] = M.prompt_items(recipe.mode, task, p["icl_indices"], p["candidate"])
        p["image_1"] = M.relative_to(folder, p["candidate"])
    io.write_text(io.join(out, "prompts.json"), json.dumps({
        "task_desc_path": io.join(out, "task.json"), "dataset_description": refs.dataset_description,
        "num_icl_samples": recipe.num_icl_samples, "mode": recipe.mode,
        "min_gen_per_candidate": recipe.min_gen_per_candidate, "total_gen": recipe.total_gen,
        "image_folder": folder,
        "prompts": [{"id": p["id"], "keyword": p["keyword"],
                     "prompt": [it.get("text", it.get("image")) for it in p["prompt"]],
                     "icl_indices": p["icl_indices"]} for p in planned]}, indent=1, ensure_ascii=False))
    from actors.models import resolve

    placeholder = "partition" if to_classify and resolve(recipe.stages["partition"].model).placeholder else ""
    table = pa.table({
        "id": pa.array([p["id"] for p in planned], pa.string()),
        "keyword": pa.array([p["keyword"] for p in planned], pa.string()),
        "subgroup": pa.array([p["subgroup"] for p in planned], pa.int64()),
        "mode": pa.array([recipe.mode] * n, pa.string()),
        "candidate": pa.array([p["candidate"] for p in planned], pa.string()),
        "image_1": pa.array([p["image_1"] for p in planned], pa.string()),
        "icl_indices": pa.array([p["icl_indices"] for p in planned], pa.list_(pa.int64())),
        "prompt": pa.array([json.dumps(p["prompt"], ensure_ascii=False) for p in planned], pa.string()),
        "num_gen": pa.array([_num(recipe)] * n, pa.int64()),
        "dataset_description": pa.array([refs.dataset_description] * n, pa.string()),
        R.PLACEHOLDER: pa.array([placeholder] * n, pa.string()),
    })
    return table, rejects, not_selected


# ----------------------------------------------------------------------------- export

def _loss_audit(recipe: MMGenRecipe) -> bool:
    from actors.models import resolve

    cfg = recipe.stages.get("loss_score")
    if cfg is None or not cfg.enabled:
        return False
    return bool(cfg.audit) if cfg.audit is not None else resolve(cfg.model).placeholder


def export(rows: pa.Table, recipe: MMGenRecipe, out: str) -> dict:
    """Loss filter over the samples, then ``generated.json``, ``llava_train.json`` and
    ``rejects/loss_filter.jsonl``; returns counts and the loss filter's funnel row."""
    ok = rows.filter(pc.equal(rows.column(R.STATUS), R.OK))
    has_loss = "answer_loss" in ok.column_names
    samples: list[dict] = []
    cols = ["records"] + (["answer_loss", "answer_tokens"] if has_loss else [])
    for r in (ok.select(cols).to_pylist() if ok.num_rows else []):
        recs = json.loads(r["records"])
        for k, rec in enumerate(recs):
            if has_loss:
                rec["loss"] = r["answer_loss"][k]
                rec["loss_tokens"] = r["answer_tokens"][k]
            samples.append(rec)
    samples.sort(key=lambda s: s["id"])
    folder = ""
    prompts_uri = io.join(out, "prompts.json")
    if io.exists(prompts_uri):
        folder = json.loads(io.read_text(prompts_uri))["image_folder"]
    desc = ok.column("dataset_description")[0].as_py() if ok.num_rows else None
    audit = _loss_audit(recipe)
    funnel = []
    kept, dropped = samples, []
    if has_loss and samples:
        mask = MO.select_highest([s["loss"] for s in samples], recipe.keep_fraction, [s["id"] for s in samples])
        kept_losses = [s["loss"] for s, m in zip(samples, mask) if m]
        threshold = min(kept_losses) if kept_losses else None
        would = [s for s, m in zip(samples, mask) if not m]
        if audit:
            for s in would:
                s["loss_filter_would_reject"] = True
        else:
            kept = [s for s, m in zip(samples, mask) if m]
            dropped = would
        reason = (f"answer loss below the {recipe.keep_fraction:.0%} highest "
                  f"(lowest kept loss {threshold:.4f})" if threshold is not None else "no loss")
        io.write_text(io.join(out, "rejects", "loss_filter.jsonl"), "".join(
            json.dumps({"id": s["id"], "stage": "loss_filter", "reason": reason, "loss": s["loss"], "sample": s},
                       ensure_ascii=False) + "\n" for s in dropped))
        funnel.append({"stage": "loss_filter", "unit": "samples", "in": len(samples), "out": len(kept),
                       "rejected": len(dropped), "errored": 0, "keep_fraction": recipe.keep_fraction,
                       "lowest_kept_loss": threshold, **({"audit_would_reject": len(would)} if audit else {})})
    generated = {"image_folder": folder, "dataset_description": desc, "mode": recipe.mode,
                 "len_samples": len(kept), "samples": kept}
    io.write_text(io.join(out, "generated.json"), json.dumps(generated, indent=1, ensure_ascii=False))
    io.write_text(io.join(out, "llava_train.json"),
                  json.dumps([MO.llava_record(s) for s in kept], indent=1, ensure_ascii=False))
    mismatch = sum(1 for v in ok.column("count_mismatch").to_pylist() if v) if "count_mismatch" in ok.column_names \
        else 0
    return {"prompts_ok": ok.num_rows, "samples_generated": len(samples), "samples_kept": len(kept),
            "loss_filter_audit": audit, "count_mismatch_rows": mismatch, "image_folder": folder, "funnel": funnel}


# ----------------------------------------------------------------------------- command line

def add_arguments(ap) -> None:
    """MM-GEN's own options (``python -m jobs mmgen --help``)."""
    ap.add_argument("--candidates", help="candidate images: comma-separated folders / file lists (local or s3://); "
                    "not needed when --input is a task file with candidate_image_paths")
    ap.add_argument("--keywords", help="comma-separated partition keywords, e.g. 'map,diagram,photo' (default: the "
                    "subgroups of an input task file)")
    ap.add_argument("--mode", choices=M.MODES, help="generation mode (default vqa_nr)")
    ap.add_argument("--total-gen", type=int, help="samples to generate in total")
    ap.add_argument("--num-icl-samples", type=int, help="in-context examples per prompt (default 1)")
    ap.add_argument("--min-gen-per-candidate", type=int, help="items asked per prompt (default 1)")
    ap.add_argument("--task-description", help="task description (overrides the file's dataset_description)")
    ap.add_argument("--image-folder", help="folder the reference image paths are relative to")
    ap.add_argument("--keep-fraction", type=float, help="loss filter: fraction of highest-loss samples kept")


def recipe_fields(args) -> dict:
    """Recipe fields from the command line (None = keep the recipe's)."""
    split = (lambda s: [x.strip() for x in s.split(",") if x.strip()] if s is not None else None)
    return {"candidates": split(args.candidates), "keywords": split(args.keywords), "mode": args.mode,
            "total_gen": args.total_gen, "num_icl_samples": args.num_icl_samples,
            "min_gen_per_candidate": args.min_gen_per_candidate, "task_description": args.task_description,
            "image_folder": args.image_folder, "keep_fraction": args.keep_fraction}
