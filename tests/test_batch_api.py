"""Batch API round trip (``--batch``, jobs.core.batches) on the toy pipeline of two LLM stages.

A fake Files + Batch API on loopback (tests/batch_api_server.py) stores the uploaded JSONL and
answers the client's real calls; the test decides when and how each batch finishes. Every run
goes through the real driver and Ray Data.
"""
from __future__ import annotations

import json

import pytest

from tests.batch_api_server import FakeBatchAPI
from tests.helpers import LoopbackServer
from tests.test_gen_cache import toy_input, toy_recipe, toy_respond

PRICES = {"input_per_1m": 2.0, "output_per_1m": 4.0, "batch_input_per_1m": 1.0, "batch_output_per_1m": 2.0}


def _respond(line: dict):
    status, body, _ = toy_respond({"body": line["body"]})
    return status, body


def _stage(line: dict) -> str:
    return "ask_colour" if "Name one colour" in json.dumps(line["body"]) else "ask_name"


def _run(tmp_path, url: str, out: str, batch: bool = True, cache=None):
    from jobs.core import driver
    from jobs.core.recipe import load_recipe
    from tests import toy_llm

    r = load_recipe(toy_llm.RECIPE, "toy_llm", recipe_file=toy_recipe(tmp_path / f"r-{out}", url, PRICES),
                    input=toy_input(tmp_path), output=str(tmp_path / out), batch=batch or None, cache=cache)
    return driver.run(toy_llm, r, ["toy_llm"])


def _rows(tmp_path, out: str) -> dict[str, dict]:
    from jobs.core import store

    t = store.read_table(store.work(str(tmp_path / out), "rows"))
    return {} if t is None else {x["id"]: x for x in t.to_pylist()}


def _funnel(m) -> dict[str, dict]:
    return {r["stage"]: r for r in m["funnel"]}


def test_round_trip_matches_a_direct_run(ray_local, tmp_path, capsys):
    from jobs.core import cli

    with LoopbackServer(toy_respond) as direct:
        _run(tmp_path, direct.url, "direct", batch=False)
    expected = _rows(tmp_path, "direct")
    assert len(expected) == 3

    with FakeBatchAPI() as api:
        m1 = _run(tmp_path, api.url, "out")
        assert api.requests_per_batch() == [3]
        assert {_stage(x) for x in api.lines("batch_1")} == {"ask_colour"}
        assert m1["waiting"] == {"ask_colour": 3}
        assert _rows(tmp_path, "out") == {}  # nothing committed as final
        f1 = _funnel(m1)
        assert f1["ask_colour"]["waiting"] == 3 and f1["ask_colour"]["errored"] == 0
        assert f1["ask_colour"]["rejected"] == 0 and f1["ask_colour"]["out"] == 0
        assert [b["id"] for b in m1["batches"]] == ["batch_1"] and m1["batches"][0]["requests"] == 3
        assert m1["outputs"] == {}
        rec_file = tmp_path / "out" / "_work" / "batches" / "batch_1.json"
        rec = json.loads(rec_file.read_text())
        assert rec["stage"] == "ask_colour" and rec["input_file_id"] == "file-1" and len(rec["custom_ids"]) == 3
        assert rec["status"] == "in_progress" and not rec["ingested"]

        # still running: status polls, ingests nothing; a rerun resubmits nothing
        assert cli.status([str(tmp_path / "out")]) == 0
        assert "in_progress" in capsys.readouterr().out
        m_again = _run(tmp_path, api.url, "out")
        assert api.requests_per_batch() == [3] and m_again["waiting"] == {"ask_colour": 3}

        api.finish("batch_1", _respond)
        assert cli.status([str(tmp_path / "out")]) == 0
        printed = capsys.readouterr().out
        assert "completed" in printed and "ingested: 3 answers" in printed
        rec = json.loads(rec_file.read_text())
        assert rec["ingested"] and rec["succeeded"] == 3 and rec["missing"] == 0

        m2 = _run(tmp_path, api.url, "out")
        assert api.requests_per_batch() == [3, 3]
        assert {_stage(x) for x in api.lines("batch_2")} == {"ask_name"}
        assert m2["waiting"] == {"ask_name": 3} and _rows(tmp_path, "out") == {}
        assert _funnel(m2)["ask_colour"]["out"] == 3 and _funnel(m2)["ask_name"]["waiting"] == 3

        api.finish("batch_2", _respond)
        m3 = _run(tmp_path, api.url, "out")  # the rerun ingests by itself
        assert api.requests_per_batch() == [3, 3]
        assert m3["waiting"] == {} and m3["outputs"] == {"rows": 3}
    got = _rows(tmp_path, "out")
    assert set(got) == set(expected)
    for i, row in expected.items():
        for col in ("_status", "ask_colour_parsed", "ask_colour_text", "ask_name_text", "ask_name_prompt_tokens",
                    "ask_colour_completion_tokens"):
            assert got[i][col] == row[col], (i, col)
    # batch replies are paid for (at the batch price), not counted as cache savings
    cost = m3["cost"]
    assert cost["saved_usd"] == 0
    assert cost["stages"]["ask_colour"]["billed_prompt_tokens"] == 60
    assert cost["total_usd"] == pytest.approx(3 * (20 * 1 + 4 * 2) / 1e6 + 3 * (12 * 1 + 3 * 2) / 1e6)
    assert m3["cache"]["stages"]["ask_colour"]["hits"] == 0 and m3["cache"]["stages"]["ask_colour"]["misses"] == 3


def _is(topic: str):
    return lambda line: topic in json.dumps(line["body"])


