"""What goes to the Hub is flat and depends only on torch and transformers: it loads and generates in a fresh
process where hf_blockdiff cannot be imported, and loads as the stock AR class without trust_remote_code. A folder
converted under one tested transformers release loads and generates the same under the other."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from helpers import convert_tiny_checkpoint, padded_batch, source_model, tiny_tokenizer

import hf_blockdiff
from hf_blockdiff.hub import PORTABLE_FILES as PORTABLE

ALLOWED_TOP_LEVEL = {"torch", "transformers", *sys.stdlib_module_names}  # the standard library is everywhere

LOAD_SCRIPT = r"""
import json, sys
sys.modules["hf_blockdiff"] = None  # any import of it now fails
import torch
import transformers
from transformers import AutoModelForCausalLM
path, trust, out = sys.argv[1], sys.argv[2] == "1", sys.argv[3]
model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust).eval()
ids = torch.tensor(json.loads(sys.argv[4]))
with torch.no_grad():
    logits = model(ids).logits
result = {"class": type(model).__name__, "module": type(model).__module__, "transformers": transformers.__version__}
if trust:
    gen = model.generate(ids[:, :5], max_new_tokens=8, block_size=4, threshold=0.5, return_dict_in_generate=True)
    result["sequences"] = gen.sequences.tolist()
    result["forwards"] = gen.num_forward_passes
    model.save_pretrained(out + "/resaved")
torch.save(logits, out + "/logits.pt")
print(json.dumps(result))
"""


def run_isolated(path, trust, out, ids, python=sys.executable):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(out / "modules"), "PYTHONPATH": ""}
    proc = subprocess.run(
        [python, "-c", LOAD_SCRIPT, str(path), "1" if trust else "0", str(out), json.dumps(ids.tolist())],
        capture_output=True, text=True, env=env, cwd=out, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), torch.load(out / "logits.pt")


def test_portable_files_import_only_torch_transformers_and_each_other():
    package = Path(hf_blockdiff.__file__).parent
    for name in PORTABLE:
        tree = ast.parse((package / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: must be a sibling that is shipped too
                    assert f"{node.module}.py" in PORTABLE, f"{name} imports .{node.module}"
                    continue
                modules = [node.module]
            else:
                continue
            for module in modules:
                assert module.split(".")[0] in ALLOWED_TOP_LEVEL, f"{name} imports {module}"


@pytest.mark.slow
def test_remote_code_round_trip_without_hf_blockdiff(tmp_path):
    ids, logits, sequences, forwards = convert_tiny_checkpoint(tmp_path / "ckpt")
    result, got = run_isolated(tmp_path / "ckpt", True, tmp_path, ids)
    assert result["class"] == "BlockDiffusionQwen2ForCausalLM"
    assert result["module"].startswith("transformers_modules.")
    torch.testing.assert_close(got, logits, rtol=0, atol=0)
    assert result["sequences"] == sequences.tolist()
    assert result["forwards"] == forwards
    resaved = {p.name for p in (tmp_path / "resaved").iterdir()}
    assert set(PORTABLE) <= resaved  # a model loaded from remote code saves its code again


# Another environment's python with a different transformers release (.ci/run passes the oldest supported one).
OTHER_PYTHON = os.environ.get("HF_BLOCKDIFF_OTHER_PYTHON")
TESTS = Path(__file__).parent

CONVERT_SCRIPT = r"""
import sys
sys.path[:0] = sys.argv[2:4]  # this tree's tests/ and src/, whatever the other environment has installed
import torch, transformers
from helpers import convert_tiny_checkpoint
out = sys.argv[1]
ids, logits, sequences, forwards = convert_tiny_checkpoint(out + "/ckpt")
torch.save({"ids": ids, "logits": logits, "sequences": sequences, "forwards": forwards,
            "transformers": transformers.__version__}, out + "/expected.pt")
"""


@pytest.mark.slow
@pytest.mark.skipif(not OTHER_PYTHON, reason="HF_BLOCKDIFF_OTHER_PYTHON (another transformers release) is not set")
@pytest.mark.parametrize("converted_under", ["this", "other"])
def test_folder_converted_under_one_transformers_release_works_under_the_other(tmp_path, converted_under):
    """Convert under one release, then load through trust_remote_code (without hf_blockdiff) and generate
    under the other: same class, same logits, same tokens and forward count as the converting process."""
    if converted_under == "this":
        ids, logits, sequences, forwards = convert_tiny_checkpoint(tmp_path / "ckpt")
        made_with, load_with = transformers.__version__, OTHER_PYTHON
    else:
        proc = subprocess.run(
            [OTHER_PYTHON, "-c", CONVERT_SCRIPT, str(tmp_path), str(TESTS), str(TESTS.parent / "src")],
            capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=tmp_path, timeout=600,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        expected = torch.load(tmp_path / "expected.pt")
        ids, logits, sequences, forwards = (expected[k] for k in ("ids", "logits", "sequences", "forwards"))
        made_with, load_with = expected["transformers"], sys.executable
    saved_with = json.loads((tmp_path / "ckpt" / "config.json").read_text())["transformers_version"]
    assert saved_with == made_with

    result, got = run_isolated(tmp_path / "ckpt", True, tmp_path, ids, python=load_with)
    assert result["transformers"] != made_with, "both environments have the same transformers release"
    assert result["class"] == "BlockDiffusionQwen2ForCausalLM"
    assert result["module"].startswith("transformers_modules.")
    torch.testing.assert_close(got, logits)
    assert result["sequences"] == sequences.tolist()
    assert result["forwards"] == forwards


@pytest.mark.slow
def test_without_trust_remote_code_loads_stock_class(tmp_path):
    source = source_model("llama")
    model, tok = hf_blockdiff.convert_model(source, tiny_tokenizer(), block_size=4)
    model.save_pretrained(tmp_path / "ckpt")
    ids, _ = padded_batch([7], seed=2)
    with torch.no_grad():
        expected = model(ids).logits
    result, logits = run_isolated(tmp_path / "ckpt", False, tmp_path, ids)
    assert result["class"] == "LlamaForCausalLM" and result["module"].startswith("transformers.models.llama")
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)
