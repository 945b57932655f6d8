"""Self-distillation targets are cached per model: a different model (or weights, prompts, settings) never reuses
another's targets, and the same model finds its own."""

import torch
from datasets import Dataset
from helpers import WORDS, source_model, tiny_tokenizer

import hf_blockdiff.distill
from hf_blockdiff import BlockDiffusionConfig, BlockDiffusionTrainer
from hf_blockdiff.distill import cache_key

PROMPTS = [
    [{"role": "user", "content": " ".join(f"w{(s * 5 + i) % WORDS}" for i in range(3 + s % 3))}] for s in range(4)
]
SETTINGS = dict(max_new_tokens=6, temperature=0.0, samples=1, seed=0)


def test_cache_key_names_the_model_its_weights_the_prompts_and_the_settings():
    tok = tiny_tokenizer()
    key = cache_key(source_model("llama", seed=0), tok, PROMPTS, **SETTINGS)
    assert cache_key(source_model("llama", seed=0), tok, PROMPTS, **SETTINGS) == key  # same model, new instance
    assert cache_key(source_model("llama", seed=1), tok, PROMPTS, **SETTINGS) != key  # other weights
    assert cache_key(source_model("mistral", seed=0), tok, PROMPTS, **SETTINGS) != key  # other architecture
    assert cache_key(source_model("llama", seed=0, num_hidden_layers=3), tok, PROMPTS, **SETTINGS) != key
    assert cache_key(source_model("llama", seed=0), tok, PROMPTS[:3], **SETTINGS) != key
    assert cache_key(source_model("llama", seed=0), tok, PROMPTS, **(SETTINGS | {"max_new_tokens": 7})) != key
    tuned = source_model("llama", seed=0)
    with torch.no_grad():  # a small update of one layer, as a few training steps would make
        tuned.model.layers[1].mlp.down_proj.weight.mul_(1.001)
    assert cache_key(tuned, tok, PROMPTS, **SETTINGS) != key
    renamed = source_model("llama", seed=0)
    renamed.config._name_or_path = "someone/other-model"
    assert cache_key(renamed, tok, PROMPTS, **SETTINGS) != key
    grown = source_model("llama", seed=0)
    grown.config.block_size = 8  # the growth schedule changes it; AR targets do not depend on it
    assert cache_key(grown, tok, PROMPTS, **SETTINGS) == key


def test_trainer_regenerates_targets_for_another_model_and_reuses_its_own(tmp_path, monkeypatch):
    tok = tiny_tokenizer()
    data = Dataset.from_dict({"prompt": PROMPTS, "completion": [[{"role": "assistant", "content": "w1"}]] * 4})
    args = BlockDiffusionConfig(output_dir=str(tmp_path), self_distillation=True, distillation_max_new_tokens=6,
                                distillation_batch_size=4, block_size=4, max_steps=1, report_to=[], use_cpu=True,
                                save_strategy="no", max_length=32)  # fmt: skip
    calls = []
    real = hf_blockdiff.distill.ar_targets
    monkeypatch.setattr(hf_blockdiff.distill, "ar_targets", lambda *a, **k: calls.append(1) or real(*a, **k))

    def targets(seed):
        trainer = BlockDiffusionTrainer(source_model("llama", seed=seed), args=args, train_dataset=data,
                                        processing_class=tok)  # fmt: skip
        return sorted(trainer.train_dataset["input_ids"])

    first = targets(0)
    other = targets(1)
    assert len(calls) == 2  # the second model decoded its own targets
    assert other != first  # and they are its own (different random weights decode differently)
    assert targets(0) == first and targets(1) == other
    assert len(calls) == 2  # both read back from the cache
    assert len(list((tmp_path / "self_distillation").iterdir())) == 2
