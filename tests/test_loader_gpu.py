"""ctrflow.loader on CUDA (skipped without a GPU): pinned staging, side stream, on-device shuffle."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import ctrflow.loader.source as source_mod
from ctrflow.loader import Loader

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.fixture
def paths(tmp_path, monkeypatch):
    monkeypatch.setattr(source_mod, "MIN_PIECE_ROWS", 1)
    out, bounds = [], [0, 1000, 1777, 3277]
    for i in range(3):
        rid = np.arange(bounds[i], bounds[i + 1], dtype=np.int32)
        t = pa.table({"rid": rid, "x": rid.astype(np.float32), "y": (rid % 2).astype(np.float32)})
        pq.write_table(t, tmp_path / f"p{i}.parquet", row_group_size=300)
        out.append(str(tmp_path / f"p{i}.parquet"))
    return out


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("use_cudf", [False, None])
def test_gpu_every_row_once(paths, shuffle, use_cudf):
    loader = Loader(paths, 128, shuffle=shuffle, device="cuda", cats=["rid"], conts=["x"], labels=["y"],
                    use_cudf=use_cudf)
    ids = []
    for b in loader:
        assert b.categorical.is_cuda and b.categorical.stride()[0] == 1
        rid = b.categorical[:, 0]
        assert torch.equal(b.continuous[:, 0], rid.float()) and torch.equal(b.label, (rid % 2).float())
        ids.append(rid.cpu().numpy())
    assert len(ids) == len(loader)
    ids = np.concatenate(ids)
    assert np.array_equal(np.sort(ids), np.arange(3277))
    assert np.array_equal(ids, np.arange(3277)) != shuffle


def test_gpu_seed_reproduces(paths):
    def run():
        lo = Loader(paths, 100, seed=3, device="cuda", cats=["rid"], conts=["x"], labels=["y"])
        return np.concatenate([b.categorical[:, 0].cpu().numpy() for b in lo])

    assert np.array_equal(run(), run())


def test_pin_memory_batches(paths):
    lo = Loader(paths, 100, device="cpu", pin_memory=True, cats=["rid"], conts=["x"], labels=["y"])
    b = next(iter(lo))
    assert b.categorical.is_pinned()
    g = b.to("cuda", non_blocking=True)
    assert torch.equal(g.categorical.cpu(), b.categorical)
    lo.stop()
