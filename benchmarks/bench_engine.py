"""The decode engine against transformers' own generate() on the same weights, all in one run, one GPU.

    python benchmarks/bench_engine.py --model smollm2 --adapter smollm2-bd16     # SmolLM2 + the shipped adapter
    python benchmarks/bench_engine.py --shape qwen2-1.5b                         # random weights: pure speed
    python benchmarks/bench_engine.py --shape smollm2-135m --stock-sdpa          # transformers' sdpa path (A/B)
    python benchmarks/bench_engine.py --shape smollm2-135m --masked-prefill      # prefill under the dense mask (A/B)

Decoders: the source model under HF ``generate()`` (eager dynamic cache, and ``cache_implementation="static"``,
which transformers compiles on CUDA), and ``model.generate()`` of the block-diffusion model (the engine). Chat
prompts, greedy, 128 new tokens (up to each row's EOS), batches 1 / 16 / 64 (batch 1: each of the 40 prompts
alone). Columns: tok/s (generated tokens
over wall time; CUDA events after warm-up, median of repeats), ms per forward (ours: per engine step; HF: per
decode step), tokens per forward per row (mean of each row's tokens / its forwards) and for the batch (all tokens
/ all row-forwards), the ratio to HF static tok/s measured in the same run, and GPU memory (peak allocated during
the timed run, over the weights; the static KV cache's size).

Then the context grid (issue 20): every ``--batches`` x ``--contexts`` (random prompts of exactly that many
tokens, 128 new tokens, no EOS) for HF static and each ``--context-settings`` decoder (default: ours b=1, and
``generate()``'s defaults). Every decoder of a batch gets one cache of ``max(contexts) + 128`` positions (as a
server has one ``max_length``; ``--context-cache own``: each context its own), so one compiled decoder per batch
serves every context. ms/forward there is decode only: (time of the 128-token call - time of a prefill-only call)
/ (their difference in forwards); prefill ms is the prefill-only call.

    python benchmarks/bench_engine.py --model GGUF --no-chat --batches 64 --contexts 128 1024 4096 --out grid_b64
    python benchmarks/bench_engine.py --merge grid_b1_contexts grid_b16_contexts grid_b64_contexts --out grid
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import merge, random_model, save, timer  # noqa: E402

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
    and captures); returns (ms, outputs of the timed run, peak bytes allocated during it, None off CUDA)."""
    outputs = []

    def every_group():
        outputs[:] = [generate(inputs) for inputs in groups]

    generate(groups[0])
    cuda = groups[0]["input_ids"].is_cuda
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    ms = time_fn(every_group)
    return ms, outputs, torch.cuda.max_memory_allocated() if cuda else None


def cache_bytes(cache) -> tuple[int, int] | tuple[None, None]:
    """(bytes, positions per row) of a KV cache's keys and values: the engine's ``SlotCache`` or transformers'
    ``StaticCache`` (its layers' ``keys`` / ``values``)."""
    if cache is None:
        return None, None
    if isinstance(getattr(cache, "keys", None), list):  # SlotCache
        tensors = cache.keys + cache.values
    else:
        tensors = [t for layer in getattr(cache, "layers", []) for t in (layer.keys, layer.values)]
    tensors = [t for t in tensors if isinstance(t, torch.Tensor) and t.numel()]
    if not tensors:
        return None, None
    return sum(t.numel() * t.element_size() for t in tensors), tensors[0].shape[-2]


def held_engine(model):
    """The engine ``generate()`` keeps on the model (denoise.decode_engine), or None."""
    holder = model.__dict__.get("_blockdiff_engine")
    return getattr(holder, "engine", None)


def release_engine(model):
    """Free the kept engine (its cache and graph), so another decoder's memory is measured without it."""
    holder = model.__dict__.get("_blockdiff_engine")
    if holder is not None:
        holder.engine = None


