"""MM-GEN: references, partition, allocation, samplers, ingest, prompts, parsers and record rules
(pure logic); the vision LLM stage on the tiny LLaVA; the per-sample answer loss; and the whole
job end to end on real ScienceQA references. The wire side (OpenAI-compatible servers, JSON
mode, the constrained grammar) is in test_mmgen_reply.py."""
from __future__ import annotations

import base64
import io as _io
import json
import os
import random
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from udfs import mmgen as M
from udfs import mmgen_output as MO
from udfs import rows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
VQA = os.path.join(SHARED, "data", "vqa", "scienceqa_test_subset.jsonl")
COCO = os.path.join(SHARED, "data", "captions", "coco_mini_images")
SQA_IMAGES = os.path.join(SHARED, "data", "vqa", "scienceqa_images")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ============================================================================ references

def test_parse_references_three_formats(tmp_path):
    data = {"image_folder": "imgs", "dataset_description": "Chart understanding.",
            "samples": [{"id": "a", "image_1": "a.png", "conversations": [
                {"from": "human", "value": "<image> What is the max?"}, {"from": "gpt", "value": "7"}]},
                {"id": "b", "image_1": "b.png", "conversations": [{"from": "human", "value": "no answer"}]}]}
    p = tmp_path / "ref.json"
    p.write_text(json.dumps(data))
    refs = M.parse_references(str(p), p.read_bytes())
    assert refs.source_format == "mmgen" and refs.image_folder == f"{tmp_path}/imgs"
    assert [s["id"] for s in refs.samples] == ["a"] and refs.dataset_description == "Chart understanding."
    assert len(refs.rejects) == 1 and "sample 2" in refs.rejects[0]["reason"] and "conversations" in refs.rejects[0]["reason"]

    llava = [{"id": "x", "image": "sub/x.jpg", "conversations": data["samples"][0]["conversations"]}]
    p2 = tmp_path / "llava.json"
    p2.write_text(json.dumps(llava))
    with pytest.raises(ValueError, match="--task-description"):
        M.parse_references(str(p2), p2.read_bytes())
    r2 = M.parse_references(str(p2), p2.read_bytes(), dataset_description="Maps.")
    assert r2.source_format == "llava" and r2.samples[0]["image_1"] == "sub/x.jpg" and r2.image_folder == str(tmp_path)

    lines = [json.dumps({"image": "i.png", "question": "Which?", "choices": ["cat", "dog"], "answer": 1}),
             json.dumps({"image": "j.png", "question": "Which?", "choices": ["cat"], "answer": 4}),
             "{not json", json.dumps({"question": "no image", "answer": "x"})]
    p3 = tmp_path / "q.jsonl"
    p3.write_text("\n".join(lines))
    r3 = M.parse_references(str(p3), p3.read_bytes(), dataset_description="Science QA.")
    conv = r3.samples[0]["conversations"]
    assert conv[0]["value"] == "<image>\nWhich?\nA. cat\nB. dog" and conv[1]["value"] == "B. dog"
    reasons = " | ".join(r["reason"] for r in r3.rejects)
    assert "line 2: field 'answer'" in reasons and "line 3: invalid JSON" in reasons and "line 4: field 'image'" in reasons


def test_scienceqa_references_read_from_shared():
    if not os.path.exists(VQA):
        pytest.skip("../shared/data/vqa not present")
    refs = M.parse_references(VQA, open(VQA, "rb").read(), dataset_description="Science QA")
    assert len(refs.samples) == 61 and not refs.rejects
    assert all(os.path.exists(M.join_uri(refs.image_folder, s["image_1"])) for s in refs.samples)


# ============================================================================ partition, allocation, sampling

