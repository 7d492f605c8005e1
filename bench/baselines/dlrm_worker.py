"""One timed DLRM training run of ``bench/train.py``, in a process of its own: ctrflow's or torchrec's.

Standalone on purpose: the torchrec systems run inside the pinned venv of
``bench/baselines/torchrec_venv.sh``, which has torch, torchrec and numpy but no ctrflow. This file
therefore imports only the standard library, numpy and torch at the top; ``ctrflow`` is imported
only for the ctrflow systems and ``torchrec`` only for the torchrec ones. Both share the timing loop,
the batches and the AUC below, so the systems differ only in the model and its optimizers.

Usage (``bench/train.py`` runs it; the data file comes from its generator):
    PYTHON bench/baselines/dlrm_worker.py --system torchrec --data-file DATA.npz --steps 120 ...

Prints one JSON object on the last line of stdout: ``system``, ``samples_per_s``,
``samples_per_cpu_s``, ``ms_per_step``, ``auc``, ``final_loss``, ``steps``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

SYSTEMS = ("ctrflow", "ctrflow-bf16", "torchrec", "torchrec-ebc")
N_CONT = 13


def exact_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mann-Whitney AUC with average ranks for ties.

    Args:
        scores: model outputs, any monotone scale.
        labels: 0/1 labels of the same length.

    Returns:
        The AUC.
    """
    order = np.argsort(scores, kind="stable")
    s = scores[order]
    first = np.r_[True, s[1:] != s[:-1]]
    starts = np.flatnonzero(first)
    ends = np.r_[starts[1:], len(s)]
    ranks = np.empty(len(s))
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    pos = labels > 0.5
    n_pos, n_neg = pos.sum(), (~pos).sum()
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _batches(d: dict[str, np.ndarray], b: int, steps: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``steps`` consecutive batches: categorical [F, B], continuous [N_CONT, B], label [B]."""
    for i in range(steps):
        lo = i * b
        yield d["cat"][:, lo : lo + b], d["cont"][:, lo : lo + b], d["label"][lo : lo + b]


def _ctrflow(system: str, cards: list[int], a: argparse.Namespace, dense_sizes: list[int], over_sizes: list[int]):
    """ctrflow's DLRM, its optimizers and a forward(cat [F, B], cont [13, B]) -> logits [B]."""
    import torch

    from ctrflow.models import DLRM
    from ctrflow.train.optim import RowWiseAdagrad

    amp = system == "ctrflow-bf16"
    model = DLRM(cards, N_CONT, a.dim, dense_sizes, over_sizes, init="uniform")
    emb = [model.sparse_arch.embedding.weight]
    dense = [p for p in model.parameters() if p is not emb[0]]
    opts = [RowWiseAdagrad(emb, lr=a.embedding_lr, eps=1e-8), torch.optim.Adagrad(dense, lr=a.lr, fused=True)]

    def forward(cat: np.ndarray, cont: np.ndarray) -> torch.Tensor:
        # The loader's layout: categorical [B, F] as a view of a column-major [F, B] buffer.
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            return model(torch.from_numpy(cat).t(), torch.from_numpy(cont).t()).float().squeeze(1)

    return model, opts, forward


def _torchrec(system: str, cards: list[int], a: argparse.Namespace, dense_sizes: list[int], over_sizes: list[int]):
    """torchrec's DLRM (fused row-wise Adagrad tables, or a plain EBC), its optimizers and a forward."""
    import torch
    from torchrec import EmbeddingBagConfig, KeyedJaggedTensor
    from torchrec.models.dlrm import DLRM as TRDLRM
    from torchrec.modules.fused_embedding_modules import FusedEmbeddingBagCollection
    from torchrec.optim import RowWiseAdagrad as TRRowWise

    keys = [f"f{i}" for i in range(len(cards))]
    tables = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=a.dim, num_embeddings=c, feature_names=[keys[i]])
              for i, c in enumerate(cards)]
    if system == "torchrec":
        ebc = FusedEmbeddingBagCollection(tables, optimizer_type=TRRowWise,
                                          optimizer_kwargs={"lr": a.embedding_lr, "eps": 1e-8})
    else:  # torchrec-ebc: the plain EmbeddingBagCollection, tables updated by a dense optimizer
        from torchrec import EmbeddingBagCollection

        ebc = EmbeddingBagCollection(tables)
    model = TRDLRM(ebc, N_CONT, dense_sizes, over_sizes)
    dense = [p for n, p in model.named_parameters() if not n.startswith("sparse_arch")]
    opts = [torch.optim.Adagrad(dense, lr=a.lr, fused=True)]
    if system == "torchrec-ebc":
        opts.append(torch.optim.Adagrad(list(ebc.parameters()), lr=a.embedding_lr, fused=True))

    def forward(cat: np.ndarray, cont: np.ndarray) -> torch.Tensor:
        b = cat.shape[1]
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=keys, values=torch.from_numpy(cat.reshape(-1)).long(),
            lengths=torch.ones(len(keys) * b, dtype=torch.int32))
        return model(torch.from_numpy(cont).t(), kjt).squeeze(1)

    return model, opts, forward


