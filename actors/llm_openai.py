"""OpenAI-compatible backend of the LLM stage (OpenAI, DeepSeek, Azure OpenAI, vLLM servers).

The official ``openai`` client runs inside the actor; the client's own retries are off and
this module retries itself, so the policy is explicit and bounded:

- retried: HTTP 408/409/429, 5xx, timeouts and connection errors, up to ``max_retries``
  times, waiting ``backoff_s * 2**n`` (capped by ``max_backoff_s``, or the server's numeric
  ``Retry-After`` when it is shorter than the cap) with ±10 % jitter;
- not retried: other 4xx (a 400 is a bad request: the row errors at once);
- each attempt is bounded by ``timeout_s``; a row therefore takes at most
  ``(max_retries + 1) * timeout_s`` plus the backoff waits;
- paced: a fixed ``qps`` ceiling if given, and the provider's rate-limit headers (requests
  and tokens remaining, time to reset; ``actors.ratelimit.HeaderPacer``) spread requests
  over the window before a 429 would come.

The API key is read from the environment variable named by ``options.api_key_env`` and is
never logged, returned or put in an error message (messages are scrubbed).

Azure OpenAI (``options.api_type: azure``; MM-GEN's original ran GPT-4o on Azure, SPEC D6/D9.1)
goes through the client's own ``AzureOpenAI``: requests go to
``{endpoint}/openai/deployments/{deployment}/chat/completions?api-version={version}`` with an
``api-key`` header, or ``Authorization: Bearer`` for an Azure AD (Entra ID) token; see
``azure_client``.
"""
from __future__ import annotations

import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from actors.llm_base import ImageInliner, LLMParams, LLMReply, LLMRequest, describe_error
from actors.models import ResolvedModel
from actors.ratelimit import HeaderPacer, RateLimiter
from udfs.llm_output import OutputFormat, strip_nones

#: chat-completions parameters passed as named arguments to the client (others go in extra_body)
_CLIENT_KWARGS = {"model", "messages", "temperature", "top_p", "max_tokens", "frequency_penalty",
                  "presence_penalty", "seed", "response_format", "stop", "n", "user"}
_RETRY_STATUS = {408, 409, 429}
#: tokens counted per image part when estimating a request for rate-limit pacing (OpenAI's
#: high-detail cost of a 1024x1024 image: 4 tiles x 170 + 85; platform.openai.com/docs/guides/vision)
IMAGE_TOKENS = 765


def estimate_tokens(body: dict[str, Any]) -> int:
    """Rough token count of a chat request for pacing: text characters / 4, ``IMAGE_TOKENS`` per
    image part, plus ``max_tokens`` (256 when unset)."""
    chars = images = 0
    for m in body.get("messages") or []:
        content = m.get("content")
        if isinstance(content, str):
            chars += len(content)
            continue
        for part in content or []:
            if part.get("type") == "image_url":
                images += 1
            else:
                chars += len(str(part.get("text") or ""))
    return chars // 4 + images * IMAGE_TOKENS + int(body.get("max_tokens") or 256)


