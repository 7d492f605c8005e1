#!/usr/bin/env bash
# Create (idempotently) the pinned NVTabular 23.08 baseline environment used by bench/etl.py and the
# loader benchmark: bench/.venvs/nvtabular (gitignored). NVTabular 23.08 and merlin-dataloader need
# pandas 1.5 / numpy < 2, so they never go into ctrflow's own venv.
#
# Usage: bash bench/baselines/nvtabular_venv.sh     (prints the venv's python path as its last line)
# Env:   PYTHON (interpreter to build from, default python3; must be 3.11)
#        NVT_VENV (venv path, default bench/.venvs/nvtabular)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${NVT_VENV:-$ROOT/bench/.venvs/nvtabular}"
PYTHON="${PYTHON:-python3}"
# The marker holds the pin set: a half-made venv, or one made with other pins, is rebuilt.
PINS=(
  nvtabular==23.8.0 merlin-core==23.8.0 merlin-dataloader==23.8.0
  pandas==1.5.3 numpy==1.26.4 dask==2024.1.1 distributed==2024.1.1 dask-cuda==24.2.0
  pyarrow==17.0.0 numba==0.60.0
)
TORCH="torch==2.13.0"  # a local CPU wheel; an unpinned torch would pull a multi-GB CUDA build
MARKER="$VENV/.ctrflow-complete"
WANT="$TORCH ${PINS[*]}"

if [[ -f "$MARKER" && "$(cat "$MARKER")" == "$WANT" && -x "$VENV/bin/python" ]]; then
  echo "nvtabular venv already complete: $VENV" >&2
  echo "$VENV/bin/python"
  exit 0
fi

ver="$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
if [[ "$ver" != "3.11" ]]; then
  echo "error: $PYTHON is Python $ver; NVTabular 23.08 pins need Python 3.11 (set PYTHON=...)" >&2
  exit 2
fi

echo "building nvtabular venv at $VENV (takes minutes)" >&2
rm -rf "$VENV"
mkdir -p "$(dirname "$VENV")"
"$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install --quiet --disable-pip-version-check "pip<26.3" >&2
"$PY" -m pip install --quiet --disable-pip-version-check "$TORCH" >&2
"$PY" -m pip install --quiet --disable-pip-version-check "${PINS[@]}" >&2
# Smoke test before declaring the venv complete (CPU mode: no GPU needed).
"$PY" -c "import nvtabular, merlin.dataloader.torch, merlin.core; print('nvtabular', nvtabular.__version__)" >&2
echo "$WANT" > "$MARKER"
echo "$PY"
