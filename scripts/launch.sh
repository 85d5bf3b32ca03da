#!/usr/bin/env bash
# Launch one training stage (pre-train, prune or continue pre-training) on this node or on several.
#
#   single node, 8 GPUs:  NPROC=8 bash scripts/launch.sh yamls/prune_2.7b.yaml variables.source=... variables.data=... variables.run_dir=...
#   multi-node:           NNODES=4 NODE_RANK=<0..3> MASTER_ADDR=<host of rank 0> NPROC=8 bash scripts/launch.sh <yaml> [key=value ...]
#
# Environment (all optional):
#   NPROC        processes on this node (default: the number of visible GPUs, else 1)
#   NNODES       number of nodes (default 1); the world size is NNODES * NPROC
#   NODE_RANK    this node's rank (default 0, or SLURM_NODEID under Slurm)
#   MASTER_ADDR  address of node 0 (default 127.0.0.1); MASTER_PORT (default 29500)
#   LOG_DIR      where the non-zero local ranks write their stdout/stderr (default: logs/<yaml name>)
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ $# -lt 1 || ! -f "$1" ]]; then
  echo "usage: [NPROC=8 NNODES=1 NODE_RANK=0 MASTER_ADDR=host] bash scripts/launch.sh <config.yaml> [key=value ...]" >&2
  exit 2
fi
yaml=$1; shift
# the project's environment (scripts/_env.sh creates it), unless one is active
if [[ -z "${VIRTUAL_ENV:-}" && -x .venv/bin/python ]]; then
  export PATH="$PWD/.venv/bin:$PATH"
fi

if [[ -z "${NPROC:-}" ]]; then
  NPROC=$(python -c "import torch; print(max(torch.cuda.device_count(), 1))" 2>/dev/null || echo 1)
fi
NNODES=${NNODES:-${SLURM_NNODES:-1}}
NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-0}}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
LOG_DIR=${LOG_DIR:-logs/$(basename "$yaml" .yaml)}

# Check the config (unknown keys, bad values, unreachable targets) before any process starts.
python - "$yaml" "$@" <<'PY'
import sys
from llmshearing.config import ConfigError, load_config
try:
    load_config(sys.argv[1], sys.argv[2:])
except ConfigError as e:
    sys.exit(f"config error: {e}")
PY

mkdir -p "$LOG_DIR"
exec composer \
  --nproc "$NPROC" \
  --world_size $((NNODES * NPROC)) \
  --node_rank "$NODE_RANK" \
  --master_addr "$MASTER_ADDR" \
  --master_port "$MASTER_PORT" \
  --stdout "$LOG_DIR/rank{rank}.stdout.txt" \
  --stderr "$LOG_DIR/rank{rank}.stderr.txt" \
  train.py "$yaml" "$@"
