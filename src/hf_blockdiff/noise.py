# Copyright 2026 The hf_blockdiff authors. Apache-2.0.
"""Noise for training (docs/design.md 2.3): which positions of ``x`` become the mask token in ``x_t``.

Per block, a noise level ``t ~ U(eps, 1)``; each maskable position of the block is masked independently with
probability ``t``. Maskable = supervised (label != -100) and not the first token of its block; the prompt,
padding and block-first tokens are never masked. With complementary masking (Fast-dLLM v2) a second copy masks
exactly the maskable positions the first left clean, so every maskable token is supervised once per step.
With ``whole_blocks`` > 0, that share of blocks gets ``t = 1`` (every maskable position masked): the block a
drafter fills in one forward for verified decoding (docs/design.md 2.6). With ``position_decay`` = gamma > 0 the
diffusion loss at a block's k-th position (k >= 1) is weighted ``exp(-(k - 1) / gamma)`` (DFlash's loss decay): a
verified draft counts only if every draft before it was accepted, so the near positions are worth more.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .masks import IGNORE_INDEX, block_grid


@dataclass
class NoisyBatch:
    noisy_input_ids: torch.LongTensor  # (batch, length), or (batch, 2, length) with complementary masking
    diffusion_loss_weights: torch.Tensor | None  # same shape; 1/t (ELBO) times the position decay, else None
    maskable: torch.BoolTensor  # (batch, length)
    masked: torch.BoolTensor  # (batch, length): masked in the first copy
    noise_level: torch.Tensor  # (batch, length): t of the token's block (0 for context tokens)

    @property
    def masked_fraction(self) -> float:
        """Share of maskable positions masked in the first copy (tracks E[t] = (1 + eps) / 2)."""
        return float(self.masked_share())

    def masked_share(self) -> torch.Tensor:
        """``masked_fraction`` as a tensor on the batch's device: reading it needs no wait for the GPU."""
        return self.masked.sum() / self.maskable.sum().clamp(min=1)


class NoiseSampler:
    """Draws ``x_t`` for a batch; see the module docstring. Uses ``generator`` or torch's global RNG."""

    def __init__(
        self, mask_token_id: int, eps: float = 1e-3, complementary: bool = False, elbo_weighting: bool = False,
        whole_blocks: float = 0.0, position_decay: float = 0.0,
    ):  # fmt: skip
        if not 0.0 <= eps < 1.0:
            raise ValueError(f"noise eps must be in [0, 1), got {eps}.")
        if not 0.0 <= whole_blocks <= 1.0:
            raise ValueError(f"The share of wholly masked blocks must be in [0, 1], got {whole_blocks}.")
        if position_decay < 0:
            raise ValueError(f"position_decay is a length in positions (0 = off), got {position_decay}.")
        self.position_decay = position_decay
        self.whole_blocks = whole_blocks
        self.mask_token_id = mask_token_id
        self.eps = eps
        self.complementary = complementary
        self.elbo_weighting = elbo_weighting

    def __call__(self, input_ids, attention_mask=None, labels=None, block_size: int = 1, generator=None) -> NoisyBatch:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if labels is None:
            labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
        blocks, offsets = block_grid(block_size, attention_mask, labels)
        maskable = (offsets > 0) & (labels != IGNORE_INDEX) & attention_mask.bool()

        batch, length = input_ids.shape
        high = 1.0 - self.eps if self.complementary else 1.0  # the complementary copy has level 1 - t
        # One level per possible block (ids are < length): sizing by the batch's block count would read it off the
        # GPU, a host sync on every training step.
        t_blocks = self.eps + (high - self.eps) * torch.rand(
            batch, length, device=input_ids.device, generator=generator
        )
        if self.whole_blocks:
            whole = torch.rand(batch, length, device=input_ids.device, generator=generator) < self.whole_blocks
            t_blocks = t_blocks.masked_fill(whole, high)
        t = torch.where(offsets >= 0, t_blocks.gather(1, blocks.clamp(min=0)), 0.0)  # context: 0
        masked = maskable & (torch.rand(t.shape, device=t.device, generator=generator) < t)

        noisy = input_ids.masked_fill(masked, self.mask_token_id)
        weights = (1.0 / t.clamp(min=self.eps)) if self.elbo_weighting else None
        if self.complementary:
            noisy = torch.stack([noisy, input_ids.masked_fill(maskable & ~masked, self.mask_token_id)], dim=1)
            if weights is not None:
                weights = torch.stack([weights, 1.0 / (1.0 - t).clamp(min=self.eps)], dim=1)
        if self.position_decay:
            # only masked positions are read, and those have offset >= 1
            decay = torch.exp(-(offsets - 1).clamp(min=0).float() / self.position_decay)
            decay = decay.unsqueeze(1).expand(-1, 2, -1) if self.complementary else decay
            weights = decay if weights is None else weights * decay
        return NoisyBatch(noisy, weights, maskable, masked, t)
