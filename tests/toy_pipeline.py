"""A small pipeline over the real runtime, used by the runtime tests (not shipped as a job)."""
from __future__ import annotations

import json
import os
import time

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel

from jobs.core.recipe import Recipe
from jobs.core.runtime import Stage
from udfs import io
from udfs import rows as R

INPUT_COLUMNS = ("text",)


class ToyRecipe(Recipe):
    pass


RECIPE = ToyRecipe


class SlowParams(BaseModel):
    delay_s: float = 0.0
    log: str = ""


def upper(batch, params):
    """Raises for the whole batch when any id contains 'bad' (the runtime isolates the rows)."""
    for i in batch["id"]:
        if "bad" in i:
            raise ValueError(f"cannot handle {i}")
    return {"upper": [t.upper() for t in batch["text"]]}


def length_filter(batch, params, audit=False):
    return {"length": [len(t) for t in batch["upper"]],
            R.ROW_REJECT: [None if len(t) >= 3 else f"too short ({len(t)} < 3)" for t in batch["upper"]]}


def slow(batch, params: SlowParams):
    time.sleep(params.delay_s)
    if params.log:
        with open(params.log, "a") as f:
            f.write("".join(f"{i}\n" for i in batch["id"]))
    return {"done_at": [time.time()] * len(batch["id"]), "pid": [os.getpid()] * len(batch["id"])}


def stages(recipe):
    return [Stage("upper", upper, ("text",), ("upper",)),
            Stage("length_filter", length_filter, ("upper",), ("length",), filter=True),
            Stage("slow", slow, ("upper",), ("done_at", "pid"), params_model=SlowParams)]


def ingest(recipe):
    recs = [json.loads(line) for line in io.read_text(recipe.input).splitlines() if line.strip()]
    n = recipe.limit or len(recs)
    return pa.Table.from_pylist([{"id": r["id"], "text": r["text"]} for r in recs[:n]]), [], len(recs[n:])


def export(rows, recipe, out):
    ok = rows.filter(pc.equal(rows.column(R.STATUS), R.OK)).select(["id", "upper"]).to_pylist()
    io.write_text(io.join(out, "toy.jsonl"), "".join(json.dumps(r) + "\n" for r in ok))
    return {"toy": len(ok)}
