"""ctrflow.train: Trainer (loop, metrics, checkpoints, logging) and the ``fit.py`` command line.

Names load lazily so that ``python -m ctrflow.train.fit`` / ``ctrflow-fit`` can set OpenMP's
environment before torch is imported.

Example:
    >>> from ctrflow.train import Trainer
    >>> trainer = Trainer(model, task="binary", lr=0.01, out_dir="runs/x")   # doctest: +SKIP
    >>> trainer.fit(train_loader, valid_loader)                               # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "BinaryMetrics": "ctrflow.train.metrics",
    "RegressionMetrics": "ctrflow.train.metrics",
    "average_precision": "ctrflow.train.metrics",
    "roc_auc": "ctrflow.train.metrics",
    "CheckpointError": "ctrflow.train.checkpoint",
    "latest_checkpoint": "ctrflow.train.checkpoint",
    "load_checkpoint": "ctrflow.train.checkpoint",
    "save_checkpoint": "ctrflow.train.checkpoint",
    "TensorLoader": "ctrflow.loader.tensors",  # re-exported; batches are cut in ctrflow.loader
    "LazyAdam": "ctrflow.train.optim",
    "RowWiseAdagrad": "ctrflow.train.optim",
    "SparseSGD": "ctrflow.train.optim",
    "build_optimizers": "ctrflow.train.optim",
    "lr_factor": "ctrflow.train.schedule",
    "TrainConfig": "ctrflow.train.config",
    "TrainingError": "ctrflow.train.config",
    "Trainer": "ctrflow.train.trainer",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ctrflow.train' has no attribute {name!r}")
