"""Shared LLM engines: one loaded model per model spec, serving every stage that names it.

A *stage* is a step of a paper's figure (its name, prompt, schema, sampling, funnel row); an
*engine* is a loaded model with its replicas and resources. ``LLMEngine`` is a Ray Serve
deployment class: each replica loads the model once (``vllm`` -> ``actors.llm_vllm.VLLMEngine``,
``transformers`` -> ``actors.llm_hf.TransformersEngine``) and answers ``generate(stage,
requests)`` for any number of stages at once. Serve routes the calls across replicas and
autoscales them between the recipe's ``min_replicas`` and ``max_replicas``; each replica may
run in its own runtime environment (e.g. ``.venv-vllm``'s interpreter), because requests and
replies travel as plain dicts (``actors.llm_base.request_to_wire``).

- vLLM: the calls of all stages go into one ``AsyncLLMEngine``, whose continuous batching
  schedules them together (a GPU holds one copy of the model and stays busy across stages).
- transformers: calls that arrive while a ``generate`` runs are queued and then answered
  together by one ``TransformersEngine.generate`` (grouped by sampling and format, bucketed by
  length), one at a time per replica (the model is not thread-safe).

The stage side is ``RemoteEngine``: the ``LLMEngine`` protocol of ``actors.llm.LLMStage``
over a deployment handle, every call bounded by the engine's ``request_timeout_s``. The stage
keeps everything that makes it a stage: prompts, sampling, schema validation and re-asks,
row errors and rejects, its funnel row and Ray Data statistics.

Why not ``ray.data.llm`` / ``ray.serve.llm`` (Ray 2.60): ``vLLMEngineProcessorConfig`` builds
one engine per processor, i.e. per stage (Ray issue 52277), and a processor is one pass with
no re-ask of invalid replies and no per-row error records (a failed row skips postprocess);
``ServeDeploymentProcessorConfig`` would reach a shared deployment but sends one request per
row and has the same one-pass, skip-on-error contract. ``ray.serve.llm``'s vLLM deployments
need the ``ray[llm]`` extra, which pulls the CUDA build of vLLM and its torch: it cannot sit in
the CPU vLLM environment, and its HTTP/OpenAI request shape adds a layer the stages do not need.
The deployment here is small, speaks the stage's own request type, and is the same on CPU and GPU.
"""
from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from typing import Any

from actors.llm_base import (EngineError, LLMReply, LLMRequest, PromptTooLongError, reply_from_wire, reply_to_wire,
                             request_from_wire, request_to_wire)
from actors.models import ResolvedModel

__all__ = ["LLMEngine", "RemoteEngine", "ENGINE_BACKENDS", "TRANSIENT_ENGINE_ERRORS"]

#: model backends that run in a shared engine (API backends keep their own clients per stage)
ENGINE_BACKENDS = ("vllm", "transformers")
#: exception type names of a failed engine call that may pass on a retry (the runtime retries)
TRANSIENT_ENGINE_ERRORS = {"TimeoutError", "GetTimeoutError", "RayActorError", "ActorDiedError",
                           "ActorUnavailableError", "BackPressureError", "DeploymentUnavailableError",
                           "RequestCancelledError"}


def process_rss_bytes() -> int:
    """Resident memory of this process and its children (vLLM's engine core is a child
    process), in bytes."""
    import psutil

    p = psutil.Process()
    total = p.memory_info().rss
    for c in p.children(recursive=True):
        try:
            total += c.memory_info().rss
        except psutil.Error:
            pass
    return int(total)


