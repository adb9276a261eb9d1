"""Run the plugin's own tests (``mspecies/tests``) through Scipion's test runner, as an installed plugin's are run.

``scipion3 tests mspecies.tests.test_x ...`` is ``python -m pyworkflow.apps.pw_run_tests mspecies.tests.test_x ...``
inside Scipion's environment. Given test names, that runner loads them with unittest, runs them into its
``GTestResult`` and exits 1 when any test failed or errored (a module that cannot be imported, e.g. one that
imports pytest, loads as a failing test) or none passed. Its ``--run`` mode would ignore the exit status of each
class it runs, so this script passes every test module of the package by name instead.

Usage (from the repository root, in the environment where mspecies is installed)::

    python scripts/scipion_tests.py                        # every mspecies/tests/test*.py module
    python scripts/scipion_tests.py mspecies.tests.test_forms

Scipion's configuration is made headless first (:func:`mspecies.scipion_env.configure_headless_scipion`: a fresh
user-data folder with ``hosts.conf``); variables already set win, as in a real Scipion.
"""

from __future__ import annotations

import pkgutil
import runpy
import sys
import tempfile

from mspecies.scipion_env import configure_headless_scipion

RUNNER = "pyworkflow.apps.pw_run_tests"


def package_test_modules() -> list[str]:
    """Dotted names of the package's test modules (``mspecies/tests/test*.py``, the runner's own pattern)."""
    import mspecies.tests

    return sorted(f"mspecies.tests.{module.name}" for module in pkgutil.iter_modules(mspecies.tests.__path__)
                  if module.name.startswith("test"))


def main(names: list[str]) -> None:
    """Configure headless Scipion, then hand the test names to Scipion's runner (it exits with the verdict)."""
    configure_headless_scipion(tempfile.mkdtemp(prefix="mspecies-scipion-tests-"))
    names = names or package_test_modules()
    print(f"Scipion's test runner ({RUNNER}) on {len(names)} module(s): {' '.join(names)}", flush=True)
    sys.argv = [RUNNER, *names]
    runpy.run_module(RUNNER, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
