"""benchmarks/draft_ranks.py: the ranks of one forward over every anchor's block equal a forward per anchor, and
the chain and tree counts follow their definitions."""

import sys
from pathlib import Path

import torch
from test_noisy_adapter import with_random_adapter

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from draft_ranks import best_tree, block_ranks, chain, tree_kept  # noqa: E402

from hf_blockdiff.noisy_adapter import set_gate  # noqa: E402


@torch.no_grad()
def ranks_one_anchor(model, seq, p, block, depth):
    """One forward: the clean tokens before the anchor, causal, then the block [seq[p], MASK...], both ways, the
    adapter on at the block only."""
    mask_id = model.config.mask_token_id
    ids = seq[:p] + [seq[p]] + [mask_id] * (block - 1)
    n = len(ids)
    allowed = torch.ones(n, n, dtype=torch.bool).tril()
    allowed[p:, p:] = True
    gate = torch.zeros(1, n)
    gate[:, p:] = 1
    set_gate(model, gate)
    hidden = model.model(input_ids=torch.tensor([ids]), attention_mask=allowed[None, None],
                         position_ids=torch.arange(n)[None]).last_hidden_state[0]  # fmt: skip
    set_gate(model, None)
    logits = model.lm_head(hidden[p : p + depth]).float()
    logits[:, mask_id] = float("-inf")
    truth = torch.tensor(seq[p + 1 : p + 1 + depth])
    return (logits > logits.gather(1, truth[:, None])).sum(1).tolist()


def test_block_ranks_equal_a_forward_per_anchor():
    _, model, plain, _ = with_random_adapter("llama")
    g = torch.Generator().manual_seed(3)
    seq = torch.randint(3, 60, (21,), generator=g).tolist()
    block, depth, start = 4, 3, 9
    ranks = block_ranks(model, seq, start, block, depth)
    assert len(ranks) == len(seq) - depth - start  # every anchor whose drafts lie inside the sequence
    assert ranks == [ranks_one_anchor(model, seq, p, block, depth) for p in range(start, len(seq) - depth)]
    assert ranks != [ranks_one_anchor(plain, seq, p, block, depth) for p in range(start, len(seq) - depth)]


def test_chain_and_trees_count_the_drafts_their_path_keeps():
    ranks = [[0, 0, 1], [0, 2, 0], [1, 0, 0], [0, 0, 0]]
    assert chain(ranks) == (2 + 1 + 0 + 3) / 4
    chain_tree = {(0,), (0, 0), (0, 0, 0)}
    assert tree_kept(chain_tree, ranks) == chain(ranks)
    tree = best_tree(ranks, 4)  # (0,) x3, (0, 0) x2, then one of the singletons, shorter first
    assert {(0,), (0, 0)} <= tree and len(tree) == 4 and all(node[:-1] in tree or len(node) == 1 for node in tree)
    assert tree_kept(tree, ranks) >= tree_kept({(0,), (0, 0)}, ranks)


def test_a_tree_of_drafts_verifies_to_block_size_1_greedy():
    """tree_verify.py's decode keeps block-size-1 greedy output whatever the tree: a chain, a bushy tree, a tree of
    second choices only (every draft wrong, one token a block)."""
    from tree_verify import decode

    _, model, _, _ = with_random_adapter("llama")
    prompt = torch.randint(3, 60, (7,), generator=torch.Generator().manual_seed(5)).tolist()
    with torch.no_grad():
        greedy = model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, block_size=1,
                                eos_token_id=[], pad_token_id=0)[0, len(prompt) :].tolist()  # fmt: skip
    trees = {"chain": [(0,), (0, 0), (0, 0, 0)], "bushy": [(0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0)],
             "second choices": [(1,), (1, 1)]}  # fmt: skip
    for exact_first in (False, True):  # first drafts from the drafter, or from the causal model
        forwards = {}
        for name, tree in trees.items():
            out, forwards[name] = decode(model, prompt, tree, block=4, max_new=10, eos=set(), exact_first=exact_first)
            assert out == greedy, (name, exact_first)
        assert forwards["second choices"] >= forwards["chain"] and forwards["second choices"] <= 2 * 10
        if exact_first:  # the chain's first draft is the causal token: every block keeps it
            assert forwards["chain"] <= 2 * -(-10 // 2)
