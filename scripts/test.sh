#!/usr/bin/env bash
# Runs the whole test suite from a fresh clone: creates ./.venv, installs mspecies with its test
# extras, installs RELION 3.1 from Debian when missing and running as root, checks ruff, runs pytest on
# tests/ and then the plugin's own tests (mspecies/tests) through Scipion's test runner, so each test runs
# once. With arguments, they go to pytest instead (e.g. scripts/test.sh -m "not slow", or a test file).
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
if [ "$#" -gt 0 ]; then
    exec .venv/bin/python -m pytest "$@"
fi
.venv/bin/python -m pytest tests
# mspecies/tests through pyworkflow's test runner (what `scipion3 tests mspecies.tests...` runs): non-zero exit
# when any test fails or errors, or a module cannot be imported in a plugin's environment (e.g. needs pytest)
.venv/bin/python scripts/scipion_tests.py
