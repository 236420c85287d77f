#!/usr/bin/env bash
# Set up (idempotent), lint, and run the whole test suite (unit and end-to-end).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
echo "==> ruff"
.venv/bin/ruff check services tests bench
echo "==> pytest"
.venv/bin/python -m pytest -q "$@"
