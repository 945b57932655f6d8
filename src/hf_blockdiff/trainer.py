# Copyright 2026 The hf_blockdiff authors. Apache-2.0.
"""Adaptation training: :class:`BlockDiffusionConfig` (a ``trl.SFTConfig``) and :class:`BlockDiffusionTrainer`
(a ``trl.SFTTrainer``) for the combined diffusion + AR loss with gradual block growth (docs/design.md 2.3-2.4).

Everything SFTTrainer does still applies: plain-text, conversational and prompt-completion datasets, chat
templates, completion-only loss, ``peft_config``, accelerate/DDP/FSDP. The trainer only samples the noise and
calls the model's two-stream forward, which computes both losses inside ``forward``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import is_torch_bf16_gpu_available, logging
from trl import SFTConfig, SFTTrainer

from .convert import NOISY_ADAPTER_CONFIG, convert_model, load_noisy_adapter, save_noisy_adapter
from .curriculum import BlockGrowthCallback
from .noise import NoiseSampler

logger = logging.get_logger(__name__)


@dataclass
class BlockDiffusionConfig(SFTConfig):
    r"""Configuration of :class:`BlockDiffusionTrainer`: every ``trl.SFTConfig`` field plus the ones below.

    Usable from Python, ``HfArgumentParser`` command lines and YAML files, like any TRL config.
    """

    gradient_checkpointing: bool | None = field(
        default=None,
        metadata={
            "help": "Off by default, where TRL's SFTConfig turns it on: a checkpointed layer drops its cache, which "
            "the split training layout reads its prefix from (docs/design.md 2.3), so checkpointing means the "
            "joint layout, about twice the tokens, and each forward run twice. Turn it on (or "
            "activation_checkpointing) only when activations do not fit."
        },  # fmt: skip
    )
    block_size: int = field(default=16, metadata={"help": "Final block size (b_max of the growth schedule)."})
    ar_loss_weight: float = field(default=0.5, metadata={"help": "Weight of the AR loss on the clean copy."})
    noise_eps: float = field(default=1e-3, metadata={"help": "Noise level t is drawn per block from U(eps, 1)."})
    elbo_weighting: bool = field(default=False, metadata={"help": "Weight the diffusion loss by 1/t."})
    complementary_masking: bool = field(
        default=False, metadata={"help": "Add a second noisy copy with the complementary mask (Fast-dLLM v2)."}
    )
    whole_block_noise: float = field(
        default=0.0,
        metadata={"help": "Share of blocks masked whole (t = 1): the blocks verified decoding drafts in one forward."},
    )
    diffusion_position_decay: float = field(
        default=0.0,
        metadata={
            "help": "Weight the diffusion loss at a block's k-th position by exp(-(k - 1) / gamma), gamma this value "
            "(DFlash's loss decay: a draft is verified only after every draft before it). 0 = off."
        },  # fmt: skip
    )
    block_growth: bool = field(default=True, metadata={"help": "Grow the block size from growth_start to block_size."})
    growth_start: int = field(default=1, metadata={"help": "Block size at step 0 (1 = the AR model)."})
    growth_ratio: int = field(default=2, metadata={"help": "Factor of each growth step."})
    growth_warmup_steps: int = field(default=0, metadata={"help": "Steps before the first growth (s0)."})
    growth_interval_steps: int | None = field(
        default=None,
        metadata={"help": "Steps between growths. Default: evenly spaced, so every size gets the same share."},
    )
    certainty_loss_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of the certainty-forcing term (entropy at correctly predicted masked "
            "positions; dParallel). 0 = off."
        },  # fmt: skip
    )
    soft_label_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of the soft-label term: KL from the clean stream's next-token distribution (the "
            "verifier's; with adapter_scope='noisy' the source's) to the prediction at each masked position. 0 = off."
        },  # fmt: skip
    )
    fused_loss: str = field(
        default="auto",
        metadata={
            "help": "Cross-entropy kernel of the two-stream losses. 'auto': liger-kernel's fused linear "
            "cross-entropy (`pip install hf_blockdiff[train]`) when the model is on CUDA and its head is a plain "
            "linear layer without logit softcapping, else chunked float32 logits; 'liger': require the fused "
            "kernel; 'none': always the chunked path. Same losses up to float rounding.",
            "choices": ["auto", "liger", "none"],
        },
    )
    self_distillation: bool = field(
        default=False,
        metadata={"help": "Replace the targets by the model's own AR decoding of the dataset's prompts."},
    )
    distillation_max_new_tokens: int = field(default=256, metadata={"help": "Self-distillation: tokens per target."})
    distillation_temperature: float = field(default=0.0, metadata={"help": "Self-distillation: 0 = greedy."})
    distillation_samples: int = field(default=1, metadata={"help": "Self-distillation: samples per prompt (T > 0)."})
    distillation_batch_size: int = field(default=64, metadata={"help": "Self-distillation: decoding batch size."})
    distillation_keep_unfinished: bool = field(
        default=True,
        metadata={
            "help": "Self-distillation: keep targets cut at distillation_max_new_tokens without an EOS. False keeps "
            "only trajectories that end, so the model also learns to stop."
        },
    )
    mask_token: str | None = field(
        default=None, metadata={"help": "Mask token when the model is converted on the fly (default: <|mask|>)."}
    )
    adapter_scope: str = field(
        default="all",
        metadata={
            "help": "'all': train the weights (or the peft_config's LoRA) everywhere. 'noisy': train a low-rank "
            "adapter that acts only on denoising positions (its r / lora_alpha / target_modules from a LoRA "
            "peft_config, else 16 / 32 / the attention and MLP projections); the causal path stays the source "
            "model exactly, so verify=True decodes the source's own greedy output. The AR loss then has nothing "
            "to train and is only logged.",
            "choices": ["all", "noisy"],
        },
    )
    restore_callback_states_from_checkpoint: bool = field(
        default=True, metadata={"help": "Resume the block-growth schedule from the checkpoint's saved state."}
    )

    def __post_init__(self):
        if self.bf16 is None:  # TRL turns bf16 on everywhere, which Trainer then refuses on a CPU-only machine
            self.bf16 = not self.fp16 and not self.use_cpu and is_torch_bf16_gpu_available()
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}.")
        if self.ar_loss_weight < 0:
            raise ValueError(f"ar_loss_weight must be >= 0, got {self.ar_loss_weight}.")
        if self.packing or self.padding_free:
            raise ValueError(
                "packing / padding_free are not supported by BlockDiffusionTrainer: the block grid and the "
                "context-causal mask are laid out per sample. Set packing=False and padding_free=False."
            )
        if not 0.0 <= self.whole_block_noise <= 1.0:
            raise ValueError(f"whole_block_noise is a share of blocks, in [0, 1]; got {self.whole_block_noise}.")
        if self.adapter_scope not in ("all", "noisy"):
            raise ValueError(f"adapter_scope must be 'all' or 'noisy', got {self.adapter_scope!r}.")
        for name in ("certainty_loss_weight", "soft_label_weight", "diffusion_position_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0 = off), got {getattr(self, name)}.")
        if self.fused_loss not in ("auto", "liger", "none"):
            raise ValueError(f"fused_loss must be 'auto', 'liger' or 'none', got {self.fused_loss!r}.")
        if self.block_growth and not 1 <= self.growth_start <= self.block_size:
            raise ValueError(f"growth_start must be in [1, block_size], got {self.growth_start}.")
        super().__post_init__()


class BlockDiffusionTrainer(SFTTrainer):
    """SFTTrainer for block-diffusion adaptation.

    ``model`` may be a block-diffusion model, a stock AR model (or checkpoint path / Hub id), which is converted
    on the fly with ``processing_class`` as its tokenizer. With a ``peft_config`` the mask token's embedding row
    is made trainable (``trainable_token_indices``), tied embeddings kept tied.
    """

    _tag_names = ["trl", "sft", "block-diffusion", "hf_blockdiff"]

    def __init__(self, model, args: BlockDiffusionConfig | None = None, train_dataset=None, processing_class=None,
                 peft_config=None, callbacks=None, **kwargs):  # fmt: skip
        if args is None:
            args = BlockDiffusionConfig(output_dir="block-diffusion")
        if not isinstance(args, BlockDiffusionConfig):
            raise TypeError(f"BlockDiffusionTrainer needs a BlockDiffusionConfig, got {type(args).__name__}.")
        if isinstance(model, str):
            processing_class = processing_class or AutoTokenizer.from_pretrained(model)
            model = AutoModelForCausalLM.from_pretrained(model, **(args.model_init_kwargs or {}))
        if processing_class is None:
            raise ValueError("Pass the tokenizer as processing_class: the mask token lives in it.")
        if getattr(model.config, "mask_token_id", None) is None or not hasattr(model, "two_stream_hidden_states"):
            model, processing_class = convert_model(model, processing_class, args.block_size, args.mask_token)
        self.mask_token_id = model.config.mask_token_id
        if args.self_distillation:
            train_dataset = self_distillation_dataset(
                model, processing_class, examples_for_run(train_dataset, args), args
            )
        if args.adapter_scope == "noisy":
            _add_noisy_adapter(model, peft_config)
            peft_config = None
        elif peft_config is not None:
            _train_mask_row(model, peft_config, self.mask_token_id)

        if args.block_growth:
            growth = BlockGrowthCallback(
                args.block_size,
                args.growth_start,
                args.growth_ratio,
                args.growth_warmup_steps,
                args.growth_interval_steps,
            )
            growth.apply(0, model)
            callbacks = list(callbacks or []) + [growth]
        else:
            model.config.block_size = args.block_size
        super().__init__(model, args=args, train_dataset=train_dataset, processing_class=processing_class,
                         peft_config=peft_config, callbacks=callbacks, **kwargs)  # fmt: skip
        # Losses are per-micro-batch means: let Trainer divide them by the gradient-accumulation steps.
        self.model_accepts_loss_kwargs = False
        if args.torch_compile:
            compile_decoder_layers(model, backend=args.torch_compile_backend, mode=args.torch_compile_mode)
        self.noise = NoiseSampler(self.mask_token_id, args.noise_eps, args.complementary_masking, args.elbo_weighting,
                                  args.whole_block_noise, args.diffusion_position_decay)  # fmt: skip

    def _build_accelerator_args(self, **kwargs):
        """No whole-model ``torch.compile`` from accelerate: ``torch_compile`` compiles the decoder layers instead
        (``compile_decoder_layers``), and a second, whole-model compile would trace the host reads in between."""
        args = super()._build_accelerator_args(**kwargs)
        if self.args.torch_compile and "dynamo_plugin" in args:
            from accelerate.utils import TorchDynamoPlugin

            args["dynamo_plugin"] = TorchDynamoPlugin(backend="no")
        return args

    # -- schedule ------------------------------------------------------------------------------------------
    @property
    def block_growth(self) -> BlockGrowthCallback | None:
        """The growth callback in use (resuming replaces it with the checkpoint's)."""
        return next((cb for cb in self.callback_handler.callbacks if isinstance(cb, BlockGrowthCallback)), None)

    @property
    def current_block_size(self) -> int:
        return int(self.model.config.block_size)

    # -- loss ----------------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        block_size = self.current_block_size
        noise = self.noise(inputs["input_ids"], inputs.get("attention_mask"), inputs.get("labels"), block_size)
        outputs = model(
            input_ids=inputs["input_ids"],
            attention_mask=inputs.get("attention_mask"),
            labels=inputs.get("labels"),
            noisy_input_ids=noise.noisy_input_ids,
            diffusion_loss_weights=noise.diffusion_loss_weights,
            block_size=block_size,
            ar_loss_weight=0.0 if self.args.adapter_scope == "noisy" else self.args.ar_loss_weight,
            certainty_loss_weight=self.args.certainty_loss_weight,
            fused_loss=self.args.fused_loss,
            soft_label_weight=self.args.soft_label_weight,
        )
        # Metrics stay tensors on the device until `log` reads them: `.item()` here would make every step wait for
        # the GPU to finish the forward before the backward is queued.
        gather = self.accelerator.gather_for_metrics
        metrics = self._metrics[mode]
        metrics["diffusion_loss"].append(gather(outputs.diffusion_loss.detach()).mean())
        metrics["ar_loss"].append(gather(outputs.ar_loss.detach()).mean())
        if outputs.certainty_loss is not None:
            metrics["certainty_loss"].append(gather(outputs.certainty_loss.detach()).mean())
        if outputs.soft_label_loss is not None:
            metrics["soft_label_loss"].append(gather(outputs.soft_label_loss.detach()).mean())
        metrics["masked_fraction"].append(noise.masked_share())
        metrics["block_size"] = [float(block_size)]  # the current size, not an average over the logging window
        if mode == "train" and inputs.get("attention_mask") is not None:
            self._total_train_tokens = self._total_train_tokens + gather(inputs["attention_mask"].sum()).sum()
            metrics["num_tokens"] = [self._total_train_tokens]
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """TRL's averaging of the metrics, after reading the ones ``compute_loss`` left on the device."""
        for metrics in self._metrics.values():
            for key, values in metrics.items():
                tensors = [value.reshape(()).double() for value in values if isinstance(value, torch.Tensor)]
                if tensors:
                    read = iter(torch.stack(tensors).tolist())  # one transfer for the whole logging window
                    metrics[key] = [next(read) if isinstance(value, torch.Tensor) else value for value in values]
        if isinstance(self._total_train_tokens, torch.Tensor):
            self._total_train_tokens = int(self._total_train_tokens)
        super().log(logs, start_time)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation reports the losses only: the two-stream forward returns no logits."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    # -- model card ----------------------------------------------------------------------------------------
    def training_summary(self) -> dict:
        """Settings and final losses, for the model card."""
        args = self.args
        summary = {
            "final block_size": self.current_block_size,
            "ar_loss_weight": args.ar_loss_weight,
            "noise": f"t ~ U({args.noise_eps}, 1) per block" + (", 1/t weighting" if args.elbo_weighting else "")
            + (", complementary masking" if args.complementary_masking else "")
            + (f", loss decay {args.diffusion_position_decay} positions" if args.diffusion_position_decay else ""),
            "learning_rate": args.learning_rate,
            "steps": self.state.global_step,
            "per_device_train_batch_size": args.per_device_train_batch_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "max_length": args.max_length,
            "peft": type(self.model.peft_config["default"]).__name__ if hasattr(self.model, "peft_config") else "none (full)",
        }  # fmt: skip
        if args.adapter_scope == "noisy":
            summary["peft"] = f"noisy-scope adapter {self.model.config.noisy_adapter} (the causal path is the source)"
        if self.block_growth is not None:
            summary["block growth"] = " -> ".join(
                f"{size} @ step {step}" for step, size in self.block_growth.transitions
            )
        for key in ("diffusion_loss", "ar_loss", "loss"):
            values = [entry[key] for entry in self.state.log_history if key in entry]
            if values:
                summary[f"final {key}"] = round(values[-1], 4)
        return summary

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None):
        output_dir = output_dir or self.args.output_dir
        if self.args.adapter_scope == "noisy" and Path(output_dir).name.startswith(PREFIX_CHECKPOINT_DIR):
            # A checkpoint of a noisy-scope run is the adapter alone, in its training dtype so that a resume is
            # exact: everything else is the source model, which training leaves untouched.
            if self.args.should_save:
                save_noisy_adapter(self.accelerator.unwrap_model(self.model), output_dir, dtype=None)
                torch.save(self.args, Path(output_dir) / TRAINING_ARGS_NAME)
            return
        super()._save(output_dir, state_dict)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None):
        if self.args.adapter_scope == "noisy" and (Path(resume_from_checkpoint) / NOISY_ADAPTER_CONFIG).is_file():
            load_noisy_adapter(self.accelerator.unwrap_model(model or self.model), resume_from_checkpoint)
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """Save as ``convert_checkpoint`` does: weights, config with auto_map, code files, tokenizer, card."""
        super().save_model(output_dir, _internal_call)
        if not _internal_call:
            self.write_model_card(output_dir or self.args.output_dir)

    def create_model_card(self, model_name: str | None = None, dataset_name: str | None = None, tags=None, **kwargs):
        """Trainer/TRL hook (checkpoints, ``push_to_hub``): our card instead of the generic one."""
        self.write_model_card(self.args.output_dir, model_name=model_name, dataset_name=dataset_name)

    def write_model_card(self, directory, model_name: str | None = None, dataset_name: str | None = None):
        """Our card (MODEL_CARD_TEMPLATE.md) with the conversion and training settings and final losses.
        Skipped for PEFT adapters, which are not loadable checkpoints on their own (merge them first)."""
        if not self.is_world_process_zero() or hasattr(self.model, "peft_config"):
            return
        from .hub import _card_info, write_model_card

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        info = _card_info(directory)
        config = self.model.config
        name = getattr(config, "_name_or_path", "") or ""
        info.setdefault("base_model", name if name.count("/") == 1 and not Path(name).exists() else None)
        info.setdefault("conversion", {"block_size": config.block_size, "mask_token_id": self.mask_token_id})
        info["training"] = self.training_summary() | ({"dataset": dataset_name} if dataset_name else {})
        info["model_name"] = model_name or info.get("model_name")
        if self.args.hub_model_id:
            info["repo_id"] = self.args.hub_model_id
        write_model_card(directory, config, **info)


