"""Block-wise denoising generate(): cached equals brute force, batches equal rows alone, exact accounting."""

import pytest
import torch
from helpers import DEVICE, EOS, PAD, converted_pair, padded_batch
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer, pipeline
from transformers.generation.streamers import BaseStreamer

NO_EOS = dict(eos_token_id=[], pad_token_id=PAD)


# ----------------------------------------------------------------------------------------------------------
# A decoder that recomputes everything from scratch at every step: no cache, one full forward each time.


def full_mask(prefix_len, block_len, windows, model):
    """Causal over the prefix; the block sees the whole prefix and itself; windows on positions."""
    n = prefix_len + block_len
    q = torch.arange(n).view(n, 1)
    k = torch.arange(n).view(1, n)
    base = (k <= q) | ((q >= prefix_len) & (k >= prefix_len))
    masks = {t: (base & ((q - k) < w) if w else base).view(1, 1, n, n).to(DEVICE) for t, w in windows.items()}
    if model.config._attn_implementation == "eager":
        masks = {t: torch.where(m, 0.0, torch.finfo(model.dtype).min).to(model.dtype) for t, m in masks.items()}
    return masks[None] if None in masks else masks


def brute_force_generate(model, prompt, max_new, block_size, threshold, eos, repeat_guard=False):
    cfg = model.config.get_text_config(decoder=True)
    if model._mask_per_layer_type:
        windows = {t: cfg.sliding_window if t == "sliding_attention" else None for t in set(cfg.layer_types)}
    else:
        windows = {None: getattr(cfg, "sliding_window", None)}
    mask_id = model.config.mask_token_id

    def logits_of(seq, block_len):
        ids = torch.tensor([seq], device=DEVICE)
        mask = full_mask(len(seq) - block_len, block_len, windows, model)
        out = model(input_ids=ids, attention_mask=mask, position_ids=torch.arange(len(seq), device=DEVICE)[None])
        scores = out.logits[0].float()
        scores[:, mask_id] = float("-inf")
        return scores.softmax(-1)

    seq = list(prompt)
    generated = []
    first = int(logits_of(seq, 0)[-1].argmax())
    while len(generated) < max_new:
        size = min(block_size, max_new - len(generated))
        block = [first] + [mask_id] * (size - 1)
        done = [True] + [False] * (size - 1)

        def close():
            """After a committed EOS the block ends: later positions are no tokens, and nothing sees them."""
            nonlocal size
            for i in range(size):
                if done[i] and block[i] in eos:
                    del block[i + 1 :], done[i + 1 :]
                    size = i + 1
                    return True
            return False

        ended = close()
        while not all(done):
            probs = logits_of(seq + block, size)[len(seq) : len(seq) + size - 1]  # position i predicts i + 1
            conf, tok = probs.max(-1)
            open_ = [i for i in range(1, size) if not done[i]]
            best = max(open_, key=lambda i: (conf[i - 1].item(), -i))

            def repeats_open_neighbour(i):
                return any(j in open_ and tok[j - 1] == tok[i - 1] for j in (i - 1, i + 1))

            commits = [i for i in open_ if i == best or (conf[i - 1].item() > threshold
                                                          and not (repeat_guard and repeats_open_neighbour(i)))]  # fmt: skip
            for i in commits:
                block[i], done[i] = int(tok[i - 1]), True
            ended = close()
        generated += block
        seq += block
        if ended or len(generated) >= max_new:
            break
        first = int(logits_of(seq, 0)[-1].argmax())
    return generated


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "qwen2"])
@pytest.mark.parametrize("block_size,threshold", [(2, 0.5), (3, 0.0), (4, 0.3), (4, 0.9), (8, 1.0)])
def test_cached_equals_brute_force(arch, block_size, threshold):
    _, model, _ = converted_pair(arch, block_size=block_size)
    for seed, eos in [(0, []), (1, [EOS, 7, 13, 21])]:  # with and without early stops
        prompt, _ = padded_batch([5], seed=seed)
        expected = brute_force_generate(model, prompt[0].tolist(), 11, block_size, threshold, eos)
        got = model.generate(prompt, max_new_tokens=11, block_size=block_size, threshold=threshold,
                             eos_token_id=eos, pad_token_id=PAD)  # fmt: skip
        assert got[0, 5:].tolist()[: len(expected)] == expected
        assert all(t == PAD for t in got[0, 5 + len(expected) :].tolist())


