"""Data-parallel training under ``torchrun``: process group, rank helpers, gradient sync, gathers.

``torchrun --nproc_per_node=N train/fit.py ...`` starts N processes with ``RANK`` / ``WORLD_SIZE`` /
``LOCAL_RANK`` / ``MASTER_ADDR`` in their environment; :func:`init` turns that into a process group
(NCCL on CUDA, Gloo on the CPU) and pins each rank to GPU ``LOCAL_RANK``. Without those variables
(or with ``WORLD_SIZE=1``) every function here is a no-op and training is single-process.

Gradients (:class:`GradSync`): the dense part of the model (MLPs, interaction) is wrapped in
``DistributedDataParallel``, which all-reduces its gradients in buckets while backward runs. The
sparse embedding weights are *excluded* from DDP and synchronised here instead, because

* DDP treats any parameter that is not an ``nn.Embedding`` / ``nn.EmbeddingBag`` as dense: the
  fused table (``FusedEmbedding``, one weight for F tables) hands it a sparse gradient and backward
  fails ("Cannot access storage of SparseTensorImpl", checked on Gloo with torch 2.13);
* NCCL has no sparse all-reduce at all, so the GPU path needs this anyway.

The sparse sync coalesces each rank's gradient (one row per distinct id), ``all_gather`` s the row
ids and row values (variable lengths: sizes first, then padded tensors), and builds the averaged
gradient ``sum_r g_r / W`` as one coalesced sparse tensor; every rank computes the same bytes, so
the row-wise optimizers keep the tables identical across ranks. Traffic is O(distinct rows used
per step * D), not O(table size). Models that bring their own ``training_step`` bypass
``DDP.forward``; for them (``ddp=False``) the dense gradients are all-reduced here too, flattened
into one buffer per dtype.
"""

from __future__ import annotations

import atexit
import datetime
import os
import sys
from collections.abc import Iterable
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from torch import nn

from ctrflow.models.embedding import sparse_embedding_modules
from ctrflow.train.optim import set_row_counts


def env_world_size() -> int:
    """``WORLD_SIZE`` from torchrun's environment (1 when not launched by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's global rank (0 when not distributed)."""
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    """Number of ranks (1 when not distributed)."""
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    """True on the rank that logs and writes files (rank 0, or the only process)."""
    return rank() == 0


def init(device: torch.device, timeout_s: float = 1800) -> torch.device:
    """Join torchrun's process group when ``WORLD_SIZE > 1``; returns this rank's device.

    Args:
        device: the device asked for (``cpu`` or ``cuda``); on CUDA each rank takes GPU ``LOCAL_RANK``.
        timeout_s: how long a collective may wait for a missing rank before failing.

    Returns:
        ``device`` (CPU), or ``cuda:LOCAL_RANK``.
    """
    if env_world_size() <= 1 or is_initialized():
        return device
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK={local} but only {torch.cuda.device_count()} GPU(s) are visible: "
                             "use --nproc_per_node <= the number of GPUs")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return device


def exit_process(code: int) -> NoReturn:
    """End the process with ``code``; a torchrun rank (``WORLD_SIZE > 1``) skips interpreter finalization.

    Why: ``DistributedDataParallel`` keeps the process group, and with it Gloo's worker threads, alive past
    ``destroy_process_group`` (torch 2.13: a DDP wrapper, even one never called, leaves the threads
    running). A worker that drops a finished collective after the interpreter began to finalize needs the
    GIL to free the collective's tensors, gets ``pthread_exit`` instead, and the forced unwind aborts the
    process (``terminate called without an active exception``, SIGABRT: a backtrace shows
    ``AsyncBarrierWork::~AsyncBarrierWork`` -> ``decref_pyobject`` -> ``take_gil``), so torchrun fails a job
    whose work had all finished (3 of 90 two-rank runs on a busy 2-core CPU here). Such a rank therefore runs the
    ``atexit`` handlers, flushes its streams, and leaves with ``os._exit``; a single process exits normally.

    Args:
        code: the exit status (:func:`ctrflow.train.fit.main`'s return value).
    """
    if env_world_size() <= 1:  # never joined a process group (see init)
        sys.exit(code)
    atexit._run_exitfuncs()  # what a normal exit runs (loader finalizers, logging), the interpreter still whole
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken pipe: nothing more to write
            pass
    os._exit(code)


def teardown() -> None:
    """Leave the process group (after a final barrier, so no rank exits while others still talk)."""
    if is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def barrier() -> None:
    if is_initialized() and world_size() > 1:
        dist.barrier()


