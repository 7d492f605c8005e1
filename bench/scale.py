"""Scale-out benchmark: ``etl/run.py`` single-process vs on a local Dask cluster of 1, 2, ... workers.

Every configuration runs the same command on the same raw data (the ETL benchmark's Criteo-shaped
generator output, ``CACHE/bench/etl-raw-<rows>-...``, created once by ``bench/etl.py``'s ``raw_data``;
CACHE is ``--cache-dir``, else ``$CTRFLOW_CACHE_DIR``, else ``$XDG_CACHE_HOME/ctrflow`` or ``~/.cache/ctrflow``):
``python etl/run.py --input RAW/train --valid RAW/valid --format parquet --output OUT --no-progress``
plus ``--workers N`` for the cluster runs, each in a fresh process. Reported per configuration: the
ETL's own fit and transform+write seconds (from the output's ``schema.json``), rows/s over train +
valid, the wall time of the whole process (interpreter start, cluster start and stop included), and
the speed-up over the single-process run. The single-process output is kept in
``CACHE/bench/scale-single-<raw>-<hash>`` (``--skip-etl`` trains on it again); the cluster outputs and
training runs go to a scratch directory under CACHE/bench, removed at the end. Configurations
alternate run by run so that background
load hits them alike; the table shows each one's fastest run. The outputs' schemas and fitted
statistics are compared across configurations (they must be identical).

With ``--train-ranks 1 2`` it also times ``train/fit.py`` (DLRM, ``--batch-size`` rows per rank)
on the single-process output: one plain process with all cores as threads, and ``torchrun
--nproc_per_node=N`` with cores / N threads per rank; samples/s of all ranks together from rank 0's
``metrics.jsonl`` (the first logged window, warm-up, left out).

Usage:
    python bench/scale.py                           # 2M rows: no cluster, --workers 1, --workers 2
    python bench/scale.py --workers 1 2 4 --repeat 3 --rows 2000000
    python bench/scale.py --train-ranks 1 2 --train-steps 120
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Any

from ctrflow.bench.machine import describe_machine
from ctrflow.bench.paths import add_output_args, bench_dir, json_path, scratch, write_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_etl(raw: str, out: str, workers: int | None, cwd: str) -> dict[str, Any]:
    """One ``etl/run.py`` process in ``cwd`` (a scratch directory: Dask may leave files in the cwd).

    Returns:
        Its timings (from schema.json), wall seconds, rows/s and an identity string of its outputs.
    """
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, os.path.join(ROOT, "etl", "run.py"), "--input", os.path.join(raw, "train"),
           "--valid", os.path.join(raw, "valid"), "--format", "parquet", "--output", out, "--no-progress"]
    if workers:
        cmd += ["--workers", str(workers)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()[-800:]}")
    with open(os.path.join(out, "schema.json")) as f:
        schema = json.load(f)
    with open(os.path.join(out, "workflow", "workflow.json")) as f:
        fitted = json.load(f).get("fitted")
    etl, rows = schema["etl"], schema["rows"]
    return {"config": f"--workers {workers}" if workers else "no cluster", "workers": workers,
            "fit_s": etl["fit_seconds"], "transform_write_s": etl["transform_write_seconds"],
            "etl_s": etl["seconds"], "wall_s": wall, "rows": rows["train"] + rows["valid"],
            "rows_per_s": (rows["train"] + rows["valid"]) / etl["seconds"],
            "_identity": json.dumps([schema["columns"], rows, fitted], sort_keys=True)}


def run_fit(data: str, ranks: int, steps: int, batch: int, out: str, cwd: str) -> dict[str, Any]:
    """``train/fit.py`` on ``data`` with ``ranks`` processes (torchrun when > 1), run in ``cwd``; samples/s."""
    import socket

    shutil.rmtree(out, ignore_errors=True)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores // ranks)
    log_every = max(1, steps // 6)
    args = [os.path.join(ROOT, "train", "fit.py"), "--data", data, "--out", out, "--batch-size", str(batch),
            "--max-steps", str(steps), "--log-every", str(log_every), "--eval-every", "0", "--threads", str(threads),
            "--device", "cpu", "--no-loader-bench", "--no-progress"]
    if ranks > 1:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}",
               "--master-addr", "127.0.0.1", f"--master-port={port}", *args]
    else:
        cmd = [sys.executable, *args]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()[-800:]}")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    train = [r for r in recs if r["kind"] == "train"][1:]  # the first window holds the warm-up
    valid = [r for r in recs if r["kind"] == "valid"]
    rate = sum(r["rows_per_s"] for r in train) / len(train) * ranks  # rank 0's rate x ranks (equal batches)
    return {"ranks": ranks, "threads_per_rank": threads, "batch_per_rank": batch, "steps": steps,
            "samples_per_s": rate, "valid_auc": valid[-1]["auc"] if valid else None}


def train_table(results: list[dict[str, Any]]) -> str:
    base = results[0]["samples_per_s"]
    lines = [f"{'training':<22} {'threads/rank':>12} {'global batch':>12} {'samples/s':>10} {'vs 1 rank':>10} "
             f"{'valid AUC':>10}"]
    for r in results:
        name = "1 process" if r["ranks"] == 1 else f"torchrun {r['ranks']} ranks"
        auc = f"{r['valid_auc']:.4f}" if r["valid_auc"] is not None else "-"
        lines.append(f"{name:<22} {r['threads_per_rank']:>12} {r['ranks'] * r['batch_per_rank']:>12,} "
                     f"{r['samples_per_s']:>10,.0f} {r['samples_per_s'] / base:>9.2f}x {auc:>10}")
    return "\n".join(lines)


def table(results: list[dict[str, Any]]) -> str:
    base = results[0]["etl_s"]
    lines = [f"{'config':<12} {'fit s':>7} {'transform+write s':>18} {'ETL s':>7} {'wall s':>7} {'rows/s':>10} "
             f"{'vs no cluster':>14}"]
    for r in results:
        lines.append(f"{r['config']:<12} {r['fit_s']:>7.2f} {r['transform_write_s']:>18.2f} {r['etl_s']:>7.2f} "
                     f"{r['wall_s']:>7.2f} {r['rows_per_s']:>10,.0f} {base / r['etl_s']:>13.2f}x")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=2_000_000, help="raw rows, train + valid (default 2,000,000)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="local cluster sizes (default 1 2)")
    p.add_argument("--repeat", type=int, default=1, help="runs per configuration; the table shows the fastest")
    p.add_argument("--raw", help="raw directory (train/ and valid/ parquet) instead of the generated one")
    p.add_argument("--train-ranks", type=int, nargs="*", default=[], help="also time fit.py with these rank counts")
    p.add_argument("--train-steps", type=int, default=120, help="optimizer steps per training run (default 120)")
    p.add_argument("--train-batch", type=int, default=4096, help="rows per rank and step (default 4096)")
    p.add_argument("--skip-etl", action="store_true",
                   help="reuse the kept single-process output (CACHE/bench/scale-single-*), time training only")
    add_output_args(p, "scale")
    return p.parse_args(argv)


def single_output(raw: str, cache: str | None) -> str:
    """Where the single-process ETL output of ``raw`` is kept (``--skip-etl`` reuses it).

    Args:
        raw: the raw directory.
        cache: the ``--cache-dir`` value, or None.

    Returns:
        ``CACHE/bench/scale-single-<raw name>-<hash of raw's path>``.
    """
    key = hashlib.sha1(os.path.abspath(raw).encode()).hexdigest()[:8]  # two raw dirs may share a name
    return bench_dir(cache, f"scale-single-{os.path.basename(os.path.normpath(raw))}-{key}")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark: tables on stdout, JSON where ``--json`` says; returns the exit status."""
    a = parse_args(argv)
    if a.repeat < 1 or any(w < 1 for w in a.workers):
        print("error: --repeat and --workers must be >= 1", file=sys.stderr)
        return 2
    from ctrflow.bench.etl import raw_data, warm_page_cache

    raw, _ = raw_data(a.rows, 0, 500_000, a.raw, a.cache_dir)
    single = single_output(raw, a.cache_dir)
    if a.skip_etl and not os.path.exists(os.path.join(single, "schema.json")):
        print(f"error: --skip-etl: no kept single-process output at {single} (run once without it)", file=sys.stderr)
        return 2
    warm_page_cache([os.path.join(raw, s, n) for s in ("train", "valid") for n in os.listdir(os.path.join(raw, s))
                     if n.endswith(".parquet")])
    with scratch(a.cache_dir, "scale") as work:
        return _run(a, argv, raw, single, work)


