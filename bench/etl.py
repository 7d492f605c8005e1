"""ETL benchmark: ctrflow.etl against NVTabular 23.08 (CPU mode) on the same Criteo-shaped data.

Both run NVTabular's Criteo workflow: ``Categorify(freq_threshold=2)`` on C1..C26, ``FillMissing ->
Clip(min_value=0) -> LogOp -> Normalize`` on I1..I13, ``label`` passed through (ctrflow: ``Label()``,
which also validates it and casts it to float32, as ``etl/run.py`` does). Each fits on the
raw train split, then transforms and writes train and valid to its own directory in a scratch
directory under the cache (``CACHE/bench/.scratch-etl-*``, removed at the end). Raw data: the embedded
generator (``ctrflow.etl.synthetic.generate``), written once to
``CACHE/bench/etl-raw-<rows>-seed<seed>-part<part_rows>-v<generator version>`` and reused; CACHE is
``--cache-dir``, else ``$CTRFLOW_CACHE_DIR``, else ``$XDG_CACHE_HOME/ctrflow`` or ``~/.cache/ctrflow``.
``--rows`` counts raw rows (train + valid, valid = 10%); rows/s = rows transformed and written /
(fit + transform + write seconds).

NVTabular runs in its own pinned venv (``bench/baselines/nvtabular_venv.sh``, built on first use)
through ``bench/baselines/nvt_etl.py``; ctrflow runs in this process. Afterwards both outputs are
read back and compared: labels and row order exactly, continuous values to float32 tolerance,
categorical ids exactly; where ids differ the comparison says whether they are the same up to the
order of equal-frequency values (NVTabular orders those with an unstable quicksort).

Usage:
    python bench/etl.py                      # 2M rows, both systems, table + CACHE/bench/etl.json
    python bench/etl.py --rows 200000 --profile --json r/etl.json   # + cProfile of ctrflow: r/etl-ctrflow.prof
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ctrflow.bench.machine import describe_machine
from ctrflow.bench.paths import add_output_args, announce, bench_dir, json_path, scratch, write_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CATS = [f"C{i}" for i in range(1, 27)]
CONTS = [f"I{i}" for i in range(1, 14)]
LABEL = "label"
SPLITS = ("train", "valid")


# ---- machine and data -------------------------------------------------------------------------
def raw_data(rows: int, seed: int, part_rows: int, raw: str | None,
             cache: str | None = None) -> tuple[str, float | None]:
    """Directory of raw train/valid parquet: ``raw`` as given, else generated once into the cache and reused.

    Args:
        rows: raw rows, train + valid.
        seed: generator seed.
        part_rows: rows per raw parquet file.
        raw: a directory the user brought (returned as is), or None.
        cache: the ``--cache-dir`` value, or None for the environment's default.

    Returns:
        (directory, seconds spent generating or None when reused).
    """
    if raw:
        return raw, None
    from ctrflow.etl.synthetic import VERSION, generate

    # Keyed by everything that changes the bytes, so a cache is reused only for the same data.
    path = bench_dir(cache, f"etl-raw-{rows}-seed{seed}-part{part_rows}-v{VERSION}")
    if os.path.exists(os.path.join(path, "synthetic.json")):  # written last: its presence means complete
        announce(path, reused=True)
        return path, None
    print(f"generating {rows:,} raw rows (once) ...", file=sys.stderr)
    t0 = time.perf_counter()
    generate(path, rows=rows, seed=seed, valid_fraction=0.1, part_rows=part_rows)
    announce(path, reused=False)
    return path, time.perf_counter() - t0


def parquet_files(directory: str) -> list[str]:
    """Data files of a parquet directory in part order (``part_10`` after ``part_9``)."""
    files = [f for f in glob.glob(os.path.join(directory, "*.parquet")) if not os.path.basename(f).startswith("_")]
    return sorted(files, key=lambda f: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", os.path.basename(f))])


def warm_page_cache(files: list[str]) -> None:
    """Read the raw files once so neither system pays the cold-cache read alone."""
    for f in files:
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass


# ---- the two systems ---------------------------------------------------------------------------
def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "unknown"


def run_ctrflow(raw: str, out: str, profile: str | None = None) -> dict[str, Any]:
    """ctrflow.etl: fit on raw/train, transform + write train and valid into out/<split>.

    With ``profile`` (a path), the run uses Dask's synchronous scheduler under cProfile (threads
    hide their work from cProfile) and dumps the stats there; its timings are not comparable.
    """
    import contextlib

    import dask
    import pandas as pd

    from ctrflow.etl import Dataset, Workflow, get_embedding_sizes
    from ctrflow.etl.config import DEFAULTS
    from ctrflow.etl.ops import Categorify, Clip, FillMissing, Label, LogOp, Normalize

    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    # The label goes through Label() as in etl/run.py (validated, cast to float32); NVTabular passes
    # it through untouched. (A bare ``+ [LABEL]`` passthrough currently fails in Workflow.transform.)
    features = (CATS >> Categorify(freq_threshold=DEFAULTS.freq_threshold)) + (
        CONTS >> FillMissing() >> Clip(min_value=0) >> LogOp() >> Normalize()) + ([LABEL] >> Label())
    wf = Workflow(features)
    prof = None
    ctx: Any = contextlib.nullcontext()
    if profile:
        import cProfile

        prof = cProfile.Profile()
        ctx = dask.config.set(scheduler="synchronous")
    with ctx:
        if prof is not None:
            prof.enable()
        c0, t0 = time.process_time(), time.perf_counter()
        wf.fit(Dataset(parquet_files(os.path.join(raw, "train")), engine="parquet"))
        fit_s = time.perf_counter() - t0
        by_split = {}
        for split in SPLITS:
            t0 = time.perf_counter()
            wf.transform(Dataset(parquet_files(os.path.join(raw, split)), engine="parquet")).to_parquet(
                os.path.join(out, split))
            by_split[split] = time.perf_counter() - t0
        cpu_s = time.process_time() - c0
        if prof is not None:
            prof.disable()
            prof.dump_stats(profile)
    t0 = time.perf_counter()
    wf.save(os.path.join(out, "workflow"))
    save_s = time.perf_counter() - t0
    rows = {s: sum(pq.ParquetFile(f).metadata.num_rows for f in parquet_files(os.path.join(out, s))) for s in SPLITS}
    return {
        "system": "ctrflow", "fit_s": fit_s, "transform_write_s": sum(by_split.values()),
        "transform_write_s_by_split": by_split, "cpu_s": cpu_s, "save_s": save_s, "rows": rows,
        "embedding_sizes": {k: list(v) for k, v in get_embedding_sizes(wf).items()},
        "versions": {"python": platform.python_version(), "ctrflow": _version("ctrflow"), "dask": dask.__version__,
                     "pandas": pd.__version__, "numpy": np.__version__, "pyarrow": pa.__version__},
    }


def run_nvtabular(raw: str, out: str) -> dict[str, Any]:
    """NVTabular 23.08 CPU in its pinned venv (built on first use) via bench/baselines/nvt_etl.py."""
    venv_sh = os.path.join(ROOT, "bench", "baselines", "nvtabular_venv.sh")
    r = subprocess.run(["bash", venv_sh], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"building the NVTabular venv failed:\n{r.stderr[-3000:]}")
    python = r.stdout.strip().splitlines()[-1]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    with tempfile.TemporaryDirectory() as tmp:
        res_path = os.path.join(tmp, "nvt.json")
        cmd = [python, os.path.join(ROOT, "bench", "baselines", "nvt_etl.py"), "--train", os.path.join(raw, "train"),
               "--valid", os.path.join(raw, "valid"), "--out", out, "--json", res_path]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp)
        if r.returncode != 0:
            raise RuntimeError(f"NVTabular run failed ({' '.join(cmd)}):\n{r.stderr[-3000:]}")
        with open(res_path) as f:
            return json.load(f)


# ---- output comparison -------------------------------------------------------------------------
def _column(files: list[str], name: str) -> np.ndarray:
    return pa.concat_arrays([pq.read_table(f, columns=[name])[name].combine_chunks() for f in files]).to_numpy(
        zero_copy_only=False)


def compare_ids(ref: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> dict[str, Any]:
    """Compare one categorical column's ids per split (``ref`` = NVTabular).

    Returns:
        ``status``: ``identical`` | ``same up to tie order`` (a bijection between the two id sets
        that fixes 0/1/2 and maps each id to one of equal train frequency) | ``different``.
    """
    a = np.concatenate([ref[s] for s in SPLITS]).astype(np.int64)
    b = np.concatenate([got[s] for s in SPLITS]).astype(np.int64)
    mismatched = int((a != b).sum())
    if mismatched == 0:
        return {"status": "identical", "mismatched_rows": 0}
    pairs = np.unique(np.stack([a, b], axis=1), axis=0)
    bijective = len(pairs) == len(np.unique(pairs[:, 0])) == len(np.unique(pairs[:, 1]))
    reserved = (pairs < 3).any(axis=1)
    reserved_ok = bool((pairs[reserved, 0] == pairs[reserved, 1]).all())
    fa = np.bincount(ref["train"].astype(np.int64))
    fb = np.bincount(got["train"].astype(np.int64))
    in_train = (pairs[:, 0] < len(fa)) & (pairs[:, 1] < len(fb))
    pt = pairs[in_train]
    freq_ok = bool((fa[pt[:, 0]] == fb[pt[:, 1]]).all())
    ok = bijective and reserved_ok and freq_ok
    return {"status": "same up to tie order" if ok else "different", "mismatched_rows": mismatched,
            "bijective": bool(bijective), "reserved_ids_equal": reserved_ok, "same_frequencies": freq_ok}


def compare_outputs(nvt_out: str, cf_out: str) -> dict[str, Any]:
    """Read both processed outputs back and compare them column by column."""
    files = {sys_: {s: parquet_files(os.path.join(d, s)) for s in SPLITS}
             for sys_, d in (("nvt", nvt_out), ("cf", cf_out))}

    def col(sys_: str, name: str) -> dict[str, np.ndarray]:
        return {s: _column(files[sys_][s], name) for s in SPLITS}

    res: dict[str, Any] = {"rows_equal": True, "label_equal": True, "categorical": {}, "continuous": {}}
    ln, lc = col("nvt", LABEL), col("cf", LABEL)
    for s in SPLITS:
        if len(ln[s]) != len(lc[s]):
            res["rows_equal"] = False
        elif not np.array_equal(ln[s].astype(np.float64), lc[s].astype(np.float64)):
            res["label_equal"] = False
    if not (res["rows_equal"] and res["label_equal"]):
        return res  # rows do not line up: a value comparison would be meaningless
    for c in CATS:
        res["categorical"][c] = compare_ids(col("nvt", c), col("cf", c))
    for c in CONTS:
        xn, xc = col("nvt", c), col("cf", c)
        diff = max(float(np.max(np.abs(xn[s].astype(np.float64) - xc[s].astype(np.float64)), initial=0))
                   for s in SPLITS)
        close = all(np.allclose(xc[s].astype(np.float64), xn[s].astype(np.float64), rtol=1e-5, atol=1e-5)
                    for s in SPLITS)
        res["continuous"][c] = {"max_abs_diff": diff, "close": bool(close)}
    statuses = [v["status"] for v in res["categorical"].values()]
    res["summary"] = {
        "categorical_identical": statuses.count("identical"),
        "categorical_same_up_to_ties": statuses.count("same up to tie order"),
        "categorical_different": statuses.count("different"),
        "continuous_close": sum(v["close"] for v in res["continuous"].values()),
        "continuous_max_abs_diff": max(v["max_abs_diff"] for v in res["continuous"].values()),
    }
    return res


def compare_embedding_sizes(nvt: dict[str, Any], cf: dict[str, Any]) -> list[str]:
    """Columns whose (cardinality, dim) differ between the two systems."""
    a, b = nvt.get("embedding_sizes", {}), cf.get("embedding_sizes", {})
    return [f"{c}: nvtabular {a.get(c)} ctrflow {b.get(c)}" for c in CATS if a.get(c) != b.get(c)]


# ---- report ------------------------------------------------------------------------------------
def table(results: list[dict[str, Any]]) -> str:
    """One row per system: fit, transform+write, total, process CPU, rows/s, speed vs NVTabular."""
    base = next((r for r in results if r["system"] == "nvtabular"), None)
    lines = [f"{'system':<10} {'fit s':>7} {'transform+write s':>18} {'total s':>8} {'cpu s':>7} {'rows/s':>11} "
             f"{'vs NVTabular':>13}"]
    for r in results:
        total = r["fit_s"] + r["transform_write_s"]
        rows = sum(r["rows"].values())
        rel = f"{(base['fit_s'] + base['transform_write_s']) / total:.2f}x" if base else "-"
        lines.append(f"{r['system']:<10} {r['fit_s']:>7.2f} {r['transform_write_s']:>18.2f} {total:>8.2f} "
                     f"{r.get('cpu_s', float('nan')):>7.2f} {rows / total:>11,.0f} {rel:>13}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=2_000_000, help="raw rows, train + valid (default 2,000,000)")
    p.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    p.add_argument("--part-rows", type=int, default=500_000, help="rows per raw parquet file (default 500,000)")
    p.add_argument("--raw", help="use this raw directory (train/ and valid/ parquet) instead of generating")
    add_output_args(p, "etl")
    p.add_argument("--skip-nvtabular", action="store_true", help="run ctrflow only")
    p.add_argument("--skip-ctrflow", action="store_true", help="run NVTabular only")
    p.add_argument("--no-compare", action="store_true", help="skip reading the outputs back")
    p.add_argument("--repeat", type=int, default=1, help="runs per system; the table shows the fastest (default 1)")
    p.add_argument("--profile", action="store_true",
                   help="extra ctrflow run, synchronous scheduler under cProfile (stats beside the JSON: "
                        "<json minus .json>-ctrflow.prof)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark: table on stdout, JSON where ``--json`` says; returns the exit status."""
    a = parse_args(argv)
    if a.repeat < 1 or a.rows < 2:
        print("error: --repeat must be >= 1 and --rows >= 2", file=sys.stderr)
        return 2
    raw, gen_s = raw_data(a.rows, a.seed, a.part_rows, a.raw, a.cache_dir)
    raw_files = [f for s in SPLITS for f in parquet_files(os.path.join(raw, s))]
    if not raw_files:
        print(f"error: no raw parquet under {raw}/train and {raw}/valid", file=sys.stderr)
        return 2
    # The processed outputs are only timed and compared: scratch, removed however the run ends.
    with scratch(a.cache_dir, "etl") as work:
        return _run(a, argv, raw, gen_s, raw_files, work)


