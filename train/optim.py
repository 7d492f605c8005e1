"""Optimizers that update only the embedding rows a batch used, and the default optimizer setup.

Sparse embedding gradients (``FusedEmbedding(sparse=True)``, ``nn.Embedding(sparse=True)``) hold one
row per lookup. The optimizers here merge duplicate rows once (:func:`unique_rows`: scatters, no
sort) and then read and write only those rows of the weight and of the optimizer state, so a step costs O(rows used * D)
whatever the table size:

* :class:`RowWiseAdagrad`: Adagrad with one accumulator per row (mean of the squared row gradient),
  FBGEMM's ``EXACT_ROWWISE_ADAGRAD``; 1/D of Adagrad's state memory.
* :class:`LazyAdam`: Adam whose moments of a row move only when the row is used (``SparseAdam``'s
  rule, without its per-step coalesce of the whole gradient); ``row_steps=True`` (the trainer's
  default) bias-corrects each row by its own update count, so rare rows do not take oversized steps.
* :class:`SparseSGD`: plain SGD via ``index_add_``.

Dense gradients are accepted too (every row is then "used"), so they also work on any parameter.
:func:`build_optimizers` pairs one of them for the sparse embedding weights with the matching
``torch.optim`` optimizer for everything else.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterable

import torch
from torch import nn

from ctrflow.models.embedding import sparse_embedding_modules
from ctrflow.train.scaling import clip_floor

OPTIMIZERS = ("adam", "adagrad", "sgd")


def unique_rows(idx: torch.Tensor, scratch: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(unique ids [U], inverse [N])`` of row ids [N] (``uniq[inv] == idx``; uniq in no set order).

    With ``scratch`` (an int32 tensor of one entry per table row, contents irrelevant) the work is
    O(N) scatters and gathers and never touches the rest of the table: write each lookup's position
    at its row, keep the lookups that read their own position back (one per distinct row), then
    number those. That is several times faster on the CPU than ``torch.unique``'s sort, and the
    result does not depend on which duplicate wins. Without ``scratch``: ``torch.unique``.
    """
    if scratch is None:
        return torch.unique(idx, return_inverse=True)
    n = idx.numel()
    pos = torch.arange(n, dtype=scratch.dtype, device=idx.device)
    scratch.index_copy_(0, idx, pos)
    uniq = idx[scratch.index_select(0, idx) == pos]
    scratch.index_copy_(0, uniq, pos[: uniq.numel()])
    return uniq, scratch.index_select(0, idx).long()


def _row_options(clip: float, clip_floor: float, l2: float, clip_rows: float = 1.0) -> dict[str, float]:
    """The row regularisation options of a param group, checked."""
    if clip < 0 or clip_floor < 0 or l2 < 0 or clip_rows <= 0:
        raise ValueError(f"clip, clip_floor and l2 must be >= 0 and clip_rows > 0, got {clip}, {clip_floor}, {l2}, "
                         f"{clip_rows}")
    return {"clip": float(clip), "clip_floor": float(clip_floor), "l2": float(l2), "clip_rows": float(clip_rows)}


def set_step_rows(optimizers: Iterable[torch.optim.Optimizer], rows: float) -> None:
    """Tell the row-sparse optimizers how many rows the loss behind the next step averages over (CowClip's B).

    The trainer's loss is a batch mean, so row ``j``'s gradient is ~``cnt_j / B`` of a per-row one; the clip
    limit ``r * cnt_j / B * max(||w_j||, zeta)`` is CowClip's (a summed loss's) in those units. Call before
    ``step()`` with the batch times gradient accumulation, times ranks (their gradients are averaged).
    Other optimizers are left alone. (Under torchrun the averaged gradient arrives coalesced; the exchange
    hands each row's lookups over all ranks to the optimizer with :func:`set_row_counts`.)
    """
    if rows <= 0:
        raise ValueError(f"rows must be > 0, got {rows}")
    for opt in optimizers:
        if isinstance(opt, _RowOptimizer):
            for g in opt.param_groups:
                g["clip_rows"] = float(rows)


