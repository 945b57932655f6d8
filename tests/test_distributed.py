"""Multi-process training on CPU (gloo), two processes: DDP through BlockDiffusionTrainer with block growth
(launched by ``accelerate launch``), and the two-stream forward under torch's FSDP2."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import weights_digest
from transformers import AutoModelForCausalLM

from hf_blockdiff import block_size_at

TESTS = Path(__file__).parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(command, out: Path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "HF_BLOCKDIFF_TEST_DEVICE": "cpu",
           "HF_BLOCKDIFF_TEST_DTYPE": "float32",
           "PYTHONPATH": os.pathsep.join([str(TESTS.parent / "src"), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    proc = subprocess.run(command + [str(out)], capture_output=True, text=True, env=env, cwd=out, timeout=300)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def mean(values):
    return sum(values) / len(values)


@pytest.mark.slow
def test_ddp_training_with_block_growth_on_two_cpu_processes(tmp_path):
    # `accelerate launch --cpu` always starts a single process; --multi_gpu starts torchrun, and the worker's
    # use_cpu=True makes it multi-CPU DDP over gloo.
    command = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
               str(TESTS / "distributed_train.py")]  # fmt: skip
    ranks = launch(command, tmp_path)
    for rank in ranks:
        assert rank["world_size"] == 2 and rank["backend"] == "gloo"
        assert rank["distributed_type"].endswith("MULTI_CPU")
    schedule = ranks[0]["schedule"]
    expected = {
        str(step): block_size_at(step, schedule["block_size"], 1, 2, schedule["growth_warmup_steps"],
                                 schedule["growth_interval_steps"])
        for step in range(len(ranks[0]["logs"]))
    }  # fmt: skip
    assert ranks[0]["sizes"] == ranks[1]["sizes"] == expected  # every step, both ranks, the schedule
    assert ranks[0]["weights"] == ranks[1]["weights"]  # DDP kept the replicas identical

    logs = ranks[0]["logs"]
    assert [e["block_size"] for e in logs] == [float(expected[str(s)]) for s in range(len(logs))]
    assert mean([e["ar_loss"] for e in logs[-5:]]) < 0.5 * mean([e["ar_loss"] for e in logs[:5]])
    final = [e["diffusion_loss"] for e in logs if e["block_size"] == schedule["block_size"]]
    assert len(final) >= 20 and mean(final[-6:]) < 0.85 * mean(final[:6])

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model", trust_remote_code=True)
    assert type(model).__name__ == "BlockDiffusionLlamaForCausalLM"
    assert type(model).__module__.startswith("transformers_modules.")
    assert model.config.block_size == schedule["block_size"]
    assert weights_digest(model) == ranks[0]["weights"]  # the checkpoint holds the trained weights
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3, 4]])).logits).all()


@pytest.mark.slow
def test_fsdp2_two_stream_steps_equal_unsharded_on_two_cpu_processes(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), str(TESTS / "distributed_fsdp.py")]  # fmt: skip
    ranks = launch(command, tmp_path)
    for rank in ranks:
        assert rank["world_size"] == 2 and rank["param_type"] == "DTensor"  # really sharded
        assert rank["moved"] > 1e-3  # the steps changed the weights
        assert rank["loss_diff"] < 1e-5 and rank["param_diff"] < 1e-5
