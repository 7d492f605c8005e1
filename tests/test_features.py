"""Per-feature embedding options: shared tables, combiners, initialisers, models with list features."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ctrflow.etl.schema import ColumnSchema, Schema
from ctrflow.loader import Loader
from ctrflow.models import DLRM, TabularModel
from ctrflow.models.embedding import sparse_embedding_modules
from ctrflow.models.feature_embedding import FeatureEmbedding
from ctrflow.models.features import EmbeddingOption, FeatureConfig, init_table
from ctrflow.models.pooling import pool
from ctrflow.train.fit import main
from ctrflow.train.optim import LazyAdam, build_optimizers

ITEMS = 43  # item vocabulary (ids 3..42), shared by item_id and hist_items


def schema() -> Schema:
    return Schema([
        ColumnSchema("item_id", "categorical", "int32", cardinality=ITEMS, embedding_dim=8, vocabulary="item"),
        ColumnSchema("user", "categorical", "int32", cardinality=20, embedding_dim=16),
        ColumnSchema("x", "continuous", "float32"),
        ColumnSchema("label", "label", "float32"),
        ColumnSchema("hist_items", "list", "int32", cardinality=ITEMS, embedding_dim=8, max_length=10,
                     weights="hist_w", vocabulary="item"),
        ColumnSchema("hist_w", "other", "float32"),
        ColumnSchema("tags", "list", "int32", cardinality=9, embedding_dim=4, max_length=6),
    ], {"rows": {"train": 4096, "valid": 1024}})


def write_dataset(out, rows=(4096, 1024), seed=0):
    """A processed dataset whose clicks depend on whether the item is in the user's history."""
    rng = np.random.default_rng(seed)
    for split, n in zip(("train", "valid"), rows, strict=True):
        item = rng.integers(3, ITEMS, n)
        lengths = rng.integers(0, 11, n)
        hist = [rng.integers(3, ITEMS, k).tolist() for k in lengths]
        for i in range(n):  # half the rows hold their item in the history
            if lengths[i] and rng.random() < 0.5:
                hist[i][rng.integers(lengths[i])] = int(item[i])
        inside = np.array([int(item[i]) in hist[i] for i in range(n)])
        label = (rng.random(n) < np.where(inside, 0.8, 0.2)).astype(np.float32)
        os.makedirs(out / split, exist_ok=True)
        pq.write_table(pa.table({
            "item_id": pa.array(item, pa.int32()),
            "user": pa.array(rng.integers(3, 20, n), pa.int32()),
            "x": pa.array(rng.standard_normal(n), pa.float32()),
            "label": label,
            "hist_items": pa.array(hist, pa.list_(pa.int32())),
            "hist_w": pa.array([[1.0] * len(h) for h in hist], pa.list_(pa.float32())),
            "tags": pa.array([rng.integers(3, 9, k % 7).tolist() for k in lengths], pa.list_(pa.int32())),
        }), out / split / "part-00000.parquet", row_group_size=n)
    schema().save(out / "schema.json")
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("seq"))


SHARED = FeatureConfig({"item_id": EmbeddingOption(shared="items"),
                        "hist_items": EmbeddingOption(shared="items", combiner="mean")})


def test_options_validate_and_load(tmp_path):
    with pytest.raises(ValueError, match="combiner"):
        EmbeddingOption(combiner="max")
    with pytest.raises(ValueError, match="concat_n"):
        EmbeddingOption(combiner="concat")
    with pytest.raises(ValueError, match="unknown option"):
        FeatureConfig.from_dict({"features": {"a": {"dims": 3}}})
    toml = tmp_path / "f.toml"
    toml.write_text('exclude = ["user"]\n[defaults]\ninit = "uniform"\ninit_scale = 0.5\n'
                    '[features.item_id]\nshared = "items"\n[features.hist_items]\nshared = "items"\n'
                    'combiner = "concat"\nconcat_n = 3\n')
    cfg = FeatureConfig.load(toml)
    assert cfg.exclude == ["user"] and cfg.features["hist_items"].concat_n == 3
    js = tmp_path / "f.json"
    js.write_text(json.dumps({"features": {"item_id": {"shared": "items"}, "hist_items": {"shared": "items"}}}))
    assert FeatureConfig.load(js).features["item_id"].shared == "items"
    feats = cfg.resolve(schema(), dim=8)
    assert [f.name for f in feats.features] == ["item_id", "hist_items"]
    assert [(t.name, t.cardinality, t.dim, t.init, t.init_scale) for t in feats.tables] == [
        ("items", ITEMS, 8, "uniform", 0.5)]
    assert feats.features[1].weights == "hist_w" and feats.features[1].slots == 3
    (tmp_path / "bad.toml").write_text("[features\n")
    with pytest.raises(ValueError, match="not valid TOML"):
        FeatureConfig.load(tmp_path / "bad.toml")


