#!/usr/bin/env bash
# Regenerate the committed gRPC stubs from proto/generation.proto (needs grpcio-tools, in the test extras).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
"$PY" -m grpc_tools.protoc -Iservices/gateway/pb=proto --python_out=. --pyi_out=. --grpc_python_out=. \
  services/gateway/pb/generation.proto
