"""With scipion-em-reliontomo installed (the optional ``[reliontomo]`` extra): the RELION 5 particle series is also
registered as reliontomo's ``RelionSetOfPseudoSubtomograms``; reliontomo's refine protocol accepts it and
reliontomo's own converter writes from it a particles STAR that agrees with ours (positions, orientations, stacks,
visible frames). Skips, saying why, where reliontomo cannot be imported."""

import importlib
import tempfile
import unittest
from pathlib import Path

import numpy as np
from pyworkflow.tests import BaseTest

from mspecies.cli.workflow import launch
from mspecies.common.euler import euler_to_matrix
from mspecies.convert.reliontomo import reliontomo_missing
from mspecies.formats.star import read_star_blocks
from mspecies.protocols import ProtMSpeciesExportSubtomograms
from mspecies.protocols.protocol_export_subtomograms import MODE_SERIES, RELIONTOMO_OUTPUT
from mspecies.tests.checks import setup_synthetic_project

SYNTH = dict(seed=7, n_tomograms=1, n_particles=10, n_tilts=15, box_px=24, image_shape_yx=(192, 192),
             pixel_size_angst=4.0, thickness_angst=300.0, snr=None)

# pytest marks (conftest.py adds them; the package's tests never import pytest)
PYTEST_MARKS = ("scipion", "slow")


class TestReliontomoTakesTheParticleSeries(BaseTest):
    @classmethod
    def setUpClass(cls):
        reason = reliontomo_missing()
        if reason is not None:
            print(f"SKIPPED: {reason}")
            raise unittest.SkipTest(reason)
        setup_synthetic_project(cls, "mspecies-reliontomo-", **SYNTH)
        cls.prot = launch(cls.proj, ProtMSpeciesExportSubtomograms, "particle series for reliontomo",
                          inputParticles=cls.imported["coordinates"], inputTiltSeries=cls.imported["tilt_series"],
                          inputCtf=cls.imported["ctfs"], boxSize=24, particleDiameter=60.0, outputMode=MODE_SERIES)
        cls.output = getattr(cls.prot, RELIONTOMO_OUTPUT)

    def test_the_refine_form_accepts_the_set(self):
        objects, protocols = _reliontomo("objects"), _reliontomo("protocols")
        self.assertIsInstance(self.output, objects.RelionSetOfPseudoSubtomograms)
        self.assertEqual(self.output.getSize(), SYNTH["n_particles"])
        self.assertTrue(self.output.are2dStacks())
        refine = self.proj.newProtocol(protocols.ProtRelionRefineSubtomograms)
        accepted = [name.strip() for name in refine.getParam("inReParticles").pointerClass.get().split(",")]
        self.assertIn(type(self.output).__name__, accepted)
        refine.inReParticles.set(self.prot)
        refine.inReParticles.setExtended(RELIONTOMO_OUTPUT)
        self.assertEqual(refine.getInputParticles().getSize(), SYNTH["n_particles"])
        self.assertTrue(Path(self.proj.getPath(), refine.getInputParticles().filesMaster).is_file())

    def test_reliontomo_writes_the_particles_we_wrote(self):
        folder = Path(tempfile.mkdtemp(prefix="reliontomo-writer-"))
        _reliontomo("convert.convert50_tomo").Writer.pseudoSubtomograms2Star(self.output, str(folder))
        (star,) = folder.glob("*.star")
        theirs = read_star_blocks(star)["particles"].set_index("rlnTomoParticleName")
        extra = Path(self.proj.getPath(), self.prot._getExtraPath())
        ours = read_star_blocks(extra / "particles.star")["particles"]
        self.assertEqual(sorted(theirs.index), sorted(ours["rlnTomoParticleName"]))
        project = Path(self.proj.getPath())
        for row in ours.itertuples():
            other = theirs.loc[row.rlnTomoParticleName]
            for axis in "XYZ":
                self.assertAlmostEqual(float(getattr(other, f"rlnCenteredCoordinate{axis}Angst")),
                                       float(getattr(row, f"rlnCenteredCoordinate{axis}Angst")), places=3)
            self.assertTrue(np.allclose(_rotation(other), _rotation(row._asdict()), atol=1e-4), row.rlnTomoParticleName)
            self.assertEqual((project / str(other["rlnImageName"])).resolve(), (extra / row.rlnImageName).resolve())
            self.assertEqual(str(other["rlnTomoVisibleFrames"]).replace(" ", ""), row.rlnTomoVisibleFrames)


def _reliontomo(module: str):  # noqa: ANN202 (a module)
    """``reliontomo.<module>``, imported by name: reliontomo is an optional extra, absent from the environment
    that requirements.txt describes (which tests/test_layering.py checks static imports against); the tests that
    use it skip first where it is missing."""
    return importlib.import_module(f"reliontomo.{module}")


def _angle(row, name: str) -> float:
    value = row.get(name) if hasattr(row, "get") else None
    return 0.0 if value is None or value != value or str(value) == "None" else float(value)


def _rotation(row) -> np.ndarray:
    """RELION's particle → tomogram rotation A_sub · A_part (``particle_set.cpp:418-425``)."""
    sub = [_angle(row, f"rlnTomoSubtomogram{name}") for name in ("Rot", "Tilt", "Psi")]
    part = [_angle(row, f"rlnAngle{name}") for name in ("Rot", "Tilt", "Psi")]
    return euler_to_matrix(np.array(sub)) @ euler_to_matrix(np.array(part))
