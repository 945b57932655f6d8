"""BlockDiffusionTrainer on tiny models: learning, logging, growth + resume, LoRA, completion-only loss."""

import json

import pytest
import torch
import yaml
from datasets import Dataset
from helpers import WORDS, source_model, tiny_tokenizer
from peft import LoraConfig
from transformers import AutoModelForCausalLM, HfArgumentParser, TrainerCallback

from hf_blockdiff import BlockDiffusionConfig, BlockDiffusionTrainer, block_size_at


def cyclic_text(n=64, length=24):
    """Learnable text: each row counts up through the words from its own start."""
    return Dataset.from_dict({"text": [" ".join(f"w{(s + i) % WORDS}" for i in range(length)) for s in range(n)]})


def config(tmp_path, **overrides):
    defaults = dict(output_dir=str(tmp_path / "out"), max_steps=30, per_device_train_batch_size=8, learning_rate=3e-3,
                    logging_steps=1, block_size=4, report_to=[], save_strategy="no", use_cpu=True, max_length=32,
                    seed=0, dataloader_num_workers=0)  # fmt: skip
    return BlockDiffusionConfig(**{**defaults, **overrides})


class RecordBlockSize(TrainerCallback):
    def __init__(self):
        self.sizes = {}

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.sizes[state.global_step] = model.config.block_size  # after the growth callback ran (added later)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.sizes[state.global_step - 1] = model.config.block_size


def test_loss_decreases_and_both_parts_are_logged(tmp_path):
    args = config(tmp_path, block_growth=False, max_steps=60)
    trainer = BlockDiffusionTrainer(
        source_model("llama"), args=args, train_dataset=cyclic_text(), processing_class=tiny_tokenizer()
    )
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "diffusion_loss" in entry]
    assert all({"ar_loss", "masked_fraction", "block_size", "loss"} <= set(entry) for entry in logs)
    first, last = logs[:5], logs[-5:]
    for key in ("diffusion_loss", "ar_loss"):
        assert sum(e[key] for e in last) < 0.7 * sum(e[key] for e in first), key
    assert all(entry["block_size"] == 4 for entry in logs)
    assert 0.2 < sum(e["masked_fraction"] for e in logs) / len(logs) < 0.8


def test_packing_is_refused():
    with pytest.raises(ValueError, match="packing"):
        BlockDiffusionConfig(output_dir="x", packing=True, report_to=[])


def test_config_from_cli_and_yaml(tmp_path):
    parser = HfArgumentParser(BlockDiffusionConfig)
    (args,) = parser.parse_args_into_dataclasses(
        [
            "--output_dir",
            "o",
            "--block_size",
            "8",
            "--ar_loss_weight",
            "0.25",
            "--complementary_masking",
            "true",
            "--growth_interval_steps",
            "50",
            "--report_to",
            "none",
            "--use_cpu",
            "true",
        ]  # fmt: skip
    )
    assert (args.block_size, args.ar_loss_weight, args.complementary_masking, args.growth_interval_steps) == (
        8,
        0.25,
        True,
        50,
    )
    path = tmp_path / "config.yaml"
    path.write_text(
        yaml.safe_dump(
            {"output_dir": "o", "block_size": 32, "elbo_weighting": True, "report_to": "none", "use_cpu": True}
        )
    )
    (from_yaml,) = parser.parse_yaml_file(str(path))
    assert from_yaml.block_size == 32 and from_yaml.elbo_weighting and from_yaml.ar_loss_weight == 0.5


