"""The checkpoint side of ``Trainer``: what a checkpoint holds, and how a run resumes from one.

A mixin, so that :class:`ctrflow.train.trainer.Trainer` keeps ``state_dict`` / ``save`` /
``load_state_dict`` / ``resume`` as its own methods while the loop stays in ``trainer.py``. It uses
the trainer's attributes ``model``, ``optimizers``, ``schedulers``, ``cfg``, ``ckpt_dir``,
``is_main``, ``last_checkpoint``, ``state_hook``, ``history``, the position (``step``, ``epoch``,
``batch_in_epoch``, ``segment_start``, ``_saved_world``) and its ``_check_finite()``.

Everything a resumed run needs to continue exactly goes into each checkpoint: weights, optimizer and
scheduler states, the position, the RNG states and the history. File handling (atomic writes,
keep-last-N, loading) is :mod:`ctrflow.train.checkpoint`'s.
"""

from __future__ import annotations

import os
import sys
from dataclasses import asdict
from typing import Any

from ctrflow.models.grow import table_layout
from ctrflow.train import ddp
from ctrflow.train.checkpoint import (
    CheckpointError,
    check_fits,
    checkpoint_path,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)


class Resumable:
    """``Trainer``'s checkpoint methods (see the module docstring for what they rely on)."""

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": "ctrflow.checkpoint/1",
            "model": self.model.state_dict(),
            "optimizers": [o.state_dict() for o in self.optimizers],
            "schedulers": [s.state_dict() for s in self.schedulers],
            "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "segment_start": self.segment_start, "tables": table_layout(self.model),  # for models/grow.py
            "world_size": ddp.world_size(),  # batch_in_epoch counts this many ranks' batches
            "rng": rng_state(),
            "history": self.history,
            "best": self.best.state_dict() if getattr(self, "best", None) is not None else None,
            "config": {"train": asdict(self.cfg), "model": getattr(self.model, "config", None),
                       "model_class": type(self.model).__name__},
        }

    def save(self) -> str | None:
        """Checkpoint now (after checking the losses since the last check are finite)."""
        self._check_finite()
        if not self.ckpt_dir:
            return None
        state = self.state_dict()  # on every rank: a sharded model gathers its tables here (collective)
        if not self.is_main:  # rank 0 writes; the others record its path so that all take the same branches
            self.last_checkpoint = checkpoint_path(self.ckpt_dir, self.step)
            return self.last_checkpoint
        self.last_checkpoint = save_checkpoint(self.ckpt_dir, state, self.step, self.cfg.keep_checkpoints)
        return self.last_checkpoint

    def load_state_dict(self, state: dict[str, Any], path: str = "checkpoint") -> None:
        """Restore a checkpoint; :class:`CheckpointError` if it does not fit this model / setup."""
        if self.state_hook is not None:  # e.g. grow the tables onto a grown vocabulary (models/grow.py)
            state = self.state_hook(state)
        check_fits(self.model, len(self.optimizers), state, path)
        self.model.load_state_dict(state["model"])
        try:
            for opt, sd in zip(self.optimizers, state["optimizers"], strict=False):
                opt.load_state_dict(sd)
            for s, sd in zip(self.schedulers, state.get("schedulers", []), strict=False):
                s.load_state_dict(sd)
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{path}: optimizer state does not fit ({e})") from None
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])
        self.segment_start = int(state.get("segment_start", 0))
        self._saved_world = int(state.get("world_size", 1))
        self.history = state.get("history", {"train": [], "valid": []})
        if getattr(self, "best", None) is not None:
            self.best.load_state_dict(state.get("best"))
        set_rng_state(state["rng"])

    def resume(self, path: str | bool = True) -> str | None:
        """Load ``path`` (a checkpoint file, or a run / checkpoints directory), or with ``True`` the run
        directory's; from a directory the newest checkpoint that reads (None if it holds none)."""
        if path is True:
            if not self.ckpt_dir:
                raise CheckpointError("resume needs a run directory (out_dir)")
            if latest_checkpoint(self.ckpt_dir) is None:
                return None
            directory = self.ckpt_dir
        elif os.path.isdir(path):
            directory = path if latest_checkpoint(path) else os.path.join(path, "checkpoints")
            if latest_checkpoint(directory) is None:
                raise CheckpointError(f"no checkpoint in {path}")
        elif not os.path.exists(path):
            raise CheckpointError(f"checkpoint {path} does not exist")
        else:
            directory = None
        if directory is None:
            state = load_checkpoint(path)
        else:
            path, state = self._newest_readable(directory)
        self.load_state_dict(state, path)
        self.last_checkpoint = path
        return path

    def _newest_readable(self, directory: str) -> tuple[str, dict[str, Any]]:
        """The newest checkpoint that reads, saying which newer ones did not (a crash mid-copy, a full
        disk); :class:`CheckpointError` naming them all when none does."""
        bad = []
        for path in reversed(list_checkpoints(directory)):
            try:
                state = load_checkpoint(path)
            except CheckpointError as e:
                bad.append(str(e))
                continue
            if bad and self.is_main:
                print(f"warning: {'; '.join(bad)}; resuming from the newest readable one, {path} (or pass "
                      f"--resume PATH to choose)", file=sys.stderr, flush=True)
            return path, state
        raise CheckpointError(f"no readable checkpoint in {directory}: {'; '.join(bad)}")

    def _start(self, resume: str | bool) -> str | None:
        """``fit``'s first step: resume as asked (returns the checkpoint loaded, or None), or refuse a run
        directory that already holds checkpoints when not resuming."""
        resumed = self.resume(resume) if resume else None
        if not resume and self.ckpt_dir and latest_checkpoint(self.ckpt_dir):
            # keep-last-N would delete the newest of these and keep stale ones: refuse instead.
            raise CheckpointError(
                f"{self.ckpt_dir} already holds checkpoints ({os.path.basename(latest_checkpoint(self.ckpt_dir))}); "
                "resume to continue that run, or use a new run directory"
            )
        return resumed

    def _match_world(self, steps_per_epoch: int) -> None:
        """A checkpoint of another number of ranks: move the position to this one (``ddp.rescale_position``)."""
        if self._saved_world != ddp.world_size():
            self.step, self.batch_in_epoch = ddp.rescale_position(
                self.step, self.epoch, self.batch_in_epoch, self._saved_world, ddp.world_size(),
                steps_per_epoch, self.cfg.grad_accum)
            self._saved_world = ddp.world_size()
