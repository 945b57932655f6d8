"""lm-evaluation-harness: converted folders through the real lm_eval entry points and the shipped tasks.

The tiny models here read characters (a 44-character vocabulary), so the shipped English tasks tokenize into
distinct, decodable tokens: stop strings fire and the multiple-choice continuations differ.
"""

import copy
import json
import os
import string
import subprocess
import sys
from pathlib import Path

import lm_eval  # the `eval` extra
import pytest
import torch
from helpers import PAD, converted_pair, padded_batch, source_model
from lm_eval.api.instance import Instance
from lm_eval.tasks import TaskManager, get_task_dict
from test_serve import start_http
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerFast

import hf_blockdiff
from hf_blockdiff.harness import TASKS_DIR, BlockDiffusionLM, StopStrings
from hf_blockdiff.modeling_blockdiff import block_diffusion_class
from hf_blockdiff.scheduler import Scheduler
from hf_blockdiff.serve import create_app

CHARS = string.ascii_lowercase + string.digits + " \n?.:,'-"
C_UNK, C_EOS, C_PAD = len(CHARS), len(CHARS) + 1, len(CHARS) + 2  # the mask token becomes a new row after these
QA, COPY, MC = "blockdiff_tiny_qa", "blockdiff_tiny_copy", "blockdiff_tiny_mc"
LIMIT = 8
SRC = str(Path(hf_blockdiff.__file__).resolve().parents[1])


def char_tokenizer():
    vocab = {c: i for i, c in enumerate(CHARS)} | {"<unk>": C_UNK, "<eos>": C_EOS, "<pad>": C_PAD}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>", pad_token="<pad>")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: a second thread only waits for the first (and is far slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(source folder, converted folder): one tiny Llama saved as is and converted (block size 4)."""
    root = tmp_path_factory.mktemp("harness")
    source = source_model("llama", vocab_size=C_PAD + 1, eos_token_id=C_EOS, pad_token_id=C_PAD,
                          max_position_embeddings=512)  # fmt: skip
    with torch.no_grad():  # make "\n" (the generation tasks' stop string) the choice where the model says "5"
        source.lm_head.weight[CHARS.index("\n")] = 1.1 * source.lm_head.weight[CHARS.index("5")]
    source.save_pretrained(root / "source")
    char_tokenizer().save_pretrained(root / "source")
    model, tok = hf_blockdiff.convert_model(copy.deepcopy(source), char_tokenizer(), block_size=4)
    assert model.config.mask_token_id == C_PAD + 1  # a new row, outside the source's vocabulary
    model.save_pretrained(root / "converted")
    tok.save_pretrained(root / "converted")
    return str(root / "source"), str(root / "converted")


@pytest.fixture(scope="module")
def task_manager():
    return TaskManager(include_path=str(TASKS_DIR), include_defaults=False)


def evaluate(model, task, task_manager, model_args=None, **kwargs):
    results = lm_eval.simple_evaluate(
        model=model, model_args=model_args, tasks=[task], task_manager=task_manager, limit=LIMIT, device="cpu",
        log_samples=True, bootstrap_iters=0, **kwargs,
    )  # fmt: skip
    samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
    return results, [s["resps"] for s in samples]


def hf_args(path, **extra):
    return {"pretrained": path, "trust_remote_code": True, "dtype": "float32", **extra}


# ----------------------------------------------------------------------------------------------------------
# generate(): the attention mask when none is given


def test_generate_infers_the_attention_mask_from_left_padding():
    _, model, _ = converted_pair("llama", block_size=4)
    ids, am = padded_batch([9, 5, 7], seed=3)
    kwargs = dict(max_new_tokens=8, block_size=4, threshold=0.5, eos_token_id=[], pad_token_id=PAD)
    with torch.no_grad():
        expected = model.generate(ids, attention_mask=am, **kwargs)
        assert torch.equal(model.generate(ids, **kwargs), expected)
        # a pad token that is also an EOS token is never padding (as in transformers): every position is prompt
        eos_pad = dict(kwargs, eos_token_id=[PAD])
        assert torch.equal(model.generate(ids, **eos_pad), model.generate(ids, torch.ones_like(ids), **eos_pad))
        # nor is anything padding when the pad token does not occur
        full = ids[:1]
        assert torch.equal(model.generate(full, **kwargs), model.generate(full, torch.ones_like(full), **kwargs))


