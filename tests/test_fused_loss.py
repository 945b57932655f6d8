"""The fused-loss wiring of the two-stream forward (``fused_loss``): which path is chosen, and that the rows, classes,
reductions and divisors handed to liger-kernel give the chunked path's losses and gradients. liger-kernel needs
Triton and CUDA, so here a pure-torch function with its signature stands in for it on the CPU; where liger-kernel
and triton are installed, the real kernels also run in Triton's CPU interpreter. Also: the training step's loss
path reads nothing back from the device (no host sync) beyond the one ``nonzero`` per row group."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import TOL, converted_pair
from test_conformance import BLOCK, layout
from torch.utils._python_dispatch import TorchDispatchMode

from hf_blockdiff import NoiseSampler, modeling_blockdiff


def stand_in(calls):
    """liger_fused_linear_cross_entropy's signature and results, in plain torch; records each call."""

    def flce(input, weight, target, bias=None, ce_weight=None, ignore_index=-100, lse_square_scale=0.0,
             label_smoothing=0.0, reduction="mean", softcap=None, return_z_loss=False, accum_dtype=None, **kwargs):  # fmt: skip
        in_range = (target >= 0) & (target < weight.shape[0])
        assert (in_range | (target == ignore_index)).all(), "a class index the kernel would read out of range"
        assert reduction in ("sum", "none") and ce_weight is None and softcap is None
        calls.append(dict(rows=input.shape[0], classes=weight.shape[0], reduction=reduction, grad=input.requires_grad))
        logits = F.linear(input, weight, bias).float()
        return F.cross_entropy(logits, target, ignore_index=ignore_index, reduction=reduction)

    return flce


@pytest.fixture
def fake_liger(monkeypatch):
    calls = []
    monkeypatch.setattr(modeling_blockdiff, "FUSED_LOSS_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(modeling_blockdiff, "_liger", [stand_in(calls)])
    return calls


def losses_and_grads(model, fused_loss, mask_last=False, **kwargs):
    model.zero_grad()
    ids, am, labels, noisy, pos = layout(model.config.mask_token_id, seed=2)
    if kwargs.pop("complementary", False):
        noise = NoiseSampler(model.config.mask_token_id, complementary=True, elbo_weighting=True)(
            ids, am, labels, BLOCK, generator=torch.Generator().manual_seed(0)
        )
        noisy, kwargs["diffusion_loss_weights"] = noise.noisy_input_ids, noise.diffusion_loss_weights
    kwargs.setdefault("block_size", BLOCK)
    out = model(
        input_ids=ids, noisy_input_ids=noisy, attention_mask=am, labels=labels, fused_loss=fused_loss, **kwargs
    )
    out.loss.backward()
    values = [out.loss, out.diffusion_loss, out.ar_loss] + [
        extra for extra in (out.certainty_loss, out.soft_label_loss) if extra is not None
    ]
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return [v.detach() for v in values], grads


CASES = {
    "plain": dict(),
    "elbo weights": dict(diffusion_loss_weights=torch.rand(3, 12, generator=torch.Generator().manual_seed(1)) + 0.5),
    "certainty": dict(certainty_loss_weight=0.5),
    "complementary + certainty": dict(complementary=True, certainty_loss_weight=0.3),
    "ar weight 0": dict(ar_loss_weight=0.0),
    "block size 1": dict(block_size=1),
    "soft labels": dict(soft_label_weight=0.7),
    "soft labels, ar weight 0": dict(soft_label_weight=0.7, ar_loss_weight=0.0),
}
# (diffusion-row call, AR-row call) the stand-in sees; None = that group stays on the chunked path.
EXPECTED_CALLS = {
    "plain": ("sum", "sum"),
    "elbo weights": ("none", "sum"),
    "certainty": (None, "sum"),
    "complementary + certainty": (None, "sum"),
    "ar weight 0": ("sum", "sum"),
    "block size 1": (None, "sum"),
    "soft labels": (None, "sum"),
    "soft labels, ar weight 0": (None, "sum"),
}


@pytest.mark.parametrize("mask_last", [False, True], ids=["mask row inside", "mask row last"])
@pytest.mark.parametrize("case", list(CASES))
def test_fused_path_equals_the_chunked_path(fake_liger, case, mask_last):
    _, model, _ = converted_pair("llama", block_size=BLOCK)
    vocab = model.lm_head.weight.shape[0]
    if not mask_last:  # conversion appends the mask row; another row (a role token) exercises the general case
        model.config.mask_token_id = vocab - 4
    assert (model.config.mask_token_id == vocab - 1) == mask_last
    model.train()
    expected, expected_grads = losses_and_grads(model, "none", **CASES[case])
    assert not fake_liger
    got, grads = losses_and_grads(model, "liger", **CASES[case])
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=TOL, atol=TOL)
    assert grads.keys() == expected_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], expected_grads[name], rtol=TOL, atol=TOL, msg=name)

    diff_call, ar_call = EXPECTED_CALLS[case]
    assert [c["reduction"] for c in fake_liger] == [r for r in (diff_call, ar_call) if r]
    assert all(c["classes"] == vocab - 1 for c in fake_liger)  # the mask class left the softmax
    assert fake_liger[-1]["grad"] == (CASES[case].get("ar_loss_weight", 0.5) != 0)  # AR rows: grad only if weighted


