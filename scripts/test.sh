#!/usr/bin/env bash
# The project's test command (README "Set up, run, test"), from nothing: makes or updates the
# environment, lints, then runs the tests: unit tests on tiny models, integration tests through
# real Flower simulations and Deployment Engine federations on loopback, and on the packaged
# SmolLM2-135M-Instruct. Arguments go to pytest (e.g. a test file).
#   bash scripts/test.sh          everything (what CI runs)
#   bash scripts/test.sh --fast   the unit tier: tests not marked `slow` (under 3 minutes here)
set -euo pipefail
cd "$(dirname "$0")/.."
marker=()
if [ "${1:-}" = "--fast" ]; then
  shift
  marker=(-m "not slow")
fi
bash scripts/setup_env.sh
.venv/bin/ruff check .
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# Flower state of test runs stays out of the working tree's .flwr of interactive runs.
export FLOWERTUNE_FLWR_HOME="${FLOWERTUNE_FLWR_HOME:-$(mktemp -d)/flwr-home}"
exec .venv/bin/python -m pytest -q -p no:cacheprovider "${marker[@]}" "$@"
