"""Run lifecycle shared by every pipeline: plan → ingest → execute (resumable) → export → manifest.

Layout of an output folder (local or ``s3://``)::

    OUT/_work/input/      normalized input rows (written once; a rerun reuses them)
    OUT/_work/rows/       every processed row with its status (Ray Data parquet sink)
    OUT/_work/checkpoint/ Ray Data checkpoint keyed on ``id`` (kept after success)
    OUT/rejects/          rejects.parquet (full rows) + rejects.jsonl (id, stage, reason)
    OUT/errors/           errors.parquet + errors.jsonl (id, stage, error record)
    OUT/manifest.json     recipe, models, versions, funnel, stage wall times
    OUT/...               the pipeline's own outputs (``pipeline.export``)

Resume: rerunning the same command continues where the previous run stopped. Ray Data's
checkpointing (``CheckpointConfig`` on ``id``) skips rows already committed to
``_work/rows``; when every input id is committed the Ray pipeline is not started at all (no
model is loaded) and only the export runs again.
"""
from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pds
import pyarrow.parquet as pq

from actors.models import ModelResolutionError, ResolvedModel, resolve
from jobs.recipe import Recipe, RecipeError
from jobs.runtime import Stage, add_stage, forwarded_env
from udfs import io
from udfs import rows as R

PACKAGES = ("ray", "torch", "transformers", "diffusers", "open_clip_torch", "sentence-transformers",
            "xgrammar", "openai", "pyarrow", "pydantic", "numpy", "vllm")


IO_NUM_CPUS = 0.1  # CPU share of the Ray Data read and write tasks


class PlanError(ValueError):
    """The recipe cannot run: bad stage params, unknown model, or a missing input column."""


@dataclass
class StagePlan:
    stage: Stage
    cfg: Any
    resolved: ResolvedModel | None
    inputs: list[str]
    outputs: list[str]
    audit: bool = False


@dataclass
class Plan:
    stages: list[StagePlan] = field(default_factory=list)

    def placeholder_stages(self) -> list[str]:
        return [p.stage.name for p in self.stages if p.resolved is not None and p.resolved.placeholder]

    def audit_stages(self) -> list[str]:
        return [p.stage.name for p in self.stages if p.audit]


def plan(pipeline, recipe: Recipe) -> Plan:
    """Validate every stage's params, resolve its model and check its input columns.

    Nothing is loaded. Raises ``PlanError`` naming the stage and the problem.
    """
    available = set(pipeline.INPUT_COLUMNS) | {R.ID, *R.CONTROL_COLUMNS}
    result = Plan()
    placeholders: set[str] = set()
    for stage in pipeline.stages(recipe):
        cfg = recipe.stages.get(stage.name)
        if cfg is None:
            raise PlanError(f"stage {stage.name!r}: missing from the recipe's stages")
        if not cfg.enabled:
            continue
        try:
            stage.validated_params(cfg.params)
        except ValueError as e:
            first = str(e).splitlines()
            raise PlanError(f"stage {stage.name!r}: invalid params: {' '.join(first[:3])}") from None
        resolved = None
        if stage.is_actor:
            if cfg.model is None:
                raise PlanError(f"stage {stage.name!r}: needs a model spec")
            try:
                resolved = resolve(cfg.model)
            except ModelResolutionError as e:
                raise PlanError(f"stage {stage.name!r}: {e}") from None
            if resolved.placeholder:
                placeholders.add(stage.name)
        ins, outs = stage.columns(cfg.params)
        missing = [c for c in ins if c not in available]
        if missing:
            raise PlanError(f"stage {stage.name!r}: input columns {missing} are not produced upstream")
        audit = bool(stage.filter and (cfg.audit if cfg.audit is not None else
                                       any(e in placeholders for e in stage.evidence)))
        result.stages.append(StagePlan(stage, cfg, resolved, ins, outs, audit))
        available |= set(outs)
    extra = set(recipe.stages) - {s.name for s in pipeline.stages(recipe)}
    if extra:
        raise PlanError(f"recipe names unknown stages {sorted(extra)}")
    return result


