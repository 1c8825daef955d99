"""Command line: ``python -m jobs <command> ...`` (also the console script ``mmsynth``).

The commands and their one-line purposes come from ``jobs.core.registry``; ``python -m jobs``
with no argument or ``--help`` prints them with an example each. Errors in arguments, recipes
or plans print one line (``error: ...``) and exit with 2, before any Ray cluster is started.
"""
from __future__ import annotations

import argparse
import importlib
import os
import shlex
import sys
import textwrap
import time

from jobs.core import registry

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("KERAS_BACKEND", "torch")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # busy-waiting OpenMP threads starve other actors
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # local clusters; a remote one sets its own


#: exit status of a run stopped by --max-cost (committed rows kept; rerun to resume)
BUDGET_EXIT = 3


def _pipeline_parser(name: str, module) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=f"python -m jobs {name}", description=module.__doc__.splitlines()[0])
    ap.add_argument("--input", help="input path or s3:// URI")
    ap.add_argument("--output", help="output folder or s3:// URI")
    ap.add_argument("--profile", choices=["offline", "local", "paper"], default=None,
                    help="model profile (default: the recipe's, offline)")
    ap.add_argument("--recipe", help="recipe YAML (default: the bundled one for the profile)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a recipe field, e.g. caption_parse.batch_size=4")
    ap.add_argument("--limit", type=int, help="process at most N input rows")
    ap.add_argument("--dry-run", action="store_true",
                    help="validate recipe, resolve models and check columns; load nothing")
    ap.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS or a local cluster)")
    cache = ap.add_mutually_exclusive_group()
    cache.add_argument("--cache", metavar="URI", help="generation cache folder or s3:// URI (default: the "
                       "recipe's cache); unchanged model calls are served from it")
    cache.add_argument("--no-cache", action="store_true", help="send every model call (ignore the recipe's cache)")
    ap.add_argument("--max-cost", type=float, metavar="USD", help="stop cleanly before the spend on priced models "
                    "(recipe prices) would pass USD; rerun the same command to resume")
    ap.add_argument("--batch", action="store_true", default=None,
                    help="send the LLM calls of OpenAI-compatible stages through the Batch API (half price, "
                         "results within 24 h): the run submits them and ends; `python -m jobs status OUT` "
                         "polls; rerunning the same command ingests the results and goes on")
    if hasattr(module, "add_arguments"):
        module.add_arguments(ap)
    return ap


def _load(name: str):
    if name not in registry.PIPELINES:
        raise ValueError(f"unknown command {name!r} (choose from {', '.join(registry.BY_NAME)}; "
                         "python -m jobs --help lists them)")
    return importlib.import_module(registry.PIPELINES[name])


def usage() -> str:
    """The top-level help: every command of the registry with its purpose and an example."""
    width = max(len(c.name) for c in registry.COMMANDS)
    lines = ["usage: python -m jobs <command> [options]   (also: mmsynth <command> ...)", "",
             "mmsynth runs published multimodal synthetic-data pipelines as Ray jobs, on a laptop or a",
             "cluster. Every command takes --help. Commands:", ""]
    for c in registry.COMMANDS:
        purpose = textwrap.wrap(c.purpose, 100 - width - 4)
        lines.append(f"  {c.name:<{width}}  {purpose[0]}")
        lines += [f"  {'':<{width}}  {more}" for more in purpose[1:]]
        lines.append(f"  {'':<{width}}    e.g. {c.example}")
    lines += ["", "Pipelines (antidote, antidote-pairs, mmgen, mirror) take --profile offline|local|paper, --recipe FILE,",
              "--set stage.key=value, --limit N, --dry-run (validate recipe, models and columns; load nothing)",
              "and --address ADDR. Outputs: OUT/manifest.json, OUT/report.html, OUT/rejects/, OUT/errors/."]
    return "\n".join(lines)


