"""Hostile input to the CLI (issue 21, items 11-13): mistyped folders and an unreachable Hub fail at once naming
what is wrong; damaged files are one line naming the file; NaN weights or logits are errors, not empty output;
a killed convert leaves nothing that the next one does not clean up; generate prints its answer only."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import source_model, tiny_tokenizer

import hf_blockdiff
from hf_blockdiff import cli, hub
from hf_blockdiff import convert as convert_module

ROOT = Path(__file__).resolve().parents[1]


def run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def error_line(err: str) -> str:
    """The one `error:` line of a CLI failure; no traceback."""
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def source(tmp_path):
    src = tmp_path / "src"
    source_model("llama").save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    return src


@pytest.fixture
def converted(source, tmp_path, capsys):
    assert run(["convert", source, tmp_path / "bd", "--no-validate"], capsys)[0] == 0
    return tmp_path / "bd"


def cli_process(args, tmp_path, timeout=60, **env):
    """The CLI in a fresh process (the Hub's settings are read at import), with a Hub cache of its own."""
    base = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env = {**base, "HF_HUB_CACHE": str(tmp_path / "hub-cache"), **env}
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "hf_blockdiff.cli", *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=timeout)  # fmt: skip
    return proc, time.monotonic() - start


def dead_endpoint() -> str:
    """A local address nothing listens on: a network that refuses every connection, on any machine."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


# ----------------------------------------------------------------------------------------------------------
# 11. a mistyped folder or an unreachable Hub fails at once, naming it


def test_mistyped_folder_is_named_at_once_by_every_command(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out" / "smollm2-bd").mkdir(parents=True)
    monkeypatch.setattr(hub, "hub_reachable", lambda: pytest.fail("asked the Hub about a local path"))
    for argv in (["generate", "out/smollm2-db", "Hi"], ["serve", "out/smollm2-db"],
                 ["convert", "out/smollm2-db", "out/x"]):  # fmt: skip
        code, _, err = run(argv, capsys)
        line = error_line(err)
        assert code == 1 and "'out/smollm2-db' does not exist" in line and "did you mean out/smollm2-bd?" in line
    code, _, err = run(["generate", "./typo", "Hi"], capsys)
    assert code == 1 and "'./typo' does not exist" in error_line(err)
    code, _, err = run(["push", "out/smollm2-db", "me/x"], capsys)
    assert code == 1 and "out/smollm2-db does not exist" in error_line(err)
    assert not (tmp_path / "out" / "x").exists()


@pytest.mark.slow
def test_hub_id_without_a_network_fails_fast_and_a_cached_one_loads(source, tmp_path):
    # no network: huggingface_hub alone would retry for ~50 s, then say "couldn't connect" without the name
    proc, seconds = cli_process(["generate", "me/typo", "Hi"], tmp_path, HF_ENDPOINT=dead_endpoint())
    assert proc.returncode == 1 and seconds < 30, (seconds, proc.stderr)
    line = error_line(proc.stderr)
    assert "'me/typo' is not a local folder" in line and "cannot be reached" in line and "check the network" in line
    proc, seconds = cli_process(["convert", "me/typo", "out"], tmp_path, HF_HUB_OFFLINE="1")
    assert proc.returncode == 1 and "HF_HUB_OFFLINE is set" in error_line(proc.stderr)

    # in the cache, a Hub id loads without asking the Hub (transformers would retry optional files for ~50 s)
    repo, commit = tmp_path / "hub-cache" / "models--me--tiny", "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(source, repo / "snapshots" / commit)
    proc, seconds = cli_process(["generate", "me/tiny", "w1 w2", "--max-new-tokens", "3"], tmp_path,
                                HF_ENDPOINT=dead_endpoint())  # fmt: skip
    assert proc.returncode == 0 and seconds < 30 and "tokens per forward" in proc.stderr, (seconds, proc.stderr)


def test_push_to_hub_without_the_hub_fails_before_converting(source, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(hub, "hub_reachable", lambda: False)
    monkeypatch.setattr(convert_module, "load_source", lambda *a, **k: pytest.fail("converted before failing"))
    code, _, err = run(["convert", source, tmp_path / "bd", "--push-to-hub", "me/bd"], capsys)
    assert code == 1 and "Cannot push to me/bd" in error_line(err) and "hf_blockdiff push" in err
    assert not (tmp_path / "bd").exists()


# ----------------------------------------------------------------------------------------------------------
# 12. damaged files: one line naming the file and what to do


def _truncate(path: Path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _bad_header(path: Path):
    data = path.read_bytes()
    path.write_bytes(b"\xff" * 8 + data[8:])


@pytest.mark.parametrize(
    "damage, file, message",
    [
        (_truncate, "model.safetensors", "model.safetensors cannot be read"),
        (_bad_header, "model.safetensors", "model.safetensors cannot be read"),
        (lambda p: p.write_text('{"hello": 1}'), "config.json", "config.json has no model_type"),
        (lambda p: p.write_text('{"model_type": "nonsense"}'), "config.json", "'nonsense' is unknown to transformers"),
        (lambda p: p.unlink(), "tokenizer.json", "has no tokenizer"),
    ],
)
def test_damaged_folder_is_one_line_naming_the_file(converted, source, tmp_path, damage, file, message, capsys):
    for folder in (converted, source):  # generate a converted folder; convert (and generate) a source
        damage(folder / file)
        if file == "tokenizer.json":
            (folder / "tokenizer_config.json").unlink()
        code, _, err = run(["generate", folder, "w1", "--max-new-tokens", "2"], capsys)
        line = error_line(err)
        assert code == 1 and message in line and str(folder) in line
        assert any(word in line for word in ("again", "copy", "pass", "check")), line  # what to do
    code, _, err = run(["convert", source, tmp_path / "out", "--no-validate"], capsys)
    assert code == 1 and message in error_line(err) and not (tmp_path / "out").exists()


def test_damaged_gguf_is_one_line_naming_the_file(tmp_path, capsys):
    gguf = tmp_path / "model.gguf"
    # a GGUF v3 header that promises 5 tensors and 2 metadata entries, then ends: a cut-short download
    gguf.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + (5).to_bytes(8, "little") + (2).to_bytes(8, "little"))
    for argv in (["generate", gguf, "Hi"], ["convert", gguf, tmp_path / "elsewhere" / "bd"]):
        code, _, err = run(argv, capsys)
        line = error_line(err)
        assert code == 1 and f"{gguf} is not a readable GGUF file" in line and "download it again" in line


def test_nan_weights_and_logits_are_errors(converted, capsys):
    from safetensors.torch import load_file, save_file

    weights = load_file(converted / "model.safetensors")
    weights["model.layers.0.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(weights, converted / "model.safetensors", metadata={"format": "pt"})
    code, out, err = run(["generate", converted, "w1", "--max-new-tokens", "2"], capsys)
    line = error_line(err)
    assert code == 1 and not out and str(converted) in line and "model.layers.0.mlp.down_proj.weight" in line

    # the library: NaN logits (from NaN weights) or infinite ones (finite weights that overflow) raise at prefill
    model, tok = hf_blockdiff.convert_model(source_model("llama"), tiny_tokenizer(), block_size=4)
    ids = tok("w1 w2", return_tensors="pt").input_ids
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    for settings in ({"block_size": 1}, {"block_size": 4, "threshold": 0.5}, {"block_size": 4, "verify": True}):
        with pytest.raises(FloatingPointError, match="NaN or infinite"):
            model.generate(ids, max_new_tokens=4, **settings)
    with torch.no_grad():
        model.model.norm.weight.fill_(3e38)  # float32 holds it; the head's sums do not
    assert all(w.isfinite().all() for w in model.parameters())
    with pytest.raises(FloatingPointError, match="NaN or infinite"):
        model.generate(ids, max_new_tokens=4)


# ----------------------------------------------------------------------------------------------------------
# 13. a killed convert is cleaned up by the next one; errors say it once; generate prints no progress bars

KILLED_CONVERT = """
import sys, time
from pathlib import Path
from hf_blockdiff import cli, convert

