#!/usr/bin/env bash
# The whole shearing recipe on GPU nodes: data prep -> prune -> export (materialise) -> continued
# pre-training -> export. Stages whose output exists are skipped, so the script can be re-run after a
# failure; training stages resume from their own checkpoints (autoresume).
#
#   SOURCE=/models/Llama-2-7b-hf RAW=/data/redpajama WORK=/scratch/shear TARGET=2.7b NPROC=8 bash scripts/run_recipe.sh
#
# Environment:
#   SOURCE   Hugging Face directory of the source model (its tokenizer is used for data prep)
#   RAW      RedPajama-style folder: <RAW>/<domain>/*.jsonl[.gz|.zst]
#   WORK     output root: data/, prune/, pruned_hf/, cpt/, final_hf/
#   TARGET   1.3b or 2.7b (picks yamls/prune_<T>.yaml and yamls/continue_pretrain_<T>.yaml)
#   SEQ_LEN  (4096), PREP_WORKERS (16), NPROC (GPUs on this node)
#   PRUNE_ARGS / CPT_ARGS  extra key=value overrides for the two training stages
set -euo pipefail
cd "$(dirname "$0")/.."
: "${SOURCE:?set SOURCE to the source model directory}"
: "${RAW:?set RAW to the RedPajama-style input folder}"
: "${WORK:?set WORK to the output folder}"
TARGET=${TARGET:-2.7b}
SEQ_LEN=${SEQ_LEN:-4096}
PREP_WORKERS=${PREP_WORKERS:-16}
for f in "yamls/prune_${TARGET}.yaml" "yamls/continue_pretrain_${TARGET}.yaml"; do
  [[ -f $f ]] || { echo "no $f: TARGET must be 1.3b or 2.7b (or add the yaml)" >&2; exit 2; }
done
[[ -f $SOURCE/config.json ]] || { echo "SOURCE=$SOURCE is not a Hugging Face model directory" >&2; exit 2; }
if [[ ${NNODES:-1} != 1 ]]; then
  echo "run_recipe.sh drives one node; on several, run each stage with scripts/slurm_launch.sbatch (or" >&2
  echo "scripts/launch.sh on every node) and export on one node with scripts/export_hf.py" >&2
  exit 2
fi
mkdir -p "$WORK"

if [[ ! -f $WORK/data/manifest.json ]]; then
  python data_prep/prepare_data.py --input "$RAW" --output "$WORK/data" --tokenizer "$SOURCE" \
    --seq-len "$SEQ_LEN" --val-fraction 0.005 --test-fraction 0.005 --workers "$PREP_WORKERS"
fi

# shellcheck disable=SC2086
bash scripts/launch.sh "yamls/prune_${TARGET}.yaml" variables.source="$SOURCE" variables.data="$WORK/data" \
  variables.run_dir="$WORK/prune" tokenizer="$SOURCE" ${PRUNE_ARGS:-}
[[ -d $WORK/pruned_hf ]] || python scripts/export_hf.py --checkpoint "$WORK/prune/checkpoints/latest-rank0.pt" --output "$WORK/pruned_hf"

# shellcheck disable=SC2086
bash scripts/launch.sh "yamls/continue_pretrain_${TARGET}.yaml" variables.source="$WORK/pruned_hf" \
  variables.data="$WORK/data" variables.run_dir="$WORK/cpt" tokenizer="$SOURCE" ${CPT_ARGS:-}
[[ -d $WORK/final_hf ]] || python scripts/export_hf.py --checkpoint "$WORK/cpt/checkpoints/latest-rank0.pt" --output "$WORK/final_hf"
python -m llmshearing.evaluate --model "$WORK/final_hf" --data "$WORK/data" --max-sequences-per-domain 64
