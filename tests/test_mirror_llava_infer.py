"""MIRROR-LLaVA counselling sessions (issue 10 part 4): the pure helpers (image retry loop with
a verifier that fails N times, client line parsing, planning parsing, input rules), then one
Serve app start (offline recipe; the counselor is a tiny LoRA checkpoint over
``placeholder:tiny-llava``, loaded through ``actors.llm_hf``'s checkpoint path and merged) that
serves a two-session run through the CLI, the resume run and a session that fails. No timing
assertions."""
from __future__ import annotations

import json
import os
import time

import pytest

from jobs import cli
from tests.conftest import SHARED
from udfs import mirror_llava as ML

FACES = f"{SHARED}/data/faces/face_recognition"


# ---------------------------------------------------------------- retry loop (no Serve)

def _fake(n_fail: int | None):
    """generate(seed) -> image bytes naming the seed; verify fails ``n_fail`` times (None: always)."""
    calls = {"generate": [], "verify": 0}

    def generate(seed):
        calls["generate"].append(seed)
        return {"image": f"img-{seed}".encode(), "placeholder": False}

    def verify(image, gen):
        calls["verify"] += 1
        ok = n_fail is not None and calls["verify"] > n_fail
        return {"accepted": ok, "clip": 0.1 * calls["verify"], "failures": [] if ok else ["clip: low"]}

    return generate, verify, calls


@pytest.mark.parametrize("n_fail", [0, 3, 9])
def test_retry_loop_retries_until_the_verifier_accepts(n_fail):
    generate, verify, calls = _fake(n_fail)
    seeds = ML.attempt_seeds("s1:0")
    out = ML.verified_image(generate, verify, seeds)
    assert out["accepted"] and len(out["attempts"]) == n_fail + 1 == len(calls["generate"])
    assert calls["generate"] == seeds[:n_fail + 1] and len(set(calls["generate"])) == n_fail + 1
    assert out["image"] == f"img-{seeds[n_fail]}".encode() and out["seed"] == seeds[n_fail]
    assert [a["report"]["clip"] for a in out["attempts"]] == pytest.approx([0.1 * (k + 1) for k in range(n_fail + 1)])
    assert [a["accepted"] for a in out["attempts"]] == [False] * n_fail + [True]


def test_retry_loop_keeps_the_last_image_after_ten_failures():
    generate, verify, calls = _fake(None)
    out = ML.verified_image(generate, verify, ML.attempt_seeds("s1:3"))
    assert not out["accepted"] and len(out["attempts"]) == ML.MAX_IMAGE_ATTEMPTS == len(set(calls["generate"]))
    assert out["image"] == f"img-{calls['generate'][-1]}".encode()
    assert ML.attempt_seeds("s1:3")[0] == ML.FIRST_SEED and ML.attempt_seeds("s1:3") == ML.attempt_seeds("s1:3")
    assert ML.attempt_seeds("s1:3") != ML.attempt_seeds("s1:4")


def test_client_line_counselor_reply_and_planning_parsing():
    s = ML.split_client_line("Client: [crosses arms] I doubt it helps. [/END]")
    assert s == {"content": "[crosses arms] I doubt it helps. [/END]", "stage_direction": "crosses arms",
                 "statement": "I doubt it helps.", "end": True}
    assert ML.split_client_line("I am not sure.")["stage_direction"] == ""  # B6.7: no IndexError
    opening = ML.split_client_line("Client: [looks away] Hello there", nonverbal_only=True)
    assert opening == {"content": "[looks away]", "stage_direction": "looks away", "statement": "", "end": False}
    assert ML.split_client_line("sighs", nonverbal_only=True)["content"] == "[sighs]"
    assert ML.clean_counselor_reply('Sure.\nTherapist: "How did that feel?"\nClient: bad') == "How did that feel?"
    p = ML.parse_planning("CBT technique: Decatastrophizing\nCounseling planning:\n1. List fears.\n2. Test one.")
    assert p == {"technique": "Decatastrophizing", "plan": "1. List fears.\n2. Test one.", "source": "reply"}
    junk = ML.parse_planning("zzz qq", "I will fail.")
    assert junk["source"] == "fallback" and junk["technique"] in ML.CBT_TECHNIQUES and junk["plan"].startswith("1.")
    msgs = ML.client_messages({"personal_info": "Ann, 30", "personality": "doubtful"}, [])
    assert msgs[0]["role"] == "system" and "non-verbal" in msgs[1]["content"]
    hist = [{"role": "Client", "content": "[x]", "statement": ""}, {"role": "Counselor", "content": "Hi"}]
    assert [m["role"] for m in ML.client_messages({}, hist)] == ["system", "user", "assistant", "user"]
    assert ML.session_history_lines(hist) == ["Therapist: Hi"]


