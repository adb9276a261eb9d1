"""Headless Scipion project: the intersect protocol against a derived STAR (jittered, dropped, added particles,
``.tomostar`` names), against the dataset's own RELION 3.1 STAR and against a Scipion set; outputs, distances,
viewer and validation messages."""

import os
from pathlib import Path

import numpy as np
import pandas as pd
from pyworkflow.plugin import Domain
from pyworkflow.tests import BaseTest
from tomo.objects import Coordinate3D, SetOfCoordinates3D, SetOfSubTomograms

from mspecies.cli.workflow import launch
from mspecies.convert.particles import coordinates_to_poses, subtomograms_to_poses
from mspecies.formats.mrc import write_mrc
from mspecies.formats.star import StarBlock, write_star_text
from mspecies.protocols import ProtMSpeciesImportParticlesStar, ProtMSpeciesIntersect
from mspecies.protocols.protocol_intersect import ANGLE_ATTR, DISTANCE_ATTR, SOURCE_SCIPION, SOURCE_STAR
from mspecies.synth.manifest import manifest_particles
from mspecies.tests.checks import setup_synthetic_project
from mspecies.viewers import MSpeciesIntersectViewer

# pytest marks (conftest.py adds them; the package's tests never import pytest)
PYTEST_MARKS = ("scipion",)
SYNTH = dict(seed=3, n_tomograms=2, n_particles=10, n_tilts=21, box_px=32, image_shape_yx=(256, 256),
             pixel_size_angst=4.0, thickness_angst=600.0)
JITTER_ANGST = 3.0
TOLERANCE_ANGST = 10.0


def write_relion5_star(path: Path, positions_angst: np.ndarray, names: np.ndarray, euler: np.ndarray,
                       origins_angst: np.ndarray | None = None, images: list[str] | None = None) -> None:
    """RELION 5 particle STAR (centred Å coordinates = position + origin, optics with the tilt-series pixel size),
    optionally with shifts (rlnOrigin*Angst) and sub-tomogram images (rlnImageName)."""
    origins = np.zeros_like(positions_angst) if origins_angst is None else origins_angst
    frame = {"rlnTomoName": names,
             **{f"rlnCenteredCoordinate{a}Angst": (positions_angst + origins)[:, k] for k, a in enumerate("XYZ")},
             "rlnAngleRot": euler[:, 0], "rlnAngleTilt": euler[:, 1], "rlnAnglePsi": euler[:, 2],
             "rlnOpticsGroup": np.ones(len(names), dtype=int)}
    if origins_angst is not None:
        frame |= {f"rlnOrigin{a}Angst": origins[:, k] for k, a in enumerate("XYZ")}
    if images is not None:
        frame["rlnImageName"] = np.asarray(images, dtype=object)
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"],
                           "rlnTomoTiltSeriesPixelSize": [SYNTH["pixel_size_angst"]],
                           "rlnImagePixelSize": [SYNTH["pixel_size_angst"]], "rlnVoltage": [300.0],
                           "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.07],
                           "rlnImageDimensionality": [3]})
    write_star_text(path, [StarBlock("optics", optics), StarBlock("particles", pd.DataFrame(frame))],
                    ["Relion star file version 50001"])


