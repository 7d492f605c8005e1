"""Numeric features as embeddings (issue #17): the ETL's output quantiles and ``ctrflow.models.numeric``.

PLE against a numpy transcription of Gorishniy et al.'s formula, shapes and gradients, the quantiles
``etl/run.py`` (and ``--update``) records against ``numpy.quantile`` of the processed column, the error
for a dataset without quantiles, and a state_dict round-trip (edges travel with the checkpoint).
"""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ctrflow.etl import Dataset, Workflow
from ctrflow.etl.ops import FillMissing, LogOp, Normalize
from ctrflow.etl.ops.normalize import QUANTILES
from ctrflow.etl.run import main as etl_main
from ctrflow.etl.schema import ColumnSchema, Schema
from ctrflow.models.numeric import (
    PeriodicEncoding,
    PiecewiseLinearEncoding,
    clean_edges,
    from_config,
    numeric_embedding,
    schema_edges,
)

RANK_TOL = 0.01  # sketch (~1/1024) + sampling (~0.5/sqrt(32768 per partition)) rank error, with margin


def ple_reference(x: float, edges: list[float]) -> np.ndarray:
    """The paper's PLE of one value, bin by bin (float64), on de-duplicated edges: [T]."""
    b = np.unique(np.asarray(edges, dtype=np.float64))
    t_bins = len(b) - 1
    out = np.zeros(t_bins)
    for t in range(1, t_bins + 1):
        lo, hi = b[t - 1], b[t]
        if x < lo and t > 1:
            out[t - 1] = 0.0
        elif x >= hi and t < t_bins:
            out[t - 1] = 1.0
        else:
            out[t - 1] = (x - lo) / (hi - lo)
    return out


def test_ple_equals_the_formula_with_duplicates_and_out_of_range_values():
    edges = [[-1.0, 0.0, 0.0, 2.0, 5.0], [0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0], [10.0, 20.0]]
    values = np.array([-7.0, -1.0, -0.5, 0.0, 0.1, 0.25, 0.6, 1.0, 1.9, 2.0, 4.0, 5.0, 9.0, 15.0, 25.0])
    x = torch.tensor(np.stack([values, values / 4, values + 10], axis=1), dtype=torch.float32)  # [B, 3]
    ple = PiecewiseLinearEncoding(edges)  # no dim: the raw encoding
    got = ple(x).numpy().astype(np.float64)  # [B, 3, K]
    k = max(len(np.unique(e)) - 1 for e in edges)
    assert got.shape == (len(values), 3, k) and ple.n_bins == k == 4
    for j, e in enumerate(edges):
        t = len(np.unique(e)) - 1
        for i in range(len(values)):
            want = ple_reference(float(x[i, j]), e)
            np.testing.assert_allclose(got[i, j, :t], want, rtol=1e-5, atol=1e-6)
            assert (got[i, j, t:] == 0).all()  # padding bins never fire
    assert got[0, 0, 0] == pytest.approx(-6.0) and got[-1, 0, 2] == pytest.approx(23 / 3)  # open ends


def test_ple_degenerate_columns_and_clean_edges():
    assert clean_edges([3.0, np.nan, 1.0, 1.0, np.inf]).tolist() == [1.0, 3.0]
    assert clean_edges([2.0, 2.0]).tolist() == [2.0, 3.0]  # a constant column: one linear bin
    assert clean_edges([]).tolist() == [0.0, 1.0]
    ple = PiecewiseLinearEncoding([[2.0, 2.0, 2.0]])
    x = torch.tensor([[0.0], [2.0], [5.5]])
    assert ple(x)[:, 0, 0].tolist() == [-2.0, 0.0, 3.5]  # the only bin is open on both sides


def test_ple_shapes_and_gradients():
    edges = [list(np.linspace(-2, 2, 9)), [0.0, 1.0, 3.0]]
    ple = PiecewiseLinearEncoding(edges, dim=5)
    x = torch.randn(7, 2)
    out = ple(x)
    assert out.shape == (7, 2, 5) and (out >= 0).all() and ple.out_features == 5
    out.sum().backward()
    assert ple.linear.weight.grad is not None and ple.linear.weight.grad.abs().sum() > 0
    assert not any(b.requires_grad for b in ple.buffers())
    with pytest.raises(ValueError, match=r"\[B, 2\]"):
        ple(torch.randn(7, 3))