def _run(a: argparse.Namespace, argv: list[str] | None, raw: str, gen_s: float | None, raw_files: list[str],
         work: str) -> int:
    """The timed runs, the comparison and the report; outputs go under ``work``."""
    raw_rows = {s: sum(pq.ParquetFile(f).metadata.num_rows for f in parquet_files(os.path.join(raw, s)))
                for s in SPLITS}
    warm_page_cache(raw_files)
    outs = {name: os.path.join(work, f"etl-{name}") for name in ("nvtabular", "ctrflow")}
    out_json = json_path(a, "etl")
    runs: list[dict[str, Any]] = []
    load_before = os.getloadavg()
    try:
        for i in range(a.repeat):  # alternate the systems so background load hits both alike
            if not a.skip_nvtabular:
                print(f"run {i + 1}/{a.repeat}: NVTabular 23.08 (CPU) ...", file=sys.stderr)
                runs.append(run_nvtabular(raw, outs["nvtabular"]))
            if not a.skip_ctrflow:
                print(f"run {i + 1}/{a.repeat}: ctrflow ...", file=sys.stderr)
                runs.append(run_ctrflow(raw, outs["ctrflow"]))
    except (RuntimeError, ImportError) as e:  # a baseline that cannot run, or ctrflow.etl missing
        print(f"error: {e}", file=sys.stderr)
        return 2
    results = [min((r for r in runs if r["system"] == name), key=lambda r: r["fit_s"] + r["transform_write_s"])
               for name in ("nvtabular", "ctrflow") if any(r["system"] == name for r in runs)]
    machine = describe_machine()
    machine["loadavg_1_5_15_before"] = [round(x, 2) for x in load_before]
    machine["loadavg_1_5_15_after"] = [round(x, 2) for x in os.getloadavg()]
    report: dict[str, Any] = {
        "benchmark": "etl", "command": "python bench/etl.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine, "raw": {"path": raw, "rows": raw_rows, "generate_s": gen_s}, "results": results,
        "all_runs": runs,
    }
    if a.profile and not a.skip_ctrflow:
        prof = os.path.splitext(out_json)[0] + "-ctrflow.prof"  # kept: the user asked for it
        os.makedirs(os.path.dirname(prof), exist_ok=True)
        print("profiling ctrflow (synchronous scheduler, cProfile) ...", file=sys.stderr)
        report["profile"] = {k: v for k, v in run_ctrflow(raw, outs["ctrflow"], prof).items()
                             if k in ("fit_s", "transform_write_s", "cpu_s")}
        import pstats

        pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(25)
    if len(results) == 2 and not a.no_compare:
        report["comparison"] = compare_outputs(outs["nvtabular"], outs["ctrflow"])
        report["comparison"]["embedding_size_differences"] = compare_embedding_sizes(*results)
    print(f"ETL: NVTabular Criteo workflow, fit on {raw_rows['train']:,} train rows, transform+write "
          f"{sum(raw_rows.values()):,} rows (train+valid)")
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']} GiB, GPU: {machine['gpu']}; "
          f"load avg {machine['loadavg_1_5_15_before'][0]} before, {machine['loadavg_1_5_15_after'][0]} after; "
          f"best of {a.repeat} run(s)")
    print(table(results))
    if "comparison" in report:
        c = report["comparison"]
        if not (c["rows_equal"] and c["label_equal"]):
            print("outputs: rows or labels DIFFER (row order not preserved?)")
        else:
            s = c["summary"]
            print(f"outputs: categorical {s['categorical_identical']}/26 identical, {s['categorical_same_up_to_ties']} "
                  f"same up to tie order, {s['categorical_different']} different; continuous "
                  f"{s['continuous_close']}/13 close (max |diff| {s['continuous_max_abs_diff']:.2e}); "
                  f"embedding sizes: {len(c['embedding_size_differences']) or 'all'} "
                  f"{'differ' if c['embedding_size_differences'] else 'equal'}")
    write_json(out_json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
