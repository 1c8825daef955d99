"""Client-side pacing of API requests: a fixed request rate, and pacing from the provider's
rate-limit headers.

``RateLimiter`` enforces ``options.qps`` (a fixed requests-per-second ceiling). ``HeaderPacer``
reads what the provider says is left of its current window after every response and spreads
the next requests over the time to the reset, so a run slows down before it meets 429s
instead of after. Header names (OpenAI's, also sent by Azure OpenAI and many compatible
servers; https://platform.openai.com/docs/guides/rate-limits, "Rate limits in headers"):

- ``x-ratelimit-remaining-requests`` / ``x-ratelimit-remaining-tokens``: what is left;
- ``x-ratelimit-reset-requests`` / ``x-ratelimit-reset-tokens``: time until the window
  refills, as Go-style durations (``"1s"``, ``"6m0s"``, ``"20ms"``, ``"1h2m3.5s"``) or plain
  seconds.

A provider that sends none of them (DeepSeek) is not paced: the fixed ``qps`` and the retry
back-off on 429 (``actors.llm_openai``) still apply. Every wait is bounded by ``max_wait_s``.
"""
from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Mapping

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNIT_S = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
#: a window reset assumed when the provider gives remaining counts without a reset time (Azure)
DEFAULT_RESET_S = 1.0


def parse_reset(value: str | None) -> float | None:
    """Seconds in a rate-limit reset header: ``"1s"`` -> 1.0, ``"6m0s"`` -> 360.0, ``"20ms"`` ->
    0.02, ``"1h2m3.5s"`` -> 3723.5, ``"2.5"`` -> 2.5. ``None`` when absent or unreadable."""
    if value is None:
        return None
    text = value.strip()
    try:
        return max(float(text), 0.0)
    except ValueError:
        pass
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        return None
    return sum(float(n) * _UNIT_S[u] for n, u in parts)


def _int(value: str | None) -> int | None:
    try:
        return None if value is None else int(float(value))
    except ValueError:
        return None


class RateLimiter:
    """A fixed request rate shared by all threads of an actor (``qps`` None/0 = off)."""

    def __init__(self, qps: float | None):
        self.interval = 1.0 / float(qps) if qps else 0.0
        self._lock = threading.Lock()
        self._next = 0.0

    def acquire(self) -> None:
        """Block until the next request slot."""
        if not self.interval:
            return
        with self._lock:
            now = time.monotonic()
            slot = max(now, self._next)
            self._next = slot + self.interval
        if slot > now:
            time.sleep(slot - now)


class HeaderPacer:
    """Paces the requests of one client (all its threads) from rate-limit response headers.

    ``update(headers)`` after every response (and every 429): it records the remaining
    requests ``R`` and tokens ``K`` of the window and the times to their resets. ``acquire(tokens)``
    before a request, with ``tokens`` the request's estimate (prompt + ``max_tokens``):

    - requests are spread evenly over the time to the reset: one slot every ``reset / R``
      seconds (``R == 0``: the first slot is at the reset);
    - when ``tokens`` exceeds the remaining tokens, the request waits for the token reset
      (the estimate is taken off ``K`` so concurrent threads do not all pass on one reading).

    Before the first headers it does nothing. A wait never exceeds ``max_wait_s`` seconds
    (a daily limit's reset may be hours away: the request is then sent and the provider's 429
    and the retry back-off decide). ``waited_s`` sums the seconds slept (for the stage's logs
    and tests). ``clock``/``sleep`` are injectable for tests.
    """

    def __init__(self, max_wait_s: float = 60.0, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        self.max_wait_s = float(max_wait_s)
        self.clock, self.sleep = clock, sleep
        self._lock = threading.Lock()
        self._next = 0.0  # earliest instant of the next request slot
        self._interval = 0.0  # seconds between slots from the last reading
        self._tokens: int | None = None  # remaining tokens of the window, less what was since sent
        self._tokens_reset_at = 0.0
        self.waited_s = 0.0
        self.readings = 0

    def update(self, headers: Mapping[str, str] | None) -> None:
        """Take the window's state from a response's headers (names case-insensitive)."""
        if not headers:
            return
        h = {k.lower(): v for k, v in headers.items()}
        requests = _int(h.get("x-ratelimit-remaining-requests"))
        tokens = _int(h.get("x-ratelimit-remaining-tokens"))
        if requests is None and tokens is None:
            return
        now = self.clock()
        with self._lock:
            self.readings += 1
            if requests is not None:
                reset = parse_reset(h.get("x-ratelimit-reset-requests"))
                reset = DEFAULT_RESET_S if reset is None else reset
                self._interval = reset / requests if requests > 0 else 0.0
                if requests == 0:
                    self._next = max(self._next, now + reset)
            if tokens is not None:
                reset = parse_reset(h.get("x-ratelimit-reset-tokens"))
                self._tokens = tokens
                self._tokens_reset_at = now + (DEFAULT_RESET_S if reset is None else reset)

    def acquire(self, tokens: int = 0) -> float:
        """Block until this request may be sent; returns the seconds waited (≤ ``max_wait_s``)."""
        with self._lock:
            now = self.clock()
            slot = max(now, self._next)
            if self._tokens is not None and now < self._tokens_reset_at and tokens > self._tokens:
                slot = max(slot, self._tokens_reset_at)
            slot = min(slot, now + self.max_wait_s)
            self._next = slot + self._interval
            if self._tokens is not None:
                self._tokens = self._tokens - tokens if slot < self._tokens_reset_at else None
            wait = slot - now
            self.waited_s += wait
        if wait > 0:
            self.sleep(wait)
        return wait
