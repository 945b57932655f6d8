"""What one decode step's attention costs per layer, by kernel, batch, query positions and valid context (issue 20).

python benchmarks/bench_attention.py                     # on the GPU: SmolLM2 and Qwen2-1.5B heads
python benchmarks/bench_attention.py --device cpu --shapes tiny --batches 1 --contexts 64 --slots 256  # a dry run

Every row is one layer's attention for ``batch`` rows of ``queries`` positions each, against a cache of ``--slots``
positions per row whose first ``context`` are valid (the rest: slots a row was given but has not used). The
kernels, all on grouped query heads:

- ``sdpa, all slots``: the engine with ``key_window`` off: a dense bool mask over every slot (the mask folded
  to ``(rows, 1, G x q, slots)`` as ``attention.py`` does, a copy per call);
- ``sdpa, valid window``: the same over the engine's valid-prefix window (the smallest power of two >= 256 that
  holds the context), what the engine does now;
- ``sdpa, no mask, window``: the window without a mask, a lower bound for a kernel that takes per-row lengths;
- ``flex, block mask``: flex attention (compiled) over all slots with a block mask whose tiles past each row's
  context are empty, so the kernel skips them (its decoding kernel splits the keys for few queries).

The mask only says "key < context": the kernels' cost, not the context-causal rule (masks.py owns that).
Timings: CUDA events after warm-up, median of repeats; the table is saved under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import save, timer  # noqa: E402

# (query heads, KV heads, head dim) of the models the engine grid measures
HEADS = {"smollm2-135m": (9, 3, 64), "qwen2-1.5b": (12, 2, 128), "tiny": (4, 2, 16)}
MIN_WINDOW = 256  # engine.DecodeEngine.MIN_WINDOW


def window_of(context: int, queries: int, slots: int) -> int:
    need = context + queries
    return min(slots, max(MIN_WINDOW, 1 << (need - 1).bit_length()))


def grouped_sdpa(q, k, v, mask):
    """attention.py's fold: the G query heads of a KV head become G x Q query rows, the mask repeated to match."""
    batch, heads, q_len, dim = q.shape
    groups = heads // k.shape[1]
    q = q.reshape(batch, k.shape[1], groups * q_len, dim)
    if mask is not None:
        mask = mask.unsqueeze(2).expand(-1, -1, groups, -1, -1).reshape(batch, 1, groups * q_len, -1)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.reshape(batch, heads, q_len, dim)


def kernels(batch, queries, context, slots, heads, device, dtype):
    """{name: a function running one layer's attention} for one shape."""
    q_heads, kv_heads, dim = heads
    q = torch.randn(batch, q_heads, queries, dim, device=device, dtype=dtype)
    k = torch.randn(batch, kv_heads, slots, dim, device=device, dtype=dtype)
    v = torch.randn_like(k)
    key = torch.arange(slots, device=device)
    full_mask = (key < context + queries).expand(batch, 1, queries, slots)
    window = window_of(context, queries, slots)
    found = {
        "sdpa, all slots": lambda: grouped_sdpa(q, k, v, full_mask),
        "sdpa, valid window": lambda: grouped_sdpa(q, k[:, :, :window], v[:, :, :window], full_mask[..., :window]),
        "sdpa, no mask, window": lambda: grouped_sdpa(q, k[:, :, :window], v[:, :, :window], None),
    }
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        lengths = torch.full((batch,), context + queries, device=device)
        block_mask = create_block_mask(lambda b, h, qi, kv: kv < lengths[b], batch, None, queries, slots,
                                       device=device)  # fmt: skip
        flex = torch.compile(flex_attention, dynamic=False)
        found["flex, block mask"] = lambda: flex(q, k, v, block_mask=block_mask, enable_gqa=True)
    except Exception as error:  # flex is optional here: the table says why a row is missing
        print(f"flex attention unavailable ({type(error).__name__}: {error})", flush=True)
    return found, window


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["smollm2-135m", "qwen2-1.5b"], choices=sorted(HEADS))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--queries", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--contexts", type=int, nargs="+", default=[128, 1024, 4096])
    parser.add_argument("--slots", type=int, default=4096 + 256, help="cache positions per row (the grid's cache)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default="attention_kernels")
    args = parser.parse_args(argv)
    dtype = torch.bfloat16 if torch.device(args.device).type == "cuda" else torch.float32
    time_fn = timer(args.device)
    # flex is compiled once per shape: past dynamo's recompile limit (8) it would silently run uncompiled
    torch._dynamo.config.recompile_limit = 1024
    rows = []
    names = ["sdpa, all slots", "sdpa, valid window", "sdpa, no mask, window", "flex, block mask"]
    columns = ["shape", "batch", "queries", "context", "window"] + [f"{n} us" for n in names]

    def save_rows():  # after every batch, so a run cut short by a time limit keeps its table
        save(args.out, f"One layer's decode attention by kernel ({args.slots} cache slots per row)", rows,
             notes="us: microseconds per call of one layer's attention (CUDA events after warm-up, median of "
                   f"{args.repeats}). Command: python benchmarks/bench_attention.py " + " ".join(argv or sys.argv[1:]),
             columns=columns)  # fmt: skip

    for shape in args.shapes:
        for batch in args.batches:
            for queries in args.queries:
                for context in args.contexts:
                    if context + queries > args.slots:
                        continue
                    found, window = kernels(batch, queries, context, args.slots, HEADS[shape], args.device, dtype)
                    row = {"shape": shape, "batch": batch, "queries": queries, "context": context, "window": window}
                    with torch.no_grad():
                        for name, fn in found.items():
                            row[f"{name} us"] = time_fn(fn, warmup=3, repeats=args.repeats) * 1000
                    rows.append(row)
                    print(row, flush=True)
            save_rows()


if __name__ == "__main__":
    main()
