"""MIRROR-LLaVA counselling sessions (issue 10 part 4), the pure helpers: image retry loop with
a verifier that fails N times, client line parsing, planning parsing, input rules. The sessions
through the Serve app run in tests/test_mirror_llava_serve.py, on that module's one app start.
No timing assertions."""
from __future__ import annotations

import json

import pytest

from jobs.core import cli
from tests.conftest import SHARED
from tests.helpers import client_record, clients_csv
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


class _FakeServe:
    """The Serve app's handle API with canned replies; records the counselor's requests."""

    def __init__(self):
        import base64
        import io

        from PIL import Image
        from types import SimpleNamespace as NS

        buf = io.BytesIO()
        Image.new("RGB", (16, 16), (90, 60, 40)).save(buf, format="PNG")
        png = base64.b64encode(buf.getvalue()).decode()
        self.counselor_requests = []
        self.client = lambda req: NS(reply="Client: [frowns] I am not sure.", prompt_tokens=3, completion_tokens=4)
        self.describe = lambda req: NS(prompt="portrait", negative_prompt="", aligned="frown", contrasting="smile",
                                       prompt_tokens=2, completion_tokens=2)
        self.generate = lambda req: NS(image_png_b64=png, placeholder=True, seed=req["seed"])
        self.verify = lambda req: {"passed": True, "accepted": True, "checks": {}}

        def counselor(req):
            self.counselor_requests.append(req)
            return NS(reply="Therapist: What makes you unsure?", prompt_tokens=5, completion_tokens=5)

        self.counselor = counselor


@pytest.mark.parametrize("temperature", [None, 0.0])
def test_counselor_sampling_is_the_recipes_unless_the_flag_is_given(tmp_path, temperature):
    """Issue 18 item 10: without --temperature the counselor samples as the Serve recipe says
    (0.7 / 0.9, SPEC B6.5: the original sampled); the flag, when given, is sent."""
    from jobs.mirror_llava.infer import parser, run_session

    assert parser().parse_args(["--input", "x.csv", "--cot", "base", "--output", "o"]).temperature is None
    client = {"idx": "7", "personal_info": "Ann, 30", "personality": "doubtful", "distorted_thought": "I fail.",
              "reason_for_seeking_counseling": "stress", "img_path": f"{FACES}/obama.jpg", "source_stem": "obama",
              "dominant_gender": "Man"}
    api = _FakeServe()
    cfg = {"cot": "base", "max_turns": 2, "context": 16, "temperature": temperature, "max_attempts": 1,
           "output": str(tmp_path), "counselor_max_tokens": None}
    rec = run_session(client, api, cfg)
    assert [h["role"] for h in rec["history"]] == ["Client", "Counselor", "Client", "Counselor"]
    samplings = [r["sampling"] for r in api.counselor_requests]
    assert len(samplings) == 2
    assert samplings == ([{}] * 2 if temperature is None else [{"temperature": 0.0}] * 2)


def test_read_clients_resolves_img_path_and_names_bad_rows(tmp_path):
    from jobs.mirror_llava.infer import ClientsError, read_clients

    rows = [client_record(7, "obama.jpg"), client_record(8, f"{FACES}/biden.jpg", "female")]
    src = clients_csv(tmp_path / "test.csv", rows)
    got = read_clients(src)
    assert [r["idx"] for r in got] == ["7", "8"] and got[1]["dominant_gender"] == "Woman"
    assert got[0]["img_path"] == str(tmp_path / "obama.jpg") and got[1]["img_path"] == f"{FACES}/biden.jpg"
    assert read_clients(src, faces=FACES, limit=1)[0]["img_path"] == f"{FACES}/obama.jpg"
    run = tmp_path / "mirror_run"  # a MIRROR output: relative img_path = a name in its face pool
    run.mkdir()
    (run / "manifest.json").write_text(json.dumps({"recipe": {"pipeline": "mirror", "faces": FACES}}))
    got = read_clients(clients_csv(run / "mirror_data.csv", rows))
    assert got[0]["img_path"] == f"{FACES}/obama.jpg" and got[0]["source_stem"] == "obama"
    bad = clients_csv(tmp_path / "bad.csv", [client_record(1, "a.jpg", "robot")])
    with pytest.raises(ClientsError, match=r"row 0 \(idx '1'\) field 'dominant_gender'"):
        read_clients(bad)
    assert cli.main(["mirror-llava-infer", "--input", bad, "--model", "placeholder:tiny-llava", "--cot", "base",
                     "--output", str(tmp_path / "o")]) == 2


