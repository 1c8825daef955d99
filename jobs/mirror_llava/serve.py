"""MIRROR-LLaVA counselling services as one Ray Serve application (issue 10 part 3, SPEC B3, B5).

The original ran two Flask services (description on port 6000, verification on port 5000, one
GPU each) plus the client LLM and the counselor inside the inference script (SPEC B5, B6.8,
B6.10). Here they are one Serve application with typed HTTP APIs and Python handles::

    serve run jobs.mirror_llava.serve:app                               # offline recipe
    serve run jobs.mirror_llava.serve:build_app profile=paper            # bundled paper recipe
    serve run jobs.mirror_llava.serve:build_app recipe=my.yaml set=describe.batch_size=8
    python -m jobs.mirror_llava.serve --profile offline --port 8000     # ray.init + serve.run

Deployments (names as in ``serve status``), each built from the recipe stage of the same role
(``jobs/recipes/mirror_llava_serve.<profile>.yaml``; model, params, ``num_cpus``/``num_gpus``,
replicas = ``concurrency`` or autoscaling ``min_actors``..``max_actors``, ``batch_size`` =
``serve.batch`` size):

- ``MirrorLlavaAPI`` (stage ``ingress``): the FastAPI ingress; validation, prompts, verdicts,
  and the LLM roles' stages (``actors.llm.LLMStage``: sampling, output schema, re-asks);
- one shared engine per local LLM model (``actors.llm_engine.LLMEngine``, ``jobs.core.engines``):
  the roles ``client``, ``describe`` and ``counselor`` that name the same model spec (or the
  same recipe ``engines`` entry) use one copy of it; offline the client and the descriptions
  share SmolLM2, the counselor is the vision-language model (``placeholder:tiny-llava``; a
  ``mirror-llava-train`` checkpoint folder as ``counselor.model: {backend: transformers, model:
  /path/to/CKPT}`` loads as its base + the merged LoRA, ``actors.llm_hf``). Roles on an API
  (``openai``) call it from the ingress;
- ``generator``: ``actors.identity_t2i.IdentityText2Image``;
- ``verifier``: ``actors.faces.FaceAnalyzer`` + ``actors.clip.CLIPScorer`` +
  ``actors.nsfw.NSFWClassifier`` in one replica (the original's single verification service;
  recipe stages ``faces``/``clip``/``nsfw`` give their models and params, stage ``verify`` the
  replica's resources, the thresholds and the audit switch). Source-face results are cached
  per replica (LRU of 256, key = SHA-1 of the bytes): a session verifies up to 10 images per
  turn against one source face.

HTTP endpoints (JSON bodies need ``Content-Type: application/json``; images are base64
strings or ``data:`` URLs; every model response carries ``model`` and ``placeholder``):

========================  =====================================================================
``GET  /healthz``          200 ``HealthResponse``; 503 when a backend deployment does not answer
``POST /v1/describe``      ``DescribeRequest`` -> ``DescribeResponse`` (aligned + contrasting)
``POST /v1/generate``      ``GenerateRequest`` -> ``GenerateResponse`` (PNG, base64)
``POST /v1/verify``        ``VerifyRequest`` -> ``VerifyResponse`` (every score, pass/fail per check)
``POST /v1/client``        ``ClientRequest`` -> ``ChatResponse``
``POST /v1/counselor``     ``CounselorRequest`` -> ``ChatResponse``
``POST /describe``         the original's form fields ``history``, ``client_utt`` ->
                           ``{"response": "<2 lines>"}`` plus the ``DescribeResponse`` fields
``POST /verify``           the original's multipart ``image``, ``base_image`` (png/jpg/jpeg/gif)
                           + form ``statement``: 200 ``{"message": ...}`` when accepted, else 400
                           ``{"error": "Image verification failed."}``, both plus the report
========================  =====================================================================

Timeouts: the ingress waits ``request_timeout_s`` (recipe) for each backend call and answers
504 after it; each engine call has the engine's own ``request_timeout_s``; Serve's HTTP proxy
ends a request after ``http_request_timeout_s``.

Errors: 422 with a message for missing fields, wrong types, undecodable base64/images, bad
sampling values, a PhotoMaker prompt without its trigger word; 415 for a wrong request or
upload content type; 413 for a body over ``max_body_bytes`` (checked on Content-Length and
while reading chunked bodies, in a pure ASGI middleware: Serve has no body-size option, and an
exception raised from a wrapped ``receive()`` would surface as 400, notes/faces-train-serve.md
§2); 502 when a model replied with nothing usable (LLM reply that failed validation after its
repairs, a generation error). The original answered 400 for missing fields and 500 for
everything else (SPEC B5).

Python handles: ``serve.get_app_handle(app_name)`` exposes ``describe``, ``generate``,
``verify``, ``client``, ``counselor`` and ``health`` on the ingress; each takes the request
model (or a dict of its fields, bytes allowed for images) and returns the response model.
Errors reach the caller as ``fastapi.HTTPException`` (``status_code``, ``detail``) or
``pydantic.ValidationError``.

Thresholds (sources): NSFW = ``p(nsfw) >= p(normal)`` flags the image (MIRROR-LLaVA
``verify.py`` via ``actors.nsfw``, SPEC B5 check 1); CLIP cosine of the image and "A facial
photo with {stage direction}" >= **0.2** (SPEC B5 check 2, ViT-B/32); identity cosine >=
``udfs.faces.IDENTITY_THRESHOLDS[backend]["mirror_llava_inference"]`` = **0.3** for DeepFace
VGG-Face (SPEC B5 check 3; the dataset filter used 0.2) and **0.925** for dlib (measured on
real pairs, ``udfs.faces``). Gender and age are not checked (the original's service did not);
the recipe's ``verify.params.preservation`` can turn them on.

Audit mode: with ``verify.audit: null`` (default) a verification whose evidence comes from a
placeholder model (faces/CLIP/NSFW placeholders, or ``image_placeholder: true`` on the
request: the image came from a placeholder generator) runs in audit mode: every score and
verdict is reported, ``passed`` is the real verdict, ``accepted`` is true and
``audit_reason`` says why. ``accepted`` is what a retry loop should read.
"""
from __future__ import annotations

