"""Full block-diffusion adaptation of an autoregressive checkpoint, converting it on the fly (TRL-style script).

    python examples/train_full.py --model smollm2 --dataset sharegpt --output_dir smollm2-bd \
        --block_size 16 --max_steps 2000 --per_device_train_batch_size 16 --learning_rate 2e-5 --bf16
    accelerate launch --config_file examples/accelerate/ddp.yaml examples/train_full.py ...   # multi-GPU
    python examples/train_full.py config.yaml                                                  # YAML

Every field of hf_blockdiff.BlockDiffusionConfig (and trl.SFTConfig) is a flag; --help lists them.
"""

import sys
from dataclasses import dataclass, field

from transformers import HfArgumentParser

from hf_blockdiff import BlockDiffusionConfig, BlockDiffusionTrainer, convert_model, load_source
from hf_blockdiff.data import load_named_dataset


@dataclass
class ScriptArguments:
    model: str = field(
        default="smollm2", metadata={"help": "AR checkpoint: directory, Hub id, GGUF file or 'smollm2'."}
    )
    dataset: str = field(default="sharegpt", metadata={"help": "wiki | sharegpt | sharegpt-chat | a file | a Hub id."})
    eval_size: int = field(default=0, metadata={"help": "Hold out this many examples for evaluation."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use at most this many examples."})


def parse(dataclasses):
    parser = HfArgumentParser(dataclasses)
    if len(sys.argv) == 2 and sys.argv[1].endswith((".yaml", ".yml")):
        return parser.parse_yaml_file(sys.argv[1])
    return parser.parse_args_into_dataclasses()


def datasets(script_args, seed):
    """(train, eval or None); a missing dataset package ends the script with one line saying what to install."""
    try:
        data = load_named_dataset(script_args.dataset)
    except FileNotFoundError as error:
        sys.exit(f"error: {error}")
    data = data.shuffle(seed=seed)
    if script_args.max_train_samples:
        data = data.select(range(min(script_args.max_train_samples + script_args.eval_size, len(data))))
    if script_args.eval_size:
        split = data.train_test_split(test_size=script_args.eval_size, seed=seed)
        return split["train"], split["test"]
    return data, None


def main(script_args, args):
    train, evaluation = datasets(script_args, args.seed)  # first: it fails faster than the model loads
    model, tokenizer = load_source(script_args.model, dtype="bfloat16" if args.bf16 else None)
    model, tokenizer = convert_model(model, tokenizer, block_size=args.block_size, mask_token=args.mask_token)
    trainer = BlockDiffusionTrainer(
        model, args=args, train_dataset=train, eval_dataset=evaluation, processing_class=tokenizer
    )
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    trainer.save_model()
    if args.push_to_hub:
        trainer.push_to_hub()


if __name__ == "__main__":
    main(*parse((ScriptArguments, BlockDiffusionConfig)))
