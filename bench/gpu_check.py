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

Layout: this script (``ensure_ctrflow``, the command line, ``main``), ``gpu_check_core.py`` (``Check``: the
report, the budget, the outputs), ``gpu_check_data.py`` (sections 1-3), ``gpu_check_model.py`` (4-5),
``gpu_check_report.py`` (the table) and ``gpu_check_plugin.py``; all imported as ``ctrflow.bench.*`` after
``ensure_ctrflow()``.

Usage:
    python bench/gpu_check.py --out $OUT                   # on the GPU machine (about 6 minutes)
    python bench/gpu_check.py --cpu-dry-run --out /tmp/gc  # the same path, tiny, on a CPU (tests run it)
"""

from __future__ import annotations

import argparse
import atexit
import importlib.metadata
import importlib.util
import os
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
STAGES = ("etl", "loader", "models", "train", "bench", "serve")
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
    """Run the sections in order (the tests overlap the data), write the outputs and print the table."""
    shim = ensure_ctrflow()
    if shim:
        atexit.register(shutil.rmtree, shim, True)
    # Only importable once ensure_ctrflow has run (bench/ itself is never on sys.path: see there).
    from ctrflow.bench.gpu_check_core import Check
    from ctrflow.bench.gpu_check_data import bench_loader, finish_tests, make_data, start_tests
    from ctrflow.bench.gpu_check_model import bench_serve, bench_train

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
