"""Every supported architecture x CPU attention backend honours the context-causal mask and stays the AR model
at block size 1. References are brute force: loop-built masks, one forward per block, the stock model."""

import pytest
import torch
from helpers import (
    ARCH_BACKENDS,
    EOS,
    PAD,
    TOL,
    converted_pair,
    grid_keys,
    layer_windows,
    padded_batch,
    reference_block_hidden,
    spec_influence,
)

from hf_blockdiff.masks import positions_from_padding

BLOCK = 3
PROMPT = 3  # rows 0 and 2 start with a 3-token prompt (labels -100)


def layout(mask_token_id, seed=0):
    """Three rows: no padding + prompt + two turns; left padding; right padding + prompt. Random masking of
    maskable slots."""
    ids, am = padded_batch([12, 9], left=True, seed=seed)
    right_ids, right_am = padded_batch([12, 10], left=False, seed=seed + 1)
    ids, am = torch.cat([ids, right_ids[1:]]), torch.cat([am, right_am[1:]])
    labels = ids.masked_fill(am == 0, -100)
    labels[1, 3] = -100  # the first real token of a left-padded row has no predecessor to predict it
    labels[0, :PROMPT] = -100
    labels[2, :PROMPT] = -100
    labels[0, 7] = -100  # two turns: supervised 3..6, context 7 (e.g. a chat header), supervised 8..11
    g = torch.Generator().manual_seed(seed)
    noisy = ids.clone()
    for r in range(ids.shape[0]):
        keys = grid_keys(labels[r].tolist(), am[r].tolist(), BLOCK)
        for j in range(1, ids.shape[1]):
            in_block, block_first = keys[j][1], keys[j][0] == j
            if in_block and not block_first and labels[r, j] != -100 and torch.rand((), generator=g) < 0.6:
                noisy[r, j] = mask_token_id
    return ids, am, labels, noisy, positions_from_padding(am)


def hidden_states(model, ids, am, labels, noisy, pos):
    with torch.no_grad():
        hidden, _ = model.two_stream_hidden_states(ids, noisy.unsqueeze(1), am, pos, labels, BLOCK)
    return hidden  # (batch, 2, length, hidden): [noisy; clean]


@pytest.mark.parametrize("arch,backend", ARCH_BACKENDS)
def test_block_size_1_logits_equal_source(arch, backend):
    source, model, _ = converted_pair(arch, backend, block_size=1)
    ids, am = padded_batch([11, 7, 9], left=True)
    pos = positions_from_padding(am)
    with torch.no_grad():
        expected = source(ids, attention_mask=am, position_ids=pos).logits
        got = model(ids, attention_mask=am, position_ids=pos).logits
    valid = am.bool()
    torch.testing.assert_close(got[..., : expected.shape[-1]][valid], expected[valid], rtol=0, atol=TOL)


@pytest.mark.parametrize("arch,backend", ARCH_BACKENDS)
def test_block_size_1_greedy_equals_source(arch, backend):
    source, model, _ = converted_pair(arch, backend, block_size=4)
    ids, am = padded_batch([6, 3, 5], left=True, seed=3)
    kwargs = dict(max_new_tokens=14, do_sample=False, eos_token_id=EOS, pad_token_id=PAD)
    expected = source.generate(ids, attention_mask=am, **kwargs)
    got = model.generate(ids, attention_mask=am, block_size=1, **kwargs)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("arch,backend", ARCH_BACKENDS)
def test_training_mask_by_perturbation(arch, backend):
    """Changing any input token changes exactly the outputs that may (transitively, over the layers) see it."""
    _, model, _ = converted_pair(arch, backend, block_size=BLOCK)
    ids, am, labels, noisy, pos = layout(model.config.mask_token_id)
    base = hidden_states(model, ids, am, labels, noisy, pos)
    windows = layer_windows(model.config)
    length = ids.shape[1]
    for r in range(ids.shape[0]):
        keys = grid_keys(labels[r].tolist(), am[r].tolist(), BLOCK)
        influence = spec_influence(keys, am[r].bool().tolist(), pos[r].tolist(), 1, windows)
        for stream in (0, 1):
            for j in range(length):
                x, x_t = ids.clone(), noisy.clone()
                target = x_t if stream == 0 else x
                target[r, j] = (target[r, j] + 7) % 50
                diff = (hidden_states(model, x, am, labels, x_t, pos) - base).abs().amax(-1)  # (batch, 2, length)
                assert diff[torch.arange(ids.shape[0]) != r].max() == 0, "a change leaked into another row"
                changed = (diff[r] > 0).flatten().tolist()
                expected = [influence[q][stream * length + j] for q in range(2 * length)]
                assert changed == expected, f"row {r}, stream {stream}, position {j}"


