"""A two-phase toy pipeline over the real runtime (runtime tests only): phase ``words`` maps
sentences, phase ``letters`` has one row per word of every sentence that passed."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.compute as pc

from jobs.core.driver import Phase
from jobs.core.recipe import Recipe
from jobs.core.runtime import Stage
from udfs import io
from udfs import rows as R


class ToyPhasesRecipe(Recipe):
    pass


RECIPE = ToyPhasesRecipe


def split_words(batch, params):
    return {"words": [t.split() for t in batch["text"]]}


def has_two_words(batch, params, audit=False):
    return {R.ROW_REJECT: [None if len(w) >= 2 else "fewer than 2 words" for w in batch["words"]]}


def shout(batch, params):
    for w in batch["word"]:
        if w == "boom":
            raise ValueError("cannot shout boom")
    return {"shout": [w.upper() + "!" for w in batch["word"]]}


def ingest_sentences(recipe, previous):
    recs = [json.loads(line) for line in io.read_text(recipe.input).splitlines() if line.strip()]
    return pa.Table.from_pylist([{"id": r["id"], "text": r["text"]} for r in recs]), [], 0


def ingest_words(recipe, previous):
    """One row per word of every sentence that got through phase ``words``; id ``<sentence>-<k>``."""
    ok = previous["words"].filter(pc.equal(previous["words"].column(R.STATUS), R.OK))
    out = [{"id": f"{r['id']}-{k}", "sentence": r["id"], "word": w}
           for r in ok.select(["id", "words"]).to_pylist() for k, w in enumerate(r["words"])]
    return pa.Table.from_pylist(out, schema=pa.schema([("id", pa.string()), ("sentence", pa.string()),
                                                        ("word", pa.string())])), [], 0


PHASES = [
    Phase("words", ("text",), lambda r: [Stage("split_words", split_words, ("text",), ("words",)),
                                         Stage("two_words", has_two_words, ("words",), (), filter=True)],
          ingest_sentences),
    Phase("letters", ("sentence", "word"), lambda r: [Stage("shout", shout, ("word",), ("shout",))], ingest_words),
]


def export(by_phase, recipe, out):
    letters = by_phase["letters"]
    ok = letters.filter(pc.equal(letters.column(R.STATUS), R.OK)).select(["id", "shout"]).to_pylist()
    io.write_text(io.join(out, "shouts.jsonl"), "".join(json.dumps(r) + "\n" for r in ok))
    return {"shouts": len(ok), "funnel": [{"stage": "sentences_complete", "unit": "sentences", "in": 2, "out": 1,
                                            "rejected": 1, "errored": 0}]}
