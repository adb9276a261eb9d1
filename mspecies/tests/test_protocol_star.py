"""Headless Scipion: STAR (every dialect) → import protocol → Scipion sets → export protocol → STAR.

Ground truth: a synthetic dataset (2 tomograms × 8 particles) with random poses, random origins (shifts), half
sets and two user columns, written by the formats writers at the tilt-series pixel size (4 Å, unbinned tomogram
corner) while the tomograms are binned (16 Å) and the sub-tomograms use a third pixel size (8 Å). Checks:
positions (Å, 1e-3), rotation matrices (1e-6), Scipion matrices against poses.py and against the relion-plugin
``matrixFromGeometry(shifts, angles, inverseTransform=True)``, extra columns unchanged, RELION 3.1.3's
``relion_star_handler`` reading the 3.0 and 3.1 exports, and bad input ending in clear messages without output.
"""

import json
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
from pyworkflow.tests import BaseTest
from tomo.constants import TR_SCIPION

from mspecies.cli.workflow import inside_project, launch
from mspecies.common.types import Microscope, ParticlePoses
from mspecies.convert.particles import coordinates_to_poses, subtomograms_to_poses
from mspecies.convert.poses import relion_to_scipion_matrix
from mspecies.convert.star_sets import CTF_ATTR, EXTRAS_ATTR, SUBSET_ATTR, TomogramInfo, shape_at_pixel
from mspecies.core.geometry import euler_to_matrix
from mspecies.formats.mrc import write_mrc
from mspecies.formats.star import read_star_text, write_star_text
from mspecies.formats.star_dialects import Dialect, ParticleTable, particle_block_name, read_particle_star
from mspecies.formats.star_write import write_particle_star
from mspecies.protocols import ProtMSpeciesExportParticlesStar, ProtMSpeciesImportParticlesStar
from mspecies.protocols.protocol_export_star import EXPORT_DIALECTS
from mspecies.protocols.protocol_import_star import DIALECT_CHOICES, IMPORT_COORDINATES
from mspecies.synth.manifest import manifest_particles
from mspecies.tests.checks import registered_outputs, require_relion, setup_synthetic_project

# pytest marks (conftest.py adds them; the package's tests never import pytest)
PYTEST_MARKS = ("scipion",)
SYNTH = dict(seed=3, n_tomograms=2, n_particles=8, n_tilts=21, box_px=32, image_shape_yx=(256, 256),
             pixel_size_angst=4.0, thickness_angst=600.0)
STAR_PIXEL = 4.0  # Å/px of the STAR coordinates (tilt-series pixel size, unbinned tomogram)
IMAGE_PIXEL = 8.0  # Å/px of the sub-tomograms
UNBINNED = (256, 256, 150)  # unbinned tomogram size (px at STAR_PIXEL)
MICROSCOPE = Microscope(300.0, 2.7, 0.1)
USER_COLUMNS = ("rlnClassNumber", "mspeciesTag")
STAR_NAMES = {"3.0": "tomograms/{}_bin4.mrc", "warp3d": "{}.tomostar", "warp": "{}.tomostar"}


