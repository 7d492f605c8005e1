"""etl/run.py's continuous recipe on negative values: ``--negatives signed`` keeps them, ``clip`` zeroes them."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ctrflow.etl.config import DEFAULTS
from ctrflow.etl.run import main, parse_args


@pytest.mark.parametrize("mode", ["signed", "clip"])
def test_negative_values_by_mode(tmp_path, mode):
    rng = np.random.default_rng(0)
    n = 1000
    x = rng.choice([-5.0, -1.0, 0.0, 1.0, 20.0], n)
    df = pd.DataFrame({"I1": x, "C1": [f"v{i}" for i in rng.integers(0, 5, n)], "label": rng.integers(0, 2, n)})
    df.to_parquet(tmp_path / "in.parquet")
    out = tmp_path / "out"
    assert main(["--input", str(tmp_path / "in.parquet"), "--cats", "C1", "--conts", "I1", "--valid-fraction", "0.1",
                 "--negatives", mode, "--output", str(out), "--no-progress", "--seed", "1"]) == 0
    got = pd.concat([pd.read_parquet(out / s) for s in ("train", "valid")])["I1"].to_numpy(np.float64)
    logged = np.sign(x) * np.log1p(np.abs(x)) if mode == "signed" else np.log1p(np.clip(x, 0, None))
    levels, want = np.unique(np.round(got, 5)), np.unique(logged)
    assert len(levels) == (5 if mode == "signed" else 3)  # clip: -5, -1 and 0 all become the value of 0
    # Normalize is affine (a > 0): the output's distinct values are the transform's, shifted and scaled.
    a, b = np.polyfit(want, levels, 1)
    assert a > 0 and np.allclose(a * want + b, levels, atol=1e-4)


def test_default_is_the_config_default():
    assert parse_args([]).negatives == DEFAULTS.negatives
