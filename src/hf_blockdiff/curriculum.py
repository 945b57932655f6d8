# Copyright 2026 The hf_blockdiff authors. Apache-2.0.
"""Gradual block growth (docs/design.md 2.4): start as the AR model (block size 1) and double up to ``b_max``.

    b(s) = min(b_max, b0 * r ** floor(max(0, s - s0) / interval))

The callback applies the schedule at optimizer-step boundaries, writes it into ``model.config.block_size`` (so a
saved model carries the size it was trained at) and its generation default, and keeps its state in the
checkpoint, so ``resume_from_checkpoint`` continues at the right block size.
"""

from __future__ import annotations

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState
from transformers.utils import logging

logger = logging.get_logger(__name__)


def block_size_at(step: int, max_block_size: int, start: int = 1, ratio: int = 2, warmup_steps: int = 0,
                  interval_steps: int | None = None) -> int:  # fmt: skip
    """Block size at optimizer step ``step``; ``interval_steps=None`` (not yet resolved) means ``start``."""
    if interval_steps is None:
        return start
    if interval_steps < 1:
        raise ValueError(f"interval_steps must be >= 1, got {interval_steps}.")
    doublings = max(0, step - warmup_steps) // interval_steps
    # Grow in integers and stop early: ratio ** doublings overflows nothing this way.
    size = start
    for _ in range(doublings):
        if size >= max_block_size:
            break
        size *= ratio
    return min(max_block_size, size)


class BlockGrowthCallback(TrainerCallback, ExportableState):
    """Applies :func:`block_size_at`; the trainer reads the current size from ``model.config.block_size``."""

    def __init__(self, max_block_size: int, start: int = 1, ratio: int = 2, warmup_steps: int = 0,
                 interval_steps: int | None = None):  # fmt: skip
        """``interval_steps=None``: resolved when training starts so that every size gets an equal share of the
        steps after warm-up."""
        if start < 1 or ratio < 2 or max_block_size < start:
            raise ValueError(
                f"Invalid block growth: start={start}, ratio={ratio}, max_block_size={max_block_size} "
                "(need 1 <= start <= max_block_size and ratio >= 2)."
            )
        self.schedule = dict(max_block_size=max_block_size, start=start, ratio=ratio, warmup_steps=warmup_steps,
                             interval_steps=interval_steps)  # fmt: skip
        self.block_size = None
        self.transitions: list[tuple[int, int]] = []  # (step, new block size)

    def size_at(self, step: int) -> int:
        return block_size_at(step, **self.schedule)

    def apply(self, step: int, model) -> int:
        size = self.size_at(step)
        if size != self.block_size:
            if self.block_size is not None:
                logger.info(f"Block growth: block size {self.block_size} -> {size} at step {step}")
            self.transitions.append((step, size))
            self.block_size = size
        if model is not None:
            model.config.block_size = size
            if getattr(model, "generation_config", None) is not None:
                model.generation_config.block_size = size
        return size

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.schedule["interval_steps"] is None:
            self.schedule["interval_steps"] = self.even_interval(state.max_steps)
        self.apply(state.global_step, model)

    def even_interval(self, total_steps: int) -> int:
        """Interval giving every block size of the schedule the same share of the steps after warm-up."""
        sizes, size = 1, self.schedule["start"]
        while size < self.schedule["max_block_size"]:
            size *= self.schedule["ratio"]
            sizes += 1
        return max(1, (total_steps - self.schedule["warmup_steps"]) // sizes)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.apply(state.global_step, model)

    def state(self) -> dict:
        return {
            "args": dict(self.schedule),
            "attributes": {"block_size": self.block_size, "transitions": self.transitions},
        }