def run_hf(source, groups, eos, static, time_fn, new=NEW_TOKENS):
    kwargs = dict(max_new_tokens=new, do_sample=False, eos_token_id=eos or None, pad_token_id=0,
                  return_dict_in_generate=True)  # fmt: skip
    if static:
        kwargs["cache_implementation"] = "static"

    def generate(inputs):  # keep the sequences and the cache's size, not the cache (the next call allocates its own)
        out = source.generate(**inputs, **kwargs)
        cache = next((out[k] for k in ("cache", "past_key_values") if out.get(k) is not None), None)
        return out.sequences, cache_bytes(cache) if static else (None, None)

    ms, outs, peak = run_groups(generate, groups, time_fn)
    tokens, steps, texts = 0, 0, []
    for inputs, (out, _) in zip(groups, outs):
        lengths = generated_lengths(out, inputs["input_ids"].shape[1], eos)
        tokens, steps = tokens + int(lengths.sum()), steps + out.shape[1] - inputs["input_ids"].shape[1]
        texts += new_tokens(out, inputs, lengths)
    cache, slots = outs[-1][1]
    return dict(ms=ms, tokens=tokens, forwards=steps, tpf_row=1.0, tpf_batch=1.0, texts=texts, peak=peak,
                cache=cache, slots=slots)  # fmt: skip


def run_ours(model, groups, eos, time_fn, new=NEW_TOKENS, key_window=True, choose_tree=True, **settings):
    from hf_blockdiff.engine import DecodeEngine

    kwargs = dict(max_new_tokens=new, eos_token_id=eos, pad_token_id=0, return_dict_in_generate=True, **settings)
    DecodeEngine.key_window = key_window  # read at every step, so a reused engine follows it too
    DecodeEngine.choose_tree = choose_tree  # (part of the kept engine's key: another value builds a new one)
    try:
        ms, outs, peak = run_groups(lambda inputs: model.generate(**inputs, **kwargs), groups, time_fn)
    finally:
        DecodeEngine.key_window = DecodeEngine.choose_tree = True
    tokens = torch.cat([out.num_generated_tokens.float().cpu() for out in outs])
    row_forwards = torch.cat([out.row_forward_passes.float().cpu() for out in outs])
    texts = [t for inputs, out in zip(groups, outs)
             for t in new_tokens(out.sequences, inputs, out.num_generated_tokens.cpu())]  # fmt: skip
    engine = held_engine(model)
    cache, slots = cache_bytes(engine.cache if engine is not None else None)
    plan = None
    if engine is not None:  # what the call decoded with (verify_plan may have chosen block size 1)
        verify = bool(engine.verify.any())
        plan = f"b={engine.block_size}" + (f" verify c={engine.candidates} g={engine.guesses}" if verify else "")
    return dict(ms=ms, tokens=int(tokens.sum()), forwards=sum(out.num_forward_passes for out in outs),
                tpf_row=float((tokens / row_forwards).mean()), tpf_batch=float(tokens.sum() / row_forwards.sum()),
                texts=texts, peak=peak, cache=cache, slots=slots, plan=plan)  # fmt: skip


def decoder_setting(setting: str) -> tuple[str, dict]:
    """(name, generate() settings) of a --settings entry: ``default`` (generate()'s own), ``b:threshold[:eager]``
    or ``b:verify[:candidates[:guesses[:candidate width (0: b)[:tree nodes]]]]``; prefixed ``all:``, the engine
    attends every slot of its cache instead of the valid prefix (``DecodeEngine.key_window`` off: the A/B of that);
    prefixed ``fixed:``, a tree of drafts is the fixed tree of a prior instead of chosen per step
    (``DecodeEngine.choose_tree`` off)."""
    if setting.startswith("all:"):
        name, settings = decoder_setting(setting[len("all:") :])
        return f"{name}, all keys", {**settings, "key_window": False}
    if setting.startswith("fixed:"):
        name, settings = decoder_setting(setting[len("fixed:") :])
        return f"{name}, fixed tree", {**settings, "choose_tree": False}
    if setting == "default":
        return "ours default", {}
    size, threshold, *extra = setting.split(":")
    if threshold == "verify":
        candidates = int(extra[0]) if extra else None
        guesses = int(extra[1]) if len(extra) > 1 else None
        width = int(extra[2]) or None if len(extra) > 2 else None
        tree = int(extra[3]) if len(extra) > 3 else None
        name = f"ours b={size} verify" + (f" c={candidates}" if extra else " (auto c)") + (
            f" g={guesses}" if guesses is not None else "") + (f" w={width}" if width else "") + (
            f" tree={tree}" if tree else "")  # fmt: skip
        return name, dict(block_size=int(size), verify=True, candidates=candidates, guesses=guesses,
                          candidate_width=width, draft_tree=tree)  # fmt: skip
    name = f"ours b={size} thr {threshold}" + (" uncompiled" if extra else "")
    # compile_step only when it is off: left out (None) it is what generate()'s defaults give, so a default decoder
    # that decodes at block size 1 (denoise.verify_plan) reuses this one's engine, compiled graph and all
    return name, dict(block_size=int(size), threshold=float(threshold), **({"compile_step": False} if extra else {}))


