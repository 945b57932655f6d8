# Copyright 2026 The hf_blockdiff authors. Apache-2.0.
"""Context-causal attention masks (docs/design.md 2.1, 2.3): the one module that owns them.

Hub-portable: imports only torch, transformers and its sibling files.

Every mask is described by per-token metadata and one rule, :func:`context_causal_rule`. The boolean mask
for sdpa, the additive float mask for eager and the flex-attention ``BlockMask`` are all evaluated from that
same rule, so the backends cannot disagree on what may attend to what.

Token metadata (one row per sequence, one column per key position):

- ``stream``: ``CLEAN`` (-1) for committed/clean tokens, ``0..S-1`` for the S noisy copies;
- ``block``: block index. Context tokens (prompt) get distinct negative ids, so each is its own block;
- ``position``: the rotary position id (sliding windows are measured on it, never on the raw index);
- ``valid``: False for padding.

The rule, for a query ``q`` and key ``k`` (both absolute indices into the key sequence):

- clean query: clean keys with ``k <= q`` (token-causal, exactly the AR model);
- noisy query: noisy keys of its own copy and block (bidirectional), clean keys of earlier blocks;
- never a padding key; never a key further back than the layer's sliding window;
- every query may attend itself, so a padding row is never empty (an empty row is NaN in sdpa).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention import GROUPED_SDPA

CLEAN = -1
IGNORE_INDEX = -100

# Attention implementations that accept an arbitrary mask. Flash-attention only knows causal/sliding
# patterns and cannot express a bidirectional block next to a causal context.
MASKABLE_BACKENDS = ("sdpa", "eager", "flex_attention")


def attention_backend(config) -> str:
    """The model's attention implementation, or a clear error when it cannot take our mask."""
    impl = getattr(config, "_attn_implementation", None) or "eager"
    if impl == GROUPED_SDPA:  # sdpa with grouped query heads (attention.py): the same bool masks
        return "sdpa"
    if impl in MASKABLE_BACKENDS:
        return impl
    hint = (
        "Reload the model with attn_implementation='sdpa' (works everywhere) or 'flex_attention' (CUDA), "
        "e.g. AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, attn_implementation='sdpa')."
    )
    if "flash" in impl:
        raise ValueError(
            f"Block diffusion needs a context-causal attention mask (bidirectional inside the active block, "
            f"causal over the context), which {impl!r} cannot express. {hint}"
        )
    raise ValueError(f"Attention implementation {impl!r} does not take a custom attention mask. {hint}")


def layer_windows(config, per_layer_type: bool) -> dict[str | None, int | None]:
    """Sliding window of every mask the model consumes: ``{layer_type: window}`` or ``{None: window}``.

    A stock model applies its sliding window while building its own mask; a 4D mask passed in replaces that,
    so the window must live inside our mask. Models with several layer types take one mask per type.
    """
    cfg = config.get_text_config(decoder=True)
    if not per_layer_type:
        return {None: getattr(cfg, "sliding_window", None)}
    windows: dict[str | None, int | None] = {}
    for layer_type in sorted(set(cfg.layer_types)):
        if layer_type == "full_attention":
            windows[layer_type] = None
        elif layer_type == "sliding_attention":
            windows[layer_type] = cfg.sliding_window
        else:
            raise NotImplementedError(
                f"Layer type {layer_type!r} is not supported by the context-causal mask (supported: "
                "'full_attention', 'sliding_attention')."
            )
    return windows


TOKEN_FIELDS = ("stream", "block", "position", "valid", "pre", "last")


@dataclass
class TokenMeta:
    """Per-token metadata of the key sequence, each ``(batch, kv_len)``. See the module docstring.

    ``pre`` / ``last`` (decode steps of one-forward verify, else None): a verified tree of drafts
    (:mod:`draft_tree`). A tree token has its depth-first interval ``[pre, last]`` (-1 elsewhere) and is seen by the
    tree tokens below it; a candidate block anchored at a tree token has that token's ``pre`` and sees the tree
    tokens above its anchor (the anchor is its own first token)."""

    stream: torch.Tensor
    block: torch.Tensor
    position: torch.Tensor
    valid: torch.Tensor
    pre: torch.Tensor | None = None
    last: torch.Tensor | None = None

    def padded_to(self, length: int) -> TokenMeta:
        """Pad with invalid clean tokens, so that kernels reading past the end stay in bounds."""
        extra = length - self.stream.shape[1]
        if extra <= 0:
            return self

        def pad(t, value):
            return torch.nn.functional.pad(t, (0, extra), value=value)

        tree = (pad(self.pre, -1), pad(self.last, -1)) if self.pre is not None else (None, None)
        return TokenMeta(pad(self.stream, CLEAN), pad(self.block, 0), pad(self.position, 0), pad(self.valid, False),
                         *tree)  # fmt: skip

    def followed_by(self, other: TokenMeta) -> TokenMeta:
        """The key sequence of these tokens, then ``other``'s (both with a tree's intervals, or neither)."""
        fields = TOKEN_FIELDS if self.pre is not None else TOKEN_FIELDS[:4]
        return TokenMeta(*(torch.cat([getattr(self, f), getattr(other, f)], dim=1) for f in fields))


