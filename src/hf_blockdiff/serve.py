# Copyright 2026 The hf_blockdiff authors. Apache-2.0.
"""``hf_blockdiff serve``: an OpenAI-compatible HTTP server on the decode engine, with continuous batching.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both stream over SSE with ``stream: true``),
``GET /v1/models``, ``GET /health``. Besides OpenAI's fields a request may set ``top_k`` and the decoding settings
of :class:`~settings.DecodeSettings` (``block_size``, ``threshold``, ``steps_per_block``, ``repeat_guard``,
``verify``, ``candidates``; the engine-wide ones are the server's, and a request that sets one gets a 400); ``usage``
reports ``tokens_per_forward`` next to the token counts. Errors are OpenAI-style JSON
(``{"error": {"message", "type", "param", "code"}}``): a 4xx status for a request this server cannot take (fields it
cannot honour, bodies past ``max_body_bytes``, malformed JSON or text), a 5xx one for its own failures. Completions take token-id prompts, batches
of prompts, ``n``, ``echo`` and ``logprobs`` as OpenAI's legacy API (what lm-eval's ``local-completions`` sends);
logprobs come from the causal forward (:mod:`.scoring`).

Needs the ``serve`` extra (``pip install 'hf_blockdiff[serve]'``: fastapi, uvicorn). The decoding itself lives in
:mod:`.scheduler`; this module only speaks HTTP.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from functools import partial
from typing import Literal, NamedTuple

from transformers.utils import logging

from . import scoring
from .scheduler import Request, RequestSettings, Scheduler
from .settings import SETTINGS

logger = logging.get_logger(__name__)

try:
    from fastapi import FastAPI
    from fastapi import Request as HTTPRequest
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field, field_validator
    from starlette.datastructures import Headers
    from starlette.exceptions import HTTPException
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError("`hf_blockdiff serve` needs FastAPI and uvicorn: pip install 'hf_blockdiff[serve]'") from error

# How often a non-streaming request checks whether its client is still connected.
DISCONNECT_POLL_S = 0.5
# The most top logprobs a completions request may ask for (vLLM's default limit; OpenAI's is 5).
MAX_LOGPROBS = 20
# OpenAI fields this server cannot honour, with the values that ask for nothing (some clients always send e.g.
# penalties of 0): any other value gets a 400 naming the field rather than output that silently ignores it.
UNSUPPORTED = {
    "tools": (None, []), "tool_choice": (None, "none", "auto"), "functions": (None, []),
    "function_call": (None, "none", "auto"), "response_format": (None, {"type": "text"}), "logit_bias": (None, {}),
    "presence_penalty": (None, 0), "frequency_penalty": (None, 0), "best_of": (None, 1), "suffix": (None, ""),
    "audio": (None,), "modalities": (None, ["text"]), "prediction": (None,),
}  # fmt: skip


def default_max_body_bytes(max_length: int) -> int:
    """The body limit by default: 64 bytes per token of context (JSON-escaped text, or token ids, of a prompt
    that fills it, with room to spare), and at least 1 MiB."""
    return max(2**20, 64 * max_length)


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(message: str, kind: str = "invalid_request_error", param=None, code=None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _unicode_only(value):
    """``value`` if every string in it is text: JSON can carry a lone UTF-16 surrogate (``"\\ud800"``), which no
    tokenizer takes (a ValueError for pydantic, so a 400 naming the field)."""
    stack = [value]
    while stack:  # a loop, not recursion: the nesting depth is the client's choice
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as error:
                raise ValueError(f"contains {ascii(item[error.start])}, a lone surrogate, which is not text; "
                                 "send valid Unicode") from None  # fmt: skip
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend([*item.keys(), *item.values()])
    return value


def _refuse_unsupported(body: BaseModel):
    for name, value in (body.model_extra or {}).items():
        if name in UNSUPPORTED and value not in UNSUPPORTED[name]:
            raise APIError(400, f"`{name}` is not supported by this server (got {json.dumps(value)[:80]}); leave it "
                           "out.", param=name)  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# Request bodies (unknown fields are ignored, as OpenAI's API does for forward compatibility, except UNSUPPORTED)


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    # Unknown fields are kept in model_extra, where _refuse_unsupported looks; so are the decoding settings, which
    # the scheduler checks (settings.DecodeSettings: one check for generate(), the server, the CLI, the harness).
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)  # not OpenAI's, but common (vLLM): 0 = off
    n: int = Field(default=1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64)  # what torch.Generator.manual_seed takes
    stream: bool = False
    stream_options: StreamOptions | None = None

    _text_only = field_validator("*")(_unicode_only)


class CompletionBody(_Common):
    prompt: str | list  # a string, strings, token ids, or lists of token ids (checked by _prompts)
    max_tokens: int | None = Field(default=None, ge=0)  # 0 with echo: score the prompt only
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict] | None = None

    _text_only = field_validator("*")(_unicode_only)


class ChatBody(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None


# ----------------------------------------------------------------------------------------------------------
# The app


def create_app(scheduler: Scheduler, model_name: str, default_max_tokens: int = 256, api_key: str | None = None,
               max_body_bytes: int | None = None):  # fmt: skip
    """The FastAPI app serving ``scheduler`` under the name ``model_name``. Start the scheduler first. With
    ``api_key``, every request but ``/health`` (the docs and ``/openapi.json`` too) must send ``Authorization:
    Bearer <api_key>``. A body over ``max_body_bytes`` (default: :func:`default_max_body_bytes`) gets a 413."""
    app = FastAPI(title="hf_blockdiff", description="OpenAI-compatible block-diffusion server")
    tokenizer = scheduler.tokenizer
    limit = default_max_body_bytes(scheduler.max_length) if max_body_bytes is None else max_body_bytes
    app.add_middleware(_Guard, api_key=api_key, max_body_bytes=limit)

    @app.exception_handler(APIError)
    async def _api_error(_, error: APIError):
        kind = "server_error" if error.status >= 500 else "invalid_request_error"
        return JSONResponse(error_body(error.message, kind, error.param, error.code), status_code=error.status)

    @app.exception_handler(HTTPException)
    async def _http_error(_, error: HTTPException):  # FastAPI's own: unknown routes, bodies it cannot parse
        cause, message = error.__cause__, str(error.detail)
        if isinstance(cause, UnicodeDecodeError):
            message = "The request body is not valid UTF-8."
        elif isinstance(cause, RecursionError):
            message = "The request body is nested too deeply to read."
        elif cause is not None:
            message = f"The request body could not be read as JSON ({cause})."
        kind = "server_error" if error.status_code >= 500 else "invalid_request_error"
        return JSONResponse(error_body(message, kind), status_code=error.status_code, headers=error.headers)

    @app.exception_handler(Exception)
    async def _unexpected(_, error: Exception):  # (uvicorn logs the traceback)
        message = f"The server failed on this request ({type(error).__name__}); its log has the details."
        return JSONResponse(error_body(message, "server_error"), status_code=500)

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
        if not scheduler.alive:
            return JSONResponse({"status": "error", "message": "The decoding worker is not running."}, 503)
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "local"}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, http: HTTPRequest):
        _refuse_unsupported(body)
        prompts = await asyncio.to_thread(_prompts, body.prompt)  # tokenizing megabytes must not stall the loop
        if body.max_tokens == 0 and not body.echo:
            raise APIError(400, "max_tokens must be at least 1 (0 only with echo, to score the prompt).",
                           param="max_tokens")  # fmt: skip
        if len(prompts) == 1 and body.n == 1 and not body.echo and body.logprobs is None:
            return await _answer(body, prompts[0][0], http, chat=False)
        return await _complete_many(body, prompts, http)

    def _prompts(prompt) -> list[tuple[list[int], str | None]]:
        """A completions request's prompts: (token ids, the text if sent as text)."""
        items = [prompt] if isinstance(prompt, str) or _is_ids(prompt) else prompt
        if not items or not all(isinstance(p, str) or _is_ids(p) for p in items):
            raise APIError(400, "prompt must be a string, a list of strings, a list of token ids or a list of "
                           "non-empty lists of token ids.", param="prompt")  # fmt: skip
        return [(tokenizer(p, add_special_tokens=True).input_ids, p) if isinstance(p, str) else (p, None)
                for p in items]  # fmt: skip

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, http: HTTPRequest):
        _refuse_unsupported(body)
        if body.logprobs:
            raise APIError(400, "logprobs are not supported.", param="logprobs")
        if getattr(tokenizer, "chat_template", None) is None:
            raise APIError(400, f"{model_name} has no chat template; use /v1/completions.", param="messages")
        messages = [{"role": m.role, "content": _text(m.content)} for m in body.messages]
        ids = await asyncio.to_thread(tokenizer.apply_chat_template, messages, add_generation_prompt=True,
                                      tokenize=True, return_dict=True)  # fmt: skip
        body.max_tokens = body.max_completion_tokens or body.max_tokens
        return await _answer(body, list(ids["input_ids"]), http, chat=True)

    def _settings(body: _Common, ids: list[int]) -> RequestSettings:
        """What ``body`` asks for the prompt ``ids``; an APIError if this server cannot run it."""
        if body.model is not None and body.model != model_name:
            raise APIError(404, f"The model {body.model!r} does not exist; this server serves {model_name!r}.",
                           param="model", code="model_not_found")  # fmt: skip
        vocab = len(tokenizer)
        if any(not 0 <= t < vocab for t in ids):
            raise APIError(400, f"Prompt token ids must lie in [0, {vocab}).", param="prompt")
        room = scheduler.max_length - len(ids)
        # (a prompt past the context leaves no room: at least 1, so that check() says so)
        max_tokens = body.max_tokens if body.max_tokens is not None else min(default_max_tokens, max(room, 1))
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        decoding = {name: value for name, value in (body.model_extra or {}).items() if name in SETTINGS}
        settings = RequestSettings(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                                   seed=body.seed, stop=[s for s in stop if s], **decoding)  # fmt: skip
        try:
            scheduler.check(ids, settings)
        except ValueError as error:
            code = "context_length_exceeded" if "context" in str(error) else None
            raise APIError(400, str(error), param=getattr(error, "name", None), code=code) from error
        return settings

    async def _answer(body: _Common, ids: list[int], http: HTTPRequest, chat: bool, raw: bool = False):
        """Decode one prompt and answer it; with ``raw``, return the finished Request instead (_complete_many)."""
        settings = _settings(body, ids)
        if body.n != 1:
            raise APIError(400, "n > 1 is not supported; send n requests.", param="n")
        loop, updates = asyncio.get_running_loop(), asyncio.Queue()
        request = Request(ids, settings, on_update=lambda d, f: loop.call_soon_threadsafe(updates.put_nowait, (d, f)))
        if not scheduler.alive:
            raise APIError(503, "The server is not decoding: its worker stopped (see the server's log).")
        scheduler.submit(request)
        reply = _Reply(request, model_name, chat)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_stream(request, updates, reply, include_usage), media_type="text/event-stream")
        text, reason = [], None
        try:
            while reason is None:
                try:
                    delta, reason = await asyncio.wait_for(updates.get(), DISCONNECT_POLL_S)
                    text.append(delta)
                except asyncio.TimeoutError:
                    pass
                # after every update too: a request that keeps committing text would otherwise never look
                if reason is None and await http.is_disconnected():
                    scheduler.cancel(request)
                    return JSONResponse(error_body("client disconnected"), status_code=499)
        finally:  # also when this task is cancelled (a shutdown past its timeout): stop decoding for nobody
            if request.finish_reason is None:
                scheduler.cancel(request)
        if reason == "error":
            raise APIError(500, f"Decoding failed: {request.error}")
        return request if raw else reply.whole("".join(text), reason)

    async def _complete_many(body: CompletionBody, prompts: list[tuple[list[int], str | None]], http: HTTPRequest):
        """Several prompts and ``n`` choices each (choice ``index`` = prompt * n + choice), ``echo`` and
        ``logprobs``: the choices decode side by side, then are scored by the causal forward (:mod:`.scoring`)."""
        if body.stream:
            asked = {"echo": body.echo, "logprobs": body.logprobs is not None, "n": body.n > 1}
            param = next((name for name, on in asked.items() if on), "prompt")
            raise APIError(400, "Streaming takes one prompt and n=1, without echo or logprobs.", param=param)
        for ids, _ in prompts:  # every prompt is checked before any decodes
            _settings(body, ids)
        choices = [(ids, text, j) for ids, text in prompts for j in range(body.n)]
        outcomes = [_Outcome([], "", "length")] * len(choices)
        greedy = body.temperature == 0 or (body.temperature is None and not scheduler.defaults.do_sample)
        # lm-eval's log-likelihood requests (echo, max_tokens=1, greedy): greedy decoding's first token is the
        # causal forward's argmax at any block size (docs/design.md 2.2), so the scoring forward picks it
        by_argmax = body.echo and body.max_tokens == 1 and greedy and not body.stop and body.logprobs is not None
        if body.max_tokens != 0 and not by_argmax:
            # one request per choice; choice j samples with seed + j, so seeded choices differ
            asks = [body.model_copy(update={"n": 1, "seed": None if body.seed is None else body.seed + j})
                    for _, _, j in choices]  # fmt: skip
            done = await asyncio.gather(*(_answer(a, c[0], http, chat=False, raw=True) for a, c in zip(asks, choices)))
            for request in done:
                if isinstance(request, JSONResponse):  # the client went away
                    return request
            outcomes = [_Outcome(scoring.kept_tokens(tokenizer, r.tokens, r.text), r.text, r.finish_reason,
                                 len(r.tokens), r.forwards) for r in done]  # fmt: skip
        scores = [None] * len(choices)
        if body.logprobs is not None:
            sequences = [ids + outcome.tokens for (ids, _, _), outcome in zip(choices, outcomes)]
            for group in scoring.batches([len(s) for s in sequences]):
                work = partial(scoring.score, scheduler.model, [sequences[i] for i in group], body.logprobs, by_argmax)
                for i, got in zip(group, await asyncio.wrap_future(scheduler.call(work))):
                    scores[i] = got
        if by_argmax:
            outcomes = [_Outcome([s.next_id], tokenizer.decode([s.next_id], skip_special_tokens=True),
                                 "stop" if s.next_id in scheduler.eos else "length", 1, 1) for s in scores]  # fmt: skip
        out = []
        for index, ((ids, text, _), outcome, score) in enumerate(zip(choices, outcomes, scores)):
            echoed = (tokenizer.decode(ids) if text is None else text) if body.echo else ""
            logprobs = None
            if score is not None:
                start = 0 if body.echo else len(ids)
                logprobs = scoring.openai_logprobs(tokenizer, ids + outcome.tokens, score, start, body.logprobs)
            out.append({"index": index, "text": echoed + outcome.text, "finish_reason": outcome.finish_reason,
                        "logprobs": logprobs})  # fmt: skip
        generated = sum(outcome.decoded for outcome in outcomes)
        forwards = sum(outcome.forwards for outcome in outcomes)
        prompt_tokens = sum(len(ids) for ids, _ in prompts)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": generated, "total_tokens": prompt_tokens + generated,
                 "forward_passes": forwards, "tokens_per_forward": round(generated / max(1, forwards), 4)}  # fmt: skip
        return {**_Reply(None, model_name, chat=False)._head(), "choices": out, "usage": usage}

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


