"""bench/gpu_check.py: the prepared GPU check runs end to end (``--cpu-dry-run``) as it will on the GPU image."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The GPU image: no Dask / RAPIDS, and ctrflow not pip-installed (the editable install's finder is removed), so
# the script must find the project through its own symlink shim and write its data without Dask.
SITECUSTOMIZE = textwrap.dedent('''
    import importlib.abc
    import sys


    class _NoDask(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {"dask", "distributed", "dask_cudf", "cudf"}:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None


    sys.meta_path.insert(0, _NoDask())
    sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
    sys.path_hooks[:] = [h for h in sys.path_hooks if "__editable__" not in getattr(h, "__module__", "")]
    sys.path[:] = [p for p in sys.path if "__editable__" not in p]
    sys.path_importer_cache.clear()
''')


def test_parse_pytest_counts_and_dask_skips():
    from ctrflow.bench.gpu_check_report import parse_pytest

    text = ("SKIPPED [1] tests/test_serve.py:0: Skipped: imports Dask (or RAPIDS), absent here\n"
            "SKIPPED [2] tests/test_loader_gpu.py:32: needs CUDA\n"
            "FAILED tests/test_train.py::test_x - boom\n"
            "3 passed, 1 failed, 3 skipped, 280 deselected, 1 error in 4.2s\n")
    got = parse_pytest(text)
    assert {k: got[k] for k in ("passed", "failed", "skipped", "deselected", "errors")} == {
        "passed": 3, "failed": 1, "skipped": 3, "deselected": 280, "errors": 1}
    assert got["skipped_without_dask"] == ["tests/test_serve.py"]


@pytest.mark.slow
def test_cpu_dry_run_without_dask_or_install(tmp_path):
    sim = tmp_path / "site"
    sim.mkdir()
    (sim / "sitecustomize.py").write_text(SITECUSTOMIZE)
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PYTHONPATH"] = str(sim)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_check.py"), "--cpu-dry-run",
                           "--out", str(out), "--budget-s", "240"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    md = (out / "gpu_check.md").read_text()
    assert "| section | measurement | value | note |" in md and md.strip() in proc.stdout
    assert report["machine"]["ctrflow_import"].startswith("symlink shim")  # not installed: the shim worked

    s = report["sections"]
    assert set(s) == {"tests", "data", "loader", "train", "serve"}
    assert all(r["status"] == "ok" for r in s.values()), {k: r.get("error") for k, r in s.items()}
    assert s["tests"]["passed"] > 0 and s["tests"]["failed"] == 0 and s["tests"]["errors"] == 0, s["tests"]["tail"]
    assert s["data"]["rows"] == 200_000 and 0.5 < s["data"]["oracle_valid_auc"] < 1
    for key in ("read_bound_rows_per_s", "copy_bound_rows_per_s", "unshuffled_rows_per_s", "shuffled_rows_per_s"):
        assert s["loader"][key] > 0
    runs = s["train"]["runs"]
    assert len(runs) == 8 and all("error" not in r for r in runs), runs
    for r in runs:
        assert r["samples_per_s"] > 0 and r["finite"] and set(r["split_ms"]) == {"input", "forward", "backward",
                                                                                 "optimizer"}
        assert (r["mode"] == "model-only") == (r.get("auc") is None)
        assert r["mode"] == "model-only" or 0 < r["auc"] < 1
    assert s["serve"]["p99_ms"] >= s["serve"]["p50_ms"] > 0 and s["serve"]["model"].startswith("checkpoint")
    assert "No module named 'dask'" in s["serve"]["predictor"]  # the no-Dask simulation held in the script too
    assert len(report["goals"]) == 5 and all(g["met"] is None for g in report["goals"])  # judged on CUDA only
