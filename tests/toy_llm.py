"""A pipeline of two LLM stages over the real runtime, for the shared-engine tests (not shipped).

``colour_prompts`` -> ``ask_colour`` (JSON schema ``Colour``) -> ``name_prompts`` -> ``ask_name``
(free text) -> ``slow`` (a delay per block, so a test can interrupt the run between commits).
A topic starting with ``BROKEN`` gets malformed chat messages (the row must become an error
while its batch-mates succeed).
"""
from __future__ import annotations

import json
import time

import pyarrow as pa
from pydantic import BaseModel, Field

from jobs.core.recipe import Recipe
from jobs.core.runtime import Stage, llm_stage
from udfs import io

INPUT_COLUMNS = ("topic",)


class ToyLLMRecipe(Recipe):
    pass


RECIPE = ToyLLMRecipe


class Colour(BaseModel):
    """The reply schema of ``ask_colour``."""

    colour: str = Field(pattern="^[a-z ]{1,20}$")


class SlowParams(BaseModel):
    delay_s: float = 0.0


def colour_prompts(batch, params):
    out = []
    for topic in batch["topic"]:
        if topic.startswith("BROKEN"):
            out.append(json.dumps([{"role": "user"}]))  # no content: invalid for every backend
        else:
            out.append(json.dumps([{"role": "user", "content": f"Name one colour of {topic}. Answer in JSON."}]))
    return {"messages": out}


def name_prompts(batch, params):
    parsed = [json.loads(p) for p in batch["ask_colour_parsed"]]
    return {"messages": [json.dumps([{"role": "user", "content": f"Give a short name to a {p['colour']} cat."}])
                         for p in parsed]}


def slow(batch, params: SlowParams):
    time.sleep(params.delay_s)
    return {"done_at": [time.time()] * len(batch["id"])}


def stages(recipe):
    return [Stage("colour_prompts", colour_prompts, ("topic",), ("messages",)),
            llm_stage("ask_colour", "tests.toy_llm:Colour"),
            Stage("name_prompts", name_prompts, ("ask_colour_parsed",), ("messages",)),
            llm_stage("ask_name"),
            Stage("slow", slow, ("ask_name_text",), ("done_at",), params_model=SlowParams)]


def ingest(recipe):
    recs = [json.loads(line) for line in io.read_text(recipe.input).splitlines() if line.strip()]
    return pa.Table.from_pylist([{"id": r["id"], "topic": r["topic"]} for r in recs]), [], 0


def export(rows, recipe, out):
    return {"rows": rows.num_rows}
