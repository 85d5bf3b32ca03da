#!/usr/bin/env bash
# The recipe at toy scale on CPU, no downloads: embedded corpus -> tokenizer -> MDS -> pre-train a
# small source LLaMA -> prune it with learned masks -> export -> continued pre-training -> summary table.
# Usage: bash scripts/quickstart.sh [--output runs/quickstart] [--source-steps 800] [--prune-steps 400]
#        [--cpt-steps 400] [--source <model> --input <redpajama-style folder> --target FIELD=N ...] [--verbose]
# (every option: bash scripts/quickstart.sh --help)
source "$(dirname "$0")/_env.sh"
exec .venv/bin/python -m llmshearing.quickstart "$@"
