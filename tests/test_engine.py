"""The decode engine against the no-cache reference decoder, row independence, and the static cache's contents."""

import copy

import pytest
import torch
from helpers import DEVICE, EOS, PAD, converted_pair, padded_batch
from reference_decoder import reference_generate, reference_verify
from transformers import DynamicCache

from hf_blockdiff.draft_tree import DraftTree
from hf_blockdiff.engine import DecodeEngine
from hf_blockdiff.policies import FixedSteps, RepeatGuard, Sampling, Threshold

MAX_NEW = 20


@pytest.fixture(autouse=True)
def small_key_windows(monkeypatch):
    """Every engine here attends a key window that grows during its run (1, 2, 4, ... positions past the scratch
    slots), so the tests against the reference decoders cover windowed attention; the default (256 positions and
    up) covers all slots of these short runs, which the rest of the suite tests."""
    monkeypatch.setattr(DecodeEngine, "MIN_WINDOW", 1)


def pair(arch, block_size):
    """A converted tiny model in float64: the engine and the reference compute the same logits in different orders,
    and in float32 a near-tie between two masked positions' confidences can flip on that rounding."""
    _, model, tok = converted_pair(arch, block_size=block_size)
    return model.to(torch.float64)


RARE_STOPS = [EOS, 7, 13]  # common enough in a random model to end some rows inside a block


def rule_for(kind: str, value, rows: int):
    if kind == "threshold":
        return Threshold(torch.full((rows,), float(value), device=DEVICE))
    if kind == "steps":
        return FixedSteps(torch.full((rows,), value, device=DEVICE))
    return RepeatGuard(Threshold(torch.full((rows,), float(value), device=DEVICE)))


def sampling_for(rows: int, do_sample=False, temperature=1.0, top_k=0, top_p=1.0) -> Sampling:
    full = lambda v: torch.full((rows,), v, device=DEVICE)  # noqa: E731
    return Sampling(full(do_sample), full(float(temperature)), full(top_k), full(float(top_p)))


def run_engine(model, prompts, block_size, rule, sampling, generators=None, eos=(), min_new=0, max_new=MAX_NEW):
    rows = len(prompts)
    engine = DecodeEngine(model, rows, max(map(len, prompts)) + max_new, block_size, rule, sampling,
                          eos_token_ids=eos, pad_token_id=PAD)  # fmt: skip
    tokens = [[] for _ in range(rows)]
    at = [[] for _ in range(rows)]
    events = engine.add(prompts, list(range(rows)), max_new, min_new, generators=generators)
    while True:
        for row, new, when, _ in events:
            tokens[row] += new
            at[row] += when
        if not any(s.busy for s in engine.slots):
            return tokens, at, engine.forwards.tolist(), engine
        events = engine.step()


def prompts_of(lengths, seed):
    ids, am = padded_batch(lengths, seed=seed)
    return [ids[r][am[r].bool()].tolist() for r in range(len(lengths))]


CASES = [  # (block size, rule kind, rule value)
    (1, "threshold", 0.9),
    (4, "threshold", 0.0),
    (4, "threshold", 0.5),
    (4, "threshold", 1.0),
    (16, "threshold", 0.5),
    (16, "threshold", 1.0),
    (4, "steps", 2),
    (16, "steps", 3),
    (8, "guard", 0.0),
]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3_text", "mistral"])  # the last three: sliding windows
@pytest.mark.parametrize("block_size,kind,value", CASES)
def test_engine_equals_reference_decoder(arch, block_size, kind, value):
    """A left-padded batch whose rows stop at different blocks (stop tokens inside blocks) equals the reference
    decoder run on each row alone: tokens, the forward that committed each token, and forwards per row."""
    model = pair(arch, block_size)
    prompts = prompts_of([7, 3, 5], seed=11)
    tokens, at, forwards, _ = run_engine(model, prompts, block_size, rule_for(kind, value, 3), sampling_for(3),
                                         eos=RARE_STOPS, min_new=2)  # fmt: skip
    for r, prompt in enumerate(prompts):
        expected = reference_generate(model, prompt, max_new=MAX_NEW, block_size=block_size, width=block_size,
                                      rule=rule_for(kind, value, 1), eos=RARE_STOPS, min_new=2)  # fmt: skip
        assert (tokens[r], at[r], forwards[r]) == expected


def test_rows_end_at_different_blocks():
    """The batch of the test above really exercises early stops inside blocks, next to rows that run to the end."""
    model = pair("llama", 4)
    tokens, _, _, _ = run_engine(model, prompts_of([7, 3, 5], seed=11), 4, rule_for("threshold", 0.5, 3),
                                 sampling_for(3), eos=RARE_STOPS, min_new=2)  # fmt: skip
    lengths = [len(t) for t in tokens]
    assert min(lengths) < MAX_NEW and max(lengths) == MAX_NEW
    assert any(n % 4 for n in lengths if n < MAX_NEW)  # an end in the middle of a block