def set_row_counts(p: torch.Tensor, counts: torch.Tensor) -> None:
    """Lookups [U] behind each row of ``p``'s current *coalesced* sparse gradient (its index order).

    A coalesced gradient has one entry per row, so CowClip's ``cnt_j`` cannot be read from it; whoever
    coalesced it (``ctrflow.train.ddp``'s exchange) hands the counts over here. They count only for the
    gradient object ``p.grad`` is now (a later gradient falls back to one lookup per row).
    """
    p._ctrflow_row_counts = (weakref.ref(p.grad), counts)


def row_counts(p: torch.Tensor, n: int, like: torch.Tensor) -> torch.Tensor:
    """The counts :func:`set_row_counts` left for ``p``'s current gradient, else ones [n] (dtype of ``like``)."""
    entry = getattr(p, "_ctrflow_row_counts", None)
    if entry is not None and entry[0]() is p.grad and entry[1].numel() == n:
        return entry[1].to(like.dtype)
    return torch.ones(n, dtype=like.dtype, device=like.device)


class _RowOptimizer(torch.optim.Optimizer):
    """Base of the row-sparse optimizers: merges duplicate rows of a sparse gradient."""

    def _rows(self, p: torch.Tensor, group: dict | None = None,
              need_counts: bool = False) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """Deduplicated ``(row ids [U], summed row gradients [U, ...], lookups [U] or None)``; ``(None, grad,
        None)`` when the gradient is dense.

        With ``group`` holding ``clip`` (CowClip's ratio r > 0) and / or ``l2`` (> 0), the rows'
        gradients are regularised and clipped here (:meth:`_regularise`), on the touched rows only. The
        lookups of each row in the batch are returned when ``need_counts`` (else None).
        """
        grad = p.grad
        if not grad.is_sparse:
            return None, grad, None
        idx = grad._indices()[0]
        val = grad._values()
        want = group is not None and (group.get("clip", 0) > 0 or group.get("l2", 0) > 0)
        if grad.is_coalesced():
            counts = row_counts(p, idx.numel(), val) if want or need_counts else None
            g = self._regularise(p, idx, val, counts, group) if want else val
            return idx, g, counts if need_counts else None
        # Scratch space (4 bytes per row, not checkpointed) for unique_rows; int32 positions.
        scratch = self.__dict__.setdefault("_scratch", {})
        dtype = torch.int32 if idx.numel() < 2**31 else torch.int64
        buf = scratch.get(id(p))
        if buf is None or buf.numel() != p.shape[0] or buf.device != p.device or buf.dtype != dtype:
            buf = scratch[id(p)] = torch.empty(p.shape[0], dtype=dtype, device=p.device)
        uniq, inv = unique_rows(idx, buf)
        summed = torch.zeros((uniq.numel(), *val.shape[1:]), dtype=val.dtype, device=val.device)
        summed.index_add_(0, inv, val)
        if not want and not need_counts:
            return uniq, summed, None
        counts = torch.zeros(uniq.numel(), dtype=val.dtype, device=val.device)
        counts.index_add_(0, inv, torch.ones_like(inv, dtype=val.dtype))  # lookups of each row in the batch
        g = self._regularise(p, uniq, summed, counts, group) if want else summed
        return uniq, g, counts if need_counts else None

    @staticmethod
    def _regularise(p: torch.Tensor, rows: torch.Tensor, g: torch.Tensor, counts: torch.Tensor,
                    group: dict) -> torch.Tensor:
        """Row L2 and CowClip on the touched rows: ``g + 2 * l2 * w``, then each row's gradient clipped
        to norm ``clip * count / clip_rows * max(||w_row||, clip_floor)`` (see :mod:`ctrflow.train.scaling`;
        ``clip_rows``: the rows a mean-reduced loss averaged over, 1 for a summed loss).

        Args:
            p: the weight [R, D] (or [R]); rows: touched row ids [U]; g: their summed gradients [U, D];
            counts: lookups of each row in the batch [U]; group: the optimizer's param group.

        Returns:
            The regularised, clipped gradients [U, D] (a new tensor; ``g`` may be reused).
        """
        l2, r = group.get("l2", 0.0), group.get("clip", 0.0)
        w = p.index_select(0, rows).to(g.dtype) if (l2 > 0 or r > 0) else None
        if l2 > 0:
            g = g.add(w, alpha=2.0 * l2)
        if r > 0:
            flat_w, flat_g = w.reshape(w.shape[0], -1), g.reshape(g.shape[0], -1)
            # In a mean loss's units: counts / B (groups saved before clip_rows existed: 1, a summed loss).
            limit = flat_w.norm(dim=1).clamp_(min=group.get("clip_floor", 0.0)).mul_(counts)
            limit.mul_(r / group.get("clip_rows", 1.0))
            norm = flat_g.norm(dim=1)
            scale = (limit / norm.clamp(min=torch.finfo(norm.dtype).tiny)).clamp_(max=1.0)
            g = (flat_g * scale[:, None]).reshape(g.shape)
        return g

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_scratch", None)
        return state


