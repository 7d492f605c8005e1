"""Where ``etl/run.py`` writes: ``--output`` and the cache directory, never the cwd or the checkout;
and the GPU install hint names the extra for the CUDA major in use."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ctrflow.etl import cache, dispatch, synthetic
from ctrflow.etl.run import main, synthetic_key

REPO = Path(__file__).resolve().parents[1]
ROWS = "2000"


def _new_paths() -> set[str] | None:
    """Untracked and ignored paths of the checkout per ``git status`` (data/ is ignored, so it counts).

    Only paths a run could create are compared: edits to tracked files and new source files come from
    people working in the same checkout meanwhile, and bytecode from imports.
    """
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--ignored"], cwd=REPO, capture_output=True,
                             text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return {line for line in out.splitlines()
            if line[:2] in ("??", "!!") and "__pycache__" not in line and not line.endswith((".py", ".md"))}


def _run_cli(cwd: Path, env_cache: Path, *argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, cache.ENV: str(env_cache), "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([sys.executable, str(REPO / "etl" / "run.py"), *argv], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_run_writes_only_output_and_cache(tmp_path):
    cwd, env_cache = tmp_path / "cwd", tmp_path / "cache"
    cwd.mkdir()
    before = _new_paths()
    args = ["--synthetic-rows", ROWS, "--no-progress", "--output", "x"]
    first = _run_cli(cwd, env_cache, *args)
    assert first.returncode == 0, first.stderr
    raw = env_cache / "synthetic" / synthetic_key(int(ROWS), 0, False)
    assert f"synthetic data: generated 2,000 rows in {raw}" in first.stderr
    assert sorted(os.listdir(cwd)) == ["x"]  # nothing but --output in the cwd (no data/raw)
    assert sorted(os.listdir(cwd / "x")) == ["schema.json", "train", "valid", "workflow"]
    assert sorted(os.listdir(env_cache / "synthetic")) == [raw.name]  # no temporary directory left behind
    assert sorted(os.listdir(raw)) == ["synthetic.json", "train", "valid"]

    second = _run_cli(cwd, env_cache, *args, "--overwrite")
    assert second.returncode == 0, second.stderr
    assert f"synthetic data: reusing {raw}" in second.stderr
    assert sorted(os.listdir(cwd)) == ["x"]
    assert _new_paths() == before  # nothing written into the checkout


def test_cache_dir_flag_wins_over_environment(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(cache.ENV, str(tmp_path / "env"))
    monkeypatch.chdir(tmp_path)
    flag = tmp_path / "flag"
    assert main(["--synthetic-rows", ROWS, "--no-progress", "--cache-dir", str(flag), "--output", "o"]) == 0
    assert (flag / "synthetic" / synthetic_key(int(ROWS), 0, False) / "synthetic.json").exists()
    assert not (tmp_path / "env").exists()
    assert sorted(os.listdir(tmp_path)) == ["flag", "o"]
    assert "synthetic data: generated" in capsys.readouterr().err


def test_cache_key_names_everything_that_changes_the_bytes():
    keys = {synthetic_key(r, s, q) for r in (100, 200) for s in (0, 1) for q in (False, True)}
    assert len(keys) == 8
    assert f"v{synthetic.VERSION}" in synthetic_key(100, 0, False)
    assert synthetic_key(100, 0, True).endswith(f"-seq{synthetic.seqs.VERSION}")


def test_regenerates_when_the_cached_metadata_is_stale(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["--synthetic-rows", ROWS, "--no-progress", "--cache-dir", str(tmp_path / "c"), "--output", "o"]
    assert main(argv) == 0
    meta = tmp_path / "c" / "synthetic" / synthetic_key(int(ROWS), 0, False) / "synthetic.json"
    meta.write_text("{not json")  # a damaged cache entry is regenerated, not trusted
    capsys.readouterr()
    assert main([*argv, "--overwrite"]) == 0
    assert "synthetic data: generated" in capsys.readouterr().err


@pytest.mark.parametrize("torch_cuda, driver_cuda, extra", [
    ("12.4", None, "gpu-cu12"),
    ("13.0", "13.0", "gpu-cu13"),
    ("12.8", "13.1", "gpu-cu12"),  # torch's CUDA wins: cupy / cudf then share its runtime
    (None, "12.2", "gpu-cu12"),  # CPU torch: the driver decides
    (None, "13.0", "gpu-cu13"),
    (None, "14.0", "gpu-cu13"),  # a newer driver runs the newest wheels there are
    ("11.8", "12.6", "gpu-cu12"),  # RAPIDS has no CUDA 11 extra: fall back to the driver
    (None, "11.4", None),
    (None, None, None),
    ("garbage", "", None),
])
def test_choose_gpu_extra(torch_cuda, driver_cuda, extra):
    assert dispatch.choose_gpu_extra(torch_cuda, driver_cuda) == extra


def test_gpu_install_hint(monkeypatch):
    monkeypatch.setattr(dispatch, "_torch_cuda", lambda: None)
    monkeypatch.setattr(dispatch, "_driver_cuda", lambda: None)
    both = dispatch.gpu_install_hint()
    assert "'ctrflow[gpu-cu12]'" in both and "'ctrflow[gpu-cu13]'" in both  # unknown CUDA: name both
    monkeypatch.setattr(dispatch, "_driver_cuda", lambda: "13.0")
    assert dispatch.gpu_install_hint() == "pip install 'ctrflow[gpu-cu13]'"


def test_driver_cuda_reads_nvidia_smi(monkeypatch):
    banner = "| NVIDIA-SMI 570.86.15    Driver Version: 570.86.15      CUDA Version: 12.8     |"
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0, banner, ""))
    assert dispatch._driver_cuda() == "12.8"

    def missing(*a, **k):
        raise FileNotFoundError("nvidia-smi")

    monkeypatch.setattr(subprocess, "run", missing)
    assert dispatch._driver_cuda() is None


def test_engine_gpu_error_names_the_extra(tmp_path, monkeypatch, capsys):
    import importlib.util

    if importlib.util.find_spec("cudf") is not None:
        pytest.skip("cudf is installed: the error (if any) is about the device, not the install")
    monkeypatch.setattr(dispatch, "_torch_cuda", lambda: "12.6")
    assert main(["--engine", "gpu", "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'ctrflow[gpu-cu12]'" in err and "--engine cpu" in err
