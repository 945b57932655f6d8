"""LoRA block-diffusion adaptation (TRL-style script). The mask token's embedding row is trained too
(PEFT ``trainable_token_indices``); tied embeddings stay tied. Optionally merges the adapter into a standalone
block-diffusion checkpoint that loads with ``trust_remote_code=True``.

    python examples/train_lora.py --model smollm2 --dataset sharegpt --output_dir smollm2-bd-lora \
        --block_size 16 --lora_r 16 --max_steps 2000 --learning_rate 2e-4 --bf16 --merged_output_dir smollm2-bd
    # source-exact: the adapter acts only where blocks are denoised; verify=True then decodes the source's output
    python examples/train_lora.py ... --adapter_scope noisy
    accelerate launch --config_file examples/accelerate/ddp.yaml examples/train_lora.py ...
"""

from dataclasses import dataclass, field

from peft import LoraConfig
from train_full import ScriptArguments, datasets, parse

from hf_blockdiff import BlockDiffusionConfig, BlockDiffusionTrainer, convert_model, load_source
from hf_blockdiff.convert import save_block_diffusion


@dataclass
class LoraArguments:
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    lora_target_modules: str = field(default="all-linear", metadata={"help": "Modules to adapt ('all-linear')."})
    merged_output_dir: str | None = field(
        default=None, metadata={"help": "Also write the merged, standalone block-diffusion checkpoint here."}
    )


def main(script_args, lora_args, args):
    train, evaluation = datasets(script_args, args.seed)  # first: it fails faster than the model loads
    model, tokenizer = load_source(script_args.model, dtype="bfloat16" if args.bf16 else None)
    model, tokenizer = convert_model(model, tokenizer, block_size=args.block_size, mask_token=args.mask_token)
    peft_config = LoraConfig(
        r=lora_args.lora_r, lora_alpha=lora_args.lora_alpha, lora_dropout=lora_args.lora_dropout,
        target_modules=lora_args.lora_target_modules, task_type="CAUSAL_LM",
    )  # fmt: skip
    trainer = BlockDiffusionTrainer(model, args=args, train_dataset=train, eval_dataset=evaluation,
                                    processing_class=tokenizer, peft_config=peft_config)  # fmt: skip
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    trainer.save_model()  # the adapter (--adapter_scope noisy: a loadable checkpoint with its adapter unmerged)
    if lora_args.merged_output_dir and trainer.is_world_process_zero():
        model = trainer.model
        merged = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
        save_block_diffusion(merged, tokenizer, lora_args.merged_output_dir,
                             {"conversion": {"block_size": args.block_size, "source": script_args.model},
                              "training": trainer.training_summary()})  # fmt: skip


if __name__ == "__main__":
    main(*parse((ScriptArguments, LoraArguments, BlockDiffusionConfig)))
