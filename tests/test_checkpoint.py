"""Atomic writes: the umask's permissions, no temporaries left to accumulate."""
from __future__ import annotations

import os
import stat
import subprocess
import sys

import torch

from kcd.checkpoint import atomic_save, atomic_write_json, atomic_write_text, load_file


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_outputs_get_the_permissions_the_umask_gives(tmp_path):
    old = os.umask(0o002)
    try:
        atomic_save({"w": torch.zeros(2)}, tmp_path / "final.pt")
        atomic_write_json({"top1": 1.0}, tmp_path / "result.json")
        atomic_write_text("x", tmp_path / "a.txt")
        os.umask(0o077)
        atomic_write_text("y", tmp_path / "private.txt")
    finally:
        os.umask(old)
    for name in ("final.pt", "result.json", "a.txt"):
        assert _mode(tmp_path / name) == 0o664, name  # group-shared results stay readable
    assert _mode(tmp_path / "private.txt") == 0o600


def test_a_killed_writers_temporary_is_removed_by_the_next_write(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    stale = tmp_path / f".checkpoint.pt.{dead}.tmp"
    stale.write_bytes(b"half a checkpoint")
    live = tmp_path / f".checkpoint.pt.{os.getppid()}.tmp"  # a writer still running
    live.write_bytes(b"in progress")
    other = tmp_path / f".final.pt.{dead}.tmp"  # another file's: not this write's business
    other.write_bytes(b"x")
    atomic_save({"step": 3}, tmp_path / "checkpoint.pt")
    assert not stale.exists()
    assert live.exists() and other.exists()
    assert load_file(tmp_path / "checkpoint.pt", "checkpoint")["step"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["checkpoint.pt", live.name, other.name])
