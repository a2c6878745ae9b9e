#!/usr/bin/env bash
# Re-resolve the newest releases that pyproject.toml's ranges admit in a fresh virtual environment, run the
# whole suite on them, and only if it passes write the resolved set to constraints/ci.txt (commit it).
#   bash scripts/refresh_constraints.sh [venv-dir]     (default: a temporary directory)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-$(mktemp -d)/venv}
python -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
bash scripts/test.sh --latest
{
    echo "# Exact versions the whole suite passed with (scripts/refresh_constraints.sh, $(date -u +%Y-%m-%d),"
    echo "# Python $(python -c 'import sys; print(sys.version.split()[0])')). CI installs these: pip install -c constraints/ci.txt"
    echo "# Users get the ranges in pyproject.toml. torch is written without its local tag (+cpu / +cuXXX)."
    python -m pip freeze --exclude-editable | grep -v '^-e ' | grep -v '^rlhf-kit' | sed -E 's/^(torch==[^+]+)\+.*/\1/'
} > constraints/ci.txt.tmp
mv constraints/ci.txt.tmp constraints/ci.txt
echo "wrote constraints/ci.txt ($(grep -vc '^#' constraints/ci.txt) packages)"
