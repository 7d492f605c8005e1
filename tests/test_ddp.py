"""Data-parallel training: ``torchrun --nproc_per_node=2 train/fit.py`` on the CPU (Gloo).

Each torchrun job runs a small driver (written below) that calls ``ctrflow.train.fit.cli`` and dumps,
per rank, the validation predictions it scored and a hash of its weights. Every subprocess has a
timeout, so a rank waiting forever on another fails the test instead of hanging CI.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ctrflow.etl.schema import ColumnSchema, Schema
from ctrflow.train.ddp import rescale_position
from ctrflow.train.metrics import roc_auc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CARDS = [8, 20, 5]
TIMEOUT = 180  # seconds; a hang fails here

DRIVER = textwrap.dedent('''
    import json, os, sys, hashlib
    import torch
    from ctrflow.train import metrics, trainer
    from ctrflow.train.fit import cli

    dump, argv = sys.argv[1], sys.argv[2:]
    rank = int(os.environ.get("RANK", 0))
    evals = []
    compute = metrics.BinaryMetrics.compute

    def recording_compute(self):
        res = compute(self)
        torch.save({"scores": torch.cat(self._scores), "labels": torch.cat(self._labels), "res": res},
                   os.path.join(dump, f"eval-r{rank}-{len(evals)}.pt"))
        evals.append(res)
        return res

    metrics.BinaryMetrics.compute = recording_compute
    fit = trainer.Trainer.fit

    def recording_fit(self, *a, **k):
        out = fit(self, *a, **k)
        h = hashlib.sha256()
        for name, t in sorted(self.model.state_dict().items()):
            h.update(name.encode() + t.detach().cpu().contiguous().numpy().tobytes())
        with open(os.path.join(dump, f"rank{rank}.json"), "w") as f:
            json.dump({"steps": out["steps"], "rows": out["rows"], "hash": h.hexdigest(),
                       "evals": len(evals), "valid": out["valid"]}, f)
        return out

    trainer.Trainer.fit = recording_fit
    cli(argv)  # as train/fit.py's __main__ does
''')


def _write_data(out, rows=(1003, 401), seed=0):
    """A small processed dataset; 1003 train rows split 502 / 501 over two ranks, two files each split."""
    rng = np.random.default_rng(seed)
    for split, n in zip(("train", "valid"), rows, strict=True):
        cat = [rng.integers(3, c, n).astype(np.int32) for c in CARDS]
        cont = rng.standard_normal((3, n)).astype(np.float32)
        label = (rng.random(n) < 1 / (1 + np.exp(-((cat[0] % 2) * 2.0 - 1.0 + cont[0])))).astype(np.float32)
        cols = {f"C{i}": c for i, c in enumerate(cat)} | {f"I{j}": cont[j] for j in range(3)} | {"label": label}
        table = pa.table(cols)
        os.makedirs(out / split, exist_ok=True)
        half = n // 2
        pq.write_table(table.slice(0, half), out / split / "part-00000.parquet")
        pq.write_table(table.slice(half), out / split / "part-00001.parquet")
    columns = [ColumnSchema(f"C{i}", "categorical", "int32", cardinality=c, embedding_dim=16)
               for i, c in enumerate(CARDS)]
    columns += [ColumnSchema(f"I{j}", "continuous", "float32") for j in range(3)]
    meta = {"rows": {"train": rows[0], "valid": rows[1]}}
    Schema([*columns, ColumnSchema("label", "label", "float32")], meta).save(out / "schema.json")
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return _write_data(tmp_path_factory.mktemp("ddp-data"))


FAST = ["--batch-size", "100", "--embedding-dim", "4", "--layers", "16", "--bottom-layers", "8",
        "--no-progress", "--log-every", "2", "--threads", "1", "--device", "cpu", "--no-loader-bench",
        "--valid-batch-size", "100", "--optimizer", "adam", "--lr", "0.01"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(tmp_path, nproc: int, script: str, args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--master-addr", "127.0.0.1", f"--master-port={_free_port()}", script, *args]
    try:
        return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"torchrun did not finish in {TIMEOUT}s (a rank hung): {e.stderr!s:.2000}")


def _driver(tmp_path) -> tuple[str, str]:
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    dump = tmp_path / "dump"
    dump.mkdir(exist_ok=True)
    return str(script), str(dump)


@pytest.fixture(scope="module")
def two_rank_run(data, tmp_path_factory):
    """One 2-rank torchrun training job, shared by the checks below."""
    tmp = tmp_path_factory.mktemp("ddp-run")
    script, dump = _driver(tmp)
    run = tmp / "run"
    proc = _torchrun(tmp, 2, script, [dump, "--data", str(data), "--out", str(run), "--eval-every", "3", *FAST])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    ranks = [json.loads((tmp / "dump" / f"rank{r}.json").read_text()) for r in range(2)]
    return tmp, run, ranks, proc


def test_ranks_take_the_same_steps_and_end_identical(two_rank_run):
    _, _, ranks, _ = two_rank_run
    # 1003 rows: rank 0 reads 502, rank 1 501 rows; both make ceil(502 / 100) = 6 batches.
    assert ranks[0]["steps"] == ranks[1]["steps"] == 6
    assert {ranks[0]["rows"], ranks[1]["rows"]} == {502, 501}
    assert ranks[0]["hash"] == ranks[1]["hash"]  # DDP (dense) + our sparse all-gather keep replicas equal


def test_global_auc_is_the_auc_of_all_gathered_predictions(two_rank_run):
    tmp, _, ranks, _ = two_rank_run
    assert ranks[0]["evals"] == ranks[1]["evals"] == 2  # steps 3 and 6
    for k in range(2):
        parts = [torch.load(tmp / "dump" / f"eval-r{r}-{k}.pt") for r in range(2)]
        # 401 validation rows: each rank scored its own shard, and together all of them.
        n = [len(p["scores"]) for p in parts]
        assert sum(n) == 401 and min(n) > 0
        scores = torch.cat([p["scores"] for p in parts])
        labels = torch.cat([p["labels"] for p in parts])
        expect = roc_auc(scores, labels)
        for p in parts:  # every rank reports the same global figure, over 401 rows
            assert p["res"]["rows"] == 401
            assert p["res"]["auc"] == pytest.approx(expect, abs=1e-12)
        per_rank = [roc_auc(p["scores"], p["labels"]) for p in parts]
        assert any(abs(a - expect) > 1e-9 for a in per_rank)  # not simply one rank's AUC


def test_only_rank0_writes_and_checkpoint_matches_single_process_eval(two_rank_run, data, capsys):
    _, run, ranks, proc = two_rank_run
    assert proc.stdout.count("validation AUC") == 1  # one report, from rank 0
    assert "data parallel: 2 ranks, 1,003 rows" in proc.stdout
    ckpts = sorted(os.listdir(run / "checkpoints"))
    assert ckpts[-1] == "ckpt-00000006.pt"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_rows"] == 1003
    # The checkpoint holds the full model: one process scores the whole valid set with it and gets
    # the AUC the two ranks computed together.
    from ctrflow.loader.loader import Loader
    from ctrflow.train.fit import build_model, parse_args
    from ctrflow.train.trainer import Trainer

    a = parse_args(["--data", str(data), *FAST])
    model = build_model(a, Schema.load(data))
    state = torch.load(run / "checkpoints" / ckpts[-1], weights_only=True)
    assert state["world_size"] == 2
    model.load_state_dict(state["model"])
    with Loader(data / "valid", 1000, shuffle=False, global_rank=0, global_size=1) as valid:
        res = Trainer(model, device="cpu", verbose=False).evaluate(valid)
    assert res["rows"] == 401
    assert res["auc"] == pytest.approx(ranks[0]["valid"]["auc"], abs=1e-6)


def test_resume_with_a_different_number_of_ranks(two_rank_run, data, tmp_path, capsys):
    """A 2-rank checkpoint taken mid-epoch resumes in one process at the same share of the epoch."""
    import shutil

    from ctrflow.train.fit import main

    tmp, run, _, _ = two_rank_run
    run1 = tmp_path / "run"
    shutil.copytree(run, run1)
    for name in os.listdir(run1 / "checkpoints"):  # keep the step-3 checkpoint: mid-epoch (3 of 6)
        if name != "ckpt-00000003.pt":
            os.unlink(run1 / "checkpoints" / name)
    assert main(["--data", str(data), "--out", str(run1), "--resume", "--eval-every", "0", *FAST]) == 0
    capsys.readouterr()
    records = [json.loads(line) for line in (run1 / "metrics.jsonl").read_text().splitlines()]
    resume = [r for r in records if r["kind"] == "resume"][-1]
    # 3 batches per rank x 2 ranks = 6 of the single process's 11 batches (1003 rows / 100).
    assert resume["step"] == 6
    summary = json.loads((run1 / "summary.json").read_text())
    assert summary["steps"] == 11 and summary["epochs"] == 1 and "world_size" not in summary


def test_resume_with_the_same_number_of_ranks_continues_exactly(two_rank_run, data, tmp_path):
    """The step-3 checkpoint of the 2-rank job, resumed by 2 ranks, ends where the uninterrupted job did."""
    import shutil

    tmp, run, ranks, _ = two_rank_run
    run2 = tmp_path / "run"
    shutil.copytree(run, run2)
    for name in os.listdir(run2 / "checkpoints"):  # back to step 3 of 6: mid-epoch
        if name != "ckpt-00000003.pt":
            os.unlink(run2 / "checkpoints" / name)
    script, dump = _driver(tmp_path)
    proc = _torchrun(tmp_path, 2, script, [dump, "--data", str(data), "--out", str(run2), "--resume",
                                           "--eval-every", "3", *FAST])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    resumed = [json.loads((tmp_path / "dump" / f"rank{r}.json").read_text()) for r in range(2)]
    records = [json.loads(line) for line in (run2 / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "resume"] == [3]  # no rescaling: same ranks
    # Only batches 4-6 of each rank's shard (100 + 100 + 2 / 1 rows) were trained on after the resume.
    assert all(r["steps"] == 6 for r in resumed) and {r["rows"] for r in resumed} == {202, 201}
    # Same weights on both ranks, and bit for bit the weights and AUC of the run that was not interrupted.
    assert resumed[0]["hash"] == resumed[1]["hash"] == ranks[0]["hash"]
    assert resumed[0]["evals"] == 1 and resumed[0]["valid"]["auc"] == ranks[0]["valid"]["auc"]
    assert sorted(os.listdir(run2 / "checkpoints"))[-1] == "ckpt-00000006.pt"


def test_unequal_batch_counts_fail_fast_instead_of_hanging(tmp_path):
    script = tmp_path / "unequal.py"
    script.write_text(textwrap.dedent('''
        import torch
        from torch import nn
        from ctrflow.train import ddp
        from ctrflow.train.data import TensorLoader
        from ctrflow.train.trainer import Trainer

        class Model(nn.Module):
            def __init__(self):
                super().__init__()
                self.emb, self.lin = nn.Embedding(10, 2, sparse=True), nn.Linear(5, 1)

            def forward(self, cat, cont):
                return self.lin(torch.cat([self.emb(cat[:, 0]), cont], 1)).reshape(-1)

        ddp.init(torch.device("cpu"))
        n = 64 if ddp.rank() == 0 else 48  # a hand-made split: rank 1 has fewer batches
        cat, x, y = torch.randint(0, 10, (n, 1)), torch.randn(n, 3), torch.randint(0, 2, (n,)).float()
        try:
            Trainer(Model(), device="cpu", verbose=False).fit(TensorLoader(cat, x, y, batch_size=16))
        except ValueError as e:
            print(f"rank {ddp.rank()}: {e}")
            ddp.exit_process(3)
    '''))
    proc = _torchrun(tmp_path, 2, str(script), [])
    assert proc.returncode != 0
    assert "different numbers of batches per epoch [4, 3]" in proc.stdout


def test_synced_gradients_equal_the_full_batch_gradient(tmp_path):
    """2 ranks x 32 rows after GradSync (DDP for the MLPs, our all-gather for the fused table) give
    the gradient of one process on all 64 rows, sparse rows included."""
    script = tmp_path / "grads.py"
    script.write_text(textwrap.dedent('''
        import torch
        import torch.nn.functional as F
        from ctrflow.models import DLRM
        from ctrflow.train import ddp

        ddp.init(torch.device("cpu"))
        rank, cards = ddp.rank(), [8, 50, 5]

        def make():
            torch.manual_seed(0)
            return DLRM(cards, 3, embedding_dim=4, dense_arch_layer_sizes=[8, 4], over_arch_layer_sizes=[8, 1])

        g = torch.Generator().manual_seed(1)
        cat = torch.stack([torch.randint(0, c, (64,), generator=g) for c in cards], 1)
        cont, y = torch.randn(64, 3, generator=g), (torch.rand(64, generator=g) < 0.5).float()
        ref = make()
        F.binary_cross_entropy_with_logits(ref(cat, cont).reshape(-1), y).backward()
        model = make()
        sync = ddp.GradSync(model, torch.device("cpu"))
        part = slice(32 * rank, 32 * (rank + 1))
        F.binary_cross_entropy_with_logits(sync.net(cat[part], cont[part]).reshape(-1), y[part]).backward()
        sync.sync()
        bad = []
        for (name, p), q in zip(model.named_parameters(), ref.parameters()):
            got = p.grad.to_dense() if p.grad.is_sparse else p.grad
            want = q.grad.to_dense() if q.grad.is_sparse else q.grad
            if not torch.allclose(got, want, atol=1e-6, rtol=1e-5):
                bad.append(name)
        # CowClip's lookup counts survive the exchange: those of one process on all 64 rows ...
        from ctrflow.train.optim import build_optimizers, row_counts
        for (name, p), q in zip(model.named_parameters(), ref.parameters()):
            if p.grad is not None and p.grad.is_sparse:
                qi = q.grad._indices()
                want = torch.sparse_coo_tensor(qi, torch.ones(qi.shape[1]), (q.shape[0],)).coalesce()
                got = row_counts(p, p.grad._nnz(), p.grad._values())
                if not torch.equal(p.grad._indices()[0], want.indices()[0]) or not torch.equal(got, want.values()):
                    bad.append(name + " counts")
        # ... so the clipped, regularised step is one process's step too.
        for m in (ref, model):
            for o in build_optimizers(m, "adam", lr=0.01, embedding_lr=0.05, embedding_clip=1.0,
                                      embedding_l2=1e-3, rows_per_step=64):
                o.step()
        for (name, p), q in zip(model.named_parameters(), ref.parameters()):
            if not torch.allclose(p, q, atol=1e-6, rtol=1e-5):
                bad.append(name + " after step")
        print(f"rank {rank} mismatched: {bad}")
        ddp.teardown()
        ddp.exit_process(1 if bad else 0)  # as train/fit.py leaves a rank: see ddp.exit_process
    '''))
    proc = _torchrun(tmp_path, 2, str(script), [])
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert proc.stdout.count("mismatched: []") == 2


def test_sharded_embeddings_without_torchrec_is_a_one_line_error(data, tmp_path, capsys):
    import importlib.util

    if importlib.util.find_spec("torchrec") is not None:
        pytest.skip("torchrec is installed here")
    from ctrflow.train.fit import main

    assert main(["--data", str(data), "--out", str(tmp_path / "r"), "--sharded-embeddings", *FAST]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "torchrec" in err[0]


SHARDED_DRIVER = textwrap.dedent('''
    import hashlib, json, os, sys
    import torch
    from ctrflow.models import DLRM
    from ctrflow.train import ddp
    from ctrflow.train.sharded import shard_model
    from ctrflow.train.trainer import Trainer

    out, max_steps, epochs, resume = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "resume"
    device = ddp.init(torch.device("cpu"))
    rank, world = ddp.rank(), ddp.world_size()
    cards = [8, 20, 5, 11]

    def make():
        torch.manual_seed(0)
        return DLRM(cards, 3, embedding_dim=4, dense_arch_layer_sizes=[8, 4], over_arch_layer_sizes=[8, 1])

    g = torch.Generator().manual_seed(1)
    n = 400
    cat = torch.stack([torch.randint(0, c, (n,), generator=g) for c in cards], 1)
    cont = torch.randn(n, 3, generator=g)
    y = (torch.rand(n, generator=g) < torch.sigmoid(cont[:, 0] + (cat[:, 0] % 2) * 2 - 1)).float()
    lo, hi = rank * n // world, (rank + 1) * n // world
    train = [(cat[i:i + 25], cont[i:i + 25], y[i:i + 25]) for i in range(lo, hi, 25)]
    valid = [(cat[i:i + 50], cont[i:i + 50], y[i:i + 50]) for i in range(lo, hi, 50)]

    ref = make()
    model = shard_model(make(), device, "adam", 0.01, "adagrad", 0.05)
    with torch.no_grad():
        same = torch.allclose(ref(cat[:16], cont[:16]), model(cat[:16], cont[:16]), atol=1e-6)
    t = Trainer(model, device="cpu", out_dir=os.path.join(out, "run"), verbose=False, max_steps=max_steps,
                epochs=epochs, eval_every=4)
    res = t.fit(train, valid, resume=resume)
    sd = model.state_dict()
    h = hashlib.sha256()
    for k, v in sorted(sd.items()):
        h.update(k.encode() + v.contiguous().numpy().tobytes())
    make().load_state_dict(sd)  # the checkpoint layout is the unsharded model's
    with open(os.path.join(out, f"rank{rank}-{max_steps}.json"), "w") as f:
        json.dump({"same_init": same, "steps": res["steps"], "hash": h.hexdigest(), "rows": res["valid"]["rows"],
                   "resumed": res["resumed_from"], "keys": sorted(sd), "ref_keys": sorted(ref.state_dict())}, f)
    ddp.teardown()
    ddp.exit_process(0)
''')


def _torchrec_python() -> str:
    """An interpreter with torchrec: $CTRFLOW_TORCHREC_PYTHON or bench/baselines/torchrec_venv.sh's venv."""
    py = os.environ.get("CTRFLOW_TORCHREC_PYTHON") or os.path.join(ROOT, "bench", ".venvs", "torchrec", "bin", "python")
    if not os.path.exists(py):
        pytest.skip("no torchrec environment (bash bench/baselines/torchrec_venv.sh builds one)")
    if subprocess.run([py, "-c", "import torchrec"], capture_output=True, timeout=120).returncode:
        pytest.skip(f"{py} cannot import torchrec")
    return py


