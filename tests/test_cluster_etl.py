"""ETL on a Dask cluster: ``etl/run.py --workers 2`` writes what the single-process run writes, and
Categorify's fit never hands one task a whole column."""

from __future__ import annotations

import json
import os
import sys

import dask
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ctrflow.etl import Dataset, Workflow
from ctrflow.etl.ops import Categorify
from ctrflow.etl.run import main

pytest.importorskip("distributed")

FILES, ROWS = 4, 1500


def _frame(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({"label": rng.integers(0, 2, n).astype(np.int8)})
    for i in range(1, 4):
        v = rng.integers(-2, 1000, n).astype(float)
        v[rng.random(n) < 0.1] = np.nan
        df[f"I{i}"] = v
    for i in range(1, 4):
        vals = np.array([f"{k:06x}" for k in rng.zipf(1.3, n) % (20 * 10**i)], dtype=object)
        vals[rng.random(n) < 0.05] = None
        df[f"C{i}"] = vals
    return df


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    d = tmp_path_factory.mktemp("raw")
    for k in range(FILES):
        pq.write_table(pa.Table.from_pandas(_frame(ROWS, k), preserve_index=False), d / f"day-{k}.parquet")
    return d


ARGS = ["--cats", "C1,C2,C3", "--conts", "I1,I2,I3", "--no-progress", "--freq-threshold", "2",
        "--valid-fraction", "0.2"]


def _sorted_rows(path) -> pd.DataFrame:
    df = pd.read_parquet(path)
    return df.sort_values(list(df.columns)).reset_index(drop=True)


def test_two_worker_cluster_equals_single_process(raw, tmp_path, capsys):
    single, cluster = tmp_path / "single", tmp_path / "cluster"
    assert main(["--input", str(raw), "--output", str(single), *ARGS]) == 0
    assert main(["--input", str(raw), "--output", str(cluster), "--workers", "2", *ARGS]) == 0
    err = capsys.readouterr().err
    assert "2 worker(s); dashboard: http://127.0.0.1:" in err  # the dashboard link is printed, on loopback

    for split in ("train", "valid"):
        files = sorted(n for n in os.listdir(single / split) if n.endswith(".parquet"))
        assert files and files == sorted(n for n in os.listdir(cluster / split) if n.endswith(".parquet"))
        for name in files:  # same rows in the same files (order inside a file may differ)
            a, b = _sorted_rows(single / split / name), _sorted_rows(cluster / split / name)
            pd.testing.assert_frame_equal(a, b)
    sa, sb = (json.loads((d / "schema.json").read_text()) for d in (single, cluster))
    assert sa["columns"] == sb["columns"] and sa["rows"] == sb["rows"]  # same cardinalities, dims, rows
    wa, wb = (json.loads((d / "workflow" / "workflow.json").read_text()) for d in (single, cluster))
    assert wa["fitted"] == wb["fitted"]  # same stats: moments (Normalize), category counts
    vocab = [os.path.relpath(os.path.join(r, n), single / "workflow")
             for r, _, ns in os.walk(single / "workflow") for n in ns if n.endswith(".parquet")]
    assert len(vocab) >= 3
    assert any("categories" in rel for rel in vocab)
    for rel in vocab:
        a, b = pq.read_table(single / "workflow" / rel), pq.read_table(cluster / "workflow" / rel)
        if "categories" not in rel:  # other saved stats (e.g. counts of values not kept): as sets
            a, b = (t.sort_by([(c, "ascending") for c in t.column_names]) for t in (a, b))
        assert a.equals(b), rel  # vocabularies in the same order: the same ids


def test_categorify_fit_never_sees_a_whole_column(raw, monkeypatch):
    """Per-partition value counts merged by a tree: no task gets more than one partition's rows,
    no merge more than ``split_every`` partials."""
    from ctrflow.etl.ops import categorify
    from ctrflow.etl.stats import tree_reduce

    chunk_rows: list[int] = []
    merge_fan_in: list[int] = []

    def recording_tree_reduce(ddf, chunk, merge, split_every=8):
        def rec_chunk(df):
            chunk_rows.append(len(df))
            return chunk(df)

        def rec_merge(partials):
            merge_fan_in.append(len(partials))
            return merge(partials)

        return tree_reduce(ddf, rec_chunk, rec_merge, split_every)

    monkeypatch.setattr(categorify, "tree_reduce", recording_tree_reduce)
    frames = [pd.read_parquet(raw / f"day-{k}.parquet") for k in range(FILES)]
    full = pd.concat(frames, ignore_index=True)
    import dask.dataframe as dd

    ddf = dd.from_pandas(full, npartitions=20)  # > split_every: a two-level tree
    parts = ddf.map_partitions(len).compute().tolist()
    wf = Workflow(["C1", "C2", "C3"] >> Categorify(freq_threshold=1))
    with dask.config.set(scheduler="synchronous"):
        wf.fit(Dataset(ddf))
    assert sorted(chunk_rows) == sorted(parts)  # one call per partition, each with that partition only
    assert max(chunk_rows) < len(full) / 10
    assert merge_fan_in and max(merge_fan_in) <= 8 and len(merge_fan_in) >= 3  # 20 -> 3 -> 1
    op = wf.ops[0] if hasattr(wf, "ops") else None
    assert op is not None and op.stats["C3"]["rows"] == len(full)
    assert op.stats["C3"]["distinct"] == full["C3"].nunique()


def test_gpu_cluster_without_dask_cuda_is_a_clear_error(monkeypatch):
    from ctrflow.etl.cluster import ClusterError, start_client

    monkeypatch.setitem(sys.modules, "dask_cuda", None)  # import dask_cuda -> ImportError
    with pytest.raises(ClusterError, match=r"needs dask-cuda.*pip install 'ctrflow\[gpu-cu1[23]\]'"):
        start_client(None, 2, gpu=True)


def _listening(proc) -> set[tuple[str, int]]:
    import psutil

    return {(c.laddr.ip, c.laddr.port) for c in proc.net_connections("inet") if c.status == psutil.CONN_LISTEN}


@pytest.mark.parametrize("address", [None, ":0"])
def test_local_cluster_listens_on_loopback_only(address):
    """The scheduler, its dashboard and the workers bind 127.0.0.1, never every interface (0.0.0.0 / ::)."""
    psutil = pytest.importorskip("psutil")
    from ctrflow.etl.cluster import close_client, dashboard_option, start_client

    client, cluster = start_client(None, 1, gpu=False, dashboard_address=dashboard_option(address))
    try:
        dash = {s.getsockname()[:2] for s in cluster.scheduler.http_server._sockets.values()}
        assert dash and all(host == "127.0.0.1" for host, _ in dash), dash
        assert client.dashboard_link.startswith("http://127.0.0.1:")
        assert int(client.dashboard_link.split(":")[2].split("/")[0]) in {port for _, port in dash}
        assert cluster.scheduler.address.startswith("tcp://127.0.0.1:")
        ports = {port for _, port in dash} | {int(cluster.scheduler.address.rsplit(":", 1)[1])}
        mine = {(ip, port) for ip, port in _listening(psutil.Process()) if port in ports}
        assert mine and all(ip == "127.0.0.1" for ip, _ in mine), mine
        for child in psutil.Process().children(recursive=True):  # nanny and worker processes
            with_ports = _listening(child)
            assert all(ip == "127.0.0.1" for ip, _ in with_ports), (child.cmdline()[:3], with_ports)
    finally:
        close_client(client, cluster)


def test_dashboard_address_option():
    from ctrflow.etl.cluster import DEFAULT_DASHBOARD, ClusterError, dashboard_option

    assert dashboard_option(None) == DEFAULT_DASHBOARD == "127.0.0.1:8787"
    assert dashboard_option(":9000") == "127.0.0.1:9000"  # a bare port stays on loopback
    assert dashboard_option("0.0.0.0:8787") == "0.0.0.0:8787"  # exposing it is explicit
    assert dashboard_option("none") is None
    with pytest.raises(ClusterError, match="HOST:PORT"):
        dashboard_option("localhost")


@pytest.mark.parametrize("argv, message", [
    (["--dashboard-address", ":9000"], "applies to --workers only"),
    (["--workers", "1", "--dashboard-address", "nope"], "HOST:PORT"),
])
def test_dashboard_address_usage_errors(argv, message, tmp_path, capsys):
    assert main(["--input", str(tmp_path / "none.parquet"), "--output", str(tmp_path / "o"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err
