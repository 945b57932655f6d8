# Copyright 2026 The hf_blockdiff authors. Apache-2.0.
"""Log-probabilities of given tokens, for the server's ``echo`` and ``logprobs`` (lm-eval's log-likelihood tasks).

A sequence's likelihood is the plain causal forward's: block size 1 is exactly the source model (docs/design.md
2.2). As in the lm-eval model (:mod:`.harness`), the mask token is left out of the softmax: it never occurs in text,
and when conversion added it as a new row the scores then equal the source model's. Generated tokens are scored
the same way, so their logprobs are the causal model's, not the block decoder's confidences.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

import torch

# JSON has no -inf; vLLM reports impossible tokens (here: the mask token) as this.
FLOOR = -9999.0


@dataclass
class Scores:
    """Per position ``i`` of one sequence: ``logprob[i] = log p(ids[i] | ids[:i])`` and ``top[i]``, the likeliest
    ``(id, logprob)`` pairs, most likely first; both None at position 0, which has no context."""

    logprob: list[float | None]
    top: list[list[tuple[int, float]] | None]
    next_id: int | None = None  # with ``extend``: the token appended (and scored) after the sequence


def batches(lengths: list[int], max_tokens: int = 4096) -> list[list[int]]:
    """Indices of ``lengths`` grouped into forwards of at most ``max_tokens`` padded positions (a longer sequence
    goes alone), longest first so that rows of a batch have similar lengths."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= max_tokens:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


@torch.inference_mode()
def score(model, sequences: list[list[int]], top: int = 0, extend: bool = False) -> list[Scores]:
    """Score ``sequences`` in one forward of ``model`` (right-padded: causal attention never lets a row see the
    padding after it, so no attention mask is needed, as in lm-eval's ``hf`` model). With ``extend``, each sequence
    also gets its likeliest next token, scored too: greedy decoding's first token."""
    width = max(len(s) for s in sequences)
    ids = torch.zeros(len(sequences), width, dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq)
    ids = ids.to(model.device)  # one copy to the device
    logits = model(input_ids=ids).logits
    mask_id = getattr(model.config, "mask_token_id", None)
    results = []
    for row, seq in enumerate(sequences):
        n = len(seq)
        row_logits = logits[row, : n if extend else n - 1].float()
        if mask_id is not None and mask_id < row_logits.shape[-1]:
            row_logits[:, mask_id] = float("-inf")
        logprobs = torch.log_softmax(row_logits, dim=-1)
        targets = ids[row, 1:n]
        if extend:
            targets = torch.cat([targets, logprobs[-1].argmax().view(1)])
        chosen = logprobs.gather(-1, targets[:, None])[:, 0].clamp(min=FLOOR).tolist()
        best = [None] * len(chosen)
        if top:
            values, indices = logprobs.topk(min(top, logprobs.shape[-1]), dim=-1)
            best = [list(zip(i, v)) for i, v in zip(indices.tolist(), values.clamp(min=FLOOR).tolist())]
        results.append(Scores([None, *chosen], [None, *best], int(targets[-1]) if extend else None))
    return results


def openai_logprobs(tokenizer, ids: list[int], scores: Scores, start: int, top: int) -> dict:
    """The legacy completions ``logprobs`` object of ``ids[start:]``: ``tokens``, ``token_logprobs``,
    ``top_logprobs`` (the ``top`` likeliest tokens plus the chosen one, by text) and ``text_offset`` (where each
    token starts in the choice's text, which begins at ``ids[start]``)."""
    text = {}  # token id -> its text

    def of(token: int) -> str:
        if token not in text:
            text[token] = tokenizer.decode([token])
        return text[token]

    tokens = [of(t) for t in ids[start:]]
    offsets = [0, *accumulate(len(t) for t in tokens)][:-1]
    tops = []
    for i in range(start, len(ids)):
        entry = None
        if scores.logprob[i] is not None:
            entry = {}
            for token, value in scores.top[i][:top] if top else ():
                entry.setdefault(of(token), value)  # two ids may decode alike: the likelier one stays
            entry.setdefault(of(ids[i]), scores.logprob[i])
        tops.append(entry)
    return {"tokens": tokens, "token_logprobs": scores.logprob[start:], "top_logprobs": tops,
            "text_offset": offsets}  # fmt: skip


def kept_tokens(tokenizer, tokens: list[int], text: str) -> list[int]:
    """The tokens a choice's ``text`` is made of: all of them, or up to the one that completes ``text`` when a stop
    string cut the text short (the decoder may have run past it to the end of its block)."""
    if tokenizer.decode(tokens, skip_special_tokens=True) == text:
        return tokens
    low, high = 0, len(tokens)  # the shortest prefix whose text reaches len(text)
    while low < high:
        mid = (low + high) // 2
        if len(tokenizer.decode(tokens[:mid], skip_special_tokens=True)) >= len(text):
            high = mid
        else:
            low = mid + 1
    return tokens[:low]
