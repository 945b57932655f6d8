"""Conversion in memory and directory to directory: mask token, classes, config, atomic writes, bad input."""

import hashlib
import json
from pathlib import Path

import pytest
import torch
from helpers import VOCAB, source_model, tiny_tokenizer
from transformers import AutoModelForCausalLM, GPT2Config

import hf_blockdiff
from hf_blockdiff import convert as convert_module
from hf_blockdiff.hub import PORTABLE_FILES


def saved_source(tmp_path, arch="llama", **overrides):
    src = tmp_path / "src"
    model = source_model(arch, **overrides)
    model.save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    return src, model


def tree_digest(path: Path) -> dict:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("tied", [False, True])
def test_new_mask_token_starts_at_mean_row(tied):
    source = source_model("llama", tie_word_embeddings=tied)
    tok = tiny_tokenizer()
    real = len(tok)
    embed_before = source.get_input_embeddings().weight[:real].clone()
    head_before = source.get_output_embeddings().weight[:real].clone()
    model, tok = hf_blockdiff.convert_model(source, tok, block_size=4)
    mask_id = model.config.mask_token_id
    assert tok.mask_token == "<|mask|>" and mask_id == real == tok.convert_tokens_to_ids("<|mask|>")
    assert type(model).__name__ == "BlockDiffusionLlamaForCausalLM" and model.config.block_size == 4
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    torch.testing.assert_close(embed[mask_id], embed_before.mean(0))
    torch.testing.assert_close(head[mask_id], head_before.mean(0))
    torch.testing.assert_close(embed[:real], embed_before, rtol=0, atol=0)
    assert (embed.data_ptr() == head.data_ptr()) == tied
    assert model.generation_config.block_size == 4 and model.generation_config.threshold == 0.9


def test_existing_mask_token_is_reused_untouched():
    source = source_model("gemma3_text", vocab_size=VOCAB + 8)  # <mask> is a trained row, as in Gemma
    tok = tiny_tokenizer()
    tok.add_special_tokens({"mask_token": "<mask>"})
    mask_id = tok.mask_token_id
    row = source.get_input_embeddings().weight[mask_id].clone()  # in the (padded) vocabulary already
    model, tok2 = hf_blockdiff.convert_model(source, tok, block_size=2)
    assert model.config.mask_token_id == mask_id and len(tok2) == len(tok)
    torch.testing.assert_close(model.get_input_embeddings().weight[mask_id], row, rtol=0, atol=0)


def test_spare_embedding_rows_are_used_without_resizing():
    source = source_model("qwen2", vocab_size=VOCAB + 16)  # padded vocabulary, as Qwen ships it
    tok = tiny_tokenizer()
    model, tok = hf_blockdiff.convert_model(source, tok)
    assert model.config.vocab_size == VOCAB + 16
    weight = model.get_input_embeddings().weight
    torch.testing.assert_close(weight[model.config.mask_token_id], weight[: model.config.mask_token_id].mean(0))


def test_unsupported_architecture_names_supported_ones():
    model = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=VOCAB))
    with pytest.raises(ValueError, match=r"'gpt2' is not supported.*llama.*qwen2"):
        hf_blockdiff.convert_model(model, tiny_tokenizer())


def test_bad_block_size_and_flash_attention_are_refused():
    with pytest.raises(ValueError, match="block_size"):
        hf_blockdiff.convert_model(source_model("llama"), tiny_tokenizer(), block_size=0)
    model = source_model("llama")
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="flash_attention_2.*sdpa"):
        hf_blockdiff.convert_model(model, tiny_tokenizer())


def test_convert_checkpoint_writes_complete_folder_and_keeps_source(tmp_path):
    src, source = saved_source(tmp_path, "qwen3")
    before = tree_digest(src)
    dst = hf_blockdiff.convert_checkpoint(src, tmp_path / "dst", block_size=8)
    assert tree_digest(src) == before
    files = {p.name for p in dst.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "README.md",
            *PORTABLE_FILES} <= files  # fmt: skip
    assert {name for name in files if name.endswith(".py")} == set(PORTABLE_FILES)  # the list is complete
    assert not any(name.endswith(".bin") for name in files)
    config = json.loads((dst / "config.json").read_text())
    assert config["model_type"] == "qwen3"
    assert config["auto_map"] == {"AutoModelForCausalLM": "modeling_blockdiff.BlockDiffusionQwen3ForCausalLM"}
    assert config["block_size"] == 8 and config["mask_token_id"] == VOCAB + 3
    assert json.loads((dst / "generation_config.json").read_text())["block_size"] == 8
    card = (dst / "README.md").read_text()
    assert card.startswith("---\n") and "block-diffusion" in card and "trust_remote_code=True" in card
    assert not list(tmp_path.glob(".dst.tmp-*"))


def test_destination_rules(tmp_path):
    src, _ = saved_source(tmp_path)
    before = tree_digest(src)
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="overwrite"):
        hf_blockdiff.convert_checkpoint(src, dst)
    assert (dst / "keep.txt").read_text() == "precious"
    hf_blockdiff.convert_checkpoint(src, dst, overwrite=True)
    assert not (dst / "keep.txt").exists() and (dst / "config.json").is_file()
    with pytest.raises(ValueError, match="overlaps the source"):
        hf_blockdiff.convert_checkpoint(src, src / "inside", overwrite=True)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        hf_blockdiff.convert_checkpoint(tmp_path / "missing", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        hf_blockdiff.convert_checkpoint(tmp_path / "empty", tmp_path / "out2")
    with pytest.raises(ValueError, match="block_size"):
        hf_blockdiff.convert_checkpoint(src, tmp_path / "out3", block_size=0)
    assert tree_digest(src) == before
    assert not any((tmp_path / name).exists() for name in ("out", "out2", "out3"))


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_failed_write_leaves_nothing_behind(tmp_path, monkeypatch, error):
    src, _ = saved_source(tmp_path)

    def half_written(model, tokenizer, directory, card_info=None):
        (Path(directory) / "config.json").write_text("{}")
        raise error

    monkeypatch.setattr(convert_module, "save_block_diffusion", half_written)
    with pytest.raises(type(error)):
        hf_blockdiff.convert_checkpoint(src, tmp_path / "dst")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_failed_overwrite_keeps_the_old_destination(tmp_path, monkeypatch):
    src, _ = saved_source(tmp_path)
    dst = hf_blockdiff.convert_checkpoint(src, tmp_path / "dst")
    before = tree_digest(dst)
    monkeypatch.setattr(convert_module, "save_block_diffusion", lambda *a, **k: (_ for _ in ()).throw(OSError("boom")))
    with pytest.raises(OSError):
        hf_blockdiff.convert_checkpoint(src, dst, overwrite=True)
    assert tree_digest(dst) == before
