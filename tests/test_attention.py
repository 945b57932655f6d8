"""Grouped-query sdpa (attention.py) equals transformers' stock sdpa path without copying the KV heads, and the decode
engine decodes the same on it as on the stock path."""

import copy
import types

import pytest
import torch
from helpers import DEVICE, EOS, PAD, padded_batch, source_model, tiny_tokenizer
from transformers.integrations import sdpa_attention
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import hf_blockdiff
from hf_blockdiff import attention
from hf_blockdiff.attention import (
    GROUPED_SDPA,
    grouped_attention,
    grouped_sdpa_attention_forward,
    register,
    split_key_attention,
)
from hf_blockdiff.engine import DecodeEngine
from hf_blockdiff.masks import attention_backend
from hf_blockdiff.policies import Sampling, Threshold

KV_HEADS, KEYS, DIM = 2, 11, 8
THREE_PER_KV_HEAD = dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=2)  # a tiny model, G = 3


def inputs(groups, q_len, mask_batch, mask_heads, batch=3, seed=0):
    """Query ``(B, H, Q, D)`` as the attention layers hand it over (a transposed view), keys and values
    ``(B, Hkv, K, D)``, and a bool mask whose first row attends to nothing but its own (diagonal) key."""
    g = torch.Generator().manual_seed(seed)
    heads = KV_HEADS * groups
    query = torch.randn(batch, q_len, heads, DIM, generator=g).transpose(1, 2)
    key, value = (torch.randn(batch, KV_HEADS, KEYS, DIM, generator=g) for _ in range(2))
    mask = torch.rand(mask_batch, mask_heads, q_len, KEYS, generator=g) > 0.5
    diagonal = torch.arange(q_len).unsqueeze(1) + KEYS - q_len == torch.arange(KEYS)  # query q's own key
    mask[..., 0, :] = diagonal[0]
    mask |= diagonal
    return types.SimpleNamespace(num_key_value_groups=groups, is_causal=True), query, key, value, mask


@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("q_len", [1, 5])
@pytest.mark.parametrize("mask_batch", [1, 3])
@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("additive", [False, True])
def test_grouped_equals_stock_sdpa(groups, q_len, mask_batch, per_head, additive):
    module, query, key, value, mask = inputs(groups, q_len, mask_batch, KV_HEADS * groups if per_head else 1)
    if additive:  # an eager-style float mask
        mask = torch.where(mask, 0.0, torch.finfo(torch.float32).min)
    expected, none = sdpa_attention.sdpa_attention_forward(module, query, key, value, mask, scaling=0.3)
    got, weights = grouped_sdpa_attention_forward(module, query, key, value, mask, scaling=0.3)
    assert none is None and weights is None
    assert got.shape == expected.shape == (3, q_len, KV_HEADS * groups, DIM) and got.is_contiguous()
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_grouped_heads_under_a_mask_copy_no_keys(monkeypatch):
    """The point of it: with a mask and several query heads per KV head, the keys and values are used as they are
    (the stock function calls repeat_kv here; on 5.24 it skips it only for one query outside torch.compile)."""
    module, query, key, value, mask = inputs(3, 5, 1, 1)
    expected, _ = sdpa_attention.sdpa_attention_forward(module, query, key, value, mask)

    def refuse(*args):
        raise AssertionError("repeat_kv was called")

    monkeypatch.setattr(sdpa_attention, "repeat_kv", refuse)
    got, _ = grouped_sdpa_attention_forward(module, query, key, value, mask)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_without_a_mask_and_with_softcap_it_is_the_stock_call():
    module, query, key, value, _ = inputs(3, 5, 1, 1)
    for causal in (None, False):
        expected, _ = sdpa_attention.sdpa_attention_forward(module, query, key, value, None, is_causal=causal)
        got, _ = grouped_sdpa_attention_forward(module, query, key, value, None, is_causal=causal)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    try:  # transformers 5.24 refuses soft-capping in sdpa; 5.17 ignores it: whatever the stock call does
        expected = sdpa_attention.sdpa_attention_forward(module, query, key, value, None, softcap=30.0)[0]
    except ValueError:
        with pytest.raises(ValueError):
            grouped_sdpa_attention_forward(module, query, key, value, None, softcap=30.0)
    else:
        torch.testing.assert_close(grouped_sdpa_attention_forward(module, query, key, value, None, softcap=30.0)[0],
                                   expected, rtol=0, atol=0)  # fmt: skip


