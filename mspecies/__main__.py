"""``python -m mspecies``: command-line entry point (see :mod:`mspecies.cli`)."""

import sys

from .cli import main

sys.exit(main())
