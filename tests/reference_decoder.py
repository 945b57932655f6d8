"""The oracle for the decode engine: one row, no cache, a full forward over everything at every step.

It shares only the token-level pieces with the library (``policies.propose`` and the commit rules, which have
their own tests); the schedule, the masks, the positions, EOS handling and the accounting are written out here
from docs/design.md 2.5, as plainly as possible.
"""

from __future__ import annotations

import torch
from helpers import DEVICE

from hf_blockdiff.draft_tree import DraftTree
from hf_blockdiff.policies import Sampling, propose


def _mask(prefix_len: int, block_len: int, causal_block: bool, windows: dict, model):
    """Causal over the prefix; the block sees the prefix and itself (causally when committing); windows."""
    n = prefix_len + block_len
    q = torch.arange(n).view(n, 1)
    k = torch.arange(n).view(1, n)
    in_block = (q >= prefix_len) & (k >= prefix_len)
    base = (k <= q) | (in_block & (not causal_block))
    masks = {t: (base & ((q - k) < w) if w else base).view(1, 1, n, n).to(DEVICE) for t, w in windows.items()}
    if model.config._attn_implementation == "eager":
        masks = {t: torch.where(m, 0.0, torch.finfo(model.dtype).min).to(model.dtype) for t, m in masks.items()}
    return masks[None] if None in masks else masks


def _windows(model) -> dict:
    cfg = model.config.get_text_config(decoder=True)
    if model._mask_per_layer_type:
        return {t: cfg.sliding_window if t == "sliding_attention" else None for t in set(cfg.layer_types)}
    return {None: getattr(cfg, "sliding_window", None)}


def reference_generate(model, prompt: list[int], *, max_new: int, block_size: int, width: int, rule,
                       sampling: Sampling | None = None, generator=None, eos=(), min_new: int = 0,
                       measure: str = "probability"):  # fmt: skip
    """Returns ``(tokens, committed_at, forwards)`` of one row, as the engine should produce them.

    ``width`` is the engine's step width (its largest block size), which fixes the shape of each sampling draw;
    ``rule`` a commit rule with one-row tensors; ``sampling`` one-row settings (None: greedy).
    """
    windows = _windows(model)
    mask_id = model.config.mask_token_id
    vocab = model.config.get_text_config(decoder=True).vocab_size
    sampling = sampling or Sampling(torch.tensor([False]), torch.tensor([1.0]), torch.tensor([0]), torch.tensor([1.0]))
    sampling = Sampling(*(t.to(DEVICE) for t in (sampling.do_sample, sampling.temperature, sampling.top_k,
                                                  sampling.top_p)))  # fmt: skip
    eos_ids = torch.tensor([t for t in eos if t < vocab], dtype=torch.long, device=DEVICE)
    forwards = 0

    def run(context: list[int], block: list[int], causal_block: bool, n_out: int, first_index: int):
        """Tokens and confidences at ``n_out`` positions (padded to ``width``) of one full forward."""
        nonlocal forwards
        forwards += 1
        seq = context + block
        ids = torch.tensor([seq], device=DEVICE)
        mask = _mask(len(context), len(block), causal_block, windows, model)
        logits = model(
            input_ids=ids, attention_mask=mask, position_ids=torch.arange(len(seq), device=DEVICE)[None]
        ).logits
        start = len(context) if block else len(seq) - 1  # block position j predicts the token after it
        picked = logits[:, start : start + n_out]
        padded = torch.zeros(1, n_out if not block else width, logits.shape[-1], device=DEVICE, dtype=logits.dtype)
        padded[:, : picked.shape[1]] = picked
        noise = None
        if bool(sampling.do_sample[0]):
            noise = torch.ones_like(padded, dtype=torch.float)
            noise[0].exponential_(generator=generator)
        produced = first_index + torch.arange(padded.shape[1], device=DEVICE)
        tokens, conf = propose(padded, sampling, measure, mask_id, eos_ids, (produced < min_new)[None], noise)
        return tokens[0].tolist(), conf[0]

    def is_stop(token: int, index: int) -> bool:
        return token in eos and index >= min_new

    context = list(prompt)
    generated: list[int] = []
    committed_at: list[int] = []
    first = run(context, [], True, 1, 0)[0][0]
    first_at = forwards
    while True:
        size = min(block_size, max_new - len(generated))
        block = [first] + [mask_id] * (size - 1)
        at = [first_at] + [-1] * (size - 1)
        steps = 0

        def ended() -> bool:
            """Cut the block after its first committed stop token; True if there is one."""
            for i, token in enumerate(block):
                if at[i] != -1 and is_stop(token, len(generated) + i):
                    del block[i + 1 :], at[i + 1 :]
                    return True
            return False

        stop = ended()
        while -1 in at:
            # position i of the block predicts position i + 1 (the token shift)
            proposal, conf = run(context, block, False, len(block), len(generated) + 1)
            open_ = torch.zeros(1, width - 1, dtype=torch.bool, device=DEVICE)
            for i in range(1, len(block)):
                open_[0, i - 1] = at[i] == -1
            prop = torch.tensor([proposal[: width - 1]], device=DEVICE)
            commit = rule.select(conf[None, : width - 1], prop, open_, torch.tensor([steps], device=DEVICE)) & open_
            for i in range(1, len(block)):
                if commit[0, i - 1]:
                    block[i], at[i] = proposal[i - 1], forwards
            steps += 1
            stop = ended()
        generated += block
        committed_at += at
        if stop or len(generated) >= max_new:
            return generated, committed_at, forwards
        # the commit: a causal forward over the finished block; its last logit is the next block's first token
        proposal, _ = run(context, block, True, len(block), len(generated) - len(block) + 1)
        first, first_at = proposal[len(block) - 1], forwards
        context += block


