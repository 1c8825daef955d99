"""vLLM backend of the LLM stage, as a ``ray.data.llm`` processor (GPU clusters; ``gpu`` extra).

``build_vllm_processor(model, params, stage_options)`` returns a processor to apply to a
dataset (``processor(ds)``); it produces the same output columns as ``LLMStage``. vLLM is
imported only inside the engine actors, never here, so this module imports on CPU machines.

Guided decoding goes through vLLM's ``SamplingParams.structured_outputs``
(``StructuredOutputsParams``): ray.data.llm's engine stage turns a row's
``sampling_params["structured_outputs"]`` dict into it — ``{"json": schema}``,
``{"regex": ...}``, ``{"grammar": ebnf}`` or ``{"json_object": True}``; the schema is passed
as a JSON string so the Arrow hop between stages cannot add ``null`` keywords to it. Replies are still
validated in ``vllm_postprocess``; there is no repair round (a processor is one pass), so an
invalid reply is rejected.
"""
from __future__ import annotations

import json
import os
from functools import lru_cache, partial
from typing import Any

from actors.llm_base import ImageInliner, LLMParams, row_inputs
from actors.models import ResolvedModel, materialize
from udfs import rows
from udfs.llm_output import (
    OutputFormat,
    OutputValidationError,
    parse_response_format,
    reject_reason,
)

#: keys of ``stage_options`` copied verbatim into ``vLLMEngineProcessorConfig``
_CONFIG_KEYS = ("batch_size", "concurrency", "accelerator_type", "max_concurrent_batches", "max_pending_requests",
                "runtime_env", "should_continue_on_error", "chat_template_stage", "tokenize_stage",
                "detokenize_stage", "prepare_multimodal_stage", "placement_group_config", "log_engine_metrics")
_COLUMNS_KEY = "__llm_columns__"
_ORIG_MESSAGES = "__llm_messages_in__"
_INPUT_ERROR = "__llm_input_error__"
_FORMAT_KEY = "__llm_format__"


def model_source(model: ResolvedModel) -> str:
    """What vLLM loads: hub id, local folder, or the packaged file path (e.g. a GGUF)."""
    if model.source == "package":
        return os.path.join(model.path, model.file) if model.file else model.path
    if model.source == "placeholder":
        return materialize(model)
    return model.path


