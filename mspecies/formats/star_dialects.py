"""RELION 3.0/3.1/4/5, Warp 3D-export and M species particle STAR files ⇄ :class:`ParticleTable`.

A :class:`ParticleTable` holds the core :class:`~mspecies.common.types.ParticlePoses` (Å centred on the tomogram
centre, origins already subtracted, RELION Euler angles) plus everything needed to write the file back: the
origins as read, pixel sizes kept apart (coordinate grid vs particle images), tomogram sizes for corner-based
dialects, subsets, image names, the optics table and every column it does not interpret, as text.

Positions (``docs/conventions.md``): ``position_angst = coordinate_px · coord_pixel_angst − (N // 2) · coord_pixel_angst
− origin_angst`` for corner-based dialects read with the tomogram size N (without it the ``(N // 2)`` term is left
out and the table's ``frame`` says the positions are from the corner: converting between corner-based dialects and
comparing files of the same tomograms does not depend on N), with ``origin_angst = rlnOriginX/Y/ZAngst`` or
``rlnOriginX/Y/Z · coord_pixel_angst`` (RELION 3.0: shifts are in the same pixels as the coordinates). RELION 5
stores centred Å (``rlnCenteredCoordinate*Angst``); M species store Å from the tomogram corner
(``wrpCoordinateX1``...) and carry no shifts, so origins are folded into the coordinates when writing them.

Subtomogram orientations (RELION 4/5): ``rlnTomoSubtomogramRot/Tilt/Psi`` give the orientation of the
pseudo-subtomogram box, and ``rlnAngleRot/Tilt/Psi`` and ``rlnOriginX/Y/ZAngst`` are relative to that box. RELION
(``src/jaz/tomography/particle_set.cpp``) uses ``A = A_subtomogram · A_angle`` for the particle in the tomogram
(``getMatrix3x3``, used by ``getMatrix4x4``) and subtracts ``A_subtomogram · origin`` from the coordinate
(``getPosition``), each ``A`` being RELION's ``Euler_angles2matrix`` (our ``euler_to_matrix``). The reader therefore
stores the composed pose in ``poses.euler_zyz_deg`` and the rotated shift ``A_subtomogram · origin`` in
``origins_angst`` (both in the tomogram frame, as a file without subtomogram angles would hold them), and keeps the
values as read (``subtomogram_euler_deg``, ``box_euler_deg``, ``box_origins_angst``). Writing RELION 4/5 from such a
table writes the subtomogram angles back with ``rlnAngle* = Aᵀ_subtomogram · A`` and ``rlnOrigin* =
Aᵀ_subtomogram · origin``, using the values as read wherever pose and shift are unchanged (exact round trips);
other dialects get the composed pose and the rotated shift. A table without subtomogram angles writes ``rlnAngle*``
only. Subtomogram angles are interpreted only in RELION 4/5 files (other dialects carry them as extra columns, and
writing RELION 4/5 from a table that does not interpret them drops them, as its pose is already complete).

Limits, by design: the tomogram centre is ``(N // 2) · pixel`` for every corner-based dialect (M uses ``N · pixel / 2``:
the same for even sizes); only the first temporal sample of an M species table is interpreted (``wrpCoordinateX2``...
are carried as extra columns); a RELION 5 file's ``rlnCoordinateX/Y/Z`` are checked against
``rlnCenteredCoordinate*Angst`` when pixel and tomogram sizes are known, and not written to RELION 5.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path

import numpy as np
import pandas as pd

from mspecies.common.euler import euler_to_matrix, matrix_to_euler
from mspecies.common.types import InputError, ParticlePoses
from mspecies.formats.star import FloatColumns, StarBlock, read_star_text
from mspecies.formats.tomo_names import normalise_tomo_name


class Dialect(StrEnum):
    """Particle STAR dialects; values are the names the CLI accepts."""

    RELION30 = "3.0"
    RELION31 = "3.1"
    RELION4 = "4"
    RELION5 = "5"
    WARP3D = "warp3d"  # Warp 1.x / WarpTools 3D export: RELION 3.0 layout, rlnMicrographName TS.tomostar, rlnPixelSize
    M_SPECIES = "warp"  # M species table: wrpCoordinateX1 (Å from the corner), wrpAngleRot1, wrpSourceName/Hash


class PositionFrame(StrEnum):
    """Origin of :attr:`ParticleTable.poses` positions (Å): the tomogram centre, or its corner (voxel 0 at 0 Å)."""

    CENTRED = "centred"
    CORNER = "corner"


CORNER_DIALECTS = frozenset({Dialect.RELION30, Dialect.RELION31, Dialect.RELION4, Dialect.WARP3D, Dialect.M_SPECIES})
PX_ORIGIN_DIALECTS = frozenset({Dialect.RELION30, Dialect.WARP3D})
OPTICS_DIALECTS = frozenset({Dialect.RELION31, Dialect.RELION4, Dialect.RELION5})

# Role → column per dialect (coordinates, shifts, angles, names, subsets, images).
_XYZ = ("X", "Y", "Z")
_COMMON = {"rot": "rlnAngleRot", "tilt": "rlnAngleTilt", "psi": "rlnAnglePsi", "subset": "rlnRandomSubset",
           "image": "rlnImageName", "ctf": "rlnCtfImage"}
_ORIGIN_PX = {f"origin_{a.lower()}": f"rlnOrigin{a}" for a in _XYZ}
_ORIGIN_ANGST = {f"origin_{a.lower()}": f"rlnOrigin{a}Angst" for a in _XYZ}
_CORNER_PX = {a.lower(): f"rlnCoordinate{a}" for a in _XYZ}
ROLE_COLUMNS: dict[Dialect, dict[str, str]] = {
    Dialect.RELION30: {"name": "rlnMicrographName", **_CORNER_PX, **_ORIGIN_PX, **_COMMON},
    Dialect.WARP3D: {"name": "rlnMicrographName", **_CORNER_PX, **_ORIGIN_PX, **_COMMON},
    Dialect.RELION31: {"name": "rlnMicrographName", **_CORNER_PX, **_ORIGIN_ANGST, **_COMMON},
    Dialect.RELION4: {"name": "rlnTomoName", **_CORNER_PX, **_ORIGIN_ANGST, **_COMMON},
    Dialect.RELION5: {"name": "rlnTomoName", **{a.lower(): f"rlnCenteredCoordinate{a}Angst" for a in _XYZ},
                      **_ORIGIN_ANGST, **_COMMON},
    Dialect.M_SPECIES: {**{a.lower(): f"wrpCoordinate{a}1" for a in _XYZ}, "rot": "wrpAngleRot1",
                        "tilt": "wrpAngleTilt1", "psi": "wrpAnglePsi1", "subset": "wrpRandomSubset",
                        "name": "wrpSourceName", "hash": "wrpSourceHash"},
}
_PIXEL_COLUMNS_30 = ("rlnMagnification", "rlnDetectorPixelSize", "rlnPixelSize")
# Per-particle in RELION 3.0, per optics group from 3.1 on (moved between the two when converting).
OPTICS_LABELS = ("rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast", "rlnImageSize",
                 "rlnImageDimensionality", "rlnCtfDataAreCtfPremultiplied", "rlnBeamTiltX", "rlnBeamTiltY")
_OPTICS_PIXEL = ("rlnImagePixelSize", "rlnMicrographPixelSize", "rlnMicrographOriginalPixelSize",
                 "rlnTomoTiltSeriesPixelSize")
# Where each dialect finds the pixel size of its coordinate grid, in order of preference.
COORD_PIXEL_COLUMNS: dict[Dialect, tuple[str, ...]] = {
    Dialect.RELION30: ("rlnDetectorPixelSize·1e4/rlnMagnification", "rlnPixelSize", "rlnDetectorPixelSize"),
    Dialect.WARP3D: ("rlnDetectorPixelSize·1e4/rlnMagnification", "rlnPixelSize", "rlnDetectorPixelSize"),
    Dialect.RELION31: ("rlnMicrographPixelSize", "rlnImagePixelSize"),
    Dialect.RELION4: ("rlnTomoTiltSeriesPixelSize", "rlnMicrographOriginalPixelSize"),
    Dialect.RELION5: ("rlnTomoTiltSeriesPixelSize", "rlnMicrographOriginalPixelSize"),
    Dialect.M_SPECIES: (),
}
# RELION 4/5 orientation of the pseudo-subtomogram box (interpreted in SUBTOMOGRAM_DIALECTS only).
SUBTOMOGRAM_COLUMNS = ("rlnTomoSubtomogramRot", "rlnTomoSubtomogramTilt", "rlnTomoSubtomogramPsi")
SUBTOMOGRAM_DIALECTS = frozenset({Dialect.RELION4, Dialect.RELION5})
MICROSCOPE_LABELS = {"rlnVoltage": "voltage_kv", "rlnSphericalAberration": "cs_mm",
                     "rlnAmplitudeContrast": "amplitude_contrast"}
TomoShapes = Mapping[str, Sequence[int]] | Sequence[int] | None


@dataclass(frozen=True)
class ParticleTable:
    """A particle STAR read into core poses plus what is needed to write it back.

    Attributes
    ----------
    poses
        Positions (N, 3) Å with origins subtracted, from the tomogram centre (``frame`` CENTRED) or, for a
        corner-based file read without tomogram sizes, from the tomogram corner (``frame`` CORNER), RELION Euler
        angles (N, 3) deg
        (RELION 4/5 with subtomogram angles: the composed ``A_subtomogram · A_angle``), tomogram names (N,)
        exactly as in the file's name column.
    dialect
        Dialect the table was read as.
    origins_angst
        (N, 3) shifts in Å in the tomogram frame (zeros when the file has none): as read, or ``A_subtomogram ·
        origin`` with subtomogram angles; ``poses`` already has them subtracted.
    origin_units
        ``"angst"`` (rlnOriginX/Y/ZAngst), ``"px"`` (rlnOriginX/Y/Z) or ``None`` (no shift columns).
    coord_pixel_size_angst
        (N,) Å/px of the coordinate grid (and of ``tomo_shape_px``), or ``None`` when unknown.
    image_pixel_size_angst
        (N,) Å/px of the particle images (optics ``rlnImagePixelSize``; RELION 3.0: the single pixel size), or None.
    tomo_shape_px
        Tomogram size (nx, ny, nz) per file name at ``coord_pixel_size_angst`` (corner-based dialects), or None.
    random_subset
        (N,) 1-based half sets, or None. ``image_names``, ``ctf_image_names``, ``source_hashes``: (N,) or None.
    has_angles
        False when the file had no angle columns (angles are then zeros and are not written back).
    optics, optics_group
        Optics table as text (3.1/4/5) and (N,) group per particle, or None.
    general
        RELION 5 ``data_general`` key-value block as text, or None.
    extras
        Columns not interpreted, as text, rows in table order (index 0..N-1), written back unchanged.
    column_order
        Particle columns in file order. ``source_row``: (N,) 0-based row of each particle in the file.
    subtomogram_euler_deg
        (N, 3) ``rlnTomoSubtomogramRot/Tilt/Psi`` as read (RELION 4/5), or None when the table has none.
    box_euler_deg, box_origins_angst
        (N, 3) ``rlnAngle*`` (zeros when absent) and ``rlnOrigin*Angst`` as read, relative to the subtomogram box;
        None without subtomogram angles. Used to write RELION 4/5 back unchanged while the pose is unchanged.
    frame
        Origin of the positions: :attr:`PositionFrame.CENTRED` (default) or :attr:`PositionFrame.CORNER`.
    coord_pixel_column
        Column the file gave the coordinate pixel size in (``rlnPixelSize``, ``rlnImagePixelSize``, ...), or None.
    """

    poses: ParticlePoses
    dialect: Dialect
    origins_angst: np.ndarray
    origin_units: str | None
    coord_pixel_size_angst: np.ndarray | None
    image_pixel_size_angst: np.ndarray | None
    tomo_shape_px: dict[str, tuple[int, int, int]] | None
    random_subset: np.ndarray | None
    image_names: np.ndarray | None
    ctf_image_names: np.ndarray | None
    source_hashes: np.ndarray | None
    has_angles: bool
    optics: pd.DataFrame | None
    optics_group: np.ndarray | None
    general: pd.DataFrame | None
    extras: pd.DataFrame
    column_order: tuple[str, ...]
    source_row: np.ndarray
    header_comments: tuple[str, ...] = ()
    subtomogram_euler_deg: np.ndarray | None = None
    box_euler_deg: np.ndarray | None = None
    box_origins_angst: np.ndarray | None = None
    frame: PositionFrame = PositionFrame.CENTRED
    coord_pixel_column: str | None = None

    def __len__(self) -> int:
        return len(self.poses)

    def take(self, index: np.ndarray) -> ParticleTable:
        """Rows ``index`` (integer indices or a boolean mask), in that order; everything else kept."""
        index = np.arange(len(self))[np.asarray(index)]

        def pick(values: np.ndarray | None) -> np.ndarray | None:
            return None if values is None else values[index]

        return replace(self, poses=self.poses.subset(index), origins_angst=self.origins_angst[index],
                       coord_pixel_size_angst=pick(self.coord_pixel_size_angst),
                       image_pixel_size_angst=pick(self.image_pixel_size_angst),
                       random_subset=pick(self.random_subset), image_names=pick(self.image_names),
                       ctf_image_names=pick(self.ctf_image_names), source_hashes=pick(self.source_hashes),
                       optics_group=pick(self.optics_group), source_row=self.source_row[index],
                       extras=self.extras.iloc[index].reset_index(drop=True),
                       subtomogram_euler_deg=pick(self.subtomogram_euler_deg), box_euler_deg=pick(self.box_euler_deg),
                       box_origins_angst=pick(self.box_origins_angst))


# --- detection -------------------------------------------------------------------------------------------------------


def particle_block_name(blocks: Mapping[str, StarBlock], where: str = "particle STAR") -> str:
    """The particle table: ``data_particles`` if present, else the only loop block besides optics/general."""
    if "particles" in blocks:
        return "particles"
    loops = [name for name, block in blocks.items() if block.is_loop and name not in ("optics", "general")]
    if len(loops) != 1:
        raise InputError(f"{where}: no data_particles block and {len(loops)} other loop blocks ({loops}); "
                         "expected one")
    return loops[0]


def detect_dialect(blocks: Mapping[str, StarBlock], where: str = "particle STAR") -> Dialect:
    """Dialect from blocks and particle columns (rules in order; the first that applies wins).

    1. any ``wrpCoordinateX1`` / ``wrpSourceName`` column → M species;
    2. ``rlnCenteredCoordinateXAngst`` → RELION 5;
    3. a ``data_optics`` block: RELION 4 if the optics table has ``rlnTomoTiltSeriesPixelSize`` (RELION 4 writes
       it in every tomography optics table) or the particles have ``rlnTomoName`` with ``rlnTomoSubtomogramRot``;
       else 3.1 (a 3.1 file may carry ``rlnTomoName``/``rlnTomoParticleName`` as plain extra columns);
    4. no optics: ``rlnTomoName`` without ``rlnMagnification`` → RELION 4 (TOMOMAN writes it so); ``rlnPixelSize``
       or ``.tomostar`` micrograph names → Warp 3D export; ``rlnMicrographName`` → RELION 3.0 (a carried
       ``rlnTomoName`` stays an extra column there).
    """
    columns = set(blocks[particle_block_name(blocks, where)].table.columns)
    optics = blocks.get("optics")
    if {"wrpCoordinateX1", "wrpSourceName"} & columns:
        return Dialect.M_SPECIES
    if "rlnCenteredCoordinateXAngst" in columns:
        return Dialect.RELION5
    if optics is not None:
        subtomogram_box = {"rlnTomoName", "rlnTomoSubtomogramRot"} <= columns
        relion4 = "rlnTomoTiltSeriesPixelSize" in optics.table.columns or subtomogram_box
        return Dialect.RELION4 if relion4 else Dialect.RELION31
    if "rlnTomoName" in columns and "rlnMagnification" not in columns:  # RELION 4 keeps optics per group
        return Dialect.RELION4
    table = blocks[particle_block_name(blocks, where)].table
    if "rlnPixelSize" in columns or ("rlnMicrographName" in columns and len(table)
                                     and table["rlnMicrographName"].str.endswith(".tomostar").any()):
        return Dialect.WARP3D
    if "rlnMicrographName" in columns or "rlnCoordinateX" in columns:
        return Dialect.RELION30
    stopgap = " (a STOPGAP motivelist, not a RELION particle STAR: convert it to RELION first)" \
        if {"motl_idx", "orig_x"} <= columns else ""
    raise InputError(f"{where}: cannot tell the STAR dialect{stopgap}: no particle coordinates (expected "
                     f"rlnCoordinateX/Y/Z, rlnCenteredCoordinateX/Y/ZAngst or wrpCoordinateX1; columns are "
                     f"{sorted(columns)[:12]})")


def _check_mixed(path: Path, dialect: Dialect, columns: set[str], has_optics: bool) -> None:
    """Columns of two dialects in one file → InputError naming them."""
    if "rlnOriginX" in columns and "rlnOriginXAngst" in columns:
        raise InputError(f"{path}: both rlnOriginX (px, RELION 3.0) and rlnOriginXAngst (Å, RELION 3.1+) columns")
    if has_optics:
        old = sorted(columns & {"rlnMagnification", "rlnDetectorPixelSize", "rlnOriginX"})
        if old:
            raise InputError(f"{path}: RELION 3.0 column(s) {old} in a file with a data_optics table ({dialect})")
        return
    new = sorted(columns & {"rlnOpticsGroup", "rlnImagePixelSize", "rlnMicrographPixelSize", "rlnOriginXAngst"})
    if dialect in PX_ORIGIN_DIALECTS and new:
        raise InputError(f"{path}: optics-table column(s) {new} in a RELION {dialect} file without data_optics")
    if "rlnOpticsGroup" in columns:
        raise InputError(f"{path}: rlnOpticsGroup refers to a data_optics table that the file does not have")


# --- reading ---------------------------------------------------------------------------------------------------------


def _numeric(table: pd.DataFrame, column: str, where: str) -> np.ndarray:
    """Text column → float64; a value that is not a number is an InputError naming column, row and value."""
    values = pd.to_numeric(table[column], errors="coerce").to_numpy(dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        row = int(bad[0])
        raise InputError(f"{where}: column {column}, row {row + 1}: expected a number, got "
                         f"{table[column].iloc[row]!r} ({bad.size} bad value(s))")
    return values


def _integers(table: pd.DataFrame, column: str, where: str) -> np.ndarray:
    values = _numeric(table, column, where)
    bad = np.flatnonzero(values != np.round(values))
    if bad.size:
        raise InputError(f"{where}: column {column}, row {int(bad[0]) + 1}: expected an integer, got "
                         f"{table[column].iloc[int(bad[0])]!r}")
    return values.astype(np.int64)


def _xyz(table: pd.DataFrame, columns: Sequence[str], where: str) -> np.ndarray:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise InputError(f"{where}: missing column(s) {missing} (have {list(table.columns)[:12]})")
    return np.stack([_numeric(table, c, where) for c in columns], axis=1)


def _optics_values(optics: pd.DataFrame, groups: np.ndarray, column: str, where: str) -> np.ndarray:
    """Per-particle value of optics ``column`` through ``rlnOpticsGroup``."""
    by_group = pd.Series(_numeric(optics, column, f"{where} data_optics"),
                         index=_integers(optics, "rlnOpticsGroup", f"{where} data_optics"))
    if by_group.index.has_duplicates:
        raise InputError(f"{where}: data_optics lists an rlnOpticsGroup twice")
    values = by_group.reindex(groups).to_numpy()
    bad = np.flatnonzero(np.isnan(values))
    if bad.size:
        raise InputError(f"{where}: column rlnOpticsGroup, row {int(bad[0]) + 1}: group {groups[bad[0]]} is not in "
                         "data_optics")
    return values


# Which pixel size each writer's coordinates use (read in warpem/warp at e321344 and 3dem/relion at tag 5.0.1):
# * RELION 4/5: rlnCoordinateX/Y/Z are in (unbinned) tilt-series pixels, rlnTomoTiltSeriesPixelSize
#   (src/jaz/tomography/particle_set.cpp:606-614, see ../shared/reference/relion5_contract.md §B5); RELION 5 writes
#   rlnCenteredCoordinate*Angst instead, which the reader prefers wherever present.
# * WarpTools ts_export_particles --2d: WarpLib/TiltSeries/TiltSeries.ReconstructParticleSeries.cs:200 writes
#   Position0 = position_Å / options.BinnedPixelSizeMean, i.e. particle pixels (= rlnImagePixelSize), with
#   rlnTomoName = RootName + ".tomostar" (:208). Older WarpTools put the tilt-series pixel size in
#   rlnTomoTiltSeriesPixelSize (the corpus' 1.667 and 0.789 Å files, coordinates 7.2x and 5.1x too small at it);
#   newer ones write the particle pixel size there (WarpTools/Commands/Tiltseries/ExportParticlesTiltseries.cs:
#   889-894: "keeps legacy rlnCoordinateX/Y/Z in particle pixels"), so rlnImagePixelSize is right for both.
# * WarpTools --3d (and Warp 1.x): ExportParticlesTiltseries.cs:786-790 write position_Å / output pixel size, the
#   same value as rlnDetectorPixelSize (magnification 10000) and rlnPixelSize.
# * WarpTools ts_template_match: TiltSeries.MatchFull.cs:1260 writes fractions of the volume (see _check_fractions).
def is_warptools_export(table: pd.DataFrame, optics: pd.DataFrame | None) -> bool:
    """A WarpTools ``ts_export_particles`` table: every ``rlnTomoName`` is a ``.tomostar`` and the optics carry
    ``rlnTomoSubtomogramBinning`` and ``rlnImagePixelSize`` (RELION's own files name tomograms without ``.tomostar``;
    mspecies' optics tables carry no binning)."""
    return (optics is not None and {"rlnTomoSubtomogramBinning", "rlnImagePixelSize"} <= set(optics.columns)
            and "rlnTomoName" in table.columns and len(table) > 0
            and bool(table["rlnTomoName"].astype(str).str.endswith(".tomostar").all()))


def _pixel_sizes(dialect: Dialect, table: pd.DataFrame, optics: pd.DataFrame | None, groups: np.ndarray | None,
                 where: str) -> tuple[np.ndarray | None, np.ndarray | None, str | None]:
    """(coordinate, image) pixel sizes (N,) Å/px found in the file, None where it carries none, and the column
    the coordinate pixel size came from.

    RELION 3.0 layouts: ``rlnDetectorPixelSize · 1e4 / rlnMagnification``, else a per-particle ``rlnPixelSize``
    (Warp), else ``rlnDetectorPixelSize`` alone (tomoDRGN writes its pixel size there, without a magnification:
    RELION's own 3.0 default magnification is 10000). Optics dialects: :data:`COORD_PIXEL_COLUMNS` of the optics
    table, ``rlnImagePixelSize`` for a WarpTools export (:func:`is_warptools_export`); a file without optics table
    (TOMOMAN's RELION 4 layout): a per-particle ``rlnPixelSize``.
    """
    columns = set(table.columns)
    if dialect in PX_ORIGIN_DIALECTS:
        if {"rlnDetectorPixelSize", "rlnMagnification"} <= columns:
            pixel = _numeric(table, "rlnDetectorPixelSize", where) * 1e4 / _numeric(table, "rlnMagnification", where)
            return pixel, pixel, "rlnDetectorPixelSize"
        for column in ("rlnPixelSize", "rlnDetectorPixelSize"):
            if column in columns:
                pixel = _numeric(table, column, where)
                return pixel, pixel, column
        return None, None, None
    if optics is None or groups is None:
        if "rlnPixelSize" in columns and dialect in SUBTOMOGRAM_DIALECTS:
            pixel = _numeric(table, "rlnPixelSize", where)
            return pixel, None, "rlnPixelSize"
        return None, None, None
    candidates = ("rlnImagePixelSize",) if is_warptools_export(table, optics) else COORD_PIXEL_COLUMNS[dialect]
    found = [c for c in candidates if c in optics.columns]
    coord = _optics_values(optics, groups, found[0], where) if found else None
    image = (_optics_values(optics, groups, "rlnImagePixelSize", where)
             if "rlnImagePixelSize" in optics.columns else None)
    return coord, image, found[0] if found else None


def _carried_pixel_sizes(table: pd.DataFrame, optics: pd.DataFrame | None) -> str:
    """Pixel-size columns present in the file with their first value, for messages (``"rlnPixelSize 1.96"``)."""
    parts = []
    for prefix, frame in (("", table), ("data_optics ", optics)):
        if frame is not None and len(frame):
            parts += [f"{prefix}{label} {frame[label].iloc[0]}" for label in frame.columns if "PixelSize" in label]
    return ", ".join(parts)


def _resolve_pixel(found: np.ndarray | None, given: float | None, n: int, dialect: Dialect,
                   needed: bool, where: str, carried: str = "") -> np.ndarray | None:
    """Coordinate pixel size: the file's, else the caller's; InputError when needed and neither is there."""
    if found is not None:
        if given is not None and not np.allclose(found, given, rtol=1e-4):
            raise InputError(f"{where}: the file gives a coordinate pixel size of {found[0]:g} Å "
                             f"({' or '.join(COORD_PIXEL_COLUMNS[dialect])}) but {given:g} Å was passed")
        if np.any(found <= 0):
            raise InputError(f"{where}: coordinate pixel size must be > 0, got {found.min():g}")
        return found
    if given is not None:
        if not given > 0:
            raise InputError(f"coord_pixel_size_angst must be > 0, got {given}")
        return np.full(n, float(given))
    if not needed:
        return None
    looked = " or ".join(COORD_PIXEL_COLUMNS[dialect]) or "no column (M species tables carry none)"
    other = f"; the file carries {carried}, which this dialect does not define as the coordinate pixel size " \
            "(pass its value if the coordinates are in those pixels)" if carried else ""
    raise InputError(f"{where}: RELION/Warp dialect {dialect}: the coordinate pixel size is missing (looked for "
                     f"{looked}){other}; pass it (--coord-pixel-size-angst)")


def tomo_shape_lookup(shapes: TomoShapes, names: Sequence[str]) -> dict[str, tuple[int, int, int]] | None:
    """Tomogram size (nx, ny, nz) px for each of ``names``: one size for all, or a mapping by name.

    A mapping key matches a name exactly or after :func:`~mspecies.formats.tomo_names.normalise_tomo_name`.
    Returns None when ``shapes`` is None; names without a size are an InputError listing them.
    """
    if shapes is None:
        return None
    if not isinstance(shapes, Mapping):
        shape = tuple(int(v) for v in shapes)
        if len(shape) != 3 or min(shape) < 1:
            raise InputError(f"tomogram size must be three positive integers (nx, ny, nz), got {shapes}")
        return {name: shape for name in names}  # type: ignore[misc]
    normalised = {normalise_tomo_name(str(key)).lower(): key for key in shapes}
    out: dict[str, tuple[int, int, int]] = {}
    for name in names:
        key = name if name in shapes else normalised.get(normalise_tomo_name(name).lower())
        if key is not None:
            out[name] = tuple(int(v) for v in shapes[key])  # type: ignore[assignment]
    missing = [name for name in names if name not in out]
    if missing:
        raise InputError(f"no tomogram size for {len(missing)} tomogram(s): {missing[:5]} (sizes given for "
                         f"{list(shapes)[:5]})")
    return out


def _centres_angst(names: np.ndarray, shapes: dict[str, tuple[int, int, int]], pixel_angst: np.ndarray) -> np.ndarray:
    """(N, 3) tomogram centres in Å from the corner: (shape // 2) · pixel (``docs/conventions.md``)."""
    codes, uniques = pd.factorize(pd.Series(names, dtype=object))
    centre_px = np.array([[s // 2 for s in shapes[str(u)]] for u in uniques], dtype=np.float64).reshape(-1, 3)
    return centre_px[codes] * pixel_angst[:, None]




def _angles(table: pd.DataFrame, roles: Mapping[str, str], where: str) -> tuple[np.ndarray, bool]:
    columns = [roles[r] for r in ("rot", "tilt", "psi")]
    present = [c for c in columns if c in table.columns]
    if not present:
        return np.zeros((len(table), 3)), False
    if len(present) != 3:
        raise InputError(f"{where}: angle column(s) {present} without {[c for c in columns if c not in present]}; "
                         "RELION ZYZ Euler angles need all three (rot, tilt, psi)")
    return np.stack([_numeric(table, c, where) for c in columns], axis=1), True


# RELION 4/5 subtomogram orientation. Read in 3dem/relion (ver5.0 = master 73f0a3c0),
# src/jaz/tomography/particle_set.cpp: getSubtomogramMatrix (l. 381) is Euler::anglesToMatrix3 of
# rlnTomoSubtomogramRot/Tilt/Psi (identity without those columns), getParticleMatrix (l. 400) the same of
# rlnAngleRot/Tilt/Psi (identity without them), getMatrix3x3 (l. 419-425) returns A_subtomogram * A_particle, and
# getMatrix4x4 (l. 428, "maps coordinates from particle space to tomogram space") uses that product;
# getPosition (l. 356-379) subtracts A_subtomogram * (rlnOriginX/Y/ZAngst) / pixel from the coordinate.
# src/jaz/math/Euler_angles_relion.h, Euler::anglesToMatrix3 (l. 38-48) has the same entries as src/euler.cpp
# Euler_angles2matrix (l. 52-91), i.e. our euler_to_matrix, not its transpose (Euler::test compares the two).
def _matrix_to_euler_exact(matrix: np.ndarray) -> np.ndarray:
    """(N, 3, 3) rotations → (N, 3) RELION (rot, tilt, psi) deg that reproduce them to rounding, even near tilt 0.

    Same angles as :func:`~mspecies.common.euler.matrix_to_euler` (tilt in [0, 180]) away from gimbal lock; near
    it psi is taken from the rotation left after rot and tilt, so no part of the rotation is lost.
    """
    euler = matrix_to_euler(matrix)
    m = np.asarray(matrix, dtype=np.float64)
    sin_tilt = np.hypot(m[..., 2, 0], m[..., 2, 1])
    rot = np.where(sin_tilt > 0, np.rad2deg(np.arctan2(m[..., 2, 1], m[..., 2, 0])), 0.0)
    tilt = np.rad2deg(np.arctan2(sin_tilt, m[..., 2, 2]))
    rest = m @ np.swapaxes(euler_to_matrix(np.stack([rot, tilt, np.zeros_like(rot)], axis=-1)), -1, -2)
    psi = np.rad2deg(np.arctan2(rest[..., 0, 1], rest[..., 0, 0]))  # rest = euler_to_matrix(0, 0, psi)
    exact = np.stack([rot, tilt, psi], axis=-1)
    error = np.abs(euler_to_matrix(euler) - m).max(axis=(-2, -1))
    return np.where((error > 1e-12)[..., None], exact, euler)


def compose_subtomogram_pose(subtomogram_euler_deg: np.ndarray, box_euler_deg: np.ndarray) -> np.ndarray:
    """RELION 4/5 pose in the tomogram: Euler angles of ``A_subtomogram · A_angle`` (RELION ``getMatrix3x3``)."""
    matrix = euler_to_matrix(subtomogram_euler_deg) @ euler_to_matrix(box_euler_deg)
    return _matrix_to_euler_exact(matrix)


def _subtomogram_angles(table: pd.DataFrame, where: str) -> np.ndarray | None:
    present = [c for c in SUBTOMOGRAM_COLUMNS if c in table.columns]
    if not present:
        return None
    if len(present) != 3:
        raise InputError(f"{where}: subtomogram angle column(s) {present} without "
                         f"{[c for c in SUBTOMOGRAM_COLUMNS if c not in present]}; all three are needed")
    return np.stack([_numeric(table, c, where) for c in SUBTOMOGRAM_COLUMNS], axis=1)


def subtomogram_box_values(table: ParticleTable) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(subtomogram angles, ``rlnAngle*``, ``rlnOrigin*Angst``) (N, 3) to write RELION 4/5, or None without them.

    ``rlnAngle* = Aᵀ_subtomogram · A`` and ``rlnOrigin* = Aᵀ_subtomogram · origin`` from the table's pose and
    shift, replaced by the values as read in rows where those give the same rotation (1e-9) and shift (1e-6 Å).
    """
    if table.subtomogram_euler_deg is None:
        return None
    sub = table.subtomogram_euler_deg
    sizes = {len(v) for v in (sub, table.box_euler_deg, table.box_origins_angst) if v is not None}
    if sizes != {len(table)}:
        raise ValueError(f"subtomogram angles / box values have {sorted(sizes)} rows for a table of {len(table)}; "
                         "tables built with dataclasses.replace must set them for every row (zeros: identity)")
    inverse = np.swapaxes(euler_to_matrix(sub), -1, -2)
    box_matrix = inverse @ euler_to_matrix(table.poses.euler_zyz_deg)
    box = _matrix_to_euler_exact(box_matrix)
    origins = np.einsum("nij,nj->ni", inverse, table.origins_angst)
    if table.box_euler_deg is not None:
        same = np.abs(euler_to_matrix(table.box_euler_deg) - box_matrix).max(axis=(1, 2), initial=0) <= 1e-9
        box = np.where(same[:, None], table.box_euler_deg, box)
    if table.box_origins_angst is not None:
        same = np.abs(table.box_origins_angst - origins).max(axis=1, initial=0) <= 1e-6
        origins = np.where(same[:, None], table.box_origins_angst, origins)
    return sub, box, origins


def _origins(dialect: Dialect, table: pd.DataFrame, pixel: np.ndarray | None, where: str
             ) -> tuple[np.ndarray, str | None]:
    """(N, 3) shifts in Å and their unit in the file."""
    if dialect == Dialect.M_SPECIES:
        return np.zeros((len(table), 3)), None
    columns = set(table.columns)
    if "rlnOriginXAngst" in columns or "rlnOriginYAngst" in columns:
        names = [f"rlnOrigin{a}Angst" for a in _XYZ]
        return np.stack([_numeric(table, c, where) if c in columns else np.zeros(len(table)) for c in names], 1), \
            "angst"
    if "rlnOriginX" in columns or "rlnOriginY" in columns:
        if pixel is None:
            raise InputError(f"{where}: rlnOriginX is in pixels but the pixel size is unknown")
        names = [f"rlnOrigin{a}" for a in _XYZ]
        shifts_px = np.stack([_numeric(table, c, where) if c in columns else np.zeros(len(table)) for c in names], 1)
        return shifts_px * pixel[:, None], "px"  # RELION 3.0: shifts in the coordinates' pixels
    return np.zeros((len(table), 3)), None


def _optional_text(table: pd.DataFrame, column: str) -> np.ndarray | None:
    return table[column].to_numpy(dtype=object) if column in table.columns else None


def _understood(dialect: Dialect, table: pd.DataFrame, name_column: str, pixel_column: str | None) -> set[str]:
    """Columns the reader interprets (rewritten by the writer); ``rlnPixelSize`` only where it gave the
    coordinate pixel size (elsewhere it is carried as read)."""
    roles = ROLE_COLUMNS[dialect]
    used = {c for role, c in roles.items() if role != "name"} | {name_column}
    used |= {f"rlnOrigin{a}{u}" for a in _XYZ for u in ("", "Angst")} if dialect != Dialect.M_SPECIES else set()
    if dialect in PX_ORIGIN_DIALECTS:
        used |= {"rlnMagnification", "rlnDetectorPixelSize"}
    if pixel_column == "rlnPixelSize":
        used.add(pixel_column)
    if dialect in OPTICS_DIALECTS:
        used.add("rlnOpticsGroup")
    return used & set(table.columns)


def _name_column(dialect: Dialect, columns: Sequence[str], where: str) -> str:
    candidates = {Dialect.RELION31: ("rlnTomoName", "rlnMicrographName"),
                  Dialect.RELION4: ("rlnTomoName",), Dialect.RELION5: ("rlnTomoName",)}.get(
        dialect, (ROLE_COLUMNS[dialect]["name"],))
    for column in candidates:
        if column in columns:
            return column
    raise InputError(f"{where}: dialect {dialect} needs a tomogram name column ({' or '.join(candidates)})")


def _check_centred_vs_corner(table: pd.DataFrame, positions_angst: np.ndarray, origins: np.ndarray,
                             pixel: np.ndarray | None, shapes: dict | None, names: np.ndarray, where: str) -> bool:
    """RELION 5 file that also has rlnCoordinateX: check both agree (True) when pixel and sizes allow it."""
    if "rlnCoordinateX" not in table.columns or pixel is None or shapes is None:
        return False
    corner = _xyz(table, list(_CORNER_PX.values()), where) * pixel[:, None] - _centres_angst(names, shapes, pixel)
    error = np.abs(corner - origins - positions_angst).max(axis=1)
    bad = np.flatnonzero(error > 0.01)
    if bad.size:
        raise InputError(f"{where}: row {int(bad[0]) + 1}: rlnCoordinateX/Y/Z and rlnCenteredCoordinateX/Y/ZAngst "
                         f"disagree by {error[bad[0]]:.3f} Å (mixed dialects?)")
    return True


def _check_3d(table: pd.DataFrame, where: str) -> None:
    """A file with rlnCoordinateX/Y but no rlnCoordinateZ (nor centred Å) holds 2D single-particle picks: refuse it
    for that, before any question about pixel or tomogram sizes."""
    columns = set(table.columns)
    if {"rlnCoordinateX", "rlnCoordinateY"} <= columns and "rlnCoordinateZ" not in columns and \
            "rlnCenteredCoordinateZAngst" not in columns:
        raise InputError(f"{where}: no rlnCoordinateZ: a 2D (single-particle) file with rlnCoordinateX/Y only; "
                         "sub-tomogram particles need 3D positions (rlnCoordinateX/Y/Z or "
                         "rlnCenteredCoordinateX/Y/ZAngst)")


def _check_fractions(coordinates_px: np.ndarray, columns: Sequence[str], where: str) -> None:
    """Refuse coordinates that are all within [0, 1] and not all whole: fractions of the tomogram (WarpTools
    ts_template_match, TiltSeries.MatchFull.cs:1260, position / volume size), which read as pixels would put every
    particle within a pixel of the corner."""
    if coordinates_px.size and coordinates_px.min() >= 0 and coordinates_px.max() <= 1 and \
            np.any(coordinates_px != np.round(coordinates_px)):
        raise InputError(f"{where}: every {'/'.join(columns)} is within [0, 1]: these are fractions of the tomogram "
                         "(as WarpTools ts_template_match writes them), not pixels. Convert them to pixels first, "
                         "e.g. WarpTools ts_export_particles --normalized_coords (x (size - 1) in tilt-series pixels)")


def _interpreted_numbers(forced: Dialect | None) -> FloatColumns:
    """For :func:`read_star_text`: the particle columns this reader turns into numbers (coordinates, angles, shifts,
    subsets, optics groups, RELION 3.0 pixel columns), parsed as float64 by the C parser. Every other column,
    carried back unchanged, stays text."""

    def choose(headers: Mapping[str, list[str]]) -> dict[str, set[str]]:
        blocks = {name: StarBlock(name, pd.DataFrame(columns=columns)) for name, columns in headers.items()}
        try:
            name = particle_block_name(blocks)
            dialect = forced or detect_dialect(blocks)
        except InputError:
            return {}  # the full read reports it
        roles = ROLE_COLUMNS[dialect]
        wanted = {roles[r] for r in ("x", "y", "z", "rot", "tilt", "psi", "subset")}
        if dialect != Dialect.M_SPECIES:
            wanted |= {f"rlnOrigin{a}{u}" for a in _XYZ for u in ("", "Angst")} | {"rlnOpticsGroup"}
        if dialect in SUBTOMOGRAM_DIALECTS:
            wanted |= set(SUBTOMOGRAM_COLUMNS)
        if dialect in PX_ORIGIN_DIALECTS:
            wanted |= {"rlnMagnification", "rlnDetectorPixelSize"}
        return {name: wanted & set(headers[name])}

    return choose


def read_particle_star(path: str | Path, dialect: Dialect | str | None = None, *,
                       coord_pixel_size_angst: float | None = None, tomo_shape_px: TomoShapes = None
                       ) -> ParticleTable:
    """Read a particle STAR of any supported dialect.

    Parameters
    ----------
    path
        STAR file.
    dialect
        Force a dialect; detected by :func:`detect_dialect` when None.
    coord_pixel_size_angst
        Å/px of the coordinate grid, used only when the file does not carry it (must agree when it does).
    tomo_shape_px
        (nx, ny, nz) for all tomograms or a mapping name → (nx, ny, nz), px at the coordinate pixel size. With it,
        corner-based dialects (3.0, 3.1, 4, warp3d, warp) are centred (``frame`` CENTRED); without it their
        positions stay in Å from the tomogram corner (``frame`` CORNER), which is all that converting between
        corner-based dialects or comparing files of the same tomograms needs. A size changes the result only where
        the corner and centred frames meet (RELION 5 ⇄ the others, Scipion).
    """
    path = Path(path)
    forced = Dialect(dialect) if dialect is not None else None
    blocks, comments = read_star_text(path, _interpreted_numbers(forced))
    block_name = particle_block_name(blocks, str(path))
    where = f"{path} data_{block_name}"
    table = blocks[block_name].table.reset_index(drop=True)
    _check_3d(table, where)
    dialect = Dialect(dialect) if dialect is not None else detect_dialect(blocks, str(path))
    optics = blocks["optics"].table if "optics" in blocks else None
    _check_mixed(path, dialect, set(table.columns), optics is not None)
    n = len(table)
    roles = ROLE_COLUMNS[dialect]
    name_column = _name_column(dialect, list(table.columns), where)
    names = table[name_column].to_numpy(dtype=object)
    groups = None
    if dialect in OPTICS_DIALECTS and optics is not None:
        if "rlnOpticsGroup" not in table.columns:
            raise InputError(f"{where}: the file has data_optics but no rlnOpticsGroup column")
        groups = _integers(table, "rlnOpticsGroup", where)
    corner = dialect in CORNER_DIALECTS
    coordinates = _xyz(table, [roles[a] for a in ("x", "y", "z")], where)
    if corner and dialect != Dialect.M_SPECIES:
        _check_fractions(coordinates, [roles[a] for a in ("x", "y", "z")], where)
    found_pixel, image_pixel, pixel_column = _pixel_sizes(dialect, table, optics, groups, where)
    shapes = tomo_shape_lookup(tomo_shape_px, [str(u) for u in pd.unique(pd.Series(names, dtype=object))])
    # px coordinates need the pixel size; M species' Å from the corner only to be centred ((N // 2) · pixel)
    needs_pixel = corner and n > 0 and (dialect != Dialect.M_SPECIES or shapes is not None)
    pixel = _resolve_pixel(found_pixel, coord_pixel_size_angst, n, dialect, needs_pixel, where,
                           _carried_pixel_sizes(table, optics))
    origins, origin_units = _origins(dialect, table, pixel, where)
    angles, has_angles = _angles(table, roles, where)
    subtomogram = _subtomogram_angles(table, where) if dialect in SUBTOMOGRAM_DIALECTS else None
    box_angles = box_origins = None
    if subtomogram is not None:  # RELION 4/5: into the tomogram frame (see compose_subtomogram_pose)
        box_angles, box_origins = angles, origins
        angles = compose_subtomogram_pose(subtomogram, box_angles)
        origins = np.einsum("nij,nj->ni", euler_to_matrix(subtomogram), box_origins)
    frame = PositionFrame.CORNER if corner and shapes is None else PositionFrame.CENTRED
    if corner:
        grid = pixel if pixel is not None else np.zeros(len(table))  # None: no rows, or M without a pixel size
        scale = 1.0 if dialect == Dialect.M_SPECIES else grid[:, None]  # M coordinates are already in Å
        positions = coordinates * scale - origins
        if shapes is not None:
            positions = positions - _centres_angst(names, shapes, grid)
    else:
        positions = coordinates - origins
    understood = _understood(dialect, table, name_column, pixel_column if found_pixel is not None else None)
    if subtomogram is not None:
        understood |= set(SUBTOMOGRAM_COLUMNS)
    if dialect == Dialect.RELION5 and _check_centred_vs_corner(table, positions, origins, pixel, shapes, names, where):
        understood |= set(_CORNER_PX.values())
    subset_column = roles["subset"]
    return ParticleTable(
        poses=ParticlePoses(positions, angles, names), dialect=dialect, origins_angst=origins,
        origin_units=origin_units, coord_pixel_size_angst=pixel, image_pixel_size_angst=image_pixel,
        tomo_shape_px=shapes,
        random_subset=_integers(table, subset_column, where) if subset_column in table.columns else None,
        image_names=_optional_text(table, roles.get("image", "")), ctf_image_names=_optional_text(
            table, roles.get("ctf", "")), source_hashes=_optional_text(table, "wrpSourceHash"),
        has_angles=has_angles, optics=optics, optics_group=groups,
        general=blocks["general"].table if "general" in blocks else None,
        extras=table[[c for c in table.columns if c not in understood]].copy(),
        column_order=tuple(table.columns), source_row=np.arange(n), header_comments=tuple(comments),
        subtomogram_euler_deg=subtomogram, box_euler_deg=box_angles, box_origins_angst=box_origins, frame=frame,
        coord_pixel_column=pixel_column if found_pixel is not None else None)
