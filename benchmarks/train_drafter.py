"""Train a drafter that verified decoding accepts (issue 19): a noisy-scope adapter (the causal path stays the
source, so verified output is the source's own greedy output) on the source's greedy continuations, in pieces that
each fit one GPU call and resume bit for bit.

    # once: the targets, decoded by our engine at block size 1 (= the source), EOS kept
    python benchmarks/train_drafter.py targets --source GGUF --prompts prompts.jsonl.gz --out $OUT/targets
    # each piece: resume from the previous piece's state (none the first time), train --minutes, write the next one
    python benchmarks/train_drafter.py train --source GGUF --targets DIR [--state DIR] --out $OUT --minutes 6
    #   (--eval-after 16: then acceptance on 16 held-out prompts, kept in the log: the run's curve; --compile)
    # acceptance on held-out chat prompts (the benchmark's 40), against the source's own greedy output
    # acceptance against training tokens, from the log of pieces trained with --eval-after
    python benchmarks/train_drafter.py curve --log benchmarks/results/drafter_run3_log.jsonl --out drafter_run3_curve
    # where a training step's time goes (kernels and host operations under torch.profiler)
    python benchmarks/train_drafter.py profile --source GGUF --targets DIR --out drafter_step_profile
    python benchmarks/train_drafter.py evaluate --source GGUF --adapter DIR [--dtype float32] --out $OUT/eval.json

Every file written is at most --part-mib (15) MiB, because the GPU machine sends back only small files:
- ``targets/shard_FFFFFF_NN.npz``: uint16 tokens of many rows with their prompt lengths (``FFFFFF``: the chunk's
  first prompt, so chunks decoded in different calls, ``--first-prompt``, gather in one folder);
- ``state/state.tar.NN``: the last checkpoint (fp32 adapter, optimizer, scheduler, RNG and trainer state) as a
  split tar, with ``state/manifest.json`` (part checksums). Pass that folder as ``--state`` to the next piece;
- ``drafter_log.jsonl``: the run's log, one line appended per piece (keep it in benchmarks/results/).
The bf16 adapter for ``apply_adapter`` / ``--adapter`` goes to ``--work``/adapter (for benchmarks on the same
machine); ``train_drafter.py adapter --state DIR --out DIR`` makes it from a state anywhere, without a model.
The learning-rate schedule and the block growth span ``--total-steps`` over all pieces, and every piece of a run
must see the same targets (the data order resumes by position): a piece refuses targets of another size.
The prompts come from benchmarks/drafter_prompts.py.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import torch

MIB = 1 << 20


# ----------------------------------------------------------------------------------------------------------
# files of bounded size


def write_targets(rows: list[tuple[list[int], int]], out: Path, part_bytes: int, chunk: int = 0) -> list[Path]:
    """``rows`` of (token ids, prompt length) as npz shards of at most ``part_bytes`` of token data, named after
    their ``chunk`` (its first prompt)."""
    out.mkdir(parents=True, exist_ok=True)
    shards, start, size = [], 0, 0
    for i, (ids, _) in enumerate(rows + [([], 0)]):
        if i == len(rows) or (size + 2 * len(ids) > part_bytes and i > start):
            part = rows[start:i]
            path = out / f"shard_{chunk:06d}_{len(shards):02d}.npz"
            np.savez_compressed(path, tokens=np.concatenate([np.asarray(r, dtype=np.uint16) for r, _ in part]),
                                lengths=np.asarray([len(r) for r, _ in part], dtype=np.int32),
                                prompt=np.asarray([p for _, p in part], dtype=np.int32))  # fmt: skip
            shards.append(path)
            start, size = i, 0
        size += 2 * len(ids)
    return shards


def read_targets(folder: Path) -> list[tuple[list[int], int]]:
    rows = []
    for path in sorted(Path(folder).glob("shard_*.npz")):
        data = np.load(path)
        ends = np.cumsum(data["lengths"])
        for ids, prompt in zip(np.split(data["tokens"].astype(np.int64), ends[:-1]), data["prompt"]):
            rows.append((ids.tolist(), int(prompt)))
    if not rows:
        raise FileNotFoundError(f"No shard_*.npz in {folder}: run the `targets` stage first.")
    return rows


def pack_state(checkpoint: Path, out: Path, part_bytes: int) -> dict:
    """The checkpoint folder as a tar split into parts of at most ``part_bytes``, with a manifest of checksums."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        tar.add(checkpoint, arcname=checkpoint.name)
    data = buffer.getvalue()
    out.mkdir(parents=True, exist_ok=True)
    parts = []
    for n, offset in enumerate(range(0, len(data), part_bytes)):
        chunk = data[offset : offset + part_bytes]
        (out / f"state.tar.{n:02d}").write_bytes(chunk)
        parts.append(hashlib.sha256(chunk).hexdigest())
    manifest = {"checkpoint": checkpoint.name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                "parts": parts}  # fmt: skip
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def unpack_state(state: Path, into: Path) -> Path:
    """The checkpoint folder a :func:`pack_state` wrote, restored under ``into``; refuses damaged or missing parts."""
    manifest = json.loads((state / "manifest.json").read_text())
    parts = [state / f"state.tar.{n:02d}" for n in range(len(manifest["parts"]))]
    missing = [part.name for part in parts if not part.is_file()]
    if missing:
        raise FileNotFoundError(f"State parts {missing} are missing from {state}: bring back every part of the piece.")
    data = b"".join(part.read_bytes() for part in parts)
    if hashlib.sha256(data).hexdigest() != manifest["sha256"]:
        raise ValueError(f"The state parts in {state} do not match their manifest: a part is missing or damaged.")
    into.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(into, filter="data")
    return into / manifest["checkpoint"]