def test_partition_argmax_and_ties():
    kw = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=np.float32)
    imgs = np.array([[0.9, 0.1, 0.0], [0.1, 0.2, 0.97], [0.6, 0.6, 0.0], [0.0, 0.5, 0.5]], dtype=np.float32)
    imgs /= np.linalg.norm(imgs, axis=1, keepdims=True)
    assert M.assign_keywords(imgs @ kw.T).tolist() == [0, 2, 0, 1]  # ties -> the keyword listed first
    with pytest.raises(ValueError):
        M.assign_keywords(np.zeros((3, 0)))
    refs = M.References("/f", "d", [{"id": str(i), "image_1": f"{i}.png", "conversations": []} for i in range(4)])
    task = M.task_file(refs, ["bar", "pie", "line"], ["bar", "line", "bar", "pie"])
    assert [(g["keyword"], g["reference_sample_idx"]) for g in task["subgroups"]] == \
        [("bar", [0, 2]), ("pie", [3]), ("line", [1])]


def test_allocation_shares_and_rounding_up():
    assert M.allocate({"bar": 1203, "pie": 198, "line": 519}, 150000) == {"bar": 93985, "pie": 15469, "line": 40547}
    assert M.allocate({"a": 1, "b": 2}, 10, 3) == {"a": 2, "b": 3}  # ceil(10/3/3), ceil(20/3/3)
    assert M.allocate({"a": 3, "b": 7}, 30) == {"a": 9, "b": 21}   # exact shares are not rounded up
    assert sum(M.allocate({"a": 1, "b": 1, "c": 1}, 10).values()) == 12  # total may exceed total_gen
    assert M.allocate({"a": 0, "b": 5}, 4) == {"a": 0, "b": 4}
    with pytest.raises(ValueError):
        M.allocate({"a": 0}, 4)


def test_epoch_sampler_no_repeats_within_epoch_and_seeded():
    items = list(range(7))
    s = M.EpochSampler(items, random.Random(3))
    draws = [s.take(1)[0] for _ in range(7 * 5)]
    for e in range(5):
        assert sorted(draws[7 * e:7 * (e + 1)]) == items  # every epoch is a permutation
    s2 = M.EpochSampler(items, random.Random(3))
    assert [s2.take(1)[0] for _ in range(35)] == draws
    assert draws[:7] != draws[7:14] or draws[7:14] != draws[14:21]  # reshuffled between epochs
    s3 = M.EpochSampler(items, random.Random(1))
    for _ in range(40):  # takes of 3 straddle epoch boundaries without duplicates
        assert len(set(s3.take(3))) == 3


def _task(n_refs: dict[str, int]):
    samples, groups, k = [], [], 0
    for kw, n in n_refs.items():
        groups.append({"keyword": kw, "reference_sample_idx": list(range(k, k + n))})
        samples += [{"id": f"r{k + j}", "image_1": f"{kw}/{j}.png",
                     "conversations": [{"from": "human", "value": f"<image>\nQ about {kw} {j}"},
                                       {"from": "gpt", "value": f"A{j}"}]} for j in range(n)]
        k += n
    return {"image_folder": "/refs", "dataset_description": "Chart QA.", "subgroups": groups, "samples": samples}


def test_plan_prompts_shares_same_subgroup_and_seed():
    task = _task({"bar": 6, "pie": 2, "line": 0})
    cands = {"bar": [f"/c/bar{i}.png" for i in range(5)], "pie": ["/c/pie0.png", "/c/pie1.png"]}
    prompts, skipped = M.plan_prompts(task, cands, total_gen=16, num_icl_samples=2, seed=7)
    by = Counter(p["keyword"] for p in prompts)
    assert by == {"bar": 12, "pie": 4} and not skipped
    for p in prompts:
        g = next(g for g in task["subgroups"] if g["keyword"] == p["keyword"])
        assert set(p["icl_indices"]) <= set(g["reference_sample_idx"]) and len(set(p["icl_indices"])) == 2
        assert p["candidate"] in cands[p["keyword"]]
    bar = [p["candidate"] for p in prompts if p["keyword"] == "bar"]
    assert sorted(bar[:5]) == sorted(cands["bar"]) and sorted(bar[5:10]) == sorted(cands["bar"])
    again, _ = M.plan_prompts(task, cands, total_gen=16, num_icl_samples=2, seed=7)
    other, _ = M.plan_prompts(task, cands, total_gen=16, num_icl_samples=2, seed=8)
    assert again == prompts and other != prompts
    assert len({p["id"] for p in prompts}) == len(prompts)
    _, skipped = M.plan_prompts(task, {"bar": cands["bar"]}, total_gen=16)
    assert len(skipped) == 1 and "'pie' has 2 references but no candidate" in skipped[0]["reason"]


