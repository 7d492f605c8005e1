"""DCN-v2 (models/dcn.py): the cross layer's formula, shapes, the CTRModel contract, training, fit.py."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from ctrflow.etl.schema import ColumnSchema, Schema
from ctrflow.models import DCNv2
from ctrflow.models.dcn import CrossLayer, CrossNet
from ctrflow.models.protocol import MODELS, CTRModel
from ctrflow.train import TensorLoader, Trainer

CARDS = [6, 9, 4]


def _schema() -> Schema:
    cols = [ColumnSchema(f"C{i}", "categorical", "int32", cardinality=c, embedding_dim=d)
            for i, (c, d) in enumerate(zip(CARDS, [8, 32, 4], strict=True))]
    cols += [ColumnSchema(f"I{j}", "continuous", "float32") for j in range(2)]
    return Schema([*cols, ColumnSchema("label", "label", "float32")], {})


def _batch(n: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randint(0, c, (n,), generator=g) for c in CARDS], 1), torch.randn(n, 2, generator=g)


def test_cross_layer_is_its_formula_by_hand():
    # x_{l+1} = x0 * (W x_l + b) + x_l on d = 3, numbers small enough to check on paper.
    layer = CrossLayer(3)
    w = np.array([[1.0, 0.0, 2.0], [0.0, -1.0, 0.0], [0.5, 0.5, 0.5]])
    b = np.array([0.1, 0.0, -1.0])
    with torch.no_grad():
        layer.project.weight.copy_(torch.tensor(w))
        layer.project.bias.copy_(torch.tensor(b))
    x0 = np.array([[1.0, 2.0, 3.0]])
    x = np.array([[0.0, 1.0, -1.0]])
    # W x = [-2, -1, 0]; + b = [-1.9, -1, -1]; * x0 = [-1.9, -2, -3]; + x = [-1.9, -1, -4]
    expect = x0 * (x @ w.T + b) + x
    np.testing.assert_allclose(expect, [[-1.9, -1.0, -4.0]])
    out = layer(torch.tensor(x0, dtype=torch.float32), torch.tensor(x, dtype=torch.float32))
    np.testing.assert_allclose(out.detach().numpy(), expect, rtol=1e-6)


def test_low_rank_cross_layer_uses_u_v_transpose():
    d, r = 5, 2
    layer = CrossLayer(d, rank=r)
    u = layer.project.up.weight.detach().numpy()  # U [d, r]
    vt = layer.project.down.weight.detach().numpy()  # V^T [r, d]
    assert u.shape == (d, r) and vt.shape == (r, d)
    b = np.linspace(-1, 1, d)
    with torch.no_grad():
        layer.project.up.bias.copy_(torch.tensor(b))
    g = np.random.default_rng(0)
    x0, x = g.standard_normal((4, d)), g.standard_normal((4, d))
    expect = x0 * (x @ (u @ vt).T + b) + x
    out = layer(torch.tensor(x0, dtype=torch.float32), torch.tensor(x, dtype=torch.float32)).detach().numpy()
    np.testing.assert_allclose(out, expect, rtol=1e-5, atol=1e-5)
    assert sum(p.numel() for p in layer.parameters()) == 2 * d * r + d < d * d + d


def test_cross_net_stacks_layers_on_x0():
    torch.manual_seed(0)
    net = CrossNet(4, num_layers=2)
    x0 = torch.randn(3, 4)
    a, b = net.layers
    torch.testing.assert_close(net(x0), b(x0, a(x0, x0)))
    assert torch.equal(CrossNet(4, 0)(x0), x0)
    fresh = CrossLayer(6)  # torchrec's init: Xavier-normal weight, zero bias
    assert torch.equal(fresh.project.bias, torch.zeros(6)) and fresh.project.weight.std() > 0


@pytest.mark.parametrize("kw", [{}, {"rank": 2}, {"structure": "parallel"}, {"cross_layers": 0},
                                {"deep_layers": []}, {"dropout": 0.2}])
def test_shapes_and_gradients(kw):
    torch.manual_seed(0)
    m = DCNv2([(c, d) for c, d in zip(CARDS, [3, 4, 3], strict=True)], 2, **{"deep_layers": [8, 4], **kw})
    assert m.in_features == 3 + 4 + 3 + 2
    cat, cont = _batch()
    out = m(cat, cont)
    assert out.shape == (5, 1)
    out.sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None, name
    assert all(g.weight.grad.is_sparse for g in m.embeds.groups)  # the fused sparse tables of the other models


def test_config_errors_quote_numbers():
    with pytest.raises(ValueError, match="rank must be >= 1"):
        DCNv2([(5, 2)], 1, rank=0)
    with pytest.raises(ValueError, match=r"got 1, -1, \[8\]"):
        DCNv2([(5, 2)], 1, cross_layers=-1, deep_layers=[8])
    with pytest.raises(ValueError, match="structure"):
        DCNv2([(5, 2)], 1, structure="sideways")
    with pytest.raises(ValueError, match="dropout"):
        DCNv2([(5, 2)], 1, dropout=1.0)
    with pytest.raises(ValueError, match="at least one"):
        DCNv2([], 0)


def test_implements_the_protocol_and_rebuilds_from_its_config():
    assert MODELS["dcn"] is DCNv2
    torch.manual_seed(0)
    m = DCNv2.from_options(_schema(), layers=[8], bottom_layers=[99], embedding_dim=8, dropout=0.1).eval()
    assert isinstance(m, CTRModel) and not m.takes_lists
    assert m.config["emb_szs"] == [(6, 8), (9, 8), (4, 4)]  # embedding_dim caps the schema's dims (as tabular)
    assert m.config["deep_layers"] == [8] and m.config["dropout"] == 0.1  # bottom_layers: no bottom MLP
    again = DCNv2(**json.loads(json.dumps(m.config))).eval()
    assert [(k, v.shape) for k, v in again.state_dict().items()] == [(k, v.shape) for k, v in m.state_dict().items()]
    again.load_state_dict(m.state_dict())
    cat, cont = _batch()
    torch.testing.assert_close(again(cat, cont), m(cat, cont))
    m.check_input(cat, cont)
    with pytest.raises(ValueError, match="categorical feature 1: ids span"):
        m.check_input(cat + torch.tensor([0, 9, 0]), cont)
    with pytest.raises(ValueError, match="continuous columns"):
        m.check_input(cat, cont[:, :1])
    one = DCNv2.from_schema(_schema(), embedding_dim=5, rank=3)
    assert {d for _, d in one.config["emb_szs"]} == {5} and one.config["rank"] == 3


def test_per_feature_options_and_list_features():
    from test_features import SHARED, schema

    torch.manual_seed(0)
    m = DCNv2.from_schema(schema(), deep_layers=[8], features=SHARED)
    assert m.takes_lists and m.embedding_part is m.features
    assert m.in_features == 8 + 16 + 8 + 1  # item_id, user, pooled hist_items (shared table), x
    cat = torch.tensor([[5, 4], [6, 4]], dtype=torch.int32)
    lists = {"hist_items": (torch.tensor([7, 7, 9]), torch.tensor([0, 2, 3]))}
    assert m(cat, torch.ones(2, 1), lists=lists).shape == (2, 1)
    again = DCNv2(**json.loads(json.dumps(m.config)))
    again.load_state_dict(m.state_dict())


def _toy(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clicks driven by a cross of two categoricals (an XOR of their parities) and one continuous input."""
    g = torch.Generator().manual_seed(seed)
    cat = torch.stack([torch.randint(0, c, (n,), generator=g) for c in CARDS], 1)
    cont = torch.randn(n, 2, generator=g)
    cross = ((cat[:, 0] % 2) ^ (cat[:, 1] % 2)).float()
    logit = 3.0 * (cross - 0.5) + 1.5 * cont[:, 0]
    return cat, cont, (torch.rand(n, generator=g) < torch.sigmoid(logit)).float()


