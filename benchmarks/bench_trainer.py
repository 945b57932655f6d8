"""Trainer throughput: BlockDiffusionTrainer (flex and dense masks, chunked and fused liger-kernel losses) vs a plain
autoregressive trl.SFTTrainer and a plain compiled AR training step on the same model, data and batch (bf16, GPU),
one run. Reports tokens/s (real tokens of the batch per second of optimizer step, median after warm-up), the ratios
to both AR rows, and peak memory. Fused rows also check their losses and gradients against the chunked path on one
batch (same noise) before timing.

    python benchmarks/bench_trainer.py --source smollm2 --data wiki_train.jsonl --batch 32 --max-length 512
    python benchmarks/bench_trainer.py --source smollm2 --data wiki_train.jsonl --pack --max-length 1024
    python benchmarks/bench_trainer.py --source smollm2 --targets TARGETS_DIR --noisy --max-length 1024

``auto`` rows train in the layout the model picks (the split layout of docs/design.md 2.3 unless activations are
checkpointed); the ``joint layout`` row forces one forward over all streams, for comparison. ``--noisy`` trains
a noisy-scope adapter (r=16, all linear layers; the drafter of ``train_drafter.py``) instead of the weights, so
the split layout runs the clean stream without gradient. ``--targets`` reads ``train_drafter.py targets`` shards
instead of ``--data``: prompt plus the source's continuation, the loss on the continuation only, as the drafter
trains.

``--pack`` concatenates the texts (EOS between them) into rows of exactly ``--max-length`` tokens: no padding and
one shape for every step (the wiki extracts average about 110 tokens, so without it rows are short and padded to
the longest of their batch). A row that fails keeps its error in the table; the others still run.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import sys
import time
import traceback
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import environment, read_jsonl, save  # noqa: E402

TRL_AR = "AR SFTTrainer (sdpa)"
COMPILED_AR = "AR compiled step (sdpa)"
ROWS = {  # name: (attention, fused_loss, training layout, torch_compile); None = an AR row
    TRL_AR: None,
    COMPILED_AR: None,
    "block diffusion (flex)": ("flex_attention", "none", "auto", False),
    "block diffusion (dense sdpa)": ("sdpa", "none", "auto", False),
    "block diffusion (flex, liger)": ("flex_attention", "liger", "auto", False),
    "block diffusion (dense sdpa, liger)": ("sdpa", "liger", "auto", False),
    "block diffusion (dense sdpa, liger, joint layout)": ("sdpa", "liger", "joint", False),
    "block diffusion (dense sdpa, liger, compiled layers)": ("sdpa", "liger", "auto", True),
}


def synchronize():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def step_timer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times = []

        def on_step_begin(self, args, state, control, **kwargs):
            synchronize()
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            synchronize()
            self.times.append(time.perf_counter() - self.start)

    return StepTimer()


def load_data(path, tok, args):
    from datasets import Dataset

    if args.targets:  # the drafter's rows, as train_drafter.py trains on them
        from train_drafter import read_targets

        rows = read_targets(Path(args.targets))
        return Dataset.from_dict({"input_ids": [ids for ids, _ in rows],
                                  "labels": [[-100] * p + ids[p:] for ids, p in rows]}).shuffle(seed=0)  # fmt: skip
    texts = read_jsonl(path, "text")
    if not args.pack:
        return Dataset.from_dict({"text": texts})
    rows_needed = (args.warmup + args.steps + 16) * args.batch
    stream, rows = [], []
    for text in texts:  # token rows of exactly max_length, documents separated by EOS, as many as the run reads
        stream += tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        while len(stream) >= args.max_length:
            rows.append(stream[: args.max_length])
            stream = stream[args.max_length :]
        if len(rows) >= rows_needed:
            break
    if len(rows) < args.batch * (args.warmup + args.steps):  # the trainers then start another epoch mid-run
        print(f"--pack: {len(rows)} rows of {args.max_length} tokens, fewer than the {args.batch * (args.warmup + args.steps)}"
              " the run reads: batches repeat.", file=sys.stderr)  # fmt: skip
    return Dataset.from_dict({"input_ids": rows})


def trainer_config(kind, args, cuda):
    return dict(output_dir=f"/tmp/bench_trainer/{kind}", max_steps=args.warmup + args.steps,
                per_device_train_batch_size=args.batch, learning_rate=1e-5, bf16=cuda, use_cpu=not cuda,
                logging_steps=1000, save_strategy="no", report_to=[], max_length=args.max_length,
                dataloader_num_workers=2, seed=0, pad_to_multiple_of=args.pad_to_multiple_of or None,
                gradient_checkpointing=False)  # TRL's default is on; every row here runs without  # fmt: skip


def lora_config(args):
    if not (args.lora or args.noisy):
        return None
    from peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")


def scope_note(args):
    if args.noisy:
        return "a noisy-scope adapter r=16 all-linear (block diffusion; LoRA r=16 for TRL AR)"
    return "LoRA r=16 all-linear" if args.lora else "full fine-tuning"


def fused_check(trainer, batch, fused_loss, cuda):
    """Losses and gradients of one batch through the chunked path and through ``fused_loss``, same noise:
    the differences, for the table."""
    model = trainer.model
    inputs = trainer._prepare_inputs(batch)
    device = inputs["input_ids"].device
    block_size = trainer.current_block_size
    generator = torch.Generator(device=device).manual_seed(0)
    noise = trainer.noise(inputs["input_ids"], inputs.get("attention_mask"), inputs.get("labels"), block_size,
                          generator=generator)  # fmt: skip
    params = [p for p in model.parameters() if p.requires_grad]
    results = []
    for path in ("none", fused_loss):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext():
            out = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"),
                        labels=inputs.get("labels"), noisy_input_ids=noise.noisy_input_ids,
                        diffusion_loss_weights=noise.diffusion_loss_weights, block_size=block_size,
                        ar_loss_weight=trainer.args.ar_loss_weight, fused_loss=path)  # fmt: skip
        out.loss.backward()
        grads = torch.cat([p.grad.float().flatten() for p in params if p.grad is not None])
        results.append((out.diffusion_loss.item(), out.ar_loss.item(), grads))
    model.zero_grad(set_to_none=True)
    (d0, a0, g0), (d1, a1, g1) = results
    return {"Δ diffusion loss": abs(d1 - d0), "Δ AR loss": abs(a1 - a0),
            "grad rel. diff": ((g1 - g0).norm() / g0.norm().clamp(min=1e-30)).item()}  # fmt: skip


def run_trainer(kind, source, tok, data, args, cuda):
    from trl import SFTConfig, SFTTrainer

    from hf_blockdiff import BlockDiffusionConfig, BlockDiffusionTrainer, convert_model

    common = trainer_config(kind, args, cuda)
    model = copy.deepcopy(source)
    timer = step_timer()
    row = {}
    if kind == TRL_AR:
        model.set_attn_implementation("sdpa")
        trainer = SFTTrainer(model, args=SFTConfig(**common), train_dataset=data, processing_class=tok,
                             peft_config=lora_config(args), callbacks=[timer])  # fmt: skip
    else:
        attention, fused_loss, layout, compiled = ROWS[kind]
        torch._dynamo.reset()  # each compiled row compiles its own layers, within dynamo's recompile budget
        model, tokenizer = convert_model(model, copy.deepcopy(tok), block_size=args.block_size)
        model.set_attn_implementation(attention)
        if layout != "auto":  # for comparison only: the model picks the fastest exact layout itself
            model.training_layout = lambda: layout
        config = BlockDiffusionConfig(**common, block_size=args.block_size, block_growth=False, fused_loss=fused_loss,
                                      adapter_scope="noisy" if args.noisy else "all", torch_compile=compiled)  # fmt: skip
        trainer = BlockDiffusionTrainer(model, args=config, train_dataset=data, processing_class=tokenizer,
                                        peft_config=lora_config(args), callbacks=[timer])  # fmt: skip
        if fused_loss != "none":
            row |= fused_check(trainer, next(iter(trainer.get_train_dataloader())), fused_loss, cuda)
    batches = iter(trainer.get_train_dataloader())
    tokens = statistics.mean(int(next(batches)["attention_mask"].sum()) for _ in range(8))
    trainer.train()
    del trainer, model
    return tokens, statistics.median(timer.times[args.warmup :]), row


def run_compiled_ar(source, tok, data, args, cuda):
    """A minimal AR training loop: torch.compile(model), fused AdamW, bf16 autocast, TRL's batches."""
    from trl import SFTConfig, SFTTrainer

    # TRL's collator and tokenization, so that the batches are exactly the other rows'; the trainer gets its own
    # copy because SFTTrainer patches the forward of the model it is given.
    loader = SFTTrainer(copy.deepcopy(source), args=SFTConfig(**trainer_config(COMPILED_AR, args, cuda)),
                        train_dataset=data, processing_class=tok).get_train_dataloader()  # fmt: skip
    model = copy.deepcopy(source)
    model.set_attn_implementation("sdpa")
    model.train()
    compiled = torch.compile(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=cuda)
    device = next(model.parameters()).device
    times, tokens = [], []
    batches = iter(loader)
    for step in range(args.warmup + args.steps):
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(loader)
            batch = next(batches)
        batch = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "labels")}
        synchronize()
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext():
            loss = compiled(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
            tokens.append(int(batch["attention_mask"].sum()))
    del compiled, model, optimizer
    return statistics.mean(tokens), statistics.median(times), {}


def save_table(rows, measured_on, args):
    """Ratios to the AR rows of the same batch, then the table with its notes (benchmarks/results/OUT)."""
    cuda = args.device == "cuda"

    def baseline(name, batch):  # the AR row of the same batch, else of the first batch that has one
        found = [r for r in rows if r["trainer"].startswith(name) and "tokens/s" in r]
        return next((r for r in found if r["batch"] == batch), found[0] if found else None)

    for row in rows:
        for name, column in ((TRL_AR, "vs TRL AR"), (COMPILED_AR, "vs compiled AR")):
            base = baseline(name, row["batch"])
            row[column] = row["tokens/s"] / base["tokens/s"] if base and "tokens/s" in row else None
        base = baseline(TRL_AR, row["batch"])
        row["memory vs TRL AR"] = row["peak GiB"] / base["peak GiB"] if base and row.get("peak GiB") else None
    columns = ["trainer", "batch", "tokens/step", "step ms", "tokens/s", "vs TRL AR", "vs compiled AR", "peak GiB",
               "memory vs TRL AR", "Δ diffusion loss", "Δ AR loss", "grad rel. diff", "error"]  # fmt: skip
    columns = [c for c in columns if any(row.get(c) is not None for row in rows)]
    if args.targets:
        data_note = (f"drafter rows of {args.targets} (prompt, then the source's continuation; loss on the latter), "
                     f"truncated at {args.max_length} and padded to the longest of the batch")  # fmt: skip
    elif args.pack:
        data_note = f"texts packed into rows of exactly {args.max_length} tokens (EOS between documents)"
    else:
        data_note = f"one text per row, truncated at {args.max_length} and padded to the longest of the batch"
    padding = f", batch lengths padded to a multiple of {args.pad_to_multiple_of}" if args.pad_to_multiple_of else ""
    cudnn = ", sdpa kept off cuDNN" if args.no_cudnn_attention else ""
    notes = (f"Source {args.source}, {'bf16' if cuda else 'fp32 on CPU'}{cudnn}, per-device batch as listed, block size "
             f"{args.block_size} (no growth), {scope_note(args)} for the trainer rows; data {args.data or 'targets'}: "
             f"{data_note}{padding}. Step time = optimizer step incl. forward/backward, median "
             f"of {args.steps} after {args.warmup} warm-up steps; tokens = real (non-padding) tokens per batch. "
             "No row checkpoints activations (TRL's SFTConfig would by default). The TRL AR row is trl.SFTTrainer on the stock model (TRL's fused LM head); the compiled AR row is a "
             "minimal loop (torch.compile of the stock model, fused AdamW, bf16 autocast, full fine-tuning) over "
             "the same batches; the joint two-stream layout processes 2L tokens, the split one L plus the supervised "
             "ones. 'liger' rows compute both losses with "
             "liger-kernel's fused linear cross-entropy; 'compiled layers' rows set torch_compile=True (each decoder "
             "layer compiled in place by inductor; the first steps compile); their Δ columns compare losses and gradients with the "
             "chunked path on one batch (same noise).")  # fmt: skip
    save(args.out, "Trainer throughput: block diffusion vs plain AR", rows, notes, columns, measured_on)


def rows_of_log(path):
    """The rows a run printed as they finished, and the environment line it printed first (None if absent)."""
    rows, measured_on = [], None
    for line in Path(path).read_text(errors="replace").split("\n"):
        if line.startswith("Device: "):
            measured_on = line.strip()
        elif line.startswith("{") and '"trainer"' in line:
            rows.append(json.loads(line))
    if not rows:
        raise SystemExit(f"{path}: no rows (lines of JSON with a 'trainer' field) to make a table of.")
    return rows, measured_on


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", default="smollm2")
    parser.add_argument("--data", help="jsonl with a 'text' field")
    parser.add_argument("--targets", help="a folder of train_drafter.py target shards, instead of --data")
    parser.add_argument("--batch", type=int, nargs="+", default=[32], help="per-device batch sizes (each row at each)")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--pack", action="store_true", help="rows of exactly --max-length tokens (see above)")
    parser.add_argument("--pad-to-multiple-of", type=int, default=None, help="pad batch lengths to a multiple")
    parser.add_argument("--lora", action="store_true", help="LoRA r=16 on all linear layers for the trainer rows")
    parser.add_argument("--noisy", action="store_true",
                        help="a noisy-scope adapter (r=16, all linear layers) for the block-diffusion rows")  # fmt: skip
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS), metavar="ROW",
                        help=f"rows to run (default all): {', '.join(ROWS)}")  # fmt: skip
    parser.add_argument("--no-cudnn-attention", action="store_true",
                        help="keep sdpa off its cuDNN kernel (which builds a plan per shape)")  # fmt: skip
    parser.add_argument("--device", default="cuda", help="cpu for a dry run of the script (no flex, no liger)")
    parser.add_argument("--out", default="trainer_throughput")
    parser.add_argument("--from-log", metavar="LOG",
                        help="run nothing: the table of the rows a run printed to LOG (one cut short by its time "
                             "limit), with the notes of the other arguments, which should be that run's")  # fmt: skip
    args = parser.parse_args()
    if args.from_log:
        return save_table(*rows_of_log(args.from_log), args)
    if (args.data is None) == (args.targets is None) or (args.targets and args.pack):
        parser.error("give --data (optionally --pack) or --targets")
    torch._dynamo.config.cache_size_limit = 64
    cuda = args.device == "cuda"
    if args.no_cudnn_attention:
        torch.backends.cuda.enable_cudnn_sdp(False)
    batches = args.batch
    args.batch = max(batches)  # --pack reads rows for the largest

    from hf_blockdiff import load_source

    print(environment(), flush=True)  # for --from-log
    source, tok = load_source(args.source, dtype="bfloat16" if cuda else "float32", device=args.device)
    data = load_data(args.data, tok, args)
    rows = []
    for kind, args.batch in [(kind, batch) for kind in args.rows for batch in batches]:
        scope = (
            " noisy-scope adapter"
            if args.noisy and ROWS[kind]
            else " LoRA"
            if args.lora and kind != COMPILED_AR
            else ""
        )
        row = {"trainer": kind + scope, "batch": args.batch}
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            run = run_compiled_ar if kind == COMPILED_AR else lambda *a: run_trainer(kind, *a)
            tokens, seconds, extra = run(source, tok, data, args, cuda)
            row |= {"tokens/step": tokens, "step ms": seconds * 1000, "tokens/s": tokens / seconds}
            row["peak GiB"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
            row |= extra
        except Exception as error:  # keep the other rows of a GPU session that cost minutes to get
            traceback.print_exc()
            row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''}"
        gc.collect()
        rows.append(row)
        print(json.dumps(row), flush=True)  # a run cut short by its time limit keeps the rows so far in its log

    save_table(rows, None, args)


if __name__ == "__main__":
    main()
