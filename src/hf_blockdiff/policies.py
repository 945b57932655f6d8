# Copyright 2026 The hf_blockdiff authors. Apache-2.0.
"""How a denoising step chooses tokens and which of them it commits: small pieces the decode engine plugs in.

Hub-portable: imports only torch and its sibling files.

Everything works on whole batches of slots at once, and every per-request setting is a per-row tensor, so one
forward can serve rows with different thresholds, temperatures or block sizes.

- :func:`propose`: a token and a confidence for every position, from the logits. Never the mask token (its row
  is new and can win; a loop that commits it never ends), never EOS where ``min_new_tokens`` forbids it.
  Sampling draws with the exponential race (``argmax p / E``, ``E ~ Exp(1)``) from per-row noise, so a row's
  draws do not depend on which other rows share the batch.
- :class:`CommitRule`: which open (still masked) positions of a block to commit after a step. A new rule is
  one small subclass; :class:`Threshold`, :class:`FixedSteps` and :class:`RepeatGuard` are the shipped ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .settings import CONFIDENCE_MEASURES


@dataclass
class Sampling:
    """Per-row sampling settings, each a ``(rows,)`` tensor. ``do_sample`` False rows decode greedily."""

    do_sample: torch.Tensor  # bool
    temperature: torch.Tensor  # float, > 0
    top_k: torch.Tensor  # long, 0 = off
    top_p: torch.Tensor  # float, 1.0 = off
    # Whether any row may use top-k / top-p. A host-side flag rather than a check of the tensors, so that a
    # step stays free of host syncs (and capturable); False skips the vocabulary sort.
    filtered: bool = True


def confidence(probs: torch.Tensor, tokens: torch.Tensor, measure: str) -> torch.Tensor:
    """How sure the distribution ``probs`` (``(..., vocab)``) is about ``tokens``, in [0, 1]."""
    if measure == "probability":
        return probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    if measure == "margin":
        top2 = probs.topk(2, dim=-1).values
        return top2[..., 0] - top2[..., 1]
    if measure == "entropy":  # exp(-H): 1 for a one-hot distribution
        return torch.exp((probs * torch.log(probs.clamp_min(1e-30))).sum(-1))
    raise ValueError(f"confidence must be one of {CONFIDENCE_MEASURES}, got {measure!r}.")


def restrict(scores: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Scores (``(rows, n, vocab)``) with tokens outside each row's top-k / nucleus set to -inf (rows with
    ``top_k`` 0 and ``top_p`` 1 keep every token)."""
    sorted_scores, order = scores.sort(dim=-1, descending=True)
    rank = torch.arange(scores.shape[-1], device=scores.device)
    k = torch.where(top_k > 0, top_k, scores.shape[-1]).view(-1, 1, 1)
    # nucleus: keep the smallest prefix whose mass reaches top_p (the top token always stays)
    sorted_probs = sorted_scores.softmax(-1)
    mass_before = sorted_probs.cumsum(-1) - sorted_probs
    top_p = top_p.view(-1, 1, 1)
    drop = (rank >= k) | ((top_p < 1) & (mass_before >= top_p))  # top_p 1: rounding must not drop the tail
    drop[..., 0] = False
    scores = scores.scatter(-1, order, sorted_scores.masked_fill(drop, -math.inf))
    return scores


