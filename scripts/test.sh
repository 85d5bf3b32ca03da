#!/usr/bin/env bash
# Run the test suite (sets up .venv on first use). Extra arguments go to pytest.
source "$(dirname "$0")/_env.sh"
exec .venv/bin/python -m pytest "$@"