import argparse
import os

from actors.models import ModelSpec, resolve
from jobs.core.recipe import StageConfig
from jobs.core.engines import EngineConfigError, engine_deployment, plan_engines
from jobs.mirror_llava.serve_backends import GeneratorServer, VerifierServer
from jobs.mirror_llava.serve_config import (_BACKENDS, PASSED_ENV, ROLES, ServeRecipe, as_recipe, deployment_options,
                                            load_serve_recipe)
from jobs.mirror_llava.serve_ingress import ingress_class


def app_plan(recipe: ServeRecipe) -> tuple[dict, dict, dict]:
    """``(engines, resolved, settings)`` of an app: the shared LLM engines of the roles with a
    local model (``jobs.core.engines.plan_engines``), every model stage's resolved model, and
    the ingress's settings (LLM roles with their stage params and engine address, verification
    params, timeouts, models). Nothing is loaded. Raises ``ValueError`` naming the role/engine."""
    st = recipe.stages
    try:
        engines = plan_engines([(r, st[r]) for r in ROLES], recipe)  # local LLMs: one engine per spec
    except EngineConfigError as exc:
        raise ValueError(str(exc)) from None
    engine_of = {role: name for name, e in engines.items() for role in e.stages}
    specs = {name: recipe.engines[st[name].engine].model if name in engine_of and st[name].engine else st[name].model
             for name in _BACKENDS}
    resolved = {name: resolve(ModelSpec.model_validate(spec)) for name, spec in specs.items()}
    llm = {role: {"model": resolved[role].model_dump(mode="json"), "params": st[role].params,
                  "engine": ({"app": recipe.app_name, "deployment": engine_of[role], "stage": role,
                              "timeout_s": engines[engine_of[role]].config.request_timeout_s}
                             if role in engine_of else None)} for role in ROLES}
    settings = {"app_name": recipe.app_name, "max_body_bytes": recipe.max_body_bytes,
                "image_trigger": recipe.image_trigger, "audit": st["verify"].audit,
                "verify_params": recipe.verify_params().model_dump(), "request_timeout_s": recipe.request_timeout_s,
                "llm_params": {r: st[r].params for r in ROLES}, "llm": llm,
                "models": {name: r.describe() for name, r in resolved.items()},
                "engines": {name: list(e.stages) for name, e in engines.items()}}
    return engines, resolved, settings


