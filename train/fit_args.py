"""``train/fit.py``'s command line: every flag, its help and its default (read from
:class:`~ctrflow.train.config.TrainConfig` and :mod:`ctrflow.models.defaults`, never written here)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

from ctrflow.etl.cli_help import DefaultsHelpFormatter, usage_name
from ctrflow.models.defaults import DLRM_EMBEDDING_DIM, HIDDEN, NUMERIC_DIM, NUMERIC_EMBEDDING, TABULAR_MAX_DIM
from ctrflow.models.protocol import MODELS
from ctrflow.train.config import EMBEDDING_LR, LR, OPTIMIZERS, ROW_WARMUP, TrainConfig
from ctrflow.train.micro import AUTO_ROWS

# Every default below is TrainConfig's or ctrflow.models.defaults' (tests/test_fit.py checks it).
D = {f.name: f.default for f in dataclasses.fields(TrainConfig)}


def _ints(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(x < 1 for x in out):
        raise argparse.ArgumentTypeError(f"layer widths must be >= 1, got {text!r}")
    return out


class UsageError(Exception):
    """Bad input (exit code 2, one line)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + message
        raise UsageError(message)


def prog_name(script: str = "train/fit.py") -> str:
    """The command the user typed (:func:`ctrflow.etl.cli_help.usage_name`)."""
    return usage_name("ctrflow-fit", "ctrflow.train.fit", script)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; :class:`UsageError` on bad arguments."""
    p = _Parser(prog=prog_name("train/fit.py"), formatter_class=DefaultsHelpFormatter,
                description="Train a CTR model on a processed dataset and report validation AUC / logloss (or RMSE).")
    p.add_argument("--data", default="data/processed", help="processed dataset dir (etl/run.py's --output)")
    p.add_argument("--model", choices=tuple(MODELS), default="dlrm",
                   help="dlrm (torchrec's DLRM), tabular (fastai's TabularModel) or dcn (DCN-v2, stacked cross "
                        "layers then the deep MLP)")
    p.add_argument("--batch-size", type=int, default=D["batch_size"], help="training rows per batch")
    p.add_argument("--valid-batch-size", type=int, default=D["valid_batch_size"], help="rows per validation batch")
    p.add_argument("--epochs", type=int, default=D["epochs"], help="passes over the training split")
    p.add_argument("--max-steps", type=int, default=None,
                   help="run length in optimizer steps (default: the epochs' steps); the lr schedule ends here")
    p.add_argument("--stop-after", type=int, default=None, metavar="STEP",
                   help="stop (checkpointed) once the run reaches step STEP without shortening the lr "
                        "schedule; --resume then continues it as if never stopped (default: run to the end)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=D["optimizer"],
                   help="rule for the MLPs (and the tables unless --embedding-optimizer)")
    p.add_argument("--lr", type=float, default=None,
                   help="MLP learning rate (default: " + ", ".join(f"{k} {v:g}" for k, v in LR.items()) + ")")
    p.add_argument("--embedding-lr", type=float, default=None,
                   help="learning rate of the tables (default: "
                        + ", ".join(f"{k} {v:g}" for k, v in EMBEDDING_LR.items()) + ")")
    p.add_argument("--embedding-optimizer", choices=OPTIMIZERS, default=D["embedding_optimizer"],
                   help="rule for the embedding tables (default: --optimizer; row-wise Adagrad / lazy Adam)")
    p.add_argument("--weight-decay", type=float, default=D["weight_decay"],
                   help="L2 on the dense (MLP) weights")
    p.add_argument("--embedding-l2", type=float, default=None,
                   help="L2 on the embedding rows each batch touches, row-sparse (default: the batch rule's, "
                        "0 at batch <= 512)")
    p.add_argument("--embedding-row-warmup", type=float, default=None, metavar="LOOKUPS",
                   help=f"lazy Adam tables: a row's step is n / (n + LOOKUPS) of Adam's, n its lookups so far, so "
                        f"ids seen a few times stay near their start (0: off; default: {ROW_WARMUP:g} for the adam "
                        f"embedding optimizer, 0 for the others; not with --sharded-embeddings, whose tables torchrec "
                        f"updates)")
    p.add_argument("--grad-clip", type=float, default=None, metavar="NORM",
                   help="clip the global L2 norm of the MLPs' gradient to NORM before each step (0: never; "
                        "default: the batch rule's, 0 at batch <= 512)")
    p.add_argument("--no-batch-scaling", action="store_true",
                   help="keep the batch-512 learning rates at any --batch-size (default: above 512 rows per step "
                        "the dense lr grows with sqrt(batch / 512), the warm-up lengthens, the tables get "
                        "CowClip clipping and an L2 that grows with the batch, and above 16x the MLPs' gradient "
                        "norm is clipped and their lr boosted; see ctrflow.train.scaling)")
    p.add_argument("--warmup", type=float, default=D["warmup_steps"], help="warm-up steps (< 1: share of the run)")
    p.add_argument("--decay", choices=("cosine", "linear", "none"), default=D["decay"],
                   help="learning-rate decay after the warm-up")
    p.add_argument("--min-lr-factor", type=float, default=D["min_lr_factor"],
                   help="the decay ends at this share of the lr")
    p.add_argument("--grad-accum", type=int, default=D["grad_accum"], help="batches per optimizer step")
    p.add_argument("--micro-batch", type=int, default=D["micro_batch"], metavar="ROWS",
                   help="rows per forward/backward slice of a batch: the same gradient in less memory (default: "
                        f"{AUTO_ROWS} on the CPU when the batch is larger and the model has no BatchNorm; "
                        "0: never split)")
    p.add_argument("--embedding-dim", type=int, default=None,
                   help=f"DLRM: every table's dim (default {DLRM_EMBEDDING_DIM}); tabular: cap of the schema's dims "
                        f"(default {TABULAR_MAX_DIM}; the seed notebook used 16); dcn: as tabular")
    p.add_argument("--layers", type=_ints, default=list(HIDDEN),
                   help="hidden widths: tabular MLP; DLRM top MLP (before its output); dcn deep MLP")
    p.add_argument("--dropout", type=float, default=None,
                   help="dropout after the MLPs' hidden layers (default: none for dlrm and dcn, fastai's ps for "
                        "tabular)")
    p.add_argument("--bottom-layers", type=_ints, default=list(HIDDEN),
                   help="DLRM bottom MLP (before its projection to --embedding-dim)")
    p.add_argument("--task", choices=("binary", "regression"), default=None,
                   help="loss and metrics (default: the task the ETL recorded in schema.json; binary if none)")
    p.add_argument("--y-range", default="auto", metavar="auto|none|LO,HI",
                   help="regression: predictions are LO + (HI - LO) * sigmoid(output) (fastai's y_range); auto: "
                        "the training labels' range widened by 1/8 of its span each side (ratings 1-5: 0.5-5.5); "
                        "none: a standardised target instead")
    p.add_argument("--features", default=None, metavar="FILE",
                   help="TOML/JSON embedding options per feature: dims, shared tables, list features and their "
                        "combiners, initialisers (see ctrflow.models.features; default: none)")
    p.add_argument("--numeric-embedding", choices=("auto", "none", *NUMERIC_DIM), default="auto",
                   help="embed each continuous column (Gorishniy et al. 2022; ctrflow.models.numeric): ple = "
                        "piecewise-linear on the quantile bins etl/run.py records, periodic = sin/cos of trained "
                        "frequencies, none = the raw columns only; dlrm: joins the raw columns in the bottom MLP's "
                        "input, tabular/dcn: replaces the raw columns (d per column: "
                        + ", ".join(f"{k} {v}" for k, v in NUMERIC_DIM.items()) + f"); auto: {NUMERIC_EMBEDDING} when "
                        "the dataset records quantiles, else none (default: auto)")
    p.add_argument("--device", default=D["device"], help="auto | cpu | cuda | cuda:N (auto: CUDA when available)")
    p.add_argument("--amp", nargs="?", const="bf16", default="auto", choices=("auto", "bf16", "off"),
                   help="bfloat16 autocast: auto = on CUDA only; bare --amp = bf16 on any device")
    p.add_argument("--eval-every", type=int, default=None,
                   help="evaluate (and checkpoint) every N steps; 0: at epoch ends only (default: at every epoch "
                        "end with --epochs > 1, else 5 times per run)")
    p.add_argument("--select", default=D["select"], choices=("auto", "none", "auc", "ap", "logloss", "rmse", "loss"),
                   help="the validation metric that picks the best checkpoint (auto: AUC for binary, RMSE for "
                        "regression); the best is kept as RUN/best.pt, reported, and what the model ends with")
    p.add_argument("--patience", type=int, default=D["patience"],
                   help="stop after N evaluations without a better --select metric (default: never stop early)")
    p.add_argument("--log-every", type=int, default=D["log_every"],
                   help="a log line and metrics.jsonl record every N steps")
    p.add_argument("--checkpoint-every", type=int, default=D["checkpoint_every"],
                   help="also checkpoint every N steps (0: only at evaluations and epoch ends)")
    p.add_argument("--keep", type=int, default=D["keep_checkpoints"], help="checkpoints to keep")
    p.add_argument("--out", default=None, help="run directory (default: runs/<model>-<timestamp>)")
    p.add_argument("--resume", nargs="?", const=True, default=False,
                   help="continue the run in --out (or from a checkpoint file / run dir given here)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and of the shuffle")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--parts-per-chunk", type=int, default=2,
                   help="row groups the loader reads and shuffles together")
    p.add_argument("--cache", action="store_true",
                   help="keep the decoded training data in memory after epoch 1 (for several --epochs)")
    p.add_argument("--no-loader-bench", action="store_true",
                   help="skip the loader-alone timing pass after training (it reads the training split once "
                        "more to print the loader's rows/s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
    p.add_argument("--sharded-embeddings", action="store_true",
                   help="torchrun: shard the tables over the ranks with torchrec (needs torchrec)")
    a = p.parse_args(argv)
    for name in ("batch_size", "valid_batch_size", "epochs", "grad_accum", "log_every", "keep", "parts_per_chunk"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    for name in ("max_steps", "stop_after", "threads", "embedding_dim", "patience"):
        if getattr(a, name) is not None and getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if a.micro_batch is not None and a.micro_batch < 0:
        p.error(f"--micro-batch must be >= 0 (0: never split), got {a.micro_batch}")
    if a.y_range not in ("auto", "none"):
        try:
            lo, hi = (float(v) for v in a.y_range.split(","))
        except ValueError:
            p.error(f"--y-range must be auto, none or LO,HI (two numbers), got {a.y_range!r}")
        if not lo < hi:
            p.error(f"--y-range needs LO < HI, got {a.y_range}")
        a.y_range = (lo, hi)
    if a.dropout is not None and not 0 <= a.dropout < 1:
        p.error(f"--dropout must be in [0, 1), got {a.dropout}")
    if a.weight_decay < 0 or a.embedding_l2 is not None and a.embedding_l2 < 0 or (a.grad_clip or 0) < 0:
        p.error("--weight-decay, --embedding-l2 and --grad-clip must be >= 0")
    if (a.embedding_row_warmup or 0) < 0:
        p.error(f"--embedding-row-warmup must be >= 0 (0: off), got {a.embedding_row_warmup}")
    if (a.embedding_row_warmup or 0) > 0 and (a.embedding_optimizer or a.optimizer) != "adam":
        p.error("--embedding-row-warmup applies to lazy Adam tables only: add --embedding-optimizer adam or drop it")
    if a.lr is not None and a.lr <= 0 or a.embedding_lr is not None and a.embedding_lr <= 0:
        p.error("learning rates must be > 0")
    return a


def run_dir(a: argparse.Namespace) -> str:
    """The run directory: ``--out``, else the one ``--resume`` names, else ``runs/<model>-<timestamp>``."""
    if isinstance(a.resume, str):
        target = os.path.abspath(a.resume)
        if os.path.isfile(target):  # run/checkpoints/ckpt-N.pt -> run
            return a.out or os.path.dirname(os.path.dirname(target))
        return a.out or target
    if a.resume and not a.out:
        raise UsageError("--resume needs the run directory: pass --out RUN_DIR (or --resume RUN_DIR)")
    return a.out or os.path.join("runs", f"{a.model}-{time.strftime('%Y%m%d-%H%M%S')}")


def check_run_dir(a: argparse.Namespace, out: str) -> None:
    """Refuse a run the trainer would refuse, before ``config.json`` is written: resuming a run with no
    checkpoint, or starting a new run in a directory that holds one."""
    from ctrflow.etl.atomic import unwritable
    from ctrflow.train.checkpoint import CheckpointError, latest_checkpoint

    ckpts = os.path.join(out, "checkpoints")
    why = unwritable(out)
    if why:
        raise UsageError(f"--out {out}: {why}; pass a --out you can write to")
    if a.resume:
        ck = a.resume if isinstance(a.resume, str) and os.path.isfile(a.resume) else None
        if ck is None and latest_checkpoint(ckpts) is None:
            raise CheckpointError(f"--resume: no checkpoint in {ckpts}")
    elif latest_checkpoint(ckpts) is not None:
        raise CheckpointError(f"{ckpts} already holds checkpoints ({os.path.basename(latest_checkpoint(ckpts))}); "
                              "pass --resume to continue that run, or use a new --out")
