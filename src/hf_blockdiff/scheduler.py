# Copyright 2026 The hf_blockdiff authors. Apache-2.0.
"""Continuous batching on the decode engine: requests join free slots while others decode, and leave when done.

One worker thread owns the :class:`~engine.DecodeEngine` (its tensors are not thread-safe). Callers
:meth:`Scheduler.submit` a :class:`Request` from any thread; the worker prefills waiting requests into free slots
(several in one forward), runs one engine step for every busy slot, and hands each request the tokens that step
committed (a completed block, or the committed start of a block still being denoised), which it turns into text,
applies stop strings to and reports through its ``on_update`` callback. A request whose handling fails (its
settings, its callback) fails alone; a failing step fails the requests in it, and decoding goes on. A cancelled
request (a client that went away) frees its slot at the next step. Other work on the model (the server's scoring)
runs on the same thread between steps: :meth:`Scheduler.call`.

Every per-request setting (the decoding settings of :class:`~settings.DecodeSettings` but the engine-wide ones,
temperature, top-p, top-k, seed) is a per-row tensor of the engine, so requests with different settings share every
forward. The engine-wide ones (``confidence``, ``use_cuda_graph``, ``compile_step``) are the server's, given when
it starts. Greedy requests give the same tokens as ``generate()`` on the request alone (tests/test_serve.py).
"""

from __future__ import annotations

import math
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field, replace

import torch
from transformers.utils import logging

from .denoise import (
    dense_attention,
    resolve_policy,
    verify_by_default,
    verify_candidates,
    verify_guesses,
    verify_plan,
    verify_tree,
)
from .engine import DecodeEngine
from .policies import NO_STEP_QUOTA, Sampling, per_row_rule
from .settings import ENGINE_WIDE, SETTINGS, DecodeSettings, SettingError

logger = logging.get_logger(__name__)


@dataclass(kw_only=True)
class RequestSettings(DecodeSettings):
    """What one request asks for; ``None`` takes the server's default. Its decoding settings are those of
    :class:`~settings.DecodeSettings` but the engine-wide ones, which only the server sets (``verify`` None: see
    :meth:`Scheduler.verifies`; ``candidates`` None: the server's)."""

    max_tokens: int
    temperature: float | None = None  # 0: greedy
    top_p: float | None = None
    top_k: int | None = None  # 0 or None: off
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


@dataclass
class Request:
    """One sequence to decode. ``on_update(text_delta, finish_reason)`` is called from the worker thread whenever
    a step commits text (``finish_reason`` None until the last call: 'stop', 'length', or 'error' with ``error``)."""

    prompt: list[int]
    settings: RequestSettings
    on_update: object = None
    tokens: list[int] = field(default_factory=list)
    block_start: int = 0  # tokens[block_start:] are the committed start of the block still being denoised
    text: str = ""
    sent: int = 0  # characters of ``text`` already reported
    forwards: int = 0  # forwards the request took part in (its tokens per forward: len(tokens) / forwards)
    finish_reason: str | None = None
    cancelled: bool = False
    error: Exception | None = None