def propose(
    logits: torch.Tensor,
    sampling: Sampling,
    measure: str,
    mask_token_id: int | None,
    eos_token_ids: torch.Tensor,
    forbid_eos: torch.Tensor,
    noise: torch.Tensor | None = None,
    with_dist: bool = False,
):
    """Token and confidence at every position of ``logits`` (``(rows, n, vocab)``); with ``with_dist`` also the
    distribution each token was drawn from (greedy rows: the temperature-free softmax).

    ``eos_token_ids`` must lie inside the vocabulary (the engine filters them once; filtering here would read
    the device). ``forbid_eos`` (``(rows, n)``) marks positions where EOS may not be chosen. ``noise`` (``(rows, n, vocab)``,
    ``Exp(1)`` draws) is needed when any row samples. Confidence is read off the temperature-scaled distribution
    before top-k / top-p, which only restrict what may be drawn.
    """
    scores = logits.float()
    vocab = scores.shape[-1]
    if mask_token_id is not None and mask_token_id < vocab:
        scores[..., mask_token_id] = -math.inf
    if eos_token_ids.numel():
        eos = eos_token_ids
        scores[..., eos] = scores[..., eos].masked_fill(forbid_eos.unsqueeze(-1), -math.inf)
    sampled = sampling.do_sample.view(-1, 1, 1)
    if noise is not None:
        scores = torch.where(sampled, scores / sampling.temperature.view(-1, 1, 1), scores)
    probs = scores.softmax(-1)
    tokens, dist = probs.argmax(-1), probs
    if noise is not None:
        allowed = restrict(scores, sampling.top_k, sampling.top_p) if sampling.filtered else scores
        target = allowed.softmax(-1)
        tokens = torch.where(sampled.view(-1, 1), (target / noise).argmax(-1), tokens)
        dist = torch.where(sampled, target, probs) if with_dist else dist
    conf = confidence(probs, tokens, measure)
    return (tokens, conf, dist) if with_dist else (tokens, conf)


def speculative_accept(target, draft, drafted, uniform, noise):
    """Speculative sampling (Leviathan et al. 2023; Chen et al. 2023) position by position.

    ``drafted`` (``(rows, n)``) was drawn from ``draft`` (``(rows, n, vocab)``); ``target`` is the distribution the
    output must follow at the same positions, each given everything before it. A drafted token is accepted with
    probability ``min(1, target / draft)`` (``uniform``: ``U(0, 1)`` draws); at the first rejection the output is a
    draw from ``max(0, target - draft)`` renormalised, so every output token follows ``target`` exactly. Returns
    ``(accepted, residual)``: a bool ``(rows, n)`` decision for every position (the caller keeps the accepted
    prefix) and a residual draw at every position (exponential race with ``noise``, ``Exp(1)`` draws).
    """
    p = target.gather(-1, drafted.unsqueeze(-1)).squeeze(-1)
    q = draft.gather(-1, drafted.unsqueeze(-1)).squeeze(-1)
    accepted = uniform * q < p  # u < p / q without dividing (q > 0: the token was drawn from it)
    residual = ((target - draft).clamp_min(0) / noise).argmax(-1)
    return accepted, residual


# ----------------------------------------------------------------------------------------------------------
# Commit rules


class CommitRule:
    """Which open positions of each row's block to commit after a denoising step.

    ``select`` gets ``conf`` and ``proposal`` (``(rows, n)``) for the positions that can still be filled,
    ``open_`` (``(rows, n)``, bool) for those still masked, and ``steps`` (``(rows,)``): the denoising steps the
    row already spent on this block. It returns a bool ``(rows, n)`` mask; it must commit at least one open
    position of every row that has one, so that every step makes progress.
    """

    def select(self, conf, proposal, open_, steps) -> torch.Tensor:
        raise NotImplementedError


def settings_of(obj) -> list[torch.Tensor]:
    """The per-row tensors of a rule or :class:`Sampling`, in a fixed order (an engine built for one set of
    settings takes another of the same structure by copying these in place)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in settings_of(item)]
    if isinstance(obj, (CommitRule, Sampling)):
        return [t for value in vars(obj).values() for t in settings_of(value)]
    return []


def structure_of(obj):
    """What must match for :func:`settings_of` of two objects to be interchangeable: types, shapes and flags."""
    if isinstance(obj, torch.Tensor):
        return (tuple(obj.shape), obj.dtype)
    if isinstance(obj, (list, tuple)):
        return tuple(structure_of(item) for item in obj)
    if isinstance(obj, (CommitRule, Sampling)):
        return (type(obj).__name__, tuple((k, structure_of(v)) for k, v in vars(obj).items()))
    return obj


# A FixedSteps quota that never binds (see FixedSteps); small enough that the quota arithmetic cannot overflow.
NO_STEP_QUOTA = 2**62


def most_confident(conf: torch.Tensor, open_: torch.Tensor, quota: torch.Tensor) -> torch.Tensor:
    """Each row's ``quota`` most confident open positions (ties: the leftmost)."""
    ranked = torch.where(open_, conf, -math.inf)
    order = ranked.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(
        1, order, torch.arange(order.shape[1], device=order.device).expand_as(order)
    )
    return open_ & (rank < quota.unsqueeze(1))


