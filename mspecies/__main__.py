"""``python -m mspecies``: command-line entry point (see :mod:`mspecies.cli`)."""

import os
import signal
import sys

from .worker_threads import prepare_worker

prepare_worker(sys.argv[1:], os.environ)  # before anything loads NumPy (and with it OpenBLAS)

from .cli import main  # noqa: E402 (after the thread settings, on purpose)
from .cli.main import QUICK_EXIT  # noqa: E402

code = main()
sys.stdout.flush()
sys.stderr.flush()
if code in (128 + signal.SIGINT, 128 + signal.SIGTERM) or sys.argv[1:2] and sys.argv[1] in QUICK_EXIT:
    # Stopped by a signal: main() has removed what the run had not completed. Leave at once, without the
    # interpreter's shutdown joining the export's worker threads: one interrupted mid-task may never finish.
    # A command of QUICK_EXIT has closed and published its files when main() returns: leave without tearing down
    # the modules and arrays one by one (0.06-0.08 s of every export, one per tilt series under Scipion).
    os._exit(code)
sys.exit(code)
