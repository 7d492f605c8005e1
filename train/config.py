"""Trainer settings (``TrainConfig``), device choice, and the error a diverged run raises."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ctrflow.train.scaling import batch_scaling
from ctrflow.train.selection import HIGHER_IS_BETTER

TASKS = ("binary", "regression")
OPTIMIZERS = ("adam", "adagrad", "sgd")
# Learning rates by rule, tuned for one epoch of the embedded generator's 1.8M rows at batch 512
# (bench/RESULTS.md, "Training"): Adam on the MLPs, lazy Adam on the tables; generic for the others.
LR = {"adam": 1e-3, "adagrad": 0.01, "sgd": 0.1}
EMBEDDING_LR = {"adam": 0.05, "adagrad": 1.0, "sgd": 1.0}
# Lazy Adam's per-row warm-up, in lookups (LazyAdam's ``row_warmup``): a row's step is n / (n + ROW_WARMUP) of
# Adam's. DLRM with the PLE default, embedded data, batch 512, 1 epoch: valid AUC 0.77364 / 0.77399 / 0.77412 /
# 0.77434 with 0 / 16 / 64 / 256 (bench/RESULTS.md "Rare rows warm up"). A prior that rare ids are mostly noise:
# where few-times-seen ids carry the signal it slows them (tests/test_features.py's 4,096-row list set: valid
# AUC 0.600 / 0.571 / 0.555 with 0 / 16 / 256), so the default is the mild end of the range that helped.
ROW_WARMUP = 16.0


class TrainingError(RuntimeError):
    """Training cannot go on (a NaN / infinite loss); the message names the step and last checkpoint."""


@dataclass
class TrainConfig:
    """Trainer settings (all JSON-safe; stored in every checkpoint): every training default, written once.

    ``train/fit.py``'s flags take their defaults from these fields, and ``--help`` shows them.

    Attributes:
        task: ``binary`` (BCE-with-logits; AUC, logloss, AP) or ``regression`` (MSE; RMSE).
        batch_size: training rows per batch (the loader's; recorded with the run).
        valid_batch_size: rows per validation batch.
        optimizer, lr, embedding_lr, embedding_optimizer, row_steps, weight_decay: see
            :func:`ctrflow.train.optim.build_optimizers`; ``lr`` / ``embedding_lr`` None take
            :data:`LR` / :data:`EMBEDDING_LR` of the (embedding) optimizer, scaled by the batch rule.
        batch_scaling: apply :func:`ctrflow.train.scaling.batch_scaling` for the rows per optimizer step
            (``batch_size * grad_accum * world_size``): it sets the defaults of ``lr``,
            ``embedding_lr``, ``embedding_l2``, ``embedding_clip``, ``grad_clip`` and ``embedding_row_warmup`` and
            lengthens a shared warm-up;
            values given explicitly are kept. Off: the batch-512 defaults at any batch.
        run_steps: optimizer steps of the whole run, when known before training (fit.py passes them): the batch
            rule fades out for long runs (:func:`ctrflow.train.scaling.step_strength`; None: the rule in full).
        embedding_row_warmup: lazy Adam's per-row warm-up in lookups (:class:`ctrflow.train.optim.LazyAdam`'s
            ``row_warmup``; None: :data:`ROW_WARMUP` for lazy Adam tables, times the batch rule's
            ``row_warmup_factor``, and 0 for the other embedding optimizers).
        embedding_l2, embedding_clip: L2 weight on the embedding rows a batch touches and CowClip's
            ratio (None: by the batch rule, 0 at or below batch 512).
        grad_clip: largest global L2 norm of the dense (non-embedding) parameters' gradient before each
            optimizer step (:func:`ctrflow.train.clip.clip_dense_gradients`; 0: none; None: by the batch
            rule, 0 at or below batch 512).
        world_size: ranks whose batches make one optimizer step (torchrun), for the batch rule.
        select: the validation metric that picks the best checkpoint (``auto``: AUC for binary, RMSE
            for regression; ``none``: no selection); the best is kept as ``best.pt`` in the run dir.
        patience: stop after this many evaluations without a better ``select`` metric (None: never).
        restore_best: end the run with the best checkpoint's weights in the model, and report its metrics.
        target: regression only: ``{"mean", "std", "y_range"}`` from :func:`ctrflow.train.target.target_stats`
            (the model learns a standardised or range-squashed target; None: the raw MSE).
        warmup_steps: linear warm-up steps (a value < 1 is a share of the total steps).
        decay: ``cosine``, ``linear`` or ``none`` after the warm-up; ``min_lr_factor`` is its floor.
        epochs, max_steps: run length (``max_steps`` counts optimizer steps and wins when smaller); the
            learning-rate schedule spans it.
        stop_after: stop (and checkpoint) once the run reaches this step, leaving the schedule as it is, so
            that a resumed run continues exactly as the uninterrupted one (None: run to the end).
        grad_accum: batches per optimizer step.
        micro_batch: rows per forward/backward slice of a batch (None: :data:`ctrflow.train.micro.AUTO_ROWS`
            on the CPU for models without BatchNorm; 0: batches whole); the same gradient in less memory.
        eval_every: evaluate every N steps (0: only at the end of each epoch).
        log_every: a log line / ``metrics.jsonl`` record every N steps.
        checkpoint_every: also checkpoint every N steps (0: only at evaluations and the end of each epoch).
        keep_checkpoints: keep the newest N checkpoints.
        amp: ``True`` autocasts to bfloat16 (on CUDA or CPU); ``"auto"``: on CUDA only.
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda[:i]``.
        progress: progress bar (None: when stderr is a TTY); verbose: print log lines.
        tensorboard, plot: write TensorBoard scalars (when installed) / ``curve.png`` at the end.
    """

    task: str = "binary"
    batch_size: int = 512
    valid_batch_size: int = 65536
    optimizer: str = "adam"
    lr: float | None = None
    embedding_lr: float | None = None
    embedding_optimizer: str | None = None
    row_steps: bool = True
    embedding_row_warmup: float | None = None
    weight_decay: float = 0.0
    batch_scaling: bool = True
    run_steps: int | None = None
    embedding_l2: float | None = None
    embedding_clip: float | None = None
    grad_clip: float | None = None
    world_size: int = 1
    select: str = "auto"
    patience: int | None = None
    restore_best: bool = True
    target: dict[str, Any] | None = None
    warmup_steps: float = 0.05
    decay: str = "cosine"
    min_lr_factor: float = 0.1
    epochs: int = 1
    max_steps: int | None = None
    stop_after: int | None = None
    grad_accum: int = 1
    micro_batch: int | None = None
    eval_every: int = 0
    log_every: int = 50
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    amp: bool | str = "auto"
    device: str = "auto"
    progress: bool | None = None
    verbose: bool = True
    tensorboard: bool = True
    plot: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        for name in (self.optimizer, self.embedding_optimizer or self.optimizer):
            if name not in OPTIMIZERS:
                raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
        counts = (self.batch_size, self.epochs, self.grad_accum, self.log_every, self.keep_checkpoints)
        if min(counts) < 1:
            raise ValueError(f"batch_size, epochs, grad_accum, log_every, keep_checkpoints must be >= 1: {counts}")
        if self.select != "none" and self.select != "auto" and self.select not in HIGHER_IS_BETTER:
            raise ValueError(f"select must be auto, none or one of {', '.join(HIGHER_IS_BETTER)}, got {self.select!r}")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"patience must be >= 1, got {self.patience}")
        if self.micro_batch is not None and self.micro_batch < 0:
            raise ValueError(f"micro_batch must be >= 0 (0: never split), got {self.micro_batch}")
        for name in ("max_steps", "stop_after"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.run_steps is not None and self.run_steps < 1:
            raise ValueError(f"run_steps must be >= 1 (or None: unknown), got {self.run_steps}")
        rule = batch_scaling(self.rows_per_step if self.batch_scaling else 1, steps=self.run_steps)
        if self.lr is None:
            self.lr = LR[self.optimizer] * rule.lr_factor
        if self.embedding_lr is None:
            self.embedding_lr = EMBEDDING_LR[self.embedding_optimizer or self.optimizer] * rule.embedding_lr_factor
        lazy_adam = (self.embedding_optimizer or self.optimizer) == "adam"
        if self.embedding_row_warmup is None:
            self.embedding_row_warmup = ROW_WARMUP * rule.row_warmup_factor if lazy_adam else 0.0
        if self.embedding_row_warmup < 0:
            raise ValueError(f"embedding_row_warmup must be >= 0 (0: off), got {self.embedding_row_warmup}")
        if self.embedding_row_warmup > 0 and not lazy_adam:
            raise ValueError("embedding_row_warmup applies to the lazy Adam tables only: use the adam embedding "
                             "optimizer or set it to 0")
        if self.embedding_l2 is None:
            self.embedding_l2 = rule.embedding_l2
        if self.embedding_clip is None:
            self.embedding_clip = rule.clip_ratio
        if self.grad_clip is None:
            self.grad_clip = rule.grad_clip
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0 (0: no clipping), got {self.grad_clip}")
        if 0 <= self.warmup_steps < 1:  # a share of the run: the rule may lengthen it
            self.warmup_steps = max(self.warmup_steps, rule.warmup_share)

    @property
    def rows_per_step(self) -> int:
        """Rows behind one optimizer step: the batch, accumulated, over all ranks."""
        return self.batch_size * self.grad_accum * max(1, self.world_size)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA device is available")
    return dev
