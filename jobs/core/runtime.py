"""Stages on Ray Data: one helper turns a stage spec into ``map_batches``, isolating row failures.

Every stage sees Arrow blocks (``batch_format="pyarrow"``): pass-through columns are never
converted, so nested values survive any number of stages unchanged. The stage function itself
gets a dict of numpy arrays holding only the rows that are still ``ok`` (list cells are
Python lists) and returns the columns it declared as outputs; the helper writes them back
(``None`` for rows that did not reach the stage) and turns the optional ``ROW_ERROR`` /
``ROW_REJECT`` / ``ROW_WAITING`` columns into row statuses (``waiting`` rows, whose call is in a
Batch API batch, pass later stages untouched like errors and are never committed). A batch that raises is split in halves until the
failing rows are isolated (this also halves the batch after an out-of-memory error);
transient errors are retried ``max_retries`` times per row. Nothing is ever dropped: a
failed row becomes an error record, a rejected row keeps its scores and reason.
"""
from __future__ import annotations

import functools
import importlib
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from udfs import rows as R
from udfs.llm_output import to_python

TRANSIENT_ERRORS = {"TimeoutError", "ConnectionError", "OutOfMemoryError", "APITimeoutError",
                    "APIConnectionError", "RateLimitError", "InternalServerError"}


@dataclass(frozen=True)
class Stage:
    """A pipeline stage.

    ``target`` is a function ``fn(batch, params) -> dict`` (a task stage; a filter's function
    is called as ``fn(batch, params, audit=...)``) or the import path
    ``"module:Class"`` of a model actor class (``Class(model=..., params=...)`` callable on a
    batch, with ``Params`` and ``columns(params)``). ``inputs``/``outputs`` are the columns a
    task stage reads and writes (actor stages declare theirs through ``columns``).
    ``filter``: the stage may reject rows (``ROW_REJECT`` of other stages is only recorded in
    ``_audit``). ``evidence``: stages whose placeholder models make
    this filter's verdicts meaningless, so it runs in audit mode. ``rename`` maps an actor's
    generic output names to stage-specific ones (e.g. ``generated_text`` →
    ``caption_parse_text``).
    """

    name: str
    target: Callable | str
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    filter: bool = False
    evidence: tuple[str, ...] = ()
    rename: dict[str, str] = field(default_factory=dict)
    params_model: type | None = None
    defaults: dict[str, Any] = field(default_factory=dict)

    def merged(self, params: dict) -> dict:
        """The stage's fixed defaults (e.g. a response schema) overlaid by the recipe's params."""
        return {**self.defaults, **params}

    @property
    def is_actor(self) -> bool:
        """True for model stages (an actor class named by import path)."""
        return isinstance(self.target, str)

    def actor_class(self):
        """The model actor class named by ``target`` (imported)."""
        module, _, cls = self.target.partition(":")
        return getattr(importlib.import_module(module), cls)

    def validated_params(self, params: dict) -> Any:
        """Stage params validated by the stage's ``Params`` model (``ValueError`` if invalid)."""
        model = self.actor_class().Params if self.is_actor else self.params_model
        params = self.merged(params)
        return model.model_validate(params) if model is not None else params

    def columns(self, params: dict) -> tuple[list[str], list[str]]:
        """(required input columns, output columns) after renaming."""
        if self.is_actor:
            ins, outs = self.actor_class().columns(self.merged(params))
        else:
            ins, outs = list(self.inputs), list(self.outputs)
        return list(ins), [self.rename.get(c, c) for c in outs]


@dataclass(frozen=True)
class StageRun:
    """What the batch helper needs to know about a stage at run time (picklable)."""

    name: str
    outputs: tuple[str, ...]
    filter: bool = False
    audit: bool = False
    placeholder: bool = False
    max_retries: int = 2
    rename: tuple[tuple[str, str], ...] = ()


def _to_numpy(col: pa.ChunkedArray) -> np.ndarray:
    t = col.type
    if col.null_count == 0 and (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)):
        return col.to_numpy()
    out = np.empty(len(col), dtype=object)
    out[:] = col.to_pylist() if len(col) else []
    return out