class Threshold(CommitRule):
    """Commit every open position whose confidence exceeds the row's threshold, and at least the best one.

    Threshold 1 commits one token per step (never more); 0 commits every position whose confidence is above 0.
    """

    def __init__(self, threshold: torch.Tensor):
        self.threshold = threshold  # (rows,)

    def select(self, conf, proposal, open_, steps):
        return most_confident(conf, open_, torch.ones_like(steps)) | (open_ & (conf > self.threshold.unsqueeze(1)))


class FixedSteps(CommitRule):
    """Finish every block in ``steps_per_block`` denoising steps, spreading what is left evenly over them.

    A row with :data:`NO_STEP_QUOTA` commits one position per step: what a threshold commits at least, so next to
    a :class:`Threshold` (``AnyOf``) the row is decoded by its threshold alone.
    """

    def __init__(self, steps_per_block: torch.Tensor):
        self.steps_per_block = steps_per_block  # (rows,)

    def select(self, conf, proposal, open_, steps):
        steps_left = (self.steps_per_block - steps).clamp(min=1)
        quota = torch.div(open_.sum(1) + steps_left - 1, steps_left, rounding_mode="floor")
        return most_confident(conf, open_, quota)


class RepeatGuard(CommitRule):
    """Wraps a rule: hold back a commit beyond the single most confident one when an adjacent, still-masked
    position proposes the same token.

    Both were predicted without seeing each other, and a small model's marginals then often put one word on two
    neighbours ("a a"). The held-back position is predicted again next step with its neighbour known. ``on``
    (``(rows,)`` bool): the rows it guards (None: all).
    """

    def __init__(self, rule: CommitRule, on: torch.Tensor | None = None):
        self.rule, self.on = rule, on

    def select(self, conf, proposal, open_, steps):
        commit = self.rule.select(conf, proposal, open_, steps)
        best = most_confident(conf, open_, torch.ones_like(steps))
        repeats = torch.zeros_like(open_)
        same = proposal[:, 1:] == proposal[:, :-1]
        repeats[:, 1:] |= same & open_[:, :-1]  # the left neighbour is open and proposes the same token
        repeats[:, :-1] |= same & open_[:, 1:]  # likewise on the right
        guarded = best | (commit & ~repeats)
        return guarded if self.on is None else torch.where(self.on.unsqueeze(1), guarded, commit)


class AnyOf(CommitRule):
    """Commit what any of the rules commits (e.g. a step quota plus a confidence threshold)."""

    def __init__(self, *rules: CommitRule):
        self.rules = rules

    def select(self, conf, proposal, open_, steps):
        commit = self.rules[0].select(conf, proposal, open_, steps)
        for rule in self.rules[1:]:
            commit = commit | rule.select(conf, proposal, open_, steps)
        return commit


def per_row_rule(rows: int, device) -> RepeatGuard:
    """A rule whose threshold, step quota and repeat guard are all per-row settings, so that rows decoded together
    (a server's requests) may each use their own: ``rule.on``, ``rule.rule.rules`` = ``(FixedSteps, Threshold)``.
    Every row starts with none of them: a threshold of inf, :data:`NO_STEP_QUOTA`, unguarded; it commits one
    position per step then, and selects exactly what the rules its settings describe alone would."""
    quota = FixedSteps(torch.full((rows,), NO_STEP_QUOTA, dtype=torch.long, device=device))
    threshold = Threshold(torch.full((rows,), math.inf, device=device))
    return RepeatGuard(AnyOf(quota, threshold), on=torch.zeros(rows, dtype=torch.bool, device=device))