def decoder_name(name, r):
    return f"{name} ({r['plan']})" if name == "ours default" and r.get("plan") else name


@contextlib.contextmanager
def cache_length(source, length: int):
    """Size HF static's cache and our engine's slots for ``length`` positions (prompt + new tokens) in every call
    whose own need is at most that, so that one compiled decoder serves every prompt length up to it:
    transformers' static cache takes ``max(the call's length, model._previous_max_cache_length)``, and
    ``denoise.decode_engine`` rounds a call's length up to a multiple of ``ENGINE_LENGTH_STEP``."""
    from hf_blockdiff import denoise

    step = denoise.ENGINE_LENGTH_STEP
    denoise.ENGINE_LENGTH_STEP = length
    source._previous_max_cache_length = length
    try:
        yield
    finally:
        denoise.ENGINE_LENGTH_STEP = step
        source.__dict__.pop("_previous_max_cache_length", None)


@contextlib.contextmanager
def without_eos(source):
    """HF generate() with no EOS from the model's generation config (``eos_token_id=None`` falls back to it), so
    that every row of a random prompt decodes all its new tokens, as ours does with no EOS."""
    config = source.generation_config
    eos = config.eos_token_id
    config.eos_token_id = None
    try:
        yield
    finally:
        config.eos_token_id = eos


def new_tokens(sequences, inputs, lengths) -> list[list[int]]:
    start = inputs["input_ids"].shape[1]
    return [sequences[r, start : start + int(n)].tolist() for r, n in enumerate(lengths)]


