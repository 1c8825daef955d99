"""Typed config of the MIRROR-LLaVA Serve application: the recipe, its stage names and roles,
and the Serve options of each deployment (``jobs.mirror_llava.serve`` builds the app)."""
from __future__ import annotations

from typing import Any

from pydantic import Field, ValidationError, model_validator

from jobs.core.recipe import Recipe, StageConfig, load_recipe
from udfs import mirror_images as MI

PIPELINE = "mirror_llava_serve"
#: recipe stages: deployments (ingress, client, describe, counselor, generate, verify) and the
#: verifier's three models (faces, clip, nsfw: model + params only, they run in the verify replica)
STAGE_NAMES = ("ingress", "client", "describe", "counselor", "generate", "verify", "faces", "clip", "nsfw")
#: LLM roles served by ``actors.llm.LLMStage``
ROLES = ("client", "describe", "counselor")
#: model backends each model stage accepts (checked when the recipe is validated); the LLM roles'
#: local models (vllm, transformers) run in shared engines (``jobs.core.engines``): one per spec
_BACKENDS = {"client": ("transformers", "vllm", "openai"), "describe": ("transformers", "vllm", "openai"),
             "counselor": ("transformers", "vllm", "openai"), "generate": ("diffusers",),
             "faces": ("dlib", "deepface"), "clip": ("open_clip",), "nsfw": ("transformers", "nudenet")}
#: environment variables passed on to every replica when set where the app is built
PASSED_ENV = ("HF_HUB_OFFLINE", "HF_HOME", "MMSYNTH_CACHE", "KERAS_BACKEND", "OMP_WAIT_POLICY",
              "TOKENIZERS_PARALLELISM", "DEEPFACE_HOME", "DEEPFACE_BACKEND_ENGINE", "OPENAI_API_KEY",
              "VLLM_API_KEY")


class ServeRecipe(Recipe):
    """Typed config of the Serve application (one YAML per profile, ``--set`` overrides).

    ``stages`` must name every entry of ``STAGE_NAMES``; model stages need a ``model`` whose
    backend fits the role (``_BACKENDS``), the LLM roles a ``model`` or an ``engine`` of
    ``engines``. LLM roles with a local model are served by shared engines (one ``LLMEngine``
    deployment per model spec, ``jobs.core.engines``: roles naming the same spec share it; an
    implicit engine takes the role's resources). Per deployment: ``num_cpus``, ``num_gpus`` (Ray
    actor resources of each replica), ``concurrency`` (fixed replicas, default 1) or
    ``min_actors``/``max_actors`` (Serve autoscaling), ``batch_size`` (generator/verifier:
    ``serve.batch`` size). ``verify.params`` is ``udfs.mirror_images.ImageFilterParams``;
    ``verify.audit`` forces audit mode on/off (None: automatic). ``max_retries``/``enabled`` of
    a stage are not used here.
    """

    pipeline: str = PIPELINE
    app_name: str = Field("mirror_llava", description="Serve application name (serve.get_app_handle).")
    route_prefix: str = Field("/", description="HTTP route prefix of the application.")
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="Largest request body in bytes; larger "
                                "bodies get 413 (Content-Length or chunked).")
    batch_wait_timeout_s: float = Field(0.01, ge=0, description="serve.batch: how long a replica waits to fill "
                                        "a batch before running it.")
    image_trigger: str = Field("img", description="PhotoMaker trigger word in the image prompt describe returns "
                               "(SPEC A6: 'portrait photo of a man img, ...').")
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment variables for every replica.")
    request_timeout_s: float = Field(300.0, gt=0, description="How long the ingress waits for one backend call "
                                     "(an LLM role's reply with its re-asks, an image, a verification) before it "
                                     "answers 504.")
    http_request_timeout_s: float = Field(600.0, gt=0, description="Serve's HTTP proxy timeout for a whole "
                                          "request (serve.start http_options.request_timeout_s).")

    @model_validator(mode="after")
    def _stages(self):
        from actors.llm_base import LLMParams

        missing = [s for s in STAGE_NAMES if s not in self.stages]
        if missing:
            raise ValueError(f"stages missing: {', '.join(missing)} (need {', '.join(STAGE_NAMES)})")
        unknown = [s for s in self.stages if s not in STAGE_NAMES]
        if unknown:
            raise ValueError(f"unknown stages: {', '.join(unknown)} (known: {', '.join(STAGE_NAMES)})")
        for name, backends in _BACKENDS.items():
            st = self.stages[name]
            if name in ROLES and st.engine:
                if st.engine not in self.engines:
                    raise ValueError(f"stages.{name}.engine {st.engine!r} is not under engines")
                continue
            m = st.model
            if m is None:
                raise ValueError(f"stages.{name}.model is required" + (" (or engine)" if name in ROLES else ""))
            if m.backend not in backends:
                raise ValueError(f"stages.{name}.model.backend must be one of {backends}, got {m.backend!r}")
        checks = [(role, LLMParams) for role in ROLES] + [("verify", MI.ImageFilterParams)]
        for name, model in checks:
            try:
                model.model_validate(self.stages[name].params)
            except ValidationError as exc:
                raise ValueError(f"stages.{name}.params: {first_error(exc)}") from None
        return self

    def llm_params(self, role: str):
        """``LLMParams`` of an LLM role."""
        from actors.llm_base import LLMParams

        return LLMParams.model_validate(self.stages[role].params)

    def verify_params(self) -> MI.ImageFilterParams:
        """The verification thresholds (``ImageFilterParams``)."""
        return MI.ImageFilterParams.model_validate(self.stages["verify"].params)


def load_serve_recipe(profile: str | None = "offline", recipe_file: str | None = None,
                      overrides: list[str] | None = None) -> ServeRecipe:
    """The bundled (or given) recipe with ``key.path=value`` overrides, validated.
    Raises ``jobs.core.recipe.RecipeError`` with a one-line message."""
    return load_recipe(ServeRecipe, PIPELINE, profile, recipe_file, overrides)


def first_error(exc: ValidationError) -> str:
    e = exc.errors()[0]
    return f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}"


def deployment_options(stage: StageConfig, env: dict[str, str]) -> dict:
    """Serve options of one deployment from its recipe stage."""
    opts: dict[str, Any] = {"ray_actor_options": {"num_cpus": stage.num_cpus, "num_gpus": stage.num_gpus},
                            "max_ongoing_requests": max(8, 2 * stage.batch_size)}
    if env:
        opts["ray_actor_options"]["runtime_env"] = {"env_vars": dict(env)}
    lo, hi = stage.pool_bounds()
    if stage.min_actors or stage.max_actors:
        opts["autoscaling_config"] = {"min_replicas": lo, "max_replicas": hi, "initial_replicas": lo}
    else:
        opts["num_replicas"] = lo
    return opts


def as_recipe(config: Any) -> ServeRecipe:
    if config is None:
        return load_serve_recipe("offline")
    if isinstance(config, ServeRecipe):
        return config
    if isinstance(config, dict):
        builder_keys = {"recipe", "profile", "set"}
        if set(config) <= builder_keys:  # `serve run ...:build_app profile=paper set=a.b=1,c.d=2`
            sets = config.get("set") or []
            sets = [s for s in sets.split(",") if s] if isinstance(sets, str) else list(sets)
            return load_serve_recipe(config.get("profile"), config.get("recipe"), sets)
        return ServeRecipe.model_validate(config)
    raise TypeError(f"build_app config must be a ServeRecipe, a dict or None, got {type(config).__name__}")
