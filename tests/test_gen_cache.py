"""Generation cache (actors.gen_cache) and its use by the LLM stage and the driver.

A real OpenAI-compatible HTTP server on loopback counts the requests; the toy pipeline of two
LLM stages (tests/toy_llm.py) runs through the real driver and Ray Data.
"""
from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from actors.gen_cache import GenerationCache, cache_key
from tests.helpers import LoopbackServer, chat_completion, moto_s3

ROOT = Path(__file__).resolve().parent.parent


def _user_text(body: dict) -> str:
    return " ".join(m["content"] for m in body["messages"] if m["role"] == "user" and isinstance(m["content"], str))


def _system_text(body: dict) -> str:
    return " ".join(m["content"] for m in body["messages"] if m["role"] == "system" and isinstance(m["content"], str))


TOPIC_COLOURS = {"apples": "red", "sea": "blue", "grass": "green"}


def toy_respond(req: dict):
    """ask_colour: {"colour": <the topic's colour>} ("teal <colour>" when the system prompt says
    TEAL, "RED!" - invalid under the Colour schema - when it says BROKEN); ask_name: a name built
    from the prompt."""
    body = req["body"]
    text = _user_text(body)
    if "Name one colour" in text:
        system = _system_text(body)
        base = next((c for w, c in TOPIC_COLOURS.items() if w in text), "grey")  # distinct prompts per row
        colour = f"teal {base}" if "TEAL" in system else "RED!" if "BROKEN" in system else base
        return 200, chat_completion(body["model"], json.dumps({"colour": colour}), 20, 4), {}
    return 200, chat_completion(body["model"], "Tom the " + text.split(" a ")[-1].split(" cat")[0], 12, 3), {}


def _stage_of(req: dict) -> str:
    return "ask_colour" if "Name one colour" in _user_text(req["body"]) else "ask_name"


def _counts(srv: LoopbackServer, start: int = 0) -> dict[str, int]:
    out = {"ask_colour": 0, "ask_name": 0}
    for r in srv.requests[start:]:
        out[_stage_of(r)] += 1
    return out


def toy_recipe(tmp_path, url: str, prices: dict | None = None) -> str:
    """The toy pipeline's recipe with both LLM stages on the loopback API at ``url`` (``prices``:
    the recipe's price of ``toy-model``)."""
    model = f'{{backend: openai, model: toy-model, options: {{base_url: "{url}/v1", api_key_env: null, ' \
            f'max_retries: 1, timeout_s: 20}}}}'
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "toy_llm.yaml"
    price = f"prices: {{toy-model: {json.dumps(prices)}}}\n" if prices else ""
    path.write_text(f"""pipeline: toy_llm
{price}stages:
  colour_prompts: {{num_cpus: 0.1}}
  ask_colour: {{model: {model}, num_cpus: 0.2, params: {{temperature: 0.0, max_tokens: 16, max_repairs: 1}}}}
  name_prompts: {{num_cpus: 0.1}}
  ask_name: {{model: {model}, num_cpus: 0.2, params: {{temperature: 0.0, max_tokens: 8}}}}
  slow: {{num_cpus: 0.1}}
""")
    return str(path)


def toy_input(tmp_path, topics=("apples", "the sea", "grass")) -> str:
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": f"t{i}", "topic": t}) + "\n" for i, t in enumerate(topics)))
    return str(inp)


