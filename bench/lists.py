"""List-feature benchmark: loader rows/s and DLRM training samples/s with and without 2 list columns.

Measured side by side in one run, on the same page-cached parquet (Criteo-shaped: 26 int32
categoricals, 13 float32, a float32 label, plus 2 ``list<int32>`` columns whose lengths are
``min(100, Geometric(1/20))``: mean ~20, max 100; power-law ids from 100k-id vocabularies):

- read bound: ``pyarrow.parquet.read_table`` of the files (threads, nothing else), with and without
  the list columns: decoding ``list<int32>`` costs pyarrow far more per value than flat columns.
- loader, ``Loader(shuffle=True)`` at ``--batch-size`` (CPU): ``one-hot only`` (``lists=[]``: the list
  columns are not read) beside ``+ 2 lists (jagged)`` (values + offsets) and ``+ 2 lists (padded)``
  (dense ``[B, 100]``); also unshuffled. Warm-up epoch, then ``--repeat`` interleaved epochs, best kept.
- training, ``ctrflow.models.DLRM`` (dim 16, bottom 13-512-256-16, top 512-256-1, row-wise Adagrad on
  the tables, fused Adagrad on the MLPs), batches from the loader, ``--train-batch`` rows:
  ``one-hot only`` beside ``+ 2 lists`` (each pooled with ``sum`` into one more sparse feature of the
  interaction, own 100k-row tables) and ``+ 2 lists, shared`` (both lists ``mean``-pooled from one
  shared table). samples/s over ``--steps`` steps after ``--warmup``.

Usage:
    python bench/lists.py                       # 1M rows; table + CACHE/bench/lists.json

Data: generated once into ``CACHE/bench/lists-data-<rows>-seed0-v<version>`` and reused; CACHE is
``--cache-dir``, else ``$CTRFLOW_CACHE_DIR``, else ``$XDG_CACHE_HOME/ctrflow`` or ``~/.cache/ctrflow``.
    python bench/lists.py --rows 2000000 --repeat 3 --steps 50
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as train/fit.py: the loader thread shares the cores

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from ctrflow.bench.machine import describe_machine  # noqa: E402
from ctrflow.bench.paths import add_output_args, announce, bench_dir, json_path, write_json  # noqa: E402
from ctrflow.etl.schema import ColumnSchema, Schema  # noqa: E402
from ctrflow.loader import Loader  # noqa: E402

DATA_VERSION = 1  # bump when generate()'s output for the same arguments changes: the cache keys on it
LISTS = ("hist_a", "hist_b")
LIST_CARD = 100_000 + 3
MAX_LEN = 100


def generate(directory: str, rows: int, files: int = 4, row_group: int = 262144, seed: int = 0) -> None:
    """Criteo-shaped processed parquet with 2 list columns + schema.json (temp dir, then renamed)."""
    rng = np.random.default_rng(seed)
    cards = [int(10 ** rng.uniform(1, 5)) for _ in range(26)]
    os.makedirs(os.path.dirname(directory), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(directory), prefix=".tmp-lists-data-")
    bounds = np.linspace(0, rows, files + 1).astype(int)
    for f in range(files):
        n = int(bounds[f + 1] - bounds[f])
        cols: dict[str, Any] = {}
        cat = [(np.minimum(rng.zipf(1.1, n), c) + 2).astype(np.int32) for c in cards]
        cont = [rng.standard_normal(n).astype(np.float32) for _ in range(13)]
        logit = 0.8 * cont[0] + np.where(cat[0] % 2 == 0, 0.7, -0.7) - 1.0
        cols["label"] = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.float32)
        cols |= {f"I{i + 1}": c for i, c in enumerate(cont)} | {f"C{i + 1}": c for i, c in enumerate(cat)}
        for name in LISTS:
            lengths = np.minimum(rng.geometric(1 / 20, n), MAX_LEN)
            offsets = np.zeros(n + 1, np.int32)
            np.cumsum(lengths, out=offsets[1:])
            values = (np.minimum(rng.zipf(1.2, int(offsets[-1])), LIST_CARD - 3) + 2).astype(np.int32)
            cols[name] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))
        pq.write_table(pa.table(cols), os.path.join(tmp, f"part-{f:05d}.parquet"), row_group_size=row_group)
    schema = [ColumnSchema("label", "label", "float32")]
    schema += [ColumnSchema(f"I{i + 1}", "continuous", "float32") for i in range(13)]
    schema += [ColumnSchema(f"C{i + 1}", "categorical", "int32", cardinality=c + 3, embedding_dim=16)
               for i, c in enumerate(cards)]
    schema += [ColumnSchema(n, "list", "int32", cardinality=LIST_CARD, embedding_dim=16, max_length=MAX_LEN)
               for n in LISTS]
    Schema(schema, {"rows": {"train": rows}, "generator": "bench/lists.py"}).save(os.path.join(tmp, "schema.json"))
    os.replace(tmp, directory)


def list_stats(directory: str) -> dict[str, float]:
    t = pq.read_table(os.path.join(directory, "part-00000.parquet"), columns=list(LISTS))
    lengths = np.concatenate([np.diff(t.column(n).chunk(0).offsets.to_numpy()) for n in LISTS])
    return {"mean_length": float(lengths.mean()), "max_length": int(lengths.max())}


LOADERS = {
    "read bound, one-hot columns (pyarrow read_table)": {"read": []},
    "read bound, + 2 list columns": {"read": list(LISTS)},
    "one-hot only (shuffle)": {"lists": [], "shuffle": True},
    "+ 2 lists, jagged (shuffle)": {"lists": list(LISTS), "shuffle": True},
    "+ 2 lists, padded [B, 100] (shuffle)": {"lists": list(LISTS), "shuffle": True, "list_format": "padded"},
    "one-hot only (no shuffle)": {"lists": [], "shuffle": False},
    "+ 2 lists, jagged (no shuffle)": {"lists": list(LISTS), "shuffle": False},
}


def loader_epoch(directory: str, batch: int, kw: dict[str, Any]) -> tuple[int, int, float, float]:
    """(rows, list elements, wall s, CPU s) of one epoch (or of the read bound for ``read`` entries)."""
    rows = elems = 0
    t, c = time.perf_counter(), time.process_time()
    if "read" in kw:  # pyarrow read_table of every file, nothing else
        schema = Schema.load(directory)
        cols = schema.categorical + schema.continuous + schema.label + kw["read"]
        for f in sorted(os.listdir(directory)):
            if f.endswith(".parquet"):
                t_ = pq.read_table(os.path.join(directory, f), columns=cols, use_threads=True)
                rows += t_.num_rows
                elems += sum(len(t_.column(n).combine_chunks().values) for n in kw["read"])
        return rows, elems, time.perf_counter() - t, time.process_time() - c
    with Loader(directory, batch, device="cpu", **kw) as loader:
        for b in loader:
            rows += len(b)
            for v, o in b.lists.values():
                elems += int(o[-1]) if v.dim() == 1 else int(o.sum())
    return rows, elems, time.perf_counter() - t, time.process_time() - c


TRAIN = {
    "one-hot only": None,
    "+ 2 lists (sum, own tables)": {"features": {n: {} for n in LISTS}},
    "+ 2 lists (mean, one shared table)": {"features": {n: {"shared": "hist", "combiner": "mean"} for n in LISTS}},
}


def train_rate(directory: str, batch: int, steps: int, warmup: int, features: Any) -> dict[str, float]:
    from ctrflow.models import DLRM
    from ctrflow.train.optim import build_optimizers

    torch.manual_seed(0)
    model = DLRM.from_schema(directory, embedding_dim=16, dense_arch_layer_sizes=[512, 256, 16],
                             features=features)
    opts = build_optimizers(model, "adagrad", 0.01, embedding_lr=0.05)
    lists = list(model.features.spec.lists) if model.features is not None else []
    bce = torch.nn.BCEWithLogitsLoss()
    t = c = 0.0
    done = 0
    with Loader(directory, batch, device="cpu", lists=lists, seed=1) as loader:
        for i, b in enumerate(loader):
            if i == warmup:
                t, c = time.perf_counter(), time.process_time()
            out = model(b.categorical, b.continuous, lists=b.lists, weights=b.weights) if lists else \
                model(b.categorical, b.continuous)
            loss = bce(out.squeeze(1), b.label)
            loss.backward()
            for o in opts:
                o.step()
                o.zero_grad(set_to_none=True)
            if i >= warmup:
                done += len(b)
            if i + 1 >= warmup + steps:
                break
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    return {"samples_per_s": done / wall, "ms_per_step": 1000 * wall / steps, "samples_per_cpu_s": done / cpu,
            "final_loss": float(loss.detach())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--batch-size", type=int, default=65536, help="loader batch size")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--train-batch", type=int, default=4096)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-train", action="store_true")
    add_output_args(p, "lists")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    directory = bench_dir(a.cache_dir, f"lists-data-{a.rows}-seed0-v{DATA_VERSION}")
    reused = os.path.exists(os.path.join(directory, "schema.json"))  # renamed into place: present = complete
    if not reused:
        t = time.perf_counter()
        generate(directory, a.rows)
        print(f"generated {a.rows} rows in {time.perf_counter() - t:.0f}s", file=sys.stderr)
    announce(directory, reused)
    for f in sorted(os.listdir(directory)):  # page cache
        with open(os.path.join(directory, f), "rb") as fh:
            while fh.read(1 << 24):
                pass
    stats = list_stats(directory)
    best: dict[str, dict[str, float]] = {}
    for kw in LOADERS.values():  # warm-up epoch each
        loader_epoch(directory, a.batch_size, kw)
    for _ in range(a.repeat):
        for name, kw in LOADERS.items():
            rows, elems, wall, cpu = loader_epoch(directory, a.batch_size, kw)
            r = {"rows_per_s": rows / wall, "elements_per_s": elems / wall, "rows_per_cpu_s": rows / cpu,
                 "rows": rows, "elements": elems}
            if name not in best or r["rows_per_s"] > best[name]["rows_per_s"]:
                best[name] = r
    base = best["one-hot only (shuffle)"]["rows_per_s"]
    print(f"loader: {a.rows:,} rows, batch {a.batch_size}, 2 list columns of mean length "
          f"{stats['mean_length']:.1f} (max {stats['max_length']})")
    print("| loader | rows/s | list elements/s | rows per CPU-s | vs one-hot (shuffle) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, r in best.items():
        print(f"| {name} | {r['rows_per_s'] / 1e6:.2f}M | {r['elements_per_s'] / 1e6:.1f}M | "
              f"{r['rows_per_cpu_s'] / 1e6:.2f}M | {r['rows_per_s'] / base:.2f}x |")
    train: dict[str, dict[str, float]] = {}
    if not a.skip_train:
        for name, feats in TRAIN.items():
            train[name] = train_rate(directory, a.train_batch, a.steps, a.warmup, feats)
        tbase = train["one-hot only"]["samples_per_s"]
        print(f"\nDLRM training, batch {a.train_batch}, {a.steps} steps after {a.warmup}, {a.threads} threads")
        print("| model | samples/s | ms/step | samples per CPU-s | vs one-hot |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for name, r in train.items():
            print(f"| {name} | {r['samples_per_s']:,.0f} | {r['ms_per_step']:.1f} | {r['samples_per_cpu_s']:,.0f} | "
                  f"{r['samples_per_s'] / tbase:.2f}x |")
    machine = describe_machine()
    print(f"\nmachine: {machine['cpu']}, {machine['cores']} cores, load {machine['load_avg']}")
    write_json(json_path(a, "lists"), {"args": vars(a), "data": directory, "lists": stats, "loader": best,
                                       "train": train, "machine": machine,
                                       "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())})
    return 0


if __name__ == "__main__":
    sys.exit(main())