def build_app(config: ServeRecipe | dict | None = None):
    """The Serve application (``serve.run(build_app(recipe), name=recipe.app_name)``).

    ``config``: a ``ServeRecipe``; a recipe dict; ``{"profile": ..., "recipe": path, "set":
    "a.b=1,c.d=2"}`` (what ``serve run module:build_app key=value`` passes); or None (offline
    recipe). Resolves every model spec (nothing is loaded here: replicas load their models).
    Raises ``jobs.core.recipe.RecipeError``/``pydantic.ValidationError`` for a bad recipe,
    ``ValueError`` for an engine that cannot run and ``actors.models.ModelResolutionError`` for
    a model that cannot be resolved.
    """
    recipe = as_recipe(config)
    if recipe.profile == "offline":
        os.environ["HF_HUB_OFFLINE"] = "1"
    env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
    if recipe.profile == "offline":
        env["HF_HUB_OFFLINE"] = "1"
    env.update(recipe.env)
    engines, resolved, settings = app_plan(recipe)
    st, wait = recipe.stages, recipe.batch_wait_timeout_s
    gen = st["generate"]
    generator = serve_deployment(GeneratorServer, "generator", gen, env).bind(
        resolved["generate"].model_dump(), gen.params, gen.batch_size, wait)
    ver = st["verify"]
    verifier = serve_deployment(VerifierServer, "verifier", ver, env).bind(
        *({"model": resolved[k].model_dump(), "params": st[k].params} for k in ("faces", "clip", "nsfw")),
        ver.batch_size, wait)
    api = ingress_class(recipe.max_body_bytes)
    return serve_deployment(api, "MirrorLlavaAPI", st["ingress"], env).bind(
        {name: engine_deployment(e, env) for name, e in engines.items()}, generator, verifier, settings)


def serve_deployment(cls, name: str, stage: StageConfig, env: dict[str, str]):
    """``cls`` (a plain class or an ``@serve.deployment``) as a named deployment with the
    stage's resources and replicas."""
    from ray import serve
    from ray.serve.deployment import Deployment

    dep = cls if isinstance(cls, Deployment) else serve.deployment(cls)
    return dep.options(name=name, **deployment_options(stage, env))


def __getattr__(name: str):
    """``app``: the offline application, built on first access (``serve run
    jobs.mirror_llava.serve:app``); building on import would resolve models in every replica."""
    if name == "app":
        return build_app(None)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main(argv: list[str] | None = None) -> int:
    """``python -m jobs.mirror_llava.serve``: start (or join) Ray, run the app, block."""
    import time

    ap = argparse.ArgumentParser(prog="python -m jobs.mirror_llava.serve", description=__doc__.splitlines()[0])
    ap.add_argument("--profile", choices=["offline", "paper"], default=None)
    ap.add_argument("--recipe", help="recipe YAML (default: the bundled one for the profile)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS or a new local cluster)")
    ap.add_argument("--dry-run", action="store_true", help="validate the recipe and resolve models only")
    args = ap.parse_args(argv)
    try:
        recipe = load_serve_recipe(args.profile or ("offline" if not args.recipe else None), args.recipe, args.set)
        app = build_app(recipe)
    except ValueError as exc:  # RecipeError, ModelResolutionError
        print(f"error: {exc}")
        return 2
    if args.dry_run:
        print(f"recipe ok: {recipe.app_name}, profile {recipe.profile}")
        return 0
    import ray
    from ray import serve

    ray.init(address=args.address or os.environ.get("RAY_ADDRESS") or "local", include_dashboard=False)
    serve.start(http_options={"host": args.host, "port": args.port,
                              "request_timeout_s": recipe.http_request_timeout_s})
    serve.run(app, name=recipe.app_name, route_prefix=recipe.route_prefix)
    print(f"serving {recipe.app_name} on http://{args.host}:{args.port}{recipe.route_prefix} (Ctrl-C stops)")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
