# Copyright 2026 The hf_blockdiff authors. Apache-2.0.
"""Block-wise denoising generation with an exact prefix KV cache (DESIGN.md 2.5).

Hub-portable: imports only torch, transformers and its sibling files.

    prefill:  one causal forward over the prompt fills the cache; its last logit gives block 0's first token.
    per block of size b, input [first, MASK x (b-1)]:
      denoise: forward the block against the cache *without writing it*; choose a token for every masked
               position; commit those whose confidence passes the policy; repeat until none is masked.
      commit:  one causal forward over the finished block writes its KV (so the cache always equals a causal
               prefill of the committed tokens) and its last logit gives the next block's first token.

Rows of a batch advance block by block together; inside a block a row whose block is finished sits out the
remaining denoising forwards, and a row that ended (EOS, stopping criteria) leaves the batch and its cache.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from transformers import DynamicCache, GenerationConfig, StoppingCriteriaList, StopStringCriteria
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper
from transformers.modeling_outputs import ModelOutput
from transformers.utils import logging

from .masks import attention_backend, denoise_meta, positions_from_padding

logger = logging.get_logger(__name__)

CONFIDENCE_MEASURES = ("probability", "margin", "entropy")
DEFAULT_THRESHOLD = 0.9
# generate() kwargs (and generation_config attributes) that belong to block diffusion
BLOCK_SETTINGS = ("block_size", "threshold", "steps_per_block", "confidence", "repeat_guard")
# generate() arguments that this decoder cannot honour; failing loudly beats silently ignoring them.
UNSUPPORTED = (
    "inputs_embeds",
    "logits_processor",
    "assistant_model",
    "prefix_allowed_tokens_fn",
    "negative_prompt_ids",
)


@dataclass
class BlockDiffusionGenerateOutput(ModelOutput):
    """``generate(..., return_dict_in_generate=True)`` output.

    sequences: prompt + generated tokens, padded with ``pad_token_id`` after a row's end.
    num_forward_passes: every model forward of the batch (prefill, denoising steps, commits).
    row_forward_passes: ``(batch,)`` forwards each row took part in: what it would cost decoded alone.
    num_generated_tokens: ``(batch,)`` tokens each row generated, its EOS included.
    committed_at: ``(batch, new_tokens)`` the row's forward (1-based) that committed each token; -1 = padding.
    past_key_values: the prefix cache after the last commit, for the rows still decoding then (every row
    unless some ended early); it holds all but the last block.
    Tokens per forward: ``num_generated_tokens / row_forward_passes`` per row, or
    ``num_generated_tokens.sum() / num_forward_passes`` for the batch as decoded.
    """

    sequences: torch.LongTensor | None = None
    num_forward_passes: int | None = None
    row_forward_passes: torch.LongTensor | None = None
    num_generated_tokens: torch.LongTensor | None = None
    committed_at: torch.LongTensor | None = None
    past_key_values: DynamicCache | None = None
    block_size: int | None = None


@dataclass
class DenoisePolicy:
    """How tokens are chosen and committed; resolved from generation_config and generate() kwargs."""

    block_size: int
    threshold: float | None  # commit every masked position whose confidence exceeds it (at least one per step)
    steps_per_block: int | None  # or: finish every block in this many denoising steps
    confidence: str
    do_sample: bool
    temperature: float
    top_k: int | None
    top_p: float | None
    max_new_tokens: int
    min_new_tokens: int
    eos_token_ids: list[int]
    pad_token_id: int
    mask_token_id: int | None
    return_dict_in_generate: bool = False
    stop_strings: list[str] | None = None
    repeat_guard: bool = False  # hold back threshold commits that repeat an adjacent, still-unknown proposal


# ----------------------------------------------------------------------------------------------------------
# Settings


def resolve_policy(model, prompt_length: int, generation_config, kwargs: dict) -> DenoisePolicy:
    """Merge ``generation_config`` (or the model's) with call kwargs, validate, and return the policy."""
    for name in UNSUPPORTED:
        if kwargs.pop(name, None) is not None:
            raise ValueError(f"Block-diffusion generate() does not support `{name}`.")
    gc = copy.deepcopy(generation_config if generation_config is not None else model.generation_config)
    block_kwargs = {k: kwargs.pop(k) for k in BLOCK_SETTINGS if k in kwargs}
    unused = gc.update(**kwargs)
    for key in ("use_cache", "synced_gpus"):
        unused.pop(key, None)
    if unused:
        logger.warning_once(f"generate() ignores arguments it does not know: {sorted(unused)}")
    if (gc.num_beams or 1) > 1:
        raise ValueError("Block-diffusion generate() does not support beam search (num_beams > 1).")

    def setting(name, default):
        value = block_kwargs.get(name, getattr(gc, name, None))
        return default if value is None else value

    block_size = setting("block_size", getattr(model.config, "block_size", None) or 1)
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
        raise ValueError(f"block_size must be an integer >= 1, got {block_size!r}.")
    steps_per_block = block_kwargs.get("steps_per_block", getattr(gc, "steps_per_block", None))
    threshold = block_kwargs.get("threshold", getattr(gc, "threshold", None))
    if threshold is None and steps_per_block is None:
        threshold = DEFAULT_THRESHOLD
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}.")
    if steps_per_block is not None and (not isinstance(steps_per_block, int) or steps_per_block < 1):
        raise ValueError(f"steps_per_block must be an integer >= 1, got {steps_per_block!r}.")
    confidence = setting("confidence", "probability")
    if confidence not in CONFIDENCE_MEASURES:
        raise ValueError(f"confidence must be one of {CONFIDENCE_MEASURES}, got {confidence!r}.")

    max_new_tokens = gc.max_new_tokens
    if max_new_tokens is None:
        max_new_tokens = gc.max_length - prompt_length
    if max_new_tokens < 1:
        raise ValueError(
            f"Nothing to generate: max_length={gc.max_length} leaves no room after a {prompt_length}-token prompt; "
            "set max_new_tokens."
        )
    min_new_tokens = (
        gc.min_new_tokens if gc.min_new_tokens is not None else max(0, (gc.min_length or 0) - prompt_length)
    )

    eos = gc.eos_token_id if gc.eos_token_id is not None else model.config.eos_token_id
    eos_token_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    pad_token_id = gc.pad_token_id
    if pad_token_id is None:
        pad_token_id = eos_token_ids[0] if eos_token_ids else 0
    do_sample = bool(gc.do_sample) and (gc.temperature is None or gc.temperature > 0)
    return DenoisePolicy(
        block_size=block_size,
        threshold=threshold,
        steps_per_block=steps_per_block,
        confidence=confidence,
        do_sample=do_sample,
        temperature=gc.temperature or 1.0,
        top_k=gc.top_k if do_sample and gc.top_k else None,
        top_p=gc.top_p if do_sample and gc.top_p is not None and gc.top_p < 1.0 else None,
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens,
        eos_token_ids=eos_token_ids,
        pad_token_id=pad_token_id,
        mask_token_id=getattr(model.config, "mask_token_id", None),
        return_dict_in_generate=bool(gc.return_dict_in_generate),
        stop_strings=[gc.stop_strings] if isinstance(gc.stop_strings, str) else gc.stop_strings,
        repeat_guard=bool(setting("repeat_guard", False)),
    )