@pytest.mark.parametrize("groups", [1, 3])
def test_the_vouched_causal_forward_equals_the_causal_mask(groups):
    """With ``attention.CAUSAL`` the mask passed is not read and sdpa runs ``is_causal`` over keys whose first
    positions are the queries: the same output as the dense lower-triangular mask (the engine's causal prefill)."""
    module, query, key, value, _ = inputs(groups, KEYS, 1, 1)
    causal = torch.ones(KEYS, KEYS, dtype=torch.bool).tril().expand(3, 1, KEYS, KEYS).to(DEVICE)
    query, key, value = query.to(DEVICE), key.to(DEVICE), value.to(DEVICE)
    expected, _ = grouped_sdpa_attention_forward(module, query, key, value, causal, scaling=0.3)
    unread = torch.ones_like(causal)  # all True: were it read, every query would see every key
    got, _ = grouped_sdpa_attention_forward(module, query, key, value, unread, scaling=0.3, **{attention.CAUSAL: True})
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("splits", [2, 5, 16])
@pytest.mark.parametrize("keys", [16 * 16, 16 * 16 + 13, 1000])
@pytest.mark.parametrize("q_len", [1, 7])
@pytest.mark.parametrize("per_head", [False, True])
def test_split_keys_equal_one_pass(splits, keys, q_len, per_head):
    """The keys split into chunks side by side (flash-decoding) and merged by log-sum-exp equal one softmax over
    all of them: keys in front of the chunks (their own pass), whole chunks a query cannot see, a window that is a
    view of a longer cache. On CUDA this is sdpa's memory-efficient kernel, elsewhere the plain math."""
    g = torch.Generator().manual_seed(splits * keys + q_len)
    batch, heads = 2, 3
    cache = lambda: torch.randn(batch, heads, keys + 9, DIM, generator=g)[:, :, :keys].to(DEVICE)  # noqa: E731
    query, key, value = torch.randn(batch, heads, q_len, DIM, generator=g).to(DEVICE), cache(), cache()
    mask = torch.rand(batch, heads if per_head else 1, q_len, keys, generator=g) > 0.6
    mask[..., : keys // 2] = False  # the first half of the chunks sees nothing
    mask[..., 3] = True  # one key in front of the chunks, one in the last chunk: every query sees some key
    mask[..., -1] = True
    mask = mask.to(DEVICE)
    expected = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=0.4)
    got = split_key_attention(query, key, value, mask, splits, scale=0.4)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("empty_lse", [0.0, float("inf"), float("nan")])
def test_split_keys_ignore_what_a_kernel_returns_for_a_chunk_with_no_key(monkeypatch, empty_lse):
    """A chunk in which a query sees no key weighs nothing, whatever the kernel returns for it: torch's
    memory-efficient kernel gives output 0 and log-sum-exp 0 (not -inf), flash +inf. The H200 run of the test
    above failed 35 of 36 cases before the merge took this from the mask."""
    plain = attention._attend

    def kernel(query, key, value, bias, scale):
        out, lse = plain(query, key, value, bias, scale)
        empty = torch.isneginf(lse)
        return out.masked_fill(empty.unsqueeze(-1), 0.0), lse.masked_fill(empty, empty_lse)

    monkeypatch.setattr(attention, "_attend", kernel)
    g = torch.Generator().manual_seed(7)
    query, key, value = (torch.randn(2, 3, length, DIM, generator=g).to(DEVICE) for length in (5, 300, 300))
    mask = torch.zeros(2, 1, 5, 300, dtype=torch.bool)
    mask[..., 250:] = torch.rand(2, 1, 5, 50, generator=g) > 0.5  # chunks 0-3 of 5 and the front keys: nothing
    mask[..., -1] = True
    mask = mask.to(DEVICE)
    expected = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=0.4)
    torch.testing.assert_close(split_key_attention(query, key, value, mask, 5, scale=0.4), expected,
                               rtol=1e-5, atol=1e-5)  # fmt: skip


def test_the_split_is_taken_only_where_it_fills_the_gpu(monkeypatch):
    """Shapes only: one decoding row over 4,352 keys splits, 16 rows or 2,048 keys do not (where the H200
    measured a loss), and nothing splits off CUDA or with the switch off."""
    cuda = torch.device("cuda")
    assert attention.key_splits(1, 3, 3, 4352, cuda) == 17
    assert attention.key_splits(16, 2, 6, 4352, cuda) == 8  # Qwen2-1.5B heads: 32 blocks
    assert attention.key_splits(16, 3, 3, 4352, cuda) == 1  # SmolLM2 heads: 48 blocks
    assert attention.key_splits(1, 3, 3, 2048, cuda) == 1
    assert attention.key_splits(1, 3, 3, 4096, torch.device("cpu")) == 1
    monkeypatch.setattr(attention, "SPLIT_KEYS", False)
    assert attention.key_splits(1, 3, 3, 4096, cuda) == 1


def test_compiles_without_graph_breaks():
    """Decided on shapes and arguments only: dynamo traces it whole (as the engine's compiled step does)."""
    module, query, key, value, mask = inputs(3, 5, 3, 1)
    expected, _ = grouped_sdpa_attention_forward(module, query, key, value, mask)
    torch._dynamo.reset()
    compiled = torch.compile(grouped_sdpa_attention_forward, backend="eager", fullgraph=True)
    got, _ = compiled(module, query, key, value, mask)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_registered_once_with_the_sdpa_mask_and_read_as_sdpa():
    assert register() == register() == GROUPED_SDPA
    assert ALL_ATTENTION_FUNCTIONS[GROUPED_SDPA] is grouped_sdpa_attention_forward
    assert ALL_MASK_ATTENTION_FUNCTIONS[GROUPED_SDPA] is ALL_MASK_ATTENTION_FUNCTIONS["sdpa"]
    assert attention_backend(types.SimpleNamespace(_attn_implementation=GROUPED_SDPA)) == "sdpa"


