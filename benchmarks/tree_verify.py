"""What a tree of drafts buys in a real decode: two-forward verified decoding, slow and uncached, with the chain
of drafts replaced by a fixed tree (issues 18 and 19; the engine has only the chain).

Each block: a drafting forward over ``[last token, MASK x (b - 1)]`` (the adapter on at the block, as the engine
drafts), then one causal forward over the context and the tree's drafts, each draft seeing the context and its own
path. The walk keeps a child while its token is the causal argmax of its parent, then takes the causal token after
the last kept draft: the output is block-size-1 greedy whatever the tree (checked). A node of the tree is a path
of ranks ``(r_1, .., r_k)``: its token is draft k's ``r_k``-th choice. The tree is the most frequent rank paths of
``draft_ranks.py`` on prompts the decode does not see; the chain of first choices is what the engine verifies.

python benchmarks/tree_verify.py --adapter smollm2-bd16 --device cpu --num-prompts 6 --new-tokens 48 --sizes 15 64 256
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import save  # noqa: E402
from draft_ranks import best_tree, block_ranks  # noqa: E402


@torch.no_grad()
def draft_choices(model, seq: list[int], block: int, top: int) -> torch.Tensor:
    """``(block - 1, top)``: the drafter's first ``top`` choices for each position after ``seq[-1]``."""
    from hf_blockdiff.noisy_adapter import set_gate

    mask_id, p = model.config.mask_token_id, len(seq) - 1
    ids = seq + [mask_id] * (block - 1)
    n = len(ids)
    allowed = torch.ones(n, n, dtype=torch.bool).tril()
    allowed[p:, p:] = True  # the block [seq[p], MASK ...] both ways
    gate = torch.zeros(1, n, dtype=model.dtype, device=model.device)
    gate[:, p:] = 1
    set_gate(model, gate)
    try:
        hidden = model.model(input_ids=torch.tensor([ids], device=model.device), attention_mask=allowed[None, None]
                             .to(model.device), position_ids=torch.arange(n, device=model.device)[None]).last_hidden_state  # fmt: skip
    finally:
        set_gate(model, None)
    logits = model.lm_head(hidden[0, p : p + block - 1]).float()
    logits[:, mask_id] = float("-inf")
    return logits.topk(top, dim=-1).indices


@torch.no_grad()
def verify_tree(model, seq: list[int], tree: list[tuple], choices: torch.Tensor) -> list[int]:
    """The tokens a causal forward over ``seq`` and the tree's drafts commits: the kept path, then the causal token."""
    nodes = sorted(tree, key=len)  # parents first
    index = {node: i for i, node in enumerate(nodes)}
    tokens = [int(choices[len(node) - 1, node[-1]]) for node in nodes]
    n, m = len(seq), len(nodes)
    allowed = torch.zeros(n + m, n + m, dtype=torch.bool)
    allowed[:n, :n] = torch.ones(n, n, dtype=torch.bool).tril()
    allowed[n:, :n] = True
    for i, node in enumerate(nodes):
        for k in range(1, len(node) + 1):  # its path: itself and every ancestor
            allowed[n + i, n + index[node[:k]]] = True
    positions = list(range(n)) + [n - 1 + len(node) for node in nodes]
    logits = model(input_ids=torch.tensor([seq + tokens], device=model.device), attention_mask=allowed[None, None]
                   .to(model.device), position_ids=torch.tensor([positions], device=model.device)).logits[0]  # fmt: skip
    children: dict[tuple, dict[int, tuple]] = {}
    for node, token in zip(nodes, tokens):
        children.setdefault(node[:-1], {})[token] = node
    kept, node, row = [], (), n - 1
    while True:
        token = int(logits[row].argmax())
        child = children.get(node, {}).get(token)
        if child is None:
            return kept + [token]
        kept.append(token)
        node, row = child, n + index[child]


@torch.no_grad()
def causal_choices(model, seq: list[int], top: int) -> torch.Tensor:
    """The causal model's first ``top`` choices after ``seq``: an exact first draft (one causal query at the block's
    known first token, with the adapter off, which the drafting forward could carry)."""
    return model(input_ids=torch.tensor([seq], device=model.device)).logits[0, -1].float().topk(top).indices