def test_growth_follows_the_schedule_and_survives_resume(tmp_path):
    schedule = dict(block_size=8, growth_warmup_steps=2, growth_interval_steps=4)
    expected = {s: block_size_at(s, 8, 1, 2, 2, 4) for s in range(16)}

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 7:
                control.should_training_stop = True

    def trainer_with(recorder, *extra, **overrides):
        args = config(
            tmp_path, **{"max_steps": 16, "save_strategy": "steps", "save_steps": 7, **schedule, **overrides}
        )
        return BlockDiffusionTrainer(source_model("llama"), args=args, train_dataset=cyclic_text(),
                                     processing_class=tiny_tokenizer(), callbacks=[recorder, *extra])  # fmt: skip

    straight = RecordBlockSize()
    straight_trainer = trainer_with(straight, output_dir=str(tmp_path / "straight"))
    straight_trainer.train()
    assert straight.sizes == expected

    first = RecordBlockSize()
    trainer_with(first, StopAt()).train()
    checkpoint = tmp_path / "out" / "checkpoint-7"
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    saved = state["stateful_callbacks"]["BlockGrowthCallback"]
    assert saved["args"]["interval_steps"] == 4 and saved["attributes"]["block_size"] == expected[6]
    # Resume with a different schedule on the command line: the checkpoint's schedule wins.
    resumed = RecordBlockSize()
    trainer = trainer_with(resumed, growth_interval_steps=100)
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert {s: b for s, b in resumed.sizes.items() if s >= 7} == {s: b for s, b in expected.items() if s >= 7}
    assert trainer.model.config.block_size == expected[15]

    # A run in pieces is the straight run: same data position, noise (RNG states), optimizer and schedule.
    def losses(t):
        return {e["step"]: e["loss"] for e in t.state.log_history if "loss" in e and e["step"] > 7}

    assert losses(trainer).keys() == losses(straight_trainer).keys() == set(range(8, 17))
    for step, loss in losses(straight_trainer).items():
        assert losses(trainer)[step] == pytest.approx(loss, rel=1e-4), step
    saved_config = json.loads((tmp_path / "straight" / "checkpoint-14" / "config.json").read_text())
    assert saved_config["block_size"] == expected[13]


def test_completion_only_loss_never_touches_the_prompt(tmp_path):
    tok = tiny_tokenizer()
    prompts = [" ".join(f"w{(s * 7 + i) % WORDS}" for i in range(5 + s % 4)) for s in range(16)]
    completions = [" " + " ".join(f"w{(s + i) % WORDS}" for i in range(9 + s % 5)) for s in range(16)]
    data = Dataset.from_dict({"prompt": prompts, "completion": completions})
    trainer = BlockDiffusionTrainer(source_model("llama"), args=config(tmp_path, block_growth=False), train_dataset=data,
                                    processing_class=tok)  # fmt: skip
    batch = next(iter(trainer.get_train_dataloader()))
    ids, am, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    for row, row_labels in zip(ids, labels):
        words = tok.decode(row[row != tok.pad_token_id]).split()
        prompt_len = next(len(p.split()) for p in prompts if words[: len(p.split())] == p.split())
        assert (row_labels[:prompt_len] == -100).all()
        assert (row_labels[prompt_len : len(words)] == row[prompt_len : len(words)]).all()

    noise = trainer.noise(ids, am, labels, 4, generator=torch.Generator().manual_seed(0))
    assert not noise.masked[labels == -100].any() and noise.masked.any()
    model = trainer.model
    with torch.no_grad():
        out = model(
            input_ids=ids, attention_mask=am, labels=labels, noisy_input_ids=noise.noisy_input_ids, block_size=4
        )
        logits = model(input_ids=ids, attention_mask=am).logits.float()
    logits[..., trainer.mask_token_id] = float("-inf")
    targets = labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets.clamp(min=0), reduction="none")
    completion = targets != -100
    torch.testing.assert_close(out.ar_loss, nll[completion].mean())  # the AR loss reads completion tokens only


def test_lora_adapter_trains_mask_row_merges_and_reloads(tmp_path):
    model = source_model("llama", tie_word_embeddings=True)
    embed_before = model.get_input_embeddings().weight.detach().clone()
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = BlockDiffusionTrainer(model, args=config(tmp_path, max_steps=8, learning_rate=1e-2), train_dataset=cyclic_text(),
                                    processing_class=tiny_tokenizer(), peft_config=peft_config)  # fmt: skip
    mask_id = trainer.mask_token_id
    trainer.train()
    trainer.save_model(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()

    merged = trainer.model.merge_and_unload()
    embed = merged.get_input_embeddings().weight.detach()
    assert torch.equal(embed[:mask_id], embed_before[:mask_id])  # every other row untouched
    start = embed_before[:mask_id].mean(0)
    assert not torch.allclose(embed[mask_id], start)  # the mask row learned
    assert merged.get_output_embeddings().weight.data_ptr() == merged.get_input_embeddings().weight.data_ptr()
    merged.save_pretrained(tmp_path / "merged")
    trainer.processing_class.save_pretrained(tmp_path / "merged")

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", trust_remote_code=True)
    assert type(reloaded).__name__ == "BlockDiffusionLlamaForCausalLM"
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, merged(ids).logits)
    # (min_new_tokens: a briefly trained tiny model may well say EOS early; this checks the reload, not its text)
    out = reloaded.generate(ids, max_new_tokens=8, min_new_tokens=8, block_size=4, threshold=0.5)
    assert out.shape == (1, 13)


