#!/usr/bin/env bash
# Run the whole test suite (unit + end-to-end against a real TorchServe).
#   ./scripts/test.sh [pytest args...]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
# The end-to-end tests serve the real demo archive: build it (and the demo weights) if missing.
if [[ ! -f model_store/shapes.mar ]]; then
  .venv/bin/python scripts/build_mar.py
fi
exec .venv/bin/python -m pytest "$@"
