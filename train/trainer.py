"""``Trainer``: the training loop for any ``nn.Module`` on batches from any iterable.

A model is called as ``model(batch.categorical, batch.continuous)`` (or ``model(*batch[:-1])`` for a
tuple batch whose last item is the label) and returns logits. A model may instead define seed 000's
hooks, which then replace the defaults:

* ``training_step(batch) -> loss`` (a tensor, or a dict with ``"loss"``); Lightning's
  ``training_step(batch, batch_idx)`` works too (``batch_idx``: the batch's index in its epoch),
* ``validation_step(batch) -> dict`` (or ``validation_step(batch, batch_idx)``) with ``"loss"``
  and/or ``"logits"`` + ``"label"`` (metrics need the latter), or a ``(logits, label)`` tuple,
* ``configure_optimizers() -> optimizer | list``; ``configure_lr_scheduler(optimizers)`` -> a
  scheduler (or list) stepped once per optimizer step, replacing the built-in warm-up + decay.

Everything a resumed run needs to continue exactly (weights, optimizer state, step, epoch, batches
consumed in the epoch, RNG states) goes into each checkpoint; see :meth:`Trainer.fit` and
:mod:`ctrflow.train.resumable` (the checkpoint methods). Under torchrun, :mod:`ctrflow.train.ddp` keeps
the ranks in step (gradient sync, gathered metrics); only rank 0 logs and writes.
"""

from __future__ import annotations

import math
import os
import sys
import time
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ctrflow.train import ddp
from ctrflow.train.clip import clip_dense_gradients
from ctrflow.train.config import TrainConfig, TrainingError, resolve_device
from ctrflow.train.evaluation import Evaluating
from ctrflow.train.hooks import call_hook
from ctrflow.train.micro import SparseGradients, micro_batch_rows, split_batch
from ctrflow.train.optim import build_optimizers, set_step_rows
from ctrflow.train.plot import plot_history
from ctrflow.train.progress import JsonlTracker, ProgressBar, tensorboard_tracker
from ctrflow.train.resumable import Resumable
from ctrflow.train.schedule import lr_factor
from ctrflow.train.selection import BestTracker, default_metric
from ctrflow.train.target import regression_loss


