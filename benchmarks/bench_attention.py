"""What one decode step's attention costs per layer, by kernel, batch, query positions and valid context (issue 20).

python benchmarks/bench_attention.py                     # on the GPU: SmolLM2 and Qwen2-1.5B heads
python benchmarks/bench_attention.py --device cpu --shapes tiny --batches 1 --contexts 64 --slots 256  # a dry run

Every row is one layer's attention for ``batch`` rows of ``queries`` positions each, over the keys the engine
attends at that context: its valid-prefix window (the smallest power of two >= 256 that holds the context and the
queries, or all ``--slots`` when that is not smaller). The mask says "key < context + queries": the kernels' cost,
not the context-causal rule (masks.py owns that). The kernels, all on grouped query heads:

- ``one pass``: attention.py's fold with sdpa's masked kernel (what the engine did before the split);
- ``split keys``: attention.py's :func:`split_key_attention` with :func:`key_splits` chunks (what it does now;
  the column ``splits`` says how many, 1 = the same as one pass);
- ``stock (repeat kv)``: transformers' sdpa function, which copies every KV head per query head under a mask;
- ``no mask``: sdpa without a mask over the same keys (its flash kernel), a lower bound for a kernel that takes
  per-row key lengths;
- ``flex`` (``--flex``): flex attention, compiled, with a block mask whose tiles past each row's context are empty.

Timing as the engine runs: ``--layers`` calls captured in one CUDA graph (no launch overhead), replayed; CUDA
events after warm-up, the median of ``--repeats`` replays over ``--layers``. The table is saved under
benchmarks/results/.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "src"))
from common import save  # noqa: E402

from hf_blockdiff import attention  # noqa: E402

# (query heads, KV heads, head dim) of the models the engine grid measures
HEADS = {"smollm2-135m": (9, 3, 64), "qwen2-1.5b": (12, 2, 128), "tiny": (4, 2, 16)}
MIN_WINDOW = 256  # engine.DecodeEngine.MIN_WINDOW


def window_of(context: int, queries: int, slots: int) -> int:
    need = context + queries
    return min(slots, max(MIN_WINDOW, 1 << (need - 1).bit_length()))


def grouped(q, k, v, mask, split: bool):
    """attention.py's grouped-head function as the engine calls it, with the key split on or off."""
    module = type("Layer", (), {"num_key_value_groups": q.shape[1] // k.shape[1]})()
    before, attention.SPLIT_KEYS = attention.SPLIT_KEYS, split
    try:
        return attention.grouped_sdpa_attention_forward(module, q, k, v, mask)[0]
    finally:
        attention.SPLIT_KEYS = before


def kernels(batch, queries, context, slots, heads, device, dtype, flex: bool):
    """{name: a function running one layer's attention} for one shape, its window and the split it takes."""
    q_heads, kv_heads, dim = heads
    window = window_of(context, queries, slots)
    q = torch.randn(batch, queries, q_heads, dim, device=device, dtype=dtype).transpose(1, 2)  # as layers pass it
    k = torch.randn(batch, kv_heads, slots, dim, device=device, dtype=dtype)[:, :, :window]  # a view, as the cache's
    v = torch.randn(batch, kv_heads, slots, dim, device=device, dtype=dtype)[:, :, :window]
    mask = (torch.arange(window, device=device) < context + queries).expand(batch, 1, queries, window)
    module = type("Layer", (), {"num_key_value_groups": q_heads // kv_heads, "is_causal": False})()
    found = {
        "one pass": lambda: grouped(q, k, v, mask, split=False),
        "split keys": lambda: grouped(q, k, v, mask, split=True),
        "stock (repeat kv)": lambda: sdpa_attention_forward(module, q, k, v, mask)[0],
        "no mask": lambda: sdpa_attention_forward(module, q, k, v, None, is_causal=False)[0],
        # not timed: the error columns' reference (a merge bug hides inside "split vs one pass" at bf16 sizes)
        "fp32": lambda: sdpa_attention_forward(module, q.float(), k.float(), v.float(), mask)[0],
    }
    if flex:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        lengths = torch.full((batch,), context + queries, device=device)
        block_mask = create_block_mask(lambda b, h, qi, kv: kv < lengths[b], batch, None, queries, window,
                                       device=device)  # fmt: skip
        compiled = torch.compile(flex_attention, dynamic=False)
        found["flex"] = lambda: compiled(q, k, v, block_mask=block_mask, enable_gqa=True)
    splits = attention.key_splits(batch, kv_heads, queries * q_heads // kv_heads, window, torch.device(device))
    return found, window, splits


def graph_time(fn, layers: int, repeats: int, device: str) -> float:
    """Microseconds per call: ``layers`` calls in one CUDA graph, replayed (the wall clock off CUDA)."""
    if torch.device(device).type != "cuda":
        import time

        start = time.perf_counter()
        for _ in range(layers):
            fn()
        return (time.perf_counter() - start) / layers * 1e6
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm-up (and compilation) outside the capture
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(layers):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000 / layers)
    return statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["smollm2-135m", "qwen2-1.5b"], choices=sorted(HEADS))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--queries", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--contexts", type=int, nargs="+", default=[128, 1024, 4096])
    parser.add_argument("--slots", type=int, default=4096 + 256, help="cache positions per row (the grid's cache)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--layers", type=int, default=30, help="calls per CUDA graph (SmolLM2 has 30 layers)")
    parser.add_argument("--flex", action="store_true", help="also flex attention (compiled once per shape)")
    parser.add_argument("--out", default="attention_kernels")
    args = parser.parse_args(argv)
    dtype = torch.bfloat16 if torch.device(args.device).type == "cuda" else torch.float32
    # flex is compiled once per shape: past dynamo's recompile limit (8) it would silently run uncompiled
    torch._dynamo.config.recompile_limit = 1024
    rows = []
    names = ["one pass", "split keys", "stock (repeat kv)", "no mask"] + (["flex"] if args.flex else [])
    columns = ["shape", "batch", "queries", "context", "window", "splits"] + [f"{n} us" for n in names]
    columns += ["split vs one pass", "one pass err", "split err"]

    def save_rows():  # after every batch, so a run cut short by a time limit keeps its table
        save(args.out, f"One layer's decode attention by kernel ({args.slots} cache slots per row)", rows,
             notes=f"us: microseconds per call of one layer's attention ({args.layers} calls in one CUDA graph, "
                   f"CUDA events after warm-up, median of {args.repeats} replays). splits: key chunks of split keys "
                   "(attention.key_splits). err: max abs difference from the same attention in fp32 (the split's should be the "
                   "one pass's: more is a merge bug, not rounding). Command: python benchmarks/bench_attention.py "
                   + " ".join(argv or sys.argv[1:]),
             columns=columns)  # fmt: skip

    for shape in args.shapes:
        for batch in args.batches:
            for queries in args.queries:
                for context in args.contexts:
                    if context + queries > args.slots:
                        continue
                    found, window, splits = kernels(batch, queries, context, args.slots, HEADS[shape], args.device,
                                                    dtype, args.flex)  # fmt: skip
                    row = {"shape": shape, "batch": batch, "queries": queries, "context": context, "window": window,
                           "splits": splits}  # fmt: skip
                    with torch.no_grad():
                        for name in names:
                            micros = graph_time(found[name], args.layers, args.repeats, args.device)
                            row[f"{name} us"] = round(micros, 1)
                        reference = found["fp32"]()
                        for name, column in (("one pass", "one pass err"), ("split keys", "split err")):
                            error = (found[name]().float() - reference).abs().max().item()
                            row[column] = float(f"{error:.2g}")  # max abs against fp32: the two should match
                    row["split vs one pass"] = round(row["split keys us"] / row["one pass us"], 3)
                    rows.append(row)
                    print(row, flush=True)
            save_rows()


if __name__ == "__main__":
    main()
