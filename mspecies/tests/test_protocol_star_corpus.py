"""Headless Scipion on real particle STAR files (``../shared/real_star/files``): every file the STAR layer accepts
goes through "import particles from STAR" (tomograms made to the size the file implies) and "export particles to
STAR" in its own dialect, and keeps its positions (1e-3 Å) and orientations (1e-6).

Expected positions are the file read with the same tomogram sizes; the files the layer refuses, and the per-file
expectations, are tested without Scipion in ``tests/test_star_corpus.py``. Files over :data:`MAX_ROWS` particles
are cut to their first rows (same blocks and columns) to keep the Scipion sets small.
"""

import math
import tempfile
from pathlib import Path

import numpy as np
from pyworkflow.tests import BaseTest, setupTestProject
from tomo.protocols import ProtImportTomograms

from mspecies.cli.workflow import launch
from mspecies.common.types import InputError
from mspecies.convert.particles import coordinates_to_poses
from mspecies.core.geometry import euler_to_matrix
from mspecies.formats.mrc import write_mrc
from mspecies.formats.star import read_star_text, write_star_text
from mspecies.formats.star_dialects import Dialect, PositionFrame, particle_block_name, read_particle_star
from mspecies.formats.tomo_names import scipion_ts_id
from mspecies.protocols import ProtMSpeciesExportParticlesStar, ProtMSpeciesImportParticlesStar
from mspecies.protocols.protocol_export_star import EXPORT_DIALECTS
from mspecies.protocols.protocol_import_star import IMPORT_COORDINATES
from mspecies.tests.corpus import corpus_dir

MAX_ROWS = 300
MAX_TOMOGRAM_PX = 48
"""Tomograms are written binned so that no side exceeds this; the size at the STAR pixel size is exact."""
GIVEN_PIXEL = {"hanjinliu__cylindra__cylindra_builtins__relion__tests__test_jobs__Picks__job_picks__particles.star":
               10.52}
"""Pixel sizes a user gives for files that do not carry one (cylindra's picks: its job's tomograms.star)."""
EXPORT_AS = {Dialect.WARP3D: Dialect.RELION30}
"""Dialects the export protocol writes through the same layout."""


def implied_shape(positions_angst: np.ndarray, pixel_angst: float, centred: bool) -> np.ndarray:
    """(3,) even tomogram size (px at ``pixel_angst``) that holds every position, with a margin."""
    extent = (2 * np.abs(positions_angst).max(axis=0) if centred else positions_angst.max(axis=0)) / pixel_angst
    return 2 * np.ceil((np.maximum(extent, 1) + 4) / 2).astype(int)