def _numpy_batch(table: pa.Table) -> dict[str, np.ndarray]:
    batch = {}
    for name in table.column_names:
        col = table.column(name)
        if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
            arr = np.empty(len(col), dtype=object)
            for i, v in enumerate(col.to_pylist()):
                arr[i] = v
            batch[name] = arr
        else:
            batch[name] = _to_numpy(col)
    return batch


def _call_isolated(call: Callable, table: pa.Table, run: StageRun) -> tuple[dict[int, dict], dict[int, str]]:
    """Run ``call`` on ``table``; returns (row index → output dict, row index → error record).

    On an exception the batch is split in halves until single rows fail; a single row with a
    transient error is retried up to ``run.max_retries`` times.
    """
    results: dict[int, dict] = {}
    errors: dict[int, str] = {}

    def go(lo: int, hi: int, attempt: int = 1) -> None:
        part = table.slice(lo, hi - lo)
        try:
            out = call(_numpy_batch(part))
        except R.StopRun:  # the run stops (budget): not a row failure
            raise
        except Exception as exc:  # noqa: BLE001 - every row failure is recorded, none kills the job
            if hi - lo > 1:
                mid = (lo + hi) // 2
                go(lo, mid)
                go(mid, hi)
            elif type(exc).__name__ in TRANSIENT_ERRORS and attempt <= run.max_retries:
                time.sleep(min(2 ** attempt * 0.1, 5.0))
                go(lo, hi, attempt + 1)
            else:
                errors[lo] = R.error_record(run.name, exc, attempt)
            return
        renames = dict(run.rename)
        out = {renames.get(k, k): v for k, v in out.items()}
        missing = [c for c in run.outputs if c not in out]
        if missing:
            msg = f"stage {run.name!r} did not return declared output columns {missing}"
            for i in range(lo, hi):
                errors[i] = R.error_record(run.name, f"StageContractError: {msg}")
            return
        for j in range(hi - lo):
            results[lo + j] = {c: to_python(out[c][j]) for c in
                               (*run.outputs, R.ROW_ERROR, R.ROW_REJECT, R.ROW_WAITING) if c in out}

    if table.num_rows:
        go(0, table.num_rows)
    return results, errors


def _message(value) -> str:
    """A row error/reject cell as text; an empty one still counts and says so."""
    text = str(value)
    return text if text.strip() else "(no message)"


def _append(existing: str, item: str) -> str:
    return f"{existing},{item}" if existing else item


def apply_stage(table: pa.Table, call: Callable, run: StageRun) -> pa.Table:
    """Apply one stage to an Arrow block; see the module docstring for the contract."""
    status = table.column(R.STATUS).to_pylist()
    ok_idx = [i for i, s in enumerate(status) if s == R.OK]
    sub = table.take(pa.array(ok_idx, type=pa.int64())) if ok_idx else table.slice(0, 0)
    results, errors = _call_isolated(call, sub, run)

    n = table.num_rows
    new_cols: dict[str, list] = {c: [None] * n for c in run.outputs}
    stage_col = table.column(R.STAGE).to_pylist()
    reason = table.column(R.REASON).to_pylist()
    placeholder = table.column(R.PLACEHOLDER).to_pylist()
    audit = table.column(R.AUDIT).to_pylist()
    for j, i in enumerate(ok_idx):
        if j in errors:
            status[i], stage_col[i], reason[i] = R.ERROR, run.name, errors[j]
            continue
        res = results[j]
        for c in run.outputs:
            new_cols[c][i] = res.get(c)
        if run.placeholder:
            placeholder[i] = _append(placeholder[i], run.name)
        if res.get(R.ROW_ERROR) is not None:  # a verdict is its presence, not its text
            status[i], stage_col[i] = R.ERROR, run.name
            reason[i] = R.error_record(run.name, _message(res[R.ROW_ERROR]))
        elif res.get(R.ROW_WAITING) is not None:  # its call waits in a Batch API batch: not final
            status[i], stage_col[i], reason[i] = R.WAITING, run.name, _message(res[R.ROW_WAITING])
        elif res.get(R.ROW_REJECT) is not None:
            if run.audit or not run.filter:  # recorded, not applied
                audit[i] = _append(audit[i], f"{run.name}: {_message(res[R.ROW_REJECT])}")
            else:
                status[i], stage_col[i], reason[i] = R.REJECTED, run.name, _message(res[R.ROW_REJECT])

    out = table
    for name, values in (*new_cols.items(), (R.STATUS, status), (R.STAGE, stage_col),
                         (R.REASON, reason), (R.PLACEHOLDER, placeholder), (R.AUDIT, audit)):
        arr = pa.array(values)
        if name in out.column_names:
            out = out.set_column(out.column_names.index(name), name, arr)
        else:
            out = out.append_column(name, arr)
    return out


