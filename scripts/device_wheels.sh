#!/usr/bin/env bash
# Download, on a machine with PyPI, the wheels that a bare CUDA image with its own python3 + torch lacks
# (the project's pinned Composer / Streaming / transformers stack, Python 3.12, x86-64 Linux) into .whl/,
# for machines that cannot reach a package index. scripts/gpu_check.sh installs them from there with
#   python3 -m pip install --no-index --no-deps --target /tmp/site .whl/*.whl
# when it finds no .venv. torch, numpy and the other packages such images carry are not downloaded.
#   bash scripts/device_wheels.sh [PYTHON_VERSION]      # default 3.12
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER="${1:-3.12}"
WHEELS=(
  mosaicml==0.32.1 mosaicml-streaming==0.13.0 transformers==4.57.6 tokenizers==0.22.2 huggingface_hub==0.36.2
  omegaconf==2.4.0 coolname==2.2.0 torch-optimizer==0.3.0 pytorch-ranger==0.1.1
  importlib_metadata==8.9.0 catalogue==2.0.10 zstd==1.5.6.1 python-snappy==0.7.3 cramjam==2.14.0 brotli==1.2.1
  zstandard==0.25.0
  # mosaicml-cli: Composer imports it at start-up
  mosaicml-cli==0.7.5 argcomplete==3.7.2 arrow==1.4.0 backoff==2.2.1 gql==3.5.3 graphql-core==3.2.6 prompt-toolkit==3.0.36
  questionary==2.0.1 ruamel.yaml==0.19.1 validators==0.36.0 websockets==11.0.3 termcolor==3.3.0
)
PLATFORMS=()
for n in 2_17 2_24 2_27 2_28 2_31 2_34; do PLATFORMS+=(--platform "manylinux_${n}_x86_64"); done
PLATFORMS+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  "${PLATFORMS[@]}" -d .whl "${WHEELS[@]}"
du -sh .whl
