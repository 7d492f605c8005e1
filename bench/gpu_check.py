"""GPU check (issue #18): the GPU tests, the loader, DLRM training and serving on one GPU in under 8 minutes.

One prepared run for a lent H100 / H200 (torch, pyarrow, pandas, numpy; no Dask, no cuDF, no network, and
ctrflow not pip-installed), measured side by side in one process:

1. tests: ``pytest -k gpu`` (``-k`` also matches the ``gpu`` marker) over the loader, lists, models, train and
   serve test files, in a subprocess that overlaps the data generation; modules that cannot import without Dask
   are skipped (``bench/gpu_check_plugin.py``), not failed.
2. data: ``--rows`` Criteo-shaped processed rows (26 int32 ids, 13 float32, a float32 label drawn from a
   learnable click model) written by the ETL's own ``write_partition`` and ``Schema.save`` in its layout
   (REQUIRED columns, plain pages, one page per column chunk) + ``--valid-rows`` for the AUC.
3. loader: ``Loader(device=cuda)`` rows/s unshuffled and shuffled, beside the host read bound (pyarrow
   reading the same files, page-cached) and the pinned host-to-device copy bound of the same bytes.
4. train: DLRM with fit.py's sizes and optimizers (Trainer pieces, row-sparse lazy Adam), fed by the loader,
   in bf16 autocast + TF32 and in fp32, at each ``--batch-sizes``: samples/s, a synchronised step split
   (input / forward + loss / backward / optimizer), peak GPU memory, validation AUC after a fixed number of
   steps; and the same on a few batches already on the GPU (the model-only bound).
5. serve: p50 / p99 latency of 256-row requests: the first training run's checkpoint reloaded as
   ``ctrflow.serve`` does and called on pre-transformed host rows. ``Predictor`` needs a fitted ETL Workflow
   (Dask) and HTTP needs uvicorn + FastAPI as well: where they are missing the table says so.

``gpu_check.json`` and ``gpu_check.md`` are written to ``--out`` after every section, and the table is printed.
A failing section records its error and the next one runs; ``--budget-s`` bounds the whole run (each section
gets a share of it) and a watchdog writes what is there and exits if the run overruns it by 45 s.

Usage:
    python bench/gpu_check.py --out $OUT                   # on the GPU machine (about 6 minutes)
    python bench/gpu_check.py --cpu-dry-run --out /tmp/gc  # the same path, tiny, on a CPU (tests run it)
"""

from __future__ import annotations

import argparse
import atexit
import gc
import glob
import importlib.metadata
import importlib.util
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
STAGES = ("etl", "loader", "models", "train", "bench", "serve")
N_CAT, N_CONT = 26, 13
ROW_BYTES = 4 * (N_CAT + N_CONT + 1)  # int32 ids, float32 continuous, float32 label
SHARE = {"tests": 0.22, "data": 0.15, "loader": 0.12, "train": 0.38, "serve": 0.08}  # of --budget-s
TEST_GLOBS = ("test_loader*.py", "test_lists*.py", "test_models.py", "test_train*.py", "test_fit.py",
              "test_serve*.py")
PACKAGES = ("torch", "pyarrow", "pandas", "numpy", "cupy-cuda13x", "numba", "pytest", "dask", "uvicorn", "fastapi")
DRY = {"rows": 200_000, "valid_rows": 50_000, "files": 4, "max_card": 20_000, "batch_sizes": [1024, 4096],
       "train_steps": 2, "split_steps": 1, "warmup_steps": 1, "serve_requests": 50, "repeat": 1,
       "loader_batch": 8192}


