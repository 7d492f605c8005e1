"""Connect the ETL to a Dask cluster: an existing scheduler, or a local one started here.

ctrflow never runs its own cluster logic: ``--scheduler ADDRESS`` connects a ``distributed.Client``
to any running Dask scheduler (``dask scheduler`` + ``dask worker`` / ``dask cuda worker`` on other
machines), and ``--workers N`` starts a ``distributed.LocalCluster`` of N processes (CPU) or a
``dask_cuda.LocalCUDACluster`` with one worker per GPU on the first N GPUs (``--engine gpu``).
A local cluster's scheduler and dashboard listen on loopback only (Dask's default dashboard binds
every interface, which would publish the cluster to the network); ``--dashboard-address`` changes it.
Once the client exists it is Dask's default scheduler, so the workflow's ``dask.compute`` calls run
on the cluster unchanged.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any

LOOPBACK = "127.0.0.1"
DEFAULT_DASHBOARD = f"{LOOPBACK}:8787"  # Dask's usual port, but loopback only


class ClusterError(ValueError):
    """The cluster cannot be reached or started (a user error: one line, exit code 2)."""


def _quiet() -> None:
    # The CLI configures the root logger at INFO; distributed's start/stop chatter is not news.
    for name in ("distributed", "dask_cuda"):
        logging.getLogger(name).setLevel(logging.WARNING)


def dashboard_option(address: str | None) -> str | None:
    """``--dashboard-address`` as ``LocalCluster`` takes it.

    Args:
        address: ``HOST:PORT``, ``:PORT`` (loopback), ``none`` (no dashboard) or None (the default).

    Returns:
        ``HOST:PORT``, or None for no dashboard.
    """
    if address is None:
        return DEFAULT_DASHBOARD
    if address.strip().lower() in ("none", "off", ""):
        return None
    host, sep, port = address.strip().rpartition(":")
    if not sep or not port.isdigit():
        raise ClusterError(f"--dashboard-address expects HOST:PORT, :PORT or none, got {address!r}")
    return f"{host or LOOPBACK}:{port}"


def start_client(scheduler: str | None, workers: int | None, gpu: bool,
                 dashboard_address: str | None = DEFAULT_DASHBOARD, memory_limit: int | None = None) -> tuple[Any, Any]:
    """A ``distributed.Client`` for ``scheduler`` or for a new local cluster of ``workers`` workers.

    Args:
        scheduler: address of a running scheduler (``tcp://host:8786``), or None.
        workers: workers of a local cluster (used when ``scheduler`` is None).
        gpu: start a ``LocalCUDACluster`` (one worker per GPU) instead of CPU processes.
        dashboard_address: where a local cluster's dashboard listens (``HOST:PORT``; None: no
            dashboard). The scheduler itself always listens on loopback.
        memory_limit: the run's memory budget in bytes, split evenly over a local cluster's CPU workers
            (Dask spills, pauses and restarts a worker near its share); None: Dask's default.

    Returns:
        ``(client, cluster)``; ``cluster`` is None for an external scheduler (not ours to close).

    Raises:
        ClusterError: distributed / dask-cuda missing, the scheduler unreachable, too few GPUs.
    """
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise ClusterError("--scheduler/--workers need dask.distributed: pip install 'dask[distributed]'") from None
    _quiet()
    if scheduler:
        try:
            return Client(scheduler, timeout="5s"), None
        except (OSError, TimeoutError) as e:
            raise ClusterError(f"cannot reach the Dask scheduler at {scheduler} ({e}); check the address") from None
    # Tables that arrive through distributed's pickling may be unaligned; Acero (the group-by that
    # merges value counts) warns once per table unless told to copy such buffers. Workers inherit it.
    os.environ.setdefault("ACERO_ALIGNMENT_HANDLING", "reallocate")
    where = {"host": LOOPBACK, "dashboard_address": dashboard_address}
    with warnings.catch_warnings():
        # A busy port falls back to a free one; the CLI prints the link that resulted.
        warnings.filterwarnings("ignore", message=r"Port \d+ is already in use")
        if gpu:
            cluster = _cuda_cluster(int(workers or 1), where)
        else:
            # Processes, not threads: pandas kernels hold the GIL. The machine's cores are split
            # evenly so that --workers 8 on 64 cores still uses all of them.
            threads = max(1, (os.cpu_count() or 1) // int(workers or 1))
            share = {"memory_limit": max(1, memory_limit // int(workers or 1))} if memory_limit else {}
            cluster = LocalCluster(n_workers=workers, threads_per_worker=threads, processes=True, **where, **share)
    try:
        return Client(cluster), cluster
    except BaseException:
        cluster.close()
        raise


def _cuda_cluster(workers: int, where: dict[str, Any]) -> Any:
    try:
        from dask_cuda import LocalCUDACluster
    except ImportError:
        from ctrflow.etl.dispatch import gpu_install_hint

        raise ClusterError("--engine gpu with --workers needs dask-cuda (one Dask worker per GPU): "
                           f"pip install dask-cuda, or {gpu_install_hint()}") from None
    try:
        from dask_cuda.utils import get_n_gpus

        gpus = get_n_gpus()
    except Exception:  # noqa: BLE001 - NVML missing: let LocalCUDACluster report it
        gpus = None
    if gpus is not None and workers > gpus:
        raise ClusterError(f"--workers {workers} with --engine gpu: only {gpus} GPU(s) visible (one worker per GPU)")
    return LocalCUDACluster(n_workers=workers, **where)


def close_client(client: Any, cluster: Any) -> None:
    """Close the client and, when we started it, the local cluster."""
    client.close()
    if cluster is not None:
        cluster.close()