def test_repeat_guard_holds_back_adjacent_twins():
    from hf_blockdiff.policies import RepeatGuard, Threshold

    conf = torch.tensor([[0.95, 0.99, 0.97, 0.96, 0.2]])
    proposal = torch.tensor([[5, 5, 7, 7, 9]])
    open_ = torch.tensor([[True, True, True, False, True]])  # position 3 is already known: 7 there is context
    steps = torch.tensor([0])
    rule = Threshold(torch.tensor([0.9]))
    plain = rule.select(conf, proposal, open_, steps)
    guarded = RepeatGuard(rule).select(conf, proposal, open_, steps)
    assert plain.tolist() == [[True, True, True, False, False]]
    # 1 is the quota pick (most confident); 0 repeats its still-masked neighbour 1; 2 repeats only a known token
    assert guarded.tolist() == [[False, True, True, False, False]]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("block_size,threshold", [(4, 0.0), (8, 0.0), (8, 0.5)])
def test_repeat_guard_cached_equals_brute_force(arch, block_size, threshold):
    _, model, _ = converted_pair(arch, block_size=block_size)
    changed = False
    for seed in range(4):
        prompt, _ = padded_batch([5], seed=seed)
        expected = brute_force_generate(model, prompt[0].tolist(), 16, block_size, threshold, [], repeat_guard=True)
        got = model.generate(prompt, max_new_tokens=16, block_size=block_size, threshold=threshold, repeat_guard=True,
                             **NO_EOS)  # fmt: skip
        assert got[0, 5:].tolist() == expected
        changed |= expected != brute_force_generate(model, prompt[0].tolist(), 16, block_size, threshold, [])
    if threshold == 0.0:  # committing a whole block at once makes twins common: the guard must have acted
        assert changed


def batch_with_stop_token(model, row=1):
    """A left-padded batch plus a token that `row` generates early and no other row does: that row stops first.

    Tries a few prompt seeds, since a random model may share tokens across rows for any one of them."""
    for seed in range(7, 27):
        ids, am = padded_batch([8, 3, 6], seed=seed)
        prompts = [ids[r : r + 1, -int(am[r].sum()) :] for r in range(3)]
        alone = [
            model.generate(p, max_new_tokens=16, threshold=0.6, **NO_EOS)[0, p.shape[1] :].tolist() for p in prompts
        ]
        for token in alone[row][2:8]:
            if all(token not in alone[r][:14] for r in range(len(alone)) if r != row) and token not in alone[row][:2]:
                return ids, am, prompts, token
    raise AssertionError("no prompt seed gives a row-distinguishing token; the test needs another model seed")


@pytest.mark.parametrize("block_size", [1, 4])
def test_left_padded_batch_equals_rows_alone(block_size):
    _, model, _ = converted_pair("qwen2", block_size=block_size)
    ids, am, prompts, stop = batch_with_stop_token(model, row=1)
    kwargs = dict(
        max_new_tokens=16, threshold=0.6, eos_token_id=[stop], pad_token_id=PAD, return_dict_in_generate=True
    )
    batch = model.generate(ids, attention_mask=am, **kwargs)
    lengths = []
    for r, prompt in enumerate(prompts):
        alone = model.generate(prompt, **kwargs)
        new = alone.sequences[0, prompt.shape[1] :]
        assert batch.sequences[r, ids.shape[1] : ids.shape[1] + new.numel()].tolist() == new.tolist()
        assert batch.num_generated_tokens[r] == alone.num_generated_tokens[0]
        assert batch.row_forward_passes[r] == alone.row_forward_passes[0] == alone.num_forward_passes
        lengths.append(int(alone.num_generated_tokens[0]))
    assert lengths[1] < 16 and max(lengths) == 16  # one row stopped early, another ran to the end
    assert batch.sequences[1, ids.shape[1] + lengths[1] :].eq(PAD).all()


