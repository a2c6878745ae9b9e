#!/usr/bin/env bash
# Set up (CPU torch first, so pip never pulls a CUDA build) and run lint + the whole test suite.
#
#   bash scripts/test.sh            # the exact versions of constraints/ci.txt (what CI runs)
#   bash scripts/test.sh --latest   # the newest releases the ranges in pyproject.toml admit (or RLHF_KIT_LATEST=1)
#
# The pinned set keeps CI reproducible; --latest shows drift on purpose. scripts/refresh_constraints.sh
# re-resolves the newest set in a fresh environment, runs this suite on it and rewrites constraints/ci.txt
# only when it passes.
set -euo pipefail
cd "$(dirname "$0")/.."
latest=${RLHF_KIT_LATEST:-}
for arg in "$@"; do
    case "$arg" in
        --latest) latest=1 ;;
        *) echo "scripts/test.sh: unknown argument $arg (use --latest)" >&2; exit 2 ;;
    esac
done
python -m pip install -q torch==2.13.0
if [ -n "$latest" ]; then
    echo "test.sh: testing against the newest releases (not constraints/ci.txt)"
    python -m pip install -q --upgrade --upgrade-strategy eager -e ".[dev]"
else
    python -m pip install -q -c constraints/ci.txt -e ".[dev]"
fi
python -m pip freeze --exclude-editable | grep -iE '^(torch|transformers|accelerate|peft|tokenizers|tyro)==' | tr '\n' ' '
echo
python -m ruff check rlhf_kit recipes tests bench
python -m pytest -q tests