@pytest.mark.parametrize("arch,backend", ARCH_BACKENDS)
def test_clean_copy_equals_causal_forward(arch, backend):
    _, model, _ = converted_pair(arch, backend, block_size=BLOCK)
    ids, am, labels, noisy, pos = layout(model.config.mask_token_id)
    hidden = hidden_states(model, ids, am, labels, noisy, pos)
    with torch.no_grad():
        expected = model.model(ids, attention_mask=am, position_ids=pos).last_hidden_state
    valid = am.bool()
    torch.testing.assert_close(hidden[:, 1][valid], expected[valid], rtol=TOL, atol=TOL)


@pytest.mark.parametrize("arch,backend", ARCH_BACKENDS)
def test_noisy_blocks_equal_reference_forward(arch, backend):
    """Each noisy block (context tokens are one-token blocks) equals a forward of the block on its clean prefix."""
    _, model, _ = converted_pair(arch, backend, block_size=BLOCK)
    ids, am, labels, noisy, pos = layout(model.config.mask_token_id)
    hidden = hidden_states(model, ids, am, labels, noisy, pos)
    checked = 0
    for r in range(ids.shape[0]):
        keys = grid_keys(labels[r].tolist(), am[r].tolist(), BLOCK)
        valid = am[r].bool().tolist()
        for key in sorted(set(k for k, v in zip(keys, valid) if v)):
            members = [j for j, (k, v) in enumerate(zip(keys, valid)) if k == key and v]
            start = members[0]
            with torch.no_grad():
                ref = reference_block_hidden(
                    model, ids[r, :start].tolist(), valid[:start], pos[r, :start].tolist(),
                    noisy[r, members].tolist(), pos[r, members].tolist(),
                )  # fmt: skip
            torch.testing.assert_close(hidden[r, 0, members], ref, rtol=TOL, atol=TOL)
            checked += 1
    assert checked > 10


def predictions_made_right(model, ids, am, labels, noisy, pos):
    """Rewrite every other masked target to the token the model predicts there, so that the certainty term (over
    correctly predicted masked positions) has positions to cover. In position order: a masked token is never
    seen by its own prediction, only by later blocks and the clean copy."""
    ids, labels = ids.clone(), labels.clone()
    targets = sorted(((j, r) for r, j in (noisy[:, 1:] == model.config.mask_token_id).nonzero() + torch.tensor([0, 1])),
                     key=lambda t: (int(t[0]), int(t[1])))  # fmt: skip
    for j, r in targets[::2]:
        logits = model.logits_from_hidden(hidden_states(model, ids, am, labels, noisy, pos)[r, 0, j - 1]).float()
        logits[model.config.mask_token_id] = float("-inf")
        ids[r, j] = labels[r, j] = logits.argmax()
    return ids, labels


