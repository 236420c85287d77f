#!/usr/bin/env bash
# Set up (idempotent) and run the whole pipeline on the demo model: gRPC on 8033, /health and /metrics on 3000.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/text-generation-launcher "$@"