def ensure_ctrflow() -> str | None:
    """Make ``import ctrflow.<stage>`` work from this checkout without ``pip install``.

    The stages are mapped folders (``ctrflow.etl`` is ``etl/``), so ``PYTHONPATH=.`` cannot do it: a temporary
    ``ctrflow/`` namespace package of symlinks to the stage folders goes first on ``sys.path`` and on
    ``PYTHONPATH`` (for the pytest subprocess).

    Returns:
        The temporary directory, or None when ctrflow was importable already.
    """
    if sys.path and os.path.abspath(sys.path[0] or ".") == HERE:
        sys.path.pop(0)  # bench/ holds loader.py, train.py, serve.py: never top-level module names
    try:
        if importlib.util.find_spec("ctrflow.loader") is not None:
            return None
    except ImportError:
        pass
    shim = tempfile.mkdtemp(prefix="ctrflow-shim-")
    os.mkdir(os.path.join(shim, "ctrflow"))
    for stage in STAGES:
        os.symlink(os.path.join(ROOT, stage), os.path.join(shim, "ctrflow", stage))
    sys.path.insert(0, shim)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (shim, os.environ.get("PYTHONPATH")) if p)
    sys.modules.pop("ctrflow", None)
    importlib.invalidate_caches()
    return shim


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"


class Check:
    """The report, the time budget, shared state between sections and the output files of one run.

    Args:
        args: the parsed command line.
    """

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.t0, self.lock = args, time.perf_counter(), threading.Lock()
        self.state: dict[str, Any] = {}
        self.proc: subprocess.Popen | None = None
        self.device: Any = None  # torch.device, set by main
        self.work, self.schema = "", None  # the generated data's parent directory; its Schema (train section)
        self.report: dict[str, Any] = {"check": "bench/gpu_check.py", "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                                       "args": vars(args), "sections": {}}

    def left(self) -> float:
        """Seconds left of ``--budget-s``."""
        return self.args.budget_s - (time.perf_counter() - self.t0)

    def deadline(self, name: str) -> float:
        """``perf_counter`` time by which section ``name`` should end (its share, within the budget)."""
        return time.perf_counter() + max(0.0, min(SHARE[name] * self.args.budget_s, self.left()))

    def section(self, name: str, fn: Callable[..., dict[str, Any]]) -> None:
        """Run ``fn(self, deadline)``; record its result or its error, the seconds, then write the outputs."""
        t = time.perf_counter()
        self.report["running"] = name  # what the watchdog names if it fires
        if name in self.args.skip:
            rec: dict[str, Any] = {"status": "skipped", "error": "--skip"}
        elif self.left() < 3:
            rec = {"status": "skipped", "error": f"time budget spent ({self.args.budget_s:.0f}s)"}
        else:
            try:
                rec = {"status": "ok", **fn(self, self.deadline(name))}
            except Exception as e:  # one section's failure must not stop the others
                rec = {"status": "error", "error": _err(e), "traceback": traceback.format_exc(limit=6)}
        rec["seconds"] = round(time.perf_counter() - t, 2)
        self.report["sections"][name] = rec
        self.report.pop("running", None)
        print(f"[gpu_check] {name}: {rec['status']} in {rec['seconds']}s {rec.get('error', '')}", file=sys.stderr,
              flush=True)
        self.write()

    def write(self) -> str:
        """Write ``gpu_check.json`` and ``gpu_check.md`` atomically; returns the table."""
        from ctrflow.bench.gpu_check_report import goals, table

        with self.lock:
            self.report["seconds"] = round(time.perf_counter() - self.t0, 1)
            self.report["goals"] = goals(self.report)
            md = table(self.report)
            os.makedirs(self.args.out, exist_ok=True)
            for name, text in (("gpu_check.json", json.dumps(self.report, indent=2, default=str)),
                               ("gpu_check.md", md)):
                path = os.path.join(self.args.out, name)
                with open(path + ".tmp", "w") as f:
                    f.write(text + "\n")
                os.replace(path + ".tmp", path)
            return md

    def watchdog(self, limit: float) -> None:
        """After ``limit`` seconds: stop the pytest child, write what is there, print it and exit(3)."""

        def fire() -> None:
            self.report["watchdog"] = (f"stopped after {limit:.0f}s (--budget-s {self.args.budget_s:.0f} + 45) in "
                                       f"section {self.report.get('running', '?')}")
            if self.proc is not None and self.proc.poll() is None:
                self.proc.kill()
            print(self.write(), flush=True)
            os._exit(3)

        timer = threading.Timer(limit, fire)
        timer.daemon = True
        timer.start()


# ---- 1. tests ---------------------------------------------------------------------------------------------
def start_tests(ck: Check) -> None:
    """Launch ``pytest -k gpu`` on the GPU-relevant test files in the background (it overlaps the data)."""
    files = {os.path.relpath(p, ROOT) for g in TEST_GLOBS for p in glob.glob(os.path.join(ROOT, "tests", g))}
    for p in glob.glob(os.path.join(ROOT, "tests", "test_*.py")):  # any other file with a gpu-marked test
        with open(p) as f:
            if "mark.gpu" in f.read():
                files.add(os.path.relpath(p, ROOT))
    files.discard(os.path.join("tests", "test_gpu_check.py"))  # its name matches -k gpu: no recursion
    ck.state["test_files"] = sorted(files)
    if "tests" in ck.args.skip or importlib.util.find_spec("pytest") is None:
        return
    # The plugin skips the modules that cannot import without Dask; -rfEs lists failures, errors and skips.
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "ctrflow.bench.gpu_check_plugin",
           "--continue-on-collection-errors", "-rfEs", "-k", "gpu", *sorted(files)]
    ck.state["test_cmd"] = " ".join(cmd[1:])
    ck.state["test_log"] = tempfile.TemporaryFile("w+")
    ck.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=ck.state["test_log"], stderr=subprocess.STDOUT, text=True)


