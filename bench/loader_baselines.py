"""The loader benchmark's baselines: merlin-dataloader 23.08 (in the pinned NVTabular venv) and a plain
PyTorch ``DataLoader`` over the seed-000 ``DataFrameDataset``. Used by ``bench/loader.py``."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from typing import Any

import torch

from ctrflow.etl.schema import Schema

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The venv nvtabular_venv.sh builds; it honours $NVT_VENV, so this does too.
NVT_VENV = os.environ.get("NVT_VENV") or os.path.join(ROOT, "bench", ".venvs", "nvtabular")
NVT_SCRIPT = os.path.join(ROOT, "bench", "baselines", "nvtabular_venv.sh")


class DataFrameDataset(torch.utils.data.Dataset):
    """The seed-000 pattern: a DataFrame made into tensors once; one row per ``__getitem__``."""

    def __init__(self, df, cats: list[str], conts: list[str], label: str) -> None:
        self.dense = torch.tensor(df[conts].values, dtype=torch.float32)  # [N, n_cont]
        self.sparse = {c: torch.tensor(df[[c]].values, dtype=torch.int) for c in cats}  # [N, 1] each
        self.target = torch.tensor(df[[label]].values, dtype=torch.float32)  # [N, 1]

    def __len__(self) -> int:
        return len(self.target)

    def __getitem__(self, i: int):
        features = {"dense_features": self.dense[i, :]}
        features.update({k: v[i, :] for k, v in self.sparse.items()})
        return features, self.target[i, :]


def torch_dataloader(files: list[str], schema: Schema, batch_size: int, seconds: float) -> tuple[int, float]:
    import pandas as pd

    df = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    ds = DataFrameDataset(df, schema.categorical, schema.continuous, schema.label[0])
    del df
    dl = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=2)
    it = iter(dl)
    next(it)  # worker start-up and the first batch are not timed
    t = time.perf_counter()
    rows = 0
    for _, y in it:
        rows += y.shape[0]
        if time.perf_counter() - t > seconds:
            break
    elapsed = time.perf_counter() - t
    del it
    return rows, elapsed


MERLIN_SCRIPT = r"""
import json, sys, time, warnings
warnings.filterwarnings("ignore")
import numpy as np
import merlin.io
from merlin.dataloader.torch import Loader
from merlin.schema import ColumnSchema, Schema, Tags
a = json.loads(sys.argv[1])
schema = Schema(
    [ColumnSchema(c, dtype=np.int32, tags=[Tags.CATEGORICAL]) for c in a["cats"]]
    + [ColumnSchema(c, dtype=np.float32, tags=[Tags.CONTINUOUS]) for c in a["conts"]]
    + [ColumnSchema(c, dtype=np.float32, tags=[Tags.TARGET]) for c in a["labels"]]
)
ds = merlin.io.Dataset(a["files"], engine="parquet", cpu=True, schema=schema)
out = {}
for shuffle in (False, True):
    loader = Loader(ds, batch_size=a["batch_size"], shuffle=shuffle, device="cpu")
    best = cpu = None
    for _ in range(a["repeat"]):
        t, c = time.perf_counter(), time.process_time()
        rows = 0
        for x, y in loader:
            rows += len(y)
        d, c = time.perf_counter() - t, time.process_time() - c
        best = d if best is None or d < best else best
        cpu = c if cpu is None or c < cpu else cpu
    out["shuffle" if shuffle else "no_shuffle"] = {"rows": rows, "seconds": best, "cpu_seconds": cpu}
print("RESULT " + json.dumps(out))
"""


def merlin(files: list[str], schema: Schema, batch_size: int, repeat: int, build: bool) -> dict[str, Any]:
    py = os.path.join(NVT_VENV, "bin", "python")
    if build:
        r = subprocess.run(["bash", NVT_SCRIPT], capture_output=True, text=True,
                           env={**os.environ, "NVT_VENV": NVT_VENV})
        if r.returncode != 0:
            return {"skipped": f"{NVT_SCRIPT} failed: {r.stderr.strip().splitlines()[-1:]}"}
        py = r.stdout.strip().splitlines()[-1]
    elif not os.path.exists(os.path.join(NVT_VENV, ".ctrflow-complete")):
        return {"skipped": f"no NVTabular venv at {NVT_VENV} (run: bash {os.path.relpath(NVT_SCRIPT, ROOT)})"}
    arg = {"files": files, "cats": schema.categorical, "conts": schema.continuous, "labels": schema.label[:1],
           "batch_size": batch_size, "repeat": repeat}
    # Its own venv (nothing of ours may leak in) and a throw-away cwd (Dask may leave files in the cwd).
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    with tempfile.TemporaryDirectory(prefix="ctrflow-merlin-") as cwd:
        r = subprocess.run([py, "-c", MERLIN_SCRIPT, json.dumps(arg)], capture_output=True, text=True, env=env,
                           cwd=cwd)
    line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
    if r.returncode != 0 or line is None:
        return {"skipped": f"merlin run failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}"}
    return json.loads(line[len("RESULT "):])