class RowWiseAdagrad(_RowOptimizer):
    """Row-wise Adagrad: ``s[r] += mean(g[r]**2)``, ``w[r] -= lr * g[r] / (sqrt(s[r]) + eps)``.

    Args:
        params: parameters (2-D for the row-wise rule; 1-D are treated as one row each element).
        lr: learning rate.
        eps: added to the root of the accumulator.
        initial_accumulator_value: start value of every row's accumulator.
        clip, clip_floor, l2: CowClip ratio and floor, and L2 weight, on the touched rows of a sparse
            gradient (0: off; see :mod:`ctrflow.train.scaling`).
        clip_rows: rows the loss averages over (B; 1: a summed loss); :func:`set_step_rows` updates it.
    """

    def __init__(self, params: Iterable, lr: float = 0.01, eps: float = 1e-8,
                 initial_accumulator_value: float = 0.0, clip: float = 0.0, clip_floor: float = 0.0,
                 l2: float = 0.0, clip_rows: float = 1.0) -> None:
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        super().__init__(params, {"lr": lr, "eps": eps, "initial_accumulator_value": initial_accumulator_value,
                                  **_row_options(clip, clip_floor, l2, clip_rows)})

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D401 - torch signature
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["sum"] = torch.full((p.shape[0],), group["initial_accumulator_value"],
                                              dtype=torch.float32, device=p.device)
                rows, g, _ = self._rows(p, group)
                g2 = g.float().pow(2)
                g2 = g2.mean(dim=1) if g2.dim() > 1 else g2
                if rows is None:
                    s = state["sum"].add_(g2)
                    scale = s.sqrt().add_(group["eps"]).reciprocal_().mul_(-group["lr"])
                    p.add_(g * (scale[:, None] if g.dim() > 1 else scale).to(p.dtype))
                else:
                    s = state["sum"].index_select(0, rows).add_(g2)
                    state["sum"].index_copy_(0, rows, s)
                    scale = s.sqrt().add_(group["eps"]).reciprocal_().mul_(-group["lr"])
                    p.index_add_(0, rows, (g * (scale[:, None] if g.dim() > 1 else scale)).to(p.dtype))
        return loss


