#!/usr/bin/env bash
# GPU throughput check (under 8 minutes on one H100/H200): continued pre-training of the 1.3B shape and
# pruning of a LLaMA2-7B-width source (reduced depth), bf16, sequence 4096; prints tokens/s per GPU and
# MFU, writes runs/benchmarks/gpu_throughput.json.
#   bash scripts/gpu_check.sh             # on a CUDA machine
#   bash scripts/gpu_check.sh --dry-run   # anywhere: tiny shapes on CPU, checks the code path only
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_env.sh
exec .venv/bin/python -m benchmarks.gpu_throughput "$@"