def test_a_model_set_to_it_equals_sdpa_with_2d_masks():
    """Through transformers' own mask creation (a padded batch, a 2D mask): the name needs its mask function."""
    model = source_model("llama", "sdpa", **THREE_PER_KV_HEAD)
    ids, am = padded_batch([7, 4], seed=1)
    with torch.no_grad():
        expected = model(ids, attention_mask=am).logits
        model.set_attn_implementation(GROUPED_SDPA)
        got = model(ids, attention_mask=am).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_grouped_attention_switches_only_sdpa_and_restores():
    config = types.SimpleNamespace(_attn_implementation="sdpa")
    with pytest.raises(RuntimeError), grouped_attention(config):
        assert config._attn_implementation == GROUPED_SDPA
        raise RuntimeError
    assert config._attn_implementation == "sdpa"
    with grouped_attention(config, enabled=False):
        assert config._attn_implementation == "sdpa"
    config._attn_implementation = "eager"
    with grouped_attention(config):
        assert config._attn_implementation == "eager"


# ----------------------------------------------------------------------------------------------------------
# The decode engine on it


def grouped_model():
    """A tiny converted Llama with three query heads per KV head, in float64 (no near-ties flip on rounding)."""
    source = source_model("llama", "sdpa", **THREE_PER_KV_HEAD)
    model, _ = hf_blockdiff.convert_model(copy.deepcopy(source), tiny_tokenizer(), block_size=4)
    return model.eval().to(torch.float64)


def decode(model, prompts, grouped, verify, monkeypatch, split=False):
    """Tokens, forwards and every logit the engine computed; counts the stock path's KV copies."""
    copies, logits = [], []
    repeat_kv = sdpa_attention.repeat_kv
    monkeypatch.setattr(sdpa_attention, "repeat_kv", lambda *a: copies.append(1) or repeat_kv(*a))
    head = model.logits_from_hidden
    monkeypatch.setattr(model, "logits_from_hidden", lambda h: logits.append(head(h)) or logits[-1], raising=False)
    monkeypatch.setattr(DecodeEngine, "grouped_sdpa", grouped)
    if split:  # the split on every forward it can take, on any device (the CPU runs its math)
        monkeypatch.setattr(attention, "key_splits", lambda b, h, q, keys, device: max(1, min(3, keys // 16)))
    rows = len(prompts)
    full = lambda v: torch.full((rows,), v, device=DEVICE)  # noqa: E731
    engine = DecodeEngine(model, rows, 40, 4, Threshold(full(0.5)), Sampling(full(False), full(1.0), full(0),
                          full(1.0)), eos_token_ids=[EOS, 7], pad_token_id=PAD, candidates=2 if verify else 0)  # fmt: skip
    tokens = [[] for _ in prompts]
    events = engine.add(prompts, list(range(rows)), 20, verify=verify)
    while any(s.busy for s in engine.slots):
        for row, new, _, _ in events:
            tokens[row] += new
        events = engine.step()
    for row, new, _, _ in events:
        tokens[row] += new
    assert model.config._attn_implementation == "sdpa"  # for everyone else, the model is as it was
    monkeypatch.undo()
    return tokens, engine.forwards.tolist(), logits, len(copies)


@pytest.mark.parametrize("verify", [False, True])
def test_engine_on_grouped_heads_equals_the_stock_path(verify, monkeypatch):
    """Greedy threshold decoding and one-forward verify (candidate blocks in scratch slots): the same tokens,
    forwards and logits on both paths, and the grouped one never repeats a KV head."""
    model = grouped_model()
    ids, am = padded_batch([7, 3, 5], seed=11)
    prompts = [ids[r][am[r].bool()].tolist() for r in range(3)]
    tokens, forwards, logits, copies = decode(model, prompts, True, verify, monkeypatch)
    stock_tokens, stock_forwards, stock_logits, stock_copies = decode(model, prompts, False, verify, monkeypatch)
    assert (tokens, forwards) == (stock_tokens, stock_forwards)
    assert len(logits) == len(stock_logits)
    for got, expected in zip(logits, stock_logits):
        torch.testing.assert_close(got, expected)
    assert copies == 0 and stock_copies > 0


@pytest.mark.parametrize("verify", [False, True])
def test_engine_with_the_keys_split_equals_one_pass(verify, monkeypatch):
    """The split and merge inside the engine's forwards (decoding and one-forward verify's scratch keys): the same
    tokens, forwards and logits as one pass over the keys."""
    model = grouped_model()
    ids, am = padded_batch([7, 3, 5], seed=12)
    prompts = [ids[r][am[r].bool()].tolist() for r in range(3)]
    tokens, forwards, logits, _ = decode(model, prompts, True, verify, monkeypatch, split=True)
    one_tokens, one_forwards, one_logits, _ = decode(model, prompts, True, verify, monkeypatch)
    assert (tokens, forwards) == (one_tokens, one_forwards)
    assert len(logits) == len(one_logits)
    for got, expected in zip(logits, one_logits):
        torch.testing.assert_close(got, expected)
