"""``--sharded-embeddings``: the model's tables sharded over the ranks by torchrec (opt-in).

Data parallelism (``ctrflow.train.ddp``) keeps a full copy of every table on every rank. Once the
tables outgrow one device's memory (or their optimizer state does: row-wise Adagrad adds 4 bytes a
row, Adam 2 x D floats a row), torchrec's ``DistributedModelParallel`` puts each table on one rank
(table-wise) or splits its rows over ranks (row-wise), moves ids and pooled embeddings with
all-to-alls, and data-parallelises the rest of the model with DDP. :func:`shard_model` does that
for a ctrflow model: every ``FusedEmbedding`` (F tables of dim D in one weight) becomes a
:class:`TorchrecTables` (the same F tables as a torchrec ``EmbeddingBagCollection``, same init,
same ``[B, F, D]`` output), and the result is a :class:`ShardedModel` that the ``Trainer`` runs as
it is: it brings its own optimizers (the tables' optimizer runs fused into backward, FBGEMM's) and
its ``state_dict`` gathers the tables so that checkpoints hold the full model in the layout of the
unsharded model (a run can resume sharded or not, with any number of ranks). The tables'
optimizer state is not checkpointed (it is sharded); a resumed run starts it afresh.

Planner: on CUDA torchrec's planner picks the sharding per table (table-wise, row-wise,
column-wise...) from the sizes and the device memory; on the CPU (Gloo) only table-wise is
available, which is what the tests use. Requires torchrec + fbgemm-gpu (``fbgemm-gpu-cpu`` on CPU).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ctrflow.models.embedding import FusedEmbedding, check_ids, sparse_embedding_modules
from ctrflow.train.ddp import _comm_device


class TorchrecTables(nn.Module):
    """F tables of one dim as a torchrec ``EmbeddingBagCollection`` (one lookup per feature).

    Args:
        fused: the ``FusedEmbedding`` to replace (its cardinalities, dim and current weights).
        prefix: unique name prefix of its tables.
    """

    def __init__(self, fused: FusedEmbedding, prefix: str) -> None:
        super().__init__()
        from torchrec import EmbeddingBagCollection, EmbeddingBagConfig

        self.cardinalities = list(fused.cardinalities)
        self.dim = fused.dim
        self.keys = [f"{prefix}{i}" for i in range(len(self.cardinalities))]
        tables = [EmbeddingBagConfig(name=k, embedding_dim=self.dim, num_embeddings=c, feature_names=[k])
                  for k, c in zip(self.keys, self.cardinalities, strict=True)]
        self.ebc = EmbeddingBagCollection(tables=tables, device=torch.device("meta"))  # materialised sharded
        self.initial = fused.weight.detach().cpu().clone()  # copied into the shards by shard_model

    @property
    def num_features(self) -> int:
        return len(self.cardinalities)

    def check_ids(self, ids: torch.Tensor) -> None:
        check_ids(ids, self.cardinalities)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Args: ids [B, F]. Returns: [B, F, D] (each bag holds one id: sum pooling = lookup)."""
        from torchrec import KeyedJaggedTensor

        b, f = ids.shape
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=self.keys, values=ids.t().reshape(-1).long(),
            lengths=torch.ones(f * b, dtype=torch.int32, device=ids.device))
        return self.ebc(kjt).values().view(b, f, self.dim)

    def offsets(self) -> list[int]:
        """First row of each table in the fused ``[sum(cards), D]`` layout."""
        out = [0]
        for c in self.cardinalities[:-1]:
            out.append(out[-1] + c)
        return out


