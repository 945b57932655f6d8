"""How many drafts verification would keep with a chain or a tree of drafts, from where the causal token ranks
in each draft's distribution (issues 18 and 19: is the drafter or the verification the limit?).

For each held-out chat prompt the model's own block-size-1 greedy continuation ``y`` is the verifier's answer (the
source's for a noisy-scope adapter). For every position ``p`` of ``y`` the drafter sees the block that verified
decoding drafts from, ``[y_p, MASK x (b - 1)]``, and ``rank_k`` is the rank of ``y_{p+k}`` in its draft ``k``
(0 = its first choice). All of a prompt's blocks ride in one forward beside the clean sequence, each seeing the clean
tokens before its anchor and itself both ways (the split layout of docs/design.md 2.3).

A chain keeps drafts while ``rank_k == 0``. A tree that offers several choices per depth keeps the block's path as
long as the tree holds it, so the best tree of ``N`` drafts is the ``N`` most frequent rank prefixes, and its
accepted drafts per block is the sum of their frequencies. The trees are chosen on one half of the prompts and
scored on the other (then the other way round), so that the table does not fit its own data.

python benchmarks/draft_ranks.py --adapter smollm2-bd16 --device cpu --dtype float32 --num-prompts 12
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import save  # noqa: E402


@torch.no_grad()
def block_ranks(model, seq: list[int], start: int, block: int, depth: int) -> list[list[int]]:
    """``ranks[i][k - 1]``: the rank of ``seq[p + k]`` in draft ``k`` of the block anchored at ``p = start + i``,
    for the anchors whose ``depth`` drafts all lie inside ``seq``."""
    from hf_blockdiff.noisy_adapter import set_gate

    mask_id, device = model.config.mask_token_id, model.device
    cfg = model.config.get_text_config(decoder=True)
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
        raise ValueError("block_ranks lays out full attention; a sliding-window model needs its windows in the mask.")
    n = len(seq)
    anchors = list(range(start, n - depth))
    if not anchors:
        return []
    ids = list(seq) + [t for p in anchors for t in [seq[p]] + [mask_id] * (block - 1)]
    positions = list(range(n)) + [q for p in anchors for q in range(p, p + block)]
    total = len(ids)
    allowed = torch.zeros(total, total, dtype=torch.bool)
    allowed[:n, :n] = torch.ones(n, n, dtype=torch.bool).tril()
    for i, p in enumerate(anchors):
        s = n + i * block
        allowed[s : s + block, :p] = True  # the clean tokens before its anchor
        allowed[s : s + block, s : s + block] = True  # itself, both ways
    gate = torch.zeros(1, total, device=device, dtype=model.dtype)
    gate[:, n:] = 1  # a noisy-scope adapter acts on the drafting blocks only; the clean sequence is the source
    set_gate(model, gate)
    try:
        hidden = model.model(input_ids=torch.tensor([ids], device=device),
                             attention_mask=allowed.to(device)[None, None],
                             position_ids=torch.tensor([positions], device=device)).last_hidden_state[0]  # fmt: skip
    finally:
        set_gate(model, None)
    ranks = []
    for i, p in enumerate(anchors):
        s = n + i * block  # block position j predicts the token after it (the token shift)
        logits = model.lm_head(hidden[s : s + depth]).float()
        logits[:, mask_id] = float("-inf")  # the mask token is never a draft
        truth = torch.tensor(seq[p + 1 : p + 1 + depth], device=device)
        ranks.append((logits > logits.gather(1, truth[:, None])).sum(1).tolist())
    return ranks


def chain(ranks: list[list[int]]) -> float:
    """Mean drafts a chain of first choices keeps per block."""
    return sum(next((k for k, r in enumerate(row) if r), len(row)) for row in ranks) / len(ranks)


def prefix_counts(ranks: list[list[int]]) -> Counter:
    return Counter(tuple(row[:k]) for row in ranks for k in range(1, len(row) + 1))


def best_tree(ranks: list[list[int]], size: int) -> set:
    """The ``size`` most frequent rank prefixes: a tree (a prefix is at least as frequent as its extensions, so
    the parents come first; ties go to the shorter one)."""
    counts = prefix_counts(ranks)
    return set(sorted(counts, key=lambda node: (-counts[node], len(node), node))[:size])


def tree_kept(tree: set, ranks: list[list[int]]) -> float:
    """Mean drafts a tree keeps per block: the depth of the block's path inside the tree."""
    kept = 0
    for row in ranks:
        k = 0
        while k < len(row) and tuple(row[: k + 1]) in tree:
            k += 1
        kept += k
    return kept / len(ranks)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default="smollm2", help="GGUF path or a packaged name")
    parser.add_argument("--adapter", required=True, help="an adapter folder or a shipped name")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--num-prompts", type=int, default=12)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--depth", type=int, default=8, help="drafts per block scored (deeper ones are rarely kept)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 16, 32, 64, 128, 256])
    parser.add_argument("--out", default=None, help="results name (default: draft_ranks_<adapter>)")
    args = parser.parse_args(argv)

    from bench_engine import PROMPTS

    from hf_blockdiff import apply_adapter, convert_model, load_source

    source, tok = load_source(args.source, dtype=args.dtype, device=args.device)
    model, tok = convert_model(source, tok, block_size=args.block_size)
    model = apply_adapter(model.to(args.device), args.adapter).eval()
    halves = ([], [])
    for i, prompt in enumerate(PROMPTS[: args.num_prompts]):
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        if not isinstance(ids, list):
            ids = ids["input_ids"]
        # the verifier's answer: the model's own block size 1 (for a noisy-scope adapter, the source's)
        out = model.generate(torch.tensor([ids], device=args.device), max_new_tokens=args.new_tokens,
                             do_sample=False, block_size=1)[0].tolist()  # fmt: skip
        halves[i % 2].extend(block_ranks(model, out, len(ids), args.block_size, args.depth))
    everything = halves[0] + halves[1]
    rows = [{"drafts": "chain (first choices)", "tree nodes": args.depth,
             "accepted drafts per block": round(chain(everything), 3)}]  # fmt: skip
    for size in args.sizes:
        held_out = [tree_kept(best_tree(fit, size), score) * len(score) for fit, score in (halves, halves[::-1])]
        rows.append({"drafts": "best tree, chosen on the other half", "tree nodes": size,
                     "accepted drafts per block": round(sum(held_out) / len(everything), 3)})  # fmt: skip
    top = Counter(r for row in everything for r in row[:1])
    name = args.out or f"draft_ranks_{Path(str(args.adapter)).name}"
    notes = (f"{len(everything)} blocks (every position of the greedy continuations of {args.num_prompts} chat "
             f"prompts, {args.new_tokens} new tokens), adapter {args.adapter}, {args.dtype} on {args.device}, block "
             f"size {args.block_size}, depth {args.depth}. Draft 1 is its first choice in {top[0] / len(everything):.1%} "
             f"of blocks. Command: python benchmarks/draft_ranks.py {' '.join(argv or sys.argv[1:])}")  # fmt: skip
    save(name, "Drafts kept per block: a chain against the best tree of N drafts", rows, notes)


if __name__ == "__main__":
    main()