def _clients_csv(path, rows):
    import csv

    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return str(path)


def _client(idx, img, gender="Man"):
    return {"idx": idx, "personal_info": "Name: Sam\nAge: 41", "personality": "Doubts that therapy can help.",
            "distorted_thought": "If I slip once, everyone will see I am a fraud.",
            "reason_for_seeking_counseling": "I cannot sleep before meetings.", "img_path": img,
            "dominant_gender": gender}


def test_read_clients_resolves_img_path_and_names_bad_rows(tmp_path):
    from jobs.mirror_llava_infer import ClientsError, read_clients

    rows = [_client(7, "obama.jpg"), _client(8, f"{FACES}/biden.jpg", "female")]
    src = _clients_csv(tmp_path / "test.csv", rows)
    got = read_clients(src)
    assert [r["idx"] for r in got] == ["7", "8"] and got[1]["dominant_gender"] == "Woman"
    assert got[0]["img_path"] == str(tmp_path / "obama.jpg") and got[1]["img_path"] == f"{FACES}/biden.jpg"
    assert read_clients(src, faces=FACES, limit=1)[0]["img_path"] == f"{FACES}/obama.jpg"
    run = tmp_path / "mirror_run"  # a MIRROR output: relative img_path = a name in its face pool
    run.mkdir()
    (run / "manifest.json").write_text(json.dumps({"recipe": {"pipeline": "mirror", "faces": FACES}}))
    got = read_clients(_clients_csv(run / "mirror_data.csv", rows))
    assert got[0]["img_path"] == f"{FACES}/obama.jpg" and got[0]["source_stem"] == "obama"
    bad = _clients_csv(tmp_path / "bad.csv", [_client(1, "a.jpg", "robot")])
    with pytest.raises(ClientsError, match=r"row 0 \(idx '1'\) field 'dominant_gender'"):
        read_clients(bad)
    assert cli.main(["mirror-llava-infer", "--input", bad, "--model", "placeholder:tiny-llava", "--cot", "base",
                     "--output", str(tmp_path / "o")]) == 2


def test_model_argument_resolves_a_training_output_to_its_checkpoint(tmp_path):
    from jobs.mirror_llava_infer import counselor_model

    ckpt = tmp_path / "ckpt" / "train" / "checkpoint_000"
    ckpt.mkdir(parents=True)
    (ckpt / "base.json").write_text("{}")
    (tmp_path / "ckpt" / "manifest.json").write_text(json.dumps({"command": "mirror-llava-train",
                                                                  "checkpoint": str(ckpt)}))
    assert counselor_model(str(tmp_path / "ckpt")) == str(ckpt) == counselor_model(str(ckpt))
    assert counselor_model("placeholder:tiny-llava") == "placeholder:tiny-llava"
    assert counselor_model("llava-hf/llava-1.5-7b-hf") == "llava-hf/llava-1.5-7b-hf"


# ---------------------------------------------------------------- through the Serve app

def tiny_lora_checkpoint(folder: str) -> str:
    """A mirror-llava-train checkpoint folder without training: the tiny LLaVA placeholder with
    a fresh LoRA adapter (``actors.vlm_lora`` save format: adapter, processor, base.json)."""
    import shutil

    import torch

    from actors import vlm_lora as VL

    cfg = VL.profile_config("offline", base="placeholder:tiny-llava")
    model, processor, resolved = VL._load_base(cfg, torch.device("cpu"), torch.float32)
    tmp = VL._save(VL.apply_lora(model, cfg), processor, cfg, resolved, {"global_step": 0}, [], {})
    shutil.move(tmp, folder)
    return folder


@pytest.fixture(scope="module")
def app(ray_local, tmp_path_factory):
    from ray import serve

    from jobs.mirror_llava_serve import build_app, load_serve_recipe

    ckpt = tiny_lora_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "llava-tiny-mirror_ec_planning-lora"))
    recipe = load_serve_recipe("offline", overrides=[
        "app_name=mirror_llava_infer_test", "describe.params.max_tokens=64", "client.params.max_tokens=24",
        "counselor.params.max_tokens=8", f"counselor.model.model={json.dumps(ckpt)}"])
    t0 = time.time()
    serve.start(http_options={"location": "NoServer"})
    serve.run(build_app(recipe), name=recipe.app_name, route_prefix=None)
    print(f"\nserve app ready in {time.time() - t0:.1f} s")
    try:
        yield recipe.app_name, ckpt
    finally:
        serve.delete(recipe.app_name)
        serve.shutdown()  # later modules start Serve with their own HTTP options


