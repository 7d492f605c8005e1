"""Sparse optimizers: same update as the dense rule on used rows, untouched rows stay put."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ctrflow.models import DLRM, FusedEmbedding
from ctrflow.train.optim import LazyAdam, RowWiseAdagrad, SparseSGD, build_optimizers, unique_rows
from ctrflow.train.schedule import lr_factor


def _grads(steps: int = 3, rows: int = 40, dim: int = 4):
    """Sparse (duplicated ids) and dense versions of the same gradients."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(steps):
        idx = torch.randint(0, rows // 2, (30,), generator=g)  # the upper half is never used
        val = torch.randn(30, dim, generator=g)
        sp = torch.sparse_coo_tensor(idx[None], val, (rows, dim), check_invariants=True)
        out.append((sp, sp.to_dense()))
    return out


@pytest.mark.parametrize("scratch", [None, torch.full((10_000,), 7, dtype=torch.int32)])
def test_unique_rows(scratch):
    g = torch.Generator().manual_seed(0)
    for idx in (torch.tensor([5, 3, 5, 9, 3, 0]), torch.randint(0, 10_000, (50_000,), generator=g) ** 2 % 10_000):
        uniq, inv = unique_rows(idx, scratch)
        assert sorted(uniq.tolist()) == sorted(set(idx.tolist()))
        assert torch.equal(uniq[inv], idx)


def test_rowwise_adagrad_matches_reference():
    w0 = torch.randn(40, 4)
    p = nn.Parameter(w0.clone())
    opt = RowWiseAdagrad([p], lr=0.1, eps=1e-8)
    ref, acc = w0.clone(), torch.zeros(40)
    for sp, dense in _grads():
        p.grad = sp
        opt.step()
        used = dense.abs().sum(1) > 0
        acc += dense.pow(2).mean(1)
        ref[used] -= 0.1 * dense[used] / (acc[used].sqrt()[:, None] + 1e-8)
    torch.testing.assert_close(p.data, ref)
    assert torch.equal(p.data[20:], w0[20:])


def test_lazy_adam_matches_torch_sparse_adam():
    w0 = torch.randn(40, 4)
    a, b = nn.Parameter(w0.clone()), nn.Parameter(w0.clone())
    ours, theirs = LazyAdam([a], lr=0.05), torch.optim.SparseAdam([b], lr=0.05)
    for sp, _ in _grads():
        a.grad, b.grad = sp, sp.clone()
        ours.step()
        theirs.step()
    torch.testing.assert_close(a.data, b.data)
    assert torch.equal(a.data[20:], w0[20:])


def test_sparse_sgd_and_dense_fallback_match_sgd():
    w0 = torch.randn(40, 4)
    a, b, c = (nn.Parameter(w0.clone()) for _ in range(3))
    o1, o2, o3 = SparseSGD([a], lr=0.3), torch.optim.SGD([b], lr=0.3), RowWiseAdagrad([c], lr=0.1)
    for sp, dense in _grads():
        a.grad, b.grad, c.grad = sp, dense, dense
        o1.step()
        o2.step()
        o3.step()  # a dense gradient works too
    torch.testing.assert_close(a.data, b.data)


def test_build_optimizers_splits_sparse_and_dense():
    m = DLRM([5, 6], 3, embedding_dim=2, dense_arch_layer_sizes=[2], over_arch_layer_sizes=[1])
    for name, cls in [("adam", LazyAdam), ("adagrad", RowWiseAdagrad), ("sgd", SparseSGD)]:
        dense, sparse = build_optimizers(m, name, lr=0.1, embedding_lr=0.5)
        assert isinstance(sparse, cls) and sparse.param_groups[0]["lr"] == 0.5
        emb = m.sparse_arch.embedding.weight
        assert [p is emb for p in sparse.param_groups[0]["params"]] == [True]
        assert all(p is not emb for p in dense.param_groups[0]["params"])
    plain = build_optimizers(FusedEmbedding([3], 2, sparse=False), "adam", 0.1)
    assert len(plain) == 1 and isinstance(plain[0], torch.optim.Adam)
    with pytest.raises(ValueError, match="unknown optimizer"):
        build_optimizers(m, "lamb", 0.1)


def test_lr_schedule():
    assert lr_factor(0, 100, warmup_steps=10) == pytest.approx(0.1)
    assert lr_factor(9, 100, warmup_steps=10) == pytest.approx(1.0)
    assert lr_factor(10, 100, warmup_steps=10, decay="cosine") == pytest.approx(1.0)
    assert lr_factor(100, 100, warmup_steps=10, decay="linear") == pytest.approx(0.0)
    assert lr_factor(55, 100, warmup_steps=10, decay="cosine") == pytest.approx(0.5)
    assert lr_factor(50, 100, decay="none") == 1.0


def test_lazy_adam_row_steps_bias_corrects_per_row():
    def run(row_steps):
        p = nn.Parameter(torch.zeros(10, 2))
        opt = LazyAdam([p], lr=0.1, row_steps=row_steps)
        for t in range(200):
            row = 5 if t == 199 else 0  # row 5 is first used at step 200
            p.grad = torch.sparse_coo_tensor(torch.tensor([[row]]), torch.tensor([[1.0, -2.0]]), (10, 2),
                                             check_invariants=True)
            opt.step()
        return p.data[5]

    torch.testing.assert_close(run(True), torch.tensor([-0.1, 0.1]))  # a fresh Adam's first step: lr
    torch.testing.assert_close(run(False), torch.tensor([-0.1347, 0.1347]), atol=1e-4, rtol=0)  # global step


@pytest.mark.parametrize("coalesced", [False, True])
def test_lazy_adam_row_warmup_scales_each_row_by_its_lookups(coalesced):
    """Each touched row moves n / (n + W) of the plain lazy Adam step, n its lookups so far (this batch's too)."""
    from ctrflow.train.optim import set_row_counts

    batches = [torch.tensor([0, 0, 0, 2]), torch.tensor([0, 2, 2, 7])]
    warm = 2.0
    seen = torch.zeros(10)
    w_plain, w_warm = nn.Parameter(torch.zeros(10, 3)), nn.Parameter(torch.zeros(10, 3))
    plain = LazyAdam([w_plain], lr=0.1, row_steps=True)
    warmed = LazyAdam([w_warm], lr=0.1, row_steps=True, row_warmup=warm)
    g = torch.Generator().manual_seed(0)
    for idx in batches:
        val = torch.randn(idx.numel(), 3, generator=g)
        before_plain, before_warm = w_plain.detach().clone(), w_warm.detach().clone()
        for p in (w_plain, w_warm):
            sp = torch.sparse_coo_tensor(idx[None], val, (10, 3), check_invariants=True)
            if coalesced:  # the torchrun exchange's form: one entry per row, counts handed over beside it
                sp = sp.coalesce()
                p.grad = sp
                set_row_counts(p, torch.bincount(idx, minlength=10)[sp.indices()[0]].float())
            else:
                p.grad = sp
        plain.step()
        warmed.step()
        seen += torch.bincount(idx, minlength=10).float()
        for r in idx.unique().tolist():
            share = seen[r] / (seen[r] + warm)
            torch.testing.assert_close(w_warm[r] - before_warm[r], share * (w_plain[r] - before_plain[r]))
    untouched = torch.ones(10, dtype=torch.bool)
    untouched[[0, 2, 7]] = False
    assert torch.count_nonzero(w_warm.detach()[untouched]) == 0
    assert warmed.state[w_warm]["row_seen"].tolist()[:3] == [4, 0, 3]


def test_lazy_adam_row_warmup_off_is_plain_lazy_adam_and_rejects_negatives():
    w0 = torch.randn(40, 4)
    a, b = nn.Parameter(w0.clone()), nn.Parameter(w0.clone())
    oa, ob = LazyAdam([a], lr=0.05, row_steps=True), LazyAdam([b], lr=0.05, row_steps=True, row_warmup=0.0)
    for sp, _ in _grads():
        a.grad, b.grad = sp, sp.clone()
        oa.step()
        ob.step()
    assert torch.equal(a, b) and "row_seen" not in ob.state[b]
    with pytest.raises(ValueError, match="row_warmup"):
        LazyAdam([a], row_warmup=-1.0)


def test_lazy_adam_row_warmup_counts_saturate_instead_of_wrapping():
    w_plain, w_warm = nn.Parameter(torch.zeros(4, 2)), nn.Parameter(torch.zeros(4, 2))
    plain = LazyAdam([w_plain], lr=0.1, row_steps=True)
    warmed = LazyAdam([w_warm], lr=0.1, row_steps=True, row_warmup=16.0)
    for p in (w_plain, w_warm):
        p.grad = torch.sparse_coo_tensor(torch.tensor([[1, 1]]), torch.tensor([[1.0, -2.0], [0.5, 0.5]]), (4, 2),
                                         check_invariants=True)
    plain.step()
    warmed.step()
    warmed.state[w_warm]["row_seen"][1] = 2**30 - 1  # a null id after a billion lookups: held there, never wraps
    for p in (w_plain, w_warm):
        p.grad = torch.sparse_coo_tensor(torch.tensor([[1, 1]]), torch.tensor([[1.0, -2.0], [0.5, 0.5]]), (4, 2),
                                         check_invariants=True)
    before_plain, before_warm = w_plain.detach().clone(), w_warm.detach().clone()
    plain.step()
    warmed.step()
    assert warmed.state[w_warm]["row_seen"][1] == 2**30
    torch.testing.assert_close(w_warm[1] - before_warm[1], w_plain[1] - before_plain[1])  # the full step
