#!/usr/bin/env bash
# Train and evaluate models x tasks; see `./run_all_experiments.sh --help`.
# Makes (or reuses) the project's virtual environment, then hands over to run_experiments.py,
# which logs every run under experiment_results/<task>/<run-id>/.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [ ! -x "$root/.venv/bin/python" ]; then
  bash "$root/scripts/setup_env.sh"
fi
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
cd "$root"
exec "$root/.venv/bin/python" "$root/run_experiments.py" "$@"
