"""Incremental days: train day by day with ``--update`` / ``--resume`` vs. once on all days.

The embedded generator's training rows (``etl/synthetic.py``, seed 0) are split into ``--days``
files in row order (one day each); the validation split is the same for every system. The raw days
are generated once into ``CACHE/bench/incremental-raw-<rows>-seed<seed>-days<days>-v<version>`` and
reused (CACHE: ``--cache-dir``, else ``$CTRFLOW_CACHE_DIR``, else ``$XDG_CACHE_HOME/ctrflow`` or
``~/.cache/ctrflow``); the processed days and training runs go to ``--work`` when given (kept), else
to a scratch directory under CACHE/bench that is removed at the end.

- ``incremental``: ``etl/run.py`` on day 1, ``train/fit.py`` on it; then for each later day
  ``etl/run.py --update PREV --input DAY`` (stats merged, ids kept, new categories appended) and
  ``train/fit.py --resume RUN --data NEW`` (tables grown, optimizer state kept, the lr schedule
  restarted for the day). Validation after each day on the same raw rows.
- ``all days at once``: ``etl/run.py`` on all days, ``train/fit.py`` for one epoch: the same rows,
  the same number of steps, the same model and optimizer settings.
- ``refit ETL``: what a user without updates runs each day: ``etl/run.py`` on days 1..d (time only).

The loss spike at each switch: mean training loss over the first ``--window`` steps on the new
day minus the mean over the last ``--window`` steps of the day before (the all-at-once run's loss
over the same steps, which sees no switch, is printed beside it).

Usage:
    python bench/incremental.py                       # 1M rows, 4 days: table + CACHE/bench/incremental.json
    python bench/incremental.py --rows 2000000 --days 4 --threads 2
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as train/fit.py: before torch loads

import argparse  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

from ctrflow.bench.machine import describe_machine  # noqa: E402
from ctrflow.bench.paths import add_output_args, announce, bench_dir, json_path, scratch, write_json  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000, help="generated rows (train + 10%% valid)")
    p.add_argument("--days", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", choices=("dlrm", "tabular"), default="dlrm")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--decay", type=float, default=None, help="--decay of every update (default none)")
    p.add_argument("--window", type=int, default=50, help="steps averaged on each side of a switch")
    p.add_argument("--work", default=None,
                   help="keep the processed days and runs here (replaced); default: a scratch directory, removed")
    add_output_args(p, "incremental")
    a = p.parse_args(argv)
    if a.days < 2:
        p.error("--days must be >= 2")
    return a


def _quiet(fn, argv: list[str]) -> float:
    """Run a CLI ``main(argv)`` with its stdout captured; returns seconds (raises on a non-zero exit)."""
    t = time.perf_counter()
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = fn(argv)
    if rc != 0:
        raise SystemExit(f"{argv} exited with {rc}:\n{buf.getvalue()}")
    return time.perf_counter() - t


def _train_losses(run: str) -> dict[int, float]:
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if r.get("kind") == "train"}


def _window(losses: dict[int, float], lo: int, hi: int) -> float:
    vals = [v for s, v in losses.items() if lo < s <= hi]
    return float(np.mean(vals)) if vals else float("nan")


def raw_days(a: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """The raw data, one training file per day: generated once into the cache, then reused.

    Args:
        a: parsed arguments (rows, seed, days, cache_dir).

    Returns:
        (raw directory, the generator's metadata).
    """
    from ctrflow.etl import synthetic

    raw = bench_dir(a.cache_dir, f"incremental-raw-{a.rows}-seed{a.seed}-days{a.days}-v{synthetic.VERSION}")
    meta_path = os.path.join(raw, "synthetic.json")  # written last: present means complete
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
        announce(raw, reused=True)
        return raw, meta
    train_rows = a.rows - int(round(a.rows * 0.1))
    t = time.perf_counter()
    meta = synthetic.generate(raw, rows=a.rows, seed=a.seed, part_rows=-(-train_rows // a.days))
    print(f"generated {a.rows:,} rows in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    announce(raw, reused=False)
    return raw, meta


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark: tables on stdout, JSON where ``--json`` says.

    Args:
        argv: arguments without the program name (None: ``sys.argv[1:]``).

    Returns:
        The report that was written as JSON.
    """
    a = parse_args(argv)
    if a.work:  # the user asked to keep the outputs
        if os.path.exists(a.work):
            shutil.rmtree(a.work)
        return _run(a, a.work)
    with scratch(a.cache_dir, "incremental") as work:
        return _run(a, work)


def _run(a: argparse.Namespace, work: str) -> dict[str, Any]:
    """Both systems on the cached raw days; processed days and runs under ``work``."""
    from ctrflow.etl.run import main as etl
    from ctrflow.etl.schema import Schema
    from ctrflow.train.fit import main as fit

    machine = describe_machine()
    raw, meta = raw_days(a)
    train_rows = a.rows - int(round(a.rows * 0.1))
    days = sorted(os.path.join(raw, "train", f) for f in os.listdir(os.path.join(raw, "train")))
    assert len(days) == a.days, days
    valid = os.path.join(raw, "valid")
    print(f"{a.days} days of ~{train_rows // a.days:,} train rows, {a.rows - train_rows:,} valid rows; "
          f"oracle valid AUC {meta['oracle']['valid_auc']:.5f}")

    fit_args = ["--model", a.model, "--batch-size", str(a.batch_size), "--threads", str(a.threads),
                "--eval-every", "0", "--log-every", "1", "--no-progress", "--no-loader-bench", "--seed", str(a.seed)]
    etl_args = ["--valid", valid, "--no-progress"]
    res: dict[str, Any] = {"machine": machine, "args": vars(a), "raw": raw, "oracle": meta["oracle"], "days": []}

    # (a) day by day
    run_a = os.path.join(work, "run-incremental")
    prev = None
    for d, day in enumerate(days, 1):
        out = os.path.join(work, f"day{d}")
        if prev is None:
            etl_s = _quiet(etl, ["--input", day, "--output", out, *etl_args])
            fit_s = _quiet(fit, ["--data", out, "--out", run_a, *fit_args])
        else:
            upd = ["--update", prev, "--input", day, "--output", out, *etl_args]
            etl_s = _quiet(etl, upd + (["--decay", str(a.decay)] if a.decay else []))
            fit_s = _quiet(fit, ["--resume", run_a, "--data", out, *fit_args])
        with open(os.path.join(run_a, "summary.json")) as f:
            s = json.load(f)
        schema = Schema.load(out)
        refit_s = None
        if d > 1:  # the baseline ETL: refit on every day so far
            refit_s = _quiet(etl, ["--input", *days[:d], "--output", os.path.join(work, "refit"), "--overwrite",
                                   *etl_args])
        res["days"].append({
            "day": d, "etl_s": etl_s, "refit_etl_s": refit_s, "fit_s": fit_s, "steps": s["steps"],
            "valid_auc": s["valid"]["auc"], "valid_logloss": s["valid"]["logloss"],
            "total_cardinality": sum(c.cardinality for c in schema.columns if c.kind == "categorical"),
            "grown_columns": len((schema.metadata.get("update") or {}).get("grown", {})),
        })
        print(f"day {d}: etl {etl_s:.1f} s{'' if refit_s is None else f' (refit {refit_s:.1f} s)'}, fit {fit_s:.1f} s,"
              f" step {s['steps']}, valid AUC {s['valid']['auc']:.5f}, rows in tables "
              f"{res['days'][-1]['total_cardinality']:,}", flush=True)
        prev = out

    # (b) all days at once
    run_b = os.path.join(work, "run-all")
    full = os.path.join(work, "all")
    etl_b = _quiet(etl, ["--input", *days, "--output", full, *etl_args])
    fit_b = _quiet(fit, ["--data", full, "--out", run_b, *fit_args])
    with open(os.path.join(run_b, "summary.json")) as f:
        sb = json.load(f)
    res["all"] = {"etl_s": etl_b, "fit_s": fit_b, "steps": sb["steps"], "valid_auc": sb["valid"]["auc"],
                  "valid_logloss": sb["valid"]["logloss"]}
    print(f"all days: etl {etl_b:.1f} s, fit {fit_b:.1f} s, step {sb['steps']}, valid AUC {sb['valid']['auc']:.5f}")

    # loss at each switch
    la, lb, w = _train_losses(run_a), _train_losses(run_b), a.window
    res["switches"] = []
    for d in range(1, a.days):
        s = res["days"][d - 1]["steps"]
        before, after = _window(la, s - w, s), _window(la, s, s + w)
        res["switches"].append({"to_day": d + 1, "step": s, "before": before, "after": after, "spike": after - before,
                                "all_before": _window(lb, s - w, s), "all_after": _window(lb, s, s + w)})
    _print_table(res)
    write_json(json_path(a, "incremental"), res)
    return res


def _print_table(res: dict[str, Any]) -> None:
    m = res["machine"]
    print(f"\nmachine: {m['cpu']}, {m['cores']} cores, load {m['load_avg']}")
    print(f"{'system':<34} {'steps':>6} {'valid AUC':>10} {'logloss':>8} {'- oracle':>9}")
    oracle = res["oracle"]["valid_auc"]
    last = res["days"][-1]
    for name, r in ((f"incremental ({len(res['days'])} days, update+resume)", last), ("all days at once", res["all"])):
        print(f"{name:<34} {r['steps']:>6} {r['valid_auc']:>10.5f} {r['valid_logloss']:>8.5f} "
              f"{r['valid_auc'] - oracle:>+9.5f}")
    print(f"\n{'switch':>8} {'step':>6} {'loss before':>11} {'after':>7} {'spike':>7}   all-at-once same steps")
    for s in res["switches"]:
        print(f"{'-> day ' + str(s['to_day']):>8} {s['step']:>6} {s['before']:>11.4f} {s['after']:>7.4f} "
              f"{s['spike']:>+7.4f}   {s['all_before']:.4f} -> {s['all_after']:.4f}")
    print(f"\n{'day':>4} {'update s':>9} {'refit s':>8} {'valid AUC':>10} {'table rows':>11} {'grown cols':>10}")
    for d in res["days"]:
        refit = "" if d["refit_etl_s"] is None else f"{d['refit_etl_s']:.1f}"
        print(f"{d['day']:>4} {d['etl_s']:>9.1f} {refit:>8} {d['valid_auc']:>10.5f} {d['total_cardinality']:>11,} "
              f"{d['grown_columns']:>10}")


if __name__ == "__main__":
    main()
