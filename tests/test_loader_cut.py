"""Where batches are cut: ``plan.cut_chunk`` (CPU and CUDA builders), ``every_row``, ``TensorLoader``."""

from __future__ import annotations

import itertools

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from loader_fixtures import no_leaked_threads, small_pieces  # noqa: F401  (autouse fixtures)

from ctrflow.loader import Loader, TensorLoader
from ctrflow.loader.plan import batches_for, cut_chunk, every_row_batch_size, rank_rows


@pytest.mark.parametrize("bsz", [1, 7, 64])
def test_cut_chunk_carries_the_rest_and_hands_it_out_at_the_end(bsz):
    for total, final in itertools.product(range(0, 3 * bsz + 2), [False, True]):
        cut = cut_chunk(total, bsz, final)
        assert cut.rows + cut.carry == total
        assert cut.batches == (batches_for(total, bsz) if final else total // bsz)
        assert (cut.batches - 1) * bsz + cut.last_rows == cut.rows or cut.batches == 0
        assert cut.carry < bsz and (cut.carry == 0 or not final)
        assert cut.keep_from == (cut.rows if cut.carry else None)


def _old_eval_batch_size(total: int, world: int, bsz: int) -> int:
    """The rule ``train/ddp.py`` used to compute itself (for totals >= world)."""
    while sum(rank_rows(total, world, bsz, False)) < total:
        bsz += 1
    return bsz


def test_every_row_batch_size_keeps_the_old_rule_and_leaves_no_row_out():
    for world, bsz in itertools.product([1, 2, 3, 4, 7], [1, 2, 5, 16]):
        for total in range(world, 200):
            b = every_row_batch_size(total, world, bsz)
            assert b == _old_eval_batch_size(total, world, bsz)
            counts = rank_rows(total, world, b, False)
            assert sum(counts) == total and len({batches_for(n, b) for n in counts}) == 1
    assert every_row_batch_size(0, 2, 8) == 8
    with pytest.raises(ValueError, match="fewer rows than ranks"):
        every_row_batch_size(1, 2, 8)


@pytest.fixture
def files(tmp_path):
    out, start = [], 0
    for i, n in enumerate([700, 601]):  # N = 1301, W = 3: q = 433, rem = 2
        rid = np.arange(start, start + n, dtype=np.int32)
        start += n
        pq.write_table(pa.table({"rid": rid, "x": rid.astype(np.float32), "y": (rid % 2).astype(np.float32)}),
                       tmp_path / f"p{i}.parquet", row_group_size=200)
        out.append(str(tmp_path / f"p{i}.parquet"))
    return out


@pytest.mark.parametrize("bsz", [433, 100])  # 433: the corner case, where the plain split leaves 2 rows out
def test_every_row_delivers_each_validation_row_once_over_the_ranks(files, bsz):
    def rows_of(every_row: bool) -> tuple[list[int], set[int], set[int]]:
        ids, lens, sizes = [], set(), set()
        for r in range(3):
            with Loader(files, bsz, shuffle=False, global_rank=r, global_size=3, cats=["rid"], conts=["x"],
                        labels=["y"], every_row=every_row) as lo:
                ids += [int(i) for b in lo for i in b.categorical[:, 0]]
                lens.add(len(lo))
                sizes.add(lo.batch_size)
        return ids, lens, sizes

    ids, lens, sizes = rows_of(True)
    assert sorted(ids) == list(range(1301)) and len(lens) == 1
    assert sizes == {bsz + 1 if bsz == 433 else bsz}
    plain, _, _ = rows_of(False)
    assert len(plain) == (1299 if bsz == 433 else 1301)


def test_every_row_refuses_drop_last(files):
    with pytest.raises(ValueError, match="drop_last"):
        Loader(files, 64, cats=["rid"], conts=["x"], labels=["y"], every_row=True, drop_last=True)


def test_tensor_loader_has_one_home():
    import ctrflow.train
    import ctrflow.train.data

    assert ctrflow.train.TensorLoader is TensorLoader is ctrflow.train.data.TensorLoader


@pytest.mark.parametrize("drop_last", [False, True])
def test_tensor_loader_cuts_like_the_plan(drop_last):
    n, bsz = 103, 10
    cat = torch.arange(n)[:, None]
    tl = TensorLoader(cat, torch.zeros(n, 1), torch.zeros(n), bsz, seed=4, drop_last=drop_last)
    rows = rank_rows(n, 1, bsz, drop_last)[0]
    assert len(tl) == batches_for(rows, bsz)
    first = [b.categorical[:, 0] for b in tl]
    assert sum(len(b) for b in first) == rows and len(first) == len(tl)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(4 * 100_003 + 0))
    assert torch.equal(torch.cat(first), perm[:rows])
    tl.set_epoch(0)
    tl.skip(3)
    assert torch.equal(torch.cat([b.categorical[:, 0] for b in tl]), perm[3 * bsz : rows])


def test_the_rank_surplus_is_counted_and_said_once(tmp_path, caplog):
    # 700,001-row shape of the issue in small: N % W rows no rank delivers when (N // W) % B == 0.
    import logging

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ctrflow.loader import Loader

    n = 1301
    pq.write_table(pa.table({"c": np.arange(n, dtype=np.int32), "y": np.zeros(n, np.float32)}),
                   tmp_path / "part.parquet")
    with caplog.at_level(logging.WARNING, logger="ctrflow.loader"):
        loaders = [Loader(str(tmp_path), 433, shuffle=False, cats=["c"], conts=[], labels=["y"], global_rank=r,
                          global_size=3) for r in range(3)]
    assert {ld.surplus_rows for ld in loaders} == {2} and sum(ld.rows for ld in loaders) == n - 2
    assert caplog.text.count("2 of 1301 rows are left out of every epoch") == 1
