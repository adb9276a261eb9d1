"""Locate RELION binaries for tests: skip with a printed reason where absent, fail in CI.

CI sets ``MSPECIES_REQUIRE_RELION=1`` (``.ci/run``), so a missing RELION there is an error and the
end-to-end checks against the real consumer can never silently vanish.
"""

import os
import shutil

import pytest


def require_relion(program: str = "relion_reconstruct") -> str:
    """Path of a RELION program, or skip (locally) / fail (CI) when it is not installed."""
    path = shutil.which(program)
    if path:
        return path
    reason = f"{program} not found on PATH (install RELION 3.1: apt-get install relion)"
    if os.environ.get("MSPECIES_REQUIRE_RELION") == "1":
        pytest.fail(reason + " — required because MSPECIES_REQUIRE_RELION=1")
    pytest.skip(reason)
