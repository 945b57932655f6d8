"""`hf_blockdiff serve` under load against the engine's offline generate() at the same batch, in one run.

    python benchmarks/bench_serve.py --model smollm2 --adapter smollm2-bd16              # GPU: the issue's table
    python benchmarks/bench_serve.py --device cpu --concurrency 1 8 --max-tokens 32      # a CPU dry run
    python benchmarks/bench_serve.py --model out/smollm2-bd --cli-defaults --concurrency 1 4  # as `serve` starts

For each concurrency C: a server with C slots on 127.0.0.1 (the real HTTP stack: uvicorn, FastAPI, the `openai`
client), C client threads each sending its share of the chat prompts back to back, greedy, ``max_tokens`` each;
then the same prompts through ``model.generate()`` in batches of C. Columns: requests/s, completion tokens/s,
mean latency per request, tokens per forward (server ``usage``), and the server's tok/s over offline tok/s (the
cost of HTTP, queueing and continuous batching; the target is a gap under 15%). Wall clock (the server's work is
spread over threads); the first round of each side is a warm-up.
"""

from __future__ import annotations

import argparse
import copy
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_engine import PROMPTS  # noqa: E402
from common import save  # noqa: E402


def load(args):
    import hf_blockdiff

    source, tokenizer = hf_blockdiff.load_source(args.model, dtype=args.dtype)
    model, tokenizer = hf_blockdiff.convert_model(source, copy.deepcopy(tokenizer), block_size=args.block_size)
    if args.adapter:
        model = hf_blockdiff.apply_adapter(model, args.adapter)
    return model.to(args.device).eval(), tokenizer


def start_server(model, tokenizer, slots, max_length, settings):
    import openai
    import uvicorn

    from hf_blockdiff.scheduler import Scheduler
    from hf_blockdiff.serve import create_app

    scheduler = Scheduler(model, tokenizer, max_batch=slots, max_length=max_length, **settings).start()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(scheduler, "bench"), host="127.0.0.1", port=port,
                                           log_level="warning"))  # fmt: skip
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=3600, max_retries=0)

    def stop():
        server.should_exit = True
        thread.join()
        scheduler.stop()

    return client, stop


def load_test(client, prompts, concurrency, max_tokens):
    """All prompts through the server, ``concurrency`` at a time: (seconds, [usage], [latency])."""

    def ask(prompt):
        start = time.perf_counter()
        reply = client.chat.completions.create(model="bench", messages=[{"role": "user", "content": prompt}],
                                               max_tokens=max_tokens, temperature=0)  # fmt: skip
        return reply.usage, time.perf_counter() - start

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(ask, prompts))
    return time.perf_counter() - start, [u for u, _ in results], [t for _, t in results]


def offline(model, tokenizer, prompts, batch, max_tokens, settings):
    """The same prompts through generate() in batches: (seconds, generated tokens)."""
    tokenizer.padding_side = "left"
    tokens = 0
    start = time.perf_counter()
    for i in range(0, len(prompts), batch):
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                               add_generation_prompt=True) for p in prompts[i : i + batch]]  # fmt: skip
        inputs = tokenizer(texts, return_tensors="pt", padding=True).to(model.device)
        out = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False, return_dict_in_generate=True,
                             **settings)  # fmt: skip
        tokens += int(out.num_generated_tokens.sum())
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, tokens


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--adapter", default=None)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=None, help="requests per level (default: 2 x concurrency, "
                        "at least 8)")  # fmt: skip
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 elsewhere")
    parser.add_argument("--cli-defaults", action="store_true",
                        help="serve as `hf_blockdiff serve MODEL` does on this device (its slots, max length and block "
                        "size; the model's threshold) at every concurrency; generate() gets the same block settings "
                        "(--block-size and --threshold are then unused)")  # fmt: skip
    parser.add_argument("--out", default="serve_smollm2")
    args = parser.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if torch.device(args.device).type == "cuda" else "float32")

    model, tokenizer = load(args)
    settings = dict(block_size=args.block_size, threshold=args.threshold)
    if args.cli_defaults:
        from hf_blockdiff import cli

        served = cli.serve_defaults(cli.build_parser().parse_args(["serve", args.model]), model.device.type)
        settings = {"block_size": served["block_size"]} if served["block_size"] else {}
        args.block_size, args.threshold = served["block_size"] or model.config.block_size, "the model's"
    rows = []
    for concurrency in args.concurrency:
        n = args.requests or max(8, 2 * concurrency)
        prompts = (PROMPTS * (n // len(PROMPTS) + 1))[:n]
        slots, max_length = (served["max_batch"], served["max_length"]) if args.cli_defaults else (
            concurrency, 512 + args.max_tokens)  # fmt: skip
        client, stop = start_server(model, tokenizer, slots, max_length, settings)
        try:
            load_test(client, prompts[:concurrency], concurrency, args.max_tokens)  # warm-up
            seconds, usages, latencies = load_test(client, prompts, concurrency, args.max_tokens)
        finally:
            stop()
        offline(model, tokenizer, prompts[:concurrency], concurrency, args.max_tokens, settings)  # warm-up
        off_seconds, off_tokens = offline(model, tokenizer, prompts, concurrency, args.max_tokens, settings)
        tokens = sum(u.completion_tokens for u in usages)
        rows.append({
            "concurrency": concurrency, "requests": n, "req/s": n / seconds, "server tok/s": tokens / seconds,
            "mean latency s": sum(latencies) / n,
            "tokens/forward": tokens / sum(u.forward_passes for u in usages),
            "offline tok/s": off_tokens / off_seconds, "server / offline": (tokens / seconds) / (off_tokens / off_seconds),
        })  # fmt: skip
        print(rows[-1], flush=True)
    what = args.model + (f" + {args.adapter}" if args.adapter else "")
    save(args.out, f"Server under load vs offline generate(): {what}, b={args.block_size} thr={args.threshold}, "
         f"{args.max_tokens} tokens, {args.dtype}", rows,
         notes="Command: python benchmarks/" + Path(__file__).name + " " + " ".join(argv or sys.argv[1:]))  # fmt: skip


if __name__ == "__main__":
    main()
