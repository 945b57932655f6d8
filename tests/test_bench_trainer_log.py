"""benchmarks/bench_trainer.py --from-log: a GPU run cut short by its time limit keeps the rows it printed, and the
table made from them is the one the full run would have saved."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import bench_trainer  # noqa: E402
import common  # noqa: E402

ROWS = [
    {"trainer": "AR SFTTrainer (sdpa)", "batch": 32, "tokens/step": 100.0, "step ms": 10.0, "tokens/s": 10_000.0,
     "peak GiB": 2.0},
    {"trainer": "AR SFTTrainer (sdpa)", "batch": 128, "tokens/step": 400.0, "step ms": 20.0, "tokens/s": 20_000.0,
     "peak GiB": 8.0},
    {"trainer": "block diffusion (dense sdpa, liger) noisy-scope adapter", "batch": 128, "tokens/step": 400.0,
     "step ms": 10.0, "tokens/s": 40_000.0, "peak GiB": 4.0},
]  # fmt: skip


def test_a_cut_short_run_gets_its_table_from_the_log(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    log = tmp_path / "run.log"
    noise = "Truncating train dataset:  5%|\r 50%|\rdone\n{'train_runtime': '6.9'}\n"  # progress bars, TRL's dict
    log.write_text("Device: NVIDIA H200; torch 2.11.0+cu130; transformers 5.17.0\n" + noise
                   + "\n".join(json.dumps(row) for row in ROWS) + "\nTraceback (most recent call last):\n")  # fmt: skip
    monkeypatch.setattr(sys, "argv", ["bench_trainer.py", "--targets", "t", "--batch", "32", "128", "--out", "cut",
                                      "--from-log", str(log)])  # fmt: skip
    bench_trainer.main()
    saved = json.loads((tmp_path / "cut.json").read_text())
    assert saved["device"] == "NVIDIA H200" and "transformers 5.17.0" in saved["measured_on"]
    assert [row["trainer"] for row in saved["rows"]] == [row["trainer"] for row in ROWS]
    diffusion = saved["rows"][2]
    assert diffusion["vs TRL AR"] == pytest.approx(2.0)  # against the AR row of its own batch, not batch 32's
    assert diffusion["memory vs TRL AR"] == pytest.approx(0.5)
    assert "| 40000.0 | 2 |" in (tmp_path / "cut.md").read_text()  # tokens/s, then vs TRL AR


def test_a_log_without_rows_is_refused(tmp_path, monkeypatch):
    (tmp_path / "empty.log").write_text("Device: x\nTraceback (most recent call last):\n")
    monkeypatch.setattr(sys, "argv", ["bench_trainer.py", "--targets", "t", "--from-log", str(tmp_path / "empty.log")])
    with pytest.raises(SystemExit, match="no rows"):
        bench_trainer.main()