def test_sharded_embeddings_with_torchrec(tmp_path):
    """Two ranks, each table on one rank (torchrec table-wise on Gloo): same init as the unsharded
    model, replicas agree, metrics over every row, checkpoints in the unsharded layout, resume."""
    py = _torchrec_python()
    shim = tmp_path / "shim" / "ctrflow"  # the torchrec venv has no ctrflow: import it from this tree
    shim.mkdir(parents=True)
    for pkg in ("models", "train", "loader", "etl"):
        os.symlink(os.path.join(ROOT, pkg), shim / pkg)
    script = tmp_path / "sharded.py"
    script.write_text(SHARDED_DRIVER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tmp_path / "shim")}

    def launch(*args: str) -> None:
        cmd = [py, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master-addr", "127.0.0.1",
               f"--master-port={_free_port()}", str(script), str(tmp_path), *args]
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"sharded torchrun did not finish in {TIMEOUT}s")
        assert proc.returncode == 0, proc.stderr[-4000:]

    launch("6", "2", "fresh")  # stops mid-epoch 0 (8 batches per rank)
    first = [json.loads((tmp_path / f"rank{r}-6.json").read_text()) for r in range(2)]
    assert all(f["same_init"] and f["steps"] == 6 and f["rows"] == 400 for f in first)
    assert first[0]["hash"] == first[1]["hash"] and first[0]["keys"] == first[0]["ref_keys"]
    launch("12", "2", "resume")
    second = [json.loads((tmp_path / f"rank{r}-12.json").read_text()) for r in range(2)]
    assert all(s["steps"] == 12 and s["resumed"].endswith("ckpt-00000006.pt") for s in second)
    assert second[0]["hash"] == second[1]["hash"] != first[0]["hash"]


