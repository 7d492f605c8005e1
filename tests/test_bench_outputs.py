"""The benchmarks write only where the user pointed them (issue #13).

Each benchmark runs at its smallest sizes, as a user would (``python bench/X.py``), from an empty
working directory, with ``--json`` outside it and ``$CTRFLOW_CACHE_DIR`` set: the JSON must appear
where ``--json`` says, generated data under the cache, nothing in the working directory, no scratch
left in the cache, and nothing new in the checkout (``git status --ignored`` of bench/, data/, runs/).
Baselines that need their own venvs are skipped with the scripts' own flags; the torchrec worker is
checked to run without ctrflow (always), and end to end in the torchrec venv when one exists.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Paths whose churn is not a benchmark's doing: bytecode and tool caches.
NOISE = ("__pycache__", ".pytest_cache", ".ruff_cache", ".egg-info")
# A benchmark writes data and JSON, never source files; new untracked sources are a colleague's edits
# in a shared checkout, not a leak.
SOURCE = (".py", ".sh", ".md", ".toml")


def _checkout_state() -> set[str]:
    """Untracked and ignored paths (files listed one by one) under bench/, data/ and runs/."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    r = subprocess.run(["git", "status", "--porcelain", "--ignored", "--untracked-files=all", "--",
                        "bench", "data", "runs"], cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"not a git checkout: {r.stderr.strip()}")
    state = set()
    for line in r.stdout.splitlines():
        code, path = line[:2], line[3:]
        if code not in ("??", "!!") or any(n in path for n in NOISE):
            continue
        if code == "??" and path.endswith(SOURCE):
            continue
        state.add(line)
    return state


def _run_bench(script: str, args: list[str], tmp_path, env_extra: dict[str, str] | None = None) -> tuple[dict, str]:
    """Run ``python bench/<script> ARGS --json tmp/out/x.json`` from an empty cwd; check where it wrote.

    Returns:
        (the parsed JSON, the cache directory).
    """
    cwd, cache, out = tmp_path / "cwd", tmp_path / "cache", tmp_path / "out" / "x.json"
    cwd.mkdir()
    env = {**os.environ, "CTRFLOW_CACHE_DIR": str(cache), **(env_extra or {})}
    before = _checkout_state()
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", script), *args, "--json", str(out)],
                       cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    after = _checkout_state()
    assert after - before == set(), f"{script} wrote into the checkout: {sorted(after - before)}"
    assert os.listdir(cwd) == [], f"{script} wrote into the working directory: {os.listdir(cwd)}"
    assert f"data: {cache}" in r.stderr  # says where the cached data lives
    leftovers = [n for n in os.listdir(cache / "bench") if n.startswith(".")]
    assert leftovers == [], f"scratch or temp files left in the cache: {leftovers}"
    with open(out) as f:
        return json.load(f), str(cache)


def test_etl_bench_writes_json_and_caches_raw(tmp_path):
    report, cache = _run_bench("etl.py", ["--rows", "4000", "--part-rows", "2000", "--skip-nvtabular"], tmp_path)
    assert report["benchmark"] == "etl"
    assert {"machine", "raw", "results", "all_runs"} <= report.keys()
    assert [r["system"] for r in report["results"]] == ["ctrflow"]
    assert sum(report["results"][0]["rows"].values()) == 4000
    assert report["raw"]["path"].startswith(os.path.join(cache, "bench", "etl-raw-4000-seed0-part2000-v"))


@pytest.mark.slow
def test_train_bench_writes_json_and_caches_data(tmp_path):
    args = ["--steps", "2", "--warmup", "1", "--batch-size", "128", "--valid-rows", "512", "--repeat", "1",
            "--threads", "1", "--systems", "ctrflow"]
    report, cache = _run_bench("train.py", args, tmp_path)
    assert report["benchmark"] == "train"
    assert {"machine", "config", "data", "results"} <= report.keys()
    assert report["results"]["ctrflow"]["samples_per_s"] > 0
    assert report["data"] == os.path.join(cache, "bench", "train-data-896-seed0-v1.npz")