@pytest.mark.parametrize("block_size,top_k,top_p", [(4, 0, 1.0), (16, 5, 0.9), (1, 0, 0.8)])
def test_sampling_equals_reference_and_ignores_the_batch(block_size, top_k, top_p):
    """Sampling with one seeded generator per row: the engine's draws equal the reference's, and a row's tokens do
    not depend on the other rows of its batch."""
    model = pair("qwen2", block_size)
    prompts = prompts_of([6, 4, 8], seed=3)
    settings = dict(do_sample=True, temperature=1.3, top_k=top_k, top_p=top_p)

    def gens(seeds):
        return [torch.Generator(device=DEVICE).manual_seed(s) for s in seeds]

    rule = rule_for("threshold", 0.6, 3)
    batch, _, _, _ = run_engine(model, prompts, block_size, rule, sampling_for(3, **settings), gens([1, 2, 3]),
                                eos=[EOS])  # fmt: skip
    for r, prompt in enumerate(prompts):
        expected, _, _ = reference_generate(
            model, prompt, max_new=MAX_NEW, block_size=block_size, width=block_size,
            rule=rule_for("threshold", 0.6, 1), sampling=sampling_for(1, **settings), generator=gens([r + 1])[0],
            eos=[EOS],
        )  # fmt: skip
        assert batch[r] == expected
    alone, _, _, _ = run_engine(model, prompts[1:2], block_size, rule_for("threshold", 0.6, 1),
                                sampling_for(1, **settings), gens([2]), eos=[EOS])  # fmt: skip
    assert alone[0] == batch[1]
    other_seed, _, _, _ = run_engine(model, prompts[1:2], block_size, rule_for("threshold", 0.6, 1),
                                     sampling_for(1, **settings), gens([99]), eos=[EOS])  # fmt: skip
    assert other_seed[0] != batch[1]


def test_rows_with_smaller_block_sizes_share_a_step():
    """A request may use a block size below the engine's: it decodes exactly as alone at its own block size."""
    model = pair("llama", 8)
    prompts = prompts_of([5, 6], seed=2)
    engine = DecodeEngine(model, 2, 40, 8, rule_for("threshold", 0.5, 2), sampling_for(2), pad_token_id=PAD)
    tokens = [[], []]
    events = engine.add(prompts, [0, 1], MAX_NEW, block_sizes=[8, 2])
    while True:
        for row, new, _, _ in events:
            tokens[row] += new
        if not any(s.busy for s in engine.slots):
            break
        events = engine.step()
    for r, size in enumerate([8, 2]):
        expected, _, _ = reference_generate(model, prompts[r], max_new=MAX_NEW, block_size=size, width=8,
                                            rule=rule_for("threshold", 0.5, 1))  # fmt: skip
        assert tokens[r] == expected