def check_inputs(model, input_ids, attention_mask, policy: DenoisePolicy):
    if input_ids is None or input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError("generate() needs `input_ids` of shape (batch, prompt_length) with a non-empty prompt.")
    if attention_mask is not None:
        mask = attention_mask.bool()
        if (mask[:, 1:] < mask[:, :-1]).any():
            raise ValueError(
                "Right padding found in attention_mask; block-diffusion generate() needs left padding "
                "(tokenizer.padding_side = 'left')."
            )
    prompt_lengths = attention_mask.sum(-1) if attention_mask is not None else torch.tensor([input_ids.shape[1]])
    limit = getattr(model.config.get_text_config(decoder=True), "max_position_embeddings", None)
    longest = int(prompt_lengths.max())
    if limit is not None and longest + policy.max_new_tokens > limit:
        raise ValueError(
            f"The prompt ({longest} tokens) plus max_new_tokens ({policy.max_new_tokens}) exceeds the model's "
            f"{limit} positions (max_position_embeddings); shorten the prompt or lower max_new_tokens."
        )
    if policy.block_size > 1:
        if policy.mask_token_id is None:
            raise ValueError(
                "config.mask_token_id is missing, so masked positions cannot be denoised. Convert the model with "
                "`hf_blockdiff.convert_model` / `hf_blockdiff convert`, or generate with block_size=1."
            )
        attention_backend(model.config)


# ----------------------------------------------------------------------------------------------------------
# Choosing and committing tokens


