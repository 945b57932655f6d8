"""Where an engine step spends its GPU time: kernels of a few eager steps under torch.profiler, top by time.

python benchmarks/profile_engine.py --shape smollm2-135m --batch 16 --block-size 16
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
from common import random_model, save  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    model = random_model(args.shape, "sdpa").eval()
    ids = torch.randint(0, 1000, (args.batch, args.context), device="cuda")
    kwargs = dict(max_new_tokens=64, block_size=args.block_size, threshold=1.0, eos_token_id=[], pad_token_id=0,
                  use_cuda_graph=False)  # fmt: skip
    with torch.no_grad():
        model.generate(ids, **kwargs)  # warm-up
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            out = model.generate(ids, return_dict_in_generate=True, **kwargs)
            torch.cuda.synchronize()
    steps = out.num_forward_passes
    rows = []
    for event in sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[: args.top]:
        rows.append({"kernel": event.key[:90], "calls/step": event.count / steps,
                     "us/step": event.device_time_total / steps})  # fmt: skip
    total = sum(e.device_time_total for e in prof.key_averages()) / steps
    rows.append({"kernel": "all kernels", "calls/step": sum(e.count for e in prof.key_averages()) / steps,
                 "us/step": total})  # fmt: skip
    save(f"profile_engine_{args.shape}_b{args.batch}", f"Engine step kernels: {args.shape}, batch {args.batch}, "
         f"block {args.block_size}, eager", rows, columns=["kernel", "calls/step", "us/step"])  # fmt: skip


if __name__ == "__main__":
    main()