def _run(a: argparse.Namespace, argv: list[str] | None, raw: str, single: str, work: str) -> int:
    """The timed runs and the report; cluster outputs and training runs go under ``work``."""
    configs: list[int | None] = [] if a.skip_etl else [None, *a.workers]
    load_before = os.getloadavg()
    runs: list[dict[str, Any]] = []
    try:
        for i in range(a.repeat):
            for w in configs:
                name = f"workers-{w}" if w else "single"
                print(f"run {i + 1}/{a.repeat}: {name} ...", file=sys.stderr)
                runs.append(run_etl(raw, single if w is None else os.path.join(work, f"scale-{name}"), w, work))
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    results = [min((r for r in runs if r["workers"] == w), key=lambda r: r["etl_s"]) for w in configs]
    identical = len({r["_identity"] for r in runs}) <= 1
    train: list[dict[str, Any]] = []
    try:
        for n in a.train_ranks:
            print(f"training: {n} rank(s) ...", file=sys.stderr)
            train.append(run_fit(single, n, a.train_steps, a.train_batch, os.path.join(work, f"scale-fit-{n}"),
                                 work))
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for r in runs:
        r.pop("_identity")
    machine = describe_machine()
    machine["loadavg_1_5_15_before"] = [round(x, 2) for x in load_before]
    machine["loadavg_1_5_15_after"] = [round(x, 2) for x in os.getloadavg()]
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']} GiB, GPU: {machine['gpu']}; "
          f"load avg {machine['loadavg_1_5_15_before'][0]} before, {machine['loadavg_1_5_15_after'][0]} after")
    if results:
        print(f"ETL scale-out: etl/run.py on {results[0]['rows']:,} rows (train + valid), Criteo recipe, "
              f"best of {a.repeat} run(s)")
        print(table(results))
        print(f"outputs (schema, row counts, fitted statistics) identical across configurations: {identical}")
    if train:
        print(f"training: train/fit.py DLRM on {single}, {a.train_steps} steps, CPU (Gloo for torchrun)")
        print(train_table(train))
    report = {"benchmark": "scale", "command": "python bench/scale.py " + " ".join(argv if argv is not None
                                                                                   else sys.argv[1:]),
              "machine": machine, "raw": raw, "single_output": single, "results": results, "all_runs": runs,
              "outputs_identical": identical, "training": train}
    write_json(json_path(a, "scale"), report)
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
