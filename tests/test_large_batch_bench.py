"""``bench/large_batch.py`` end to end at tiny sizes (issue #16): one dataset, runs with and without the rule."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_large_batch_bench_tiny(tmp_path) -> None:
    out, cache = tmp_path / "out" / "lb.json", tmp_path / "cache"
    env = {**os.environ, "CTRFLOW_CACHE_DIR": str(cache)}
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "large_batch.py"), "--rows", "20000",
                        "--batches", "256,2048", "--without", "2048", "--threads", "1", "--json", str(out)],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads(out.read_text())
    rows = report["results"]
    assert [(x["batch"], x["rule"]) for x in rows] == [(256, True), (2048, True), (2048, False)]
    for x in rows:
        assert math.isfinite(x["auc"]) and 0 <= x["auc"] <= 1
        assert math.isfinite(x["logloss"]) and x["steps"] > 0 and x["epochs"] == 1
        assert x["rows_per_s"] > 0 and x["peak_rss_gib"] > 0 and x["train_rows"] > 0
        assert math.isfinite(x["oracle_auc"])
    assert rows[0]["auc_vs_base"] == 0 and rows[0]["rows_per_s_vs_base"] == 1
    # The rule's line appears above batch 512 with the rule on only; the run with it off keeps batch-512 rates.
    assert rows[0]["scaling"] is None and rows[1]["scaling"].startswith("batch scaling: 2,048 rows per step")
    assert rows[2]["scaling"] is None and rows[2]["lr"] < rows[1]["lr"]
    assert rows[1]["warnings"]  # ~9 steps of 2048 rows: the too-few-steps guard speaks
    assert report["goals"] == {} and report["machine"]["cores"] >= 1
    # Generated data stays under the cache; the scratch runs are gone.
    assert os.path.exists(os.path.join(report["data"], "schema.json"))
    assert report["data"].startswith(str(cache))
    assert not [n for n in os.listdir(cache / "bench") if n.startswith(".scratch")]
    assert "batch" in r.stdout and "rows/s" in r.stdout
