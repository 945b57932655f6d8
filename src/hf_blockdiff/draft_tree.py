# Copyright 2026 The hf_blockdiff authors. Apache-2.0.
"""The tree of drafts a one-forward-verifying row checks (docs/design.md 2.6).

Hub-portable: imports only torch.

A drafting forward gives every position of the next block a distribution, not only its first choice. A node of
the tree is a path of ranks ``(r_1, .., r_k)``: its token is position ``k``'s ``r_k``-th choice (0: the draft), and
it is verified causally after the context and its own path. The chain of first choices ``(0, .., 0)`` is always in
the tree, at the row's own slots; every other node sits in a scratch slot. After the forward the walk keeps, from
the block's first token down, the child whose token is the causal token of its parent, so whatever the tree the
kept tokens are block-size-1 greedy tokens. An off-chain node's keys and values are moved to the row's slots when
the walk keeps it.

**Chosen per step.** The off-chain nodes a row carries (``nodes`` scratch slots) come from a fixed **pool** of rank
paths. Where the pool is larger than the slots, every step carries the pool's likeliest paths under the drafter's
own probabilities (:meth:`DraftTree.choose`: a path's score is the sum of its tokens' log-probabilities), so a
confident draft gets a deep, narrow tree and an unsure one a wide, shallow one (EAGLE-2's dynamic tree). A path
scores strictly below its parent, so the chosen nodes always include their parents. Where pool and slots are equal,
the tree is fixed: the pool's paths, always carried.

The candidate next blocks of one-forward verify are anchored at pool nodes (:attr:`DraftTree.anchors`; by default
the chain's first ones). Candidate ``c``'s guessing copies put, at the position after its anchor, the draft's 2nd,
3rd, ... choices there. A copy serves a row whose kept path ends at the anchor and whose causal token there is the
copy's guess, and a row whose kept path went on through an off-chain child with the guess's token: a tree node one
below an anchor gets drafts that saw it. A candidate anchored off the chain exists only where its anchor is carried.

Pool slots: ``0 .. block_size - 1`` are the chain (slot ``d`` at depth ``d``; slot 0 is the block's first token, the
root), then the pool's off-chain paths, parents before children.
"""

from __future__ import annotations

import torch

# How often the drafter's rank-r choice is the causal token (r = 0, 1, ...), the prior that orders a fixed tree:
# measured on SmolLM2's drafters (benchmarks/draft_ranks.py, CPU fp32: the first choice is kept 85-95% after a
# known token and about 40% after a draft; what is not the first choice is mostly the 2nd-4th). A path's weight is
# the product of its ranks' weights, so the fixed tree holds the likeliest paths (Medusa's heuristic).
RANK_PRIOR = (0.6, 0.12, 0.06, 0.035, 0.025, 0.02, 0.015, 0.012)
# The prior that fills the pool a chosen tree is picked from: flatter and longer than RANK_PRIOR, so that the pool
# also holds what an unsure draft needs (a draft one position past an unknown token ranks the causal token 9th to
# 32nd in 15% of blocks; benchmarks/draft_ranks.py).
POOL_PRIOR = (0.45, 0.12, 0.07, 0.05, 0.04, 0.03, 0.025, 0.02, 0.017, 0.015, 0.013, 0.011, 0.01, 0.009, 0.008, 0.007)
# A chosen tree of N nodes picks from the POOL_PER_NODE * N likeliest paths under POOL_PRIOR.
POOL_PER_NODE = 4
# Log-probabilities below this count as this: far below anything a tree picks, and finite, so that every path
# still scores strictly below its parent (CHOICE_STEP per node).
LOGP_FLOOR, CHOICE_STEP = -50.0, 1e-3


