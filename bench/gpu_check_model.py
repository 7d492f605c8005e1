"""Sections 4-5 of ``bench/gpu_check.py``: DLRM training (loader-fed and model-only) and serving latency."""

from __future__ import annotations

import gc
import glob
import importlib.util
import itertools
import os
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from ctrflow.bench.gpu_check_core import Check, error_text, sync


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
                sync(dev)
                marks.append(time.perf_counter())
            loss = tr.training_step(b)
            if split:
                sync(dev)
                marks.append(time.perf_counter())
            loss.backward()
            if split:
                sync(dev)
                marks.append(time.perf_counter())
            tr._optimizer_step()
            losses.append(loss.detach())
            if split:
                sync(dev)
                marks.append(time.perf_counter())
            return list(np.diff(marks))

        for _ in range(a.warmup_steps):
            step(False)
        sync(dev)
        t, timed = time.perf_counter(), 0
        while timed < a.train_steps and (timed == 0 or time.perf_counter() < deadline):
            step(False)
            timed += 1
        sync(dev)
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
                rec["error"] = error_text(e)
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
        out["predictor"] = f"not measured: ctrflow.serve does not import here ({error_text(e)})"
    missing = [m for m in ("uvicorn", "fastapi") if importlib.util.find_spec(m) is None]
    out["http"] = (f"skipped: {', '.join(missing)} not installed" if missing else
                   "skipped: the server serves a Predictor (see predictor)")
    return out