def worker(a: argparse.Namespace) -> dict[str, Any]:
    """Train ``a.system`` for ``a.warmup + a.steps`` steps on ``a.data_file``, then score the held-out rows.

    Args:
        a: parsed arguments (see ``parse_args``).

    Returns:
        The JSON-safe result: rates over the steps after the warm-up, median ms/step, held-out AUC.
    """
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    z = np.load(a.data_file)
    d = {k: z[k] for k in ("cat", "cont", "label")}
    cards = [int(c) for c in z["cards"]]
    n_valid = a.valid_rows
    valid = {k: (v[:, -n_valid:] if v.ndim == 2 else v[-n_valid:]) for k, v in d.items()}
    build = _ctrflow if a.system.startswith("ctrflow") else _torchrec
    model, opts, forward = build(a.system, cards, a, [512, 256, a.dim], [512, 256, 1])

    times, cpu = [], []
    for i, (cat, cont, y) in enumerate(_batches(d, a.batch_size, a.warmup + a.steps)):
        t0, c0 = time.perf_counter(), time.process_time()
        loss = F.binary_cross_entropy_with_logits(forward(cat, cont), torch.from_numpy(y))
        loss.backward()
        for o in opts:
            o.step()
            o.zero_grad(set_to_none=True)
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    scores = []
    model.eval()
    with torch.no_grad():
        for lo in range(0, n_valid, 65536):
            scores.append(forward(valid["cat"][:, lo : lo + 65536], valid["cont"][:, lo : lo + 65536]).numpy())
    return {"system": a.system, "samples_per_s": a.batch_size * len(times) / sum(times),
            "samples_per_cpu_s": a.batch_size * len(cpu) / sum(cpu),
            "ms_per_step": 1000 * float(np.median(times)), "auc": exact_auc(np.concatenate(scores), valid["label"]),
            "final_loss": float(loss), "steps": a.warmup + a.steps}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The worker's arguments; ``bench/train.py`` passes the same values to every system.

    Args:
        argv: arguments without the program name (None: ``sys.argv[1:]``).

    Returns:
        The parsed namespace.
    """
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--system", required=True, choices=SYSTEMS)
    p.add_argument("--data-file", required=True, help=".npz with cat [F, N], cont [13, N], label [N], cards [F]")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--warmup", type=int, required=True)
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--dim", type=int, required=True)
    p.add_argument("--lr", type=float, required=True)
    p.add_argument("--embedding-lr", type=float, required=True)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--valid-rows", type=int, required=True)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run one system and print its result as the last line of stdout."""
    print(json.dumps(worker(parse_args(argv))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
