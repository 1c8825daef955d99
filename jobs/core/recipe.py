"""Typed recipes: one YAML document per pipeline and profile, validated by pydantic.

A recipe names the input/output, the profile, the seed, pipeline-level settings and, per
stage, the model spec, batch size, resources and the stage's own parameters (validated
against the stage's ``Params`` model at dry-run). ``--set a.b.c=value`` overrides any field;
values are parsed as YAML scalars (``--set caption_parse.batch_size=4``,
``--set generate_images.params.num_inference_steps=2``, ``--set seed=3``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from actors.models import ModelSpec

RECIPES_DIR = Path(__file__).parent.parent / "recipes"
PROFILES = ("offline", "local", "paper")


class RecipeError(ValueError):
    """A recipe cannot be read, an override is malformed, or validation failed (one line)."""


class RuntimeEnvConfig(BaseModel):
    """The Ray runtime environment a stage's tasks/actors or an engine's replicas run in
    (``ray.runtime_env.RuntimeEnv``; checked with Ray's own validation and, for
    ``py_executable``, by running the interpreter at planning time, ``jobs.core.engines``)."""

    model_config = ConfigDict(extra="forbid")

    py_executable: str | None = Field(None, description="Python interpreter of another virtual environment "
                                      "(e.g. .venv-vllm/bin/python, the CPU build of vLLM that scripts/setup.sh "
                                      "builds); a relative path is taken from the repository root when it exists "
                                      "there. It needs the same Python minor version and Ray version as the "
                                      "driver, and this project importable.")
    pip: list[str] | None = Field(None, description="Packages Ray installs for these workers (requirement strings).")
    env_vars: dict[str, str] = Field(default_factory=dict, description="Environment variables of these workers "
                                     "(added to the ones every stage gets, e.g. HF_HUB_OFFLINE).")
    image_uri: str | None = Field(None, description="Container image the workers run in (Ray's image_uri; only "
                                  "env_vars may be combined with it).")

    def ray_dict(self) -> dict[str, Any]:
        """The ``runtime_env`` dict for Ray (unset fields left out)."""
        return self.model_dump(exclude_none=True, exclude_defaults=True)


class EngineConfig(BaseModel):
    """A shared LLM engine (``actors.llm_engine``): one loaded model served by a Ray Serve
    deployment to every LLM stage that names it (``stages.X.engine``) or names the same model
    spec. Replicas autoscale between ``min_replicas`` and ``max_replicas`` (Serve autoscaling on
    ongoing requests); each replica reserves ``num_cpus``/``num_gpus``."""

    model_config = ConfigDict(extra="forbid")

    model: ModelSpec = Field(description="Model spec of a local backend: vllm or transformers")
    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per replica")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica (fractional shares a GPU)")
    min_replicas: int = Field(1, ge=1, description="Replicas started with the run (and kept while it runs)")
    max_replicas: int = Field(1, ge=1, description="Most replicas Serve autoscaling may start")
    max_ongoing_requests: int = Field(64, ge=1, description="Requests (one per call of a stage batch) a replica "
                                      "accepts at once; more queue in Serve")
    batches_in_flight: int = Field(2, ge=1, description="Batches each stage using this engine sends at once "
                                   "(concurrent Ray Data tasks of the stage): with several stages this keeps the "
                                   "engine's continuous batching fed without starting a process per row")
    request_timeout_s: float = Field(900.0, gt=0, description="How long a stage waits for one batch's replies "
                                     "before the batch fails with TimeoutError (retried like other transient "
                                     "errors)")
    runtime_env: RuntimeEnvConfig | None = Field(None, description="Runtime environment of the replicas (e.g. the "
                                                 "CPU vLLM venv's py_executable)")

    @model_validator(mode="after")
    def _replicas(self):
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas {self.min_replicas} > max_replicas {self.max_replicas}")
        return self


class StageConfig(BaseModel):
    """Per-stage settings. Model stages run in an actor pool; pure stages run as tasks.

    The pool is fixed (``concurrency``) or autoscaling (``min_actors``..``max_actors``,
    mapped to ``ray.data.ActorPoolStrategy(min_size, max_size)``). On a 2-CPU box give model
    actors a fractional ``num_cpus`` so CPU stages still get scheduled.
    """

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="False skips the stage (its outputs are not produced)")
    model: ModelSpec | None = Field(None, description="Model for model stages; None for pure stages")
    engine: str | None = Field(None, description="LLM stages: name of an entry of the recipe's engines (the "
                               "stage then takes its model from there). An LLM stage with a local model "
                               "(vllm/transformers) and no engine name gets the engine of its model spec, "
                               "shared with every stage naming the same spec, with this stage's num_cpus/"
                               "num_gpus/pool as the engine's replicas")
    runtime_env: RuntimeEnvConfig | None = Field(None, description="Runtime environment of this stage's tasks "
                                                 "or actors (py_executable, pip, env_vars, image_uri)")
    batch_size: int = Field(8, ge=1, description="Rows per map_batches call (one forward pass)")
    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per task/actor")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per actor (fractional shares a GPU)")
    concurrency: int | None = Field(None, ge=1, description="Fixed actor pool size")
    min_actors: int | None = Field(None, ge=1, description="Autoscaling pool: minimum actors")
    max_actors: int | None = Field(None, ge=1, description="Autoscaling pool: maximum actors")
    max_retries: int = Field(2, ge=0, description="Bounded retries of transient failures per row")
    audit: bool | None = Field(None, description="Filter verdicts are recorded, not applied. "
                               "None: automatic (audit when the filter's evidence comes from a placeholder)")
    params: dict[str, Any] = Field(default_factory=dict, description="Stage parameters (the stage's Params model)")

    @model_validator(mode="after")
    def _pool(self):
        if self.concurrency and (self.min_actors or self.max_actors):
            raise ValueError("give either concurrency or min_actors/max_actors, not both")
        if self.min_actors and self.max_actors and self.min_actors > self.max_actors:
            raise ValueError(f"min_actors {self.min_actors} > max_actors {self.max_actors}")
        return self

    def pool_bounds(self) -> tuple[int, int]:
        """``(min, max)`` actor pool size; a fixed pool has min == max (default 1)."""
        if self.concurrency:
            return self.concurrency, self.concurrency
        lo = self.min_actors or 1
        return lo, max(lo, self.max_actors or lo)


class Price(BaseModel):
    """A model's prices in USD per 1M tokens, as the provider lists them. Batch prices apply to
    ``openai_batch`` stages and to ``openai`` stages of a ``--batch`` run; they are never derived (a missing batch price leaves such a stage's
    cost unknown)."""

    model_config = ConfigDict(extra="forbid")

    input_per_1m: float = Field(ge=0, description="USD per 1M prompt (input) tokens")
    output_per_1m: float = Field(ge=0, description="USD per 1M completion (output) tokens")
    batch_input_per_1m: float | None = Field(None, ge=0, description="USD per 1M input tokens through the Batch API")
    batch_output_per_1m: float | None = Field(None, ge=0, description="USD per 1M output tokens through the Batch API")


class Recipe(BaseModel):
    """Fields common to every pipeline's recipe; pipelines subclass it with their own settings."""

    model_config = ConfigDict(extra="forbid")

    pipeline: str = Field(description="Pipeline name (antidote, mmgen, mirror, ...)")
    profile: Literal["offline", "local", "paper"] = Field("offline", description="Model profile")
    input: str | None = Field(None, description="Input path or s3:// URI")
    output: str | None = Field(None, description="Output folder path or s3:// URI")
    limit: int | None = Field(None, ge=1, description="Process at most this many input rows")
    seed: int = Field(0, description="Seed for sampling/shuffling (per-row seeds derive from ids)")
    block_rows: int | None = Field(None, ge=1, description="Input rows per Ray Data block: the unit of progress "
                                   "that a resumed run does not redo, and the largest batch a stage gets. None "
                                   "(default): sized from the input (jobs.core.driver.block_rows_for): one row "
                                   "per block for small runs so every stage has work while the others run, up "
                                   "to 16 rows for large ones")
    cache: str | None = Field(None, description="Generation cache: a local folder or s3:// URI shared by every "
                              "worker and run (actors.gen_cache). Model calls whose model, request, sampling and "
                              "output format are unchanged are served from it; --cache URI sets it, --no-cache "
                              "turns it off. None: no cache")
    cache_rejects: bool = Field(False, description="Serve cached replies that fail the stage's validation. False "
                                "(default): such a call is sent again, so rows that were rejected or repaired "
                                "re-ask; true: a rejected row's whole re-ask chain is replayed from the cache. "
                                "Errors (HTTP, timeouts) are never cached")
    prices: dict[str, Price] = Field(default_factory=dict, description="USD per 1M tokens by model name (the "
                                       "model spec's `model`), for the cost in the progress output, manifest "
                                       "and report and for --max-cost (jobs.core.cost)")
    max_cost: float | None = Field(None, gt=0, description="Stop the run cleanly before its spend on priced "
                                   "models would pass this many USD (--max-cost); committed rows stay and the "
                                   "same command resumes. None: no limit")
    batch: bool = Field(False, description="Batch API round trip (--batch; jobs.core.batches): the calls of LLM "
                        "stages on an OpenAI-compatible API (backend openai) that the generation cache cannot "
                        "answer go into Batch API request files, which the run uploads and submits; their rows "
                        "wait (not committed) until `python -m jobs status OUT` or a rerun ingests the results. "
                        "Needs a cache (default OUT/_work/batch-cache)")
    engines: dict[str, EngineConfig] = Field(default_factory=dict, description="Shared LLM engines by name "
                                             "(stages name them with `engine:`)")
    stages: dict[str, StageConfig] = Field(default_factory=dict)

    def input_uris(self) -> dict[str, list[str]]:
        """Command-line option -> the paths or URIs it names that must exist before a run
        starts (``--input``; pipelines add their own, e.g. MIRROR's ``--faces``)."""
        return {"--input": [self.input] if self.input else []}


