"""benchmarks/train_drafter.py moves a long drafter run across GPU sessions in files of bounded size: the targets
and the training state must come back exactly, and a damaged state must be refused rather than resumed."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from train_drafter import pack_state, read_targets, unpack_state, write_targets  # noqa: E402


def test_targets_round_trip_through_bounded_shards(tmp_path):
    rows = [(list(range(s, s + 40 + s % 7)) + [49151], 5 + s % 3) for s in range(60)]
    shards = write_targets(rows, tmp_path, part_bytes=1000)
    assert len(shards) > 3
    assert all(len(np.load(p)["tokens"]) * 2 <= 1000 for p in shards)
    assert read_targets(tmp_path) == rows
    later = [([7, 8, 9], 1)]  # a chunk decoded in another call joins the same folder, after the first
    write_targets(later, tmp_path, part_bytes=1000, chunk=60)
    assert read_targets(tmp_path) == rows + later
    with pytest.raises(FileNotFoundError, match="targets"):
        read_targets(tmp_path / "empty")


def test_state_round_trips_bit_for_bit_and_damage_is_refused(tmp_path):
    checkpoint = tmp_path / "run" / "checkpoint-7"
    (checkpoint / "sub").mkdir(parents=True)
    blobs = {"optimizer.pt": bytes(range(256)) * 300, "sub/rng.pth": b"\x00\x01" * 999, "trainer_state.json": b"{}"}
    for name, blob in blobs.items():
        (checkpoint / name).write_bytes(blob)
    manifest = pack_state(checkpoint, tmp_path / "state", part_bytes=20_000)
    parts = sorted((tmp_path / "state").glob("state.tar.*"))
    assert len(parts) == len(manifest["parts"]) > 3 and all(p.stat().st_size <= 20_000 for p in parts)
    restored = unpack_state(tmp_path / "state", tmp_path / "resumed")
    assert restored.name == "checkpoint-7"
    assert {name: (restored / name).read_bytes() for name in blobs} == blobs
    damaged = bytearray(parts[1].read_bytes())
    damaged[10] ^= 1
    parts[1].write_bytes(bytes(damaged))
    with pytest.raises(ValueError, match="damaged"):
        unpack_state(tmp_path / "state", tmp_path / "again")
    parts[-1].unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        unpack_state(tmp_path / "state", tmp_path / "again")
