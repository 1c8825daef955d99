"""The shared LLM engines of a run: planning, runtime environments, start, statistics, stop.

Planning (``plan_engines``, called by ``jobs.core.driver.plan``): every LLM stage whose model
runs locally (``actors.llm_engine.ENGINE_BACKENDS``) is given an engine: the recipe's
``engines.<name>`` it names with ``engine:``, or the implicit engine of its model spec, shared
by every stage naming the same spec (backend, model, revision, dtype, device, options), whose
replicas and resources are the stage's own ``num_cpus``/``num_gpus``/pool/``runtime_env`` (two
stages of one implicit engine must agree, or the plan says to declare it under ``engines:``).
Runtime environments are checked here too (``check_runtime_env``): Ray's own validation, and a
``py_executable`` is run once to see that it exists, has this Python minor version, this Ray
version, vLLM when the engine needs it, and this project importable.

Running (``EngineSet``): each engine is a Ray Serve application of one ``LLMEngine``
deployment (no HTTP proxy), started when the first phase that needs it runs and deleted when
the run ends; the stages reach it by deployment handle. ``EngineSet.stats`` gives the
manifest's ``engines`` section: per engine its spec, resources, replicas (pid, interpreter,
load time, resident memory), the stages it served, and requests and tokens per stage.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from actors.models import ModelResolutionError, ResolvedModel, resolve
from jobs.core.recipe import EngineConfig, Recipe, RuntimeEnvConfig, StageConfig

LLM_STAGE = "actors.llm:LLMStage"
REPO_ROOT = Path(__file__).resolve().parents[2]
SETUP_HINT = "build it with `bash scripts/setup.sh` (it creates .venv-vllm with the CPU build of vLLM)"
PROBE_TIMEOUT_S = 120
SUBMIT_ROOT_ENV = "MMSYNTH_SUBMIT_ROOT"  # set by `python -m jobs submit` to the submitting checkout


class EngineConfigError(ValueError):
    """An engine or a runtime environment of the recipe cannot run (one line, names the stage or
    engine and, for a missing vLLM environment, the setup command)."""


@dataclass
class EnginePlan:
    """One engine of a run: its ``name``, config, resolved model, the stages that use it and
    whether it was declared under ``engines:`` (else implicit, from a stage's model spec)."""

    name: str
    config: EngineConfig
    resolved: ResolvedModel
    stages: list[str] = field(default_factory=list)
    declared: bool = True

    def describe(self) -> dict[str, Any]:
        """Manifest/dry-run entry: spec, resources, replicas bounds, runtime env, stages."""
        c = self.config
        return {"name": self.name, "model": self.resolved.describe(), "declared": self.declared,
                "num_cpus": c.num_cpus, "num_gpus": c.num_gpus, "min_replicas": c.min_replicas,
                "max_replicas": c.max_replicas, "max_ongoing_requests": c.max_ongoing_requests,
                "runtime_env": c.runtime_env.ray_dict() if c.runtime_env else None, "stages": list(self.stages)}


def is_llm_stage(stage) -> bool:
    """True for stages of the shared LLM stage class (``jobs.core.runtime.llm_stage``)."""
    return stage.target == LLM_STAGE


def _slug(model: str) -> str:
    base = model.rstrip("/").rsplit("/", 1)[-1].split(":")[-1]
    base = re.sub(r"\.(gguf|safetensors)$", "", base, flags=re.I)
    return re.sub(r"[^a-z0-9]+", "-", base.lower()).strip("-")[:40] or "model"


def _implicit_config(cfg: StageConfig) -> EngineConfig:
    lo, hi = cfg.pool_bounds()
    return EngineConfig(model=cfg.model, num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, min_replicas=lo,
                        max_replicas=hi, runtime_env=cfg.runtime_env)


def engine_for_stage(name: str, cfg: StageConfig, recipe: Recipe) -> tuple[str, EngineConfig, bool] | None:
    """``(engine name, config, declared)`` of an LLM stage, or None when its model is an API
    backend (it keeps its own client). Raises ``EngineConfigError`` for an unknown engine name
    or a stage that gives both ``engine`` and ``model``."""
    from actors.llm_engine import ENGINE_BACKENDS

    if cfg.engine:
        if cfg.model is not None:
            raise EngineConfigError(f"stage {name!r}: give either engine ({cfg.engine!r}) or model, not both")
        if cfg.engine not in recipe.engines:
            raise EngineConfigError(f"stage {name!r}: no engine named {cfg.engine!r} under engines "
                                    f"(have: {', '.join(recipe.engines) or 'none'})")
        return cfg.engine, recipe.engines[cfg.engine], True
    if cfg.model is None or cfg.model.backend not in ENGINE_BACKENDS:
        return None
    spec = json.dumps(cfg.model.model_dump(mode="json"), sort_keys=True)
    return f"{_slug(cfg.model.model)}-{hashlib.sha1(spec.encode()).hexdigest()[:6]}", _implicit_config(cfg), False


def plan_engines(stages: list[tuple[str, StageConfig]], recipe: Recipe) -> dict[str, EnginePlan]:
    """Engines of the LLM stages ``[(stage name, config)]`` (enabled stages only), each with the
    stages it serves. Resolves every engine's model and checks its runtime environment. Raises
    ``EngineConfigError`` naming the stage or engine."""
    from actors.llm_engine import ENGINE_BACKENDS

    engines: dict[str, EnginePlan] = {}
    for name, cfg in stages:
        found = engine_for_stage(name, cfg, recipe)
        if found is None:
            continue
        ename, ecfg, declared = found
        plan = engines.get(ename)
        if plan is None:
            if ecfg.model.backend not in ENGINE_BACKENDS:
                raise EngineConfigError(f"engine {ename!r}: backend {ecfg.model.backend!r} does not run in a "
                                        f"shared engine (choose {', '.join(ENGINE_BACKENDS)})")
            try:
                resolved = resolve(ecfg.model)
            except ModelResolutionError as e:
                raise EngineConfigError(f"engine {ename!r}: {e}") from None
            check_runtime_env(ecfg.runtime_env, f"engine {ename!r}", needs_vllm=ecfg.model.backend == "vllm")
            plan = engines[ename] = EnginePlan(ename, ecfg, resolved, declared=declared)
        elif not declared and plan.config != ecfg:
            first = plan.stages[0]
            raise EngineConfigError(f"stages {first!r} and {name!r} name the same model but ask for different "
                                    "engine resources (num_cpus, num_gpus, pool, runtime_env); declare the engine "
                                    "once under engines: and give both stages engine: NAME")
        plan.stages.append(name)
    return engines


# ---------------------------------------------------------------- runtime environments

def resolve_py_executable(path: str) -> str:
    """A relative ``py_executable`` is taken from the repository root when it exists there
    (the usual ``.venv-vllm/bin/python``), else from the checkout a ``python -m jobs submit``
    came from (``SUBMIT_ROOT_ENV``: the job runs in an uploaded copy without the venv, which is
    right on a cluster that shares the submitter's filesystem, as a local head does); anything
    else is passed to Ray as given (a remote cluster needs an absolute path on its nodes)."""
    p = Path(path).expanduser()
    if p.is_absolute():
        return str(p)
    for root in (str(REPO_ROOT), os.environ.get(SUBMIT_ROOT_ENV)):
        if root and (Path(root) / p).exists():
            return str(Path(root) / p)
    return str(p)


_PROBE = ("import importlib.util as u, json, sys\nimport ray\n"
          "print(json.dumps({'python': '%d.%d' % sys.version_info[:2], 'ray': ray.__version__,"
          " 'vllm': u.find_spec('vllm') is not None, 'project': u.find_spec('actors.llm_engine') is not None}))")


@functools.lru_cache(maxsize=16)
def probe_interpreter(exe: str) -> dict[str, Any]:
    """Run ``exe`` once: its Python minor version, Ray version, and whether vLLM and this project
    import there (with the repository on ``PYTHONPATH``, as the engine's workers get it).
    Raises ``EngineConfigError`` when it cannot run."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    try:
        out = subprocess.run([exe, "-c", _PROBE], capture_output=True, text=True, timeout=PROBE_TIMEOUT_S, env=env)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise EngineConfigError(f"py_executable {exe} cannot run ({type(e).__name__}: {e}); {SETUP_HINT}") from None
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise EngineConfigError(f"py_executable {exe} is broken ({last}); {SETUP_HINT}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def check_runtime_env(env: RuntimeEnvConfig | None, who: str, needs_vllm: bool = False) -> None:
    """Check a runtime environment before anything starts: Ray's own validation of the fields
    (e.g. ``image_uri`` combined with ``pip``), and for ``py_executable`` that the interpreter
    exists and runs with this Python minor version and Ray version, imports this project and,
    for vLLM engines, vLLM. Raises ``EngineConfigError`` naming ``who`` and the fix."""
    if env is None:
        return
    from ray.runtime_env import RuntimeEnv

    d = env.ray_dict()
    try:
        RuntimeEnv(**d)
    except Exception as e:  # noqa: BLE001 - Ray's validation message is the answer
        raise EngineConfigError(f"{who}: runtime_env {d}: {e}") from None
    if not env.py_executable:
        return
    exe = resolve_py_executable(env.py_executable)
    if not os.path.exists(exe):
        raise EngineConfigError(f"{who}: runtime_env.py_executable {env.py_executable} does not exist; {SETUP_HINT}")
    if not os.access(exe, os.X_OK):
        raise EngineConfigError(f"{who}: runtime_env.py_executable {exe} is not executable; {SETUP_HINT}")
    info = probe_interpreter(exe)
    import ray

    here = "%d.%d" % sys.version_info[:2]
    problems = []
    if info["python"] != here:
        problems.append(f"Python {info['python']} (the driver runs {here})")
    if info["ray"] != ray.__version__:
        problems.append(f"Ray {info['ray']} (the driver runs {ray.__version__})")
    if needs_vllm and not info["vllm"]:
        problems.append("no vllm")
    if not info["project"]:
        problems.append("this project does not import there")
    if problems:
        raise EngineConfigError(f"{who}: runtime_env.py_executable {exe} has {', '.join(problems)}; {SETUP_HINT}")


def ray_runtime_env(env: RuntimeEnvConfig | None, forwarded: dict[str, str]) -> dict[str, Any]:
    """The ``runtime_env`` Ray gets: ``forwarded`` variables (``jobs.core.runtime.forwarded_env``)
    under the config's own ``env_vars``, ``py_executable`` resolved, and for another interpreter
    the repository on ``PYTHONPATH`` so its workers import the same code as the driver."""
    out: dict[str, Any] = env.ray_dict() if env else {}
    env_vars = {**forwarded, **(env.env_vars if env else {})}
    if env and env.py_executable:
        out["py_executable"] = resolve_py_executable(env.py_executable)
        env_vars.setdefault("PYTHONPATH", str(REPO_ROOT))
    if env_vars:
        out["env_vars"] = env_vars
    return out


# ---------------------------------------------------------------- running

def engine_deployment(plan: EnginePlan, forwarded: dict[str, str]):
    """The bound Serve deployment of one engine (``actors.llm_engine.LLMEngine``, named after
    the engine): replicas fixed or autoscaling on ongoing requests, each with the engine's
    ``num_cpus``/``num_gpus`` and runtime environment (``ray_runtime_env``). Used by pipeline
    runs (``EngineSet``) and by Serve apps that hold engines of their own (MIRROR-LLaVA)."""
    from ray import serve

    from actors.llm_engine import LLMEngine

    c = plan.config
    opts: dict[str, Any] = {
        "name": plan.name, "max_ongoing_requests": c.max_ongoing_requests,
        "ray_actor_options": {"num_cpus": c.num_cpus, "num_gpus": c.num_gpus,
                              "runtime_env": ray_runtime_env(c.runtime_env, forwarded)},
        "health_check_period_s": 10, "health_check_timeout_s": 120, "graceful_shutdown_timeout_s": 10}
    if c.max_replicas > c.min_replicas:
        opts["autoscaling_config"] = {"min_replicas": c.min_replicas, "max_replicas": c.max_replicas,
                                      "initial_replicas": c.min_replicas,
                                      "target_ongoing_requests": max(1, c.max_ongoing_requests // 2)}
    else:
        opts["num_replicas"] = c.min_replicas
    return serve.deployment(LLMEngine).options(**opts).bind(plan.resolved.model_dump(mode="json"), plan.name)


class EngineSet:
    """The engines of one run as Serve applications ``mmsynth-<run>-<engine>`` (see the
    module docstring). ``start(names)`` starts those not yet running (waits until their
    replicas have loaded the model; raises ``RuntimeError`` with Serve's message when an
    engine fails to start), ``ref(name, stage)`` is what ``actors.llm.LLMStage`` needs to
    reach one, ``stats()`` the manifest section, ``stop()`` deletes them."""

    def __init__(self, engines: dict[str, EnginePlan], run_key: str, forwarded: dict[str, str]):
        self.engines, self.run_key, self.forwarded = engines, run_key, forwarded
        self.session = uuid.uuid4().hex[:12]  # fresh stage clients in reused worker processes
        self.started: dict[str, float] = {}  # engine -> seconds its start took
        self._stats: dict[str, dict] = {}
        self._own_serve = False  # this run started Serve (no proxy): it shuts it down at the end

    def app(self, name: str) -> str:
        """Serve application name of engine ``name``."""
        return f"mmsynth-{self.run_key}-{name}"

    def ref(self, name: str, stage: str) -> dict[str, Any]:
        """``LLMStage(engine=...)`` argument for ``stage`` on engine ``name``."""
        return {"app": self.app(name), "deployment": name, "stage": stage,
                "timeout_s": self.engines[name].config.request_timeout_s, "session": self.session}

    def start(self, names: list[str]) -> None:
        """Start the engines ``names`` that are not running yet, all at once."""
        todo = [n for n in dict.fromkeys(names) if n not in self.started]
        if not todo:
            return
        from ray import serve

        t0 = time.time()
        if not self._own_serve:  # no Serve here yet, or one with nothing in it: this run owns it
            status = serve.status()
            self._own_serve = not (status.applications or status.proxies)
        serve.start(proxy_location="Disabled")
        targets = [serve.RunTarget(target=engine_deployment(self.engines[n], self.forwarded), name=self.app(n),
                                   route_prefix=None)
                   for n in todo]
        try:
            serve.run_many(targets, wait_for_applications_running=True)
        except Exception as e:  # noqa: BLE001 - the run cannot go on without its engines
            self.stop()
            raise RuntimeError(f"engine(s) {', '.join(todo)} failed to start: {type(e).__name__}: {e}") from None
        for n in todo:
            self.started[n] = round(time.time() - t0, 2)

    def collect(self) -> None:
        """Read every running replica's ``info()`` (kept for ``stats``; call before ``stop``)."""
        from ray import serve

        for n in self.started:
            try:
                handle = serve.get_deployment_handle(n, app_name=self.app(n))
                self._stats[n] = {"replicas": handle.broadcast("info").results(timeout_s=60)}
            except Exception as e:  # noqa: BLE001 - statistics never fail a finished run
                self._stats[n] = {"replicas": [], "stats_error": f"{type(e).__name__}: {e}"}

    def stats(self) -> list[dict[str, Any]]:
        """The manifest's ``engines`` section: per engine ``describe()`` plus ``start_s``,
        ``replicas`` (pid, python, load_s, rss_bytes per replica), and summed per-stage
        ``requests``, ``prompt_tokens``, ``completion_tokens``, ``too_long``, ``errors`` of the
        replicas running at the end of the run (a replica that autoscaling removed earlier took
        its counts with it; the rows' own attempts and tokens are in the funnel)."""
        out = []
        for n, plan in self.engines.items():
            entry = plan.describe()
            st = self._stats.get(n)
            entry["started_this_run"] = n in self.started
            if st is not None:
                entry["start_s"] = self.started.get(n)
                reps = st["replicas"]
                entry["replicas"] = [{k: r.get(k) for k in ("pid", "python", "load_s", "uptime_s", "rss_bytes")}
                                     for r in reps]
                per_stage: dict[str, dict[str, int]] = {}
                for r in reps:
                    for stage, c in (r.get("counters") or {}).items():
                        acc = per_stage.setdefault(stage, {})
                        for k, v in c.items():
                            acc[k] = acc.get(k, 0) + int(v)
                entry["served"] = per_stage
                entry["requests"] = sum(c.get("requests", 0) for c in per_stage.values())
                entry["prompt_tokens"] = sum(c.get("prompt_tokens", 0) for c in per_stage.values())
                entry["completion_tokens"] = sum(c.get("completion_tokens", 0) for c in per_stage.values())
                if "stats_error" in st:
                    entry["stats_error"] = st["stats_error"]
            out.append(entry)
        return out

    def stop(self) -> None:
        """Delete the engines' applications (waits for their replicas to stop), and Serve
        itself when this run found none with anything in it and nothing else was deployed
        meanwhile (a later ``serve.start`` with HTTP options then gets its proxy; a Serve
        instance with applications or proxies of its own is left as it was)."""
        if not self.started and not self._own_serve:
            return
        from ray import serve

        for n in list(self.started):
            try:
                serve.delete(self.app(n))
            except Exception as e:  # noqa: BLE001 - best effort at the end of a run
                print(f"warning: engine {n} not stopped: {type(e).__name__}: {e}", file=sys.stderr)
        if self._own_serve:
            status = serve.status()
            if not (status.applications or status.proxies):  # nobody else deployed meanwhile
                serve.shutdown()
            self._own_serve = False