def likeliest_paths(block_size: int, nodes: int, prior=RANK_PRIOR) -> list[tuple[int, ...]]:
    """The ``nodes`` likeliest off-chain rank paths of a block (chain paths excluded), parents first."""
    frontier, chosen = [(1.0, ())], []
    chain = {(0,) * k for k in range(block_size)}
    while frontier and len(chosen) < nodes:
        frontier.sort(key=lambda item: (-item[0], len(item[1]), item[1]))
        weight, path = frontier.pop(0)
        if path and path not in chain:
            chosen.append(path)
        if len(path) < block_size - 1:
            frontier += [(weight * p, path + (r,)) for r, p in enumerate(prior)]
    return chosen


class DraftTree:
    """A pool of draft paths, the nodes a row carries of it, and the anchors of its candidates (see the module
    docstring).

    Args:
        block_size: the engine's block: the chain has ``block_size - 1`` drafts.
        nodes: off-chain nodes a row carries (scratch slots): an int, or their rank paths (a fixed tree). Every
            prefix of a node is the chain or a node; a node is at most ``block_size - 1`` deep.
        candidates: anchors of candidate blocks, the chain's first ``candidates`` slots unless ``anchors`` is given.
        guesses: guessing copies of every candidate.
        anchors: rank paths of the anchors (``()``: the block's first token, which must be the first).
        pool: off-chain paths the carried nodes are chosen from each step (an int ``nodes`` only): None or
            ``nodes`` for a fixed tree (the likeliest paths under :data:`RANK_PRIOR`); more for a tree chosen per
            step from the likeliest under :data:`POOL_PRIOR`.
    """

    def __init__(self, block_size: int, nodes=0, candidates: int = 0, guesses: int = 0, anchors=None,
                 pool: int | None = None):  # fmt: skip
        self.block_size = b = block_size
        self.guesses = guesses
        fixed = isinstance(nodes, int)
        count = nodes if fixed else len(nodes)
        if pool is not None and (not fixed or pool < nodes):
            raise ValueError(f"A pool ({pool}) needs a number of nodes ({nodes if fixed else 'paths given'}) of at "
                             f"most the pool's size.")  # fmt: skip
        if pool is not None and pool > count:
            paths = likeliest_paths(b, pool, POOL_PRIOR)
        else:
            paths = likeliest_paths(b, nodes) if fixed else [tuple(p) for p in nodes]
        chain = [(0,) * d for d in range(b)]
        seen = set(chain)
        paths = sorted(dict.fromkeys(p for p in paths if p not in seen), key=lambda p: (len(p), p))
        for path in paths:
            if not 0 < len(path) < b or path[:-1] not in seen or min(path) < 0:
                raise ValueError(f"Tree node {path} needs its parent {path[:-1]} in the tree and a depth of 1 to "
                                 f"{b - 1} (block size {b}).")  # fmt: skip
            seen.add(path)
        self.paths = chain + paths
        index = {path: slot for slot, path in enumerate(self.paths)}
        self.pool = len(paths)  # off-chain paths of the pool
        self.nodes = min(count, self.pool)  # off-chain nodes a row carries (scratch slots)
        self.chosen = self.pool > self.nodes  # the carried nodes are chosen per step
        self.depth = [len(p) for p in self.paths]
        self.rank = [p[-1] if p else 0 for p in self.paths]
        self.parent = [index[p[:-1]] if p else 0 for p in self.paths]
        # path_of[s][d]: the slot at depth d on slot s's path (the root past its depth, so a walk can gather it)
        self.path_of = [[index[p[:d]] if d <= len(p) else 0 for d in range(b)] for p in self.paths]
        # Depth-first order, first choices first: the chain is slots 0 .. b - 1 in this order too, and a key is an
        # ancestor of a query exactly when pre[key] <= pre[query] <= last[key] (masks.py reads the interval). That
        # holds for any subset of the pool that keeps parents, so a chosen tree keeps the pool's numbers.
        children = {slot: [] for slot in range(len(self.paths))}
        for slot in range(1, len(self.paths)):
            children[self.parent[slot]].append(slot)
        self.pre, self.last, order = [0] * len(self.paths), [0] * len(self.paths), []

        def visit(slot):
            self.pre[slot] = len(order)
            order.append(slot)
            for child in sorted(children[slot], key=lambda s: self.rank[s]):
                visit(child)
            self.last[slot] = len(order) - 1

        visit(0)
        anchor_paths = [(0,) * c for c in range(candidates)] if anchors is None else [tuple(a) for a in anchors]
        if len(anchor_paths) != candidates:
            raise ValueError(
                f"{len(anchor_paths)} anchors were given for {candidates} candidates; give one per candidate."
            )
        if anchor_paths and anchor_paths[0] != ():
            raise ValueError(f"The first anchor must be the block's first token (), got {anchor_paths[0]}.")
        missing = [a for a in anchor_paths if a not in index]
        if missing or len(set(anchor_paths)) < len(anchor_paths):
            raise ValueError(f"Anchors must be distinct nodes of the tree; not in it: {missing}.")
        self.anchors = [index[a] for a in anchor_paths]
        # each anchor's guesses: the draft's 2nd, 3rd, ... choices after it
        self.guess_rank = [list(range(1, 1 + guesses)) for _ in self.anchors]
        # nearest[s][k]: of the first k anchors, the deepest on slot s's path (-1: none): a row whose kept path ends
        # at s drafts from it, read further along when it is above s.
        self.nearest = [[max((i for i, a in enumerate(self.anchors[:k]) if a in self.path_of[s][: self.depth[s] + 1]),
                             key=lambda i: self.depth[self.anchors[i]], default=-1)
                         for k in range(len(self.anchors) + 1)] for s in range(len(self.paths))]  # fmt: skip
        # alternatives a row keeps per position: the ranks its pool and its guesses read
        self.choices = max([*self.rank, *(r for ranks in self.guess_rank for r in ranks), 1])

    def tensors(self, device) -> dict[str, torch.Tensor]:
        """The static tables as long tensors on ``device``."""
        table = {
            n: getattr(self, n) for n in ("depth", "rank", "parent", "pre", "last", "anchors", "path_of", "nearest")
        }
        tensors = {n: torch.tensor(v, dtype=torch.long, device=device) for n, v in table.items()}
        tensors["guess_rank"] = torch.tensor(self.guess_rank, dtype=torch.long, device=device).reshape(
            len(self.anchors), self.guesses
        )
        tensors["on_chain"] = torch.arange(len(self.paths), device=device) < self.block_size
        # for choose(): each pool path's rank at every depth, and which depths it spans (1 .. its depth)
        depths = torch.arange(self.block_size, device=device)
        tensors["rank_at"] = tensors["rank"][tensors["path_of"]]
        tensors["spans"] = (depths >= 1) & (depths <= tensors["depth"].unsqueeze(1))
        return tensors

    def choose(self, tables: dict[str, torch.Tensor], logp: torch.Tensor, block_len: torch.Tensor) -> torch.Tensor:
        """The pool slots each row carries, ``(rows, nodes)``: the likeliest off-chain paths. ``logp``
        (``(rows, >= block_size, >= choices + 1)``): the log-probability of each position's rank-r choice;
        ``block_len``: positions in use (a path past them is not carried unless nothing else is left). A fixed tree
        carries its pool as it is."""
        b, rows = self.block_size, logp.shape[0]
        pool = torch.arange(b, b + self.pool, device=logp.device)
        if not self.chosen:
            return pool.expand(rows, -1)
        depths = torch.arange(b, device=logp.device)
        node_logp = logp[:, depths, tables["rank_at"][b:]].clamp(min=LOGP_FLOOR)  # (rows, pool, depth)
        inside = (tables["depth"][b:] < block_len.unsqueeze(1)).to(node_logp.dtype)
        score = (node_logp * tables["spans"][b:]).sum(-1) - CHOICE_STEP * tables["depth"][b:]
        score = score + (inside - 1) * 1e6  # (a path past the block: last)
        return pool[score.topk(self.nodes, dim=1).indices]