def test_sessions_through_serve_resume_and_error_record(app, tmp_path):
    name, ckpt = app
    bad = tmp_path / "not_an_image.jpg"
    bad.write_bytes(b"this is not an image")
    src = _clients_csv(tmp_path / "test.csv", [_client("s1", f"{FACES}/obama.jpg"),
                                               _client("s2", f"{FACES}/biden.jpg"), _client("s3", str(bad))])
    out = tmp_path / "out"
    argv = ["mirror-llava-infer", "--input", src, "--app", name, "--cot", "ec_planning", "--output", str(out),
            "--max-turns", "2", "--temperature", "0.7"]
    t0 = time.time()
    assert cli.main(argv) == 0
    print(f"\nthree sessions in {time.time() - t0:.1f} s")
    sessions = [json.loads(line) for line in (out / "sessions.jsonl").read_text().splitlines()]
    assert sorted(s["idx"] for s in sessions) == ["s1", "s2"]
    for s in sessions:
        roles = [h["role"] for h in s["history"]]
        assert roles[:2] == ["Client", "Counselor"] and len(roles) in (3, 4)  # 2 client turns, end or not
        first = s["history"][0]
        assert first["statement"] == "" and first["content"].startswith("[")  # turn 0: non-verbal only
        for h in s["history"]:
            if h["role"] == "Client":
                assert os.path.exists(h["image_path"]) and h["image_path"].startswith(str(out / "images" / s["idx"]))
                assert h["prompt"] and "img" in h["prompt"] and h["negative_prompt"] is not None
                a = h["attempts"][0]
                assert a["seed"] == ML.FIRST_SEED and {"clip", "identity", "nsfw", "passed", "accepted"} <= set(a)
                assert a["audit"] and h["accepted"]  # placeholder generator/CLIP/NSFW: audit mode
            else:
                assert "emotion" in h and h["planning"]["technique"] in ML.CBT_TECHNIQUES
        planning_turns = {h["planning"]["turn"] for h in s["history"] if h["role"] == "Counselor"}
        assert len(planning_turns) == sum(h["role"] == "Counselor" for h in s["history"])  # per turn (ec_planning)
        assert s["total_tokens"]["prompt_tokens"] > 0 and s["total_tokens"]["completion_tokens"] > 0
        assert s["cot"] == "ec_planning" and s["end_reason"] in ("max_turns", "client_end")
    errors = [json.loads(line) for line in (out / "errors" / "sessions.jsonl").read_text().splitlines()]
    assert [e["idx"] for e in errors] == ["s3"] and errors[0]["step"] == "source_image" and errors[0]["turn"] is None
    assert "'s3'" in errors[0]["error"] and "img_path" in errors[0]["error"]  # names the row and the field
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["finished"] == 2 and manifest["errors"] == 1 and manifest["skipped_finished"] == 0
    assert manifest["serve"]["counselor"]["model"] == ckpt and manifest["settings"]["temperature"] == 0.7
    assert manifest["serve"]["counselor"]["lora_base"]["model"] == "placeholder:tiny-llava"
    page = (out / "report.html").read_text()  # a card per client turn (image + scores), one per failed session
    client_turns = sum(h["role"] == "Client" for s in sessions for h in s["history"])
    assert page.count('<div class="card">') == client_turns + 1 and page.count("<img alt=") == client_turns
    assert "source_image" in page.split('id="rejected"')[1]

    # resume: finished sessions are not redone, the failed one is tried again
    before = (out / "sessions.jsonl").read_text()
    assert cli.main(argv) == 0
    assert (out / "sessions.jsonl").read_text() == before
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["skipped_finished"] == 2 and manifest["finished"] == 0 and manifest["errors"] == 1


def test_planning_is_cached_per_session(app, tmp_path):
    name, _ = app
    src = _clients_csv(tmp_path / "test.csv", [_client("p1", f"{FACES}/obama.jpg")])
    out = tmp_path / "out"
    assert cli.main(["mirror-llava-infer", "--input", src, "--app", name, "--cot", "planning", "--output", str(out),
                     "--max-turns", "2"]) == 0
    (s,) = [json.loads(line) for line in (out / "sessions.jsonl").read_text().splitlines()]
    plans = [h["planning"] for h in s["history"] if h["role"] == "Counselor"]
    assert len(plans) == 2 and plans[0] == plans[1] and plans[0]["turn"] == 1  # planned once, on the first turn
    assert all("emotion" not in h for h in s["history"])
