"""Trainer throughput: BlockDiffusionTrainer (flex and dense masks) vs a plain autoregressive trl.SFTTrainer on the
same model, data and batch (bf16, GPU), one run. Reports tokens/s (real tokens of the batch per second of
optimizer step, median after warm-up), the ratio to AR, and peak memory.

    python benchmarks/bench_trainer.py --source smollm2 --data wiki_train.jsonl --batch 32 --max-length 512
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import save  # noqa: E402


def step_timer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times = []

        def on_step_begin(self, args, state, control, **kwargs):
            torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.start)

    return StepTimer()


def run(kind, source, tok, data, args):
    from trl import SFTConfig, SFTTrainer

    from hf_blockdiff import BlockDiffusionConfig, BlockDiffusionTrainer, convert_model

    common = dict(output_dir=f"/tmp/bench_trainer/{kind}", max_steps=args.warmup + args.steps, per_device_train_batch_size=args.batch,
                  learning_rate=1e-5, bf16=True, logging_steps=1000, save_strategy="no", report_to=[],
                  max_length=args.max_length, dataloader_num_workers=2, seed=0)  # fmt: skip
    model = copy.deepcopy(source)
    timer = step_timer()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    if kind == "AR SFTTrainer (sdpa)":
        model.set_attn_implementation("sdpa")
        trainer = SFTTrainer(
            model, args=SFTConfig(**common), train_dataset=data, processing_class=tok, callbacks=[timer]
        )
    else:
        model, tokenizer = convert_model(model, copy.deepcopy(tok), block_size=args.block_size)
        model.set_attn_implementation("flex_attention" if "flex" in kind else "sdpa")
        config = BlockDiffusionConfig(**common, block_size=args.block_size, block_growth=False)
        trainer = BlockDiffusionTrainer(
            model, args=config, train_dataset=data, processing_class=tokenizer, callbacks=[timer]
        )
    batches = iter(trainer.get_train_dataloader())
    tokens = statistics.mean(int(next(batches)["attention_mask"].sum()) for _ in range(8))
    trainer.train()
    seconds = statistics.median(timer.times[args.warmup :])
    row = {"trainer": kind, "batch": args.batch, "tokens/step": tokens, "step ms": seconds * 1000,
           "tokens/s": tokens / seconds, "peak GiB": torch.cuda.max_memory_allocated() / 2**30}  # fmt: skip
    del trainer, model
    gc.collect()
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", default="smollm2")
    parser.add_argument("--data", required=True, help="jsonl with a 'text' field")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default="trainer_throughput")
    args = parser.parse_args()
    torch._dynamo.config.cache_size_limit = 64

    from datasets import Dataset

    from hf_blockdiff import load_source

    texts = [json.loads(line)["text"] for line in Path(args.data).read_text().splitlines() if line.strip()]
    data = Dataset.from_dict({"text": texts})
    source, tok = load_source(args.source, dtype="bfloat16", device="cuda")
    rows = [
        run(kind, source, tok, data, args)
        for kind in ("AR SFTTrainer (sdpa)", "block diffusion (flex)", "block diffusion (dense sdpa)")
    ]
    for row in rows:
        row["tokens/s vs AR"] = row["tokens/s"] / rows[0]["tokens/s"]
        row["memory vs AR"] = row["peak GiB"] / rows[0]["peak GiB"]
    notes = (f"Source {args.source}, bf16, per-device batch {args.batch}, max_length {args.max_length}, block size "
             f"{args.block_size} (no growth), wiki extracts. Step time = optimizer step incl. forward/backward, median of "
             f"{args.steps} after {args.warmup} warm-up steps; tokens = real (non-padding) tokens per batch. The AR run is "
             "trl.SFTTrainer on the stock model (TRL's fused LM head); the two-stream layout processes 2L tokens.")  # fmt: skip
    save(args.out, "Trainer throughput: block diffusion vs plain AR SFT", rows, notes)


if __name__ == "__main__":
    main()
