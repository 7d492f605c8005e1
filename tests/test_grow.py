"""Growing embedding tables onto grown vocabularies (models/grow.py) and resuming onto a new day."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ctrflow.models import DLRM, TabularModel
from ctrflow.models.grow import GrowError, grow_checkpoint, table_layout
from ctrflow.train.data import TensorLoader
from ctrflow.train.trainer import TrainConfig, Trainer


def _loader(cards: list[int], n_cont: int, rows: int = 512, seed: int = 0) -> TensorLoader:
    g = torch.Generator().manual_seed(seed)
    cat = torch.stack([torch.randint(0, c, (rows,), generator=g) for c in cards], dim=1)
    return TensorLoader(cat, torch.randn(rows, n_cont, generator=g), torch.randint(0, 2, (rows,), generator=g).float(),
                        batch_size=64, seed=seed)


def _trained(model, cards, optimizer: str) -> Trainer:
    cfg = TrainConfig(optimizer=optimizer, lr=0.01, embedding_lr=0.05, verbose=False, progress=False,
                      tensorboard=False, plot=False, device="cpu")
    t = Trainer(model, cfg)
    t.fit(_loader(cards, model.n_cont))
    return t


def _starts(cards):
    return np.concatenate([[0], np.cumsum(cards)[:-1]]).tolist()


@pytest.mark.parametrize("optimizer", ["adam", "adagrad"])
def test_dlrm_growth_keeps_rows_and_optimizer_state(optimizer):
    old_cards, new_cards = [5, 7, 3], [9, 7, 6]
    torch.manual_seed(0)
    t_old = _trained(DLRM(old_cards, 2, 4, [8, 4], [8, 1]), old_cards, optimizer)
    state = t_old.state_dict()
    torch.manual_seed(1)
    new = DLRM(new_cards, 2, 4, [8, 4], [8, 1])
    fresh = new.sparse_arch.embedding.weight.detach().clone()
    t_new = Trainer(new, t_old.cfg)
    grown = grow_checkpoint(state, new, t_new.optimizers)
    key = "sparse_arch.embedding.weight"
    old_w, w = state["model"][key], grown["model"][key]
    assert grown["grown"] == {key: [15, 22]} and grown["tables"]["sparse_arch.embedding"] == new_cards
    for so, sn, co, cn in zip(_starts(old_cards), _starts(new_cards), old_cards, new_cards, strict=True):
        assert torch.equal(w[sn:sn + co], old_w[so:so + co])  # learned rows, bit for bit
        assert torch.equal(w[sn + co:sn + cn], fresh[sn + co:sn + cn])  # new rows: the new model's init
    sparse_opt = grown["optimizers"][-1]["state"]
    (entry,) = sparse_opt.values()
    (old_entry,) = state["optimizers"][-1]["state"].values()
    for name, v in entry.items():
        if not torch.is_tensor(v) or v.dim() == 0:
            assert v == old_entry[name]
            continue
        assert v.shape[0] == 22
        for so, sn, co, cn in zip(_starts(old_cards), _starts(new_cards), old_cards, new_cards, strict=True):
            assert torch.equal(v[sn:sn + co], old_entry[name][so:so + co])
            assert not v[sn + co:sn + cn].any()  # never-updated rows: zero moments / accumulators / counts
    # the dense optimizer's state is untouched, and the grown checkpoint loads and trains on
    assert grown["optimizers"][0] is state["optimizers"][0]
    t_new.load_state_dict(grown)
    t_new.cfg.max_steps = 3
    t_new.fit(_loader(new_cards, 2, seed=3))


def test_tabular_mixed_dims_and_errors():
    old = [(4, 3), (6, 5), (10, 3)]
    torch.manual_seed(0)
    t_old = _trained(TabularModel(old, 2, 1, [8]), [c for c, _ in old], "adagrad")
    state = t_old.state_dict()
    assert sorted(map(sorted, state["tables"].values())) == [[4, 10], [6]]
    new = TabularModel([(5, 3), (6, 5), (13, 3)], 2, 1, [8])
    grown = grow_checkpoint(state, new, Trainer(new, t_old.cfg).optimizers)
    assert set(grown["grown"]) == {"embeds.groups.0.weight"}  # the dim-5 table did not grow
    w, ow = grown["model"]["embeds.groups.0.weight"], state["model"]["embeds.groups.0.weight"]
    assert torch.equal(w[0:4], ow[0:4]) and torch.equal(w[5:15], ow[4:14])
    assert grow_checkpoint(state, TabularModel(old, 2, 1, [8]), None) is state  # nothing grew
    with pytest.raises(GrowError, match="can only grow"):
        grow_checkpoint(state, TabularModel([(3, 3), (6, 5), (13, 3)], 2, 1, [8]))
    with pytest.raises(GrowError, match="dim"):
        grow_checkpoint({**state, "tables": {**state["tables"], "embeds.groups.1": [5]}},
                        TabularModel([(5, 3), (6, 4), (13, 3)], 2, 1, [8]))
    assert table_layout(torch.nn.Embedding(7, 2)) == {"": [7]}


# ---- end to end: etl/run.py --update, then fit.py --resume RUN --data NEW ---------------------
def _raw_day(path, seed: int, offset: int, n: int = 3000) -> str:
    rng = np.random.default_rng(seed)
    c1 = rng.zipf(1.3, n) + offset
    y = (rng.random(n) < 1 / (1 + np.exp(-(np.sin(c1) + 0.1 * rng.normal(size=n))))).astype(np.int8)
    df = pd.DataFrame({"label": y, "I1": rng.exponential(5, n), "I2": rng.normal(size=n),
                       "C1": c1.astype(str), "C2": (rng.zipf(1.6, n) + offset).astype(str)})
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), path)
    return str(path)


def test_resume_onto_grown_day(tmp_path):
    from ctrflow.etl.run import main as etl_main
    from ctrflow.train.checkpoint import latest_checkpoint, load_checkpoint
    from ctrflow.train.fit import main as fit_main

    valid = _raw_day(tmp_path / "valid.parquet", 9, 0, n=1000)
    etl = ["--cats", "C1,C2", "--conts", "I1,I2", "--valid", valid, "--no-progress"]
    p1, p2, run = str(tmp_path / "p1"), str(tmp_path / "p2"), str(tmp_path / "run")
    assert etl_main(["--input", _raw_day(tmp_path / "d1.parquet", 1, 0), "--output", p1, *etl]) == 0
    assert etl_main(["--update", p1, "--input", _raw_day(tmp_path / "d2.parquet", 2, 25), "--output", p2,
                     "--valid", valid, "--no-progress"]) == 0
    fit = ["--batch-size", "256", "--no-progress", "--no-loader-bench", "--log-every", "1", "--embedding-dim", "4",
           "--layers", "8", "--bottom-layers", "8", "--threads", "1", "--eval-every", "0"]
    assert fit_main(["--data", p1, "--out", run, *fit]) == 0
    day1 = load_checkpoint(latest_checkpoint(os.path.join(run, "checkpoints")))
    assert fit_main(["--resume", run, "--data", p2, *fit]) == 0
    day2 = load_checkpoint(latest_checkpoint(os.path.join(run, "checkpoints")))
    assert day2["segment_start"] == day1["step"] and day2["step"] == 2 * day1["step"]  # one epoch of each day
    old_cards, new_cards = day1["tables"]["sparse_arch.embedding"], day2["tables"]["sparse_arch.embedding"]
    assert all(n >= o for o, n in zip(old_cards, new_cards, strict=True)) and new_cards != old_cards
    with open(os.path.join(run, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    losses = [r["loss"] for r in recs if r["kind"] == "train"]
    assert len(losses) == day2["step"] and np.isfinite(losses).all()
    assert any(r["kind"] == "resume" for r in recs)
    # best-checkpoint selection starts afresh on the new day: its best is a day-2 checkpoint that fits
    # the grown tables (a day-1 best.pt restored into them crashed with a size mismatch)
    assert day2["best"]["step"] > day1["step"]
    with open(os.path.join(run, "summary.json")) as f:
        assert json.load(f)["best"]["step"] > day1["step"]
    # a second --resume onto the same day is a plain resume: the run is complete, nothing retrains
    assert fit_main(["--resume", run, "--data", p2, *fit]) == 0
    assert load_checkpoint(latest_checkpoint(os.path.join(run, "checkpoints")))["step"] == day2["step"]