def _comm_device() -> torch.device:
    """Where collective buffers must live: the rank's GPU under NCCL, else the CPU."""
    if is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_varlen(t: torch.Tensor) -> torch.Tensor:
    """Every rank's ``t`` concatenated along dim 0 in rank order, on every rank.

    Args:
        t: [N_r, ...] on this rank (N_r may differ between ranks; trailing dims may not).

    Returns:
        [sum_r N_r, ...]; ``t`` itself when not distributed.
    """
    if world_size() <= 1:
        return t
    dev = _comm_device()
    home = t.device
    t = t.to(dev).contiguous()
    n = torch.tensor([t.shape[0]], dtype=torch.int64, device=dev)
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(sizes, n)
    sizes_l = [int(s.item()) for s in sizes]
    top = max(sizes_l)
    padded = t if t.shape[0] == top else torch.cat([t, t.new_zeros((top - t.shape[0], *t.shape[1:]))])
    out = [torch.empty_like(padded) for _ in sizes_l]
    dist.all_gather(out, padded)
    return torch.cat([o[:s] for o, s in zip(out, sizes_l, strict=True)]).to(home)


def all_sum(values: Iterable[float]) -> list[float]:
    """Element-wise sum of a few numbers over all ranks (float64)."""
    t = torch.tensor(list(values), dtype=torch.float64, device=_comm_device())
    if world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def all_values(value: int) -> list[int]:
    """Every rank's ``value``, in rank order (to check that ranks agree, e.g. on batches per epoch)."""
    return [int(v) for v in all_gather_varlen(torch.tensor([int(value)])).tolist()]