def random_rotations(n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 3) RELION Euler angles (deg), uniform on SO(3), away from gimbal lock."""
    tilt = np.rad2deg(np.arccos(rng.uniform(-0.98, 0.98, n)))
    return np.stack([rng.uniform(-180, 180, n), tilt, rng.uniform(-180, 180, n)], axis=1)


def truth_table(truth: ParticlePoses, rng: np.random.Generator, dialect: str, image_names=None,
                ctf_names=None) -> ParticleTable:
    """Ground-truth positions with random poses, origins (±25 Å), half sets and two user columns."""
    n = len(truth)
    pattern = STAR_NAMES.get(dialect, "{}")
    names = np.array([pattern.format(t) for t in truth.tomo_names], dtype=object)
    extras = pd.DataFrame({"rlnClassNumber": [str(k % 3 + 1) for k in range(n)],
                           "mspeciesTag": [f"particle_{k:03d}" for k in range(n)]})
    return ParticleTable(
        poses=ParticlePoses(truth.positions_angst, random_rotations(n, rng), names), dialect=Dialect(dialect),
        origins_angst=rng.uniform(-25, 25, (n, 3)), origin_units="angst",
        coord_pixel_size_angst=np.full(n, STAR_PIXEL),
        image_pixel_size_angst=None if image_names is None else np.full(n, IMAGE_PIXEL),
        tomo_shape_px={str(name): UNBINNED for name in set(names)}, random_subset=np.arange(n) % 2 + 1,
        image_names=image_names, ctf_image_names=ctf_names, source_hashes=None, has_angles=True, optics=None,
        optics_group=None, general=None, extras=extras, column_order=(), source_row=np.arange(n))


def matrix_from_geometry(shifts_px: np.ndarray, angles_deg: np.ndarray) -> np.ndarray:
    """scipion-em-relion ``matrixFromGeometry(shifts, angles, inverseTransform=True)`` (convert_deprecated.py)."""
    from pwem.convert.transformations import euler_matrix

    rad = -np.deg2rad(angles_deg)
    matrix = euler_matrix(rad[0], rad[1], rad[2], "szyz")
    matrix[:3, 3] = -np.asarray(shifts_px)
    return np.linalg.inv(matrix)


class TestStarRoundTrip(BaseTest):
    """Every dialect imported as coordinates, a RELION 3.1 STAR with images as sub-tomograms, exported back."""

    @classmethod
    def setUpClass(cls):
        setup_synthetic_project(cls, "mspecies-star-", **SYNTH)
        cls.root = cls.tmp
        cls.truth = manifest_particles(cls.manifest)
        cls.tomograms = cls.imported["tomograms"]
        sr = cls.tomograms.getSamplingRate()
        cls.tomo_info = {t.getTsId(): TomogramInfo(tuple(t.getDim()), sr) for t in cls.tomograms.iterItems()}
        rng = np.random.default_rng(11)
        cls.tables, cls.coord_prots = {}, {}
        for dialect in ("3.0", "3.1", "4", "5", "warp3d", "warp"):
            table = truth_table(cls.truth, rng, dialect)
            path = write_particle_star(table, cls.root / f"in_{dialect}.star", dialect, microscope=MICROSCOPE)
            # M species tables have no shift columns: the writer folds the origins into the coordinates
            cls.tables[dialect] = table if dialect != "warp" else \
                replace(table, origins_angst=np.zeros((len(table), 3)))
            cls.coord_prots[dialect] = launch(
                cls.proj, ProtMSpeciesImportParticlesStar, f"import STAR {dialect}", starFile=str(path),
                inputTomograms=cls.tomograms, dialect=DIALECT_CHOICES.index(dialect), importAs=IMPORT_COORDINATES,
                tomoSize=" ".join(map(str, UNBINNED)), coordPixelSize=STAR_PIXEL if dialect == "warp" else None,
                boxSize=8)
        cls.subtomo_table, cls.subtomo_prot = cls._importSubtomograms(rng)

    @classmethod
    def _importSubtomograms(cls, rng):
        folder = cls.root / "subtomos"
        folder.mkdir()
        n = len(cls.truth)
        for k in range(n):
            write_mrc(folder / f"p{k:03d}.mrc", np.full((8, 8, 8), k, dtype=np.float32), IMAGE_PIXEL)
            write_mrc(folder / f"p{k:03d}_ctf.mrc", np.ones((8, 8, 5), dtype=np.float32), IMAGE_PIXEL)
        images = np.array([f"subtomos/p{k:03d}.mrc" for k in range(n)], dtype=object)
        ctfs = np.array([f"subtomos/p{k:03d}_ctf.mrc" for k in range(n)], dtype=object)
        table = truth_table(cls.truth, rng, "3.1", images, ctfs)
        path = write_particle_star(table, cls.root / "subtomos_3.1.star", "3.1", microscope=MICROSCOPE)
        prot = launch(cls.proj, ProtMSpeciesImportParticlesStar, "import STAR sub-tomograms", starFile=str(path),
                      inputTomograms=cls.tomograms, tomoSize=" ".join(map(str, UNBINNED)), boxSize=8)
        return table, prot

    # --- helpers ---------------------------------------------------------------------------------------------------
    def assertPoses(self, got: ParticlePoses, table: ParticleTable, label: str):
        error = np.abs(got.positions_angst - table.poses.positions_angst).max()
        rot_error = np.abs(euler_to_matrix(got.euler_zyz_deg) - euler_to_matrix(table.poses.euler_zyz_deg)).max()
        print(f"{label}: max position error {error:.2e} Å, max rotation-matrix error {rot_error:.2e}")
        self.assertLessEqual(error, 1e-3, label)
        self.assertLessEqual(rot_error, 1e-6, label)

    def _export(self, particles, dialect: Dialect, label: str):
        prot = launch(self.proj, ProtMSpeciesExportParticlesStar, label, inputParticles=particles,
                      outputDialect=EXPORT_DIALECTS.index(dialect))
        return prot, Path(prot.starPath.get())

    def _readExport(self, path: Path, pixel: float, dialect: Dialect) -> ParticleTable:
        """Read an export back with the tomogram sizes the exporter used (tomograms rescaled to ``pixel``)."""
        shapes = {}
        for ts_id, info in self.tomo_info.items():
            shapes[ts_id] = shapes[f"{ts_id}.tomostar"] = shape_at_pixel(info, pixel)
        return read_particle_star(path, dialect, tomo_shape_px=shapes,
                                  coord_pixel_size_angst=pixel if dialect == Dialect.M_SPECIES else None)

    def assertExported(self, got: ParticleTable, table: ParticleTable, label: str, origins: bool = True):
        self.assertPoses(got.poses, table, label)
        if origins:
            np.testing.assert_allclose(got.origins_angst, table.origins_angst, atol=1e-3, err_msg=label)
        for column in USER_COLUMNS:
            self.assertEqual(list(got.extras[column]), list(table.extras[column]), f"{label}: {column}")
        np.testing.assert_array_equal(got.random_subset, table.random_subset, err_msg=label)
        self.assertEqual([n.split(".")[0] for n in got.poses.tomo_names],
                         [str(n) for n in self.truth.tomo_names], label)

    # --- tests -----------------------------------------------------------------------------------------------------
    def test_coordinates_every_dialect(self):
        for dialect, prot in self.coord_prots.items():
            coords, table = prot.Coordinates3D, self.tables[dialect]
            self.assertEqual(coords.getSize(), len(table), dialect)
            self.assertAlmostEqual(coords.getSamplingRate(), self.tomograms.getSamplingRate())
            self.assertPoses(coordinates_to_poses(coords), table, f"import {dialect}")
            sr = coords.getSamplingRate()
            items = [c.clone() for c in coords.iterCoordinates()]
            for k, coord in enumerate(items):
                expected = relion_to_scipion_matrix(table.poses.euler_zyz_deg[k], table.origins_angst[k], sr)
                np.testing.assert_allclose(coord.getMatrix(convention=TR_SCIPION), expected, atol=1e-6)
                np.testing.assert_allclose(expected, matrix_from_geometry(table.origins_angst[k] / sr,
                                                                          table.poses.euler_zyz_deg[k]), atol=1e-6)
                extras = json.loads(getattr(coord, EXTRAS_ATTR).get())
                self.assertEqual([extras[c] for c in USER_COLUMNS], [table.extras[c][k] for c in USER_COLUMNS])
                self.assertEqual(getattr(coord, SUBSET_ATTR).get(), table.random_subset[k])
            self.assertEqual([c.getTomoId() for c in items], [str(t) for t in self.truth.tomo_names])
            self.assertIn("linked", "\n".join(prot.summary()))

    def test_coordinates_export_same_and_other_dialects(self):
        for dialect, prot in self.coord_prots.items():
            targets = {Dialect(dialect) if dialect != "warp3d" else Dialect.RELION30, Dialect.RELION31}
            for target in sorted(targets):
                export, path = self._export(prot.Coordinates3D, target, f"export {dialect} as {target}")
                got = self._readExport(path, self.tomograms.getSamplingRate(), target)
                self.assertExported(got, self.tables[dialect], f"{dialect} -> {target}",
                                    origins=target != Dialect.M_SPECIES)
                self.assertIn(str(path), "\n".join(export.summary()))

    def test_subtomograms(self):
        prot, table = self.subtomo_prot, self.subtomo_table
        subtomos = prot.SubTomograms
        self.assertEqual(subtomos.getSize(), len(table))
        self.assertAlmostEqual(subtomos.getSamplingRate(), IMAGE_PIXEL)
        self.assertPoses(subtomograms_to_poses(subtomos), table, "import sub-tomograms")
        for k, subtomo in enumerate(s.clone() for s in subtomos.iterSubtomos()):
            matrix = subtomo.getTransform(convention=TR_SCIPION).getMatrix()
            expected = relion_to_scipion_matrix(table.poses.euler_zyz_deg[k], table.origins_angst[k], IMAGE_PIXEL)
            np.testing.assert_allclose(matrix, expected, atol=1e-6)
            np.testing.assert_allclose(matrix, matrix_from_geometry(table.origins_angst[k] / IMAGE_PIXEL,
                                                                    table.poses.euler_zyz_deg[k]), atol=1e-6)
            self.assertEqual(Path(subtomo.getFileName()), self.root / table.image_names[k])
            self.assertEqual(Path(getattr(subtomo, CTF_ATTR).get()), self.root / table.ctf_image_names[k])
            self.assertEqual(subtomo.getCoordinate3D().getTomoId(), self.truth.tomo_names[k])
        for target in EXPORT_DIALECTS:
            _, path = self._export(subtomos, target, f"export sub-tomograms as {target}")
            pixel = IMAGE_PIXEL if target == Dialect.RELION30 else self.tomograms.getSamplingRate()
            got = self._readExport(path, pixel, target)
            self.assertExported(got, table, f"sub-tomograms -> {target}", origins=target != Dialect.M_SPECIES)
            if target != Dialect.M_SPECIES:
                self.assertEqual([Path(n) for n in got.image_names], [self.root / n for n in table.image_names])
                self.assertEqual([Path(n) for n in got.ctf_image_names],
                                 [self.root / n for n in table.ctf_image_names])

    def test_relion_reads_exports(self):
        handler = require_relion("relion_star_handler")
        n = len(self.truth)
        for target, sources in ((Dialect.RELION31, ("3.1", "4")), (Dialect.RELION30, ("3.0", "warp3d"))):
            paths = [self._export(self.coord_prots[s].Coordinates3D, target, f"relion {s} as {target}")[1]
                     for s in sources]
            out = self.root / f"combined_{target}.star"
            result = subprocess.run([handler, "--combine", "--i", " ".join(map(str, paths)), "--o", str(out)],
                                    capture_output=True, text=True, timeout=60)
            self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
            blocks, _ = read_star_text(out)
            self.assertIn("optics", blocks)
            # without rlnImageName RELION 3.1 calls the table data_micrographs (3.0 input) or data_particles
            rows = blocks[particle_block_name(blocks)].table
            self.assertEqual(len(rows), 2 * n, f"{target}: {result.stdout}")


class TestStarBadInput(BaseTest):
    """Ambiguous names, missing pixel size, partial angles, non-numeric values → message, no output."""

    @classmethod
    def setUpClass(cls):
        setup_synthetic_project(cls, "mspecies-star-bad-", **{**SYNTH, "n_tomograms": 1, "n_particles": 4})
        cls.root = cls.tmp
        cls.truth = manifest_particles(cls.manifest)
        cls.tomograms = cls.imported["tomograms"]
        cls.good = write_particle_star(truth_table(cls.truth, np.random.default_rng(1), "3.1"),
                                       cls.root / "good.star", "3.1", microscope=MICROSCOPE)

    def _edited(self, name: str, edit) -> Path:
        blocks, comments = read_star_text(self.good)
        edit(blocks["particles"].table)
        return write_star_text(self.root / name, list(blocks.values()), comments)

    def _newImport(self, path: Path, **extra):
        return self.newProtocol(ProtMSpeciesImportParticlesStar, starFile=str(path), inputTomograms=self.tomograms,
                                tomoSize=" ".join(map(str, UNBINNED)), **extra)

    def _expectFailure(self, prot, *needles):
        text = "\n".join(prot.validate())
        for needle in needles:
            self.assertIn(needle, text)
        with inside_project(self.proj):
            self.proj.launchProtocol(prot, wait=True)
        self.assertTrue(prot.isFailed(), f"protocol status {prot.getStatus()}")
        self.assertIn(needles[0], prot.getErrorMessage())
        self.assertEqual(registered_outputs(prot), [])

    def test_ambiguous_names(self):
        def edit(table):
            table["rlnMicrographName"] = ["TS_01.mrc", "TS_01.tomostar"] * (len(table) // 2)
        self._expectFailure(self._newImport(self._edited("dup.star", edit)), "duplicated", "TS_01.tomostar")

    def test_missing_pixel_size(self):
        table = truth_table(self.truth, np.random.default_rng(2), "warp")
        path = write_particle_star(table, self.root / "m.star", "warp")
        self._expectFailure(self._newImport(path), "coordinate pixel size is missing")

    def test_bad_pixel_size_param(self):
        path = write_particle_star(truth_table(self.truth, np.random.default_rng(2), "warp"), self.root / "m2.star",
                                   "warp")
        self._expectFailure(self._newImport(path, coordPixelSize=-1.0), "must be > 0")

    def test_partial_angles(self):
        self._expectFailure(self._newImport(self._edited("psi.star", lambda t: t.drop(columns=["rlnAnglePsi"],
                                                                                      inplace=True))),
                            "rlnAnglePsi", "rlnAngleRot")

    def test_non_numeric(self):
        def edit(table):
            table.loc[2, "rlnCoordinateX"] = "abc"
        self._expectFailure(self._newImport(self._edited("nan.star", edit)), "column rlnCoordinateX, row 3", "abc")

    def test_unmatched_rows_skipped(self):
        def edit(table):
            table.loc[0, "rlnMicrographName"] = "TS_99"
        prot = self._newImport(self._edited("extra_tomo.star", edit))
        self.assertEqual(prot.validate(), [])
        self.assertTrue(any("TS_99" in w for w in prot.warnings()))
        with inside_project(self.proj):
            self.proj.launchProtocol(prot, wait=True)
        self.assertTrue(prot.isFinished(), prot.getErrorMessage())
        self.assertEqual(prot.Coordinates3D.getSize(), len(self.truth) - 1)
        self.assertIn("skipped", "\n".join(prot.summary()))

    def test_missing_file(self):
        self._expectFailure(self._newImport(self.root / "nope.star"), "file not found")