def run_pipeline(name: str, argv: list[str]) -> int:
    """``python -m jobs <pipeline> ...``: plan (and stop there with ``--dry-run``) or run."""
    from jobs.core import cost, driver, funnel, store
    from jobs.core.recipe import load_recipe

    module = _load(name)
    args = _pipeline_parser(name, module).parse_args(argv)
    if args.limit is not None and args.limit < 1:
        raise ValueError("--limit must be at least 1")
    if args.max_cost is not None and args.max_cost <= 0:
        raise ValueError("--max-cost must be a positive number of USD")
    fields = {"input": args.input, "output": args.output, "limit": args.limit, "cache": args.cache,
              "max_cost": args.max_cost, "batch": args.batch}
    if hasattr(module, "recipe_fields"):
        fields.update(module.recipe_fields(args))
    recipe = load_recipe(module.RECIPE, name, args.profile, args.recipe, args.set, **fields)
    if args.no_cache:
        recipe = recipe.model_copy(update={"cache": None})
    if recipe.profile == "offline":  # the offline profile never reaches a model hub
        os.environ["HF_HUB_OFFLINE"] = "1"
    p = driver.plan(module, recipe)
    driver.check_batch(p, recipe)
    if args.dry_run:
        print(f"recipe ok: {name}, profile {recipe.profile}, {len(p.stages)} stages")
        if recipe.batch:
            print("batch mode: the calls of " + ", ".join(sp.stage.name for sp in p.stages if driver.batched(sp))
                  + " go through the Batch API (batch prices)")
        print(driver.describe_plan(p))
        if p.placeholder_stages():
            print(f"placeholder models (outputs marked, filters in audit mode): {', '.join(p.placeholder_stages())}")
        if recipe.prices:
            from udfs import io

            out = (recipe.output or "").rstrip("/")
            previous = store.load_manifest(out) if out and io.exists(io.join(out, "manifest.json")) else None
            table = cost.dry_run_table(p, recipe, previous, recipe.limit)
            if table:
                print("cost (USD per 1M tokens from the recipe's prices):")
                print(table)
        return 0
    if not recipe.input:
        raise ValueError("--input is required")
    driver.check_inputs(recipe)  # before a cluster is started
    try:
        manifest = driver.run(module, recipe, ["python", "-m", "jobs", name, *argv], address=args.address)
    except cost.BudgetStop as e:
        manifest = store.load_manifest(recipe.output.rstrip("/"))
        print()
        funnel.print_funnel(manifest["funnel"])
        print(cost.format_cost(manifest["cost"]))
        print(f"\n{e}", file=sys.stderr)
        return BUDGET_EXIT
    print()
    funnel.print_funnel(manifest["funnel"])
    if recipe.prices:  # local models cost nothing per token: no cost line without a price table
        print(cost.format_cost(manifest["cost"]))
    if manifest["placeholder_stages"]:
        audit = manifest.get("audit_stages") or []
        print(f"\nNOTE: placeholder models in {', '.join(manifest['placeholder_stages'])}: their outputs are not "
              "meaningful" + (f"; filters in audit mode (verdicts recorded, not applied): {', '.join(audit)}."
                              if audit else "."))
    if manifest.get("waiting"):
        _print_waiting(manifest, recipe.output, ["python", "-m", "jobs", name, *argv])
        return 0
    print(f"\noutputs in {recipe.output} (manifest.json, rejects/, errors/)")
    return 0


def _print_waiting(manifest: dict, out: str, command: list[str]) -> None:
    """What a ``--batch`` run left waiting and how to go on."""
    from jobs.core import batches

    pending = batches.pending(manifest.get("batches") or [])
    print(f"\nwaiting for the Batch API: {batches.describe_waiting(manifest['waiting'])} (rows not committed yet); "
          f"{len(pending)} batch(es) pending:")
    print(batches.describe(pending))
    print(f"check them with: python -m jobs status {out}\n"
          f"when they completed, rerun the same command: {' '.join(shlex.quote(a) for a in command)}")


