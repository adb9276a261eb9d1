"""Headless Scipion project: import a synthetic dataset, check every value against the manifest, project
coordinates with tomo's ``ProtProjectCoordinates`` and compare with :func:`project_positions_to_tilts`,
and check that bad input ends in clear messages with no output registered.
"""


import numpy as np
from pyworkflow.tests import BaseTest
from tomo.constants import SCIPION
from tomo.protocols import ProtProjectCoordinates

from mspecies.cli.workflow import inside_project
from mspecies.common.types import InputError
from mspecies.convert.particles import coordinates_to_poses
from mspecies.convert.tilt_series import tilt_series_set_to_data
from mspecies.core.geometry import euler_to_matrix, project_positions_to_tilts
from mspecies.protocols import ProtMSpeciesImportParticlesStar, ProtMSpeciesImportTsAlignment
from mspecies.synth.manifest import manifest_particles, manifest_tilt_series
from mspecies.tests.checks import registered_outputs, setup_synthetic_project

# pytest marks (conftest.py adds them; the package's tests never import pytest)
PYTEST_MARKS = ("scipion",)
SYNTH = dict(seed=0, n_tomograms=2, n_particles=8, n_tilts=21, box_px=32, image_shape_yx=(256, 256),
             pixel_size_angst=4.0, thickness_angst=600.0)
MAX_PROJECTION_DIFF_PX = 0.01


def _landmarks(landmark_model) -> np.ndarray:
    """(rows, 4) x, y, tiltIm (1-based stack index), chainId from a LandmarkModel's .sfid table."""
    return np.array([[float(v) for v in row[:4]] for row in landmark_model.retrieveInfoTable()])


class TestImportSynthetic(BaseTest):
    """Import → compare with ground truth → projection proof against scipion-em-tomo."""

    @classmethod
    def setUpClass(cls):
        setup_synthetic_project(cls, "mspecies-synth-", **SYNTH)
        cls.data = tilt_series_set_to_data(cls.imported["tilt_series"], cls.imported["ctfs"])

    def test_tilt_series_match_manifest(self):
        self.assertEqual(sorted(self.data), ["TS_01", "TS_02"])
        for ts_id, got in self.data.items():
            truth = manifest_tilt_series(self.manifest, ts_id)
            self.assertAlmostEqual(got.pixel_size_angst, truth.pixel_size_angst, places=6)
            self.assertEqual(got.image_shape_yx, truth.image_shape_yx)
            np.testing.assert_allclose(got.tilt_angles_deg, truth.tilt_angles_deg, atol=1e-3)
            np.testing.assert_array_equal(got.acquisition_order, truth.acquisition_order)
            np.testing.assert_allclose(got.dose_e_per_angst2, truth.dose_e_per_angst2, atol=1e-3)
            np.testing.assert_allclose(got.xf[:, :, :2], truth.xf[:, :, :2], atol=1e-6)
            np.testing.assert_allclose(got.xf[:, :, 2], truth.xf[:, :, 2], atol=5.1e-4)  # .xf shifts: 3 decimals
            np.testing.assert_array_equal(got.excluded, truth.excluded)
            self.assertAlmostEqual(got.microscope.voltage_kv, truth.microscope.voltage_kv)
            self.assertAlmostEqual(got.microscope.cs_mm, truth.microscope.cs_mm)
            self.assertAlmostEqual(got.microscope.amplitude_contrast, truth.microscope.amplitude_contrast)

    def test_ctf_match_manifest(self):
        for ts_id, got in self.data.items():
            truth = manifest_tilt_series(self.manifest, ts_id)
            np.testing.assert_allclose(got.defocus_u_angst, truth.defocus_u_angst, atol=0.6)
            np.testing.assert_allclose(got.defocus_v_angst, truth.defocus_v_angst, atol=0.6)
            np.testing.assert_allclose(got.defocus_angle_deg, truth.defocus_angle_deg, atol=0.01)

    def test_tomograms_match_manifest(self):
        entries = {e["ts_id"]: e for e in self.manifest["tilt_series"]}
        for tomo in self.imported["tomograms"].iterItems():
            entry = entries[tomo.getTsId()]
            self.assertAlmostEqual(tomo.getSamplingRate(), entry["tomogram_pixel_size_angst"], places=6)
            self.assertEqual(tuple(tomo.getDim()), tuple(entry["tomogram_shape_zyx"][::-1]))

    def test_particles_match_manifest(self):
        got, truth = coordinates_to_poses(self.imported["coordinates"]), manifest_particles(self.manifest)
        self.assertEqual(len(got), len(truth))
        for name in set(truth.tomo_names):
            g, t = got.subset(got.tomo_names == name), truth.subset(truth.tomo_names == name)
            order_g = np.lexsort(g.positions_angst.T)
            order_t = np.lexsort(t.positions_angst.T)
            np.testing.assert_allclose(g.positions_angst[order_g], t.positions_angst[order_t], atol=1e-3)
            np.testing.assert_allclose(euler_to_matrix(g.euler_zyz_deg[order_g]),
                                       euler_to_matrix(t.euler_zyz_deg[order_t]), atol=1e-6)

    def test_projection_matches_tomo(self):
        prot = self.newProtocol(ProtProjectCoordinates, objLabel="tomo project coordinates",
                                inputCoordinates=self.imported["coordinates"],
                                inputTiltSeries=self.imported["tilt_series"])
        self.launchProtocol(prot)
        poses = coordinates_to_poses(self.imported["coordinates"])
        coords = {c.getObjId(): c.clone() for c in self.imported["coordinates"].iterCoordinates()}
        sr = self.imported["coordinates"].getSamplingRate()
        worst = 0.0
        for model in prot.landmarkModels.iterItems():
            table = _landmarks(model)
            ts = self.data[model.getTsId()]
            chain_ids = np.unique(table[:, 3]).astype(int)
            positions = np.array([np.array(coords[i].getPosition(SCIPION)) * sr for i in chain_ids])
            raw_px, _ = project_positions_to_tilts(positions, ts)
            for row in table:
                n, t = int(np.where(chain_ids == int(row[3]))[0][0]), int(row[2]) - 1
                worst = max(worst, float(np.abs(raw_px[n, t] - row[:2]).max()))
        print(f"max |tomo ProtProjectCoordinates - project_positions_to_tilts| = {worst:.2e} px")
        self.assertGreater(len(poses), 0)
        self.assertLessEqual(worst, MAX_PROJECTION_DIFF_PX)