def test_test_set_without_faces_gets_them_by_the_datasets_rule(tmp_path):
    """Issue 18 item 12: the published mirror_test.csv has client profiles only (no img_path,
    no dominant_gender); each client gets a face from a face pool by the dataset's identity rule
    (udfs.mirror_identity.assign_identities: gender, nearest age group), recorded per client."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from jobs.mirror_llava.infer import ClientsError, parser, read_clients
    from udfs import mirror_identity

    run = tmp_path / "mirror_run"  # a MIRROR run: faces.parquet (proc_celeba columns) + its face pool
    run.mkdir()
    pool = [{"img_path": "obama2.jpg", "identity": "obama", "age": 50.0, "dominant_gender": "Man"},
            {"img_path": "obama.jpg", "identity": "obama", "age": 47.0, "dominant_gender": "Man"},
            {"img_path": "biden.jpg", "identity": "biden", "age": 70.0, "dominant_gender": "Man"},
            {"img_path": "obama_small.jpg", "identity": "ann", "age": 33.0, "dominant_gender": "Woman"}]
    pq.write_table(pa.Table.from_pylist(pool), run / "faces.parquet")
    (run / "manifest.json").write_text(json.dumps({"recipe": {"pipeline": "mirror", "faces": FACES}}))
    profiles = [  # mirror_test.csv's columns: personal_info as MIRROR wrote it (a Python dict literal)
        {"idx": "t1", "personal_info": "{'name': 'Ann Lee', 'age': '34', 'gender': 'female'}"},
        {"idx": "t2", "personal_info": "{'name': 'Bo Chen', 'age': '48', 'gender': 'male'}"},
        {"idx": "t3", "personal_info": json.dumps({"name": "Cy", "age": "72", "gender": "male"})}]
    for p in profiles:
        p.update(personality="Doubts that therapy helps.", distorted_thought="I always fail.",
                 reason_for_seeking_counseling="Stress at work.")
    src = clients_csv(tmp_path / "mirror_test.csv", profiles)
    got = {c["idx"]: c for c in read_clients(src, face_pool=str(run))}
    assert {k: (c["img_path"], c["dominant_gender"]) for k, c in got.items()} == {
        "t1": (f"{FACES}/obama_small.jpg", "Woman"), "t2": (f"{FACES}/obama.jpg", "Man"),
        "t3": (f"{FACES}/biden.jpg", "Man")}  # obama's first image by img_path, as the dataset
    expected = mirror_identity.assign_identities(
        [{"id": "t1", "gender": "female", "age": 34}, {"id": "t2", "gender": "male", "age": 48},
         {"id": "t3", "gender": "male", "age": 72}],
        [{"identity": f["identity"], "gender": f["dominant_gender"], "age": f["age"], "img_path": f["img_path"]}
         for f in sorted(pool, key=lambda f: f["img_path"])])
    for c, e in zip(got.values(), expected):
        rec = json.loads(c["face_assignment"])
        assert rec["identity"] == e["identity"] and rec["identity_mismatch"] == e["identity_mismatch"]
        assert rec["client_gender"] == e["client_gender"] and rec["img_path"] == c["source_stem"] + ".jpg"
    assert json.loads(got["t3"]["face_assignment"])["identity_mismatch"] is None
    with pytest.raises(ClientsError, match=r"row 0 \(idx 't1'\) field 'img_path': missing.*--face-pool"):
        read_clients(src)
    given = clients_csv(tmp_path / "given.csv", [client_record(7, "obama.jpg")])  # a given face stays
    (c,) = read_clients(given, faces=FACES, face_pool=str(run))
    assert c["img_path"] == f"{FACES}/obama.jpg" and c["face_assignment"] is None
    assert parser().parse_args(["--input", src, "--cot", "base", "--output", "o", "--face-pool", str(run)]).face_pool


def test_model_argument_resolves_a_training_output_to_its_checkpoint(tmp_path):
    from jobs.mirror_llava.infer import counselor_model

    ckpt = tmp_path / "ckpt" / "train" / "checkpoint_000"
    ckpt.mkdir(parents=True)
    (ckpt / "base.json").write_text("{}")
    (tmp_path / "ckpt" / "manifest.json").write_text(json.dumps({"command": "mirror-llava-train",
                                                                  "checkpoint": str(ckpt)}))
    assert counselor_model(str(tmp_path / "ckpt")) == str(ckpt) == counselor_model(str(ckpt))
    assert counselor_model("placeholder:tiny-llava") == "placeholder:tiny-llava"
    assert counselor_model("llava-hf/llava-1.5-7b-hf") == "llava-hf/llava-1.5-7b-hf"
