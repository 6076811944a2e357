"""Checkpoints: atomic writes, weights-only loading and clear errors for bad files."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from cenet.train import FORMAT_VERSION, CheckpointError, atomic_save, load_checkpoint
from cenet.train import checkpoint as checkpoint_mod
from cenet.train.checkpoint import REQUIRED_KEYS, remove_stale_temp_files


def fake_checkpoint(value: float) -> dict:
    ckpt = {k: 0 for k in REQUIRED_KEYS}
    ckpt.update(
        format_version=FORMAT_VERSION,
        model={"w": torch.full((3,), value)},
        optimizer={"state": {}, "param_groups": []},
        scheduler={"last_epoch": 0},
        config={"model": "x"},
        rng_state=torch.get_rng_state(),
    )
    return ckpt


def test_atomic_save_round_trip(tmp_path: Path) -> None:
    path = atomic_save(fake_checkpoint(1.0), tmp_path / "last.pt")
    ckpt = load_checkpoint(path)
    assert torch.equal(ckpt["model"]["w"], torch.ones(3))
    assert load_checkpoint(tmp_path)["format_version"] == FORMAT_VERSION  # a run directory
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_crash_during_write_leaves_previous_file(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "last.pt"
    atomic_save(fake_checkpoint(1.0), path)
    before = path.read_bytes()

    def dying_save(obj, f) -> None:
        f.write(b"half a checkpoint")
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(checkpoint_mod.torch, "save", dying_save)
    with pytest.raises(OSError, match="simulated"):
        atomic_save(fake_checkpoint(2.0), path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # temp file removed


def test_stale_temp_files_of_a_killed_writer_are_removed(tmp_path: Path) -> None:
    atomic_save(fake_checkpoint(1.0), tmp_path / "last.pt")
    stale = tmp_path / ".last.pt.1234.abcd.tmp"
    stale.write_bytes(b"partial")
    (tmp_path / "notes.txt").write_text("keep")
    assert remove_stale_temp_files(tmp_path) == [stale]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "notes.txt"]


class _Evil:
    """Unpickling this would create a file (code execution)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_loading_never_executes_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": _Evil(str(marker))}, path)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"this is not a checkpoint at all" * 10, "not a readable torch checkpoint"),
        (b"", "not a readable torch checkpoint"),
        (pickle.dumps({"a": 1}), "not a readable torch checkpoint|weights_only"),
    ],
)
def test_garbage_file_gives_clear_error(tmp_path: Path, content: bytes, needle: str) -> None:
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=needle) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def test_not_a_checkpoint_dict(tmp_path: Path) -> None:
    torch.save(torch.zeros(2, 3, 4, 5), tmp_path / "t.pt")
    with pytest.raises(CheckpointError, match="holds a Tensor, not a cenet checkpoint"):
        load_checkpoint(tmp_path / "t.pt")
    torch.save({"model": {}}, tmp_path / "d.pt")
    with pytest.raises(CheckpointError, match="missing keys"):
        load_checkpoint(tmp_path / "d.pt")
    ckpt = fake_checkpoint(0.0)
    ckpt["format_version"] = FORMAT_VERSION + 1
    torch.save(ckpt, tmp_path / "v.pt")
    with pytest.raises(CheckpointError, match="format_version"):
        load_checkpoint(tmp_path / "v.pt")


def test_missing_paths(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(FileNotFoundError, match="no checkpoint last.pt"):
        load_checkpoint(tmp_path)
