"""The real particle STAR corpus (``../shared/real_star/files``, provenance in ``SOURCES.md`` there): where it is,
what each file is expected to be read as and why, and the expected values computed from the raw columns with
``starfile`` (a third-party parser), never through mspecies' reader. Shared by the corpus tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import starfile

from mspecies.common.euler import euler_to_matrix
from mspecies.tests.corpus import corpus_dir

__all__ = ["corpus_dir"]

@dataclass(frozen=True)
class Accepted:
    """A file the product reads: dialect, where its coordinate pixel size is (``table:column``, a formula, or a
    number the user must give) and why."""

    dialect: str
    pixel: str | float | None  # None: RELION 5 centred Å, no pixel size in the file and none needed to read
    why: str


@dataclass(frozen=True)
class Refused:
    """A file the product refuses: words its message must hold (besides the file name) and why."""

    words: tuple[str, ...]
    why: str


MAG = "particles:rlnDetectorPixelSize*1e4/rlnMagnification"
EXPECTED: dict[str, Accepted | Refused] = {
    "teamtomo__starfile__tests__data__one_loop.star": Accepted(
        "3.0", MAG, "no optics, rlnMicrographName without .tomostar and no rlnPixelSize: RELION 3.0 layout (Warp 1.x "
                    "wrote it); pixel from rlnDetectorPixelSize·1e4/rlnMagnification"),
    "turonova__cryoCAT__tests__test_data__motl_data__relion_3.0.star": Accepted(
        "warp3d", MAG, "no optics and a per-particle rlnPixelSize: Warp 3D export"),
    "turonova__cryoCAT__tests__test_data__relion_3.1_optics.star": Accepted(
        "3.1", "optics:rlnImagePixelSize", "data_optics without rlnTomoTiltSeriesPixelSize; only rlnImagePixelSize "
                                           "(Warp sub-tomograms: coordinates at the sub-tomogram pixel size)"),
    "turonova__cryoCAT__tests__test_data__motl_data__relion_3.1_optics2.star": Accepted(
        "3.1", "optics:rlnImagePixelSize", "as relion_3.1_optics, two optics groups with their own pixel sizes"),
    "turonova__cryoCAT__tests__test_data__motl_data__relion_4.0.star": Accepted(
        "4", "optics:rlnTomoTiltSeriesPixelSize", "optics with rlnTomoTiltSeriesPixelSize: RELION 4, coordinates in "
                                                  "tilt-series pixels (RELION particle_set.cpp)"),
    "turonova__cryoCAT__tests__test_data__motl_data__relion5__clean__R5_tutorial_run_data.star": Accepted(
        "5", None, "rlnCenteredCoordinate*Angst: RELION 5, centred Å"),
    "turonova__cryoCAT__tests__test_data__motl_data__relion5__clean__warp2_particles_matching.star": Accepted(
        "4", "optics:rlnImagePixelSize", "WarpTools ts_export_particles (rlnTomoName *.tomostar): coordinates in "
                                         "particle pixels (rlnImagePixelSize), not rlnTomoTiltSeriesPixelSize"),
    "turonova__cryoCAT__tests__test_data__motl_data__relion5_1__run_it025_data.star": Accepted(
        "3.1", "optics:rlnImagePixelSize", "data_optics without tomography labels: RELION 3.1 layout"),
    "turonova__cryoCAT__docs__source__tutorials__lamellae_analysis__inputs__bin6_TM_starfile.star": Accepted(
        "3.1", "optics:rlnImagePixelSize", "RELION 3.1 layout of Warp sub-tomograms"),
    "turonova__cryoCAT__tests__test_data__motl_data__tutorial_data__relion_test.star": Accepted(
        "warp3d", "particles:rlnPixelSize", "no optics, rlnPixelSize and px origins: Warp 3D export layout"),
    "turonova__cryoCAT__tests__test_data__motl_data__class6_er_mr1_1_sg.star": Refused(
        ("STOPGAP", "rlnCoordinateX"), "a STOPGAP motivelist, no RELION column"),
    "hanjinliu__cylindra__cylindra_builtins__relion__tests__test_jobs__Class3D__job_class3d__run_it025_data.star":
        Accepted("5", "optics:rlnTomoTiltSeriesPixelSize", "RELION 5 Class3D, subtomogram angles"),
    "hanjinliu__cylindra__cylindra_builtins__relion__tests__test_jobs__Refine3D__job_refine__run_it050_data.star":
        Accepted("5", "optics:rlnTomoTiltSeriesPixelSize", "RELION 5 Refine3D layout"),
    "hanjinliu__cylindra__cylindra_builtins__relion__tests__test_jobs__Picks__job_picks__particles.star": Accepted(
        "5", 10.52, "RELION 5 picks without optics; 10.52 Å/px is in the job's tomograms.star (not in the file)"),
    "chanzuckerberg__cryoet-data-portal-backend__test_infra__test_files__input_bucket__20002__annotations__"
    "relion_3_star.star": Accepted("warp3d", MAG, "no optics, .tomostar micrograph names: Warp 3D export layout"),
    "chanzuckerberg__cryoet-data-portal-backend__test_infra__test_files__input_bucket__20002__annotations__"
    "relion_4_star.star": Accepted(
        "3.1", "optics:rlnMicrographPixelSize", "optics without rlnTomoTiltSeriesPixelSize and no subtomogram "
                                                "angles: RELION 3.1 with rlnTomoName as an extra column"),
    "chanzuckerberg__cryoet-data-portal-backend__test_infra__test_files__input_bucket__20002__annotations__"
    "tomoman_relion_star.star": Accepted(
        "4", "particles:rlnPixelSize", "no optics, rlnTomoName: TOMOMAN's RELION 4 layout, per-particle rlnPixelSize, "
                                       "px origins"),
    "chanzuckerberg__cryoet-data-portal-backend__test_infra__test_files__input_bucket__20002__annotations__"
    "stopgap_star.star": Refused(("STOPGAP", "rlnCoordinateX"), "a STOPGAP motivelist, no RELION column"),
    "psliz05__pycrest__Test_Data__FinalStarfile.star": Accepted("3.1", "optics:rlnImagePixelSize", "RELION 3.1"),
    "psliz05__pycrest__TestExamples__RotateStarFile__test_2018_rottrans.star": Accepted(
        "3.1", "optics:rlnImagePixelSize", "RELION 3.1 written by starfile"),
    "bpowell122__tomodrgn__testing__data__warptools_test_4-tomos_10-ptcls_box-32_angpix-12.star": Accepted(
        "4", "optics:rlnImagePixelSize", "WarpTools ts_export_particles (*.tomostar): coordinates in particle pixels"),
    "bpowell122__tomodrgn__testing__data__10076_both_32_sim_vols.star": Accepted(
        "warp3d", "particles:rlnDetectorPixelSize", "Warp-style rows (.tomostar), rlnDetectorPixelSize without "
                                                    "rlnMagnification (RELION's default magnification 10000)"),
    "bpowell122__tomodrgn__testing__data__10076_both_32_clean.star": Refused(
        ("rlnCoordinateX",), "2D tilt-image rows with no coordinates"),
    "fzxgao__fomo__fomo__example_star_files__TS_1_10.00Apx_emd_15854_clean.first40rows.star": Refused(
        ("fractions", "[0, 1]"), "WarpTools template-matching output: coordinates are fractions of the tomogram"),
    "goetschius__isecc__test.star": Refused(("rlnCoordinateZ", "2D"), "single-particle file, 2D coordinates"),
    "3dem__em-testdata__metadata__run_it025_data.star": Refused(("rlnCoordinateZ", "2D"), "single-particle 2D"),
    "3dem__em-testdata__metadata__particles_1k.star": Refused(("rlnCoordinateZ", "2D"), "single-particle 2D"),
    "bogdantoader__simplecryoem__notebooks__comparisons__data__relion_proj_batch_pfac3.star": Refused(
        ("rlnCoordinateZ", "2D"), "relion_project single-particle output, 2D"),
    "emdb-empiar__sfftk__sfftk__test_data__segmentations__test_data7.star": Refused(
        ("second loop", "_atom_site"), "particle rows followed by an mmCIF loop in the same data block"),
}
ACCEPTED = sorted(name for name, e in EXPECTED.items() if isinstance(e, Accepted))
REFUSED = sorted(name for name, e in EXPECTED.items() if isinstance(e, Refused))


def raw_blocks(path: Path) -> dict[str, pd.DataFrame]:
    """Every block of ``path`` as read by ``starfile`` (loops as tables, key-value blocks as one row)."""
    blocks = starfile.read(path, always_dict=True)
    return {k: v if isinstance(v, pd.DataFrame) else pd.DataFrame([v]) for k, v in blocks.items()}


def raw_particles(blocks: dict[str, pd.DataFrame]) -> pd.DataFrame:
    return blocks["particles"] if "particles" in blocks else blocks[""]


def raw_pixel(name: str, blocks: dict[str, pd.DataFrame]) -> np.ndarray | None:
    """(N,) coordinate pixel size (Å) per row from the raw columns named in :data:`EXPECTED`."""
    expect = EXPECTED[name]
    particles = raw_particles(blocks)
    if expect.pixel is None:
        return None
    if isinstance(expect.pixel, float):
        return np.full(len(particles), expect.pixel)
    where, formula = expect.pixel.split(":")
    if where == "optics":
        per_group = blocks["optics"].set_index("rlnOpticsGroup")[formula].astype(float)
        return per_group.reindex(particles["rlnOpticsGroup"].astype(int)).to_numpy()
    if formula == "rlnDetectorPixelSize*1e4/rlnMagnification":
        return (particles["rlnDetectorPixelSize"].astype(float) * 1e4 / particles["rlnMagnification"].astype(float)
                ).to_numpy()
    return particles[formula].astype(float).to_numpy()


def raw_positions(name: str, blocks: dict[str, pd.DataFrame], pixel: np.ndarray | None) -> tuple[np.ndarray, bool]:
    """(N, 3) positions in Å with the shifts subtracted and whether they are centred (RELION 5) or from the
    tomogram corner (every other dialect, voxel 0 at 0 Å)."""
    particles = raw_particles(blocks)
    n = len(particles)

    def xyz(template: str) -> np.ndarray:
        return np.stack([particles[template.format(a)].astype(float).to_numpy() if template.format(a) in particles
                         else np.zeros(n) for a in "XYZ"], axis=1)

    centred = "rlnCenteredCoordinateXAngst" in particles
    positions = xyz("rlnCenteredCoordinate{}Angst") if centred else xyz("rlnCoordinate{}") * pixel[:, None]
    if "rlnOriginXAngst" in particles:
        origins = xyz("rlnOrigin{}Angst")
    elif "rlnOriginX" in particles:
        origins = xyz("rlnOrigin{}") * pixel[:, None]
    else:
        origins = np.zeros((n, 3))
    if EXPECTED[name].dialect in ("4", "5") and "rlnTomoSubtomogramRot" in particles:
        sub = np.stack([particles[f"rlnTomoSubtomogram{a}"].astype(float) for a in ("Rot", "Tilt", "Psi")], axis=1)
        origins = np.einsum("nij,nj->ni", euler_to_matrix(sub), origins)  # RELION getPosition: A_sub · origin
    return positions - origins, centred


def raw_rotations(name: str, blocks: dict[str, pd.DataFrame]) -> np.ndarray:
    """(N, 3, 3) particle rotation in the tomogram (RELION 4/5: ``A_subtomogram · A_angle``)."""
    particles = raw_particles(blocks)
    angles = (np.stack([particles[f"rlnAngle{a}"].astype(float) for a in ("Rot", "Tilt", "Psi")], axis=1)
              if "rlnAngleRot" in particles else np.zeros((len(particles), 3)))
    matrix = euler_to_matrix(angles)
    if EXPECTED[name].dialect in ("4", "5") and "rlnTomoSubtomogramRot" in particles:
        sub = np.stack([particles[f"rlnTomoSubtomogram{a}"].astype(float) for a in ("Rot", "Tilt", "Psi")], axis=1)
        matrix = euler_to_matrix(sub) @ matrix
    return matrix
