# Copyright 2026 The hf_blockdiff authors. Apache-2.0.
"""lm-evaluation-harness model ``hf_blockdiff``: converted checkpoints, block-diffusion generation, tokens per forward.

Importing this module registers the model with lm-eval (``import hf_blockdiff`` alone never imports lm_eval, an
optional extra: ``pip install 'hf_blockdiff[eval]'``). lm-eval 0.4.x has no plugin hook for models, so from the
command line run lm-eval through this module, which registers the model and adds the shipped tasks (the folder
``harness_tasks``) as ``--include_path`` when none is given::

    python -m hf_blockdiff.harness --model hf_blockdiff --model_args pretrained=out/smollm2-bd,block_size=16 \\
        --gen_kwargs threshold=0.9 --tasks blockdiff_tiny --device cpu --batch_size 8

or from Python: ``import hf_blockdiff.harness`` then ``lm_eval.simple_evaluate(model="hf_blockdiff", ...)``.

What it changes over the stock ``hf`` model (``lm_eval.models.huggingface.HFLM``):

- Block settings (``block_size``, ``threshold``, ``verify``, ``steps_per_block``, ``confidence``, ``repeat_guard``,
  ...) are accepted as ``--model_args`` (defaults for every request) or ``--gen_kwargs`` (which win).
- Stop strings are checked per row, so each row ends at its own stop string. (lm-eval's ``MultiTokenEOSCriteria``
  answers for the whole batch: with the stock ``hf`` model a batch's rows decode until every row has met one.)
- A converted folder loads with the installed hf_blockdiff classes, so ``trust_remote_code`` is not needed (with
  ``trust_remote_code=True`` the folder's own code is used, as with ``hf``).
- Log-likelihoods come from the plain causal forward (block size 1 is the source model) with the mask token left
  out of the softmax: it never occurs in text, and when conversion added it as a new row, the scores then equal
  the source model's exactly.
- Tokens per forward over all generation requests (the decoder's, and up to the stop strings: see
  :attr:`BlockDiffusionLM.stats`) is logged, kept on the model and written into the results under
  ``config.block_diffusion``; ``python -m hf_blockdiff.harness`` prints it after the table.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from .modeling_blockdiff import block_diffusion_class
from .settings import DECODING, SETTINGS, DecodeSettings

TASKS_DIR = Path(__file__).resolve().with_name("harness_tasks")
INSTALL_HINT = "pip install 'hf_blockdiff[eval]'"

# lm-eval configures (handler, level from --verbosity) its own "lm_eval" logger only: log beside its messages.
logger = logging.getLogger("lm_eval.hf_blockdiff")

try:
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
except ImportError as err:
    message = f"hf_blockdiff.harness needs lm-evaluation-harness, which is not installed ({err}): {INSTALL_HINT}"
    logger.error(message)
    if __name__ == "__main__":
        sys.exit(1)
    raise ImportError(message) from err

COUNTS = ("rows", "generated_tokens", "answer_tokens", "row_forwards", "batch_forwards")

# The model most recently built here, for the summary printed after a command-line run.
LAST_MODEL: BlockDiffusionLM | None = None


def is_converted(config) -> bool:
    """Whether ``config`` is a block-diffusion checkpoint written by hf_blockdiff."""
    names = getattr(config, "architectures", None) or []
    return getattr(config, "mask_token_id", None) is not None and any(n.startswith("BlockDiffusion") for n in names)


class StopStrings(StoppingCriteria):
    """True for each row whose continuation (after ``prompt_width`` tokens) contains one of ``stops``.

    Stateless and per row, so it answers for whichever rows it is given. Block-diffusion ``generate()`` asks for
    the whole batch with rows at different lengths, each row's tokens after a gap of ``filler`` tokens (the mask
    token, never text): those are left out of the text.
    """

    def __init__(self, tokenizer, stops: list[str], prompt_width: int, filler: int | None = None):
        self.tokenizer, self.stops, self.prompt_width = tokenizer, [s for s in stops if s], prompt_width
        self.filler = filler

    def __call__(self, input_ids, scores, **kwargs):
        rows = [[t for t in row if t != self.filler] for row in input_ids[:, self.prompt_width :].tolist()]
        return torch.tensor([self.hit(t) for t in self.tokenizer.batch_decode(rows)], device=input_ids.device)

    def hit(self, text: str) -> bool:
        return any(s in text for s in self.stops)

    def answer_length(self, tokens: list[int]) -> int:
        """How many of ``tokens`` (a continuation) the answer takes: up to the first stop string, inclusive."""
        if not self.hit(self.tokenizer.decode(tokens)):
            return len(tokens)
        low, high = 1, len(tokens)  # the shortest prefix that holds a stop string
        while low < high:
            mid = (low + high) // 2
            low, high = (low, mid) if self.hit(self.tokenizer.decode(tokens[:mid])) else (mid + 1, high)
        return low


def _with_ratios(counts: dict) -> dict:
    rows, forwards, batched = counts["rows"], counts["row_forwards"], counts["batch_forwards"]
    return dict(
        counts,
        tokens_per_forward=counts["generated_tokens"] / forwards if forwards else None,
        answer_tokens_per_forward=counts["answer_tokens"] / forwards if forwards else None,
        forwards_per_row=forwards / rows if rows else None,
        tokens_per_batch_forward=counts["generated_tokens"] / batched if batched else None,
    )


def _describe(s: dict) -> str:
    return (
        f"{s['tokens_per_forward']:.3f} tokens per forward ({s['generated_tokens']} tokens, {s['row_forwards']} "
        f"forwards over {s['rows']} rows: {s['forwards_per_row']:.2f} per row); up to the stop strings "
        f"{s['answer_tokens_per_forward']:.3f} ({s['answer_tokens']} tokens); {s['tokens_per_batch_forward']:.3f} "
        f"per batched forward ({s['batch_forwards']})"
    )


@register_model("hf_blockdiff")
class BlockDiffusionLM(HFLM):
    """``HFLM`` for hf_blockdiff checkpoints; see the module docstring. Block settings are keyword arguments."""

    def __init__(self, pretrained, **kwargs):
        global LAST_MODEL
        self.block_settings = {k: kwargs.pop(k) for k in SETTINGS if k in kwargs}
        DecodeSettings(**self.block_settings).validate()  # before the model loads
        super().__init__(pretrained, **kwargs)
        if not is_converted(self.model.config) or not type(self.model).__name__.startswith("BlockDiffusion"):
            raise ValueError(
                f"{type(self.model).__name__} is not a block-diffusion model: `--model hf_blockdiff` evaluates "
                "checkpoints converted with `hf_blockdiff convert` (use `--model hf` for the source model)."
            )
        self.reset_stats()
        LAST_MODEL = self

    def _create_model(self, pretrained, *args, **kwargs):
        if kwargs.get("trust_remote_code") or not is_converted(self.config):
            return super()._create_model(pretrained, *args, **kwargs)
        auto, self.AUTO_MODEL_CLASS = self.AUTO_MODEL_CLASS, block_diffusion_class(self.config)
        try:
            return super()._create_model(pretrained, *args, **kwargs)
        finally:
            self.AUTO_MODEL_CLASS = auto

    # -- log-likelihood: the causal forward ------------------------------------------------------------
    def _model_call(self, inps, attn_mask=None, labels=None):
        logits = super()._model_call(inps, attn_mask, labels)  # forward() without extra arguments: causal
        mask_id = self.model.config.mask_token_id
        if mask_id < logits.shape[-1]:
            logits[..., mask_id] = float("-inf")
        return logits

    # -- generation ------------------------------------------------------------------------------------
    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        kwargs = {**self.block_settings, **generation_kwargs}
        # greedy unless asked otherwise, as HFLM._model_generate
        kwargs["temperature"] = kwargs.get("temperature", 0.0)
        if kwargs["temperature"] == 0.0 and kwargs.get("do_sample") is None:
            kwargs["do_sample"] = False
        if kwargs["do_sample"] is False and kwargs["temperature"] == 0.0:
            kwargs.pop("temperature")
        stops = StopStrings(self.tokenizer, stop, context.shape[1], self.model.config.mask_token_id)
        with torch.autocast(
            device_type=self.device.type,
            dtype=self.mixed_precision_dtype,
            enabled=self.mixed_precision_dtype is not None,
        ):
            out = self.model.generate(
                input_ids=context,
                max_length=max_length,
                stopping_criteria=StoppingCriteriaList([stops]),
                pad_token_id=self.tokenizer.pad_token_id,
                use_cache=True,
                return_dict_in_generate=True,
                **kwargs,
            )
        self._count(out, kwargs, stops)
        return out.sequences

    def generate_until(self, requests, disable_tqdm: bool = False):
        """HFLM's, one task at a time so that tokens per forward is counted per task too. Rows decode
        independently, so how requests are batched does not change the output."""
        tasks: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            tasks.setdefault(getattr(request, "task_name", None) or "requests", []).append(i)
        results = [None] * len(requests)
        for task, indices in tasks.items():
            self._task = task
            for i, result in zip(indices, super().generate_until([requests[i] for i in indices], disable_tqdm)):
                results[i] = result
        self._task = "requests"
        if self._counts:
            for line in self.summary().splitlines():
                logger.info(line)
        return results

    # -- tokens per forward ----------------------------------------------------------------------------
    def reset_stats(self):
        self._counts: dict[str, dict[str, int]] = {}  # task -> totals
        self._settings: list[dict] = []
        self._task = "requests"

    def _count(self, out, kwargs, stops: StopStrings):
        generated = out.num_generated_tokens.tolist()
        answers = [
            stops.answer_length(row[stops.prompt_width : stops.prompt_width + n])
            for row, n in zip(out.sequences.tolist(), generated)
        ]
        counts = self._counts.setdefault(self._task, dict.fromkeys(COUNTS, 0))
        counts["rows"] += len(generated)
        counts["generated_tokens"] += sum(generated)
        counts["answer_tokens"] += sum(answers)
        counts["row_forwards"] += int(out.row_forward_passes.sum())
        counts["batch_forwards"] += int(out.num_forward_passes)
        gc = self.model.generation_config
        settings = {"block_size": out.block_size}  # the one decoded with (verify_plan may choose 1)
        for name in DECODING:
            value = kwargs.get(name, getattr(gc, name, None))
            if value is not None:
                settings.setdefault(name, value)
        if settings not in self._settings:
            self._settings.append(settings)

    @property
    def stats(self) -> dict:
        """Generation totals over every generate_until request so far, and per task under ``tasks``.

        ``generated_tokens``: what the decoder produced, EOS included. A block-diffusion row checks stop strings
        when a block completes, so this includes the rest of the block after a stop string; ``answer_tokens``
        counts up to the first stop string only (what the answer keeps). ``row_forwards``: forwards summed over
        rows (what each row costs decoded alone); ``batch_forwards``: forwards of the batches as run.
        ``tokens_per_forward`` = generated / row forwards (1.0 at block size 1), ``answer_tokens_per_forward`` =
        answer / row forwards, ``forwards_per_row`` = row forwards / rows (the cost of one answer, comparable
        across block sizes), ``tokens_per_batch_forward`` = generated / batch forwards (batching included).
        """
        total = {key: sum(c[key] for c in self._counts.values()) for key in COUNTS}
        return dict(
            _with_ratios(total),
            settings=list(self._settings),
            tasks={task: _with_ratios(c) for task, c in self._counts.items()},
        )

    def summary(self) -> str:
        """The totals on one line, then one line per task."""
        s = self.stats
        if not s["row_forwards"]:
            return "hf_blockdiff: no generation requests"
        lines = [f"hf_blockdiff: {_describe(s)}; settings {s['settings']}"]
        lines += [f"  {task}: {_describe(c)}" for task, c in s["tasks"].items()]
        return "\n".join(lines)

    def get_model_info(self) -> dict:
        info = super().get_model_info()
        info["block_diffusion"] = dict(self.stats, model_args=self.block_settings)
        return info


def main(argv: list[str] | None = None) -> None:
    """``lm_eval`` with ``--model hf_blockdiff`` registered and the shipped tasks included (unless
    ``--include_path`` is given); then the tokens-per-forward summary."""
    from lm_eval.__main__ import cli_evaluate

    argv = list(sys.argv[1:] if argv is None else argv)
    takes_tasks = bool(argv) and (argv[0] in ("run", "ls", "validate") or argv[0].startswith("-"))
    if takes_tasks and not any(a == "--include_path" or a.startswith("--include_path=") for a in argv):
        argv += ["--include_path", str(TASKS_DIR)]
    sys.argv = ["lm_eval", *argv]
    cli_evaluate()
    if LAST_MODEL is not None:
        print(LAST_MODEL.summary())


if __name__ == "__main__":
    main()