def average_sparse(grad: torch.Tensor, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean over ranks of a sparse row gradient, identical on every rank, and each row's lookups.

    Args:
        grad: this rank's sparse COO gradient of a [R, D] weight (duplicates allowed: one per lookup).
        world: number of ranks (W).

    Returns:
        ``(avg, counts)``: coalesced sparse [R, D] over the rows used on any rank, values
        ``sum_r g_r[row] / W``; and counts [U], the lookups of each of those rows over all ranks, in the
        order of ``avg``'s indices (CowClip's ``cnt``: the optimizer cannot count them in a coalesced
        gradient, :func:`ctrflow.train.optim.set_row_counts`).
    """
    idx, val = grad._indices(), grad._values()
    ones = torch.ones((idx.shape[1], 1), dtype=val.dtype, device=val.device)
    # One row per id before the exchange (less traffic), the lookup count riding as one more column.
    local = torch.sparse_coo_tensor(idx, torch.cat((val.reshape(idx.shape[1], -1), ones), 1),
                                    (grad.shape[0], val[0].numel() + 1 if val.dim() > 1 else 2),
                                    check_invariants=False).coalesce()
    ids = all_gather_varlen(local.indices()[0])
    both = all_gather_varlen(local.values())
    # Coalescing the gathered rows (sorted, summed in a fixed order) gives every rank the same bytes.
    merged = torch.sparse_coo_tensor(ids[None], both, local.shape, check_invariants=False).coalesce()
    vals = merged.values()
    avg = torch.sparse_coo_tensor(merged.indices(), (vals[:, :-1] / world).reshape(-1, *grad.shape[1:]),
                                  grad.shape, check_invariants=False)
    return avg._coalesced_(True), vals[:, -1].contiguous()


class GradSync:
    """Keeps a model's gradients averaged over all ranks.

    Args:
        model: the model (already on ``device``); its parameters are broadcast from rank 0.
        device: this rank's device.
        ddp: wrap the dense part in ``DistributedDataParallel`` (the model's forward must then be
            called through :attr:`net`); False all-reduces dense gradients in :meth:`sync`.

    Attributes:
        net: what to call for the forward pass (the DDP wrapper, or the model itself).
    """

    def __init__(self, model: nn.Module, device: torch.device, ddp: bool = True) -> None:
        self.model = model
        self.world = world_size()
        sparse_ids = {id(m.weight) for m in sparse_embedding_modules(model)}
        self.sparse = [p for p in model.parameters() if id(p) in sparse_ids and p.requires_grad]
        self.dense: list[nn.Parameter] = []
        # Rank 0's weights everywhere (DDP broadcasts only the parameters it manages).
        for t in [*model.parameters(), *model.buffers()]:
            dist.broadcast(t.data, src=0)
        if ddp:
            names = [n for n, p in model.named_parameters() if id(p) in sparse_ids]
            nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)
            # No buffer sync per forward: the models' buffers are constants (table offsets); a
            # BatchNorm's running stats would stay per rank (rank 0's are checkpointed).
            self.net: nn.Module = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None, forward_sync_buffers=False)
        else:
            self.net = model
            self.dense = [p for p in model.parameters() if id(p) not in sparse_ids and p.requires_grad]

    def sync(self) -> None:
        """Average the gradients not handled by DDP (call after backward, before the optimizer step)."""
        for p in self.sparse:
            if p.grad is None:  # this rank did not use the table: still take part in the exchange
                p.grad = torch.sparse_coo_tensor(torch.zeros((1, 0), dtype=torch.int64, device=p.device),
                                                 torch.zeros((0, *p.shape[1:]), dtype=p.dtype, device=p.device),
                                                 p.shape, check_invariants=False)
            if not p.grad.is_sparse:
                dist.all_reduce(p.grad)
                p.grad /= self.world
                continue
            p.grad, counts = average_sparse(p.grad, self.world)
            set_row_counts(p, counts)
        if self.dense:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.dense]
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)
            flat /= self.world
            offset = 0
            for p, g in zip(self.dense, grads, strict=True):
                p.grad = flat[offset : offset + g.numel()].view_as(p).clone()
                offset += g.numel()


def check_equal_batches(per_epoch: int) -> None:
    """Raise ``ValueError`` unless every rank has ``per_epoch`` batches per epoch: a rank with fewer
    would leave the others waiting in an all-reduce until the timeout."""
    counts = all_values(per_epoch)
    if len(set(counts)) > 1:
        raise ValueError(f"ranks have different numbers of batches per epoch {counts}: shard the data with "
                         "ctrflow.loader.Loader (global_rank / global_size), which keeps them equal")


def wrap_model(model: nn.Module, device: torch.device) -> GradSync | None:
    """The :class:`GradSync` that keeps ``model``'s replicas equal, or None for a model that does that
    itself (``data_parallel = True``: torchrec's DistributedModelParallel, ``train/sharded.py``).

    A model with its own ``training_step`` bypasses ``DDP.forward``, so its dense gradients are
    all-reduced in :meth:`GradSync.sync` instead of by a DDP wrapper.
    """
    if getattr(model, "data_parallel", False):
        return None
    return GradSync(model, device, ddp=not hasattr(model, "training_step"))


def rescale_position(step: int, epoch: int, batch_in_epoch: int, saved_world: int, world: int,
                     steps_per_epoch: int, grad_accum: int) -> tuple[int, int]:
    """``(step, batch_in_epoch)`` of a checkpoint written with ``saved_world`` ranks, for ``world`` ranks.

    The same number of ranks resumes exactly. With a different number each rank's shard (and so its
    batches per epoch) changes, and no rank can replay exactly the rows the old ranks had not seen
    yet: the run continues at the same *share* of the interrupted epoch (rows seen so far ~ the
    same), so some rows of that epoch may be seen twice and others not at all; later epochs are
    exact. The step counter moves with it, keeping the learning-rate schedule's position.
    """
    if saved_world == world or saved_world < 1:
        return step, batch_in_epoch
    bie = batch_in_epoch * saved_world // world
    bie -= bie % grad_accum
    return epoch * steps_per_epoch + bie // grad_accum, bie


def job_totals(summary: dict[str, Any]) -> dict[str, Any]:
    """Rows of all ranks for a fit summary (whose ``rows`` / ``seconds`` are this rank's); ``{}`` alone."""
    world = world_size()
    if world <= 1:
        return {}
    rows = int(all_sum([summary.get("rows", 0)])[0])
    seconds = max(all_sum([summary.get("seconds", 0.0)])[0] / world, 1e-9)
    return {"world_size": world, "global_rows": rows, "global_rows_per_s": rows / seconds}


def check_sharded_embeddings() -> None:
    """``--sharded-embeddings``: raise ``ValueError`` (one line) unless torchrec can be imported."""
    import importlib.util

    if importlib.util.find_spec("torchrec") is None:
        raise ValueError("--sharded-embeddings needs torchrec (pip install torchrec fbgemm-gpu; see README "
                         "'Scaling out'); without it the tables are replicated on every rank")
    if env_world_size() <= 1:
        raise ValueError("--sharded-embeddings shards the tables over torchrun's ranks: launch with "
                         "torchrun --nproc_per_node=N (N >= 2)")