class _Outcome(NamedTuple):
    """One choice of a completions request."""

    tokens: list[int]  # the tokens of its text
    text: str
    finish_reason: str
    decoded: int = 0  # tokens decoded (past a stop string too: the rest of its block)
    forwards: int = 0


def _is_ids(value) -> bool:
    """A non-empty list of token ids (JSON's true and false are no ids)."""
    return isinstance(value, list) and bool(value) and all(type(t) is int for t in value)


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


class _Guard:
    """What every HTTP request passes before the app: the API key, and the body's size. The body is read here in
    full (the app reads it whole anyway), so a body past the limit gets a 413 whether Content-Length announced it
    or a chunked upload grew past it."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app, self.api_key, self.limit = app, api_key, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        if self.api_key and scope["path"] != "/health" and not _key_matches(headers.get("authorization", ""),
                                                                            self.api_key):  # fmt: skip
            body = error_body("Incorrect or missing API key: send `Authorization: Bearer <key>`.",
                              code="invalid_api_key")  # fmt: skip
            return await JSONResponse(body, status_code=401)(scope, receive, send)
        too_large = JSONResponse(error_body(f"The request body is larger than this server's limit of {self.limit} "
                                            "bytes (serve --max-body-bytes); send a shorter prompt.",
                                            code="request_too_large"), status_code=413)  # fmt: skip
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.limit:
            return await too_large(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before its body was complete
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await too_large(scope, receive, send)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():  # the body once, then the connection itself (a disconnect)
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


def _key_matches(authorization: str, key: str) -> bool:
    scheme, _, token = authorization.partition(" ")  # the scheme is case-insensitive (RFC 9110)
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode("latin-1"), key.encode())


def serve(scheduler: Scheduler, model_name: str, host: str = "127.0.0.1", port: int = 8000,
          shutdown_timeout: float = 10.0, **kwargs):  # fmt: skip
    """Run the server until interrupted (blocking). On SIGTERM or Ctrl-C it stops accepting requests, lets those
    in flight finish for up to ``shutdown_timeout`` seconds, then cancels them and returns."""
    import uvicorn

    app = create_app(scheduler, model_name, **kwargs)
    try:
        uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=shutdown_timeout)
    finally:
        scheduler.stop()