def test_self_distillation_trains_on_the_models_own_greedy_decoding(tmp_path, monkeypatch):
    tok = tiny_tokenizer()
    prompts = [
        [{"role": "user", "content": " ".join(f"w{(s * 5 + i) % WORDS}" for i in range(3 + s % 3))}] for s in range(6)
    ]
    data = Dataset.from_dict({"prompt": prompts, "completion": [[{"role": "assistant", "content": "w1"}]] * 6})
    source = source_model("llama")
    args = config(tmp_path, self_distillation=True, distillation_max_new_tokens=7, distillation_batch_size=4,
                  max_steps=3, block_size=4)  # fmt: skip
    trainer = BlockDiffusionTrainer(source_model("llama"), args=args, train_dataset=data, processing_class=tok)
    rows = trainer.train_dataset
    assert len(rows) == 6
    for prompt in prompts:
        ids = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        expected = source.generate(torch.tensor([ids]), max_new_tokens=7, do_sample=False, eos_token_id=tok.eos_token_id,
                                   pad_token_id=tok.pad_token_id)[0].tolist()  # fmt: skip
        if tok.eos_token_id in expected[len(ids) :]:
            expected = expected[: len(ids) + expected[len(ids) :].index(tok.eos_token_id) + 1]
        row = next(r for r in rows if r["input_ids"][: len(ids)] == ids)
        assert row["input_ids"] == expected
        assert row["labels"][: len(ids)] == [-100] * len(ids) and row["labels"][len(ids) :] == expected[len(ids) :]
    trainer.train()

    import hf_blockdiff.distill

    monkeypatch.setattr(
        hf_blockdiff.distill, "ar_targets", lambda *a, **k: (_ for _ in ()).throw(AssertionError("regenerated"))
    )
    again = BlockDiffusionTrainer(source_model("llama"), args=args, train_dataset=data, processing_class=tok)
    assert len(again.train_dataset) == 6  # read back from output_dir/self_distillation


@pytest.mark.parametrize("term,setting", [("certainty_loss", "certainty_loss_weight"),
                                          ("soft_label_loss", "soft_label_weight")])  # fmt: skip
def test_an_extra_loss_term_is_logged_when_on(tmp_path, term, setting):
    args = config(tmp_path, block_growth=False, max_steps=3, **{setting: 0.5})
    trainer = BlockDiffusionTrainer(
        source_model("llama"), args=args, train_dataset=cyclic_text(), processing_class=tiny_tokenizer()
    )
    trainer.train()
    assert any(term in entry for entry in trainer.state.log_history)
    with pytest.raises(ValueError, match=f"{setting} must be >= 0"):
        config(tmp_path, **{setting: -0.1})


def test_the_position_decay_reaches_the_diffusion_loss(tmp_path):
    """diffusion_position_decay weights the loss (design 2.7): the same step with and without it logs a different
    diffusion loss, and a smaller one (every weight is at most 1, the divisor stays the count)."""
    losses = {}
    for gamma in (0.0, 1.0):
        args = config(tmp_path / str(gamma), block_growth=False, max_steps=1, logging_steps=1,
                      diffusion_position_decay=gamma)  # fmt: skip
        trainer = BlockDiffusionTrainer(
            source_model("llama"), args=args, train_dataset=cyclic_text(), processing_class=tiny_tokenizer()
        )
        trainer.train()
        losses[gamma] = next(e["diffusion_loss"] for e in trainer.state.log_history if "diffusion_loss" in e)
    assert losses[1.0] < losses[0.0]
    with pytest.raises(ValueError, match="diffusion_position_decay must be >= 0"):
        config(tmp_path, diffusion_position_decay=-1.0)


def test_self_distillation_can_keep_only_trajectories_that_end(tmp_path):
    """distillation_keep_unfinished=False: every target ends with a stop token (the model learns to stop); when
    none does, the error says what to change."""
    tok = tiny_tokenizer()
    prompts = [[{"role": "user", "content": " ".join(f"w{(s * 7 + i) % WORDS}" for i in range(2 + s % 4))}]
               for s in range(12)]  # fmt: skip
    data = Dataset.from_dict({"prompt": prompts, "completion": [[{"role": "assistant", "content": "w1"}]] * 12})
    stops = [tok.eos_token_id, 7, 13, 21]  # common enough in a random model to end some trajectories early

    def trainer(max_new_tokens, name):
        model = source_model("llama")
        model.generation_config.eos_token_id = stops
        args = config(tmp_path, output_dir=str(tmp_path / name), self_distillation=True, max_steps=2, block_size=4,
                      distillation_max_new_tokens=max_new_tokens, distillation_keep_unfinished=False)  # fmt: skip
        return BlockDiffusionTrainer(model, args=args, train_dataset=data, processing_class=tok)

    rows = trainer(12, "some").train_dataset
    assert 0 < len(rows) < 12
    assert all(row["finished"] and row["input_ids"][-1] in stops for row in rows)
    with pytest.raises(ValueError, match="distillation_keep_unfinished"):
        trainer(1, "none")


