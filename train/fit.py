"""Train a CTR model on a processed dataset and report validation AUC / logloss (or RMSE).

Commands (from the repository root)::

    python etl/run.py && python train/fit.py                 # DLRM, 1 epoch on data/processed
    python train/fit.py --model tabular --batch-size 400000 --lr 0.0132 --optimizer adam
    python train/fit.py --out runs/a --stop-after 100        # stop at step 100 (the schedule is the whole run's)
    python train/fit.py --out runs/a --resume                # ... continue: same weights as never stopping
    python train/fit.py --resume runs/a --data data/day2     # next day (etl/run.py --update): tables grow
    python train/fit.py --task regression --data DIR         # MSE loss, RMSE metric
    python train/fit.py --amp                                # bfloat16 autocast (CPU with AMX, or GPU)
    python train/fit.py --features features.toml             # per-feature options, shared tables, list features

Data parallel on N processes (one per GPU, or N CPU processes with Gloo; see ``ctrflow.train.ddp``
and the README's "Scaling out")::

    torchrun --nproc_per_node=8 train/fit.py --data DIR --batch-size 4096     # global batch 8 * 4096
    torchrun --nproc_per_node=2 train/fit.py --device cpu --threads 1         # two CPU ranks (Gloo)

Each rank reads its shard of the training and validation sets (the loader reads torchrun's RANK /
WORLD_SIZE and keeps batch counts equal), validation metrics are computed over all ranks'
predictions, and only rank 0 logs and writes files.

Writes into the run directory (``--out``, default ``runs/<model>-<timestamp>``): ``config.json``,
``metrics.jsonl``, ``checkpoints/ckpt-<step>.pt`` (newest 3), ``curve.png``, ``summary.json`` and
TensorBoard scalars under ``tb/`` when TensorBoard is installed. Prints at the end the validation
metrics, rows/s of the whole run and of the loader alone, and the generator's oracle AUC when the
data came from ``etl/run.py``'s embedded generator. Bad input exits with code 2 and one line.
"""

from __future__ import annotations

import os

# Before torch loads OpenMP: idle OpenMP threads sleep instead of spinning. With the loader's reader
# thread (or anything else) sharing the cores, spinning threads slowed small-batch steps ~7x here.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Any, NoReturn  # noqa: E402

import numpy as np  # noqa: E402

from ctrflow.train.fit_args import UsageError, check_run_dir, parse_args, run_dir  # noqa: E402

__all__ = ["UsageError", "build_model", "cli", "main", "parse_args", "report", "run"]


def _check_dataset(path: str):
    from ctrflow.etl.schema import Schema, SchemaError

    if not os.path.isdir(path):
        raise UsageError(f"--data {path}: no such directory (run `python etl/run.py` first)")
    try:
        schema = Schema.load(path)
    except SchemaError as e:
        raise UsageError(f"--data {path} is not a processed dataset: {e}") from None
    for split in ("train", "valid"):
        d = os.path.join(path, split)
        if not os.path.isdir(d) or not any(n.endswith(".parquet") for n in os.listdir(d)):
            raise UsageError(f"--data {path} has no {split}/*.parquet: not a processed dataset")
    if not schema.label:
        raise UsageError(f"--data {path}: schema.json declares no label column")
    return schema


def build_model(a: argparse.Namespace, schema: Any, features: Any = None):
    """The model the arguments describe, sized from the dataset's schema (``features``: a FeatureConfig).
    ``--numeric-embedding auto`` is resolved here (:func:`ctrflow.models.numeric.auto_kind`)."""
    from ctrflow.models.numeric import auto_kind
    from ctrflow.models.protocol import MODELS
    from ctrflow.train import ddp

    numeric = auto_kind(getattr(a, "numeric_embedding", None), schema)
    if getattr(a, "numeric_embedding", None) == "auto" and ddp.is_main():
        why = ("--numeric-embedding none for the raw columns only" if numeric else
               "the dataset records no quantiles: rerun etl/run.py to get them" if schema.continuous else
               "no continuous columns")
        print(f"numeric embedding: {numeric or 'none'} ({why})", file=sys.stderr, flush=True)
    return MODELS[a.model].from_options(schema, layers=a.layers, bottom_layers=a.bottom_layers,
                                        embedding_dim=a.embedding_dim, features=features, dropout=a.dropout,
                                        numeric_embedding=numeric)

def _feature_config(a: argparse.Namespace):
    """``--features FILE`` loaded (None without it); :class:`UsageError` when the file is bad."""
    if not a.features:
        return None
    from ctrflow.models.features import FeatureConfig

    try:
        return FeatureConfig.load(a.features)
    except ValueError as e:
        raise UsageError(f"--features: {e}") from None


