"""The FastAPI ingress of the MIRROR-LLaVA Serve application (routes, validation, prompts) and the
verification verdicts it reports (``verification_report``, pure). Endpoints and thresholds:
``jobs.mirror_llava.serve``."""
from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import uuid
from typing import Any

from fastapi import Depends, FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from ray import serve

from jobs.mirror_llava.serve_config import ROLES, first_error
from jobs.mirror_llava.serve_middleware import BodyLimitMiddleware
from jobs.mirror_llava.serve_schemas import (AttributeCheck, ChatResponse, ClientRequest, CLIPCheck, CounselorRequest,
                                             DescribeRequest, DescribeResponse, GenerateRequest, GenerateResponse,
                                             HealthResponse, IdentityCheck, NSFWCheck, SamplingOverride,
                                             VerifyChecks, VerifyRequest, VerifyResponse, decode_image)
from udfs import faces as F
from udfs import mirror_images as MI

#: upload content types the form ``/verify`` accepts (the original: png, jpg, jpeg, gif by extension)
IMAGE_TYPES = ("image/png", "image/jpeg", "image/jpg", "image/gif", "image/webp")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".gif", ".webp")
#: the original description service's two labelled lines (SPEC A4)
DESCRIPTION_LINES = ("Facial Expression Description: {aligned}\n"
                     "Contrasting Facial Expression Description: {contrasting}")


def verification_report(raw: dict, params: MI.ImageFilterParams, clip_text: str, models: dict[str, dict],
                        audit_forced: bool | None, image_placeholder: bool = False) -> VerifyResponse:
    """The verify response from the verifier's raw scores (pure; unit-testable).

    ``raw``: ``VerifierServer.verify``'s reply. ``models``: role -> ``ResolvedModel.describe()``
    for ``faces``, ``clip``, ``nsfw``. ``audit_forced``: the recipe's ``verify.audit`` (None:
    audit when an evidence model is a placeholder or ``image_placeholder``). Verdicts come from
    ``udfs.mirror_images.image_checks`` (thresholds: see the module docstring), grouped by filter name."""
    pp = params.preservation
    row = dict(raw["faces"])
    row.update({pp.source_prefix + k: v for k, v in raw["source_faces"].items()})
    row.update(clip_scores=raw["clip_scores"], nsfw=raw["nsfw"], nsfw_score=raw["nsfw_score"])
    checks, sim = MI.image_checks(row, params)
    failures = [m for _, m in checks]
    backend = str(raw["faces"].get("face_backend") or models["faces"]["backend"])
    id_on = pp.identity_use is not None or pp.min_identity is not None
    threshold = pp.min_identity if pp.min_identity is not None else (
        F.identity_threshold(backend, pp.identity_use) if pp.identity_use else None)
    id_fails = [m for f, m in checks if f in ("face", "identity")]  # by filter name, never by message text
    attr_on = pp.check_gender or pp.max_age_gap is not None
    attr_fails = [m for f, m in checks if f in ("gender", "age")]
    scores = raw["clip_scores"] or []
    clip = float(scores[0]) if scores else None
    placeholders = [f"{r} ({models[r]['model']})" for r in ("faces", "clip", "nsfw") if models[r]["placeholder"]]
    if image_placeholder:
        placeholders.append("image (placeholder generator)")
    audit = bool(placeholders) if audit_forced is None else bool(audit_forced)
    reason = None
    if audit:
        reason = (f"evidence from placeholder models: {', '.join(placeholders)}" if audit_forced is None
                  else "audit mode set in the recipe (verify.audit: true)")
    nsfw_flag = raw["nsfw"]
    checks = VerifyChecks(
        nsfw=NSFWCheck(enabled=params.check_nsfw, passed=(not nsfw_flag) if params.check_nsfw else None,
                       score=raw["nsfw_score"], flagged=nsfw_flag, scores=raw["nsfw_scores"] or {},
                       model=models["nsfw"]["model"], placeholder=models["nsfw"]["placeholder"]),
        clip=CLIPCheck(passed=clip is not None and clip >= params.min_clip, score=clip, threshold=params.min_clip,
                       text=clip_text, model=models["clip"]["model"], placeholder=models["clip"]["placeholder"]),
        identity=IdentityCheck(enabled=id_on, passed=(not id_fails) if id_on else None, similarity=sim,
                               threshold=threshold, backend=backend, use=pp.identity_use,
                               face_count=raw["faces"].get("face_count"),
                               source_face_count=raw["source_faces"].get("face_count"), reasons=id_fails,
                               model=models["faces"]["model"], placeholder=models["faces"]["placeholder"]),
        attributes=AttributeCheck(enabled=attr_on, passed=(not attr_fails) if attr_on else None, reasons=attr_fails,
                                  gender=raw["faces"].get("gender"), source_gender=raw["source_faces"].get("gender"),
                                  age=raw["faces"].get("age"), source_age=raw["source_faces"].get("age")))
    passed = not failures
    return VerifyResponse(passed=passed, accepted=passed or audit, audit=audit, audit_reason=reason,
                          failures=failures, checks=checks, placeholder_models=placeholders)


