"""``Batch``: what the loader yields and the models consume.

Modelled on torchrec's ``datasets/utils.py::Batch``. Columns stay the way parquet stores them:
``categorical`` is a ``[B, n_cat]`` *view* of a column-major ``[n_cat, B]`` buffer (strides
``(1, B)``), so ``batch.categorical[:, i]`` is contiguous and no row-major copy is ever made on the
CPU. Call ``.contiguous()`` yourself if a kernel needs row-major input (on the GPU it is cheap).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Batch:
    """One mini-batch.

    Attributes:
        categorical: [B, n_cat] integer ids (int32 unless a cardinality needs int64).
        continuous: [B, n_cont] float32.
        label: [B] float32 (first label column; see ``labels`` for all of them).
        lists: list features as ``{name: (values [N] int, offsets [B + 1] int64)}``.
        weights: optional per-element weights of list features, ``{name: values [N] float32}``.
        labels: [B, n_label] float32 view of all label columns when there are several, else ``None``.
    """

    categorical: torch.Tensor
    continuous: torch.Tensor
    label: torch.Tensor
    lists: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    labels: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.label.shape[0])

    def _map(self, fn) -> Batch:
        return Batch(
            fn(self.categorical),
            fn(self.continuous),
            fn(self.label),
            {k: (fn(v), fn(o)) for k, (v, o) in self.lists.items()},
            {k: fn(w) for k, w in self.weights.items()},
            None if self.labels is None else fn(self.labels),
        )

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """Move every tensor to ``device`` (keeps the column-major layout)."""
        return self._map(lambda t: _to(t, device, non_blocking))

    def pin_memory(self) -> Batch:
        """Copy every tensor into page-locked host memory (keeps the layout)."""
        return self._map(_pin)


def _to(t: torch.Tensor, device, non_blocking: bool) -> torch.Tensor:
    if t.dim() == 2 and not t.is_contiguous() and t.t().is_contiguous():
        # Move the column-major buffer as one block and re-view it.
        return t.t().to(device, non_blocking=non_blocking).t()
    return t.to(device, non_blocking=non_blocking)


def _pin(t: torch.Tensor) -> torch.Tensor:
    if t.dim() == 2 and not t.is_contiguous() and t.t().is_contiguous():
        return t.t().pin_memory().t()
    return t.pin_memory()
