"""MM-GEN generation replies on the wire: the OpenAI-compatible vision path (bounded base64
images, 429 retry, format fixer), a loopback server that answers like the real API's JSON modes
(objects only) for the paper profile's requests, and the constrained profiles' grammar checked
against the layout their instruction asks for."""
from __future__ import annotations

import base64
import io as _io
import json
import threading
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from tests.helpers import LoopbackServer, chat_completion
from udfs import mmgen as M
from udfs import mmgen_output as MO
from udfs import rows


@pytest.fixture(scope="module")
def tiny_llava():
    from actors.models import resolve

    return resolve({"backend": "transformers", "model": "placeholder:tiny-llava"}).model_dump()


# ============================================================================ OpenAI-compatible vision path

class FakeVisionAPI:
    """Loopback chat-completions server: records bodies, scripted replies keyed by a tag."""

    def __init__(self):
        self.bodies, self.hits, self.lock = [], Counter(), threading.Lock()
        self.server = LoopbackServer(self.respond)
        self.base_url = self.server.url + "/v1"

    def respond(self, req):
        from udfs.llm_output import REPAIR_MARKER

        body = req["body"]
        with self.lock:
            self.bodies.append(body)
            user = body["messages"][1]["content"]
            key = user[0]["text"] if isinstance(user, list) else user
            self.hits[key] += 1
            n = self.hits[key]
        if n == 1 and "429" in key:
            return 429, {"error": {"message": "slow down"}}, {"Retry-After": "0"}
        repair = any(isinstance(m["content"], str) and m["content"].startswith(REPAIR_MARKER) for m in body["messages"])
        text = json.dumps({"items": [{"Q": "Which state is highlighted?\nA. Ohio\nB. Iowa", "A": "B"}]})
        if "malformed" in key and not repair:
            text = 'Here you go: {"items": [{"Q": "Which state?", "A": B}]}'
        return 200, chat_completion(body["model"], text), {}

    def close(self):
        self.server.close()


@pytest.fixture
def vision_api():
    srv = FakeVisionAPI()
    yield srv
    srv.close()


def test_openai_vision_payload_429_and_fixer(vision_api, tmp_path):
    from actors.llm import LLMStage
    from actors.models import resolve

    icl = tmp_path / "icl.png"
    Image.new("RGB", (640, 480), (200, 30, 30)).save(icl)
    cand = tmp_path / "cand.jpg"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (300, 500, 3), dtype=np.uint8)).save(cand)
    task = {"image_folder": str(tmp_path), "dataset_description": "Maps.",
            "samples": [{"id": "r0", "image_1": "icl.png", "conversations": [
                {"from": "human", "value": "<image>\nWhich state?"}, {"from": "gpt", "value": "A. Ohio"}]}],
            "subgroups": [{"keyword": "map", "reference_sample_idx": [0]}]}
    rows_msgs, ids = [], ["ok", "429", "malformed"]
    for rid in ids:
        items = M.prompt_items("vqa_nr", task, [0], str(cand))
        msgs = M.chat_messages("vqa_nr", "Maps.", items, 1)
        msgs[1]["content"].insert(0, {"type": "text", "text": f"[{rid}]"})
        rows_msgs.append(json.dumps(msgs))
    model = resolve({"backend": "openai", "model": "gpt-4o", "options": {
        "base_url": vision_api.base_url, "api_key_env": None, "backoff_s": 0.01, "image_max_side": 128}}).model_dump()
    stage = LLMStage(model, {"response_schema": MO.reply_schema("vqa_nr", 1), "max_repairs": 2})
    out = stage({"id": np.array(ids, dtype=object), "messages": np.array(rows_msgs, dtype=object)})
    assert list(out[rows.ROW_ERROR]) == [None] * 3 and list(out[rows.ROW_REJECT]) == [None] * 3
    assert [json.loads(p)["items"][0]["A"] for p in out["parsed"]] == ["B"] * 3
    assert list(out["llm_attempts"]) == [1, 1, 2] and list(out["llm_repaired"]) == [False, False, True]
    assert vision_api.hits["[429]"] == 2  # retried after the 429
    for body in vision_api.bodies:
        assert "null" not in json.dumps(body)  # no Arrow-style null keys reach the server
        parts = body["messages"][1]["content"] if body["messages"][0]["role"] == "system" else None
        if parts is None:  # the JSON instruction was merged into the system message
            parts = body["messages"][1]["content"]
        imgs = [p["image_url"]["url"] for p in parts if p["type"] == "image_url"]
        assert len(imgs) == 2
        for u in imgs:
            assert u.startswith(("data:image/png;base64,", "data:image/jpeg;base64,"))
            decoded = Image.open(_io.BytesIO(base64.b64decode(u.split(",", 1)[1])))
            assert max(decoded.size) == 128
    assert stage.engine.inline_images.encoded == 2  # 2 distinct images in 8 requests: each encoded once