class LazyAdam(_RowOptimizer):
    """Adam that moves a row's moments only when the row is used (``torch.optim.SparseAdam``'s rule).

    Args:
        params, lr, betas, eps: as ``torch.optim.Adam``.
        row_steps: bias-correct each row by the number of times *it* was updated (4 bytes per row)
            instead of by the global step. With the global step, a row first seen late in training
            takes a step ~2.5-3x ``lr``; per row it takes ``lr``, like a fresh Adam.
        clip, clip_floor, l2: CowClip ratio and floor, and L2 weight, on the touched rows of a sparse
            gradient (0: off; see :mod:`ctrflow.train.scaling`).
        clip_rows: rows the loss averages over (B; 1: a summed loss); :func:`set_step_rows` updates it.
        row_warmup: a row's step is scaled by ``n / (n + row_warmup)``, ``n`` the row's lookups so far (this
            batch's included; 4 bytes per row): seen ``row_warmup`` times, half its step. Adam's step is ~``lr``
            whatever the gradient's size, so without it an id seen once jumps by ~``lr`` per element toward
            its one label; this keeps rare ids near their start as a prior would (0: off). Counted in lookups,
            not steps: the same at any batch size. Sparse gradients only (a dense one takes Adam's step).
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, row_steps: bool = False, clip: float = 0.0, clip_floor: float = 0.0,
                 l2: float = 0.0, clip_rows: float = 1.0, row_warmup: float = 0.0) -> None:
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if row_warmup < 0:
            raise ValueError(f"row_warmup must be >= 0, got {row_warmup}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "row_steps": row_steps,
                                  "row_warmup": float(row_warmup), **_row_options(clip, clip_floor, l2, clip_rows)})

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                t = state["step"]
                step_size = group["lr"] * math.sqrt(1 - b2**t) / (1 - b1**t)
                warm = group.get("row_warmup", 0.0)
                rows, g, counts = self._rows(p, group, need_counts=warm > 0)
                m_all, v_all = state["exp_avg"], state["exp_avg_sq"]
                if rows is None:
                    m_all.mul_(b1).add_(g, alpha=1 - b1)
                    v_all.mul_(b2).addcmul_(g, g, value=1 - b2)
                    p.addcdiv_(m_all, v_all.sqrt().add_(group["eps"]), value=-step_size)
                    continue
                m = m_all.index_select(0, rows).mul_(b1).add_(g, alpha=1 - b1)
                v = v_all.index_select(0, rows).mul_(b2).addcmul_(g, g, value=1 - b2)
                m_all.index_copy_(0, rows, m)
                v_all.index_copy_(0, rows, v)
                if group.get("row_steps"):
                    if "row_step" not in state:
                        state["row_step"] = torch.zeros(p.shape[0], dtype=torch.int32, device=p.device)
                    k = state["row_step"].index_select(0, rows).add_(1)
                    state["row_step"].index_copy_(0, rows, k)
                    k = k.to(m.dtype)
                    scale = (1 - b2**k).sqrt_().div_(1 - b1**k).mul_(-group["lr"])  # per-row step size
                else:
                    scale = torch.full((rows.numel(),), -step_size, dtype=m.dtype, device=m.device)
                if warm > 0:
                    scale.mul_(self._seen_share(state, p, rows, counts, warm))
                p.index_add_(0, rows, m.div_(v.sqrt_().add_(group["eps"])).mul_(scale.view(-1, *[1] * (m.dim() - 1))))
        return loss

    @staticmethod
    def _seen_share(state: dict, p: torch.Tensor, rows: torch.Tensor, counts: torch.Tensor,
                    warm: float) -> torch.Tensor:
        """``n / (n + warm)`` [U] for the touched rows, ``n`` their lookups so far (this batch's added)."""
        if "row_seen" not in state:
            state["row_seen"] = torch.zeros(p.shape[0], dtype=torch.int32, device=p.device)
        # Saturates at 2^30 (the share is then 1 to float precision): a null id can be looked up billions of times.
        n = state["row_seen"].index_select(0, rows).add_(counts.to(torch.int32)).clamp_(max=1 << 30)
        state["row_seen"].index_copy_(0, rows, n)
        n = n.to(torch.float32)
        return n.div_(n + warm)


class SparseSGD(_RowOptimizer):
    """SGD without momentum: ``w[r] -= lr * g[r]`` for the rows a sparse gradient touches.

    Args:
        params: parameters.
        lr: learning rate.
        clip, clip_floor, l2: CowClip ratio and floor, and L2 weight, on the touched rows (0: off; see
            :mod:`ctrflow.train.scaling`). Without them a sparse gradient is applied with one
            ``index_add_`` (duplicates add up), with them after merging duplicate rows.
        clip_rows: rows the loss averages over (B; 1: a summed loss); :func:`set_step_rows` updates it.
    """

    def __init__(self, params: Iterable, lr: float = 0.01, clip: float = 0.0, clip_floor: float = 0.0,
                 l2: float = 0.0, clip_rows: float = 1.0) -> None:
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        super().__init__(params, {"lr": lr, **_row_options(clip, clip_floor, l2, clip_rows)})

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            regularised = group.get("clip", 0) > 0 or group.get("l2", 0) > 0
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if g.is_sparse and regularised:
                    rows, g, _ = self._rows(p, group)
                    p.index_add_(0, rows, g.to(p.dtype), alpha=-group["lr"])
                elif g.is_sparse:
                    p.index_add_(0, g._indices()[0], g._values().to(p.dtype), alpha=-group["lr"])
                else:
                    p.add_(g, alpha=-group["lr"])
        return loss


def build_optimizers(
    model: nn.Module,
    name: str = "adagrad",
    lr: float = 0.01,
    embedding_lr: float | None = None,
    weight_decay: float = 0.0,
    embedding_optimizer: str | None = None,
    row_steps: bool = True,
    embedding_l2: float = 0.0,
    embedding_clip: float = 0.0,
    rows_per_step: int = 1,
    row_warmup: float = 0.0,
) -> list[torch.optim.Optimizer]:
    """The trainer's default optimizers: one for sparse embedding weights, one for the rest.

    Args:
        model: the model; weights of :func:`sparse_embedding_modules` get the sparse optimizer.
        name: ``adam``, ``adagrad`` or ``sgd``.
        lr: learning rate of the dense parameters.
        embedding_lr: learning rate of the sparse embeddings (default: ``lr``).
        weight_decay: L2 on the dense parameters only (a lazy optimizer cannot decay unused rows).
        embedding_optimizer: rule for the sparse embeddings (default: ``name``), e.g. Adam for the
            MLPs with row-wise Adagrad for the tables.
        row_steps: lazy Adam only: per-row bias correction (see :class:`LazyAdam`; +0.001 AUC for DLRM,
            +0.003 for the TabularModel in one epoch of the embedded data).
        embedding_l2: L2 weight on the embedding rows each batch touches (row-sparse, never the table).
        embedding_clip: CowClip's ratio r for the embedding rows (0: off); the floor is
            :func:`ctrflow.train.scaling.clip_floor` of the rows' width.
        rows_per_step: rows the (mean) loss of a step averages over, CowClip's B (1: a summed loss); the
            trainer updates it every step (:func:`set_step_rows`).
        row_warmup: lazy Adam only: each row's per-row warm-up in lookups (see :class:`LazyAdam`).

    Returns:
        A list of one or two optimizers (those with no parameters are left out).
    """
    name = name.lower()
    emb_name = (embedding_optimizer or name).lower()
    for n in (name, emb_name):
        if n not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {n!r}; choose one of {', '.join(OPTIMIZERS)}")
    if lr <= 0 or (embedding_lr is not None and embedding_lr <= 0):
        raise ValueError(f"learning rates must be > 0, got lr={lr}, embedding_lr={embedding_lr}")
    sparse_ids = {id(m.weight) for m in sparse_embedding_modules(model)}
    sparse = [p for p in model.parameters() if id(p) in sparse_ids and p.requires_grad]
    dense = [p for p in model.parameters() if id(p) not in sparse_ids and p.requires_grad]
    elr = embedding_lr if embedding_lr is not None else lr
    out: list[torch.optim.Optimizer] = []
    if dense:
        # Fused kernels: one pass over all dense parameters instead of a chain of foreach ops.
        dev = dense[0].device.type
        if name == "adam":
            out.append(torch.optim.Adam(dense, lr=lr, weight_decay=weight_decay, fused=dev in ("cpu", "cuda")))
        elif name == "adagrad":
            out.append(torch.optim.Adagrad(dense, lr=lr, weight_decay=weight_decay, fused=dev == "cpu"))
        else:
            out.append(torch.optim.SGD(dense, lr=lr, weight_decay=weight_decay))
    if sparse:
        width = max(int(p[0].numel()) for p in sparse)  # a row's elements (D), for CowClip's floor
        rows = {"clip": embedding_clip, "clip_floor": clip_floor(width) if embedding_clip else 0.0,
                "l2": embedding_l2, "clip_rows": rows_per_step}
        if emb_name == "adam":
            out.append(LazyAdam(sparse, lr=elr, row_steps=row_steps, row_warmup=row_warmup, **rows))
        else:
            out.append({"adagrad": RowWiseAdagrad, "sgd": SparseSGD}[emb_name](sparse, lr=elr, **rows))
    return out
