"""Multi-turn conversations through the trainer: every assistant turn starts its own block grid, as at inference
where each turn is generated after its history has been prefilled (docs/design.md 2.3)."""

import torch
from datasets import Dataset
from helpers import WORDS, source_model, tiny_tokenizer

from hf_blockdiff import BlockDiffusionConfig, BlockDiffusionTrainer
from hf_blockdiff.masks import block_grid

# The test tokenizer's template with generation markers, so TRL can build the assistant-only loss mask.
TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}<assistant> {% generation %}{{ m['content'] }} <eos> "
    "{% endgeneration %}{% else %}<{{ m['role'] }}> {{ m['content'] }} <eos> {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<assistant> {% endif %}"
)


def words(start, n):
    return " ".join(f"w{(start + i) % WORDS}" for i in range(n))


def runs(row):
    """(start, end) of every run of supervised labels."""
    supervised = (row != -100).tolist() + [False]
    starts = [j for j in range(len(row)) if supervised[j] and (j == 0 or not supervised[j - 1])]
    return [(s, next(e for e in range(s, len(supervised)) if not supervised[e])) for s in starts]


def assistant_mask(tok, ids):
    """1 from the token after each `<assistant>` through its `<eos>`."""
    start, end = tok.convert_tokens_to_ids(["<assistant>", "<eos>"])
    mask, inside = [], False
    for token in ids:
        mask.append(int(inside))
        inside = token == start or (inside and token != end)
    return mask


def test_every_assistant_turn_starts_a_block_and_context_between_turns_is_never_masked(tmp_path):
    tok = tiny_tokenizer()
    tok.chat_template = TEMPLATE
    conversations = [
        [{"role": "user", "content": words(s, 3 + s % 3)}, {"role": "assistant", "content": words(s + 7, 5 + s % 4)},
         {"role": "user", "content": words(s + 3, 2 + s % 2)}, {"role": "assistant", "content": words(s + 1, 6 + s % 5)}]
        for s in range(8)
    ]  # fmt: skip
    args = BlockDiffusionConfig(output_dir=str(tmp_path), assistant_only_loss=True, block_size=4, block_growth=False,
                                max_steps=2, per_device_train_batch_size=8, report_to=[], use_cpu=True,
                                save_strategy="no", max_length=64, dataloader_num_workers=0)  # fmt: skip
    trainer = BlockDiffusionTrainer(source_model("llama"), args=args, processing_class=tok,
                                    train_dataset=Dataset.from_dict({"messages": conversations}))  # fmt: skip

    # Labels rebuilt from the tokens: transformers 5.17's return_assistant_tokens_mask marks everything from the
    # first assistant turn on, user turns included (fixed in later releases).
    def relabel(example):
        mask = assistant_mask(tok, example["input_ids"])
        return {"labels": [t if m else -100 for t, m in zip(example["input_ids"], mask)]}

    trainer.train_dataset = trainer.train_dataset.map(relabel)
    batch = next(iter(trainer.get_train_dataloader()))
    ids, am, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    blocks, offsets = block_grid(4, am, labels)
    for r in range(ids.shape[0]):
        turns = runs(labels[r])
        assert len(turns) == 2, tok.decode(ids[r])  # two assistant turns, a user turn between them
        for start, end in turns:
            assert offsets[r, start] == 0  # each turn's first token is an AR step: a block-first token
            assert offsets[r, start:end].tolist() == [j % 4 for j in range(end - start)]
        between = slice(turns[0][1], turns[1][0])
        assert (offsets[r, between] == -1).all()  # the user turn is context: one-token blocks
        assert (blocks[r, 1:] > blocks[r, :-1]).sum() == (offsets[r, 1:] <= 0).sum()  # ids grow at each new unit
    for seed in range(5):
        noise = trainer.noise(ids, am, labels, 4, generator=torch.Generator().manual_seed(seed))
        assert not noise.masked[(labels == -100) | (offsets == 0)].any() and noise.masked.any()
    trainer.train()  # the two-stream forward runs on these layouts
    assert all(
        torch.isfinite(torch.tensor(e["diffusion_loss"])) for e in trainer.state.log_history if "diffusion_loss" in e
    )
