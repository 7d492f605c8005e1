#!/usr/bin/env bash
# Create (idempotently) the pinned torchrec baseline environment used by bench/train.py:
# bench/.venvs/torchrec (gitignored). torchrec 1.8.0 + fbgemm-gpu-cpu 1.8.0 match torch 2.13 on CPU;
# torchrec goes in with --no-deps so pip never swaps torch for a CUDA build.
#
# Usage: bash bench/baselines/torchrec_venv.sh     (prints the venv's python path as its last line)
# Env:   PYTHON (interpreter to build from, default python3)
#        TORCHREC_VENV (venv path, default bench/.venvs/torchrec)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${TORCHREC_VENV:-$ROOT/bench/.venvs/torchrec}"
PYTHON="${PYTHON:-python3}"
TORCH="torch==2.13.0"  # a local CPU wheel; an unpinned torch would pull a multi-GB CUDA build
PINS=(fbgemm-gpu-cpu==1.8.0 tensordict torchmetrics==1.0.3 tqdm pyre-extensions numpy scikit-learn)
NODEPS=(torchrec==1.8.0)
# The marker holds the pin set: a half-made venv, or one made with other pins, is rebuilt.
MARKER="$VENV/.ctrflow-complete"
WANT="$TORCH ${PINS[*]} ${NODEPS[*]}"

if [[ -f "$MARKER" && "$(cat "$MARKER")" == "$WANT" && -x "$VENV/bin/python" ]]; then
  echo "torchrec venv already complete: $VENV" >&2
  echo "$VENV/bin/python"
  exit 0
fi

echo "building torchrec venv at $VENV (takes minutes)" >&2
rm -rf "$VENV"
mkdir -p "$(dirname "$VENV")"
"$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install --quiet --disable-pip-version-check "$TORCH" >&2
"$PY" -m pip install --quiet --disable-pip-version-check "${PINS[@]}" >&2
"$PY" -m pip install --quiet --disable-pip-version-check --no-deps "${NODEPS[@]}" >&2
# Smoke test before declaring the venv complete.
"$PY" -c "import torchrec, fbgemm_gpu; from torchrec.models.dlrm import DLRM; print('torchrec ok')" >&2
echo "$WANT" > "$MARKER"
echo "$PY"
