#!/usr/bin/env bash
# Runs the whole test suite from a fresh clone: creates ./.venv, installs mspecies with its test
# extras, installs RELION 3.1 from Debian when missing and running as root, checks ruff, runs pytest.
# Extra arguments go to pytest (e.g. scripts/test.sh -m "not slow").
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh test
if ! command -v relion_reconstruct >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq relion >/dev/null
    else
        echo "note: relion_reconstruct not found and not root; RELION tests will be skipped" >&2
    fi
fi
.venv/bin/ruff check .
.venv/bin/python -m pytest "$@"
