# Copyright 2026 The hf_blockdiff authors. Apache-2.0.
"""Self-distillation: training targets from the source model's own autoregressive decoding.

Parallel decoding needs the model to be confident about several masked tokens at once. Human text is too
uncertain for a small model to get there; the source model's own greedy (or low-temperature) continuations
are near-deterministic given their context, which is what makes confident parallel denoising learnable.

:func:`ar_targets` decodes prompts with the model at block size 1 (exactly the AR model) and returns the exact
token trajectories (``input_ids``, ``labels`` with the prompt masked), so no re-tokenization can shift them.
``BlockDiffusionTrainer`` runs it itself with ``BlockDiffusionConfig(self_distillation=True)``.
"""

from __future__ import annotations

import hashlib
import json

import torch
from datasets import Dataset
from tqdm.auto import tqdm
from transformers.utils import logging

from .masks import IGNORE_INDEX

logger = logging.get_logger(__name__)


def prompts_from(dataset: Dataset) -> list:
    """Prompts of a dataset: its ``prompt`` column (text or messages), or each conversation's messages before
    the first assistant turn (``messages``)."""
    if "prompt" in dataset.column_names:
        return list(dataset["prompt"])
    if "messages" in dataset.column_names:
        prompts = []
        for messages in dataset["messages"]:
            head = []
            for message in messages:
                if message["role"] == "assistant":
                    break
                head.append(message)
            if head:
                prompts.append(head)
        return prompts
    raise ValueError("Self-distillation needs prompts: a 'prompt' or 'messages' column in the dataset.")


def weights_fingerprint(model, samples: int = 256) -> str:
    """A cheap checksum of the weights: name, shape, dtype and ``samples`` evenly strided values of every
    parameter (exact bytes, so the same on any device). Any training or a different checkpoint changes it."""
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        flat = param.detach().reshape(-1)
        picked = flat[:: max(1, flat.numel() // samples)][:samples]
        digest.update(f"{name}{tuple(param.shape)}{param.dtype}".encode())
        digest.update(picked.float().cpu().numpy().tobytes())
    return digest.hexdigest()


def cache_key(model, tokenizer, prompts: list, **settings) -> str:
    """Key of a set of self-distillation targets: which model decodes them (``name_or_path``, config without the
    block size a growth schedule changes, weights fingerprint), the tokenizer that encodes the prompts, the
    prompts themselves and the decoding ``settings``. Any change gives a new key, so targets are never reused
    for another model."""
    config = {k: v for k, v in model.config.to_diff_dict().items() if k not in ("block_size", "transformers_version")}
    identity = {
        "model": getattr(model.config, "_name_or_path", "") or "",
        "config": config,
        "weights": weights_fingerprint(model),
        "tokenizer": [getattr(tokenizer, "name_or_path", ""), len(tokenizer), tokenizer.chat_template],
        "prompts": hashlib.sha256(json.dumps(prompts, sort_keys=True, default=str).encode()).hexdigest(),
        "settings": settings,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def encode_prompt(tokenizer, prompt) -> list[int]:
    if isinstance(prompt, str):
        return tokenizer(prompt, add_special_tokens=True)["input_ids"]
    return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)[
        "input_ids"
    ]


@torch.no_grad()
def ar_targets(model, tokenizer, prompts: list, max_new_tokens: int = 256, batch_size: int = 64,
               samples_per_prompt: int = 1, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
               max_prompt_length: int = 512, keep_unfinished: bool = True, **generate_kwargs) -> Dataset:  # fmt: skip
    """Decode every prompt autoregressively (greedy at ``temperature=0``) and return the trajectories.

    Columns: ``input_ids`` (prompt + generated tokens, EOS included when produced), ``labels`` (the prompt set
    to -100) and ``finished`` (whether decoding ended with EOS rather than at ``max_new_tokens``).
    Prompts longer than ``max_prompt_length`` tokens are skipped. ``generate_kwargs`` go to ``model.generate``.
    """
    encoded = [ids for ids in (encode_prompt(tokenizer, p) for p in prompts) if len(ids) <= max_prompt_length]
    if not encoded:
        raise ValueError(f"No prompt fits in max_prompt_length={max_prompt_length} tokens.")
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # similar lengths batch with little padding
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = model.generation_config.eos_token_id
    eos = set([eos] if isinstance(eos, int) else (eos or [])) | {tokenizer.eos_token_id}
    sampling = temperature > 0
    extra = ({"block_size": 1} if hasattr(model, "two_stream_hidden_states") else {}) | generate_kwargs
    if sampling:
        extra |= {"do_sample": True, "temperature": temperature, "top_p": top_p}
        torch.manual_seed(seed)

    rows = {"input_ids": [], "labels": [], "finished": []}
    for _ in range(samples_per_prompt if sampling else 1):
        for start in tqdm(range(0, len(order), batch_size), desc="Self-distillation targets", unit="batch"):
            batch = [encoded[i] for i in order[start : start + batch_size]]
            width = max(map(len, batch))
            ids = torch.tensor([[pad] * (width - len(b)) + b for b in batch], device=model.device)
            mask = torch.tensor([[0] * (width - len(b)) + [1] * len(b) for b in batch], device=model.device)
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 pad_token_id=pad, eos_token_id=sorted(eos), **extra)  # fmt: skip
            out = out.sequences if hasattr(out, "sequences") else out
            for prompt, new in zip(batch, out[:, width:].tolist()):
                end = next((i + 1 for i, t in enumerate(new) if t in eos), None)
                if end is None and not keep_unfinished:
                    continue
                new = new[:end] if end is not None else new
                rows["input_ids"].append(prompt + new)
                rows["labels"].append([IGNORE_INDEX] * len(prompt) + new)
                rows["finished"].append(end is not None)
    finished = sum(rows["finished"])
    if not rows["input_ids"]:
        raise ValueError(f"No self-distilled trajectory ended with EOS within {max_new_tokens} new tokens, and "
                         "unfinished ones are dropped: raise max_new_tokens (distillation_max_new_tokens) or keep "
                         "unfinished targets (distillation_keep_unfinished=True).")  # fmt: skip
    logger.info(f"Self-distillation: {len(rows['input_ids'])} trajectories, {finished} ended with EOS.")
    return Dataset.from_dict(rows)
