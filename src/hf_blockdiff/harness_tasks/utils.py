# Copyright 2026 The hf_blockdiff authors. Apache-2.0.
"""Datasets of the shipped lm-evaluation-harness tasks, loaded from the JSONL files next to this file.

A ``data_files`` path in a task's YAML is resolved by ``datasets`` against the current directory, not against the
YAML, so the tasks load their data here (``custom_dataset: !function utils.<name>``), which works from any directory
and offline (the ``json`` builder ships with ``datasets``).
"""

from pathlib import Path

HERE = Path(__file__).resolve().parent


def _jsonl(name: str):
    import datasets

    return datasets.load_dataset("json", data_files={"test": str(HERE / name)})


def qa_gen(**kwargs):
    """48 short-answer questions (capitals, arithmetic, opposites, colours, days, plurals)."""
    return _jsonl("qa_gen.jsonl")


def copy_gen(**kwargs):
    """48 sentences to repeat verbatim."""
    return _jsonl("copy_gen.jsonl")


def qa_mc(**kwargs):
    """48 four-way multiple-choice questions on the same kind of facts."""
    return _jsonl("qa_mc.jsonl")