class JSONModeAPI:
    """Loopback chat-completions server that answers like the real API's JSON modes.

    The requested schema comes from ``response_format`` (``json_schema`` mode) or from the
    system message (``json_object`` mode: the client states the schema there). The reply is an
    instance of it, except that JSON mode only ever returns a JSON **object**: a schema whose
    root is an array gets its instance wrapped as ``{"result": [...]}``, as a real model
    constrained to objects does. Tags in the first user text script extra content:
    ``[choices]`` adds a ``choices`` key to every item, ``[extra]`` returns 3 items.
    """

    def __init__(self):
        self.server = LoopbackServer(self.respond)
        self.base_url = self.server.url + "/v1"

    @staticmethod
    def instance(schema, tags=""):
        kind = schema.get("type")
        if kind == "object":
            props = schema.get("properties", {})
            obj = {k: JSONModeAPI.instance(props[k], tags) for k in schema.get("required", list(props))}
            if set(obj) & {"Q", "A"} and "[choices]" in tags:
                obj["choices"] = ["Ohio", "Iowa"]
            return obj
        if kind == "array":
            n = 3 if "[extra]" in tags and schema["items"].get("type") == "object" else max(1, schema.get("minItems", 1))
            return [JSONModeAPI.instance(schema["items"], tags) for _ in range(n)]
        return "Which state is highlighted"

    def respond(self, req):
        body = req["body"]
        user = next(m for m in body["messages"] if m["role"] == "user")["content"]
        tags = " ".join(p.get("text", "") for p in user) if isinstance(user, list) else user
        rf = body.get("response_format") or {}
        if rf.get("type") == "json_schema":
            schema = rf["json_schema"]["schema"]
        else:
            system = body["messages"][0]["content"]
            schema, _ = json.JSONDecoder().raw_decode(system[system.index("JSON schema:") + len("JSON schema:"):].lstrip())
        value = self.instance(schema, tags)
        if rf.get("type") in ("json_object", "json_schema") and not isinstance(value, dict):
            value = {"result": value}  # JSON mode: objects only
        return 200, chat_completion(body["model"], json.dumps(value)), {}

    def close(self):
        self.server.close()


def _paper_generate(srv, monkeypatch, **options):
    """The paper profile's generate stage (model spec, params, reply schema), sent to ``srv``."""
    from actors.llm import LLMStage
    from jobs import mmgen as J
    from jobs.core.recipe import load_recipe

    monkeypatch.setenv("MMSYNTH_TEST_KEY", "sk-test")
    recipe = load_recipe(J.RECIPE, "mmgen", "paper", input="refs.json", output="out")
    cfg = recipe.stages["generate"]
    stage = next(s for s in J.stages(recipe) if s.name == "generate")
    spec = cfg.model.model_dump()
    spec["options"] = {**spec["options"], "base_url": srv.base_url, "api_key_env": "MMSYNTH_TEST_KEY",
                       "backoff_s": 0.01, **options}
    from actors.models import resolve

    return recipe, J, LLMStage(resolve(spec).model_dump(), stage.merged(cfg.params))


def _mmgen_batch(J, recipe, tmp_path, tags):
    """One prompt row per tag, built by the job's own build_messages stage."""
    img = tmp_path / "c.png"
    Image.new("RGB", (40, 30), (10, 200, 10)).save(img)
    task = {"image_folder": str(tmp_path), "samples": [{"id": "r", "image_1": "c.png", "conversations": [
        {"from": "human", "value": "<image>\nWhich state?"}, {"from": "gpt", "value": "A. Ohio"}]}]}
    prompts = []
    for t in tags:
        items = M.prompt_items(recipe.mode, task, [0], str(img))
        items.insert(0, {"text": t})
        prompts.append(json.dumps(items))
    n = len(tags)
    batch = {"mode": [recipe.mode] * n, "prompt": prompts, "num_gen": [1] * n, "dataset_description": ["Maps."] * n}
    params = next(s for s in J.stages(recipe) if s.name == "build_messages").merged({})
    msgs = J.build_messages(batch, params)["messages"]
    return {"id": np.array([f"p{k}" for k in range(n)], dtype=object), "messages": np.array(msgs, dtype=object)}


