"""The README's main job, scaled down: generate -> ETL -> train DLRM -> AUC close to the oracle."""

from __future__ import annotations

import json

import pytest

from ctrflow.etl.run import main as etl_main
from ctrflow.train.fit import main as fit_main


@pytest.mark.slow
def test_generated_data_etl_then_dlrm_gets_close_to_the_oracle(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert etl_main(["--synthetic-rows", "200000", "--no-progress"]) == 0
    assert fit_main(["--out", "runs/e2e", "--no-progress", "--no-loader-bench", "--threads", "2"]) == 0
    printed = capsys.readouterr().out
    assert "oracle" in printed.lower()
    with open(tmp_path / "runs" / "e2e" / "summary.json") as f:
        summary = json.load(f)
    with open(tmp_path / "data" / "processed" / "schema.json") as f:
        oracle = json.load(f)["synthetic"]["oracle"]["valid_auc"]
    auc = summary["valid"]["auc"]
    # 180k training rows instead of 1.8M: a looser margin than the 0.01 reached at full size
    # (measured here: 0.017 below the oracle), far above what a broken pipeline reaches (~0.5).
    assert auc > oracle - 0.03, (auc, oracle)
    assert auc > 0.6
