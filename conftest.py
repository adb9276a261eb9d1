"""Zero-configuration pytest for the Scipion tests (scipion_reference.md §6.3 item 6).

pyworkflow reads its configuration once, at import, so the headless environment (hosts.conf,
SCIPION_DOMAIN, SCIPION_PYTHON, SCIPION_USER_DATA, ...) is set here, before any test module
imports pyworkflow. Values already in the environment win.

The package's tests (``mspecies/tests``) also run under Scipion's own runner, which has no pytest: they name
their pytest marks in a plain ``PYTEST_MARKS`` tuple, added here.
"""

import tempfile

import pytest

from mspecies.scipion_env import configure_headless_scipion

configure_headless_scipion(tempfile.mkdtemp(prefix="mspecies-scipion-"))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test of a module with the marks its ``PYTEST_MARKS`` names (e.g. ``("scipion", "slow")``)."""
    for item in items:
        module = getattr(item, "module", None)
        for name in getattr(module, "PYTEST_MARKS", ()):
            item.add_marker(getattr(pytest.mark, name))
