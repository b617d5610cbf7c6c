"""Atomic outputs: leftovers of killed processes are removed, a running writer's never; a
folder replaces another in one step."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from scgpt_runtime.errors import OutputError
from scgpt_runtime.io import atomic
from scgpt_runtime.io.atomic import atomic_dir, atomic_path, exchange, remove_stale


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid  # reaped: no process has this id until the kernel reuses it


def _leftover(dst: Path, pid: int, kind: str) -> Path:
    path = dst.parent / f".{dst.name}.{atomic._HOST}-{pid}.abcdefgh.tmp"
    if kind == "folder":
        path.mkdir()
        (path / "model.onnx").write_bytes(b"half")
    else:
        path.write_bytes(b"half")
    return path


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_a_dead_writers_leftovers_are_removed_a_live_ones_kept(tmp_path, kind):
    dst = tmp_path / "out.h5ad"
    dead = _leftover(dst, _dead_pid(), kind)
    live = _leftover(dst, os.getppid(), kind)  # the test runner's parent: alive
    other_host = tmp_path / f".out.h5ad.elsewhere-{_dead_pid()}.abcdefgh.tmp"
    other_host.write_bytes(b"a process on another node of a shared disk")
    other_name = _leftover(tmp_path / "other.h5ad", _dead_pid(), kind)
    with atomic_path(dst) as tmp:
        tmp.write_text("new")
    assert dst.read_text() == "new"
    assert not dead.exists()
    assert live.exists()
    assert other_host.exists()
    assert other_name.exists()


def test_a_name_with_glob_characters_is_matched_literally(tmp_path):
    dst = tmp_path / "run[1]*.csv"
    dead = _leftover(dst, _dead_pid(), "file")
    neighbour = _leftover(tmp_path / "run1x.csv", _dead_pid(), "file")
    remove_stale(dst)
    assert not dead.exists()
    assert neighbour.exists()


@pytest.mark.parametrize("swap", ["renameat2", "two renames"])
def test_exchange_puts_the_new_folder_in_place_and_the_old_aside(tmp_path, monkeypatch, swap):
    if swap == "two renames":
        monkeypatch.setattr(atomic, "_libc", lambda: None)
    dst, new = tmp_path / "bundle", tmp_path / "new"
    dst.mkdir()
    (dst / "config.json").write_text("old")
    new.mkdir()
    (new / "config.json").write_text("new")
    exchange(new, dst)
    assert (dst / "config.json").read_text() == "new"
    assert (new / "config.json").read_text() == "old"  # for the caller to delete
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "new"]


def test_an_interrupted_second_rename_puts_the_old_folder_back(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "_libc", lambda: None)
    dst, new = tmp_path / "bundle", tmp_path / "new"
    dst.mkdir()
    (dst / "config.json").write_text("old")
    new.mkdir()
    real = Path.rename

    def interrupted(self, target):
        if self == new:
            raise KeyboardInterrupt
        return real(self, target)

    monkeypatch.setattr(Path, "rename", interrupted)
    with pytest.raises(KeyboardInterrupt):
        exchange(new, dst)
    assert (dst / "config.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "new"]


def test_a_folder_is_made_with_a_new_folders_permissions_and_removed(tmp_path):
    umask = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "b") as tmp:
            assert tmp.stat().st_mode & 0o777 == 0o755
            (tmp / "x").write_text("x")
    finally:
        os.umask(umask)
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_is_an_output_error_and_leaves_nothing(tmp_path, monkeypatch):
    dst = tmp_path / "out.csv"
    dst.write_text("old")

    def full(path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic, "_fsync", full)
    with (
        pytest.raises(OutputError, match=r"out.csv: cannot write \(\[Errno 28\]"),
        atomic_path(dst) as tmp,
    ):
        tmp.write_text("new")
    assert dst.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.csv"]
