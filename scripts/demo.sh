#!/usr/bin/env bash
# Runs the main job on the embedded default dataset from a fresh clone: creates ./.venv, installs
# mspecies, generates the synthetic tilt-series dataset, builds a headless Scipion project from it
# and prints where the project and the report are. Extra arguments go to `python -m mspecies demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh ""
.venv/bin/python -m mspecies demo --out "${MSPECIES_DEMO_OUT:-demo-output}" "$@"
