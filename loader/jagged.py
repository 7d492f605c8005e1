"""Jagged list features in other layouts: torchrec's ``KeyedJaggedTensor`` layout and padded tensors.

torchrec's ``KeyedJaggedTensor`` is key-major: the values of key 0 for every row, then those of key 1,
..., with ``lengths`` [n_keys * B] (key-major too). A batch's list features are already stored one
key at a time (``Batch.lists[name] = (values, offsets)``), so the KJT layout is one ``torch.cat`` of
the values and one of the per-key ``diff(offsets)``: no element-by-element copy. Single-valued
categorical columns can be added as keys of length 1 (DLRM's sparse features in torchrec).

Shapes: B = rows, K = keys, N = elements of all keys.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ctrflow.loader.batch import Batch


@dataclass
class KJTLayout:
    """The arrays of a ``torchrec.sparse.jagged_tensor.KeyedJaggedTensor``.

    Attributes:
        keys: feature names, in order.
        values: [N] ids, key-major (int64).
        lengths: [K * B] int32/int64 elements per (key, row), key-major.
        offsets: [K * B + 1] int64 cumulative ``lengths`` from 0.
        weights: [N] float32 per-element weights (1.0 for keys without weights), or ``None`` when no key
            has weights.
        stride: B.
    """

    keys: list[str]
    values: torch.Tensor
    lengths: torch.Tensor
    offsets: torch.Tensor
    weights: torch.Tensor | None
    stride: int

    def to_kjt(self):
        """A real ``KeyedJaggedTensor`` (needs torchrec installed)."""
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

        return KeyedJaggedTensor(keys=self.keys, values=self.values, weights=self.weights,
                                 lengths=self.lengths, offsets=self.offsets, stride=self.stride)


def to_kjt_layout(
    batch: Batch,
    keys: Sequence[str] | None = None,
    categorical_names: Sequence[str] | None = None,
) -> KJTLayout:
    """Key-major values + per-key lengths of a batch's features (torchrec's KJT layout).

    Args:
        batch: a jagged batch (``list_format="jagged"``).
        keys: features in the output order (default: the batch's list features, then
            ``categorical_names``). A key may be a list feature or a categorical column.
        categorical_names: names of ``batch.categorical``'s columns, for categorical keys (length 1).

    Returns:
        A :class:`KJTLayout`.
    """
    cat_pos = {n: i for i, n in enumerate(categorical_names or ())}
    if keys is None:
        keys = [*batch.lists, *cat_pos]
    b = len(batch)
    vals, lens, wts = [], [], []
    any_weights = any(k in batch.weights for k in keys)
    for k in keys:
        if k in batch.lists:
            v, o = batch.lists[k]
            if v.dim() != 1:
                raise ValueError(f"list feature {k!r} is padded; KJT layout needs list_format='jagged'")
            vals.append(v)
            lens.append(o[1:] - o[:-1])
            if any_weights:
                w = batch.weights.get(k)
                wts.append(w if w is not None else torch.ones(v.shape[0], device=v.device))
        elif k in cat_pos:
            v = batch.categorical[:, cat_pos[k]]
            vals.append(v)
            lens.append(torch.ones(b, dtype=torch.int64, device=v.device))
            if any_weights:
                wts.append(torch.ones(b, device=v.device))
        else:
            have = [*batch.lists, *cat_pos]
            raise KeyError(f"no feature {k!r} in the batch (have: {', '.join(have) or 'none'})")
    device = batch.label.device
    values = torch.cat([v.to(torch.int64) for v in vals]) if vals else torch.zeros(0, dtype=torch.int64, device=device)
    lengths = torch.cat(lens) if lens else torch.zeros(0, dtype=torch.int64, device=device)
    offsets = torch.zeros(lengths.numel() + 1, dtype=torch.int64, device=device)
    offsets[1:] = torch.cumsum(lengths, 0)
    weights = torch.cat([w.float() for w in wts]) if any_weights else None
    return KJTLayout(list(keys), values, lengths, offsets, weights, b)


def lengths_of(offsets: torch.Tensor) -> torch.Tensor:
    """[B] elements per row from [B + 1] offsets."""
    return offsets[1:] - offsets[:-1]


def to_padded(values: torch.Tensor, offsets: torch.Tensor, length: int, pad: float | int = 0) -> torch.Tensor:
    """Jagged rows as a dense ``[B, length]`` tensor: the first ``length`` elements of each row, then ``pad``.

    Args:
        values: [N] elements of all rows.
        offsets: [B + 1] int64 row boundaries.
        length: L, the padded width (longer rows are cut to their first L elements).
        pad: fill value after each row's end.

    Returns:
        [B, L] tensor of ``values``' dtype.
    """
    b = offsets.shape[0] - 1
    out = torch.full((b, length), pad, dtype=values.dtype, device=values.device)
    n = values.shape[0]
    if n == 0 or length == 0:
        return out
    lengths = (offsets[1:] - offsets[:-1]).to(values.device)
    row = torch.repeat_interleave(torch.arange(b, device=values.device), lengths, output_size=n)
    pos = torch.arange(n, device=values.device) - offsets[:-1].to(values.device).index_select(0, row)
    keep = pos < length
    if bool(keep.all()):
        out[row, pos] = values
    else:
        out[row[keep], pos[keep]] = values[keep]
    return out


def from_padded(padded: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values [N], offsets [B + 1])`` of the first ``lengths[i]`` entries of each row of ``padded`` [B, L]."""
    b, length = padded.shape
    lengths = lengths.to(padded.device).clamp(max=length)
    mask = torch.arange(length, device=padded.device)[None, :] < lengths[:, None]
    offsets = torch.zeros(b + 1, dtype=torch.int64, device=padded.device)
    offsets[1:] = torch.cumsum(lengths, 0)
    return padded[mask], offsets