def test_edited_stage_sends_only_its_calls_and_no_cache_sends_all(ray_local, tmp_path):
    from jobs.core import driver, store
    from jobs.core.recipe import load_recipe
    from tests import toy_llm

    cache = str(tmp_path / "cache")
    with LoopbackServer(toy_respond) as srv:
        rf, inp = toy_recipe(tmp_path, srv.url), toy_input(tmp_path)

        def run(out: str, overrides=(), use_cache=True):
            r = load_recipe(toy_llm.RECIPE, "toy_llm", recipe_file=rf, input=inp, output=str(tmp_path / out),
                            overrides=list(overrides), cache=cache if use_cache else None)
            start = len(srv.requests)
            m = driver.run(toy_llm, r, ["toy_llm"])
            return m, _counts(srv, start)

        m1, c1 = run("out1")
        assert c1 == {"ask_colour": 3, "ask_name": 3}
        assert m1["cache"]["uri"] == cache
        assert m1["cache"]["stages"]["ask_colour"] == {"hits": 0, "misses": 3, "saved_prompt_tokens": 0,
                                                       "saved_completion_tokens": 0}
        # a new output, ask_name's prompt edited: only ask_name's calls are sent
        m2, c2 = run("out2", ["ask_name.params.system_prompt=Answer with one name."])
        assert c2 == {"ask_colour": 0, "ask_name": 3}
        assert m2["cache"]["stages"]["ask_colour"] == {"hits": 3, "misses": 0, "saved_prompt_tokens": 60,
                                                       "saved_completion_tokens": 12}
        assert m2["cache"]["stages"]["ask_name"]["hits"] == 0 and m2["cache"]["stages"]["ask_name"]["misses"] == 3
        f2 = {r["stage"]: r for r in m2["funnel"]}
        assert f2["ask_colour"]["prompt_tokens"] == 60 and f2["ask_colour"]["cached_prompt_tokens"] == 60
        rows1 = {x["id"]: x for x in store.read_table(store.work(str(tmp_path / "out1"), "rows")).to_pylist()}
        rows2 = {x["id"]: x for x in store.read_table(store.work(str(tmp_path / "out2"), "rows")).to_pylist()}
        assert all(rows2[i]["ask_colour_parsed"] == rows1[i]["ask_colour_parsed"] for i in rows1)
        assert all(rows2[i]["ask_colour_cache_hits"] == 1 for i in rows2)
        html = (tmp_path / "out2" / "report.html").read_text()
        assert 'id="cost"' in html and "ask_colour" in html and "saved by the generation cache" in html
        # ask_colour's prompt edited so that its replies change: ask_name's inputs change too
        m3, c3 = run("out3", ["ask_colour.params.system_prompt=Prefer TEAL."])
        assert c3 == {"ask_colour": 3, "ask_name": 3}
        rows3 = store.read_table(store.work(str(tmp_path / "out3"), "rows")).to_pylist()
        assert all("teal" in x["ask_name_text"] for x in rows3)
        # the same edit again: everything is cached
        _, c4 = run("out4", ["ask_colour.params.system_prompt=Prefer TEAL."])
        assert c4 == {"ask_colour": 0, "ask_name": 0}
        # no cache: every call is sent, and the manifest says the cache was off
        m5, c5 = run("out5", use_cache=False)
        assert c5 == {"ask_colour": 3, "ask_name": 3}
        assert m5["cache"]["uri"] is None
        assert m5["cache"]["stages"]["ask_colour"] == {"hits": 0, "misses": 0, "saved_prompt_tokens": 0,
                                                       "saved_completion_tokens": 0}


def _stage(url: str, cache: str, cache_rejects: bool):
    from actors.llm import LLMStage
    from actors.models import resolve

    model = resolve({"backend": "openai", "model": "toy-model",
                     "options": {"base_url": f"{url}/v1", "api_key_env": None, "max_retries": 0}}).model_dump()
    return LLMStage(model, {"temperature": 0.0, "max_repairs": 1, "system_prompt": "BROKEN",
                            "response_schema": "tests.toy_llm:Colour"},
                    cache={"uri": cache, "cache_rejects": cache_rejects})


def test_rejected_rows_reask_unless_cache_rejects(tmp_path):
    """A reply that fails validation is stored, but served only with ``cache_rejects``."""
    from udfs import rows

    cache = str(tmp_path / "cache")
    batch = {"id": np.array(["a"], dtype=object),
             "messages": np.array([json.dumps([{"role": "user", "content": "Name one colour of snow."}])],
                                  dtype=object)}
    with LoopbackServer(toy_respond) as srv:
        out = _stage(srv.url, cache, False)(dict(batch))
        assert len(srv.requests) == 2  # the first reply and its re-ask
        assert out[rows.ROW_REJECT][0] is not None and list(out["llm_cache_misses"]) == [2]
        out = _stage(srv.url, cache, False)(dict(batch))
        assert len(srv.requests) == 4  # rejected replies are not served: the row asks again
        assert list(out["llm_cache_hits"]) == [0]
        out = _stage(srv.url, cache, True)(dict(batch))
        assert len(srv.requests) == 4  # the whole re-ask chain replayed from the cache
        assert list(out["llm_cache_hits"]) == [2] and list(out["llm_cache_misses"]) == [0]
        assert out[rows.ROW_REJECT][0] is not None
        assert list(out["llm_cached_prompt_tokens"]) == [40] and list(out["prompt_tokens"]) == [40]