def choose_tokens(logits: torch.Tensor, policy: DenoisePolicy, forbid_eos: torch.Tensor, generator=None):
    """Token and confidence for every position of ``logits`` (``(..., vocab)``); never the mask token."""
    shape, vocab = logits.shape[:-1], logits.shape[-1]
    scores = logits.reshape(-1, vocab).float()
    if policy.mask_token_id is not None and policy.mask_token_id < vocab:
        # The mask row is new and can win; committing it would never finish the block (DESIGN.md 2.5.5).
        scores[:, policy.mask_token_id] = -math.inf
    if policy.eos_token_ids and forbid_eos.any():
        eos = torch.tensor(policy.eos_token_ids, device=scores.device)
        rows = forbid_eos.reshape(-1).nonzero().squeeze(1)
        scores[rows.unsqueeze(1), eos.unsqueeze(0)] = -math.inf
    if policy.do_sample:
        scores = scores / policy.temperature
        probs = scores.softmax(-1)  # confidence is read off the unfiltered distribution: top-k/top-p only
        filtered = scores  # restrict what may be drawn; with top_k=1 sampling is exactly greedy decoding
        if policy.top_k is not None:
            filtered = TopKLogitsWarper(top_k=policy.top_k)(None, filtered)
        if policy.top_p is not None:
            filtered = TopPLogitsWarper(top_p=policy.top_p)(None, filtered)
        tokens = torch.multinomial(filtered.softmax(-1), 1, generator=generator).squeeze(1)
    else:
        probs = scores.softmax(-1)
        tokens = probs.argmax(-1)
    if policy.confidence == "probability":
        conf = probs.gather(1, tokens.unsqueeze(1)).squeeze(1)
    elif policy.confidence == "margin":
        top2 = probs.topk(2, dim=-1).values
        conf = top2[:, 0] - top2[:, 1]
    else:  # "entropy": exp(-H) in (0, 1], 1 for a one-hot distribution
        conf = torch.exp((probs * torch.log(probs.clamp_min(1e-30))).sum(-1))
    return tokens.view(shape), conf.view(shape)


def select_commits(conf: torch.Tensor, open_: torch.Tensor, threshold: float | None, quota: torch.Tensor,
                   proposal: torch.Tensor | None = None):  # fmt: skip
    """Positions to commit: each row's ``quota`` most confident open ones, plus every open one whose confidence
    exceeds ``threshold``.

    With ``proposal`` (the repeat guard) a threshold commit is held back when an adjacent position that was
    still masked proposes the same token: both were predicted without seeing each other, and a small model's
    marginals then often put one word on two neighbours ("a a"). The held-back position is re-predicted next
    step with its neighbour known; the quota commits keep every step making progress."""
    ranked = torch.where(open_, conf, -math.inf)
    order = ranked.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(
        1, order, torch.arange(order.shape[1], device=order.device).expand_as(order)
    )
    commit = open_ & (rank < quota.unsqueeze(1))
    if threshold is not None:
        extra = open_ & (conf > threshold)
        if proposal is not None:
            same_left = (proposal[:, 1:] == proposal[:, :-1]) & open_[
                :, :-1
            ]  # for positions 1.., neighbour on the left
            same_right = (proposal[:, :-1] == proposal[:, 1:]) & open_[:, 1:]  # for positions ..-1, on the right
            extra[:, 1:] &= ~same_left
            extra[:, :-1] &= ~same_right
        commit |= extra
    return commit


def close_after_eos(block: torch.Tensor, done: torch.Tensor, policy: DenoisePolicy):
    """Once a row commits EOS, the positions after it are padding and need no denoising.

    Returns each row's number of kept tokens (up to and including its first committed EOS, else the block
    size) and whether the row ended.
    """
    size = block.shape[1]
    if not policy.eos_token_ids:
        kept = torch.full((block.shape[0],), size, dtype=torch.long, device=block.device)
        return kept, torch.zeros_like(kept, dtype=torch.bool)
    index = torch.arange(size, device=block.device)
    is_eos = done & torch.isin(block, torch.tensor(policy.eos_token_ids, device=block.device))
    kept = torch.where(is_eos, index + 1, size).min(dim=1).values
    after = index.unsqueeze(0) >= kept.unsqueeze(1)
    block.masked_fill_(after, policy.pad_token_id)
    done |= after
    return kept, is_eos.any(dim=1)


