"""The noise sampler and the block-growth schedule."""

import math

import pytest
import torch
from helpers import padded_batch

from hf_blockdiff import BlockGrowthCallback, NoiseSampler, block_size_at
from hf_blockdiff.masks import block_grid

MASK = 99


def sft_batch():
    ids, am = padded_batch([40, 31, 36], left=False, seed=3)
    labels = ids.masked_fill(am == 0, -100)
    labels[0, :7] = -100  # prompts of different lengths
    labels[2, :12] = -100
    return ids, am, labels


@pytest.mark.parametrize("block_size", [1, 2, 4, 7])
def test_never_masks_prompt_padding_or_block_first(block_size):
    ids, am, labels = sft_batch()
    sampler = NoiseSampler(MASK, eps=0.5)
    _, offsets = block_grid(block_size, am, labels)
    for seed in range(20):
        noise = sampler(ids, am, labels, block_size, generator=torch.Generator().manual_seed(seed))
        masked = noise.noisy_input_ids == MASK
        assert not masked[labels == -100].any()  # prompt and padding
        assert not masked[offsets == 0].any()  # block-first tokens
        assert torch.equal(noise.noisy_input_ids[~masked], ids[~masked])  # nothing else changes
        assert torch.equal(masked, noise.masked)
    if block_size == 1:
        assert not noise.maskable.any()


def test_mask_rate_tracks_t():
    ids, am, labels = sft_batch()
    # 400 copies: about 1,800 blocks, so the mean of t is within 0.03 of E[t] for any seed (std about 0.005).
    ids, am, labels = ids.repeat(400, 1), am.repeat(400, 1), labels.repeat(400, 1)
    g = torch.Generator().manual_seed(0)
    noise = NoiseSampler(MASK, eps=0.2)(ids, am, labels, 8, generator=g)
    in_grid = noise.maskable
    assert ((noise.noise_level[in_grid] >= 0.2) & (noise.noise_level[in_grid] < 1)).all()
    # Per-block t is shared by the block's tokens; the empirical rate per t-bucket follows t.
    t, masked = noise.noise_level[in_grid], noise.masked[in_grid].float()
    for low in (0.2, 0.4, 0.6, 0.8):
        bucket = (t >= low) & (t < low + 0.2)
        assert abs(masked[bucket].mean().item() - t[bucket].mean().item()) < 0.04
    assert abs(noise.masked_fraction - 0.6) < 0.03  # E[t] = (1 + eps) / 2


def test_whole_block_noise_masks_that_share_of_blocks_entirely():
    ids, am, labels = sft_batch()
    ids, am, labels = ids.repeat(200, 1), am.repeat(200, 1), labels.repeat(200, 1)
    noise = NoiseSampler(MASK, whole_blocks=0.5)(ids, am, labels, 8, generator=torch.Generator().manual_seed(0))
    blocks, offsets = block_grid(8, am, labels)
    in_grid = noise.maskable
    whole = noise.noise_level[in_grid] == 1.0
    assert noise.masked[in_grid][whole].all()  # t = 1: every maskable position of the block is masked
    # t = 1 is drawn for about half the blocks (the rest keep U(eps, 1), where t = 1 has probability 0)
    per_block = {(r.item(), blocks[r, b].item()): level for r, b, level in
                 zip(*torch.nonzero(in_grid, as_tuple=True), noise.noise_level[in_grid].tolist())}  # fmt: skip
    share = sum(level == 1.0 for level in per_block.values()) / len(per_block)
    assert abs(share - 0.5) < 0.05
    with pytest.raises(ValueError, match="wholly masked"):
        NoiseSampler(MASK, whole_blocks=1.5)


def test_one_noise_level_per_block_and_none_for_context_in_multi_turn_rows():
    ids, am, labels = sft_batch()
    labels[0, 20:25] = -100  # a user turn between two assistant turns
    labels[1, 10:12] = -100
    noise = NoiseSampler(MASK)(ids, am, labels, 4, generator=torch.Generator().manual_seed(1))
    blocks, offsets = block_grid(4, am, labels)
    t = noise.noise_level
    assert (t[offsets < 0] == 0).all() and (t[offsets >= 0] > 0).all()
    levels = {}
    for r, b, level in zip(*torch.nonzero(offsets >= 0, as_tuple=True), t[offsets >= 0].tolist()):
        levels.setdefault((r.item(), blocks[r, b].item()), set()).add(level)
    assert all(len(v) == 1 for v in levels.values())  # one t per block
    assert len({next(iter(v)) for v in levels.values()}) == len(levels)  # drawn independently per block


