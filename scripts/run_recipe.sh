#!/usr/bin/env bash
# The whole shearing recipe on one GPU node: data prep -> prune -> export (materialise) -> continued pre-training
# -> export -> evaluation. Re-runnable: a stage whose output exists is skipped, and an unfinished training stage
# resumes from its last checkpoint (autoresume); a training stage that finished but was not exported is exported.
#
#   SOURCE=meta-llama/Llama-2-7b-hf RAW=/data/redpajama WORK=/scratch/shear TARGET=2.7b NPROC=8 bash scripts/run_recipe.sh
#   SOURCE=... RAW=... WORK=... PRUNE_YAML=my_prune.yaml CPT_YAML=my_cpt.yaml bash scripts/run_recipe.sh
#
# Environment:
#   SOURCE   the source model: a Hugging Face folder, a Hub id (through the Hugging Face cache) or a .gguf file
#   RAW      RedPajama-style folder: <RAW>/<domain>/*.jsonl[.gz|.zst]
#   WORK     output root: data/, prune/, pruned_hf/, cpt/, final_hf/
#   TARGET   1.3b or 2.7b (yamls/prune_<T>.yaml and yamls/continue_pretrain_<T>.yaml), or give your own:
#   PRUNE_YAML / CPT_YAML   the two stages' configs (README, "Prune your own model")
#   SEQ_LEN  (4096), PREP_WORKERS (16), NPROC (GPUs on this node)
#   PRUNE_ARGS / CPT_ARGS  extra key=value overrides for the two training stages
set -euo pipefail
cd "$(dirname "$0")/.."
: "${SOURCE:?set SOURCE to the source model (folder, Hub id or .gguf)}"
: "${RAW:?set RAW to the RedPajama-style input folder}"
: "${WORK:?set WORK to the output folder}"
if [[ -z "${VIRTUAL_ENV:-}" && -x .venv/bin/python ]]; then export PATH="$PWD/.venv/bin:$PATH"; fi
TARGET=${TARGET:-2.7b}
PRUNE_YAML=${PRUNE_YAML:-yamls/prune_${TARGET}.yaml}
CPT_YAML=${CPT_YAML:-yamls/continue_pretrain_${TARGET}.yaml}
SEQ_LEN=${SEQ_LEN:-4096}
PREP_WORKERS=${PREP_WORKERS:-16}
for f in "$PRUNE_YAML" "$CPT_YAML"; do
  [[ -f $f ]] || { echo "error: no $f: TARGET is 1.3b or 2.7b, or set PRUNE_YAML and CPT_YAML to your own" >&2; exit 2; }
done
if [[ ${NNODES:-1} != 1 ]]; then
  echo "error: run_recipe.sh drives one node; on several, run each stage with scripts/slurm_launch.sbatch (or" \
    "scripts/launch.sh on every node) and export on one node with scripts/export_hf.py" >&2
  exit 2
fi
# a Hub id or .gguf file becomes a local folder once (the Hugging Face cache / llmshearing's cache)
SOURCE_DIR=$(python -c "import sys; from llmshearing.models.gguf import resolve_pretrained; print(resolve_pretrained(sys.argv[1]))" "$SOURCE") \
  || { echo "error: cannot resolve SOURCE=$SOURCE (see above)" >&2; exit 2; }
mkdir -p "$WORK"
stage() { echo "[run_recipe] $*" >&2; }

if [[ -f $WORK/data/manifest.json ]]; then
  stage "data: $WORK/data exists (prepared for this source? train.py checks its tokenizer)"
else
  stage "data prep -> $WORK/data"
  python data_prep/prepare_data.py --input "$RAW" --output "$WORK/data" --tokenizer "$SOURCE_DIR" \
    --seq-len "$SEQ_LEN" --val-fraction 0.005 --test-fraction 0.005 --workers "$PREP_WORKERS"
fi

if [[ -f $WORK/pruned_hf/config.json ]]; then
  stage "prune: done ($WORK/pruned_hf)"
else
  stage "prune (resumes from $WORK/prune/checkpoints if it was interrupted)"
  # shellcheck disable=SC2086
  bash scripts/launch.sh "$PRUNE_YAML" variables.source="$SOURCE_DIR" variables.data="$WORK/data" \
    variables.run_dir="$WORK/prune" tokenizer="$SOURCE_DIR" ${PRUNE_ARGS:-}
  python scripts/export_hf.py --checkpoint "$WORK/prune/checkpoints" --output "$WORK/pruned_hf"
fi

if [[ -f $WORK/final_hf/config.json ]]; then
  stage "continued pre-training: done ($WORK/final_hf)"
else
  stage "continued pre-training (resumes from $WORK/cpt/checkpoints if it was interrupted)"
  # shellcheck disable=SC2086
  bash scripts/launch.sh "$CPT_YAML" variables.source="$WORK/pruned_hf" \
    variables.data="$WORK/data" variables.run_dir="$WORK/cpt" tokenizer="$SOURCE_DIR" ${CPT_ARGS:-}
  python scripts/export_hf.py --checkpoint "$WORK/cpt/checkpoints" --output "$WORK/final_hf"
fi
stage "evaluation on the test split"
python -m llmshearing.evaluate --model "$WORK/final_hf" --data "$WORK/data" --max-sequences-per-domain 64