@pytest.mark.parametrize(("saved", "now", "bie", "expect"), [
    (2, 2, 3, (5, 3)),      # same number of ranks: unchanged
    (2, 1, 3, (2 * 11 + 6, 6)),  # half the ranks: twice the batches per rank
    (1, 4, 9, (2 * 11 + 2, 2)),  # 9 batches of one rank ~ 2.25 batches of four ranks
])
def test_rescale_position(saved, now, bie, expect):
    step, epoch, spe = 5, 2, 11
    assert rescale_position(step, epoch, bie, saved, now, spe, 1) == expect


def test_rescale_position_keeps_accumulation_boundaries():
    # grad_accum 4: the mapped position is rounded down to a whole optimizer step
    assert rescale_position(10, 0, 40, 1, 3, 20, 4) == (3, 12)


@pytest.mark.parametrize("joined", [True, False])
def test_exit_process_leaves_a_rank_without_finalizing(tmp_path, joined):
    """A torchrun rank (``WORLD_SIZE > 1``) leaves by ``os._exit``: the interpreter's finalization, where
    Gloo's leftover worker threads abort the process, never runs; atexit handlers and flushing still do,
    and the exit code is kept. A single process exits normally (finalizers run)."""
    script = tmp_path / "leave.py"
    script.write_text(textwrap.dedent("""
        import atexit, sys
        from ctrflow.train import ddp

        class Finalized:
            def __del__(self):
                sys.stderr.write("finalized")

        keep = Finalized()  # a module global: collected only while the interpreter finalizes
        atexit.register(lambda: sys.stderr.write("atexit;"))
        sys.stdout.write("still buffered")
        ddp.exit_process(3)
    """))
    env = {**os.environ, "WORLD_SIZE": "2" if joined else "1"}
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 3
    assert proc.stdout == "still buffered"
    assert proc.stderr == ("atexit;" if joined else "atexit;finalized")