# ----------------------------------------------------------------------------------------------------------
# stages


def stage_targets(args):
    from hf_blockdiff import convert_model, load_source
    from hf_blockdiff.distill import ar_targets

    sys.path.insert(0, str(Path(__file__).parent))
    from common import read_jsonl

    prompts = read_jsonl(args.prompts, "prompt")[args.first_prompt :][: args.max_prompts]  # chunks across calls
    prompts = prompts[: max(args.decode_batch, len(prompts) // args.decode_batch * args.decode_batch)]  # full batches
    source, tok = load_source(args.source, dtype="bfloat16", device=args.device)
    model, tok = convert_model(source, tok, block_size=1)  # block size 1 is the source, decoded by our engine
    start = time.time()
    data = ar_targets(model.eval(), tok, prompts, max_new_tokens=args.max_new_tokens, batch_size=args.decode_batch,
                      max_prompt_length=args.max_prompt_length, compile_step=False)  # fmt: skip
    # (uncompiled CUDA graphs: every engine shape, one per 256 positions of length, would compile for ~40 s)
    seconds = time.time() - start
    rows = [
        (ids, sum(1 for label in labels if label == -100)) for ids, labels in zip(data["input_ids"], data["labels"])
    ]
    shards = write_targets(rows, Path(args.out), args.part_mib * MIB, chunk=args.first_prompt)
    new = sum(len(ids) - prompt for ids, prompt in rows)
    info = {"prompts": len(prompts), "rows": len(rows), "finished": int(sum(data["finished"])), "new_tokens": new,
            "seconds": round(seconds, 1), "tokens_per_s": round(new / seconds), "shards": len(shards),
            "max_new_tokens": args.max_new_tokens}  # fmt: skip
    (Path(args.out) / f"targets_{args.first_prompt:06d}.json").write_text(json.dumps(info, indent=1))
    print(json.dumps(info))


def piece_clock(seconds: float):
    """Stops the piece after ``seconds`` (or at the run's last step) and saves a checkpoint there."""
    from transformers import TrainerCallback

    class PieceClock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.start, self.first_step = time.time(), state.global_step

        def on_step_end(self, args, state, control, **kwargs):
            if time.time() - self.start > seconds or state.global_step >= state.max_steps:
                control.should_training_stop = control.should_save = True

    return PieceClock()


def drafter_trainer(args, rows, output_dir: Path, callbacks):
    """The run's trainer: a noisy-scope adapter on ``rows`` (token ids, prompt length), settings from ``args``."""
    from datasets import Dataset
    from peft import LoraConfig

    from hf_blockdiff import BlockDiffusionConfig, BlockDiffusionTrainer, convert_model, load_source

    data = Dataset.from_dict({"input_ids": [ids for ids, _ in rows],
                              "labels": [[-100] * p + ids[p:] for ids, p in rows]}).shuffle(seed=0)  # fmt: skip
    source, tok = load_source(args.source, dtype="bfloat16" if args.device == "cuda" else "float32")
    model, tok = convert_model(source, tok, block_size=args.block_size)
    model.set_attn_implementation(args.attn)
    growth_sizes = max(1, (args.block_size // args.growth_start).bit_length() - 1)
    config = BlockDiffusionConfig(
        output_dir=str(output_dir), max_steps=args.total_steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=args.warmup_steps, weight_decay=0.0,
        bf16=args.device == "cuda", use_cpu=args.device == "cpu", logging_steps=args.logging_steps,
        save_strategy="no", report_to=[], max_length=args.max_length, block_size=args.block_size,
        adapter_scope="noisy", whole_block_noise=args.whole_block_noise, growth_start=args.growth_start,
        growth_interval_steps=max(1, int(args.total_steps * args.growth_fraction / growth_sizes)),
        certainty_loss_weight=args.certainty, soft_label_weight=args.soft_labels,
        diffusion_position_decay=args.position_decay, dataloader_num_workers=0 if args.device == "cpu" else 2, seed=0,
        pad_to_multiple_of=args.pad_to_multiple_of or None, torch_compile=args.compile,
    )  # fmt: skip
    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear", task_type="CAUSAL_LM")
    return BlockDiffusionTrainer(model, args=config, train_dataset=data, processing_class=tok, peft_config=lora,
                                 callbacks=callbacks)  # fmt: skip


def stage_train(args):
    from hf_blockdiff.convert import save_noisy_adapter

    out, work = Path(args.out), Path(args.work)
    rows = read_targets(Path(args.targets))[: args.max_rows]  # (a run keeps its rows while the folder grows)
    previous = Path(args.log).read_text() if args.log and Path(args.log).is_file() else ""
    if previous and json.loads(previous.splitlines()[-1])["rows"] != len(rows):
        raise ValueError(f"These targets have {len(rows)} rows; the run so far trained on "
                         f"{json.loads(previous.splitlines()[-1])['rows']}. Resume with its targets (--max-rows) or start a new run.")  # fmt: skip
    trainer = drafter_trainer(args, rows, work / "run", [piece_clock(args.minutes * 60)])
    resume = unpack_state(Path(args.state), work / "resumed") if args.state else None
    first = trainer.state.global_step if resume is None else json.loads(
        (resume / "trainer_state.json").read_text())["global_step"]  # fmt: skip
    start = time.time()
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    seconds = time.time() - start
    checkpoint = work / "run" / f"checkpoint-{trainer.state.global_step}"
    manifest = pack_state(checkpoint, out / "state", args.part_mib * MIB)
    save_noisy_adapter(trainer.model, work / "adapter")
    logs = [e for e in trainer.state.log_history if "diffusion_loss" in e and e.get("step", 0) > first]
    tokens = trainer._total_train_tokens
    entry = {"piece_steps": [first, trainer.state.global_step], "total_steps": args.total_steps,
             "seconds": round(seconds, 1), "block_size": trainer.current_block_size,
             "diffusion_loss": logs[-1]["diffusion_loss"] if logs else None,
             "ar_loss (source, logged)": logs[-1]["ar_loss"] if logs else None,
             "tokens_seen": int(tokens), "state_bytes": manifest["bytes"], "rows": len(rows),
             "settings": {k: v for k, v in vars(args).items() if k not in ("stage", "state", "out", "work")},
             "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
             "curve": [{k: e[k] for k in ("step", "diffusion_loss", "block_size", "learning_rate") if k in e}
                       for e in logs]}  # fmt: skip
    if args.eval_after:  # acceptance at the end of every piece: the run's curve against training tokens
        del trainer
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
        evaluation = argparse.Namespace(**{**vars(args), "adapter": str(work / "adapter"), "out": str(out / "eval.json"),
                                           "num_prompts": args.eval_after, "eval_batch": args.eval_after,
                                           "eval_blocks": [args.block_size], "no_graph": True})  # fmt: skip
        entry["acceptance"] = {"prompts": args.eval_after, "dtype": args.dtype, "new_tokens": args.new_tokens,
                               "rows": stage_evaluate(evaluation)["rows"]}  # fmt: skip
    (out / "drafter_log.jsonl").write_text(previous + json.dumps(entry) + "\n")
    print(json.dumps({k: v for k, v in entry.items() if k != "curve"}))


def stage_profile(args):
    """Where a training step's time goes: ``--profile-steps`` steps under torch.profiler after as many warm-up steps,
    the step's wall time against its kernels' time, and the top kernels and host operations."""
    sys.path.insert(0, str(Path(__file__).parent))
    from common import save
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback

    warmup, steps = args.profile_steps, args.profile_steps
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    profiler = profile(activities=activities)

    class Window(TrainerCallback):
        def on_step_begin(self, targs, state, control, **kwargs):
            if state.global_step == warmup:
                synchronize(args.device)
                self.start = time.perf_counter()
                profiler.__enter__()

        def on_step_end(self, targs, state, control, **kwargs):
            if state.global_step == warmup + steps:
                synchronize(args.device)
                self.seconds = time.perf_counter() - self.start
                profiler.__exit__(None, None, None)
                control.should_training_stop = True

    window = Window()
    args.total_steps = max(args.total_steps, warmup + steps)
    trainer = drafter_trainer(args, read_targets(Path(args.targets)), Path(args.work) / "profile", [window])
    trainer.train()
    events = profiler.key_averages()
    kernels = sorted((e for e in events if e.device_time_total > 0), key=lambda e: -e.self_device_time_total)
    host = sorted(events, key=lambda e: -e.self_cpu_time_total)
    rows = [{"what": "wall time of a step", "ms/step": 1000 * window.seconds / steps},
            {"what": "all kernels (device time)", "ms/step": sum(e.self_device_time_total for e in events) / 1000 / steps,
             "calls/step": sum(e.count for e in kernels) / steps}]  # fmt: skip
    rows += [{"what": f"kernel {e.key[:80]}", "ms/step": e.self_device_time_total / 1000 / steps,
              "calls/step": e.count / steps} for e in kernels[: args.top]]  # fmt: skip
    rows += [{"what": f"host {e.key[:80]}", "ms/step": e.self_cpu_time_total / 1000 / steps,
              "calls/step": e.count / steps} for e in host[: args.top]]  # fmt: skip
    notes = (f"train_drafter.py profile: {steps} steps after {warmup} warm-up steps, batch {args.batch_size}, "
             f"max_length {args.max_length}, block size at the start {args.growth_start}, attention {args.attn}. "
             "Kernel rows: self device time; host rows: self CPU time of each operator.")  # fmt: skip
    save(Path(args.out).name, "Drafter training step profile", rows, notes, ["what", "ms/step", "calls/step"])


def synchronize(device):
    if device == "cuda":
        torch.cuda.synchronize()


def stage_adapter(args):
    """The bf16 adapter of a state (its checkpoint holds the fp32 training weights)."""
    import shutil

    from safetensors.torch import load_file, save_file

    from hf_blockdiff.convert import NOISY_ADAPTER_CONFIG, NOISY_ADAPTER_WEIGHTS

    checkpoint, out = unpack_state(Path(args.state), Path(args.work) / "unpacked"), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    weights = load_file(checkpoint / NOISY_ADAPTER_WEIGHTS)
    save_file({k: v.to(torch.bfloat16) for k, v in weights.items()}, out / NOISY_ADAPTER_WEIGHTS)
    shutil.copy(checkpoint / NOISY_ADAPTER_CONFIG, out / NOISY_ADAPTER_CONFIG)
    print(f"{checkpoint.name}: {len(weights)} tensors -> {out}")


def acceptance_by_position(block_lengths: list[list[int]], depth: int = 8) -> list[float | None]:
    """Of the blocks that kept ``k - 1`` drafts, the share that kept draft ``k`` too, for ``k = 1 .. depth``: where a
    drafter's acceptance decays. A verified block is its first token and the drafts kept; each row's first block
    (the prefill's token may make one alone) and last (a budget or an EOS may cut it) are left out. None where no
    block got that far."""
    kept = [length - 1 for row in block_lengths for length in row[1:-1]]
    reached = [sum(k >= j for k in kept) for j in range(depth + 1)]
    return [round(reached[j] / reached[j - 1], 3) if reached[j - 1] else None for j in range(1, depth + 1)]


def stage_evaluate(args):
    """Acceptance (issue 19's metric), at batch 1 unless --eval-batch: per verify setting, tokens per forward,
    accepted drafts per block, and the share of prompts whose output equals the source's greedy output and the
    adapted model's own block size 1 (for a noisy-scope adapter the two are one; exact in fp32)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_engine import PROMPTS

    from hf_blockdiff import apply_adapter, convert_model, load_source

    source, tok = load_source(args.source, dtype=args.dtype, device=args.device)
    model, tok = convert_model(source, tok, block_size=args.block_size)
    model = model.to(args.device).eval()
    graph = args.device == "cuda" and not args.no_graph
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                       return_dict=True)["input_ids"] for p in PROMPTS[: args.num_prompts]]  # fmt: skip

    def decode(setting):
        # A batch gives each row what it gives alone (design 2.5), and `candidates` set explicitly keeps the plan,
        # so --eval-batch only changes how long this takes (exactly so in fp32).
        outputs, tokens, forwards, blocks, lengths = [], 0, 0, 0, []
        for start in range(0, len(prompts), args.eval_batch):
            group = prompts[start : start + args.eval_batch]
            width = max(map(len, group))
            ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in group], device=args.device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group], device=args.device)
            out = model.generate(ids, attention_mask=mask, max_new_tokens=args.new_tokens, do_sample=False,
                                 return_dict_in_generate=True, use_cuda_graph=graph, **setting)  # fmt: skip
            for row in range(len(group)):
                generated = int(out.num_generated_tokens[row])
                outputs.append(out.sequences[row, width : width + generated].tolist())
                tokens, forwards = tokens + generated, forwards + int(out.row_forward_passes[row])
                blocks += len(out.block_starts[row])
                starts = list(out.block_starts[row]) + [generated]
                lengths.append([end - start for start, end in zip(starts, starts[1:])])
        return outputs, tokens, forwards, blocks, lengths

    def share(outputs, reference):
        return sum(a == b for a, b in zip(outputs, reference)) / len(outputs)

    source_greedy = decode(dict(block_size=1))[0]  # before the adapter, block size 1 is the source (design 2.2)
    model = apply_adapter(model, args.adapter).eval()
    settings = {"b=1": dict(block_size=1)}
    for b in args.eval_blocks:
        settings[f"b={b} two-forward verify"] = dict(block_size=b, verify=True, candidates=0)
        for plan in args.plans:  # candidates:guesses[:width[:tree nodes]]
            candidates, guesses, width, tree = ([int(n) for n in plan.split(":")] + [0, 0])[:4]
            name = f"b={b} one-forward verify, {candidates} candidates, {guesses} guesses" + (
                f", width {width}" if width else "") + (f", tree of {tree}" if tree else "")  # fmt: skip
            settings[name] = dict(block_size=b, verify=True, candidates=min(candidates, b), guesses=guesses,
                                  candidate_width=width or None, draft_tree=tree)  # fmt: skip
    rows, own = [], None
    for name, setting in settings.items():
        outputs, tokens, forwards, blocks, lengths = decode(setting)
        own = own or outputs
        verified = setting.get("verify", False)
        rows.append({"decoding": name, "tokens per forward": round(tokens / forwards, 3),
                     "accepted drafts per block": round(tokens / blocks - 1, 3) if verified else None,
                     "= source greedy": share(outputs, source_greedy), "= own b=1": share(outputs, own),
                     "draft k kept, of blocks that kept k - 1": acceptance_by_position(lengths) if verified else None})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    result = {"adapter": str(args.adapter), "dtype": args.dtype, "prompts": args.num_prompts,
              "new_tokens": args.new_tokens, "rows": rows}  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    return result


def stage_curve(args):
    """Acceptance against training tokens from a run's log (the pieces trained with --eval-after): a table in
    benchmarks/results/<--out>.md/.json and a plot <--out>.png."""
    sys.path.insert(0, str(Path(__file__).parent))
    from common import RESULTS, save

    points, devices = [], []
    for line in Path(args.log).read_text().splitlines():
        entry = json.loads(line)
        devices.append(entry.get("device", "?"))
        for row in (entry.get("acceptance") or {}).get("rows", []):
            if "verify" in row["decoding"]:
                points.append({"step": entry["piece_steps"][1], "tokens seen": entry["tokens_seen"], **row})
    if not points:
        raise SystemExit(f"{args.log}: no piece has an acceptance entry (train with --eval-after N).")
    save(args.out, "Drafter acceptance against training tokens", points,
         f"From {args.log}: each piece's --eval-after evaluation (held-out chat prompts, greedy).",
         measured_on=f"Device: {', '.join(dict.fromkeys(devices))} (from the run's log)")  # fmt: skip
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(p["decoding"] for p in points):
        mine = [p for p in points if p["decoding"] == name]
        ax.plot([p["tokens seen"] / 1e6 for p in mine], [p["tokens per forward"] for p in mine], "o-", label=name)
    ax.set(xlabel="training tokens (M)", ylabel="tokens per forward", title="Drafter acceptance")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / f"{args.out}.png", dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["targets", "train", "adapter", "evaluate", "profile", "curve"])
    parser.add_argument("--source", help="GGUF path or a packaged name ('smollm2')")
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--part-mib", type=int, default=15)
    # targets
    parser.add_argument("--prompts", help="jsonl with a 'prompt' per line (benchmarks/drafter_prompts.py)")
    parser.add_argument("--max-prompts", type=int)
    parser.add_argument("--first-prompt", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--max-prompt-length", type=int, default=640)
    parser.add_argument("--decode-batch", type=int, default=256, help="rows decoded together")
    # train
    parser.add_argument("--targets", help="the folder the targets stage wrote")
    parser.add_argument("--state", help="the state folder the previous piece wrote (none: start the run)")
    parser.add_argument("--log", help="the run's drafter_log.jsonl so far (this piece appends to a copy in --out)")
    parser.add_argument("--work", default="drafter_work", help="scratch folder (checkpoints, unpacked state)")
    parser.add_argument("--minutes", type=float, default=6.0)
    parser.add_argument("--total-steps", type=int, default=6000)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--growth-start", type=int, default=4)
    parser.add_argument("--growth-fraction", type=float, default=0.1, help="share of the run spent growing")
    parser.add_argument("--whole-block-noise", type=float, default=0.5)
    parser.add_argument("--certainty", type=float, default=0.0)
    parser.add_argument("--position-decay", type=float, default=0.0,
                        help="DFlash's loss decay: weight a block's k-th position exp(-(k - 1) / this); 0: off")  # fmt: skip
    parser.add_argument("--soft-labels", type=float, default=0.0,
                        help="weight of the soft-label term (KL from the source's distribution; 0: off)")  # fmt: skip
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--max-rows", type=int, default=None,
                        help="train: the first N rows of --targets (the rows a run started with, once more are added)")  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=128,
                        help="rows per step (3x the tokens/s of 32 on the H200: benchmarks/results/trainer_drafter.md)")  # fmt: skip
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup-steps", type=int, default=50)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--attn", default="sdpa")
    parser.add_argument("--pad-to-multiple-of", type=int, default=64,
                        help="batch lengths (0: the longest row); padding changes no loss, and fewer shapes spare "
                        "cuDNN attention its per-shape graph builds")  # fmt: skip
    parser.add_argument("--compile", action="store_true", help="torch_compile: each decoder layer compiled in place")
    parser.add_argument("--logging-steps", type=int, default=25)
    parser.add_argument("--eval-after", type=int, default=0,
                        help="train: evaluate acceptance on this many held-out prompts after the piece (in its log)")  # fmt: skip
    parser.add_argument("--profile-steps", type=int, default=5, help="profile: steps profiled (after as many)")
    parser.add_argument("--top", type=int, default=20, help="profile: rows per table")
    # evaluate
    parser.add_argument("--adapter", help="evaluate: an adapter folder or a shipped name")
    parser.add_argument("--dtype", default="bfloat16", help="evaluate: float32 makes '= source greedy' exact")
    parser.add_argument("--eval-blocks", type=int, nargs="+", default=[16, 8])
    parser.add_argument("--plans", nargs="+", default=["15:1", "3:9"], metavar="C:G[:W[:T]]",
                        help="evaluate: one-forward verify's candidates, guesses per candidate, (optional) candidate "
                             "width (0: b) and tree nodes besides the chain, each a row; a step carries "
                             "b + T + (1 + G) * C * W query positions per row")  # fmt: skip
    parser.add_argument("--num-prompts", type=int, default=40)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--no-graph", action="store_true", help="evaluate eagerly (no capture/compile per shape)")
    parser.add_argument("--eval-batch", type=int, default=1, help="evaluate: prompts decoded together (left-padded)")
    args = parser.parse_args(argv)
    needs = {"targets": ["source", "prompts"], "train": ["source", "targets"], "adapter": ["state"],
             "evaluate": ["source", "adapter"], "profile": ["source", "targets"], "curve": ["log"]}[args.stage]  # fmt: skip
    for name in needs:
        if not getattr(args, name):
            parser.error(f"{args.stage} needs --{name}")
    stages = {
        "targets": stage_targets,
        "train": stage_train,
        "adapter": stage_adapter,
        "evaluate": stage_evaluate,
        "profile": stage_profile,
        "curve": stage_curve,
    }
    stages[args.stage](args)


if __name__ == "__main__":
    sys.exit(main())
