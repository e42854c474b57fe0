#!/usr/bin/env bash
# The device check (bench/device_check.py): parity tests on the device, step times against the
# weight-streaming and matmul floors; one JSON line last. Arguments pass through.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" bench/device_check.py "$@"