def _error_status(error: str) -> int:
    """Row error text -> HTTP status: invalid input (``InputError``/``MessagesError``) 422, else 502."""
    return 422 if error.split(":", 1)[0] in ("InputError", "MessagesError", "ValueError") else 502


def _strip_image_token(content: Any) -> Any:
    if isinstance(content, str):
        return content.replace("<image>\n", "").replace("<image>", "")
    return content


def ingress_class(max_body_bytes: int):
    """The FastAPI ingress deployment class, built per app: Serve freezes a copy of the FastAPI
    app at decoration time, so the body limit (a middleware argument) is fixed here."""
    app = FastAPI(title="MIRROR-LLaVA counselling services", version="1",
                  description="describe / generate / verify / client / counselor (issue 10 part 3)")
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        """422 with ``loc``/``msg``/``type`` per error: FastAPI's default echoes every input,
        which for an image field is the whole base64 payload."""
        return JSONResponse(status_code=422, content={"detail": [
            {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", ""))[:500], "type": e.get("type")}
            for e in exc.errors()]})

    def content_type(*allowed: str):
        async def check(request: Request) -> None:
            ct = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if ct not in allowed:
                raise HTTPException(415, f"unsupported content type {ct or '(none)'!r}; send {' or '.join(allowed)}")
        return Depends(check)

    as_json = content_type("application/json")
    as_form = content_type("multipart/form-data", "application/x-www-form-urlencoded")
    as_multipart = content_type("multipart/form-data")

    async def read_upload(upload: UploadFile, field: str) -> bytes:
        ct = (upload.content_type or "").split(";")[0].strip().lower()
        ext = os.path.splitext(upload.filename or "")[1].lower()
        if ct not in IMAGE_TYPES and not (ct in ("", "application/octet-stream") and ext in IMAGE_EXTENSIONS):
            raise HTTPException(415, f"{field}: unsupported image type {ct or '(none)'!r} "
                                f"(allowed: png, jpg, jpeg, gif, webp)")
        try:
            return decode_image(await upload.read())
        except ValueError as exc:
            raise HTTPException(422, f"{field}: {exc}") from None

    @serve.deployment
    @serve.ingress(app)
    class MirrorLlavaAPI:
        """HTTP routes and handle methods (see the module docstring)."""

        def __init__(self, engines: dict, generator, verifier, settings: dict):
            from actors.llm_base import LLMParams

            # engines: the shared LLM engines of the roles with a local model (their handles
            # keep them in this app; the roles' stages reach them by name, actors.llm_engine)
            self.engines, self.generator, self.verifier = engines, generator, verifier
            self.settings = settings
            self.params = {r: LLMParams.model_validate(settings["llm_params"][r]) for r in ROLES}
            self.formats = {}
            for r in ROLES:
                fmt = self.params[r].output_format()
                self.formats[r] = json.dumps(fmt.schema) if fmt.kind == "json_schema" else None
            if self.formats["describe"] is None:  # describe always answers in the ExpressionReply schema
                self.formats["describe"] = json.dumps(MI.ExpressionReply.model_json_schema())
            self.verify_params = MI.ImageFilterParams.model_validate(settings["verify_params"])
            self.models = settings["models"]
            self.timeout_s = float(settings["request_timeout_s"])
            self._stages: dict = {}

        # ------------------------------------------------------------ helpers

        def _info(self, role: str) -> dict:
            return {"model": self.models[role]["model"], "placeholder": bool(self.models[role]["placeholder"])}

        async def _wait(self, what: str, awaitable):
            """``awaitable``'s result, or 504 after ``request_timeout_s`` (recipe)."""
            try:
                return await asyncio.wait_for(awaitable, self.timeout_s)
            except asyncio.TimeoutError:
                raise HTTPException(504, f"{what}: no answer within {self.timeout_s:g} s") from None

        def _stage(self, role: str):
            """The role's ``LLMStage`` (made once): prompts, validation and re-asks here, the
            model in its shared engine (local models) or an API client (remote ones)."""
            if role not in self._stages:
                from actors.llm import LLMStage

                llm = self.settings["llm"][role]
                self._stages[role] = LLMStage(llm["model"], llm["params"], engine=llm["engine"])
            return self._stages[role]

        async def _chat(self, role: str, messages: list[dict], sampling: SamplingOverride | None) -> dict:
            from actors.batching import object_column
            from udfs import rows as R
            from udfs.llm_output import normalize_messages, with_system_prompt

            params = self.params[role]
            try:
                samp = params.sampling(sampling.model_dump(exclude_none=True) if sampling else None)
            except (ValidationError, ValueError) as exc:
                raise HTTPException(422, f"sampling: {exc}") from None
            try:
                msgs = with_system_prompt(normalize_messages(messages), params.system_prompt)
            except ValueError as exc:
                raise HTTPException(422, f"messages: {exc}") from None
            batch = {"id": object_column([uuid.uuid4().hex[:16]]), "messages": object_column([json.dumps(msgs)]),
                     "sampling": object_column([json.dumps(samp)]),
                     "response_format": object_column([self.formats[role]])}
            got = await self._wait(role, asyncio.to_thread(self._stage(role), batch))
            out = {"text": got["generated_text"][0], "parsed": got["parsed"][0],
                   "finish_reason": got["finish_reason"][0], "prompt_tokens": int(got["prompt_tokens"][0]),
                   "completion_tokens": int(got["completion_tokens"][0]), "attempts": int(got["llm_attempts"][0])}
            error, reject = got[R.ROW_ERROR][0], got[R.ROW_REJECT][0]
            if error is not None:
                raise HTTPException(_error_status(error), f"{role}: {error}")
            if reject is not None:
                raise HTTPException(502, f"{role}: {reject}")
            return out

        # ------------------------------------------------------------ handle API

        async def describe(self, req: DescribeRequest | dict) -> DescribeResponse:
            """Aligned + contrasting expression of the client's newest line (SPEC A4, B5)."""
            req = DescribeRequest.model_validate(req)
            msgs = MI.expression_messages([t.model_dump() for t in req.history], req.utterance.model_dump())
            out = await self._chat("describe", msgs, req.sampling)
            try:
                reply = MI.ExpressionReply.model_validate_json(out["parsed"] or "")
            except ValidationError as exc:
                raise HTTPException(502, f"describe: reply does not fit ExpressionReply: {first_error(exc)}") from None
            prompt = negative = None
            if req.gender:
                prompt, negative = MI.image_prompt(req.gender, reply.aligned, reply.contrasting,
                                                   self.settings["image_trigger"])
            return DescribeResponse(aligned=reply.aligned, contrasting=reply.contrasting,
                                    response=DESCRIPTION_LINES.format(aligned=reply.aligned,
                                                                      contrasting=reply.contrasting),
                                    prompt=prompt, negative_prompt=negative,
                                    clip_text=MI.clip_text(req.utterance.stage_direction),
                                    prompt_tokens=out["prompt_tokens"], completion_tokens=out["completion_tokens"],
                                    attempts=out["attempts"], **self._info("describe"))

        async def generate(self, req: GenerateRequest | dict) -> GenerateResponse:
            """One identity-preserving image of the source face (SPEC A7, B3 step 2)."""
            req = GenerateRequest.model_validate(req)
            rid = hashlib.sha1(b"\0".join([req.prompt.encode(), req.negative_prompt.encode(),
                                           req.source_image])).hexdigest()[:16]
            out = await self._wait("generate", self.generator.generate.remote(
                {"id": rid, "prompt": req.prompt, "negative_prompt": req.negative_prompt,
                 "face_image": req.source_image, "seed": req.seed}))
            if out["error"] is not None:
                raise HTTPException(_error_status(out["error"]), f"generate: {out['error']}")
            return GenerateResponse(image_png_b64=base64.b64encode(out["png"]).decode("ascii"), seed=out["seed"],
                                    width=out["width"], height=out["height"], identity_method=out["identity_method"],
                                    steps=out["steps"], **self._info("generate"))

        async def verify(self, req: VerifyRequest | dict) -> VerifyResponse:
            """NSFW, CLIP and identity checks with every score (SPEC B5)."""
            req = VerifyRequest.model_validate(req)
            text = MI.clip_text(req.stage_direction)
            raw = await self._wait("verify", self.verifier.verify.remote(
                {"id": uuid.uuid4().hex[:16], "image": req.image, "source_image": req.source_image,
                 "clip_text": text}))
            if raw["error"] is not None:
                raise HTTPException(_error_status(raw["error"]), f"verify: {raw['error']}")
            return verification_report(raw, self.verify_params, text, self.models, self.settings["audit"],
                                       req.image_placeholder)

        async def client(self, req: ClientRequest | dict) -> ChatResponse:
            """The simulated client's next line (SPEC B3 step 1)."""
            req = ClientRequest.model_validate(req)
            out = await self._chat("client", [m.model_dump() for m in req.messages], req.sampling)
            return ChatResponse(reply=out["text"] or "", finish_reason=out["finish_reason"],
                                prompt_tokens=out["prompt_tokens"], completion_tokens=out["completion_tokens"],
                                **self._info("client"))

        async def counselor(self, req: CounselorRequest | dict) -> ChatResponse:
            """The counselor VLM's reply to the conversation and the client's face (SPEC B3 step 4)."""
            req = CounselorRequest.model_validate(req)
            msgs = [m.model_dump() for m in req.messages]
            if req.image is not None:
                from udfs.images import image_data_url

                users = [i for i, m in enumerate(msgs) if m["role"] == "user"]
                if not users:
                    raise HTTPException(422, "counselor: an image needs a user message to attach to")
                m = msgs[users[-1]]
                parts = m["content"] if isinstance(m["content"], list) else [{"type": "text", "text": m["content"]}]
                parts = [{**p, "text": _strip_image_token(p["text"])} if p.get("type") == "text" else p for p in parts]
                url = image_data_url(req.image, "request", "image", max_side=1024, image_format="png")
                m["content"] = [{"type": "image_url", "image_url": {"url": url}}, *parts]
            out = await self._chat("counselor", msgs, req.sampling)
            return ChatResponse(reply=out["text"] or "", finish_reason=out["finish_reason"],
                                prompt_tokens=out["prompt_tokens"], completion_tokens=out["completion_tokens"],
                                **self._info("counselor"))

        async def health(self) -> HealthResponse:
            """Ping every backend deployment (5 s each): the shared engines (``info``), the
            generator and the verifier (``ping``)."""
            backends = {**{name: (h, "info") for name, h in self.engines.items()},
                        "generator": (self.generator, "ping"), "verifier": (self.verifier, "ping")}

            async def ping(h, method: str):
                try:
                    got = await asyncio.wait_for(getattr(h, method).remote(), 5.0)
                    return "ok" if method == "info" or got == "ok" else str(got)[:300]
                except Exception as exc:  # noqa: BLE001 - reported, not raised
                    return f"{type(exc).__name__}: {exc}"[:300]
            results = await asyncio.gather(*(ping(h, m) for h, m in backends.values()))
            deployments = dict(zip(backends, results))
            return HealthResponse(status="ok" if all(r == "ok" for r in results) else "degraded",
                                  app=self.settings["app_name"], deployments=deployments,
                                  engines=self.settings["engines"], models=self.models,
                                  placeholder_roles=[r for r, m in self.models.items() if m["placeholder"]],
                                  max_body_bytes=self.settings["max_body_bytes"])

        # ------------------------------------------------------------ HTTP routes

        @app.get("/healthz", response_model=HealthResponse)
        async def http_health(self):
            h = await self.health()
            return JSONResponse(h.model_dump(), status_code=200 if h.status == "ok" else 503)

        @app.post("/v1/describe", response_model=DescribeResponse, dependencies=[as_json])
        async def http_describe(self, req: DescribeRequest) -> DescribeResponse:
            return await self.describe(req)

        @app.post("/v1/generate", response_model=GenerateResponse, dependencies=[as_json])
        async def http_generate(self, req: GenerateRequest) -> GenerateResponse:
            return await self.generate(req)

        @app.post("/v1/verify", response_model=VerifyResponse, dependencies=[as_json])
        async def http_verify(self, req: VerifyRequest) -> VerifyResponse:
            return await self.verify(req)

        @app.post("/v1/client", response_model=ChatResponse, dependencies=[as_json])
        async def http_client(self, req: ClientRequest) -> ChatResponse:
            return await self.client(req)

        @app.post("/v1/counselor", response_model=ChatResponse, dependencies=[as_json])
        async def http_counselor(self, req: CounselorRequest) -> ChatResponse:
            return await self.counselor(req)

        @app.post("/describe", dependencies=[as_form])
        async def form_describe(self, client_utt: str = Form(..., max_length=4000),
                                history: str = Form("", max_length=200_000)):
            """The original description API: form fields ``history`` (text lines) and
            ``client_utt`` -> ``{"response": "<two labelled lines>"}`` (+ our fields)."""
            try:
                req = DescribeRequest(history=history, utterance=client_utt)
            except ValidationError as exc:
                raise HTTPException(422, first_error(exc)) from None
            return (await self.describe(req)).model_dump()

        @app.post("/verify", dependencies=[as_multipart])
        async def form_verify(self, image: UploadFile = File(...), base_image: UploadFile = File(...),
                              statement: str = Form(..., max_length=4000)):
            """The original verification API: multipart ``image``, ``base_image`` + form
            ``statement`` (the client line; its first ``[...]`` is the stage direction, else the
            whole statement: the original raised on a line without brackets, SPEC B6.7)."""
            m = re.search(r"\[(.*?)\]", statement)
            direction = (m.group(1) if m and m.group(1).strip() else statement).strip()
            try:
                req = VerifyRequest(image=await read_upload(image, "image"),
                                    source_image=await read_upload(base_image, "base_image"),
                                    stage_direction=direction[:200])
            except ValidationError as exc:
                raise HTTPException(422, first_error(exc)) from None
            rep = (await self.verify(req)).model_dump()
            if rep["accepted"]:
                return JSONResponse({"message": "Image verification passed." if rep["passed"] else
                                     "Image verification recorded (audit mode).", **rep})
            return JSONResponse({"error": "Image verification failed.", **rep}, status_code=400)

    return MirrorLlavaAPI