def test_errors_are_never_cached(tmp_path):
    from udfs import rows

    def failing(req):
        return 400, {"error": {"message": "bad request", "type": "invalid_request_error"}}, {}

    batch = {"id": np.array(["a"], dtype=object),
             "messages": np.array([json.dumps([{"role": "user", "content": "Name one colour of snow."}])],
                                  dtype=object)}
    cache = str(tmp_path / "cache")
    with LoopbackServer(failing) as srv:
        for _ in range(2):
            out = _stage(srv.url, cache, True)(dict(batch))
            assert out[rows.ROW_ERROR][0] is not None and list(out["llm_cache_hits"]) == [0]
        assert len(srv.requests) == 2
    assert not list(Path(cache).rglob("*.json"))


WRITER = """
import sys
from actors.gen_cache import GenerationCache
c = GenerationCache(sys.argv[1])
for i in range(200):
    c.put(sys.argv[2], {"writer": sys.argv[3], "i": i, "pad": "x" * 20000})
"""


def test_two_writers_one_key_leave_one_complete_entry(tmp_path):
    """Two processes and several threads write one key at once; readers meanwhile only ever
    see a complete entry (or none yet), and one complete entry remains."""
    uri = str(tmp_path / "cache")
    key = cache_key({"kind": "test", "n": 1})
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, uri, key, f"p{k}"], cwd=ROOT) for k in range(2)]
    cache = GenerationCache(uri)
    seen, bad, stop = set(), [], threading.Event()

    def write(name: str) -> None:
        for i in range(100):
            cache.put(key, {"writer": name, "i": i, "pad": "x" * 20000})

    def read() -> None:
        while not stop.is_set():
            v = cache.get(key)
            if v is not None:
                if v.get("key") != key or len(v["pad"]) != 20000:
                    bad.append(v)
                seen.add(v["writer"])
            path = Path(cache.path(key))
            if path.exists():  # the file itself: always complete JSON (os.replace is atomic)
                raw = path.read_bytes()
                try:
                    assert len(json.loads(raw)["pad"]) == 20000
                except (ValueError, KeyError, AssertionError):
                    bad.append(raw[:80])  # a torn write

    threads = [threading.Thread(target=write, args=(f"t{k}",)) for k in range(2)]
    reader = threading.Thread(target=read)
    reader.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for p in procs:
        assert p.wait(timeout=120) == 0
    stop.set()
    reader.join(timeout=30)
    assert not bad
    final = cache.get(key)
    assert final is not None and final["writer"] in {"p0", "p1", "t0", "t1"} and len(final["pad"]) == 20000
    assert seen  # the reader saw complete entries while the writers ran
    leftovers = [p.name for p in Path(cache.path(key)).parent.iterdir() if p.name != f"{key}.json"]
    assert not leftovers  # no temporary files left behind


def test_s3_store_through_moto(monkeypatch):
    pytest.importorskip("moto")
    from udfs import io

    with moto_s3(monkeypatch, "gencache"):
        cache = GenerationCache("s3://gencache/llm")
        key = cache_key({"kind": "llm", "messages": [{"role": "user", "content": "hi"}]})
        assert cache.get(key) is None
        cache.put(key, {"text": "hello", "prompt_tokens": 3})
        assert io.exists(f"s3://gencache/llm/{key[:2]}/{key}.json")
        again = GenerationCache("s3://gencache/llm").get(key)
        assert again["text"] == "hello" and again["prompt_tokens"] == 3


