"""Locate RELION binaries for the pytest tests: one implementation, shared with the package's Scipion tests
(:func:`mspecies.tests.checks.require_relion`: skip with a printed reason where absent, fail in CI)."""

from mspecies.tests.checks import require_relion

__all__ = ["require_relion"]