def test_complementary_copies_cover_every_maskable_position_once():
    ids, am, labels = sft_batch()
    noise = NoiseSampler(MASK, complementary=True, elbo_weighting=True)(ids, am, labels, 4)
    assert noise.noisy_input_ids.shape == (3, 2, ids.shape[1])
    first, second = (noise.noisy_input_ids[:, i] == MASK for i in (0, 1))
    assert torch.equal(first ^ second, noise.maskable) and not (first & second).any()
    t = noise.noise_level
    weights = noise.diffusion_loss_weights
    torch.testing.assert_close(weights[:, 0][noise.maskable], 1 / t[noise.maskable])
    torch.testing.assert_close(weights[:, 1][noise.maskable], 1 / (1 - t[noise.maskable]))


@pytest.mark.parametrize("complementary,elbo", [(False, False), (False, True), (True, True)])
def test_position_decay_weights_a_blocks_kth_position_exp_minus_k_minus_1_over_gamma(complementary, elbo):
    ids, am, labels = sft_batch()
    gamma = 3.0
    g = torch.Generator().manual_seed(2)
    plain = NoiseSampler(MASK, complementary=complementary, elbo_weighting=elbo)(ids, am, labels, 8, generator=g)
    g = torch.Generator().manual_seed(2)
    decayed = NoiseSampler(MASK, complementary=complementary, elbo_weighting=elbo, position_decay=gamma)(
        ids, am, labels, 8, generator=g
    )
    assert torch.equal(plain.noisy_input_ids, decayed.noisy_input_ids)  # the noise itself is unchanged
    _, offsets = block_grid(8, am, labels)
    maskable = decayed.maskable
    # brute force: the k-th position of its block (k = offset >= 1), counted from the block's first token
    expected = torch.tensor([math.exp(-(k - 1) / gamma) for k in offsets[maskable].tolist()])
    weights = decayed.diffusion_loss_weights
    for copy in range(2 if complementary else 1):
        got = weights[:, copy][maskable] if complementary else weights[maskable]
        base = plain.diffusion_loss_weights
        base = torch.ones_like(got) if base is None else (base[:, copy] if complementary else base)[maskable]
        torch.testing.assert_close(got, base * expected)
    assert (offsets[maskable] > 1).any()  # some weight below 1 was checked
    with pytest.raises(ValueError, match="position_decay"):
        NoiseSampler(MASK, position_decay=-1.0)


@pytest.mark.parametrize(
    "start,ratio,warmup,interval,maximum", [(1, 2, 0, 10, 32), (1, 2, 25, 7, 16), (2, 3, 5, 4, 40)]
)
def test_growth_follows_the_formula(start, ratio, warmup, interval, maximum):
    for step in range(200):
        expected = min(maximum, start * ratio ** math.floor(max(0, step - warmup) / interval))
        assert block_size_at(step, maximum, start, ratio, warmup, interval) == expected


def test_callback_resolves_an_even_interval_and_records_transitions():
    cb = BlockGrowthCallback(16, warmup_steps=10)

    class State:
        global_step, max_steps = 0, 110

    cb.on_train_begin(None, State, None)
    assert cb.schedule["interval_steps"] == 20  # sizes 1, 2, 4, 8, 16 share the 100 steps after warm-up
    for step in range(110):
        State.global_step = step
        cb.on_step_begin(None, State, None)
    assert cb.transitions == [(0, 1), (30, 2), (50, 4), (70, 8), (90, 16)]
    restored = BlockGrowthCallback(**cb.state()["args"])
    assert restored.size_at(95) == 16 and restored.size_at(45) == 2
    with pytest.raises(ValueError, match="Invalid block growth"):
        BlockGrowthCallback(4, start=8)