@pytest.mark.slow
def test_lists_bench_writes_json_and_caches_data(tmp_path):
    args = ["--rows", "4000", "--batch-size", "1024", "--repeat", "1", "--train-batch", "256", "--steps", "2",
            "--warmup", "1", "--threads", "1"]
    report, cache = _run_bench("lists.py", args, tmp_path)
    assert {"args", "data", "lists", "loader", "train", "machine"} <= report.keys()
    assert report["loader"]["one-hot only (shuffle)"]["rows"] == 4000
    assert set(report["train"]) == {"one-hot only", "+ 2 lists (sum, own tables)", "+ 2 lists (mean, one shared table)"}
    assert report["data"].startswith(os.path.join(cache, "bench", "lists-data-4000-"))


def test_default_json_goes_to_the_cache(monkeypatch, tmp_path):
    import argparse

    from ctrflow.bench.paths import add_output_args, json_path

    monkeypatch.setenv("CTRFLOW_CACHE_DIR", str(tmp_path / "env"))
    p = argparse.ArgumentParser()
    add_output_args(p, "etl")
    assert json_path(p.parse_args([]), "etl") == str(tmp_path / "env" / "bench" / "etl.json")
    flag = p.parse_args(["--cache-dir", str(tmp_path / "flag")])  # the flag wins over the environment
    assert json_path(flag, "etl") == str(tmp_path / "flag" / "bench" / "etl.json")
    monkeypatch.chdir(tmp_path)
    assert json_path(p.parse_args(["--json", "r.json"]), "etl") == str(tmp_path / "r.json")


def test_dlrm_worker_imports_without_ctrflow(tmp_path):
    # The torchrec venv has no ctrflow: the worker must not import it unless a ctrflow system runs.
    worker = os.path.join(ROOT, "bench", "baselines", "dlrm_worker.py")
    code = textwrap.dedent(f"""
        import importlib.abc, importlib.util, sys
        class NoCtrflow(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "ctrflow" or name.startswith("ctrflow."):
                    raise ModuleNotFoundError(f"No module named {{name!r}}")
        sys.meta_path.insert(0, NoCtrflow())
        spec = importlib.util.spec_from_file_location("dlrm_worker", {worker!r})
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        import numpy as np
        assert mod.exact_auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == 0.75
        a = mod.parse_args(["--system", "torchrec", "--data-file", "x.npz", "--steps", "1", "--warmup", "0",
                            "--batch-size", "2", "--dim", "4", "--lr", "0.1", "--embedding-lr", "0.1",
                            "--threads", "1", "--valid-rows", "2"])
        assert a.system == "torchrec"
        try:
            import ctrflow  # noqa: F401
        except ModuleNotFoundError:
            print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def _torchrec_venv() -> str | None:
    """A complete torchrec venv: $TORCHREC_VENV or bench/.venvs/torchrec (bench/baselines/torchrec_venv.sh)."""
    venv = os.environ.get("TORCHREC_VENV") or os.path.join(ROOT, "bench", ".venvs", "torchrec")
    return venv if os.path.exists(os.path.join(venv, ".ctrflow-complete")) else None


@pytest.mark.slow
def test_train_bench_torchrec_row(tmp_path):
    venv = _torchrec_venv()
    if venv is None:
        pytest.skip("no torchrec venv (bash bench/baselines/torchrec_venv.sh builds one)")
    args = ["--steps", "2", "--warmup", "1", "--batch-size", "128", "--valid-rows", "512", "--repeat", "1",
            "--threads", "1", "--systems", "torchrec"]
    report, _ = _run_bench("train.py", args, tmp_path, {"TORCHREC_VENV": venv})
    assert "error" not in report["results"]["torchrec"], report["results"]["torchrec"]
    assert report["results"]["torchrec"]["samples_per_s"] > 0
