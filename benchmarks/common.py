"""Timing and reporting helpers shared by the benchmarks: CUDA events after warm-up, median of repeats,
markdown tables printed and saved under benchmarks/results/."""

from __future__ import annotations

import gzip
import json
import platform
import statistics
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"

# Model shapes used across benchmarks (random init is enough for speed: timing does not depend on weights).
SHAPES = {
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49153, tie_word_embeddings=True,
                         max_position_embeddings=8192),
    "qwen2-0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, vocab_size=151937, tie_word_embeddings=True,
                       max_position_embeddings=32768),
    "qwen2-1.5b": dict(model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                       num_attention_heads=12, num_key_value_heads=2, vocab_size=151937, tie_word_embeddings=True,
                       max_position_embeddings=32768),
    # For dry runs of the scripts on a CPU.
    "tiny": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1001, max_position_embeddings=4096),
}  # fmt: skip


def timer(device) -> callable:
    """CUDA events on a GPU, the wall clock elsewhere (dry runs)."""
    return cuda_time if torch.device(device).type == "cuda" else wall_time


def random_model(shape: str, attn: str, dtype=torch.bfloat16, device="cuda"):
    """A block-diffusion model of a named shape with random weights (mask token = last row)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from hf_blockdiff.modeling_blockdiff import block_diffusion_class

    spec = dict(SHAPES[shape])
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    config.mask_token_id = config.vocab_size - 1
    config.block_size = 4
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=dtype)
    model.__class__ = block_diffusion_class(config)
    return model


def cuda_time(fn, warmup: int = 3, repeats: int = 10) -> float:
    """Median milliseconds of ``fn()`` measured with CUDA events after warm-up."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def wall_time(fn, warmup: int = 1, repeats: int = 5) -> float:
    """Median milliseconds of ``fn()`` by wall clock, synchronising CUDA when present."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
    columns = columns or list(rows[0])

    def fmt(value):
        if value is None:
            return ""
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 100 else f"{value:.1f}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def environment() -> str:
    """Where a result was measured: device, torch and transformers versions."""
    text = f"Device: {device_name()}; torch {torch.__version__}"
    try:
        import transformers

        text += f"; transformers {transformers.__version__}"
    except ImportError:
        pass
    return text


def read_jsonl(path, key: str | None = None) -> list:
    """The records of a .jsonl (or .jsonl.gz) file, or their ``key`` field. Split on newlines only: ``splitlines``
    would also split at U+2028 and friends, which JSON leaves raw inside strings."""
    path = Path(path)
    text = gzip.decompress(path.read_bytes()).decode() if path.suffix == ".gz" else path.read_text()
    records = [json.loads(line) for line in text.split("\n") if line.strip()]
    return records if key is None else [record[key] for record in records]


def save(
    name: str, title: str, rows: list[dict], notes: str = "", columns=None, measured_on: str | None = None
) -> Path:
    """Print the table and save it (markdown + json) under benchmarks/results/. ``measured_on``: the
    :func:`environment` line of where the rows were measured (default: here)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    measured_on = measured_on or environment()
    text = f"# {title}\n\n{measured_on}\n\n{markdown_table(rows, columns)}\n" + (f"\n{notes}\n" if notes else "")
    print(text)
    (RESULTS / f"{name}.md").write_text(text)
    device = measured_on.split(";")[0].removeprefix("Device: ")
    record = {"title": title, "device": device, "rows": rows, "notes": notes, "columns": columns,
              "measured_on": measured_on}  # fmt: skip
    (RESULTS / f"{name}.json").write_text(json.dumps(record, indent=1))
    return RESULTS / f"{name}.md"


def merge(name: str, parts: list[str]) -> Path:
    """One table of the rows of tables saved by :func:`save` (e.g. one process per batch, each under a time limit),
    saved as ``name``; title, notes, columns and where they were measured from the first part found (so a merge
    made on another machine keeps the GPU's). A part that is missing is named."""
    found = [p for p in parts if (RESULTS / f"{p}.json").exists()]
    if not found:
        raise FileNotFoundError(f"None of {parts} is saved under {RESULTS}.")
    loaded = [json.loads((RESULTS / f"{p}.json").read_text()) for p in found]
    missing = [p for p in parts if p not in found]
    notes = loaded[0].get("notes") or ""
    notes += f" Merged from: {', '.join(found)}." + (
        f" Missing (no rows saved): {', '.join(missing)}." if missing else ""
    )
    rows = [row for part in loaded for row in part["rows"]]
    first = loaded[0]
    measured_on = first.get("measured_on") or (f"Device: {first['device']}" if first.get("device") else None)
    return save(name, first["title"], rows, notes=notes.strip(), columns=first.get("columns"), measured_on=measured_on)