def decode(model, prompt: list[int], tree: list[tuple], block: int, max_new: int, eos: set,
           exact_first: bool = False) -> tuple[list[int], int]:  # fmt: skip
    seq, forwards = list(prompt), 0
    top = 1 + max(r for node in tree for r in node)
    while len(seq) - len(prompt) < max_new:
        choices = draft_choices(model, seq, block, top)
        if exact_first:
            choices[0] = causal_choices(model, seq, top)
        committed = verify_tree(model, seq, tree, choices)
        forwards += 2
        for token in committed:
            seq.append(token)
            if token in eos or len(seq) - len(prompt) >= max_new:
                return seq[len(prompt) :], forwards
    return seq[len(prompt) :], forwards


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default="smollm2", help="GGUF path or a packaged name")
    parser.add_argument("--adapter", required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--num-prompts", type=int, default=6)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--sizes", type=int, nargs="+", default=[15, 64, 256], help="tree sizes (15: the chain)")
    parser.add_argument("--fit-prompts", type=int, default=16, help="prompts after the decoded ones to fit trees on")
    parser.add_argument("--fit-depth", type=int, default=8, help="deepest draft a tree holds")
    parser.add_argument("--exact-first", action="store_true",
                        help="the first draft from the causal model at the block's first token, not the drafter")  # fmt: skip
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    from bench_engine import PROMPTS

    from hf_blockdiff import apply_adapter, convert_model, load_source

    source, tok = load_source(args.source, dtype=args.dtype, device=args.device)
    model, tok = convert_model(source, tok, block_size=args.block_size)
    model = apply_adapter(model.to(args.device), args.adapter).eval()
    eos = {tok.eos_token_id}

    def encode(prompt):
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        return ids if isinstance(ids, list) else ids["input_ids"]

    def greedy(ids, max_new):  # the verifier's own block size 1: the source's for a noisy-scope adapter
        out = model.generate(torch.tensor([ids], device=args.device), max_new_tokens=max_new,
                             do_sample=False, block_size=1)[0, len(ids) :].tolist()  # fmt: skip
        return out[: out.index(tok.eos_token_id) + 1] if tok.eos_token_id in out else out

    decoded = [encode(p) for p in PROMPTS[: args.num_prompts]]
    fit = [encode(p) for p in PROMPTS[args.num_prompts : args.num_prompts + args.fit_prompts]]
    depth = args.block_size - 1
    ranks = []
    for ids in fit:
        ranks += block_ranks(model, ids + greedy(ids, 96), len(ids), args.block_size, min(depth, args.fit_depth))
    if not ranks:
        raise SystemExit("No block to fit a tree on: give more --fit-prompts.")
    if args.exact_first:  # the greedy continuation is the causal argmax: an exact first draft is always rank 0
        ranks = [[0] + row[1:] for row in ranks]
    references = [greedy(ids, args.new_tokens) for ids in decoded]
    rows = []
    for size in args.sizes:
        tree = sorted(best_tree(ranks, size)) if size != depth else [(0,) * k for k in range(1, depth + 1)]
        outputs, forwards = zip(*(decode(model, ids, tree, args.block_size, args.new_tokens, eos, args.exact_first)
                                  for ids in decoded))  # fmt: skip
        tokens = sum(map(len, outputs))
        rows.append({"drafts": "chain (first choices)" if size == depth else "tree", "tree nodes": len(tree),
                     "tree depth": max(map(len, tree)), "tokens per forward": round(tokens / sum(forwards), 3),
                     "accepted drafts per block": round(tokens / (sum(forwards) / 2) - 1, 3),
                     "= own b=1": f"{sum(a == b for a, b in zip(outputs, references))}/{len(outputs)}"})  # fmt: skip
        print(rows[-1], flush=True)
    name = args.out or f"tree_verify_{Path(str(args.adapter)).name}"
    notes = (("First drafts from the causal model (--exact-first). " if args.exact_first else "") +
             f"Two-forward verified decoding, uncached reference, {args.num_prompts} chat prompts alone, "
             f"{args.new_tokens} new tokens, b={args.block_size}, {args.dtype} on {args.device}, adapter "
             f"{args.adapter}; trees fitted on {len(ranks)} blocks (96 greedy tokens) of the next {args.fit_prompts} prompts, at most "
             f"{args.fit_depth} deep. "
             f"Command: python benchmarks/tree_verify.py {' '.join(argv or sys.argv[1:])}")  # fmt: skip
    save(name, "Two-forward verify: the chain against a tree of drafts", rows, notes)


if __name__ == "__main__":
    main()