@pytest.mark.parametrize("block_size", [2, 4, 8])
def test_forward_accounting(block_size):
    _, model, _ = converted_pair("llama", block_size=block_size)
    calls = []
    model.model.register_forward_hook(lambda *args: calls.append(1))  # the engine runs the base model
    ids, _ = padded_batch([5], seed=3)
    blocks = 3
    new = blocks * block_size

    def run(**kwargs):
        calls.clear()
        out = model.generate(ids, max_new_tokens=new, return_dict_in_generate=True, **NO_EOS, **kwargs)
        assert out.num_forward_passes == len(calls) == out.row_forward_passes.item()
        assert out.num_generated_tokens.item() == new
        return out

    everything = run(threshold=0.0)  # every block: one denoising step, one commit (none after the last)
    assert everything.num_forward_passes == 2 * blocks
    assert (
        everything.committed_at.view(blocks, block_size)[:, 1:]
        == everything.committed_at.view(blocks, block_size)[:, 1:2]
    ).all()
    one_by_one = run(threshold=1.0)  # confidence never exceeds 1: one token per step
    assert one_by_one.num_forward_passes == 1 + blocks * (block_size - 1) + (blocks - 1)
    order = one_by_one.committed_at.view(blocks, block_size)[:, 1:].sort(-1).values
    assert (order.diff(dim=-1) == 1).all()
    for steps in (1, 2, block_size - 1):
        fixed = run(threshold=None, steps_per_block=steps)  # never more steps than masked positions
        assert fixed.num_forward_passes == 1 + blocks * min(steps, block_size - 1) + (blocks - 1)


def test_ragged_last_block_and_block_size_one():
    _, model, _ = converted_pair("llama", block_size=4)
    ids, _ = padded_batch([5], seed=3)
    out = model.generate(ids, max_new_tokens=6, threshold=0.0, return_dict_in_generate=True, **NO_EOS)
    assert out.sequences.shape[1] == 11 and out.num_forward_passes == 4  # blocks of 4 and 2
    ar = model.generate(ids, max_new_tokens=6, block_size=1, return_dict_in_generate=True, **NO_EOS)
    assert ar.num_forward_passes == 6


def test_mask_token_is_never_committed():
    _, model, _ = converted_pair("llama", block_size=4)
    with torch.no_grad():  # make the mask token the model's favourite everywhere
        model.lm_head.weight[model.config.mask_token_id] = model.lm_head.weight.abs().max() * 50
    ids, _ = padded_batch([4], seed=1)
    out = model.generate(ids, max_new_tokens=12, threshold=0.9, **NO_EOS)
    assert not (out == model.config.mask_token_id).any()


def test_sampling_is_seeded_and_temperature_zero_is_greedy():
    _, model, _ = converted_pair("llama", block_size=4)
    ids, am = padded_batch([6, 4], seed=5)
    kwargs = dict(attention_mask=am, max_new_tokens=12, threshold=0.7, **NO_EOS)

    def sample(seed, **extra):
        gen = torch.Generator(device=DEVICE).manual_seed(seed)
        return model.generate(ids, do_sample=True, generator=gen, **kwargs, **extra)

    assert torch.equal(sample(0, temperature=1.5), sample(0, temperature=1.5))
    assert not torch.equal(sample(0, temperature=1.5), sample(1, temperature=1.5))
    assert torch.equal(sample(0, temperature=0.0), model.generate(ids, do_sample=False, **kwargs))
    top1 = sample(3, top_k=1)
    assert torch.equal(top1, model.generate(ids, **kwargs))  # top-k 1 is greedy
    nucleus = sample(4, top_p=0.5, temperature=0.8)
    assert nucleus.shape == top1.shape and (nucleus[:, ids.shape[1] :] != model.config.mask_token_id).all()


def test_top_k_top_p_keep_exactly_the_brute_force_sets():
    from hf_blockdiff.policies import restrict

    g = torch.Generator().manual_seed(0)
    scores = torch.randn(3, 2, 12, generator=g) * 2
    top_k, top_p = torch.tensor([0, 3, 5]), torch.tensor([0.6, 1.0, 0.3])
    kept = restrict(scores, top_k, top_p) > float("-inf")
    for r in range(3):
        for n in range(2):
            probs = scores[r, n].softmax(-1)
            order = probs.argsort(descending=True).tolist()
            allowed, mass = [], 0.0
            for rank, token in enumerate(order):  # the smallest prefix reaching top_p, cut at top_k
                if (top_k[r] and rank >= top_k[r]) or (rank and mass >= top_p[r]):
                    break
                allowed.append(token)
                mass += probs[token].item()
            assert sorted(kept[r, n].nonzero().squeeze(1).tolist()) == sorted(allowed)


@pytest.mark.parametrize("measure", ["probability", "margin", "entropy"])
def test_confidence_measures_follow_the_threshold(measure):
    """Every measure lies in [0, 1]: threshold 1 commits one token per step, threshold 0 a block at once."""
    _, model, _ = converted_pair("llama", block_size=4)
    ids, _ = padded_batch([5], seed=8)
    for threshold, forwards in [(1.0, 1 + 2 * 3 + 1), (0.0, 1 + 2 * 1 + 1)]:
        out = model.generate(ids, max_new_tokens=8, threshold=threshold, confidence=measure,
                             return_dict_in_generate=True, **NO_EOS)  # fmt: skip
        assert out.num_forward_passes == forwards


