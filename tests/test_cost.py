"""The --dry-run cost projection (jobs.core.cost.dry_run_table) from a sample run's manifest."""
from __future__ import annotations

from jobs import antidote as J
from jobs.core import cost, driver
from jobs.core.recipe import load_recipe


def _table(previous: dict, rows: int | None) -> list[str]:
    r = load_recipe(J.RECIPE, "antidote", "paper", input="x.jsonl", output="o")
    return cost.dry_run_table(driver.plan(J, r), r, previous, rows).splitlines()


def test_projection_scales_the_samples_tokens_per_limit_unit():
    sample = {"recipe": {"limit": 4},  # deepseek-chat: 0.27 USD per 1M input tokens (paper recipe)
              "funnel": [{"stage": "ingest", "in": 9, "out": 4},
                         {"stage": "caption_parse", "in": 4, "prompt_tokens": 4000, "completion_tokens": 0}]}
    lines = _table(sample, 1000)
    parse = next(x for x in lines if x.split()[0] == "caption_parse").split()
    assert parse[1:] == ["deepseek-chat", "0.270", "1.100", "1000.0", "0.0", "0.27"]  # 1000 tok/row x 1000 rows
    judge = next(x for x in lines if x.split()[0] == "caption_judge").split()
    assert judge[-3:] == ["-", "-", "-"]  # not measured: nothing guessed
    assert any("estimated total for 1000 input rows (--limit units): 0.27 USD" in x for x in lines)
    assert any("no measured token counts for some stages" in x for x in lines)


def test_a_multi_phase_sample_is_counted_in_limit_units():
    """MIRROR's --limit counts clients; its dialogues and turns are later phases with more rows."""
    sample = {"recipe": {"limit": 2},
              "funnel": [{"stage": "faces:ingest", "out": 5}, {"stage": "clients:ingest", "out": 2},
                         {"stage": "dialogues:ingest", "out": 8},
                         {"stage": "caption_parse", "prompt_tokens": 2000, "completion_tokens": 200}]}
    parse = next(x for x in _table(sample, None) if x.split()[0] == "caption_parse").split()
    assert parse[4:6] == ["1000.0", "100.0"]  # per client, not per face or per dialogue
    no_limit = {"recipe": {"limit": None}, "funnel": [{"stage": "ingest", "out": 10},
                                                      {"stage": "caption_parse", "prompt_tokens": 2000,
                                                       "completion_tokens": 0}]}
    parse = next(x for x in _table(no_limit, None) if x.split()[0] == "caption_parse").split()
    assert parse[4] == "200.0"