def write_then_hang(model, tokenizer, directory, card_info=None):
    (Path(directory) / "model.safetensors").write_bytes(b"half")
    print("writing", flush=True)
    time.sleep(600)

convert.save_block_diffusion = write_then_hang
cli.main(sys.argv[1:])
"""


def test_killed_convert_is_cleaned_up_by_the_next(source, converted, tmp_path, capsys, caplog):
    before = {p.name: p.read_bytes() for p in converted.iterdir()}
    argv = ["convert", str(source), str(converted), "--overwrite", "--no-validate"]
    proc = subprocess.Popen([sys.executable, "-c", KILLED_CONVERT, *argv], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    try:
        assert proc.stdout.readline().strip() == "writing"
    finally:
        proc.send_signal(signal.SIGKILL)  # nothing runs after this: no except, no finally
        proc.wait()
    (stale,) = tmp_path.glob(".bd.tmp-*")
    assert {p.name: p.read_bytes() for p in converted.iterdir()} == before  # the old one is intact

    code, _, err = run(["convert", source, tmp_path / "bd", "--overwrite", "--no-validate"], capsys)
    assert code == 0, err
    assert not stale.exists() and f"Removed {stale}" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bd", "src"]


def test_destination_moved_aside_by_a_killed_convert_is_put_back(source, converted, tmp_path, capsys, caplog):
    before = {p.name: p.read_bytes() for p in converted.iterdir()}
    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid that no longer runs
    aside = tmp_path / f".bd.old-{gone.pid}"
    converted.rename(aside)  # killed between moving the old destination aside and moving the new one in
    code, _, err = run(["convert", source, converted, "--no-validate"], capsys)
    assert code == 1 and "is not empty" in err  # put back, so without --overwrite it is kept
    assert {p.name: p.read_bytes() for p in converted.iterdir()} == before and not aside.exists()
    assert f"Restored {converted}" in caplog.text


def test_destination_error_says_it_once(source, converted, tmp_path, capsys):
    code, _, err = run(["convert", source, converted, "--no-validate"], capsys)
    assert code == 1 and f"error: Destination {converted} is not empty." in err
    assert err.count("overwrite") == 1 and "overwrite=True" not in err and "hint: pass --overwrite" in err
    code, _, err = run(["convert", source, converted / "config.json", "--no-validate"], capsys)
    assert code == 1 and "is not a directory" in err and "--overwrite" not in err  # it would not help


def test_generate_prints_its_answer_without_progress_bars(converted, capsys):
    code, out, err = run(["generate", converted, "w1 w2", "--max-new-tokens", "3"], capsys)
    assert code == 0 and out.strip()
    assert "Loading weights" not in err and "it/s" not in err, err
    from transformers.utils import logging

    assert logging.is_progress_bar_enabled()  # only for the loading: convert and the rest keep theirs


@pytest.mark.slow
def test_generate_from_gguf_prints_no_progress_bars(capsys):
    code, out, err = run(["generate", "smollm2", "Hi", "--max-new-tokens", "2"], capsys)
    assert code == 0 and "de-quantizing" not in err and "Loading weights" not in err, err


@pytest.mark.slow
def test_readme_python_snippet_runs_offline_as_written(tmp_path):
    readme = (ROOT / "README.md").read_text()
    code = readme.split("## Python\n\n```python\n", 1)[1].split("```", 1)[0]
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert float(proc.stdout.split()[-1]) >= 1.0  # tokens per forward
    assert json.loads((tmp_path / "out" / "smollm2-bd4" / "config.json").read_text())["block_size"] == 4
