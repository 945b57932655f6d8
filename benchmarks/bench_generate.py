"""Decoding speed: HF autoregressive generate() of the source model (eager, and static cache = compiled decode
step) vs our block-diffusion generate() over block sizes and thresholds, batch 1 and 16, one run, same GPU.

    python benchmarks/bench_generate.py --model smollm2 --out generate_smollm2
    python benchmarks/bench_generate.py --shape qwen2-1.5b --thresholds 0.0 1.0 --out generate_1.5b

``--model`` takes anything ``hf_blockdiff.load_source`` takes (a directory, a GGUF file, ``smollm2``) or an
already converted / adapted block-diffusion directory; ``--shape`` a random-init model (pure speed).
Reports tokens/s (generated tokens up to each row's EOS over wall time, CUDA events after warm-up, median of
repeats), tokens per forward per row (as each row would decode alone) and for the batch as decoded, and the
ratio to the eager AR baseline measured in the same run.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import random_model, save, timer  # noqa: E402

PROMPTS = [
    "Explain why the sky is blue in two sentences.",
    "Write a short poem about a lighthouse.",
    "What are three tips for learning a new language?",
    "Summarize the plot of Romeo and Juliet.",
    "How does a refrigerator keep food cold?",
    "Give me a recipe for a simple tomato soup.",
    "What is the difference between weather and climate?",
    "Describe the water cycle for a ten-year-old.",
    "List some benefits of regular exercise.",
    "Why do cats purr?",
    "Write a friendly email inviting a colleague to lunch.",
    "What causes earthquakes?",
    "Explain what a computer program is.",
    "How do bees make honey?",
    "What should I pack for a weekend hiking trip?",
    "Tell me a fun fact about the ocean.",
]


def load(args):
    """(AR source model, block-diffusion model, tokenizer) on the GPU in bf16."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hf_blockdiff

    if args.shape:
        model = random_model(args.shape, "sdpa", device=args.device)
        source = copy.deepcopy(model)
        source.__class__ = type(model).__bases__[-1]
        return source, model, None
    path = Path(args.model)
    if path.is_dir() and (path / "modeling_blockdiff.py").is_file():  # an adapted / converted checkpoint
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.bfloat16)
        source = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)  # its own AR path, stock class
    else:
        source, tokenizer = hf_blockdiff.load_source(args.model, dtype="bfloat16")
        model, tokenizer = hf_blockdiff.convert_model(copy.deepcopy(source), copy.deepcopy(tokenizer), block_size=4)
    return source.to(args.device).eval(), model.to(args.device).eval(), tokenizer


def prompts(tokenizer, batch, device, vocab):
    if tokenizer is None:  # random model: random prompts of different lengths
        g = torch.Generator().manual_seed(0)
        lengths = [24 + (7 * i) % 20 for i in range(batch)]
        ids = torch.full((batch, max(lengths)), 0)
        am = torch.zeros_like(ids)
        for r, n in enumerate(lengths):
            ids[r, -n:] = torch.randint(0, vocab - 2, (n,), generator=g)
            am[r, -n:] = 1
        return {"input_ids": ids.to(device), "attention_mask": am.to(device)}
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in (PROMPTS * 4)[:batch]
    ]
    return tokenizer(texts, return_tensors="pt", padding=True, padding_side="left").to(device)


def generated_tokens(sequences, prompt_len, eos_ids):
    """Tokens per row up to and including the first EOS."""
    new = sequences[:, prompt_len:]
    if not eos_ids:
        return torch.full((new.shape[0],), new.shape[1])
    is_eos = torch.isin(new, torch.tensor(eos_ids, device=new.device))
    first = torch.where(is_eos, torch.arange(new.shape[1], device=new.device), new.shape[1]).min(1).values
    return (first + 1).clamp(max=new.shape[1]).cpu()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--shape", default=None, help="random-init shape from benchmarks/common.py instead of --model")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--block-sizes", nargs="+", type=int, default=[4, 8, 16, 32])
    parser.add_argument("--thresholds", nargs="+", type=float, default=[0.7, 0.8, 0.9, 1.0])
    parser.add_argument("--no-static", action="store_true", help="skip the static-cache AR baseline")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default="generate")
    args = parser.parse_args()

    source, model, tokenizer = load(args)
    vocab = model.config.vocab_size
    eos = model.generation_config.eos_token_id if tokenizer is not None else []
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    pad = tokenizer.pad_token_id if tokenizer is not None else 0
    time_ms = timer(args.device)
    rows = []
    for batch in args.batches:
        inputs = prompts(tokenizer, batch, args.device, vocab)
        plen = inputs["input_ids"].shape[1]
        common = dict(max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=pad, eos_token_id=eos or None)

        def measure(name, fn, count, **extra):
            ms = time_ms(fn, warmup=1, repeats=args.repeats)
            tokens = int(count().sum())
            row = {"batch": batch, "decoder": name, **extra, "tokens": tokens, "ms": ms, "tok/s": tokens / ms * 1000}
            rows.append(row)
            print(row, flush=True)
            return row

        baselines = [("AR eager", {})] + (
            [] if args.no_static else [("AR static", {"cache_implementation": "static"})]
        )
        for name, extra in baselines:
            holder = {}

            def ar():
                holder["out"] = source.generate(**inputs, **common, **extra)

            base = measure(name, ar, lambda: generated_tokens(holder["out"], plen, eos), tpf_row=1.0)
            per_row = generated_tokens(holder["out"], plen, eos)
            base["tpf_batch"] = float(per_row.sum() / per_row.max())  # one forward per step for the whole batch
            if name == "AR eager":
                eager = base["tok/s"]
            base["vs AR eager"] = base["tok/s"] / eager

        for block_size in args.block_sizes:
            for threshold in args.thresholds:
                holder = {}

                def ours():
                    holder["out"] = model.generate(**inputs, **common, block_size=block_size, threshold=threshold,
                                                   return_dict_in_generate=True)  # fmt: skip

                def count():
                    return holder["out"].num_generated_tokens.cpu()

                row = measure(f"block b={block_size}", ours, count, threshold=threshold)
                out = holder["out"]
                row["tpf_row"] = float((out.num_generated_tokens / out.row_forward_passes).mean())
                row["tpf_batch"] = float(out.num_generated_tokens.sum() / out.num_forward_passes)
                row["vs AR eager"] = row["tok/s"] / eager

    name = args.shape or Path(args.model).name
    notes = (
        f"Model: {name}; greedy; up to {args.new_tokens} new tokens per row, each row stopping at its EOS; bf16, "
        f"{args.device}. tok/s = generated tokens (to EOS) / wall time of the generate() call, CUDA events after a "
        f"warm-up call, median of {args.repeats}. tpf_row = mean over rows of tokens / forwards the row took part "
        "in (what it costs decoded alone); tpf_batch = all tokens / batch forwards as decoded. 'vs AR eager' is "
        "the ratio to the eager HF generate() of the same weights in the same run. Threshold 1.0 commits one token "
        "per denoising step (fixed steps)."
    )
    save(args.out, f"Generation speed: block diffusion vs autoregressive ({name})", rows, notes,
         columns=["batch", "decoder", "threshold", "tokens", "ms", "tok/s", "tpf_row", "tpf_batch", "vs AR eager"])  # fmt: skip


if __name__ == "__main__":
    main()
