"""The LoRA adapter shipped in the package (smollm2-bd16, trained by benchmarks/proof_smollm2.py) on the real
SmolLM2-135M-Instruct: it loads, applies, decodes several tokens per forward with readable text, and survives
merging into a trust_remote_code checkpoint."""

import copy
import math
import re
import warnings

import pytest
import torch

import hf_blockdiff
from hf_blockdiff import cli
from hf_blockdiff.convert import ADAPTERS_DIR, apply_adapter, resolve_adapter

pytestmark = pytest.mark.slow

ADAPTER = "smollm2-bd16"
PROMPTS = ["Give me three tips for staying healthy.", "How do I reverse a list in Python?"]


@pytest.fixture(scope="module")
def source():
    return hf_blockdiff.load_source("smollm2")


@pytest.fixture(scope="module")
def adapted(source):
    model, tok = hf_blockdiff.convert_model(copy.deepcopy(source[0]), copy.deepcopy(source[1]), block_size=16)
    plain_embeddings = model.get_input_embeddings().weight.detach().clone()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merged = apply_adapter(model, ADAPTER).eval()
    # loading our own adapter prints nothing about deprecated names (peft's is_gradient_checkpointing read)
    assert not [w for w in caught if issubclass(w.category, FutureWarning)], [str(w.message) for w in caught]
    return merged, tok, plain_embeddings


def test_shipped_adapter_fits_and_resolves():
    path = resolve_adapter(ADAPTER)
    assert path == ADAPTERS_DIR / ADAPTER and (path / "adapter_config.json").is_file()
    assert sum(f.stat().st_size for f in path.iterdir()) < 16 * 2**20
    with pytest.raises(FileNotFoundError, match="smollm2-bd16"):
        resolve_adapter("no-such-adapter")


def test_adapter_trained_the_mask_row_only_among_embeddings(adapted):
    model, tok, plain = adapted
    merged = model.get_input_embeddings().weight
    mask_id = model.config.mask_token_id
    assert torch.equal(merged[:mask_id], plain[:mask_id])
    assert not torch.allclose(merged[mask_id], plain[mask_id])
    assert model.get_output_embeddings().weight.data_ptr() == merged.data_ptr()  # still tied


def source_perplexity(source_model, sequence, new_tokens):
    with torch.no_grad():
        logits = source_model(sequence[None]).logits[0, :-1]
    logp = logits.log_softmax(-1).gather(-1, sequence[1:, None]).squeeze(-1)[-new_tokens:]
    return math.exp(-logp.mean().item())


def test_parallel_decoding_is_faster_per_forward_and_readable(source, adapted):
    model, tok, _ = adapted
    tokens = forwards = 0
    for prompt in PROMPTS:
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)  # fmt: skip
        out = model.generate(**ids, max_new_tokens=128, block_size=16, threshold=0.9, return_dict_in_generate=True)
        n = int(out.num_generated_tokens[0])
        new = out.sequences[0, ids["input_ids"].shape[1] :][:n]
        tokens, forwards = tokens + n, forwards + out.num_forward_passes
        text = tok.decode(new, skip_special_tokens=True)
        assert n >= 32, text
        # readable: the source model finds it likely, it is mostly letters, and it does not loop
        assert source_perplexity(source[0], out.sequences[0, : ids["input_ids"].shape[1] + n], n) < 6, text
        assert sum(c.isalpha() or c.isspace() for c in text) / len(text) > 0.7, text
        bigrams = [tuple(new[i : i + 2].tolist()) for i in range(n - 1)]
        assert len(set(bigrams)) / len(bigrams) > 0.5, text
    assert tokens / forwards > 1.1  # measured ~1.25 on CPU fp32 for these prompts


def test_block_size_1_keeps_the_answer(adapted):
    model, tok, _ = adapted
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)  # fmt: skip
    out = model.generate(**ids, max_new_tokens=16, block_size=1)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1] :])


def test_cli_merges_the_adapter_into_a_remote_code_checkpoint(tmp_path, capsys):
    """The README's main command: validation reloads the merged result through trust_remote_code in a process
    where hf_blockdiff cannot be imported and compares it with the merged model in memory."""
    dst = tmp_path / "smollm2-bd16"
    code = cli.main(["convert", "smollm2", str(dst), "--adapter", ADAPTER, "--block-size", "16"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "validation:  loaded as BlockDiffusionLlamaForCausalLM via trust_remote_code without hf_blockdiff" in out
    assert f"adapter:     {ADAPTER} (merged)" in out
    assert ADAPTER in (dst / "README.md").read_text()
    svg = tmp_path / "decoding.svg"
    code = cli.main(["generate", str(dst), PROMPTS[0], "--chat", "--threshold", "0.9", "--max-new-tokens", "64",
                     "--visualize", str(svg)])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err
    tpf = float(re.search(r"([\d.]+) tokens per forward", err).group(1))
    assert tpf > 1.0 and out.strip()
    assert svg.read_text().startswith("<svg")


def test_verified_decoding_is_the_block_size_1_output_in_fewer_forwards(adapted):
    """verify=True drafts each block in one step and keeps what the causal logits agree with: the greedy
    block-size-1 output, token for token, and (with this adapter) more than one token per forward."""
    model, tok, _ = adapted
    tok.padding_side = "left"
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
             for p in PROMPTS]  # fmt: skip
    ids = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    kwargs = dict(max_new_tokens=48, return_dict_in_generate=True)
    ar = model.generate(**ids, block_size=1, **kwargs)
    verified = model.generate(**ids, block_size=16, verify=True, **kwargs)
    assert torch.equal(verified.sequences, ar.sequences)
    tpf = verified.num_generated_tokens.float() / verified.row_forward_passes
    assert (tpf > 1.0).all(), tpf  # the CPU prototype measured 1.32 at block 16
