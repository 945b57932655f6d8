"""The noisy-scope adapter: low-rank weights that act only where blocks are denoised. The causal path (plain
forward, block size 1, prefill, commits) stays the source model bit for bit, before and after training and after a
save/load through trust_remote_code, so verified decoding gives the source's own greedy output."""

import copy

import pytest
import torch
from helpers import PAD, converted_pair, padded_batch, source_model, tiny_tokenizer
from test_portable import run_isolated
from test_trainer import cyclic_text

from hf_blockdiff import BlockDiffusionConfig, BlockDiffusionTrainer

GREEDY = dict(max_new_tokens=12, do_sample=False, eos_token_id=[], pad_token_id=PAD)


def with_random_adapter(arch):
    """(source, model with an adapter whose B is non-zero, the same model without the adapter)."""
    source, model, tok = converted_pair(arch, block_size=4)
    plain = copy.deepcopy(model)
    model.add_noisy_adapter(r=4, alpha=8)
    g = torch.Generator().manual_seed(0)
    for name, param in model.named_parameters():
        if name.endswith("noisy_lora_B"):
            param.data.copy_(torch.randn(param.shape, generator=g) * 0.5)
    return source, model, plain, tok


def source_logits(source, ids, am=None):
    with torch.no_grad():
        return source(ids, attention_mask=am).logits


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3_text"])
def test_the_causal_path_is_the_source_and_denoising_is_adapted(arch):
    source, model, plain, _ = with_random_adapter(arch)
    ids, am = padded_batch([7, 5], seed=3)
    vocab = source.config.vocab_size
    with torch.no_grad():
        torch.testing.assert_close(model(ids, attention_mask=am).logits[..., :vocab], source_logits(source, ids, am),
                                   rtol=0, atol=0)  # fmt: skip
    reference = source.generate(ids, attention_mask=am, **GREEDY)
    assert torch.equal(model.generate(ids, attention_mask=am, block_size=1, **GREEDY), reference)
    verified = model.generate(ids, attention_mask=am, block_size=4, verify=True, return_dict_in_generate=True,
                              **GREEDY)  # fmt: skip
    assert torch.equal(verified.sequences, reference)  # the source's own greedy output, drafted in blocks

    # ... while denoising does use the adapter: the draft and the diffusion loss change, the AR loss does not.
    drafted = [m.generate(ids, attention_mask=am, block_size=4, threshold=0.0, **GREEDY) for m in (model, plain)]
    assert not torch.equal(*drafted)
    # a deep copy keeps its adapter working (its own gate, shared by its layers)
    copied = copy.deepcopy(model)
    assert torch.equal(copied.generate(ids, attention_mask=am, block_size=4, threshold=0.0, **GREEDY), drafted[0])
    noisy = ids.clone()
    noisy[:, 3::2] = model.config.mask_token_id
    with_adapter, without = (
        m(input_ids=ids, attention_mask=am, noisy_input_ids=noisy, block_size=4) for m in (model, plain)
    )
    assert torch.equal(with_adapter.ar_loss, without.ar_loss)
    assert not torch.allclose(with_adapter.diffusion_loss, without.diffusion_loss)
    # and a plain forward after a training forward is the source again
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=am).logits[..., :vocab], source_logits(source, ids, am))


@pytest.mark.slow
def test_a_saved_adapter_loads_through_remote_code_without_hf_blockdiff(tmp_path):
    source, model, _, tok = with_random_adapter("qwen2")
    model.save_pretrained(tmp_path / "ckpt")
    tok.save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "noisy_adapter.py").is_file()
    ids, _ = padded_batch([9, 9], seed=4)
    result, logits = run_isolated(tmp_path / "ckpt", True, tmp_path, ids)
    torch.testing.assert_close(logits[..., : source.config.vocab_size], source_logits(source, ids), rtol=0, atol=0)
    expected = model.generate(ids[:, :5], max_new_tokens=8, block_size=4, threshold=0.5, return_dict_in_generate=True)
    assert result["sequences"] == expected.sequences.tolist()  # the adapter denoises after the reload too


@pytest.mark.slow
def test_training_moves_only_the_adapter(tmp_path):
    source = source_model("llama")
    args = BlockDiffusionConfig(output_dir=str(tmp_path / "out"), max_steps=20, per_device_train_batch_size=8,
                                learning_rate=1e-2, logging_steps=1, block_size=4, report_to=[], save_strategy="no",
                                use_cpu=True, max_length=32, seed=0, adapter_scope="noisy", block_growth=False)  # fmt: skip
    trainer = BlockDiffusionTrainer(copy.deepcopy(source), args=args, train_dataset=cyclic_text(),
                                    processing_class=tiny_tokenizer())  # fmt: skip
    trainer.train()
    logs = [e for e in trainer.state.log_history if "diffusion_loss" in e]
    assert sum(e["diffusion_loss"] for e in logs[-5:]) < 0.8 * sum(e["diffusion_loss"] for e in logs[:5])
    base = {n: p for n, p in trainer.model.named_parameters() if "noisy_lora" not in n}
    assert base.keys() == dict(source.named_parameters()).keys()
    for name, param in base.items():  # untouched (embedding and head: the source's rows; the mask row is new)
        assert torch.equal(param[: source.get_parameter(name).shape[0]], source.get_parameter(name)), name
    assert all(not torch.equal(p, torch.zeros_like(p)) for n, p in trainer.model.named_parameters() if "lora_B" in n)
    trainer.save_model()
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True).eval()
    assert reloaded.config.noisy_adapter["r"] == 16
    ids, am = padded_batch([7, 5], seed=3)
    with torch.no_grad():
        got = reloaded(ids, attention_mask=am).logits[..., : source.config.vocab_size]
    torch.testing.assert_close(got, source_logits(source, ids, am), rtol=0, atol=0)
    reference = source.generate(ids, attention_mask=am, **GREEDY)
    assert torch.equal(reloaded.generate(ids, attention_mask=am, block_size=4, verify=True, **GREEDY), reference)


