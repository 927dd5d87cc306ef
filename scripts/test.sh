#!/usr/bin/env bash
# The whole test suite: set up, lint (ruff), type-check (mypy) and run pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "== ruff"
paths=(src tests); [ -d bench ] && paths+=(bench)
.venv/bin/ruff check "${paths[@]}"
echo "== mypy"
.venv/bin/mypy src/fc2conv
echo "== pytest"
.venv/bin/python -m pytest "$@"
