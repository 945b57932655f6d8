"""One training step (forward + backward) of the two-stream layout with dense-sdpa masks vs flex-attention block
masks vs a plain AR step, same model, same batch, bf16 (GPU).

    python benchmarks/bench_train_step.py [--shapes smollm2-135m qwen2-0.5b] [--lengths 512 1024 2048]

Prints a table and saves it to benchmarks/results/train_step.md. Random weights: speed does not depend on them.
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import random_model, save, timer  # noqa: E402

from hf_blockdiff.masks import block_grid, positions_from_padding, training_meta  # noqa: E402


def make_batch(batch, length, vocab, mask_id, block_size, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randint(0, vocab - 1, (batch, length), device=device, generator=g)
    offsets = block_grid(block_size, torch.ones_like(x))[1]
    noisy = x.masked_fill((offsets > 0) & (torch.rand(x.shape, device=device, generator=g) < 0.5), mask_id)
    return x, noisy


def step_fn(model, x, noisy, mode, block_size):
    def step():
        model.zero_grad(set_to_none=True)
        if mode == "ar":
            loss = model(input_ids=x, labels=x).loss
        else:
            loss = model(input_ids=x, noisy_input_ids=noisy, block_size=block_size).loss
        loss.backward()

    return step


def mask_build_ms(model, x, block_size):
    am = torch.ones_like(x)
    meta = training_meta(block_grid(block_size, am)[0], positions_from_padding(am), am, 1)
    return timer(x.device)(lambda: model.block_diffusion_masks(meta, 0, 2 * x.shape[1]), warmup=2, repeats=5)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["smollm2-135m", "qwen2-0.5b"])
    parser.add_argument("--lengths", nargs="+", type=int, default=[512, 1024, 2048])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default="train_step")
    args = parser.parse_args()
    torch._dynamo.config.cache_size_limit = 64  # one flex compile per shape; do not fall back to eager

    rows = []
    for shape in args.shapes:
        models = {attn: random_model(shape, attn, device=args.device) for attn in ("sdpa", "flex_attention")}
        models["flex_attention"].load_state_dict(models["sdpa"].state_dict())
        for length in args.lengths:
            x, noisy = make_batch(args.batch, length, models["sdpa"].config.vocab_size, models["sdpa"].config.mask_token_id,
                                  args.block_size, args.device)  # fmt: skip
            row = {"model": shape, "L": length, "batch": args.batch}
            for name, attn, mode in [("AR sdpa", "sdpa", "ar"), ("2-stream dense sdpa", "sdpa", "two"),
                                     ("2-stream flex", "flex_attention", "two")]:  # fmt: skip
                cuda = args.device == "cuda"
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                try:
                    step = step_fn(models[attn], x, noisy, mode, args.block_size)
                    row[f"{name} ms"] = timer(args.device)(step, warmup=3, repeats=args.repeats)
                    if cuda:
                        row[f"{name} GiB"] = torch.cuda.max_memory_allocated() / 2**30
                except torch.OutOfMemoryError:
                    row[f"{name} ms"] = "OOM"
                except NotImplementedError:  # flex has no backward on CPU (dry runs)
                    row[f"{name} ms"] = "n/a"
                gc.collect()
                if cuda:
                    torch.cuda.empty_cache()
            row["flex mask build ms"] = mask_build_ms(models["flex_attention"], x, args.block_size)
            if isinstance(row.get("2-stream flex ms"), float):
                if isinstance(row.get("2-stream dense sdpa ms"), float):
                    row["dense/flex"] = row["2-stream dense sdpa ms"] / row["2-stream flex ms"]
                row["flex/AR"] = row["2-stream flex ms"] / row["AR sdpa ms"]
            rows.append(row)
            print(row, flush=True)
        del models
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()

    notes = (
        f"One optimizer-free training step (forward + backward), bf16 weights, batch {args.batch}, block size "
        f"{args.block_size}, half of the maskable positions masked; the two-stream layout runs 2L tokens. "
        "CUDA events after 3 warm-up steps, median of "
        f"{args.repeats}. 'flex mask build' is included in the flex step time. Ratios are from the same run."
    )
    save(args.out, "Training step: two-stream (dense sdpa vs flex) vs plain AR", rows, notes)


if __name__ == "__main__":
    main()