class _TableOptimizer:
    """The fused (in-backward) table optimizer as the Trainer sees it: ``step`` passes the
    scheduled learning rate on; the sharded state is not checkpointed (``state_dict`` keeps the lr)."""

    def __init__(self, fused: Any) -> None:
        self.fused = fused

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.fused.param_groups

    def step(self, closure: Any = None) -> None:
        self.fused.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass  # the fused kernels keep no gradients

    def state_dict(self) -> dict[str, Any]:
        return {"lr": [g["lr"] for g in self.param_groups]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for g, lr in zip(self.param_groups, state.get("lr", []), strict=False):
            g["lr"] = lr


class ShardedModel(nn.Module):
    """A ctrflow model whose tables torchrec shards over the ranks (see the module docstring).

    ``forward`` / ``check_input`` / ``config`` pass through; ``configure_optimizers`` returns the
    dense optimizer and the fused table optimizer; ``state_dict`` / ``load_state_dict`` use the
    unsharded model's layout (collectives: every rank must call them).
    """

    data_parallel = True  # the Trainer must not wrap it again

    def __init__(self, dmp: nn.Module, tables: dict[str, TorchrecTables], dense_opt: torch.optim.Optimizer,
                 inner: nn.Module) -> None:
        super().__init__()
        self.dmp = dmp
        self._tables = tables  # original module name -> its TorchrecTables (inside dmp)
        self._dense_opt = dense_opt
        self._inner = [inner]  # not a submodule (it is dmp's)
        self.config = getattr(inner, "config", None)

    def forward(self, *args: Any) -> torch.Tensor:
        return self.dmp(*args)

    def check_input(self, *args: Any) -> None:
        if hasattr(self._inner[0], "check_input"):
            self._inner[0].check_input(*args)

    def configure_optimizers(self) -> list[Any]:
        return [self._dense_opt, _TableOptimizer(self.dmp.fused_optimizer)]

    def _table_items(self, name: str) -> list[tuple[Any, int, int]]:
        """(ShardedTensor, first fused row, rows) of each table of the module ``name``."""
        mod = self._tables[name]
        sd = self.dmp.state_dict()
        out = []
        for key, start, card in zip(mod.keys, mod.offsets(), mod.cardinalities, strict=True):
            found = [v for k, v in sd.items() if k.endswith(f"embedding_bags.{key}.weight")]
            out.append((found[0], start, card))
        return out

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:  # noqa: D102 - see class docstring
        sd = self.dmp.state_dict()
        out = {}
        for k, v in sd.items():  # dense parameters: replicated, keep them under the unsharded names
            if "embedding_bags." in k:
                continue
            out[_strip(k)] = v.detach().clone()
        dev = _comm_device()
        for name, mod in self._tables.items():
            full = torch.zeros(sum(mod.cardinalities), mod.dim, device=dev)
            for st, start, card in self._table_items(name):
                part = torch.zeros(card, mod.dim, device=dev) if dist.get_rank() == 0 else None
                st.gather(dst=0, out=part)
                if part is not None:
                    full[start : start + card] = part
            dist.broadcast(full, src=0)  # every rank returns the same dict
            out[f"{name}.weight"] = full.cpu()
        return out

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> Any:  # noqa: D102
        for name in self._tables:
            full = state[f"{name}.weight"]
            for st, start, _ in self._table_items(name):
                _copy_into_shards(st, full[start:])
        dense = {k: v for k, v in state.items() if not any(k == f"{n}.weight" for n in self._tables)}
        own = {_strip(k): k for k in self.dmp.state_dict() if "embedding_bags." not in k}
        with torch.no_grad():
            sd = self.dmp.state_dict()
            for short, full_key in own.items():
                if strict and short not in dense:
                    raise KeyError(f"missing {short} in the checkpoint")
                if short in dense:
                    sd[full_key].copy_(dense[short])
        return None


def _strip(key: str) -> str:
    """DMP / DDP key -> the unsharded model's key."""
    for prefix in ("_dmp_wrapped_module.module.", "_dmp_wrapped_module.", "module."):
        if key.startswith(prefix):
            key = key[len(prefix):]
    return key


def _copy_into_shards(st: Any, full: torch.Tensor) -> None:
    """Copy the rows of ``full`` that this rank holds into the local shards of ``st``."""
    with torch.no_grad():
        for shard in st.local_shards():
            (r0, c0), (nr, nc) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
            shard.tensor.copy_(full[r0 : r0 + nr, c0 : c0 + nc].to(shard.tensor.device, shard.tensor.dtype))


def _optimizer(name: str) -> type:
    import torchrec.optim as trec_optim

    return {"adagrad": trec_optim.RowWiseAdagrad, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}[name]


def shard_model(model: nn.Module, device: torch.device, dense_optimizer: str, lr: float,
                table_optimizer: str, table_lr: float) -> ShardedModel:
    """Shard ``model``'s ``FusedEmbedding`` tables over the process group with torchrec.

    Args:
        model: a ctrflow model (its tables are ``FusedEmbedding`` modules); every rank passes the same.
        device: this rank's device.
        dense_optimizer, lr: optimizer (``adam`` / ``adagrad`` / ``sgd``) of the other parameters.
        table_optimizer, table_lr: the tables' fused optimizer (adagrad = row-wise Adagrad).

    Returns:
        A :class:`ShardedModel` ready for the ``Trainer``.

    Raises:
        ValueError: torchrec missing, no process group, or sparse tables of another kind.
    """
    try:
        from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
        from torchrec.distributed.model_parallel import DistributedModelParallel
        from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
        from torchrec.distributed.types import ShardingEnv, ShardingType
        from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
        from torchrec.optim.optimizers import in_backward_optimizer_filter
    except ImportError as e:
        raise ValueError(f"--sharded-embeddings needs torchrec and fbgemm-gpu ({e})") from None
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("--sharded-embeddings shards over torchrun's ranks: launch with torchrun")
    tables: dict[str, TorchrecTables] = {}
    for name, mod in list(model.named_modules()):
        if isinstance(mod, FusedEmbedding):
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            tables[name] = TorchrecTables(mod, prefix=f"t{len(tables)}_")
            setattr(parent, attr, tables[name])
    if not tables:
        raise ValueError("--sharded-embeddings: the model has no FusedEmbedding tables to shard")
    left = sparse_embedding_modules(model)
    if left:
        raise ValueError(f"--sharded-embeddings shards FusedEmbedding tables only; the model also has "
                         f"{type(left[0]).__name__} tables")
    for mod in tables.values():
        apply_optimizer_in_backward(_optimizer(table_optimizer), mod.ebc.parameters(), {"lr": table_lr})
    constraints = None
    if device.type == "cpu":  # the only sharding type torchrec supports on the CPU
        constraints = {k: ParameterConstraints(sharding_types=[ShardingType.TABLE_WISE.value])
                       for mod in tables.values() for k in mod.keys}
    sharders = [EmbeddingBagCollectionSharder()]
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=dist.get_world_size(), compute_device=device.type), constraints=constraints)
    plan = planner.collective_plan(model, sharders, dist.group.WORLD)
    dmp = DistributedModelParallel(model, env=ShardingEnv.from_process_group(dist.group.WORLD), device=device,
                                   plan=plan, sharders=sharders)
    dense = [p for _, p in in_backward_optimizer_filter(dmp.named_parameters())]
    opt_cls = {"adam": torch.optim.Adam, "adagrad": torch.optim.Adagrad, "sgd": torch.optim.SGD}[dense_optimizer]
    sharded = ShardedModel(dmp, tables, opt_cls(dense, lr=lr), model)
    sd = dmp.state_dict()
    for mod in tables.values():  # the same initial weights as the unsharded model
        for key, start in zip(mod.keys, mod.offsets(), strict=True):
            st = next(v for k, v in sd.items() if k.endswith(f"embedding_bags.{key}.weight"))
            _copy_into_shards(st, mod.initial[start:])
        mod.initial = None
    return sharded
