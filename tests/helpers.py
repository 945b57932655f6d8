"""Shared test helpers: tiny tokenizer and models, and reference implementations written independently of
``hf_blockdiff.masks`` (plain loops over the rules of docs/design.md 2.3), so tests compare two implementations."""

from __future__ import annotations

import copy
import hashlib
import os

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    DynamicCache,
    Gemma2Config,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Olmo2Config,
    Phi3Config,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

import hf_blockdiff

WORDS = 60
EOS, PAD, UNK = 61, 62, 60
VOCAB = 63  # tokenizer size before conversion; the mask token becomes id 63
WINDOW = 4

CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} <eos> {% endfor %}"
    "{% if add_generation_prompt %}<assistant> {% endif %}"
)


def tiny_tokenizer():
    vocab = {f"w{i}": i for i in range(WORDS)}
    vocab.update({"<unk>": UNK, "<eos>": EOS, "<pad>": PAD})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>", pad_token="<pad>")
    tok.add_special_tokens({"additional_special_tokens": ["<user>", "<assistant>", "<system>"]})
    tok.chat_template = CHAT_TEMPLATE
    return tok


COMMON = dict(
    vocab_size=VOCAB + 3,  # the 3 role tokens
    hidden_size=64,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    initializer_range=0.2,  # peaky logits: greedy decoding has no near-ties to flip on rounding
    eos_token_id=EOS,
    pad_token_id=PAD,
    bos_token_id=None,
    tie_word_embeddings=False,
)

# Sliding windows are tiny so that they matter on 12-16 token tests.
ARCHS = {
    "llama": (LlamaConfig, {}),
    "mistral": (MistralConfig, {"sliding_window": WINDOW, "head_dim": 16}),
    "qwen2": (Qwen2Config, {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1}),
    "qwen3": (Qwen3Config, {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1, "head_dim": 16}),
    "gemma2": (Gemma2Config, {"sliding_window": WINDOW, "head_dim": 16, "query_pre_attn_scalar": 16,
                              "attn_logit_softcapping": None, "final_logit_softcapping": 30.0}),
    "gemma3_text": (Gemma3TextConfig, {"sliding_window": WINDOW, "head_dim": 16, "query_pre_attn_scalar": 16,
                                       "layer_types": ["sliding_attention", "full_attention"],
                                       "final_logit_softcapping": 30.0}),
    "phi3": (Phi3Config, {"sliding_window": WINDOW}),
    "olmo2": (Olmo2Config, {}),
}  # fmt: skip


# The suite runs on CPU in CI; on a GPU machine set HF_BLOCKDIFF_TEST_DEVICE=cuda (and ..._DTYPE=bfloat16) to
# run the same tests there, flex attention included.
DEVICE = torch.device(os.environ.get("HF_BLOCKDIFF_TEST_DEVICE", "cpu"))
DTYPE = getattr(torch, os.environ.get("HF_BLOCKDIFF_TEST_DTYPE", "float32"))
TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2}[DTYPE]
# Backends each stock architecture offers (Gemma2 has no sdpa path in transformers).
BACKENDS = {arch: ("sdpa", "eager") for arch in ARCHS} | {"gemma2": ("eager",)}
if DEVICE.type == "cuda":
    BACKENDS = {arch: backends + ("flex_attention",) for arch, backends in BACKENDS.items()}
ARCH_BACKENDS = [(arch, backend) for arch in ARCHS for backend in BACKENDS[arch]]


def tiny_config(arch: str, **overrides):
    config_cls, extra = ARCHS[arch]
    kwargs = {**COMMON, **extra, **overrides}
    if arch == "gemma3_text":
        kwargs["tie_word_embeddings"] = overrides.get("tie_word_embeddings", True)
    return config_cls(**kwargs)


def source_model(arch: str, attn: str | None = None, seed: int = 0, **overrides):
    attn = attn or BACKENDS[arch][0]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides), attn_implementation=attn)
    return model.to(DEVICE, DTYPE).eval()


def converted_pair(arch: str, attn: str | None = None, block_size: int = 4, seed: int = 0, **overrides):
    """(source, converted, tokenizer): the same weights, the converted one a separate copy."""
    source = source_model(arch, attn, seed, **overrides)
    model, tok = hf_blockdiff.convert_model(copy.deepcopy(source), tiny_tokenizer(), block_size=block_size)
    return source, model.eval(), tok


def layer_windows(config) -> list[int | None]:
    """Window of every layer, read off the config the way each architecture documents it."""
    cfg = config.get_text_config(decoder=True)
    types = getattr(cfg, "layer_types", None)
    if types is None:
        return [getattr(cfg, "sliding_window", None)] * cfg.num_hidden_layers
    return [cfg.sliding_window if t == "sliding_attention" else None for t in types]


# ----------------------------------------------------------------------------------------------------------
# Reference specification of the training mask (loops, no tensors)