def test_mask_token_as_a_target_is_an_infinite_loss_on_both_paths(fake_liger):
    """The chunked path gives the mask class probability 0; the fused one must not read it as another class."""
    _, model, _ = converted_pair("llama", block_size=BLOCK)
    ids, am, labels, noisy, _ = layout(model.config.mask_token_id, seed=2)
    ids[1, 5] = labels[1, 5] = noisy[1, 5] = model.config.mask_token_id
    results = []
    with torch.no_grad():
        for fused_loss in ("none", "liger"):
            out = model(input_ids=ids, noisy_input_ids=noisy, attention_mask=am, labels=labels, block_size=BLOCK,
                        fused_loss=fused_loss)  # fmt: skip
            results.append((out.diffusion_loss, out.ar_loss))
    assert results[0][1].isinf() and len(fake_liger) == 2
    torch.testing.assert_close(results[1], results[0])


def test_lora_with_trainable_mask_row_uses_the_merged_head(fake_liger):
    """Under LoRA the tied head is PEFT's TrainableTokensWrapper: the fused path takes its merged weight."""
    from peft import LoraConfig, get_peft_model

    from hf_blockdiff.trainer import _train_mask_row

    _, model, _ = converted_pair("llama", block_size=BLOCK, tie_word_embeddings=True)
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    _train_mask_row(model, config, model.config.mask_token_id)
    peft_model = get_peft_model(model, config)
    inner = peft_model.base_model.model
    assert type(inner.get_output_embeddings()).__name__ == "TrainableTokensWrapper"
    with torch.no_grad():  # move the LoRA weights off zero so that their gradients are not trivially equal
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    peft_model.train()
    expected, expected_grads = losses_and_grads(inner, "none")
    got, grads = losses_and_grads(inner, "liger")
    assert len(fake_liger) == 2
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=TOL, atol=TOL)
    assert any("lora" in name for name in grads) and grads.keys() == expected_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], expected_grads[name], rtol=TOL, atol=TOL, msg=name)


def test_which_path(monkeypatch):
    _, model, _ = converted_pair("llama", block_size=BLOCK)
    hidden = torch.zeros(2, model.config.hidden_size, requires_grad=True)
    with pytest.raises(ValueError, match="fused_loss must be one of"):
        ids, am, labels, noisy, _ = layout(model.config.mask_token_id)
        model(input_ids=ids, noisy_input_ids=noisy, attention_mask=am, labels=labels, fused_loss="fast")
    assert model.fused_loss_backend("none", hidden) is None
    assert model.fused_loss_backend("auto", hidden) is None  # CPU
    with pytest.raises(ValueError, match="runs on cuda"):
        model.fused_loss_backend("liger", hidden)

    monkeypatch.setattr(modeling_blockdiff, "FUSED_LOSS_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(modeling_blockdiff, "_liger", [None])  # not installed / no triton
    assert model.fused_loss_backend("auto", hidden) is None
    with pytest.raises(ValueError, match="not importable"):
        model.fused_loss_backend("liger", hidden)

    monkeypatch.setattr(modeling_blockdiff, "_liger", [stand_in([])])
    assert model.fused_loss_backend("auto", hidden) == "liger"
    assert model.fused_loss_backend("none", hidden) is None
    # What the kernel cannot do exactly keeps the chunked path: softcapped logits, a custom head.
    _, gemma, _ = converted_pair("gemma3_text", block_size=BLOCK)
    assert gemma.fused_loss_backend("auto", hidden) is None
    with pytest.raises(ValueError, match="softcaps"):
        gemma.fused_loss_backend("liger", hidden)
    monkeypatch.setattr(type(model), "logits_from_hidden", lambda self, h: 2 * self.lm_head(h))
    with pytest.raises(ValueError, match="overrides logits_from_hidden"):
        model.fused_loss_backend("liger", hidden)


def test_liger_lookup_is_optional(monkeypatch):
    """Where liger-kernel is missing or older than needed, the lookup answers None (the chunked path)."""
    import importlib.metadata

    monkeypatch.setattr(modeling_blockdiff, "_liger", [])
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.8.1")
    assert modeling_blockdiff._liger_cross_entropy() is None
    monkeypatch.setattr(modeling_blockdiff, "_liger", [])

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    assert modeling_blockdiff._liger_cross_entropy() is None


class HostReads(TorchDispatchMode):
    """Counts the ops that make the host wait for the device: scalar reads and data-dependent shapes."""

    SYNCING = {"_local_scalar_dense", "nonzero", "masked_select", "equal", "is_nonzero"}

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        if name in self.SYNCING:
            self.ops.append(name)
        elif name in ("index", "index_put", "index_put_") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]
        ):  # a boolean index computes its nonzero inside the kernel
            self.ops.append("boolean index")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("fused", [False, True])