@pytest.mark.parametrize("scope", ["all", "noisy"])
def test_torch_compile_compiles_the_decoder_layers_and_trains_the_same(tmp_path, scope):
    """``torch_compile=True`` compiles each decoder layer in place (not the whole model, whose two-stream forward
    reads back to the host between its streams) and gives the eager run's losses step for step. The aot_eager
    backend traces forward and backward as inductor would, without a C++ toolchain on the test machine."""
    losses = {}
    for compiled in (False, True):
        args = config(tmp_path / str(compiled), max_steps=4, block_growth=False, adapter_scope=scope,
                      torch_compile=compiled, torch_compile_backend="aot_eager" if compiled else None)  # fmt: skip
        trainer = BlockDiffusionTrainer(source_model("llama"), args=args, train_dataset=cyclic_text(),
                                        processing_class=tiny_tokenizer())  # fmt: skip
        layers = trainer.model.model.layers
        assert all((layer._compiled_call_impl is not None) == compiled for layer in layers)
        assert not isinstance(trainer.model, torch._dynamo.eval_frame.OptimizedModule)
        trainer.train()
        assert trainer.model_wrapped is trainer.model or not isinstance(
            trainer.model_wrapped, torch._dynamo.eval_frame.OptimizedModule
        )  # fmt: skip
        losses[compiled] = [e["diffusion_loss"] for e in trainer.state.log_history if "diffusion_loss" in e]
    assert len(losses[True]) == 4
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)


@pytest.mark.parametrize("checkpointing", [None, True])
def test_training_runs_the_split_layout_unless_activations_are_checkpointed(tmp_path, checkpointing):
    """TRL's SFTConfig checkpoints activations by default; ours does not, so training runs the split layout (one
    forward of the clean stream, one of the noisy copies of the supervised tokens, docs/design.md 2.3). Asking
    for checkpointing gives the joint layout, which stays exact under it."""
    args = config(tmp_path, max_steps=2, block_growth=False, gradient_checkpointing=checkpointing)
    assert bool(args.gradient_checkpointing) == bool(checkpointing)
    trainer = BlockDiffusionTrainer(source_model("llama"), args=args, train_dataset=cyclic_text(),
                                    processing_class=tiny_tokenizer())  # fmt: skip
    layouts = []
    model = trainer.model
    run = model.two_stream_hidden_states

    def spy(*args, **kwargs):
        layouts.append(args[6] if len(args) > 6 else kwargs.get("layout"))
        return run(*args, **kwargs)

    model.two_stream_hidden_states = spy
    trainer.train()
    assert layouts == ["joint" if checkpointing else "split"] * 2


def test_compiled_layers_do_not_recompile_for_new_lengths(tmp_path):
    """Batch lengths change every step; the compiled layers are dynamic from the first call, so after the first
    step no graph is added (a length-specialised graph per step would soon exhaust dynamo's recompile budget,
    past which it runs layers uncompiled)."""
    import random

    rng = random.Random(0)
    data = Dataset.from_dict({"text": [" ".join(f"w{(s + i) % WORDS}" for i in range(rng.randint(6, 40)))
                                       for s in range(48)]})  # fmt: skip
    args = config(tmp_path, max_steps=6, block_growth=False, adapter_scope="noisy", torch_compile=True,
                  torch_compile_backend="aot_eager", max_length=48, per_device_train_batch_size=4)  # fmt: skip
    torch._dynamo.reset()
    graphs, lengths = [], set()

    class CountGraphs(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])

    trainer = BlockDiffusionTrainer(source_model("llama"), args=args, train_dataset=data,
                                    processing_class=tiny_tokenizer(), callbacks=[CountGraphs()])  # fmt: skip
    for batch in trainer.get_train_dataloader():
        lengths.add(batch["input_ids"].shape[1])
    assert len(lengths) > 3
    trainer.train()
    assert len(graphs) == 6 and graphs[0] > 0
    assert graphs[-1] == graphs[0]
