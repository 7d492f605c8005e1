"""Grow embedding tables onto a grown vocabulary (incremental days) without losing what was learned.

After ``etl/run.py --update`` a categorical column may have more ids than the model was trained
with; the ids it had keep their meaning (``ctrflow.etl.update``), new ids come after them. A model
built from the new schema has larger tables; :func:`grow_checkpoint` turns a checkpoint of the old
model into one that loads into it:

* every table's old rows are copied **bit for bit** to the same ids; the new rows keep the new
  model's own initialisation (the same init a fresh model of that size gets);
* optimizer state is grown the same way, row for row: Adam moments / per-row step counts /
  row-wise Adagrad accumulators of old rows are kept, new rows start at zero (Adagrad: at the
  group's ``initial_accumulator_value``), exactly the state of a row never updated;
* a fused weight holding several tables (``FusedEmbedding``) moves each table's rows to its new
  offset, so every table may grow by a different amount.

The old table sizes come from the checkpoint's ``tables`` entry (:func:`table_layout`, written by
the trainer). A table may not shrink and its dim may not change (a different width would make the
learned rows meaningless; ``Workflow.update`` keeps each column's dim for that reason).

Shapes: R = rows of a fused weight (sum of its tables' cardinalities), D = embedding dim.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ctrflow.models.embedding import FusedEmbedding


class GrowError(ValueError):
    """A checkpoint cannot be grown into the model (a table shrank, a dim changed, sizes unknown)."""


def table_layout(model: nn.Module) -> dict[str, list[int]]:
    """``{module name: [rows of each table]}`` for every embedding weight of ``model``.

    ``FusedEmbedding`` lists its tables in weight order; ``nn.Embedding`` / ``nn.EmbeddingBag`` count
    as one table.
    """
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, FusedEmbedding):
            out[name] = list(m.cardinalities)
        elif isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
            out[name] = [int(m.num_embeddings)]
    return out


def _starts(cards: list[int]) -> list[int]:
    starts = [0]
    for c in cards[:-1]:
        starts.append(starts[-1] + c)
    return starts


def old_row_positions(old: list[int], new: list[int], name: str = "table") -> torch.Tensor:
    """Where the old fused weight's rows go in the new one: [sum(old)] row indices into [sum(new)].

    Raises:
        GrowError: a different number of tables, or a table that shrank.
    """
    if len(old) != len(new):
        raise GrowError(f"the checkpoint does not fit the model: {name} has {len(old)} tables in the checkpoint, "
                        f"{len(new)} in the model")
    shrunk = [(i, o, n) for i, (o, n) in enumerate(zip(old, new, strict=True)) if n < o]
    if shrunk:
        i, o, n = shrunk[0]
        raise GrowError(f"the checkpoint does not fit the model: {name} table {i} has {o} rows in the checkpoint, "
                        f"{n} in the model; tables can only grow (was the data processed by an older workflow?)")
    return torch.cat([torch.arange(s, s + o) for s, o in zip(_starts(new), old, strict=True)]) if old \
        else torch.zeros(0, dtype=torch.int64)


def grow_checkpoint(state: dict[str, Any], model: nn.Module,
                    optimizers: list[torch.optim.Optimizer] | None = None) -> dict[str, Any]:
    """A copy of ``state`` whose embedding weights and optimizer state fit ``model``'s grown tables.

    Args:
        state: a trainer checkpoint (``model``, ``optimizers``, ``tables`` ...), on any device.
        model: the model built for the new data; its current weights give the new rows.
        optimizers: the optimizers the state's ``optimizers`` entries belong to, in the same order
            (their parameters identify which state rows to grow).

    Returns:
        ``state`` itself when nothing grew, else a shallow copy with new ``model``, ``optimizers``,
        ``tables`` and ``grown`` (``{weight name: [old rows, new rows]}``).

    Raises:
        GrowError: a table shrank or changed dim, or the checkpoint has no table sizes.
    """
    mine = model.state_dict()
    theirs = state["model"]
    layout, old_layout = table_layout(model), state.get("tables")
    moves: dict[str, tuple[torch.Tensor, int, int]] = {}  # weight key -> (old row positions, old R, new R)
    for name, cards in layout.items():
        key = f"{name}.weight" if name else "weight"
        if key not in theirs or key not in mine:
            continue
        old_w, new_w = theirs[key], mine[key]
        old_cards = (old_layout or {}).get(name)
        if old_cards == cards and old_w.shape == new_w.shape:
            continue
        if old_cards is None:
            if old_w.shape == new_w.shape:
                continue
            raise GrowError(f"the checkpoint does not fit the model: {key} is {list(old_w.shape)} in the checkpoint, "
                            f"{list(new_w.shape)} in the model, and the checkpoint records no table sizes to grow it")
        if old_w.dim() != 2 or old_w.shape[1] != new_w.shape[1]:
            raise GrowError(f"the checkpoint does not fit the model: {key} has embedding dim {old_w.shape[1]} in the "
                            f"checkpoint, {new_w.shape[1]} in the model (a dim change cannot keep the learned rows)")
        moves[key] = (old_row_positions(old_cards, cards, key), old_w.shape[0], new_w.shape[0])
    if not moves:
        return state
    model_sd = dict(theirs)
    for key, (pos, _, _) in moves.items():
        w = mine[key].detach().clone().to(theirs[key].device)
        w[pos] = theirs[key].to(w.dtype)
        model_sd[key] = w
    out = {**state, "model": model_sd, "tables": layout,
           "grown": {k: [old, new] for k, (_, old, new) in moves.items()}}
    if optimizers is not None and state.get("optimizers"):
        out["optimizers"] = [_grow_optimizer(sd, opt, model, moves)
                             for sd, opt in zip(state["optimizers"], optimizers, strict=False)]
    return out


def _grow_optimizer(sd: dict[str, Any], opt: torch.optim.Optimizer, model: nn.Module,
                    moves: dict[str, tuple[torch.Tensor, int, int]]) -> dict[str, Any]:
    """An optimizer state dict with the rows of grown weights moved (new rows zero / initial value)."""
    names = {id(p): k for k, p in model.named_parameters()}
    index_to_key, fills = {}, {}
    i = 0
    for g_new, g_old in zip(opt.param_groups, sd.get("param_groups", []), strict=False):
        for p in g_new["params"]:
            index_to_key[i] = names.get(id(p))
            fills[i] = float(g_old.get("initial_accumulator_value", 0.0))
            i += 1
    state = dict(sd.get("state", {}))
    touched = False
    for idx, entry in sd.get("state", {}).items():
        key = index_to_key.get(int(idx))
        if key not in moves:
            continue
        touched = True
        pos, old_rows, new_rows = moves[key]
        grown = {}
        for name, v in entry.items():
            if torch.is_tensor(v) and v.dim() >= 1 and v.shape[0] == old_rows:
                fill = fills[int(idx)] if name == "sum" else 0
                t = torch.full((new_rows, *v.shape[1:]), fill, dtype=v.dtype, device=v.device)
                t[pos.to(v.device)] = v
                grown[name] = t
            else:
                grown[name] = v
        state[idx] = grown
    return {**sd, "state": state} if touched else sd


def continue_state(state: dict[str, Any], model: nn.Module, optimizers: list[torch.optim.Optimizer],
                   data: str | None) -> dict[str, Any]:
    """Prepare a checkpoint for training on new data (``fit.py --resume RUN --data NEW``).

    Grows the tables (see :func:`grow_checkpoint`). When the data differ from the checkpoint's run
    (``config.train.extra.data``) or a table grew, training on the new data is a new *segment*:
    the step count goes on (``segment_start`` = the checkpoint's step; the learning-rate schedule
    restarts there), the epoch and in-epoch counters restart at 0. Otherwise (an interrupted run
    resumed on its own data) the state is returned unchanged.
    """
    grown = grow_checkpoint(state, model, optimizers)
    old_data = (((state.get("config") or {}).get("train") or {}).get("extra") or {}).get("data")
    if grown is state and (data is None or old_data is None or old_data == data):
        return state
    # A new segment is judged on its own validation data: the best-checkpoint tracker starts afresh.
    return {**grown, "segment_start": int(state["step"]), "epoch": 0, "batch_in_epoch": 0, "best": None,
            "continued_from": {"data": old_data, "step": int(state["step"])}}
