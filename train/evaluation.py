"""The evaluation side of ``Trainer``: validation metrics, best-checkpoint selection, early stopping.

A mixin, like :mod:`ctrflow.train.resumable`, so the loop in ``trainer.py`` stays readable. It uses the
trainer's ``model``, ``net``, ``cfg``, ``device``, ``step``, ``epoch``, ``history``, ``best``
(:class:`ctrflow.train.selection.BestTracker` or None), ``best_path``, ``_early``, ``is_main`` and its
``_forward`` / ``_loss`` / ``_autocast`` / ``_to_device`` / ``_check_finite`` / ``_log`` / ``_say``.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch

from ctrflow.train import ddp
from ctrflow.train.checkpoint import write_state
from ctrflow.train.hooks import call_hook
from ctrflow.train.metrics import BinaryMetrics, RegressionMetrics
from ctrflow.train.target import predict


class Evaluating:
    """``Trainer``'s evaluation methods (see the module docstring for what they rely on)."""

    @torch.no_grad()
    def evaluate(self, loader: Any) -> dict[str, float]:
        """Metrics over one pass of ``loader``: ``auc``/``logloss``/``ap`` or ``rmse``/``mse``, ``loss``."""
        was_training = self.model.training
        self.model.eval()
        gather = ddp.all_gather_varlen if ddp.world_size() > 1 else None  # exact metrics over all ranks
        metrics = BinaryMetrics(gather=gather) if self.cfg.task == "binary" else RegressionMetrics(gather=gather)
        loss_sum, n = torch.zeros((), dtype=torch.float64, device=self.device), 0
        try:
            for batch_idx, batch in enumerate(loader):
                batch = self._to_device(batch)
                with self._autocast():
                    if hasattr(self.model, "validation_step"):
                        res = call_hook(self.model.validation_step, batch, batch_idx)
                        if isinstance(res, tuple):
                            res = {"logits": res[0], "label": res[1]}
                        elif torch.is_tensor(res):
                            res = {"loss": res}
                        logits, y = res.get("logits"), res.get("label", res.get("labels"))
                        loss = res.get("loss")
                    else:
                        logits, y = self._forward(batch)
                        loss = None
                if logits is not None and y is not None:
                    logits, y = logits.float().reshape(-1), y.float().reshape(-1)
                    # regression: metrics in the target's units (ctrflow.train.target), the loss in its std units
                    metrics.update(logits if self.cfg.task == "binary" else predict(logits, self.cfg.target), y)
                    loss = self._loss(logits, y) if loss is None else loss
                if loss is not None:
                    rows = len(y) if y is not None else 1
                    loss_sum += loss.detach().double() * rows
                    n += rows
        finally:
            self.model.train(was_training)
        out = metrics.compute()
        if gather is not None:
            loss_sum, n = ddp.all_sum([loss_sum.item(), n])
        out["loss"] = float(loss_sum) / n if n else float("nan")
        return out

    def _finish_best(self) -> dict[str, Any] | None:
        """With ``restore_best``: the best checkpoint's weights into the model; its step and metrics."""
        b = self.best
        if b is None or b.step is None or not self.best_path or not os.path.exists(self.best_path):
            return None
        if b.step < getattr(self, "segment_start", 0):  # from before the tables grew (a new day): not this data's
            return None
        if self.cfg.restore_best and b.step != self.step:
            self.model.load_state_dict(torch.load(self.best_path, map_location=self.device, weights_only=True)["model"])
            self._say(None, f"best checkpoint: step {b.step} ({b.metric} {b.best:.5f}); the model now holds its "
                      f"weights ({self.best_path})")
        return {"step": b.step, "metric": b.metric, "value": b.best, "results": b.results, "path": self.best_path,
                "restored": bool(self.cfg.restore_best)}

    def _save_best(self) -> None:
        state = self.state_dict()  # on every rank (a sharded model gathers its tables: collective)
        if self.is_main and self.best_path:
            write_state(self.best_path, state)

    def _run_eval(self, valid: Any, bar: Any) -> dict[str, float]:
        self._check_finite()
        t0 = time.perf_counter()
        res = self.evaluate(valid)
        rec = {"kind": "valid", "step": self.step, "epoch": self.epoch, **res, "seconds": time.perf_counter() - t0}
        self.history["valid"].append({k: rec[k] for k in rec if k not in ("kind",)})
        self._log(rec)
        shown = " ".join(f"{k} {v:.5f}" for k, v in res.items() if k in ("auc", "logloss", "ap", "rmse"))
        note = ""
        if self.best is not None:
            if self.best.update(self.step, res):
                self._save_best()
                note = " (best so far)"
            else:
                note = f" (best: step {self.best.step}, {self.best.since} evaluation(s) ago)"
            if self.best.should_stop:
                self._early = True
                note += f"; no better {self.best.metric} in {self.best.since} evaluations: stopping early"
        self._say(bar, f"valid step {self.step}: {shown} ({res.get('rows', 0)} rows, {rec['seconds']:.1f}s){note}")
        return res