@pytest.mark.parametrize("arch,backend", ARCH_BACKENDS)
def test_losses_equal_slow_reference(arch, backend):
    source, model, _ = converted_pair(arch, backend, block_size=BLOCK)
    ids, am, labels, noisy, pos = layout(model.config.mask_token_id, seed=1)
    ids, labels = predictions_made_right(model, ids, am, labels, noisy, pos)
    with torch.no_grad():
        out = model(
            input_ids=ids, noisy_input_ids=noisy, attention_mask=am, position_ids=pos, labels=labels, block_size=BLOCK
        )
        ar_expected = source(ids, attention_mask=am, position_ids=pos, labels=labels).loss
        # soft labels: the causal model's next-token distribution (the converted model's plain forward)
        causal = model(ids, attention_mask=am, position_ids=pos).logits.float()
    causal[..., model.config.mask_token_id] = float("-inf")

    total, count, entropy_correct, correct, kl = 0.0, 0, 0.0, 0, 0.0
    for r in range(ids.shape[0]):
        keys = grid_keys(labels[r].tolist(), am[r].tolist(), BLOCK)
        valid = am[r].bool().tolist()
        for key in sorted(set(k for k, v in zip(keys, valid) if v and k[1])):
            members = [j for j, (k, v) in enumerate(zip(keys, valid)) if k == key and v]
            start = members[0]
            with torch.no_grad():
                h = reference_block_hidden(
                    model, ids[r, :start].tolist(), valid[:start], pos[r, :start].tolist(),
                    noisy[r, members].tolist(), pos[r, members].tolist(),
                )  # fmt: skip
                logits = model.logits_from_hidden(h).float()
            logits[:, model.config.mask_token_id] = float("-inf")
            for i, j in enumerate(members[1:], start=1):
                if noisy[r, j] == model.config.mask_token_id:
                    total += torch.nn.functional.cross_entropy(logits[i - 1 : i], labels[r, j : j + 1]).item()
                    count += 1
                    probs = logits[i - 1].softmax(-1)
                    p = causal[r, j - 1].softmax(-1)  # what the clean copy predicts at j from the true prefix
                    kl += (p[p > 0] * (p[p > 0].log() - probs[p > 0].log())).sum().item()
                    if probs.argmax() == labels[r, j]:
                        entropy_correct += -(probs[probs > 0] * probs[probs > 0].log()).sum().item()
                        correct += 1
    assert count == out.num_masked_tokens.item() > 0
    torch.testing.assert_close(out.diffusion_loss.item(), total / count, rtol=TOL, atol=TOL)
    torch.testing.assert_close(out.ar_loss, ar_expected, rtol=TOL, atol=TOL)
    torch.testing.assert_close(out.loss, out.diffusion_loss + 0.5 * out.ar_loss)
    with torch.no_grad():
        forced = model(input_ids=ids, noisy_input_ids=noisy, attention_mask=am, position_ids=pos, labels=labels,
                       block_size=BLOCK, certainty_loss_weight=0.3)  # fmt: skip
    assert count > correct >= count // 2 > 0  # right where made right, and (a random model) rarely elsewhere
    torch.testing.assert_close(forced.certainty_loss.item(), entropy_correct / correct, rtol=TOL * 10, atol=TOL * 10)
    torch.testing.assert_close(forced.loss, out.loss + 0.3 * forced.certainty_loss)
    with torch.no_grad():
        soft = model(input_ids=ids, noisy_input_ids=noisy, attention_mask=am, position_ids=pos, labels=labels,
                     block_size=BLOCK, soft_label_weight=0.4)  # fmt: skip
    assert out.soft_label_loss is None and soft.certainty_loss is None
    torch.testing.assert_close(soft.soft_label_loss.item(), kl / count, rtol=TOL * 10, atol=TOL * 10)
    torch.testing.assert_close(soft.loss, out.loss + 0.4 * soft.soft_label_loss)


def test_soft_labels_of_several_copies_are_each_copy_s_own():
    """With complementary noise (two noisy copies sharing one clean copy) every masked position of either copy is
    taught by the clean row at its position: the summed KL equals the sums of each copy run alone."""
    from hf_blockdiff import NoiseSampler

    _, model, _ = converted_pair("qwen2", block_size=BLOCK)
    ids, am, labels, _, pos = layout(model.config.mask_token_id, seed=3)
    noisy = NoiseSampler(model.config.mask_token_id, complementary=True)(
        ids, am, labels, BLOCK, generator=torch.Generator().manual_seed(0)
    ).noisy_input_ids
    assert noisy.shape[1] == 2

    def summed_kl(copies):
        with torch.no_grad():
            out = model(input_ids=ids, noisy_input_ids=copies, attention_mask=am, position_ids=pos, labels=labels,
                        block_size=BLOCK, soft_label_weight=1.0)  # fmt: skip
        return out.soft_label_loss * out.num_masked_tokens

    alone = summed_kl(noisy[:, 0]) + summed_kl(noisy[:, 1])
    assert alone > 0
    torch.testing.assert_close(summed_kl(noisy), alone, rtol=TOL, atol=TOL)


