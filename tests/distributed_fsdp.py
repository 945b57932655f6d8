"""Worker of tests/test_distributed.py, run by ``torchrun --nproc_per_node 2`` on CPU (gloo): the two-stream
training forward under torch's FSDP2 (``fully_shard``, one unit per decoder layer) takes the same steps as the
unsharded model on the whole batch. Writes ``rank<i>.json`` into OUT (argv[1]) with the largest differences.

accelerate routes FSDP only on GPU-like devices (with ``use_cpu`` it falls back to DDP), so on CPU FSDP is
exercised here with torch directly; the trainer's DDP path is the other worker (distributed_train.py).
"""

import copy
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from helpers import converted_pair, padded_batch  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402

from hf_blockdiff import NoiseSampler  # noqa: E402

STEPS, LR, BLOCK = 3, 0.05, 4


def batch(mask_token_id, step):
    ids, am = padded_batch([14, 11, 16, 9], left=False, seed=step)
    labels = ids.masked_fill(am == 0, -100)
    labels[:, :3] = -100  # a prompt
    noise = NoiseSampler(mask_token_id)(ids, am, labels, BLOCK, generator=torch.Generator().manual_seed(step))
    return dict(input_ids=ids, attention_mask=am, labels=labels, noisy_input_ids=noise.noisy_input_ids)


def main(out: Path):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    _, reference, _ = converted_pair("llama", "sdpa", block_size=BLOCK)
    reference.train()
    sharded = copy.deepcopy(reference)
    for layer in sharded.model.layers:
        fully_shard(layer)
    fully_shard(sharded)
    opt_ref = torch.optim.SGD(reference.parameters(), lr=LR)
    opt = torch.optim.SGD(sharded.parameters(), lr=LR)
    loss_diff = 0.0
    for step in range(STEPS):
        inputs = batch(reference.config.mask_token_id, step)
        rows = {k: v[rank::world] for k, v in inputs.items()}  # this rank's share of the batch
        loss = sharded(**rows, block_size=BLOCK).loss
        loss.backward()  # FSDP averages the gradients over the ranks
        opt.step()
        opt.zero_grad()
        # Reference: every rank's share on the unsharded model, gradients averaged the same way.
        ref_losses = [
            reference(**{k: v[r::world] for k, v in inputs.items()}, block_size=BLOCK).loss for r in range(world)
        ]
        (sum(ref_losses) / world).backward()
        opt_ref.step()
        opt_ref.zero_grad()
        loss_diff = max(loss_diff, abs(loss.item() - ref_losses[rank].item()))
    reference_params = dict(reference.named_parameters())
    param_diff = max(
        (param.full_tensor() - reference_params[name]).abs().max().item() for name, param in sharded.named_parameters()
    )  # fmt: skip
    moved = max(
        (p - q).abs().max().item() for p, q in zip(reference.parameters(), converted_pair("llama")[1].parameters())
    )
    sharded_type = type(next(sharded.parameters())).__name__
    (out / f"rank{rank}.json").write_text(json.dumps({"world_size": world, "loss_diff": loss_diff, "param_diff": param_diff,
                                                      "moved": moved, "param_type": sharded_type}))  # fmt: skip
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(Path(sys.argv[1]))
