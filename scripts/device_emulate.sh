#!/usr/bin/env bash
# Check, on a CPU machine with PyPI, that scripts/gpu_check.sh will start on the lent GPU machine: that box
# has no network and its own python3 (3.12) with torch 2.11, numpy 2.5 and transformers 5 (see the device
# tool's KINDS.md), so the pinned stack travels as wheels (.whl/, from scripts/device_wheels.sh) installed
# with --no-deps over it. This builds a Python 3.12 venv with those preinstalled versions (about 5 GB, once),
# installs .whl/ the same way, and runs the dry run (and, with --tests, the test suite) under it.
#   bash scripts/device_emulate.sh [--tests]
set -euo pipefail
cd "$(dirname "$0")/.."
EMU="${EMU:-/tmp/llmshearing-device-emu}"
PY312="${PY312:-$(command -v python3.12 || ls ~/.pyenv/versions/3.12*/bin/python3.12 2>/dev/null | head -1)}"
[ -n "$PY312" ] || { echo "no python3.12 found; set PY312=/path/to/python3.12" >&2; exit 2; }
if [ ! -f "$EMU/.installed" ]; then
  "$PY312" -m venv "$EMU"
  "$EMU/bin/pip" install -q torch==2.11.0 torchvision==0.26.0 numpy==2.5.2 torchmetrics==1.9.0 safetensors==0.8.0 \
    sentencepiece==0.2.2 tqdm requests psutil pyyaml packaging pillow py-cpuinfo tabulate matplotlib xxhash regex \
    filelock pytest rich protobuf fsspec jinja2 six python-dateutil attrs typing-extensions wcwidth yarl anyio
  touch "$EMU/.installed"
fi
[ -d .whl ] || bash scripts/device_wheels.sh
rm -rf /tmp/site
USE_WHEELS=1 PYTHON="$EMU/bin/python" OUT="${OUT:-$(mktemp -d)}" bash scripts/gpu_check.sh --dry-run
if [ "${1:-}" = "--tests" ]; then
  ln -sf /tmp/site/bin/composer "$EMU/bin/composer"  # the tests start `composer` from beside sys.executable
  PYTHONPATH="/tmp/site:$PWD" "$EMU/bin/python" -m pytest -q -p no:cacheprovider tests
fi
