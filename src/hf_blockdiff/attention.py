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


def grouped_sdpa_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                                   scaling: float | None = None, is_causal: bool | None = None, **kwargs):  # fmt: skip
    """``sdpa_attention_forward`` (same arguments, returns ``(output (B, Q, H, D), None)``) for grouped heads
    under a 4D mask (bool or additive, with 1 or ``H`` heads). Everything else is the stock call: no grouping
    (``G = 1``), no mask (sdpa's ``is_causal`` / ``enable_gqa`` path copies nothing), soft-capping, sinks, a
    position bias. Decided on shapes and arguments only, never on tensor values (``torch.compile``, CUDA graphs)."""
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