def submit(argv: list[str]) -> int:
    """Submit ``python -m jobs <pipeline> ARGS`` as a Ray job with this folder as working_dir."""
    ap = argparse.ArgumentParser(prog="python -m jobs submit")
    ap.add_argument("pipeline")
    ap.add_argument("--address", default=os.environ.get("RAY_ADDRESS", "http://127.0.0.1:8265"),
                    help="Ray dashboard/jobs address of the cluster")
    ap.add_argument("--no-wait", action="store_true", help="return after submitting")
    ap.add_argument("--wait-timeout", type=float, default=7 * 24 * 3600,
                    help="stop waiting after this many seconds (the job goes on; default one week)")
    args, rest = ap.parse_known_args(argv)
    if args.pipeline not in registry.BY_NAME or args.pipeline == "submit":
        _load(args.pipeline)
    from ray.job_submission import JobStatus, JobSubmissionClient

    from jobs.core.engines import SUBMIT_ROOT_ENV
    from jobs.core.runtime import forwarded_env

    client = JobSubmissionClient(args.address)
    entry = "python -m jobs " + " ".join(shlex.quote(a) for a in [args.pipeline, *rest])
    # working_dir = the current folder, as `ray job submit --working-dir .`; API keys are not
    # forwarded: give the cluster's nodes the variable the recipe names (api_key_env). The venvs
    # stay here; a relative py_executable is looked up in this checkout too (SUBMIT_ROOT_ENV).
    runtime_env = {"working_dir": os.getcwd(), "env_vars": {**forwarded_env(), SUBMIT_ROOT_ENV: os.getcwd()},
                   "excludes": [".venv/", ".venv-vllm/", ".git/", "out/", "benchmarks/results/", "**/__pycache__/"]}
    for attempt in range(20):  # a head that just started may have no job agent yet (up to ~60 s)
        try:
            job_id = client.submit_job(entrypoint=entry, runtime_env=runtime_env)
            break
        except RuntimeError as e:
            if "try again later" not in str(e) or attempt == 19:
                raise
            time.sleep(3)
    print(f"submitted {job_id}: {entry}")
    if args.no_wait:
        return 0
    deadline = time.monotonic() + args.wait_timeout
    while (status := client.get_job_status(job_id)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        if time.monotonic() > deadline:
            print(f"job {job_id}: still {status} after {args.wait_timeout:.0f} s; it goes on "
                  f"(ray job status {job_id} --address {args.address})")
            return 1
        time.sleep(2)
    print(client.get_job_logs(job_id)[-4000:])
    print(f"job {job_id}: {status}")
    return 0 if status == JobStatus.SUCCEEDED else 1


def status(argv: list[str]) -> int:
    """Print the per-stage funnel of a run from its manifest; for a ``--batch`` run, poll its
    Batch API batches, print each one's state and ingest the finished ones
    (``jobs.core.batches.poll``)."""
    from jobs.core import batches, funnel, store

    ap = argparse.ArgumentParser(prog="python -m jobs status")
    ap.add_argument("output")
    args = ap.parse_args(argv)
    m = store.load_manifest(args.output)
    print(f"{m['pipeline']} run finished {m['finished']} ({m['wall_s']} s), profile {m['recipe']['profile']}")
    funnel.print_funnel(m["funnel"])
    if m.get("placeholder_stages"):
        print(f"placeholder models: {', '.join(m['placeholder_stages'])}")
    if batches.records(args.output):
        recs = batches.poll(args.output)
        print("\nBatch API batches:")
        print(batches.describe(recs))
        if m.get("waiting"):
            todo = batches.pending(recs)
            print(f"rows waiting: {batches.describe_waiting(m['waiting'])}; " + (f"{len(todo)} batch(es) still running" if todo else
                                               "every batch is ingested: rerun the command to go on: "
                                               + " ".join(shlex.quote(a) for a in m["command"])))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m jobs`` and ``mmsynth``; returns the exit status."""
    from jobs.core.driver import PlanError
    from jobs.core.recipe import RecipeError

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(usage())
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    try:
        entry = registry.BY_NAME.get(cmd)
        if entry is not None and not entry.pipeline:
            module, _, func = entry.target.partition(":")
            return getattr(importlib.import_module(module), func)(rest)
        return run_pipeline(cmd, rest)
    except (RecipeError, PlanError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        return 130
