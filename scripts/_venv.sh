# Shared by scripts/test.sh and scripts/demo.sh: create ./.venv with Python 3.11 and install mspecies.
# Usage: source scripts/_venv.sh EXTRAS   (EXTRAS e.g. "test" or "")
set -euo pipefail
PYTHON_BIN=${PYTHON:-$(command -v python3.11 || command -v python3)}
if ! "$PYTHON_BIN" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    echo "mspecies needs Python 3.11 (Scipion pins numpy 1.26.1); $PYTHON_BIN is $("$PYTHON_BIN" --version)" >&2
    exit 2
fi
if [ ! -x .venv/bin/python ]; then
    "$PYTHON_BIN" -m venv .venv
fi
spec="."
[ -n "${1:-}" ] && spec=".[$1]"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e "$spec"