def far_points(positions_angst: np.ndarray, rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` points inside the synthetic slab, more than 5 x the tolerance away from every particle."""
    half = np.array([SYNTH["image_shape_yx"][1], SYNTH["image_shape_yx"][0], 0]) * SYNTH["pixel_size_angst"] / 2
    half[2] = SYNTH["thickness_angst"] / 4
    out: list[np.ndarray] = []
    while len(out) < n:
        candidate = rng.uniform(-0.8, 0.8, 3) * half
        others = np.vstack([positions_angst, *out]) if out else positions_angst
        if np.linalg.norm(others - candidate, axis=1).min() > 5 * TOLERANCE_ANGST:
            out.append(candidate)
    return np.array(out)


def item_positions_angst(output) -> dict[int, np.ndarray]:
    """{objId: centred position (Å)} of a SetOfCoordinates3D."""
    poses = coordinates_to_poses(output)
    ids = [c.getObjId() for c in output.iterCoordinates()]
    return dict(zip(ids, poses.positions_angst))


class TestIntersectProtocol(BaseTest):
    """One synthetic import, three intersect runs (STAR 5 derived, STAR 3.1 original, Scipion set)."""

    @classmethod
    def setUpClass(cls):
        setup_synthetic_project(cls, "mspecies-intersect-", **SYNTH)
        cls.coords = cls.imported["coordinates"]
        cls.truth = manifest_particles(cls.manifest)
        cls._deriveStar()
        cls.protStar = launch(cls.proj, ProtMSpeciesIntersect, "intersect vs derived STAR", inputOld=cls.coords,
                              newSource=SOURCE_STAR, newStarFile=str(cls.derived_star), tolerance=TOLERANCE_ANGST,
                              keepOnlyOld=True, keepInBoth=False, keepOnlyNew=True)
        cls.protSelf = launch(cls.proj, ProtMSpeciesIntersect, "self intersect", inputOld=cls.coords,
                              newSource=SOURCE_SCIPION, inputNew=cls.coords, tolerance=1.0)

    @classmethod
    def _deriveStar(cls):
        """New set: drop 2 particles per tomogram, jitter 3 per tomogram by 3 Å, add 1 far particle per tomogram,
        tomogram names with a ``.tomostar`` suffix."""
        rng = np.random.default_rng(7)
        names = cls.truth.tomo_names.astype(str)
        n = SYNTH["n_particles"]
        cls.dropped = np.array([0, 1, n, n + 1])
        cls.jittered = np.array([2, 3, 4, n + 2, n + 3, n + 4])
        kept = np.setdiff1d(np.arange(len(names)), cls.dropped)
        positions = cls.truth.positions_angst.copy()
        direction = rng.normal(size=(cls.jittered.size, 3))
        positions[cls.jittered] += JITTER_ANGST * direction / np.linalg.norm(direction, axis=1, keepdims=True)
        cls.added = {ts: far_points(cls.truth.positions_angst[names == ts], rng, 1) for ts in ("TS_01", "TS_02")}
        added_positions = np.vstack(list(cls.added.values()))
        new_positions = np.vstack([positions[kept], added_positions])
        new_names = np.concatenate([names[kept], list(cls.added)]).astype(object) + ".tomostar"
        euler = np.vstack([cls.truth.euler_zyz_deg[kept], np.zeros((2, 3))])
        cls.derived_star = cls.tmp / "derived.star"
        write_relion5_star(cls.derived_star, new_positions, new_names, euler)
        cls.derived = (new_positions, new_names, euler, kept)

    def test_star_counts_and_union(self):
        prot = self.protStar
        sizes = {name: getattr(prot, name).getSize() for name in ("onlyOld", "inBoth", "onlyNew", "selected")}
        self.assertEqual(sizes, {"onlyOld": 4, "inBoth": 16, "onlyNew": 2, "selected": 6})
        for name in ("onlyOld", "inBoth", "onlyNew", "selected"):
            self.assertIsInstance(getattr(prot, name), SetOfCoordinates3D)
            self.assertIsInstance(getattr(prot, name).getFirstItem(), Coordinate3D)
        old_ids = [c.getObjId() for c in self.coords.iterCoordinates()]
        only_old = [c.getObjId() for c in prot.onlyOld.iterCoordinates()]
        self.assertEqual(sorted(only_old), sorted(np.asarray(old_ids)[self.dropped].tolist()))
        selected_positions = np.array(list(item_positions_angst(prot.selected).values()))
        self.assertEqual(len(selected_positions), 6)
        self.assertEqual(set(prot.selected.getTSIds()), {"TS_01", "TS_02"})

    def test_in_both_keeps_old_poses_and_distances(self):
        old = item_positions_angst(self.coords)
        old_poses = coordinates_to_poses(self.coords)
        in_both = self.protStar.inBoth
        for coord in in_both.iterCoordinates():
            distance = getattr(coord, DISTANCE_ATTR).get()
            self.assertGreaterEqual(distance, 0.0)
            self.assertLessEqual(distance, JITTER_ANGST + 1e-3)
        got = item_positions_angst(in_both)
        for obj_id, position in got.items():
            np.testing.assert_allclose(position, old[obj_id], atol=1e-6)
        got_euler = coordinates_to_poses(in_both).euler_zyz_deg
        old_ids = [c.getObjId() for c in self.coords.iterCoordinates()]
        rows = [old_ids.index(i) for i in got]
        np.testing.assert_allclose(got_euler, old_poses.euler_zyz_deg[rows], atol=1e-6)
        distances = sorted(getattr(c, DISTANCE_ATTR).get() for c in in_both.iterCoordinates())
        self.assertEqual(sum(d > 1.0 for d in distances), self.jittered.size)  # jittered by 3 Å, others ~0

    def test_only_new_built_on_old_tomograms(self):
        only_new = self.protStar.onlyNew
        for coord in only_new.iterCoordinates():
            self.assertEqual(getattr(coord, DISTANCE_ATTR).get(), -1.0)
        poses = coordinates_to_poses(only_new)
        for ts, position in self.added.items():
            np.testing.assert_allclose(poses.positions_angst[poses.tomo_names == ts], position, atol=1e-3)
        precedents = {t.getTsId() for t in only_new.getPrecedents().iterItems()}
        self.assertEqual(precedents, {"TS_01", "TS_02"})

    def test_summary_files_and_viewer(self):
        summary = "\n".join(self.protStar.summary())
        self.assertIn("Tolerance 10 Å", summary)
        self.assertIn("Jaccard index 0.727", summary)  # 16 / (20 + 18 - 16)
        self.assertIn("TS_01: old 10, new 9, in both 8", summary)
        self.assertTrue(self.protStar.methods())
        self.assertTrue(Path(self.proj.getPath(self.protStar.getHistogramPath())).is_file())
        viewers = Domain.findViewers(self.protStar, "tkinter")
        self.assertIn(MSpeciesIntersectViewer, viewers)
        self.assertEqual(self._viewerPng(self.protStar, "_showHistogram").read_bytes()[:4], b"\x89PNG")

    def _viewerPng(self, prot, show: str) -> Path:
        """Draw the viewer's plot ``show`` of ``prot`` (from the project folder, as the GUI runs) into a PNG."""
        viewer = MSpeciesIntersectViewer(project=self.proj, protocol=prot)
        viewer.setProtocol(prot)
        cwd = Path.cwd()
        try:
            os.chdir(self.proj.getPath())
            plotters = getattr(viewer, show)()
        finally:
            os.chdir(cwd)
        png = self.tmp / f"viewer_{prot.getObjId()}{show}.png"
        plotters[0].getFigure().savefig(png)
        return png

    def test_self_intersection_removes_duplicates(self):
        """The same set as old and new: no duplicates within 1 Å (all kept, in both); with a tolerance wider than
        a tomogram, one particle per tomogram (the first) is kept."""
        prot = self.protSelf
        n = self.coords.getSize()
        self.assertEqual((prot.onlyOld.getSize(), prot.inBoth.getSize(), prot.onlyNew.getSize(),
                          prot.selected.getSize()), (0, n, 0, n))
        self.assertTrue(all(getattr(c, DISTANCE_ATTR).get() < 1e-6 for c in prot.inBoth.iterCoordinates()))
        self.assertIn("0 duplicate(s) removed", "\n".join(prot.summary()))
        wide = launch(self.proj, ProtMSpeciesIntersect, "remove duplicates", inputOld=self.coords,
                      newSource=SOURCE_SCIPION, inputNew=self.coords, tolerance=1e5)
        self.assertEqual((wide.onlyOld.getSize(), wide.inBoth.getSize(), wide.onlyNew.getSize()), (0, 2, 0))
        first = {}
        for coord in self.coords.iterCoordinates():
            first.setdefault(coord.getTomoId(), coord.getObjId())
        self.assertEqual(sorted(c.getObjId() for c in wide.inBoth.iterCoordinates()), sorted(first.values()))
        self.assertIn("removed", wide.methods()[0])

    def test_angular_tolerance_and_symmetry(self):
        """The derived STAR with 3 particles per tomogram turned 90 degrees about z: a 20 degree gate (C1) moves
        them to only old / only new; C4 matches them again at 0 degrees; angles are stored on the items."""
        new_positions, new_names, euler, kept = self.derived
        turned = euler.copy()
        turned[[3, 4, 11], 0] += 90.0  # rot: A·Rz(90), a turn about the reference's own z axis
        star = self.tmp / "turned.star"
        write_relion5_star(star, new_positions, new_names, turned)
        common = dict(inputOld=self.coords, newSource=SOURCE_STAR, newStarFile=str(star), tolerance=TOLERANCE_ANGST,
                      angularTolerance=20.0)
        c1 = launch(self.proj, ProtMSpeciesIntersect, "intersect C1 angular", symmetry="C1", **common)
        self.assertEqual((c1.onlyOld.getSize(), c1.inBoth.getSize(), c1.onlyNew.getSize()), (4 + 3, 16 - 3, 2 + 3))
        self.assertTrue(all(getattr(c, ANGLE_ATTR).get() <= 20.0 for c in c1.inBoth.iterCoordinates()))
        c4 = launch(self.proj, ProtMSpeciesIntersect, "intersect C4 angular", symmetry="C4", **common)
        self.assertEqual(c4.inBoth.getSize(), 16)
        self.assertTrue(all(getattr(c, ANGLE_ATTR).get() < 1e-3 for c in c4.inBoth.iterCoordinates()))
        self.assertIn("angular tolerance 20 deg", "\n".join(c4.summary()))
        self.assertTrue(Path(self.proj.getPath(c4._getExtraPath("angle_histogram.png"))).is_file())
        self.assertEqual(self._viewerPng(c4, "_showAngles").read_bytes()[:4], b"\x89PNG")

    def test_original_relion31_star_matches_imported_coordinates(self):
        info_size = " ".join(str(v) for v in self.manifest["tilt_series"][0]["unbinned_tomogram_shape_zyx"][::-1])
        prot = launch(self.proj, ProtMSpeciesIntersect, "intersect vs original STAR", inputOld=self.coords,
                      newSource=SOURCE_STAR, newStarFile=str(Path(self.manifest["root"]) / "particles.star"),
                      starTomoSize=info_size, tolerance=1.0)
        self.assertEqual(prot.inBoth.getSize(), self.coords.getSize())
        self.assertEqual(prot.onlyNew.getSize(), 0)
        self.assertTrue(all(getattr(c, DISTANCE_ATTR).get() < 1e-2 for c in prot.inBoth.iterCoordinates()))

    def test_validation_messages(self):
        prot = self.proj.newProtocol(ProtMSpeciesIntersect, inputOld=self.coords, newSource=SOURCE_STAR,
                                     newStarFile=str(self.derived_star), tolerance=-1.0, keepOnlyOld=False,
                                     keepInBoth=False, keepOnlyNew=False)
        errors = "\n".join(prot.validate())
        self.assertIn("Tolerance: must be >= 0", errors)
        self.assertIn("Select at least one", errors)
        missing = self.proj.newProtocol(ProtMSpeciesIntersect, inputOld=self.coords, newSource=SOURCE_STAR,
                                        newStarFile=str(self.tmp / "missing.star"), tolerance=5.0)
        self.assertIn("file not found", "\n".join(missing.validate()))
        other = self.tmp / "other.star"
        write_relion5_star(other, np.zeros((2, 3)), np.array(["XX_1", "XX_1"], dtype=object), np.zeros((2, 3)))
        no_common = self.proj.newProtocol(ProtMSpeciesIntersect, inputOld=self.coords, newSource=SOURCE_STAR,
                                          newStarFile=str(other), tolerance=5.0)
        self.assertIn("No common tomograms", "\n".join(no_common.validate()))
        options = self.proj.newProtocol(ProtMSpeciesIntersect, inputOld=self.coords, newSource=SOURCE_STAR,
                                        newStarFile=str(self.derived_star), tolerance=5.0, angularTolerance=-3.0,
                                        groupBy="rlnClassNumber", scoreAttribute="_myScore")
        errors = "\n".join(options.validate())
        self.assertIn("Angular tolerance: must be >= 0", errors)
        self.assertIn("the old set", errors)
        self.assertIn("has no attribute 'rlnClassNumber'", errors)
        self.assertIn("no column rlnClassNumber", errors)
        symmetry = self.proj.newProtocol(ProtMSpeciesIntersect, inputOld=self.coords, newSource=SOURCE_STAR,
                                         newStarFile=str(self.derived_star), tolerance=5.0, symmetry="X9")
        self.assertIn("symmetry 'X9' is not known", "\n".join(symmetry.validate()))

    def _subtomoStars(self) -> tuple[Path, Path]:
        """Old STAR (truth, random shifts) and new STAR (derived; added particles shifted) with image files."""
        folder = self.tmp / "subtomo_stars"
        (folder / "images").mkdir(parents=True, exist_ok=True)
        new_positions, new_names, new_euler, _ = self.derived
        n_old, n_new = len(self.truth), len(new_positions)
        for i in range(n_old + n_new):
            write_mrc(folder / "images" / f"p{i:03d}.mrc", np.zeros((8, 8, 8), np.float32), SYNTH["pixel_size_angst"])
        rng = np.random.default_rng(11)
        old_star, new_star = folder / "old.star", folder / "new.star"
        write_relion5_star(old_star, self.truth.positions_angst, self.truth.tomo_names, self.truth.euler_zyz_deg,
                           origins_angst=rng.uniform(-5, 5, (n_old, 3)),
                           images=[f"images/p{i:03d}.mrc" for i in range(n_old)])
        new_origins = np.zeros((n_new, 3))
        new_origins[-2:] = [[5.0, -3.0, 2.0], [-4.0, 1.0, 6.0]]
        write_relion5_star(new_star, new_positions, new_names, new_euler, origins_angst=new_origins,
                           images=[f"images/p{n_old + i:03d}.mrc" for i in range(n_new)])
        return old_star, new_star

    def test_subtomograms_old_and_new_from_star(self):
        old_star, new_star = self._subtomoStars()
        imported = launch(self.proj, ProtMSpeciesImportParticlesStar, "import sub-tomograms", starFile=str(old_star),
                          inputTomograms=self.imported["tomograms"])
        subtomos = imported.SubTomograms
        prot = launch(self.proj, ProtMSpeciesIntersect, "intersect sub-tomograms vs STAR", inputOld=subtomos,
                      newSource=SOURCE_STAR, newStarFile=str(new_star), tolerance=TOLERANCE_ANGST,
                      keepInBoth=True, keepOnlyNew=True)
        sizes = [getattr(prot, n).getSize() for n in ("onlyOld", "inBoth", "onlyNew", "selected")]
        self.assertEqual(sizes, [4, 16, 2, 18])
        for name in ("onlyOld", "inBoth", "onlyNew", "selected"):
            self.assertIsInstance(getattr(prot, name), SetOfSubTomograms)
        old_poses = subtomograms_to_poses(subtomos)
        both = subtomograms_to_poses(prot.inBoth)
        kept = np.setdiff1d(np.arange(len(self.truth)), self.dropped)
        np.testing.assert_allclose(both.positions_angst, old_poses.positions_angst[kept], atol=1e-3)
        new_poses = subtomograms_to_poses(prot.onlyNew)
        for ts, position in self.added.items():
            np.testing.assert_allclose(new_poses.positions_angst[new_poses.tomo_names == ts], position, atol=1e-3)
        np.testing.assert_allclose(new_poses.euler_zyz_deg, 0.0, atol=1e-6)
        self.assertTrue(all(s.getFileName().endswith(".mrc") for s in prot.onlyNew.iterSubtomos()))
        no_images = self.proj.newProtocol(ProtMSpeciesIntersect, inputOld=subtomos, newSource=SOURCE_STAR,
                                          newStarFile=str(self.derived_star), tolerance=5.0)
        self.assertIn("need sub-tomogram images (rlnImageName)", "\n".join(no_images.validate()))
        coords_new = self.proj.newProtocol(ProtMSpeciesIntersect, inputOld=subtomos, newSource=SOURCE_SCIPION,
                                           inputNew=self.coords, tolerance=5.0)
        self.assertIn("must be a SetOfSubTomograms", "\n".join(coords_new.validate()))