# ============================================================================ ingest (CLIP partition faked)

def _refs_file(tmp_path, n, subgroups=None, bad=()):
    """An MM-GEN data file of ``n`` samples (``bad``: indices written without conversations)."""
    samples = [{"id": f"s{k}", "image_1": f"refs/{k}.png", "conversations": [] if k in bad else [
        {"from": "human", "value": f"<image>\nQ{k}?"}, {"from": "gpt", "value": f"A{k}"}]} for k in range(n)]
    doc = {"image_folder": "", "dataset_description": "Chart QA.", "samples": samples}
    if subgroups is not None:
        doc["subgroups"] = subgroups
    path = tmp_path / "task_in.json"
    path.write_text(json.dumps(doc))
    return str(path)


@pytest.fixture
def fake_partition(monkeypatch):
    """Replaces the CLIP partition (a Ray job) by a rule: the keyword is the one whose first word
    the file name starts with. Records which images it was asked to classify."""
    from jobs import mmgen as J

    calls = []

    def partition(recipe, images):
        calls.append(list(images))
        kw = {}
        for u in images:
            name = os.path.basename(u)
            kw[u] = next((k for k in recipe.keywords if name.startswith(k.split()[0])), recipe.keywords[0])
        return kw, {u: json.dumps({kw[u]: 1.0}) for u in images}, {}
    monkeypatch.setattr(J, "_partition", partition)
    return calls


def _mmgen_recipe(tmp_path, refs, **fields):
    from jobs import mmgen as J
    from jobs.core.recipe import load_recipe

    return load_recipe(J.RECIPE, "mmgen", "offline", input=refs, output=str(tmp_path / "out"), **fields)


def test_ingest_builds_the_reference_set_once(tmp_path, fake_partition, monkeypatch):
    """ChartQA-sized ingest: one reference set, not one per candidate (28,299 x 1,920 insertions)."""
    import builtins

    from jobs import mmgen as J

    refs = _refs_file(tmp_path, 40)
    cands = tmp_path / "candidates.txt"
    cands.write_text("\n".join(f"/pool/{'bar' if k % 3 else 'pie'}{k}.png" for k in range(600)))
    built = []

    def counting_set(iterable=()):
        out = builtins.set(iterable)
        built.append(len(out))
        return out
    monkeypatch.setattr(J, "set", counting_set, raising=False)  # module globals shadow builtins
    recipe = _mmgen_recipe(tmp_path, refs, keywords=["bar chart", "pie chart"], candidates=[str(cands)], total_gen=6)
    table, rejects, _ = J.ingest(recipe)
    assert table.num_rows == 6 and not rejects
    assert len(fake_partition[0]) == 640  # references and candidates, each once
    assert len(built) <= 4, f"{len(built)} sets built during ingest"


