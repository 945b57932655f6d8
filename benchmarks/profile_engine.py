"""Where an engine step spends its GPU time: kernels of a few eager steps under torch.profiler, top by time.

python benchmarks/profile_engine.py --shape smollm2-135m --batch 16 --block-size 16
python benchmarks/profile_engine.py --model GGUF --adapter smollm2-bd16 --batch 16 --block-size 4 --candidates 1
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
    parser.add_argument("--model", default=None, help="real weights (bench_engine.py's --model) instead of --shape")
    parser.add_argument("--adapter", default=None)
    parser.add_argument("--candidates", type=int, default=None, help="profile verified decoding with this many "
                        "candidates (0: two forwards per block) instead of threshold decoding")  # fmt: skip
    parser.add_argument("--guesses", type=int, default=None, help="guessing copies per candidate (with --candidates)")
    args = parser.parse_args(argv)
    if args.model:
        from bench_engine import load

        load_args = argparse.Namespace(shape=None, model=args.model, adapter=args.adapter, dtype="bfloat16",
                                       device="cuda")  # fmt: skip
        model = load(load_args)[1]
    else:
        model = random_model(args.shape, "sdpa").eval()
    ids = torch.randint(0, 1000, (args.batch, args.context), device="cuda")
    kwargs = dict(max_new_tokens=64, block_size=args.block_size, threshold=1.0, eos_token_id=[], pad_token_id=0,
                  use_cuda_graph=False)  # fmt: skip
    if args.candidates is not None:
        kwargs.pop("threshold")
        kwargs.update(verify=True, candidates=args.candidates)
        if args.guesses is not None:
            kwargs.update(guesses=args.guesses)
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
    what = args.model or args.shape
    how = "" if args.candidates is None else f", verify with {args.candidates} candidates"
    how += "" if args.guesses is None else f" x {args.guesses} guesses"
    name = (
        f"profile_engine_{Path(what).stem}_b{args.batch}_k{args.block_size}_ctx{args.context}"
        + ("" if args.candidates is None else f"_c{args.candidates}")
        + ("" if args.guesses is None else f"_g{args.guesses}")
    )
    save(name, f"Engine step kernels: {what}, batch {args.batch}, block {args.block_size}, context {args.context}"
         f"{how}, eager", rows,
         columns=["kernel", "calls/step", "us/step"])  # fmt: skip


if __name__ == "__main__":
    main()
