#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run every test that runs without a GPU, plus ruff.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export OPENBLAS_NUM_THREADS=1
ruff check sageserve tests benchmarks lab
ruff format --check sageserve tests benchmarks lab
lint-imports  # the layers of DESIGN.md (contracts in pyproject.toml)
python -m pytest -n 2 -q --durations=15 tests "$@"
