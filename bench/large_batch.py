"""Large-batch benchmark (issue #16): AUC, logloss, rows/s and peak RSS of ``train/fit.py`` by batch size.

One generated dataset (``etl/run.py --synthetic-rows ROWS``, processed once into
``CACHE/bench/large-batch-rows-<ROWS>-seed<S>-v<generator version>`` and reused; CACHE is ``--cache-dir``,
else ``$CTRFLOW_CACHE_DIR``, else ``$XDG_CACHE_HOME/ctrflow`` or ``~/.cache/ctrflow``), then one DLRM run per
configuration, each in its own process, all with the same ``--epochs`` and seed:

- every ``--batches`` size with the batch rule (``ctrflow.train.scaling``, fit.py's default);
- every ``--without`` size with ``--no-batch-scaling`` (the batch-512 defaults at any batch: the old behaviour).

Each run is ``python train/fit.py --data DATA --batch-size B --epochs E --eval-every 0 --no-loader-bench
--checkpoint-every 0 --device cpu`` (validation and a checkpoint only at the end of each epoch). Reported per
run: optimizer steps, validation AUC and logloss (and the generator's oracle AUC), AUC minus the AUC of the
first ``--batches`` size with the rule (the baseline, 1024 by default), training rows/s and its ratio to the
baseline's, and the process's peak RSS (``os.wait4``'s ``ru_maxrss``: this child alone). Training seconds are
the sum of the trainer's logged windows (``metrics.jsonl``) less the validations that fell inside them: the
end-of-run validation, the checkpoints and the interpreter start are left out (whole-process wall time is
recorded too). The load average before and after each run goes into the JSON: the machine may be shared.

Goals (issue #16): AUC at 65536 >= AUC at 1024 - 0.001, AUC at 400000 >= AUC at 1024 - 0.002, and rows/s at
65536 and 400000 >= rows/s at 1024; they are evaluated in the JSON (``goals``) when those sizes ran.

Usage:
    python bench/large_batch.py                      # 40M rows, 1 epoch: 1024 / 8192 / 65536 / 400000 (+ 2 off)
    python bench/large_batch.py --rows 4000000 --batches 1024,8192,65536 --without 8192,65536
    python bench/large_batch.py --rows 4000000 --epochs 3 --batches 1024,65536 --without 65536
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

from ctrflow.bench.machine import describe_machine
from ctrflow.bench.paths import add_output_args, announce, bench_dir, json_path, scratch, write_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIT = os.path.join(ROOT, "train", "fit.py")
ETL = os.path.join(ROOT, "etl", "run.py")
# The issue's goals: (batch, largest AUC loss against the baseline batch).
AUC_GOALS = ((65536, 0.001), (400000, 0.002))


def _sizes(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated batch sizes, got {text!r}") from None
    if any(x < 1 for x in out):
        raise argparse.ArgumentTypeError(f"batch sizes must be >= 1, got {text!r}")
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=40_000_000, help="generated rows, train + valid (default 40,000,000)")
    p.add_argument("--epochs", type=int, default=1, help="epochs of every run (default 1)")
    p.add_argument("--batches", type=_sizes, default=[1024, 8192, 65536, 400000],
                   help="batch sizes run with the batch rule; the first is the baseline "
                        "(default 1024,8192,65536,400000)")
    p.add_argument("--without", type=_sizes, default=[65536, 400000],
                   help="batch sizes also run with --no-batch-scaling (default 65536,400000; '' for none)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generator and of every run (default 0)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per run (default: torch's choice)")
    p.add_argument("--fit-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for every fit.py run (repeatable; e.g. --fit-arg=--amp)")
    add_output_args(p, "large_batch")
    a = p.parse_args(argv)
    if a.rows < 100 or a.epochs < 1 or not a.batches:
        p.error("--rows must be >= 100, --epochs >= 1, and --batches must name at least one size")
    return a


def dataset(rows: int, seed: int, cache: str | None) -> str:
    """The processed dataset of ``rows`` generated rows: made once with ``etl/run.py``, then reused.

    Args:
        rows: ``--synthetic-rows`` (train + valid).
        seed: the generator's seed.
        cache: the ``--cache-dir`` value, or None.

    Returns:
        The processed directory (``train/``, ``valid/``, ``schema.json``).
    """
    from ctrflow.etl import synthetic

    out = bench_dir(cache, f"large-batch-rows-{rows}-seed{seed}-v{synthetic.VERSION}")
    reused = os.path.exists(os.path.join(out, "schema.json"))
    if not reused:
        # etl/run.py writes to a temporary directory and renames it when complete: no half dataset is reused.
        cmd = [sys.executable, ETL, "--synthetic-rows", str(rows), "--seed", str(seed), "--output", out,
               "--no-progress", "--overwrite"]
        if cache:
            cmd += ["--cache-dir", cache]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()[-800:]}")
    announce(out, reused)
    return out


def train_seconds(records: list[dict[str, Any]]) -> float:
    """Seconds spent training: the logged windows (``ms_per_step`` x steps) less validations inside them.

    Args:
        records: ``metrics.jsonl``'s records of one run.
    """
    train = [r for r in records if r["kind"] == "train"]
    total, prev = 0.0, 0
    for r in train:
        total += r["ms_per_step"] * (r["step"] - prev) / 1000
        prev = r["step"]
    # A validation at an epoch's end (not the run's last step) is timed in the next window.
    inside = sum(r["seconds"] for r in records if r["kind"] == "valid" and r["step"] < prev)
    return total - inside


def run_fit(data: str, batch: int, rule: bool, a: argparse.Namespace, out: str) -> dict[str, Any]:
    """One ``train/fit.py`` process; its metrics, rates and peak RSS.

    Args:
        data: the processed dataset.
        batch: ``--batch-size``.
        rule: the batch rule on (fit.py's default) or off (``--no-batch-scaling``).
        a: the benchmark's flags (epochs, seed, threads, extra fit.py arguments).
        out: the run directory (created by fit.py).

    Returns:
        One result row (see the module docstring).
    """
    cmd = [sys.executable, FIT, "--data", data, "--out", out, "--batch-size", str(batch), "--epochs", str(a.epochs),
           "--eval-every", "0", "--no-loader-bench", "--checkpoint-every", "0", "--keep", "1", "--device", "cpu",
           "--no-progress", "--seed", str(a.seed), "--log-every", "10"]
    if a.threads:
        cmd += ["--threads", str(a.threads)]
    if not rule:
        cmd.append("--no-batch-scaling")
    cmd += a.fit_arg
    log = f"{out}.log"
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        # wait4: the rusage of this child alone (RUSAGE_CHILDREN would be the maximum over all runs so far).
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    with open(log) as f:
        text = f.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {text.strip()[-1500:]}")
    with open(os.path.join(out, "summary.json")) as f:
        s = json.load(f)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    with open(os.path.join(out, "config.json")) as f:
        lr = json.load(f).get("lr")
    secs = train_seconds(records)
    valid = s.get("valid") or {}
    oracle = (s.get("oracle") or {}).get("valid_auc")
    lines = text.splitlines()
    return {
        "batch": batch, "rule": rule, "epochs": s["epochs"], "steps": s["steps"],
        "auc": valid.get("auc"), "logloss": valid.get("logloss"), "oracle_auc": oracle,
        "auc_minus_oracle": valid["auc"] - oracle if oracle is not None and "auc" in valid else None,
        "train_rows": s["rows"], "train_seconds": secs, "rows_per_s": s["rows"] / secs if secs > 0 else float("nan"),
        "run_seconds": s["seconds"], "wall_seconds": wall, "peak_rss_gib": usage.ru_maxrss * 1024 / 2**30,
        "cpu_seconds": usage.ru_utime + usage.ru_stime,  # whole process: less disturbed by a shared machine
        "lr": lr, "scaling": next((ln for ln in lines if ln.startswith("batch scaling:")), None),
        "warnings": [ln for ln in lines if ln.startswith("warning:")],
        "load_avg_before": [round(x, 2) for x in load_before],
        "load_avg_after": [round(x, 2) for x in os.getloadavg()],
        "command": " ".join(cmd),
    }


def compare(results: list[dict[str, Any]]) -> None:
    """Add AUC and rows/s against the baseline (the first row: first ``--batches`` size, rule on) in place."""
    base = results[0]
    for r in results:
        r["auc_vs_base"] = r["auc"] - base["auc"] if r["auc"] is not None and base["auc"] is not None else None
        r["rows_per_s_vs_base"] = r["rows_per_s"] / base["rows_per_s"]


def goals(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's goals, for the sizes that ran with the rule against a baseline of 1024 (else {})."""
    base = results[0]
    if base["batch"] != 1024 or not base["rule"]:
        return {}
    out: dict[str, Any] = {}
    for batch, loss in AUC_GOALS:
        r = next((r for r in results if r["batch"] == batch and r["rule"]), None)
        if r is None:
            continue
        out[f"auc_{batch}"] = {"auc_vs_1024": r["auc_vs_base"], "allowed": -loss, "met": r["auc_vs_base"] >= -loss}
        out[f"rows_per_s_{batch}"] = {"ratio_vs_1024": r["rows_per_s_vs_base"], "met": r["rows_per_s_vs_base"] >= 1.0}
    return out


def table(results: list[dict[str, Any]]) -> str:
    """The result rows as a fixed-width text table."""
    base = results[0]
    lines = [f"{'batch':>8} {'rule':>4} {'steps':>7} {'AUC':>8} {'vs ' + str(base['batch']):>9} {'logloss':>8} "
             f"{'rows/s':>9} {'vs ' + str(base['batch']):>8} {'peak RSS':>9}"]
    for r in results:
        auc = f"{r['auc']:.5f}" if r["auc"] is not None else "-"
        dv = f"{r['auc_vs_base']:+.5f}" if r["auc_vs_base"] is not None else "-"
        ll = f"{r['logloss']:.5f}" if r["logloss"] is not None else "-"
        lines.append(f"{r['batch']:>8,} {'on' if r['rule'] else 'off':>4} {r['steps']:>7,} {auc:>8} {dv:>9} {ll:>8} "
                     f"{r['rows_per_s']:>9,.0f} {r['rows_per_s_vs_base']:>7.2f}x {r['peak_rss_gib']:>6.2f} GiB")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark: table on stdout, JSON where ``--json`` says; returns the exit status."""
    a = parse_args(argv)
    load_before = os.getloadavg()
    try:
        data = dataset(a.rows, a.seed, a.cache_dir)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    configs = [(b, True) for b in a.batches] + [(b, False) for b in a.without]
    results: list[dict[str, Any]] = []
    with scratch(a.cache_dir, "large-batch") as work:
        for batch, rule in configs:
            print(f"batch {batch:,}, rule {'on' if rule else 'off'} ...", file=sys.stderr, flush=True)
            try:
                results.append(run_fit(data, batch, rule, a, os.path.join(work, f"b{batch}-{'on' if rule else 'off'}")))
            except RuntimeError as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
    compare(results)
    machine = describe_machine()
    machine["loadavg_1_5_15_before"] = [round(x, 2) for x in load_before]
    machine["loadavg_1_5_15_after"] = [round(x, 2) for x in os.getloadavg()]
    with open(os.path.join(data, "schema.json")) as f:
        schema = json.load(f)
    oracle = results[0]["oracle_auc"]
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']} GiB, GPU: {machine['gpu']}; "
          f"load avg {machine['loadavg_1_5_15_before'][0]} before, {machine['loadavg_1_5_15_after'][0]} after")
    print(f"DLRM defaults, {a.epochs} epoch(s) on {data} ({a.rows:,} generated rows)"
          + (f"; oracle valid AUC {oracle:.5f}" if oracle is not None else ""))
    print(table(results))
    met = goals(results)
    for name, g in met.items():
        numbers = ", ".join(f"{k} {v:.4g}" for k, v in g.items() if k != "met")
        print(f"goal {name}: {'met' if g['met'] else 'NOT met'} ({numbers})")
    report = {"benchmark": "large_batch", "date": time.strftime("%Y-%m-%d"),
              "command": "python bench/large_batch.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": machine, "data": data, "rows": a.rows, "epochs": a.epochs,
              "row_counts": schema.get("rows"), "baseline": {"batch": results[0]["batch"], "rule": results[0]["rule"]},
              "results": results, "goals": met}
    write_json(json_path(a, "large_batch"), report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
