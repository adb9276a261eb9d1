"""Shared assertions for the headless Scipion protocol tests."""


def registered_outputs(prot) -> list[str]:
    """Names of the outputs a protocol registered with ``_defineOutputs``.

    Reads the protocol's output list and looks for attributes named like its possible outputs.
    ``iterOutputAttributes()`` is not used: for a protocol without outputs pyworkflow falls back to an
    "any EMObject attribute is an output" scan whose result depends on what other tests imported.
    """
    names = [str(name) for name in prot._outputs]
    possible = prot.getPossibleOutputs() or {}
    keys = possible.keys() if isinstance(possible, dict) else [member.name for member in possible]
    return names + [key for key in keys if key not in names and getattr(prot, key, None) is not None]


def setup_synthetic_project(cls, prefix: str, **synth) -> None:
    """``setupTestProject`` + a synthetic dataset generated in a fresh temporary folder and imported.

    Sets ``cls.proj``, ``cls.tmp`` (the folder), ``cls.manifest_path``, ``cls.manifest`` and ``cls.imported``
    (:func:`mspecies.cli.workflow.import_synthetic_dataset`); ``synth`` goes to ``generate_dataset``.
    """
    import tempfile
    from pathlib import Path

    from pyworkflow.tests import setupTestProject

    from mspecies.cli.workflow import import_synthetic_dataset
    from mspecies.synth.dataset import generate_dataset
    from mspecies.synth.manifest import load_manifest

    setupTestProject(cls)
    cls.tmp = Path(tempfile.mkdtemp(prefix=prefix))
    cls.manifest_path = generate_dataset(cls.tmp / "data", **synth)
    cls.manifest = load_manifest(cls.manifest_path)
    cls.imported = import_synthetic_dataset(cls.proj, cls.manifest_path)


def require_relion(program: str = "relion_reconstruct") -> str:
    """Path of a RELION program; skip the test (``unittest.SkipTest``, which pytest honours too) when it is not
    on PATH, or fail when ``MSPECIES_REQUIRE_RELION=1`` (CI, ``.ci/run``), so that the checks against the real
    consumer of our STAR files can never silently vanish there."""
    import os
    import shutil
    import unittest

    path = shutil.which(program)
    if path:
        return path
    reason = f"{program} not found on PATH (install RELION 3.1: apt-get install relion)"
    if os.environ.get("MSPECIES_REQUIRE_RELION") == "1":
        raise AssertionError(reason + " — required because MSPECIES_REQUIRE_RELION=1")
    print(f"skipped: {reason}")
    raise unittest.SkipTest(reason)
