# Copyright 2026 The hf_blockdiff authors. Apache-2.0.
"""The decode engine: block-wise denoising on a static KV cache, one fixed-shape step for every forward.

Hub-portable: imports only torch, transformers and its sibling files.

- :class:`SlotCache` preallocates keys and values for ``rows`` slots of ``length`` positions; a slot's position
  ``p`` lives at index ``p``. Every forward writes its tokens in place at their own positions: no copies, and
  rows need not be aligned. A denoising step writes its block's provisional keys and values too; the
  context-causal mask keeps every committed token from seeing them, and the block's commit overwrites them.
- :meth:`DecodeEngine.step` runs one forward of shape ``[rows, block_size]`` in which each row takes its own
  next action: a denoising step of its block, or the causal commit of its finished block (its last logit gives
  the next block's first token). The action is an input of the mask, so one CUDA graph per
  ``(rows, block_size)`` serves both; elsewhere the same code runs eagerly.
- Rows advance independently: a row whose block is done commits while others still denoise, and a row that
  ended idles (or takes a new request, see :meth:`DecodeEngine.add`).
- A verifying row either drafts its block in one step and verifies it in the next (two forwards per block), or,
  with candidates, verifies its block and drafts the next one in the same forward (``AHEAD``, one forward per
  block; docs/design.md 2.6). The step then also carries every row's candidate blocks, in scratch slots.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache
from transformers.utils import logging

from .compat import cache_argument
from .masks import decode_meta
from .noisy_adapter import has_adapter, set_gate
from .policies import CommitRule, Sampling, check_block_settings, propose, speculative_accept

logger = logging.get_logger(__name__)

IDLE, DENOISE, COMMIT, AHEAD = 0, 1, 2, 3  # AHEAD: one-forward verify (verify this block, draft the next)
# The packed result of a step, per row: SHOWN (a block's tokens are output), FINISHED (the row ended), LENGTH
# (tokens output), DRAFTED (a verified block's drafted length: tokens LENGTH..DRAFTED were rejected), then the
# tokens and the forward that committed each, ``block_size + 1`` of each.
SHOWN, FINISHED, LENGTH, DRAFTED = range(4)
EVENT_FIELDS = 4


class SlotCache(Cache):
    """Static KV cache with per-row write positions (see the module docstring).

    Before each forward the engine sets ``write_index`` (``(n, q)``: the position of every input token) and
    ``rows`` (None for all slots, or the ``(n,)`` slots a smaller forward covers). Buffers are allocated on the
    first write, from the shapes the attention layers hand over.
    """

    def __init__(self, rows: int, length: int):
        super().__init__(layers=[])
        self.num_rows, self.length = rows, length
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.write_index: torch.Tensor | None = None
        self.rows: torch.Tensor | None = None

    def __len__(self):
        return len(self.keys)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions are always passed explicitly; nothing may derive them from the cache

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if layer_idx == len(self.keys):
            heads, dim = key_states.shape[1], key_states.shape[3]
            shape = (self.num_rows, heads, self.length, dim)
            self.keys.append(key_states.new_zeros(shape))
            self.values.append(value_states.new_zeros(shape))
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if self.rows is None:
            index = self.write_index[:, None, :, None].expand_as(key_states)
            keys.scatter_(2, index, key_states)
            values.scatter_(2, index, value_states)
            return keys, values
        rows, index = self.rows.unsqueeze(1), self.write_index
        keys[rows, :, index] = key_states.transpose(1, 2)
        values[rows, :, index] = value_states.transpose(1, 2)
        return keys[self.rows], values[self.rows]


@dataclass
class Slot:
    """Host-side bookkeeping of one slot (what the engine needs without reading the GPU)."""

    request: object = None  # whatever the caller attached (generate(): the batch row; serve: the request)
    generator: torch.Generator | None = None  # the row's sampling noise (None: the global generator)
    do_sample: bool = False
    verify: bool = False
    busy: bool = False
    tokens: list[int] = field(default_factory=list)  # committed so far (blocks are appended when complete)
    block_starts: list[int] = field(default_factory=list)  # where each completed block begins in ``tokens``
    rejected: list[tuple[int, list[int]]] = field(default_factory=list)  # verify: (where, drafted tokens dropped)


class DecodeEngine:
    """Decode many sequences at once, each at its own pace, on one static cache.

    Args:
        model: a block-diffusion model (``BlockDiffusionMixin``).
        rows: number of slots (the batch the step is shaped for).
        max_length: positions per slot (prompt + generated).
        block_size: the step's block width; a request may use any block size up to it.
        rule: the :class:`~policies.CommitRule`; its per-row tensors have ``rows`` entries.
        sampling: per-row :class:`~policies.Sampling` settings. The caller owns the tensors of ``rule`` and
            ``sampling`` and may set a slot's entries before :meth:`add` puts a request there.
        confidence: 'probability' | 'margin' | 'entropy'.
        eos_token_ids, pad_token_id: the stop tokens; padding fills a block after its EOS.
        use_cuda_graph: capture the step on CUDA (falls back to eager, with the reason logged, if capture fails).
        compile_step: ``torch.compile`` the step before capturing it (CUDA graphs only; None: whenever a graph is
            captured). Fused kernels make a step about 1.9x faster on SmolLM2 (benchmarks/results); compiling
            takes seconds once per engine, and fused kernels may round differently from eager ones.
        candidates: candidate next blocks each one-forward-verifying row carries (docs/design.md 2.6); 0: none,
            so verifying rows draft and verify in two forwards. Every step then has
            ``block_size * (1 + candidates)`` query positions per row (twice that with ``guess``).
        guess: one-forward verify also carries, for every candidate, a copy whose first mask is replaced by a guess
            of the causal token there (the draft's runner-up at the position the causal model may reject), used
            when the guess is right.
    """

    def __init__(self, model, rows: int, max_length: int, block_size: int, rule: CommitRule, sampling: Sampling,
                 confidence: str = "probability", eos_token_ids=(), pad_token_id: int = 0,
                 use_cuda_graph: bool | None = None, compile_step: bool | None = None, candidates: int = 0,
                 guess: bool = True):  # fmt: skip
        self.model, self.rows, self.block_size = model, rows, block_size
        self.rule, self.sampling, self.measure = rule, sampling, confidence
        self.mask_token_id = getattr(model.config, "mask_token_id", None)
        if block_size > 1 and self.mask_token_id is None:
            raise ValueError(
                "config.mask_token_id is missing, so masked positions cannot be denoised. Convert the model with "
                "`hf_blockdiff.convert_model` / `hf_blockdiff convert`, or generate with block_size=1."
            )
        self.pad_token_id = pad_token_id
        device = model.device
        self.device = device
        vocab = model.config.get_text_config(decoder=True).vocab_size
        self.eos = torch.tensor([t for t in eos_token_ids if 0 <= t < vocab], dtype=torch.long, device=device)
        # Positions of a block that are not in use (past its end or its EOS) still write at their own positions,
        # so a slot has room for a whole block past ``max_length``; those keys are never valid.
        self.max_length = max_length
        self.slots_per_row = max_length + block_size
        # One-forward verify: candidate next blocks of ``width`` masks live in scratch slots after the ordinary ones
        # (their keys may never land on a committed or verified position); their position ids are the real ones.
        self.candidates = candidates if block_size > 1 else 0
        self.width = block_size  # a candidate: the last kept token (its anchor), then block_size - 1 masks
        self.groups = 2 if guess else 1  # candidates without, and with, a guess of the causal token they follow
        self.queries = block_size + self.groups * self.candidates * self.width
        self.cache = SlotCache(rows, self.slots_per_row + self.groups * self.candidates * self.width)
        self.cache_arg = cache_argument(type(model.model).forward)
        long = dict(dtype=torch.long, device=device)
        # Per-row state: all updated in place, so a captured graph that reads it stays valid.
        self.block = torch.full((rows, block_size), pad_token_id, **long)  # the active block's tokens
        self.filled = torch.zeros(rows, block_size, dtype=torch.bool, device=device)
        self.length = torch.zeros(rows, **long)  # committed tokens in the cache = the block's first position
        self.block_len = torch.zeros(rows, **long)  # positions of the block in use (0 = idle)
        self.phase = torch.zeros(rows, **long)  # IDLE / DENOISE / COMMIT
        self.row_block_size = torch.ones(rows, **long)
        self.generated = torch.zeros(rows, **long)  # tokens of earlier blocks
        self.max_new = torch.zeros(rows, **long)
        self.min_new = torch.zeros(rows, **long)
        self.steps = torch.zeros(rows, **long)  # denoising steps spent on the active block
        self.forwards = torch.zeros(rows, **long)  # forwards each row took part in
        self.committed_at = torch.zeros(rows, block_size, **long)  # the row's forward that committed a position
        self.ended = torch.zeros(rows, dtype=torch.bool, device=device)
        self.verify = torch.zeros(rows, dtype=torch.bool, device=device)  # rows that draft, then verify causally
        self.ahead = torch.zeros(rows, dtype=torch.bool, device=device)  # ... in one forward per block
        self.row_candidates = torch.zeros(rows, **long)  # candidates a one-forward-verify row uses (<= candidates)
        self.finished = torch.zeros(rows, dtype=torch.bool, device=device)
        self.proposal = torch.zeros(rows, block_size, **long)
        self.runner_up = torch.zeros(rows, block_size + 1, **long)  # the draft's second choice at each position
        self.events = torch.zeros(rows, EVENT_FIELDS + 2 * (block_size + 1), **long)
        self._table = None  # the last step's events on the host (see committed())
        self.vocab = model.config.get_text_config(decoder=True).vocab_size
        self._sampling = False  # whether any slot samples (a graph is captured for one setting)
        self.noise = None  # Exp(1) draws of every sampling row, for every forward
        self.uniform = None  # U(0, 1) draws of sampling rows that verify (speculative acceptance)
        self.draft_dist = None  # the distribution each drafted token of a verifying, sampling row came from
        self.num_forwards = 0
        self.slots = [Slot() for _ in range(rows)]
        self._graph = None
        self._use_graph = device.type == "cuda" if use_cuda_graph is None else use_cuda_graph
        self._compiled = bool(self._use_graph and (compile_step is None or compile_step))
        if self._compiled:
            # Every engine compiles the same function, once per shape; past dynamo's recompile limit (8) later
            # engines would silently run uncompiled, so allow one compilation per engine this process builds.
            config = torch._dynamo.config
            config.recompile_limit = max(getattr(config, "recompile_limit", 8), 64)
        self._body = torch.compile(self._step_body, dynamic=False) if self._compiled else self._step_body
        self._index = torch.arange(block_size, device=device)
        q = torch.arange(self.queries - block_size, device=device)
        # Per query position: its offset from the row's length (candidate c: c + j) and its cache slot.
        anchor = (q // block_size) % max(self.candidates, 1)
        self._offsets = torch.cat([self._index, anchor + q % block_size])
        self._scratch = torch.cat([torch.zeros_like(self._index), self.slots_per_row + q])
        self._is_block = torch.arange(self.queries, device=device) < block_size
        self.gate = torch.zeros(rows, self.queries, dtype=model.dtype, device=device) if has_adapter(model) else None
        self.key = None  # set by whoever caches the engine for reuse (generate())

    # -- the forward ---------------------------------------------------------------------------------------
    def _forward(self, ids, length, block_len, causal, rows=None, gate=None, candidates=None):
        """Hidden states of ``ids`` (``(n, q)``) placed at ``length ..`` of their rows, masked by the block rule.
        ``gate`` (``(n, q)``): where a noisy-scope adapter acts (the positions being denoised); off when None.
        ``candidates`` (``(n, C)`` bool, a step of an engine with candidates): which candidate blocks each row
        carries after its block (see :func:`masks.decode_meta`); ``ids`` then has the step's full query width."""
        q = ids.shape[1]
        if candidates is None:
            positions = slots = length.unsqueeze(1) + torch.arange(q, device=ids.device)
            if self.candidates:  # the scratch slots exist; nothing of this forward uses them
                candidates = ids.new_zeros(ids.shape[0], self.groups * self.candidates, dtype=torch.bool)
            offset = length
        else:
            positions = length.unsqueeze(1) + self._offsets
            slots = offset = torch.where(self._is_block, positions, self._scratch)
        self.cache.write_index, self.cache.rows = slots, rows
        meta = decode_meta(length, block_len, causal, self.slots_per_row, candidates, self.width, self.groups)
        masks = self.model.block_diffusion_masks(meta, offset, q)
        set_gate(self.model, gate)
        try:
            hidden = self.model.model(
                input_ids=ids,
                attention_mask=masks,
                position_ids=positions,
                use_cache=True,
                **{self.cache_arg: self.cache},
            ).last_hidden_state
        finally:
            set_gate(self.model, None)
        return hidden

    def _step_body(self):
        """One forward plus everything it decides, as device operations only (no host reads, no data-dependent
        shapes), so that a single CUDA graph can hold it. Results for the host land in ``self.events``."""
        active = self.phase != IDLE
        ahead = self.phase == AHEAD
        denoising = self.phase == DENOISE
        ids, candidates = self.block, None
        if self.candidates:  # every row's block, then its candidates: a block token, then masks (one-forward verify)
            ahead_ids = self.block.new_full((self.rows, self.groups, self.candidates, self.width), self.mask_token_id)
            ahead_ids[:, :, :, 0] = self.block[:, None, : self.candidates]
            if self.groups == 2:
                ahead_ids[:, 1, :, 1] = self.runner_up[:, 1 : self.candidates + 1]
            ids = torch.cat([self.block, ahead_ids.flatten(1)], dim=1)
            candidates = ahead.unsqueeze(1) & (self._index[: self.candidates] < self.row_candidates.unsqueeze(1))
            candidates = candidates.repeat(1, self.groups)
        gate = None
        if self.gate is not None:  # a noisy-scope adapter acts where blocks are denoised, never on a causal position
            self.gate.copy_(torch.where(self._is_block, denoising.unsqueeze(1), ahead.unsqueeze(1)))
            gate = self.gate
        hidden = self._forward(ids, self.length, self.block_len, ~denoising, gate=gate, candidates=candidates)
        logits = self.model.logits_from_hidden(hidden[:, : self.block_size])
        self.forwards += active
        produced = self.generated.unsqueeze(1) + self._index + 1  # the token index each logit predicts
        noise = self.noise[:, : self.block_size] if self._sampling else None
        tokens, conf, dist = propose(logits, self.sampling, self.measure, self.mask_token_id, self.eos,
                                     produced < self.min_new.unsqueeze(1), noise, with_dist=True)  # fmt: skip
        self.proposal.copy_(tokens)

        # Denoising rows: position i predicts i + 1; commit what the rule picks among the open positions.
        # Verifying rows draft: they fill every open position at once (the commit forward checks the draft).
        open_ = ~self.filled[:, 1:] & denoising.unsqueeze(1)
        commit = self.rule.select(conf[:, :-1], tokens[:, :-1], open_, self.steps)
        commit = torch.where(self.verify.unsqueeze(1), open_, commit & open_)
        self.block[:, 1:] = torch.where(commit, tokens[:, :-1], self.block[:, 1:])
        if self._sampling:  # a sampled draft is accepted against the distribution it came from
            drafted = (commit & self.verify.unsqueeze(1)).unsqueeze(-1)
            self.draft_dist[:, 1:] = torch.where(drafted, dist[:, :-1], self.draft_dist[:, 1:])
        self.filled[:, 1:] |= commit
        self.committed_at[:, 1:] = torch.where(commit, self.forwards.unsqueeze(1), self.committed_at[:, 1:])
        self.steps += denoising
        self._close_after_eos()
        complete = denoising & self.filled.all(dim=1)

        # Committing rows: their block is in the cache now; the last in-block logit is the next first token.
        # Verifying rows (two-forward: COMMIT; one-forward: AHEAD) keep their block up to the first drafted token
        # the causal logits reject; the causal token there is the next first token. The rest of the cache is
        # overwritten later and never a valid key.
        committing = self.phase == COMMIT
        verified = committing & self.verify
        keep, ends, next_first = self._accept(tokens, dist, verified | ahead)
        report = (self.block.clone(), keep,
                  torch.where(self._index > 0, self.forwards.unsqueeze(1), self.committed_at),
                  self.block_len.clone())  # fmt: skip
        moved = committing | ahead
        self.length += torch.where(moved, keep, 0)
        self.generated += torch.where(moved, keep, 0)
        self.ended |= ends
        done = verified & (ends | (self.generated >= self.max_new))
        self._start_block(committing & ~done, next_first)
        # A block of one position is complete at once (a verifying row's waits for the next step: one event per step)
        complete |= committing & ~self.verify & self.filled.all(dim=1)
        self._settle(complete)  # a finished row ends; the others commit in the next forward
        self.phase.masked_fill_(done, IDLE)
        shown = complete & (~self.verify | self.finished)  # a verifying row's draft is not output
        self._record(shown | verified, (self.finished & shown) | done, verified, report)
        if self.candidates:
            self._draft_ahead(hidden, ahead, keep, ends, next_first, report)

    def _accept(self, tokens, dist, verifying):
        """The verifying rows' decision on their drafted block, from the causal ``tokens`` (and ``dist``) of this
        forward: ``(keep, ends, next_first)``. ``keep``: block tokens kept (the first token plus the longest
        accepted draft prefix, cut after a kept EOS; other rows: their whole block); ``ends``: a kept EOS;
        ``next_first``: the causal token after the kept part (sampling rows: the residual draw at a rejection)."""
        agree = self.block[:, 1:] == tokens[:, :-1]
        speculative = self._sampling and self.block_size > 1
        if speculative:
            accepted, residual = speculative_accept(dist[:, :-1], self.draft_dist[:, 1:], self.block[:, 1:],
                                                    self.uniform[:, 1:], self.noise[:, : self.block_size - 1])  # fmt: skip
            agree = torch.where(self.sampling.do_sample.unsqueeze(1), accepted, agree)
        agree &= self._index[1:] < self.block_len.unsqueeze(1)
        keep = torch.where(verifying, agree.long().cumprod(dim=1).sum(dim=1) + 1, self.block_len)
        kept_eos = verifying.unsqueeze(1) & self._eos_at(self._index < keep.unsqueeze(1))
        ends = kept_eos.any(dim=1)
        keep = torch.where(ends, torch.where(kept_eos, self._index + 1, self.block_size).min(dim=1).values, keep)
        at = (keep - 1).clamp(min=0).unsqueeze(1)
        next_first = tokens.gather(1, at).squeeze(1)
        if speculative:
            rejected = verifying & self.sampling.do_sample & (keep < self.block_len)
            next_first = torch.where(rejected, residual.gather(1, at.clamp(max=self.block_size - 2)).squeeze(1),
                                     next_first)  # fmt: skip
        return keep, ends, next_first

    def _draft_ahead(self, hidden, ahead, keep, ends, first, report):
        """One-forward verify, after the acceptance: each AHEAD row's next block is ``[first, drafts]``, the drafts
        read from the candidate anchored at the last kept token (docs/design.md 2.6). A row whose accepted prefix
        had no candidate of its own reads the longest shorter one further along. A row also ends here when
        ``first`` is its last token (an EOS, or the last of its budget): it is output now, without a forward."""
        b, w = self.block_size, self.width
        left = self.max_new - self.generated  # after this step's kept tokens
        stop = torch.isin(first, self.eos) & (self.generated >= self.min_new)  # (propose forbids it before)
        last = ahead & ~ends & (left > 0) & (stop | (left == 1))  # ``first`` is the row's last token
        done = ahead & (ends | (left <= 0) | last)
        cand = torch.minimum(keep, self.row_candidates).clamp(min=1) - 1  # candidate c is anchored at block token c
        offset = keep - 1 - cand
        count = torch.minimum(torch.minimum(self.row_block_size - 1, w - 1 - offset), left - 1).clamp(min=0)
        count = torch.where(self.row_candidates > 0, count, 0)
        if self.groups == 2:  # the guessing copy, where it guessed the causal token after a rejected draft
            guessed = (
                (offset == 0)
                & (keep < self.block_len)
                & (self.runner_up.gather(1, keep.unsqueeze(1)).squeeze(1) == first)
            )
            cand = cand + guessed * self.candidates
        where = (b + cand * w + offset + 1).unsqueeze(1) + self._index[:-1]  # candidate position j predicts j + 1
        picked = hidden.gather(1, where.clamp(max=self.queries - 1).unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        produced = (self.generated + 1).unsqueeze(1) + self._index[:-1]  # token index of the new block's drafts
        noise = self.noise[:, b:] if self._sampling else None
        drafts, _, dist = propose(self.model.logits_from_hidden(picked), self.sampling, self.measure,
                                  self.mask_token_id, self.eos, produced < self.min_new.unsqueeze(1), noise,
                                  with_dist=True)  # fmt: skip
        go_on = ahead & ~done
        use = self._index[:-1] < count.unsqueeze(1)
        block = torch.cat([first.unsqueeze(1), torch.where(use, drafts, self.pad_token_id)], dim=1)
        self.block.copy_(torch.where(go_on.unsqueeze(1), block, self.block))
        if self._sampling:
            self.draft_dist[:, 1:] = torch.where(
                (go_on.unsqueeze(1) & use).unsqueeze(-1), dist, self.draft_dist[:, 1:]
            )
        if self.groups == 2:
            self.runner_up[:, 1:-1] = torch.where(go_on.unsqueeze(1), dist.topk(2, dim=-1).indices[..., 1],
                                                  self.runner_up[:, 1:-1])  # fmt: skip
            self.runner_up[:, -1] = self.mask_token_id  # (after the block: no guess)
        at = torch.where(self._index == 0, self.forwards.unsqueeze(1), -1)
        self.committed_at.copy_(torch.where(go_on.unsqueeze(1), at, self.committed_at))
        self.block_len.copy_(torch.where(go_on, 1 + count, torch.where(done, 0, self.block_len)))
        self.filled.masked_fill_(go_on.unsqueeze(1), True)  # a draft fills its positions (the check is next step)
        self.phase.masked_fill_(done, IDLE)
        # The host sees the kept tokens (and ``first`` where it is the last); the rest of the draft was rejected.
        tokens, kept, at, drafted = report
        end = keep.unsqueeze(1)
        tokens = torch.nn.functional.pad(tokens, (0, 1), value=self.pad_token_id)
        tokens = torch.where(last.unsqueeze(1), tokens.scatter(1, end, first.unsqueeze(1)), tokens)
        at = torch.nn.functional.pad(at, (0, 1), value=-1).scatter(1, end, self.forwards.unsqueeze(1))
        self._record_rows(ahead, ahead, done, kept + last, tokens, at, drafted)

    def _settle(self, complete):
        """Rows whose block just completed: finished (EOS, budget) ones go idle, the others commit next."""
        finished = complete & (self.ended | (self.generated + self.block_len >= self.max_new))
        finished &= ~self.verify | (self.block_len <= 1)  # a verified block may keep fewer tokens than drafted
        self.phase.copy_(torch.where(finished, IDLE, torch.where(complete, COMMIT, self.phase)))
        self.finished.copy_(finished)

    def _record(self, shown, finished, verified=None, report=None):
        """Pack what the host needs into ``events`` (see :data:`EVENT_FIELDS`). Rows in ``verified`` report
        ``report`` (tokens, length, committed_at, drafted) instead of their current block: their tokens past
        ``length`` up to ``drafted`` are the rejected part of the draft."""
        tokens, length, at, drafted = self.block, self.block_len, self.committed_at, self.block_len
        if verified is not None:
            pick = verified.unsqueeze(1)
            tokens, length, at, drafted = (torch.where(pick, report[0], tokens), torch.where(verified, report[1], length),
                                           torch.where(pick, report[2], at), torch.where(verified, report[3], drafted))  # fmt: skip
        self._record_rows(None, shown, finished, length, tokens, at, drafted)

    def _record_rows(self, rows, shown, finished, length, tokens, at, drafted):
        """Write the event fields of ``rows`` (a bool mask; None: all rows). ``tokens`` / ``at`` may be one
        position wider than a block (a one-forward-verify row's last token comes after its whole block)."""
        width = self.block_size + 1
        pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[1]))  # noqa: E731
        fields = torch.cat([torch.stack([shown.long(), finished.long(), length, drafted], dim=1), pad(tokens),
                            pad(at)], dim=1)  # fmt: skip
        self.events.copy_(fields if rows is None else torch.where(rows.unsqueeze(1), fields, self.events))

    def _run_step(self):
        if self._use_graph and self._graph is None:
            self._capture()
        if self._graph is not None:
            self._graph.replay()
        else:
            self._step_body()

    def _capture(self):
        saved = None
        try:
            if self.device.type != "cuda":
                raise RuntimeError(f"the model is on {self.device.type}, and CUDA graphs need a CUDA device")
            saved = self._state()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm-up (and compilation): lazy initialisation must not happen during capture
                    self._body()
                    self._restore(saved)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._body()
            self._restore(saved)  # capture records the work without doing it; the state must not move either way
            self._graph = graph
        except Exception as error:  # capture is an optimisation: never a reason to fail or differ
            if saved is not None:
                torch.cuda.synchronize()
                self._restore(saved)
            if self._compiled:
                logger.warning(f"Compiling the decode step failed ({type(error).__name__}: {error}); capturing it "
                               "uncompiled.")  # fmt: skip
                self._compiled, self._body = False, self._step_body
                return self._capture()
            logger.warning(f"CUDA graph capture failed ({type(error).__name__}: {error}); decoding eagerly.")
            self._use_graph, self._graph = False, None

    _STATE = ("block", "filled", "length", "block_len", "phase", "generated", "steps", "forwards", "committed_at",
              "ended", "finished", "draft_dist", "runner_up")  # fmt: skip

    def _state(self):
        return {name: getattr(self, name).clone() for name in self._STATE if getattr(self, name) is not None}

    def _restore(self, saved):
        for name, value in saved.items():
            getattr(self, name).copy_(value)

    # -- requests ------------------------------------------------------------------------------------------
    def reset(self):
        """Drop every request and the counters (the cache, the settings' tensors and the graph stay)."""
        self.phase.zero_()
        self.block_len.zero_()
        self.forwards.zero_()
        self.num_forwards = 0
        self.slots = [Slot() for _ in range(self.rows)]

    def free_slots(self) -> list[int]:
        return [i for i, slot in enumerate(self.slots) if not slot.busy]

    def add(self, prompts: list[list[int]], slots: list[int], max_new_tokens, min_new_tokens=None, block_sizes=None,
            requests=None, generators=None, verify=False, candidates=None):  # fmt: skip
        """Prefill ``prompts`` into free ``slots`` (one causal forward) and start their first blocks.

        Per-request lists (or one value for all): ``max_new_tokens``, ``min_new_tokens``, ``block_sizes`` (at most
        the engine's), ``requests`` (anything, kept on the slot), ``generators``, ``verify``, ``candidates`` (of a
        verifying row, at most the engine's; None: the engine's; 0: verify in two forwards per block). Returns
        the completed-block events of :meth:`step` (a first block of one token is complete at once).
        """
        n = len(prompts)
        as_list = lambda v, d: [d] * n if v is None else (list(v) if isinstance(v, (list, tuple)) else [v] * n)  # noqa: E731
        max_new, min_new = as_list(max_new_tokens, 1), as_list(min_new_tokens, 0)
        block_sizes, requests, generators = (as_list(block_sizes, self.block_size), as_list(requests, None),
                                             as_list(generators, None))  # fmt: skip
        verify = as_list(verify, False)
        candidates = [self.candidates if c is None else c for c in as_list(candidates, None)]
        longest = max(len(p) for p in prompts)
        for prompt, budget, size in zip(prompts, max_new, block_sizes):
            if not prompt:
                raise ValueError("Every prompt needs at least one token.")
            if len(prompt) + budget > self.max_length:
                raise ValueError(f"A {len(prompt)}-token prompt plus {budget} new tokens exceeds {self.max_length}.")
        for size, check, count in zip(block_sizes, verify, candidates):
            check_block_settings(size, check, count, self.block_size, self.candidates, "the engine's")
        dev = self.device
        rows = torch.tensor(slots, dtype=torch.long, device=dev)
        ids = torch.full((n, longest), self.pad_token_id, dtype=torch.long, device=dev)
        for i, prompt in enumerate(prompts):  # right padding: slot position = token position
            ids[i, : len(prompt)] = torch.tensor(prompt, device=dev)
        lengths = torch.tensor([len(p) for p in prompts], device=dev)
        zero = torch.zeros(n, dtype=torch.long, device=dev)
        hidden = self._forward(ids, zero, lengths, torch.ones(n, dtype=torch.bool, device=dev), rows=rows)
        last = self.model.logits_from_hidden(hidden[torch.arange(n, device=dev), lengths - 1]).unsqueeze(1)
        if not torch.isfinite(last.amax(-1)).all():  # amax keeps NaN and +inf; once per prefill, not per token
            raise FloatingPointError("The model's logits are NaN or infinite (NaN/inf weights, or a dtype that "
                                     "overflows): every token would be garbage.")  # fmt: skip
        self.num_forwards += 1

        do_sample = self.sampling.do_sample[rows].tolist()
        for i, slot in enumerate(slots):
            self.slots[slot] = Slot(request=requests[i], generator=generators[i], do_sample=do_sample[i],
                                    verify=bool(verify[i]), busy=True)  # fmt: skip
        self._set_sampling(any(s.do_sample for s in self.slots if s.busy))
        self.length[rows] = lengths
        self.generated[rows] = 0
        self.max_new[rows] = torch.tensor(max_new, device=dev)
        self.min_new[rows] = torch.tensor(min_new, device=dev)
        self.row_block_size[rows] = torch.tensor(block_sizes, device=dev)
        self.forwards[rows] = 1
        self.ended[rows] = False
        self.verify[rows] = torch.tensor([bool(v) for v in verify], device=dev)
        ahead = [bool(v) and c > 0 for v, c in zip(verify, candidates)]
        self.ahead[rows] = torch.tensor(ahead, device=dev)
        self.row_candidates[rows] = torch.tensor([c if a else 0 for c, a in zip(candidates, ahead)], device=dev)
        noise = None
        if self._sampling:
            noise = torch.ones(n, 1, last.shape[-1], device=dev)
            self._draw(noise, slots)
        sampling = Sampling(*(t[rows] for t in (self.sampling.do_sample, self.sampling.temperature,
                                                self.sampling.top_k, self.sampling.top_p)),
                            filtered=self.sampling.filtered)  # fmt: skip
        first, _ = propose(last, sampling, self.measure, self.mask_token_id, self.eos,
                           (self.min_new[rows] > 0).unsqueeze(1), noise)  # fmt: skip
        starting = torch.zeros(self.rows, dtype=torch.bool, device=dev)
        starting[rows] = True
        firsts = torch.zeros(self.rows, dtype=torch.long, device=dev)
        firsts[rows] = first[:, 0]
        ahead = starting & self.ahead  # one-forward verify: the first block is the first token, verified next step
        self._start_block(starting, firsts, size=torch.where(ahead, 1, self.row_block_size))
        self.finished.zero_()
        complete = starting & self.filled.all(dim=1)
        self._settle(complete)
        self.phase.copy_(torch.where(ahead & ~self.finished, AHEAD, self.phase))
        shown = complete & (~ahead | self.finished)
        self._record(shown, self.finished & shown)
        return self._events()

    def _set_sampling(self, sampling: bool):
        """Sampling needs a noise buffer and a graph that reads it; greedy decoding needs neither."""
        if sampling and self.noise is None:  # one-forward verify also samples the next block's drafts
            width = self.block_size + (self.block_size - 1 if self.candidates else 0)
            self.noise = torch.ones(self.rows, width, self.vocab, device=self.device)
            self.uniform = torch.zeros(self.rows, self.block_size, device=self.device)
            self.draft_dist = torch.ones(self.rows, self.block_size, self.vocab, device=self.device)
        if sampling != self._sampling:
            self._sampling, self._graph = sampling, None

    def _draw(self, noise: torch.Tensor, slots: list[int]):
        """``Exp(1)`` draws into ``noise[i]`` from each sampling slot's own generator: one draw of that shape per
        forward the slot takes part in, so a row's noise does not depend on its neighbours. In a step, a verifying
        slot then draws its ``uniform`` row too."""
        for i, slot in enumerate(slots):
            state = self.slots[slot]
            if state.do_sample and state.busy:
                noise[i].exponential_(generator=state.generator)
                if state.verify and noise is self.noise:
                    self.uniform[i].uniform_(generator=state.generator)

    def _start_block(self, rows: torch.Tensor, first: torch.Tensor, size: torch.Tensor | None = None):
        """Start a block at the ``length`` of the ``rows`` (a bool mask): ``[first, MASK, ...]`` of the rows' block
        size (or ``size``)."""
        size = torch.minimum(self.row_block_size if size is None else size, self.max_new - self.generated)
        block = torch.full_like(self.block, self.pad_token_id)
        if self.mask_token_id is not None:
            block.masked_fill_(self._index < size.unsqueeze(1), self.mask_token_id)
        block[:, 0] = first
        filled = self._index >= size.unsqueeze(1)  # unused positions count as filled
        filled[:, 0] = True
        at = torch.where(self._index == 0, self.forwards.unsqueeze(1), -1)
        pick = rows.unsqueeze(1)
        self.block.copy_(torch.where(pick, block, self.block))
        self.filled.copy_(torch.where(pick, filled, self.filled))
        self.committed_at.copy_(torch.where(pick, at, self.committed_at))
        self.block_len.copy_(torch.where(rows, size, self.block_len))
        self.steps.masked_fill_(rows, 0)
        self.phase.masked_fill_(rows, DENOISE)
        self._close_after_eos()

    def _eos_at(self, where: torch.Tensor) -> torch.Tensor:
        """Filled block positions in ``where`` that hold an EOS the row may stop at (``min_new_tokens``)."""
        produced = self.generated.unsqueeze(1) + self._index  # the token index of every block position
        return where & self.filled & torch.isin(self.block, self.eos) & (produced >= self.min_new.unsqueeze(1))

    def _close_after_eos(self):
        """Positions after a committed EOS are padding: they leave the block (and are no keys for the rest).
        A verifying row's drafted tokens are not committed yet: only its first token counts."""
        if not self.eos.numel():
            return
        is_eos = self._eos_at(
            (self._index < self.block_len.unsqueeze(1)) & (~self.verify.unsqueeze(1) | (self._index == 0))
        )
        kept = torch.where(is_eos, self._index + 1, self.block_size).min(dim=1).values
        hit = is_eos.any(dim=1) & (self.phase == DENOISE)
        self.block_len.copy_(torch.where(hit, torch.minimum(self.block_len, kept), self.block_len))
        self.ended |= hit
        beyond = self._index >= self.block_len.unsqueeze(1)
        self.block.masked_fill_(beyond & (self.phase == DENOISE).unsqueeze(1), self.pad_token_id)
        self.filled |= beyond

    # -- one step ------------------------------------------------------------------------------------------
    def step(self):
        """One forward for every busy slot. Returns the slots whose block completed in it, with their tokens:
        ``[(slot, tokens, committed_at, finished)]`` (``finished``: EOS or max_new_tokens; the caller may also
        :meth:`finish` a slot, e.g. on a stop string)."""
        if self._sampling:
            self._draw(self.noise, list(range(self.rows)))
        self._run_step()
        self.num_forwards += 1
        return self._events()

    def _events(self):
        """Read the step's packed results (the one device-to-host copy of a step) and do the host bookkeeping."""
        events, width = [], self.block_size + 1
        table = self._table = self.events.cpu()
        for r in table[:, SHOWN].nonzero().squeeze(1).tolist():
            row = table[r]
            size, drafted, done = int(row[LENGTH]), int(row[DRAFTED]), bool(row[FINISHED])
            tokens, at = row[EVENT_FIELDS : EVENT_FIELDS + width], row[EVENT_FIELDS + width :]
            new, when = tokens[:size].tolist(), at[:size].tolist()
            slot = self.slots[r]
            slot.block_starts.append(len(slot.tokens))
            if drafted > size and not done:  # (after the row's end nothing was rejected: the draft was just unused)
                slot.rejected.append((len(slot.tokens) + size, tokens[size:drafted].tolist()))
            slot.tokens += new
            if done:
                slot.busy = False
            events.append((r, new, when, done))
        return events

    def committed(self, slot: int) -> list[int]:
        """The tokens of a slot's active block committed so far, up to its first open position, as the last step
        left them (a client may see them before the block completes). Empty for a complete block (the step
        reported it) and for a verifying row (its drafts are not committed)."""
        if self._table is None or self.slots[slot].verify:
            return []
        row, width = self._table[slot], self.block_size + 1
        at = row[EVENT_FIELDS + width : EVENT_FIELDS + width + int(row[LENGTH])]
        still_open = (at < 0).nonzero()  # uncommitted positions have no committing forward
        return row[EVENT_FIELDS : EVENT_FIELDS + int(still_open[0])].tolist() if len(still_open) else []

    def draft(self, slot: int) -> torch.Tensor:
        """A slot's active block as the last step saw it: committed tokens, the latest proposal elsewhere."""
        proposal = torch.cat([self.block[slot, :1], self.proposal[slot, :-1]])
        return torch.where(self.filled[slot], self.block[slot], proposal)[: int(self.block_len[slot])].unsqueeze(0)

    def finish(self, slot: int):
        """End a slot now (stop string, stopping criteria, a client that went away): it frees up."""
        self.phase[slot] = IDLE
        self.block_len[slot] = 0
        self.slots[slot].busy = False