def select_cache_rows(cache: DynamicCache, rows: torch.Tensor | None) -> DynamicCache:
    """A fresh cache holding ``rows`` of ``cache`` (all rows when None); ``cache`` itself is never modified."""
    out = DynamicCache()
    for layer_idx, layer in enumerate(cache.layers):
        keys, values = layer.keys, layer.values
        if rows is not None:
            keys, values = keys[rows], values[rows]
        out.update(keys, values, layer_idx)
    return out


# ----------------------------------------------------------------------------------------------------------
# The loop


class _Rows:
    """The rows still decoding and everything indexed by them; the cache holds exactly these rows, in order."""

    def __init__(self, model, attention_mask: torch.Tensor, policy: DenoisePolicy, batch_forwards: list):
        self.model, self.policy, self.batch_forwards = model, policy, batch_forwards
        self.index = torch.arange(attention_mask.shape[0], device=attention_mask.device)  # rows of the batch
        self.key_valid = attention_mask.bool()
        self.key_pos = positions_from_padding(attention_mask)
        self.next_pos = attention_mask.sum(-1)
        self.cache = DynamicCache()
        self.forwards = torch.zeros_like(self.index)  # per row of the *batch*: forwards it took part in

    def _forward(self, rows, ids, mask, positions, cache, **extra):
        self.batch_forwards[0] += 1
        self.forwards[self.index[rows]] += 1
        return self.model(
            input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True, **extra
        ).logits

    def prefill(self, input_ids):
        """Causal forward over the prompt into the cache; the last logits give block 0's first token."""
        return self._forward(
            slice(None), input_ids, self.key_valid.long(), self.key_pos, self.cache, logits_to_keep=1
        )[:, -1]

    def denoise(self, rows, block):
        """Logits of ``block`` (for ``rows``) run against the cache without writing to it."""
        size = block.shape[1]
        positions = self.next_pos[rows].unsqueeze(1) + torch.arange(size, device=block.device)
        meta = denoise_meta(self.key_pos[rows], self.key_valid[rows], positions)
        view = select_cache_rows(self.cache, None if rows.numel() == self.index.numel() else rows)
        masks = self.model.block_diffusion_masks(meta, self.key_pos.shape[1], size)
        return self._forward(rows, block, masks, positions, view)

    def commit(self, block):
        """Causal forward over a finished block: writes its KV; the last logits give the next first token."""
        positions = self.next_pos.unsqueeze(1) + torch.arange(block.shape[1], device=block.device)
        self.key_valid = torch.cat([self.key_valid, torch.ones_like(block, dtype=torch.bool)], dim=1)
        self.key_pos = torch.cat([self.key_pos, positions], dim=1)
        self.next_pos = self.next_pos + block.shape[1]
        return self._forward(slice(None), block, self.key_valid.long(), positions, self.cache, logits_to_keep=1)[:, -1]

    def keep(self, keep: torch.Tensor):
        """Drop the other rows (ended ones) from the batch and the cache."""
        self.cache = select_cache_rows(self.cache, keep)
        self.index, self.key_valid, self.key_pos, self.next_pos = (
            self.index[keep],
            self.key_valid[keep],
            self.key_pos[keep],
            self.next_pos[keep],
        )


def _denoise_block(state: _Rows, block, n: int, policy: DenoisePolicy, generator, streamer):
    """Fill the masked positions of ``block`` (position 0 is given) step by step.

    Returns ``(kept, ended, committed_at)``: tokens kept per row (up to and including EOS), rows that committed
    EOS, and the row-forward index that committed each position.
    """
    rows_now, size = block.shape
    device = block.device
    done = torch.zeros_like(block, dtype=torch.bool)
    done[:, 0] = True
    at = torch.full_like(block, -1)
    at[:, 0] = state.forwards[state.index]
    steps = torch.zeros(rows_now, dtype=torch.long, device=device)
    forbid_eos = (n + 1 + torch.arange(size - 1, device=device)) < policy.min_new_tokens
    kept, ended = close_after_eos(block, done, policy)

    while not done.all():
        rows = (~done).any(dim=1).nonzero().squeeze(1)  # rows whose block is finished sit this step out
        logits = state.denoise(rows, block[rows])[:, :-1]  # position i predicts i + 1
        proposal, conf = choose_tokens(logits, policy, forbid_eos.expand(rows.numel(), -1), generator)
        open_ = ~done[rows, 1:]
        if policy.steps_per_block is not None:  # spread what is left evenly over the steps left
            steps_left = (policy.steps_per_block - steps[rows]).clamp(min=1)
            quota = torch.div(open_.sum(1) + steps_left - 1, steps_left, rounding_mode="floor")
        else:
            quota = torch.ones_like(rows)
        commit = select_commits(conf, open_, policy.threshold, quota, proposal if policy.repeat_guard else None)
        block[rows, 1:] = torch.where(commit, proposal, block[rows, 1:])
        done[rows, 1:] |= commit
        at[rows, 1:] = torch.where(commit, state.forwards[state.index[rows]].unsqueeze(1), at[rows, 1:])
        steps[rows] += 1
        kept, ended = close_after_eos(block, done, policy)
        if streamer is not None and hasattr(streamer, "put_draft"):  # e.g. transformers' TextDiffusionStreamer
            draft = torch.where(done[:1, 1:], block[:1, 1:], proposal[:1])
            streamer.put_draft(value=torch.cat([block[:1, :1], draft], dim=1).cpu())
    at.masked_fill_(torch.arange(size, device=device) >= kept.unsqueeze(1), -1)
    return kept, ended, at


