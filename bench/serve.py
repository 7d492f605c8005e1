"""Serving benchmark: ``python -m ctrflow.serve`` under load on loopback, next to in-process scoring.

Measured side by side in one run, on the same 256-row requests of raw validation rows:

- ``HTTP /predict``: the server (uvicorn, one process, started here as a subprocess on a free port)
  with ``--clients`` concurrent clients (threads, one keep-alive ``http.client`` connection each)
  sending ``--requests`` requests in all, then stopping; latency per request as the client sees it.
- ``HTTP /rank``: the same with ``{"context": ..., "candidates": [256 rows]}``.
- ``HTTP /predict, N processes``: for each N > 1 of ``--processes`` (default ``1,2``), a server started with
  ``--processes N`` (N server processes on one port, each its own GIL) under the same load.
- ``HTTP /predict, no batching``: a second server with ``--no-batching``: each request gets its own
  transform + model call instead of sharing them with the requests queued beside it.
- ``Predictor.predict (in-process)``: the same requests as lists of dicts, one after another, no HTTP:
  what JSON + HTTP + concurrency add.
- ``Dask Workflow.transform + model``: the baseline a user has without ``Workflow.transform_frame``:
  each request becomes a one-partition Dask dataset, transformed lazily and computed, then scored.

Then the per-stage split of one request (``stages``, CPU ms of the calling thread, median, in-process,
one thread): JSON parse (the server's: orjson when installed), validation into typed columns, the server's transform
(``Predictor.transform_columns``: the plan made at load time) of one request and of a batch of
``--clients`` requests (what the server's batcher runs), the same through a pandas frame
(``to_frame`` + ``Workflow.transform_frame``, the reference path), the model on the two sizes.

Rows/s = rows answered / wall time of the phase. ``failed`` counts non-200 answers and connection
errors; ``server alive`` is checked with ``/health`` after the load. ``server_cpu_ms_per_request``: the
server's CPU time (user + system, every thread, ``--processes N``'s children included, read from ``/proc``)
over the phase / requests; ``client_cpu_ms_per_request``: this process's (the client threads share the
cores). The model: DLRM with fit.py's default sizes (dim 16, MLPs 512-256), trained ``--train-steps`` steps
on generated data (the weights' quality does not change the cost), unless ``--run RUN --raw RAW`` point at
an existing run. The generated data, its ETL output and that run are kept for later runs in
``CACHE/bench/serve-data-<rows>-steps<steps>-v<generator version>`` (CACHE: ``--cache-dir``, else
``$CTRFLOW_CACHE_DIR``, else ``$XDG_CACHE_HOME/ctrflow`` or ``~/.cache/ctrflow``).

Usage:
    python bench/serve.py                          # table + CACHE/bench/serve.json
    python bench/serve.py --requests 400 --clients 8 --rows 256 --json out.json
    python bench/serve.py --processes 1,2,4        # the /predict row for each server process count
    python bench/serve.py --amp                    # the model in bf16 autocast (serve --amp) everywhere
    python bench/serve.py --run runs/a --raw data/raw/synthetic-2000000-seed0/valid
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the server (ctrflow.serve) does: same footing

import argparse  # noqa: E402
import http.client  # noqa: E402
import json  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

from ctrflow.bench.machine import describe_machine  # noqa: E402
from ctrflow.bench.paths import add_output_args, announce, bench_dir, json_path, write_json  # noqa: E402


def setup(work: str, rows: int, steps: int) -> tuple[str, str]:
    """Generated data -> ETL -> a DLRM with fit.py's default sizes, each step skipped when ``work`` has it.

    Args:
        work: the cache directory for this (rows, steps, generator version).
        rows: generated rows (train + valid).
        steps: training steps.

    Returns:
        (run dir, raw valid dir).
    """
    from ctrflow.etl import synthetic
    from ctrflow.etl.run import main as etl_main
    from ctrflow.train.fit import main as fit_main

    raw, proc, run = (os.path.join(work, n) for n in ("raw", "processed", "run"))
    announce(work, os.path.isdir(os.path.join(run, "checkpoints")))
    if not os.path.exists(os.path.join(raw, "synthetic.json")):
        synthetic.generate(raw, rows=rows, seed=0)
    if not os.path.exists(os.path.join(proc, "schema.json")):
        assert etl_main(["--input", os.path.join(raw, "train"), "--valid", os.path.join(raw, "valid"),
                         "--output", proc, "--overwrite", "--no-progress"]) == 0
    if not os.path.isdir(os.path.join(run, "checkpoints")):
        assert fit_main(["--data", proc, "--out", run, "--max-steps", str(steps), "--no-progress",
                         "--no-loader-bench", "--eval-every", "0"]) == 0
    return run, os.path.join(raw, "valid")


def requests_from(raw_dir: str, n_rows: int, count: int) -> list[list[dict]]:
    """``count`` requests of ``n_rows`` raw rows (JSON-ready: null for missing, no label), cycling the data."""
    import pyarrow.parquet as pq

    df = pq.read_table(raw_dir).to_pandas()
    records = json.loads(df.drop(columns=[c for c in ("label",) if c in df]).to_json(orient="records"))
    return [[records[(i * n_rows + j) % len(records)] for j in range(n_rows)] for i in range(count)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def start_server(run: str, port: int, max_rows: int, batching: bool = True, processes: int = 1,
                 amp: bool = False) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "ctrflow.serve", "--run", run, "--port", str(port),
                             "--max-rows", str(max_rows), "--log-level", "warning", "--processes", str(processes),
                             *([] if batching else ["--no-batching"]), *(["--amp"] if amp else [])],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}: {proc.stderr.read().strip()}")
        try:
            if get(port, "/health", timeout=1.0)[0] == 200:
                return proc
        except OSError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the server did not answer /health within 120 s")


def process_cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system) used so far by process ``pid`` and its descendants (``--processes N``'s
    children), from ``/proc``; None where there is no ``/proc``."""
    tick, total, todo, seen = os.sysconf("SC_CLK_TCK"), 0, [pid], set()
    while todo:
        p = todo.pop()
        seen.add(p)
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (of every thread)
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split() if int(c) not in seen]
        except (OSError, ValueError, IndexError):
            if p == pid:
                return None
    return total / tick