def test_noisy_scope_refuses_a_lora_config_it_cannot_size(tmp_path):
    from peft import LoraConfig

    args = BlockDiffusionConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, adapter_scope="noisy")
    with pytest.raises(ValueError, match="adapter_scope='noisy'"):
        BlockDiffusionTrainer(source_model("llama"), args=args, train_dataset=cyclic_text(),
                              processing_class=tiny_tokenizer(), peft_config=LoraConfig(target_modules=".*proj"))  # fmt: skip
    with pytest.raises(ValueError, match="adapter_scope"):
        BlockDiffusionConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, adapter_scope="clean")


def test_an_adapter_saved_alone_applies_to_a_fresh_conversion(tmp_path):
    from hf_blockdiff.convert import apply_adapter, save_noisy_adapter

    source, model, plain, _ = with_random_adapter("llama")
    save_noisy_adapter(model, tmp_path / "adapter", dtype=None)
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "noisy_adapter.safetensors", "noisy_adapter_config.json"]  # fmt: skip
    plain_copy = copy.deepcopy(plain)
    applied = apply_adapter(copy.deepcopy(plain), tmp_path / "adapter")
    ids, am = padded_batch([7, 5], seed=3)
    settings = dict(attention_mask=am, block_size=4, threshold=0.0, **GREEDY)
    assert torch.equal(applied.generate(ids, **settings), model.generate(ids, **settings))
    assert not torch.equal(applied.generate(ids, **settings), plain.generate(ids, **settings))
    with torch.no_grad():  # and the causal path is still the source
        torch.testing.assert_close(applied(ids, attention_mask=am).logits[..., : source.config.vocab_size],
                                   source_logits(source, ids, am), rtol=0, atol=0)  # fmt: skip
    other_rank = copy.deepcopy(plain_copy)
    other_rank.add_noisy_adapter(r=2)
    with pytest.raises(ValueError, match="has a noisy-scope adapter"):
        apply_adapter(other_rank, tmp_path / "adapter")
    from safetensors.torch import load_file, save_file

    weights = load_file(tmp_path / "adapter" / "noisy_adapter.safetensors")
    save_file(dict(list(weights.items())[1:]), tmp_path / "adapter" / "noisy_adapter.safetensors")
    with pytest.raises(ValueError, match="does not fit"):
        apply_adapter(copy.deepcopy(plain_copy), tmp_path / "adapter")
    with pytest.raises(ValueError, match="no noisy-scope adapter"):
        save_noisy_adapter(plain_copy, tmp_path / "none")


@pytest.mark.slow
def test_a_noisy_run_resumes_from_an_adapter_only_checkpoint(tmp_path):
    from transformers import TrainerCallback

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 5:
                control.should_training_stop = control.should_save = True

    def trainer(out, *callbacks):
        args = BlockDiffusionConfig(output_dir=str(tmp_path / out), max_steps=10, per_device_train_batch_size=8,
                                    learning_rate=1e-2, logging_steps=1, block_size=4, report_to=[],
                                    save_strategy="no", use_cpu=True, max_length=32, seed=0, adapter_scope="noisy",
                                    whole_block_noise=0.5, dataloader_num_workers=0, growth_start=2,
                                    growth_interval_steps=4)  # fmt: skip
        return BlockDiffusionTrainer(source_model("llama"), args=args, train_dataset=cyclic_text(),
                                     processing_class=tiny_tokenizer(), callbacks=list(callbacks))  # fmt: skip

    straight = trainer("straight")
    straight.train()
    trainer("pieces", StopAt()).train()
    checkpoint = tmp_path / "pieces" / "checkpoint-5"
    names = {p.name for p in checkpoint.iterdir()}
    assert {"noisy_adapter.safetensors", "optimizer.pt", "trainer_state.json"} <= names
    assert "model.safetensors" not in names  # the base is the source: a checkpoint is the adapter and its state
    resumed = trainer("pieces")
    resumed.train(resume_from_checkpoint=str(checkpoint))
    adapter = {n: p for n, p in straight.model.named_parameters() if "noisy_lora" in n}
    assert adapter and all(p.dtype == torch.float32 for p in adapter.values())
    for name, param in resumed.model.named_parameters():
        if "noisy_lora" in name:
            assert torch.equal(param, adapter[name]), name  # bit for bit: data position, noise, optimizer, schedule
