"""The mask module: every rendering equals the loop-built specification, and flex equals dense."""

import pytest
import torch
from helpers import DEVICE, converted_pair, grid_keys, padded_batch, spec_allowed

from hf_blockdiff import masks
from hf_blockdiff.masks import (
    CLEAN,
    TokenMeta,
    attention_backend,
    block_grid,
    context_causal_rule,
    denoise_meta,
    dense_mask,
    positions_from_padding,
    render_mask,
    training_meta,
)


def training_layout(copies, block_size, left):
    ids, am = padded_batch([13, 9, 11], left=left, seed=copies)
    labels = ids.masked_fill(am == 0, -100)
    labels[0, :4] = -100  # a prompt
    labels[2] = -100  # a row that is all context
    real = am[1].nonzero().flatten()
    labels[1, real[4:6]] = -100  # two supervised runs (two assistant turns) with context between them
    return am, labels, positions_from_padding(am)


@pytest.mark.parametrize("copies", [1, 2])
@pytest.mark.parametrize("block_size", [1, 3, 4])
@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("left", [True, False])
def test_training_mask_equals_spec(copies, block_size, window, left):
    am, labels, pos = training_layout(copies, block_size, left)
    blocks, _ = block_grid(block_size, am, labels)
    meta = training_meta(blocks, pos, am, copies)
    n = (copies + 1) * am.shape[1]
    got = dense_mask(context_causal_rule(meta, 0, window), am.shape[0], n, n, am.device)[:, 0]
    for r in range(am.shape[0]):
        keys = grid_keys(labels[r].tolist(), am[r].tolist(), block_size)
        expected = spec_allowed(keys, am[r].bool().tolist(), pos[r].tolist(), copies, window)
        assert got[r].tolist() == expected


def test_block_grid_starts_at_first_supervised_token():
    am = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    labels = torch.tensor(
        [[-100, -100, -100, 5, 6, 7, 8, 9], [1, 2, 3, 4, 5, 6, -100, -100], [-100, 1, 2, 3, -100, -100, 4, 5]]
    )
    blocks, offsets = block_grid(2, am, labels)
    # Unsupervised tokens (prompt, padding, a user turn) are one-token blocks; each turn restarts the grid.
    assert blocks.tolist() == [[-3, -2, -1, 0, 0, 1, 1, 2], [0, 0, 1, 1, 2, 2, 3, 4], [-1, 0, 0, 1, 2, 3, 4, 4]]
    assert offsets.tolist() == [[-1, -1, -1, 0, 1, 0, 1, 0], [0, 1, 0, 1, 0, 1, -1, -1], [-1, 0, 1, 0, -1, -1, 0, 1]]
    with pytest.raises(ValueError, match="block_size"):
        block_grid(0, am, labels)


@pytest.mark.parametrize("block_size", [1, 2, 3, 5])
def test_block_grid_equals_brute_force_on_multi_turn_rows(block_size):
    """Random rows of several supervised runs (turns), padding and context: block ids order the tokens as the
    loop reference does, every run starts a fresh grid, and the first supervised block is block 0."""
    g = torch.Generator().manual_seed(block_size)
    batch, length = 64, 24
    am = torch.ones(batch, length, dtype=torch.long)
    for r, pad in enumerate(torch.randint(0, 6, (batch,), generator=g).tolist()):
        am[r, : pad if r % 2 else 0] = 0  # left padding on odd rows
        am[r, length - (0 if r % 2 else pad) :] = 0  # right padding on even rows
    supervised = torch.rand(batch, length, generator=g) < 0.6
    labels = torch.where(supervised & am.bool(), 7, -100)
    labels[0], labels[1] = -100, 7  # all context; all supervised
    blocks, offsets = block_grid(block_size, am, labels)
    for r in range(batch):
        keys = grid_keys(labels[r].tolist(), am[r].tolist(), block_size)
        ids = blocks[r].tolist()
        for i in range(length):
            for j in range(length):
                assert (ids[i] < ids[j]) == (keys[i] < keys[j]) and (ids[i] == ids[j]) == (keys[i] == keys[j])
        assert offsets[r].tolist() == [j - k[0] if k[1] else -1 for j, k in enumerate(keys)]
        first = next((j for j, k in enumerate(keys) if k[1]), None)
        if first is not None:
            assert ids[first] == 0 and all(b < 0 for b in ids[:first])
        else:
            assert max(ids) < 0


