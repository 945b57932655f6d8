"""Worker of tests/test_distributed.py, run by ``accelerate launch --cpu --num_processes 2``: trains a tiny random
model with BlockDiffusionTrainer and block growth, then writes per-rank records into OUT (argv[1]):
``rank<i>.json`` (block size seen at every step, loss logs, parameter checksum) and the final model ``OUT/model``.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from helpers import WORDS, source_model, tiny_tokenizer, weights_digest  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from hf_blockdiff import BlockDiffusionConfig, BlockDiffusionTrainer  # noqa: E402

USE_CPU = "--fsdp" not in sys.argv  # FSDP is not applied when use_cpu=True forces the MULTI_CPU (DDP) path
STEPS, SCHEDULE = 40, dict(block_size=4, growth_warmup_steps=2, growth_interval_steps=4)


class Record(TrainerCallback):
    """The block size each optimizer step ran at (growth applies at step begin; read it at step end)."""

    def __init__(self):
        self.sizes = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.sizes[state.global_step - 1] = int(model.config.block_size)


def main(out: Path):
    rows = [" ".join(f"w{(s + i) % WORDS}" for i in range(24)) for s in range(64)]
    args = BlockDiffusionConfig(output_dir=str(out / "run"), max_steps=STEPS, per_device_train_batch_size=4,
                                learning_rate=3e-3, logging_steps=1, report_to=[], save_strategy="no", use_cpu=USE_CPU, bf16=False,
                                max_length=32, seed=0, dataloader_num_workers=0, **SCHEDULE)  # fmt: skip
    record = Record()
    trainer = BlockDiffusionTrainer(source_model("llama"), args=args, train_dataset=Dataset.from_dict({"text": rows}),
                                    processing_class=tiny_tokenizer(), callbacks=[record])  # fmt: skip
    trainer.train()
    trainer.save_model(str(out / "model"))
    rank = trainer.accelerator.process_index
    (out / f"rank{rank}.json").write_text(
        json.dumps(
            {
                "world_size": trainer.accelerator.num_processes,
                "sizes": record.sizes,
                "schedule": SCHEDULE,
                "logs": [e for e in trainer.state.log_history if "ar_loss" in e],
                "weights": weights_digest(trainer.model),
                "distributed_type": str(trainer.accelerator.distributed_type),
                "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
            }
        )  # fmt: skip
    )


if __name__ == "__main__":
    torch.set_num_threads(1)  # two processes share the CI machine's two cores
    main(Path(sys.argv[1]))