def test_committed_cache_equals_a_causal_prefill():
    """After decoding, every slot's committed positions hold exactly a causal prefill of its tokens."""
    model = pair("gemma3_text", 4)
    prompts = prompts_of([7, 4], seed=2)
    tokens, _, _, engine = run_engine(model, prompts, 4, rule_for("threshold", 0.5, 2), sampling_for(2), max_new=11)
    for r, prompt in enumerate(prompts):
        committed = int(engine.length[r])
        sequence = (prompt + tokens[r])[:committed]
        assert committed == len(prompt) + 8  # all but the last (ragged) block
        fresh = DynamicCache()
        model(torch.tensor([sequence], device=DEVICE), past_key_values=fresh, use_cache=True)
        for layer, ref in enumerate(fresh.layers):
            keys, values = engine.cache.positions(layer)
            torch.testing.assert_close(keys[r, :, :committed], ref.keys[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(values[r, :, :committed], ref.values[0], rtol=1e-5, atol=1e-5)


def test_a_freed_slot_takes_a_new_request_mid_flight():
    """Continuous batching: a request added to a slot while another slot is mid-block decodes as it would alone."""
    model = pair("qwen2", 4)
    first, second = prompts_of([6, 5], seed=9)
    rule, sampling = rule_for("threshold", 0.5, 2), sampling_for(2)
    engine = DecodeEngine(model, 2, 40, 4, rule, sampling, pad_token_id=PAD)
    tokens = {0: [], 1: []}
    events = engine.add([first], [0], MAX_NEW)
    for _ in range(3):  # slot 0 is under way when slot 1 gets its request
        for row, new, _, _ in events:
            tokens[row] += new
        events = engine.step()
    events += engine.add([second], [1], MAX_NEW)
    while True:
        for row, new, _, _ in events:
            tokens[row] += new
        if not any(s.busy for s in engine.slots):
            break
        events = engine.step()
    for r, prompt in enumerate([first, second]):
        expected, _, _ = reference_generate(model, prompt, max_new=MAX_NEW, block_size=4, width=4,
                                            rule=rule_for("threshold", 0.5, 1))  # fmt: skip
        assert tokens[r] == expected


def test_batch_tokens_per_forward_is_the_row_mean():
    """Every forward serves every row still decoding: no row waits for a slower one inside a block."""
    model = pair("llama", 8)
    ids, am = padded_batch([6, 6, 6, 6], seed=4)
    out = model.generate(ids, attention_mask=am, max_new_tokens=24, threshold=0.2, eos_token_id=[], pad_token_id=PAD,
                         return_dict_in_generate=True)  # fmt: skip
    per_row = out.num_generated_tokens / out.row_forward_passes
    assert out.num_forward_passes == int(out.row_forward_passes.max())
    assert not torch.all(out.row_forward_passes == out.row_forward_passes[0])  # rows really went at their own pace
    for r in range(4):
        alone = model.generate(ids[r : r + 1], max_new_tokens=24, threshold=0.2, eos_token_id=[], pad_token_id=PAD,
                               return_dict_in_generate=True)  # fmt: skip
        assert alone.num_forward_passes == out.row_forward_passes[r]
    assert per_row.min() > 0


@pytest.mark.parametrize("block_size,compiled", [(1, False), (4, False), (4, True)])
def test_cuda_graph_equals_eager_or_falls_back(block_size, compiled, caplog):
    """On CUDA the captured step (compiled or not) gives the eager step's tokens; elsewhere asking for capture
    logs why it is not possible and decodes eagerly, with the same tokens."""
    model = pair("qwen2", block_size)
    ids, am = padded_batch([7, 3, 5], seed=11)
    kwargs = dict(attention_mask=am, max_new_tokens=MAX_NEW, threshold=0.5, eos_token_id=RARE_STOPS, pad_token_id=PAD,
                  return_dict_in_generate=True)  # fmt: skip
    eager = model.generate(ids, use_cuda_graph=False, **kwargs)
    with caplog.at_level("WARNING"):
        graphed = model.generate(ids, use_cuda_graph=True, compile_step=compiled, **kwargs)
    assert torch.equal(graphed.sequences, eager.sequences)
    assert torch.equal(graphed.row_forward_passes, eager.row_forward_passes)
    if DEVICE.type != "cuda":
        assert "CUDA graph capture failed" in caplog.text
    else:
        assert "failed" not in caplog.text


def test_generate_reuses_its_engine_and_takes_new_settings():
    """A second generate() of the same shape runs on the first one's engine (cache and graph) with the new
    settings copied in: its tokens equal a fresh engine's. A recast model gets a new engine."""
    model = pair("llama", 8)
    ids, am = padded_batch([6, 4], seed=5)
    kwargs = dict(attention_mask=am, max_new_tokens=MAX_NEW, eos_token_id=RARE_STOPS, pad_token_id=PAD,
                  return_dict_in_generate=True)  # fmt: skip

    def sample(seed, t):
        return dict(do_sample=True, top_k=5, temperature=t, generator=torch.Generator().manual_seed(seed))

    def fresh():
        return copy.deepcopy(model)  # copies leave the engine behind

    # settings are built anew for every call: a generator's state moves as it is used
    for first, second in [(lambda: dict(threshold=0.2), lambda: dict(threshold=0.9)),
                          (lambda: dict(threshold=0.9, **sample(3, 1.0)), lambda: dict(threshold=0.4, **sample(4, 0.7)))]:  # fmt: skip
        model.generate(ids, **first(), **kwargs)
        engine = model._blockdiff_engine.engine
        again = model.generate(ids, **second(), **kwargs)
        assert model._blockdiff_engine.engine is engine
        copied = fresh()
        assert copied._blockdiff_engine.engine is None
        expected = copied.generate(ids, **second(), **kwargs)
        assert torch.equal(again.sequences, expected.sequences)
        assert torch.equal(again.row_forward_passes, expected.row_forward_passes)
    model.float()
    model.generate(ids, threshold=0.9, **kwargs)
    assert model._blockdiff_engine.engine is not engine


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3_text", "mistral"])
@pytest.mark.parametrize("block_size,candidates,guesses",
                         [(2, 2, None), (4, 0, None), (4, 1, 3), (8, 3, None), (8, 3, 0), (16, 0, None), (16, 16, None),
                          (16, 4, 6)])  # fmt: skip
def test_verified_decoding_is_block_size_1_decoding(arch, block_size, candidates, guesses):
    """verify=True: each block is cut at the first drafted token the causal logits disagree with. A left-padded
    batch with stop tokens and min_new_tokens gives the block-size-1 output token for token. Two forwards per
    block (candidates 0: a draft, then its check) or one (the check also drafts the next block, with ``guesses``
    guessing copies of each candidate; None: the default)."""
    model = pair(arch, block_size)
    ids, am = padded_batch([7, 3, 5], seed=11)
    kwargs = dict(attention_mask=am, max_new_tokens=21, eos_token_id=RARE_STOPS, pad_token_id=PAD, min_new_tokens=2,
                  return_dict_in_generate=True)  # fmt: skip
    ar = model.generate(ids, block_size=1, **kwargs)
    verified = model.generate(ids, block_size=block_size, verify=True, candidates=candidates, guesses=guesses,
                              **kwargs)  # fmt: skip
    engine = model._blockdiff_engine.engine
    assert engine.guesses == (0 if candidates == 0 else 1 if guesses is None else guesses)  # (CPU: 1 unless given)
    assert engine.queries == block_size * (1 + (1 + engine.guesses) * engine.candidates)
    assert torch.equal(verified.sequences, ar.sequences)
    assert torch.equal(verified.num_generated_tokens, ar.num_generated_tokens)
    per_block = 2 if candidates == 0 else 1
    assert (verified.row_forward_passes >= 1 + per_block * (ar.num_generated_tokens - 1) / block_size).all()
    assert (verified.row_forward_passes <= ar.row_forward_passes + (candidates == 0) * ar.num_generated_tokens).all()
    assert (verified.committed_at[verified.committed_at >= 0] <= verified.row_forward_passes.max()).all()


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
@pytest.mark.parametrize("block_size,candidates,guesses,width",
                         [(2, 1, 1, None), (2, 2, 1, None), (4, 1, 3, None), (4, 2, 0, None), (4, 4, 1, None),
                          (4, 3, 1, 2), (8, 3, 1, None), (8, 3, 4, None), (8, 8, 0, None), (8, 5, 2, 3),
                          (16, 16, 1, None), (16, 4, 7, None), (16, 3, 3, 6)])  # fmt: skip
def test_one_forward_verify_equals_reference_decoder(arch, block_size, candidates, guesses, width):
    """One-forward verify against its brute-force reference (every candidate its own full forward): the same
    tokens, forwards, commit forwards and rejected drafts, for rows of different lengths in one batch, with stop
    tokens that end rows inside drafts and candidates and a budget that ends others inside a block; candidates
    of the block's width or shorter (then fewer drafts per block)."""
    engine, _ = verify_against_reference(pair(arch, block_size), block_size, candidates, guesses, width)
    assert engine.queries == block_size + (1 + guesses) * candidates * (width or block_size)


def verify_against_reference(model, block_size, candidates, guesses, width, tree=0, anchors=None):
    """Decode three rows of different lengths in one batch with one-forward verify (stop tokens, one budget inside
    a block) and check each row against :func:`reference_verify`: tokens, commit forwards, forwards and rejected
    drafts. Returns the engine and each row's tokens."""
    prompts = prompts_of([6, 2, 9], seed=7)
    engine = DecodeEngine(model, 3, 40, block_size, rule_for("threshold", 0.9, 3), sampling_for(3),
                          eos_token_ids=RARE_STOPS, pad_token_id=PAD, candidates=candidates, guesses=guesses,
                          candidate_width=width, tree=tree, anchors=anchors)  # fmt: skip
    budgets = [MAX_NEW, 13, MAX_NEW - 1]
    tokens, at = {r: [] for r in range(3)}, {r: [] for r in range(3)}
    events = engine.add(prompts, [0, 1, 2], budgets, 2, verify=True)
    while any(s.busy for s in engine.slots) or events:
        for row, new, when, _ in events:
            tokens[row] += new
            at[row] += when
        events = engine.step() if any(s.busy for s in engine.slots) else []
    pool = engine.tree.pool if engine.tree.chosen else None  # (the same pool: the likeliest that many paths)
    for r, prompt in enumerate(prompts):
        expected, when, forwards, rejected = reference_verify(model, prompt, max_new=budgets[r], block_size=block_size,
                                                              candidates=candidates, eos=RARE_STOPS, min_new=2,
                                                              guesses=guesses, width=width, tree=tree,
                                                              anchors=anchors, pool=pool)  # fmt: skip
        assert tokens[r] == expected
        assert at[r] == when
        assert engine.forwards[r] == forwards
        assert engine.slots[r].rejected == rejected
    return engine, [(prompts[r], budgets[r], tokens[r]) for r in range(3)]


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
@pytest.mark.parametrize("block_size,candidates,guesses,width,tree,anchors",
                         [(2, 1, 1, None, 2, None), (4, 2, 1, None, 3, None), (4, 1, 0, None, 5, None),
                          (8, 3, 2, None, 12, None), (8, 3, 1, 4, [(1,), (1, 0), (0, 1), (2,)], [(), (1,), (0,)]),
                          (8, 2, 0, None, 20, [(), (1,)]), (16, 4, 3, 8, 24, [(), (0,), (1,), (0, 1)]),
                          (16, 16, 1, None, 40, None)])  # fmt: skip
def test_a_tree_of_drafts_equals_its_reference_decoder(arch, block_size, candidates, guesses, width, tree, anchors):
    """One-forward verify of a tree of drafts (draft_tree.py) against its brute-force reference (every tree node
    and every candidate its own full forward): the same tokens (block-size-1 greedy), forwards, commit forwards and
    rejected drafts, for rows of different lengths in one batch with stop tokens and budgets inside blocks; trees of
    trees chosen per step (a number of nodes) or given ones, candidates anchored on the chain or off it."""
    model = pair(arch, block_size)
    engine, rows = verify_against_reference(model, block_size, candidates, guesses, width, tree, anchors)
    assert engine.nodes == (tree if isinstance(tree, int) else len(tree)) > 0
    assert engine.tree.chosen == isinstance(tree, int)
    for prompt, budget, tokens in rows:
        ids = torch.tensor([prompt], device=DEVICE)
        ar = model.generate(ids, block_size=1, max_new_tokens=budget, min_new_tokens=2, eos_token_id=RARE_STOPS,
                            pad_token_id=PAD)  # fmt: skip
        assert tokens == ar[0, len(prompt) :].tolist()[: len(tokens)]


@pytest.mark.parametrize("block_size,candidates,guesses,tree,anchors", [(4, 2, 1, 3, None), (8, 2, 0, 20, [(), (1,)])])
def test_a_fixed_tree_of_drafts_equals_its_reference_decoder(monkeypatch, block_size, candidates, guesses, tree,
                                                             anchors):  # fmt: skip
    """The A/B switch ``DecodeEngine.choose_tree = False``: a number of nodes is the fixed tree of the likeliest paths
    under the prior, against the reference with that fixed tree."""
    monkeypatch.setattr(DecodeEngine, "choose_tree", False)
    engine, _ = verify_against_reference(pair("llama", block_size), block_size, candidates, guesses, None, tree,
                                         anchors)  # fmt: skip
    assert not engine.tree.chosen and engine.tree.pool == engine.nodes == tree


def test_a_chosen_tree_holds_the_likeliest_pool_paths():
    """``DraftTree.choose`` against brute force: each row carries the pool paths of the highest summed
    log-probability (ranks read at each depth), which always include their parents, and none past the block while
    paths inside it are left."""
    block_size, nodes = 6, 7
    tree = DraftTree(block_size, nodes, pool=40)
    tables = tree.tensors(DEVICE)
    assert tree.chosen and tree.pool == 40 and tree.nodes == nodes
    generator = torch.Generator().manual_seed(3)
    rows = 4
    logp = torch.rand(rows, block_size + 1, tree.choices + 1, generator=generator).log().sort(-1, descending=True)
    logp = logp.values.to(DEVICE)
    block_len = torch.tensor([6, 6, 3, 2], device=DEVICE)
    carried = tree.choose(tables, logp, block_len).tolist()
    for row in range(rows):
        pool = tree.paths[block_size:]
        inside = [p for p in pool if len(p) < block_len[row]]
        score = {p: sum(float(logp[row, d + 1, r]) for d, r in enumerate(p)) for p in inside}
        expected = sorted(inside, key=lambda p: -score[p])[:nodes]
        chosen = [tree.paths[s] for s in carried[row]]
        assert len(set(chosen)) == nodes
        assert set(expected) <= set(chosen) and (len(inside) < nodes or set(chosen) == set(expected))
        assert all(not any(p[:-1]) or p[:-1] in chosen for p in chosen if p in inside)  # parents: chain or chosen
    fixed = DraftTree(block_size, nodes)
    assert not fixed.chosen
    assert fixed.choose(fixed.tensors(DEVICE), logp, block_len).tolist() == [list(range(6, 6 + nodes))] * rows


def test_generate_with_a_tree_of_drafts_gives_block_size_1_tokens():
    """``draft_tree`` through generate(): a left-padded batch with stop tokens gives block-size-1 output token for
    token, each forward keeping at least one; a bad value is refused with what to change."""
    model = pair("llama", 8)
    ids, am = padded_batch([7, 3, 5], seed=11)
    kwargs = dict(attention_mask=am, max_new_tokens=21, eos_token_id=RARE_STOPS, pad_token_id=PAD, min_new_tokens=2,
                  return_dict_in_generate=True)  # fmt: skip
    ar = model.generate(ids, block_size=1, **kwargs)
    tree = model.generate(ids, block_size=8, verify=True, candidates=2, guesses=2, draft_tree=16, **kwargs)
    assert model._blockdiff_engine.engine.nodes == 16
    assert torch.equal(tree.sequences, ar.sequences)
    assert (tree.row_forward_passes <= ar.row_forward_passes).all()
    with pytest.raises(ValueError, match="draft_tree must be >= 0"):
        model.generate(ids, block_size=8, verify=True, draft_tree=-1, **kwargs)


def test_the_one_buffer_cache_moves_what_per_layer_buffers_move():
    """SlotCache: with the number of layers, every layer's keys and values are views of one buffer, and a move
    (one gather, one scatter) changes them as per-layer buffers do; indices that name themselves stay put."""
    from hf_blockdiff.engine import SlotCache

    caches = [SlotCache(2, 12, front=3), SlotCache(2, 12, front=3, layers=3)]
    torch.manual_seed(0)
    writes = [torch.randn(2, 2, 4, 5, device=DEVICE) for _ in range(6)]
    for cache in caches:
        cache.write_index = torch.tensor([[0, 4, 5, 6], [1, 2, 7, 8]], device=DEVICE)
        for layer in range(3):
            cache.update(writes[2 * layer], writes[2 * layer + 1], layer)
        cache.move(
            torch.tensor([[0, 4, 9], [2, 2, 1]], device=DEVICE), torch.tensor([[5, 4, 10], [6, 2, 11]], device=DEVICE)
        )
    assert caches[0].buffer is None and caches[1].buffer is not None
    assert caches[1].keys[2].data_ptr() == caches[1].buffer[4].data_ptr()
    for a, b in zip((*caches[0].keys, *caches[0].values), (*caches[1].keys, *caches[1].values)):
        assert torch.equal(a, b)
    assert (
        torch.equal(caches[1].keys[1][0, :, 5], writes[2][0, :, 0]) and caches[1].values[0][1, :, 11].abs().sum() > 0
    )


def decode_rows(engine, prompts, **settings):
    """Run ``prompts`` on ``engine`` from slot 0 on; returns each row's tokens and forwards."""
    tokens = {r: [] for r in range(len(prompts))}
    events = engine.add(prompts, list(range(len(prompts))), MAX_NEW, **settings)
    for _ in range(4 * MAX_NEW):  # every step makes progress: a row that never ends is a bug, not a slow test
        for row, new, _, _ in events:
            tokens[row] += new
        if not any(s.busy for s in engine.slots):
            return [tokens[r] for r in range(len(prompts))], engine.forwards.tolist()[: len(prompts)]
        events = engine.step()
    raise AssertionError(f"rows still decoding after {4 * MAX_NEW} steps: {tokens}")


def test_all_decoding_methods_share_a_batch():
    """One step serves a one-forward-verify row, a two-forward-verify row and a threshold row, each through its own
    decoding method: every row decodes as it does alone (tokens and forwards), the verifying ones as block size 1,
    the threshold one as the reference decoder."""
    model = pair("qwen2", 8)
    prompts = prompts_of([6, 4, 5], seed=3)
    settings = [dict(verify=True, candidates=3), dict(verify=True, candidates=0), dict(verify=False)]
    build = lambda rows: DecodeEngine(model, rows, 40, 8, rule_for("threshold", 0.5, rows), sampling_for(rows),  # noqa: E731
                                      eos_token_ids=RARE_STOPS, pad_token_id=PAD, candidates=3)  # fmt: skip
    together, forwards = decode_rows(build(3), prompts, **{k: [s.get(k) for s in settings] for k in settings[0]})
    for r, (prompt, setting) in enumerate(zip(prompts, settings)):
        alone, alone_forwards = decode_rows(build(1), [prompt], **setting)
        assert together[r] == alone[0] and forwards[r] == alone_forwards[0], setting
    for r in (0, 1):
        ids = torch.tensor([prompts[r]], device=DEVICE)
        ar = model.generate(ids, block_size=1, max_new_tokens=MAX_NEW, eos_token_id=RARE_STOPS, pad_token_id=PAD)
        assert together[r] == ar[0, len(prompts[r]) :].tolist()[: len(together[r])]
        assert len(together[r]) == MAX_NEW or together[r][-1] in RARE_STOPS
    expected, _, _ = reference_generate(model, prompts[2], max_new=MAX_NEW, block_size=8, width=8,
                                        rule=rule_for("threshold", 0.5, 1), eos=RARE_STOPS)  # fmt: skip
    assert together[2] == expected


def test_verify_refuses_block_size_1_and_bad_candidates():
    model = pair("llama", 4)
    ids, _ = padded_batch([5], seed=1)
    with pytest.raises(ValueError, match="verify=True"):
        model.generate(ids, verify=True, max_new_tokens=4, block_size=1)
    for bad in (-1, 5, 1.5, True):
        with pytest.raises(ValueError, match="candidates must be an integer between 0 and block_size"):
            model.generate(ids, verify=True, max_new_tokens=4, block_size=4, candidates=bad)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="guesses must be"):
            model.generate(ids, verify=True, max_new_tokens=4, block_size=4, candidates=2, guesses=bad)
    for bad in (1, 0, 2.5):
        with pytest.raises(ValueError, match="candidate_width must be"):
            model.generate(ids, verify=True, max_new_tokens=4, block_size=4, candidates=2, candidate_width=bad)


def test_speculative_accept_outputs_the_target_distribution():
    """Monte Carlo on a small vocabulary: draw from the draft q, accept with min(1, p/q), else draw from the
    residual: the output follows p (and the draft alone visibly does not)."""
    from hf_blockdiff.policies import speculative_accept

    g = torch.Generator().manual_seed(0)
    vocab, n = 6, 200_000
    p = torch.softmax(torch.randn(vocab, generator=g) * 2, -1)
    q = torch.softmax(torch.randn(vocab, generator=g) * 2, -1)
    drafted = torch.multinomial(q, n, replacement=True, generator=g).view(n, 1)
    uniform = torch.rand(n, 1, generator=g)
    noise = torch.empty(n, 1, vocab).exponential_(generator=g)
    accepted, residual = speculative_accept(p.expand(n, 1, vocab), q.expand(n, 1, vocab), drafted, uniform, noise)
    out = torch.where(accepted, drafted, residual).view(-1)
    freq = torch.bincount(out, minlength=vocab) / n
    assert accepted.float().mean().item() == pytest.approx(torch.minimum(p, q).sum().item(), abs=0.005)
    assert 0.5 * (freq - p).abs().sum() < 0.005
    assert 0.5 * (q - p).abs().sum() > 0.1  # the test can tell the draft from the target


@pytest.mark.parametrize("candidates,tree", [(0, 0), (1, 0), (4, 0), (3, 6)])
def test_sampled_verify_matches_ar_sampling_in_distribution(candidates, tree):
    """Sampled verify: drafts accepted by the speculative-sampling rule. Its tokens follow block-size-1 sampling
    (as close as two block-size-1 runs with different seeds), while the drafts alone are far off. Two forwards
    per block (candidates 0) and one (the next block drafted by a candidate, also with a guessed first token); an
    engine with a tree of drafts, which sampling rows leave to greedy ones (they check their chain)."""
    _, model, _ = converted_pair("llama", block_size=4)
    n = 1500
    prompt = torch.tensor([[3, 14, 15, 9, 2]], device=DEVICE).repeat(n, 1)

    def sample(seed, **settings):
        out = model.generate(prompt, max_new_tokens=4, do_sample=True, temperature=0.3, eos_token_id=[],
                             pad_token_id=PAD, generator=torch.Generator(DEVICE).manual_seed(seed),
                             return_dict_in_generate=True, **settings)  # fmt: skip
        return out.sequences[:, prompt.shape[1] :].cpu(), out

    def tv(a, b):  # total variation between the empirical distributions of tokens 2 and 3 (a pair)
        counts = [torch.bincount(x[:, 1] * 100 + x[:, 2], minlength=10_000) / n for x in (a, b)]
        return 0.5 * (counts[0] - counts[1]).abs().sum().item()

    ar, ar_again = sample(1, block_size=1)[0], sample(2, block_size=1)[0]
    verified, out = sample(3, block_size=4, verify=True, candidates=candidates, draft_tree=tree)
    assert model._blockdiff_engine.engine.nodes == tree
    drafts = sample(4, block_size=4, threshold=0.0)[0]  # every position from one denoising step
    noise_level = tv(ar, ar_again)
    assert tv(ar, verified) < 1.5 * noise_level + 0.02
    assert tv(ar, drafts) > 4 * noise_level
    assert (out.num_generated_tokens == 4).all()


@pytest.mark.parametrize("candidates,tree", [(0, 0), (2, 5)])
def test_greedy_verify_rows_stay_exact_next_to_sampled_verify_rows(candidates, tree):
    """A greedy verifying row beside a sampling one gives block-size-1 tokens, with two forwards per block or one
    with a tree of drafts (which only the greedy row walks)."""
    model = pair("qwen2", 4)
    prompts = prompts_of([6, 4], seed=5)
    sampling = sampling_for(2)
    sampling.do_sample[1] = True
    engine = DecodeEngine(model, 2, 40, 4, rule_for("threshold", 0.9, 2), sampling, eos_token_ids=RARE_STOPS,
                          pad_token_id=PAD, candidates=candidates, tree=tree)  # fmt: skip
    tokens = {0: [], 1: []}
    events = engine.add(
        prompts, [0, 1], MAX_NEW, verify=True, generators=[None, torch.Generator(DEVICE).manual_seed(0)]
    )
    while True:
        for row, new, _, _ in events:
            tokens[row] += new
        if not any(s.busy for s in engine.slots):
            break
        events = engine.step()
    ids = torch.tensor([prompts[0]], device=DEVICE)
    alone = model.generate(ids, block_size=1, max_new_tokens=MAX_NEW, eos_token_id=RARE_STOPS, pad_token_id=PAD)
    assert tokens[0] == alone[0, len(prompts[0]) :].tolist()[: len(tokens[0])]
    assert len(tokens[1]) == MAX_NEW or tokens[1][-1] in RARE_STOPS


def test_verify_reports_its_rejected_drafts_and_the_picture_shows_them():
    from hf_blockdiff.visualize import decoding_trace, to_svg

    _, model, tok = converted_pair("llama", block_size=4)
    ids, am = padded_batch([7, 3], seed=11)
    out = model.generate(ids, attention_mask=am, block_size=4, verify=True, max_new_tokens=16, eos_token_id=[],
                         pad_token_id=PAD, return_dict_in_generate=True)  # fmt: skip
    new = out.sequences[:, ids.shape[1] :]
    for row in range(2):
        starts = out.block_starts[row]
        assert starts[0] == 0 and starts == sorted(set(starts)) and starts[-1] < 16
        assert all(b - a <= 4 for a, b in zip(starts, starts[1:] + [16]))
        assert out.rejected_drafts[row], "a random model's drafts are cut somewhere"
        for index, tokens in out.rejected_drafts[row]:
            before = max(s for s in starts if s < index)
            assert index in starts  # a cut ends its block: the causal model's token starts the next one
            assert tokens[0] != new[row, index]  # greedy: the causal model chose another token there
            assert (index - before) + len(tokens) <= 4  # kept + rejected = the drafted block
    trace = decoding_trace(tok, out, 0)
    assert [t.rejected for t in trace].count(True) == sum(len(t) for _, t in out.rejected_drafts[0])
    assert [t.forward for t in trace if not t.rejected] == out.committed_at[0].tolist()
    assert to_svg(trace).count("rejected draft") == 1 + sum(len(t) for _, t in out.rejected_drafts[0])


def test_where_drafting_does_not_pay_verify_decodes_at_block_size_1(monkeypatch):
    """verify_plan: where drafting is slower than block size 1 (on CUDA from the last VERIFY_PLANS entry's rows
    on), a verifying batch decodes at block size 1: the same tokens, one per forward; where a smaller block pays,
    with that block. Explicit candidates keep the drafts as asked."""
    import hf_blockdiff.denoise as denoise

    _, model, _ = converted_pair("llama", block_size=4)
    ids, mask = padded_batch([7, 3, 5], seed=11)
    kwargs = dict(attention_mask=mask, max_new_tokens=12, eos_token_id=EOS, pad_token_id=PAD, do_sample=False,
                  return_dict_in_generate=True)  # fmt: skip
    ar = model.generate(ids, block_size=1, **kwargs)
    drafted = model.generate(ids, block_size=4, verify=True, **kwargs)
    monkeypatch.setattr(denoise, "verify_plans", lambda device: ())
    causal = model.generate(ids, block_size=4, verify=True, **kwargs)
    forced = model.generate(ids, block_size=4, verify=True, candidates=0, **kwargs)
    monkeypatch.setattr(denoise, "verify_plans", lambda device: ((2, None, None), (4, 2, 1)))  # 3 rows: b=2, c=1
    smaller = model.generate(ids, block_size=4, verify=True, **kwargs)
    alone = model.generate(ids[:1], block_size=4, verify=True, **{**kwargs, "attention_mask": mask[:1]})
    for out in (drafted, causal, forced, smaller):
        assert torch.equal(out.sequences, ar.sequences)
    assert smaller.block_size == 2 and alone.block_size == 4  # (one row: fewer than 2, the plan as asked)
    assert causal.block_size == 1 and torch.equal(causal.row_forward_passes, ar.row_forward_passes)
    assert forced.block_size == 4 and torch.equal(forced.row_forward_passes, drafted.row_forward_passes)
    assert not torch.equal(drafted.row_forward_passes, ar.row_forward_passes)  # (the two plans differ)


def test_the_query_budget_buys_candidates_or_their_guessing_copies():
    """verify_candidates / verify_guesses on CUDA (decided without a GPU): where the plan fills QUERY_BUDGET, the
    candidates are the most that fit with GUESS_RATIO copies each, and the copies fill the rest (b=16 at batch 1:
    3 x 9, the best split measured); given guesses, the candidates fill the budget beside them; a plan with a fixed
    candidate count keeps one copy; a CPU drafts in a forward of its own."""
    from dataclasses import replace

    from hf_blockdiff.denoise import (
        DEFAULT_TREE,
        GUESS_RATIO,
        QUERY_BUDGET,
        resolve_policy,
        verify_candidates,
        verify_guesses,
        verify_plan,
        verify_tree,
    )

    model = pair("llama", 16)
    policy = resolve_policy(model, 4, None, {"max_new_tokens": 8, "block_size": 16, "verify": True})

    def split(asked, rows):
        candidates = verify_candidates(asked, rows, "cuda")
        return candidates, verify_guesses(asked, rows, "cuda", candidates)

    assert split(policy, 1) == (3, 9)
    # one row: a tree of drafts beside the candidates, whose copies fill what it leaves (3 x 8 and 64 nodes)
    assert verify_tree(policy, 1, "cuda", 3) == DEFAULT_TREE
    with_tree = replace(policy, draft_tree=DEFAULT_TREE)
    assert verify_candidates(with_tree, 1, "cuda") <= 3 and verify_guesses(with_tree, 1, "cuda", 3) == 8
    assert 16 + DEFAULT_TREE + (1 + 8) * 3 * 16 <= QUERY_BUDGET
    assert verify_tree(policy, 2, "cuda", 3) == verify_tree(policy, 1, "cpu", 3) == 0  # (not measured: the chain)
    assert verify_tree(replace(policy, guesses=9), 1, "cuda", 3) == 0 and verify_tree(with_tree, 4, "cuda", 1) == 64
    for rows in (1, 2, 3, 4):
        units = QUERY_BUDGET // rows // 16 - 1
        candidates, guesses = split(policy, rows)
        assert candidates * (1 + guesses) <= units < candidates * (2 + guesses)  # the copies fill the budget
        assert (
            candidates * (1 + GUESS_RATIO * candidates)
            <= units
            < (candidates + 1) * (1 + GUESS_RATIO * (candidates + 1))
        )
    for guesses in (0, 1, 9):
        candidates = split(replace(policy, guesses=guesses), 1)[0]
        assert 16 * (1 + (1 + guesses) * candidates) <= QUERY_BUDGET  # within the budget ...
        assert candidates == 16 or 16 * (1 + (1 + guesses) * (candidates + 1)) > QUERY_BUDGET  # ... as many as fit
    planned = verify_plan(policy, 16, "cuda")  # 16 rows: b=4 with one candidate and one copy, as measured
    assert (planned.block_size, planned.candidates, verify_guesses(planned, 16, "cuda", 1)) == (4, 1, 1)
    assert verify_guesses(verify_plan(replace(policy, guesses=5), 16, "cuda"), 16, "cuda", 1) == 5  # given: kept
    assert split(policy, 64)[0] == 1 and verify_candidates(policy, 1, "cpu") == 0
    # shorter candidates: the same budget buys more of them (b=16, width 8 at batch 1: 62 units -> 4 x 14)
    narrow = replace(policy, candidate_width=8)
    assert split(narrow, 1) == (4, 14) and 16 + 8 * 4 * (1 + 14) <= QUERY_BUDGET


def test_where_verify_is_the_default_generate_gives_block_size_1_tokens(monkeypatch):
    """denoise.verify_by_default (CUDA): generate() with no decoding settings verifies, so it gives block size 1's
    tokens; asking for threshold decoding (or verify=False) gets it."""
    import hf_blockdiff.denoise as denoise

    _, model, _ = converted_pair("llama", block_size=4)
    ids, mask = padded_batch([7, 3, 5], seed=11)
    kwargs = dict(attention_mask=mask, max_new_tokens=12, eos_token_id=EOS, pad_token_id=PAD, do_sample=False,
                  return_dict_in_generate=True)  # fmt: skip
    ar = model.generate(ids, block_size=1, **kwargs).sequences
    by_threshold = model.generate(ids, threshold=0.1, **kwargs)
    assert not torch.equal(by_threshold.sequences, ar)  # (a test that can tell the two apart)
    monkeypatch.setattr(denoise, "verify_by_default", lambda model: True)
    verified = model.generate(ids, **kwargs)
    assert torch.equal(verified.sequences, ar) and verified.rejected_drafts != [[]] * 3
    assert torch.equal(model.generate(ids, threshold=0.1, **kwargs).sequences, by_threshold.sequences)
    assert torch.equal(model.generate(ids, verify=False, threshold=0.1, **kwargs).sequences, by_threshold.sequences)


@pytest.mark.parametrize("candidates,guesses", [(0, 0), (3, 2)])
def test_the_key_window_grows_with_the_rows_and_changes_no_token(candidates, guesses):
    """A step attends the scratch slots and a power-of-two window of positions that holds every busy row's tokens
    and block; it grows as the rows do, and the tokens equal those of attention over every slot."""
    model = pair("mistral", 4)  # (a sliding window too: it is measured on positions, never on the key index)
    prompts = prompts_of([9, 2, 5], seed=5)
    runs = {}
    for key_window in (True, False):
        engine = DecodeEngine(model, 3, 48, 4, rule_for("threshold", 0.9, 3), sampling_for(3), eos_token_ids=[EOS],
                              pad_token_id=PAD, candidates=candidates, guesses=guesses)  # fmt: skip
        engine.key_window = key_window
        seen, step = [], engine.step

        def spy(step=step, engine=engine, seen=seen):
            events = step()
            seen.append(engine.cache.window)
            return events

        engine.step = spy
        runs[key_window] = decode_rows(engine, prompts, verify=True), seen, engine
    (windowed, seen, engine), (full, unwindowed, _) = runs[True], runs[False]
    assert windowed == full
    assert set(unwindowed) == {None}
    positions = [w - engine.scratch for w in seen]
    assert positions == sorted(positions) and len(set(positions)) >= 2  # it grew during the run
    assert max(positions) < engine.slots_per_row
    assert all(p & (p - 1) == 0 for p in positions)  # powers of two: few graphs


@pytest.mark.parametrize("arch,lengths,plain", [("llama", [9, 2, 5], True), ("qwen2", [4, 2, 3], True),
                                                ("mistral", [3, 9], False)])  # fmt: skip
@pytest.mark.parametrize("candidates,guesses", [(0, 0), (3, 2)])
def test_a_prefill_is_plain_causal_attention_where_that_is_exact(monkeypatch, arch, lengths, plain, candidates,
                                                                  guesses):  # fmt: skip
    """A prefill of right-padded prompts runs as sdpa's ``is_causal`` over the keys from the first position (no
    mask) unless a sliding window is shorter than a prompt (mistral's 4 here, qwen2's layers: 4 tokens fit); its
    keys, values and tokens equal those of the masked prefill, scratch slots in front or not."""
    model = pair(arch, 4)
    prompts = prompts_of(lengths, seed=4)
    paths, forward = [], DecodeEngine._forward

    def spy(self, *args, plain_causal=False, **kwargs):
        paths.append(plain_causal)
        return forward(self, *args, plain_causal=plain_causal, **kwargs)

    monkeypatch.setattr(DecodeEngine, "_forward", spy)
    runs = {}
    for causal in (True, False):
        build = lambda: DecodeEngine(model, len(prompts), 40, 4, rule_for("threshold", 0.9, len(prompts)),  # noqa: E731
                                     sampling_for(len(prompts)), eos_token_ids=[EOS], pad_token_id=PAD,
                                     candidates=candidates, guesses=guesses)  # fmt: skip
        engine = build()
        engine.causal_prefill = causal
        paths.clear()
        engine.add(prompts, list(range(len(prompts))), MAX_NEW, verify=bool(candidates))
        prefill = paths[0]
        kv = [[tensor[r, :, : len(p)].clone() for r, p in enumerate(prompts)] for layer in range(len(engine.cache))
              for tensor in engine.cache.positions(layer)]  # fmt: skip
        engine = build()
        engine.causal_prefill = causal
        runs[causal] = prefill, kv, decode_rows(engine, prompts, verify=bool(candidates))
    (taken, kv, tokens), (masked, kv_masked, tokens_masked) = runs[True], runs[False]
    assert (taken, masked) == (plain, False)
    for got, expected in zip(kv, kv_masked):
        for row, row_expected in zip(got, expected):
            torch.testing.assert_close(row, row_expected, rtol=1e-9, atol=1e-9)
    assert tokens == tokens_masked
