"""What goes to the Hub is flat and depends only on torch and transformers: it loads and generates in a fresh
process where hf_blockdiff cannot be imported, and loads as the stock AR class without trust_remote_code."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import padded_batch, source_model, tiny_tokenizer

import hf_blockdiff

PORTABLE = ("modeling_blockdiff.py", "masks.py", "denoise.py")
ALLOWED_TOP_LEVEL = {"torch", "transformers", "__future__", "copy", "dataclasses", "math", "typing"}

LOAD_SCRIPT = r"""
import json, sys
sys.modules["hf_blockdiff"] = None  # any import of it now fails
import torch
from transformers import AutoModelForCausalLM
path, trust, out = sys.argv[1], sys.argv[2] == "1", sys.argv[3]
model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust).eval()
ids = torch.tensor(json.loads(sys.argv[4]))
with torch.no_grad():
    logits = model(ids).logits
result = {"class": type(model).__name__, "module": type(model).__module__}
if trust:
    gen = model.generate(ids[:, :5], max_new_tokens=8, block_size=4, threshold=0.5, return_dict_in_generate=True)
    result["sequences"] = gen.sequences.tolist()
    result["forwards"] = gen.num_forward_passes
    model.save_pretrained(out + "/resaved")
torch.save(logits, out + "/logits.pt")
print(json.dumps(result))
"""


def run_isolated(path, trust, out, ids):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(out / "modules"), "PYTHONPATH": ""}
    proc = subprocess.run(
        [sys.executable, "-c", LOAD_SCRIPT, str(path), "1" if trust else "0", str(out), json.dumps(ids.tolist())],
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
    source = source_model("qwen2")
    model, tok = hf_blockdiff.convert_model(source, tiny_tokenizer(), block_size=4)
    model.save_pretrained(tmp_path / "ckpt")
    tok.save_pretrained(tmp_path / "ckpt")
    ids, _ = padded_batch([9, 9], seed=4)
    with torch.no_grad():
        expected = model(ids).logits
    expected_gen = model.generate(
        ids[:, :5], max_new_tokens=8, block_size=4, threshold=0.5, return_dict_in_generate=True
    )

    result, logits = run_isolated(tmp_path / "ckpt", True, tmp_path, ids)
    assert result["class"] == "BlockDiffusionQwen2ForCausalLM"
    assert result["module"].startswith("transformers_modules.")
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)
    assert result["sequences"] == expected_gen.sequences.tolist()
    assert result["forwards"] == expected_gen.num_forward_passes
    resaved = {p.name for p in (tmp_path / "resaved").iterdir()}
    assert set(PORTABLE) <= resaved  # a model loaded from remote code saves its code again


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
