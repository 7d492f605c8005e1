"""The large-batch rule (ctrflow.train.scaling), CowClip and row L2 in the row-sparse optimizers, the
too-few-steps guard, and a large-batch run that stays finite."""

from __future__ import annotations

import math

import pytest
import torch

from ctrflow.train.clip import clip_dense_gradients
from ctrflow.train.config import EMBEDDING_LR, LR, TrainConfig
from ctrflow.train.optim import LazyAdam, RowWiseAdagrad, SparseSGD, set_step_rows
from ctrflow.train.scaling import (
    FULL_RULE_STEPS,
    GRAD_CLIP,
    NO_RULE_STEPS,
    BatchScaling,
    batch_scaling,
    clip_floor,
    embedding_l2,
    row_warmup_factor,
    step_strength,
)


@pytest.mark.parametrize("batch", [1, 128, 512])
def test_the_rule_is_the_identity_up_to_the_reference(batch):
    s = batch_scaling(batch)
    assert (s.k, s.lr_factor, s.embedding_lr_factor, s.embedding_l2, s.clip_ratio, s.warmup_share, s.grad_clip) == (
        1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0)


@pytest.mark.parametrize("batch, k", [(1024, 2), (8192, 16), (65536, 128), (400_000, 400_000 / 512)])
def test_the_rule_scales_like_cowclip(batch, k):
    s = batch_scaling(batch)
    kk = min(k, 128)  # held beyond the 128x CowClip verified (400000 uses 65536's values)
    assert s.k == pytest.approx(k)
    boost = 1.0 if kk <= 16 else 2 ** (math.log2(kk / 16) / 3)  # x2 at 128x, with the gradient clip
    assert s.lr_factor == pytest.approx(math.sqrt(kk) * boost)  # dense lr: square root (boosted when clipped)
    assert s.embedding_lr_factor == 1.0  # embedding lr: unchanged
    # L2: CowClip's linear 5e-6 x k at 128x and beyond, ramping in from 0 at 16x (batch 8192)
    assert s.embedding_l2 == pytest.approx(0.0 if kk <= 16 else 5e-6 * 128 * (kk - 16) / 112)
    assert s.clip_ratio == 1.0
    assert 0.05 < s.warmup_share <= 0.25
    assert s.grad_clip == (GRAD_CLIP if kk > 16 else 0.0)  # the MLPs' gradient: clipped in the few-step regime only


def test_the_embedding_l2_ramps_in_continuously_and_reaches_cowclips_value():
    ks = [1, 2, 8, 16, 16.5, 17, 32, 64, 100, 127.9, 128, 200, 781.25, 10**6]
    l2 = [embedding_l2(min(k, 128)) for k in ks]
    assert l2[:4] == [0.0] * 4 and all(a <= b for a, b in zip(l2, l2[1:], strict=False))  # none up to 16x, then up
    assert l2[4] < 1e-5 and l2[-1] == l2[10] == pytest.approx(5e-6 * 128)  # continuous at 16x, held from 128x
    assert batch_scaling(1024).embedding_l2 == 0.0  # at 1024 CowClip's 1e-5 cost 0.0014 AUC (bench/RESULTS.md)


def test_the_rule_grows_with_the_batch_and_rejects_nonsense():
    shares = [batch_scaling(b).warmup_share for b in (1024, 8192, 65536, 400_000, 10**8)]
    assert shares == sorted(shares) and shares[-1] == shares[2] <= 0.25  # held from 128x on
    with pytest.raises(ValueError):
        batch_scaling(0)


def test_train_config_applies_the_rule_to_defaults_only():
    big = TrainConfig(batch_size=65536)
    assert big.lr == pytest.approx(LR["adam"] * 2 * math.sqrt(128)) and big.embedding_lr == EMBEDDING_LR["adam"]
    assert big.embedding_l2 == pytest.approx(5e-6 * 128) and big.embedding_clip == 1.0 and big.warmup_steps > 0.05
    assert big.grad_clip == GRAD_CLIP
    assert TrainConfig(batch_size=65536, lr=0.002).lr == 0.002  # an explicit value is kept
    assert TrainConfig(batch_size=65536, grad_clip=0).grad_clip == 0
    off = TrainConfig(batch_size=65536, batch_scaling=False)
    assert (off.lr, off.embedding_l2, off.embedding_clip, off.warmup_steps, off.grad_clip) == (
        LR["adam"], 0.0, 0.0, 0.05, 0.0)
    # rows per step count accumulation and ranks
    assert TrainConfig(batch_size=256, grad_accum=4, world_size=2).rows_per_step == 2048
    base = TrainConfig()
    assert (base.lr, base.embedding_l2, base.embedding_clip, base.warmup_steps, base.grad_clip) == (
        LR["adam"], 0.0, 0.0, 0.05, 0.0)