def vllm_processor_kwargs(model: ResolvedModel | dict, params: LLMParams | dict | None,
                          stage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Keyword arguments for ``ray.data.llm.vLLMEngineProcessorConfig``.

    ``stage_options`` (default: ``model.spec.options``): ``engine_kwargs`` (dict, merged over
    the spec's ``dtype`` and hub ``revision``), ``batch_size`` (default 32), ``concurrency``
    (int or ``[min, max]``, default 1) and the other keys in ``_CONFIG_KEYS``.
    ``should_continue_on_error`` defaults to False as in Ray (True keeps failed rows with
    ``__inference_error__``, but ray.data.llm skips postprocess for them).
    """
    resolved = model if isinstance(model, ResolvedModel) else ResolvedModel.model_validate(model)
    if not isinstance(params, LLMParams):
        LLMParams.model_validate(params or {})  # fail early on invalid params
    opts = dict(resolved.spec.options if stage_options is None else stage_options)
    engine = {}
    if resolved.spec.dtype != "auto":
        engine["dtype"] = resolved.spec.dtype
    if resolved.source == "hub" and resolved.spec.revision:
        engine["revision"] = resolved.spec.revision
    engine.update(opts.get("engine_kwargs") or {})
    kwargs: dict[str, Any] = {"model_source": model_source(resolved), "engine_kwargs": engine,
                              "batch_size": int(opts.get("batch_size", 32)), "concurrency": 1}
    for k in _CONFIG_KEYS:
        if k in opts and k != "batch_size":
            kwargs[k] = opts[k]
    if isinstance(kwargs.get("concurrency"), list):
        kwargs["concurrency"] = tuple(kwargs["concurrency"])
    return kwargs


def vllm_processor_config(model: ResolvedModel | dict, params: LLMParams | dict | None,
                          stage_options: dict[str, Any] | None = None):
    """The ``ray.data.llm.vLLMEngineProcessorConfig`` of a stage (constructible without vLLM).

    Raises ``pydantic.ValidationError`` for invalid options (e.g. ``concurrency=0``).
    """
    from ray.data.llm import vLLMEngineProcessorConfig

    return vLLMEngineProcessorConfig(**vllm_processor_kwargs(model, params, stage_options))


def vllm_sampling_params(sampling: dict[str, Any], fmt: OutputFormat) -> dict[str, Any]:
    """vLLM ``SamplingParams`` kwargs (as a dict) for merged ``Sampling`` values and a format."""
    sp = {k: sampling[k] for k in ("temperature", "top_p", "max_tokens", "frequency_penalty", "presence_penalty")}
    if sampling.get("seed") is not None:
        sp["seed"] = int(sampling["seed"])
    if fmt.kind == "json_schema":  # a string: a dict would gain Arrow nulls ("maxLength": None) on the way
        sp["structured_outputs"] = {"json": json.dumps(fmt.schema)}
    elif fmt.kind == "json_object":
        sp["structured_outputs"] = {"json_object": True}
    elif fmt.kind == "regex":
        sp["structured_outputs"] = {"regex": fmt.grammar}
    elif fmt.kind == "ebnf":
        sp["structured_outputs"] = {"grammar": fmt.grammar}
    return sp


@lru_cache(maxsize=8)
def _params(params_json: str) -> tuple[LLMParams, OutputFormat]:
    p = LLMParams.model_validate(json.loads(params_json))
    return p, p.output_format()


def _format_of(row: dict[str, Any], default: OutputFormat) -> OutputFormat:
    return parse_response_format(row.get("response_format")) or default


def vllm_preprocess(row: dict[str, Any], params: dict[str, Any],
                    image_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Row → engine input: normalized ``messages`` and ``sampling_params``; other columns kept.

    Image parts given as paths / ``s3://`` URIs become bounded base64 data URLs
    (``ImageInliner``; ``image_options``: ``image_max_side``, ``image_format``,
    ``jpeg_quality`` from the model spec's options), which ray.data.llm's multimodal
    preparation stage decodes for vision models.

    A row with invalid ``messages``/``sampling``/``response_format`` is not dropped: it gets
    a one-token dummy request and ``__llm_input_error__``, which ``vllm_postprocess`` turns
    into ``rows.ROW_ERROR``.
    """
    p, default_fmt = _params(json.dumps(params, sort_keys=True, default=str))
    out = dict(row)
    out[_COLUMNS_KEY] = json.dumps(sorted(row))
    out[_ORIG_MESSAGES] = row.get("messages")  # restored by vllm_postprocess
    try:
        msgs, samp, fmt = row_inputs(str(row.get(rows.ID, "?")), row.get("messages"), row.get("sampling"), p,
                                     lambda: _format_of(row, default_fmt))
        # image paths/URIs -> bounded data URLs (vLLM workers need no access to the files)
        msgs = _inliner(json.dumps(image_options or {}, sort_keys=True))(msgs, str(row.get(rows.ID)))
    except rows.InputError as e:
        out[_INPUT_ERROR] = f"InputError: {e}"
        out["messages"] = [{"role": "user", "content": "."}]
        out["sampling_params"] = {"temperature": 0.0, "max_tokens": 1}
        out[_FORMAT_KEY] = ""
        return out
    out[_INPUT_ERROR] = ""
    out["messages"] = msgs
    out["sampling_params"] = vllm_sampling_params(samp, fmt)
    out[_FORMAT_KEY] = json.dumps({"kind": fmt.kind, "schema": fmt.schema, "grammar": fmt.grammar,
                                   "model": _model_path(fmt)})
    return out


@lru_cache(maxsize=8)
def _inliner(options_json: str) -> ImageInliner:
    return ImageInliner.from_options(json.loads(options_json))


def _model_path(fmt: OutputFormat) -> str | None:
    m = fmt.model
    return f"{m.__module__}:{m.__qualname__}" if m is not None else None


@lru_cache(maxsize=64)
def _restore_format(text: str) -> OutputFormat:
    if not text:
        return OutputFormat()
    d = json.loads(text)
    if d.get("model"):
        from udfs.llm_output import output_format

        return output_format(response_schema=d["model"])
    return OutputFormat(kind=d["kind"], schema=d.get("schema"), grammar=d.get("grammar"))


def vllm_postprocess(row: dict[str, Any], model_name: str) -> dict[str, Any]:
    """Engine output row → the ``LLMStage`` output columns plus the original columns.

    Reads ray.data.llm's ``generated_text``, ``num_input_tokens``, ``num_generated_tokens``
    (and ``__inference_error__`` when present), validates the reply against the row's format
    and fills ``rows.ROW_REJECT`` (no repair round) or ``rows.ROW_ERROR``. ray.data.llm does
    not expose vLLM's finish reason: ``finish_reason`` is ``length`` when the reply used all
    ``max_tokens``, else ``stop``.
    """
    keep = json.loads(row.get(_COLUMNS_KEY) or "[]")
    out = {k: row.get(k) for k in keep}
    if "messages" in keep:
        orig = row.get(_ORIG_MESSAGES)
        out["messages"] = orig
    text = row.get("generated_text")
    n_out = int(row.get("num_generated_tokens") or 0)
    err = row.get(_INPUT_ERROR) or row.get("__inference_error__") or None
    parsed = reject = None
    if not err:
        try:
            parsed = _restore_format(row.get(_FORMAT_KEY) or "").validate(text or "")
        except OutputValidationError as e:
            reject = reject_reason(str(e), text or "", 1)
    max_tokens = (row.get("sampling_params") or {}).get("max_tokens")
    out.update({
        "generated_text": None if err else text,
        "parsed": parsed,
        "finish_reason": None if err else ("length" if max_tokens and n_out >= int(max_tokens) else "stop"),
        "prompt_tokens": int(row.get("num_input_tokens") or 0),
        "completion_tokens": n_out,
        "llm_backend": "vllm",
        "llm_model": model_name,
        "llm_attempts": 1,
        "llm_repaired": False,
        rows.ROW_ERROR: err,
        rows.ROW_REJECT: reject,
    })
    return out


def build_vllm_processor(model: ResolvedModel | dict, params: LLMParams | dict | None,
                         stage_options: dict[str, Any] | None = None):
    """``ray.data.llm`` processor for a vLLM stage: ``processor(ds)`` → dataset with the
    ``LLMStage`` output columns (``OUTPUT_COLUMNS`` + ``ROW_ERROR``/``ROW_REJECT``).

    Needs vLLM and a GPU to *run*; building it on a CPU machine only fails when Ray or the
    model's tokenizer files cannot be reached.
    """
    from ray.data.llm import build_processor

    resolved = model if isinstance(model, ResolvedModel) else ResolvedModel.model_validate(model)
    p = params if isinstance(params, LLMParams) else LLMParams.model_validate(params or {})
    pdict = p.model_dump(mode="python")
    if isinstance(p.response_schema, type):
        pdict["response_schema"] = f"{p.response_schema.__module__}:{p.response_schema.__qualname__}"
    config = vllm_processor_config(resolved, p, stage_options)
    image_options = {k: v for k, v in resolved.spec.options.items()
                     if k in ("image_max_side", "image_format", "jpeg_quality")}
    return build_processor(config, preprocess=partial(vllm_preprocess, params=pdict, image_options=image_options),
                           postprocess=partial(vllm_postprocess, model_name=resolved.spec.model))

