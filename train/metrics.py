"""Streaming metrics computed on the model's device: exact ROC-AUC, average precision, logloss, RMSE.

``update`` only appends the batch's scores and labels to on-device buffers (no host sync), and
``compute`` sorts once: the AUC is the exact Mann-Whitney statistic with tied scores sharing their
average rank (what ``sklearn.metrics.roc_auc_score`` returns), not a thresholded approximation.
Validation sets of a few hundred thousand rows cost a few MB.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F


def _groups(sorted_scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Start index [G] and size [G] of each run of equal values in a sorted [N] tensor."""
    _, counts = torch.unique_consecutive(sorted_scores, return_counts=True)
    ends = counts.cumsum(0)
    return ends - counts, counts


def roc_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Exact ROC AUC of scores [N] for 0/1 labels [N]; ties count one half. NaN with one class only."""
    scores = scores.reshape(-1).double()
    pos = labels.reshape(-1) > 0.5
    n = scores.numel()
    n_pos = int(pos.sum())
    n_neg = n - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = torch.argsort(scores)
    s = scores[order]
    starts, counts = _groups(s)
    avg_rank = starts.double() + (counts.double() + 1) / 2  # 1-based average rank of each tie group
    ranks = torch.repeat_interleave(avg_rank, counts)
    rank_sum = ranks[pos[order]].sum().item()
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def average_precision(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Average precision (``sklearn.metrics.average_precision_score``): sum of (R_k - R_k-1) * P_k
    over the distinct score thresholds, highest first. NaN without positives."""
    scores = scores.reshape(-1).double()
    y = (labels.reshape(-1) > 0.5).double()
    n_pos = float(y.sum())
    if n_pos == 0:
        return float("nan")
    order = torch.argsort(scores, descending=True)
    s = scores[order]
    ys = y[order]
    starts, counts = _groups(s)
    last = starts + counts - 1  # the last row of each threshold group
    tp = ys.cumsum(0)[last]
    fp = (last + 1).double() - tp
    precision = tp / (tp + fp)
    d_recall = torch.diff(tp, prepend=tp.new_zeros(1)) / n_pos
    return float((d_recall * precision).sum())


Gather = Callable[[torch.Tensor], torch.Tensor]


class BinaryMetrics:
    """Streaming ROC-AUC, average precision and logloss over logits.

    Args:
        gather: under data parallelism, a function returning every rank's rows of a tensor
            concatenated (``ctrflow.train.ddp.all_gather_varlen``): ``compute`` then scores all ranks'
            predictions together, exactly (every rank must call it). None: this process's rows only.

    Example:
        >>> m = BinaryMetrics()
        >>> m.update(torch.tensor([2.0, -1.0]), torch.tensor([1.0, 0.0]))
        >>> round(m.compute()["auc"], 3)
        1.0
    """

    def __init__(self, gather: Gather | None = None) -> None:
        self.gather = gather
        self.reset()

    def reset(self) -> None:
        self._scores: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Args: logits [B] (pre-sigmoid), labels [B] in {0, 1}."""
        self._scores.append(logits.detach().reshape(-1).float())
        self._labels.append(labels.detach().reshape(-1).float())

    def compute(self) -> dict[str, float]:
        """Returns ``{"auc", "logloss", "ap", "rows"}`` (NaN where undefined)."""
        s = torch.cat(self._scores) if self._scores else torch.zeros(0)
        y = torch.cat(self._labels) if self._labels else torch.zeros(0)
        if self.gather is not None:  # before the early return: a rank without rows still takes part
            s, y = self.gather(s), self.gather(y)
        if not s.numel():
            return {"auc": float("nan"), "logloss": float("nan"), "ap": float("nan"), "rows": 0}
        # Mean of the per-row loss in float64: the same value as sklearn's log_loss on sigmoid(s).
        ll = F.binary_cross_entropy_with_logits(s.double(), y.double()).item()
        return {"auc": roc_auc(s, y), "logloss": ll, "ap": average_precision(s, y), "rows": int(s.numel())}


class RegressionMetrics:
    """Streaming MSE / RMSE over predictions (sums kept on the device).

    Args:
        gather: as for :class:`BinaryMetrics`; the sums of all ranks are added up.
    """

    def __init__(self, gather: Gather | None = None) -> None:
        self.gather = gather
        self.reset()

    def reset(self) -> None:
        self._sse: torch.Tensor | None = None
        self._n = 0

    def update(self, preds: torch.Tensor, targets: torch.Tensor) -> None:
        """Args: preds [B], targets [B]."""
        se = (preds.detach().reshape(-1).double() - targets.detach().reshape(-1).double()).pow(2).sum()
        self._sse = se if self._sse is None else self._sse + se
        self._n += preds.numel()

    def compute(self) -> dict[str, float]:
        """Returns ``{"mse", "rmse", "rows"}``."""
        if self.gather is not None:
            dev = self._sse.device if self._sse is not None else "cpu"
            sse = self._sse if self._sse is not None else torch.zeros((), dtype=torch.float64, device=dev)
            both = self.gather(torch.stack([sse.double(), torch.tensor(float(self._n), dtype=torch.float64,
                                                                          device=dev)])[None]).sum(0)
            if not int(both[1]):
                return {"mse": float("nan"), "rmse": float("nan"), "rows": 0}
            mse = both[0].item() / both[1].item()
            return {"mse": mse, "rmse": math.sqrt(mse), "rows": int(both[1].item())}
        if not self._n:
            return {"mse": float("nan"), "rmse": float("nan"), "rows": 0}
        mse = self._sse.item() / self._n
        return {"mse": mse, "rmse": math.sqrt(mse), "rows": self._n}
