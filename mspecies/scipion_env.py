"""Zero-configuration environment for headless Scipion (no scipion-app, no display).

pyworkflow reads its configuration from the environment once, at import time, so
:func:`configure_headless_scipion` must run before anything imports pyworkflow, pwem or tomo.
It writes a minimal ``hosts.conf`` and sets the variables that headless runs need
(``scipion_reference.md`` §6.3). Values already set by the user are kept.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

HOSTS_CONF = """[localhost]
PARALLEL_COMMAND = mpirun -np %_(JOB_NODES)d %_(COMMAND)s
"""


def configure_headless_scipion(user_data_dir: str | os.PathLike[str]) -> dict[str, str]:
    """Create ``<user_data_dir>/config/hosts.conf`` and export the Scipion variables; return them."""
    if "pyworkflow" in sys.modules:
        raise RuntimeError("configure_headless_scipion() must run before pyworkflow is imported: "
                           "pyworkflow reads its configuration once, at import time")
    root = Path(user_data_dir).resolve()
    hosts = root / "config" / "hosts.conf"
    hosts.parent.mkdir(parents=True, exist_ok=True)
    if not hosts.exists():
        hosts.write_text(HOSTS_CONF)
    values = {
        "SCIPION_DOMAIN": "pwem",
        "SCIPION_HOME": str(root),
        "SCIPION_HOSTS": str(hosts),
        "SCIPION_PYTHON": sys.executable,
        "SCIPION_USER_DATA": str(root),
        "SCIPION_TESTS": str(root / "tests-data"),
        "SCIPION_TEST_NOSYNC": "1",
        "SCIPION_NOTIFY": "False",
        "SCIPION_PRIORITY_PACKAGE_LIST": "pwem tomo",
        "MPLBACKEND": "Agg",
    }
    for key, value in values.items():
        os.environ.setdefault(key, value)
    return {key: os.environ[key] for key in values}