def test_ingest_replays_a_task_file(tmp_path, fake_partition):
    """A released task file's subgroups and candidate_image_paths are used as given (no CLIP)."""
    from jobs import mmgen as J

    groups = [{"keyword": "bar chart", "reference_sample_idx": [0, 1, 3, 4, 5, 6],
               "candidate_image_paths": ["cands/b0.png", "cands/b1.png", "/abs/b2.png"]},
              {"keyword": "pie chart", "reference_sample_idx": [7], "candidate_image_paths": ["cands/p0.png"]}]
    refs = _refs_file(tmp_path, 8, groups, bad=(4,))  # sample 4 is malformed: its index leaves the subgroup
    recipe = _mmgen_recipe(tmp_path, refs, total_gen=12, num_icl_samples=1)
    table, rejects, _ = J.ingest(recipe)
    assert fake_partition == []  # nothing re-partitioned
    assert [r["id"] for r in rejects] == ["s4"]
    task = json.load(open(tmp_path / "out" / "task.json"))
    by = {g["keyword"]: g for g in task["subgroups"]}
    assert [task["samples"][k]["id"] for k in by["bar chart"]["reference_sample_idx"]] == ["s0", "s1", "s3", "s5", "s6"]
    assert [task["samples"][k]["id"] for k in by["pie chart"]["reference_sample_idx"]] == ["s7"]
    assert by["bar chart"]["candidate_image_paths"] == [f"{tmp_path}/cands/b0.png", f"{tmp_path}/cands/b1.png",
                                                        "/abs/b2.png"]
    rows_ = table.to_pylist()
    assert Counter(r["keyword"] for r in rows_) == {"bar chart": 10, "pie chart": 2}  # the file's 5:1 shares
    for r in rows_:
        assert r["candidate"] in by[r["keyword"]]["candidate_image_paths"]
        assert set(r["icl_indices"]) <= set(by[r["keyword"]]["reference_sample_idx"])
    # subgroups without candidate paths: references keep the file's groups, only candidates are classified
    for g in groups:
        del g["candidate_image_paths"]
    refs = _refs_file(tmp_path, 8, groups)
    cands = tmp_path / "c.txt"
    cands.write_text("/pool/pie1.png\n/pool/bar2.png\n")
    table, _, _ = J.ingest(_mmgen_recipe(tmp_path, refs, total_gen=7, candidates=[str(cands)]))
    assert fake_partition == [["/pool/bar2.png", "/pool/pie1.png"]]
    assert {r["keyword"]: r["candidate"] for r in table.to_pylist()} == {"bar chart": "/pool/bar2.png",
                                                                        "pie chart": "/pool/pie1.png"}
    with pytest.raises(ValueError, match="keywords"):
        J.ingest(_mmgen_recipe(tmp_path, refs, total_gen=7, candidates=[str(cands)], keywords=["map"]))
    bad = _refs_file(tmp_path, 3, [{"keyword": "bar chart", "reference_sample_idx": [0, 9]}])
    with pytest.raises(ValueError, match=r"subgroups\[0\]\.reference_sample_idx"):
        J.ingest(_mmgen_recipe(tmp_path, bad, candidates=[str(cands)]))


# ============================================================================ prompts per mode

def test_prompt_items_and_messages_per_mode():
    task = _task({"bar": 3})
    for mode in M.MODES:
        items = M.prompt_items(mode, task, [2, 0], "/c/x.png")
        msgs = M.chat_messages(mode, "Chart QA.", items, 3)
        system, user = msgs[0]["content"], msgs[1]["content"]
        images = [p["image_url"]["url"] for p in user if p["type"] == "image_url"]
        texts = [p["text"] for p in user if p["type"] == "text"]
        if mode in ("vqa", "vqa_nr", "tqa", "descript"):
            assert texts[0] == "Example 1" and texts[2] == "Example 2"
            assert texts[1] == "Q: Refer to the first image.\nQ about bar 2\n A: A2"
            assert texts[3].startswith("Q: Refer to the second image.\nQ about bar 0")
            assert images[:2] == ["/refs/bar/2.png", "/refs/bar/0.png"]
        else:
            assert not any(t.startswith("Example") for t in texts)
        assert (images[-1] == "/c/x.png") == (mode != "tqa")
        assert "Chart QA." in system or mode == "generic"
        assert "exactly 3" in texts[-1] and all(f'"{k}"' in texts[-1] for k in M.ITEM_KEYS[mode])
    assert "Chart QA" not in M.system_prompt("generic", "Chart QA.")
    assert "Refer to the second image." == M.clean_example_text("<image_2>", 2)
    assert M.clean_example_text("<image> x <b>bold</b>", 1) == "Refer to the first image. x bold"


# ============================================================================ parsers and records

PROMPT = {"id": "p00-000001", "keyword": "bar", "icl_indices": [3], "image_1": "c/x.png"}


def test_parse_items_cleans_and_counts():
    items, rep = MO.parse_items("vqa_nr", json.dumps([{"Q": "What <image> is max?", "A": "7", "choices": ["6", "7"]},
                                                     {"Q": "<b></b>", "A": "x"}]), 3)
    assert items == [{"Q": "What  is max?\nA. 6\nB. 7", "A": "7"}]
    assert rep == {"expected": 3, "returned": 2, "kept": 1, "count_mismatch": True}
    _, rep = MO.parse_items("descript", [{"A": "a"}, {"A": "b"}], 2)
    assert rep["count_mismatch"] is False


