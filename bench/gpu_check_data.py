"""Sections 1-3 of ``bench/gpu_check.py``: the GPU tests (a pytest child), the generated data and the loader."""

from __future__ import annotations

import glob
import importlib.util
import math
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from ctrflow.bench.gpu_check_core import N_CAT, N_CONT, ROW_BYTES, Check, sync
from ctrflow.bench.gpu_check_report import parse_pytest

# realpath: under the symlink shim __file__ lies in the temporary ctrflow/ dir, not in the checkout
ROOT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
TEST_GLOBS = ("test_loader*.py", "test_lists*.py", "test_models.py", "test_train*.py", "test_fit.py",
              "test_serve*.py")


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
    sync(device)
    best = math.inf
    for _ in range(repeat):
        t = time.perf_counter()
        for _ in range(reps):
            dst.copy_(src, non_blocking=True)
        sync(device)
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
                sync(dev)
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

