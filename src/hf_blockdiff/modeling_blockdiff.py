# Copyright 2026 The hf_blockdiff authors. Apache-2.0.
"""Block-diffusion causal LMs: one mixin, thin subclasses of the stock ``XxxForCausalLM`` classes.

Hub-portable: imports only torch, transformers and its sibling files, which ``save_pretrained`` copies next to
the weights (``auto_map`` points here), so a converted checkpoint loads with ``trust_remote_code=True`` where
``hf_blockdiff`` is not installed.

- A plain call is the stock causal-LM forward: at block size 1 the model *is* the AR model.
- ``model(input_ids=x, noisy_input_ids=x_t, labels=..., block_size=b)`` runs the two-stream training pass of
  docs/design.md 2.3 in one forward and returns ``loss``, ``diffusion_loss`` and ``ar_loss``.
- ``model.generate(...)`` decodes block by block (see ``denoise.py``).

Adding an architecture: one line in ``ARCHITECTURES`` (its modeling module, its stock class, and whether its base
model takes one mask per layer type). Classes are built on first use, so only the loaded architecture's modeling
module is ever imported. The conformance tests then say whether it really honours the mask.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers.cache_utils import Cache
from transformers.modeling_outputs import ModelOutput
from transformers.utils import logging

from .compat import cache_argument, pop_cache
from .denoise import generate_blocks
from .masks import (
    IGNORE_INDEX,
    TokenMeta,
    attention_backend,
    block_grid,
    positions_from_padding,
    render_masks,
    training_meta,
)
from .noisy_adapter import attach, has_adapter, set_gate

logger = logging.get_logger(__name__)

# Rows of hidden states turned into logits at once in the loss; bounds the (rows x vocab) activation memory.
LOSS_CHUNK_ROWS = 4096
# How the two-stream losses are computed (`fused_loss`): 'liger' = liger-kernel's fused linear cross-entropy (never
# builds the rows x vocab logits), 'none' = the chunked PyTorch path, 'auto' = liger where it can run, else chunked.
FUSED_LOSS_CHOICES = ("auto", "liger", "none")
# Devices the fused kernel runs on (Triton). Tests add "cpu" together with a pure-torch stand-in of the kernel.
FUSED_LOSS_DEVICES = ("cuda",)
# From 0.8.2 on, reduction="none" gets per-token gradients right (earlier releases scale every row by the first).
LIGER_MIN_VERSION = (0, 8, 2)

# The split training layout's noisy stream is padded to a multiple of this many tokens, so that batches of different
# lengths share attention shapes (cuDNN's attention builds a graph per shape, hundreds of ms each).
NOISY_WIDTH_MULTIPLE = 64
# The linear layers a noisy-scope adapter adapts by default (attention and MLP projections of the supported archs).
NOISY_ADAPTER_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj",
                         "gate_up_proj")  # fmt: skip

_liger = []  # the fused kernel once looked up: [function] or [None]
_LOGGED: set[str] = set()  # reasons for the chunked path already logged


def _liger_cross_entropy():
    """liger-kernel's ``liger_fused_linear_cross_entropy``, or None where it is not installed, too old or does not
    import (no triton). Optional: this file loads from the Hub where only torch and transformers exist."""
    if not _liger:
        function = None
        try:
            version = importlib.metadata.version("liger-kernel")
            if tuple(int(part) for part in re.findall(r"\d+", version)[:3]) < LIGER_MIN_VERSION:
                raise ImportError(f"version {version} is older than {'.'.join(map(str, LIGER_MIN_VERSION))}")
            functional = importlib.import_module("liger_kernel.transformers.functional")
            function = functional.liger_fused_linear_cross_entropy
        except Exception as error:  # not installed, too old, or its triton kernels fail to import on this machine
            logger.info(f"liger-kernel is not used: {type(error).__name__}: {error}")
        _liger.append(function)
    return _liger[0]


class PrefixCache(Cache):
    """The clean stream's keys and values, as the split training layout's noisy stream reads them.

    While recording (the clean forward) every layer's keys and values are kept and returned as they are. Once
    ``frozen`` (the noisy forward), a layer gets the prefix followed by its own keys and values, and nothing is
    stored: a recomputation (activation checkpointing of the loss) reads the same prefix again.
    """

    def __init__(self):
        super().__init__(layers=[])
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.frozen = False

    def __len__(self):
        return len(self.keys)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions are always passed explicitly; nothing may derive them from the cache

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if not self.frozen:
            self.keys.append(key_states)
            self.values.append(value_states)
            return key_states, value_states
        return (torch.cat([self.keys[layer_idx], key_states], dim=2),
                torch.cat([self.values[layer_idx], value_states], dim=2))  # fmt: skip


@dataclass
class BlockDiffusionOutput(ModelOutput):
    """Output of the two-stream training forward.

    ``loss = diffusion_loss + ar_loss_weight * ar_loss``. ``diffusion_loss`` is the (optionally weighted) sum of
    cross-entropies at masked positions divided by the number of masked supervised tokens; ``ar_loss`` is the
    next-token cross-entropy on the clean copy summed over supervised tokens and divided by their number (the
    stock causal-LM loss). Both are per-forward means. The mask token is left out of the softmax (it is never a
    target), so ``ar_loss`` equals the source model's loss. With ``certainty_loss_weight`` the loss also adds
    that weight times ``certainty_loss``, with ``soft_label_weight`` that weight times ``soft_label_loss`` (see
    ``forward``). No full-vocabulary logits are returned.
    """

    loss: torch.FloatTensor | None = None
    diffusion_loss: torch.FloatTensor | None = None
    ar_loss: torch.FloatTensor | None = None
    certainty_loss: torch.FloatTensor | None = None
    soft_label_loss: torch.FloatTensor | None = None
    num_masked_tokens: torch.LongTensor | None = None
    num_ar_tokens: torch.LongTensor | None = None
    logits: torch.FloatTensor | None = None


class BlockDiffusionMixin:
    """Everything block-diffusion; mixed in before a stock ``XxxForCausalLM``."""

    # `save_pretrained` writes `auto_map` and copies this file (and its relative imports) next to the weights.
    _auto_class = "AutoModelForCausalLM"
    # Whether the base model takes `{layer_type: mask}` instead of one mask (set by `register`).
    _mask_per_layer_type = False

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        spec = getattr(config, "noisy_adapter", None)
        if spec:  # a checkpoint saved with its noisy-scope adapter: recreate the weights it carries
            attach(self, spec["r"], spec["alpha"], spec["target_modules"])

    def add_noisy_adapter(self, r: int = 16, alpha: float = 32, target_modules=NOISY_ADAPTER_TARGETS) -> list[str]:
        """Add a noisy-scope adapter (``noisy_adapter.py``): low-rank weights that act only where blocks are
        denoised, so the causal path stays the source model exactly. Returns the adapted layers' names."""
        names = attach(self, r, alpha, list(target_modules))
        self.config.noisy_adapter = {
            "r": r,
            "alpha": alpha,
            "target_modules": sorted({n.split(".")[-1] for n in names}),
        }
        return names

    # -- configuration ---------------------------------------------------------------------------------
    @property
    def mask_token_id(self) -> int:
        mask_token_id = getattr(self.config, "mask_token_id", None)
        if mask_token_id is None:
            raise ValueError(
                "config.mask_token_id is not set: this model was not converted to block diffusion. "
                "Convert it first with `hf_blockdiff.convert_model(model, tokenizer)` or `hf_blockdiff convert`."
            )
        return mask_token_id

    def _block_size(self, block_size: int | None) -> int:
        block_size = block_size if block_size is not None else getattr(self.config, "block_size", None) or 1
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be an integer >= 1, got {block_size!r}.")
        return block_size

    def block_diffusion_masks(self, meta, q_offset: int, q_len: int):
        """Masks for the base model, in its attention backend's format (one per layer type if it needs that)."""
        return render_masks(self.config, meta, q_offset, q_len, self.dtype, self._mask_per_layer_type)

    def logits_from_hidden(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The head as the stock forward applies it. Override for heads with extra scaling."""
        # A strided slice (a block of a wider decode step) would run as a batched GEMM that cuBLAS serves with a
        # slow non-tensor-core kernel: 1.8 ms of a 5.3 ms step at batch 16 on an H200
        # (benchmarks/results/profile_engine_smollm2_adapter_b16_c1_strided_head.md). One small copy avoids it.
        logits = self.lm_head(hidden_states.contiguous())
        softcap = getattr(self.config.get_text_config(decoder=True), "final_logit_softcapping", None)
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        return logits

    # -- forward ---------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        *,
        noisy_input_ids: torch.LongTensor | None = None,
        block_size: int | None = None,
        ar_loss_weight: float = 0.5,
        diffusion_loss_weights: torch.Tensor | None = None,
        certainty_loss_weight: float = 0.0,
        fused_loss: str = "auto",
        soft_label_weight: float = 0.0,
        **kwargs,
    ):
        r"""
        Without ``noisy_input_ids`` this is the stock causal-LM forward (all its arguments pass through).

        With them, the two-stream training pass (docs/design.md 2.3):

        noisy_input_ids (``(batch, length)`` or ``(batch, copies, length)``):
            ``x_t``: copies of ``input_ids`` with some positions replaced by ``config.mask_token_id``. Several
            copies (complementary masking) share one clean copy: the layout is ``[x_t^1; ..; x_t^S; x]``.
        labels:
            As for the stock model (unshifted, ``-100`` = ignore). Defaults to ``input_ids`` outside padding.
            The block grid starts at the first supervised token. Only masked positions that carry a label and
            are not the first token of their block are diffusion targets.
        block_size (``int``): defaults to ``config.block_size``.
        ar_loss_weight (``float``): weight of the AR loss on the clean copy (``0.5``).
        diffusion_loss_weights: optional per-token weights of the diffusion loss, shaped like
            ``noisy_input_ids`` (e.g. ``1/t`` for the ELBO weighting). The normaliser stays the token count.
        certainty_loss_weight (``float``): weight of a certainty-forcing term (dParallel, arXiv 2509.26488): the
            mean entropy of the predictions at masked positions the model already gets right. Pushing it down
            makes the model confident where it is correct, which is what lets it commit several tokens at once.
        fused_loss (``str``): ``'auto'`` (default) computes the cross-entropies with liger-kernel's fused linear
            cross-entropy where it can run (liger-kernel installed, CUDA, a plain linear head without logit
            softcapping), else in memory-bounded chunks of float32 logits; ``'liger'`` requires the fused kernel,
            ``'none'`` never uses it. Both give the same losses up to float rounding (``fused_loss_backend``).
            With ``ar_loss_weight=0`` the AR loss is computed without gradient: it is only reported.
        soft_label_weight (``float``): weight of a soft-label term: the mean ``KL(p || q)`` at masked positions, ``p``
            the clean stream's next-token distribution at the same position (detached: a teacher) and ``q`` the
            noisy prediction. The clean stream is the causal model that verified decoding accepts against (with a
            noisy-scope adapter, the source itself), so this trains the drafter on the verifier's whole
            distribution, its 2nd and 3rd choices included, at no extra forward. Its rows take the chunked path.
        """
        cache = pop_cache(kwargs)  # `cache` from transformers 5.24 on, `past_key_values` before
        if noisy_input_ids is None:
            set_gate(self, None)  # a plain forward is the causal path: no noisy-scope adapter
            stock_forward = super().forward
            if cache is not None:
                kwargs[cache_argument(stock_forward.__func__)] = cache
            return stock_forward(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                inputs_embeds=inputs_embeds,
                labels=labels,
                **kwargs,
            )
        if inputs_embeds is not None or cache is not None:
            raise ValueError("The two-stream training forward takes `input_ids`, not `inputs_embeds` or a cache.")
        if fused_loss not in FUSED_LOSS_CHOICES:
            raise ValueError(f"fused_loss must be one of {FUSED_LOSS_CHOICES}, got {fused_loss!r}.")
        for ignored in ("num_items_in_batch", "use_cache", "logits_to_keep"):  # losses are per-forward means
            kwargs.pop(ignored, None)
        return self._two_stream_forward(
            input_ids, noisy_input_ids, attention_mask, position_ids, labels,
            self._block_size(block_size), ar_loss_weight, diffusion_loss_weights, certainty_loss_weight, fused_loss,
            soft_label_weight, **kwargs,
        )  # fmt: skip

    def two_stream_hidden_states(self, clean, noisy, attention_mask, position_ids, labels, block_size,
                                 layout="joint", **kwargs):  # fmt: skip
        """Final hidden states of the layout ``[x_t^1; ..; x_t^S; x]``, shaped ``(batch, S + 1, length, hidden)``,
        and each token's offset in its block (0 = block-first, -1 = context). Inputs as in ``forward``.

        ``layout="joint"`` runs one forward over all ``S + 1`` streams. ``"split"`` runs the clean stream first,
        keeping its keys and values as a prefix cache (without gradient where no trainable weight acts on it),
        then only the noisy copies of the supervised runs against it (docs/design.md 2.3): the same attention, so
        the same losses, without the noisy copies of the context, which no loss reads and no other token attends
        to. Those rows are zero in its output."""
        batch, copies, length = noisy.shape
        blocks, offsets = block_grid(block_size, attention_mask, labels)
        if layout == "split":
            return self._split_hidden_states(clean, noisy, attention_mask, position_ids, blocks, offsets, **kwargs)
        if layout != "joint":
            raise ValueError(f"layout must be 'joint' or 'split', got {layout!r}.")
        meta = training_meta(blocks, position_ids, attention_mask, copies)
        # The noisy-scope adapter acts on the noisy copies only. The gate stays set after this forward: activation
        # checkpointing recomputes the layers during backward (every forward entry point sets it anew).
        if has_adapter(self):
            in_noisy_copies = torch.arange((copies + 1) * length, device=clean.device) < copies * length
            set_gate(self, in_noisy_copies.to(self.dtype).expand(batch, -1))
        hidden = self.model(
            input_ids=torch.cat([noisy.reshape(batch, copies * length), clean], dim=1),
            attention_mask=self.block_diffusion_masks(meta, 0, (copies + 1) * length),
            position_ids=meta.position,
            use_cache=False,
            **kwargs,
        ).last_hidden_state
        return hidden.view(batch, copies + 1, length, -1), offsets

    def _split_hidden_states(self, clean, noisy, attention_mask, position_ids, blocks, offsets, **kwargs):
        batch, copies, length = noisy.shape
        cache_arg = cache_argument(type(self.model).forward)
        clean_meta = training_meta(blocks, position_ids, attention_mask, 0)
        prefix = PrefixCache()
        set_gate(self, None)  # the clean stream is the source model
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.clean_stream_needs_grad()):
            clean_hidden = self.model(
                input_ids=clean,
                attention_mask=self.block_diffusion_masks(clean_meta, 0, length),
                position_ids=position_ids,
                use_cache=True,
                **{cache_arg: prefix},
                **kwargs,
            ).last_hidden_state
        # Each row's block tokens (offset >= 0) first, in order, then the rest: the first `width` columns hold them.
        in_blocks = offsets >= 0
        width = int(in_blocks.sum(1).max()) if copies else 0  # one host read: the noisy stream's length
        # Rounded up (the extra columns are invalid keys): attention kernels such as cuDNN's build a plan per shape.
        width = min(length, -(-width // NOISY_WIDTH_MULTIPLE) * NOISY_WIDTH_MULTIPLE)
        if not width:  # block size 1, or nothing supervised: the clean stream is all there is
            placed = clean_hidden.new_zeros(batch, copies, length, clean_hidden.shape[-1])
            return torch.cat([placed, clean_hidden.unsqueeze(1)], dim=1), offsets
        index = torch.arange(length, device=clean.device)
        order = (index + length * (~in_blocks).long()).argsort(dim=1)[:, :width]
        noisy_meta = TokenMeta(
            stream=torch.arange(copies, device=clean.device).repeat_interleave(width).expand(batch, -1),
            block=blocks.gather(1, order).repeat(1, copies),
            position=position_ids.gather(1, order).repeat(1, copies),
            valid=in_blocks.gather(1, order).repeat(1, copies),
        )
        meta = clean_meta.followed_by(noisy_meta)
        prefix.frozen = True
        if has_adapter(self):  # every query of this forward is a noisy one; kept set for checkpointed recomputes
            set_gate(self, 1.0)
        columns = order.unsqueeze(1).expand(-1, copies, -1)
        noisy_hidden = self.model(
            input_ids=noisy.gather(2, columns).reshape(batch, copies * width),
            attention_mask=self.block_diffusion_masks(meta, length, copies * width),
            position_ids=noisy_meta.position,
            use_cache=True,
            **{cache_arg: prefix},
            **kwargs,
        ).last_hidden_state
        # Back to positions (the losses pick their rows by position); `order` is a permutation, so no two columns
        # land on one position, and the columns past a row's block tokens land on context rows no loss reads.
        hidden_size = noisy_hidden.shape[-1]
        placed = noisy_hidden.new_zeros(batch, copies, length, hidden_size).scatter(
            2, columns.unsqueeze(-1).expand(-1, -1, -1, hidden_size), noisy_hidden.view(batch, copies, width, -1)
        )
        return torch.cat([placed, clean_hidden.unsqueeze(1).to(placed.dtype)], dim=1), offsets

    def clean_stream_needs_grad(self) -> bool:
        """Whether a trainable weight acts on the clean stream: any but a noisy-scope adapter's (gated off there)."""
        return any(p.requires_grad for name, p in self.named_parameters() if "noisy_lora_" not in name)

    def training_layout(self) -> str:
        """``'split'`` where it computes what ``'joint'`` does, else ``'joint'``: transformers drops the cache of a
        layer whose activations are checkpointed, and the noisy stream would lose its prefix. Flex attention keeps
        the joint layout too: its CPU kernel does not compile for queries shorter than their keys under a sliding
        window (torch 2.13), and the split one is not measured with it on CUDA."""
        checkpointed = self.training and torch.is_grad_enabled() and any(
            getattr(module, "gradient_checkpointing", False) for module in self.modules()
        )  # fmt: skip
        return "joint" if checkpointed or attention_backend(self.config) == "flex_attention" else "split"

    def _two_stream_forward(
        self, clean, noisy, attention_mask, position_ids, labels, block_size, ar_loss_weight, weights,
        certainty_weight=0.0, fused_loss="auto", soft_weight=0.0, **kwargs,
    ) -> BlockDiffusionOutput:  # fmt: skip
        if noisy.dim() == 2:
            noisy = noisy.unsqueeze(1)
            weights = weights.unsqueeze(1) if weights is not None else None
        if block_size == 1:  # nothing is maskable: the AR model alone, at the AR model's cost
            noisy = noisy[:, :0]
            weights = weights[:, :0] if weights is not None else None
        batch, copies, length = noisy.shape
        if clean.shape != (batch, length):
            raise ValueError(f"noisy_input_ids {tuple(noisy.shape)} does not match input_ids {tuple(clean.shape)}.")
        if attention_mask is None:
            attention_mask = torch.ones_like(clean)
        if labels is None:
            labels = clean.masked_fill(attention_mask == 0, IGNORE_INDEX)
        if position_ids is None:
            position_ids = positions_from_padding(attention_mask)

        hidden, offsets = self.two_stream_hidden_states(
            clean, noisy, attention_mask, position_ids, labels, block_size, self.training_layout(), **kwargs
        )
        streams = copies + 1
        targets = labels[:, 1:]  # position j-1 predicts token j
        # A target is predicted from the position before it; a padding position predicts nothing.
        supervised = (targets != IGNORE_INDEX) & attention_mask[:, :-1].bool()
        # A block-first token is an AR step (predicted from the previous block): never a diffusion target.
        maskable = supervised & (offsets[:, 1:] > 0)
        masked = (noisy[:, :, 1:] == self.mask_token_id) & maskable.unsqueeze(1)

        # The scored rows are gathered by index, one `nonzero` (one host sync) per group, where boolean indexing
        # would sync once per tensor indexed. Rows are (batch, stream, position) flattened, the last stream clean.
        rows = hidden.reshape(-1, hidden.shape[-1])
        row_targets = F.pad(targets, (0, 1), value=IGNORE_INDEX).unsqueeze(1).expand(-1, streams, -1).reshape(-1)
        pick = masked.new_zeros(batch, streams, length)
        pick[:, :copies, :-1] = masked
        diff_index = pick.view(-1).nonzero().squeeze(1)
        pick = masked.new_zeros(batch, streams, length)
        pick[:, copies, :-1] = supervised
        ar_index = pick.view(-1).nonzero().squeeze(1)
        diff_weights = teacher = None
        if weights is not None:
            diff_weights = F.pad(weights[:, :, 1:], (0, 1, 0, 1)).reshape(-1)[diff_index]
        if soft_weight:  # the clean row at the same position: stream s -> the clean stream, `copies`
            teacher = rows[diff_index + (copies - diff_index // length % streams) * length].detach()

        diff_sum, ar_sum, entropy_sum, num_correct, soft_sum = self._loss_sums(
            rows[diff_index], row_targets[diff_index], diff_weights, rows[ar_index], row_targets[ar_index],
            certainty_weight, ar_loss_weight != 0, fused_loss, teacher,
        )  # fmt: skip
        num_masked, num_ar = masked.sum(), supervised.sum()
        diffusion_loss = diff_sum / num_masked.clamp(min=1)
        ar_loss = ar_sum / num_ar.clamp(min=1)
        loss = diffusion_loss + ar_loss_weight * ar_loss
        certainty_loss = None
        if certainty_weight:
            certainty_loss = entropy_sum / num_correct.clamp(min=1)
            loss = loss + certainty_weight * certainty_loss
        soft_label_loss = None
        if soft_weight:
            soft_label_loss = soft_sum / num_masked.clamp(min=1)
            loss = loss + soft_weight * soft_label_loss
        return BlockDiffusionOutput(
            loss=loss,
            diffusion_loss=diffusion_loss,
            ar_loss=ar_loss,
            certainty_loss=certainty_loss,
            soft_label_loss=soft_label_loss,
            num_masked_tokens=num_masked,
            num_ar_tokens=num_ar,
        )

    def _loss_sums(self, diff_hidden, diff_targets, diff_weights, ar_hidden, ar_targets, certainty_weight, ar_grad,
                   fused_loss, teacher=None):  # fmt: skip
        """Summed (weighted) diffusion and AR cross-entropies of the gathered rows; for certainty forcing the
        summed entropy where the argmax is right and the count of those rows; with ``teacher`` (the hidden states
        whose distributions are the diffusion rows' soft labels) the summed KL to them (``None`` without)."""
        num_diff = diff_targets.numel()
        certainty_rows = num_diff if certainty_weight else 0
        backend = self.fused_loss_backend(fused_loss, diff_hidden)
        if backend is None:  # the chunked path, one pass over both groups as it always was
            if ar_grad:
                nll, entropy, correct, soft = self._token_nll(
                    torch.cat([diff_hidden, ar_hidden]), torch.cat([diff_targets, ar_targets]), certainty_rows,
                    teacher,
                )  # fmt: skip
                diff_nll, ar_nll = nll[:num_diff], nll[num_diff:]
            else:
                diff_nll, entropy, correct, soft = self._token_nll(diff_hidden, diff_targets, certainty_rows, teacher)
                with torch.no_grad():  # only reported: no logits kept for a backward that cannot reach them
                    ar_nll = self._token_nll(ar_hidden, ar_targets)[0]
            if diff_weights is not None:
                diff_nll = diff_nll * diff_weights.to(diff_nll.dtype)
            return diff_nll.sum(), ar_nll.sum(), entropy.sum(), correct.sum(), soft.sum()

        entropy_sum = num_correct = soft_sum = None
        # Certainty forcing and soft labels need the log-probabilities of the diffusion rows: those stay chunked.
        if certainty_weight or teacher is not None or not num_diff:
            diff_nll, entropy, correct, soft = self._token_nll(diff_hidden, diff_targets, certainty_rows, teacher)
            if diff_weights is not None:
                diff_nll = diff_nll * diff_weights.to(diff_nll.dtype)
            diff_sum, entropy_sum, num_correct, soft_sum = diff_nll.sum(), entropy.sum(), correct.sum(), soft.sum()
        elif diff_weights is not None:  # per-token weights: per-token losses (the kernel recomputes in backward)
            diff_sum = (self._fused_nll(diff_hidden, diff_targets, "none") * diff_weights.float()).sum()
        else:  # a plain sum: the kernel computes the gradient in the forward, no recomputation
            diff_sum = self._fused_nll(diff_hidden, diff_targets, "sum")
        if not ar_targets.numel():
            ar_sum = self._token_nll(ar_hidden, ar_targets)[0].sum()  # an empty sum that stays in the graph
        else:
            with torch.set_grad_enabled(torch.is_grad_enabled() and ar_grad):
                ar_sum = self._fused_nll(ar_hidden, ar_targets, "sum")
        return diff_sum, ar_sum, entropy_sum, num_correct, soft_sum

    # -- fused loss ------------------------------------------------------------------------------------
    def fused_loss_backend(self, fused_loss: str, hidden: torch.Tensor) -> str | None:
        """``'liger'`` when the fused kernel computes the losses of rows like ``hidden``, ``None`` for the chunked
        path. ``'liger'`` asked for but unusable is an error naming the reason; under ``'auto'`` it is logged once."""
        if fused_loss == "none":
            return None
        reason = self._fused_loss_obstacle(hidden)
        if reason is None:
            return "liger"
        if fused_loss == "liger":
            raise ValueError(f"fused_loss='liger' cannot be used: {reason}. Use fused_loss='auto' or 'none'.")
        if hidden.device.type in FUSED_LOSS_DEVICES and reason not in _LOGGED:
            _LOGGED.add(reason)
            logger.info(f"The two-stream losses use the chunked path, not liger-kernel: {reason}.")
        return None

    def _fused_loss_obstacle(self, hidden: torch.Tensor) -> str | None:
        """Why the fused kernel cannot compute these losses exactly as the chunked path does, or None."""
        if hidden.device.type not in FUSED_LOSS_DEVICES:
            return f"it runs on {' / '.join(FUSED_LOSS_DEVICES)}, the model is on {hidden.device.type}"
        if _liger_cross_entropy() is None:
            return f"liger-kernel>={'.'.join(map(str, LIGER_MIN_VERSION))} (with triton) is not importable"
        if type(self).logits_from_hidden is not BlockDiffusionMixin.logits_from_hidden:
            return f"{type(self).__name__} overrides logits_from_hidden"
        if getattr(self.config.get_text_config(decoder=True), "final_logit_softcapping", None) is not None:
            return "the model softcaps its logits"
        head = self._head_weights()
        if head is None:
            return f"the LM head ({type(self.get_output_embeddings()).__name__}) is not a plain linear layer"
        weight, _ = head
        if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or not 0 <= self.mask_token_id < weight.shape[0]:
            return "the LM head's weight is not materialised here (sharded or offloaded)"
        if torch.is_grad_enabled() and weight.requires_grad and not hidden.requires_grad:
            return "the kernel computes no weight gradient for inputs without gradient"
        return None

    def _head_weights(self):
        """``(weight, bias)`` of the LM head where it is a plain linear map (PEFT trainable-token rows merged in),
        else None: other wrappers (quantised, LoRA on the head, sharded tensors) keep the chunked path."""
        head = self.get_output_embeddings()
        base = getattr(getattr(head, "token_adapter", None), "base_layer", None)
        if type(head) is torch.nn.Linear:
            weight, bias = head.weight, head.bias
        elif type(head).__name__ == "TrainableTokensWrapper" and type(base) is torch.nn.Linear and base.bias is None:
            # PEFT's trainable token rows (the mask row under LoRA, tied embeddings): `weight` is the merged
            # matrix its forward applies.
            weight, bias = head.weight, None
        else:
            return None
        if not all(t is None or type(t) in (torch.Tensor, torch.nn.Parameter) for t in (weight, bias)):
            return None
        return weight, bias

    def _fused_nll(self, hidden: torch.Tensor, targets: torch.Tensor, reduction: str) -> torch.Tensor:
        """Cross-entropy of ``hidden @ head.T`` by liger-kernel: summed (``'sum'``) or per row (``'none'``), float32."""
        weight, bias = self._head_weights()
        if not torch.is_grad_enabled():  # the kernel computes gradients whenever its inputs require them
            hidden, weight, bias = hidden.detach(), weight.detach(), None if bias is None else bias.detach()
        mask_id = self.mask_token_id
        # The chunked path gives the mask column -inf; here its row leaves the head (a view when it is the last),
        # so the softmax runs over the same classes and the ones after it move down by one.
        if mask_id == weight.shape[0] - 1:
            weight, bias = weight[:-1], None if bias is None else bias[:-1]
        else:
            weight = torch.cat([weight[:mask_id], weight[mask_id + 1 :]])
            bias = None if bias is None else torch.cat([bias[:mask_id], bias[mask_id + 1 :]])
        is_mask = targets == mask_id  # probability 0 in the chunked path; out of range for the kernel
        targets = (targets - (targets > mask_id).long()).masked_fill(is_mask, IGNORE_INDEX)
        # One cast of the head to the compute dtype, as autocast would do per chunk inside the kernel; the weight
        # gradient is accumulated in float32 and rounded once.
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        nll = _liger_cross_entropy()(
            hidden.to(dtype), weight.to(dtype), targets, bias=None if bias is None else bias.to(dtype),
            ignore_index=IGNORE_INDEX, reduction=reduction, accum_dtype=torch.float32,
        )  # fmt: skip
        infinite = torch.where(is_mask, float("inf"), 0.0)
        return nll + (infinite if reduction == "none" else infinite.sum())

    def _token_nll(self, hidden: torch.Tensor, targets: torch.Tensor, certainty_rows: int = 0, teacher=None):
        """Per-token cross-entropy (float32) of selected rows only, in chunks that recompute in backward to bound
        the (rows x vocab) memory. For the first ``certainty_rows`` rows also the prediction entropy where the
        argmax is the target (and that mask); for the first ``len(teacher)`` rows ``KL(p || q)``, ``p`` the
        distribution of the matching ``teacher`` row (no gradient) and ``q`` the row's; empty tensors otherwise."""
        teacher = hidden[:0] if teacher is None else teacher.detach()
        # The mask token is never a target and never decoded: leaving it out of the softmax keeps the AR loss
        # exactly the source model's (its row is new) and spends no probability mass on it. Built on the device:
        # a tensor copied from the host would wait for the GPU.
        mask_column = torch.full((1,), self.mask_token_id, device=hidden.device)

        def log_probs_of(h):
            # Log-probabilities with the mask column (-inf in every row) set to 0, so that every product and
            # difference of them is 0 there, never NaN.
            logits = self.logits_from_hidden(h).float().index_fill(1, mask_column, float("-inf"))
            return logits, logits.log_softmax(-1).nan_to_num(neginf=0.0)

        def chunk(h, y, n_certainty, t):
            logits, log_q = log_probs_of(h)
            nll = F.cross_entropy(logits, y, reduction="none")
            soft = nll.new_zeros(0)
            if t.shape[0]:
                with torch.no_grad():
                    log_p = log_probs_of(t)[1]
                soft = (log_p.exp() * (log_p - log_q[: t.shape[0]])).sum(-1)
            if not n_certainty:
                return nll, nll.new_zeros(0), nll.new_zeros(0, dtype=torch.bool), soft
            log_probs = log_q[:n_certainty]
            entropy = -(log_probs.exp() * log_probs).sum(-1)
            correct = logits[:n_certainty].argmax(-1) == y[:n_certainty]
            return nll, entropy * correct, correct, soft

        rows = hidden.shape[0]
        if rows <= LOSS_CHUNK_ROWS or not torch.is_grad_enabled():
            return chunk(hidden, targets, certainty_rows, teacher)
        parts = [
            checkpoint(
                chunk,
                hidden[i : i + LOSS_CHUNK_ROWS],
                targets[i : i + LOSS_CHUNK_ROWS],
                min(max(certainty_rows - i, 0), LOSS_CHUNK_ROWS),
                teacher[i : i + LOSS_CHUNK_ROWS],
                use_reentrant=False,
            )  # fmt: skip
            for i in range(0, rows, LOSS_CHUNK_ROWS)
        ]
        return tuple(torch.cat(column) for column in zip(*parts))

    # -- generation ------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids=None, attention_mask=None, generation_config=None, streamer=None, **kwargs):
        """Block-wise denoising generation with an exact prefix KV cache; see ``denoise.generate_blocks``.

        Takes the usual arguments (``max_new_tokens``, ``do_sample``, ``temperature``, ``top_k``, ``top_p``,
        ``eos_token_id``, ``pad_token_id``, ``min_new_tokens``, ``stopping_criteria``,
        ``return_dict_in_generate``, ``streamer``) and the block-diffusion ones: ``block_size``, ``threshold``,
        ``steps_per_block``, ``confidence`` ('probability' | 'margin' | 'entropy'), ``repeat_guard`` and ``generator``.
        Defaults come from ``generation_config``. ``block_size=1`` is exactly autoregressive decoding.
        """
        return generate_blocks(
            self, input_ids, attention_mask, generation_config=generation_config, streamer=streamer, **kwargs
        )


# ------------------------------------------------------------------------------------------------------------
# Registry: model_type -> block-diffusion class, built on first use
#
# Each architecture's modeling module is imported only when a model of that type is built, so a checkpoint keeps
# loading when an unrelated architecture's module moves or disappears in a later transformers release.


@dataclass(frozen=True)
class Architecture:
    module: str  # transformers.models.<module>.modeling_<module>
    stock_class: str  # the stock XxxForCausalLM
    per_layer_type: bool = False  # the base model takes `{layer_type: mask}` (config.layer_types)

    @property
    def class_name(self) -> str:
        return f"BlockDiffusion{self.stock_class}"


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture("llama", "LlamaForCausalLM"),
    "mistral": Architecture("mistral", "MistralForCausalLM"),
    "qwen2": Architecture("qwen2", "Qwen2ForCausalLM", per_layer_type=True),
    "qwen3": Architecture("qwen3", "Qwen3ForCausalLM", per_layer_type=True),
    "gemma2": Architecture("gemma2", "Gemma2ForCausalLM", per_layer_type=True),
    "gemma3_text": Architecture("gemma3", "Gemma3ForCausalLM", per_layer_type=True),
    "phi3": Architecture("phi3", "Phi3ForCausalLM"),
    "olmo2": Architecture("olmo2", "Olmo2ForCausalLM"),
}
SUPPORTED_MODEL_TYPES = tuple(sorted(ARCHITECTURES))


def _build_class(arch: Architecture) -> type:
    module = importlib.import_module(f"transformers.models.{arch.module}.modeling_{arch.module}")
    stock = getattr(module, arch.stock_class)
    # `__module__` makes save_pretrained copy this file (and its relative imports) next to the weights, and lets
    # `auto_map` resolve the class by name through this module's `__getattr__`.
    cls = type(
        arch.class_name, (BlockDiffusionMixin, stock), {"__module__": __name__, "__qualname__": arch.class_name}
    )
    cls._mask_per_layer_type = arch.per_layer_type
    _list_for_text_generation(cls)
    return cls


def _list_for_text_generation(cls):
    """``pipeline("text-generation")`` checks the model's class *name* against MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    and otherwise logs an error listing every causal LM. List ours under a key that is no ``model_type``: the
    auto classes look entries up by model_type, so a stock config still loads its stock class."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.setdefault(f"hf_blockdiff:{cls.__name__}", cls.__name__)


def block_diffusion_class(config_or_model_type) -> type:
    """The block-diffusion class for a config (or a ``model_type``), or an error naming the supported ones."""
    model_type = getattr(config_or_model_type, "model_type", config_or_model_type)
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"Architecture {model_type!r} is not supported by hf_blockdiff. Supported model types: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}."
        )
    arch = ARCHITECTURES[model_type]
    cls = globals().get(arch.class_name)
    if cls is None:
        cls = globals()[arch.class_name] = _build_class(arch)
    return cls


def __getattr__(name: str):
    # `auto_map` names e.g. `modeling_blockdiff.BlockDiffusionLlamaForCausalLM`: build that class on request.
    for model_type, arch in ARCHITECTURES.items():
        if arch.class_name == name:
            return block_diffusion_class(model_type)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
