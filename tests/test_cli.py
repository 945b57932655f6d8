"""The hf_blockdiff command end to end: convert (+ validation), generate, push (mocked Hub), env, errors."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import converted_pair, source_model, tiny_tokenizer

from hf_blockdiff import cli, hub
from hf_blockdiff import convert as convert_module
from hf_blockdiff.hub import PORTABLE_FILES
from hf_blockdiff.settings import SETTINGS

EXPECTED_FILES = {"README.md", "blockdiff_card.json", "chat_template.jinja", "config.json", "generation_config.json",
                  "model.safetensors", "tokenizer.json", "tokenizer_config.json", *PORTABLE_FILES}  # fmt: skip


def digest(path: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture
def tiny_source(tmp_path):
    src = tmp_path / "src"
    source_model("qwen3").save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    (src / "README.md").write_text("---\nlicense: mit\n---\n# tiny\n")
    return src


def run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_convert_then_generate_tiny(tiny_source, tmp_path, capsys):
    dst = tmp_path / "bd"
    code, out, err = run(["convert", tiny_source, dst, "--block-size", "4"], capsys)
    assert code == 0, err
    assert "validation:" in out and "max |diff| 0.00e+00" in out
    assert {p.name for p in dst.iterdir()} == EXPECTED_FILES
    card = (dst / "README.md").read_text()
    header = yaml.safe_load(card.split("---")[1])
    assert header["license"] == "mit" and header["library_name"] == "transformers"
    assert (
        header["tags"] == ["block-diffusion", "hf_blockdiff", "qwen3"] and header["pipeline_tag"] == "text-generation"
    )
    assert "| `block_size` | `4` |" in card and "converted, not trained" in card

    svg = tmp_path / "trace.svg"
    code, out, err = run(
        ["generate", dst, "w1 w2 w3", "--max-new-tokens", "9", "--threshold", "0.3", "--visualize", svg], capsys
    )
    assert code == 0, err
    assert out.strip() and "tokens per forward" in err and "tokens/s" in err
    assert svg.read_text().startswith("<svg") and not list(tmp_path.glob(".trace*"))

    code, out, err = run(
        [
            "generate",
            dst,
            "w5 w6",
            "--chat",
            "--stream",
            "--do-sample",
            "--seed",
            "3",
            "--max-new-tokens",
            "8",
            "--min-new-tokens",
            "8",
        ],
        capsys,
    )
    assert code == 0, err
    assert out.strip() and "tokens per forward" in err  # a random model may sample EOS first: min-new-tokens

    # --verify prints exactly the block-size-1 text
    texts = []
    for flags in (["--block-size", "1"], ["--verify"], ["--verify", "--candidates", "2"]):
        code, out, err = run(["generate", dst, "w1 w2 w3", "--max-new-tokens", "9", *flags], capsys)
        assert code == 0, err
        texts.append(out)
    assert texts[0] == texts[1] == texts[2]
    code, _, err = run(["generate", dst, "w1", "--verify", "--block-size", "1"], capsys)
    assert code == 1 and "--verify" in err and "hint:" in err
    code, _, err = run(["generate", dst, "w1", "--candidates", "2"], capsys)
    assert code == 1 and "--candidates" in err and "hint:" in err


def test_interactive_chat_keeps_the_conversation(tiny_source, tmp_path, capsys, monkeypatch):
    dst = tmp_path / "bd"
    assert run(["convert", tiny_source, dst, "--no-validate"], capsys)[0] == 0
    lines = iter(["w1 w2", "w3", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    code, out, err = run(["generate", dst, "--chat", "--max-new-tokens", "6"], capsys)
    assert code == 0, err
    assert err.count("tokens per forward") == 2


def test_validate_catches_a_broken_conversion(tiny_source, tmp_path, capsys, monkeypatch):
    original = convert_module.save_block_diffusion

    def broken(model, tokenizer, directory, card_info=None):
        with torch.no_grad():
            model.lm_head.weight[5] += 1.0  # corrupt one output row after the reference was taken
        original(model, tokenizer, directory, card_info)

    monkeypatch.setattr(convert_module, "save_block_diffusion", broken)
    dst = tmp_path / "bd"
    code, out, err = run(["convert", tiny_source, dst], capsys)
    assert code == 1 and "Validation failed" in err and "hint:" in err
    assert not dst.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_overwrite_rules_and_interrupts_leave_nothing_half_written(tiny_source, tmp_path, capsys, monkeypatch):
    dst = tmp_path / "bd"
    assert run(["convert", tiny_source, dst, "--no-validate"], capsys)[0] == 0
    before = digest(dst)
    code, _, err = run(["convert", tiny_source, dst, "--no-validate"], capsys)
    assert code == 1 and "--overwrite" in err and digest(dst) == before

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(convert_module, "save_block_diffusion", interrupted)
    code, _, err = run(["convert", tiny_source, tmp_path / "other", "--no-validate"], capsys)
    assert code == cli.EXIT_INTERRUPTED and "nothing was left half-written" in err
    code, _, err = run(["convert", tiny_source, dst, "--overwrite", "--no-validate"], capsys)
    assert code == cli.EXIT_INTERRUPTED and digest(dst) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bd", "src"]


def test_bad_input_errors(tmp_path, capsys):
    code, _, err = run(["convert", tmp_path / "missing", tmp_path / "out"], capsys)
    assert code == 1 and "does not exist" in err
    gpt2 = tmp_path / "gpt2"
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=66)).save_pretrained(gpt2)
    tiny_tokenizer().save_pretrained(gpt2)
    code, _, err = run(["convert", gpt2, tmp_path / "out"], capsys)
    assert code == 1 and "not supported by hf_blockdiff" in err and "llama" in err and "hint:" in err
    with pytest.raises(SystemExit) as exit_info:  # refused while parsing, before anything is loaded
        run(["convert", gpt2, tmp_path / "out", "--block-size", "0"], capsys)
    assert exit_info.value.code == cli.EXIT_USAGE and "--block-size: must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit) as exit_info:
        run(["generate", tmp_path / "out", "Hi", "--verify", "--candidate-width", "1"], capsys)
    assert exit_info.value.code == cli.EXIT_USAGE and "--candidate-width: must be >= 2" in capsys.readouterr().err
    for flag in ("--candidates", "--guesses", "--candidate-width"):  # checked before the model is loaded
        code, _, err = run(["generate", tmp_path / "out", "Hi", flag, "2"], capsys)
        assert code == 1 and f"{flag} sets how --verify drafts" in err


class FakeApi:
    """Records what would be uploaded."""

    calls = []

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, private=None, exist_ok=False, repo_type=None):
        self.calls.append(("create_repo", repo_id, private))

    def create_branch(self, repo_id, branch, exist_ok=False):
        self.calls.append(("create_branch", repo_id, branch))

    def create_commit(self, repo_id, operations, revision=None, commit_message=None):
        files = {}
        for op in operations:
            data = op.path_or_fileobj
            files[op.path_in_repo] = Path(data).read_bytes() if isinstance(data, str) else data
        self.calls.append(("create_commit", repo_id, revision, files))
        return type("Commit", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/abc"})()


def test_push_uploads_the_exact_folder_with_our_card(tiny_source, tmp_path, capsys, monkeypatch):
    dst = tmp_path / "bd"
    assert run(["convert", tiny_source, dst, "--no-validate"], capsys)[0] == 0
    before = digest(dst)
    FakeApi.calls = []
    monkeypatch.setattr(hub, "HfApi", FakeApi)
    monkeypatch.setattr(hub, "hub_reachable", lambda: True)  # the fake Hub answers, whatever HF_HUB_OFFLINE says
    code, out, err = run(["push", dst, "me/tiny-bd", "--private", "--revision", "v1"], capsys)
    assert code == 0, err
    assert "commit/abc" in out
    assert digest(dst) == before  # local files untouched
    (_, repo, private), (_, _, branch), (_, _, revision, files) = FakeApi.calls
    assert (repo, private, branch, revision) == ("me/tiny-bd", True, "v1", "v1")
    assert set(files) == EXPECTED_FILES
    card = files["README.md"].decode()
    header = yaml.safe_load(card.split("---")[1])
    assert header["tags"] == ["block-diffusion", "hf_blockdiff", "qwen3"] and header["license"] == "mit"
    assert 'repo = "me/tiny-bd"' in card and card.startswith("---\n")
    for name in EXPECTED_FILES - {"README.md"}:
        assert files[name] == (dst / name).read_bytes()

    FakeApi.calls = []
    code, _, err = run(
        ["convert", tiny_source, tmp_path / "bd2", "--no-validate", "--push-to-hub", "me/tiny2"], capsys
    )
    assert code == 0, err
    assert FakeApi.calls[-1][1] == "me/tiny2"


def test_push_refuses_incomplete_folders(tmp_path, capsys):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    code, _, err = run(["push", tmp_path / "half", "me/x"], capsys)
    assert code == 1 and "not a complete block-diffusion checkpoint" in err


@pytest.mark.slow
def test_offline_push_fails_fast_and_keeps_files(tiny_source, tmp_path, capsys):
    dst = tmp_path / "bd"
    assert run(["convert", tiny_source, dst, "--no-validate"], capsys)[0] == 0
    before = digest(dst)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "hf_blockdiff.cli", "push", str(dst), "me/x"], capture_output=True,
                          text=True, env=env, timeout=120)  # fmt: skip
    assert proc.returncode == 1 and "Could not reach the Hugging Face Hub" in proc.stderr
    assert digest(dst) == before


def test_every_subcommand_has_help_with_examples(capsys):
    for command in ("convert", "generate", "push", "env"):
        with pytest.raises(SystemExit) as exit_info:
            cli.main([command, "--help"])
        assert exit_info.value.code == 0
        assert "example" in capsys.readouterr().out


def test_every_decoding_setting_is_a_flag_of_generate_and_serve():
    parser = cli.build_parser()
    for argv in (["generate", "model", "Hi"], ["serve", "model"]):
        assert set(SETTINGS) <= set(vars(parser.parse_args(argv))), argv[0]


def test_serve_flags_become_the_servers_settings(monkeypatch, capsys):
    """Every decoding flag of `serve` reaches the scheduler (it used to pass --threshold only), checked before the
    model loads as generate's are."""
    _, model, tok = converted_pair("llama", block_size=4)
    monkeypatch.setattr(cli, "load_for_generation", lambda args: (model, tok))
    served = []

    def serve(scheduler, name, **kwargs):  # instead of uvicorn: note the scheduler, stop
        served.append(scheduler)
        scheduler.stop()

    monkeypatch.setattr("hf_blockdiff.serve.serve", serve)
    flags = ["--steps-per-block", "2", "--repeat-guard", "--confidence", "margin", "--no-use-cuda-graph", "--verify"]
    assert run(["serve", "model", *flags], capsys)[0] == 0
    settings = served[0].defaults
    assert (settings.steps_per_block, settings.repeat_guard, settings.confidence, settings.use_cuda_graph) == (
        2, True, "margin", False)  # fmt: skip
    assert served[0].block_size == 4 and served[0].verify_default  # --verify: blocks on CPU too, and verified

    monkeypatch.setattr(cli, "load_for_generation", lambda args: pytest.fail("loaded before checking the flags"))
    code, _, err = run(["serve", "model", "--verify", "--block-size", "1"], capsys)
    assert code == 1 and "needs block_size >= 2" in err and "hint: change --block-size or --verify" in err
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["serve", "model", "--steps-per-block", "0"])
    assert exit_info.value.code == cli.EXIT_USAGE and "--steps-per-block: must be >= 1" in capsys.readouterr().err


def test_env_and_console_script(capsys):
    code, out, _ = run(["env"], capsys)
    assert code == 0 and "- transformers:" in out and "- flex_attention:" in out
    proc = subprocess.run(["hf_blockdiff", "env"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "- torch:" in proc.stdout


@pytest.mark.slow
def test_real_smollm2_gguf_convert_and_generate(tmp_path, capsys):
    dst = tmp_path / "smollm2-bd"
    code, out, err = run(["convert", "smollm2", dst, "--block-size", "8"], capsys)
    assert code == 0, err
    assert "max |diff| 0.00e+00" in out
    header = yaml.safe_load((dst / "README.md").read_text().split("---")[1])
    assert header["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and header["license"] == "apache-2.0"
    code, out, err = run(["generate", dst, "What is the capital of France?", "--chat", "--block-size", "1",
                          "--max-new-tokens", "12"], capsys)  # fmt: skip
    assert code == 0, err
    assert "Paris" in out