def describe_plan(p: Plan) -> str:
    """Human-readable dry-run report: one line per stage with model, placeholder and audit flags."""
    lines = []
    for sp in p.stages:
        kind = "actor" if sp.stage.is_actor else "task"
        model = ""
        if sp.resolved is not None:
            model = f" model={sp.resolved.spec.backend}:{sp.resolved.spec.model}"
            if sp.resolved.placeholder:
                model += " [PLACEHOLDER: tiny random-init weights]"
        flags = " [audit mode: verdicts recorded, not applied]" if sp.audit else ""
        lines.append(f"  {sp.stage.name:<22} {kind:<5} in={','.join(sp.inputs) or '-'} "
                     f"out={','.join(sp.outputs)}{model}{flags}")
    return "\n".join(lines)


# ---------------------------------------------------------------- storage of rows

def work(out: str, *parts: str) -> str:
    return io.join(out, "_work", *parts)


def read_table(uri: str, columns: list[str] | None = None) -> pa.Table | None:
    """All parquet files under ``uri`` as one table, schemas unified (null → typed); None if absent."""
    files = io.list_files(uri, ".parquet")
    if not files:
        return None
    fs, _ = io.filesystem(uri)
    paths = [io.filesystem(f)[1] for f in files]
    schemas = [pq.read_schema(p, filesystem=fs) for p in paths]
    schema = pa.unify_schemas(schemas, promote_options="permissive")
    if columns is not None:
        schema = pa.schema([schema.field(c) for c in columns if c in schema.names])
    return pds.dataset(paths, schema=schema, filesystem=fs, format="parquet").to_table()


