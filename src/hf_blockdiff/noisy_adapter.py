# Copyright 2026 The hf_blockdiff authors. Apache-2.0.
"""The noisy-scope adapter: low-rank weights that act only on denoising (masked-stream) positions.

Hub-portable: imports only torch.

A converted model with this adapter keeps the source model's weights untouched and adds, to chosen linear layers,
``y = W x + gate * (alpha / r) * B A x``. The gate is 1 at positions of the noisy stream (training) and of blocks
being denoised (generation), 0 everywhere else: the prompt, every committed token, the clean training stream, and
every plain forward. So the causal path (block size 1, prefill, commits) is the source model bit for bit, and
verified decoding (``verify=True``) reproduces the *source's* greedy output, while the adapter learns to denoise.

The low-rank weights are parameters of the linear layers themselves (``<layer>.noisy_lora_A`` / ``_B``), saved
unmerged next to the source weights; ``config.noisy_adapter`` (``{"r", "alpha", "target_modules"}``) tells the
portable code to recreate them when the checkpoint loads. Forward hooks add the gated term; the gate is a tensor
shared by all of them, set by whoever runs the forward (:func:`set_gate`), so it works under ``torch.compile``
and CUDA graphs when it is updated in place.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

GATE_ATTRIBUTE = "_noisy_adapter_gate"


class Gate:
    """Where the adapter is on: ``value`` broadcasts against a layer's output (``(batch, seq, 1)``), a float where it
    is on at every position alike (``1.0``); None = off."""

    value: torch.Tensor | float | None = None


def attach(model: nn.Module, r: int, alpha: float, target_modules: list[str]) -> list[str]:
    """Add zero-initialised (B = 0) noisy-scope weights to every ``nn.Linear`` whose name ends in one of
    ``target_modules``, with their hooks. Returns the names of the adapted layers."""
    if getattr(model, GATE_ATTRIBUTE, None) is not None:
        raise ValueError("This model already has a noisy-scope adapter.")
    gate = Gate()
    object.__setattr__(model, GATE_ATTRIBUTE, gate)  # not a submodule: no state, no copy in the state dict
    adapted = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.split(".")[-1] in target_modules:
            param = module.weight
            a = torch.empty(r, module.in_features, dtype=param.dtype, device=param.device)
            if param.device.type != "meta":
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            module.noisy_lora_A = nn.Parameter(a)
            module.noisy_lora_B = nn.Parameter(torch.zeros(module.out_features, r, dtype=param.dtype,
                                                           device=param.device))  # fmt: skip
            module.noisy_lora_scaling = alpha / r
            # The hook reads the gate through its module, not a closure: a deep copy of the model then gets one new
            # gate shared by its layers and its model (a closure would keep reading the original's).
            module.noisy_lora_gate = gate
            module.register_forward_hook(add_gated_delta)
            adapted.append(name)
    if not adapted:
        raise ValueError(f"No linear layer matches target_modules={target_modules}.")
    return adapted


def add_gated_delta(module, inputs, output):
    gate = module.noisy_lora_gate.value
    if gate is None:
        return output  # a plain forward: exactly the base layer
    x, a, b = inputs[0], module.noisy_lora_A, module.noisy_lora_B
    # Under autocast the matmuls cast the small weights; otherwise they take the activations' dtype. Casting the
    # activations instead would copy every adapted layer's input (and output) once more.
    if not torch.is_autocast_enabled(x.device.type):
        a, b = a.to(x.dtype), b.to(x.dtype)
    delta = F.linear(F.linear(x, a), b).to(output.dtype)
    if isinstance(gate, float):  # on everywhere (the split training layout's noisy stream): one fused add
        return torch.add(output, delta, alpha=gate * module.noisy_lora_scaling)
    return torch.addcmul(output, delta, gate * module.noisy_lora_scaling)


def set_gate(model: nn.Module, value: torch.Tensor | float | None):
    """Turn the adapter on where ``value`` is 1 (``(batch, seq)`` or broadcastable), everywhere for a float ``1.0``,
    off everywhere for None. A no-op for models without the adapter."""
    gate = getattr(model, GATE_ATTRIBUTE, None)
    if gate is not None:
        gate.value = value if value is None or isinstance(value, float) else value.unsqueeze(-1)


def has_adapter(model: nn.Module) -> bool:
    return getattr(model, GATE_ATTRIBUTE, None) is not None