class Trainer(Resumable, Evaluating):
    """Runs training, evaluation, logging and checkpointing (checkpoint methods: :class:`Resumable`).

    Args:
        model: any ``nn.Module`` (see the module docstring for the calling convention).
        config: a :class:`TrainConfig` (or pass its fields as keyword arguments).
        out_dir: run directory for ``metrics.jsonl``, ``checkpoints/``, ``curve.png``, ``tb/``;
            None writes nothing.
    """

    def __init__(self, model: nn.Module, config: TrainConfig | None = None, out_dir: str | None = None,
                 **kwargs: Any) -> None:
        self.cfg = config or TrainConfig(**kwargs)
        self.device = resolve_device(self.cfg.device)
        self.model = model.to(self.device)
        amp = self.cfg.amp
        self.amp = self.device.type == "cuda" if amp == "auto" else bool(amp)
        self.out_dir = out_dir
        self.ckpt_dir = os.path.join(out_dir, "checkpoints") if out_dir else None
        if hasattr(model, "configure_optimizers"):
            opts = model.configure_optimizers()
            self.optimizers = list(opts) if isinstance(opts, (list, tuple)) else [opts]
        else:
            opts = build_optimizers(model, self.cfg.optimizer, self.cfg.lr, self.cfg.embedding_lr,
                                    self.cfg.weight_decay, self.cfg.embedding_optimizer, self.cfg.row_steps,
                                    self.cfg.embedding_l2, self.cfg.embedding_clip,
                                    row_warmup=self.cfg.embedding_row_warmup)
            self.optimizers = opts
        for opt in self.optimizers:
            for g in opt.param_groups:
                g.setdefault("initial_lr", g["lr"])
        sched = model.configure_lr_scheduler(self.optimizers) if hasattr(model, "configure_lr_scheduler") else None
        self.schedulers = [] if sched is None else (list(sched) if isinstance(sched, (list, tuple)) else [sched])
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.total_steps = 0
        self.history: dict[str, list[dict[str, Any]]] = {"train": [], "valid": []}
        self.last_checkpoint: str | None = None
        self._trackers: list[Any] = []
        self._pending: list[tuple[int, torch.Tensor]] = []  # (step, loss) not yet checked for NaN
        # Incremental days (models/grow.py): the step where training on the current data began (the lr
        # schedule restarts there), and a hook that adapts a checkpoint before it loads (grown tables).
        self.segment_start = 0
        self.state_hook: Any = None
        # torchrun (see ctrflow.train.ddp): `net` becomes the DDP wrapper in fit(); only rank 0 writes.
        self.net: nn.Module = self.model
        self.sync: ddp.GradSync | None = None
        self.is_main = ddp.is_main()
        self._saved_world = ddp.world_size()
        # Best-checkpoint selection / early stopping (ctrflow.train.selection); best.pt beside checkpoints/.
        metric = default_metric(self.cfg.task) if self.cfg.select == "auto" else self.cfg.select
        self.best = None if self.cfg.select == "none" else BestTracker(metric, self.cfg.patience)
        self.best_path = os.path.join(out_dir, "best.pt") if out_dir else None
        self._early = False
        self._micro = 0  # rows per micro-batch, set by fit() (ctrflow.train.micro); 0: whole batches

    # ----------------------------------------------------------------- steps
    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.amp else nullcontext()

    def _to_device(self, batch: Any) -> Any:
        if hasattr(batch, "to"):
            return batch.to(self.device, non_blocking=True)
        if isinstance(batch, (list, tuple)):
            return type(batch)(b.to(self.device, non_blocking=True) if torch.is_tensor(b) else b for b in batch)
        return batch

    def _forward(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [B], labels [B]) from the default calling convention."""
        if hasattr(batch, "categorical"):
            if getattr(self.model, "takes_lists", False):  # list features (ctrflow.models.features)
                out = self.net(batch.categorical, batch.continuous, lists=batch.lists, weights=batch.weights)
            else:
                out = self.net(batch.categorical, batch.continuous)
            y = batch.label
        else:
            *xs, y = batch
            out = self.net(*xs)
        out = out.float()
        if out.dim() == 2 and out.shape[1] == 2 and self.cfg.task == "binary":
            out = out[:, 1] - out[:, 0]  # two-class softmax == sigmoid of the logit difference
        return out.reshape(-1), y.reshape(-1).float()

    def _loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.cfg.task == "binary":
            return F.binary_cross_entropy_with_logits(logits, y)
        return regression_loss(logits, y, self.cfg.target)  # ctrflow.train.target

    def training_step(self, batch: Any, batch_idx: int = 0) -> torch.Tensor:
        with self._autocast():
            if hasattr(self.model, "training_step"):
                loss = call_hook(self.model.training_step, batch, batch_idx)
                return loss["loss"] if isinstance(loss, dict) else loss
            return self._loss(*self._forward(batch))

    def _forward_backward(self, batch: Any) -> torch.Tensor:
        """The batch's loss, its gradient accumulated into the parameters; in micro-batches when set
        (:mod:`ctrflow.train.micro`: each slice's mean loss weighted by its share of the batch)."""
        parts = split_batch(batch, self._micro) if self._micro else [batch]
        if len(parts) == 1:
            loss = self.training_step(batch, self.batch_in_epoch)
            (loss / self.cfg.grad_accum).backward()
            return loss
        total, n = None, len(batch)
        sparse = SparseGradients(self.model.parameters())  # joined once: autograd's adds are O(slices^2)
        for part in parts:
            share = len(part) / n
            loss = self.training_step(part, self.batch_in_epoch)
            (loss * (share / self.cfg.grad_accum)).backward()
            sparse.take()
            total = loss.detach() * share if total is None else total + loss.detach() * share
        sparse.join()
        return total

    def _set_lr(self) -> float:
        if self.schedulers:
            return self.optimizers[0].param_groups[0]["lr"]
        total = self.total_steps - self.segment_start
        warm = self.cfg.warmup_steps
        warm = int(warm * total) if 0 < warm < 1 else int(warm)
        f = lr_factor(self.step - self.segment_start, total, warm, self.cfg.decay, self.cfg.min_lr_factor)
        for opt in self.optimizers:
            for g in opt.param_groups:
                g["lr"] = g["initial_lr"] * f
        return self.optimizers[0].param_groups[0]["lr"]

    def _optimizer_step(self) -> float:
        if self.sync is not None:
            self.sync.sync()  # gradients DDP does not average (the sparse tables)
        lr = self._set_lr()
        if self.cfg.grad_clip:  # after DDP's averaging and the accumulation: the step's whole gradient
            clip_dense_gradients(self.model.parameters(), self.cfg.grad_clip)
        for opt in self.optimizers:
            opt.step()
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        for s in self.schedulers:
            s.step()
        self.step += 1
        return lr

    def _check_finite(self) -> None:
        """Raise :class:`TrainingError` for the first non-finite loss since the last check."""
        if not self._pending:
            return
        steps, losses = zip(*self._pending, strict=False)
        self._pending = []
        finite = torch.isfinite(torch.stack(losses)).tolist()
        if all(finite):
            return
        i = finite.index(False)
        raise TrainingError(
            f"loss is {losses[i].item()} at step {steps[i]} (epoch {self.epoch}); "
            f"last good checkpoint: {self.last_checkpoint or 'none'}"
        )

    # ------------------------------------------------------------------ loop
    def _log(self, record: dict[str, Any]) -> None:
        for t in self._trackers:
            t.log(record)

    def _say(self, bar: ProgressBar | None, text: str) -> None:
        if self.cfg.verbose and self.is_main:
            if bar is not None:
                bar.clear()
            print(text, file=sys.stderr, flush=True)

    def fit(self, train: Any, valid: Any = None, resume: str | bool = False) -> dict[str, Any]:
        """Train for ``epochs`` (or ``max_steps``), evaluating on ``valid`` and checkpointing.

        Args:
            train: iterable of batches with ``len()``; if it has ``set_epoch(e)`` it is called before
                each epoch, and ``skip(n)`` (when present) starts a resumed epoch at batch ``n``
                (otherwise the consumed batches are read and dropped).
            valid: iterable of validation batches, or None.
            resume: False, True (newest checkpoint of ``out_dir``, if any) or a checkpoint path.

        Returns:
            Summary: ``steps``, ``epochs``, ``rows``, ``seconds``, ``rows_per_s``, ``loader_wait_s``,
            ``valid`` (last metrics), ``checkpoint``, ``resumed_from``.
        """
        cfg = self.cfg
        resumed = self._start(resume)
        per_epoch = len(train)
        if per_epoch < 1:
            raise ValueError("the training data yields no batch (fewer rows than one batch with drop_last?)")
        steps_per_epoch = math.ceil(per_epoch / cfg.grad_accum)
        self.total_steps = steps_per_epoch * cfg.epochs
        if cfg.max_steps:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        self.total_steps += self.segment_start  # epochs / max_steps count from the current data's start
        if ddp.world_size() > 1:  # torchrun: the ranks must agree on the epoch; wrap the model once
            ddp.check_equal_batches(per_epoch)
            if self.sync is None:
                self.sync = ddp.wrap_model(self.model, self.device)
                self.net = self.sync.net if self.sync is not None else self.model
        self._match_world(steps_per_epoch)  # resumed with another number of ranks
        self._micro = micro_batch_rows(cfg.micro_batch, cfg.batch_size, self.device, self.model, ddp.world_size(),
                                       hasattr(self.model, "training_step"))
        if self._micro:
            self._say(None, f"micro-batches of {self._micro:,} rows per forward/backward (one optimizer step per "
                      f"batch of {cfg.batch_size:,}; --micro-batch 0 runs batches whole)")
        self._trackers = []
        if self.out_dir and self.is_main:
            os.makedirs(self.out_dir, exist_ok=True)
            self._trackers.append(JsonlTracker(os.path.join(self.out_dir, "metrics.jsonl")))
            tb = tensorboard_tracker(os.path.join(self.out_dir, "tb")) if cfg.tensorboard else None
            if tb is not None:
                self._trackers.append(tb)
        if resumed:
            self._log({"kind": "resume", "step": self.step, "epoch": self.epoch, "checkpoint": resumed})
            self._say(None, f"resuming at step {self.step} of {self.total_steps} (epoch {self.epoch}, batch "
                      f"{self.batch_in_epoch} of {per_epoch}) from {resumed}")
        # --stop-after: where this process stops; the schedule still spans total_steps.
        stop = min(self.total_steps, cfg.stop_after) if cfg.stop_after else self.total_steps
        bar = ProgressBar(self.total_steps, enabled=cfg.progress if self.is_main else False)
        self.model.train()
        rows_total, wait_total, t_start = 0, 0.0, time.perf_counter()
        win_rows, win_steps, win_batches, win_loss, t_win = 0, 0, 0, None, time.perf_counter()
        postfix = ""
        last_valid: dict[str, float] = {}
        checked_first = False
        eval_step = -1
        boundary = self.batch_in_epoch
        try:
            while self.epoch < cfg.epochs and self.step < stop and not self._early:
                if hasattr(train, "set_epoch"):
                    train.set_epoch(self.epoch)
                skip = self.batch_in_epoch
                if skip and hasattr(train, "skip"):
                    train.skip(skip)
                    skip = 0
                it = iter(train)
                for _ in range(skip):
                    next(it)
                micro = 0
                boundary = self.batch_in_epoch
                while self.step < stop and not self._early:
                    t0 = time.perf_counter()
                    batch = next(it, None)
                    wait_total += time.perf_counter() - t0
                    if batch is None:
                        break
                    batch = self._to_device(batch)
                    if not checked_first and hasattr(self.model, "check_input") and hasattr(batch, "categorical"):
                        if getattr(self.model, "takes_lists", False):
                            self.model.check_input(batch.categorical, batch.continuous, lists=batch.lists)
                        else:
                            self.model.check_input(batch.categorical, batch.continuous)
                        checked_first = True
                    loss = self._forward_backward(batch)
                    self.batch_in_epoch += 1
                    rows = len(batch) if hasattr(batch, "__len__") else 0
                    rows_total += rows
                    win_rows += rows
                    d = loss.detach().float()
                    win_loss = d if win_loss is None else win_loss + d
                    win_batches += 1
                    micro += 1
                    if micro < cfg.grad_accum and self.batch_in_epoch < per_epoch:
                        continue
                    micro = 0
                    self._pending.append((self.step + 1, d))
                    if self.device.type == "cpu":
                        self._check_finite()  # free on the CPU: stop before applying a bad step
                    b = rows if hasattr(batch, "categorical") else cfg.batch_size  # a Batch's rows (last: short)
                    set_step_rows(self.optimizers, b * cfg.grad_accum * ddp.world_size())  # CowClip's B
                    lr = self._optimizer_step()
                    boundary = self.batch_in_epoch
                    win_steps += 1
                    bar.update(self.step, postfix)
                    if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                        self._check_finite()
                        dt = time.perf_counter() - t_win
                        rec = {"kind": "train", "step": self.step, "epoch": self.epoch,
                               "loss": win_loss.item() / win_batches, "lr": lr,
                               "rows_per_s": win_rows / dt, "ms_per_step": 1000 * dt / win_steps}
                        self.history["train"].append({"step": self.step, "loss": rec["loss"]})
                        self._log(rec)
                        postfix = f"loss {rec['loss']:.4f} {rec['rows_per_s']:,.0f} rows/s"
                        self._say(bar, f"step {self.step}/{self.total_steps} epoch {self.epoch} "
                                  f"loss {rec['loss']:.4f} lr {lr:.3g} {rec['rows_per_s']:,.0f} rows/s "
                                  f"{rec['ms_per_step']:.1f} ms/step")
                        win_rows, win_steps, win_batches, win_loss = 0, 0, 0, None
                        t_win = time.perf_counter()
                    if valid is not None and cfg.eval_every and self.step % cfg.eval_every == 0:
                        last_valid = self._run_eval(valid, bar)
                        eval_step = self.step
                    ckpt_due = cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0
                    if ckpt_due or eval_step == self.step:
                        self.save()
                ran_out = self.step < stop and not self._early
                if ran_out or self.batch_in_epoch >= per_epoch:  # the epoch's batches ran out
                    self.epoch += 1
                    self.batch_in_epoch = boundary = 0
                    if valid is not None and eval_step != self.step:
                        last_valid = self._run_eval(valid, bar)
                        eval_step = self.step
                    self.save()
                else:
                    break
            if valid is not None and eval_step != self.step and not self._early:
                last_valid = self._run_eval(valid, bar)
            self._check_finite()
            if self.last_checkpoint is None or not self.last_checkpoint.endswith(f"{self.step:08d}.pt"):
                self.save()
        except KeyboardInterrupt:
            bar.close()
            self.batch_in_epoch = boundary  # the partial accumulation is lost; redo it on resume
            path = self.save()
            print(f"interrupted at step {self.step}; checkpoint: {path}", file=sys.stderr)
            raise
        finally:
            bar.close()
            for t in self._trackers:
                t.close()
            self._trackers = []
        seconds = time.perf_counter() - t_start
        stopped = self.step < self.total_steps and self.epoch < cfg.epochs and not self._early
        if stopped:
            self._say(None, f"stopped at step {self.step} of {self.total_steps} (stop_after); "
                      f"resume to continue: {self.last_checkpoint}")
        if self.out_dir and cfg.plot and self.is_main:
            self.plot(os.path.join(self.out_dir, "curve.png"))
        best = self._finish_best()
        if best:
            last_valid = {**best["results"]}
        return {"best": best, "stopped_early": self.step if self._early else None,
                "steps": self.step, "epochs": self.epoch, "rows": rows_total, "seconds": seconds,
                "rows_per_s": rows_total / seconds if seconds else float("nan"),
                "loader_wait_s": wait_total, "valid": last_valid,
                "checkpoint": self.last_checkpoint, "resumed_from": resumed,
                "stopped_at": self.step if stopped else None, "total_steps": self.total_steps}

    def plot(self, path: str) -> str:
        """Write the loss / AUC (or RMSE) curve of this run's history as a PNG."""
        metric = self.best.metric if self.best is not None else ("auc" if self.cfg.task == "binary" else "rmse")
        best = self.best.step if self.best is not None else None
        return plot_history(path, self.history, metric, best_step=best)

