"""train/fit.py end to end, in-process, on a small processed dataset; every bad input exits 2."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ctrflow.etl.schema import ColumnSchema, Schema
from ctrflow.train.fit import main

CARDS = [8, 20, 5]
N_CONT = 3


def _write(out, rows=(1536, 512), nan_from: int | None = None, cards=CARDS, oracle=True, label_kind="binary"):
    rng = np.random.default_rng(0)
    for split, n in zip(("train", "valid"), rows, strict=True):
        cat = [rng.integers(3, c, n).astype(np.int32) for c in cards]
        cont = rng.standard_normal((N_CONT, n)).astype(np.float32)
        logit = (cat[0] % 2) * 2.0 - 1.0 + cont[0]
        if label_kind == "binary":
            label = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.float32)
        else:
            label = (2 * cont[0] + 1).astype(np.float32)
        if nan_from is not None and split == "train":
            cont[1, nan_from] = np.nan  # one bad row: the step whose batch holds it diverges
        cols = {f"C{i}": c for i, c in enumerate(cat)} | {f"I{j}": cont[j] for j in range(N_CONT)} | {"label": label}
        os.makedirs(out / split, exist_ok=True)
        pq.write_table(pa.table(cols), out / split / "part-00000.parquet", row_group_size=n)
    columns = [ColumnSchema(f"C{i}", "categorical", "int32", cardinality=c, embedding_dim=16)
               for i, c in enumerate(cards)]
    columns += [ColumnSchema(f"I{j}", "continuous", "float32") for j in range(N_CONT)]
    meta = {"rows": {"train": rows[0], "valid": rows[1]}}
    if oracle:
        meta["synthetic"] = {"oracle": {"valid_auc": 0.75, "valid_logloss": 0.55}}
    Schema([*columns, ColumnSchema("label", "label", "float32")], meta).save(out / "schema.json")
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return _write(tmp_path_factory.mktemp("processed"))


FAST = ["--batch-size", "128", "--embedding-dim", "4", "--layers", "16", "--bottom-layers", "8",
        "--no-progress", "--log-every", "4", "--threads", "1"]


@pytest.mark.parametrize("model", ["dlrm", "tabular"])
def test_fit_end_to_end(data, tmp_path, capsys, model):
    out = tmp_path / "run"
    assert main(["--data", str(data), "--model", model, "--out", str(out), "--epochs", "2", "--eval-every", "6",
                 "--optimizer", "adam", "--lr", "0.01", *FAST]) == 0
    text = capsys.readouterr().out
    assert "validation AUC" in text and "oracle AUC     0.75000" in text and "loader alone" in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 24 and summary["valid"]["auc"] > 0.7
    assert summary["loader_rows_per_s"] > 0 and summary["oracle"]["valid_auc"] == 0.75
    for name in ("config.json", "metrics.jsonl", "curve.png"):
        assert (out / name).exists(), name
    assert sorted(os.listdir(out / "checkpoints")) == ["ckpt-00000012.pt", "ckpt-00000018.pt", "ckpt-00000024.pt"]


def test_fit_resume_continues_the_run(data, tmp_path, capsys):
    out = tmp_path / "run"
    common = ["--data", str(data), "--out", str(out), "--checkpoint-every", "4", "--no-loader-bench", *FAST]
    assert main([*common, "--max-steps", "8"]) == 0
    capsys.readouterr()
    assert main([*common, "--max-steps", "12", "--resume"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["resumed_from"].endswith("ckpt-00000008.pt")


def test_fit_cache_trains_exactly_as_streaming(data, tmp_path):
    # --cache changes where epoch 2's rows come from (memory, not parquet), never which rows or their order.
    runs = {}
    for flag in ([], ["--cache"]):
        out = tmp_path / ("cached" if flag else "streamed")
        assert main(["--data", str(data), "--out", str(out), "--epochs", "2", "--no-loader-bench", *FAST, *flag]) == 0
        runs[bool(flag)] = json.loads((out / "summary.json").read_text())
    assert runs[True]["steps"] == runs[False]["steps"] == 24
    assert runs[True]["valid"] == runs[False]["valid"]


def test_fit_regression(tmp_path, capsys):
    d = _write(tmp_path / "reg", label_kind="regression", oracle=False)
    assert main(["--data", str(d), "--out", str(tmp_path / "r"), "--task", "regression", "--epochs", "3",
                 "--optimizer", "adam", "--lr", "0.01", "--no-loader-bench", *FAST]) == 0
    assert "validation RMSE" in capsys.readouterr().out


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and sum(x.startswith("error") for x in err) == 1, err
    assert not any("Traceback" in x for x in err), err
    return err[-1]


def test_bad_inputs_exit_2_with_one_line(data, tmp_path, capsys):
    assert "not a processed dataset" in _error(capsys, ["--data", str(tmp_path), *FAST])
    assert "no such directory" in _error(capsys, ["--data", str(tmp_path / "nope"), *FAST])
    assert "--batch-size must be >= 1, got 0" in _error(capsys, ["--data", str(data), "--batch-size", "0"])
    assert "invalid choice" in _error(capsys, ["--data", str(data), "--model", "xgboost"])
    no_run = ["--data", str(data), "--resume", "--out", str(tmp_path / "empty"), *FAST]
    assert "no checkpoint" in _error(capsys, no_run)
    used = tmp_path / "used" / "checkpoints"
    used.mkdir(parents=True)
    (used / "ckpt-00000007.pt").write_bytes(b"x")
    assert "already holds checkpoints" in _error(capsys, ["--data", str(data), "--out", str(used.parent), *FAST])


def test_schema_that_does_not_match_the_data(tmp_path, capsys):
    d = _write(tmp_path / "small", cards=[8, 20, 5])
    schema = json.loads((d / "schema.json").read_text())
    schema["columns"][1]["cardinality"] = 10  # ids go up to 19
    (d / "schema.json").write_text(json.dumps(schema))
    line = _error(capsys, ["--data", str(d), "--out", str(tmp_path / "r"), *FAST])
    assert "categorical feature 1: ids span" in line and "10 rows" in line


def test_schema_that_does_not_fit_the_model(tmp_path, capsys):
    d = _write(tmp_path / "nocont")
    schema = json.loads((d / "schema.json").read_text())
    schema["columns"] = [c for c in schema["columns"] if c["kind"] != "continuous"]
    (d / "schema.json").write_text(json.dumps(schema))
    assert "does not fit --model dlrm" in _error(capsys, ["--data", str(d), *FAST])


def test_a_non_finite_value_is_named_before_the_first_step(tmp_path, capsys):
    # One NaN in I1 used to surface as "loss is nan at step N" naming no column (the trainer's own NaN
    # check, naming the step and the last good checkpoint, is tests/test_train.py's).
    d = _write(tmp_path / "nan", rows=(1536, 256), nan_from=1000)
    line = _error(capsys, ["--data", str(d), "--out", str(tmp_path / "r"), "--checkpoint-every", "1", *FAST])
    assert "non-finite values" in line and "I1 (train): 1" in line
    assert not (tmp_path / "r").exists()


def test_resume_from_an_incompatible_checkpoint(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--data", str(data), "--out", str(out), "--max-steps", "2", "--no-loader-bench", *FAST]) == 0
    capsys.readouterr()
    wider = [x if x != "4" else "8" for x in FAST]  # --embedding-dim 8 (and --log-every 8)
    line = _error(capsys, ["--data", str(data), "--out", str(out), "--resume", "--max-steps", "4", *wider])
    assert "does not fit the model" in line


def test_resume_with_the_parquet_loader_is_exact(data, tmp_path):
    """Trainer + ctrflow.loader.Loader: a crash mid-epoch, then resume, gives the uninterrupted weights."""
    import torch

    from ctrflow.loader.loader import Loader
    from ctrflow.models import DLRM
    from ctrflow.train import Trainer

    class Crashing:
        def __init__(self, loader, at):
            self.loader, self.at, self.seen = loader, at, 0

        def __len__(self):
            return len(self.loader)

        def set_epoch(self, e):
            self.loader.set_epoch(e)

        def __iter__(self):
            for b in self.loader:
                self.seen += 1
                if self.seen > self.at:
                    raise KeyError("crash")
                yield b

    def model():
        torch.manual_seed(0)
        return DLRM(CARDS, N_CONT, 4, [8, 4], [8, 1])

    cfg = {"optimizer": "adam", "lr": 0.01, "epochs": 2, "checkpoint_every": 3, "verbose": False,
           "progress": False, "plot": False, "tensorboard": False}
    full = model()
    with Loader(data / "train", 128, seed=3) as train:
        Trainer(full, out_dir=str(tmp_path / "a"), **cfg).fit(train)
    with Loader(data / "train", 128, seed=3) as train, pytest.raises(KeyError):
        Trainer(model(), out_dir=str(tmp_path / "b"), **cfg).fit(Crashing(train, at=17))
    resumed = model()
    with Loader(data / "train", 128, seed=3) as train:
        out = Trainer(resumed, out_dir=str(tmp_path / "b"), **cfg).fit(train, resume=True)
    assert out["resumed_from"].endswith("ckpt-00000015.pt")
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_stop_and_resume_equals_the_uninterrupted_run(data, tmp_path, capsys):
    # --stop-after stops without shortening the lr schedule, so stop + --resume is the whole run, bit for bit.
    import torch

    common = ["--data", str(data), "--no-loader-bench", "--epochs", "2", "--eval-every", "0", *FAST]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert main([*common, "--out", str(whole)]) == 0
    capsys.readouterr()
    assert main([*common, "--out", str(parts), "--stop-after", "7"]) == 0
    out = capsys.readouterr()
    assert "stopped at step 7 of 24" in out.out
    assert main([*common, "--out", str(parts), "--resume"]) == 0
    out = capsys.readouterr()
    assert "resuming at step 7 of 24 (epoch 0, batch 7 of 12)" in out.err and "resumed from" in out.out
    a, b = (json.loads((d / "summary.json").read_text()) for d in (whole, parts))
    assert a["steps"] == b["steps"] == 24 and a["valid"] == b["valid"]
    wa = torch.load(whole / "checkpoints" / "ckpt-00000024.pt", weights_only=False)["model"]
    wb = torch.load(parts / "checkpoints" / "ckpt-00000024.pt", weights_only=False)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_task_comes_from_the_schema(tmp_path, capsys):
    d = _write(tmp_path / "reg", label_kind="regression", oracle=False)
    schema = json.loads((d / "schema.json").read_text())
    schema["task"] = "regression"  # what etl/run.py --task regression records
    (d / "schema.json").write_text(json.dumps(schema))
    assert main(["--data", str(d), "--out", str(tmp_path / "r"), "--no-loader-bench", *FAST]) == 0
    assert "validation RMSE" in capsys.readouterr().out
    line = _error(capsys, ["--data", str(d), "--out", str(tmp_path / "b"), "--task", "binary", *FAST])
    assert "--task binary contradicts" in line and "regression" in line
    assert not (tmp_path / "b").exists()  # a refused run writes nothing


def test_refused_run_leaves_the_run_dir_alone(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--data", str(data), "--out", str(out), "--max-steps", "2", "--no-loader-bench", *FAST]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert "already holds checkpoints" in _error(capsys, ["--data", str(data), "--out", str(out), "--model",
                                                         "tabular", *FAST])
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_help_shows_every_default(capsys):
    from ctrflow.train.fit import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--model", "--epochs", "--optimizer", "--decay", "--grad-accum", "--task", "--seed", "--log-every",
                 "--valid-batch-size", "--parts-per-chunk", "--no-progress", "--data", "--batch-size"):
        assert flag in text
    for shown in ("(default: dlrm)", "(default: 1)", "(default: data/processed)", "(default: 512)",
                  "(default: adam)", "(default: 512,256)", "(default: 65536)", "(default: cosine)"):
        assert shown in text, shown


def test_help_has_text_for_every_flag():
    import argparse

    from ctrflow.train import fit_args as fit

    seen = []

    class Spy(fit._Parser):
        def parse_args(self, argv=None, namespace=None):  # noqa: D102 - capture the parser, parse nothing
            seen.append(self)
            return super().parse_args([], namespace)

    orig = fit._Parser
    fit._Parser = Spy
    try:
        fit.parse_args([])
    finally:
        fit._Parser = orig
    actions = [x for x in seen[0]._actions if not isinstance(x, argparse._HelpAction)]
    assert actions and all(x.help for x in actions), [x.dest for x in actions if not x.help]


def test_cli_defaults_are_the_config_defaults(capsys):
    # One home per default: fit.py's flags, TrainConfig / ctrflow.models.defaults and --help agree.
    import dataclasses

    from ctrflow.models import defaults as md
    from ctrflow.train.config import EMBEDDING_LR, LR, ROW_WARMUP, TrainConfig
    from ctrflow.train.fit import parse_args

    a = parse_args([])
    cfg = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    pairs = {"batch_size": "batch_size", "valid_batch_size": "valid_batch_size", "epochs": "epochs",
             "optimizer": "optimizer", "warmup": "warmup_steps", "decay": "decay", "min_lr_factor": "min_lr_factor",
             "grad_accum": "grad_accum", "log_every": "log_every", "checkpoint_every": "checkpoint_every",
             "keep": "keep_checkpoints", "device": "device", "embedding_optimizer": "embedding_optimizer"}
    for flag, field in pairs.items():
        assert getattr(a, flag) == cfg[field], (flag, getattr(a, flag), cfg[field])
    assert a.layers == a.bottom_layers == list(md.HIDDEN)
    built = TrainConfig()  # lr / embedding_lr by rule: the values fit.py trains with
    assert built.lr == LR[a.optimizer] and built.embedding_lr == EMBEDDING_LR[a.optimizer]
    assert a.embedding_row_warmup is None and built.embedding_row_warmup == ROW_WARMUP  # lazy Adam tables only
    assert TrainConfig(optimizer="adagrad").embedding_row_warmup == 0
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag, field in pairs.items():
        if cfg[field] is not None:
            assert f"--{flag.replace('_', '-')}" in text and f"(default: {cfg[field]})" in text, flag
    assert f"(default: {','.join(map(str, md.HIDDEN))})" in text
    assert f"default {md.DLRM_EMBEDDING_DIM}" in text and f"default {md.TABULAR_MAX_DIM}" in text
    assert f"adam {LR['adam']:g}" in text and f"adam {EMBEDDING_LR['adam']:g}" in text


def test_unwritable_run_dir_is_refused_before_any_work(data, tmp_path, capsys):
    if os.geteuid() == 0:  # root writes anywhere: use a path under a regular file instead
        blocker = tmp_path / "file"
        blocker.write_text("x")
        out = blocker / "run"
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        out = locked / "run"
    line = _error(capsys, ["--data", str(data), "--out", str(out), *FAST])
    assert "--out" in line and ("is a file" in line or "is not writable" in line)


def test_raw_string_data_with_a_copied_schema_is_one_line(data, tmp_path, capsys):
    # Raw (string) parquet beside a schema.json copied from a processed set: a TypeError traceback before.
    raw = tmp_path / "raw"
    for split in ("train", "valid"):
        (raw / split).mkdir(parents=True)
        t = pq.read_table(next((data / split).glob("*.parquet")))
        cols = {n: (pa.array([f"h{v}" for v in t[n].to_pylist()]) if n.startswith("C") else t[n])
                for n in t.column_names}
        pq.write_table(pa.table(cols), raw / split / "part-0.parquet")
    (raw / "schema.json").write_text((data / "schema.json").read_text())
    line = _error(capsys, ["--data", str(raw), "--out", str(tmp_path / "r"), *FAST])
    assert "categorical column 'C0'" in line and "run it on the raw files" in line


def test_a_corrupt_newest_checkpoint_falls_back_to_the_newest_readable(data, tmp_path, capsys):
    out = tmp_path / "run"
    common = ["--data", str(data), "--out", str(out), "--checkpoint-every", "2", "--no-loader-bench", *FAST]
    assert main([*common, "--stop-after", "6"]) == 0
    (out / "checkpoints" / "ckpt-00000006.pt").write_bytes(b"truncated by a full disk")
    capsys.readouterr()
    assert main([*common, "--resume"]) == 0
    err = capsys.readouterr().err
    assert "cannot read checkpoint" in err and "ckpt-00000006.pt" in err
    assert "resuming from the newest readable one" in err and "ckpt-00000004.pt" in err
    assert json.loads((out / "summary.json").read_text())["resumed_from"].endswith("ckpt-00000004.pt")


def test_fit_reports_the_best_epoch(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--data", str(data), "--out", str(out), "--epochs", "3", "--no-loader-bench", *FAST]) == 0
    text = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    best = summary["best"]
    assert best["step"] in (12, 24, 36) and f"best checkpoint: step {best['step']} of 36 by auc" in text
    assert summary["valid"]["auc"] == best["value"] and (out / "best.pt").exists()
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals if e["kind"] == "valid"] == [12, 24, 36]  # per epoch by default


def test_regularisation_flags_reach_the_optimizers(data, tmp_path):
    out = tmp_path / "run"
    assert main(["--data", str(data), "--out", str(out), "--max-steps", "2", "--weight-decay", "0.01",
                 "--embedding-l2", "0.001", "--grad-clip", "0.5", "--no-loader-bench", *FAST]) == 0
    import torch

    state = torch.load(out / "checkpoints" / "ckpt-00000002.pt", weights_only=True)
    dense, tables = (o["param_groups"][0] for o in state["optimizers"])
    assert dense["weight_decay"] == 0.01 and tables["l2"] == 0.001 and tables["clip"] == 0.0
    assert state["config"]["train"]["grad_clip"] == 0.5
    assert main(["--data", str(data), "--out", str(tmp_path / "bad"), "--grad-clip", "-1", "--no-loader-bench",
                 *FAST]) == 2


def test_row_warmup_flag_reaches_the_tables_and_checkpoints_its_counts(data, tmp_path):
    import torch

    from ctrflow.train.config import ROW_WARMUP

    def tables(run):
        state = torch.load(run / "checkpoints" / "ckpt-00000002.pt", weights_only=True)
        return state["optimizers"][1]

    assert main(["--data", str(data), "--out", str(tmp_path / "d"), "--max-steps", "2", "--no-loader-bench",
                 *FAST]) == 0
    default = tables(tmp_path / "d")
    assert default["param_groups"][0]["row_warmup"] == ROW_WARMUP > 0
    seen = [v["row_seen"] for v in default["state"].values()]
    assert seen and all(int(s.sum()) > 0 for s in seen)  # each table's lookups, kept for a resumed run
    assert main(["--data", str(data), "--out", str(tmp_path / "o"), "--max-steps", "2", "--no-loader-bench",
                 "--embedding-row-warmup", "0", *FAST]) == 0
    off = tables(tmp_path / "o")
    assert off["param_groups"][0]["row_warmup"] == 0 and all("row_seen" not in v for v in off["state"].values())
    for bad in (["--embedding-row-warmup", "-1"], ["--embedding-row-warmup", "8", "--optimizer", "adagrad"]):
        assert main(["--data", str(data), "--out", str(tmp_path / "bad"), "--no-loader-bench", *bad, *FAST]) == 2


def test_dropout_flag_reaches_the_model(data, tmp_path):
    out = tmp_path / "run"
    assert main(["--data", str(data), "--out", str(out), "--max-steps", "2", "--dropout", "0.2", "--no-loader-bench",
                 *FAST]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"]["dropout"] == 0.2