def context_causal_rule(meta: TokenMeta, q_offset, window: int | None):
    """The mask rule as ``rule(batch, head, q, kv) -> bool``; queries are keys ``q_offset ..`` of the sequence.

    ``q_offset`` is an int, a ``(batch,)`` tensor when each row's queries start elsewhere (the decode engine's
    per-row cache positions), or a ``(batch, q_len)`` tensor naming every query's key index (the engine's
    candidate blocks live in scratch slots, away from their rows' other queries). Written with tensor ops only, so the same function is evaluated densely (broadcast
    index tensors) and as a flex-attention ``mask_mod`` (scalar index tensors).
    """
    stream, block, position, valid = meta.stream, meta.block, meta.position, meta.valid

    def rule(b, h, q, kv):
        if not isinstance(q_offset, torch.Tensor):
            qa = q + q_offset
        else:
            qa = q_offset[b, q] if q_offset.dim() == 2 else q + q_offset[b]
        q_stream, k_stream = stream[b, qa], stream[b, kv]
        q_block, k_block = block[b, qa], block[b, kv]
        k_clean = k_stream == CLEAN
        from_clean_query = k_clean & (kv <= qa)
        from_noisy_query = torch.where(k_clean, k_block < q_block, (k_stream == q_stream) & (k_block == q_block))
        if meta.pre is not None:  # one-forward verify's tree: tree keys by ancestry, context keys by their block
            q_pre, k_pre, k_last = meta.pre[b, qa], meta.pre[b, kv], meta.last[b, kv]
            above = (k_pre <= q_pre) & (q_pre <= k_last) & ((q_stream == CLEAN) | (k_pre < q_pre))
            from_tree = k_clean & torch.where(k_pre >= 0, above, k_block < 0)
            own_copy = ~k_clean & (k_stream == q_stream) & (k_block == q_block)
            tree_query = torch.where(q_stream == CLEAN, from_tree, from_tree | own_copy)
            from_clean_query = torch.where(q_pre >= 0, tree_query, from_clean_query)
            from_noisy_query = torch.where(q_pre >= 0, tree_query, from_noisy_query)
        allowed = torch.where(q_stream == CLEAN, from_clean_query, from_noisy_query) & valid[b, kv]
        if window is not None:
            allowed = allowed & (position[b, qa] - position[b, kv] < window)
        return allowed | (qa == kv)

    return rule


def dense_mask(rule, batch: int, q_len: int, kv_len: int, device) -> torch.Tensor:
    """Evaluate a rule on the full grid: a ``(batch, 1, q_len, kv_len)`` bool tensor (True = attend)."""
    b = torch.arange(batch, device=device).view(batch, 1, 1, 1)
    q = torch.arange(q_len, device=device).view(1, 1, q_len, 1)
    kv = torch.arange(kv_len, device=device).view(1, 1, 1, kv_len)
    return rule(b, None, q, kv)


FLEX_TILE = 128


