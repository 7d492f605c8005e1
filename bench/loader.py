"""Loader benchmark: ctrflow.loader against the read bound, merlin-dataloader 23.08 and a plain DataLoader.

Measured side by side in one run, on the same page-cached parquet, batch 65536 by default:

- ``read bound``: ``pyarrow.parquet.read_table(file, columns=..., use_threads=True, memory_map=True)``
  of every file, nothing else (no conversion, no batches): what any parquet loader is bounded by.
  (``memory_map``, as the Loader reads: without it pyarrow first copies each file into its own buffer.)
- ``ctrflow (no shuffle)``: ``Loader(shuffle=False)``, batches on the CPU. This is also what the host
  does on the GPU path, where the rows are shuffled on the device.
- ``ctrflow (shuffle)``: ``Loader(shuffle=True)``: chunk order and rows inside each chunk shuffled
  on the CPU. Both also with ``read_ahead=False`` (no decoding of the next chunk during the shuffle).
- ``merlin-dataloader 23.08 (CPU)``: ``merlin.dataloader.torch.Loader`` over ``merlin.io.Dataset(cpu=True)``
  with the same columns tagged categorical / continuous / target, run in the pinned NVTabular venv
  (``bash bench/baselines/nvtabular_venv.sh`` builds it; ``--build-venv`` runs it for you). Reported
  as ``skipped: <reason>`` when the venv is missing.
- ``torch DataLoader``: the seed-000 ``DataFrameDataset`` pattern (a pandas DataFrame turned into
  tensors once, ``__getitem__`` returning one row as a dict) in ``DataLoader(batch_size=B,
  shuffle=True, num_workers=2)``; timed over ``--dataloader-seconds`` after its first batch.

ctrflow and the read bound are run once to warm up, then measured ``--repeat`` times, interleaved,
best kept (the machine may
be shared; the load average is recorded). Besides wall-clock rows/s the table gives rows per
CPU-second of the process (all its threads), which a busy machine disturbs much less.
Data: ``--data DIR`` (a processed directory with ``schema.json``), else Criteo-shaped rows
generated once into ``CACHE/bench/loader-data-<rows>-<compression>-etl2`` and reused (CACHE:
``--cache-dir``, else ``$CTRFLOW_CACHE_DIR``, else ``$XDG_CACHE_HOME/ctrflow`` or ``~/.cache/ctrflow``;
26 int32 categoricals with
power-law ids, 13 float32, a float32 label; 8 files, 256k-row groups; written as ``etl/run.py`` writes:
REQUIRED columns, one plain page per column chunk by default, ``--compression snappy`` for dictionary +
snappy pages).

Usage:
    python bench/loader.py                        # 4M rows, all systems, table + CACHE/bench/loader.json
    python bench/loader.py --data data/processed/train --rows 0
    python bench/loader.py --device cuda          # ctrflow's GPU path (on a GPU machine)
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import tempfile
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ctrflow.bench.loader_baselines import merlin, torch_dataloader
from ctrflow.bench.machine import describe_machine
from ctrflow.bench.paths import add_output_args, announce, bench_dir, json_path, write_json
from ctrflow.etl.parquet_layout import mark_required, write_options
from ctrflow.etl.schema import ColumnSchema, Schema, SchemaError
from ctrflow.loader import Loader


# ---- machine and data -------------------------------------------------------------------------
def generate(directory: str, rows: int, files: int = 8, row_group: int = 262144, seed: int = 0,
             compression: str = "none") -> None:
    """Criteo-shaped processed parquet + schema.json (written to a temp dir, then renamed)."""
    rng = np.random.default_rng(seed)
    cards = [int(10 ** rng.uniform(1, 7)) for _ in range(26)]
    os.makedirs(os.path.dirname(directory), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(directory), prefix=".tmp-loader-data-")
    bounds = np.linspace(0, rows, files + 1).astype(int)
    for f in range(files):
        n = int(bounds[f + 1] - bounds[f])
        cols: dict[str, np.ndarray] = {"label": (rng.random(n) < 0.25).astype(np.float32)}
        for i in range(13):  # log1p of power-law counts, standardised: few distinct values, as in Criteo
            x = np.log1p(rng.zipf(1.5, n).astype(np.float64) - 1)
            x[rng.random(n) < 0.1] = 0.0
            cols[f"I{i + 1}"] = ((x - 1.0) / 1.5).astype(np.float32)
        for i in range(26):  # frequency-ranked ids (3 = most frequent), power law, capped
            cols[f"C{i + 1}"] = (np.minimum(rng.zipf(1.1, n), cards[i]) + 2).astype(np.int32)
        # Laid out as etl/run.py writes: REQUIRED columns; "none": plain pages, one per column chunk
        # (the ETL's default); "snappy": dictionary + snappy pages.
        pq.write_table(mark_required(pa.table(cols)), os.path.join(tmp, f"part-{f:05d}.parquet"),
                       **write_options(compression, row_group))
    cols_schema = [ColumnSchema("label", "label", "float32")]
    cols_schema += [ColumnSchema(f"I{i + 1}", "continuous", "float32") for i in range(13)]
    cols_schema += [
        ColumnSchema(f"C{i + 1}", "categorical", "int32", cardinality=cards[i] + 3, embedding_dim=16)
        for i in range(26)
    ]
    Schema(cols_schema, {"rows": {"train": rows}, "generator": "bench/loader.py"}).save(
        os.path.join(tmp, "schema.json")
    )
    os.replace(tmp, directory)


def bench_data(args: argparse.Namespace) -> tuple[str, Schema]:
    if args.data:
        directory = args.data
    else:
        # "-etl2": the ETL's layout since 2026-11-23 (REQUIRED columns, one plain page per column chunk).
        directory = bench_dir(args.cache_dir, f"loader-data-{args.rows}-{args.compression}-etl2")
        reused = os.path.exists(os.path.join(directory, "schema.json"))  # renamed into place: present = complete
        if not reused:
            t = time.perf_counter()
            generate(directory, args.rows, compression=args.compression)
            print(f"generated {args.rows} rows in {time.perf_counter() - t:.0f}s", file=sys.stderr)
        announce(directory, reused)
    try:
        schema = Schema.load(directory if os.path.exists(os.path.join(directory, "schema.json"))
                             else os.path.dirname(os.path.abspath(directory)))
    except SchemaError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if not glob.glob(os.path.join(directory, "*.parquet")):
        print(f"error: {directory} holds no *.parquet files (pass OUT/train of a processed dataset)", file=sys.stderr)
        raise SystemExit(2)
    return directory, schema


def page_cache(files: list[str]) -> None:
    for f in files:
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass


# ---- systems ----------------------------------------------------------------------------------
def read_bound(files: list[str], columns: list[str]) -> tuple[int, float, float]:
    """(rows, wall seconds, CPU seconds of all threads)."""
    t, c = time.perf_counter(), time.process_time()
    rows = sum(pq.read_table(f, columns=columns, use_threads=True, memory_map=True).num_rows for f in files)
    return rows, time.perf_counter() - t, time.process_time() - c


def shuffle_floor(files: list[str], columns: list[str], args: argparse.Namespace):
    """The bare chunk shuffle: no read, no queue, no batches; what any numpy shuffle of this window costs.

    The first chunk's columns (``parts_per_chunk`` row groups) are held in memory; an "epoch" draws a
    permutation and gathers every column into batch-major buffers (one ``np.take`` per column and
    batch, columns split over 2 threads) once per chunk of the data set.
    """
    from ctrflow.loader.chunk import by_column_groups

    pf = pq.ParquetFile(files[0])
    t = pf.read_row_groups(list(range(min(args.parts_per_chunk, pf.num_row_groups))), columns=columns)
    cols = [t.column(c).to_numpy() for c in columns]
    n, bsz = t.num_rows, args.batch_size
    out = np.empty((-(-n // bsz), len(cols), bsz), np.int32)
    total = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    chunks = -(-total // n)

    def epoch() -> tuple[int, float, float]:
        w, c = time.perf_counter(), time.process_time()
        for i in range(chunks):
            perm = np.random.default_rng(i).permutation(n)

            def gather(group: list[int], _: int, perm: np.ndarray = perm) -> None:
                for j in group:
                    src = cols[j].view(np.int32)
                    for k in range(out.shape[0]):
                        idx = perm[k * bsz : (k + 1) * bsz]
                        np.take(src, idx, out=out[k, j, : idx.shape[0]], mode="wrap")

            by_column_groups(list(range(len(cols))), 2, gather)
        return chunks * n, time.perf_counter() - w, time.process_time() - c

    return epoch


def ctrflow_epoch(loader: Loader, device: str) -> tuple[int, float, float]:
    t, c = time.perf_counter(), time.process_time()
    rows = 0
    for b in loader:
        rows += b.label.shape[0]
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return rows, time.perf_counter() - t, time.process_time() - c


# ---- main -------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", help="processed directory (with or next to schema.json); default: generated")
    p.add_argument("--rows", type=int, default=4 * 1048576, help="rows to generate when --data is not given")
    p.add_argument("--compression", choices=["none", "snappy"], default="none",
                   help="generated files: plain pages, as etl/run.py writes by default, or dictionary + snappy")
    p.add_argument("--batch-size", type=int, default=65536)
    p.add_argument("--parts-per-chunk", type=int, default=2)
    p.add_argument("--device", default="cpu", help="ctrflow's device: cpu or cuda")
    p.add_argument("--repeat", type=int, default=3, help="epochs per system (interleaved, best kept)")
    p.add_argument("--dataloader-seconds", type=float, default=20.0)
    p.add_argument("--skip", default="", help="comma list of: merlin, dataloader")
    p.add_argument("--build-venv", action="store_true", help="build the NVTabular venv if it is missing")
    add_output_args(p, "loader")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    directory, schema = bench_data(args)
    files = sorted(glob.glob(os.path.join(directory, "*.parquet")))
    columns = schema.categorical + schema.continuous + schema.label[:1]
    page_cache(files)
    skip = set(filter(None, args.skip.split(",")))
    load0 = os.getloadavg()[0]

    def loader(shuffle: bool, read_ahead: bool = True, cache: bool = False, threads: int = 1):
        lo = Loader(directory, args.batch_size, shuffle=shuffle, parts_per_chunk=args.parts_per_chunk,
                    device=args.device, labels=schema.label[:1], read_ahead=read_ahead, cache=cache,
                    threads=threads)
        return lambda: ctrflow_epoch(lo, args.device)

    systems = {
        "read bound (pyarrow read_table)": lambda: read_bound(files, columns),
        "ctrflow (no shuffle)": loader(False),
        # What the host does on the GPU path, whose default is min(4, cores) copy threads.
        "ctrflow (no shuffle, threads=2)": loader(False, threads=2),
        "ctrflow (shuffle)": loader(True),
        "ctrflow (no shuffle, read_ahead=False)": loader(False, False),
        "ctrflow (shuffle, read_ahead=False)": loader(True, False),
        # The warm-up epoch below fills the cache: the timed epochs are the 2nd and later.
        "ctrflow (shuffle, cache=True, epochs 2+)": loader(True, cache=True),
        "ctrflow (shuffle, threads=2)": loader(True, threads=2),
        "ctrflow (shuffle, cache=True, threads=2, epochs 2+)": loader(True, cache=True, threads=2),
        "shuffle floor: permutation alone, in memory, 2 threads": shuffle_floor(files, columns, args),
    }
    results: dict[str, dict[str, Any]] = {}
    for run in systems.values():  # warm-up: allocators, buffer pools, page cache
        run()
    for _ in range(args.repeat):
        for name, run in systems.items():
            rows, sec, cpu = run()
            r = results.setdefault(name, {"rows": rows, "seconds": sec, "cpu_seconds": cpu, "all_seconds": []})
            r["all_seconds"].append(round(sec, 3))
            r["seconds"], r["cpu_seconds"] = min(r["seconds"], sec), min(r["cpu_seconds"], cpu)
    name_m = "merlin-dataloader 23.08 CPU"
    if "merlin" in skip:
        results[f"{name_m} (shuffle)"] = {"skipped": "--skip merlin"}
    else:
        m = merlin(files, schema, args.batch_size, args.repeat, args.build_venv)
        if "skipped" in m:
            results[f"{name_m} (no shuffle)"] = results[f"{name_m} (shuffle)"] = m
        else:
            results[f"{name_m} (no shuffle)"] = m["no_shuffle"]
            results[f"{name_m} (shuffle)"] = m["shuffle"]
    name_d = "torch DataLoader, DataFrameDataset, 2 workers (shuffle)"
    if "dataloader" in skip:
        results[name_d] = {"skipped": "--skip dataloader"}
    else:
        rows, sec = torch_dataloader(files, schema, args.batch_size, args.dataloader_seconds)
        results[name_d] = {"rows": rows, "seconds": sec}
    for r in results.values():
        if "seconds" in r:
            r["rows_per_s"] = r["rows"] / r["seconds"]
        if r.get("cpu_seconds"):
            r["rows_per_cpu_s"] = r["rows"] / r["cpu_seconds"]

    report = {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "machine": {**describe_machine(), "torch": torch.__version__, "pyarrow": pa.__version__},
        "loadavg_1min": {"start": round(load0, 2), "end": round(os.getloadavg()[0], 2)},
        "command": "python bench/loader.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "data": {"directory": directory, "files": len(files), "rows": results["ctrflow (shuffle)"]["rows"]},
        "batch_size": args.batch_size,
        "device": args.device,
        "results": results,
    }
    report["goals"] = goals(results)
    print(table(report))
    write_json(json_path(args, "loader"), report)
    return 0


def _rate(results: dict[str, dict[str, Any]], key: str) -> float | None:
    r = results.get(key, {})
    return r.get("rows_per_s")


def goals(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    read = _rate(results, "read bound (pyarrow read_table)")
    plain = _rate(results, "ctrflow (no shuffle)")
    plain2 = _rate(results, "ctrflow (no shuffle, threads=2)")
    shuf = _rate(results, "ctrflow (shuffle)")
    shuf2 = _rate(results, "ctrflow (shuffle, threads=2)")
    floor = _rate(results, "shuffle floor: permutation alone, in memory, 2 threads")
    cached = _rate(results, "ctrflow (shuffle, cache=True, epochs 2+)")
    cached2 = _rate(results, "ctrflow (shuffle, cache=True, threads=2, epochs 2+)")
    merl = _rate(results, "merlin-dataloader 23.08 CPU (shuffle)")
    dl = _rate(results, "torch DataLoader, DataFrameDataset, 2 workers (shuffle)")
    checks = [
        ("no shuffle >= 0.6x read bound", plain, read, 0.6),
        ("no shuffle, threads=2 (the GPU path's host side) >= 0.6x read bound", plain2, read, 0.6),
        ("shuffle >= 0.2x read bound", shuf, read, 0.2),
        ("shuffle >= 10x merlin-dataloader (shuffle)", shuf, merl, 10.0),
        ("shuffle, threads=2 >= 10x merlin-dataloader (shuffle)", shuf2, merl, 10.0),
        ("shuffle >= 50x torch DataLoader", shuf, dl, 50.0),
        ("shuffle, cache=True (epochs 2+) >= 10x merlin-dataloader (shuffle)", cached, merl, 10.0),
        ("shuffle, cache=True, threads=2 (epochs 2+) >= 10x merlin-dataloader (shuffle)", cached2, merl, 10.0),
    ]
    out = []
    for name, a, b, want in checks:
        ratio = a / b if a and b else None
        out.append({"goal": name, "ratio": ratio, "met": None if ratio is None else ratio >= want})
    # The ceilings: how far above the baseline the bare read, and the bare shuffle, are themselves.
    for g in out:
        if "merlin" in g["goal"]:
            g["read_bound_ratio"] = read / merl if read and merl else None
            g["floor_ratio"] = floor / merl if floor and merl else None
        elif "DataLoader" in g["goal"]:
            g["read_bound_ratio"] = read / dl if read and dl else None
    return out


def _fmt(rate: float) -> str:
    return f"{rate / 1e6:.2f}M" if rate >= 1e5 else f"{rate / 1e3:.1f}k"


def table(report: dict[str, Any]) -> str:
    m = report["machine"]
    res = report["results"]
    read = _rate(res, "read bound (pyarrow read_table)")
    read_cpu = res["read bound (pyarrow read_table)"]["rows_per_cpu_s"]
    lines = [
        f"# Loader benchmark, {report['date']}",
        f"machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, GPU: {m['gpu']}; "
        f"load average {report['loadavg_1min']['start']} -> {report['loadavg_1min']['end']}",
        f"data: {report['data']['rows']} rows in {report['data']['files']} files ({report['data']['directory']}), "
        f"batch {report['batch_size']}, ctrflow device {report['device']}",
        f"command: {report['command']}",
        "",
        "| system | rows/s | x read bound | rows per CPU-second | x read bound (CPU) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, r in res.items():
        if "skipped" in r:
            lines.append(f"| {name} | skipped: {r['skipped']} | | | |")
            continue
        cpu = r.get("rows_per_cpu_s")
        cpu_cols = f"{_fmt(cpu)} | {cpu / read_cpu:.3g}" if cpu else "n/a (worker processes) | "
        lines.append(f"| {name} | {_fmt(r['rows_per_s'])} | {r['rows_per_s'] / read:.3g} | {cpu_cols} |")
    lines += ["", "| goal | ratio | met | the read bound itself | the shuffle floor itself |",
              "| --- | ---: | --- | ---: | ---: |"]
    for g in report["goals"]:
        ratio = "n/a" if g["ratio"] is None else f"{g['ratio']:.3g}"
        met = "n/a" if g["met"] is None else ("yes" if g["met"] else "NO")
        ceiling = f"{g['read_bound_ratio']:.3g}" if g.get("read_bound_ratio") else ""
        floor = f"{g['floor_ratio']:.3g}" if g.get("floor_ratio") else ""
        lines.append(f"| {g['goal']} | {ratio} | {met} | {ceiling} | {floor} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
