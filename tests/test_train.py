"""Trainer: overfits a tiny dataset, resumes exactly, stops on NaN, honours a model's own hooks."""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

from ctrflow.models import DLRM, TabularModel
from ctrflow.train import CheckpointError, TensorLoader, Trainer, TrainingError, latest_checkpoint
from ctrflow.train.checkpoint import list_checkpoints

CARDS = [6, 9, 4]


def _data(n: int = 512, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    cat = torch.stack([torch.randint(0, c, (n,), generator=g) for c in CARDS], 1)
    cont = torch.randn(n, 2, generator=g)
    logit = (cat[:, 0] % 2 * 3 - 1.5) + 2 * cont[:, 0] + (cat[:, 1] > 4) * 1.5
    label = (torch.rand(n, generator=g) < torch.sigmoid(logit)).float()
    return cat, cont, label


def _tabular(seed: int = 0):
    torch.manual_seed(seed)
    return TabularModel([(c, 4) for c in CARDS], n_cont=2, out_sz=1, layers=[16], ps=0.1, embed_p=0.1)


def _dlrm(seed: int = 0):
    torch.manual_seed(seed)
    return DLRM(CARDS, 2, embedding_dim=4, dense_arch_layer_sizes=[8, 4], over_arch_layer_sizes=[8, 1])


def _quiet(**kw):
    return {"verbose": False, "progress": False, "tensorboard": False, **kw}


def test_trainer_overfits_tiny_dataset(tmp_path):
    cat, cont, y = _data(256)
    train = TensorLoader(cat, cont, y, batch_size=32, seed=0)
    valid = TensorLoader(cat, cont, y, batch_size=100, shuffle=False)
    m = _dlrm()
    t = Trainer(m, out_dir=str(tmp_path), **_quiet(optimizer="adam", lr=0.01, epochs=30, decay="none"))
    before = t.evaluate(valid)
    out = t.fit(train, valid)
    assert out["valid"]["auc"] > 0.95 > before["auc"]
    assert out["valid"]["logloss"] < before["logloss"]
    assert out["steps"] == 30 * 8 and out["epochs"] == 30
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert {r["kind"] for r in records} == {"train", "valid"}
    first = next(r for r in records if r["kind"] == "train")
    assert all(k in first for k in ("loss", "rows_per_s", "ms_per_step", "lr"))
    png = (tmp_path / "curve.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000
    assert len(list_checkpoints(str(tmp_path / "checkpoints"))) == 3  # keep-last-N


class _Crash(Exception):
    pass


class _CrashingLoader(TensorLoader):
    """Raises after ``at`` batches in total, like a killed process."""

    def __init__(self, *a, at: int, **kw):
        super().__init__(*a, **kw)
        self.at, self.seen = at, 0

    def __iter__(self):
        for b in super().__iter__():
            self.seen += 1
            if self.seen > self.at:
                raise _Crash
            yield b


@pytest.mark.parametrize("make,opt,accum", [(_tabular, "adam", 1), (_dlrm, "adagrad", 2)])
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, make, opt, accum):
    cat, cont, y = _data(200)
    cfg = _quiet(optimizer=opt, lr=0.05, epochs=3, grad_accum=accum, checkpoint_every=2, warmup_steps=3,
                 plot=False)
    full = make()
    Trainer(full, out_dir=str(tmp_path / "full"), **cfg).fit(TensorLoader(cat, cont, y, 16, seed=1))

    crashed = make()
    with pytest.raises(_Crash):
        Trainer(crashed, out_dir=str(tmp_path / "b"), **cfg).fit(_CrashingLoader(cat, cont, y, 16, seed=1, at=23))
    ckpt = torch.load(latest_checkpoint(str(tmp_path / "b" / "checkpoints")), weights_only=False)
    assert ckpt["epoch"] == 1 and ckpt["batch_in_epoch"] > 0  # stopped mid-epoch

    resumed = make(seed=123)  # different init: everything must come from the checkpoint
    t = Trainer(resumed, out_dir=str(tmp_path / "b"), **cfg)
    out = t.fit(TensorLoader(cat, cont, y, 16, seed=1), resume=True)
    assert out["resumed_from"].endswith(f"ckpt-{ckpt['step']:08d}.pt")
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_resume_skips_consumed_batches_without_skip_support(tmp_path):
    """A loader with set_epoch but no skip(): the consumed batches are read and dropped."""
    cat, cont, y = _data(160)

    class NoSkip(TensorLoader):
        skip = property()  # hasattr(loader, "skip") is False

    cfg = _quiet(optimizer="sgd", lr=0.1, epochs=2, checkpoint_every=3, plot=False, decay="none")
    full = _tabular()
    Trainer(full, out_dir=str(tmp_path / "a"), **cfg).fit(NoSkip(cat, cont, y, 16, seed=2))
    with pytest.raises(_Crash):
        Trainer(_tabular(), out_dir=str(tmp_path / "b"), **cfg).fit(_CrashingLoader(cat, cont, y, 16, seed=2, at=14))
    resumed = _tabular(seed=9)
    Trainer(resumed, out_dir=str(tmp_path / "b"), **cfg).fit(NoSkip(cat, cont, y, 16, seed=2), resume=True)
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_nan_loss_stops_naming_step_and_checkpoint(tmp_path):
    cat, cont, y = _data(128)
    cont = cont.clone()
    cont[100:, 0] = float("nan")  # rows seen late in the (unshuffled) epoch
    train = TensorLoader(cat, cont, y, batch_size=16, shuffle=False)
    t = Trainer(_dlrm(), out_dir=str(tmp_path), **_quiet(lr=0.01, checkpoint_every=2, plot=False))
    with pytest.raises(TrainingError, match=r"loss is nan at step 7 .*last good checkpoint: .*ckpt-00000006\.pt"):
        t.fit(train)


def test_incompatible_checkpoint_is_refused(tmp_path):
    cat, cont, y = _data(64)
    Trainer(_dlrm(), out_dir=str(tmp_path), **_quiet(max_steps=2, plot=False)).fit(TensorLoader(cat, cont, y, 16))
    bigger = DLRM([6, 9, 5], 2, embedding_dim=4, dense_arch_layer_sizes=[8, 4], over_arch_layer_sizes=[8, 1])
    msg = r"sparse_arch.embedding.weight is \[19, 4\] in the checkpoint, \[20, 4\]"
    with pytest.raises(CheckpointError, match=msg):
        Trainer(bigger, out_dir=str(tmp_path), **_quiet()).resume(True)
    with pytest.raises(CheckpointError, match="holds a DLRM, not a TabularModel"):
        Trainer(_tabular(), out_dir=str(tmp_path), **_quiet()).resume(True)
    bad = tmp_path / "checkpoints" / "ckpt-00000099.pt"
    bad.write_bytes(b"not a checkpoint")  # the newest is corrupt: the newest readable one is used instead
    assert Trainer(_dlrm(), out_dir=str(tmp_path), **_quiet()).resume(True).endswith("ckpt-00000002.pt")
    for good in (tmp_path / "checkpoints").glob("ckpt-0000000*.pt"):
        good.write_bytes(b"also corrupt")
    with pytest.raises(CheckpointError, match="no readable checkpoint .*cannot read checkpoint"):
        Trainer(_dlrm(), out_dir=str(tmp_path), **_quiet()).resume(True)


def test_gradient_accumulation_equals_a_big_batch():
    cat, cont, y = _data(64)
    a, b = nn.Linear(2, 1), nn.Linear(2, 1)
    b.load_state_dict(a.state_dict())
    cfg = _quiet(optimizer="sgd", lr=0.5, decay="none", plot=False)
    Trainer(a, **cfg, grad_accum=4).fit([(cont[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)])
    Trainer(b, **cfg).fit([(cont, y)])
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q)


class _HookModel(nn.Module):
    """Seed 000's contract: the model owns its steps and optimizer."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 1)
        self.calls = {"train": 0, "valid": 0}

    def forward(self, x):
        return self.lin(x).squeeze(-1)

    def training_step(self, batch):
        self.calls["train"] += 1
        return {"loss": nn.functional.binary_cross_entropy_with_logits(self(batch.continuous), batch.label)}

    def validation_step(self, batch):
        self.calls["valid"] += 1
        return {"logits": self(batch.continuous), "label": batch.label}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def test_model_hooks_replace_the_defaults():
    cat, cont, y = _data(128)
    m = _HookModel()
    t = Trainer(m, **_quiet(epochs=3, decay="none"))
    assert isinstance(t.optimizers[0], torch.optim.SGD)
    out = t.fit(TensorLoader(cat, cont, y, 32), TensorLoader(cat, cont, y, 64, shuffle=False))
    assert m.calls["train"] == 12 and m.calls["valid"] == 3 * 2
    assert out["valid"]["auc"] > 0.7


class _LightningHookModel(_HookModel):
    """Lightning's signatures: ``training_step(self, batch, batch_idx)``."""

    def __init__(self):
        super().__init__()
        self.idx = {"train": [], "valid": []}

    def training_step(self, batch, batch_idx):
        self.idx["train"].append(batch_idx)
        return super().training_step(batch)

    def validation_step(self, batch, batch_idx):
        self.idx["valid"].append(batch_idx)
        return super().validation_step(batch)


def test_lightning_hook_signatures_get_the_batch_index():
    cat, cont, y = _data(128)
    m = _LightningHookModel()
    out = Trainer(m, **_quiet(epochs=2, decay="none")).fit(TensorLoader(cat, cont, y, 32),
                                                           TensorLoader(cat, cont, y, 64, shuffle=False))
    assert m.idx["train"] == [0, 1, 2, 3] * 2 and m.idx["valid"] == [0, 1] * 2
    assert m.calls["train"] == 8 and out["valid"]["auc"] > 0.6


def test_regression_task_reports_rmse(tmp_path):
    cat, cont, _ = _data(128)
    target = 2 * cont[:, 0] + 1
    t = Trainer(_tabular(), out_dir=str(tmp_path), **_quiet(task="regression", optimizer="adam", lr=0.02, epochs=20))
    out = t.fit(TensorLoader(cat, cont, target, 32), TensorLoader(cat, cont, target, 128, shuffle=False))
    assert out["valid"]["rmse"] < 0.8 and set(out["valid"]) >= {"rmse", "mse", "loss"}
    assert os.path.exists(tmp_path / "curve.png")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_trainer_on_gpu_overfits_with_amp():
    cat, cont, y = _data(256)
    t = Trainer(_dlrm(), **_quiet(device="cuda", amp=True, optimizer="adam", lr=0.01, epochs=30, decay="none"))
    out = t.fit(TensorLoader(cat, cont, y, 32), TensorLoader(cat, cont, y, 256, shuffle=False))
    assert out["valid"]["auc"] > 0.95


def test_best_checkpoint_is_kept_restored_and_patience_stops(tmp_path):
    # Validation labels are the training labels flipped: the better the model learns, the worse its
    # validation AUC, so the first evaluation is the best one and patience 2 stops after the third.
    cat, cont, y = _data(256)
    t = Trainer(_tabular(), out_dir=str(tmp_path), **_quiet(optimizer="adam", lr=0.02, epochs=10, decay="none",
                                                           patience=2, plot=False))
    out = t.fit(TensorLoader(cat, cont, y, 32), TensorLoader(cat, cont, 1 - y, 256, shuffle=False))
    assert out["steps"] == 24 and out["stopped_early"] == 24 and out["epochs"] == 3
    aucs = [v["auc"] for v in t.history["valid"]]
    assert len(aucs) == 3 and aucs[0] == max(aucs) and aucs[-1] < aucs[0]
    assert out["best"]["step"] == 8 and out["best"]["metric"] == "auc" and out["valid"]["auc"] == aucs[0]
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    assert best["step"] == 8 and best["best"]["step"] == 8
    assert all(torch.equal(v, best["model"][k]) for k, v in t.model.state_dict().items())  # restored
    # the last checkpoint is still the run's end (for --resume), and it carries the tracker
    last = torch.load(tmp_path / "checkpoints" / "ckpt-00000024.pt", weights_only=True)
    assert last["best"] == {**best["best"], "since": 2}


def test_regression_selects_by_rmse_and_none_turns_selection_off(tmp_path):
    cat, cont, _ = _data(128)
    target = 2 * cont[:, 0] + 1
    t = Trainer(_tabular(), out_dir=str(tmp_path / "a"), **_quiet(task="regression", optimizer="adam", lr=0.02,
                                                                    epochs=4, plot=False))
    out = t.fit(TensorLoader(cat, cont, target, 32), TensorLoader(cat, cont, target, 128, shuffle=False))
    rmses = [v["rmse"] for v in t.history["valid"]]
    assert out["best"]["metric"] == "rmse" and out["best"]["value"] == min(rmses) == out["valid"]["rmse"]
    t = Trainer(_tabular(), out_dir=str(tmp_path / "b"), **_quiet(task="regression", epochs=2, select="none",
                                                                    plot=False))
    out = t.fit(TensorLoader(cat, cont, target, 32), TensorLoader(cat, cont, target, 128, shuffle=False))
    assert out["best"] is None and not (tmp_path / "b" / "best.pt").exists()
