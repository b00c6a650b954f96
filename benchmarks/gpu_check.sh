#!/usr/bin/env bash
# Issue 32's GPU check (benchmarks/gpu_check.py says what it runs, what each step needs and what it writes).
#   bash benchmarks/gpu_check.sh --commit HASH                   on a lent GPU machine: files under $OUT, ~6 minutes
#   bash benchmarks/gpu_check.sh --dry-run --out out/gpu_check   anywhere: the same steps and flags at tiny sizes
# PYTHON picks the interpreter (default python3: the lent machines' has torch).
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" benchmarks/gpu_check.py "$@"