def test_a_long_run_takes_less_of_the_rule_and_none_from_no_rule_steps():
    assert step_strength(None) == step_strength(1) == step_strength(FULL_RULE_STEPS) == 1.0
    assert step_strength(NO_RULE_STEPS) == step_strength(10**7) == 0.0
    between = [step_strength(s) for s in range(FULL_RULE_STEPS, NO_RULE_STEPS + 1, 7)]
    assert all(a > b for a, b in zip(between, between[1:], strict=False))  # strictly falling in between
    assert step_strength(300) == pytest.approx(0.5)  # linear in log steps: the geometric middle is half
    # A long run at a large batch gets exactly the batch-512 defaults; a short one the rule in full.
    assert batch_scaling(65536, steps=NO_RULE_STEPS) == BatchScaling(128.0, 1.0, 1.0, 0.0, 0.0, 0.0, strength=0.0)
    assert batch_scaling(400_000, steps=102) == batch_scaling(400_000)  # 102 steps: all of it
    full = batch_scaling(65536)
    # Half the rule at 300 steps: the factors of sqrt(128) x, so no MLP clip, no boost and no L2 (those start at 16x).
    half = batch_scaling(65536, steps=300)
    assert half.lr_factor == pytest.approx(128**0.25) and half.embedding_l2 == 0.0 and half.grad_clip == 0.0
    assert half.clip_ratio == 1.0 and 0.05 < half.warmup_share < full.warmup_share
    # Continuous in the run's length: the dense lr factor moves little between neighbouring step counts.
    lrs = [batch_scaling(65536, steps=s).lr_factor for s in range(100, 700)]
    assert max(a / b for a, b in zip(lrs, lrs[1:], strict=False)) < 1.03 and lrs[0] > 20 and lrs[-1] == 1.0


def test_train_config_fades_the_rule_with_the_runs_steps():
    long = TrainConfig(batch_size=65536, run_steps=618)
    assert (long.lr, long.embedding_l2, long.embedding_clip, long.warmup_steps, long.grad_clip) == (
        LR["adam"], 0.0, 0.0, 0.05, 0.0)
    short, unknown = TrainConfig(batch_size=65536, run_steps=110), TrainConfig(batch_size=65536)
    assert (short.lr, short.embedding_l2, short.grad_clip) == (unknown.lr, unknown.embedding_l2, unknown.grad_clip)
    assert TrainConfig(batch_size=65536, run_steps=618, lr=0.01).lr == 0.01  # explicit values still win
    with pytest.raises(ValueError, match="run_steps"):
        TrainConfig(run_steps=0)


def _dense_cowclip(w, ids, grads, r, floor, l2, rows=1):
    """Reference: per-row summed gradient + 2*l2*w, clipped to r * count / rows * max(||w||, floor), by loops
    (``grads``: per-lookup gradients of a loss averaged over ``rows`` rows)."""
    out = torch.zeros_like(w)
    for j in torch.unique(ids).tolist():
        g = grads[ids == j].sum(0) + 2 * l2 * w[j]
        limit = r * int((ids == j).sum()) / rows * max(float(w[j].norm()), floor)
        out[j] = g * min(1.0, limit / max(float(g.norm()), 1e-30))
    return out


@pytest.mark.parametrize("l2", [0.0, 0.01])
@pytest.mark.parametrize("rows", [1, 300])  # a summed loss (CowClip's units), a mean over 300 rows
def test_cowclip_equals_a_dense_reference(l2, rows):
    torch.manual_seed(0)
    w0 = torch.randn(50, 4) * torch.linspace(1e-4, 1.0, 50)[:, None]  # from tiny rows (clipped) to large
    ids = torch.randint(0, 50, (300,))
    ids[:40] = 7  # one frequent id
    grads = torch.randn(300, 4) * 3 / rows  # a mean loss: each lookup's gradient is 1/rows of a per-row one
    r, floor = 1.0, clip_floor(4)
    want = w0 - 0.1 * _dense_cowclip(w0, ids, grads, r, floor, l2 / rows, rows)
    w = torch.nn.Parameter(w0.clone())
    w.grad = torch.sparse_coo_tensor(ids[None], grads, w.shape, check_invariants=True)
    opt = SparseSGD([w], lr=0.1, clip=r, clip_floor=floor, l2=l2 / rows)
    set_step_rows([opt], rows)
    opt.step()
    torch.testing.assert_close(w.data, want, rtol=1e-5, atol=1e-6)
    untouched = torch.ones(50, dtype=torch.bool)
    untouched[ids] = False
    assert torch.equal(w.data[untouched], w0[untouched])  # O(rows touched): the rest never moves
    # The scale matters: some rows are clipped, some not, and counts / 1 (the old limit) would clip fewer.
    g = torch.stack([grads[ids == j].sum(0) + 2 * l2 / rows * w0[j] for j in range(50)]).norm(dim=1)
    cnt = torch.bincount(ids, minlength=50)
    lim = cnt * w0.norm(dim=1).clamp(min=floor)
    assert bool(((g > lim / rows) & (cnt > 0)).any()) and bool(((g <= lim / rows) & (cnt > 0)).any())
    if rows > 1:
        assert int((g > lim / rows).sum()) > int((g > lim).sum())