def test_record_rules_per_mode():
    vqa = MO.records_for("vqa", [{"Q": "Q1", "R": "because", "A": "B"}], PROMPT, "Chart QA.")
    assert [r["id"] for r in vqa] == ["p00-000001-0-0", "p00-000001-0-1"]
    assert vqa[0]["conversations"][0]["value"] == f"<image>\nQ1\n{MO.REASONING_REQUEST}"
    assert vqa[0]["conversations"][1]["value"] == "because\nB" and vqa[1]["conversations"][1]["value"] == "B"
    assert all(r["image_1"] == "c/x.png" and r["keyword"] == "bar" and r["icl_indices"] == [3]
               and r["mode"] == "vqa" and r["prompt_id"] == "p00-000001" for r in vqa)
    nr = MO.records_for("vqa_nr", [{"Q": "Q1", "A": "B"}, {"Q": "Q2", "A": "C"}], PROMPT, "Chart QA.")
    assert len(nr) == 2 and nr[1]["conversations"] == [{"from": "human", "value": "<image>\nQ2"},
                                                      {"from": "gpt", "value": "C"}]
    tqa = MO.records_for("tqa", [{"I": "A bar chart of rain.", "Q": "Q1", "R": "r", "A": "A"}], PROMPT, "Chart QA.")
    # both tqa records are text-only: the prompt showed no candidate image (SPEC D5), so none is attached
    for r in tqa:
        assert "image_1" not in r and "<image>" not in r["conversations"][0]["value"]
        assert r["conversations"][0]["value"].startswith("A bar chart of rain.\nQ1")
    assert tqa[1]["conversations"] == [{"from": "human", "value": f"A bar chart of rain.\nQ1\n{MO.CONCISE_REQUEST}"},
                                       {"from": "gpt", "value": "A"}]
    d = MO.records_for("descript", [{"A": "desc"}], PROMPT, "Chart QA.")
    assert d[0]["conversations"][0]["value"] == "<image>\nDescribe the image as an expert in Chart QA."
    assert MO.records_for("descript_task_desc", [{"A": "d"}], PROMPT, "Maps")[0]["conversations"][0]["value"] \
        == "<image>\nDescribe the image as an expert in Maps."
    assert MO.records_for("generic", [{"A": "d"}], PROMPT, "Maps")[0]["conversations"][0]["value"] \
        == "<image>\nDescribe the image."
    assert MO.llava_record(tqa[0]) == {"id": tqa[0]["id"], "conversations": tqa[0]["conversations"]}
    assert MO.llava_record(d[0])["image"] == "c/x.png"


