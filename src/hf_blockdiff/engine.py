# Copyright 2026 The hf_blockdiff authors. Apache-2.0.
"""The decode engine: block-wise denoising on a static KV cache, one fixed-shape step for every forward.

Hub-portable: imports only torch, transformers and its sibling files.

- :class:`SlotCache` preallocates keys and values for ``rows`` slots of ``length`` positions; a slot's position
  ``p`` lives at index ``front + p``, after the scratch slots of one-forward verify's candidate blocks. Every
  forward writes its tokens in place at their own positions: no copies, and rows need not be aligned. A
  denoising step writes its block's provisional keys and values too; the context-causal mask keeps every
  committed token from seeing them, and the block's commit overwrites them.
- A step attends only the valid prefix: the scratch slots and the first ``window`` positions, the smallest
  power of two (at least :attr:`DecodeEngine.MIN_WINDOW`) that holds every busy row's committed tokens and
  block. The host knows each row's length without reading the GPU, so the window costs no sync; on CUDA each
  window has a graph of its own.
- :meth:`DecodeEngine.step` runs one forward of shape ``[rows, block_size]`` in which each row takes its own
  next action: a denoising step of its block, or the causal commit of its finished block (its last logit gives
  the next block's first token). The action is an input of the mask, so one CUDA graph per
  ``(rows, block_size)`` serves both; elsewhere the same code runs eagerly.
- Rows advance independently: a row whose block is done commits while others still denoise, and a row that
  ended idles (or takes a new request, see :meth:`DecodeEngine.add`).
- How a row decodes (threshold denoising, two-forward verify, one-forward verify) is its decoding method
  (:mod:`decoding`): one small class that feeds the step for its rows and updates them after it. With
  one-forward verify the step also carries every row's candidate blocks, in scratch slots.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from transformers.cache_utils import Cache
from transformers.utils import logging

from .attention import CAUSAL, grouped_attention
from .compat import cache_argument
from .decoding import COMMIT, DENOISE, IDLE, Denoising, DraftVerify, StepInputs, StepOutput, VerifyAhead
from .draft_tree import POOL_PER_NODE, DraftTree
from .masks import VerifyScratch, decode_meta, layer_windows
from .noisy_adapter import has_adapter, set_gate
from .policies import CommitRule, Sampling, propose
from .settings import check_block_settings

logger = logging.get_logger(__name__)


class StepEvents(NamedTuple):
    """The packed result of a step for the host, one row per slot (one device-to-host copy per step). On the
    device each field is a ``(rows, 1)`` tensor unless said; on the host, :meth:`of_row` reads one row's values."""

    shown: torch.Tensor  # 1: a block's tokens are output
    finished: torch.Tensor  # 1: the row ended
    length: torch.Tensor  # tokens output
    drafted: torch.Tensor  # a verified block's drafted length: tokens length .. drafted were rejected
    tokens: torch.Tensor  # (rows, block_size + 1) the output tokens (then the rejected ones)
    at: torch.Tensor  # (rows, block_size + 1) the forward that committed each token (-1: not committed)

    def pack(self) -> torch.Tensor:
        return torch.cat([f if f.dim() == 2 else f.unsqueeze(1) for f in self], dim=1)

    @classmethod
    def of_row(cls, row: list[int]) -> StepEvents:
        width = (len(row) - 4) // 2
        return cls(*row[:4], row[4 : 4 + width], row[4 + width :])

    @staticmethod
    def size(block_size: int) -> int:
        return 4 + 2 * (block_size + 1)