def flex_block_mask(meta: TokenMeta, q_offset: int, window: int | None, q_len: int, kv_len: int, device):
    """The rule as a flex-attention ``BlockMask``: empty tiles are skipped by the kernel."""
    from torch.nn.attention.flex_attention import create_block_mask

    # The kernel may evaluate the mask up to the end of the last tile; padding keeps those reads in bounds.
    def round_up(n):
        return -(-n // FLEX_TILE) * FLEX_TILE

    rule = context_causal_rule(meta.padded_to(max(q_offset + round_up(q_len), round_up(kv_len))), q_offset, window)
    # Compiled mask construction evaluates the rule tile by tile instead of materialising (batch, q, kv) tensors.
    compile_ = torch.device(device).type == "cuda"
    return create_block_mask(rule, meta.stream.shape[0], None, q_len, kv_len, device=device, _compile=compile_)


def render_mask(meta: TokenMeta, q_offset: int, q_len: int, window: int | None, backend: str, dtype):
    """The mask in the format ``backend`` consumes: bool (sdpa), additive float (eager) or BlockMask (flex)."""
    batch, kv_len = meta.stream.shape
    device = meta.stream.device
    if backend == "flex_attention":
        return flex_block_mask(meta, q_offset, window, q_len, kv_len, device)
    allowed = dense_mask(context_causal_rule(meta, q_offset, window), batch, q_len, kv_len, device)
    if backend == "eager":
        zero = torch.zeros((), dtype=dtype, device=device)
        return torch.where(allowed, zero, torch.finfo(dtype).min)
    return allowed


def render_masks(config, meta: TokenMeta, q_offset: int, q_len: int, dtype, per_layer_type: bool):
    """One mask per layer type (a dict, for models that take a mapping) or a single mask."""
    backend = attention_backend(config)
    rendered: dict[int | None, object] = {}
    masks = {}
    for layer_type, window in layer_windows(config, per_layer_type).items():
        if window not in rendered:  # layer types with the same window share one mask
            rendered[window] = render_mask(meta, q_offset, q_len, window, backend, dtype)
        masks[layer_type] = rendered[window]
    return masks[None] if None in masks else masks


# ----------------------------------------------------------------------------------------------------------
# Layouts


def block_grid(block_size: int, attention_mask: torch.Tensor, labels: torch.Tensor | None = None):
    """Block index and in-block offset of every token, two ``(batch, length)`` tensors (docs/design.md 2.3).

    Blocks start where inference would start them: every contiguous run of supervised tokens
    (``labels != -100``; the real tokens when no labels are given) starts a fresh grid at its first token, as
    block 0 starts right after the prompt and each assistant turn of a conversation starts after its history.
    Tokens outside the runs are context: each is a one-token block of its own, so the noisy copy of a context
    token sees exactly what its clean copy sees; their offset is -1. Offset 0 marks a block-first token.

    Block ids increase along the row (the mask compares them: a noisy block sees clean keys of smaller ids) and
    are shifted so that the first supervised block is 0: context before it has negative ids. Blocks need not
    align across rows.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}.")
    supervised = attention_mask.bool() if labels is None else (labels != IGNORE_INDEX)
    length = supervised.shape[1]
    index = torch.arange(length, device=supervised.device).expand_as(supervised)
    run_start = supervised & ~torch.nn.functional.pad(supervised[:, :-1], (1, 0), value=False)
    rel = index - torch.where(run_start, index, 0).cummax(dim=1).values  # distance to the run's first token
    offsets = torch.where(supervised, rel % block_size, -1)
    unit_first = offsets <= 0  # first token of a block, or a context token (a block of its own)
    units = unit_first.long().cumsum(dim=1) - 1
    # Units before the first supervised token; all of them when the row is context only.
    first = torch.where(supervised, units, units[:, -1:] + 1).min(dim=1, keepdim=True).values
    return units - first, offsets


def positions_from_padding(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip padding (left or right), as transformers' generate computes them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def training_meta(
    blocks: torch.Tensor, positions: torch.Tensor, attention_mask: torch.Tensor, copies: int
) -> TokenMeta:
    """Metadata of the training layout ``[x_t^1; ..; x_t^S; x]``: S noisy copies, then the clean sequence."""
    batch, length = blocks.shape
    stream = torch.arange(copies + 1, device=blocks.device)
    stream[-1] = CLEAN
    return TokenMeta(
        stream=stream.repeat_interleave(length).unsqueeze(0).expand(batch, -1),
        block=blocks.repeat(1, copies + 1),
        position=positions.repeat(1, copies + 1),
        valid=attention_mask.bool().repeat(1, copies + 1),
    )


def denoise_meta(
    prefix_positions: torch.Tensor, prefix_valid: torch.Tensor, block_positions: torch.Tensor
) -> TokenMeta:
    """Metadata of one denoising step: a noisy block against the cached clean prefix ``[prefix; block]``."""
    batch, size = block_positions.shape
    prefix_len = prefix_positions.shape[1]
    device = block_positions.device
    stream = torch.cat(
        [torch.full((prefix_len,), CLEAN, device=device), torch.zeros(size, dtype=torch.long, device=device)]
    )
    block = torch.cat(
        [torch.full((prefix_len,), -1, device=device), torch.zeros(size, dtype=torch.long, device=device)]
    )
    return TokenMeta(
        stream=stream.unsqueeze(0).expand(batch, -1),
        block=block.unsqueeze(0).expand(batch, -1),
        position=torch.cat([prefix_positions, block_positions], dim=1),
        valid=torch.cat([prefix_valid.bool(), torch.ones(batch, size, dtype=torch.bool, device=device)], dim=1),
    )


@dataclass
class VerifyScratch:
    """What the one-forward-verifying rows of a decode step put in its scratch slots (docs/design.md 2.6): the
    off-chain nodes of their tree of drafts, then their candidate blocks (``groups`` copies of ``C`` candidates
    of ``width`` tokens, candidate ``c`` anchored at tree slot ``tree["anchors"][c]``)."""

    tree: dict  # draft_tree.DraftTree.tensors()
    ahead: torch.Tensor  # (rows,) bool: rows whose block is a verified tree
    nodes: torch.Tensor  # (rows, nodes) bool: the off-chain tree nodes each row carries
    copies: torch.Tensor  # (rows, groups * C) bool: the candidate blocks each row carries
    width: int
    groups: int
    chain: int  # tree slots of the chain: the block size
    carried: torch.Tensor  # (rows, nodes): the pool slot (draft_tree.py) each tree node of a row holds


def decode_meta(length: torch.Tensor, block_len: torch.Tensor, causal: torch.Tensor, slots: int,
                scratch: VerifyScratch | None = None) -> TokenMeta:  # fmt: skip
    """Metadata of a decode-engine cache of ``slots`` positions (an ordinary slot's index = its position id), for one step.

    Per row: ``length`` committed tokens (clean context), then the active block of ``block_len`` tokens at slots
    ``length ..``; the block is a noisy block (bidirectional) unless ``causal`` (its commit or verifying forward).
    Every other slot (stale provisional keys, positions after an EOS inside the block) is invalid.

    ``scratch`` (an engine with one-forward verify): scratch slots before the ``slots`` ordinary ones (in front, so
    that a prefix of the keys, scratch slots and the first positions, holds everything a step may attend) hold the
    off-chain nodes of the verifying rows' trees (each the pool path ``scratch.carried`` names), then their candidate
    blocks. A verifying row's block is the tree's chain (slot ``d`` of the block at tree slot ``d``); a tree node at
    depth ``d`` has position ``length + d`` and sees the context and its path. Candidate ``c`` is ``[its anchor's token, MASK ...]`` at positions from the
    anchor's: it sees the context, the tree above its anchor, and itself bidirectionally; each group of candidates
    is a stream of its own. Nodes and candidates a row does not carry, or that lie past its block, are invalid keys.
    """
    slot = torch.arange(slots, device=length.device).unsqueeze(0)
    start, end = length.unsqueeze(1), (length + block_len).unsqueeze(1)
    in_block = (slot >= start) & (slot < end)
    noisy = in_block & ~causal.unsqueeze(1)
    meta = TokenMeta(
        stream=torch.where(noisy, 0, CLEAN),
        block=torch.where(slot < start, -1, torch.where(noisy, 0, slot - start)),
        position=slot.expand(length.shape[0], -1),
        valid=(slot < end),
    )
    if scratch is None:
        return meta
    tree, width, rows = scratch.tree, scratch.width, length.shape[0]
    chain = scratch.chain
    in_tree = in_block & scratch.ahead.unsqueeze(1)
    offset = (slot - start).clamp(0, chain - 1)
    meta.pre = torch.where(in_tree, offset, -1)
    meta.last = torch.where(in_tree, tree["last"][offset], -1)
    carried = scratch.carried
    node_depth = tree["depth"][carried]
    nodes = TokenMeta(stream=torch.full_like(scratch.nodes, CLEAN, dtype=torch.long),
                      block=torch.zeros_like(scratch.nodes, dtype=torch.long), position=start + node_depth,
                      valid=scratch.nodes & (node_depth < block_len.unsqueeze(1)),
                      pre=tree["pre"][carried], last=tree["last"][carried])  # fmt: skip
    count = scratch.copies.shape[1]
    per_group = count // scratch.groups
    index = torch.arange(count, device=length.device).repeat_interleave(width)
    candidate, group = index % per_group, index // per_group
    anchor = tree["anchors"][candidate]
    at = tree["depth"][anchor] + torch.arange(width, device=length.device).repeat(count)
    copies = TokenMeta(stream=group.expand(rows, -1), block=candidate.expand(rows, -1), position=start + at,
                       valid=scratch.copies.repeat_interleave(width, dim=1)
                       & (tree["depth"][anchor] < block_len.unsqueeze(1)),
                       pre=tree["pre"][anchor].expand(rows, -1), last=torch.full_like(at, -1).expand(rows, -1))  # fmt: skip
    return nodes.followed_by(copies).followed_by(meta)