@pytest.mark.parametrize("json_schema_mode", [False, True])
def test_paper_generation_validates_against_json_mode_api(tmp_path, monkeypatch, json_schema_mode):
    """JSON mode returns objects only: the paper profile's reply schema must have an object root."""
    srv = JSONModeAPI()
    try:
        opts = {"json_schema_mode": True} if json_schema_mode else {}
        recipe, J, stage = _paper_generate(srv, monkeypatch, **opts)
        out = stage(_mmgen_batch(J, recipe, tmp_path, ["[plain]"]))
        assert out[rows.ROW_REJECT][0] is None and out[rows.ROW_ERROR][0] is None, out[rows.ROW_REJECT][0]
        assert out["llm_attempts"][0] == 1  # valid at the first reply, no re-ask
        items, rep = MO.parse_items(recipe.mode, out["parsed"][0], 1)
        assert items == [{"Q": "Which state is highlighted", "A": "Which state is highlighted"}]
        rf = srv.server.requests[0]["body"]["response_format"]
        assert rf["type"] == ("json_schema" if json_schema_mode else "json_object")
        if json_schema_mode:
            assert rf["json_schema"]["schema"]["type"] == "object"
    finally:
        srv.close()


def test_replies_the_original_kept_are_kept(tmp_path, monkeypatch):
    """A ``choices`` key and more items than asked pass the paper schema; the mismatch is recorded."""
    srv = JSONModeAPI()
    try:
        recipe, J, stage = _paper_generate(srv, monkeypatch)
        out = stage(_mmgen_batch(J, recipe, tmp_path, ["[choices] [extra]"]))
        assert out[rows.ROW_REJECT][0] is None and out["llm_attempts"][0] == 1, out[rows.ROW_REJECT][0]
        batch = {"id": ["p0"], "mode": [recipe.mode], "keyword": ["map"], "image_1": ["c.png"],
                 "icl_indices": [[0]], "num_gen": [1], "dataset_description": ["Maps."],
                 "generate_parsed": [out["parsed"][0]]}
        res = J.make_records(batch, {})
        items = json.loads(res["items"][0])
        assert len(items) == 3 and res["n_items"] == [3] and res["count_mismatch"] == [True]
        assert items[0]["Q"] == "Which state is highlighted\nA. Ohio\nB. Iowa"  # choices appended as lines
        assert res[rows.ROW_REJECT] == [None]
    finally:
        srv.close()


@pytest.mark.parametrize("profile", ["offline", "local"])
def test_constrained_grammar_accepts_the_instructed_multiple_choice_layout(tiny_llava, tmp_path, monkeypatch, profile):
    """The constrained profiles' grammar must allow a reply written as the prompt instructs."""
    import xgrammar as xgr
    from transformers import AutoTokenizer

    from actors.models import ResolvedModel, materialize
    from jobs import mmgen as J
    from jobs.core.recipe import load_recipe

    recipe = load_recipe(J.RECIPE, "mmgen", profile, input="refs.json", output="out")
    assert recipe.charset == "ascii"
    gen = next(s for s in J.stages(recipe) if s.name == "generate").merged(recipe.stages["generate"].params)
    msgs = json.loads(_mmgen_batch(J, recipe, tmp_path, ["[mcq]"])["messages"][0])
    instruction = msgs[1]["content"][-1]["text"]
    if '"choices"' in instruction:  # options in their own list, as the instruction asks
        assert "inside the question" not in msgs[0]["content"] and '"choices"' in msgs[0]["content"]
        item = {"Q": "Which bar is red", "choices": ["left", "B. right"], "A": "B"}
    else:  # options as separate lettered lines inside the question
        item = {"Q": "Which bar is red\nA. left\nB. right", "A": "B"}
    reply = json.dumps({"items": [item]})
    tok = AutoTokenizer.from_pretrained(materialize(ResolvedModel.model_validate(tiny_llava)))
    compiled = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tok)).compile_json_schema(
        json.dumps(gen["response_schema"]), any_whitespace=False)
    matcher = xgr.GrammarMatcher(compiled)
    assert matcher.accept_string(reply) and matcher.is_completed(), (instruction, reply)
    assert len(reply) <= gen["max_tokens"]
    items, _ = MO.parse_items(recipe.mode, reply, 1)
    assert items == [{"Q": "Which bar is red\nA. left\nB. right", "A": "B"}]
