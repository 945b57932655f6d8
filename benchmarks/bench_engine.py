"""The decode engine against transformers' own generate() on the same weights, all in one run, one GPU.

    python benchmarks/bench_engine.py --model smollm2 --adapter smollm2-bd16     # SmolLM2 + the shipped adapter
    python benchmarks/bench_engine.py --shape qwen2-1.5b                         # random weights: pure speed

Decoders: the source model under HF ``generate()`` (eager dynamic cache, and ``cache_implementation="static"``,
which transformers compiles on CUDA), and ``model.generate()`` of the block-diffusion model (the engine). Chat
prompts, greedy, 128 new tokens (up to each row's EOS), batches 1 / 16 / 64 (batch 1: each of the 40 prompts
alone). Columns: tok/s (generated tokens
over wall time; CUDA events after warm-up, median of repeats), ms per forward (ours: per engine step; HF: per
decode step), tokens per forward per row (mean of each row's tokens / its forwards) and for the batch (all tokens
/ all row-forwards), and the ratio to HF static tok/s measured in the same run. Then ms per forward at a 128 and
a 4,096-token context.
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
    "Explain why the sky is blue in two sentences.", "Write a short poem about a lighthouse.",
    "What are three tips for learning a new language?", "Summarize the plot of Romeo and Juliet.",
    "How does a refrigerator keep food cold?", "Give me a recipe for a simple tomato soup.",
    "What is the difference between weather and climate?", "Describe the water cycle for a ten-year-old.",
    "List some benefits of regular exercise.", "Why do cats purr?",
    "Write a friendly email inviting a colleague to lunch.", "What causes earthquakes?",
    "Explain what a computer program is.", "How do bees make honey?",
    "What should I pack for a weekend hiking trip?", "Tell me a fun fact about the ocean.",
    "How do I make a cup of green tea?", "What is photosynthesis?", "Give me three ideas for a birthday party.",
    "Why is sleep important?", "Explain how a bicycle works.", "What is the capital of Japan and why is it famous?",
    "Write a haiku about autumn leaves.", "How can I save money on groceries?",
    "What is the difference between a virus and a bacterium?", "Describe a typical day of a firefighter.",
    "How do airplanes stay in the air?", "Suggest a name for a friendly robot and explain it.",
    "What are the planets of the solar system?", "How do I start learning to play the guitar?",
    "Explain recycling to a child.", "What makes a good friend?", "Why do leaves change colour in autumn?",
    "Write two sentences about the moon.", "How does the internet work, in simple terms?",
    "What is a healthy breakfast?", "Give me tips for a job interview.", "What is gravity?",
    "Describe the taste of a lemon.", "How do plants drink water?",
]  # fmt: skip
NEW_TOKENS = 128


def load(args):
    """(AR source, block-diffusion model, tokenizer) in bf16 on the GPU."""
    import hf_blockdiff

    if args.shape:
        model = random_model(args.shape, "sdpa", dtype=getattr(torch, args.dtype), device=args.device)
        source = copy.deepcopy(model)
        source.__class__ = [c for c in type(model).__mro__ if c.__name__.endswith("ForCausalLM")][1]
        return source.eval(), model.eval(), None
    source, tokenizer = hf_blockdiff.load_source(args.model, dtype=args.dtype)
    model, tokenizer = hf_blockdiff.convert_model(copy.deepcopy(source), copy.deepcopy(tokenizer), block_size=16)
    if args.adapter:
        model = hf_blockdiff.apply_adapter(model, args.adapter)
    return source.to(args.device).eval(), model.to(args.device).eval(), tokenizer


def batch_inputs(tokenizer, batch, device, vocab, context=None, first=0, pad_to=None):
    if tokenizer is None or context:  # random prompts (random model, or a fixed context length)
        g = torch.Generator().manual_seed(0)
        lengths = [context] * batch if context else [24 + (7 * i) % 20 for i in range(batch)]
        ids = torch.zeros((batch, max(lengths)), dtype=torch.long)
        am = torch.zeros_like(ids)
        for r, n in enumerate(lengths):
            ids[r, -n:] = torch.randint(0, vocab - 2, (n,), generator=g)
            am[r, -n:] = 1
        return {"input_ids": ids.to(device), "attention_mask": am.to(device)}
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in (PROMPTS * 2)[first : first + batch]
    ]
    tokenizer.padding_side = "left"
    padding = dict(padding="max_length", max_length=pad_to) if pad_to else dict(padding=True)
    return tokenizer(texts, return_tensors="pt", **padding).to(device)


def generated_lengths(sequences, prompt_len, eos_ids):
    new = sequences[:, prompt_len:]
    if not eos_ids:
        return torch.full((new.shape[0],), new.shape[1])
    is_eos = torch.isin(new, torch.tensor(eos_ids, device=new.device))
    first = torch.where(is_eos.any(1), is_eos.float().argmax(1) + 1, new.shape[1])
    return first.cpu()


def run_groups(generate, groups, time_fn):
    """Time ``generate(inputs)`` over every group of prompts in turn (warm-up: the first group, which compiles
    and captures); returns (ms, outputs of the timed run)."""
    outputs = []

    def every_group():
        outputs[:] = [generate(inputs) for inputs in groups]

    generate(groups[0])
    return time_fn(every_group), outputs


def run_hf(source, groups, eos, static, time_fn):
    kwargs = dict(max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=eos or None, pad_token_id=0)
    if static:
        kwargs["cache_implementation"] = "static"
    ms, outs = run_groups(lambda inputs: source.generate(**inputs, **kwargs), groups, time_fn)
    tokens, steps, texts = 0, 0, []
    for inputs, out in zip(groups, outs):
        lengths = generated_lengths(out, inputs["input_ids"].shape[1], eos)
        tokens, steps = tokens + int(lengths.sum()), steps + out.shape[1] - inputs["input_ids"].shape[1]
        texts += new_tokens(out, inputs, lengths)
    return dict(ms=ms, tokens=tokens, forwards=steps, tpf_row=1.0, tpf_batch=1.0, texts=texts)


def run_ours(model, groups, eos, time_fn, **settings):
    kwargs = dict(
        max_new_tokens=NEW_TOKENS, eos_token_id=eos, pad_token_id=0, return_dict_in_generate=True, **settings
    )
    ms, outs = run_groups(lambda inputs: model.generate(**inputs, **kwargs), groups, time_fn)
    tokens = torch.cat([out.num_generated_tokens.float().cpu() for out in outs])
    row_forwards = torch.cat([out.row_forward_passes.float().cpu() for out in outs])
    texts = [t for inputs, out in zip(groups, outs)
             for t in new_tokens(out.sequences, inputs, out.num_generated_tokens.cpu())]  # fmt: skip
    return dict(ms=ms, tokens=int(tokens.sum()), forwards=sum(out.num_forward_passes for out in outs),
                tpf_row=float((tokens / row_forwards).mean()), tpf_batch=float(tokens.sum() / row_forwards.sum()),
                texts=texts)  # fmt: skip


def new_tokens(sequences, inputs, lengths) -> list[list[int]]:
    start = inputs["input_ids"].shape[1]
    return [sequences[r, start : start + int(n)].tolist() for r, n in enumerate(lengths)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--adapter", default=None)
    parser.add_argument("--shape", default=None, help="random weights of a named shape instead of --model")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--settings", nargs="+",
                        default=["1:1.0", "16:0.9", "16:verify:0", "16:verify", "8:verify"],
                        help="block_size:threshold[:eager] for our decoder (eager: compile_step=False), or "
                        "block_size:verify[:candidates] (lossless verified decoding; candidates 0: two forwards per "
                        "block; left out: chosen by the batch)")  # fmt: skip
    parser.add_argument("--dtype", default="bfloat16", help="bfloat16, or float32 for the exactness check")
    parser.add_argument("--no-hf", action="store_true", help="skip HF generate() (e.g. the fp32 exactness run)")
    parser.add_argument("--no-hf-eager", action="store_true", help="HF static only (eager is slow and no baseline)")
    parser.add_argument("--contexts", type=int, nargs="*", default=[128, 4096])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=len(PROMPTS), help="batch 1 runs each of the first N alone")
    parser.add_argument("--out", default="engine_smollm2")
    args = parser.parse_args(argv)

    source, model, tokenizer = load(args)
    vocab = model.config.vocab_size
    eos = [] if tokenizer is None else [tokenizer.eos_token_id]
    cuda = torch.device(args.device).type == "cuda"
    time_fn = timer(args.device)

    def timed(fn):  # (run_groups warms up)
        return time_fn(fn, warmup=0, repeats=args.repeats if cuda else 1)

    rows = []
    what = f"random {args.shape}" if args.shape else f"{args.model}" + (f" + {args.adapter}" if args.adapter else "")

    def save_rows():  # after every group, so a run cut short by a time limit still leaves its table
        save(args.out, f"Decode engine vs HF generate: {what}, {NEW_TOKENS} new tokens, greedy", rows,
             notes="tok/s counts each row's tokens up to its EOS. HF static is transformers' compiled static-cache "
                   "decode. ms/forward: ours per engine step (one forward serves every row still decoding), HF per "
                   "decode step. tpf: tokens per forward, per row (mean) and for the batch (tokens / row-forwards). "
                   "= HF greedy: the fraction of rows whose tokens equal the source's (HF static) greedy output. "
                   "Command: python benchmarks/bench_engine.py " + " ".join(argv or sys.argv[1:]),
             columns=["batch", "decoder", "tok/s", "ms/forward", "tpf row", "tpf batch", "vs HF static",
                      "vs ours b=1", "= HF greedy", "= ours b=1"])  # fmt: skip

    for batch in args.batches:
        if batch == 1 and tokenizer is not None:  # each of the first --prompts prompts alone, left-padded to one
            # shape (HF static compiles once per shape)
            longest = batch_inputs(tokenizer, args.prompts, "cpu", vocab)["input_ids"].shape[1]
            groups = [batch_inputs(tokenizer, 1, args.device, vocab, first=i, pad_to=longest)
                      for i in range(args.prompts)]  # fmt: skip
        else:
            groups = [batch_inputs(tokenizer, batch, args.device, vocab)]
        results = {}

        def measured(name, r):  # a row per decoder as soon as it is measured (a run cut short keeps them)
            results[name] = r
            tps, ar, ref = r["tokens"] / r["ms"] * 1000, results.get("ours b=1 thr 1.0"), results.get("HF static")

            def tps_of(x):
                return x["tokens"] / x["ms"] * 1000

            def agree(ref):
                return sum(a == b for a, b in zip(r["texts"], ref["texts"])) / len(r["texts"]) if ref else None

            rows.append({"batch": batch, "decoder": name, "tok/s": tps, "ms/forward": r["ms"] / r["forwards"],
                         "tpf row": r["tpf_row"], "tpf batch": r["tpf_batch"],
                         "vs HF static": tps / tps_of(ref) if ref else None, "vs ours b=1": tps / tps_of(ar) if ar else None,
                         "= HF greedy": agree(ref), "= ours b=1": agree(ar)})  # fmt: skip
            print(rows[-1], flush=True)
            save_rows()

        if not args.no_hf:
            if not args.no_hf_eager:
                measured("HF eager", run_hf(source, groups, eos, False, timed))
            measured("HF static", run_hf(source, groups, eos, True, timed))
        for setting in args.settings:
            size, threshold, *extra = setting.split(":")
            if threshold == "verify":
                candidates = int(extra[0]) if extra else None
                name = f"ours b={size} verify" + (f" c={candidates}" if extra else " (auto c)")
                measured(name, run_ours(model, groups, eos, timed, block_size=int(size), verify=True,
                                        candidates=candidates))  # fmt: skip
                continue
            eager = extra
            name = f"ours b={size} thr {threshold}" + (" uncompiled" if eager else "")
            measured(name, run_ours(model, groups, eos, timed, block_size=int(size), threshold=float(threshold),
                                    compile_step=not eager))  # fmt: skip
        save_rows()

    for context in args.contexts:
        inputs = batch_inputs(None, 1, args.device, vocab, context=context)
        for name, fn in {
            "HF static": lambda: run_hf(source, [inputs], [], True, timed),
            "ours b=16 thr 1.0": lambda: run_ours(model, [inputs], [], timed, block_size=16, threshold=1.0),
            "ours b=16 thr 0.0": lambda: run_ours(model, [inputs], [], timed, block_size=16, threshold=0.0),
        }.items():
            r = fn()
            rows.append({"batch": 1, "decoder": f"{name}, context {context}", "ms/forward": r["ms"] / r["forwards"],
                         "tpf row": r["tpf_row"], "tok/s": r["tokens"] / r["ms"] * 1000})  # fmt: skip
            print(rows[-1], flush=True)
        save_rows()


if __name__ == "__main__":
    main()