def compile_decoder_layers(model, **compile_kwargs) -> int:
    """Compile each decoder layer in place (regional compilation; returns how many). The two-stream forward reads
    one length back to the host between its streams and gathers the scored rows by a data-dependent index:
    compiling the whole model would break its graph there, while the layers, where the time goes, trace whole.
    Shapes are dynamic from the first call: batch lengths vary from step to step."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [module for module in model.modules() if type(module).__name__ in names]
    if not layers:
        raise ValueError(f"torch_compile: {type(model).__name__} names no decoder layer class in _no_split_modules.")
    # A layer's graph is specialised to its layer index (the split layout's prefix cache indexes its keys by it),
    # to grad mode and to the adapter gate: a few graphs per layer, where dynamo's default budget for one
    # function is 8 and, past it, runs the layer uncompiled without saying more than once.
    dynamo = torch._dynamo.config
    dynamo.recompile_limit = max(dynamo.recompile_limit, 8 * len(layers))
    dynamo.accumulated_recompile_limit = max(dynamo.accumulated_recompile_limit, 16 * len(layers))
    # (a first graph specialised to one length would only be compiled again for the next)
    compile_kwargs = {"dynamic": True} | {k: v for k, v in compile_kwargs.items() if v is not None}
    for layer in layers:
        layer.compile(**compile_kwargs)
    logger.info(f"torch_compile: compiled {len(layers)} decoder layers ({type(layers[0]).__name__}) in place.")
    return len(layers)


def examples_for_run(dataset, args: BlockDiffusionConfig):
    """The first examples of ``dataset`` that a run with ``max_steps`` will read (all of them without
    max_steps): max_steps x per-device batch x gradient accumulation x processes, divided by the samples drawn
    per prompt. Self-distillation decodes only these, not a whole dataset the run will never reach."""
    if args.max_steps <= 0:
        return dataset
    needed = args.max_steps * args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    if args.distillation_temperature > 0:
        needed = -(-needed // args.distillation_samples)
    if needed >= len(dataset):
        return dataset
    logger.warning(
        f"Self-distillation decodes the {needed} of {len(dataset)} examples that max_steps={args.max_steps} will use "
        f"(max_steps x {args.per_device_train_batch_size} per device x {args.gradient_accumulation_steps} "
        f"accumulation x {args.world_size} processes), up to {args.distillation_max_new_tokens} tokens each."
    )
    return dataset.select(range(needed))


def self_distillation_dataset(model, tokenizer, dataset, args: BlockDiffusionConfig):
    """The dataset's prompts decoded by ``model`` at block size 1, cached under
    ``output_dir/self_distillation/<key>`` where the key names the model, its weights, the prompts and the
    settings (``distill.cache_key``). The main process decodes; the others wait and load."""
    from accelerate import PartialState
    from datasets import load_from_disk

    from .distill import ar_targets, cache_key, prompts_from

    prompts = prompts_from(dataset)
    settings = {"max_new_tokens": args.distillation_max_new_tokens, "temperature": args.distillation_temperature,
                "samples": args.distillation_samples, "seed": args.seed,
                "keep_unfinished": args.distillation_keep_unfinished}  # fmt: skip
    cache = Path(args.output_dir) / "self_distillation" / cache_key(model, tokenizer, prompts, **settings)
    with PartialState().main_process_first():
        if (cache / "settings.json").is_file():  # written last: the targets are complete
            return load_from_disk(str(cache / "data"))
        device = model.device
        model.to(args.device)
        targets = ar_targets(
            model, tokenizer, prompts, max_new_tokens=args.distillation_max_new_tokens,
            batch_size=args.distillation_batch_size, samples_per_prompt=args.distillation_samples,
            temperature=args.distillation_temperature, seed=args.seed, keep_unfinished=args.distillation_keep_unfinished,
        )  # fmt: skip
        model.to(device)
        if PartialState().is_main_process:
            targets.save_to_disk(str(cache / "data"))
            (cache / "settings.json").write_text(json.dumps(settings | {"model": model.config._name_or_path}))
        return targets


def _add_noisy_adapter(model, peft_config):
    """Freeze the model and add a noisy-scope adapter (sized like a LoRA ``peft_config`` if one is given)."""
    from .modeling_blockdiff import NOISY_ADAPTER_TARGETS

    kwargs = {}
    if peft_config is not None:
        targets = peft_config.target_modules
        if targets in (None, "all-linear"):
            targets = NOISY_ADAPTER_TARGETS
        if not hasattr(peft_config, "lora_alpha") or isinstance(targets, str):
            raise ValueError("adapter_scope='noisy' takes a LoraConfig whose target_modules is 'all-linear' or a list "
                             f"of layer names (got {type(peft_config).__name__}, target_modules={targets!r}).")  # fmt: skip
        kwargs = dict(r=peft_config.r, alpha=peft_config.lora_alpha, target_modules=list(targets))
    for param in model.parameters():
        param.requires_grad_(False)
    names = model.add_noisy_adapter(**kwargs)
    # Trainable weights in fp32, as PEFT keeps a LoRA's: AdamW's small updates vanish in bf16. Autocast still runs
    # their matmuls in the training precision.
    for name, param in model.named_parameters():
        if ".noisy_lora_" in name:
            param.data = param.data.float()
    # The mask token's embedding row stays as converted: training it means training the whole embedding matrix,
    # whose every row AdamW's weight decay would move (the causal path would leave the source). The adapter's
    # first layers see where the masks are anyway.
    logger.info(f"Noisy-scope adapter on {len(names)} layers {model.config.noisy_adapter}; the AR loss has no "
                "trainable parameters now (the causal path is the source model) and is only logged.")  # fmt: skip
    if hasattr(model, "enable_input_require_grads"):  # activation checkpointing needs a grad-carrying input
        model.enable_input_require_grads()


def _train_mask_row(model, peft_config, mask_token_id: int):
    """Make the mask token's embedding row trainable under PEFT and keep tied embeddings tied."""
    embeddings = model.get_input_embeddings()
    name = next(name for name, module in model.named_modules() if module is embeddings).split(".")[-1]
    indices = peft_config.trainable_token_indices
    if indices is None:
        indices = {}
    elif isinstance(indices, list):
        indices = {name: indices}
    indices.setdefault(name, [])
    if mask_token_id not in indices[name]:
        indices[name].append(mask_token_id)
    peft_config.trainable_token_indices = indices
    # PEFT ties trainable token rows of tied embeddings by itself. Its ensure_weight_tying flag is about tied
    # layers in target_modules / modules_to_save, and warns when there are none; set it only for those.
    targets = set(getattr(peft_config, "modules_to_save", None) or [])
    if not isinstance(peft_config.target_modules, str):
        targets |= set(peft_config.target_modules or [])
    tied = getattr(model.config.get_text_config(), "tie_word_embeddings", False)
    if tied and name in {t.split(".")[-1] for t in targets} and hasattr(peft_config, "ensure_weight_tying"):
        peft_config.ensure_weight_tying = True