def test_stop_strings_answer_per_row():
    tok = char_tokenizer()
    rows = torch.tensor([tok("ab" + s).input_ids for s in ("cd\ne", "cdef", "\nxyz")])
    stop = StopStrings(tok, ["\n", ""], prompt_width=2)
    assert stop(rows, None).tolist() == [True, False, True]
    assert stop(rows[1:2], None).tolist() == [False]  # one row at a time
    assert stop(torch.tensor([tok("a\nbcd").input_ids]), None).tolist() == [False]  # a stop in the prompt is no stop
    assert [stop.answer_length(tok(s).input_ids) for s in ("cd\ne", "cdef", "\nxyz", "")] == [3, 4, 1, 0]
    # generate() shows a row behind the others after a gap of filler tokens (the mask token): no text of the row's
    eos_stop = StopStrings(tok, ["<eos>"], prompt_width=2, filler=C_EOS)
    behind = torch.tensor([tok("ab").input_ids + [C_EOS, C_EOS] + tok("cd").input_ids])
    assert eos_stop(behind, None).tolist() == [False]
    assert StopStrings(tok, ["<eos>"], prompt_width=2)(behind, None).tolist() == [True]


# ----------------------------------------------------------------------------------------------------------
# Packaging: optional extra, shipped tasks


@pytest.mark.slow
def test_import_hf_blockdiff_does_not_import_lm_eval_and_missing_lm_eval_is_explained():
    script = r"""
import runpy, sys
import hf_blockdiff, hf_blockdiff.convert, hf_blockdiff.modeling_blockdiff, hf_blockdiff.denoise
assert "lm_eval" not in sys.modules, "importing hf_blockdiff imported lm_eval"
sys.modules["lm_eval"] = None  # lm_eval is not installed
try:
    import hf_blockdiff.harness
except ImportError as err:
    assert "pip install 'hf_blockdiff[eval]'" in str(err), err
else:
    raise AssertionError("no ImportError")
try:
    runpy.run_module("hf_blockdiff.harness", run_name="__main__")
except SystemExit as exit:
    assert exit.code == 1
else:
    raise AssertionError("no exit")
print("ok")
"""
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
    assert "pip install 'hf_blockdiff[eval]'" in proc.stderr  # logged for `python -m hf_blockdiff.harness`