def generate_blocks(
    model,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None = None,
    generation_config: GenerationConfig | None = None,
    streamer=None,
    stopping_criteria: StoppingCriteriaList | None = None,
    generator: torch.Generator | None = None,
    **kwargs,
):
    """Decode block by block; returns sequences, or a :class:`BlockDiffusionGenerateOutput`."""
    tokenizer = kwargs.pop("tokenizer", None)
    policy = resolve_policy(model, input_ids.shape[1] if input_ids is not None else 0, generation_config, kwargs)
    check_inputs(model, input_ids, attention_mask, policy)
    if policy.stop_strings:
        if tokenizer is None:
            raise ValueError("stop_strings needs the tokenizer: pass generate(..., tokenizer=tokenizer).")
        criteria = list(stopping_criteria or []) + [StopStringCriteria(tokenizer, policy.stop_strings)]
        stopping_criteria = StoppingCriteriaList(criteria)
    if streamer is not None and input_ids.shape[0] > 1:
        raise ValueError("A streamer supports batch size 1 only, as in transformers' generate().")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)

    batch, device = input_ids.shape[0], input_ids.device
    tokens = torch.full((batch, policy.max_new_tokens), policy.pad_token_id, dtype=torch.long, device=device)
    committed_at = torch.full_like(tokens, -1)
    num_generated = torch.zeros(batch, dtype=torch.long, device=device)
    batch_forwards = [0]
    state = _Rows(model, attention_mask, policy, batch_forwards)

    if streamer is not None:
        streamer.put(input_ids.cpu())
    no_eos = torch.full((batch,), policy.min_new_tokens > 0, device=device)
    first, _ = choose_tokens(state.prefill(input_ids), policy, no_eos, generator)

    n = 0  # tokens generated so far by every row still decoding
    while n < policy.max_new_tokens:
        size = min(policy.block_size, policy.max_new_tokens - n)
        block = first.unsqueeze(1).repeat(1, size)
        if size > 1:
            block[:, 1:] = policy.mask_token_id
        kept, ended, at = _denoise_block(state, block, n, policy, generator, streamer)
        tokens[state.index, n : n + size] = block
        committed_at[state.index, n : n + size] = at
        num_generated[state.index] += kept
        if streamer is not None:
            streamer.put(block[0, : kept[0]].cpu())
        n += size
        if stopping_criteria:
            so_far = torch.cat([input_ids[state.index], tokens[state.index, :n]], dim=1)
            ended |= torch.as_tensor(stopping_criteria(so_far, None), device=device).expand_as(ended).bool()
        if n >= policy.max_new_tokens or ended.all():
            break
        if ended.any():  # ended rows leave the batch and the cache
            keep = (~ended).nonzero().squeeze(1)
            state.keep(keep)
            block = block[keep]
        no_eos = torch.full((block.shape[0],), n < policy.min_new_tokens, device=device)
        first, _ = choose_tokens(state.commit(block), policy, no_eos, generator)

    if streamer is not None:
        streamer.end()
    sequences = torch.cat([input_ids, tokens[:, :n]], dim=1)
    if not policy.return_dict_in_generate:
        return sequences
    return BlockDiffusionGenerateOutput(
        sequences=sequences,
        num_forward_passes=batch_forwards[0],
        row_forward_passes=state.forwards,
        num_generated_tokens=num_generated,
        committed_at=committed_at[:, :n],
        past_key_values=state.cache,
        block_size=policy.block_size,
    )