class SlotCache(Cache):
    """Static KV cache with per-row write positions (see the module docstring).

    Before each forward the engine sets ``write_index`` (``(n, q)``: the cache index of every input token),
    ``rows`` (None for all slots, or the ``(n,)`` slots a smaller forward covers) and ``window`` (attention reads
    indices ``start .. window``; None: all). Buffers are allocated on the first write, from the shapes the attention
    layers hand over. The first ``front`` indices are scratch slots; position ``p`` lives at ``front + p``. Given
    the model's number of ``layers``, every layer's keys and values are views of one buffer when their shapes
    agree, so that :meth:`move` is one gather and one scatter, not two per layer and tensor.
    """

    def __init__(self, rows: int, length: int, front: int = 0, layers: int | None = None):
        super().__init__(layers=[])
        self.num_rows, self.length, self.front, self.num_layers = rows, length, front, layers
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.buffer: torch.Tensor | None = None  # (2 x layers, rows, heads, length, dim): keys, values of each layer
        self.write_index: torch.Tensor | None = None
        self.rows: torch.Tensor | None = None
        self.window: int | None = None
        self.start = 0  # the first index attention reads (a causal prefill reads from the first position)

    def __len__(self):
        return len(self.keys)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions are always passed explicitly; nothing may derive them from the cache

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if layer_idx == len(self.keys):
            heads, dim = key_states.shape[1], key_states.shape[3]
            shape = (self.num_rows, heads, self.length, dim)
            if layer_idx == 0 and self.num_layers:
                self.buffer = key_states.new_zeros((2 * self.num_layers, *shape))
            if self.buffer is not None and self.buffer.shape[1:] == shape and value_states.shape == key_states.shape:
                self.keys.append(self.buffer[2 * layer_idx])
                self.values.append(self.buffer[2 * layer_idx + 1])
            else:  # layers of other shapes (or more than said) get buffers of their own
                self.buffer = None
                self.keys.append(key_states.new_zeros(shape))
                self.values.append(value_states.new_zeros((*shape[:3], value_states.shape[3])))
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        window = slice(self.start, self.window)
        if self.rows is None:
            index = self.write_index[:, None, :, None].expand_as(key_states)
            keys.scatter_(2, index, key_states)
            values.scatter_(2, index, value_states)
            return keys[:, :, window], values[:, :, window]
        rows, index = self.rows.unsqueeze(1), self.write_index
        keys[rows, :, index] = key_states.transpose(1, 2)
        values[rows, :, index] = value_states.transpose(1, 2)
        return keys[self.rows, :, window], values[self.rows, :, window]

    def move(self, source: torch.Tensor, target: torch.Tensor):
        """Copy every layer's keys and values at cache indices ``source`` to ``target`` (both ``(rows, n)``; where
        they are equal nothing changes): a verified tree node's, from its scratch slot to its position's."""
        one = self.buffer is not None and len(self.keys) == self.num_layers
        for buffer in (self.buffer,) if one else (*self.keys, *self.values):
            shape = (*buffer.shape[:-2], source.shape[1], buffer.shape[-1])
            view = [1] * (buffer.dim() - 4)
            source_, target_ = (i.view(*view, i.shape[0], 1, i.shape[1], 1).expand(shape) for i in (source, target))
            buffer.scatter_(-2, target_, buffer.gather(-2, source_))

    def positions(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of a layer at the slots' positions (index ``p`` = position ``p``), as views."""
        return self.keys[layer_idx][:, :, self.front :], self.values[layer_idx][:, :, self.front :]


@dataclass
class Slot:
    """Host-side bookkeeping of one slot (what the engine needs without reading the GPU)."""

    request: object = None  # whatever the caller attached (generate(): the batch row; serve: the request)
    generator: torch.Generator | None = None  # the row's sampling noise (None: the global generator)
    do_sample: bool = False
    verify: bool = False
    busy: bool = False
    prompt_length: int = 0
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
            ``block_size + (1 + guesses) * candidates * candidate_width`` query positions per row.
        guesses: one-forward verify also carries, for every candidate, this many copies whose first mask is replaced
            by a guess of the causal token there (the draft's 2nd, 3rd, ... choice at the position the causal model
            may reject), one of which is used when it guessed right.
        candidate_width: positions of a candidate (its anchor token, then masks), so a drafted block holds at most
            ``candidate_width - 1`` drafts; None (or more than ``block_size``): the block size.
        tree: one-forward verify checks a tree of drafts (:mod:`draft_tree`): this many nodes besides the chain,
            chosen each step from a pool of paths by the drafter's probabilities (a fixed tree of the likeliest
            paths under a prior where :attr:`choose_tree` is off), or their rank paths (a fixed tree); greedy rows
            walk it, sampling rows check the chain only. 0: the chain.
        anchors: rank paths of the tree nodes the candidates are anchored at (None: the chain's first ones).
    """

    # Whether an sdpa model's forwards run on grouped query heads (attention.py): transformers' sdpa path copies the
    # whole KV cache once per query group whenever a mask is passed, and every forward here has one. The same numbers
    # either way. False (on the class, or on one engine before its first step: a captured graph keeps its path)
    # measures the stock path (benchmarks/bench_engine.py --stock-sdpa); generate() builds a new engine for it.
    grouped_sdpa = True
    # Whether a step attends only the valid prefix of the cache (see the module docstring) instead of all of it; the
    # same tokens either way. False (before the first step, as above) measures attention over every slot.
    key_window = True
    # Whether a prefill that is plain causal attention (sdpa, no sliding window shorter than the prompts) runs as
    # such: keys from the first position, sdpa's ``is_causal`` (flash on CUDA) instead of the dense mask over the
    # window. Right padding makes it exact: a prompt token never sees a later (pad) key, and nobody reads a pad's
    # output or its keys (they are stale slots). False (on the class or one engine) measures the masked prefill.
    causal_prefill = True
    MIN_WINDOW = 256  # the smallest window: fewer graphs for short requests, which cost the same anyway
    # Whether a tree of drafts given as a number of nodes is chosen per step from a pool of paths by the drafter's
    # own probabilities (draft_tree.py) instead of fixed by a prior; lossless either way. False (on the class, or on
    # one engine before it is built) measures the fixed tree (bench_engine.py settings prefixed fixed:).
    choose_tree = True

    def __init__(self, model, rows: int, max_length: int, block_size: int, rule: CommitRule, sampling: Sampling,
                 confidence: str = "probability", eos_token_ids=(), pad_token_id: int = 0,
                 use_cuda_graph: bool | None = None, compile_step: bool | None = None, candidates: int = 0,
                 guesses: int = 1, candidate_width: int | None = None, tree=0, anchors=None):  # fmt: skip
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
        # a candidate: the last kept token (its anchor), then width - 1 masks
        self.width = min(candidate_width or block_size, block_size)
        if self.width < 2 and self.candidates:
            raise ValueError(f"candidate_width must be >= 2 (an anchor and a mask to draft), got {candidate_width}.")
        self.guesses = guesses if self.candidates else 0
        self.groups = 1 + self.guesses  # candidates without a guess of the causal token they follow, then with each
        # the tree of drafts a one-forward-verifying row checks: the chain at its slots, other nodes in scratch slots
        pool = POOL_PER_NODE * tree if self.choose_tree and isinstance(tree, int) else None
        self.tree = None
        if self.candidates:
            self.tree = DraftTree(block_size, tree, self.candidates, self.guesses, anchors, pool)
        self.nodes = self.tree.nodes if self.tree else 0
        self.scratch = self.nodes + self.groups * self.candidates * self.width  # scratch slots, before the positions
        self.queries = block_size + self.scratch
        layers = getattr(model.config.get_text_config(decoder=True), "num_hidden_layers", None)
        self.cache = SlotCache(rows, self.scratch + self.slots_per_row, front=self.scratch, layers=layers)
        self.cache_arg = cache_argument(type(model.model).forward)
        long = dict(dtype=torch.long, device=device)
        # Per-row state: all updated in place, so a captured graph that reads it stays valid.
        self.block = torch.full((rows, block_size), pad_token_id, **long)  # the active block's tokens
        self.filled = torch.zeros(rows, block_size, dtype=torch.bool, device=device)
        self.length = torch.zeros(rows, **long)  # committed tokens in the cache = the block's first position
        self.block_len = torch.zeros(rows, **long)  # positions of the block in use (0 = idle)
        self.phase = torch.zeros(rows, **long)  # decoding.IDLE / DENOISE / COMMIT / AHEAD
        # The decoding methods this engine runs, and each row's (an index into them; docs/design.md 2.5, 2.6).
        self.methods = (Denoising(),) if block_size == 1 else (
            Denoising(), DraftVerify(), *([VerifyAhead()] if self.candidates else []))  # fmt: skip
        self.method = torch.zeros(rows, **long)
        self.row_block_size = torch.ones(rows, **long)
        self.generated = torch.zeros(rows, **long)  # tokens of earlier blocks
        self.max_new = torch.zeros(rows, **long)
        self.min_new = torch.zeros(rows, **long)
        self.steps = torch.zeros(rows, **long)  # denoising steps spent on the active block
        self.forwards = torch.zeros(rows, **long)  # forwards each row took part in
        self.committed_at = torch.zeros(rows, block_size, **long)  # the row's forward that committed a position
        self.ended = torch.zeros(rows, dtype=torch.bool, device=device)
        self.verify = torch.zeros(rows, dtype=torch.bool, device=device)  # rows whose block holds drafts
        self.row_candidates = torch.zeros(rows, **long)  # candidates a one-forward-verify row uses (<= candidates)
        self.proposal = torch.zeros(rows, block_size, **long)
        # the draft's next choices at each position (the guesses of its copies), a mask where there is none; the
        # log-probability of each position's choices (rank 0: the draft), which choose a tree per step
        choices = self.tree.choices if self.tree else 1
        self.alternatives = torch.zeros(rows, block_size + 1, choices, **long)
        self.draft_logp = torch.zeros(rows, block_size + 1, 1 + choices, device=device)
        # the pool slots (draft_tree.py) each row's tree nodes carry this step
        self.carried = torch.zeros(rows, self.nodes, **long)
        self.events = torch.zeros(rows, StepEvents.size(block_size), **long)
        self._table = None  # the last step's events on the host (see committed())
        self.vocab = model.config.get_text_config(decoder=True).vocab_size
        self._sampling = False  # whether any slot samples (a graph is captured for one setting)
        self.noise = None  # Exp(1) draws of every sampling row, for every forward
        self.uniform = None  # U(0, 1) draws of sampling rows that verify (speculative acceptance)
        self.draft_dist = None  # the distribution each drafted token of a verifying, sampling row came from
        self.num_forwards = 0
        self.slots = [Slot() for _ in range(rows)]
        self._graphs: dict[int | None, torch.cuda.CUDAGraph] = {}  # one per key window (None: all slots)
        self._use_graph = device.type == "cuda" if use_cuda_graph is None else use_cuda_graph
        self._compiled = bool(self._use_graph and (compile_step is None or compile_step))
        if self._compiled:
            # Every engine compiles the same function, once per shape; past dynamo's recompile limit (8) later
            # engines would silently run uncompiled, so allow one compilation per engine this process builds.
            config = torch._dynamo.config
            config.recompile_limit = max(getattr(config, "recompile_limit", 8), 64)
        self._body = torch.compile(self._step_body, dynamic=False) if self._compiled else self._step_body
        self._index = torch.arange(block_size, device=device)
        # Per query position: its offset from the row's length and its cache slot. The block, then the tree's other
        # nodes (at their depth: per row, see _forward), then the candidates (candidate c: its anchor's depth + j).
        self._tree = self.tree.tensors(device) if self.tree else None
        q = torch.arange(self.queries - block_size - self.nodes, device=device)
        depths = [torch.zeros(self.nodes, **long), self._tree["depth"][self._tree["anchors"]][
            (q // self.width) % self.candidates] + q % self.width] if self.tree else []  # fmt: skip
        self._offsets = torch.cat([self._index, *depths])
        self._scratch = torch.cat([torch.zeros_like(self._index), torch.arange(self.scratch, device=device)])
        self._is_block = torch.arange(self.queries, device=device) < block_size
        self._is_copy = torch.arange(self.queries, device=device) >= block_size + self.nodes
        self.gate = torch.zeros(rows, self.queries, dtype=model.dtype, device=device) if has_adapter(model) else None
        self.key = None  # set by whoever caches the engine for reuse (generate())

    # -- the forward ---------------------------------------------------------------------------------------
    def _prefill_is_plain_causal(self, longest: int) -> bool:
        """Whether a prefill of prompts up to ``longest`` tokens may run as plain causal attention
        (:attr:`causal_prefill`): the model runs :data:`attention.GROUPED_SDPA`, which reads the vouching keyword,
        and no layer's sliding window is shorter than the prompts."""
        config = self.model.config
        if not (self.causal_prefill and self.grouped_sdpa and config._attn_implementation == "sdpa"):
            return False
        windows = layer_windows(config, self.model._mask_per_layer_type).values()
        return all(window is None or longest <= window for window in windows)

    def _plain_causal_masks(self, n: int, q: int):
        """What the base model's mask argument gets in a plain causal prefill (attention does not read it): a 4D
        tensor, so the model builds no mask of its own; one per layer type where it takes a mapping."""
        placeholder = torch.ones((), dtype=torch.bool, device=self.device).expand(n, 1, q, q)
        types = layer_windows(self.model.config, self.model._mask_per_layer_type)
        return placeholder if None in types else dict.fromkeys(types, placeholder)

    def _forward(self, ids, length, block_len, causal, rows=None, gate=None, scratch=None, plain_causal=False):
        """Hidden states of ``ids`` (``(n, q)``) placed at ``length ..`` of their rows, masked by the block rule.
        ``gate`` (``(n, q)``): where a noisy-scope adapter acts (the positions being denoised); off when None.
        ``scratch`` (a step of an engine with candidates): what each row carries in the scratch slots after its
        block (see :func:`masks.decode_meta`); ``ids`` then has the step's full query width.
        ``plain_causal``: a prefill from position 0 that :meth:`_prefill_is_plain_causal` allows (no mask built)."""
        q = ids.shape[1]
        if plain_causal:  # the keys are this forward's own tokens, from the first position
            positions = length.unsqueeze(1) + torch.arange(q, device=ids.device)
            window = self.cache.window
            self.cache.write_index, self.cache.rows = positions + self.scratch, rows
            self.cache.start, self.cache.window = self.scratch, self.scratch + q
            try:
                return self.model.model(input_ids=ids, attention_mask=self._plain_causal_masks(ids.shape[0], q),
                                        position_ids=positions, use_cache=True,
                                        **{self.cache_arg: self.cache, CAUSAL: True}).last_hidden_state  # fmt: skip
            finally:
                self.cache.start, self.cache.window = 0, window
        if scratch is None:
            positions = length.unsqueeze(1) + torch.arange(q, device=ids.device)
            slots = positions + self.scratch
            if self.candidates:  # the scratch slots exist; nothing of this forward uses them
                scratch = self._no_scratch(ids.shape[0])
            offset = length + self.scratch
        else:
            offsets = self._offsets.expand(ids.shape[0], -1)
            if self.nodes:  # tree nodes sit at their depth
                b = self.block_size
                depth = self._tree["depth"][scratch.carried]
                offsets = torch.cat([offsets[:, :b], depth, offsets[:, b + self.nodes :]], dim=1)
            positions = length.unsqueeze(1) + offsets
            slots = offset = torch.where(self._is_block, positions + self.scratch, self._scratch)
        window = self.cache.window - self.scratch if self.cache.window is not None else self.slots_per_row
        self.cache.write_index, self.cache.rows = slots, rows
        # Only an idle row's queries may lie past the window (a busy row's block is inside it): they look at the
        # window's last keys instead, which keeps the mask in bounds and their rows non-empty; nobody reads them.
        offset = offset.clamp(max=self.scratch + window - (q if offset.dim() == 1 else 1))
        meta = decode_meta(length, block_len, causal, window, scratch)
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

    def _no_scratch(self, n: int) -> VerifyScratch:
        """Scratch slots that no row of an ``n``-row forward uses (verifying rows' methods fill them in)."""
        off = lambda width: torch.zeros(n, width, dtype=torch.bool, device=self.device)  # noqa: E731
        return VerifyScratch(self._tree, off(1)[:, 0], off(self.nodes), off(self.groups * self.candidates),
                             self.width, self.groups, self.block_size, self.carried[:n])  # fmt: skip

    def _step_body(self):
        """One forward plus everything it decides, as device operations only (no host reads, no data-dependent
        shapes), so that a single CUDA graph can hold it. Each decoding method feeds and updates its own rows;
        results for the host land in ``self.events``."""
        mine = [self.method == i for i in range(len(self.methods))]
        ids, scratch = self.block, None
        if self.candidates:  # the scratch queries: tree nodes and candidate blocks of one-forward-verifying rows
            masks = self.block.new_full((self.rows, self.scratch), self.mask_token_id)
            ids = torch.cat([self.block, masks], dim=1)
            scratch = self._no_scratch(self.rows)
        inputs = StepInputs(ids, torch.zeros(self.rows, self.queries, dtype=torch.bool, device=self.device), scratch)
        for method, rows in zip(self.methods, mine):
            method.feed(self, rows, inputs)
        gate = None
        if self.gate is not None:  # a noisy-scope adapter acts where blocks are denoised, never on a causal position
            self.gate.copy_(inputs.gate)
            gate = self.gate
        causal = self.phase != DENOISE
        hidden = self._forward(inputs.ids, self.length, self.block_len, causal, gate=gate, scratch=inputs.scratch)
        logits = self.model.logits_from_hidden(hidden[:, : self.block_size])
        self.forwards += self.phase != IDLE
        produced = self.generated.unsqueeze(1) + self._index + 1  # the token index each logit predicts
        noise = self.noise[:, : self.block_size] if self._sampling else None
        tokens, conf, dist = propose(logits, self.sampling, self.measure, self.mask_token_id, self.eos,
                                     produced < self.min_new.unsqueeze(1), noise, with_dist=True)  # fmt: skip
        self.proposal.copy_(tokens)
        out = StepOutput(hidden, tokens, conf, dist)
        for method, rows in zip(self.methods, mine):
            method.update(self, rows, out)

    def _settle(self, complete):
        """Rows whose block just completed: finished (EOS, budget) ones go idle, the others commit next. Returns
        the finished rows."""
        finished = complete & (self.ended | (self.generated + self.block_len >= self.max_new))
        finished &= ~self.verify | (self.block_len <= 1)  # a verified block may keep fewer tokens than drafted
        self.phase.copy_(torch.where(finished, IDLE, torch.where(complete, COMMIT, self.phase)))
        return finished

    def _record_rows(self, rows, shown, finished, length, tokens, at, drafted):
        """Write the events of ``rows`` (a bool mask; None: all rows). ``tokens`` / ``at`` may be one position
        wider than a block (a one-forward-verify row's last token comes after its whole block)."""
        width = self.block_size + 1
        pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[1]))  # noqa: E731
        fields = StepEvents(shown.long(), finished.long(), length, drafted, pad(tokens), pad(at)).pack()
        self.events.copy_(fields if rows is None else torch.where(rows.unsqueeze(1), fields, self.events))

    def _window_for(self, extent: int) -> int | None:
        """The cache indices a forward attends (``SlotCache.window``) when no row's tokens reach past position
        ``extent``: the scratch slots and a power-of-two window of positions, or None (all) when that is not
        smaller than the slots, or :attr:`key_window` is off."""
        if not self.key_window:
            return None
        window = max(self.MIN_WINDOW, 1 << max(extent - 1, 0).bit_length())
        return self.scratch + window if window < self.slots_per_row else None

    def _run_step(self):
        # Every busy row's committed tokens and block lie below this (the host's count equals the GPU's length).
        extent = max((s.prompt_length + len(s.tokens) for s in self.slots if s.busy), default=0) + self.block_size
        self.cache.window = window = self._window_for(extent)
        # The attention switch wraps the step, outside the compiled body: the model's config is sdpa again for
        # anything else that runs it (training, a plain forward), and compiled code sees one value throughout.
        with grouped_attention(self.model.config, self.grouped_sdpa):
            if self._use_graph and window not in self._graphs:
                self._capture(window)
            if window in self._graphs:
                self._graphs[window].replay()
            else:
                self._step_body()

    def _capture(self, window):
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
            self._graphs[window] = graph
        except Exception as error:  # capture is an optimisation: never a reason to fail or differ
            if saved is not None:
                torch.cuda.synchronize()
                self._restore(saved)
            if self._compiled:
                logger.warning(f"Compiling the decode step failed ({type(error).__name__}: {error}); capturing it "
                               "uncompiled.")  # fmt: skip
                self._compiled, self._body = False, self._step_body
                self._graphs.clear()  # (graphs of other windows were compiled: keep one code path)
                return self._capture(window)
            logger.warning(f"CUDA graph capture failed ({type(error).__name__}: {error}); decoding eagerly.")
            self._use_graph = False
            self._graphs.clear()

    _STATE = ("block", "filled", "length", "block_len", "phase", "generated", "steps", "forwards", "committed_at",
              "ended", "draft_dist", "alternatives", "draft_logp", "carried")  # fmt: skip

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

    @torch.no_grad()  # (the cache is written in place; nothing here is ever differentiated)
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
        self.cache.window = self._window_for(longest)
        plain_causal = self._prefill_is_plain_causal(longest)  # (before grouped_attention renames the backend)
        with grouped_attention(self.model.config, self.grouped_sdpa):
            hidden = self._forward(ids, zero, lengths, torch.ones(n, dtype=torch.bool, device=dev), rows=rows,
                                   plain_causal=plain_causal)  # fmt: skip
        last = self.model.logits_from_hidden(hidden[torch.arange(n, device=dev), lengths - 1]).unsqueeze(1)
        if not torch.isfinite(last.amax(-1)).all():  # amax keeps NaN and +inf; once per prefill, not per token
            raise FloatingPointError("The model's logits are NaN or infinite (NaN/inf weights, or a dtype that "
                                     "overflows): every token would be garbage.")  # fmt: skip
        self.num_forwards += 1

        do_sample = self.sampling.do_sample[rows].tolist()
        for i, slot in enumerate(slots):
            self.slots[slot] = Slot(request=requests[i], generator=generators[i], do_sample=do_sample[i],
                                    verify=bool(verify[i]), busy=True, prompt_length=len(prompts[i]))  # fmt: skip
        self._set_sampling(any(s.do_sample for s in self.slots if s.busy))
        self.length[rows] = lengths
        self.generated[rows] = 0
        self.max_new[rows] = torch.tensor(max_new, device=dev)
        self.min_new[rows] = torch.tensor(min_new, device=dev)
        self.row_block_size[rows] = torch.tensor(block_sizes, device=dev)
        self.forwards[rows] = 1
        self.ended[rows] = False
        kinds = [VerifyAhead if v and c > 0 else DraftVerify if v else Denoising for v, c in zip(verify, candidates)]
        self.method[rows] = torch.tensor([self._method_index(kind) for kind in kinds], device=dev)
        self.verify[rows] = torch.tensor([kind.drafts for kind in kinds], device=dev)
        self.row_candidates[rows] = torch.tensor(
            [c if kind is VerifyAhead else 0 for c, kind in zip(candidates, kinds)], device=dev
        )
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
        shown, finished = torch.zeros_like(starting), torch.zeros_like(starting)
        for i, method in enumerate(self.methods):
            row_shown, row_finished = method.start(self, starting & (self.method == i), firsts)
            shown |= row_shown
            finished |= row_finished
        self._record_rows(None, shown, finished & shown, self.block_len, self.block, self.committed_at, self.block_len)
        return self._events()

    def _method_index(self, kind: type) -> int:
        for i, method in enumerate(self.methods):
            if type(method) is kind:
                return i
        raise ValueError(f"This engine does not run {kind.__name__} (block size {self.block_size}, "
                         f"{self.candidates} candidates).")  # fmt: skip

    def _set_sampling(self, sampling: bool):
        """Sampling needs a noise buffer and a graph that reads it; greedy decoding needs neither."""
        if sampling and self.noise is None:  # one-forward verify also samples the next block's drafts
            width = self.block_size + (self.block_size - 1 if self.candidates else 0)
            self.noise = torch.ones(self.rows, width, self.vocab, device=self.device)
            self.uniform = torch.zeros(self.rows, self.block_size, device=self.device)
            self.draft_dist = torch.ones(self.rows, self.block_size, self.vocab, device=self.device)
        if sampling != self._sampling:
            self._sampling = sampling
            self._graphs.clear()

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
        self._close_after_eos(rows)

    def _eos_at(self, where: torch.Tensor, block: torch.Tensor | None = None) -> torch.Tensor:
        """Filled block positions in ``where`` that hold an EOS the row may stop at (``min_new_tokens``); ``block``:
        tokens in place of the block's (a verified tree's kept path)."""
        produced = self.generated.unsqueeze(1) + self._index  # the token index of every block position
        block = self.block if block is None else block
        return where & self.filled & torch.isin(block, self.eos) & (produced >= self.min_new.unsqueeze(1))

    def _close_after_eos(self, rows: torch.Tensor):
        """Positions after a committed EOS in the denoising ``rows`` are padding: they leave the block (and are no
        keys for the rest). A verifying row's drafted tokens are not committed yet: only its first token counts."""
        if not self.eos.numel():
            return
        is_eos = self._eos_at(
            (self._index < self.block_len.unsqueeze(1)) & (~self.verify.unsqueeze(1) | (self._index == 0))
        )
        kept = torch.where(is_eos, self._index + 1, self.block_size).min(dim=1).values
        denoising = rows & (self.phase == DENOISE)
        hit = is_eos.any(dim=1) & denoising
        self.block_len.copy_(torch.where(hit, torch.minimum(self.block_len, kept), self.block_len))
        self.ended |= hit
        beyond = (self._index >= self.block_len.unsqueeze(1)) & rows.unsqueeze(1)
        self.block.masked_fill_(beyond & denoising.unsqueeze(1), self.pad_token_id)
        self.filled |= beyond

    # -- one step ------------------------------------------------------------------------------------------
    @torch.no_grad()
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
        events = []
        # Python lists, once: indexing a tensor per row costs microseconds each, which at batch 64 with a block of
        # one token (every row shows every step) left the GPU idle for a large part of the step.
        table = self._table = self.events.cpu().tolist()
        for r, values in enumerate(table):
            if not values[0]:
                continue
            row = StepEvents.of_row(values)
            size, drafted, done, tokens = row.length, row.drafted, bool(row.finished), row.tokens
            new, when = tokens[:size], row.at[:size]
            slot = self.slots[r]
            slot.block_starts.append(len(slot.tokens))
            if drafted > size and not done:  # (after the row's end nothing was rejected: the draft was just unused)
                slot.rejected.append((len(slot.tokens) + size, tokens[size:drafted]))
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
        row = StepEvents.of_row(self._table[slot])
        at = row.at[: row.length]
        still_open = [i for i, forward in enumerate(at) if forward < 0]  # uncommitted: no committing forward
        return row.tokens[: still_open[0]] if still_open else []

    def draft(self, slot: int) -> torch.Tensor:
        """A slot's active block as the last step saw it: committed tokens, the latest proposal elsewhere."""
        proposal = torch.cat([self.block[slot, :1], self.proposal[slot, :-1]])
        return torch.where(self.filled[slot], self.block[slot], proposal)[: int(self.block_len[slot])].unsqueeze(0)

    def finish(self, slot: int):
        """End a slot now (stop string, stopping criteria, a client that went away): it frees up."""
        self.phase[slot] = IDLE
        self.block_len[slot] = 0
        self.slots[slot].busy = False