GIB = 2**30


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--adapter", default=None)
    parser.add_argument("--shape", default=None, help="random weights of a named shape instead of --model")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--settings", nargs="+",
                        default=["1:1.0", "16:0.9", "16:verify:0", "16:verify", "8:verify"],
                        help="block_size:threshold[:eager] for our decoder (eager: compile_step=False), or "
                        "block_size:verify[:candidates[:guesses[:width]]] (lossless verified decoding; candidates 0: "
                        "two forwards per block; left out: chosen by the batch; guesses: per candidate; width: "
                        "positions per candidate), or default (generate()'s own settings); "
                        "any of them prefixed all: attends every cache slot instead of the valid prefix, prefixed "
                        "fixed: checks a fixed tree of drafts instead of one chosen per step")  # fmt: skip
    parser.add_argument("--dtype", default="bfloat16", help="bfloat16, or float32 for the exactness check")
    parser.add_argument("--new-tokens", type=int, default=NEW_TOKENS, help="new tokens per prompt (chat table)")
    parser.add_argument("--no-hf", action="store_true", help="skip HF generate() (e.g. the fp32 exactness run)")
    parser.add_argument("--no-hf-eager", action="store_true", help="HF static only (eager is slow and no baseline)")
    parser.add_argument("--no-chat", action="store_true", help="only the context grid (no chat-prompt table)")
    parser.add_argument("--contexts", type=int, nargs="*", default=[128, 1024, 4096],
                        help="prompt lengths of the context grid (none: no grid)")  # fmt: skip
    parser.add_argument("--context-settings", nargs="+", default=["1:1.0", "default"],
                        help="our decoders in the context grid, as --settings")  # fmt: skip
    parser.add_argument("--context-cache", choices=["longest", "own"], default="longest",
                        help="longest: every decoder of a batch gets one cache of max(contexts) + new tokens "
                        "positions (one compiled decoder per batch); own: each context max its own")  # fmt: skip
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=len(PROMPTS), help="batch 1 runs each of the first N alone")
    parser.add_argument("--stock-sdpa", action="store_true",
                        help="our decoders on transformers' sdpa path, which repeats the KV heads under a mask, instead "
                        "of grouped query heads (hf_blockdiff/attention.py): the A/B of that change")  # fmt: skip
    parser.add_argument("--masked-prefill", action="store_true",
                        help="prefill under the dense mask instead of as plain causal attention "
                        "(DecodeEngine.causal_prefill off): the A/B of that")  # fmt: skip
    parser.add_argument("--out", default="engine_smollm2")
    parser.add_argument("--merge", nargs="+", metavar="RESULT",
                        help="only merge saved tables (benchmarks/results/RESULT.json, e.g. one process per batch) "
                        "into one saved as --out")  # fmt: skip
    args = parser.parse_args(argv)
    if args.merge:
        merge(args.out, args.merge)
        return

    from hf_blockdiff.engine import DecodeEngine

    DecodeEngine.grouped_sdpa = not args.stock_sdpa
    DecodeEngine.causal_prefill = not args.masked_prefill
    source, model, tokenizer = load(args)
    vocab = model.config.vocab_size
    eos = [] if tokenizer is None else [tokenizer.eos_token_id]
    cuda = torch.device(args.device).type == "cuda"
    time_fn = timer(args.device)
    weights = torch.cuda.memory_allocated() if cuda else None  # both models' weights (the baseline of peak GiB)

    def timed(fn):  # (run_groups warms up)
        return time_fn(fn, warmup=0, repeats=args.repeats if cuda else 1)

    def memory(r):
        return {"peak GiB": (r["peak"] - weights) / GIB if r.get("peak") is not None else None,
                "cache GiB": r["cache"] / GIB if r.get("cache") is not None else None}  # fmt: skip

    rows = []
    what = f"random {args.shape}" if args.shape else f"{args.model}" + (f" + {args.adapter}" if args.adapter else "")
    command = "Command: python benchmarks/bench_engine.py " + " ".join(argv or sys.argv[1:])
    memory_note = ("peak GiB: torch.cuda.max_memory_allocated() during the decoder's timed run, less the weights of "
                   "both models (allocated before any run); what other decoders left allocated counts too (the engine "
                   "generate() keeps is freed before HF runs). cache GiB: the static KV cache, keys + values (ours: "
                   "the engine's slots, scratch slots for candidates included; HF: its StaticCache).")  # fmt: skip

    def save_rows():  # after every group, so a run cut short by a time limit still leaves its table
        save(args.out, f"Decode engine vs HF generate: {what}, {args.new_tokens} new tokens, greedy", rows,
             notes="tok/s counts each row's tokens up to its EOS. HF static is transformers' compiled static-cache "
                   "decode. ms/forward: ours per engine step (one forward serves every row still decoding), HF per "
                   "decode step. tpf: tokens per forward, per row (mean) and for the batch (tokens / row-forwards). "
                   "= HF greedy: the fraction of rows whose tokens equal the source's (HF static) greedy output. "
                   + memory_note + " " + command,
             columns=["batch", "decoder", "tok/s", "ms/forward", "tpf row", "tpf batch", "vs HF static",
                      "vs ours b=1", "= HF greedy", "= ours b=1", "peak GiB", "cache GiB"])  # fmt: skip

    for batch in [] if args.no_chat else args.batches:
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

            rows.append({"batch": batch, "decoder": decoder_name(name, r), "tok/s": tps,
                         "ms/forward": r["ms"] / r["forwards"], "tpf row": r["tpf_row"], "tpf batch": r["tpf_batch"],
                         "vs HF static": tps / tps_of(ref) if ref else None, "vs ours b=1": tps / tps_of(ar) if ar else None,
                         "= HF greedy": agree(ref), "= ours b=1": agree(ar), **memory(r)})  # fmt: skip
            print(rows[-1], flush=True)
            save_rows()

        if not args.no_hf:
            release_engine(model)
            if not args.no_hf_eager:
                measured("HF eager", run_hf(source, groups, eos, False, timed, new=args.new_tokens))
            measured("HF static", run_hf(source, groups, eos, True, timed, new=args.new_tokens))
        for setting in args.settings:
            name, settings = decoder_setting(setting)
            measured(name, run_ours(model, groups, eos, timed, new=args.new_tokens, **settings))
        save_rows()

    # The context grid: batch x context, HF static against our decoders, decode-only ms per forward.
    grid, contexts = [], args.contexts
    longest = max(contexts, default=0) + NEW_TOKENS
    decoders = ([] if args.no_hf else [("HF static", None)]) + [decoder_setting(s) for s in args.context_settings]
    relative = f"ms/fwd vs ctx {contexts[0]}" if contexts else None

    def save_grid():
        save(f"{args.out}_contexts", f"Decode engine vs HF static by batch and context: {what}, {NEW_TOKENS} new "
             "tokens, greedy, random prompts", grid,
             notes="Prompts: random tokens, exactly `context` of them; no EOS (every row decodes all its new tokens). "
                   + ("Every decoder of a batch has one cache of max(contexts) + new tokens positions (ours: plus a "
                      "block, and candidates' scratch slots), as a server has one max_length. "
                      if args.context_cache == "longest" else "Each context has a cache of its own length. ")
                   + "tok/s: all generated tokens over the whole call (prefill included). decode tok/s and "
                   "ms/forward: decode only, (the call - a prefill-only call (max_new_tokens=1)) over its tokens / "
                   "forwards (ours: per engine step, one forward serves every row). prefill ms: the prefill-only "
                   "call. vs HF static: tok/s over HF static's at the same batch and context; decode vs HF: the "
                   f"same for decode tok/s. {relative}: ms/forward over the same decoder's at the first context. "
                   "ours default: generate() without block settings (in brackets: what it decoded with). "
                   + memory_note + " cache slots: positions per row of that cache. " + command,
             columns=["batch", "context", "decoder", "tok/s", "decode tok/s", "ms/forward", "prefill ms", "tpf row",
                      "vs HF static", "decode vs HF", relative, "peak GiB", "cache GiB", "cache slots"])  # fmt: skip

    for batch in args.batches if contexts else []:
        release_engine(model)  # the previous batch's engine is no memory of this one's decoders
        hf = {}
        for name, settings in decoders:
            first = None
            for context in contexts:
                groups = [batch_inputs(None, batch, args.device, vocab, context=context)]
                length = longest if args.context_cache == "longest" else context + NEW_TOKENS
                with cache_length(source, length), without_eos(source):
                    if settings is None:
                        full = run_hf(source, groups, [], True, timed)
                        prefill = run_hf(source, groups, [], True, timed, new=1)
                    else:
                        full = run_ours(model, groups, [], timed, **settings)
                        prefill = run_ours(model, groups, [], timed, new=1, **settings)
                ms, forwards = full["ms"] - prefill["ms"], full["forwards"] - prefill["forwards"]
                decode_ms = ms / forwards if forwards > 0 and ms > 0 else None
                decode_tps = (full["tokens"] - prefill["tokens"]) / ms * 1000 if ms > 0 else None
                tps = full["tokens"] / full["ms"] * 1000
                first = first or decode_ms
                ref = hf.get(context)
                row = {"batch": batch, "context": context, "decoder": decoder_name(name, full), "tok/s": tps,
                       "decode tok/s": decode_tps, "ms/forward": decode_ms, "prefill ms": prefill["ms"],
                       "tpf row": full["tpf_row"], "vs HF static": tps / ref["tok/s"] if ref else None,
                       "decode vs HF": decode_tps / ref["decode tok/s"] if ref and decode_tps and ref["decode tok/s"] else None,
                       relative: decode_ms / first if first and decode_ms else None, **memory(full),
                       "cache slots": full["slots"]}  # fmt: skip
                if settings is None:
                    hf[context] = row
                grid.append(row)
                print(row, flush=True)
                save_grid()


if __name__ == "__main__":
    main()
