"""Temporaries of atomic writes carry their writer's pid; the next writer removes those of dead writers."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

from ctrflow.etl.atomic import remove_stale, temp_path
from ctrflow.etl.writer import atomic_dir


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid  # reaped: no such process now (pids are not reused this fast)


def test_temp_path_names_the_writer(tmp_path):
    t = temp_path(str(tmp_path / "out"))
    assert os.path.basename(t).startswith(f".out.tmp-{os.getpid()}-") and not os.path.exists(t)


def test_stale_temporaries_of_dead_writers_are_removed_live_ones_kept(tmp_path, caplog):
    out = tmp_path / "out"
    dead = tmp_path / f".out.tmp-{_dead_pid()}-deadbeef"
    (dead / "train").mkdir(parents=True)
    (dead / "train" / "part-0.parquet").write_bytes(b"x" * 1000)
    live = tmp_path / f".out.tmp-{os.getppid()}-cafe0001"  # our parent is alive
    live.mkdir()
    other = tmp_path / f".other.tmp-{_dead_pid()}-00000001"  # another output's: not ours to touch
    other.mkdir()
    with caplog.at_level(logging.WARNING, logger="ctrflow"):
        assert remove_stale(str(out)) == [str(dead)]
    assert not dead.exists() and live.exists() and other.exists()
    assert "left by an interrupted run" in caplog.text and str(dead) in caplog.text


def test_atomic_dir_cleans_up_after_a_killed_writer(tmp_path):
    out = tmp_path / "processed"
    stale = tmp_path / f".processed.tmp-{_dead_pid()}-0badc0de"
    stale.mkdir()
    with atomic_dir(out) as tmp:
        open(os.path.join(tmp, "x"), "w").close()
    assert sorted(os.listdir(tmp_path)) == ["processed"]


def test_checkpoint_temporaries_of_a_killed_run_are_removed(tmp_path):
    import torch

    from ctrflow.train.checkpoint import list_checkpoints, save_checkpoint

    stale = tmp_path / f".ckpt-00000005.pt.tmp-{_dead_pid()}-12345678"
    stale.write_bytes(b"half a checkpoint")
    path = save_checkpoint(str(tmp_path), {"w": torch.zeros(2)}, 6, keep=3)
    assert not stale.exists() and list_checkpoints(str(tmp_path)) == [path]
    assert sorted(os.listdir(tmp_path)) == ["ckpt-00000006.pt"]