def test_periodic_shapes_and_gradient_flow():
    per = PeriodicEncoding(n_cont=3, k=4, sigma=0.5, dim=6)
    x = torch.randn(8, 3)
    assert per.encode(x).shape == (8, 3, 8)
    enc = per.encode(x)
    np.testing.assert_allclose((enc[..., :4] ** 2 + enc[..., 4:] ** 2).detach().numpy(), 1.0, rtol=1e-5)  # sin^2+cos^2
    out = per(x)
    assert out.shape == (8, 3, 6) and (out >= 0).all()
    per(x).pow(2).sum().backward()
    assert per.frequencies.grad is not None and per.frequencies.grad.abs().sum() > 0  # trainable c
    assert per.linear.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="sigma"):
        PeriodicEncoding(3, sigma=0.0)


def _raw(n: int, seed: int) -> pd.DataFrame:
    """Two skewed count-like columns (zeros, ties, NaNs), a categorical and a label."""
    rng = np.random.default_rng(seed)
    a = np.floor(rng.exponential(20.0, n))
    a[rng.random(n) < 0.15] = np.nan
    b = rng.lognormal(1.0, 1.5, n)
    c = rng.integers(0, 50, n).astype(str)
    return pd.DataFrame({"label": rng.integers(0, 2, n).astype(np.int8), "I1": a, "I2": b, "C1": c})


def _check_quantiles(q: list[float], x: np.ndarray, exact_ends: bool = True, tol: float = RANK_TOL) -> None:
    """``q`` are strictly increasing edges whose ends are the exact extremes of ``x`` (``exact_ends``) and
    whose inner edges equal ``numpy.quantile(x, p)`` up to the rank tolerance ``tol``."""
    q, x = np.asarray(q), np.asarray(x, dtype=np.float64)
    assert (np.diff(q) > 0).all() and len(q) <= QUANTILES + 1
    if exact_ends:
        assert q[0] == x.min() and q[-1] == x.max()
    ps = np.arange(1, QUANTILES) / QUANTILES
    lo = np.quantile(x, np.clip(ps - tol, 0, 1))
    hi = np.quantile(x, np.clip(ps + tol, 0, 1))
    for p, a, b in zip(ps, lo, hi, strict=True):  # de-duplication removed ties: some edge must sit in [a, b]
        assert ((q >= a - 1e-6) & (q <= b + 1e-6)).any(), (p, a, b, q)


