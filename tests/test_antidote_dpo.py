"""Antidote end to end (issue 19), on CPU: an Antidote-like output folder (the query files and PNG
images ``jobs.antidote``'s export writes, built from real COCO photos by ``tests.helpers.
antidote_output``) -> ``antidote-pairs`` with the evaluation hook (a Ray Data job: the tiny LLaVA
placeholder answers every query twice through one shared engine, MiniLM embeds the answers) ->
``antidote-dpo-train`` for 2 DPO steps on Ray Train (TRL + LoRA) -> the checkpoint reloads with
identical logits -> the same output resumes to step 3 -> the exported model answers a query again
in the shared LLM stage.

Why not chain from ``tests/test_antidote_e2e.py``'s output: that test writes to a moto S3 server
that is gone when it ends, and a full Antidote run costs minutes (SmolLM2 on vLLM, SD3 and
Grounding DINO placeholders); the folder built here has the same files and fields, real photos,
and all four query types, for about a second."""
from __future__ import annotations

import json
import math
import os

import pyarrow.parquet as pq
import pytest

from jobs.core import cli
from tests.helpers import antidote_output
from udfs import antidote_pairs as P

ORIGINAL_MODES = {"cpq": "answer_hint", "tpq": "answer", "pope": "answer", "desc": "answer_hint"}


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    """The placeholder tiny LLaVA built once into a private MMSYNTH_CACHE (forwarded to Ray workers)."""
    from tests.helpers import placeholder_models

    yield from placeholder_models(tmp_path_factory, "antidote-dpo-cache",
                                  {"llava": {"backend": "transformers", "model": "placeholder:tiny-llava"}})


def _check_pairs_run(ant: str, out: str) -> list[dict]:
    m = json.load(open(os.path.join(out, "manifest.json")))
    names = [f["stage"] for f in m["funnel"]]
    assert names == ["ingest", "answer_prompts", "answer", "hint_prompts", "answer_hint", "judge_prompts",
                     "premise_judge", "eval_verdict", "answer_similarity", "pair_select",
                     "pairs: cpq", "pairs: tpq", "pairs: pope", "pairs: desc"]
    for f in m["funnel"]:
        assert f["in"] == f["out"] + f["rejected"] + f["errored"] + f.get("not_selected", 0), f
    assert m["funnel"][0]["in"] == 16 and all(f["in"] == 4 for f in m["funnel"][-4:])
    assert set(m["placeholder_stages"]) == {"answer", "answer_hint", "premise_judge"}
    (engine,) = m["engines"]  # answers and judge on one loaded model (same spec)
    assert engine["stages"] == ["answer", "answer_hint", "premise_judge"]
    assert {s: v["requests"] for s, v in engine["served"].items()} == {"answer": 16, "answer_hint": 16,
                                                                       "premise_judge": 8}  # CPQ + TPQ only
    pairs = pq.read_table(os.path.join(out, "pairs.parquet")).to_pylist()
    rejects = [json.loads(x) for x in open(os.path.join(out, "rejects", "rejects.jsonl"))]
    assert len(pairs) + len(rejects) == 16 and len(pairs) >= 4
    rejected_rows = {r["id"]: r for r in pq.read_table(os.path.join(out, "rejects", "rejects.parquet")).to_pylist()}
    for r in rejects:  # every dropped pair says why, with its cosine
        assert r["stage"] == "pair_select"
        cos = rejected_rows[r["id"]]["answer_cosine"]
        assert r["reason"] == f"no contrast: answer cosine {cos:.4f} > 0.9" and cos > 0.9
    queries = {f"{t}:{q['id']}": q for t in P.QUERY_TYPES
               for q in map(json.loads, open(os.path.join(ant, "queries", f"{t}_list.jsonl")))}
    for p in pairs:
        q = queries[p["id"]]
        assert p["cosine"] <= 0.9 and p["question"] == q["text"] and p["image"] == os.path.join(ant, q["image"])
        assert "answer" in p["_placeholder"]
        plain, hinted = p["answer"], p["answer_hint"]
        assert (p["chosen"], p["rejected"]) == ((hinted, plain) if ORIGINAL_MODES[p["query_type"]] == "answer_hint"
                                                else (plain, hinted))
    # ms-swift files, one per query type, exactly the documented fields
    for t in P.QUERY_TYPES:
        lines = [json.loads(x) for x in open(os.path.join(out, "train", f"dpo_{t}_list.jsonl"))]
        mine = sorted((p for p in pairs if p["query_type"] == t), key=lambda p: p["id"])
        assert [set(x) for x in lines] == [{"query", "response", "rejected_response", "images"}] * len(mine)
        assert [(x["query"], x["response"], x["rejected_response"], x["images"]) for x in lines] == [
            ("<image>\n" + p["question"], p["chosen"], p["rejected"], [p["image"]]) for p in mine]
        resp = [json.loads(x) for x in open(os.path.join(out, "responses", f"res_{t}_list.jsonl"))]
        assert len(resp) == 4 and all(set(x) >= {"question", "answer", "answer_hint", "image_id"} for x in resp)
    # the TRL dataset beside them
    from datasets import load_from_disk

    ds = load_from_disk(os.path.join(out, "trl"))
    assert ds["id"] == sorted(p["id"] for p in pairs)
    row = ds[0]
    first = min(pairs, key=lambda p: p["id"])
    assert row["prompt"] == [{"role": "user", "content": first["question"]}]
    assert row["chosen"] == [{"role": "assistant", "content": first["chosen"]}] and row["images"][0].size[0] > 0
    # the evaluation hook: per type, labelled as machinery only
    ev = json.load(open(os.path.join(out, "eval.json")))
    assert ev["placeholder"] is True and "machinery only" in ev["note"]
    assert {t: ev["by_type"][t]["n"] for t in P.QUERY_TYPES} == {"cpq": 4, "tpq": 4, "pope": 4, "desc": 4}
    for t in ("cpq", "tpq", "pope"):
        v = ev["by_type"][t]
        assert v["share"] == v["correct"] / 4 and v["expected"] == P.EXPECTED[t]
    return pairs


