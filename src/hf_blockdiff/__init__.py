# Copyright 2026 The hf_blockdiff authors. Apache-2.0.
"""hf_blockdiff: turn an autoregressive transformers checkpoint into a block-diffusion LM (NBDiff).

Heavy optional pieces (the TRL trainer, the CLI) are imported on first use, so ``import hf_blockdiff`` stays
cheap and the model code works without trl installed.
"""

from importlib import import_module

__version__ = "0.1.0"

_LAZY = {
    "BlockDiffusionMixin": "modeling_blockdiff",
    "BlockDiffusionOutput": "modeling_blockdiff",
    "SUPPORTED_MODEL_TYPES": "modeling_blockdiff",
    "block_diffusion_class": "modeling_blockdiff",
    "BlockDiffusionGenerateOutput": "denoise",
    "convert_model": "convert",
    "convert_checkpoint": "convert",
    "load_source": "convert",
    "apply_adapter": "convert",
    "smollm2_gguf_path": "convert",
    "NoiseSampler": "noise",
    "BlockGrowthCallback": "curriculum",
    "block_size_at": "curriculum",
    "BlockDiffusionConfig": "trainer",
    "BlockDiffusionTrainer": "trainer",
    "render_model_card": "hub",
    "push_to_hub": "hub",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name):
    if name in _LAZY:
        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hf_blockdiff' has no attribute {name!r}")
