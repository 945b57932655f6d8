"""Proof on real weights (issue 6): adapt SmolLM2-135M-Instruct by self-distillation until it decodes in parallel,
then measure AR retention, quality vs tokens per forward, and speed against HF autoregressive generate().

Stages (each fits one GPU call; state lives in --work):

    python benchmarks/proof_smollm2.py targets  --work W --source SmolLM2.gguf --prompts train.jsonl
    python benchmarks/proof_smollm2.py train    --work W --source SmolLM2.gguf --mode full --minutes 7
    python benchmarks/proof_smollm2.py train    --work W --source SmolLM2.gguf --mode lora --minutes 6
    python benchmarks/proof_smollm2.py evaluate --work W --source SmolLM2.gguf --eval-prompts eval.jsonl \
        --wiki wiki_eval.jsonl --out results_dir

`targets` decodes the training prompts with the source model (greedy, plus sampled copies) using
hf_blockdiff.distill.ar_targets; `train` runs BlockDiffusionTrainer (growth 1 -> block size, AR loss) on those
trajectories for a fixed wall-clock budget; `evaluate` prints one table and saves it with a plot.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402

SOURCE_VOCAB = 49152  # SmolLM2's own vocabulary; the mask token comes after it


def read_jsonl(path, key, limit=None):
    rows = common.read_jsonl(path, key)
    return rows[:limit] if limit else rows


def chat(prompt: str) -> list[dict]:
    return [{"role": "user", "content": prompt}]


# ----------------------------------------------------------------------------------------------------------
# targets


def stage_targets(args):
    from datasets import concatenate_datasets

    from hf_blockdiff import load_source
    from hf_blockdiff.distill import ar_targets

    work = Path(args.work)
    model, tok = load_source(args.source, dtype="bfloat16", device=args.device)
    prompts = [chat(p) for p in read_jsonl(args.prompts, "prompt", args.max_prompts)]
    start = time.time()
    parts = [ar_targets(model, tok, prompts, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)]
    for seed in range(args.samples):
        parts.append(ar_targets(model, tok, prompts, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                                temperature=args.temperature, top_p=0.95, seed=seed + 1))  # fmt: skip
    data = concatenate_datasets(parts)
    data.save_to_disk(str(work / "targets"))
    tokens = sum(len(r) for r in data["input_ids"])
    info = {"trajectories": len(data), "tokens": tokens, "finished": sum(data["finished"]), "seconds": time.time() - start,
            "greedy": len(parts[0]), "sampled": len(data) - len(parts[0]), "temperature": args.temperature}  # fmt: skip
    (work / "targets.json").write_text(json.dumps(info, indent=1))
    print(info)


# ----------------------------------------------------------------------------------------------------------
# train


def time_limit(seconds: float):
    """A callback that stops training after a wall-clock budget (a safety net: --max-steps sizes the schedule)."""
    from transformers import TrainerCallback

    class TimeLimit(TrainerCallback):
        def on_train_begin(self, *args, **kwargs):
            self.start = time.time()

        def on_step_end(self, args, state, control, **kwargs):
            if time.time() - self.start > seconds:
                control.should_training_stop = True

    return TimeLimit()


def stage_train(args):
    from datasets import load_from_disk
    from peft import LoraConfig

    from hf_blockdiff import BlockDiffusionConfig, BlockDiffusionTrainer, convert_model, load_source

    work = Path(args.work)
    out = work / args.mode
    model, tok = load_source(args.source, dtype="bfloat16" if args.device == "cuda" else "float32")
    model, tok = convert_model(model, tok, block_size=args.block_size)
    model.set_attn_implementation(args.attn)
    data = load_from_disk(str(work / "targets")).shuffle(seed=0).select_columns(["input_ids", "labels"])
    lora = args.mode == "lora"
    config = BlockDiffusionConfig(
        output_dir=str(out), max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr if args.lr else (1e-3 if lora else 1e-4), lr_scheduler_type="cosine", warmup_steps=30,
        weight_decay=0.0, bf16=args.device == "cuda", use_cpu=args.device == "cpu", logging_steps=10, save_strategy="no", report_to=[], max_length=args.max_length,
        block_size=args.block_size, ar_loss_weight=0.5, certainty_loss_weight=args.certainty,
        complementary_masking=args.complementary, growth_warmup_steps=0, dataloader_num_workers=2, seed=0,
        # reach the final block size after `growth_fraction` of the steps, then train there
        growth_interval_steps=max(1, int(args.max_steps * args.growth_fraction / max(1, math.log2(args.block_size)))),
        gradient_checkpointing=False,
    )  # fmt: skip
    peft_config = (
        LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, target_modules="all-linear", task_type="CAUSAL_LM")
        if lora
        else None
    )
    trainer = BlockDiffusionTrainer(model, args=config, train_dataset=data, processing_class=tok,
                                    peft_config=peft_config, callbacks=[time_limit(args.minutes * 60)])  # fmt: skip
    start = time.time()
    trainer.train()
    seconds = time.time() - start
    trainer.save_model()
    if lora:  # the adapter in bf16: half the bytes, what gets shipped
        from safetensors.torch import load_file, save_file

        path = out / "adapter_model.safetensors"
        save_file({k: v.to(torch.bfloat16) for k, v in load_file(path).items()}, path)
    history = trainer.state.log_history
    (out / "log_history.json").write_text(json.dumps(history, indent=1))
    info = {"mode": args.mode, "steps": trainer.state.global_step, "seconds": seconds, "summary": trainer.training_summary(),
            "tokens": trainer._total_train_tokens}  # fmt: skip
    (out / "train_info.json").write_text(json.dumps(info, indent=1, default=str))
    print(json.dumps(info, indent=1, default=str))


# ----------------------------------------------------------------------------------------------------------
# evaluate


def load_models(args):
    """The source (stock class) and the adapted models, bf16 on the device."""
    from transformers import AutoModelForCausalLM

    from hf_blockdiff import convert_model, load_source
    from hf_blockdiff.convert import apply_adapter

    work = Path(args.work)
    dtype = "float32" if args.device == "cpu" else "bfloat16"
    source, tok = load_source(args.source, dtype=dtype, device=args.device)
    models = {}
    if (work / "full" / "config.json").is_file():
        models["full"] = AutoModelForCausalLM.from_pretrained(
            work / "full", trust_remote_code=True, dtype=getattr(torch, dtype)
        )
    if (work / "lora" / "adapter_config.json").is_file():
        import copy

        base, _ = convert_model(copy.deepcopy(source), copy.deepcopy(tok), block_size=args.block_size)
        models["lora"] = apply_adapter(base, work / "lora")
    return source, tok, {k: m.to(args.device).eval() for k, m in models.items()}


@torch.no_grad()
def wiki_nll(model, tok, texts, device, max_length=256, batch=32):
    total, count = 0.0, 0
    for i in range(0, len(texts), batch):
        enc = tok(texts[i : i + batch], return_tensors="pt", padding=True, truncation=True, max_length=max_length,
                  padding_side="right").to(device)  # fmt: skip
        logits = model(**enc).logits[..., :SOURCE_VOCAB].float()
        targets = enc["input_ids"][:, 1:].masked_fill(enc["attention_mask"][:, 1:] == 0, -100)
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].transpose(1, 2), targets, reduction="sum", ignore_index=-100
        )
        total += nll.item()
        count += (targets != -100).sum().item()
    return total / count


@torch.no_grad()
def score(source, prompt_ids, continuations, device, batch=32):
    """Generative perplexity of continuations under the source model (token-weighted) and corpus distinct-2."""
    total, count = 0.0, 0
    for i in range(0, len(continuations), batch):
        seqs = [p + c for p, c in zip(prompt_ids[i : i + batch], continuations[i : i + batch])]
        width = max(map(len, seqs))
        ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs], device=device)
        am = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=device)
        logits = source(input_ids=ids, attention_mask=am).logits.float()
        logp = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        for r, (p, c) in enumerate(zip(prompt_ids[i : i + batch], continuations[i : i + batch])):
            if c:
                total -= logp[r, len(p) - 1 : len(p) - 1 + len(c)].sum().item()
                count += len(c)
    bigrams = [tuple(c[j : j + 2]) for c in continuations for j in range(len(c) - 1)]
    return (
        math.exp(total / max(count, 1)),
        len(set(bigrams)) / max(len(bigrams), 1),
        count / max(len(continuations), 1),
    )


def continuations_of(sequences, width, eos_ids):
    out = []
    for row in sequences[:, width:].tolist():
        end = next((i for i, t in enumerate(row) if t in eos_ids), len(row))
        out.append(row[:end])
    return out


@torch.no_grad()
def decode_all(model, prompt_ids, pad, eos, args, **settings):
    """Greedy continuations of every prompt in batches; per-row tokens-per-forward and batch TPF."""
    continuations, row_tpf, tokens, row_slots = [], [], 0, 0
    for i in range(0, len(prompt_ids), args.eval_batch):
        chunk = prompt_ids[i : i + args.eval_batch]
        width = max(map(len, chunk))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=args.device)
        am = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=args.device)
        out = model.generate(input_ids=ids, attention_mask=am, max_new_tokens=args.new_tokens, do_sample=False,
                             pad_token_id=pad, eos_token_id=eos, **settings)  # fmt: skip
        if hasattr(out, "num_forward_passes"):
            row_tpf += (out.num_generated_tokens / out.row_forward_passes).tolist()
            tokens += int(out.num_generated_tokens.sum())
            row_slots += out.num_forward_passes * len(chunk)  # every row waits for the batch's forwards
            out = out.sequences
        continuations += continuations_of(out, width, set(eos))
    tpf_row = sum(row_tpf) / len(row_tpf) if row_tpf else 1.0
    tpf_batch = tokens / row_slots if row_slots else 1.0  # per-row TPF when the batch is decoded in lockstep
    return continuations, tpf_row, tpf_batch


def stage_evaluate(args):
    from common import markdown_table

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    source, tok, models = load_models(args)
    pad = tok.pad_token_id
    eos = sorted(
        {
            tok.eos_token_id,
            *(
                [source.generation_config.eos_token_id]
                if isinstance(source.generation_config.eos_token_id, int)
                else source.generation_config.eos_token_id or []
            ),
        }
    )
    prompts = read_jsonl(args.eval_prompts, "prompt", args.num_prompts)
    prompt_ids = [
        tok.apply_chat_template(chat(p), add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        for p in prompts
    ]
    wiki = read_jsonl(args.wiki, "text", args.num_wiki)

    rows = []
    base_nll = wiki_nll(source, tok, wiki, args.device)
    t0 = time.time()
    conts, _, _ = decode_all(source, prompt_ids, pad, eos, args)
    samples = {"prompts": prompts[:3], "source AR": [tok.decode(c) for c in conts[:3]]}
    ppl, d2, length = score(source, prompt_ids, conts, args.device)
    rows.append({"model": "source", "decoding": "AR (HF generate)", "block": 1, "threshold": "", "wiki NLL": base_nll,
                 "gen PPL": ppl, "distinct-2": d2, "mean len": length, "TPF row": 1.0, "TPF batch": 1.0})  # fmt: skip
    print(rows[-1], f"{time.time() - t0:.0f}s", flush=True)
    for name, model in models.items():
        nll = wiki_nll(model, tok, wiki, args.device)
        guards = [False, True] if args.repeat_guard else [False]
        settings = [(1, 1.0, False)] + [(b, t, g) for b in args.blocks for t in args.thresholds for g in guards]
        for block, threshold, guard in settings:
            t0 = time.time()
            conts, tpf_row, tpf_batch = decode_all(model, prompt_ids, pad, eos, args, block_size=block, threshold=threshold,
                                                   repeat_guard=guard, return_dict_in_generate=True)  # fmt: skip
            ppl, d2, length = score(source, prompt_ids, conts, args.device)
            decoding = "AR (ours, b=1)" if block == 1 else "block diffusion" + (" + repeat guard" if guard else "")
            rows.append({"model": name, "decoding": decoding, "block": block, "threshold": threshold if block > 1 else "",
                         "wiki NLL": nll, "gen PPL": ppl, "distinct-2": d2, "mean len": length, "TPF row": tpf_row,
                         "TPF batch": tpf_batch})  # fmt: skip
            print(rows[-1], f"{time.time() - t0:.0f}s", flush=True)
            samples[f"{name} b={block} t={threshold}" + (" guard" if guard else "")] = [
                tok.decode(c) for c in conts[:3]
            ]
    ref = rows[0]
    for row in rows:
        row["PPL vs source"] = row["gen PPL"] / ref["gen PPL"]
        row["meets bar"] = (
            "yes"
            if row["TPF row"] >= 2.5 and row["PPL vs source"] <= 1.10 and row["distinct-2"] >= ref["distinct-2"]
            else ""
        )
    (out_dir / f"{args.tag}_quality.json").write_text(json.dumps(rows, indent=1))
    (out_dir / f"{args.tag}_samples.json").write_text(json.dumps(samples, indent=1))
    table = markdown_table(rows, ["model", "decoding", "block", "threshold", "wiki NLL", "gen PPL", "PPL vs source",
                                  "distinct-2", "mean len", "TPF row", "TPF batch", "meets bar"])  # fmt: skip
    (out_dir / f"{args.tag}_quality.md").write_text(table + "\n")
    print(table)
    plot(rows, out_dir / f"{args.tag}_quality_vs_tpf.png")
    if args.speed:
        speed(args, source, tok, models, rows, out_dir)


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ref = rows[0]["gen PPL"]
    ax.axhline(ref, color="black", lw=1, ls="--", label="source AR")
    ax.axhline(ref * 1.1, color="gray", lw=0.8, ls=":", label="source AR + 10%")
    ax.axvline(2.5, color="gray", lw=0.8, ls=":")
    markers = {4: "o", 8: "s", 16: "^", 32: "D", 1: "*"}
    colors = {"full": "tab:blue", "lora": "tab:orange"}
    for name in [n for n in colors if any(r["model"] == n for r in rows)]:
        pts = [r for r in rows if r["model"] == name]
        for r in pts:
            ax.scatter(r["TPF row"], r["gen PPL"], marker=markers.get(r["block"], "x"), color=colors[name], s=40)
            if r["block"] > 1:
                ax.annotate(
                    f"{r['threshold']}",
                    (r["TPF row"], r["gen PPL"]),
                    fontsize=7,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
        ax.plot(
            [],
            [],
            color=colors[name],
            marker="o",
            ls="",
            label=f"{name} (block 4/8/16 = o/s/^, b=1 = *; label: threshold)",
        )
    ax.set_xlabel("tokens per forward (per row)")
    ax.set_ylabel("generative perplexity (scored by source)")
    ax.set_yscale("log")
    ax.set_title("SmolLM2-135M-Instruct adapted by self-distillation: quality vs parallelism")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def speed(args, source, tok, models, rows, out_dir):
    """Wall-clock tokens/s of the best settings vs HF AR generate (eager, static), batch 1 and 16."""
    from bench_generate import PROMPTS, generated_tokens
    from common import cuda_time, markdown_table

    candidates = [r for r in rows if r["model"] != "source" and r["block"] > 1]
    best = sorted(candidates, key=lambda r: (-(r["PPL vs source"] <= 1.10), -r["TPF row"]))[:2]
    table = []
    for batch in (1, 16):
        texts = [
            tok.apply_chat_template(chat(p), tokenize=False, add_generation_prompt=True) for p in (PROMPTS * 2)[:batch]
        ]
        inputs = tok(texts, return_tensors="pt", padding=True, padding_side="left").to(args.device)
        width = inputs["input_ids"].shape[1]
        common = dict(
            max_new_tokens=args.new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
        runs = [("source AR eager", source, {}), ("source AR static", source, {"cache_implementation": "static"})]
        runs += [(f"{r['model']} b={r['block']} t={r['threshold']}", models[r["model"]],
                  {"block_size": r["block"], "threshold": r["threshold"], "return_dict_in_generate": True}) for r in best]  # fmt: skip
        eager = None
        for name, model, extra in runs:
            holder = {}

            def go():
                holder["out"] = model.generate(**inputs, **common, **extra)

            ms = cuda_time(go, warmup=2, repeats=3)
            out = holder["out"]
            if hasattr(out, "num_generated_tokens"):
                tokens = int(out.num_generated_tokens.sum())
                tpf = float((out.num_generated_tokens / out.row_forward_passes).mean())
            else:
                tokens, tpf = int(generated_tokens(out, width, [tok.eos_token_id]).sum()), 1.0
            tps = tokens / ms * 1000
            eager = eager or tps
            table.append(
                {
                    "batch": batch,
                    "decoder": name,
                    "tokens": tokens,
                    "ms": ms,
                    "tok/s": tps,
                    "TPF row": tpf,
                    "vs AR eager": tps / eager,
                }
            )
            print(table[-1], flush=True)
    (out_dir / "proof_speed.json").write_text(json.dumps(table, indent=1))
    text = markdown_table(table)
    (out_dir / "proof_speed.md").write_text(text + "\n")
    print(text)


# ----------------------------------------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("stage", choices=["targets", "train", "evaluate"])
    parser.add_argument("--work", required=True)
    parser.add_argument("--source", default="smollm2", help="GGUF path or 'smollm2'")
    parser.add_argument("--device", default="cuda")
    # targets
    parser.add_argument("--prompts")
    parser.add_argument("--max-prompts", type=int)
    parser.add_argument("--max-new-tokens", type=int, default=192)
    parser.add_argument(
        "--samples", type=int, default=1, help="sampled trajectories per prompt, besides the greedy one"
    )
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--batch-size", type=int, default=256)
    # train
    parser.add_argument("--mode", choices=["full", "lora"], default="full")
    parser.add_argument("--minutes", type=float, default=6)
    parser.add_argument("--max-steps", type=int, default=2000)
    parser.add_argument("--growth-fraction", type=float, default=0.5)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=448)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--certainty", type=float, default=0.0)
    parser.add_argument("--complementary", action="store_true")
    parser.add_argument("--attn", default="flex_attention")
    # evaluate
    parser.add_argument("--eval-prompts")
    parser.add_argument("--num-prompts", type=int, default=240)
    parser.add_argument("--wiki")
    parser.add_argument("--num-wiki", type=int, default=500)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--eval-batch", type=int, default=120)
    parser.add_argument("--blocks", nargs="+", type=int, default=[4, 8, 16])
    parser.add_argument("--thresholds", nargs="+", type=float, default=[0.5, 0.7, 0.9])
    parser.add_argument("--repeat-guard", action="store_true", help="evaluate each block setting also with the guard")
    parser.add_argument("--tag", default="proof", help="prefix of the saved files")
    parser.add_argument("--speed", action="store_true")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    Path(args.work).mkdir(parents=True, exist_ok=True)
    {"targets": stage_targets, "train": stage_train, "evaluate": stage_evaluate}[args.stage](args)


if __name__ == "__main__":
    main()