@pytest.mark.parametrize("window", [None, 2])
def test_denoise_mask_sees_valid_prefix_and_whole_block(window):
    prefix_valid = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    prefix_pos = positions_from_padding(prefix_valid.long())
    block_pos = prefix_valid.sum(-1, keepdim=True) + torch.arange(3)
    meta = denoise_meta(prefix_pos, prefix_valid, block_pos)
    got = dense_mask(context_causal_rule(meta, 4, window), 2, 3, 7, "cpu")[:, 0]
    for r in range(2):
        pos = prefix_pos[r].tolist() + block_pos[r].tolist()
        valid = prefix_valid[r].tolist() + [True] * 3
        for q in range(3):
            expected = [valid[k] and (window is None or block_pos[r, q].item() - pos[k] < window) for k in range(7)]
            assert got[r, q].tolist() == expected


def test_eager_mask_is_additive_version_of_sdpa_mask():
    am, labels, pos = training_layout(1, 3, True)
    meta = training_meta(block_grid(3, am, labels)[0], pos, am, 1)
    n = 2 * am.shape[1]
    allowed = render_mask(meta, 0, n, None, "sdpa", torch.float32)
    additive = render_mask(meta, 0, n, None, "eager", torch.bfloat16)
    assert allowed.dtype == torch.bool and additive.dtype == torch.bfloat16
    assert torch.equal(additive == 0, allowed)
    assert torch.all(additive[~allowed] == torch.finfo(torch.bfloat16).min)


def test_flash_attention_is_refused_with_a_hint():
    class Config:
        _attn_implementation = "flash_attention_2"

    with pytest.raises(ValueError, match="cannot express.*attn_implementation='sdpa'"):
        attention_backend(Config())
    Config._attn_implementation = "paged_attention"
    with pytest.raises(ValueError, match="does not take a custom attention mask"):
        attention_backend(Config())


def test_unknown_layer_types_are_refused():
    _, model, _ = converted_pair("qwen2")
    model.config.layer_types = ["full_attention", "chunked_attention"]
    with pytest.raises(NotImplementedError, match="chunked_attention"):
        masks.layer_windows(model.config, per_layer_type=True)


def test_padding_keeps_every_row_non_empty():
    """A row of padding only sees itself, never nothing (an empty row is NaN in sdpa)."""
    meta = TokenMeta(
        stream=torch.full((1, 4), CLEAN), block=torch.zeros(1, 4, dtype=torch.long),
        position=torch.zeros(1, 4, dtype=torch.long), valid=torch.zeros(1, 4, dtype=torch.bool),
    )  # fmt: skip
    allowed = dense_mask(context_causal_rule(meta, 0, None), 1, 4, 4, "cpu")[0, 0]
    assert torch.equal(allowed, torch.eye(4, dtype=torch.bool))


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["mistral", "qwen2"])  # one mask with a window; one mask per layer type
def test_flex_attention_equals_dense(arch):
    """The fast path: flex-attention block masks give the dense (sdpa) numbers (forward; CPU flex has no
    backward, which the GPU run of this suite covers)."""
    if DEVICE.type != "cpu":
        pytest.skip("on CUDA the whole conformance suite runs with flex attention")
    results = {}
    for backend in ("sdpa", "flex_attention"):
        _, model, _ = converted_pair(arch, backend, block_size=3)
        ids, am = padded_batch([16, 11], left=True, seed=5)
        noisy = ids.masked_fill(
            torch.rand(ids.shape, generator=torch.Generator().manual_seed(0)) < 0.4, model.config.mask_token_id
        )
        with torch.no_grad():
            out = model(input_ids=ids, noisy_input_ids=noisy, attention_mask=am, block_size=3)
            hidden, _ = model.two_stream_hidden_states(
                ids, noisy.unsqueeze(1), am, positions_from_padding(am), None, 3
            )
        results[backend] = (out.diffusion_loss, out.ar_loss, hidden[am.bool().unsqueeze(1).expand(-1, 2, -1)])
    for dense, flex in zip(results["sdpa"], results["flex_attention"]):
        torch.testing.assert_close(flex, dense, rtol=1e-4, atol=1e-5)
