"""``python -m mspecies``: command-line entry point (see :mod:`mspecies.cli`)."""

import os
import signal
import sys

from .cli import main

code = main()
if code in (128 + signal.SIGINT, 128 + signal.SIGTERM):
    # Stopped by a signal: main() has removed what the run had not completed. Leave at once, without the
    # interpreter's shutdown joining the export's worker threads: one interrupted mid-task may never finish.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
