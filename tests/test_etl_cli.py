"""`python etl/run.py`: end to end on small generated input, and every bad input."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ctrflow.etl.run import main
from ctrflow.etl.schema import Schema

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _raw_frame(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({"label": rng.integers(0, 2, n).astype(np.int8)})
    for i in range(1, 4):
        v = rng.integers(-2, 1000, n).astype(float)
        v[rng.random(n) < 0.1] = np.nan
        df[f"I{i}"] = pd.array(v, dtype="Int64") if i != 2 else v
    for i in range(1, 4):
        vals = np.array([f"{k:08x}" for k in rng.zipf(1.5, n) % (10**i)], dtype=object)
        vals[rng.random(n) < 0.05] = None
        df[f"C{i}"] = vals
    return df


@pytest.fixture
def raw_parquet(tmp_path):
    d = tmp_path / "raw"
    d.mkdir()
    df = _raw_frame(3000)
    pq.write_table(pa.Table.from_pandas(df.iloc[:2000], preserve_index=False), d / "a.parquet")
    pq.write_table(pa.Table.from_pandas(df.iloc[2000:], preserve_index=False), d / "b.parquet")
    return d, df


ARGS = ["--cats", "C1,C2,C3", "--conts", "I1,I2,I3", "--no-progress"]


def _no_leftovers(parent) -> None:
    left = [p for p in os.listdir(parent) if ".tmp-" in p]
    assert not left, f"temporary output left behind: {left}"


def test_cli_parquet_end_to_end(raw_parquet, tmp_path, capsys):
    raw, df = raw_parquet
    out = tmp_path / "out"
    assert main(["--input", str(raw), "--output", str(out), "--valid-fraction", "0.2", *ARGS]) == 0
    printed = capsys.readouterr().out
    assert "rows/s" in printed and "C1" in printed
    schema = Schema.load(out)
    assert schema.categorical == ["C1", "C2", "C3"]
    assert schema.continuous == ["I1", "I2", "I3"]
    assert schema.label == ["label"]
    train = pd.read_parquet(out / "train")
    valid = pd.read_parquet(out / "valid")
    assert len(train) + len(valid) == len(df) == schema.metadata["rows"]["train"] + schema.metadata["rows"]["valid"]
    assert 0.1 < len(valid) / len(df) < 0.3
    for c in schema.categorical:
        card = schema[c].cardinality
        assert train[c].dtype == np.int32 and valid[c].dtype == np.int32
        assert train[c].min() >= 1 and train[c].max() < card and valid[c].max() < card
    for c in schema.continuous:
        assert train[c].dtype == np.float32
        assert abs(float(train[c].mean())) < 1e-3  # normalized on the training split
    assert set(np.unique(np.concatenate([train.label, valid.label]))) <= {0.0, 1.0}
    # the label multiset is preserved by the split
    assert np.sort(np.concatenate([train.label, valid.label])).tolist() == np.sort(df.label.astype(float)).tolist()
    assert os.path.exists(out / "workflow" / "workflow.json")
    # processed columns hold no nulls, so the files declare them REQUIRED (the loader's fast decode)
    for f in (out / "train").glob("*.parquet"):
        assert not any(field.nullable for field in pq.read_schema(f))
    _no_leftovers(tmp_path)


def test_cli_categorify_matches_pandas_reference(raw_parquet, tmp_path):
    raw, df = raw_parquet
    out = tmp_path / "out"
    assert main(["--input", str(raw / "a.parquet"), "--valid", str(raw / "b.parquet"), "--output", str(out),
                 "--freq-threshold", "3", *ARGS]) == 0
    train = pd.read_parquet(out / "train")
    valid = pd.read_parquet(out / "valid")
    fit = df.iloc[:2000]
    for c in ["C1", "C2", "C3"]:
        vc = fit[c].value_counts()
        kept = vc[vc >= 3].reset_index()
        kept.columns = ["value", "count"]
        kept = kept.sort_values(["count", "value"], ascending=[False, True])
        ids = {v: i + 3 for i, v in enumerate(kept["value"])}

        def expect(s, ids=ids):
            return [1 if pd.isna(v) else ids.get(v, 2) for v in s]

        assert train[c].tolist() == expect(fit[c])
        assert valid[c].tolist() == expect(df.iloc[2000:][c])


def test_cli_criteo_gz_and_bucket_flags(tmp_path):
    rng = np.random.default_rng(1)
    lines = []
    for _ in range(500):
        ints = ["" if rng.random() < 0.2 else str(rng.integers(-1, 500)) for _ in range(13)]
        cats = ["" if rng.random() < 0.1 else f"{rng.integers(0, 50):08x}" for _ in range(26)]
        lines.append("\t".join([str(rng.integers(0, 2)), *ints, *cats]))
    import gzip

    with gzip.open(tmp_path / "day_0.gz", "wt") as f:
        f.write("\n".join(lines[:400]) + "\n")
    (tmp_path / "day_1").write_text("\n".join(lines[400:]) + "\n")
    out = tmp_path / "out"
    code = main(["--input", str(tmp_path / "day_0.gz"), "--valid", str(tmp_path / "day_1"), "--format", "criteo",
                 "--output", str(out), "--bucketize", "I1:0,10,100", "--auto-bins", "I3:4", "--no-progress"])
    assert code == 0
    schema = Schema.load(out)
    assert len(schema.categorical) == 28 and len(schema.continuous) == 13
    assert schema["I1_bucket"].cardinality == 5 and schema["I3_bin"].cardinality <= 5
    train = pd.read_parquet(out / "train")
    assert len(train) == 400 and len(pd.read_parquet(out / "valid")) == 100
    raw_i1 = [ln.split("\t")[1] for ln in lines[:400]]
    expect = [4 if v == "" else int(np.digitize(int(v), [0, 10, 100])) for v in raw_i1]
    assert train["I1_bucket"].tolist() == expect


def test_cli_synthetic_default_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["--synthetic-rows", "5000", "--no-progress"]) == 0
    schema = Schema.load(tmp_path / "data" / "processed")
    oracle = schema.metadata["synthetic"]["oracle"]
    assert 0.5 < oracle["valid_auc"] < 1.0
    assert schema.metadata["rows"]["train"] + schema.metadata["rows"]["valid"] == 5000
    assert os.listdir(tmp_path) == ["data"] and os.listdir(tmp_path / "data") == ["processed"]  # raw data: the cache
    assert main(["--synthetic-rows", "5000", "--no-progress"]) == 2  # exists without --overwrite
    assert main(["--synthetic-rows", "5000", "--no-progress", "--overwrite"]) == 0


def test_cli_bins_on_continuous_columns(tmp_path, monkeypatch):
    # I1 is both normalized (--conts) and binned: the input must not carry it twice.
    monkeypatch.chdir(tmp_path)
    assert main(["--synthetic-rows", "3000", "--no-progress", "--auto-bins", "I1:8", "--bucketize", "I2:0,1,10"]) == 0
    schema = Schema.load(tmp_path / "data" / "processed")
    assert "I1" in schema.continuous and schema["I1_bin"].cardinality <= 9 + 2
    train = pd.read_parquet(tmp_path / "data" / "processed" / "train", columns=["I1_bin", "I2_bucket"])
    assert train["I1_bin"].max() < schema["I1_bin"].cardinality
    assert train["I2_bucket"].max() < schema["I2_bucket"].cardinality


def _bad(tmp_path, argv, capsys, needle):
    out = tmp_path / "bad-out"
    code = main([*argv, "--output", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2, err
    last = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
    assert last and needle in last[-1], err
    assert "Traceback" not in err
    assert not out.exists()
    _no_leftovers(tmp_path)


def test_bad_missing_input(tmp_path, capsys):
    _bad(tmp_path, ["--input", str(tmp_path / "nope.parquet")], capsys, "does not exist")


def test_bad_empty_inputs(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    _bad(tmp_path, ["--input", str(tmp_path / "empty")], capsys, "no parquet files")
    (tmp_path / "zero.csv").write_text("")
    _bad(tmp_path, ["--input", str(tmp_path / "zero.csv")], capsys, "empty")
    pq.write_table(pa.Table.from_pandas(_raw_frame(10).iloc[:0], preserve_index=False), tmp_path / "z.parquet")
    _bad(tmp_path, ["--input", str(tmp_path / "z.parquet"), *ARGS], capsys, "no rows")


def test_bad_corrupt_parquet(tmp_path, raw_parquet, capsys):
    raw, _ = raw_parquet
    (raw / "c.parquet").write_bytes(b"PAR1 this is not parquet")
    _bad(tmp_path, ["--input", str(raw), *ARGS], capsys, "c.parquet")
    data = (raw / "a.parquet").read_bytes()
    (raw / "c.parquet").write_bytes(data[: len(data) // 2])
    _bad(tmp_path, ["--input", str(raw), *ARGS], capsys, "c.parquet")


def test_bad_missing_column(tmp_path, raw_parquet, capsys):
    raw, _ = raw_parquet
    _bad(tmp_path, ["--input", str(raw), "--cats", "C1,NOPE", "--conts", "I1"], capsys, "NOPE")


@pytest.mark.parametrize("value", [2, np.nan])
def test_bad_label_values(tmp_path, value, capsys):
    df = _raw_frame(300)
    df["label"] = df["label"].astype(float)
    df.loc[17, "label"] = value
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), tmp_path / "in.parquet")
    _bad(tmp_path, ["--input", str(tmp_path / "in.parquet"), *ARGS], capsys, "label")


def test_bad_flags(tmp_path, raw_parquet, capsys):
    raw, _ = raw_parquet
    _bad(tmp_path, ["--input", str(raw), "--valid-fraction", "1.5", *ARGS], capsys, "--valid-fraction")
    _bad(tmp_path, ["--input", str(raw), "--bucketize", "I1:3,1", *ARGS], capsys, "increasing")
    _bad(tmp_path, ["--input", str(raw), "--auto-bins", "I1", *ARGS], capsys, "--auto-bins")


def test_bad_output_exists(tmp_path, raw_parquet, capsys):
    raw, _ = raw_parquet
    out = tmp_path / "bad-out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert main(["--input", str(raw), "--output", str(out), "--no-progress", *ARGS]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "precious"


def test_bad_unreachable_scheduler(tmp_path, raw_parquet, capsys):
    pytest.importorskip("distributed")
    raw, _ = raw_parquet
    _bad(tmp_path, ["--input", str(raw), "--scheduler", "tcp://127.0.0.1:9", *ARGS], capsys, "scheduler")


def test_script_runs_from_repo_root(tmp_path):
    """`python etl/run.py --help` from the repository root (no module shadowing)."""
    r = subprocess.run([sys.executable, "etl/run.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and "--freq-threshold" in r.stdout


def test_interrupted_run_leaves_nothing(tmp_path, raw_parquet, monkeypatch):
    """A failure mid-write leaves neither the output nor a temporary directory."""
    raw, _ = raw_parquet
    import ctrflow.etl.writer as writer

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(writer, "write_partition", boom)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        main(["--input", str(raw), "--output", str(out), "--no-progress", *ARGS])
    assert not out.exists()
    _no_leftovers(tmp_path)


def test_bad_engine_gpu_without_rapids(tmp_path, raw_parquet, capsys):
    from ctrflow.etl import dispatch

    if dispatch.rapids_available():
        pytest.skip("RAPIDS present: --engine gpu is valid here")
    raw, _ = raw_parquet
    _bad(tmp_path, ["--input", str(raw), "--engine", "gpu", *ARGS], capsys, "RAPIDS")


@pytest.mark.parametrize("codec", ["none", "zstd"])
def test_output_compression(tmp_path, raw_parquet, codec):
    raw, _ = raw_parquet
    out = tmp_path / "out"
    assert main(["--input", str(raw), "--output", str(out), "--compression", codec, *ARGS]) == 0
    md = pq.ParquetFile(next((out / "train").glob("*.parquet"))).metadata
    col = md.row_group(0).column(0)
    assert col.compression.lower() == ("uncompressed" if codec == "none" else codec)


def _help_text(monkeypatch, capsys) -> str:
    from ctrflow.etl.run import parse_args

    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit) as e:
        parse_args(["--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def test_help_documents_every_option_and_its_default(monkeypatch, capsys):
    import argparse

    from ctrflow.etl.run import build_parser

    text = " ".join(_help_text(monkeypatch, capsys).split())  # undo the line wrapping
    for action in build_parser()._actions:
        if not action.option_strings:
            continue
        flag = action.option_strings[-1]
        assert action.help and action.help.strip(), f"{flag} has no help"
        assert flag in text
        d = action.default
        if d is None or d is False or d is argparse.SUPPRESS or d == []:
            continue  # the help says in words what "not given" means
        if "(default:" in action.help:  # its own wording, e.g. the 26 Criteo column names abbreviated
            continue
        assert f"(default: {d})" in text, f"{flag}: default {d!r} not shown"
    for shown in ("(default: data/processed)", "(default: 2)", "(default: 2000000)", "(default: 0)",
                  "(default: 127.0.0.1:8787", "$CTRFLOW_CACHE_DIR"):
        assert shown in text, shown


def test_options_without_a_default_say_what_that_means():
    from ctrflow.etl.run import build_parser

    for action in build_parser()._actions:
        if action.option_strings and action.default is None and action.nargs != 0:
            assert "default" in action.help, f"{action.option_strings[-1]}: what does leaving it out do?"


@pytest.mark.parametrize("argv0, orig, prog", [
    ("/venv/bin/ctrflow-etl", ["/venv/bin/python", "/venv/bin/ctrflow-etl"], "ctrflow-etl"),
    ("etl/run.py", ["python", "etl/run.py", "--help"], "etl/run.py"),
    ("/repo/etl/run.py", ["python", "/repo/etl/run.py"], "/repo/etl/run.py"),
    ("/repo/etl/run.py", ["python", "-m", "ctrflow.etl.run", "--help"], "python -m ctrflow.etl.run"),
    ("/venv/bin/pytest", ["python", "-m", "pytest"], "etl/run.py"),  # called from other code
    ("", ["python"], "etl/run.py"),
])
def test_usage_names_the_command_typed(argv0, orig, prog):
    from ctrflow.etl.run import _prog

    assert _prog(argv0, orig) == prog


@pytest.mark.parametrize("command, prog", [
    ([sys.executable, os.path.join("etl", "run.py")], "etl/run.py"),
    ([sys.executable, "-m", "ctrflow.etl.run"], "python -m ctrflow.etl.run"),
    ([os.path.join(os.path.dirname(sys.executable), "ctrflow-etl")], "ctrflow-etl"),
])
def test_usage_line_of_each_entry_point(command, prog):
    if not os.path.exists(command[0]):
        pytest.skip(f"{command[0]} is not installed")
    out = subprocess.run([*command, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"usage: {prog} [-h]")


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_an_infinite_value_is_a_missing_value(tmp_path, fmt):
    # One inf used to make I1's mean inf and every normalised I1 -inf / NaN, with exit 0.
    rng = np.random.default_rng(0)
    n = 2000
    df = pd.DataFrame({"I1": rng.integers(0, 100, n).astype(float), "I2": rng.random(n),
                       "C1": [f"v{x}" for x in rng.integers(0, 20, n)], "label": rng.integers(0, 2, n).astype(float)})
    df.loc[7, "I1"] = np.inf
    df.loc[9, "I2"] = -np.inf
    path = tmp_path / f"raw.{fmt}"
    df.to_parquet(path) if fmt == "parquet" else df.to_csv(path, index=False)
    out = tmp_path / "out"
    assert main(["--input", str(path), "--cats", "C1", "--conts", "I1,I2", "--output", str(out),
                 "--valid-fraction", "0.1", "--no-progress"]) == 0
    for split in ("train", "valid"):
        t = pd.read_parquet(out / split)
        assert np.isfinite(t[["I1", "I2"]].to_numpy()).all(), split
    finite = df.replace([np.inf, -np.inf], np.nan)
    logged = np.log1p(finite["I1"].clip(lower=0))  # the ETL's chain: fill (median) -> clip 0 -> log -> normalise
    t = pd.read_parquet(out / "train")
    assert abs(t["I1"].mean()) < 0.2 and 0.5 < t["I1"].std() < 1.5 and np.isfinite(logged.mean())


@pytest.mark.parametrize("task", ["binary", "regression"])
def test_label_errors_count_every_partition_and_give_the_right_hint(tmp_path, capsys, task):
    # The count used to be the first failing partition's, and NaN labels got "choose --task regression".
    rng = np.random.default_rng(1)
    for i in range(3):  # three files = three partitions, 40 NaN labels in each
        n = 1000
        df = pd.DataFrame({"I1": rng.random(n), "C1": [f"v{x}" for x in rng.integers(0, 9, n)],
                           "label": rng.integers(0, 2, n).astype(float)})
        df.loc[:39, "label"] = np.nan
        df.to_parquet(tmp_path / f"in-{i}.parquet")
    assert main(["--input", str(tmp_path), "--cats", "C1", "--conts", "I1", "--task", task, "--valid-fraction",
                 "0.1", "--output", str(tmp_path / "out"), "--no-progress"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "has 120 value(s)" in line, line
    assert "drop or fill the rows whose label is missing" in line and "--task regression" not in line
    assert not (tmp_path / "out").exists()


def test_a_numeric_label_on_a_binary_task_suggests_regression(tmp_path, capsys):
    df = pd.DataFrame({"I1": np.arange(200.0), "C1": ["a", "b"] * 100, "label": np.arange(200.0) % 5})
    df.to_parquet(tmp_path / "in.parquet")
    assert main(["--input", str(tmp_path / "in.parquet"), "--cats", "C1", "--conts", "I1", "--output",
                 str(tmp_path / "out"), "--no-progress"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "choose --task regression" in line and "0 or 1" in line


def test_cli_defaults_are_the_config_defaults(capsys):
    # etl/run.py's defaults live in ctrflow.etl.config; the parser and --help show those values.
    import dataclasses

    from ctrflow.etl.config import DEFAULTS
    from ctrflow.etl.run import parse_args

    a = parse_args([])
    for f in dataclasses.fields(DEFAULTS):
        if f.name != "valid_fraction":  # None on the parser: "split --input", which then uses the default
            assert getattr(a, f.name) == getattr(DEFAULTS, f.name), f.name
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for value in (DEFAULTS.output, DEFAULTS.freq_threshold, f"{DEFAULTS.synthetic_rows}", DEFAULTS.valid_fraction):
        assert f"default: {value}" in text, value


def test_memory_limit_decides_between_caching_and_streaming(tmp_path, raw_parquet, caplog):
    import logging

    from ctrflow.etl.cli_steps import PEAK_FACTOR, parse_memory

    assert parse_memory("8GB") == 8 * 10**9 and parse_memory("512M") == 512 * 2**20 and parse_memory("1000") == 1000
    assert abs(parse_memory("50%") / parse_memory(None) - 50 / 40) < 1e-6  # the default is 40% of RAM
    outs = {}
    for limit in ("1KB", "100GB"):
        with caplog.at_level(logging.INFO, logger="ctrflow.etl"):
            caplog.clear()
            out = tmp_path / limit
            assert main(["--input", str(raw_parquet[0]), *ARGS, "--output", str(out), "--memory-limit", limit]) == 0
        outs[limit] = caplog.text
    assert "streamed from disk twice" in outs["1KB"] and "kept in memory" in outs["100GB"]
    assert "near" in outs["100GB"] and PEAK_FACTOR > 2
    a, b = (pd.read_parquet(tmp_path / lim / "train") for lim in ("1KB", "100GB"))
    pd.testing.assert_frame_equal(a, b)  # the same output either way


def test_bad_memory_limit(tmp_path, raw_parquet, capsys):
    _bad(tmp_path, ["--input", str(raw_parquet[0]), *ARGS, "--memory-limit", "lots"], capsys, "--memory-limit")


def test_unwritable_output_is_refused_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["--synthetic-rows", "1000", "--output", str(blocker / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "is a file, not a directory" in err[-1] and not any("Traceback" in x for x in err)
    assert not any("synthetic data" in x for x in err)  # refused before any work
