"""The spend meter of a run with ``--max-cost``: one Ray actor every priced LLM stage reports to.

``SpendMeter`` is a plain class the driver starts as a named actor (``jobs.core.cost.start_meter``);
stages reach it by name (``meter_client``). Before a batch of calls a stage asks ``admit(stage,
calls)``: the projected spend, ``spent + average cost per call of that stage so far x calls``,
must stay within the limit (a stage with no calls yet projects nothing, so each stage gets a
first measurement). After the batch it reports ``add(stage, calls, usd)``. The first refusal
marks the meter stopped and every later ``admit`` is refused too; the stage then raises
``BudgetExceeded``, which the runtime lets through (it is a ``rows.StopRun``, not a row error),
so Ray Data stops with the committed blocks kept.
"""
from __future__ import annotations

from typing import Any

from udfs import rows

#: seconds a stage waits for the meter's answer
METER_TIMEOUT_S = 60.0


class BudgetExceeded(rows.StopRun):
    """A stage was refused by the spend meter: the run must stop (not a row error)."""


class SpendMeter:
    """Spend of one run against ``limit_usd`` (USD). Methods are called through Ray."""

    def __init__(self, limit_usd: float):
        self.limit = float(limit_usd)
        self.spent = 0.0
        self.reserved = 0.0  # projected cost of admitted batches not reported yet
        self.per_stage: dict[str, list[float]] = {}  # stage -> [calls, usd]
        self.stopped_by: str | None = None

    def admit(self, stage: str, calls: int) -> float | None:
        """The projected USD of ``calls`` more calls of ``stage`` (reserved until ``add``), or
        None when spent + reserved + that projection would pass the limit (the meter stops)."""
        if self.stopped_by is not None:
            return None
        done, usd = self.per_stage.get(stage, [0, 0.0])
        estimate = (usd / done if done else 0.0) * int(calls)
        if self.spent + self.reserved + estimate > self.limit:
            self.stopped_by = stage
            return None
        self.reserved += estimate
        return estimate

    def add(self, stage: str, calls: int, usd: float, reserved: float = 0.0) -> float:
        """Record what ``calls`` calls of ``stage`` cost, releasing the ``reserved`` projection
        ``admit`` returned for them; returns the run's spend so far (USD)."""
        entry = self.per_stage.setdefault(stage, [0, 0.0])
        entry[0] += int(calls)
        entry[1] += float(usd)
        self.spent += float(usd)
        self.reserved = max(0.0, self.reserved - float(reserved))
        return self.spent

    def state(self) -> dict[str, Any]:
        """``{"spent_usd", "limit_usd", "stopped", "stage", "per_stage": {stage: {"calls", "usd"}}}``."""
        return {"spent_usd": self.spent, "limit_usd": self.limit, "stopped": self.stopped_by is not None,
                "stage": self.stopped_by,
                "per_stage": {k: {"calls": int(v[0]), "usd": v[1]} for k, v in self.per_stage.items()}}


class MeterClient:
    """A stage's side of the meter: ``budget`` is ``{"meter", "stage", "input_per_1m",
    "output_per_1m"}`` (``jobs.core.cost.budget_configs``)."""

    def __init__(self, budget: dict[str, Any]):
        import ray

        self.stage = budget["stage"]
        self.input_per_1m, self.output_per_1m = float(budget["input_per_1m"]), float(budget["output_per_1m"])
        self.handle = ray.get_actor(budget["meter"])

    def admit(self, calls: int) -> float:
        """The projection reserved for ``calls`` more calls; raises ``BudgetExceeded`` when the
        meter refuses them."""
        import ray

        if not calls:
            return 0.0
        estimate = ray.get(self.handle.admit.remote(self.stage, calls), timeout=METER_TIMEOUT_S)
        if estimate is None:
            raise BudgetExceeded(f"stage {self.stage!r}: the projected spend would pass the run's --max-cost")
        return float(estimate)

    def add(self, calls: int, prompt_tokens: int, completion_tokens: int, reserved: float = 0.0) -> None:
        """Report ``calls`` sent calls and their billed tokens, releasing ``reserved``."""
        import ray

        if calls or reserved:
            usd = (prompt_tokens * self.input_per_1m + completion_tokens * self.output_per_1m) / 1e6
            ray.get(self.handle.add.remote(self.stage, calls, usd, reserved), timeout=METER_TIMEOUT_S)