def load(port: int, path: str, bodies: list[bytes], clients: int, expect: int, server_pid: int | None = None
         ) -> dict[str, Any]:
    """Send every body once, ``clients`` at a time; latency per request and failures, and CPU ms per request of
    the server (``server_pid`` and its children, from ``/proc``) and of this process's client threads."""
    lock, next_i = threading.Lock(), [0]
    lat: list[float] = []
    failed = [0]

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        while True:
            with lock:
                i = next_i[0]
                next_i[0] += 1
            if i >= len(bodies):
                break
            t = time.perf_counter()
            try:
                conn.request("POST", path, bodies[i], {"Content-Type": "application/json"})
                r = conn.getresponse()
                data = r.read()
                ok = r.status == 200 and len(json.loads(data)["scores" if path == "/predict" else "ranked"]) == expect
            except (OSError, http.client.HTTPException, ValueError, KeyError):
                ok = False
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            dt = time.perf_counter() - t
            with lock:
                lat.append(dt)
                failed[0] += not ok
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    server0 = process_cpu_s(server_pid) if server_pid else None
    t0, client0 = time.perf_counter(), time.process_time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out = summarize(lat, time.perf_counter() - t0, expect, failed[0], clients)
    out["client_cpu_ms_per_request"] = 1000 * (time.process_time() - client0) / max(1, len(lat))
    server1 = process_cpu_s(server_pid) if server_pid else None
    if server0 is not None and server1 is not None:
        out["server_cpu_ms_per_request"] = 1000 * (server1 - server0) / max(1, len(lat))
    return out


