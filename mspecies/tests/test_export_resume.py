"""Headless Scipion project: an export whose second tilt series fails (its raw stack is truncated, as by an
unfinished copy) registers no output and keeps the first tilt series; after the stack is restored, Scipion's
"continue" mode exports only the second tilt series and registers the complete set; a file of the first one lost
afterwards makes the next "continue" export only the first one again."""

import shutil
from pathlib import Path

from pyworkflow.protocol.constants import MODE_RESUME
from pyworkflow.tests import BaseTest

from mspecies.cli.workflow import inside_project
from mspecies.protocols import ProtMSpeciesExportSubtomograms
from mspecies.protocols.protocol_export_subtomograms import DONE_JSON
from mspecies.tests.checks import registered_outputs, setup_synthetic_project

SYNTH = dict(seed=11, n_tomograms=2, n_particles=5, n_tilts=15, box_px=32, image_shape_yx=(256, 256),
             pixel_size_angst=4.0, thickness_angst=400.0, snr=None)

# pytest marks (conftest.py adds them; the package's tests never import pytest)
PYTEST_MARKS = ("scipion",)


def _truncate(path: Path, keep_bytes: int) -> bytes:
    """Cut a file to its first ``keep_bytes`` bytes (the MRC header stays readable); return the full content."""
    content = path.read_bytes()
    path.write_bytes(content[:keep_bytes])
    return content


class TestExportResume(BaseTest):
    """Failed run, then "continue" on the same protocol."""

    @classmethod
    def setUpClass(cls):
        setup_synthetic_project(cls, "mspecies-resume-", **SYNTH)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def _extra(self, prot, *parts: str) -> Path:
        return Path(self.proj.getPath()) / prot._getExtraPath(*parts)

    def _mtimes(self, prot, ts_id: str) -> dict[Path, int]:
        folder = self._extra(prot, ts_id)
        return {p: p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}

    def test_failed_tilt_series_is_redone_in_continue_mode(self):
        prot = self.proj.newProtocol(ProtMSpeciesExportSubtomograms, objLabel="export (TS_02 stack truncated)",
                                     inputParticles=self.imported["coordinates"],
                                     inputTiltSeries=self.imported["tilt_series"], inputCtf=self.imported["ctfs"],
                                     boxSize=32, particleDiameter=100.0, backend=1, numberOfThreads=1)
        stack = self.tmp / "data" / "TS_02" / "TS_02.mrc"
        content = _truncate(stack, stack.stat().st_size // 2)
        try:
            with inside_project(self.proj):
                self.proj.launchProtocol(prot, wait=True)
        finally:
            stack.write_bytes(content)
        self.assertTrue(prot.isFailed(), prot.getStatus())
        self.assertIn("TS_02: the export job did not export it", prot.getErrorMessage())
        self.assertIn("the worker exited with code 2", prot.getErrorMessage())
        self.assertEqual(registered_outputs(prot), [])
        self.assertFalse(self._extra(prot, "particles.star").exists())
        self.assertTrue(self._extra(prot, "TS_01", DONE_JSON).is_file())
        self.assertFalse(self._extra(prot, "TS_02", DONE_JSON).exists())
        first = self._mtimes(prot, "TS_01")
        self.assertEqual(sum(p.suffix == ".mrc" for p in first), 2 * SYNTH["n_particles"])

        prot.runMode.set(MODE_RESUME)
        with inside_project(self.proj):
            self.proj.launchProtocol(prot, wait=True)
        self.assertTrue(prot.isFinished(), f"{prot.getStatus()}: {prot.getErrorMessage()}")
        self.assertEqual(self._mtimes(prot, "TS_01"), first)
        second = {p: t for p, t in self._mtimes(prot, "TS_02").items()
                  if p.suffix == ".mrc" or p.name in (DONE_JSON, "particles.star")}
        self.assertIn(self._extra(prot, "TS_02", DONE_JSON), second)
        self.assertEqual(sum(p.suffix == ".mrc" for p in second), 2 * SYNTH["n_particles"])
        self.assertGreater(min(second.values()), max(first.values()))
        self.assertEqual(registered_outputs(prot), ["SubTomograms"])
        self.assertEqual(prot.SubTomograms.getSize(), SYNTH["n_tomograms"] * SYNTH["n_particles"])
        tomo_ids = {s.getCoordinate3D().getTomoId() for s in prot.SubTomograms.iterSubtomos()}
        self.assertEqual(tomo_ids, {"TS_01", "TS_02"})
        self.assertTrue(self._extra(prot, "particles.star").is_file())
        stderr = (Path(self.proj.getPath()) / prot.getLogPaths()[1]).read_text()
        self.assertNotIn("Circular reference", stderr)

        # A file of the finished TS_01 lost after the run: "continue" exports TS_01 again, and only TS_01.
        lost = next(p for p in self._mtimes(prot, "TS_01") if p.suffix == ".mrc")
        lost.unlink()
        kept = self._mtimes(prot, "TS_02")
        prot.runMode.set(MODE_RESUME)
        with inside_project(self.proj):
            self.proj.launchProtocol(prot, wait=True)
        self.assertTrue(prot.isFinished(), f"{prot.getStatus()}: {prot.getErrorMessage()}")
        self.assertTrue(lost.is_file())
        self.assertEqual(self._mtimes(prot, "TS_02"), kept)
        self.assertEqual(prot.SubTomograms.getSize(), SYNTH["n_tomograms"] * SYNTH["n_particles"])
