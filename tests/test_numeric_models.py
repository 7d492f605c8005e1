"""Numeric embeddings in the models (issue #17): DLRM, TabularModel, DCN-v2 with ``--numeric-embedding``.

Each model with each encoding (shapes, a checkpoint's config rebuilding the same outputs, gradients reaching
the numeric module), the models unchanged without it, ``train/fit.py --numeric-embedding ple`` end to end
on a small ETL'd dataset served from raw rows, and the one-line error for a dataset without quantiles.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from ctrflow.etl.cache import ENV
from ctrflow.etl.cli_steps import synthetic_key
from ctrflow.etl.run import main as etl_main
from ctrflow.etl.schema import ColumnSchema, Schema
from ctrflow.loader.loader import Loader
from ctrflow.models import DLRM, DCNv2, TabularModel
from ctrflow.models.defaults import NUMERIC_DIM, NUMERIC_EMBEDDING
from ctrflow.models.numeric import NO_QUANTILES, auto_kind, clean_edges, numeric_config
from ctrflow.models.protocol import MODELS
from ctrflow.serve.predictor import Predictor
from ctrflow.train.fit import main as fit_main
from ctrflow.train.fit_args import UsageError, parse_args

CARDS = [7, 11, 5]
N_CONT = 4
QUANTILES = [[-1.0, -0.2, 0.0, 0.7, 2.5], [0.0, 0.0, 1.0], [-3.0, 3.0], [-0.5, 0.0, 0.5, 1.0, 1.5, 2.0]]
KINDS = ("ple", "periodic")


def _schema(quantiles: bool = True) -> Schema:
    cols = [ColumnSchema(f"C{i}", "categorical", "int32", cardinality=c, embedding_dim=8) for i, c in enumerate(CARDS)]
    cols += [ColumnSchema(f"I{i}", "continuous", "float32", quantiles=QUANTILES[i] if quantiles else None)
             for i in range(N_CONT)]
    return Schema([*cols, ColumnSchema("label", "label", "float32")], {})


def _batch(b: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    cat = torch.stack([torch.randint(0, c, (b,), generator=g) for c in CARDS], dim=1)
    return cat, torch.randn(b, N_CONT, generator=g) * 2


def _build(name: str, kind: str | None, schema: Schema | None = None):
    torch.manual_seed(0)
    return MODELS[name].from_options(schema or _schema(), layers=[8], bottom_layers=[4], embedding_dim=4,
                                     numeric_embedding=kind)


# ---- each model, each encoding -------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_with_numeric_embedding_shapes_rebuild_and_gradients(name, kind):
    model = _build(name, kind)
    cat, cont = _batch()
    d = NUMERIC_DIM[kind]
    assert model.numeric(cont).shape == (6, N_CONT, d)
    assert model.config["numeric"]["kind"] == kind and model.config["numeric"]["dim"] == d
    if kind == "ple":  # the schema's quantiles, cleaned, travel in the config (and as buffers)
        assert model.config["numeric"]["edges"] == [clean_edges(q).tolist() for q in QUANTILES]
    out = model(cat, cont)
    assert out.shape == (6, 1) and torch.isfinite(out).all()
    out.sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if n.startswith("numeric.")}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values()), name

    # A checkpoint rebuilds it from its JSON config (serve/predictor.py): same keys, shapes and outputs.
    rebuilt = type(model)(**json.loads(json.dumps(model.config)))
    assert rebuilt.config == model.config
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    rebuilt.load_state_dict(model.state_dict())
    model.eval(), rebuilt.eval()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(cat, cont), model(cat, cont), rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_where_the_embedding_goes_in_each_model(kind):
    cat, cont = _batch()
    d = NUMERIC_DIM[kind]
    dlrm = _build("dlrm", kind)  # into the bottom MLP, beside the raw columns; the interaction as without it
    assert dlrm.config["numeric_input"] == "mlp" and not dlrm.numeric_slots
    assert dlrm.inter_arch.F == len(CARDS) and dlrm.dense_arch.model[0].in_features == N_CONT * (1 + d)
    assert dlrm.over_arch.model[0].in_features == 4 + len(CARDS) * (len(CARDS) + 1) // 2
    seen = []
    dlrm.dense_arch.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    dlrm.eval()(cat, cont)
    torch.testing.assert_close(seen[0], torch.cat((cont, dlrm.numeric(cont).flatten(1)), dim=1))

    torch.manual_seed(0)  # as slots: one more sparse slot of the embedding dim per continuous column
    slots = DLRM.from_schema(_schema(), embedding_dim=4, dense_arch_layer_sizes=[4, 4], numeric_embedding=kind,
                             numeric_input="slots")
    assert slots.inter_arch.F == len(CARDS) + N_CONT and slots.dense_arch.model[0].in_features == N_CONT
    assert slots.over_arch.model[0].in_features == 4 + (len(CARDS) + N_CONT) * (len(CARDS) + N_CONT + 1) // 2
    assert slots.numeric(cont).shape == (6, N_CONT, 4) and slots(cat, cont).shape == (6, 1)
    legacy = {k: v for k, v in slots.config.items() if k != "numeric_input"}  # saved before numeric_input
    assert type(slots)(**json.loads(json.dumps(legacy))).numeric_slots

    tab = _build("tabular", kind)
    assert tab.bn_cont is None and tab.layers[0].in_features == tab.n_emb + N_CONT * d
    dcn = _build("dcn", kind)
    assert dcn.in_features == dcn.n_emb + N_CONT * d == dcn.cross_net.layers[0].in_features
    # the MLP reads numeric(continuous).flatten(1) where it read the raw columns
    seen = []
    tab.layers[0].register_forward_hook(lambda m, i, o: seen.append(i[0]))
    tab.eval()(cat, cont)
    torch.testing.assert_close(seen[0][:, tab.n_emb:], tab.numeric(cont).flatten(1))


def test_numeric_dim_and_mismatches():
    s = _schema()
    assert TabularModel.from_schema(s, numeric_embedding="ple", numeric_dim=3).numeric(_batch()[1]).shape[-1] == 3
    assert DCNv2.from_schema(s, numeric_embedding="periodic", numeric_dim=5).config["numeric"]["dim"] == 5
    assert DLRM.from_schema(s, embedding_dim=8, numeric_embedding="ple", numeric_dim=8).numeric.out_features == 8
    assert DLRM.from_schema(s, embedding_dim=8, numeric_embedding="ple", numeric_dim=4).numeric.out_features == 4
    with pytest.raises(ValueError, match="numeric_dim must be embedding_dim=8"):
        DLRM.from_schema(s, embedding_dim=8, numeric_embedding="ple", numeric_dim=4, numeric_input="slots")
    with pytest.raises(ValueError, match="numeric_input must be one of"):
        DLRM(CARDS, N_CONT, 4, [4], [1], numeric=numeric_config("ple", s, 4), numeric_input="bottom")
    with pytest.raises(ValueError, match="the model's embedding dim"):
        DLRM(CARDS, N_CONT, 4, [4], [1], numeric=numeric_config("periodic", N_CONT, 6))
    with pytest.raises(ValueError, match="embeds 3 continuous columns, the model has 4"):
        TabularModel([(c, 2) for c in CARDS], N_CONT, 1, [8], numeric=numeric_config("periodic", 3, 6))
    with pytest.raises(ValueError, match="must be one of"):
        DCNv2.from_schema(s, numeric_embedding="fourier")


def test_without_the_option_the_models_are_as_before():
    cat, cont = _batch()
    for name in MODELS:
        model = _build(name, None)
        assert "numeric" not in model.config and model.numeric is None
        assert not any(k.startswith("numeric") for k in model.state_dict())
        torch.manual_seed(0)
        default = MODELS[name].from_options(_schema(), layers=[8], bottom_layers=[4], embedding_dim=4)
        assert default.config == model.config
        with torch.no_grad():
            torch.testing.assert_close(default.eval()(cat, cont), model.eval()(cat, cont), rtol=0, atol=0)
    assert _build("tabular", None).bn_cont is not None and _build("dlrm", None).inter_arch.F == len(CARDS)
    # With it, the tables (created first) draw the same initial rows as without it.
    for name in MODELS:
        on, off = _build(name, "ple"), _build(name, None)
        part = off.embedding_name
        for k, v in off.state_dict().items():
            if k.startswith(part + "."):
                torch.testing.assert_close(on.state_dict()[k], v, rtol=0, atol=0)


def _schema_with(quantiles: list[list[float]]) -> Schema:
    s = _schema()
    for c, q in zip(s.continuous, quantiles, strict=True):
        s[c].quantiles = q
    return s


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("bins", ["same", "more"])
def test_a_checkpoint_keeps_the_edges_it_was_trained_with(name, bins):
    # fit.py --resume onto a new day: the model is built from the new schema's quantiles, the checkpoint's win.
    cat, cont = _batch()
    old = _build(name, "ple")
    opt_old = torch.optim.Adam(old.numeric.parameters())
    old(cat, cont).sum().backward()
    opt_old.step()
    extra = [0.1, 0.2, 0.3, 0.4] if bins == "more" else []  # K from 5 to 9 bins: the linear weight grows
    new = _build(name, "ple", _schema_with([[q * 1.5 for q in qs] + extra for qs in QUANTILES]))
    assert new.config["numeric"] != old.config["numeric"]
    opt_new = torch.optim.Adam(new.numeric.parameters())  # made before the load, as the trainer does
    new.load_state_dict(old.state_dict())
    opt_new.load_state_dict(opt_old.state_dict())
    assert new.config == old.config and new.numeric.n_bins == old.numeric.n_bins == 5
    assert json.dumps(new.config) == json.dumps(old.config)  # what the next checkpoint records
    new.eval(), old.eval()
    with torch.no_grad():
        torch.testing.assert_close(new(cat, cont), old(cat, cont), rtol=0, atol=0)
    new.train()(cat, cont).sum().backward()
    opt_new.step()  # the optimizer still holds the (resized) weight
    assert any(p is new.numeric.linear.weight for g in opt_new.param_groups for p in g["params"])


def test_ple_needs_the_schema_quantiles_periodic_does_not():
    old = _schema(quantiles=False)
    for name in MODELS:
        with pytest.raises(ValueError, match="rerun etl/run.py") as e:
            _build(name, "ple", old)
        assert "\n" not in str(e.value) and "I0, I1, I2, I3" in str(e.value)
        assert _build(name, "periodic", old).config["numeric"]["kind"] == "periodic"


def test_bf16_autocast_on_cpu():
    cat, cont = _batch()
    for name in MODELS:
        for kind in KINDS:
            model = _build(name, kind)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(cat, cont)
            out.float().sum().backward()
            assert out.shape == (6, 1) and torch.isfinite(out.float()).all()
            assert model.numeric.linear.weight.grad is not None


def test_flag_and_its_auto_default():
    assert parse_args([]).numeric_embedding == "auto"
    assert parse_args(["--numeric-embedding", "ple"]).numeric_embedding == "ple"
    assert parse_args(["--numeric-embedding", "periodic", "--model", "tabular"]).numeric_embedding == "periodic"
    assert parse_args(["--numeric-embedding", "none"]).numeric_embedding == "none"
    with pytest.raises(UsageError, match="invalid choice"):
        parse_args(["--numeric-embedding", "bins"])
    assert auto_kind("auto", _schema()) == NUMERIC_EMBEDDING == "ple"  # every continuous column has quantiles
    assert auto_kind("auto", _schema(quantiles=False)) is None  # a dataset written before quantiles: raw columns
    assert auto_kind("none", _schema()) is None and auto_kind(None, _schema()) is None
    assert auto_kind("periodic", _schema(quantiles=False)) == "periodic"


# ---- train/fit.py end to end ---------------------------------------------------------------------------------
FIT = ["--max-steps", "30", "--batch-size", "128", "--embedding-dim", "4", "--layers", "16", "--bottom-layers", "8",
       "--no-progress", "--no-loader-bench", "--threads", "1", "--lr", "0.01"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A processed dataset (etl/run.py on 5000 generated rows; its schema records quantiles) and its raw valid rows."""
    out = tmp_path_factory.mktemp("numeric") / "proc"
    assert etl_main(["--synthetic-rows", "5000", "--output", str(out), "--no-progress"]) == 0
    raw = os.path.join(os.environ[ENV], "synthetic", synthetic_key(5000, 0, False), "valid")
    return out, pq.read_table(raw).to_pandas()