class TestImportBadInput(BaseTest):
    """Missing file, tilt-count mismatch, missing pixel size → clear message, nothing registered."""

    @classmethod
    def setUpClass(cls):
        setup_synthetic_project(cls, "mspecies-bad-", **{**SYNTH, "n_tomograms": 1, "n_particles": 2})
        cls.root = cls.manifest_path.parent  # the dataset folder, where the bad files are written

    def _expectFailure(self, prot, *needles):
        errors = prot.validate()
        text = "\n".join(errors)
        for needle in needles:
            self.assertIn(needle, text)
        with inside_project(self.proj):
            self.proj.launchProtocol(prot, wait=True)  # launching does not validate: the step must fail
        self.assertTrue(prot.isFailed(), f"protocol status {prot.getStatus()}")
        for needle in needles[:1]:
            self.assertIn(needle, prot.getErrorMessage())
        self.assertEqual(registered_outputs(prot), [])

    def test_missing_xf(self):
        prot = self.newProtocol(ProtMSpeciesImportTsAlignment, inputSetOfTiltSeries=self.imported["tilt_series"],
                                filesPath=str(self.root), filesPattern="{TS}/{TS}_missing.xf")
        self._expectFailure(prot, "TS_01_missing.xf", "not found")

    def test_xf_tilt_count_differs(self):
        bad = self.root / "TS_01" / "TS_01_short.xf"
        bad.write_text("\n".join((self.root / "TS_01" / "TS_01.xf").read_text().splitlines()[:-2]) + "\n")
        prot = self.newProtocol(ProtMSpeciesImportTsAlignment, inputSetOfTiltSeries=self.imported["tilt_series"],
                                filesPath=str(self.root), filesPattern="{TS}/{TS}_short.xf")
        self._expectFailure(prot, "TS_01_short.xf", "19 tilts in the file", "21 tilt images")

    def test_star_without_pixel_size(self):
        import starfile

        blocks = starfile.read(self.root / "particles.star", always_dict=True)
        bad = self.root / "no_pixel.star"
        starfile.write({"particles": blocks["particles"].drop(columns=["rlnOpticsGroup"])}, bad, overwrite=True)
        prot = self.newProtocol(ProtMSpeciesImportParticlesStar, inputTomograms=self.imported["tomograms"],
                                starFile=str(bad))
        self._expectFailure(prot, "no_pixel.star", "coordinate pixel size is missing", "rlnTomoTiltSeriesPixelSize")

    def test_bridge_rejects_tilt_series_without_alignment(self):
        with inside_project(self.proj), self.assertRaisesRegex(InputError, "TS_01: it has no alignment"):
            tilt_series_set_to_data(self.imported["prot_ts"].TiltSeries, self.imported["ctfs"])

    def test_bridge_rejects_tilt_series_without_ctf(self):
        with inside_project(self.proj), self.assertRaisesRegex(InputError, "TS_01: no CTF estimation"):
            tilt_series_set_to_data(self.imported["tilt_series"], None)
