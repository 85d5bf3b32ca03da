#!/usr/bin/env bash
# The recipe at toy scale on CPU, no downloads: embedded corpus -> tokenizer -> MDS -> pre-train a
# small source LLaMA -> prune it with learned masks -> export to Hugging Face -> summary table.
# Usage: bash scripts/quickstart.sh [--out runs/quickstart] [--source-steps 600] [--prune-steps 300]
source "$(dirname "$0")/_env.sh"
exec .venv/bin/python -m llmshearing.quickstart "$@"