def _task(flag: str | None, schema: Any, data: str) -> str:
    """The task: what the ETL recorded in ``schema.json`` (binary when it recorded none); a ``--task`` that
    contradicts it is a :class:`UsageError` (a binary model on 1-5 ratings trains nothing useful)."""
    recorded = schema.metadata.get("task")
    if flag is not None and recorded is not None and flag != recorded:
        raise UsageError(f"--task {flag} contradicts {os.path.join(data, 'schema.json')}, whose label was "
                         f"processed for {recorded}: drop --task, or rerun etl/run.py with --task {flag}")
    return flag or recorded or "binary"


MIN_STEPS = 100  # below this many optimizer steps a CTR model trains to little better than chance


def _run_steps(a: argparse.Namespace, batches: int) -> int:
    """Optimizer steps of the run: ``batches`` per epoch, accumulated, over the epochs, up to --max-steps."""
    steps = -(-batches // a.grad_accum) * a.epochs
    return min(steps, a.max_steps or steps)


def _check_steps(a: argparse.Namespace, batches: int, rows: int) -> None:
    """Say, before training, when the run has too few optimizer steps to learn in (one line, stderr)."""
    steps = _run_steps(a, batches)
    if steps < MIN_STEPS:
        print(f"warning: {steps} optimizer steps ({rows:,} training rows, --batch-size {a.batch_size}, "
              f"--epochs {a.epochs}) are too few to learn in (aim for >= {MIN_STEPS}): use more data, more "
              f"--epochs, or a smaller --batch-size (e.g. {max(1, rows * a.epochs // (MIN_STEPS * a.grad_accum)):,})",
              file=sys.stderr, flush=True)


def _say_scaling(cfg: Any) -> None:
    """One line on what the batch rule set, when the batch is past the reference (stderr)."""
    from ctrflow.train.scaling import NO_RULE_STEPS, REFERENCE_BATCH, step_strength

    if not cfg.batch_scaling or cfg.rows_per_step <= REFERENCE_BATCH:
        return
    head = (f"batch scaling: {cfg.rows_per_step:,} rows per step = {cfg.rows_per_step / REFERENCE_BATCH:.1f}x "
            f"batch {REFERENCE_BATCH}, {f'{cfg.run_steps:,}' if cfg.run_steps else '?'} steps")
    strength = step_strength(cfg.run_steps)
    if strength == 0:
        print(f"{head}: no scaling, the batch-{REFERENCE_BATCH} defaults (a run of >= {NO_RULE_STEPS} steps learns "
              "better with them)", file=sys.stderr, flush=True)
        return
    share = "" if strength == 1 else f" ({strength:.0%} of the rule: it fades out by {NO_RULE_STEPS} steps)"
    print(f"{head}{share}: lr {cfg.lr:.4g}, embedding lr {cfg.embedding_lr:.4g}, warm-up "
          f"{cfg.warmup_steps:.3g}, embedding L2 {cfg.embedding_l2:.3g}, CowClip r={cfg.embedding_clip:g}, row warm-up "
          f"{cfg.embedding_row_warmup:.3g}"
          f"{f', MLP gradient norm <= {cfg.grad_clip:g}' if cfg.grad_clip else ''} "
          "(--no-batch-scaling: off)", file=sys.stderr, flush=True)


def _check_finite(data: str, schema: Any) -> None:
    """Name the continuous / label columns holding NaN or inf (column, count, split) before the first step:
    one such value otherwise surfaces as "loss is nan at step N" with no column named."""
    import glob

    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    bad: dict[str, int] = {}
    for split in ("train", "valid"):
        for f in sorted(glob.glob(os.path.join(data, split, "*.parquet"))):
            pf = pq.ParquetFile(f)
            names = [c for c in (*schema.continuous, *schema.label) if c in pf.schema_arrow.names]
            table = pf.read(columns=names)
            for name in names:
                col = table.column(name)
                if not _is_float(col.type):
                    continue
                n = len(col) - pc.sum(pc.is_finite(col)).as_py() - col.null_count
                if n:
                    bad[f"{name} ({split})"] = bad.get(f"{name} ({split})", 0) + int(n)
    if bad:
        shown = ", ".join(f"{k}: {v:,}" for k, v in bad.items())
        raise UsageError(f"--data {data} holds non-finite values (NaN or inf) that training would turn into a NaN "
                         f"loss: {shown}; fix the input and rerun etl/run.py (which treats inf as missing)")


def _is_float(t: Any) -> bool:
    """An arrow floating-point type (only those can hold NaN / inf)."""
    import pyarrow as pa

    return pa.types.is_floating(t)


def _target(a: argparse.Namespace, schema: Any) -> dict[str, Any]:
    """The regression target transform from the training labels (``ctrflow.train.target``)."""
    import glob

    import pyarrow.parquet as pq

    from ctrflow.train.target import target_stats

    label = schema.label[0]
    files = sorted(glob.glob(os.path.join(a.data, "train", "*.parquet")))
    labels = np.concatenate([pq.read_table(f, columns=[label]).column(0).to_numpy() for f in files])
    try:
        return target_stats(labels, a.y_range)
    except ValueError as e:
        raise UsageError(f"--data {a.data}: {e}") from None


def _eval_every(a: argparse.Namespace, batches: int) -> int:
    """``--eval-every``, or by default a fifth of the run (so the curve has five validation points)."""
    if a.eval_every is not None:
        return a.eval_every
    if a.epochs > 1:
        return 0  # at every epoch end: what best-checkpoint selection and --patience compare
    return max(1, -(-_run_steps(a, batches) // 5))


def _loader_alone(make, batches: int) -> float:
    """Rows/s of one pass of a fresh loader, with no model: what the data path alone delivers."""
    rows = 0
    t0 = time.perf_counter()
    with make() as loader:
        for i, b in enumerate(loader):
            rows += len(b)
            if i + 1 >= batches:
                break
    return rows / max(time.perf_counter() - t0, 1e-9)


def run(a: argparse.Namespace) -> dict[str, Any]:
    import torch

    from ctrflow.loader.loader import Loader
    from ctrflow.train import ddp
    from ctrflow.train.trainer import TrainConfig, Trainer, resolve_device

    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    schema = _check_dataset(a.data)
    _check_finite(a.data, schema)
    a.task = _task(a.task, schema, a.data)
    if a.sharded_embeddings:
        ddp.check_sharded_embeddings()
    device = ddp.init(resolve_device(a.device))  # torchrun: join the process group, take GPU LOCAL_RANK
    features = _feature_config(a)
    try:
        model = build_model(a, schema, features)
    except ValueError as e:
        raise UsageError(f"the dataset's schema does not fit --model {a.model}: {e}") from None
    out = run_dir(a)
    check_run_dir(a, out)  # before anything is written: a refused run changes nothing on disk
    amp = {"auto": "auto", "bf16": True, "off": False}[a.amp]
    loader_device = device if device.type == "cuda" else "cpu"
    spec = getattr(model, "features", None)
    lists = list(spec.spec.lists) if spec is not None else []  # list features the model reads

    def make_train():
        return Loader(os.path.join(a.data, "train"), a.batch_size, shuffle=True, seed=a.seed,
                      parts_per_chunk=a.parts_per_chunk, device=loader_device, lists=lists, cache=a.cache)

    with make_train() as sized:  # the plan alone (no thread starts): batches per epoch, this rank's rows
        batches, rows = len(sized), sized.rows
    cfg = TrainConfig(
        task=a.task, batch_size=a.batch_size, valid_batch_size=a.valid_batch_size, optimizer=a.optimizer,
        lr=a.lr, embedding_lr=a.embedding_lr, embedding_optimizer=a.embedding_optimizer,
        batch_scaling=not a.no_batch_scaling, run_steps=_run_steps(a, batches), world_size=ddp.world_size(),
        select=a.select, patience=a.patience,
        target=_target(a, schema) if a.task == "regression" else None,
        embedding_row_warmup=a.embedding_row_warmup,
        weight_decay=a.weight_decay, embedding_l2=a.embedding_l2, grad_clip=a.grad_clip,
        warmup_steps=a.warmup, decay=a.decay, min_lr_factor=a.min_lr_factor, epochs=a.epochs,
        max_steps=a.max_steps, stop_after=a.stop_after, grad_accum=a.grad_accum, micro_batch=a.micro_batch,
        eval_every=_eval_every(a, batches), log_every=a.log_every, checkpoint_every=a.checkpoint_every,
        keep_checkpoints=a.keep, amp=amp, device=str(device), progress=False if a.no_progress else None,
        extra={"argv": {k: v for k, v in vars(a).items()}, "data": os.path.abspath(a.data)},
    )
    if a.sharded_embeddings:  # torchrec shards the tables over the ranks (train/sharded.py)
        from ctrflow.train.sharded import shard_model

        model = shard_model(model, device, a.optimizer, cfg.lr, a.embedding_optimizer or a.optimizer,
                            cfg.embedding_lr)
    if ddp.is_main():
        _say_scaling(cfg)
        _check_steps(a, batches, rows)
    trainer = Trainer(model, cfg, out_dir=out)
    if a.resume:  # onto a new day (etl/run.py --update): grow the tables, restart the lr schedule (models/grow.py)
        from ctrflow.models.grow import continue_state

        data = os.path.abspath(a.data)
        trainer.state_hook = lambda st: continue_state(st, trainer.model, trainer.optimizers, data)
    if ddp.is_main():  # torchrun: rank 0 writes the run directory
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "config.json.tmp"), "w") as f:
            json.dump({"args": vars(a), "model": getattr(model, "config", None), "lr": cfg.lr,
                       "world_size": ddp.world_size()}, f, indent=2, default=str)
        os.replace(os.path.join(out, "config.json.tmp"), os.path.join(out, "config.json"))
    # every_row: under torchrun the validation batch grows a little, if needed, so every row is scored once.
    with make_train() as train, Loader(os.path.join(a.data, "valid"), a.valid_batch_size, shuffle=False,
                                       every_row=True, parts_per_chunk=a.parts_per_chunk, device=loader_device,
                                       lists=lists) as valid:
        summary = trainer.fit(train, valid, resume=a.resume)
        n_train = len(train)
    summary["loader_rows_per_s"] = None if a.no_loader_bench else _loader_alone(make_train, n_train)
    summary["oracle"] = (schema.metadata.get("synthetic") or {}).get("oracle")
    summary["run_dir"] = out
    summary["model"] = a.model
    summary.update(ddp.job_totals(summary))  # torchrun: rows and rows/s of all ranks together
    if ddp.is_main():
        with open(os.path.join(out, "summary.json.tmp"), "w") as f:
            json.dump(summary, f, indent=2, default=str)
        os.replace(os.path.join(out, "summary.json.tmp"), os.path.join(out, "summary.json"))
    return summary


def report(s: dict[str, Any], task: str) -> str:
    """The end-of-run text: validation metrics, throughput, oracle comparison."""
    v = s["valid"] or {}
    lines = [f"{s['model']}: {s['steps']} steps, {s['epochs']} epoch(s), {s['rows']:,} rows in {s['seconds']:.1f}s"]
    if task == "binary":
        lines.append(f"validation AUC {v.get('auc', float('nan')):.5f}  logloss {v.get('logloss', float('nan')):.5f}"
                     f"  AP {v.get('ap', float('nan')):.5f}  ({v.get('rows', 0):,} rows)")
        oracle = s.get("oracle") or {}
        if "valid_auc" in oracle:
            gap = v.get("auc", float("nan")) - oracle["valid_auc"]
            oll = oracle.get("valid_logloss", float("nan"))
            lines.append(f"oracle AUC     {oracle['valid_auc']:.5f}  logloss {oll:.5f}  (model - oracle {gap:+.5f})")
    else:
        lines.append(f"validation RMSE {v.get('rmse', float('nan')):.5f}  ({v.get('rows', 0):,} rows)")
    ldr = s.get("loader_rows_per_s")
    lines.append(f"throughput: {s['rows_per_s']:,.0f} rows/s whole run (training + evaluation)"
                 + (f", loader alone {ldr:,.0f} rows/s" if ldr else ""))
    if s.get("world_size"):
        lines.append(f"data parallel: {s['world_size']} ranks, {s['global_rows']:,} rows, "
                     f"{s['global_rows_per_s']:,.0f} rows/s all ranks")
    best = s.get("best")
    if best:
        lines.append(f"best checkpoint: step {best['step']} of {s['steps']} by {best['metric']} "
                     f"({best['value']:.5f}), the metrics above and the model saved in {best['path']}")
    if s.get("stopped_early"):
        lines.append(f"stopped early at step {s['stopped_early']}: no better {best['metric'] if best else 'metric'} "
                     f"in --patience evaluations")
    if s.get("resumed_from"):
        lines.append(f"resumed from {s['resumed_from']}")
    if s.get("stopped_at"):
        lines.append(f"stopped at step {s['stopped_at']} of {s['total_steps']} (--stop-after): "
                     f"continue with --out {s['run_dir']} --resume")
    lines.append(f"run dir: {s['run_dir']}  checkpoint: {s['checkpoint']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (0 ok, 2 bad input or a diverged run)."""
    from ctrflow.etl.schema import SchemaError
    from ctrflow.train import ddp
    from ctrflow.train.checkpoint import CheckpointError
    from ctrflow.train.trainer import TrainingError

    try:
        a = parse_args(argv)
        summary = run(a)
        show = ddp.is_main()
        ddp.teardown()
    except (UsageError, SchemaError, CheckpointError, TrainingError, ValueError) as e:  # ValueError: data
        print(f"error: {e}", file=sys.stderr)  # that does not fit the model, bad loader input
        return 2
    except KeyboardInterrupt:
        return 130
    if show:
        print(report(summary, a.task))
    return 0


def cli(argv: list[str] | None = None) -> NoReturn:
    """``python train/fit.py`` and the ``ctrflow-fit`` script: :func:`main`, then leave the process the
    way :func:`ctrflow.train.ddp.exit_process` says (under torchrun it skips interpreter finalization)."""
    from ctrflow.train import ddp

    ddp.exit_process(main(argv))


if __name__ == "__main__":
    cli()
