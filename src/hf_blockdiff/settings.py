# Copyright 2026 The hf_blockdiff authors. Apache-2.0.
"""The block-diffusion decoding settings of a request: their names, what each may be, and the one check of them.

Hub-portable: imports only the standard library (the command line reads these names before it loads torch).

``generate()`` takes them as keyword arguments (or from ``generation_config``), the scheduler and the server per
request or as the server's defaults, the CLI as flags and the harness as model or generation arguments. Each
builds a :class:`DecodeSettings` and calls :meth:`DecodeSettings.validate`, so all of them refuse the same values
with the same message, saying what to change.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field, fields

CONFIDENCE_MEASURES = ("probability", "margin", "entropy")

# Where a setting applies (``DecodeSettings`` field metadata): "request": per row of the engine, so requests that
# share a forward may differ; "engine": one value for every row of an engine (a server's requests all share it);
# "runtime": engine-wide too, and only how the step runs, not what it outputs.
REQUEST, ENGINE, RUNTIME = "request", "engine", "runtime"


class SettingError(ValueError):
    """A setting that cannot be used as given; ``name`` is the setting's."""

    def __init__(self, message: str, name: str):
        super().__init__(message)
        self.name = name


def _setting(kind: type, scope: str = REQUEST):
    return field(default=None, metadata={"kind": kind, "scope": scope})


@dataclass
class DecodeSettings:
    """How a request is decoded, beside transformers' own generation settings. None: not given here (generate():
    ``generation_config``'s, then the default; a served request: the server's)."""

    block_size: int | None = _setting(int)  # positions decoded together; 1: the source model's AR decoding
    threshold: float | None = _setting(float)  # commit masked positions whose confidence exceeds it (at least one)
    steps_per_block: int | None = _setting(int)  # or: finish every block in this many denoising steps
    confidence: str | None = _setting(str, ENGINE)  # one of CONFIDENCE_MEASURES (default: probability)
    repeat_guard: bool | None = _setting(bool)  # hold back threshold commits repeating an adjacent, open proposal
    verify: bool | None = _setting(bool)  # draft each block, keep what the causal model accepts (lossless)
    # verify: candidate next blocks drafted inside each verifying forward (docs/design.md 2.6); None: chosen by the
    # batch; 0: a drafting forward of its own per block
    candidates: int | None = _setting(int)
    # one-forward verify: guessing copies of every candidate, each with one of the draft's next choices in place of
    # the mask the causal token will fill (docs/design.md 2.6); None: chosen with the candidates
    guesses: int | None = _setting(int, ENGINE)
    # one-forward verify: positions of each candidate block (its anchor, then masks), so at most this many - 1 drafts
    # per block; None: the block size (docs/design.md 2.6)
    candidate_width: int | None = _setting(int, ENGINE)
    # one-forward verify: nodes of the tree of drafts besides the chain, the likeliest rank paths (draft_tree.py):
    # greedy rows keep the longest path the causal model agrees with; None / 0: the chain (docs/design.md 2.6)
    draft_tree: int | None = _setting(int, ENGINE)
    use_cuda_graph: bool | None = _setting(bool, RUNTIME)  # None: on CUDA
    compile_step: bool | None = _setting(bool, RUNTIME)  # torch.compile the captured step (None: with a graph)

    def asks_threshold_decoding(self) -> bool:
        """Whether a threshold or a step quota is given: where verify is the default, these ask for threshold
        decoding instead."""
        return self.threshold is not None or self.steps_per_block is not None

    def asks_blocks(self) -> bool:
        """Whether these settings ask for decoding in blocks (a block size, threshold decoding or verify), which a
        CPU default of block size 1 must not override."""
        return self.block_size is not None or bool(self.verify) or self.asks_threshold_decoding()

    def validate(self, largest: int | None = None, most_candidates: int | None = None,
                 where: str = "the model's") -> DecodeSettings:  # fmt: skip
        """Raise a ValueError that says what to change if a given setting cannot be used; return ``self``.
        ``largest`` / ``most_candidates``: the block size and candidates ``where`` (an engine, a server) holds."""
        if self.candidates is not None and (not _is_int(self.candidates) or self.candidates < 0):
            size = "block_size" if self.block_size is None else f"block_size ({self.block_size})"
            raise SettingError(f"candidates must be an integer between 0 and {size}, or None to choose by the "
                               f"batch; got {self.candidates!r}.", "candidates")  # fmt: skip
        for f in fields(DecodeSettings):
            value, kind = getattr(self, f.name), f.metadata["kind"]
            if value is not None and not _IS[kind](value):
                raise SettingError(f"{f.name} must be {_KIND_NAMES[kind]}, got {value!r}.", f.name)
        if self.guesses is not None and self.guesses < 0:
            raise SettingError(f"guesses must be >= 0 (0: candidates without guessing copies), got {self.guesses!r}.",
                               "guesses")  # fmt: skip
        if self.candidate_width is not None and self.candidate_width < 2:
            raise SettingError(f"candidate_width must be >= 2 (an anchor and at least one mask to draft), got "
                               f"{self.candidate_width!r}; None: the block size.", "candidate_width")  # fmt: skip
        if self.draft_tree is not None and self.draft_tree < 0:
            raise SettingError(f"draft_tree must be >= 0 (tree nodes besides the chain; 0: the chain), got "
                               f"{self.draft_tree!r}.", "draft_tree")  # fmt: skip
        if self.threshold is not None and not 0 <= self.threshold <= 1:
            raise SettingError(f"threshold must be in [0, 1], got {self.threshold!r}.", "threshold")
        if self.steps_per_block is not None and self.steps_per_block < 1:
            raise SettingError(f"steps_per_block must be >= 1, got {self.steps_per_block!r}.", "steps_per_block")
        if self.confidence is not None and self.confidence not in CONFIDENCE_MEASURES:
            raise SettingError(f"confidence must be one of {CONFIDENCE_MEASURES}, got {self.confidence!r}.",
                               "confidence")  # fmt: skip
        if self.block_size is not None:
            check_block_settings(self.block_size, bool(self.verify), self.candidates, largest, most_candidates, where)
        return self


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # (True is an int to Python, not to a user)