def grid_keys(labels_row, valid_row, block_size):
    """Per position: (first position of its block, supervised?). Every run of supervised tokens starts a fresh
    grid at its first token; any other token is a block of its own. Tuple order = block order."""
    supervised = [lab != -100 for lab in labels_row] if labels_row is not None else [bool(v) for v in valid_row]
    keys = []
    for j, sup in enumerate(supervised):
        if not sup:
            keys.append((j, False))
            continue
        run_start = j
        while run_start > 0 and supervised[run_start - 1]:
            run_start -= 1
        keys.append((run_start + (j - run_start) // block_size * block_size, True))
    return keys


def spec_allowed(keys, valid, pos, copies, window):
    """allowed[q][k] over the layout [x_t^1; ..; x_t^S; x] of one row, straight from docs/design.md 2.3."""
    length = len(keys)
    n = (copies + 1) * length
    allowed = [[False] * n for _ in range(n)]
    for q in range(n):
        qs, qt = divmod(q, length)  # (stream, token); stream == copies is the clean copy
        for k in range(n):
            ks, kt = divmod(k, length)
            if q == k:
                allowed[q][k] = True
            elif not valid[kt] or (window is not None and pos[qt] - pos[kt] >= window):
                allowed[q][k] = False
            elif qs == copies:  # clean query: token-causal over the clean copy
                allowed[q][k] = ks == copies and kt <= qt
            elif ks == copies:  # noisy query, clean key: earlier blocks only (context = one-token blocks)
                allowed[q][k] = keys[kt] < keys[qt]
            else:  # noisy query, noisy key: same copy, same block
                allowed[q][k] = ks == qs and keys[kt] == keys[qt]
    return allowed


def spec_influence(keys, valid, pos, copies, windows):
    """infl[q][k]: can the input token at k change the output at q through the layers (mask per layer)?"""
    n = (copies + 1) * len(keys)
    infl = [[q == k for k in range(n)] for q in range(n)]
    for window in windows:
        allowed = spec_allowed(keys, valid, pos, copies, window)
        infl = [[any(allowed[q][j] and infl[j][k] for j in range(n)) for k in range(n)] for q in range(n)]
    return infl


# ----------------------------------------------------------------------------------------------------------
# Reference forwards


def reference_block_mask(prefix_valid, prefix_pos, block_pos, window, backend, dtype):
    """(1, 1, n, P + n) mask of a block that sees the whole (valid) prefix and itself, within the window."""
    valid = list(prefix_valid) + [True] * len(block_pos)
    pos = list(prefix_pos) + list(block_pos)
    rows = []
    for qp in block_pos:
        rows.append([valid[k] and (window is None or qp - pos[k] < window) for k in range(len(pos))])
    mask = torch.tensor(rows, device=DEVICE).view(1, 1, len(block_pos), len(pos))
    if backend in ("eager", "flex_attention"):  # transformers adds a dense mask to the scores for both
        return torch.where(mask, torch.zeros((), dtype=dtype, device=DEVICE), torch.finfo(dtype).min)
    return mask


def reference_block_hidden(model, prefix_ids, prefix_valid, prefix_pos, block_ids, block_pos):
    """Hidden states of a block run against a causal prefill of its prefix: the slow, obvious way."""
    cache = DynamicCache()
    if len(prefix_ids):
        model(
            input_ids=torch.tensor([prefix_ids], device=DEVICE),
            attention_mask=torch.tensor([prefix_valid], device=DEVICE).long(),
            position_ids=torch.tensor([prefix_pos], device=DEVICE),
            past_key_values=cache,
            use_cache=True,
        )
    backend = model.config._attn_implementation
    cfg = model.config.get_text_config(decoder=True)
    if model._mask_per_layer_type:
        windows = {t: cfg.sliding_window if t == "sliding_attention" else None for t in set(cfg.layer_types)}
    else:
        windows = {None: getattr(cfg, "sliding_window", None)}
    masks = {
        t: reference_block_mask(prefix_valid, prefix_pos, block_pos, w, backend, model.dtype)
        for t, w in windows.items()
    }
    mask = masks[None] if None in masks else masks
    return model.model(
        input_ids=torch.tensor([block_ids], device=DEVICE),
        attention_mask=mask,
        position_ids=torch.tensor([block_pos], device=DEVICE),
        past_key_values=cache,
        use_cache=True,
    ).last_hidden_state[0]


def padded_batch(lengths, left=True, seed=0, low=0, high=WORDS):
    """Random word ids with padding: (input_ids, attention_mask)."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), PAD)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for r, n in enumerate(lengths):
        row = torch.randint(low, high, (n,), generator=g)
        sl = slice(width - n, width) if left else slice(0, n)
        ids[r, sl], mask[r, sl] = row, 1
    return ids.to(DEVICE), mask.to(DEVICE)


def convert_tiny_checkpoint(path, arch: str = "qwen2"):
    """Convert a tiny model into the folder ``path`` (weights, code, tokenizer) and return what the in-memory
    model gives, the reference a reloaded copy must reproduce: ``(ids, logits, sequences, forwards)``."""
    model, tok = hf_blockdiff.convert_model(source_model(arch), tiny_tokenizer(), block_size=4)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    ids, _ = padded_batch([9, 9], seed=4)
    with torch.no_grad():
        logits = model(ids).logits
    gen = model.generate(ids[:, :5], max_new_tokens=8, block_size=4, threshold=0.5, return_dict_in_generate=True)
    return ids, logits, gen.sequences, gen.num_forward_passes


def weights_digest(model) -> str:
    """sha256 of every parameter's exact values, in name order."""
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        digest.update(name.encode())
        digest.update(param.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()