def test_shared_tables_must_agree():
    with pytest.raises(ValueError, match="different dims"):
        FeatureConfig({"item_id": EmbeddingOption(shared="t", dim=4),
                       "hist_items": EmbeddingOption(shared="t", dim=8)}).resolve(schema())
    with pytest.raises(ValueError, match="different vocabularies"):
        s = schema()
        s["tags"].vocabulary = "tag"
        FeatureConfig({"item_id": EmbeddingOption(shared="t"), "tags": EmbeddingOption(shared="t")}).resolve(s, dim=8)
    with pytest.raises(ValueError, match="lacks"):
        FeatureConfig({"nope": EmbeddingOption()}).resolve(schema())


def test_shared_table_is_one_parameter_with_gradients_from_both():
    feats = SHARED.resolve(schema(), dim=8)
    emb = FeatureEmbedding(feats, sparse=True)
    weights = [p for p in emb.parameters()]
    assert len(weights) == 1  # one fused weight: the "items" table and user's own table (same dim)
    tables = emb.table_slices()
    assert set(tables) == {"items", "user"}
    module, start, rows = tables["items"]
    assert rows == ITEMS
    cat = torch.tensor([[5, 4], [6, 4]], dtype=torch.int32)  # item_id rows 5, 6; user 4
    lists = {"hist_items": (torch.tensor([7, 7, 9]), torch.tensor([0, 2, 3]))}
    blocks = emb(cat, lists)
    assert [tuple(b.shape) for b in blocks] == [(2, 2, 8), (2, 1, 8)]
    w = module.weight
    assert torch.equal(blocks[0][:, 0], w[start + torch.tensor([5, 6])])
    assert torch.allclose(blocks[1][:, 0], w[start + torch.tensor([7, 9])])  # means of [7, 7] and [9]
    (blocks[0][:, 0].sum() + blocks[1].sum()).backward()
    g = w.grad.coalesce()
    nonzero = g.values().abs().sum(dim=1) > 0  # the user lookup adds a zero-gradient row
    rows_used = sorted((g.indices()[0][nonzero] - start).tolist())
    assert rows_used == [5, 6, 7, 9]  # both features wrote into the one table
    dense = g.to_dense()[start:start + ITEMS]
    assert torch.allclose(dense[[5, 6, 7, 9]], torch.ones(4, 8))  # mean of 2 copies of row 7: 2 * 1/2


def test_combiners_against_hand_computed():
    w = torch.arange(12, dtype=torch.float32).view(6, 2)  # row r = [2r, 2r + 1]
    ids = torch.tensor([1, 2, 3, 5, 4])
    offsets = torch.tensor([0, 3, 3, 5])  # rows: [1, 2, 3], [], [5, 4]
    psw = torch.tensor([1.0, 2.0, 0.5, 3.0, 1.0])
    s = pool(w, ids, offsets, "sum")
    assert s.tolist() == [[12, 15], [0, 0], [18, 20]]
    m = pool(w, ids, offsets, "mean")
    assert m.tolist() == [[4, 5], [0, 0], [9, 10]]
    ws = pool(w, ids, offsets, "sum", psw)
    assert torch.allclose(ws, torch.tensor([[2 + 8 + 3, 3 + 10 + 3.5], [0, 0], [30 + 8, 33 + 9]]))
    wm = pool(w, ids, offsets, "mean", psw)
    assert torch.allclose(wm, ws / torch.tensor([3.5, 1.0, 4.0])[:, None])
    c = pool(w, ids, offsets, "concat", concat_n=2)
    assert c.tolist() == [[[2, 3], [4, 5]], [[0, 0], [0, 0]], [[10, 11], [8, 9]]]
    cw = pool(w, ids, offsets, "concat", psw, concat_n=2)
    assert cw[0].tolist() == [[2, 3], [8, 10]]
    shifted = pool(torch.cat([torch.zeros(3, 2), w]), ids, offsets, "sum", start=3)  # a table inside a fused weight
    assert torch.equal(shifted, s)


