# Copyright 2026 The hf_blockdiff authors. Apache-2.0.
"""Show parallel decoding: which tokens were committed together, at which step of their block.

``generate(..., return_dict_in_generate=True)`` records, for every token, the forward that committed it
(``committed_at``). Tokens sharing a forward were decided in parallel. This module turns that into a
self-contained SVG (no plotting dependency; renders on GitHub) or an HTML page.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

REJECTED_STYLE = 'fill="white" stroke="#8c959f" stroke-dasharray="3,2"'
# Step 0 is the block's first token (an AR step); later steps are denoising forwards.
PALETTE = ["#d0d7de", "#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7",
           "#9c755f", "#bab0ac"]  # fmt: skip


@dataclass
class TracedToken:
    text: str
    block: int
    step: int  # 0 = first token of the block (AR step), k = committed by the block's k-th denoising forward
    forward: int  # the row's forward that committed it (-1: rejected)
    rejected: bool = False  # verify: a drafted token the causal model did not accept (not part of the output)


def decoding_trace(tokenizer, output, row: int = 0) -> list[TracedToken]:
    """Per generated token of ``row``: its text, block, and the step of its block that committed it; with
    ``verify``, each cut draft's rejected tokens follow the kept part of their block."""
    committed = output.committed_at[row].tolist()
    length = int(output.num_generated_tokens[row])
    new_tokens = output.sequences[row, -len(committed) :].tolist()[:length]
    starts = getattr(output, "block_starts", None)
    starts = starts[row] if starts else list(range(0, length, output.block_size))
    rejected = dict(getattr(output, "rejected_drafts", None)[row]) if getattr(output, "rejected_drafts", None) else {}
    trace = []
    for block, (start, end) in enumerate(zip(starts, starts[1:] + [length])):
        for token, forward in zip(new_tokens[start:end], committed[start:end]):
            trace.append(TracedToken(tokenizer.decode([token]), block, forward - committed[start], forward))
        trace += [TracedToken(tokenizer.decode([t]), block, -1, -1, rejected=True) for t in rejected.get(end, [])]
    return trace


def summary(output, row: int | None = None) -> str:
    if row is None:
        tokens, forwards = int(output.num_generated_tokens.sum()), output.num_forward_passes
    else:
        tokens, forwards = int(output.num_generated_tokens[row]), int(output.row_forward_passes[row])
    return f"{tokens} tokens in {forwards} forwards: {tokens / max(forwards, 1):.2f} tokens per forward"


def to_svg(trace: list[TracedToken], title: str = "", width: int = 960, font_size: int = 14) -> str:
    """Tokens in boxes coloured by their step in the block; one line per block group, wrapped to ``width``."""
    char_w, line_h, pad = font_size * 0.6, font_size * 2.1, 6
    x, y = pad, pad + (line_h if title else 0)
    boxes = []
    for i, tok in enumerate(trace):
        label = tok.text.replace("\n", "\u21b5") or " "
        w = max(len(label), 1) * char_w + 6
        if x + w > width - pad:
            x, y = pad, y + line_h
        if i and tok.block != trace[i - 1].block:
            x += 4  # a gap marks the block boundary
        box = f'<rect x="{x:.1f}" y="{y:.1f}" width="{w:.1f}" height="{font_size * 1.6:.1f}" rx="3" '
        text = f'<text x="{x + 3:.1f}" y="{y + font_size * 1.15:.1f}"'
        if tok.rejected:  # drawn, not output: dashed outline, struck through
            boxes.append(f'{box}{REJECTED_STYLE}><title>block {tok.block}: rejected draft</title></rect>'
                         f'{text} fill="#8c959f" text-decoration="line-through">{html.escape(label)}</text>')  # fmt: skip
        else:
            boxes.append(f'{box}fill="{PALETTE[tok.step % len(PALETTE)]}"><title>block {tok.block}, step {tok.step}'
                         f"</title></rect>{text}>{html.escape(label)}</text>")  # fmt: skip
        x += w + 2
    legend_y = y + line_h + 4
    legend = [f'<text x="{pad}" y="{legend_y + font_size:.1f}">step in block:</text>']
    lx = pad + 15 * char_w
    for step in range(min(max((t.step for t in trace), default=0) + 1, len(PALETTE))):
        legend.append(f'<rect x="{lx:.1f}" y="{legend_y:.1f}" width="{font_size * 1.4}" height="{font_size * 1.4}" '
                      f'rx="3" fill="{PALETTE[step]}"/><text x="{lx + 3:.1f}" y="{legend_y + font_size:.1f}">{step}</text>')  # fmt: skip
        lx += font_size * 1.4 + 6
    if any(t.rejected for t in trace):
        legend.append(f'<rect x="{lx + 8:.1f}" y="{legend_y:.1f}" width="{font_size * 1.4}" height="{font_size * 1.4}" '
                      f'rx="3" {REJECTED_STYLE}/><text x="{lx + 14 + font_size * 1.4:.1f}" y="{legend_y + font_size:.1f}">'
                      "rejected draft (verify)</text>")  # fmt: skip
    height = legend_y + line_h + pad
    head = f'<text x="{pad}" y="{pad + font_size:.1f}" font-weight="bold">{html.escape(title)}</text>' if title else ""
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height:.0f}" '
        f'font-family="DejaVu Sans Mono, Menlo, Consolas, monospace" font-size="{font_size}">'
        f'<rect width="100%" height="100%" fill="white"/>{head}{"".join(boxes)}{"".join(legend)}</svg>\n'
    )


def to_html(trace: list[TracedToken], title: str = "") -> str:
    """A standalone HTML page embedding the SVG."""
    return (
        f"<!doctype html><meta charset='utf-8'><title>{html.escape(title or 'block diffusion decoding')}</title>"
        f"<body style='font-family:sans-serif'>{to_svg(trace, title)}"
        "<p>Each box is a generated token; its colour is the denoising step of its block that committed it "
        "(0 = the block's first token, an autoregressive step). Boxes of one colour inside a block were committed "
        "by the same forward pass: that is the parallelism. Dashed, struck-through boxes (verify) are drafted tokens "
        "the causal model rejected; its own token follows instead.</p></body>\n"
    )


def save_visualization(path, tokenizer, output, row: int = 0, title: str = "") -> Path:
    """Write ``.svg`` or ``.html`` (by suffix) for one row of a generate output."""
    path = Path(path)
    trace = decoding_trace(tokenizer, output, row)
    title = title or summary(output, row)
    if path.suffix == ".svg":
        path.write_text(to_svg(trace, title))
    elif path.suffix in (".html", ".htm"):
        path.write_text(to_html(trace, title))
    else:
        raise ValueError(f"Unknown visualisation format {path.suffix!r}: use .svg or .html.")
    return path
