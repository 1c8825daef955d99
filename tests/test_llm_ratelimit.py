"""Pacing from rate-limit headers (actors.ratelimit) and its use by the OpenAI backend."""
from __future__ import annotations

import json

import numpy as np
import pytest

from actors.llm import LLMStage
from actors.llm_openai import IMAGE_TOKENS, estimate_tokens
from actors.models import resolve
from actors.ratelimit import HeaderPacer, parse_reset
from tests.helpers import LoopbackServer, chat_completion
from udfs import rows


class FakeClock:
    """A clock that only moves when someone sleeps."""

    def __init__(self):
        self.now = 0.0
        self.sleeps: list[float] = []

    def sleep(self, s: float) -> None:
        self.sleeps.append(round(s, 6))
        self.now += s


def pacer(max_wait_s: float = 60.0) -> tuple[HeaderPacer, FakeClock]:
    c = FakeClock()
    return HeaderPacer(max_wait_s, clock=lambda: c.now, sleep=c.sleep), c


@pytest.mark.parametrize("text,seconds", [("1s", 1.0), ("6m0s", 360.0), ("20ms", 0.02), ("1h2m3.5s", 3723.5),
                                          ("2.5", 2.5), ("0", 0.0), (None, None), ("soon", None), ("1s2x", None)])
def test_parse_reset(text, seconds):
    assert parse_reset(text) == (pytest.approx(seconds) if seconds is not None else None)


def test_requests_are_spread_over_the_window():
    p, clock = pacer()
    p.update({"X-RateLimit-Remaining-Requests": "4", "X-RateLimit-Reset-Requests": "2s"})
    waits = [p.acquire() for _ in range(4)]
    assert waits == pytest.approx([0.0, 0.5, 0.5, 0.5])
    assert clock.now == pytest.approx(1.5) and p.readings == 1


def test_no_requests_left_waits_for_the_reset_bounded_by_max_wait():
    p, clock = pacer()
    p.update({"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "3s"})
    assert p.acquire() == pytest.approx(3.0)
    p, clock = pacer(max_wait_s=5.0)
    p.update({"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "6h0m0s"})
    assert p.acquire() == pytest.approx(5.0)  # a daily limit: the provider's 429 decides


def test_tokens_remaining_hold_back_a_request_that_does_not_fit():
    p, clock = pacer()
    p.update({"x-ratelimit-remaining-tokens": "100", "x-ratelimit-reset-tokens": "10s"})
    assert p.acquire(60) == 0.0  # fits; 40 left on this reading
    assert p.acquire(60) == pytest.approx(10.0)  # does not: wait for the token window
    assert p.acquire(60) == 0.0  # the window reset: unknown again until the next reading


def test_no_headers_no_pacing():
    p, clock = pacer()
    p.update({"content-type": "application/json"})
    p.update(None)
    assert [p.acquire(10_000) for _ in range(3)] == [0.0, 0.0, 0.0] and p.readings == 0


def test_estimate_tokens_counts_text_images_and_max_tokens():
    body = {"max_tokens": 100, "messages": [
        {"role": "system", "content": "x" * 40},
        {"role": "user", "content": [{"type": "text", "text": "y" * 80},
                                     {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 9999}}]}]}
    assert estimate_tokens(body) == 10 + 20 + IMAGE_TOKENS + 100
    assert estimate_tokens({"messages": []}) == 256


def _model(url: str, **options) -> dict:
    opts = {"base_url": url + "/v1", "api_key_env": None, "max_retries": 2, "timeout_s": 5,
            "backoff_s": 0.01, "max_concurrency": 1, **options}
    return resolve({"backend": "openai", "model": "deepseek-chat", "options": opts}).model_dump()


def _batch(n: int) -> dict:
    return {"id": np.array([f"r{i}" for i in range(n)], dtype=object),
            "messages": np.array([json.dumps([{"role": "user", "content": f"q{i}"}]) for i in range(n)], dtype=object)}


def test_openai_backend_reads_the_headers_and_paces(monkeypatch):
    """The server says no request is left for 50 ms after each answer, and the first answer is
    a 429 with the same headers: every request after a reading waits for the reset, the 429 is
    retried, and every row gets its answer."""
    served = []

    def respond(req):
        served.append(req["body"]["messages"][-1]["content"])
        headers = {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "50ms",
                   "x-ratelimit-remaining-tokens": "100000", "x-ratelimit-reset-tokens": "50ms"}
        if len(served) == 1:
            return 429, {"error": {"message": "slow down", "type": "rate_limit"}}, {**headers, "retry-after": "0"}
        return 200, chat_completion("deepseek-chat", "ok"), headers

    with LoopbackServer(respond) as srv:
        stage = LLMStage(_model(srv.url), {"temperature": 0})
        assert isinstance(stage.engine.pacer, HeaderPacer)
        stage.engine.pacer, clock = pacer()  # the same pacer on a clock that moves only when it sleeps
        out = stage(_batch(3))
        assert list(out["generated_text"]) == ["ok"] * 3 and all(out[rows.ROW_ERROR] == None)  # noqa: E711
        assert served == ["q0", "q0", "q1", "q2"]
        assert stage.engine.pacer.readings == 4  # the 429's headers count too
        assert clock.sleeps == pytest.approx([0.05] * 3)  # each request after a reading waited for the reset

        off = LLMStage(_model(srv.url, pace_from_headers=False), {"temperature": 0})
        assert off.engine.pacer is None
        assert list(off(_batch(1))["generated_text"]) == ["ok"]