def _parse_override(item: str) -> tuple[list[str], Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise RecipeError(f"--set {item!r}: expected key.path=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise RecipeError(f"--set {item!r}: value is not valid YAML ({e.problem})") from None
    return key.strip().split("."), value


def apply_overrides(doc: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides to a recipe dict in place.

    A first segment naming a stage (``caption_parse.batch_size``) is looked up under
    ``stages``. Raises ``RecipeError`` for an unknown stage or a malformed item.
    """
    for item in overrides:
        path, value = _parse_override(item)
        stages = doc.setdefault("stages", {})
        if path[0] != "stages" and path[0] in stages:
            path = ["stages", *path]
        elif len(path) > 1 and path[0] not in Recipe.model_fields and path[0] != "stages" \
                and path[0] not in doc:
            raise RecipeError(f"--set {item!r}: no stage or field named {path[0]!r} "
                              f"(stages: {', '.join(stages)})")
        node = doc
        for p in path[:-1]:
            if node.get(p) is None:
                node[p] = {}
            node = node[p]
            if not isinstance(node, dict):
                raise RecipeError(f"--set {item!r}: {p!r} is not a mapping")
        node[path[-1]] = value
    return doc


def recipe_path(pipeline: str, profile: str) -> Path:
    """Bundled recipe file for a pipeline and profile: ``jobs/recipes/<pipeline>.<profile>.yaml``
    (a command's hyphens as underscores: ``antidote-pairs`` -> ``antidote_pairs.offline.yaml``)."""
    return RECIPES_DIR / f"{pipeline.replace('-', '_')}.{profile}.yaml"


def load_recipe(model: type[Recipe], pipeline: str, profile: str | None = None,
                recipe_file: str | None = None, overrides: list[str] | None = None,
                **fields: Any) -> Recipe:
    """Read a recipe YAML (the bundled one for the profile unless ``recipe_file``), apply
    command-line fields (``input``, ``output``, ``limit`` … when not None) and ``--set``
    overrides, and validate it with ``model``.

    Raises ``RecipeError`` with a one-line message naming the file and the failing field.
    """
    if profile is not None and profile not in PROFILES:
        raise RecipeError(f"unknown profile {profile!r} (choose from {', '.join(PROFILES)})")
    path = Path(recipe_file) if recipe_file else recipe_path(pipeline, profile or "offline")
    if not path.exists():
        raise RecipeError(f"recipe file not found: {path}")
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(doc, dict):
        raise RecipeError(f"{path}: a recipe must be a YAML mapping")
    doc.setdefault("pipeline", pipeline)
    if profile is not None:
        doc["profile"] = profile
    for k, v in fields.items():
        if v is not None:
            doc[k] = v
    apply_overrides(doc, overrides or [])
    try:
        return model.model_validate(doc)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        raise RecipeError(f"{path.name}: {loc}: {err['msg']}"
                          + (f" (and {len(e.errors()) - 1} more)" if len(e.errors()) > 1 else "")) from None