def test_clip_zero_is_a_no_op_and_set_step_rows_reaches_the_row_optimizers():
    torch.manual_seed(2)
    w0 = torch.randn(20, 4) * 1e-3
    ids = torch.randint(0, 20, (64,))
    grads = torch.randn(64, 4)
    w, ref = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    w.grad = torch.sparse_coo_tensor(ids[None], grads, w.shape, check_invariants=True)
    ref.grad = w.grad.clone()
    opt = LazyAdam([w], lr=0.01, clip=0.0, clip_floor=clip_floor(4))
    dense = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    set_step_rows([opt, dense], 65536)
    assert opt.param_groups[0]["clip_rows"] == 65536 and "clip_rows" not in dense.param_groups[0]
    opt.step()
    LazyAdam([ref], lr=0.01).step()
    assert torch.equal(w.data, ref.data)
    with pytest.raises(ValueError):
        set_step_rows([opt], 0)


@pytest.mark.parametrize("opt", [LazyAdam, RowWiseAdagrad])
def test_adaptive_optimizers_see_the_clipped_gradient(opt):
    torch.manual_seed(1)
    w0 = torch.randn(30, 4) * 0.01
    ids = torch.randint(0, 30, (100,))
    grads = torch.randn(100, 4) / 100
    ref = torch.nn.Parameter(w0.clone())  # the same optimizer on the reference's clipped dense-row gradient
    ref.grad = _dense_cowclip(w0, ids, grads, 1.0, clip_floor(4), 0.0, rows=100)
    rows = torch.unique(ids)
    ref.grad = torch.sparse_coo_tensor(rows[None], ref.grad[rows], w0.shape, check_invariants=True).coalesce()
    w = torch.nn.Parameter(w0.clone())
    w.grad = torch.sparse_coo_tensor(ids[None], grads, w.shape, check_invariants=True)
    opt([w], lr=0.01, clip=1.0, clip_floor=clip_floor(4), clip_rows=100).step()
    opt([ref], lr=0.01).step()
    torch.testing.assert_close(w.data, ref.data, rtol=1e-5, atol=1e-7)


def test_guard_names_the_numbers_and_the_ways_out(tmp_path, capsys):
    from test_fit import FAST, _write

    from ctrflow.train.fit import main

    d = _write(tmp_path / "d", rows=(640, 256))
    assert main(["--data", str(d), "--out", str(tmp_path / "r"), "--no-loader-bench", *FAST]) == 0  # 5 steps
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if x.startswith("warning:"))
    assert "5 optimizer steps (640 training rows, --batch-size 128, --epochs 1)" in line
    assert "--epochs" in line and "smaller --batch-size" in line


def test_a_large_batch_run_on_small_data_stays_finite(tmp_path, capsys):
    from test_fit import FAST, _write

    from ctrflow.train.fit import main

    d = _write(tmp_path / "d", rows=(8192, 512))
    argv = ["--data", str(d), "--out", str(tmp_path / "r"), "--no-loader-bench", *FAST, "--batch-size", "4096",
            "--epochs", "3"]
    assert main(argv) == 0
    out = capsys.readouterr()
    assert "batch scaling: 4,096 rows per step = 8.0x batch 512" in out.err
    auc = float(out.out.split("validation AUC ")[1].split()[0])
    assert math.isfinite(auc) and auc > 0.5


@pytest.mark.parametrize("bad", [{"epochs": 0}, {"grad_accum": 0}, {"batch_size": 0}, {"patience": 0},
                                 {"max_steps": 0}, {"stop_after": 0}, {"select": "f1"}, {"task": "multiclass"},
                                 {"grad_clip": -1.0}, {"embedding_row_warmup": -1.0},
                                 {"embedding_row_warmup": 8.0, "optimizer": "adagrad"}])