def test_reply_schema_bounds_and_validation():
    import jsonschema

    s = MO.reply_schema("vqa", 2, max_chars=10, charset="ascii", options="choices")
    jsonschema.validate({"items": [{"Q": "Which bar?", "choices": [], "R": "tallest", "A": "B"}]}, s)
    for bad in ([], [{"Q": "x" * 11, "choices": [], "R": "r", "A": "a"}], [{"Q": "q", "choices": [], "A": "a"}],
                [{"Q": "<image>", "choices": [], "R": "r", "A": "a"}], [{"Q": "q", "choices": [], "R": "r", "A": "a"}] * 5,
                [{"Q": "q", "choices": ["x"] * 7, "R": "r", "A": "a"}], [{"Q": "q", "R": "r", "A": "a"}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({"items": bad}, s)
    with pytest.raises(jsonschema.ValidationError):  # the original's bare array: not an object
        jsonschema.validate([{"Q": "Which bar?", "choices": [], "R": "tallest", "A": "B"}], s)
    assert MO.worst_case_tokens("vqa_nr", 2, 24) == 136 + 11  # + the {"items": ...} wrapper
    reply = json.dumps({"items": [{"Q": "x" * 24, "A": "y" * 24}] * 2})
    assert len(reply) == MO.worst_case_tokens("vqa_nr", 2, 24)  # the longest reply, in the compact layout
    longest = json.dumps({"items": [{"Q": "x" * 24, "choices": ["o" * 24] * MO.MAX_CHOICES, "A": "y" * 24}] * 2})
    assert len(longest) <= MO.worst_case_tokens("vqa_nr", 2, 24, "choices")
    for bad_combo in ({"options": "lines"}, {"options": "choices", "max_chars": 129}):
        with pytest.raises(ValueError):
            MO.reply_schema("vqa_nr", 1, charset="ascii", **{"max_chars": 24, **bad_combo})
    assert "choices" not in MO.reply_schema("generic", 1, 24, "ascii", options="lines")["properties"]["items"]["items"]
    assert MO.reply_schema("generic", 1)["properties"]["items"]["items"]["required"] == ["A"]
    assert MO.parse_items("generic", [{"A": "a"}], 1)[0] == MO.parse_items("generic", {"items": [{"A": "a"}]}, 1)[0]


def test_select_highest_exact_fraction_and_ties():
    losses = [0.5, 2.0, 1.0, 2.0, None, 0.1, 3.0]
    keep = MO.select_highest(losses, 0.5, [f"s{i}" for i in range(7)])
    assert sum(keep) == 3 and [i for i, k in enumerate(keep) if k] == [1, 3, 6]
    keep = MO.select_highest([1.0] * 5, 0.4, ["e", "d", "c", "b", "a"])
    assert [i for i, k in enumerate(keep) if k] == [3, 4]  # ties broken by id
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 100):
        assert sum(MO.select_highest(list(rng.random(n)), 0.5)) == -(-n // 2)
    with pytest.raises(ValueError):
        MO.select_highest([1.0], 0)


# ============================================================================ image inlining

def test_image_data_url_is_bounded_and_cached(tmp_path):
    from actors.llm_base import ImageInliner
    from udfs.images import image_data_url

    big = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (900, 1200, 3), dtype=np.uint8)).save(big)
    url = image_data_url(str(big), "r1", max_side=256)
    mime, b64 = url[5:].split(";base64,")
    img = Image.open(_io.BytesIO(base64.b64decode(b64)))
    assert max(img.size) == 256 and img.size == (256, 192) and mime in ("image/png", "image/jpeg")
    with pytest.raises(rows.InputError, match="row 'r9' field 'messages'"):
        ImageInliner()(M.chat_messages("vqa_nr", "d", [{"image": str(tmp_path / "missing.png")}], 1), "r9")
    inl = ImageInliner(max_side=64)
    msgs = M.chat_messages("vqa_nr", "d", [{"image": str(big)}, {"image": str(big)}], 1)
    out = inl(msgs, "r1")
    urls = [p["image_url"]["url"] for p in out[1]["content"] if p["type"] == "image_url"]
    assert len(urls) == 2 and urls[0] == urls[1] and urls[0].startswith("data:image/")
    assert inl.encoded == 1  # the shared image was encoded once


# ============================================================================ transformers VLM: generation and loss

@pytest.fixture(scope="module")
def tiny_llava():
    from actors.models import resolve

    return resolve({"backend": "transformers", "model": "placeholder:tiny-llava"}).model_dump()


def _img(tmp_path, name, color):
    p = tmp_path / name
    Image.new("RGB", (80, 60), color).save(p)
    return str(p)


def test_tiny_llava_generation_with_images_is_constrained(tiny_llava, tmp_path):
    from actors.llm import LLMStage

    a, b = _img(tmp_path, "a.png", (255, 0, 0)), _img(tmp_path, "b.png", (0, 0, 255))
    schema = MO.reply_schema("vqa_nr", 1, max_chars=12, charset="ascii", options="choices")
    stage = LLMStage(tiny_llava, {"temperature": 1.0, "seed": 0, "response_schema": schema,
                                  "max_tokens": MO.worst_case_tokens("vqa_nr", 2, 12, "choices") + 4,
                                  "max_repairs": 0})
    task = {"image_folder": str(tmp_path), "samples": [{"id": "r", "image_1": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]}]}
    msgs = [json.dumps(M.chat_messages("vqa_nr", "d", M.prompt_items("vqa_nr", task, [0], c), 1))
            for c in (b, a, str(tmp_path / "gone.png"))]
    out = stage({"id": np.array(["x", "y", "z"], dtype=object), "messages": np.array(msgs, dtype=object)})
    assert out["__row_error__"][2].startswith("InputError: row 'z' field 'messages'")
    for k in (0, 1):
        items = json.loads(out["parsed"][k])["items"]
        assert 1 <= len(items) <= 2 and all(set(i) == {"Q", "choices", "A"} for i in items)
    assert out["llm_backend"][0] == "transformers"