@pytest.mark.parametrize("rank", [None, 2])
def test_trains_on_a_learnable_toy(rank):
    torch.manual_seed(0)
    train = TensorLoader(*_toy(2048, 0), batch_size=128, seed=0)
    valid = TensorLoader(*_toy(1024, 1), batch_size=512, shuffle=False)
    model = DCNv2([(c, 4) for c in CARDS], 2, rank=rank, deep_layers=[16])
    t = Trainer(model, verbose=False, progress=False, tensorboard=False, plot=False,
                optimizer="adam", lr=0.01, embedding_lr=0.05, epochs=4)
    before = t.evaluate(valid)
    out = t.fit(train, valid)
    assert out["valid"]["auc"] > 0.7 > before["auc"]


def test_fit_dcn_end_to_end(tmp_path, capsys):
    from test_fit import FAST, _write

    from ctrflow.serve.predictor import model_from_checkpoint
    from ctrflow.train.checkpoint import latest_checkpoint, load_checkpoint
    from ctrflow.train.fit import main

    data, out = _write(tmp_path / "data"), tmp_path / "run"
    assert main(["--data", str(data), "--model", "dcn", "--out", str(out), "--epochs", "2", "--optimizer", "adam",
                 "--lr", "0.01", "--no-loader-bench", *FAST]) == 0
    assert "validation AUC" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == "dcn" and summary["valid"]["auc"] > 0.7
    saved = json.loads((out / "config.json").read_text())
    assert saved["model"]["deep_layers"] == [16] and {d for _, d in saved["model"]["emb_szs"]} == {4}
    state = load_checkpoint(latest_checkpoint(os.fspath(out / "checkpoints")))
    served = model_from_checkpoint(state)  # the server rebuilds it from the checkpoint's config
    assert isinstance(served, DCNv2) and served.config == DCNv2(**saved["model"]).config
