# Copyright 2026 The hf_blockdiff authors. Apache-2.0.
"""``hf_blockdiff serve``: an OpenAI-compatible HTTP server on the decode engine, with continuous batching.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both stream over SSE with ``stream: true``),
``GET /v1/models``, ``GET /health``. Besides OpenAI's fields a request may set ``top_k``, ``block_size``,
``threshold`` and ``verify``; ``usage`` reports ``tokens_per_forward`` next to the token counts. Errors are OpenAI-style JSON
(``{"error": {"message", "type", "param", "code"}}``) with a 4xx status.

Needs the ``serve`` extra (``pip install 'hf_blockdiff[serve]'``: fastapi, uvicorn). The decoding itself lives in
:mod:`.scheduler`; this module only speaks HTTP.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from typing import Literal

from transformers.utils import logging

from .scheduler import Request, RequestSettings, Scheduler

logger = logging.get_logger(__name__)

try:
    from fastapi import FastAPI
    from fastapi import Request as HTTPRequest
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError("`hf_blockdiff serve` needs FastAPI and uvicorn: pip install 'hf_blockdiff[serve]'") from error

# How often a non-streaming request checks whether its client is still connected.
DISCONNECT_POLL_S = 0.5


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(message: str, kind: str = "invalid_request_error", param=None, code=None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# ----------------------------------------------------------------------------------------------------------
# Request bodies (unknown fields are ignored, as OpenAI's API does for forward compatibility)


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)  # not OpenAI's, but common (vLLM): 0 = off
    n: int = Field(default=1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # block diffusion
    block_size: int | None = Field(default=None, ge=1)
    threshold: float | None = Field(default=None, ge=0, le=1)
    verify: bool = False
    candidates: int | None = Field(default=None, ge=0)  # verify: next blocks drafted per verifying forward


class CompletionBody(_Common):
    prompt: str | list[int] | list[str]
    echo: bool = False
    logprobs: int | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict] | None = None


class ChatBody(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None


# ----------------------------------------------------------------------------------------------------------
# The app


def create_app(scheduler: Scheduler, model_name: str, default_max_tokens: int = 256, api_key: str | None = None):
    """The FastAPI app serving ``scheduler`` under the name ``model_name``. Start the scheduler first. With
    ``api_key``, every ``/v1`` request must send ``Authorization: Bearer <api_key>`` (``/health`` stays open)."""
    app = FastAPI(title="hf_blockdiff", description="OpenAI-compatible block-diffusion server")
    tokenizer = scheduler.tokenizer

    @app.middleware("http")
    async def _check_key(request: HTTPRequest, call_next):
        if (
            api_key
            and request.url.path.startswith("/v1")
            and not hmac.compare_digest(request.headers.get("authorization", ""), f"Bearer {api_key}")
        ):
            body = error_body(
                "Incorrect or missing API key: send `Authorization: Bearer <key>`.", code="invalid_api_key"
            )
            return JSONResponse(body, status_code=401)
        return await call_next(request)

    @app.exception_handler(APIError)
    async def _api_error(_, error: APIError):
        return JSONResponse(error_body(error.message, param=error.param, code=error.code), status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_, error: RequestValidationError):
        first = error.errors()[0] if error.errors() else {}
        where = [str(p) for p in first.get("loc", ()) if p != "body"]
        message = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            message, where = "The request body is not valid JSON.", []
        elif where:
            message = f"{'.'.join(where)}: {message}"
        return JSONResponse(error_body(message, param=".".join(where) or None), status_code=400)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "local"}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, http: HTTPRequest):
        if body.echo or body.logprobs:
            raise APIError(400, "echo and logprobs are not supported.", param="echo" if body.echo else "logprobs")
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise APIError(400, "Only one prompt per request is supported; send one request per prompt.",
                               param="prompt")  # fmt: skip
            prompt = prompt[0]
        ids = tokenizer(prompt, add_special_tokens=True).input_ids if isinstance(prompt, str) else list(prompt)
        return await _answer(body, ids, http, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, http: HTTPRequest):
        if body.logprobs:
            raise APIError(400, "logprobs are not supported.", param="logprobs")
        if getattr(tokenizer, "chat_template", None) is None:
            raise APIError(400, f"{model_name} has no chat template; use /v1/completions.", param="messages")
        messages = [{"role": m.role, "content": _text(m.content)} for m in body.messages]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
        body.max_tokens = body.max_completion_tokens or body.max_tokens
        return await _answer(body, list(ids["input_ids"]), http, chat=True)

    async def _answer(body: _Common, ids: list[int], http: HTTPRequest, chat: bool):
        if body.model is not None and body.model != model_name:
            raise APIError(404, f"The model {body.model!r} does not exist; this server serves {model_name!r}.",
                           param="model", code="model_not_found")  # fmt: skip
        if body.n != 1:
            raise APIError(400, "n > 1 is not supported; send n requests.", param="n")
        vocab = len(tokenizer)
        if any(not 0 <= t < vocab for t in ids):
            raise APIError(400, f"Prompt token ids must lie in [0, {vocab}).", param="prompt")
        room = scheduler.max_length - len(ids)
        max_tokens = body.max_tokens or min(default_max_tokens, room)
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        settings = RequestSettings(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                                   block_size=body.block_size, threshold=body.threshold, verify=body.verify,
                                   candidates=body.candidates, seed=body.seed, stop=[s for s in stop if s])  # fmt: skip
        try:
            scheduler.check(ids, settings)
        except ValueError as error:
            code = "context_length_exceeded" if "context" in str(error) else None
            raise APIError(400, str(error), code=code) from error

        loop, updates = asyncio.get_running_loop(), asyncio.Queue()
        request = Request(ids, settings, on_update=lambda d, f: loop.call_soon_threadsafe(updates.put_nowait, (d, f)))
        scheduler.submit(request)
        reply = _Reply(request, model_name, chat)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_stream(request, updates, reply, include_usage), media_type="text/event-stream")
        text, reason = [], None
        while reason is None:
            try:
                delta, reason = await asyncio.wait_for(updates.get(), DISCONNECT_POLL_S)
                text.append(delta)
            except asyncio.TimeoutError:
                if await http.is_disconnected():
                    scheduler.cancel(request)
                    return JSONResponse(error_body("client disconnected"), status_code=499)
        if reason == "error":
            raise APIError(500, f"Decoding failed: {request.error}")
        return reply.whole("".join(text), reason)

    async def _stream(request, updates, reply, include_usage):
        try:
            if reply.chat:
                yield _sse(reply.chunk({"role": "assistant", "content": ""}, None))
            while True:
                delta, reason = await updates.get()
                if reason == "error":
                    yield _sse(error_body(f"Decoding failed: {request.error}", kind="server_error"))
                    break
                if delta or reason:
                    yield _sse(reply.chunk({"content": delta} if reply.chat else delta, reason))
                if reason is not None:
                    if include_usage:
                        yield _sse({**reply.chunk(None, None), "choices": [], "usage": reply.usage()})
                    break
            yield "data: [DONE]\n\n"
        finally:  # the client went away mid-stream (or we are done): its slot frees at the next step
            if request.finish_reason is None:
                scheduler.cancel(request)

    return app


def _text(content) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = [part.get("text", "") for part in content if part.get("type") == "text"]
    if len(parts) != len(content):
        raise APIError(400, "Only text content parts are supported.", param="messages")
    return "".join(parts)


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


class _Reply:
    """Builds the OpenAI response objects of one request."""

    def __init__(self, request: Request, model_name: str, chat: bool):
        self.request, self.model, self.chat = request, model_name, chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def usage(self) -> dict:
        prompt, completion = len(self.request.prompt), len(self.request.tokens)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "forward_passes": self.request.forwards,
                "tokens_per_forward": round(completion / max(1, self.request.forwards), 4)}  # fmt: skip

    def _head(self, suffix: str = "") -> dict:
        kind = "chat.completion" if self.chat else "text_completion"
        return {"id": self.id, "object": kind + suffix, "created": self.created, "model": self.model}

    def whole(self, text: str, reason: str) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason,
                      "logprobs": None}  # fmt: skip
        else:
            choice = {"index": 0, "text": text, "finish_reason": reason, "logprobs": None}
        return {**self._head(), "choices": [choice], "usage": self.usage()}

    def chunk(self, delta, reason) -> dict:
        if self.chat:
            choice = {"index": 0, "delta": delta or {}, "finish_reason": reason, "logprobs": None}
            return {**self._head(".chunk"), "choices": [choice]}
        return {**self._head(), "choices": [{"index": 0, "text": delta or "", "finish_reason": reason,
                                             "logprobs": None}]}  # fmt: skip


def serve(scheduler: Scheduler, model_name: str, host: str = "127.0.0.1", port: int = 8000, **kwargs):
    """Run the server until interrupted (blocking)."""
    import uvicorn

    app = create_app(scheduler, model_name, **kwargs)
    try:
        uvicorn.run(app, host=host, port=port, log_level="info")
    finally:
        scheduler.stop()