def test_vlm_encode_checks_images_per_row(tiny_llava, tmp_path):
    from actors.models import ResolvedModel, materialize
    from actors.vlm import encode, load_vlm

    import torch

    _, proc = load_vlm(materialize(ResolvedModel.model_validate(tiny_llava)), torch.device("cpu"), torch.float32)
    img = Image.new("RGB", (64, 64))
    with pytest.raises(rows.InputError, match="row 'r1' field 'messages': prompt has 2 image tokens but 1 images"):
        encode(proc, ["<image><image> x", "<image> y"], [[img], [img, img]], ["r1", "r0"])


def test_answer_loss_batched_equals_one_by_one(tiny_llava, tmp_path):
    from actors.vlm import AnswerLoss

    imgs = [_img(tmp_path, f"{i}.png", (40 * i, 255 - 30 * i, 90)) for i in range(5)]
    recs = []
    for i in range(5):
        items = [{"Q": f"Which bar is tallest number {i}?" + " really" * i, "R": "the blue one" * (1 + i % 2),
                  "A": ["A", "B. blue", "C", "D. no", "E"][i]}]
        recs.append(json.dumps(MO.records_for("vqa", items, {**PROMPT, "id": f"p{i}"}, "Chart QA.")))
    batch = {"id": np.array([f"p{i}" for i in range(5)], dtype=object), "records": np.array(recs, dtype=object),
             "candidate": np.array(imgs, dtype=object)}
    together = AnswerLoss(tiny_llava, {"max_batch_size": 10})(batch)
    alone = AnswerLoss(tiny_llava, {"max_batch_size": 1})(batch)
    a = np.array(list(together["answer_loss"]), dtype=float)
    b = np.array(list(alone["answer_loss"]), dtype=float)
    assert a.shape == (5, 2) and np.all(a > 0) and np.abs(a - b).max() < 1e-4
    assert [t for row in together["answer_tokens"] for t in row] == [t for row in alone["answer_tokens"] for t in row]
    assert len({round(x, 5) for x in a.ravel()}) > 5  # real per-sample values, not a batch mean
    # text-only records (all of tqa's) are scored without reading an image; a missing image is a row error
    tqa = json.dumps(MO.records_for("tqa", [{"I": "A chart.", "Q": "Q?", "R": "r", "A": "A"}], PROMPT, "d"))
    nr = json.dumps(MO.records_for("vqa_nr", [{"Q": "Q?", "A": "A"}], PROMPT, "d"))
    gone = str(tmp_path / "nope.png")
    out = AnswerLoss(tiny_llava, {})({"id": np.array(["t", "u", "v"], dtype=object),
                                      "records": np.array([tqa, tqa, nr], dtype=object),
                                      "candidate": np.array([imgs[0], gone, gone], dtype=object)})
    assert len(out["answer_loss"][0]) == 2 and out["__row_error__"][0] is None
    assert out["answer_loss"][1] == out["answer_loss"][0] and out["__row_error__"][1] is None
    assert out["__row_error__"][2].startswith("InputError: row 'v' field 'candidate'")


# ============================================================================ end to end

