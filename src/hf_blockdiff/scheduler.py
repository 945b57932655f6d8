# Copyright 2026 The hf_blockdiff authors. Apache-2.0.
"""Continuous batching on the decode engine: requests join free slots while others decode, and leave when done.

One worker thread owns the :class:`~engine.DecodeEngine` (its tensors are not thread-safe). Callers
:meth:`Scheduler.submit` a :class:`Request` from any thread; the worker prefills waiting requests into free slots
(several in one forward), runs one engine step for every busy slot, and hands each completed block to its request,
which turns tokens into text, applies stop strings and reports through its ``on_update`` callback. A cancelled
request (a client that went away) frees its slot at the next step.

Every per-request setting (threshold, temperature, top-p, block size, verify, seed) is a per-row tensor of the
engine, so requests with different settings share every forward. Greedy requests give the same tokens as
``generate()`` on the request alone (tests/test_serve.py).
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field, replace

import torch
from transformers.utils import logging

from .denoise import dense_attention, resolve_policy, verify_candidates
from .engine import DecodeEngine
from .policies import AnyOf, FixedSteps, RepeatGuard, Sampling, Threshold

logger = logging.get_logger(__name__)


@dataclass
class RequestSettings:
    """What one request asks for; ``None`` takes the server's default."""

    max_tokens: int
    temperature: float | None = None  # 0: greedy
    top_p: float | None = None
    top_k: int | None = None  # 0 or None: off
    block_size: int | None = None
    threshold: float | None = None
    verify: bool = False
    candidates: int | None = None  # verify: next blocks drafted per verifying forward (None: the server's)
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