class LLMEngine:
    """Serve deployment of one shared engine (see the module docstring).

    ``__init__(model, name)``: ``model`` is ``ResolvedModel.model_dump()``, ``name`` the
    engine's name in the recipe. Loads the model; raises ``ValueError`` for a backend that is
    not in ``ENGINE_BACKENDS`` and the backend's load errors (Serve then reports the deployment
    as failed and the run stops with that message).
    """

    def __init__(self, model: dict, name: str):
        t0 = time.time()
        self.resolved = ResolvedModel.model_validate(model)
        self.name = name
        backend = self.resolved.spec.backend
        if backend == "vllm":
            from actors.llm_vllm import VLLMEngine

            self.engine: Any = VLLMEngine(self.resolved)
        elif backend == "transformers":
            from actors.llm_hf import TransformersEngine

            self.engine = TransformersEngine(self.resolved)
            self._queue: list[tuple[list[LLMRequest], asyncio.Future]] = []
            self._worker: asyncio.Task | None = None
        else:
            raise ValueError(f"engine {name!r}: backend {backend!r} does not run in a shared engine "
                             f"(engines run {', '.join(ENGINE_BACKENDS)})")
        self.backend = backend
        self.load_s = round(time.time() - t0, 2)
        self.started = time.time()
        self.counters: dict[str, dict[str, int]] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ serving

    async def generate(self, stage: str, requests: list[dict]) -> list[dict]:
        """Replies (``reply_to_wire`` dicts) to a stage's requests (``request_to_wire`` dicts),
        in order. Per-request failures are replies (``error``/``too_long``), never exceptions."""
        reqs = [request_from_wire(d) for d in requests]
        if self.backend == "vllm":
            replies = await self.engine.generate(reqs)
        else:
            replies = await self._generate_queued(reqs)
        self._count(stage, replies)
        return [reply_to_wire(r) for r in replies]

    async def _generate_queued(self, reqs: list[LLMRequest]) -> list[LLMReply | BaseException]:
        fut = asyncio.get_running_loop().create_future()
        self._queue.append((reqs, fut))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._drain())
        return await fut

    async def _drain(self) -> None:
        """Answer every queued call with one ``generate`` (transformers: one at a time)."""
        while self._queue:
            calls, self._queue = self._queue, []
            flat = [r for reqs, _ in calls for r in reqs]
            try:
                out = await asyncio.to_thread(self.engine.generate, flat)
            except Exception as e:  # noqa: BLE001 - every waiting call gets the failure
                for _, fut in calls:
                    fut.set_exception(e)
                continue
            k = 0
            for reqs, fut in calls:
                fut.set_result(out[k:k + len(reqs)])
                k += len(reqs)

    def _count(self, stage: str, replies: list) -> None:
        with self._lock:
            c = self.counters.setdefault(stage, {"calls": 0, "requests": 0, "prompt_tokens": 0,
                                                 "completion_tokens": 0, "too_long": 0, "errors": 0})
            c["calls"] += 1
            for r in replies:
                c["requests"] += 1
                if isinstance(r, PromptTooLongError):
                    c["too_long"] += 1
                elif isinstance(r, BaseException):
                    c["errors"] += 1
                else:
                    c["prompt_tokens"] += int(r.prompt_tokens or 0)
                    c["completion_tokens"] += int(r.completion_tokens or 0)

    # ------------------------------------------------------------------ control plane

    def info(self) -> dict[str, Any]:
        """This replica: ``pid``, ``python`` (interpreter), ``backend``, ``model``, ``load_s``
        (seconds to load the model), ``uptime_s``, ``rss_bytes`` (this process and its
        children) and per-stage ``counters`` (calls, requests, prompt/completion tokens,
        too_long, errors)."""
        with self._lock:
            counters = {k: dict(v) for k, v in self.counters.items()}
        return {"pid": os.getpid(), "python": sys.executable, "backend": self.backend,
                "model": self.resolved.spec.model, "load_s": self.load_s,
                "uptime_s": round(time.time() - self.started, 1), "rss_bytes": process_rss_bytes(),
                "counters": counters}

    async def check_health(self) -> None:
        """Serve's periodic health check: raises when a vLLM engine core has died."""
        if self.backend == "vllm":
            await self.engine.check_health()


def _forget_dead_serve_controller() -> None:
    """Drop this process's cached Serve controller client if that controller has died.

    Ray reuses task worker processes across runs of one cluster, and Serve caches its
    controller client per process: after a run shut Serve down and the next started it again,
    a reused worker would still hold the dead controller (``ActorDiedError`` on the first
    handle). Serve's own health check clears the cache; the next handle reconnects by name.
    """
    try:
        from ray.serve.context import _check_cached_client_alive
    except ImportError:  # another Ray version: nothing to clear here
        return
    _check_cached_client_alive()


class RemoteEngine:
    """The ``LLMEngine`` protocol of ``actors.llm.LLMStage`` over a shared engine's Serve
    deployment: ``generate(requests)`` sends the batch as one call and waits at most
    ``timeout_s`` seconds for it (``TimeoutError`` otherwise, which the stage re-raises so
    the runtime retries the rows). ``session`` names the run's engine set: stage objects cached
    by worker processes are keyed on it, so a new run never reuses an old run's handle."""

    can_repair = True

    def __init__(self, app: str, deployment: str, stage: str, timeout_s: float, session: str = ""):
        from ray import serve

        self.app, self.deployment, self.stage, self.timeout_s = app, deployment, stage, float(timeout_s)
        self.session = session
        _forget_dead_serve_controller()
        self.handle = serve.get_deployment_handle(deployment, app_name=app)

    def generate(self, requests: list[LLMRequest]) -> list[LLMReply | BaseException]:
        """One reply per request (``LLMReply``, ``PromptTooLongError`` or ``EngineError``)."""
        out = self.handle.generate.remote(self.stage, [request_to_wire(r) for r in requests]).result(
            timeout_s=self.timeout_s)
        return [reply_from_wire(d) for d in out]

    def describe_error(self, exc: BaseException) -> str:
        """An engine's per-request error text as is; other failures ``"Type: message"``."""
        from actors.llm_base import describe_error

        return describe_error(exc)

    def is_transient(self, exc: BaseException) -> bool:
        """True for timeouts, a replica that died or is restarting, and Serve back-pressure."""
        return not isinstance(exc, EngineError) and type(exc).__name__ in TRANSIENT_ENGINE_ERRORS
