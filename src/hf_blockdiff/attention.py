# Copyright 2026 The hf_blockdiff authors. Apache-2.0.
"""Grouped-query sdpa attention under a mask, without copying the keys and values once per query group.

Hub-portable: imports only torch and transformers.

transformers' ``sdpa_attention_forward`` repeats every KV head once per query head that shares it (``repeat_kv``)
whenever a mask is passed (on CUDA sdpa's own ``enable_gqa`` would fall back to its math kernel). The decode engine
passes a mask on every forward, so each step copied the whole KV cache ``G = num_heads / num_kv_heads`` times per
layer. Here the ``G`` query heads of a KV head are folded into the query length instead, ``(B, Hkv * G, Q, D)`` ->
``(B, Hkv, G * Q, D)``, and the mask is repeated to match: every query row meets the same keys, values and mask
row as in the stock function, so the output is the stock one, and only queries and the mask grow. (transformers
5.24 does this itself for a single query, but not under ``torch.compile``, which the engine's CUDA graph uses.)

Long keys at small batch: sdpa's masked kernel runs one thread block per (row, KV head, 64 queries), each walking
all the keys in turn, so one decoding row with 3 KV heads and 4,096 keys keeps 3 of the GPU's ~130 processors
busy. :func:`split_key_attention` splits the keys into chunks that run side by side and merges their partial
results by their log-sum-exp (flash-decoding). The fold takes it on CUDA when the split is what fills the GPU
(:func:`key_splits`, decided on shapes only); its math is the same softmax, in another order of summation.

:func:`register` adds it as the attention implementation :data:`GROUPED_SDPA`, with sdpa's mask function (a
registered name needs one, or transformers drops 2D masks for it). :func:`grouped_attention` runs a model on it
for a while; the decode engine does so for its forwards (engine.py).
"""

from __future__ import annotations

import contextlib

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

GROUPED_SDPA = "hf_blockdiff_sdpa"
# What the stock function does itself, or does not support: it is called for these.
_STOCK_ONLY = ("softcap", "s_aux", "position_bias")
# A forward keyword by which the caller vouches that the forward is plain causal over its keys, whose first
# positions are its queries (the decode engine's prefill of right-padded prompts, docs/design.md 2.5): the mask
# passed is then not read, and sdpa runs ``is_causal`` (flash on CUDA, skipping the keys a query cannot see).
CAUSAL = "hf_blockdiff_causal"
# Splitting the keys (measured on the H200, benchmarks/results/attention_kernels.md): it pays where few thread
# blocks walk many keys (one row, 4,352 keys: 0.46-0.79x the one-pass time) and costs where the grid is already
# about full (16 rows of SmolLM2: 1.4-2.4x). So: at most 32 thread blocks without it, at least 4,096 keys, and
# chunks of at least 256 keys, up to as many blocks as fill an H200 (132 processors) twice.
SPLIT_MAX_BLOCKS, SPLIT_MIN_KEYS, SPLIT_CHUNK, SPLIT_TARGET_BLOCKS = 32, 4096, 256, 264
SPLIT_KEYS = True  # the switch benchmarks A/B (bench_attention.py)