def test_image_parts_are_keyed_by_content(tmp_path):
    """Two paths holding the same bytes give one key; other bytes another key."""
    from actors.llm import LLMStage
    from actors.llm_base import LLMRequest
    from actors.models import resolve
    from udfs.llm_output import OutputFormat

    a, b, c = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    a.write_bytes(b"same image bytes")
    b.write_bytes(b"same image bytes")
    c.write_bytes(b"other image bytes")
    model = resolve({"backend": "openai", "model": "m", "options": {"api_key_env": None}}).model_dump()
    stage = LLMStage(model, {}, cache={"uri": str(tmp_path / "cache")})

    def key(path):
        msgs = [{"role": "user", "content": [{"type": "text", "text": "what?"},
                                             {"type": "image_url", "image_url": {"url": str(path)}}]}]
        return stage._key(LLMRequest(0, "r", msgs, {"temperature": 0.0}, OutputFormat()))

    assert key(a) == key(b) != key(c)


def test_max_cost_stops_cleanly_and_the_same_command_resumes(ray_local, tmp_path):
    """A tiny price makes every call expensive: the run stops with committed rows kept and
    ``stopped: budget``; rerunning the same command (a larger limit) sends only the calls of the
    rows not committed and finishes."""
    from jobs.core import cost, driver, store
    from jobs.core.recipe import load_recipe
    from tests import toy_llm

    topics = [f"apples {k}" for k in range(8)]
    with LoopbackServer(toy_respond) as srv:
        rf, inp = toy_recipe(tmp_path, srv.url), toy_input(tmp_path, topics)
        out = str(tmp_path / "out")
        # ask_colour: 20 + 4 tokens = 0.24 USD per call; ask_name: 12 + 3 tokens = 0.15 USD per call
        prices = ["prices={toy-model: {input_per_1m: 10000, output_per_1m: 10000}}"]

        def recipe(limit):
            return load_recipe(toy_llm.RECIPE, "toy_llm", recipe_file=rf, input=inp, output=out,
                               overrides=prices + [f"max_cost={limit}"])

        with pytest.raises(cost.BudgetStop) as stop:
            driver.run(toy_llm, recipe(2.0), ["toy_llm"])
        sent1 = len(srv.requests)
        m1 = store.load_manifest(out)
        assert m1["stopped"] == "budget" and stop.value.limit_usd == 2.0
        assert m1["budget"]["stopped"] and m1["budget"]["spent_usd"] == pytest.approx(
            0.24 * sum(1 for r in srv.requests if _stage_of(r) == "ask_colour")
            + 0.15 * sum(1 for r in srv.requests if _stage_of(r) == "ask_name"))
        committed = store.read_table(store.work(out, "rows"))
        n1 = 0 if committed is None else committed.num_rows
        assert n1 < len(topics) and sent1 < 2 * len(topics)
        assert m1["cost"]["total_usd"] == pytest.approx(0.39 * n1)  # the committed rows' calls
        assert m1["budget"]["spent_usd"] <= 2.0 + 0.24 + 0.15  # at most each stage's first batch unprojected
        assert m1["outputs"] == {}  # nothing exported from a stopped run
        assert "Stopped by --max-cost" in (tmp_path / "out" / "report.html").read_text()

        m2 = driver.run(toy_llm, recipe(100.0), ["toy_llm"])
        assert m2["stopped"] is None and m2["resumed"] == (n1 > 0)
        assert len(srv.requests) - sent1 == 2 * (len(topics) - n1)  # committed rows are not asked again
        rows = store.read_table(store.work(out, "rows")).to_pylist()
        assert sorted(r["id"] for r in rows) == [f"t{k}" for k in range(len(topics))]
        f = {r["stage"]: r for r in m2["funnel"]}
        assert f["ask_colour"]["usd"] == pytest.approx(0.24 * len(topics))
        assert m2["cost"]["total_usd"] == pytest.approx(0.39 * len(topics))
        assert m2["cost"]["per_kept_row_usd"] == pytest.approx(0.39)
        assert m2["cost"]["stages"]["ask_name"]["billed_prompt_tokens"] == 12 * len(topics)