def finish_tests(ck: Check, deadline: float) -> dict[str, Any]:
    """Wait for the pytest child (until ``deadline``) and record its counts and output tail."""
    from ctrflow.bench.gpu_check_report import parse_pytest

    if ck.proc is None:
        return {"note": "pytest not installed: GPU tests not run", "files": ck.state.get("test_files")}
    try:
        rc = ck.proc.wait(timeout=max(1.0, deadline - time.perf_counter()))
    except subprocess.TimeoutExpired:
        ck.proc.kill()
        rc = ck.proc.wait()
        ck.state["test_timeout"] = True
    log = ck.state["test_log"]
    log.seek(0)
    text = log.read()
    out = {"command": ck.state["test_cmd"], "returncode": rc, **parse_pytest(text), "tail": text[-2500:]}
    if ck.state.get("test_timeout"):
        out["note"] = "stopped at its time share"
    return out


# ---- 2. data ----------------------------------------------------------------------------------------------
def _rows_split(rows: int, parts: int) -> list[int]:
    bounds = np.linspace(0, rows, max(1, parts) + 1).astype(int)
    return [int(b - a) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]


def make_data(ck: Check, deadline: float) -> dict[str, Any]:
    """Processed train / valid splits + ``schema.json`` in the ETL's layout, written by its own writer."""
    import pandas as pd
    import torch

    from ctrflow.etl.parquet_layout import MIN_ROW_GROUP
    from ctrflow.etl.schema import ColumnSchema, Schema
    from ctrflow.etl.writer import atomic_dir, write_partition
    from ctrflow.train.metrics import roc_auc

    a = ck.args
    rng = np.random.default_rng(a.seed)
    cards = [int(10 ** rng.uniform(1, math.log10(a.max_card))) + 3 for _ in range(N_CAT)]
    effects = [rng.normal(0, 0.35, c).astype(np.float32) for c in cards]  # the click model: one effect per id
    weights = rng.normal(0, 0.3, N_CONT).astype(np.float32)
    cats, conts = [f"C{i + 1}" for i in range(N_CAT)], [f"I{i + 1}" for i in range(N_CONT)]
    dtypes = {"label": "float32", **dict.fromkeys(conts, "float32"), **dict.fromkeys(cats, "int32")}
    out = os.path.join(ck.work, "processed")
    jobs = [("train", i, n) for i, n in enumerate(_rows_split(a.rows, a.files))]
    jobs += [("valid", i, n) for i, n in enumerate(_rows_split(a.valid_rows, max(1, a.files // 8)))]

    def write(job: tuple[str, int, int], tmp: str) -> tuple[np.ndarray, np.ndarray] | None:
        split, i, n = job
        r = np.random.default_rng([a.seed, int(split == "valid"), i])
        cols: dict[str, np.ndarray] = {}
        z = np.full(n, -1.3, np.float32)
        for j, name in enumerate(conts):
            cols[name] = r.standard_normal(n, dtype=np.float32)
            z += weights[j] * cols[name]
        for j, name in enumerate(cats):  # log-uniform ids: a few ids hold most rows, as in Criteo
            ids = np.minimum(2 + np.power(np.float32(cards[j] - 3), r.random(n, dtype=np.float32)), cards[j] - 1)
            cols[name] = ids.astype(np.int32)
            z += effects[j][cols[name]]
        prob = 1.0 / (1.0 + np.exp(-z))
        label = (r.random(n, dtype=np.float32) < prob).astype(np.float32)
        frame = pd.DataFrame({"label": label, **cols})
        write_partition(frame, os.path.join(tmp, split, f"part-{i:05d}.parquet"), dtypes, MIN_ROW_GROUP, "none")
        return (prob, label) if split == "valid" else None

    with atomic_dir(out, overwrite=True) as tmp:
        os.makedirs(os.path.join(tmp, "train"))
        os.makedirs(os.path.join(tmp, "valid"))
        with ThreadPoolExecutor(min(16, os.cpu_count() or 1)) as pool:
            done = [r for r in pool.map(lambda j: write(j, tmp), jobs) if r is not None]
        prob, label = (np.concatenate(x) for x in zip(*done, strict=True))
        oracle = roc_auc(torch.from_numpy(prob), torch.from_numpy(label))
        columns = [ColumnSchema(c, "categorical", "int32", cardinality=k, embedding_dim=16)
                   for c, k in zip(cats, cards, strict=True)]
        columns += [ColumnSchema(c, "continuous", "float32") for c in conts]
        columns.append(ColumnSchema("label", "label", "float32"))
        Schema(columns, {"rows": {"train": a.rows, "valid": a.valid_rows}, "task": "binary",
                         "generator": "bench/gpu_check.py", "synthetic": {"oracle": {"valid": {"auc": oracle}}}}
               ).save(os.path.join(tmp, "schema.json"))
    ck.state["data"] = out
    size = sum(os.path.getsize(p) for p in glob.glob(os.path.join(out, "*", "*.parquet")))
    return {"rows": a.rows, "valid_rows": a.valid_rows, "files": len(jobs), "bytes": size,
            "table_rows": sum(cards), "oracle_valid_auc": round(oracle, 5), "click_rate": round(float(label.mean()), 4)}


# ---- 3. loader --------------------------------------------------------------------------------------------
def copy_bound(nbytes: int, device: Any, repeat: int) -> tuple[float, str]:
    """Best seconds to move ``nbytes`` from a pinned host tensor to ``device`` (host memcpy without CUDA)."""
    import torch

    chunk = int(min(nbytes, 256 << 20))
    cuda = device.type == "cuda"
    src = torch.empty(chunk, dtype=torch.uint8, pin_memory=cuda)
    dst = torch.empty(chunk, dtype=torch.uint8, device=device)
    reps = max(1, math.ceil(nbytes / chunk))
    dst.copy_(src, non_blocking=True)
    _sync(device)
    best = math.inf
    for _ in range(repeat):
        t = time.perf_counter()
        for _ in range(reps):
            dst.copy_(src, non_blocking=True)
        _sync(device)
        best = min(best, (time.perf_counter() - t) * nbytes / (reps * chunk))
    return best, ("pinned host -> GPU copy (torch, non_blocking)" if cuda else "host memcpy (no CUDA)")


def bench_loader(ck: Check, deadline: float) -> dict[str, Any]:
    """Loader rows/s (unshuffled, shuffled) beside the host read bound and the host-to-device copy bound."""
    import pyarrow.parquet as pq

    from ctrflow.loader import Loader

    a, dev = ck.args, ck.device
    train = os.path.join(ck.state["data"], "train")
    files = sorted(glob.glob(os.path.join(train, "*.parquet")))
    columns = pq.read_schema(files[0]).names
    rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files)

    def read_s() -> float:
        t = time.perf_counter()
        for f in files:
            pq.read_table(f, columns=columns, use_threads=True, memory_map=True)
        return time.perf_counter() - t

    out: dict[str, Any] = {"rows": rows, "batch": a.loader_batch, "bytes_per_row": ROW_BYTES}
    read_s()  # warm: the files are page-cached from the write; this maps them once
    out["read_bound_rows_per_s"] = rows / min(read_s() for _ in range(max(1, a.repeat)))
    copy_s, out["copy_bound_kind"] = copy_bound(rows * ROW_BYTES, dev, max(1, a.repeat))
    out["copy_bound_rows_per_s"] = rows / copy_s
    out["copy_bound_gb_per_s"] = rows * ROW_BYTES / copy_s / 1e9
    for shuffle in (False, True):
        key = "shuffled" if shuffle else "unshuffled"
        with Loader(train, a.loader_batch, shuffle=shuffle, seed=a.seed, device=dev) as lo:
            out["loader_threads"] = lo.threads
            best = math.inf
            for i in range(1 + max(1, a.repeat)):  # the first epoch allocates the pinned / device buffers
                t, n = time.perf_counter(), 0
                for b in lo:
                    n += len(b)
                _sync(dev)
                if n != rows:
                    raise RuntimeError(f"loader ({key}) yielded {n} rows, the files hold {rows}")
                best = best if i == 0 else min(best, time.perf_counter() - t)
                if time.perf_counter() > deadline and i > 0:
                    break
        out[f"{key}_rows_per_s"] = rows / best
    out["unshuffled_vs_read"] = out["unshuffled_rows_per_s"] / out["read_bound_rows_per_s"]
    out["unshuffled_vs_copy"] = out["unshuffled_rows_per_s"] / out["copy_bound_rows_per_s"]
    out["shuffled_vs_unshuffled"] = out["shuffled_rows_per_s"] / out["unshuffled_rows_per_s"]
    return out


# ---- 4. train ---------------------------------------------------------------------------------------------
def _endless(loader: Any) -> Iterator[Any]:
    while True:  # each pass over the loader is a new epoch (a new shuffle)
        yield from loader


def train_one(ck: Check, precision: str, batch: int, model_only: bool, deadline: float,
              run_dir: str | None = None) -> dict[str, Any]:
    """Train a fresh DLRM for a fixed number of steps and time it (see the module docstring, item 4).

    Args:
        ck: the check (its args, device, data).
        precision: ``bf16`` (autocast + TF32 matmuls) or ``fp32``.
        batch: rows per step.
        model_only: cycle 4 batches already on the device instead of reading the loader.
        deadline: stop the timed steps at this ``perf_counter`` time.
        run_dir: write a checkpoint there afterwards (for the serve section).

    Returns:
        samples/s, ms per step and its split, peak GPU memory, loss and (from the loader) validation AUC.
    """
    import torch

    from ctrflow.loader import Loader
    from ctrflow.loader.batch import Batch
    from ctrflow.models import DLRM
    from ctrflow.train.config import TrainConfig
    from ctrflow.train.trainer import Trainer

    a, dev = ck.args, ck.device
    cuda, bf16 = dev.type == "cuda", precision == "bf16"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bf16
    torch.manual_seed(a.seed)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    # fit.py's defaults: DLRM dim 16, MLPs 512-256, Adam 1e-3 on the MLPs, lazy row-wise Adam 0.05 on the tables.
    cfg = TrainConfig(optimizer="adam", lr=1e-3, embedding_lr=0.05, decay="none", amp=bf16, device=str(dev),
                      progress=False, verbose=False, tensorboard=False, plot=False)
    tr = Trainer(DLRM.from_schema(ck.schema), cfg, out_dir=run_dir)
    tr.total_steps = a.warmup_steps + a.train_steps + a.split_steps
    losses: list[torch.Tensor] = []
    # Model-only: 4 batches read on the host (so the bound does not hang on the device loader), copied to the
    # device once and cycled; the reader thread is stopped so nothing competes with the model.
    with Loader(os.path.join(ck.state["data"], "train"), batch, shuffle=True, seed=a.seed,
                device="cpu" if model_only else dev, drop_last=True) as lo:
        src: Iterator[Any] = _endless(lo)
        if model_only:
            first = [next(src) for _ in range(4)]
            src = itertools.cycle([Batch(b.categorical.clone(), b.continuous.clone(), b.label.clone()).to(dev)
                                   for b in first])
            lo.stop()
        first_batch = tr._to_device(next(src))
        tr.model.check_input(first_batch.categorical, first_batch.continuous)

        def step(split: bool) -> list[float]:
            marks = [time.perf_counter()]
            b = tr._to_device(next(src))  # the trainer's own pieces: to-device, autocast step, optimizer step
            if split:
                _sync(dev)
                marks.append(time.perf_counter())
            loss = tr.training_step(b)
            if split:
                _sync(dev)
                marks.append(time.perf_counter())
            loss.backward()
            if split:
                _sync(dev)
                marks.append(time.perf_counter())
            tr._optimizer_step()
            losses.append(loss.detach())
            if split:
                _sync(dev)
                marks.append(time.perf_counter())
            return list(np.diff(marks))

        for _ in range(a.warmup_steps):
            step(False)
        _sync(dev)
        t, timed = time.perf_counter(), 0
        while timed < a.train_steps and (timed == 0 or time.perf_counter() < deadline):
            step(False)
            timed += 1
        _sync(dev)
        seconds = time.perf_counter() - t
        splits = [step(True) for _ in range(a.split_steps) if time.perf_counter() < deadline]
    out: dict[str, Any] = {"steps": tr.step, "timed_steps": timed, "samples_per_s": timed * batch / seconds,
                           "ms_per_step": 1000 * seconds / timed, "truncated": timed < a.train_steps}
    if splits:
        out["split_ms"] = dict(zip(("input", "forward", "backward", "optimizer"),
                                   (round(1000 * float(x), 3) for x in np.mean(splits, axis=0)), strict=True))
    out["final_loss"] = float(losses[-1])
    out["finite"] = bool(torch.isfinite(torch.stack(losses)).all())
    if not model_only:  # 4 batches seen over and over say nothing of the AUC
        with Loader(os.path.join(ck.state["data"], "valid"), max(batch, 65536), shuffle=False, device=dev) as v:
            res = tr.evaluate(v)
        out.update(auc=res.get("auc"), logloss=res.get("logloss"))
    if cuda:
        out["peak_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
    if run_dir:
        t = time.perf_counter()
        ck.state["checkpoint"] = tr.save()
        out["checkpoint_s"] = time.perf_counter() - t
    return out


def bench_train(ck: Check, deadline: float) -> dict[str, Any]:
    """Every precision x batch size, from the loader and model-only; each config records its own error."""
    import torch

    from ctrflow.etl.schema import Schema

    ck.schema = Schema.load(ck.state["data"])
    runs: list[dict[str, Any]] = []
    out = {"model": "DLRM.from_schema (dim 16, MLPs 512-256-16 / 512-256-1), Adam + lazy row-wise Adam",
           "runs": runs}
    ck.report["sections"]["train"] = {"status": "running", **out}
    configs = [(p, b, m) for p in ck.args.precisions for b in ck.args.batch_sizes for m in (False, True)]
    for i, (precision, batch, model_only) in enumerate(configs):
        rec: dict[str, Any] = {"precision": precision, "batch": batch, "mode": "model-only" if model_only else "loader"}
        left = deadline - time.perf_counter()
        if left < 2:
            rec["error"] = "skipped: time share spent"
        else:
            try:  # a share of what is left, so one slow config cannot starve the rest
                run_dir = os.path.join(ck.work, "run") if i == 0 else None
                rec.update(train_one(ck, precision, batch, model_only, time.perf_counter() + left / (len(configs) - i),
                                     run_dir))
            except Exception as e:
                rec["error"] = _err(e)
            gc.collect()
            if ck.device.type == "cuda":
                torch.cuda.empty_cache()
        runs.append(rec)
        ck.write()
    by = {(r["precision"], r["batch"], r["mode"]): r.get("samples_per_s") for r in runs}
    for r in runs:
        bound = by.get((r["precision"], r["batch"], "model-only"))
        if r["mode"] == "loader" and r.get("samples_per_s") and bound:
            r["vs_model_only"] = r["samples_per_s"] / bound
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    if all("error" in r for r in runs):
        raise RuntimeError(f"every training config failed; first: {runs[0]['error']}")
    return out


# ---- 5. serve ---------------------------------------------------------------------------------------------
def bench_serve(ck: Check, deadline: float) -> dict[str, Any]:
    """Latency of 256-row requests: checkpoint reloaded, model called on pre-transformed host rows."""
    import pyarrow.parquet as pq
    import torch

    import ctrflow.models as models
    from ctrflow.etl.schema import Schema
    from ctrflow.train.checkpoint import load_checkpoint

    a, dev = ck.args, ck.device
    schema = Schema.load(ck.state["data"])
    path = ck.state.get("checkpoint")
    if path:  # rebuilt as ctrflow.serve.model_from_checkpoint does (that module needs the ETL Workflow: Dask)
        state = load_checkpoint(path)
        model = getattr(models, state["config"]["model_class"])(**state["config"]["model"])
        model.load_state_dict(state["model"])
        source = f"checkpoint of train run 1 ({os.path.basename(path)})"
    else:
        model, source = models.DLRM.from_schema(schema), "untrained DLRM (the train section left no checkpoint)"
    model = model.to(dev).eval()
    t = pq.read_table(sorted(glob.glob(os.path.join(ck.state["data"], "valid", "*.parquet")))[0])
    cat = np.stack([t.column(c).to_numpy() for c in schema.categorical], axis=1)
    cont = np.stack([t.column(c).to_numpy() for c in schema.continuous], axis=1)
    rows = a.request_rows
    reqs = [(torch.from_numpy(cat[i : i + rows]), torch.from_numpy(cont[i : i + rows]))
            for i in range(0, max(1, len(cat) - rows + 1), rows)][:64]

    def call(c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return torch.sigmoid(model(c.to(dev), x.to(dev)).float()).reshape(-1).cpu()  # .cpu() waits for it

    for i in range(20):
        call(*reqs[i % len(reqs)])
    lat = []
    for i in range(a.serve_requests):
        s = time.perf_counter()
        call(*reqs[i % len(reqs)])
        lat.append(time.perf_counter() - s)
        if time.perf_counter() > deadline:
            break
    ms = np.array(lat) * 1000
    out: dict[str, Any] = {"mode": "in-process model call on pre-transformed rows (host -> device -> host)",
                           "model": source, "request_rows": rows, "requests": len(lat),
                           "p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)),
                           "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean()),
                           "rows_per_s": rows * len(lat) / (ms.sum() / 1000)}
    try:
        import ctrflow.serve  # noqa: F401

        out["predictor"] = ("not measured: Predictor needs the fitted ETL Workflow of the data; this check writes "
                            "processed data directly (fitting a Workflow needs Dask, absent on the GPU image)")
    except Exception as e:
        out["predictor"] = f"not measured: ctrflow.serve does not import here ({_err(e)})"
    missing = [m for m in ("uvicorn", "fastapi") if importlib.util.find_spec(m) is None]
    out["http"] = (f"skipped: {', '.join(missing)} not installed" if missing else
                   "skipped: the server serves a Predictor (see predictor)")
    return out


# ---- main -------------------------------------------------------------------------------------------------
def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line (``--cpu-dry-run`` replaces the sizes with tiny ones and the device with cpu)."""
    from ctrflow.bench.gpu_check_report import SECTIONS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="directory for gpu_check.json and gpu_check.md ($OUT on the device)")
    p.add_argument("--budget-s", type=float, default=420, help="wall-time budget of the whole check")
    p.add_argument("--cpu-dry-run", action="store_true", help="tiny sizes on the CPU: proves the script runs")
    p.add_argument("--device", default="auto", help="auto | cuda | cuda:N | cpu")
    p.add_argument("--rows", type=int, default=20_000_000, help="training rows generated (the loader's epoch)")
    p.add_argument("--valid-rows", type=int, default=1_048_576, help="validation rows (AUC)")
    p.add_argument("--files", type=int, default=16, help="training parquet files")
    p.add_argument("--max-card", type=int, default=2_000_000, help="largest table's cardinality")
    p.add_argument("--loader-batch", type=int, default=65536, help="batch of the loader measurement")
    p.add_argument("--repeat", type=int, default=3, help="timed loader / read / copy passes (best kept)")
    p.add_argument("--batch-sizes", type=_ints, default=[65536, 400000], help="training batch sizes")
    p.add_argument("--precisions", type=lambda s: s.split(","), default=["bf16", "fp32"], help="bf16 and/or fp32")
    p.add_argument("--warmup-steps", type=int, default=5, help="untimed steps per training config")
    p.add_argument("--train-steps", type=int, default=50, help="timed steps per training config")
    p.add_argument("--split-steps", type=int, default=8, help="synchronised steps for the step split")
    p.add_argument("--request-rows", type=int, default=256, help="rows per serving request")
    p.add_argument("--serve-requests", type=int, default=1000, help="timed serving requests")
    p.add_argument("--skip", type=lambda s: s.split(","), default=[], help=f"sections to skip: {','.join(SECTIONS)}")
    p.add_argument("--work", default=None, help="directory for the generated data (default: a temporary one)")
    p.add_argument("--keep", action="store_true", help="keep the generated data and checkpoint")
    p.add_argument("--seed", type=int, default=0, help="data, weights and shuffle seed")
    a = p.parse_args(argv)
    if a.cpu_dry_run:
        a.device = "cpu"
        for k, v in DRY.items():
            if getattr(a, k) == p.get_default(k):
                setattr(a, k, v)
    bad = [x for x in a.precisions if x not in ("bf16", "fp32")] + [x for x in a.skip if x not in SECTIONS]
    if bad:
        p.error(f"unknown precision / section: {bad}")
    return a


def main(argv: list[str] | None = None) -> int:
    shim = ensure_ctrflow()
    if shim:
        atexit.register(shutil.rmtree, shim, True)
    a = parse_args(argv)
    ck = Check(a)
    ck.watchdog(a.budget_s + 45)
    start_tests(ck)  # first: it runs beside the data generation
    import torch

    from ctrflow.bench.machine import describe_machine

    if a.device == "auto":
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    ck.device = torch.device(a.device)
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    ck.report["machine"] = {**describe_machine(), "device": str(ck.device), "torch": torch.__version__,
                            "torch_cuda": torch.version.cuda, "packages": versions,
                            "ctrflow_import": "symlink shim (not installed)" if shim else "installed",
                            "device_name": torch.cuda.get_device_name(ck.device) if ck.device.type == "cuda"
                            else "CPU (dry run)" if a.cpu_dry_run else "CPU"}
    ck.work = a.work or tempfile.mkdtemp(prefix="gpu-check-")
    try:
        ck.section("data", make_data)
        ck.section("tests", finish_tests)
        if "data" not in ck.state:
            for name in ("loader", "train", "serve"):
                ck.report["sections"][name] = {"status": "error", "error": "no data (the data section failed)"}
        else:
            for name, fn in (("loader", bench_loader), ("train", bench_train), ("serve", bench_serve)):
                ck.section(name, fn)
    finally:
        if ck.proc is not None and ck.proc.poll() is None:
            ck.proc.kill()
        if not a.keep and not a.work:
            shutil.rmtree(ck.work, ignore_errors=True)
    print(ck.write(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