class Scheduler:
    """Decode :class:`Request` s with continuous batching on one engine of ``max_batch`` slots.

    Args:
        model, tokenizer: a block-diffusion model (on its device, in eval mode) and its tokenizer.
        max_batch: slots decoded together (the engine's rows).
        max_length: positions per slot: a request's prompt plus ``max_tokens`` must fit.
        block_size: the largest block size a request may use (default: the model's).
        defaults: generate() settings used where a request says nothing (e.g. ``threshold``, ``verify``), and the
            engine-wide ones (``confidence``, ``use_cuda_graph``, ``compile_step``).
    """

    def __init__(self, model, tokenizer, max_batch: int = 8, max_length: int = 2048, block_size: int | None = None,
                 **defaults):  # fmt: skip
        self.model, self.tokenizer = model, tokenizer
        self.defaults = resolve_policy(model, 0, None, {"max_new_tokens": 1, "block_size": block_size, **defaults})
        asked = DecodeSettings(**{name: value for name, value in defaults.items() if name in SETTINGS})
        self.block_size = self.defaults.block_size
        self.max_batch, self.max_length = max_batch, max_length
        device, rows = model.device, max_batch
        # Every request its own threshold, step quota and repeat guard (written into its row by _configure).
        self.rule = per_row_rule(rows, device)
        self.guards, (quota, threshold) = self.rule.on, self.rule.rule.rules
        self.quotas, self.thresholds = quota.steps_per_block, threshold.threshold
        self.sampling = Sampling(
            do_sample=torch.zeros(rows, dtype=torch.bool, device=device),
            temperature=torch.ones(rows, device=device),
            top_k=torch.zeros(rows, dtype=torch.long, device=device),
            top_p=torch.ones(rows, device=device),
        )
        # Verified requests give block size 1's tokens; where the plan for this many slots is not the server's
        # block as asked (denoise.verify_plan) they get them at block size 1, which is never slower.
        verifying = replace(self.defaults, verify=self.block_size > 1, candidates=asked.candidates)
        plan = verify_plan(verifying, rows, device)
        self.verify_causally = self.block_size > 1 and (not plan.verify or plan.block_size != self.block_size)
        # Requests that say nothing verify as the server was told, else where generate() does (CUDA) unless the
        # server was given a threshold or a step quota.
        self.verify_default = asked.verify if asked.verify is not None else (
            self.block_size > 1 and verify_by_default(model) and not asked.asks_threshold_decoding())  # fmt: skip
        candidates = 0 if self.verify_causally else verify_candidates(verifying, rows, device)
        verifying = replace(verifying, draft_tree=verify_tree(verifying, rows, device, candidates))
        self.engine = DecodeEngine(
            model, rows=rows, max_length=max_length, block_size=self.block_size, rule=self.rule,
            sampling=self.sampling, confidence=self.defaults.confidence, eos_token_ids=self.defaults.eos_token_ids,
            pad_token_id=self.defaults.pad_token_id, use_cuda_graph=self.defaults.use_cuda_graph,
            compile_step=self.defaults.compile_step,
            # verifying requests draft their next block inside the verifying forward (docs/design.md 2.6)
            candidates=candidates, guesses=verify_guesses(verifying, rows, device, candidates),
            candidate_width=self.defaults.candidate_width, tree=verifying.draft_tree,
        )  # fmt: skip
        self.eos = set(self.defaults.eos_token_ids)
        self._waiting: queue.Queue[Request | None] = queue.Queue()
        self._calls: queue.Queue[tuple] = queue.Queue()  # (fn, Future) to run on the worker: see call()
        self._running: dict[int, Request] = {}
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.cancelled = 0  # requests dropped before their end (clients that went away)

    # -- the caller's side ---------------------------------------------------------------------------------
    def _causal(self, settings: RequestSettings) -> bool:
        """Whether a verified request decodes at block size 1 here (its tokens are the same either way)."""
        return self.verifies(settings) and self.verify_causally and settings.candidates is None

    def verifies(self, settings: RequestSettings) -> bool:
        """Whether a request verifies: as it says, or by the server's default unless it sets a threshold, a step
        quota or a block size of 1."""
        if settings.verify is not None:
            return settings.verify
        size = settings.block_size or self.block_size
        return self.verify_default and not settings.asks_threshold_decoding() and size > 1

    def check(self, prompt: list[int], settings: RequestSettings):
        """Raise ValueError (with what to change) if a request cannot run here; nothing is queued."""
        if not prompt:
            raise ValueError("The prompt is empty.")
        if len(prompt) + settings.max_tokens > self.max_length:
            raise ValueError(
                f"The prompt ({len(prompt)} tokens) plus max_tokens ({settings.max_tokens}) exceeds this server's "
                f"context of {self.max_length} tokens; shorten the prompt or lower max_tokens."
            )
        for name in ENGINE_WIDE:  # one engine decodes every request with them
            if getattr(settings, name) is not None:
                raise SettingError(f"{name} is set for the whole server, not per request: leave it out (or start "
                                   f"the server with it: hf_blockdiff serve --{name.replace('_', '-')}).", name)  # fmt: skip
        settings.validate()
        replace(settings, block_size=settings.block_size or self.block_size, verify=self.verifies(settings)).validate(
            self.block_size, self.engine.candidates, "this server's")  # fmt: skip

    @property
    def alive(self) -> bool:
        """Whether the worker runs (not before start(), after stop(), or if it died: the log says why)."""
        return self._thread is not None and self._thread.is_alive()

    def submit(self, request: Request) -> Request:
        self.check(request.prompt, request.settings)
        if self._thread is None or not self._thread.is_alive():
            raise RuntimeError("The scheduler is not running: call start() first.")
        self._waiting.put(request)
        return request

    def cancel(self, request: Request):
        """Stop decoding ``request`` (its slot frees at the next step); no further updates are sent."""
        request.cancelled = True
        self._waiting.put(None)  # wake the worker if it is idle

    def start(self) -> Scheduler:
        self._thread = threading.Thread(target=self._work, name="hf_blockdiff-scheduler", daemon=True)
        self._thread.start()
        return self

    def call(self, fn) -> Future:
        """Run ``fn()`` (other work on the model, such as scoring) on the worker thread between two steps; returns
        a Future of its result. One thread drives the model, so e.g. a CUDA graph capture never meets a forward
        from another thread."""
        if self._thread is None or not self._thread.is_alive():
            raise RuntimeError("The scheduler is not running: call start() first.")
        future = Future()
        self._calls.put((fn, future))
        self._waiting.put(None)  # wake the worker if it is idle
        return future

    def stop(self):
        self._stop.set()
        self._waiting.put(None)
        if self._thread is not None:
            self._thread.join()
        while not self._calls.empty():  # nobody will run them now
            _, future = self._calls.get()
            future.set_exception(RuntimeError("The scheduler stopped."))

    # -- the worker ----------------------------------------------------------------------------------------
    def _work(self):
        try:
            with torch.inference_mode(), dense_attention(self.model):
                while not self._stop.is_set():
                    try:
                        self._run_calls()
                        self._admit(block=not self._running)
                        self._drop_cancelled()
                        if self._running:
                            self._deliver(self.engine.step())
                    except Exception as error:  # a failing step: its requests fail, decoding goes on
                        logger.exception("A decoding step failed; failing the requests in it.")
                        for slot, request in list(self._running.items()):
                            self._fail(request, error, slot)
                        self.engine.reset()
        finally:  # stopped, or killed by what the loop does not catch: nobody may wait for an answer
            if not self._stop.is_set():
                logger.error("The scheduler's worker stopped unexpectedly; the server cannot decode any more.")
            error = RuntimeError("The server stopped decoding (shutting down, or its worker failed).")
            for slot, request in list(self._running.items()):
                self._fail(request, error, slot, log=False)
            while not self._waiting.empty():
                request = self._waiting.get()
                if request is not None:
                    self._fail(request, error, log=False)

    def _admit(self, block: bool):
        """Prefill waiting requests into free slots (one forward for all of them)."""
        new: list[Request] = []
        free = self.engine.free_slots()
        while len(new) < len(free):
            try:
                request = self._waiting.get(block=block and not new and self._calls.empty(), timeout=0.5)
            except queue.Empty:
                break
            if request is not None and not request.cancelled:
                new.append(request)
        if not new:
            return
        admitted, slots, generators = [], [], []
        for request in new:
            slot = free[len(slots)]
            try:
                generators.append(self._configure(slot, request.settings))
            except Exception as error:  # something in this request's settings: it alone fails
                self._fail(request, error)
                continue
            admitted.append(request)
            slots.append(slot)
        if not admitted:
            return
        try:
            events = self.engine.add(
                [r.prompt for r in admitted],
                slots,
                [r.settings.max_tokens for r in admitted],
                block_sizes=[1 if self._causal(r.settings) else r.settings.block_size or self.block_size
                             for r in admitted],
                requests=admitted,
                generators=generators,
                verify=[self.verifies(r.settings) and not self._causal(r.settings) for r in admitted],
                candidates=[r.settings.candidates for r in admitted],
            )  # fmt: skip
        except Exception as error:  # the prefill of these requests failed; those decoding already go on
            for slot, request in zip(slots, admitted):
                self.engine.finish(slot)
                self._fail(request, error)
            return
        for slot, request in zip(slots, admitted):
            self._running[slot] = request
        self._deliver(events)

    def _configure(self, slot: int, settings: RequestSettings) -> torch.Generator | None:
        """Write a request's settings into its slot's row of the engine's setting tensors."""
        temperature = settings.temperature
        if temperature is None:
            temperature = self.defaults.temperature if self.defaults.do_sample else 0.0
        # each as the request says, else as the server's (which has a threshold, a step quota or both)
        threshold = _given(settings.threshold, self.defaults.threshold)
        steps = _given(settings.steps_per_block, self.defaults.steps_per_block)
        self.thresholds[slot] = math.inf if threshold is None else threshold  # inf: none (see per_row_rule)
        self.quotas[slot] = NO_STEP_QUOTA if steps is None else steps
        self.guards[slot] = _given(settings.repeat_guard, self.defaults.repeat_guard)
        self.sampling.do_sample[slot] = temperature > 0
        self.sampling.temperature[slot] = temperature if temperature > 0 else 1.0
        self.sampling.top_p[slot] = settings.top_p if settings.top_p is not None else 1.0
        self.sampling.top_k[slot] = settings.top_k or 0
        if settings.seed is None or temperature <= 0:
            return None
        return torch.Generator(self.model.device).manual_seed(settings.seed)

    def _run_calls(self):
        while not self._calls.empty():
            fn, future = self._calls.get()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except Exception as error:  # the caller's to handle; decoding goes on
                    future.set_exception(error)

    def _drop_cancelled(self):
        for slot, request in list(self._running.items()):
            if request.cancelled:
                self.cancelled += 1
                self.engine.finish(slot)
                del self._running[slot]

    def _deliver(self, events):
        """Hand each request what the last forward committed: completed blocks (``events``), then the committed
        start of every block still being denoised, so that a stream sees each forward's tokens."""
        for slot, tokens, _, finished in events:
            if slot in self._running:
                self._advance(slot, tokens, finished, block_done=True)
        reported = {slot for slot, *_ in events}
        for slot, request in list(self._running.items()):
            if slot not in reported:
                partial = self.engine.committed(slot)
                if len(partial) > len(request.tokens) - request.block_start:
                    self._advance(slot, partial, False, block_done=False)

    def _advance(self, slot: int, tokens: list[int], finished: bool, block_done: bool):
        """The active block of ``slot``'s request is now ``tokens`` (complete with ``block_done``); report it."""
        request = self._running[slot]
        try:
            del request.tokens[request.block_start :]
            request.tokens += tokens
            if block_done:
                request.block_start = len(request.tokens)
                request.forwards = int(self.engine.forwards[slot])
            if self._extend(request) or finished:
                if not finished:
                    self.engine.finish(slot)
                request.forwards = int(self.engine.forwards[slot])
                del self._running[slot]
                done = request.tokens and request.tokens[-1] in self.eos
                self._end(request, request.finish_reason or ("stop" if done else "length"))
            else:
                self._send(request, None)
        except Exception as error:  # decoding its text or reporting it failed: this request alone fails
            self._fail(request, error, slot)

    def _extend(self, request: Request) -> bool:
        """Decode the request's tokens; True if a stop string ended it. The stop string complete first wins (where
        token-by-token decoding would stop), whatever the list order and however many tokens a forward gave."""
        text = self.tokenizer.decode(request.tokens, skip_special_tokens=True)
        hits = []  # (end, -length): the earliest end, then the longest
        for stop in request.settings.stop:
            at = text.find(stop, max(0, request.sent - len(stop)))  # text already sent holds no stop string
            if at >= 0:
                hits.append((at + len(stop), -len(stop)))
        if hits:
            end, minus_length = min(hits)
            request.text, request.finish_reason = text[: end + minus_length], "stop"
            return True
        request.text = text
        return False

    def _send(self, request: Request, finish_reason: str | None):
        """Report new text. Held back: a partly decoded character at the end, and the longest tail that may still
        grow into a stop string."""
        end = len(request.text)
        if finish_reason is None:
            while end > request.sent and request.text[end - 1] == "\ufffd":
                end -= 1
            tail = request.text[request.sent : end]
            end -= max((k for stop in request.settings.stop for k in range(1, min(len(stop), len(tail) + 1))
                        if tail.endswith(stop[:k])), default=0)  # fmt: skip
        delta, request.sent = request.text[request.sent : end], max(request.sent, end)
        if request.on_update is not None and not request.cancelled and (delta or finish_reason):
            request.on_update(delta, finish_reason)

    def _end(self, request: Request, reason: str):
        request.finish_reason = reason
        self._send(request, reason)

    def _fail(self, request: Request, error: Exception, slot: int | None = None, log: bool = True):
        """End ``request`` with ``error`` (its client gets a server error), freeing its slot."""
        if log:
            logger.error(f"A request failed ({type(error).__name__}: {error}).", exc_info=error)
        request.error = error
        if slot is not None and self._running.get(slot) is request:
            del self._running[slot]
            self.engine.finish(slot)
        try:
            self._end(request, "error")
        except Exception:  # its client cannot be told (e.g. its event loop is gone)
            logger.exception("Could not report a failed request.")


def _given(value, default):
    return default if value is None else value