def drop_waiting(table: pa.Table) -> pa.Table:
    """The rows of an Arrow block that are not ``waiting`` (the last map of a ``--batch`` run:
    waiting rows are never written, so never committed)."""
    import pyarrow.compute as pc

    return table.filter(pc.not_equal(table.column(R.STATUS), R.WAITING))


class StageActor:
    """Actor wrapper: loads the stage's model actor once, applies it per block with isolation."""

    def __init__(self, target: str, model: dict | None, params: dict, run: StageRun, cache: dict | None = None,
                 budget: dict | None = None):
        module, _, cls = target.partition(":")
        extra = {k: v for k, v in (("cache", cache), ("budget", budget)) if v}
        self.inner = getattr(importlib.import_module(module), cls)(model=model, params=params, **extra)
        self.run = run

    def __call__(self, table: pa.Table) -> pa.Table:
        return apply_stage(table, self.inner, self.run)


def _task(table: pa.Table, fn: Callable, params: Any, run: StageRun) -> pa.Table:
    call = functools.partial(fn, params=params, audit=run.audit) if run.filter else \
        functools.partial(fn, params=params)
    return apply_stage(table, call, run)


FORWARDED_ENV = ("HF_HUB_OFFLINE", "MMSYNTH_CACHE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
                 "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION",
                 "AWS_DEFAULT_REGION", "KERAS_BACKEND", "TOKENIZERS_PARALLELISM", "OMP_WAIT_POLICY",
                 "DEEPFACE_HOME", "DEEPFACE_BACKEND_ENGINE", "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS",
                 "AZURE_OPENAI_ENDPOINT", "OPENAI_API_VERSION")
