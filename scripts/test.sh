#!/usr/bin/env bash
# Set up (CPU torch first, so pip never pulls a CUDA build) and run lint + the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[dev]"
python -m ruff check rlhf_kit recipes tests bench
python -m pytest -q tests
