"""Binary labels held as text or as two other numbers: yes/no words, ``--label-values NEGATIVE,POSITIVE``."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ctrflow.etl import Workflow
from ctrflow.etl.ops import Label, LabelError
from ctrflow.etl.ops.label import label_floats
from ctrflow.etl.run import main


def _frame(labels: list, n: int = 600, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"I1": rng.random(n), "C1": [f"v{x}" for x in rng.integers(0, 9, n)],
                         "label": [labels[i % len(labels)] for i in range(n)]})


def _etl(tmp_path, df: pd.DataFrame, *flags: str, parts: int = 3) -> int:
    raw = tmp_path / "raw"
    raw.mkdir()
    for i, chunk in enumerate(np.array_split(np.arange(len(df)), parts)):  # several files = several partitions
        df.iloc[chunk].to_csv(raw / f"in-{i}.csv", index=False)
    return main(["--input", str(raw), "--format", "csv", "--cats", "C1", "--conts", "I1", "--valid-fraction",
                 "0.2", "--output", str(tmp_path / "out"), "--no-progress", *flags])


def _labels(tmp_path) -> np.ndarray:
    out = tmp_path / "out"
    return np.concatenate([pd.read_parquet(out / s)["label"].to_numpy() for s in ("train", "valid")])


@pytest.mark.parametrize("dtype", [object, "string", "category", "string[pyarrow]"])
def test_yes_no_words_map_to_one_and_zero_in_every_text_dtype(dtype):
    s = pd.Series(["yes", " No", "TRUE", "false ", "y", "n", "1", "0", "T", "f"], name="y").astype(dtype)
    y, bad = label_floats(s, "binary")
    assert y.tolist() == [1, 0, 1, 0, 1, 0, 1, 0, 1, 0] and not bad.any()
    out = Label().transform_column("y", s)
    assert out.dtype == np.float32 and out.tolist() == y.tolist()


def test_named_values_are_exact_after_stripping_and_everything_else_is_bad():
    s = pd.Series([" <=50K", ">50K", ">50K.", None, "<=50k"], name="income")
    y, bad = label_floats(s, "binary", ["<=50K", ">50K"])
    assert y[:2].tolist() == [0.0, 1.0] and bad.tolist() == [False, False, True, True, True]
    with pytest.raises(LabelError, match=r"3 value\(s\) outside '<=50K' \(0\) / '>50K' \(1\).*'>50K\.'"):
        Label(values=["<=50K", ">50K"]).transform_column("income", s)


def test_named_numbers_map_a_minus_one_plus_one_label():
    s = pd.Series([-1, 1, 1, -1, 0], name="y")
    y, bad = label_floats(s, "binary", ["-1", "1"])
    assert y[:4].tolist() == [0, 1, 1, 0] and bad.tolist() == [False] * 4 + [True]
    with pytest.raises(LabelError, match="give the two numbers"):
        label_floats(s, "binary", ["no", "yes"])


def test_label_values_are_checked_when_the_op_is_built():
    for bad in (["a"], ["a", "a"], ["a", ""], ["a", "b", "c"]):
        with pytest.raises(ValueError, match="two different values"):
            Label(values=bad)
    with pytest.raises(ValueError, match="binary only"):
        Label(task="regression", values=["a", "b"])
    assert Label(values=[" a ", "b"]).params() == {"task": "binary", "values": ["a", "b"]}


def test_a_text_regression_label_is_a_clear_error():
    with pytest.raises(LabelError, match="regression label must be numbers"):
        label_floats(pd.Series(["1.5", "2"], name="y"), "regression")


def test_etl_reads_a_yes_no_csv_label_without_flags(tmp_path):
    df = _frame(["yes", "no", "no", "Yes"])
    assert _etl(tmp_path, df) == 0
    got = _labels(tmp_path)
    assert sorted(got.tolist()) == sorted((df["label"].str.lower() == "yes").astype(float).tolist())


def test_etl_maps_named_values_and_stores_them_with_the_workflow(tmp_path):
    df = _frame([" <=50K", " >50K", " <=50K"])
    assert _etl(tmp_path, df, "--label-values", "<=50K,>50K") == 0
    got = _labels(tmp_path)
    assert got.sum() == (df["label"] == " >50K").sum() and len(got) == len(df)
    wf = Workflow.load(tmp_path / "out" / "workflow")  # --update rebuilds the same Label from it
    assert [op.values for op in wf.ops if isinstance(op, Label)] == [["<=50K", ">50K"]]


def test_etl_refuses_a_third_value_and_counts_it_in_every_partition(tmp_path, capsys):
    df = _frame([" <=50K", " >50K"] * 9 + [" >50K."], n=570)  # 30 rows of '>50K.', spread over 3 files
    assert _etl(tmp_path, df, "--label-values", "<=50K,>50K") == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: label column 'label' has 30 value(s)"), line
    assert "(e.g. ' >50K.')" in line, line  # the raw value, blanks and all
    assert not (tmp_path / "out").exists()


def test_etl_asks_for_label_values_when_the_text_is_not_a_yes_no_word(tmp_path, capsys):
    assert _etl(tmp_path, _frame(["<=50K", ">50K"])) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--label-values NEGATIVE,POSITIVE" in line and ("'<=50K'" in line or "'>50K'" in line), line


@pytest.mark.parametrize("flags", [["--label-values", "a"], ["--label-values", "a,a"],
                                   ["--label-values", "a,b", "--task", "regression"]])
def test_impossible_label_values_flags_are_usage_errors(tmp_path, capsys, flags):
    assert _etl(tmp_path, _frame(["a", "b"]), *flags) == 2
    assert "--label-values expects two different values" in capsys.readouterr().err
