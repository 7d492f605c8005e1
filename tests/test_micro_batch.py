"""Micro-batches (ctrflow.train.micro): when a batch is sliced, and that slicing keeps the gradient."""

from __future__ import annotations

import pytest
import torch

from ctrflow.loader.batch import Batch
from ctrflow.models import DLRM, TabularModel
from ctrflow.train import TensorLoader, Trainer
from ctrflow.train.micro import AUTO_ROWS, SparseGradients, micro_batch_rows, split_batch

CARDS = [50, 9, 400]
CPU = torch.device("cpu")


def _data(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    cat = torch.stack([torch.randint(0, c, (n,), generator=g) for c in CARDS], 1)
    cont = torch.randn(n, 2, generator=g)
    logit = (cat[:, 0] % 2 * 3 - 1.5) + 2 * cont[:, 0]
    return cat, cont, (torch.rand(n, generator=g) < torch.sigmoid(logit)).float()


def _dlrm():
    torch.manual_seed(0)
    return DLRM(CARDS, 2, embedding_dim=4, dense_arch_layer_sizes=[8, 4], over_arch_layer_sizes=[8, 1])


def _tabular():
    torch.manual_seed(0)
    return TabularModel([(c, 4) for c in CARDS], n_cont=2, out_sz=1, layers=[16], ps=0.0, embed_p=0.0)


def test_rows_rule():
    m, bn = _dlrm(), _tabular()
    assert micro_batch_rows(None, 400000, CPU, m) == AUTO_ROWS
    assert micro_batch_rows(None, AUTO_ROWS, CPU, m) == 0  # not larger than one slice: whole
    assert micro_batch_rows(None, 400000, torch.device("cuda"), m) == 0  # a GPU keeps the whole batch
    assert micro_batch_rows(None, 400000, CPU, bn) == 0  # BatchNorm: a slice would change the model
    assert micro_batch_rows(1000, 400000, CPU, bn) == 1000  # ... unless asked for
    assert micro_batch_rows(None, 400000, CPU, m, world_size=2) == 0
    assert micro_batch_rows(None, 400000, CPU, m, custom_step=True) == 0
    assert micro_batch_rows(0, 400000, CPU, m) == 0
    with pytest.raises(ValueError, match="micro_batch"):
        micro_batch_rows(-1, 10, CPU, m)


def test_split_batch_is_views_in_order():
    cat, cont, y = _data(10)
    b = Batch(cat, cont, y)
    parts = split_batch(b, 4)
    assert [len(p) for p in parts] == [4, 4, 2]
    assert torch.equal(torch.cat([p.categorical for p in parts]), cat)
    assert parts[1].continuous.data_ptr() == cont[4:].data_ptr()  # a view, no copy
    assert [len(t[0]) for t in split_batch((cat, cont, y), 6)] == [6, 4]
    listed = Batch(cat, cont, y, lists={"h": (torch.arange(3), torch.tensor([0] * 10 + [3]))})
    assert split_batch(listed, 4) == [listed]  # ragged list values are not sliced


@pytest.mark.parametrize("batch", [128, 1024])  # 1024: above the reference batch, CowClip and L2 apply
def test_micro_batches_give_the_whole_batch_step(tmp_path, batch):
    cat, cont, y = _data(2048)
    states = []
    for micro in (0, batch // 3 + 7):  # uneven slices, the last one short
        m = _dlrm()
        t = Trainer(m, out_dir=str(tmp_path / f"m{micro}"), verbose=False, progress=False, tensorboard=False,
                    optimizer="adam", epochs=2, batch_size=batch, micro_batch=micro, checkpoint_every=0)
        out = t.fit(TensorLoader(cat, cont, y, batch, seed=1))
        assert t._micro == micro
        states.append((m.state_dict(), out))
    (a, out_a), (b, out_b) = states
    assert out_a["steps"] == out_b["steps"]
    for k in a:
        assert torch.allclose(a[k], b[k], atol=2e-5, rtol=1e-4), k
    assert not torch.equal(a["over_arch.model.0.weight"], _dlrm().state_dict()["over_arch.model.0.weight"])


def test_fit_flag_rejects_negative():
    from ctrflow.train.fit_args import UsageError, parse_args

    with pytest.raises(UsageError, match="--micro-batch must be >= 0"):
        parse_args(["--data", "x", "--micro-batch", "-1"])
    assert parse_args(["--data", "x"]).micro_batch is None  # automatic


def test_sparse_gradients_joined_once_equal_the_whole_batch_gradient():
    # Autograd adds each slice's sparse gradient into param.grad (O(slices^2) copies, and it merges some
    # duplicate lookups on the way, so CowClip's lookup counts came out lower than the whole batch's).
    # SparseGradients joins the slices once: like the whole batch's, one entry per lookup.
    torch.manual_seed(0)
    emb = torch.nn.Embedding(50, 4, sparse=True)
    dense = torch.nn.Linear(4, 1)
    ids = torch.randint(0, 50, (5, 12))
    dense(emb(ids.reshape(-1))).sum().backward()  # the whole batch at once
    ref_emb, ref_dense = emb.weight.grad, dense.weight.grad.clone()
    emb.zero_grad(set_to_none=True), dense.zero_grad(set_to_none=True)
    dense(emb(ids[0])).sum().backward()  # a gradient already there (gradient accumulation over batches)
    gather = SparseGradients(list(emb.parameters()) + list(dense.parameters()))
    for i in range(1, 5):
        dense(emb(ids[i])).sum().backward()
        gather.take()
        assert emb.weight.grad is None and dense.weight.grad is not None  # only sparse grads move aside
    gather.join()
    got = emb.weight.grad
    assert got.is_sparse and got._nnz() == ref_emb._nnz() == ids.numel()
    counts = [torch.bincount(g._indices()[0], minlength=50) for g in (got, ref_emb)]  # CowClip's lookup counts
    assert torch.equal(*counts) and counts[0].max() > 1
    torch.testing.assert_close(got.coalesce().to_dense(), ref_emb.coalesce().to_dense())
    torch.testing.assert_close(dense.weight.grad, ref_dense)