def test_expired_batch_keeps_its_answers_and_sends_the_rest_again(ray_local, tmp_path):
    with FakeBatchAPI() as api:
        _run(tmp_path, api.url, "out")
        assert api.requests_per_batch() == [3]
        api.finish("batch_1", _respond, status="expired", drop=_is("the sea"))  # one request never ran
        m2 = _run(tmp_path, api.url, "out")
        rec = next(b for b in m2["batches"] if b["id"] == "batch_1")
        assert rec["status"] == "expired" and (rec["succeeded"], rec["failed"], rec["missing"]) == (2, 0, 1)
        # the unanswered call is spooled again (its own new batch); the answered rows go on
        assert api.requests_per_batch() == [3, 1, 2]
        assert [_stage(x) for x in api.lines("batch_2")] == ["ask_colour"] and _is("the sea")(api.lines("batch_2")[0])
        assert {_stage(x) for x in api.lines("batch_3")} == {"ask_name"}
        assert m2["waiting"] == {"ask_colour": 1, "ask_name": 2}
        api.finish("batch_2", _respond)
        api.finish("batch_3", _respond)
        m3 = _run(tmp_path, api.url, "out")
        assert api.requests_per_batch() == [3, 1, 2, 1] and m3["waiting"] == {"ask_name": 1}
        assert len(_rows(tmp_path, "out")) == 2
        api.finish("batch_4", _respond)
        m4 = _run(tmp_path, api.url, "out")
        assert api.requests_per_batch() == [3, 1, 2, 1] and m4["waiting"] == {}
    rows = _rows(tmp_path, "out")
    assert sorted(rows) == ["t0", "t1", "t2"] and all(r["_status"] == "ok" for r in rows.values())
    assert json.loads(rows["t1"]["ask_colour_parsed"]) == {"colour": "blue"}
    assert _funnel(m4)["ask_name"]["out"] == 3


def test_partially_failed_batch_turns_its_failed_calls_into_row_errors(ray_local, tmp_path):
    def respond(line):
        if _is("grass")(line):  # a non-200 response line
            return 400, {"error": {"message": "prompt flagged by the moderation", "type": "invalid_request_error"}}
        return _respond(line)

    with FakeBatchAPI() as api:
        _run(tmp_path, api.url, "out")
        api.finish("batch_1", respond, error_line=lambda line: "model overloaded" if _is("apples")(line) else None)
        m2 = _run(tmp_path, api.url, "out")
        rec = next(b for b in m2["batches"] if b["id"] == "batch_1")
        assert (rec["succeeded"], rec["failed"], rec["missing"]) == (1, 2, 0)
        assert api.requests_per_batch() == [3, 1]  # only the answered row goes on
        assert _is("blue")(api.lines("batch_2")[0])
        rows = _rows(tmp_path, "out")
        assert sorted(rows) == ["t0", "t2"] and all(r["_status"] == "error" for r in rows.values())
        reasons = {i: json.loads(r["_reason"]) for i, r in rows.items()}
        assert reasons["t0"]["type"] == "BatchRequestError" and "model overloaded" in reasons["t0"]["message"]
        assert "HTTP 400" in reasons["t2"]["message"] and "moderation" in reasons["t2"]["message"]
        assert m2["waiting"] == {"ask_name": 1} and _funnel(m2)["ask_colour"]["errored"] == 2
        api.finish("batch_2", _respond)
        m3 = _run(tmp_path, api.url, "out")
        assert api.requests_per_batch() == [3, 1] and m3["waiting"] == {}
    rows = _rows(tmp_path, "out")
    assert rows["t1"]["_status"] == "ok" and rows["t1"]["ask_name_text"] == "Tom the blue"
    errors = [json.loads(x) for x in (tmp_path / "out" / "errors" / "errors.jsonl").read_text().splitlines()]
    assert sorted(e["id"] for e in errors) == ["t0", "t2"]


def test_reask_becomes_a_second_batch(ray_local, tmp_path):
    def respond(line):
        body = line["body"]
        repair = any(m["role"] == "assistant" for m in body["messages"])
        if _is("the sea")(line) and _stage(line) == "ask_colour" and not repair:
            from tests.helpers import chat_completion

            return 200, chat_completion(body["model"], json.dumps({"colour": "BLUE!!"}), 20, 4)
        return _respond(line)

    with FakeBatchAPI() as api:
        _run(tmp_path, api.url, "out")
        api.finish("batch_1", respond)
        m2 = _run(tmp_path, api.url, "out")
        # the invalid reply's repair call is the next ask_colour batch; the valid rows go on
        assert api.requests_per_batch() == [3, 1, 2]
        repair = api.lines("batch_2")[0]["body"]["messages"]
        assert _stage(api.lines("batch_2")[0]) == "ask_colour" and repair[-2]["role"] == "assistant"
        assert "BLUE!!" in repair[-2]["content"]
        assert m2["waiting"] == {"ask_colour": 1, "ask_name": 2}
        api.finish("batch_2", respond)
        api.finish("batch_3", respond)
        m3 = _run(tmp_path, api.url, "out")
        assert api.requests_per_batch() == [3, 1, 2, 1] and m3["waiting"] == {"ask_name": 1}
        api.finish("batch_4", respond)
        m4 = _run(tmp_path, api.url, "out")
        assert api.requests_per_batch() == [3, 1, 2, 1] and m4["waiting"] == {}
    rows = _rows(tmp_path, "out")
    assert all(r["_status"] == "ok" for r in rows.values())
    assert rows["t1"]["ask_colour_llm_attempts"] == 2 and rows["t1"]["ask_colour_llm_repaired"]
    assert rows["t0"]["ask_colour_llm_attempts"] == 1
    # both calls of the repaired row were paid for: 4 ask_colour calls of 20 prompt tokens
    assert m4["cost"]["stages"]["ask_colour"]["billed_prompt_tokens"] == 80