def write_table(table: pa.Table, uri: str) -> None:
    fs, path = io.filesystem(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    pq.write_table(table, path, filesystem=fs)


def write_jsonl(records: list[dict], uri: str) -> None:
    io.write_text(uri, "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in records))


# ---------------------------------------------------------------- run

def _ray_init(address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    env = forwarded_env()
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=False)
    else:  # a private local cluster, never someone else's
        ray.init(address="local", include_dashboard=False, runtime_env={"env_vars": env},
                 log_to_driver=False)


def _ingest(pipeline, recipe: Recipe, out: str) -> pa.Table:
    """Normalized input rows; written once to ``_work/input`` so a rerun sees the same rows."""
    existing = read_table(work(out, "input"))
    if existing is not None:
        return existing
    table, rejects = pipeline.ingest(recipe)
    n = table.num_rows
    for name in R.CONTROL_COLUMNS:
        table = table.append_column(name, pa.array([R.OK if name == R.STATUS else ""] * n, pa.string()))
    if rejects:
        write_table(pa.Table.from_pylist(rejects), work(out, "ingest_rejects", "rejects.parquet"))
    block = max(1, recipe.block_rows)
    for k in range(max(1, math.ceil(n / block))):
        write_table(table.slice(k * block, block), work(out, "input", f"part-{k:05d}.parquet"))
    return table


def _stage_wall_times(ds, names: list[str]) -> dict[str, dict]:
    """Per-stage wall seconds and rows/s from Ray Data's own statistics (fused operators share)."""
    try:
        summary = ds.get_stats_summary()
    except Exception:  # noqa: BLE001 - stats are best effort; the funnel does not depend on them
        return {}
    out: dict[str, dict] = {}
    stack = [summary]
    while stack:
        s = stack.pop()
        stack.extend(getattr(s, "parents", []) or [])
        for op in s.operators_stats:
            for name in names:
                if name in op.operator_name.split("->")[0] or f"({name})" in op.operator_name:
                    wall = op.time_total_s or 0.0
                    out[name] = {"operator": op.operator_name, "wall_s": round(wall, 3),
                                 "rows_out": op.output_num_rows.get("sum") if isinstance(op.output_num_rows, dict) else None}
    return out


def _ray_path(uri: str) -> str:
    """Path form Ray Data's readers/writers expect with an explicit filesystem."""
    return uri if io.is_remote(uri) else io.filesystem(uri)[1]


def execute(pipeline, recipe: Recipe, p: Plan, out: str, input_table: pa.Table) -> dict[str, dict]:
    """Run the Ray Data pipeline over the rows not yet committed; returns per-stage stats."""
    import ray.data
    from ray.data import DataContext
    from ray.data.checkpoint import CheckpointConfig

    fs, _ = io.filesystem(out)
    ctx = DataContext.get_current()
    ctx.checkpoint_config = CheckpointConfig(
        id_column=R.ID, checkpoint_path=_ray_path(work(out, "checkpoint")),
        delete_checkpoint_on_success=False, override_filesystem=fs if io.is_remote(out) else None)
    n_blocks = max(1, math.ceil(input_table.num_rows / max(1, recipe.block_rows)))
    in_uri = work(out, "input")
    # Split into blocks of block_rows rows: a block is the unit of progress a resumed run keeps
    # (the parquet reader would otherwise coalesce small files into one block).
    # Read/write tasks take a small CPU share: model actors hold most CPUs of a small box, and
    # a 1-CPU read task would then wait forever behind them.
    ds = ray.data.read_parquet(_ray_path(in_uri), filesystem=fs, num_cpus=IO_NUM_CPUS).repartition(n_blocks)
    if hasattr(pipeline, "before_run"):
        pipeline.before_run(recipe, out)
    for sp in p.stages:
        ds = add_stage(ds, sp.stage, sp.cfg, sp.resolved, audit=sp.audit)
    rows_uri = work(out, "rows")
    # min_bytes_per_file=1: every block is committed as soon as it is done (the resume unit),
    # instead of Ray combining small blocks into one file written at the end.
    ds.write_parquet(_ray_path(rows_uri), filesystem=fs, min_bytes_per_file=1,
                     ray_remote_args={"num_cpus": IO_NUM_CPUS})
    return _stage_wall_times(ds, [sp.stage.name for sp in p.stages])


def funnel(p: Plan, rows: pa.Table, ingest_rejects: int, n_input: int) -> list[dict]:
    """Per-stage counts: rows in = out + rejected + errored (computed from the committed rows)."""
    status = rows.column(R.STATUS).to_pylist()
    stage = rows.column(R.STAGE).to_pylist()
    order = {sp.stage.name: k for k, sp in enumerate(p.stages)}
    result = [{"stage": "ingest", "in": n_input + ingest_rejects, "out": n_input,
               "rejected": ingest_rejects, "errored": 0}]
    for k, sp in enumerate(p.stages):
        reached = rej = err = 0
        for s, st in zip(status, stage):
            pos = order.get(st, len(order)) if s != R.OK else len(order)
            if pos >= k:
                reached += 1
                if pos == k:
                    rej += s == R.REJECTED
                    err += s == R.ERROR
        row = {"stage": sp.stage.name, "in": reached, "out": reached - rej - err,
               "rejected": rej, "errored": err}
        for c in ("llm_attempts", "llm_repaired"):
            col = f"{sp.stage.name}_{c}"
            if col in rows.column_names:
                vals = [v for v in rows.column(col).to_pylist() if v is not None]
                row[f"{c}_total"] = int(sum(int(v) for v in vals))
        if sp.audit:
            row["audit_would_reject"] = sum(1 for a in rows.column(R.AUDIT).to_pylist()
                                            if a and f"{sp.stage.name}:" in a)
        result.append(row)
    return result


def print_funnel(rows: list[dict], file=sys.stdout) -> None:
    """Print the funnel as an aligned table."""
    print(f"{'stage':<24}{'in':>8}{'out':>8}{'rejected':>10}{'errored':>9}{'wall_s':>9}", file=file)
    for r in rows:
        wall = r.get("wall_s")
        print(f"{r['stage']:<24}{r['in']:>8}{r['out']:>8}{r['rejected']:>10}{r['errored']:>9}"
              f"{'' if wall is None else f'{wall:.2f}':>9}", file=file)


def _versions() -> dict[str, str]:
    v = {}
    for pkg in PACKAGES:
        try:
            v[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    return v


def _split_outputs(rows: pa.Table, out: str) -> None:
    """Write rejects/ and errors/ (full rows as parquet, id/stage/reason as JSONL)."""
    status = rows.column(R.STATUS)
    for st, folder in ((R.REJECTED, "rejects"), (R.ERROR, "errors")):
        mask = pa.compute.equal(status, st)
        sel = rows.filter(mask)
        ingest = read_table(work(out, "ingest_rejects")) if st == R.REJECTED else None
        recs = [{"id": i, "stage": s, "reason": (json.loads(r) if st == R.ERROR else r)}
                for i, s, r in zip(sel.column(R.ID).to_pylist(), sel.column(R.STAGE).to_pylist(),
                                   sel.column(R.REASON).to_pylist())]
        if ingest is not None:
            recs = ingest.select(["id", "stage", "reason"]).to_pylist() + recs
        write_table(sel, io.join(out, folder, f"{folder}.parquet"))
        write_jsonl(recs, io.join(out, folder, f"{folder}.jsonl"))


def run(pipeline, recipe: Recipe, argv: list[str], address: str | None = None) -> dict:
    """Run (or resume) a pipeline end to end and return the manifest.

    ``address``: a Ray cluster to connect to; default ``$RAY_ADDRESS`` (set inside a Ray
    job), else a private local cluster.
    """
    import pyarrow.compute  # noqa: F401  (used through pa.compute)

    if not recipe.output:
        raise RecipeError("--output is required")
    out = recipe.output.rstrip("/")
    p = plan(pipeline, recipe)
    started = datetime.now(timezone.utc)
    t0 = time.time()
    _ray_init(address)
    import ray

    input_table = _ingest(pipeline, recipe, out)
    done = read_table(work(out, "rows"), columns=[R.ID])
    done_ids = set(done.column(R.ID).to_pylist()) if done is not None else set()
    todo = [i for i in input_table.column(R.ID).to_pylist() if i not in done_ids]
    stage_stats: dict[str, dict] = {}
    if todo:
        stage_stats = execute(pipeline, recipe, p, out, input_table)
    rows = read_table(work(out, "rows"))
    ingest_rej = read_table(work(out, "ingest_rejects"))
    n_ingest_rej = ingest_rej.num_rows if ingest_rej is not None else 0
    fun = funnel(p, rows, n_ingest_rej, input_table.num_rows)
    for r in fun:
        if r["stage"] in stage_stats:
            r.update(wall_s=stage_stats[r["stage"]]["wall_s"], operator=stage_stats[r["stage"]]["operator"])
    _split_outputs(rows, out)
    exported = pipeline.export(rows, recipe, out)
    manifest = {
        "pipeline": recipe.pipeline,
        "command": argv,
        "recipe": recipe.model_dump(mode="json"),
        "models": {sp.stage.name: sp.resolved.describe() for sp in p.stages if sp.resolved is not None},
        "placeholder_stages": p.placeholder_stages(),
        "audit_stages": p.audit_stages(),
        "versions": {"python": platform.python_version(), **_versions()},
        "ray_version": ray.__version__,
        "seed": recipe.seed,
        "started": started.isoformat(),
        "finished": datetime.now(timezone.utc).isoformat(),
        "wall_s": round(time.time() - t0, 2),
        "resumed": bool(done_ids),
        "rows_processed_this_run": len(todo),
        "funnel": fun,
        "outputs": exported,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
    }
    io.write_text(io.join(out, "manifest.json"), json.dumps(manifest, indent=2, default=str))
    return manifest


def load_manifest(out: str) -> dict:
    """Read ``OUT/manifest.json``; raises ``FileNotFoundError`` naming the folder."""
    uri = io.join(out, "manifest.json")
    if not io.exists(uri):
        raise FileNotFoundError(f"no manifest.json in {out} (has the run finished?)")
    return json.loads(io.read_text(uri))
