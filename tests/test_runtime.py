"""Runtime: recipes, plan/dry-run, error isolation, rejects accounting, manifest, resume, S3."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from jobs.core import driver, store
from jobs.core.recipe import RecipeError, load_recipe
from jobs.core.runtime import Stage
from tests import toy_pipeline as toy
from tests.helpers import moto_s3

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _recipe_file(tmp_path, extra="", name="toy.yaml"):
    p = tmp_path / name
    p.write_text("pipeline: toy\nblock_rows: 4\nstages:\n  upper: {num_cpus: 0.25}\n"
                 "  length_filter: {num_cpus: 0.25}\n  slow: {num_cpus: 0.25}\n" + extra)
    return str(p)


def _input(tmp_path, n=20, bad=(3, 11), short=(5,)):
    rows = []
    for i in range(n):
        rid = f"bad-{i}" if i in bad else f"r{i:03d}"
        rows.append({"id": rid, "text": "ab" if i in short else f"text number {i}"})
    p = tmp_path / "in.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(p)


def test_recipe_errors_are_one_line(tmp_path):
    f = _recipe_file(tmp_path)
    with pytest.raises(RecipeError, match=r"stages.upper.batch_size"):
        load_recipe(toy.RECIPE, "toy", recipe_file=f, overrides=["upper.batch_size=0"])
    with pytest.raises(RecipeError, match="no stage or field named 'nosuch'"):
        load_recipe(toy.RECIPE, "toy", recipe_file=f, overrides=["nosuch.batch_size=2"])
    with pytest.raises(RecipeError, match="expected key.path=value"):
        load_recipe(toy.RECIPE, "toy", recipe_file=f, overrides=["upper.batch_size"])
    with pytest.raises(RecipeError, match="Extra inputs are not permitted"):
        load_recipe(toy.RECIPE, "toy", recipe_file=_recipe_file(tmp_path, "bogus: 1\n", "bogus.yaml"))
    r = load_recipe(toy.RECIPE, "toy", recipe_file=f, overrides=["upper.batch_size=3", "seed=7"])
    assert r.stages["upper"].batch_size == 3 and r.seed == 7


def test_cli_errors_print_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "jobs", "antidote", "--input", "x.json", "--output",
                          str(tmp_path / "o"), "--set", "nosuch.key=1", "--dry-run"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and out.stderr.startswith("error: ")
    assert "Traceback" not in out.stderr


def test_cli_help_lists_every_command_and_missing_inputs_fail_before_ray(tmp_path):
    """The front door: ``python -m jobs`` lists every registered command with its purpose and
    an example; a missing --input / --faces is one error line, before any cluster starts."""
    from jobs.core import registry

    out = subprocess.run([sys.executable, "-m", "jobs", "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0
    for c in registry.COMMANDS:
        assert f"  {c.name} " in out.stdout and c.example in out.stdout
    assert "``" not in out.stdout  # no reST markup
    bare = subprocess.run([sys.executable, "-m", "jobs"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bare.returncode == 2 and bare.stdout == out.stdout
    t0 = time.time()
    for argv, missing in ((["antidote", "--input", "no/such.jsonl"], "--input no/such.jsonl"),
                          (["mirror", "--input", "data/counseling/cactus_eval_intake.jsonl", "--faces", "no/faces"],
                           "--faces no/faces")):
        r = subprocess.run([sys.executable, "-m", "jobs", *argv, "--output", str(tmp_path / "o")], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and r.stderr.strip() == f"error: {missing}: no such file or folder", r.stderr
    assert not (tmp_path / "o").exists()
    assert time.time() - t0 < 60  # no Ray start (each would take seconds); generous for a loaded box


def test_stage_outputs_become_plain_python():
    """One converter (``udfs.llm_output.to_python``) turns whatever a stage returns into values
    Arrow stores: numpy scalars, numeric and object arrays, and dicts holding them."""
    import numpy as np
    import pyarrow as pa

    from jobs.core.runtime import StageRun, apply_stage
    from udfs import rows as R

    table = pa.table({"id": ["a", "b"], **{c: [R.OK if c == R.STATUS else ""] * 2 for c in R.CONTROL_COLUMNS}})

    def stage(batch):
        nested = np.empty(2, dtype=object)
        nested[0], nested[1] = np.array([1, 2]), np.array([3], dtype=np.int64)
        info = np.empty(2, dtype=object)
        info[0], info[1] = {"k": np.int64(1), "v": np.array([0.5], np.float32)}, {"k": np.int64(2), "v": np.array([1.0])}
        return {"score": np.array([0.25, 1.5]), "emb": np.arange(6, dtype=np.float32).reshape(2, 3),
                "nested": nested, "info": info, "flag": np.array([True, False]), "n": np.int64(3) * np.ones(2, int)}

    out = apply_stage(table, stage, StageRun("s", ("score", "emb", "nested", "info", "flag", "n")))
    assert out.column("score").to_pylist() == [0.25, 1.5]
    assert out.column("emb").to_pylist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
    assert out.column("nested").to_pylist() == [[1, 2], [3]]
    assert out.column("flag").to_pylist() == [True, False] and out.column("n").to_pylist() == [3, 3]
    assert out.column("info").to_pylist() == [{"k": 1, "v": [0.5]}, {"k": 2, "v": [1.0]}]
    assert out.column(R.STATUS).to_pylist() == [R.OK, R.OK]


def test_plan_checks_columns_before_loading(tmp_path):
    r = load_recipe(toy.RECIPE, "toy", recipe_file=_recipe_file(tmp_path))
    p = driver.plan(toy, r)
    assert [s.stage.name for s in p.stages] == ["upper", "length_filter", "slow"]

    class Broken:
        INPUT_COLUMNS = ("text",)

        @staticmethod
        def stages(recipe):
            return [Stage("upper", toy.upper, ("txt",), ("upper",)),
                    Stage("length_filter", toy.length_filter, ("upper",), ("length",)),
                    Stage("slow", toy.slow, ("upper",), ("done_at",))]
    with pytest.raises(driver.PlanError, match=r"stage 'upper': input columns \['txt'\]"):
        driver.plan(Broken, r)


def test_errors_rejects_funnel_manifest(tmp_path, ray_local):
    out = str(tmp_path / "out")
    r = load_recipe(toy.RECIPE, "toy", recipe_file=_recipe_file(tmp_path), input=_input(tmp_path), output=out)
    m = driver.run(toy, r, ["toy"])
    errs = [json.loads(line) for line in open(f"{out}/errors/errors.jsonl")]
    assert sorted(e["id"] for e in errs) == ["bad-11", "bad-3"]
    assert all(e["stage"] == "upper" and e["reason"]["type"] == "ValueError"
               and e["id"] in e["reason"]["message"] for e in errs)
    rej = [json.loads(line) for line in open(f"{out}/rejects/rejects.jsonl")]
    assert [(x["id"], x["stage"]) for x in rej] == [("r005", "length_filter")]
    assert "too short" in rej[0]["reason"]
    fun = {f["stage"]: f for f in m["funnel"]}
    assert fun["upper"] == {**fun["upper"], "in": 20, "out": 18, "errored": 2, "rejected": 0}
    assert fun["length_filter"]["in"] == 18 and fun["length_filter"]["rejected"] == 1
    for f in m["funnel"]:
        assert f["in"] == f["out"] + f["rejected"] + f["errored"] + f.get("not_selected", 0)
    ok = [json.loads(line) for line in open(f"{out}/toy.jsonl")]
    assert len(ok) == 17 and len({o["id"] for o in ok}) == 17
    manifest = json.load(open(f"{out}/manifest.json"))
    assert manifest["recipe"]["stages"]["upper"]["num_cpus"] == 0.25
    assert manifest["versions"]["ray"] == manifest["ray_version"]
    assert manifest["outputs"] == {"toy": 17} and manifest["rows_processed_this_run"] == 20
    # a rerun of a finished job does no work
    m2 = driver.run(toy, r, ["toy"])
    counts = lambda fun: [(f["stage"], f["in"], f["out"], f["rejected"], f["errored"]) for f in fun]  # noqa: E731
    assert m2["rows_processed_this_run"] == 0 and counts(m2["funnel"]) == counts(m["funnel"])
    assert m["funnel"][1]["operator"].startswith("MapBatches(upper)")  # Ray Data's stats, named by stage
    assert m2["funnel"][1]["wall_s"] == m["funnel"][1]["wall_s"] and len(m2["runs"]) == 2
    # the per-stage table from Ray Data's statistics: every stage once, its rows, per-stage seconds
    table = m["stage_stats"]
    assert sorted(s for r in table for s in r["stages"]) == ["length_filter", "slow", "upper"]
    assert all(r["phase"] == "rows" and r["tasks"] >= 1 and r["wall_s"] > 0 for r in table)
    assert sum(r["rows"] for r in table if r["stages"][-1] == "slow") == 20  # rejected rows flow on, marked
    assert all(len(r["stage_s"]) == len(r["stages"]) for r in table)
    assert m2["stage_stats"] == table  # a run with nothing to do keeps the figures of the run that worked
    page = open(f"{out}/report.html").read()  # written at the end of every run
    assert 'id="funnel"' in page and 'id="stage-stats"' in page
    # an output folder belongs to one input and limit
    with pytest.raises(RecipeError, match="different settings"):
        driver.run(toy, r.model_copy(update={"limit": 5}), ["toy"])


def test_resume_after_interrupt(tmp_path):
    out = str(tmp_path / "out")
    log1, log2 = tmp_path / "log1", tmp_path / "log2"
    inp = _input(tmp_path, n=48, bad=(), short=())
    script = ("import sys; from jobs.core import driver; from jobs.core.recipe import load_recipe; "
              "from tests import toy_pipeline as toy; "
              f"r = load_recipe(toy.RECIPE, 'toy', recipe_file={_recipe_file(tmp_path)!r}, input={inp!r}, "
              f"output={out!r}, overrides=sys.argv[1:]); driver.run(toy, r, ['toy'])")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": ROOT}
    # two slow blocks at a time (12 blocks of 4 rows, 3 s each; 0.2 CPU left for the write tasks):
    # with 8 at a time every block was done before the first write task started (seen twice), so
    # the interrupt found nothing left to do
    proc = subprocess.Popen([sys.executable, "-c", script, "slow.params.delay_s=3.0", "slow.batch_size=4",
                             "slow.num_cpus=0.9", f"slow.params.log={log1}"],
                            cwd=ROOT, env=env, start_new_session=True)
    deadline = time.time() + 150
    rows_dir = os.path.join(out, "_work", "rows")
    while time.time() < deadline:
        files = [f for f in os.listdir(rows_dir) if f.endswith(".parquet")] if os.path.isdir(rows_dir) else []
        if len(files) >= 2:
            break
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)  # Ctrl-C: the driver stops, Ray shuts its workers down
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    committed = set(store.read_table(rows_dir, columns=["id"]).column("id").to_pylist())
    assert 0 < len(committed) < 48, sorted(committed)
    subprocess.run([sys.executable, "-c", script, f"slow.params.log={log2}"], cwd=ROOT, env=env,
                   check=True, timeout=300)
    again = set(log2.read_text().split())
    assert not (again & committed), "committed rows were processed again"
    assert again | committed == {f"r{i:03d}" for i in range(48)}
    final = store.read_table(rows_dir, columns=["id"]).column("id").to_pylist()
    assert sorted(final) == sorted(f"r{i:03d}" for i in range(48))  # each id exactly once
    assert len([json.loads(x) for x in open(f"{out}/toy.jsonl")]) == 48


def test_s3_round_trip(tmp_path, ray_local, monkeypatch):
    pytest.importorskip("moto")
    from udfs import io

    with moto_s3(monkeypatch, "runtime-s3"):
        io.write_text("s3://runtime-s3/in/in.jsonl", open(_input(tmp_path, n=10, bad=(2,), short=())).read())
        r = load_recipe(toy.RECIPE, "toy", recipe_file=_recipe_file(tmp_path), input="s3://runtime-s3/in/in.jsonl",
                        output="s3://runtime-s3/out")
        driver.run(toy, r, ["toy"])
        assert io.exists("s3://runtime-s3/out/manifest.json")
        toy_out = [json.loads(x) for x in io.read_text("s3://runtime-s3/out/toy.jsonl").splitlines()]
        assert len(toy_out) == 9
        errs = io.read_text("s3://runtime-s3/out/errors/errors.jsonl").splitlines()
        assert [json.loads(e)["id"] for e in errs] == ["bad-2"]
        assert store.load_manifest("s3://runtime-s3/out")["funnel"][1]["errored"] == 1


def test_two_phase_pipeline_funnel_outputs_and_resume(ray_local, tmp_path):
    """Phase 2's rows are built from phase 1's committed rows; each phase has its own funnel,
    rejects/errors files and checkpoint; a rerun does no work."""
    from jobs.core.recipe import load_recipe
    from tests import toy_phases

    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in [
        {"id": "s1", "text": "hello big world"}, {"id": "s2", "text": "alone"}, {"id": "s3", "text": "go boom"}]))
    rf = tmp_path / "phases.yaml"
    rf.write_text("pipeline: toy_phases\nblock_rows: 2\nstages:\n  split_words: {num_cpus: 0.25}\n"
                  "  two_words: {num_cpus: 0.25}\n  shout: {num_cpus: 0.25}\n")
    out = tmp_path / "out"
    r = load_recipe(toy_phases.RECIPE, "toy_phases", recipe_file=str(rf), input=str(src), output=str(out))
    p = driver.plan(toy_phases, r)
    assert [(sp.stage.name, sp.phase) for sp in p.stages] == [
        ("split_words", "words"), ("two_words", "words"), ("shout", "letters")]
    m = driver.run(toy_phases, r, ["test"])
    fun = {f["stage"]: f for f in m["funnel"]}
    assert fun["words:ingest"]["out"] == 3 and fun["two_words"]["rejected"] == 1
    assert fun["letters:ingest"]["out"] == 5 and fun["shout"]["errored"] == 1 and fun["shout"]["out"] == 4
    assert fun["shout"]["phase"] == "letters" and fun["sentences_complete"]["unit"] == "sentences"
    assert (out / "shouts.jsonl").read_text().count("\n") == 4
    rej = [json.loads(x) for x in (out / "rejects" / "words.jsonl").read_text().splitlines()]
    assert rej == [{"id": "s2", "stage": "two_words", "reason": "fewer than 2 words"}]
    err = [json.loads(x) for x in (out / "errors" / "letters.jsonl").read_text().splitlines()]
    assert [e["id"] for e in err] == ["s3-1"] and "cannot shout boom" in err[0]["reason"]["message"]
    again = driver.run(toy_phases, r, ["test"])
    assert again["rows_processed_this_run"] == 0 and again["resumed"]
    assert [f["out"] for f in again["funnel"]] == [f["out"] for f in m["funnel"]]