def test_train_config_refuses_nonsense(bad):
    with pytest.raises(ValueError):
        TrainConfig(**bad)


@pytest.mark.parametrize("max_norm", [1e-3, 1e3])
def test_dense_clipping_matches_a_reference_and_leaves_sparse_gradients_alone(max_norm):
    torch.manual_seed(0)
    emb, lin = torch.nn.Embedding(10, 4, sparse=True), torch.nn.Linear(4, 3)
    loss = lin(emb(torch.tensor([1, 2, 2, 7]))).square().sum()
    loss.backward()
    dense = [lin.weight.grad.clone(), lin.bias.grad.clone()]
    sparse = emb.weight.grad.coalesce().values().clone()
    norm = torch.sqrt(sum(g.square().sum() for g in dense))
    got = clip_dense_gradients([emb.weight, lin.weight, lin.bias, torch.nn.Parameter(torch.ones(2))], max_norm)
    assert float(got) == pytest.approx(float(norm), rel=1e-6)  # the norm before clipping, dense grads only
    scale = min(1.0, max_norm / float(norm))
    for g, ref in zip((lin.weight.grad, lin.bias.grad), dense, strict=True):
        assert torch.allclose(g, ref * scale, rtol=1e-5, atol=1e-12)
    assert torch.equal(emb.weight.grad.coalesce().values(), sparse)  # CowClip's business, not this clip's
    assert clip_dense_gradients([emb.weight], 1.0) is None


def test_the_trainer_clips_the_dense_step():
    from ctrflow.loader.tensors import TensorLoader
    from ctrflow.train.trainer import Trainer

    torch.manual_seed(0)
    cat, x = torch.randint(0, 5, (64, 1)), torch.randn(64, 2) * 100  # large inputs: a large gradient
    y = (x[:, 0] > 0).float()

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.lin = torch.nn.Embedding(5, 1, sparse=True), torch.nn.Linear(2, 1)

        def forward(self, c, v):
            return self.lin(v) + self.emb(c).sum(1)

    def dense_step(clip):
        torch.manual_seed(1)
        m = Model()
        before = [p.detach().clone() for p in m.lin.parameters()]
        Trainer(m, optimizer="sgd", lr=1.0, decay="none", warmup_steps=0, grad_clip=clip, verbose=False,
                progress=False, tensorboard=False, plot=False, select="none", device="cpu",
                max_steps=1).fit(TensorLoader(cat, x, y, batch_size=64, shuffle=False))
        return torch.sqrt(sum((p.detach() - b).square().sum() for p, b in zip(m.lin.parameters(), before,
                                                                               strict=True)))

    assert float(dense_step(0.0)) > 1.0  # SGD, lr 1: the step is the gradient, far above the limit
    assert float(dense_step(0.25)) == pytest.approx(0.25, rel=1e-4)


@pytest.mark.parametrize("steps, says", [
    (100, "lr 0.02263, embedding lr 0.05"), (300, "(50% of the rule: it fades out by 600 steps)"),
    (700, "no scaling, the batch-512 defaults")])
def test_fit_says_how_much_of_the_rule_a_run_gets(steps, says, capsys):
    from ctrflow.train.fit import _say_scaling

    _say_scaling(TrainConfig(batch_size=65536, run_steps=steps))
    line = capsys.readouterr().err.strip()
    assert line.startswith(f"batch scaling: 65,536 rows per step = 128.0x batch 512, {steps:,} steps")
    assert len(line.splitlines()) == 1 and says in line


def test_the_row_warmup_fades_as_the_rule_comes_in():
    ks = [1, 2, 16, 64, 128, 781]
    f = [row_warmup_factor(min(k, 128)) for k in ks]
    assert f[0] == 1.0 and f[-1] == f[-2] == 0.0 and all(a > b for a, b in zip(f[:-1], f[1:-1], strict=False))
    assert row_warmup_factor(16) == pytest.approx(3 / 7)  # linear in log k: 16x is 4/7 of the way to 128x
    # TrainConfig: the lazy Adam tables' default follows the rule; an explicit value and other optimizers stay.
    assert TrainConfig(batch_size=400_000, run_steps=102).embedding_row_warmup == 0.0
    assert TrainConfig(batch_size=65536, run_steps=618).embedding_row_warmup == TrainConfig().embedding_row_warmup == 16
    assert TrainConfig(batch_size=400_000, run_steps=102, embedding_row_warmup=4.0).embedding_row_warmup == 4.0
    assert TrainConfig(batch_size=4096, optimizer="adagrad").embedding_row_warmup == 0.0