@pytest.mark.slow
def test_queries_to_pairs_to_dpo_reload_resume_and_answer_again(ray_local, tiny_llava, tmp_path, capsys):
    import torch

    from actors.llm import LLMStage
    from actors.models import resolve
    from actors.vlm_dpo import MODEL_FILES
    from actors.vlm_lora import load_finetuned

    ant = antidote_output(tmp_path / "antidote", n=4)
    out = str(tmp_path / "pairs")
    assert cli.main(["antidote-pairs", "--input", ant, "--output", out, "--set", "block_rows=8", "--evaluate",
                     "--set", "premise_judge.model.model=placeholder:tiny-llava"]) == 0
    pairs = _check_pairs_run(ant, out)

    # two DPO steps on Ray Train
    ckpt = str(tmp_path / "dpo")
    args = ["antidote-dpo-train", "--data", out, "--output", ckpt, "--save-steps", "1", "--threads", "1"]
    assert cli.main([*args, "--max-steps", "2"]) == 0
    m1 = json.load(open(os.path.join(ckpt, "manifest.json")))
    curve = m1["loss_curve"]
    assert (m1["global_step"], m1["resumed_from_step"], m1["steps_this_run"]) == (2, 0, 2)
    assert [p["step"] for p in curve] == [1, 2] and [p["samples"] for p in curve] == [2, 2]
    # step 1: the policy is the reference (LoRA B = 0), so TRL's sigmoid DPO loss is exactly log 2
    assert curve[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and curve[0]["rewards_margin"] == 0.0
    assert math.isfinite(curve[1]["loss"]) and curve[1]["loss"] != curve[0]["loss"]
    assert m1["reload_check"]["identical"] and m1["placeholder_stages"] == ["dpo_train"]
    assert m1["data"]["pairs"] == len(pairs) and m1["base_model"]["placeholder"] is True
    model_dir = m1["model"]
    assert set(MODEL_FILES) <= set(os.listdir(model_dir))
    meta = json.load(open(os.path.join(model_dir, "base.json")))
    assert meta["spec"]["model"] == "placeholder:tiny-llava" and meta["global_step"] == 2
    # the adapter changed the model: with it disabled the probe's logits differ from the stored ones
    model, _, _ = load_finetuned(model_dir)
    lora = [n for n, _ in model.named_parameters() if "lora_" in n]
    assert lora and all(".language_model." in n for n in lora)
    stored = torch.load(os.path.join(model_dir, "reload_check.pt"))
    from actors.vlm_dpo import probe_record
    from actors.vlm_lora import Collator, probe_logits
    from transformers import AutoProcessor

    probe = probe_record(min(pairs, key=lambda p: p["id"]))
    assert stored["question_id"] == probe["question_id"]
    batch = Collator(AutoProcessor.from_pretrained(model_dir), 1024, "never")([probe])
    assert torch.equal(probe_logits(model, batch, torch.device("cpu"), torch.float32), stored["logits"])
    with model.disable_adapter():
        assert float((probe_logits(model, batch, torch.device("cpu"), torch.float32) - stored["logits"]).abs().max()) > 0

    # the same output resumes: step 3 only, on the new schedule
    assert cli.main([*args, "--max-steps", "3"]) == 0
    m2 = json.load(open(os.path.join(ckpt, "manifest.json")))
    assert (m2["global_step"], m2["resumed_from_step"], m2["steps_this_run"]) == (3, 2, 1)
    assert m2["loss_curve"][:2] == curve and m2["loss_curve"][2]["step"] == 3
    assert m2["loss_curve"][2]["lr"] == pytest.approx(1e-3 / 3)  # linear decay to 0 over 3 steps, at step index 2
    assert m2["reload_check"]["identical"] and "resumed from 2" in capsys.readouterr().out
    page = open(os.path.join(ckpt, "report.html")).read()
    assert 'id="loss-chart"' in page and 'id="placeholder-banner"' in page

    # the exported model answers a query again in the shared LLM stage, labelled placeholder
    resolved = resolve({"backend": "transformers", "model": m2["model"]})
    assert resolved.placeholder
    stage = LLMStage(resolved.model_dump(), {"temperature": 0.0, "seed": 0, "max_tokens": 8,
                                             "regex": "[A-Za-z][A-Za-z ,.']{0,40}"})
    q = min(pairs, key=lambda p: p["id"])
    res = stage({"id": [q["id"]], "messages": [P.answer_messages(q["image"], q["question"])]})
    assert res["generated_text"][0] and res["__row_error__"][0] is None and res["llm_model"][0] == m2["model"]