def test_initialisers_statistics():
    torch.manual_seed(0)
    w = torch.empty(20000, 8)
    init_table(w, "normal", 0.1)
    assert abs(w.std().item() - 0.1) < 0.005 and abs(w.mean().item()) < 0.005
    init_table(w, "truncated_normal", 0.1)
    assert w.abs().max().item() <= 0.2 + 1e-6 and 0.07 < w.std().item() < 0.1
    init_table(w, "uniform", 0.3)
    assert w.abs().max().item() <= 0.3 and abs(w.std().item() - 0.3 / 3**0.5) < 0.005
    init_table(w[:100], "uniform", None)  # torchrec's default: 1/sqrt(rows)
    assert w[:100].abs().max().item() <= 0.1
    feats = FeatureConfig({"user": EmbeddingOption(init="normal", init_scale=1.0)}).resolve(schema(), dim=8)
    emb = FeatureEmbedding(feats)
    module, start, rows = emb.table_slices()["user"]
    assert module.weight[start:start + rows].std().item() > 0.5  # its own init, not the default 0.01
    module, start, rows = emb.table_slices()["item_id"]
    assert module.weight[start:start + rows].abs().max().item() <= 0.02 + 1e-6


def test_sparse_optimizer_updates_only_used_rows_of_a_shared_table():
    feats = SHARED.resolve(schema(), dim=8)
    model = DLRM([], 1, 8, [8], [4, 1], features=feats)
    assert [type(m).__name__ for m in sparse_embedding_modules(model)] == ["FusedEmbedding"]
    opt = LazyAdam([m.weight for m in sparse_embedding_modules(model)], lr=0.1)
    module, start, _ = model.features.table_slices()["items"]
    before = module.weight.detach().clone()
    cat = torch.tensor([[5, 3], [6, 3]], dtype=torch.int32)
    lists = {"hist_items": (torch.tensor([7, 9, 9]), torch.tensor([0, 2, 3]))}
    model(cat, torch.ones(2, 1), lists=lists).sum().backward()
    opt.step()
    changed = (module.weight.detach() != before).any(dim=1).nonzero().flatten().tolist()
    user_start = model.features.table_slices()["user"][1]
    assert sorted(changed) == sorted([start + r for r in (5, 6, 7, 9)] + [user_start + 3])


def test_models_without_features_are_unchanged():
    m = DLRM([10, 20], 2, 4, [8, 4], [8, 1])
    assert m.features is None and not m.takes_lists and "features" not in m.config
    assert m.embedding_part is m.sparse_arch
    assert sorted(k for k in m.state_dict() if "embedding" in k) == ["sparse_arch.embedding.weight"]
    t = TabularModel([(10, 4), (20, 3)], 2, 1, [8])
    assert t.features is None and not t.takes_lists and t.embedding_part is t.embeds
    assert t.eval()(torch.tensor([[1, 2]]), torch.ones(1, 2)).shape == (1, 1)


def _train(model, data, steps_ok=True, list_format="jagged"):
    from ctrflow.train.trainer import Trainer

    lists = list(model.features.spec.lists) if model.features is not None else []
    train = Loader(data / "train", 256, seed=0, lists=lists, list_format=list_format)
    valid = Loader(data / "valid", 1024, shuffle=False, lists=lists, list_format=list_format)
    # embedding_row_warmup 0: each item is looked up a few dozen times in these 3 epochs of 4,096 rows, where the
    # default warm-up (a prior for long tails, train/config.py's ROW_WARMUP) slows it; the test is about the lists.
    trainer = Trainer(model, optimizer="adam", lr=1e-2, embedding_lr=0.2, epochs=3, verbose=False,
                      progress=False, plot=False, tensorboard=False, embedding_row_warmup=0.0)
    before = trainer.evaluate(valid)
    trainer.fit(train, valid)
    return before, trainer.evaluate(valid)