def key_splits(batch: int, kv_heads: int, queries: int, keys: int, device: torch.device) -> int:
    """Chunks to split the keys into (1: none), on shapes only: where ``batch x kv_heads x query tiles`` thread
    blocks leave most of the GPU idle and the keys are many, enough chunks of at least :data:`SPLIT_CHUNK` keys to
    fill it. CUDA only: the CPU's kernel is no thread-block grid."""
    blocks = batch * kv_heads * -(-queries // 64)
    if not SPLIT_KEYS or device.type != "cuda" or blocks > SPLIT_MAX_BLOCKS or keys < SPLIT_MIN_KEYS:
        return 1
    return max(1, min(keys // SPLIT_CHUNK, SPLIT_TARGET_BLOCKS // blocks))


def _attend(query, key, value, bias, scale):
    """Attention of every (batch, head) over its keys under an additive ``bias``: ``(out, logsumexp (B, H, M))``.
    CUDA: sdpa's memory-efficient kernel, which also returns the log-sum-exp; elsewhere the plain math (the
    reference the CPU tests check the split and the merge with). A query with no visible key gets 0 and -inf."""
    if query.is_cuda:
        efficient = torch.ops.aten._scaled_dot_product_efficient_attention
        out, lse = efficient(query, key, value, bias, True, scale=scale)[:2]
        return out, lse[..., : query.shape[2]]
    wide = torch.promote_types(query.dtype, torch.float32)
    scores = torch.matmul(query.to(wide), key.to(wide).transpose(-1, -2)) * scale + bias.to(wide)
    lse = torch.logsumexp(scores, dim=-1)
    return torch.matmul(torch.softmax(scores, -1).nan_to_num(0.0), value.to(wide)).to(query.dtype), lse


def split_key_attention(query, key, value, mask, splits: int, scale: float | None = None):
    """sdpa of ``query (B, H, M, D)`` over ``key``/``value (B, H, K, D)`` under a bool ``mask (B, 1 or H, M, K)``,
    the keys split into ``splits`` chunks computed side by side. The last ``splits x c`` keys (``c`` a multiple of
    16, the kernel's bias alignment) become ``splits`` heads of a ``B x H`` batch, a view of the keys; the few
    keys before them are one more pass. The partial outputs are merged by their log-sum-exp."""
    batch, heads, q_len, dim = query.shape
    keys, scale = key.shape[2], dim**-0.5 if scale is None else scale
    chunk = keys // splits // 16 * 16
    head = keys - splits * chunk  # < 16 * splits keys in front: their own pass
    # The additive bias, padded to a multiple of 16 keys (so every slice of it is aligned as the kernel needs)
    padded = -(-keys // 16) * 16
    bias = query.new_full((batch, heads, q_len, padded), float("-inf"))
    bias[..., :keys].masked_fill_(mask.expand(batch, heads, q_len, keys), 0.0)
    flat = lambda t: t.reshape(batch * heads, 1, *t.shape[2:])  # noqa: E731  (B, H, ...) -> (B x H, 1, ...)
    body = lambda t: t[:, :, head:].reshape(batch * heads, splits, chunk, t.shape[-1])  # noqa: E731  a view
    queries = flat(query).expand(-1, splits, -1, -1).contiguous()
    chunk_bias = bias[..., head:keys].unflatten(-1, (splits, chunk)).transpose(2, 3).reshape(batch * heads, splits,
                                                                                             q_len, chunk)  # fmt: skip
    out, lse = _attend(queries, body(key), body(value), chunk_bias, scale)
    # Which chunks a query sees any key of, from the mask: kernels disagree on an empty row's log-sum-exp (torch's
    # memory-efficient kernel returns 0, flash +inf, the math -inf), and only -inf weighs it 0 in the merge.
    seen = mask[..., head:keys].unflatten(-1, (splits, chunk)).any(-1).expand(batch, heads, q_len, splits)
    seen = seen.transpose(2, 3).reshape(batch * heads, splits, q_len)
    if head:
        first = _attend(flat(query), flat(key[:, :, :head]), flat(value[:, :, :head]), flat(bias[..., :head]), scale)
        out, lse = torch.cat([first[0], out], dim=1), torch.cat([first[1], lse], dim=1)
        seen = torch.cat([flat(mask[..., :head].any(-1).expand(batch, heads, q_len)), seen], dim=1)
    lse = lse.masked_fill(~seen, float("-inf"))
    # merge: each chunk's softmax weighs by exp(its log-sum-exp - the largest); chunks with no visible key weigh 0
    top = lse.amax(dim=1, keepdim=True)
    weight = (lse - top.nan_to_num(0.0, neginf=0.0)).exp().unsqueeze(-1)  # (B x H, chunks, M, 1)
    total = weight.sum(1).clamp_min(torch.finfo(weight.dtype).tiny)
    merged = (out.to(weight.dtype) * weight).nan_to_num(0.0).sum(1) / total
    return merged.to(query.dtype).reshape(batch, heads, q_len, value.shape[-1])


def grouped_sdpa_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                                   scaling: float | None = None, is_causal: bool | None = None, **kwargs):  # fmt: skip
    """``sdpa_attention_forward`` (same arguments, returns ``(output (B, Q, H, D), None)``) for grouped heads
    under a 4D mask (bool or additive, with 1 or ``H`` heads). Everything else is the stock call: no grouping
    (``G = 1``), no mask (sdpa's ``is_causal`` / ``enable_gqa`` path copies nothing), soft-capping, sinks, a
    position bias. Decided on shapes and arguments only, never on tensor values (``torch.compile``, CUDA graphs)."""
    if kwargs.pop(CAUSAL, False):
        return sdpa_attention_forward(module, query, key, value, None, dropout=dropout, scaling=scaling,
                                      is_causal=True, **kwargs)  # fmt: skip
    groups = getattr(module, "num_key_value_groups", 1)
    mask, heads = attention_mask, query.shape[1]
    if (groups == 1 or mask is None or mask.dim() != 4 or mask.shape[1] not in (1, heads)
            or any(kwargs.get(name) is not None for name in _STOCK_ONLY)):  # fmt: skip
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)  # fmt: skip
    batch, q_len, k_len = query.shape[0], query.shape[2], key.shape[2]
    # Head h = kv * G + g uses KV head h // G (repeat_kv repeats each KV head G times in a row), so splitting the
    # head dimension as (Hkv, G) puts every query head under its own KV head; row g * Q + q is head g's query q.
    query = query.reshape(batch, heads // groups, groups * q_len, query.shape[-1])
    # The mask's rows in the same order: (rows, H or 1, Q, K) -> (rows, Hkv or 1, G or 1, Q, K) -> G * Q rows.
    mask = mask.unflatten(1, (-1, groups if mask.shape[1] > 1 else 1))
    mask = mask.expand(-1, -1, groups, q_len, k_len).reshape(mask.shape[0], -1, groups * q_len, k_len)
    splits = 1 if dropout or mask.dtype != torch.bool else key_splits(batch, key.shape[1], groups * q_len, k_len,
                                                                         query.device)  # fmt: skip
    if splits > 1:
        out = split_key_attention(query, key, value, mask, splits, scale=scaling)
    else:
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout,
                                                               scale=scaling)  # fmt: skip
    # (B, Hkv, G * Q, D) -> (B, H, Q, D) -> (B, Q, H, D), as the stock function returns it
    return out.reshape(out.shape[0], heads, q_len, value.shape[-1]).transpose(1, 2).contiguous(), None


def register() -> str:
    """Register :data:`GROUPED_SDPA` with transformers (attention and mask functions); returns the name.
    Idempotent: a name already registered is kept, so the package and a checkpoint's remote-code copy of this
    file, which may both be imported in one process, share one function."""
    if GROUPED_SDPA not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(GROUPED_SDPA, grouped_sdpa_attention_forward)
    if GROUPED_SDPA not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionMaskInterface.register(GROUPED_SDPA, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])  # the same bool masks
    return GROUPED_SDPA


register()


@contextlib.contextmanager
def grouped_attention(config, enabled: bool = True):
    """Within: a model whose attention is ``sdpa`` runs :data:`GROUPED_SDPA` (the same numbers, no KV copies); any
    other backend, or ``enabled=False``, is left as it is. Sets the config's attribute only (a few microseconds),
    so it may wrap every forward; it is restored on the way out, so the model is ``sdpa`` for everyone else."""
    if not enabled or config._attn_implementation != "sdpa":
        yield
        return
    config._attn_implementation = GROUPED_SDPA
    try:
        yield
    finally:
        config._attn_implementation = "sdpa"