def test_shipped_tasks_load_offline_from_any_directory(task_manager, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tasks = get_task_dict([QA, COPY, MC], task_manager)
    assert [tasks[t].OUTPUT_TYPE for t in (QA, COPY, MC)] == ["generate_until", "generate_until", "multiple_choice"]
    for task in tasks.values():
        docs = list(task.test_docs())
        assert len(docs) == 48
    assert {doc["answer"] for doc in tasks[MC].test_docs()} == {0, 1, 2, 3}
    assert all(len(doc["choices"]) == 4 for doc in tasks[MC].test_docs())


# ----------------------------------------------------------------------------------------------------------
# Through lm_eval.simple_evaluate


@pytest.mark.slow
def test_loglikelihood_of_converted_folder_is_the_source_models(folders, task_manager):
    source, converted = folders
    _, expected = evaluate("hf", MC, task_manager, hf_args(source), batch_size=4)
    results, got = evaluate("hf_blockdiff", MC, task_manager, {"pretrained": converted}, batch_size=4)
    assert len(got) == LIMIT and len(got[0]) == 4  # 4 choices per question
    for want, have in zip(expected, got):
        for (ll_want, greedy_want), (ll_have, greedy_have) in zip(
            [r[0] for r in want], [r[0] for r in have]
        ):  # fmt: skip
            assert ll_have == pytest.approx(ll_want, abs=1e-4) and greedy_have == greedy_want
    # the stock `hf` model scores the converted folder with the mask token inside the softmax: a little lower
    _, stock = evaluate("hf", MC, task_manager, hf_args(converted), batch_size=4)
    for want, have in zip(expected, stock):
        assert all(h[0][0] < w[0][0] + 1e-6 for w, h in zip(want, have))
    assert "block_diffusion" in results["config"]  # no generation requests: zero totals
    assert results["config"]["block_diffusion"]["rows"] == 0


@pytest.mark.slow
def test_generation_at_block_size_1_is_the_source_models_greedy_output(folders, task_manager):
    source, converted = folders
    _, expected = evaluate("hf", QA, task_manager, hf_args(source), batch_size=4)
    # the stock `hf` model on the converted folder, batched: its stop criterion keeps per-row state over the batch
    _, stock = evaluate("hf", QA, task_manager, hf_args(converted), batch_size=4, gen_kwargs="block_size=1")
    lm = BlockDiffusionLM(pretrained=converted, block_size=1, batch_size=4, device="cpu")
    results, got = evaluate(lm, QA, task_manager)
    assert stock == expected and got == expected
    assert any(r[0] for r in expected)  # non-empty answers, decoded from the character vocabulary
    stats = lm.stats
    assert stats["rows"] == LIMIT and stats["tokens_per_forward"] == 1.0 and stats["settings"][0]["block_size"] == 1
    assert stats["generated_tokens"] < LIMIT * 32  # some rows stopped at "\n" before max_gen_toks
    assert stats["answer_tokens"] == stats["generated_tokens"]  # a block of one token: the stop is seen at once
    assert results["config"]["block_diffusion"]["tokens_per_forward"] == 1.0


@pytest.mark.slow
def test_block_diffusion_tokens_per_forward_and_batching(folders, task_manager):
    _, converted = folders
    # settings as model_args, one row at a time
    alone = BlockDiffusionLM(pretrained=converted, block_size=4, threshold=0.1, batch_size=1, device="cpu")
    _, got_alone = evaluate(alone, QA, task_manager)
    # the same settings as gen_kwargs (parsed as on the command line), left-padded batches of 4
    batched = BlockDiffusionLM(pretrained=converted, batch_size=4, device="cpu")
    results, got = evaluate(batched, QA, task_manager, gen_kwargs="block_size=4,threshold=0.1")
    assert got == got_alone
    a, b = alone.stats, batched.stats
    for key in ("rows", "generated_tokens", "row_forwards", "settings"):  # rows advance independently
        assert a[key] == b[key], key
    assert b["settings"] == [{"block_size": 4, "threshold": 0.1}]
    assert b["tokens_per_forward"] == b["generated_tokens"] / b["row_forwards"] > 1.2
    assert a["batch_forwards"] == a["row_forwards"] and b["batch_forwards"] < b["row_forwards"]
    assert b["tokens_per_batch_forward"] == b["generated_tokens"] / b["batch_forwards"]
    assert b["generated_tokens"] < LIMIT * 32  # stop strings and EOS end rows early
    assert b["answer_tokens"] <= b["generated_tokens"]  # stop strings are checked when a block completes
    assert b["answer_tokens_per_forward"] == b["answer_tokens"] / b["row_forwards"]
    assert b["forwards_per_row"] == b["row_forwards"] / LIMIT
    reported = results["config"]["block_diffusion"]
    assert reported["tokens_per_forward"] == b["tokens_per_forward"] and reported["rows"] == LIMIT
    assert f"{b['tokens_per_forward']:.3f} tokens per forward" in batched.summary()
    assert list(b["tasks"]) == [QA] and b["tasks"][QA]["tokens_per_forward"] == b["tokens_per_forward"]


def test_batched_generate_until_equals_its_rows_alone_when_the_pad_token_is_eos(tmp_path):
    """A batch's answers are its rows' answers alone, with the pad token the EOS token (as SmolLM2's). lm-eval adds
    the EOS text to every request's stop strings, and the rows of a batch complete blocks at different times: a
    row behind the others used to be shown to the stop criteria padded, read as stopped, and answered empty."""
    tok = char_tokenizer()
    tok.pad_token = "<eos>"
    source = source_model("llama", vocab_size=C_PAD + 1, eos_token_id=C_EOS, pad_token_id=C_EOS,
                          max_position_embeddings=512)  # fmt: skip
    model, tok = hf_blockdiff.convert_model(source, tok, block_size=4)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    prompts = ["question: what is 2 plus 3?\nanswer:", "copy: abc def\n", "q: who?\na:", "the cat sat on the mat",
               "hello", "a b c d e f g"]  # fmt: skip
    settings = {"until": ["\n"], "max_gen_toks": 24, "block_size": 4, "threshold": 0.3}
    requests = [Instance("generate_until", {}, (p, dict(settings)), i) for i, p in enumerate(prompts)]
    answers, stats = {}, {}
    for batch_size in (1, len(prompts)):
        lm = BlockDiffusionLM(pretrained=str(tmp_path), batch_size=batch_size, device="cpu")
        assert lm.tokenizer.pad_token_id == lm.tokenizer.eos_token_id == C_EOS
        answers[batch_size], stats[batch_size] = lm.generate_until(requests, disable_tqdm=True), lm.stats
    assert sum(bool(a) for a in answers[1]) >= 4  # mostly non-empty answers alone
    assert answers[len(prompts)] == answers[1]
    for key in ("rows", "generated_tokens", "answer_tokens", "row_forwards"):  # rows advance independently
        assert stats[len(prompts)][key] == stats[1][key], key
    assert stats[len(prompts)]["batch_forwards"] < stats[1]["batch_forwards"]  # and were batched


@pytest.mark.slow
def test_command_line_registers_the_model_and_includes_the_shipped_tasks(folders, tmp_path):
    _, converted = folders
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}  # fmt: skip
    command = [sys.executable, "-m", "hf_blockdiff.harness", "--model", "hf_blockdiff",
               "--model_args", f"pretrained={converted},block_size=4", "--gen_kwargs", "threshold=0.1",
               "--tasks", "blockdiff_tiny", "--limit", "2", "--device", "cpu", "--batch_size", "2",
               "--output_path", str(tmp_path / "out")]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert QA in proc.stdout and COPY in proc.stdout and MC in proc.stdout
    summary = proc.stdout.strip().splitlines()[-3:]  # the totals, then one line per generation task
    assert summary[0].startswith("hf_blockdiff: ") and "tokens per forward" in summary[0], proc.stdout[-2000:]
    assert summary[1].startswith(f"  {COPY}: ") and summary[2].startswith(f"  {QA}: ")
    (saved,) = (tmp_path / "out").rglob("results_*.json")
    info = json.loads(saved.read_text())["config"]["block_diffusion"]
    assert info["rows"] == 4 and info["tokens_per_forward"] == info["generated_tokens"] / info["row_forwards"]
    assert {task: c["rows"] for task, c in info["tasks"].items()} == {QA: 2, COPY: 2}
    assert info["model_args"] == {"block_size": 4}