#: Ray Data settings a run uses unless the user sets them. Ray Data 2.60's parquet reader
#: starts 32 one-CPU footer-reader actors per ``read_parquet``; a run reads only its own few
#: state files, and on an autoscaling cluster those 32 CPUs of demand launch nodes (GPU nodes
#: once the CPU group is at its maximum: measured by tests/test_autoscaling.py).
RAY_DATA_DEFAULTS = {"RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "2"}


def forwarded_env() -> dict[str, str]:
    """Driver environment variables the stage workers need (offline flag, caches, S3 settings).
    API keys are not forwarded: a stage reads the variable its recipe names on its own node."""
    return {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}


#: CPU share of an LLM stage's tasks when a shared engine does the generation (they build
#: requests, wait for replies, validate and re-ask)
ENGINE_CLIENT_NUM_CPUS = 0.05


@functools.lru_cache(maxsize=32)
def _engine_client(target: str, model_json: str, params_json: str, engine_json: str, cache_json: str = "null",
                   budget_json: str = "null"):
    """The stage object of an engine-backed LLM stage, made once per worker process."""
    module, _, cls = target.partition(":")
    return getattr(importlib.import_module(module), cls)(model=json.loads(model_json), params=json.loads(params_json),
                                                          engine=json.loads(engine_json), cache=json.loads(cache_json),
                                                          budget=json.loads(budget_json))


def add_stage(ds, stage: Stage, cfg, resolved=None, audit: bool = False, block_rows: int | None = None,
              engine: dict | None = None, engine_tasks: int = 2, cache: dict | None = None,
              budget: dict | None = None):
    """Append ``stage`` to the Ray dataset ``ds`` with the recipe's ``cfg`` (a StageConfig).

    Task stages become a task ``map_batches``; actor stages an actor pool
    (``ActorPoolStrategy(min_size, max_size)``) with ``num_cpus``/``num_gpus`` from the
    recipe. An LLM stage with a shared ``engine`` (``jobs.core.engines.EngineSet.ref``) runs
    as at most ``engine_tasks`` concurrent tasks of ``ENGINE_CLIENT_NUM_CPUS`` that send their
    batches to the engine. ``batch_size`` is capped at ``block_rows`` (Ray Data would
    otherwise merge blocks into one batch, and a small run would stop streaming). The
    operator carries the stage's name, so Ray Data's progress and statistics show it.
    ``resolved`` is the stage's ``ResolvedModel`` (placeholder flag, load path); the stage's
    ``runtime_env`` is passed to Ray with the forwarded environment variables. ``cache``: the
    run's generation cache config (``{"uri", "cache_rejects"}``, ``actors.gen_cache``), given to
    model actor classes that declare ``supports_cache = True``; ``budget``: the stage's spend
    meter config (``jobs.core.cost.budget_configs``), given to classes that declare
    ``supports_budget = True``.
    """
    import ray.data

    from jobs.core.engines import ray_runtime_env

    _, outputs = stage.columns(cfg.params)
    run = StageRun(name=stage.name, outputs=tuple(outputs), filter=stage.filter, audit=audit,
                   placeholder=bool(resolved is not None and resolved.placeholder),
                   max_retries=cfg.max_retries, rename=tuple(stage.rename.items()))
    batch_size = min(cfg.batch_size, block_rows) if block_rows else cfg.batch_size
    common = dict(batch_size=batch_size, batch_format="pyarrow", num_cpus=cfg.num_cpus, zero_copy_batch=True)
    env = ray_runtime_env(cfg.runtime_env, forwarded_env())
    if env:
        common["runtime_env"] = env
    if not (stage.is_actor and getattr(stage.actor_class(), "supports_cache", False)):
        cache = None
    if not (stage.is_actor and getattr(stage.actor_class(), "supports_budget", False)):
        budget = None
    if engine is not None:
        client = (stage.target, json.dumps(resolved.model_dump(mode="json")),
                  json.dumps(stage.merged(cfg.params), default=str), json.dumps(engine), json.dumps(cache),
                  json.dumps(budget))

        def call(table: pa.Table) -> pa.Table:
            return apply_stage(table, _engine_client(*client), run)
        call.__name__ = call.__qualname__ = stage.name
        return ds.map_batches(call, compute=ray.data.TaskPoolStrategy(size=engine_tasks),
                              **{**common, "num_cpus": ENGINE_CLIENT_NUM_CPUS})
    if stage.is_actor:
        named = type(stage.name, (StageActor,), {"__module__": __name__})
        lo, hi = cfg.pool_bounds()
        return ds.map_batches(
            named, compute=ray.data.ActorPoolStrategy(min_size=lo, max_size=hi),
            num_gpus=cfg.num_gpus or None,
            fn_constructor_kwargs=dict(target=stage.target,
                                       model=resolved.model_dump() if resolved else None,
                                       params=stage.merged(cfg.params), run=run, cache=cache,
                                       budget=budget),
            **common)
    params = stage.validated_params(cfg.params)
    target = stage.target

    def fn(table: pa.Table) -> pa.Table:
        return _task(table, target, params, run)
    fn.__name__ = fn.__qualname__ = stage.name  # operator name in progress and statistics
    return ds.map_batches(fn, **common)


LLM_OUTPUTS = {"generated_text": "text", "parsed": "parsed", "finish_reason": "finish_reason",
               "prompt_tokens": "prompt_tokens", "completion_tokens": "completion_tokens",
               "llm_backend": "backend", "llm_model": "model", "llm_attempts": "llm_attempts",
               "llm_repaired": "llm_repaired", "llm_cache_hits": "cache_hits", "llm_cache_misses": "cache_misses",
               "llm_cached_prompt_tokens": "cached_prompt_tokens",
               "llm_cached_completion_tokens": "cached_completion_tokens"}


def llm_stage(name: str, schema: str | None = None, filter: bool = True, **defaults: Any) -> Stage:
    """A stage of the shared LLM actor (``actors.llm:LLMStage``) whose outputs are renamed
    ``<name>_text``, ``<name>_parsed``, ``<name>_llm_attempts`` … so several LLM calls can live
    in one row. ``schema``: import path of the pydantic response model. ``filter``: a reply
    that stays invalid after the repairs rejects the row; with ``filter=False`` the row goes
    on with ``<name>_parsed`` = None (the next stage falls back) and the reason in ``_audit``."""
    if schema:
        defaults["response_schema"] = schema
    return Stage(name, "actors.llm:LLMStage", filter=filter,
                 rename={k: f"{name}_{v}" for k, v in LLM_OUTPUTS.items()}, defaults=defaults)