@pytest.mark.parametrize("model", ["dlrm", "tabular"])
def test_fit_trains_with_ple_and_the_server_rebuilds_it(data, tmp_path, model):
    proc, raw = data
    run = tmp_path / "run"
    assert fit_main(["--data", str(proc), "--out", str(run), "--model", model, "--numeric-embedding", "ple", *FIT]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 30 and 0.0 < summary["valid"]["auc"] <= 1.0
    schema = Schema.load(str(proc))
    edges = [clean_edges(schema[c].quantiles).tolist() for c in schema.continuous]
    assert json.loads((run / "config.json").read_text())["model"]["numeric"]["edges"] == edges

    predictor = Predictor.from_run(run, device="cpu")  # rebuilt from the checkpoint's config
    assert predictor.model.config["numeric"]["edges"] == edges
    expected = []
    with torch.inference_mode(), Loader(proc / "valid", 128, shuffle=False) as loader:
        for b in loader:
            expected.append(torch.sigmoid(predictor.model(b.categorical, b.continuous).float().reshape(-1)))
    scores = predictor.predict(raw.drop(columns=["label"]))  # raw rows: the ETL's transform, then the same PLE
    assert len(scores) == len(raw) > 100
    np.testing.assert_allclose(scores, torch.cat(expected).numpy(), atol=1e-5, rtol=0)


def test_fit_refuses_ple_on_a_dataset_without_quantiles(data, tmp_path, capsys):
    old = tmp_path / "old"
    shutil.copytree(data[0], old)
    s = json.loads((old / "schema.json").read_text())
    for c in s["columns"]:
        c.pop("quantiles", None)
    (old / "schema.json").write_text(json.dumps(s))
    capsys.readouterr()
    assert fit_main(["--data", str(old), "--out", str(tmp_path / "run"), "--numeric-embedding", "ple", *FIT]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "rerun etl/run.py" in err, err
    assert NO_QUANTILES.split("{")[0] in err
    assert not (tmp_path / "run").exists()  # refused before anything is written
    # the default (auto) trains on such a dataset with the raw columns, and says so
    assert fit_main(["--data", str(old), "--out", str(tmp_path / "auto"), *FIT]) == 0
    assert "numeric embedding: none (the dataset records no quantiles" in capsys.readouterr().err
    assert "numeric" not in json.loads((tmp_path / "auto" / "config.json").read_text())["model"]