def test_harness_model_refuses_an_unconverted_checkpoint(folders):
    source, _ = folders
    with pytest.raises(ValueError, match="not a block-diffusion model"):
        BlockDiffusionLM(pretrained=source, device="cpu")


def test_harness_model_checks_its_block_settings_before_loading():
    """--model_args block settings get generate()'s check (settings.DecodeSettings) at once, not at the first
    generation request after the model has loaded (here there is no model to load)."""
    with pytest.raises(ValueError, match="threshold must be in"):
        BlockDiffusionLM(pretrained="./no-such-model", threshold=1.5)
    with pytest.raises(ValueError, match="needs block_size >= 2"):
        BlockDiffusionLM(pretrained="./no-such-model", block_size=1, verify=True)


# ----------------------------------------------------------------------------------------------------------
# lm-eval's API model `local-completions` against `hf_blockdiff serve`


@pytest.fixture(scope="module")
def served(folders):
    """The converted folder served on 127.0.0.1 as "bd"; lm-eval's local-completions model_args for it."""
    _, converted = folders
    model = block_diffusion_class(AutoConfig.from_pretrained(converted)).from_pretrained(converted).eval()
    scheduler = Scheduler(model, AutoTokenizer.from_pretrained(converted), max_batch=4, max_length=512).start()
    url, stop = start_http(create_app(scheduler, "bd"))
    # lm-eval's defaults otherwise: token-id prompts, tokenizer_backend auto (-> huggingface, this server has no
    # /tokenizer_info), one request at a time
    yield {"model": "bd", "base_url": f"{url}/v1/completions", "tokenizer": converted, "max_retries": 1}
    stop()
    scheduler.stop()


def test_served_loglikelihood_equals_the_in_process_model(folders, served, task_manager):
    """Multiple choice through local-completions (token-id prompts, echo, logprobs) scores as hf_blockdiff does."""
    _, converted = folders
    expected_results, expected = evaluate("hf_blockdiff", MC, task_manager, {"pretrained": converted}, batch_size=4)
    results, got = evaluate("local-completions", MC, task_manager, served, batch_size=4)
    assert len(got) == LIMIT and len(got[0]) == 4
    for want, have in zip(expected, got):
        for (ll_want, greedy_want), (ll_have, greedy_have) in zip([r[0] for r in want], [r[0] for r in have]):
            assert ll_have == pytest.approx(ll_want, abs=1e-4) and greedy_have == greedy_want
    for metric in ("acc,none", "acc_norm,none"):
        assert results["results"][MC][metric] == expected_results["results"][MC][metric]


def test_served_generation_equals_the_in_process_model(folders, served, task_manager):
    """Short answers at block size 4 (a low threshold: several tokens per forward) through local-completions equal
    hf_blockdiff's, one prompt per request and four."""
    _, converted = folders
    settings = "block_size=4,threshold=0.1"
    lm = BlockDiffusionLM(pretrained=converted, batch_size=4, device="cpu")
    expected_results, expected = evaluate(lm, QA, task_manager, gen_kwargs=settings)
    assert lm.stats["tokens_per_forward"] > 1.2 and any(r[0] for r in expected)  # non-empty answers
    for batch_size in (1, 4):
        results, got = evaluate("local-completions", QA, task_manager, served, batch_size=batch_size,
                                gen_kwargs=settings)  # fmt: skip
        assert got == expected
        assert results["results"][QA]["exact_match,strip"] == expected_results["results"][QA]["exact_match,strip"]