_IS = {
    int: _is_int,
    float: lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool),
    bool: lambda v: isinstance(v, bool),
    str: lambda v: isinstance(v, str),
}
_KIND_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}

# Every setting's name: the block-diffusion generate() kwargs (and generation_config attributes).
SETTINGS = tuple(f.name for f in fields(DecodeSettings))
# Those one engine holds for all its rows: a server takes them at its start, never per request.
ENGINE_WIDE = tuple(f.name for f in fields(DecodeSettings) if f.metadata["scope"] != REQUEST)
# Those that change the output (what a result reports about how it was decoded).
DECODING = tuple(f.name for f in fields(DecodeSettings) if f.metadata["scope"] != RUNTIME)


def check_block_settings(block_size, verify: bool = False, candidates=None, largest: int | None = None,
                         most_candidates: int | None = None, where: str = "the model's"):  # fmt: skip
    """The check of a request's block settings (:meth:`DecodeSettings.validate`, and the engine's): a ValueError
    that says what to change. ``largest`` / ``most_candidates``: what ``where`` (the engine, a server) holds;
    ``candidates`` None: chosen by the batch."""
    if not _is_int(block_size) or not 1 <= block_size <= (largest or block_size):
        upto = f" and at most {where} {largest}" if largest else ""
        raise ValueError(f"block_size must be >= 1{upto} (an integer), got {block_size!r}.")
    if verify and block_size < 2:
        raise ValueError(
            f"verify=True drafts whole blocks and keeps what the causal model accepts: it needs block_size >= 2 "
            f"(got {block_size}; block_size=1 is already the AR decoding verify reproduces)."
        )
    most = block_size if most_candidates is None else min(block_size, most_candidates)
    if verify and candidates is not None and (not _is_int(candidates) or not 0 <= candidates <= most):
        limit = f"{where} {most_candidates}" if most_candidates is not None and most_candidates < block_size else (
            f"block_size ({block_size})")  # fmt: skip
        raise ValueError(
            f"candidates must be an integer between 0 and {limit}, or None to choose by the batch; got "
            f"{candidates!r}. It is how many next blocks a verifying forward drafts (0: draft in a forward of its "
            "own)."
        )