def test_etl_records_output_quantiles_of_the_processed_training_column(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    for k in range(3):
        pq.write_table(pa.Table.from_pandas(_raw(30_000, k), preserve_index=False), raw / f"day-{k}.parquet")
    out = tmp_path / "out"
    assert etl_main(["--input", str(raw), "--output", str(out), "--cats", "C1", "--conts", "I1,I2",
                     "--valid-fraction", "0.1", "--no-progress"]) == 0
    schema = Schema.load(out)
    train = pd.read_parquet(out / "train")
    for col in ("I1", "I2"):
        _check_quantiles(schema[col].quantiles, train[col].to_numpy())
    doc = json.loads((out / "schema.json").read_text())
    assert all("quantiles" not in c for c in doc["columns"] if c["kind"] != "continuous")
    assert schema_edges(out) == [schema["I1"].quantiles, schema["I2"].quantiles]

    # --update merges the sketch: quantiles of both days in the updated output space
    day = tmp_path / "day2.parquet"
    pq.write_table(pa.Table.from_pandas(_raw(40_000, 9).assign(I2=lambda d: d.I2 * 3), preserve_index=False), day)
    upd = tmp_path / "upd"
    assert etl_main(["--update", str(out), "--input", str(day), "--output", str(upd), "--cats", "C1",
                     "--conts", "I1,I2", "--no-progress"]) == 0
    wf = Workflow.load(upd / "workflow")
    old_train = pd.read_parquet(raw)  # every row the two fits saw (plus day 1's held-out tenth: within tolerance)
    both = wf.transform_frame(pd.concat([old_train, pd.read_parquet(day)], ignore_index=True))
    for col in ("I1", "I2"):
        q = Schema.load(upd)[col].quantiles
        assert q != schema[col].quantiles
        assert both[col].min() <= q[0] and q[-1] <= both[col].max()
        _check_quantiles(q, both[col].to_numpy(), exact_ends=False, tol=2 * RANK_TOL)


def test_sampled_sketch_across_partitions():
    """Partitions over the sample size (32768 rows) are sketched from a sample; still within tolerance."""
    df = _raw(150_000, 3)
    wf = Workflow(["I1", "I2"] >> FillMissing(0) >> LogOp() >> Normalize())
    wf.fit(Dataset(df, part_size=50_000))
    out = wf.transform(Dataset(df, part_size=50_000)).compute()
    for col in ("I1", "I2"):
        _check_quantiles(wf.output_schema()[col].quantiles, out[col].to_numpy())


def _schema(quantiles: list[list[float] | None]) -> Schema:
    cols = [ColumnSchema("C1", "categorical", "int32", cardinality=10, embedding_dim=8)]
    cols += [ColumnSchema(f"I{j}", "continuous", "float32", quantiles=q) for j, q in enumerate(quantiles)]
    return Schema([*cols, ColumnSchema("label", "label", "float32")])


def test_from_schema_and_the_factory(tmp_path):
    s = _schema([[0.0, 1.0, 2.0], [-1.0, 0.0]])
    s.save(tmp_path / "schema.json")
    for src in (s, tmp_path, str(tmp_path / "schema.json"), s.to_dict()):
        m = numeric_embedding("ple", src, dim=4)
        assert isinstance(m, PiecewiseLinearEncoding) and m(torch.zeros(3, 2)).shape == (3, 2, 4)
    assert numeric_embedding("ple", [[0.0, 1.0], [0.0, 2.0, 3.0]], dim=4).n_bins == 2
    per = numeric_embedding("periodic", s, dim=4, k=3, sigma=0.1)
    assert isinstance(per, PeriodicEncoding) and per(torch.zeros(3, 2)).shape == (3, 2, 4)
    assert numeric_embedding(None, s, dim=4) is None
    with pytest.raises(ValueError, match="one of"):
        numeric_embedding("bins", s, dim=4)


def test_from_schema_without_quantiles_says_to_rerun_the_etl():
    old = _schema([[0.0, 1.0], None])
    with pytest.raises(ValueError, match=r"rerun etl/run\.py: this dataset predates numeric embeddings.*I1"):
        PiecewiseLinearEncoding.from_schema(old, dim=4)
    with pytest.raises(ValueError, match="predates numeric embeddings"):
        numeric_embedding("ple", old.to_dict(), dim=4)
    assert numeric_embedding("periodic", old, dim=4) is not None  # periodic needs no quantiles


def test_state_dict_round_trip_carries_the_edges():
    torch.manual_seed(0)
    trained = PiecewiseLinearEncoding([[0.0, 1.0, 2.0, 4.0], [-3.0, 0.0, 3.0, 3.0, 9.0]], dim=3)
    buf = io.BytesIO()
    torch.save(trained.state_dict(), buf)
    assert {"edges", "lower", "width", "lo", "hi"} <= set(trained.state_dict())
    served = PiecewiseLinearEncoding([[0.0, 5.0, 6.0, 7.0], [1.0, 2.0, 3.0, 4.0]], dim=3)  # other edges, same K
    buf.seek(0)
    served.load_state_dict(torch.load(buf, weights_only=True))
    x = torch.randn(16, 2) * 4
    torch.testing.assert_close(served(x), trained(x), rtol=0, atol=0)
    assert torch.equal(served.edges.nan_to_num(-99), trained.edges.nan_to_num(-99))

    for m in (trained, PeriodicEncoding(2, k=4, sigma=1.0, dim=3)):  # what a checkpoint stores: JSON config + weights
        back = from_config(json.loads(json.dumps(m.config)))
        back.load_state_dict(m.state_dict())
        torch.testing.assert_close(back(x), m(x), rtol=0, atol=0)


def test_training_and_serving_encode_the_same_raw_rows_alike(tmp_path):
    """The loader's processed rows and ``Workflow.transform_frame`` of the raw rows (what serving runs) give
    the same encoding under a module built from the dataset's schema."""
    raw = _raw(5_000, 5)
    pq.write_table(pa.Table.from_pandas(raw.iloc[:4000], preserve_index=False), tmp_path / "train.parquet")
    pq.write_table(pa.Table.from_pandas(raw.iloc[4000:], preserve_index=False), tmp_path / "valid.parquet")
    out = tmp_path / "out"
    assert etl_main(["--input", str(tmp_path / "train.parquet"), "--valid", str(tmp_path / "valid.parquet"),
                     "--output", str(out), "--cats", "C1", "--conts", "I1,I2", "--no-progress"]) == 0
    torch.manual_seed(0)
    ple = numeric_embedding("ple", out, dim=8)
    stored = torch.tensor(pd.read_parquet(out / "valid")[["I1", "I2"]].to_numpy())
    online = Workflow.load(out / "workflow").transform_frame(raw.iloc[4000:].reset_index(drop=True))
    served = torch.tensor(online[["I1", "I2"]].to_numpy())
    torch.testing.assert_close(ple(served), ple(stored), rtol=0, atol=0)
