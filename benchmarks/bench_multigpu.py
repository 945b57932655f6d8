"""Multi-GPU adaptation: the same training on 1 GPU, 2-GPU DDP and 2-GPU FSDP (accelerate configs under
examples/accelerate/) at the same global batch; compares the loss curves and the step time.

    python benchmarks/bench_multigpu.py --data wiki_train.jsonl --steps 80 --global-batch 32

Driver mode launches `accelerate launch` workers (this script with --worker). The model is a randomly initialised
SmolLM2-135M-shape Llama with a BPE tokenizer trained here on the data (no downloads); identical weights on every
run (seeded), so curves are comparable up to data order and noise sampling.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
ROOT = HERE.parent


def texts(path):
    sys.path.insert(0, str(HERE))
    from common import read_jsonl

    return read_jsonl(path, "text")


def tokenizer_for(data, path: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if not (path / "tokenizer.json").is_file():
        backend = Tokenizer(models.BPE(unk_token="<unk>"))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.train_from_iterator(
            data, trainers.BpeTrainer(vocab_size=8192, special_tokens=["<unk>", "<eos>", "<pad>"])
        )
        tok = PreTrainedTokenizerFast(
            tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>", pad_token="<pad>"
        )
        tok.save_pretrained(path)
    return PreTrainedTokenizerFast.from_pretrained(path)


def worker(args):
    import torch
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback

    from hf_blockdiff import BlockDiffusionConfig, BlockDiffusionTrainer, convert_model

    data = texts(args.data)
    tok = tokenizer_for(data, Path(args.work) / "tokenizer")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True, max_position_embeddings=2048,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)  # fmt: skip
    model = LlamaForCausalLM(config)
    model, tok = convert_model(model, tok, block_size=args.block_size)
    model.set_attn_implementation(args.attn)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    times = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            if cuda:
                torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.start)

    training = BlockDiffusionConfig(
        output_dir=str(Path(args.work) / args.name), max_steps=args.steps, per_device_train_batch_size=args.global_batch // world,
        learning_rate=1e-3, lr_scheduler_type="cosine", warmup_steps=10, bf16=cuda, use_cpu=not cuda, logging_steps=1, save_strategy="no",
        report_to=[], max_length=256, block_size=args.block_size, growth_interval_steps=args.steps // 4, seed=0,
        dataloader_num_workers=1,
    )  # fmt: skip
    trainer = BlockDiffusionTrainer(model, args=training, train_dataset=Dataset.from_dict({"text": data}),
                                    processing_class=tok, callbacks=[StepTimer()])  # fmt: skip
    trainer.train()
    if trainer.is_world_process_zero():
        logs = [e for e in trainer.state.log_history if "loss" in e and "diffusion_loss" in e]
        result = {"name": args.name, "world": world, "step_s": statistics.median(times[5:]), "logs": logs}
        (Path(args.work) / f"{args.name}.json").write_text(json.dumps(result))


def launch(name, config, processes, args):
    cmd = ["accelerate", "launch", "--num_processes", str(processes), "--main_process_port", str(29500 + processes)]
    cmd += (
        ["--config_file", str(ROOT / "examples" / "accelerate" / config)] if config else ["--mixed_precision", "bf16"]
    )
    cmd += [str(Path(__file__).resolve()), "--worker", "--name", name, "--data", args.data, "--work", args.work,
            "--steps", str(args.steps), "--global-batch", str(args.global_batch), "--block-size", str(args.block_size),
            "--attn", args.attn]  # fmt: skip
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
    if processes == 1:
        env["CUDA_VISIBLE_DEVICES"] = "0"
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, env=env, text=True, capture_output=True)
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-6000:], flush=True)
        return None
    return json.loads((Path(args.work) / f"{name}.json").read_text())


def smooth(values, window=10):
    return [statistics.mean(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))]


def driver(args):
    sys.path.insert(0, str(HERE))
    from common import save

    runs = [("1 GPU", None, 1), ("DDP 2 GPUs", "ddp.yaml", 2), ("FSDP 2 GPUs", "fsdp.yaml", 2)]
    results = {name: launch(name.replace(" ", "_"), config, n, args) for name, config, n in runs}
    base = results["1 GPU"]
    rows, curves = [], {}
    for name, result in results.items():
        if result is None:
            rows.append({"run": name, "status": "failed (see log)"})
            continue
        loss = [e["loss"] for e in result["logs"]]
        curves[name] = {"loss": loss, "diffusion": [e["diffusion_loss"] for e in result["logs"]],
                        "ar": [e["ar_loss"] for e in result["logs"]], "block": [e["block_size"] for e in result["logs"]]}  # fmt: skip
        row = {"run": name, "status": "ok", "steps": len(loss), "step s": result["step_s"],
               "first-10 loss": statistics.mean(loss[:10]), "last-10 loss": statistics.mean(loss[-10:]),
               "last-10 AR loss": statistics.mean(curves[name]["ar"][-10:])}  # fmt: skip
        if base is not None and name != "1 GPU":
            ref = smooth([e["loss"] for e in base["logs"]])
            mine = smooth(loss)
            row["mean |smoothed diff| vs 1 GPU"] = statistics.mean(abs(a - b) for a, b in zip(ref, mine))
            row["speed-up vs 1 GPU"] = base["step_s"] / result["step_s"]
        rows.append(row)
    Path(args.work, "curves.json").write_text(json.dumps(curves))
    plot_curves(curves, Path(args.work) / "multigpu_curves.png")
    notes = (f"Random-init SmolLM2-135M-shape Llama, BPE tokenizer trained on the data, global batch {args.global_batch} "
             f"(per device {args.global_batch}/world), {args.steps} steps, growth 1 -> {args.block_size}, {args.attn}, bf16. "
             "Loss curves smoothed over 10 steps; data order and noise differ between runs, so curves agree up to noise.")  # fmt: skip
    save("multigpu", "Multi-GPU adaptation: 1 GPU vs DDP vs FSDP at the same global batch", rows, notes)


def plot_curves(curves, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, curve in curves.items():
        ax.plot(smooth(curve["loss"]), label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (smoothed)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--name", default="run")
    parser.add_argument("--data", required=True)
    parser.add_argument("--work", default="/tmp/multigpu")
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--global-batch", type=int, default=32)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--attn", default="flex_attention")
    args = parser.parse_args()
    Path(args.work).mkdir(parents=True, exist_ok=True)
    (worker if args.worker else driver)(args)


if __name__ == "__main__":
    main()
