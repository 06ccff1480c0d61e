#!/usr/bin/env bash
# Run the whole test suite (unit + end-to-end against a real TorchServe).
#   ./scripts/test.sh [pytest args...]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
# The end-to-end tests build their archives from this checkout; building model_store/shapes.mar
# here also trains the demo weights if they are missing.
.venv/bin/python scripts/build_mar.py >/dev/null
# The type check: mypy over handler/ (check_untyped_defs; settings in pyproject.toml).
.venv/bin/python -m mypy
# The import contract: handler's floors, no server library below the doors, no cycles (pyproject.toml).
.venv/bin/lint-imports
exec .venv/bin/python -m pytest "$@"
