"""Crash-safe writes: files and whole checkpoint directories appear complete or not at all.

Files are written to a temp sibling, fsynced, then ``os.replace``d; the parent directory is
fsynced so the rename itself survives a power loss. Checkpoint directories are built under
``.tmp-<name>-<pid>``, carry a ``COMPLETE`` marker, and are renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

COMPLETE_MARKER = "COMPLETE"
TMP_PREFIX = ".tmp-"
OLD_PREFIX = ".old-"
DELETE_PREFIX = ".del-"


def _fsync_dir(directory: Path) -> None:
    """Flush a directory entry (renames, creations). Best effort where unsupported."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
    try:
        fd = os.open(directory, flags)
    except OSError:  # e.g. Windows cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems reject fsync on directories
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root``: writers such as torch.save don't."""
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            path = Path(dirpath) / name
            if not path.is_symlink():
                _fsync_file(path)
        _fsync_dir(Path(dirpath))


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically; the parent directory must exist."""
    path = Path(path)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    # os.open with 0o666 honours the umask, unlike tempfile.mkstemp's fixed 0o600.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """UTF-8 text version of :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any, indent: int | None = 2) -> None:
    """Write ``obj`` as strict JSON (NaN/inf raise ValueError rather than produce invalid JSON)."""
    text = json.dumps(obj, indent=indent, allow_nan=False, ensure_ascii=False)
    atomic_write_text(path, text + "\n")


@contextmanager
def atomic_directory(final_dir: str | os.PathLike[str]) -> Iterator[Path]:
    """Build a directory under a temp sibling and rename it to ``final_dir`` on success.

    Yields ``<parent>/.tmp-<name>-<pid>`` (:func:`begin_directory`). On success its contents
    are fsynced and it is renamed into place (:func:`commit_directory`); on an exception the
    temp directory is removed and the exception propagates; ``final_dir`` is untouched.
    """
    final_dir = Path(final_dir)
    tmp = begin_directory(final_dir)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    commit_directory(tmp, final_dir)


def begin_directory(final_dir: str | os.PathLike[str]) -> Path:
    """A fresh ``<parent>/.tmp-<name>-<pid>`` to build ``final_dir`` in (the half of
    :func:`atomic_directory` that a write finishing later, such as an asynchronous checkpoint,
    does first; :func:`commit_directory` is the other)."""
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = final_dir.parent / f"{TMP_PREFIX}{final_dir.name}-{os.getpid()}"
    if tmp.exists():
        # Leftover of a crashed run that had the same pid (common in containers).
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def commit_directory(tmp: str | os.PathLike[str], final_dir: str | os.PathLike[str]) -> None:
    """fsync ``tmp``'s contents and rename it to ``final_dir``. An existing ``final_dir`` is
    first renamed to ``.old-<name>-<pid>`` and deleted afterwards, so at every instant the
    complete old or the complete new directory exists under a recognisable name; a crash
    between the two renames leaves ``.old-<name>-<pid>`` (and the finished ``.tmp-...``) for
    manual recovery, which :func:`list_checkpoints` ignores. On an error ``tmp`` is removed."""
    tmp, final_dir = Path(tmp), Path(final_dir)
    try:
        _fsync_tree(tmp)
        _swap_into_place(tmp, final_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_into_place(tmp: Path, final_dir: Path) -> None:
    """Rename ``tmp`` to ``final_dir``, moving an existing ``final_dir`` aside first."""
    parent = final_dir.parent
    if not final_dir.exists():
        os.replace(tmp, final_dir)
        _fsync_dir(parent)
        return
    # os.replace cannot overwrite a non-empty directory, hence the two renames.
    old = parent / f"{OLD_PREFIX}{final_dir.name}-{os.getpid()}"
    if old.exists():
        shutil.rmtree(old)
    os.replace(final_dir, old)
    try:
        os.replace(tmp, final_dir)
    except BaseException:
        os.replace(old, final_dir)  # restore the old directory under its own name
        raise
    _fsync_dir(parent)
    shutil.rmtree(old)


def mark_complete(directory: str | os.PathLike[str]) -> None:
    """Write the ``COMPLETE`` marker; call last, inside :func:`atomic_directory`."""
    atomic_write_text(Path(directory) / COMPLETE_MARKER, "")


def is_complete(directory: str | os.PathLike[str]) -> bool:
    return (Path(directory) / COMPLETE_MARKER).is_file()


def list_checkpoints(root: str | os.PathLike[str], prefix: str = "step_") -> list[tuple[int, Path]]:
    """Complete checkpoints ``<root>/<prefix><step>`` as (step, path), sorted by step.

    Hidden/temp directories, names whose suffix is not an integer and directories
    without a ``COMPLETE`` marker are ignored. A missing ``root`` gives [].
    """
    root = Path(root)
    if not root.is_dir():
        return []
    found: list[tuple[int, Path]] = []
    for entry in root.iterdir():
        name = entry.name
        if name.startswith(".") or not name.startswith(prefix) or not entry.is_dir():
            continue
        suffix = name[len(prefix) :]
        if not suffix.isdigit():
            continue
        if is_complete(entry):
            found.append((int(suffix), entry))
    found.sort(key=lambda item: item[0])
    return found


def latest_checkpoint(root: str | os.PathLike[str], prefix: str = "step_") -> Path | None:
    """Path of the complete checkpoint with the highest step, or None."""
    checkpoints = list_checkpoints(root, prefix)
    return checkpoints[-1][1] if checkpoints else None


def remove_stale(root: str | os.PathLike[str]) -> list[Path]:
    """Delete what killed writers left in ``root``: half-written ``.tmp-*`` directories and
    ``.del-*`` directories a pruning crashed on. Call when a run (re)starts, from one rank:
    one run owns its directory, so no live writer can be behind them."""
    root = Path(root)
    if not root.is_dir():
        return []
    stale = [p for p in root.iterdir() if p.is_dir() and p.name.startswith((TMP_PREFIX, DELETE_PREFIX))]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def prune_checkpoints(
    root: str | os.PathLike[str], keep_last: int, prefix: str = "step_"
) -> list[Path]:
    """Delete all but the ``keep_last`` newest complete checkpoints; returns what was deleted.

    Incomplete and temp directories are left alone (another process may be writing them).
    Call from one rank only.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    root = Path(root)
    removed: list[Path] = []
    for _step, path in list_checkpoints(root, prefix)[:-keep_last]:
        # Rename first so a crash mid-rmtree never leaves a half-deleted directory that
        # still carries its COMPLETE marker under a checkpoint name.
        doomed = path.with_name(f"{DELETE_PREFIX}{path.name}-{os.getpid()}")
        if doomed.exists():
            shutil.rmtree(doomed)
        os.replace(path, doomed)
        shutil.rmtree(doomed)
        removed.append(path)
    if removed:
        _fsync_dir(root)
    return removed