def _add_instruction(messages: list[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    """Put ``text`` into the system message (appended), or prepend a system message."""
    if messages and messages[0].get("role") == "system" and isinstance(messages[0].get("content"), str):
        first = {**messages[0], "content": messages[0]["content"].rstrip() + "\n\n" + text}
        return [first, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def chat_body(model_name: str, messages: list[dict[str, Any]], sampling: dict[str, Any], fmt: OutputFormat,
              options: dict[str, Any]) -> dict[str, Any]:
    """JSON body of one ``/v1/chat/completions`` request, with no ``None`` anywhere.

    ``sampling``: merged ``Sampling`` dict (``seed`` omitted when None). Output format:
    JSON schema → ``response_format={"type": "json_schema", ...}`` only when
    ``options.json_schema_mode`` is true (DeepSeek lacks it); otherwise
    ``{"type": "json_object"}`` (unless ``options.json_object_mode`` is false) plus a system
    instruction carrying the schema. Regex → instruction only. ``options.extra_body`` (dict)
    is merged last (e.g. vLLM's ``structured_outputs``).
    """
    msgs = messages
    body: dict[str, Any] = {"model": model_name}
    for k in ("temperature", "top_p", "max_tokens", "frequency_penalty", "presence_penalty", "seed"):
        if sampling.get(k) is not None:
            body[k] = sampling[k]
    if fmt.kind == "json_schema" and options.get("json_schema_mode"):
        body["response_format"] = {"type": "json_schema",
                                   "json_schema": {"name": fmt.name, "schema": fmt.schema,
                                                   "strict": bool(options.get("strict_schema", False))}}
    elif fmt.is_json:
        if options.get("json_object_mode", True):
            body["response_format"] = {"type": "json_object"}
        msgs = _add_instruction(msgs, fmt.instruction())
    elif fmt.kind == "regex":
        msgs = _add_instruction(msgs, fmt.instruction())
    body["messages"] = msgs
    body.update(options.get("extra_body") or {})
    return strip_nones(body)


def reply_from_completion(resp: dict[str, Any]) -> LLMReply:
    """``LLMReply`` from a chat-completion response dict. Raises ``ValueError`` if it has no choice."""
    choices = resp.get("choices") or []
    if not choices:
        raise ValueError("response has no choices")
    msg = choices[0].get("message") or {}
    usage = resp.get("usage") or {}
    return LLMReply(text=msg.get("content") or "", finish_reason=choices[0].get("finish_reason"),
                    prompt_tokens=int(usage.get("prompt_tokens") or 0),
                    completion_tokens=int(usage.get("completion_tokens") or 0))


#: environment variables the Azure client reads by default (the openai package's own names)
AZURE_ENV = {"endpoint": "AZURE_OPENAI_ENDPOINT", "api_version": "OPENAI_API_VERSION",
             "api_key": "AZURE_OPENAI_API_KEY", "ad_token": "AZURE_OPENAI_AD_TOKEN"}


def _setting(opts: dict[str, Any], name: str, env_default: str) -> str | None:
    """``opts[name]`` if given, else the environment variable ``opts[name + "_env"]``
    (default ``env_default``)."""
    if opts.get(name):
        return str(opts[name])
    return os.environ.get(opts.get(f"{name}_env", env_default)) or None


def azure_client(opts: dict[str, Any], timeout_s: float):
    """``(openai.AzureOpenAI client, secret)`` from a model spec's ``options``.

    ``azure_endpoint`` (``https://<resource>.openai.azure.com``) and ``api_version`` (e.g.
    ``2024-10-21``; the original used ``2023-06-01-preview``) come from the options or from
    the variables named by ``azure_endpoint_env`` / ``api_version_env`` (default
    ``AZURE_OPENAI_ENDPOINT`` / ``OPENAI_API_VERSION``). ``azure_deployment`` (optional)
    fixes the deployment; otherwise the spec's model name is the deployment, as in the
    original (deployment names such as ``gpt-4o``). Credentials from the environment: the
    key in ``api_key_env`` (default ``AZURE_OPENAI_API_KEY``; sent as ``api-key``), else an
    Azure AD token in ``azure_ad_token_env`` (default ``AZURE_OPENAI_AD_TOKEN``; sent as
    ``Authorization: Bearer``, e.g. ``az account get-access-token --resource
    https://cognitiveservices.azure.com``; a token expires, about an hour). The secret is
    returned for scrubbing error messages. Raises ``ValueError`` naming the missing setting
    or variables.
    """
    import openai

    endpoint = _setting(opts, "azure_endpoint", AZURE_ENV["endpoint"])
    version = _setting(opts, "api_version", AZURE_ENV["api_version"])
    if not endpoint:
        raise ValueError(f"Azure OpenAI needs options.azure_endpoint or the variable "
                         f"{opts.get('azure_endpoint_env', AZURE_ENV['endpoint'])!r}")
    if not version:
        raise ValueError(f"Azure OpenAI needs options.api_version or the variable "
                         f"{opts.get('api_version_env', AZURE_ENV['api_version'])!r}")
    key_env = opts.get("api_key_env", AZURE_ENV["api_key"])
    token_env = opts.get("azure_ad_token_env", AZURE_ENV["ad_token"])
    key = os.environ.get(key_env) if key_env else None
    token = None if key else (os.environ.get(token_env) if token_env else None)
    if not key and not token:
        raise ValueError(f"Azure OpenAI needs an API key in {key_env!r} or an Azure AD token in {token_env!r}")
    client = openai.AzureOpenAI(azure_endpoint=endpoint, api_version=version,
                                azure_deployment=opts.get("azure_deployment") or None,
                                api_key=key or None, azure_ad_token=token or None,
                                timeout=timeout_s, max_retries=0)
    return client, key or token


def api_client(opts: dict[str, Any], timeout_s: float, max_retries: int = 0):
    """``(client, secret)`` for a model spec's ``options``: ``openai.OpenAI`` (``base_url``, the
    key in the variable ``api_key_env``, default ``OPENAI_API_KEY``; ``null`` for servers without
    auth, secret None), or with ``api_type: azure`` ``azure_client``'s (which never retries).
    Each call times out after ``timeout_s`` seconds; ``max_retries``: the client's own retries.
    The secret is returned for scrubbing error messages. Raises ``ValueError`` when the key
    variable is not set or ``api_type`` is unknown."""
    import openai

    api_type = opts.get("api_type", "openai")
    if api_type == "azure":
        return azure_client(opts, timeout_s)
    if api_type != "openai":
        raise ValueError(f"options.api_type must be 'openai' or 'azure', got {api_type!r}")
    env = opts.get("api_key_env", "OPENAI_API_KEY")
    key = "EMPTY" if env is None else os.environ.get(env)
    if not key:
        raise ValueError(f"API key environment variable {env!r} is not set")
    return (openai.OpenAI(api_key=key, base_url=opts.get("base_url"), timeout=timeout_s, max_retries=max_retries),
            key if env is not None else None)


class OpenAIEngine:
    """Chat completions over an OpenAI-compatible HTTP API.

    ``spec.model`` is the API model name (Azure: the deployment name). ``options``:
    ``api_type`` (``openai``, default, or ``azure``: ``AzureOpenAI`` with the options of
    ``azure_client``), ``base_url`` (default: the client's, i.e. OpenAI), ``api_key_env``
    (default ``OPENAI_API_KEY``; ``null`` for servers without auth), ``qps`` (float),
    ``max_retries`` (default 3), ``timeout_s`` (default 60), ``backoff_s`` (default 1.0),
    ``max_backoff_s`` (default 30), ``max_concurrency`` (threads per actor, default 8),
    ``pace_from_headers`` (default True: ``HeaderPacer``), ``max_pacing_wait_s`` (default 60),
    ``json_schema_mode`` (default False),
    ``json_object_mode`` (default True), ``strict_schema``, ``extra_body``; for vision
    models ``image_max_side`` / ``image_format`` / ``jpeg_quality`` (``ImageInliner``): image
    parts given as paths or ``s3://`` URIs are sent as bounded base64 data URLs, each image
    encoded once per actor.

    Raises ``ValueError`` when the API key variable is not set (Azure: see ``azure_client``)
    or ``api_type`` is unknown.
    """

    can_repair = True

    def __init__(self, resolved: ResolvedModel, params: LLMParams):
        opts = dict(resolved.spec.options)
        self.options = opts
        self.model_name = resolved.spec.model
        self.timeout_s = float(opts.get("timeout_s", 60.0))
        self.max_retries = int(opts.get("max_retries", 3))
        self.backoff_s = float(opts.get("backoff_s", 1.0))
        self.max_backoff_s = float(opts.get("max_backoff_s", 30.0))
        self.client, self._secret = api_client(opts, self.timeout_s)
        self.limiter = RateLimiter(opts.get("qps"))
        self.pacer = (HeaderPacer(float(opts.get("max_pacing_wait_s", 60.0)))
                      if opts.get("pace_from_headers", True) else None)
        self.inline_images = ImageInliner.from_options(opts)
        self.pool = ThreadPoolExecutor(max_workers=int(opts.get("max_concurrency", 8)),
                                       thread_name_prefix="llm-openai")

    def describe_error(self, exc: BaseException) -> str:
        """``"ExceptionType: message"`` with the API key (if any) replaced by ``***``."""
        text = describe_error(exc)
        attempts = getattr(exc, "mmsynth_attempts", None)
        if attempts and attempts > 1:
            text += f" (after {attempts} attempts)"
        if self._secret:
            text = text.replace(self._secret, "***")
        return text

    def generate(self, requests: list[LLMRequest]) -> list[LLMReply | BaseException]:
        """One reply per request; requests run concurrently on the actor's thread pool."""
        return list(self.pool.map(self._call, requests))

    def _retryable(self, exc: BaseException) -> bool:
        import openai

        if isinstance(exc, openai.APIConnectionError):  # includes APITimeoutError
            return True
        if isinstance(exc, openai.APIStatusError):
            return exc.status_code in _RETRY_STATUS or exc.status_code >= 500
        return False

    def _delay(self, attempt: int, exc: BaseException) -> float:
        delay = min(self.backoff_s * (2 ** attempt), self.max_backoff_s)
        response = getattr(exc, "response", None)
        header = response.headers.get("retry-after") if response is not None else None
        try:
            if header is not None:
                delay = min(max(float(header), 0.0), self.max_backoff_s)
        except ValueError:
            pass
        return delay * random.uniform(0.9, 1.1)

    def _call(self, req: LLMRequest) -> LLMReply | BaseException:
        try:
            messages = self.inline_images(req.messages, req.row_id)
        except Exception as e:  # an unreadable image is this row's input error
            return e
        body = chat_body(self.model_name, messages, req.sampling, req.fmt, self.options)
        kwargs = {k: v for k, v in body.items() if k in _CLIENT_KWARGS}
        extra = {k: v for k, v in body.items() if k not in _CLIENT_KWARGS}
        if extra:
            kwargs["extra_body"] = extra
        tokens = estimate_tokens(body)
        for attempt in range(self.max_retries + 1):
            self.limiter.acquire()
            if self.pacer is not None:
                self.pacer.acquire(tokens)
            try:
                raw = self.client.chat.completions.with_raw_response.create(**kwargs)
                if self.pacer is not None:
                    self.pacer.update(raw.headers)
                return reply_from_completion(raw.parse().model_dump())
            except Exception as e:
                response = getattr(e, "response", None)
                if self.pacer is not None and response is not None:
                    self.pacer.update(response.headers)
                if attempt >= self.max_retries or not self._retryable(e):
                    try:
                        e.mmsynth_attempts = attempt + 1
                    except AttributeError:  # pragma: no cover - exceptions without __dict__
                        pass
                    return e
                time.sleep(self._delay(attempt, e))
        raise AssertionError("unreachable")  # pragma: no cover

    def __del__(self):
        pool = getattr(self, "pool", None)
        if pool is not None:
            pool.shutdown(wait=False)