@dataclass
class Request:
    """One sequence to decode. ``on_update(text_delta, finish_reason)`` is called from the worker thread for
    every completed block (``finish_reason`` None until the last call: 'stop' or 'length')."""

    prompt: list[int]
    settings: RequestSettings
    on_update: object = None
    tokens: list[int] = field(default_factory=list)
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
        defaults: generate() settings used where a request says nothing (e.g. ``threshold``).
    """

    def __init__(self, model, tokenizer, max_batch: int = 8, max_length: int = 2048, block_size: int | None = None,
                 **defaults):  # fmt: skip
        self.model, self.tokenizer = model, tokenizer
        self.defaults = resolve_policy(model, 0, None, {"max_new_tokens": 1, "block_size": block_size, **defaults})
        self.block_size = self.defaults.block_size
        self.max_batch, self.max_length = max_batch, max_length
        device, rows = model.device, max_batch
        # Per-request thresholds, within the server's rule (a step quota and the repeat guard apply to every row).
        threshold = Threshold(torch.ones(rows, device=device))
        self.thresholds = threshold.threshold
        self.rule = threshold
        if self.defaults.steps_per_block is not None:
            self.rule = AnyOf(FixedSteps(torch.full((rows,), self.defaults.steps_per_block, device=device)), threshold)
        if self.defaults.repeat_guard:
            self.rule = RepeatGuard(self.rule)
        self.sampling = Sampling(
            do_sample=torch.zeros(rows, dtype=torch.bool, device=device),
            temperature=torch.ones(rows, device=device),
            top_k=torch.zeros(rows, dtype=torch.long, device=device),
            top_p=torch.ones(rows, device=device),
        )
        self.engine = DecodeEngine(
            model, rows=rows, max_length=max_length, block_size=self.block_size, rule=self.rule,
            sampling=self.sampling, confidence=self.defaults.confidence, eos_token_ids=self.defaults.eos_token_ids,
            pad_token_id=self.defaults.pad_token_id, use_cuda_graph=self.defaults.use_cuda_graph,
            compile_step=self.defaults.compile_step,
            # verifying requests draft their next block inside the verifying forward (docs/design.md 2.6)
            candidates=verify_candidates(replace(self.defaults, verify=True, candidates=defaults.get("candidates")),
                                         rows, device) if self.block_size > 1 else 0,
        )  # fmt: skip
        self.eos = set(self.defaults.eos_token_ids)
        self._waiting: queue.Queue[Request | None] = queue.Queue()
        self._running: dict[int, Request] = {}
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.cancelled = 0  # requests dropped before their end (clients that went away)

    # -- the caller's side ---------------------------------------------------------------------------------
    def check(self, prompt: list[int], settings: RequestSettings):
        """Raise ValueError (with what to change) if a request cannot run here; nothing is queued."""
        if not prompt:
            raise ValueError("The prompt is empty.")
        if len(prompt) + settings.max_tokens > self.max_length:
            raise ValueError(
                f"The prompt ({len(prompt)} tokens) plus max_tokens ({settings.max_tokens}) exceeds this server's "
                f"context of {self.max_length} tokens; shorten the prompt or lower max_tokens."
            )
        size = settings.block_size or self.block_size
        if not 1 <= size <= self.block_size:
            raise ValueError(f"block_size must be between 1 and this server's {self.block_size}, got {size}.")
        if settings.verify and size < 2:
            raise ValueError("verify needs a block_size of at least 2.")
        if settings.candidates is not None and not 0 <= settings.candidates <= self.engine.candidates:
            raise ValueError(f"candidates must be between 0 and this server's {self.engine.candidates}, got "
                             f"{settings.candidates}.")  # fmt: skip

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

    def stop(self):
        self._stop.set()
        self._waiting.put(None)
        if self._thread is not None:
            self._thread.join()

    # -- the worker ----------------------------------------------------------------------------------------
    def _work(self):
        with torch.inference_mode(), dense_attention(self.model):
            while not self._stop.is_set():
                try:
                    self._admit(block=not self._running)
                    self._drop_cancelled()
                    if self._running:
                        self._deliver(self.engine.step())
                except Exception as error:  # a bug must not leave clients waiting forever
                    logger.exception("The scheduler failed; failing its requests.")
                    for request in list(self._running.values()):
                        request.error = error
                        self._end(request, "error")
                    self._running.clear()
                    self.engine.reset()

    def _admit(self, block: bool):
        """Prefill waiting requests into free slots (one forward for all of them)."""
        new: list[Request] = []
        free = self.engine.free_slots()
        while len(new) < len(free):
            try:
                request = self._waiting.get(block=block and not new, timeout=0.5)
            except queue.Empty:
                break
            if request is not None and not request.cancelled:
                new.append(request)
        if not new:
            return
        slots = free[: len(new)]
        generators = []
        for slot, request in zip(slots, new):
            generators.append(self._configure(slot, request.settings))
            self._running[slot] = request
        self._deliver(
            self.engine.add(
                [r.prompt for r in new],
                slots,
                [r.settings.max_tokens for r in new],
                block_sizes=[r.settings.block_size or self.block_size for r in new],
                requests=new,
                generators=generators,
                verify=[r.settings.verify for r in new],
                candidates=[r.settings.candidates for r in new],
            )  # fmt: skip
        )

    def _configure(self, slot: int, settings: RequestSettings) -> torch.Generator | None:
        """Write a request's settings into its slot's row of the engine's setting tensors."""
        temperature = settings.temperature
        if temperature is None:
            temperature = self.defaults.temperature if self.defaults.do_sample else 0.0
        threshold = settings.threshold if settings.threshold is not None else self.defaults.threshold
        self.thresholds[slot] = 1.0 if threshold is None else threshold
        self.sampling.do_sample[slot] = temperature > 0
        self.sampling.temperature[slot] = temperature if temperature > 0 else 1.0
        self.sampling.top_p[slot] = settings.top_p if settings.top_p is not None else 1.0
        self.sampling.top_k[slot] = settings.top_k or 0
        if settings.seed is None or temperature <= 0:
            return None
        return torch.Generator(self.model.device).manual_seed(settings.seed)

    def _drop_cancelled(self):
        for slot, request in list(self._running.items()):
            if request.cancelled:
                self.cancelled += 1
                self.engine.finish(slot)
                del self._running[slot]

    def _deliver(self, events):
        for slot, tokens, _, finished in events:
            request = self._running.get(slot)
            if request is None:
                continue
            request.forwards = int(self.engine.forwards[slot])
            if self._extend(request, tokens) or finished:
                if not finished:
                    self.engine.finish(slot)
                del self._running[slot]
                done = request.tokens and request.tokens[-1] in self.eos
                self._end(request, request.finish_reason or ("stop" if done else "length"))
            else:
                self._send(request, None)

    def _extend(self, request: Request, tokens: list[int]) -> bool:
        """Append a block; True if a stop string ended the request."""
        request.tokens += tokens
        text = self.tokenizer.decode(request.tokens, skip_special_tokens=True)
        for stop in request.settings.stop:
            at = text.find(stop, max(0, request.sent - len(stop)))
            if at >= 0:
                request.text, request.finish_reason = text[:at], "stop"
                return True
        request.text = text
        return False

    def _send(self, request: Request, finish_reason: str | None):
        """Report new text. Held back: a partly decoded character at the end, and a tail that may still grow
        into a stop string."""
        end = len(request.text)
        if finish_reason is None:
            while end > request.sent and request.text[end - 1] == "\ufffd":
                end -= 1
            for stop in request.settings.stop:
                for k in range(min(len(stop) - 1, end - request.sent), 0, -1):
                    if request.text[end - k : end] == stop[:k]:
                        end -= k
                        break
        delta, request.sent = request.text[request.sent : end], max(request.sent, end)
        if request.on_update is not None and not request.cancelled and (delta or finish_reason):
            request.on_update(delta, finish_reason)

    def _end(self, request: Request, reason: str):
        request.finish_reason = reason
        self._send(request, reason)