@pytest.mark.parametrize("model_name", ["dlrm", "tabular"])
def test_models_with_list_features_learn(data, model_name):
    torch.manual_seed(0)
    if model_name == "dlrm":
        model = DLRM.from_schema(data, embedding_dim=8, dense_arch_layer_sizes=[8], over_arch_layer_sizes=[16, 1],
                                 features=SHARED)
    else:
        model = TabularModel.from_schema(data, layers=[16], features={
            "features": {"item_id": {"shared": "items"}, "hist_items": {"shared": "items", "combiner": "sum"},
                         "tags": {"combiner": "concat", "concat_n": 2}}})
    assert model.takes_lists
    before, after = _train(model, data)
    assert after["loss"] < before["loss"] - 0.02
    # DLRM's dot products see the history-item overlap directly; the MLP on concatenated vectors less so.
    assert after["auc"] > (0.65 if model_name == "dlrm" else 0.55)


def test_padded_batches_give_the_same_logits(data):
    torch.manual_seed(0)
    model = DLRM.from_schema(data, embedding_dim=8, dense_arch_layer_sizes=[8], over_arch_layer_sizes=[1],
                             features=SHARED).eval()
    jag = next(iter(Loader(data / "valid", 64, shuffle=False, lists=["hist_items"])))
    pad = next(iter(Loader(data / "valid", 64, shuffle=False, lists=["hist_items"], list_format="padded")))
    a = model(jag.categorical, jag.continuous, lists=jag.lists, weights=jag.weights)
    b = model(pad.categorical, pad.continuous, lists=pad.lists, weights=pad.weights)
    assert torch.allclose(a, b, atol=1e-6)


def test_optimizers_split_shared_tables(data):
    model = DLRM.from_schema(data, embedding_dim=8, dense_arch_layer_sizes=[8], over_arch_layer_sizes=[1],
                             features=SHARED)
    opts = build_optimizers(model, "adagrad", 0.01)
    sparse = [p for g in opts[-1].param_groups for p in g["params"]]
    assert len(sparse) == 1 and sparse[0] is model.features.groups[0].weight


def test_fit_with_features_file(data, tmp_path, capsys):
    cfg = tmp_path / "features.toml"
    cfg.write_text('[features.item_id]\nshared = "items"\n[features.hist_items]\nshared = "items"\n'
                   'combiner = "mean"\n')
    out = tmp_path / "run"
    assert main(["--data", str(data), "--features", str(cfg), "--out", str(out), "--max-steps", "12",
                 "--batch-size", "256", "--embedding-dim", "8", "--layers", "16", "--bottom-layers", "8",
                 "--no-progress", "--no-loader-bench", "--threads", "1"]) == 0
    assert "validation AUC" in capsys.readouterr().out
    saved = json.loads((out / "config.json").read_text())
    assert [t["name"] for t in saved["model"]["features"]["tables"]] == ["items", "user"]
    (tmp_path / "bad.toml").write_text('[features.item_id]\ncombiner = "max"\n')
    assert main(["--data", str(data), "--features", str(tmp_path / "bad.toml"), "--out", str(tmp_path / "r2")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --features:") and "\n" not in err


def test_every_model_takes_the_feature_part():
    from ctrflow.models import DCNv2, EmbeddingPart

    for m in (DLRM.from_schema(schema(), embedding_dim=8, dense_arch_layer_sizes=[8], features=SHARED),
              TabularModel.from_schema(schema(), layers=[8], features=SHARED),
              DCNv2.from_schema(schema(), deep_layers=[8], features=SHARED)):
        part = m.embedding_part
        assert isinstance(part, FeatureEmbedding) and isinstance(part, EmbeddingPart) and part is m.features
        assert part.num_slots == 3 and part.num_columns == 2 and [f.name for f in part.list_features] == ["hist_items"]
        assert all(k.startswith("features.groups.") for k in m.state_dict() if "groups" in k)


def test_models_rebuild_from_their_json_config():
    for make in (lambda: DLRM.from_schema(schema(), embedding_dim=8, dense_arch_layer_sizes=[8], features=SHARED),
                 lambda: TabularModel.from_schema(schema(), layers=[8], features=SHARED)):
        m = make()
        again = type(m)(**json.loads(json.dumps(m.config)))
        again.load_state_dict(m.state_dict())
        assert again.takes_lists and again.features.spec == m.features.spec