def _run(out, *extra, limit=None):
    cmd = [sys.executable, "-m", "jobs", "mmgen", "--input", VQA, "--candidates", f"{COCO},{SQA_IMAGES}",
           "--keywords", "map,diagram,photo", "--task-description", "Science questions about maps, diagrams and photos.",
           "--total-gen", "8", "--output", out, *extra]
    if limit:
        cmd += ["--limit", str(limit)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"})


@pytest.mark.slow
def test_mmgen_offline_end_to_end(tmp_path):
    if not os.path.exists(VQA) or not os.path.isdir(COCO):
        pytest.skip("../shared data not present")
    from jobs.core import store

    out = str(tmp_path / "out")
    res = _run(out)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "placeholder models in partition, generate, loss_score" in res.stdout
    m = store.load_manifest(out)
    assert [f["stage"] for f in m["funnel"]] == ["ingest", "build_messages", "generate", "make_records",
                                                 "loss_score", "loss_filter"]
    for f in m["funnel"]:
        assert f["in"] == f["out"] + f["rejected"] + f["errored"] + f.get("not_selected", 0), f
    assert m["funnel"][0]["out"] == 8 and m["placeholder_stages"] == ["partition", "generate", "loss_score"]
    task = json.load(open(os.path.join(out, "task.json")))
    assert sum(len(g["reference_sample_idx"]) for g in task["subgroups"]) == 61
    assert [g["keyword"] for g in task["subgroups"]] == ["map", "diagram", "photo"]
    refs = {os.path.join(task["image_folder"], s["image_1"]) for s in task["samples"]}
    cands = [c for g in task["subgroups"] for c in g["candidate_image_paths"]]
    assert cands and not refs & set(cands)  # reference images are not candidates
    prompts = json.load(open(os.path.join(out, "prompts.json")))
    assert len(prompts["prompts"]) == 8 and prompts["mode"] == "vqa_nr"
    gen = json.load(open(os.path.join(out, "generated.json")))
    llava = json.load(open(os.path.join(out, "llava_train.json")))
    assert gen["len_samples"] == len(gen["samples"]) == len(llava) == m["outputs"]["samples_kept"] > 0
    lf = m["funnel"][-1]
    assert lf["unit"] == "samples" and lf["audit_would_reject"] == lf["in"] - -(-lf["in"] // 2)  # audit: nothing dropped
    for s, lv in zip(gen["samples"], llava):
        assert os.path.exists(os.path.join(gen["image_folder"], s["image_1"]))
        assert lv["image"] == s["image_1"] and lv["id"] == s["id"]
        assert s["conversations"][0]["value"].startswith("<image>\n") and s["conversations"][0]["value"].count("<image>") == 1
        assert s["keyword"] in ("map", "diagram", "photo") and s["mode"] == "vqa_nr" and s["loss"] > 0
        assert s["prompt_id"] in {p["id"] for p in prompts["prompts"]}
    page = open(os.path.join(out, "report.html")).read()
    assert page.count('<div class="card">') == m["funnel"][0]["out"] and "funnel chart" in page  # one card a prompt
    rows_t = store.read_table(store.work(out, "rows"))
    assert all("generate" in p and "partition" in p for p in rows_t.column("_placeholder").to_pylist())
    # resume: nothing recomputed, same outputs
    res2 = _run(out)
    assert res2.returncode == 0, res2.stderr[-3000:]
    m2 = store.load_manifest(out)
    assert m2["rows_processed_this_run"] == 0 and m2["outputs"] == m["outputs"]
    # Ray Data's statistics of the ingest's own model stage (partition) and of the row stages
    ingest = [r for r in m["stage_stats"] if r.get("ingest")]
    assert [r["stages"] for r in ingest] == [["partition"]] and ingest[0]["rows"] > 8
    assert {"generate", "loss_score"} <= {s for r in m["stage_stats"] for s in r["stages"]}
    assert m2["stage_stats"] == m["stage_stats"]


def test_mmgen_dry_run_and_bad_arguments():
    base = [sys.executable, "-m", "jobs", "mmgen", "--input", "x.jsonl", "--output", "o", "--dry-run",
            "--keywords", "map,photo", "--candidates", "c"]
    r = subprocess.run(base, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "partition" in r.stdout and "(ingest)" in r.stdout and "[PLACEHOLDER" in r.stdout
    for profile in ("local", "paper"):
        r = subprocess.run(base + ["--profile", profile], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0 and "PLACEHOLDER" not in r.stdout, r.stderr
    r = subprocess.run(base + ["--set", "mode=vqa_xx"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "unknown mode" in r.stderr and "Traceback" not in r.stderr