def reference_verify(model, prompt: list[int], *, max_new: int, block_size: int, candidates: int, eos=(),
                     min_new: int = 0, guesses: int = 1, width: int | None = None, tree=0, anchors=None,
                     pool=None):  # fmt: skip
    """One-forward verify (docs/design.md 2.6), greedy, one row, no cache: ``(tokens, committed_at, forwards,
    rejected)`` as the engine should produce them.

    A "forward" here is several full forwards from scratch: the tree of drafts walked node by node, each node's
    causal token from a forward over the context and the node's path, and every candidate on its own: the context,
    the kept path up to its anchor, then masks that see each other. The tree (``tree``, ``anchors``, ``pool``: as
    ``DraftTree`` takes them) names which rank paths exist and where candidates are anchored; a tree chosen per step
    holds the pool's paths that ``DraftTree.choose`` picks from the drafts' own probabilities. Where one of the
    anchor's guesses (the draft's next choices there) is the token after it (the causal one where the kept path
    ends at the anchor, else the path's), the candidate has that token in place of its first mask. ``rejected``: ``(index, drafted tokens dropped)`` for
    every cut draft but the last.
    """
    windows = _windows(model)
    mask_id = model.config.mask_token_id
    vocab = model.config.get_text_config(decoder=True).vocab_size
    greedy = Sampling(*(torch.tensor([v], device=DEVICE) for v in (False, 1.0, 0, 1.0)))
    width = min(width or block_size, block_size)  # a candidate: its anchor, then width - 1 masks
    eos_ids = torch.tensor([t for t in eos if t < vocab], dtype=torch.long, device=DEVICE)
    shape = DraftTree(block_size, tree, candidates, guesses, anchors, pool)
    tables = shape.tensors(DEVICE)
    anchor_paths = [shape.paths[a] for a in shape.anchors]
    guess_ranks = dict(zip(anchor_paths, shape.guess_rank))

    def predict(seq: list[int], block_from: int, causal_block: bool, first_index: int, choices=False):
        """Greedy tokens predicted by positions ``block_from ..`` of ``seq`` (each for the position after it);
        with ``choices`` also each position's next choices (2nd, 3rd, ...)."""
        ids = torch.tensor([seq], device=DEVICE)
        mask = _mask(block_from, len(seq) - block_from, causal_block, windows, model)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=torch.arange(len(seq), device=DEVICE)[None])
        picked = logits.logits[:, block_from:]
        produced = first_index + torch.arange(picked.shape[1], device=DEVICE)
        tokens, _, dist = propose(picked, greedy, "probability", mask_id, eos_ids, (produced < min_new)[None],
                                  with_dist=True)  # fmt: skip
        if choices:
            top = dist[0].topk(1 + shape.choices, dim=-1)
            return tokens[0].tolist(), top.indices[:, 1:].tolist(), top.values.log()
        return tokens[0].tolist()

    def tree_paths(drafts, logps) -> set:
        """The rank paths the tree holds this forward: the chain and the carried pool paths."""
        logp = torch.zeros(1, block_size + 1, 1 + shape.choices, device=DEVICE)
        logp[0, 1 : 1 + len(drafts)] = logps[: len(drafts)]
        carried = shape.choose(tables, logp, torch.tensor([1 + len(drafts)], device=DEVICE))[0].tolist()
        return set(shape.paths[:block_size]) | {shape.paths[s] for s in carried}

    def is_stop(token: int, index: int) -> bool:
        return token in eos and index >= min_new

    context, generated, committed_at, rejected = list(prompt), [], [], []
    first, first_at, drafts, alternatives = predict(context, len(context) - 1, True, 0)[0], 1, [], []
    logps = torch.zeros(0, 1 + shape.choices, device=DEVICE)
    forwards = 1
    while True:
        forwards += 1
        chain = [first] + drafts
        paths = tree_paths(drafts, logps)
        # the walk: from the first token down, the child (a rank path one longer) whose token is the causal one
        path, kept = (), [first]
        while True:
            causal = predict(context + kept, len(context) + len(kept) - 1, True, len(generated) + len(kept))[0]
            depth = len(path) + 1
            children = [path + (r,) for r in range(1 + shape.choices) if path + (r,) in paths]
            tokens = {(drafts[depth - 1] if c[-1] == 0 else alternatives[depth - 1][c[-1] - 1]): c
                      for c in children if depth <= len(drafts)}  # fmt: skip
            if causal not in tokens:
                break
            path = tokens[causal]
            kept.append(causal)
        keep = len(kept)
        for i in range(keep):  # cut after a kept stop token
            if is_stop(kept[i], len(generated) + i):
                keep = i + 1
                break
        kept, path = kept[:keep], path[: keep - 1]
        ended = any(is_stop(t, len(generated) + i) for i, t in enumerate(kept))
        generated += kept
        committed_at += [first_at] + [forwards] * (keep - 1)
        context += kept
        first = predict(context, len(context) - 1, True, len(generated))[0]
        left = max_new - len(generated)
        if ended or left <= 0:
            return generated, committed_at, forwards, rejected
        if left == 1 or is_stop(first, len(generated)):
            return generated + [first], committed_at + [forwards], forwards, rejected
        if keep < len(chain):
            rejected.append((len(generated), chain[keep:]))
        # the candidate anchored nearest above the end of the kept path (read further along when it is above it):
        # the kept path up to the anchor, then masks, seeing each other and what is before the anchor
        anchor = max((a for a in anchor_paths if path[: len(a)] == a), key=len)
        offset = len(path) - len(anchor)
        at = len(context) - keep + len(anchor)  # the anchor's index in the sequence
        seq = context[: at + 1] + [mask_id] * (width - 1)
        after = first if offset == 0 else kept[len(anchor) + 1]  # the token after the anchor
        if len(anchor) < len(drafts) and after in [alternatives[len(anchor)][r - 1] for r in guess_ranks[anchor]]:
            seq[at + 1] = after
        proposed, choices, logp = predict(seq, at, False, len(generated) - keep + len(anchor) + 1, choices=True)
        count = min(block_size - 1, width - 1 - offset, left - 1)
        drafts, alternatives = proposed[offset + 1 : offset + 1 + count], choices[offset + 1 : offset + 1 + count]
        logps = logp[offset + 1 : offset + 1 + count]
        first_at = forwards