def test_min_new_tokens_and_stopping_criteria():
    _, model, _ = converted_pair("llama", block_size=4)
    ids, _ = padded_batch([5], seed=3)
    free = model.generate(ids, max_new_tokens=12, **NO_EOS)[0, 5:].tolist()
    stop = free[1]
    early = model.generate(ids, max_new_tokens=12, eos_token_id=stop, pad_token_id=PAD)
    assert early[0, 5:].tolist()[:2] == free[:2] and early[0, 7:].eq(PAD).all()
    held = model.generate(ids, max_new_tokens=12, min_new_tokens=6, eos_token_id=stop, pad_token_id=PAD)
    assert stop not in held[0, 5:11].tolist()

    class StopAfter(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= 5 + 8, device=input_ids.device)

    stopped = model.generate(ids, max_new_tokens=40, stopping_criteria=StoppingCriteriaList([StopAfter()]), **NO_EOS)
    assert stopped.shape[1] == 5 + 8


def test_generation_config_defaults_and_pipeline():
    _, model, tok = converted_pair("llama", block_size=4)
    model.generation_config.max_new_tokens = 10
    model.generation_config.threshold = 0.5
    ids = tok("w1 w2 w3 w4", return_tensors="pt").input_ids.to(DEVICE)
    explicit = model.generate(ids, max_new_tokens=10, block_size=4, threshold=0.5)
    assert torch.equal(model.generate(ids), explicit)
    generator = pipeline("text-generation", model=model, tokenizer=tok, device=DEVICE)
    text = generator("w1 w2 w3 w4", return_full_text=False, do_sample=False)[0]["generated_text"]
    assert text == tok.decode(explicit[0, 4:], skip_special_tokens=True)


def test_streamers_receive_committed_blocks_and_drafts():
    _, model, tok = converted_pair("llama", block_size=4)
    ids, _ = padded_batch([5], seed=6)

    class Recorder(BaseStreamer):
        def __init__(self):
            self.puts, self.drafts, self.ended = [], [], False

        def put(self, value):
            self.puts.append(value.reshape(-1).tolist())

        def put_draft(self, value):
            self.drafts.append(value)

        def end(self):
            self.ended = True

    rec = Recorder()
    out = model.generate(ids, max_new_tokens=12, threshold=0.5, streamer=rec, **NO_EOS)
    assert rec.puts[0] == ids[0].tolist() and rec.ended
    assert sum(rec.puts[1:], []) == out[0, 5:].tolist()
    assert [len(p) for p in rec.puts[1:]] == [4, 4, 4] and rec.drafts
    text_streamer = TextIteratorStreamer(tok, skip_prompt=True)
    out = model.generate(ids, max_new_tokens=12, threshold=0.5, streamer=text_streamer, **NO_EOS)
    assert "".join(text_streamer).split() == tok.decode(out[0, 5:]).split()


def test_bad_inputs_have_clear_errors():
    _, model, _ = converted_pair("llama", block_size=4)
    ids, am = padded_batch([5, 3], seed=1)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.generate(ids, max_new_tokens=200)
    with pytest.raises(ValueError, match="block_size"):
        model.generate(ids, max_new_tokens=4, block_size=0)
    with pytest.raises(ValueError, match="threshold"):
        model.generate(ids, max_new_tokens=4, threshold=1.5)
    with pytest.raises(ValueError, match="confidence"):
        model.generate(ids, max_new_tokens=4, confidence="vibes")
    with pytest.raises(ValueError, match="left padding"):
        model.generate(ids, attention_mask=am.flip(-1), max_new_tokens=4)
    with pytest.raises(ValueError, match="beam"):
        model.generate(ids, max_new_tokens=4, num_beams=2)
    with pytest.raises(ValueError, match="batch size 1"):
        model.generate(ids, attention_mask=am, max_new_tokens=4, streamer=BaseStreamer())
    mask_id = model.config.mask_token_id
    model.config.mask_token_id = None
    with pytest.raises(ValueError, match="mask_token_id"):
        model.generate(ids, max_new_tokens=4)
    assert model.generate(ids, max_new_tokens=4, block_size=1).shape[1] == 9  # AR needs no mask token
    model.config.mask_token_id = mask_id
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="flash_attention_2"):
        model.generate(ids, max_new_tokens=4)
