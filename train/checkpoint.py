"""Atomic, keep-last-N training checkpoints: the files (writing, listing, loading, checking that one
fits a model). *What* goes into a checkpoint and how a run resumes from one is the trainer's side,
:mod:`ctrflow.train.resumable`.

A checkpoint is one ``torch.save`` dict (``ckpt-00001234.pt``) holding the model and optimizer
states, the step / epoch / batch-in-epoch counters, every RNG state and the run's JSON config. It is
written to a temporary file in the same directory and ``os.replace``-d into place, so a crash never
leaves a half-written checkpoint under the final name; then all but the newest ``keep`` are deleted.
"""

from __future__ import annotations

import os
import random
import re
from typing import Any

import numpy as np
import torch

from ctrflow.etl.atomic import remove_stale, temp_path

_NAME = re.compile(r"^ckpt-(\d{8,})\.pt$")


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or does not fit the model / run."""


def checkpoint_path(directory: str, step: int) -> str:
    return os.path.join(directory, f"ckpt-{step:08d}.pt")


def list_checkpoints(directory: str) -> list[str]:
    """Checkpoint files in ``directory``, oldest first (by step)."""
    if not os.path.isdir(directory):
        return []
    found = [(int(m.group(1)), n) for n in os.listdir(directory) if (m := _NAME.match(n))]
    return [os.path.join(directory, n) for _, n in sorted(found)]


def latest_checkpoint(directory: str) -> str | None:
    """Path of the newest checkpoint in ``directory``, or None."""
    found = list_checkpoints(directory)
    return found[-1] if found else None


def rng_state() -> dict[str, Any]:
    """Every RNG the training loop may draw from (torch CPU / CUDA, numpy, random), as plain values and
    tensors so that checkpoints load with ``torch.load(weights_only=True)``."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "python": list(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(directory: str, state: dict[str, Any], step: int, keep: int = 3) -> str:
    """Write ``state`` as ``directory/ckpt-<step>.pt`` atomically and keep only the newest ``keep``.

    Args:
        directory: checkpoint directory (created if missing).
        state: picklable dict (tensors, plain Python values).
        step: global step, part of the file name.
        keep: checkpoints to keep (>= 1).

    Returns:
        The checkpoint's path.
    """
    os.makedirs(directory, exist_ok=True)
    path = checkpoint_path(directory, step)
    for name in os.listdir(directory):  # temporaries of checkpoints a killed run was writing
        if name.startswith(".ckpt-") and ".tmp-" in name:
            remove_stale(os.path.join(directory, name[1 : name.index(".tmp-")]))
    write_state(path, state)
    for old in list_checkpoints(directory)[: -max(1, keep)]:
        os.unlink(old)
    return path


def write_state(path: str, state: dict[str, Any]) -> str:
    """``torch.save`` ``state`` to ``path`` atomically (a temporary beside it, fsynced, then renamed)."""
    remove_stale(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "xb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_checkpoint(path: str) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (on the CPU)."""
    try:
        # weights_only: loading a checkpoint never runs code from it.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt, truncated or not a torch file
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None
    if not isinstance(state, dict) or "model" not in state or "step" not in state:
        raise CheckpointError(f"{path} is not a ctrflow checkpoint (no model state / step)")
    return state


def check_fits(model: Any, n_optimizers: int, state: dict[str, Any], path: str) -> None:
    """Raise :class:`CheckpointError` (one line, with the shapes) if ``state`` cannot load into ``model``."""
    cfg = state.get("config") or {}
    want, have = cfg.get("model_class"), type(model).__name__
    if want and want != have:
        raise CheckpointError(f"{path} holds a {want}, not a {have}")
    mine, theirs = model.state_dict(), state["model"]
    missing, extra = sorted(set(mine) - set(theirs)), sorted(set(theirs) - set(mine))
    if missing or extra:
        raise CheckpointError(f"{path} does not fit the model: missing {missing[:3]}, unexpected {extra[:3]}")
    for k, v in mine.items():
        if tuple(theirs[k].shape) != tuple(v.shape):
            raise CheckpointError(
                f"{path} does not fit the model: {k} is {list(theirs[k].shape)} in the checkpoint, "
                f"{list(v.shape)} in the model"
            )
    if len(state.get("optimizers", [])) != n_optimizers:
        raise CheckpointError(f"{path} has {len(state.get('optimizers', []))} optimizers, this run {n_optimizers}")