def test_training_step_reads_nothing_back_but_the_row_selection(fake_liger, fused, tmp_path):
    """Noise, forward, losses, metrics and backward of one trainer step: the host waits for the device only for the
    split layout's noisy-stream length and at the two `nonzero`s that gather the diffusion and AR rows
    (liger-kernel itself reads a count on top)."""
    from datasets import Dataset

    from hf_blockdiff import BlockDiffusionConfig, BlockDiffusionTrainer

    _, model, tok = converted_pair("llama", block_size=BLOCK)
    data = [{"text": " ".join(f"w{(i * 7 + j) % 60}" for j in range(10 + i))} for i in range(8)]  # padded rows

    args = BlockDiffusionConfig(output_dir=str(tmp_path), block_size=BLOCK, block_growth=False, max_steps=1,
                                per_device_train_batch_size=4, report_to=[], use_cpu=True, max_length=32,
                                fused_loss="liger" if fused else "none", certainty_loss_weight=0.0)  # fmt: skip
    trainer = BlockDiffusionTrainer(model, args=args, train_dataset=Dataset.from_list(data), processing_class=tok)
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    model.train()
    with HostReads() as reads:
        loss = trainer.compute_loss(model, inputs)
        loss.backward()
    # The stand-in's range check reads one flag per call, where liger-kernel reads its count of targets.
    assert model.training_layout() == "split"
    assert reads.ops == ["_local_scalar_dense", "nonzero", "nonzero"] + ["_local_scalar_dense"] * len(fake_liger)
    assert len(fake_liger) == (2 if fused else 0)
    trainer.log({})  # the metrics left on the device are read here, once per logging window
    assert isinstance(trainer.state.log_history[-1]["diffusion_loss"], float)


REAL_KERNEL = """
import sys
sys.path.insert(0, sys.argv[1])
from helpers import TOL, converted_pair
from test_conformance import BLOCK
from test_fused_loss import CASES, losses_and_grads
from hf_blockdiff import modeling_blockdiff

modeling_blockdiff.FUSED_LOSS_DEVICES = ("cuda", "cpu")
assert modeling_blockdiff._liger_cross_entropy() is not None
for mask_last in (True, False):
    for case, kwargs in CASES.items():
        _, model, _ = converted_pair("llama", block_size=BLOCK)
        if not mask_last:
            model.config.mask_token_id = model.lm_head.weight.shape[0] - 4
        model.train()
        expected, expected_grads = losses_and_grads(model, "none", **kwargs)
        got, grads = losses_and_grads(model, "liger", **kwargs)
        assert grads.keys() == expected_grads.keys(), case
        for g, e in zip(got, expected):
            assert (g - e).abs().max() < TOL, (case, mask_last, g, e)
        for name, grad in grads.items():
            scale = expected_grads[name].abs().max().clamp(min=1e-12)
            assert ((grad - expected_grads[name]).abs().max() / scale) < 1e-4, (case, mask_last, name)
print("ok")
"""


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("liger_kernel") is None or importlib.util.find_spec("triton") is None,
    reason="liger-kernel and triton are not installed (pip install hf_blockdiff[train])",
)
def test_the_real_kernel_in_the_triton_interpreter():
    """liger-kernel itself, its Triton kernels run by Triton's CPU interpreter, through the same wiring."""
    env = {
        **os.environ,
        "TRITON_INTERPRET": "1",
        "HF_BLOCKDIFF_TEST_DEVICE": "cpu",
        "HF_BLOCKDIFF_TEST_DTYPE": "float32",
    }
    tests = str(Path(__file__).parent)
    proc = subprocess.run([sys.executable, "-c", REAL_KERNEL, tests], capture_output=True, text=True, env=env,
                          timeout=900)  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
