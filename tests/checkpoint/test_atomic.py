import json
import os
from pathlib import Path

import pytest

from fastmath_nemo.checkpoint.atomic import (
    atomic_directory,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    latest_checkpoint,
    list_checkpoints,
    mark_complete,
    prune_checkpoints,
)


class Boom(Exception):
    pass


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_atomic_writes_round_trip(tmp_path):
    atomic_write_bytes(tmp_path / "a.bin", b"\x00\x01")
    atomic_write_text(tmp_path / "b.txt", "héllo")
    atomic_write_json(tmp_path / "c.json", {"x": [1, 2.5]})
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "b.txt").read_text(encoding="utf-8") == "héllo"
    assert json.loads((tmp_path / "c.json").read_text()) == {"x": [1, 2.5]}
    atomic_write_text(tmp_path / "b.txt", "new")  # overwrite
    assert (tmp_path / "b.txt").read_text() == "new"
    assert names(tmp_path) == ["a.bin", "b.txt", "c.json"]  # no temp files left


def test_failed_replace_keeps_old_file(tmp_path, monkeypatch):
    target = tmp_path / "state.json"
    atomic_write_json(target, {"v": 1})

    def failing_replace(src, dst):
        raise Boom("disk yanked")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(Boom):
        atomic_write_json(target, {"v": 2})
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"v": 1}
    assert names(tmp_path) == ["state.json"]


def test_failed_write_midway_keeps_old_file(tmp_path, monkeypatch):
    target = tmp_path / "f.txt"
    atomic_write_text(target, "old")

    def failing_fsync(fd):
        raise Boom("fsync failed")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(Boom):
        atomic_write_text(target, "new")
    monkeypatch.undo()
    assert target.read_text() == "old"
    assert names(tmp_path) == ["f.txt"]


def test_json_rejects_nan(tmp_path):
    target = tmp_path / "x.json"
    atomic_write_json(target, {"v": 1})
    with pytest.raises(ValueError):
        atomic_write_json(target, {"v": float("nan")})
    assert json.loads(target.read_text()) == {"v": 1}


def test_atomic_directory_creates(tmp_path):
    final = tmp_path / "step_1"
    with atomic_directory(final) as tmp:
        assert tmp.name == f".tmp-step_1-{os.getpid()}"
        assert tmp.parent == tmp_path
        assert not final.exists()  # invisible until the block succeeds
        (tmp / "weights.bin").write_bytes(b"w")
        mark_complete(tmp)
    assert (final / "weights.bin").read_bytes() == b"w"
    assert names(tmp_path) == ["step_1"]


def test_atomic_directory_exception_keeps_old(tmp_path):
    final = tmp_path / "ckpt"
    final.mkdir()
    (final / "data").write_text("old")
    with pytest.raises(Boom):
        with atomic_directory(final) as tmp:
            (tmp / "data").write_text("half-written")
            raise Boom()
    assert (final / "data").read_text() == "old"
    assert names(tmp_path) == ["ckpt"]  # temp dir removed


def test_atomic_directory_replaces_and_always_keeps_a_complete_copy(tmp_path, monkeypatch):
    final = tmp_path / "ckpt"
    final.mkdir()
    (final / "data").write_text("old")
    real_replace = os.replace
    snapshots: list[dict[str, str]] = []

    def recording_replace(src, dst):
        real_replace(src, dst)
        # After every rename some directory holds a complete copy under a known name.
        snapshots.append(
            {p.name: (p / "data").read_text() for p in tmp_path.iterdir() if (p / "data").exists()}
        )

    monkeypatch.setattr(os, "replace", recording_replace)
    with atomic_directory(final) as tmp:
        (tmp / "data").write_text("new")
    monkeypatch.undo()
    assert (final / "data").read_text() == "new"
    assert names(tmp_path) == ["ckpt"]  # old copy removed
    pid = os.getpid()
    assert snapshots == [
        {f".old-ckpt-{pid}": "old", f".tmp-ckpt-{pid}": "new"},
        {f".old-ckpt-{pid}": "old", "ckpt": "new"},
    ]


def test_atomic_directory_failed_swap_restores_old(tmp_path, monkeypatch):
    final = tmp_path / "ckpt"
    final.mkdir()
    (final / "data").write_text("old")
    real_replace = os.replace

    def failing_second_rename(src, dst):
        if Path(src).name.startswith(".tmp-"):
            raise Boom("rename failed")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_second_rename)
    with pytest.raises(Boom):
        with atomic_directory(final) as tmp:
            (tmp / "data").write_text("new")
    monkeypatch.undo()
    assert (final / "data").read_text() == "old"
    assert names(tmp_path) == ["ckpt"]


def _make(root: Path, name: str, complete: bool = True) -> Path:
    d = root / name
    d.mkdir()
    if complete:
        mark_complete(d)
    return d


def test_list_checkpoints_ignores_incomplete_and_temp(tmp_path):
    _make(tmp_path, "step_10")
    _make(tmp_path, "step_2")
    _make(tmp_path, "step_5", complete=False)
    _make(tmp_path, ".tmp-step_7-123")
    _make(tmp_path, ".old-step_8-123")
    _make(tmp_path, "step_abc")
    _make(tmp_path, "other_3")
    (tmp_path / "step_4").write_text("a file, not a checkpoint")
    assert list_checkpoints(tmp_path) == [(2, tmp_path / "step_2"), (10, tmp_path / "step_10")]
    assert latest_checkpoint(tmp_path) == tmp_path / "step_10"
    assert list_checkpoints(tmp_path, prefix="other_") == [(3, tmp_path / "other_3")]


def test_list_checkpoints_missing_root(tmp_path):
    assert list_checkpoints(tmp_path / "nope") == []
    assert latest_checkpoint(tmp_path / "nope") is None


def test_checkpoint_written_through_atomic_directory_is_listed(tmp_path):
    with atomic_directory(tmp_path / "step_000100") as tmp:
        mark_complete(tmp)
    with pytest.raises(Boom):
        with atomic_directory(tmp_path / "step_000200") as tmp:
            mark_complete(tmp)
            raise Boom()
    assert list_checkpoints(tmp_path) == [(100, tmp_path / "step_000100")]


def test_prune_checkpoints(tmp_path):
    for step in (1, 2, 3, 4):
        _make(tmp_path, f"step_{step}")
    _make(tmp_path, "step_0", complete=False)
    removed = prune_checkpoints(tmp_path, keep_last=2)
    assert removed == [tmp_path / "step_1", tmp_path / "step_2"]
    assert names(tmp_path) == ["step_0", "step_3", "step_4"]  # incomplete one untouched
    assert prune_checkpoints(tmp_path, keep_last=5) == []
    with pytest.raises(ValueError):
        prune_checkpoints(tmp_path, keep_last=0)