def summarize(lat: list[float], wall: float, rows: int, failed: int, clients: int) -> dict[str, Any]:
    ms = np.array(lat) * 1000
    return {"requests": len(lat), "rows_per_request": rows, "clients": clients,
            "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "rows_per_s": (len(lat) - failed) * rows / wall, "failed": failed, "seconds": wall}


def in_process(fn, reqs: list[list[dict]], rows: int) -> dict[str, Any]:
    lat = []
    t0 = time.perf_counter()
    for r in reqs:
        t = time.perf_counter()
        fn(r)
        lat.append(time.perf_counter() - t)
    return summarize(lat, time.perf_counter() - t0, rows, 0, 1)


def stage_split(pred: Any, reqs: list[list[dict]], batch: int, repeat: int = 20) -> dict[str, float]:
    """Median thread CPU ms of each stage a request goes through (see the module docstring)."""
    from ctrflow.serve.app import loads_json  # the server's parser: orjson when installed
    from ctrflow.serve.inputs import concat_columns, to_frame

    bodies = [json.dumps(r).encode() for r in reqs[:repeat]]

    def ms(fn, args) -> float:
        ts = []
        for x in args:
            t = time.thread_time()
            fn(x)
            ts.append(time.thread_time() - t)
        return 1000 * float(np.median(ts))

    docs = [json.loads(b) for b in bodies]
    cols = [pred.columns(d) for d in docs]
    stacked = [concat_columns((cols * batch)[i:i + batch]) for i in range(0, len(cols), max(1, len(cols) // 4))]
    frames, big = [to_frame(c) for c in cols], [to_frame(c) for c in stacked]
    done, done_big = [pred.transform_columns(c) for c in cols], [pred.transform_columns(c) for c in stacked]
    return {"json_parse": ms(loads_json, bodies), "validate": ms(pred.columns, docs),
            "transform_1": ms(pred.transform_columns, cols), f"transform_{batch}": ms(pred.transform_columns, stacked),
            "to_frame": ms(to_frame, cols), "transform_frame_1": ms(pred.transform, frames),
            f"transform_frame_{batch}": ms(pred.transform, big), "model_1": ms(pred.predict_processed, done),
            f"model_{batch}": ms(pred.predict_processed, done_big), "batch_requests": batch}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=400, help="HTTP requests in all (per endpoint)")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--rows", type=int, default=256, help="rows (or candidates) per request")
    p.add_argument("--amp", action="store_true",
                   help="every server and the in-process predictor with --amp (the model in bf16 autocast)")
    p.add_argument("--processes", default="1,2",
                   help="server process counts to load with /predict (comma-separated; 1 also runs /rank, no batching)")
    p.add_argument("--baseline-requests", type=int, default=40, help="requests for the in-process baselines")
    p.add_argument("--run", default=None, help="serve this run dir (default: train a small one, kept in CACHE/bench)")
    p.add_argument("--raw", default=None, help="raw parquet rows for the requests (needed with --run)")
    p.add_argument("--data-rows", type=int, default=50_000, help="generated rows for the default run")
    p.add_argument("--train-steps", type=int, default=30)
    add_output_args(p, "serve")
    a = p.parse_args(argv)
    if (a.run is None) != (a.raw is None):
        p.error("--run and --raw go together")
    if min(a.requests, a.clients, a.rows, a.baseline_requests) < 1:
        p.error("--requests, --clients, --rows, --baseline-requests must be >= 1")
    try:
        counts = sorted({int(x) for x in a.processes.split(",") if x.strip()} | {1})
    except ValueError:
        p.error(f"--processes: comma-separated counts, got {a.processes!r}")
    if counts[0] < 1:
        p.error("--processes: counts must be >= 1")
    if a.run:
        run, raw = a.run, a.raw
    else:
        from ctrflow.etl.synthetic import VERSION

        work = bench_dir(a.cache_dir, f"serve-data-{a.data_rows}-steps{a.train_steps}-v{VERSION}")
        run, raw = setup(work, a.data_rows, a.train_steps)
    reqs = requests_from(raw, a.rows, a.requests)
    results: dict[str, dict[str, Any]] = {}

    bodies = [json.dumps(r).encode() for r in reqs]
    rank_bodies = [json.dumps({"context": {}, "candidates": r}).encode() for r in reqs]
    for batching, n in [(True, 1), *((True, n) for n in counts[1:]), (False, 1)]:
        port = free_port()
        server = start_server(run, port, max(a.rows, 10_000), batching, n, a.amp)
        suffix = ("" if batching else ", no batching") + (f", {n} processes" if n > 1 else "")
        try:
            load(port, "/predict", bodies[: 2 * a.clients * n], a.clients, a.rows)  # warm-up, not counted
            phase = {f"HTTP /predict{suffix}": load(port, "/predict", bodies, a.clients, a.rows, server.pid)}
            if batching and n == 1:
                phase["HTTP /rank"] = load(port, "/rank", rank_bodies, a.clients, a.rows, server.pid)
                phase[f"HTTP /predict{suffix}"]["batching"] = json.loads(get(port, "/metadata")[1])["batching"]
            alive = server.poll() is None and get(port, "/health")[0] == 200
            for r in phase.values():
                r["server_alive"] = alive
            results.update(phase)
        finally:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()

    from ctrflow.etl import Dataset
    from ctrflow.serve import Predictor

    pred = Predictor.from_run(run, device="cpu", amp=a.amp)
    base = reqs[: a.baseline_requests]
    pred.predict(base[0])
    results["Predictor.predict (in-process)"] = in_process(pred.predict, base, a.rows)

    def via_dask(rows: list[dict]) -> Any:
        frame = pred.raw_frame(rows)
        processed = pred.workflow.transform(Dataset(frame)).to_ddf().compute()
        return pred.predict_processed(processed)

    via_dask(base[0])
    results["Dask Workflow.transform + model"] = in_process(via_dask, base[: max(1, a.baseline_requests // 2)],
                                                            a.rows)
    stages = stage_split(pred, base, a.clients)
    machine = describe_machine()
    print(f"Serving: DLRM {pred.info.get('model_config', {}).get('over_arch_layer_sizes')} from {run}; "
          f"{a.rows} rows/request; {machine['cpu']}, {machine['cores']} cores, load {machine['load_avg']}")
    print(f"{'system':<34} {'clients':>7} {'requests':>8} {'p50 ms':>8} {'p99 ms':>8} {'rows/s':>9} "
          f"{'failed':>6} {'server alive':>12} {'server CPU ms/req':>17}")
    for name, r in results.items():
        alive = {True: "yes", False: "NO"}.get(r.get("server_alive"), "-")
        cpu = r.get("server_cpu_ms_per_request")
        print(f"{name:<34} {r['clients']:>7} {r['requests']:>8} {r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} "
              f"{r['rows_per_s']:>9,.0f} {r['failed']:>6} {alive:>12} {'-' if cpu is None else f'{cpu:.2f}':>17}")
    print(f"stages (thread CPU ms, median; {a.rows} rows per request, batch = {a.clients} requests): "
          + ", ".join(f"{k} {v:.2f}" for k, v in stages.items() if k != "batch_requests"))
    for n in counts:
        name = "HTTP /predict" + (f", {n} processes" if n > 1 else "")
        http = results[name]
        print(f"goal (p99 < 50 ms, >= 60,000 rows/s), {name}: p99 {http['p99_ms']:.1f} ms, "
              f"{http['rows_per_s']:,.0f} rows/s -> "
              f"{'met' if http['p99_ms'] < 50 and http['rows_per_s'] >= 60_000 else 'not met'} "
              f"(load average {machine['load_avg']})")
    write_json(json_path(a, "serve"), {"benchmark": "serve", "machine": machine, "run": run, "args": vars(a),
                                       "results": results, "stages": stages})
    ok = all(r["failed"] == 0 and r.get("server_alive", True) for r in results.values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