def test_chunked_loss_equals_direct_loss(monkeypatch):
    """Memory-bounded chunks (recomputed in backward) give the same losses and gradients."""
    from hf_blockdiff import modeling_blockdiff

    results = []
    for chunk in (10_000, 7):
        monkeypatch.setattr(modeling_blockdiff, "LOSS_CHUNK_ROWS", chunk)
        _, model, _ = converted_pair("llama", block_size=BLOCK)
        ids, am, labels, noisy, pos = layout(model.config.mask_token_id, seed=2)
        out = model(input_ids=ids, noisy_input_ids=noisy, attention_mask=am, labels=labels, block_size=BLOCK,
                    certainty_loss_weight=0.5, soft_label_weight=0.3)  # fmt: skip
        out.loss.backward()
        results.append((out.loss.detach(), out.certainty_loss.detach(), out.soft_label_loss.detach(),
                        model.lm_head.weight.grad.clone(), model.model.layers[0].mlp.up_proj.weight.grad.clone()))  # fmt: skip
    for direct, chunked in zip(*results):
        torch.testing.assert_close(chunked, direct, rtol=TOL, atol=TOL)


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_padding_to_a_multiple_of_the_block_size_changes_nothing(arch):
    """Samples are not padded to a multiple of the block size (docs/design.md 2.3): a short last block is the
    same as one filled with padding, because padding is never a key, a target or masked."""
    _, model, _ = converted_pair(arch, block_size=BLOCK)
    ids, am, labels, noisy, _ = layout(model.config.mask_token_id, seed=3)
    results = []
    for extra in range(BLOCK + 1):

        def pad(t, value):
            return torch.nn.functional.pad(t, (0, extra), value=value)

        x, x_am, x_labels, x_noisy = pad(ids, PAD), pad(am, 0), pad(labels, -100), pad(noisy, PAD)
        with torch.no_grad():
            out = model(input_ids=x, noisy_input_ids=x_noisy, attention_mask=x_am, labels=x_labels, block_size=BLOCK)
            hidden = hidden_states(model, x, x_am, x_labels, x_noisy, positions_from_padding(x_am))
        results.append(
            (out.loss, out.diffusion_loss, out.ar_loss, out.num_masked_tokens, hidden[..., : ids.shape[1], :])
        )
    assert results[0][3] > 0
    for padded in results[1:]:
        for got, expected in zip(padded, results[0]):
            torch.testing.assert_close(got, expected, rtol=TOL, atol=TOL)


@pytest.mark.parametrize("arch,backend", ARCH_BACKENDS)
@pytest.mark.parametrize("scope", ["full", "noisy"])
def test_split_layout_equals_joint_layout(arch, backend, scope):
    """The split training layout (clean stream first as a prefix cache, then only the noisy copies of the
    supervised runs) gives the joint layout's losses and gradients: full fine-tuning, and a noisy-scope adapter
    whose clean stream then runs without gradient. Two noisy copies (complementary masking), multi-turn rows,
    left and right padding, sliding windows."""
    _, model, _ = converted_pair(arch, backend, block_size=BLOCK)
    ids, am, labels, noisy, pos = layout(model.config.mask_token_id, seed=4)
    second = ids.masked_fill(noisy == ids, model.config.mask_token_id).where(labels != -100, ids)
    noisy = torch.stack([noisy, second], dim=1)
    if scope == "noisy":
        model.add_noisy_adapter(r=4, alpha=8)
        for name, param in model.named_parameters():
            param.requires_grad_("noisy_lora_" in name)
            if name.endswith("noisy_lora_B"):
                torch.nn.init.normal_(param, std=0.2)  # B = 0 would make the noisy copies the plain model's
    assert model.clean_stream_needs_grad() == (scope == "full")
    model.train()  # dropout is 0 in the tiny configs; training mode is where the layout is chosen
    assert model.training_layout() == ("joint" if backend == "flex_attention" else "split")
    weights = [p for p in model.parameters() if p.requires_grad]
    results = {}
    for layout_name in ("joint", "split"):
        model.training_layout = lambda name=layout_name: name
        out = model(input_ids=ids, noisy_input_ids=noisy, attention_mask=am, position_ids=pos, labels=labels,
                    block_size=BLOCK, fused_loss="none")  # fmt: skip
        grads = torch.autograd.grad(out.loss, weights, allow_unused=True)
        results[layout_name] = [out.loss, out.diffusion_loss, out.ar_loss, out.num_masked_tokens]
        results[layout_name] += [torch.zeros_like(w) if g is None else g for w, g in zip(weights, grads)]
    assert results["joint"][3] > 0
    assert any(g.abs().sum() > 0 for g in results["joint"][4:])
    for split, joint in zip(results["split"], results["joint"]):
        torch.testing.assert_close(split, joint, rtol=TOL, atol=TOL)


def test_checkpointed_training_uses_the_joint_layout():
    """transformers drops a checkpointed layer's cache, so the split layout would lose its prefix."""
    _, model, _ = converted_pair("llama", block_size=BLOCK)
    model.train()
    model.gradient_checkpointing_enable()
    assert model.training_layout() == "joint"
    with torch.no_grad():
        assert model.training_layout() == "split"