class TestStarCorpusThroughScipion(BaseTest):
    """Import → export through Scipion for every accepted corpus file."""

    @classmethod
    def setUpClass(cls):
        setupTestProject(cls)
        cls.corpus = corpus_dir()
        cls.root = Path(tempfile.mkdtemp(prefix="mspecies-star-corpus-"))

    def test_accepted_files_keep_positions_through_import_and_export(self):
        if self.corpus is None:
            print("real STAR corpus not found (../shared/real_star/files or $MSPECIES_SHARED): skipped")
            self.skipTest("../shared/real_star/files not found")
        done = []
        for path in sorted(self.corpus.glob("*.star")):
            try:
                table = read_particle_star(path, coord_pixel_size_angst=GIVEN_PIXEL.get(path.name))
            except InputError:
                continue  # refused: tests/test_star_corpus.py checks the message
            with self.subTest(path.name):
                if self._roundTrip(path, table):
                    done.append(path.name)
        print(f"{len(done)} corpus files through Scipion import and export")
        self.assertGreaterEqual(len(done), 15)

    def _roundTrip(self, path: Path, table) -> bool:
        label = path.name[:40]
        folder = self.root / path.stem
        (folder / "tomograms").mkdir(parents=True)
        star = self._shortened(path, folder / "particles.star", len(table))
        table = read_particle_star(star, coord_pixel_size_angst=GIVEN_PIXEL.get(path.name))
        names = table.poses.tomo_names.astype(str)
        pixel = float(np.unique(table.coord_pixel_size_angst)[0]) if table.coord_pixel_size_angst is not None \
            else None
        if pixel is None or np.ptp(table.coord_pixel_size_angst) > 1e-9 * pixel:
            print(f"{path.name}: not one coordinate pixel size for the whole file: one tomogram set cannot hold it")
            return False
        centred = table.frame == PositionFrame.CENTRED
        shapes = {name: implied_shape(table.poses.positions_angst[names == name], pixel, centred)
                  for name in np.unique(names)}
        binning = max(1, math.ceil(max(int(s.max()) for s in shapes.values()) / MAX_TOMOGRAM_PX))
        dims = {name: 2 * np.ceil(shape / binning / 2).astype(int) for name, shape in shapes.items()}
        ts_ids, mapping = self._tsIds(list(dims))
        for name, dim in dims.items():
            write_mrc(folder / "tomograms" / f"{ts_ids[name]}.mrc",
                      np.zeros(tuple(int(v) for v in dim[::-1]), dtype=np.float32), pixel * binning)
        tomograms = launch(self.proj, ProtImportTomograms, f"tomograms {label}", filesPath=str(folder / "tomograms"),
                           filesPattern="{TS}.mrc", samplingRate=pixel * binning, voltage=300.0,
                           sphericalAberration=2.7, amplitudeContrast=0.1).Tomograms
        imported = launch(self.proj, ProtMSpeciesImportParticlesStar, f"import {label}", starFile=str(star),
                          inputTomograms=tomograms, importAs=IMPORT_COORDINATES,
                          coordPixelSize=GIVEN_PIXEL.get(path.name), nameMapping=mapping,
                          boxSize=8).Coordinates3D
        at_star_pixel = {name: tuple(int(v) * binning for v in dim) for name, dim in dims.items()}
        expected = read_particle_star(star, coord_pixel_size_angst=GIVEN_PIXEL.get(path.name),
                                      tomo_shape_px=at_star_pixel)
        self.assertPoses(coordinates_to_poses(imported), expected, f"{path.name} imported")
        dialect = EXPORT_AS.get(table.dialect, table.dialect)
        export = launch(self.proj, ProtMSpeciesExportParticlesStar, f"export {label}", inputParticles=imported,
                        outputDialect=EXPORT_DIALECTS.index(dialect))
        binned = {}
        for name, dim in dims.items():
            ts_id = ts_ids[name]
            binned[ts_id] = binned[f"{ts_id}.tomostar"] = tuple(int(v) for v in dim)
        written = read_particle_star(export.starPath.get(), dialect, tomo_shape_px=binned,
                                     coord_pixel_size_angst=pixel * binning if dialect == Dialect.M_SPECIES else None)
        self.assertPoses(written.poses, expected, f"{path.name} exported as {dialect}")
        return True

    @staticmethod
    def _tsIds(names: list[str]) -> tuple[dict[str, str], str]:
        """STAR name → the ts id Scipion gives its tomogram, made unique (two folders may hold ``Tomo_002.mrc``),
        and the name mapping the import then needs ('' when automatic matching finds them)."""
        ts_ids: dict[str, str] = {}
        for name in names:
            base = candidate = scipion_ts_id(name)
            while candidate in ts_ids.values():
                candidate = f"{base}_{len(ts_ids)}"
            ts_ids[name] = candidate
        clash = len({scipion_ts_id(n) for n in names}) < len(names)
        return ts_ids, ", ".join(f"{n}={t}" for n, t in ts_ids.items()) if clash else ""

    @staticmethod
    def _shortened(path: Path, out: Path, rows: int) -> Path:
        """``path`` itself, or its first :data:`MAX_ROWS` particles with the same blocks and columns."""
        if rows <= MAX_ROWS:
            return path
        blocks, comments = read_star_text(path)
        name = particle_block_name(blocks)
        blocks[name].table = blocks[name].table.iloc[:MAX_ROWS]
        return write_star_text(out, list(blocks.values()), comments)

    def assertPoses(self, got, table, label: str):
        error = np.abs(got.positions_angst - table.poses.positions_angst).max()
        rotation = np.abs(euler_to_matrix(got.euler_zyz_deg) - euler_to_matrix(table.poses.euler_zyz_deg)).max()
        print(f"{label}: {len(table)} particles, max position error {error:.2e} Å, rotation {rotation:.2e}")
        self.assertEqual(len(got), len(table), label)
        self.assertLessEqual(error, 1e-3, label)
        self.assertLessEqual(rotation, 1e-6, label)
