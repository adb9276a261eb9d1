"""Scipion ``SetOfCoordinates3D`` / ``SetOfSubTomograms`` ⇄ particle STAR tables of every dialect.

Reading (:func:`read_star_for_tomograms`) links the STAR's tomogram names to tomogram ts ids
(:func:`~mspecies.formats.tomo_names.match_tomo_names`, rows of unmatched names are dropped and reported,
ambiguous names are an :class:`InputError`) and centres corner-based coordinates with the tomogram size *at the
STAR's coordinate pixel size* (default: tomogram dimensions × tomogram pixel size / STAR pixel size, rounded).

Scipion side (the pair must stay consistent so that STAR → Scipion → STAR is exact):

* ``Coordinate3D`` position = the STAR coordinate *before* the shift (``position + origin``), in px at the
  coordinate set's sampling rate (= the tomograms'), relative to the tomogram centre (``SCIPION`` origin);
  its matrix (``convention=None``) = :func:`~mspecies.convert.poses.relion_to_scipion_matrix` of the STAR
  angles and origin, with the translation in px at the coordinate set's sampling rate.
* ``SubTomogram`` transform (``convention=None``) = the same pose with the translation in px at the
  sub-tomogram sampling rate (image pixel size); its coordinate as above. ``_ctfImage`` (String) holds the
  3D CTF path (what reliontomo reads).
* Every item carries ``_starExtras`` (String, JSON object column → text) with the columns the STAR reader did
  not interpret, the per-particle optics values (voltage, Cs, image size, dimensionality ...) and, for M
  tables, ``wrpSourceHash``; ``_randomSubset`` (Integer) when the file has half sets. The same attributes are
  set on every item (a Scipion set stores the first item's attributes).

Writing (:func:`set_to_particle_table`) is the inverse: centred Å = position · sampling rate − origin.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from tomo.constants import SCIPION, TR_SCIPION

from mspecies.common.types import InputError, Microscope, ParticlePoses
from mspecies.formats.star import read_star_text
from mspecies.formats.star_dialects import (
    _OPTICS_PIXEL,
    CORNER_DIALECTS,
    OPTICS_LABELS,
    ROLE_COLUMNS,
    Dialect,
    ParticleTable,
    detect_dialect,
    particle_block_name,
)
from mspecies.formats.tomo_names import NameMatchReport, match_tomo_names

from .poses import relion_to_scipion_matrix, scipion_matrix_to_relion

EXTRAS_ATTR = "_starExtras"
SUBSET_ATTR = "_randomSubset"
CTF_ATTR = "_ctfImage"
TOMOSTAR_DIALECTS = frozenset({Dialect.M_SPECIES, Dialect.WARP3D})


@dataclass(frozen=True)
class TomogramInfo:
    """What the STAR conversion needs of one tomogram: size (nx, ny, nz) px at ``pixel_size_angst`` (Å/px)."""

    shape_px: tuple[int, int, int]
    pixel_size_angst: float


@dataclass(frozen=True)
class StarImport:
    """A particle STAR restricted to the rows whose tomogram matched a ts id.

    Attributes
    ----------
    table
        Matched rows only (positions centred Å, origins Å, RELION Euler angles).
    ts_ids
        (N,) ts id of each kept row.
    report
        Name matching outcome (log it; unmatched names' rows are not in ``table``).
    n_rows
        Rows in the file; ``n_rows - len(table)`` rows were skipped.
    """

    table: ParticleTable
    ts_ids: np.ndarray
    report: NameMatchReport
    n_rows: int

    @property
    def n_skipped(self) -> int:
        return self.n_rows - len(self.table)


# --- STAR → arrays for Scipion ---------------------------------------------------------------------------------------


def parse_tomo_size(text: str | None) -> tuple[int, int, int] | None:
    """``"nx ny nz"`` (px) → tuple, None for empty text; InputError otherwise."""
    if not text or not text.strip():
        return None
    parts = text.replace(",", " ").split()
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise InputError(f"tomogram size: expected three integers 'nx ny nz', got {text!r}") from None
    if len(shape) != 3 or min(shape) < 1:
        raise InputError(f"tomogram size: expected three positive integers 'nx ny nz', got {text!r}")
    return shape  # type: ignore[return-value]


def shape_at_pixel(info: TomogramInfo, pixel_size_angst: float) -> tuple[int, int, int]:
    """Tomogram size (nx, ny, nz) px rescaled to ``pixel_size_angst`` (rounded to whole pixels)."""
    ratio = info.pixel_size_angst / float(pixel_size_angst)
    return tuple(int(round(n * ratio)) for n in info.shape_px)  # type: ignore[return-value]


def star_dialect_and_names(path: str | os.PathLike[str], dialect: Dialect | str | None = None
                           ) -> tuple[Dialect, np.ndarray]:
    """Dialect (forced or detected) and the (N,) tomogram name of every particle row, as text."""
    blocks, _ = read_star_text(path)
    table = blocks[particle_block_name(blocks, str(path))].table
    dialect = Dialect(dialect) if dialect else detect_dialect(blocks, str(path))
    roles = ROLE_COLUMNS[dialect]
    # the reader's choice: RELION 3.1 prefers rlnTomoName over rlnMicrographName, others use their own column
    candidates = ["rlnTomoName", "rlnMicrographName"] if dialect == Dialect.RELION31 else [roles["name"]]
    column = next((c for c in candidates if c in table.columns), None)
    if column is None:
        raise InputError(f"{path}: dialect {dialect} needs a tomogram name column ({' or '.join(candidates[:2])})")
    return dialect, table[column].astype(str).to_numpy(dtype=object)


def _pixel_per_name(names: np.ndarray, pixel: np.ndarray, where: str) -> dict[str, float]:
    """One coordinate pixel size (Å) per tomogram name; differing sizes within one name are an InputError."""
    frame = pd.DataFrame({"name": names, "pixel": pixel}).groupby("name")["pixel"]
    spread = frame.max() - frame.min()
    if (spread > 1e-6 * frame.max()).any():
        raise InputError(f"{where}: tomogram {spread.idxmax()!r} has rows with different coordinate pixel sizes")
    return {str(k): float(v) for k, v in frame.first().items()}


def read_star_for_tomograms(path: str | os.PathLike[str], tomograms: Mapping[str, TomogramInfo], *,
                            dialect: Dialect | str | None = None, coord_pixel_size_angst: float | None = None,
                            tomo_size_px: Sequence[int] | None = None,
                            mapping: Mapping[str, str] | str | None = None) -> StarImport:
    """Read a particle STAR of any dialect and link its rows to ``tomograms`` (ts id → :class:`TomogramInfo`).

    Parameters
    ----------
    coord_pixel_size_angst
        Å/px of the STAR coordinates, used only when the file does not carry it (must agree if it does).
    tomo_size_px
        (nx, ny, nz) px at the STAR coordinate pixel size for every tomogram (corner-based dialects); default
        each tomogram's size rescaled with :func:`shape_at_pixel`.
    mapping
        ``{star name: ts id}`` or its text form ``"a=TS_01, b=TS_02"``; wins over automatic matching.

    Raises InputError for ambiguous names, no matched row, missing pixel size, bad columns or values.
    """
    from mspecies.formats.star_dialects import read_particle_star

    dialect, names = star_dialect_and_names(path, dialect)
    report = match_tomo_names(names, list(tomograms), mapping)
    report.raise_if_ambiguous()
    if not report.matches and len(names):
        raise InputError(f"{path}: no tomogram name of the STAR matches a tomogram ({list(report.unmatched)[:5]} "
                         f"vs {list(tomograms)[:5]}); give a name mapping")
    if dialect in CORNER_DIALECTS:
        first = read_particle_star(path, dialect, coord_pixel_size_angst=coord_pixel_size_angst,
                                   tomo_shape_px=(1, 1, 1))
        shapes = _shapes_for_names(first, report, tomograms, tomo_size_px, str(path))
        table = read_particle_star(path, dialect, coord_pixel_size_angst=coord_pixel_size_angst,
                                   tomo_shape_px=shapes)
    else:
        table = read_particle_star(path, dialect, coord_pixel_size_angst=coord_pixel_size_angst)
    ts_ids = report.ts_ids_for(table.poses.tomo_names.astype(str))
    keep = np.array([t is not None for t in ts_ids], dtype=bool)
    return StarImport(table=table.take(keep), ts_ids=ts_ids[keep], report=report, n_rows=len(table))


def _shapes_for_names(table: ParticleTable, report: NameMatchReport, tomograms: Mapping[str, TomogramInfo],
                      override: Sequence[int] | None, where: str) -> dict[str, tuple[int, int, int]]:
    """STAR name → tomogram size px at the STAR coordinate pixel size (placeholder for unmatched names)."""
    names = table.poses.tomo_names.astype(str)
    pixel = _pixel_per_name(names, table.coord_pixel_size_angst, where)
    shapes: dict[str, tuple[int, int, int]] = {}
    for name in pd.unique(pd.Series(names, dtype=object)):
        ts_id = report.matches.get(name)
        if ts_id is None:
            shapes[name] = (1, 1, 1)  # rows dropped
        elif override is not None:
            shapes[name] = tuple(int(v) for v in override)  # type: ignore[assignment]
        else:
            shapes[name] = shape_at_pixel(tomograms[ts_id], pixel[name])
    return shapes


def joined_extras(table: ParticleTable) -> pd.DataFrame:
    """(N rows) text columns to carry on Scipion items: uninterpreted columns, per-particle optics values
    (without groups and pixel sizes) and ``wrpSourceHash``."""
    extras = table.extras.reset_index(drop=True).copy()
    if table.optics is not None and table.optics_group is not None:
        skip = {"rlnOpticsGroup", "rlnOpticsGroupName", *_OPTICS_PIXEL}
        optics = table.optics.set_index(pd.to_numeric(table.optics["rlnOpticsGroup"]).to_numpy())
        for column in optics.columns:
            if column not in skip and column not in extras.columns and column in OPTICS_LABELS:
                extras[column] = optics[column].reindex(table.optics_group).to_numpy(dtype=object)
    if table.source_hashes is not None and "wrpSourceHash" not in extras.columns:
        extras["wrpSourceHash"] = table.source_hashes
    return extras.astype(str)


def extras_to_json(extras: pd.DataFrame) -> list[str]:
    """One JSON object (column → text) per row, in row order."""
    if extras.shape[1] == 0:
        return ["{}"] * len(extras)
    return [json.dumps(row, ensure_ascii=False) for row in extras.to_dict(orient="records")]


def extras_from_json(texts: Sequence[str | None]) -> pd.DataFrame:
    """Inverse of :func:`extras_to_json`; columns in order of first appearance, missing values empty text."""
    records = [json.loads(t) if t else {} for t in texts]
    columns = list(dict.fromkeys(key for record in records for key in record))
    frame = pd.DataFrame.from_records(records, columns=columns) if columns else pd.DataFrame(index=range(len(texts)))
    return frame.fillna("").astype(str).reset_index(drop=True)


@dataclass(frozen=True)
class ScipionParticles:
    """Per-row values to build Scipion items (all (N, ...) arrays, rows in STAR order).

    ``positions_px``: coordinate before the shift, px at ``coord_sampling_rate`` (Å/px), relative to the tomogram
    centre. ``coord_matrices``: Scipion 4x4 with translation px at ``coord_sampling_rate``.
    ``subtomo_matrices``: same pose with translation px at ``image_sampling_rate`` (None without images).
    """

    ts_ids: np.ndarray
    positions_px: np.ndarray
    coord_matrices: np.ndarray
    subtomo_matrices: np.ndarray | None
    coord_sampling_rate: float
    image_sampling_rate: float | None
    image_names: np.ndarray | None
    ctf_image_names: np.ndarray | None
    random_subset: np.ndarray | None
    extras_json: list[str]


def resolve_star_path(name: str, folder: str) -> tuple[int, str]:
    """RELION image name (``file`` or ``index@file``) → (index, path); relative paths are taken from ``folder``."""
    index, _, file_name = name.rpartition("@") if "@" in name else ("", "", name)
    path = file_name if os.path.isabs(file_name) else os.path.normpath(os.path.join(folder, file_name))
    return (int(index) if index else 0), path


def star_import_to_scipion(star: StarImport, coord_sampling_rate: float, *, with_images: bool,
                           images_folder: str) -> ScipionParticles:
    """Arrays for Scipion items from a :class:`StarImport` (see the module docstring for the conventions).

    ``with_images``: build sub-tomogram values (needs ``rlnImageName``); otherwise image and CTF names are
    carried as extra columns.
    """
    table = star.table
    extras = joined_extras(table)
    unshifted_angst = table.poses.positions_angst + table.origins_angst
    coord_m = relion_to_scipion_matrix(table.poses.euler_zyz_deg, table.origins_angst, coord_sampling_rate)
    image_sr, subtomo_m, images, ctfs = None, None, None, None
    if with_images:
        if table.image_names is None:
            raise InputError("the STAR has no rlnImageName column: import it as coordinates")
        image_sr = _single_image_pixel(table)
        subtomo_m = relion_to_scipion_matrix(table.poses.euler_zyz_deg, table.origins_angst, image_sr)
        images = np.array([_with_index(str(n), resolve_star_path(str(n), images_folder)[1])
                           for n in table.image_names], dtype=object)
        if table.ctf_image_names is not None:
            ctfs = np.array([resolve_star_path(str(n), images_folder)[1] for n in table.ctf_image_names],
                            dtype=object)
    else:
        for column, values in (("rlnImageName", table.image_names), ("rlnCtfImage", table.ctf_image_names)):
            if values is not None:
                extras[column] = np.asarray(values, dtype=object).astype(str)
    return ScipionParticles(
        ts_ids=star.ts_ids, positions_px=unshifted_angst / coord_sampling_rate, coord_matrices=coord_m,
        subtomo_matrices=subtomo_m, coord_sampling_rate=coord_sampling_rate, image_sampling_rate=image_sr,
        image_names=images, ctf_image_names=ctfs, random_subset=table.random_subset,
        extras_json=extras_to_json(extras))


def _with_index(star_name: str, path: str) -> str:
    index = star_name.rpartition("@")[0] if "@" in star_name else ""
    return f"{index}@{path}" if index else path


def _single_image_pixel(table: ParticleTable) -> float:
    """The one image pixel size (Å/px) of all rows (image pixel size, else the coordinate pixel size)."""
    pixel = table.image_pixel_size_angst if table.image_pixel_size_angst is not None else table.coord_pixel_size_angst
    if pixel is None or not len(pixel):
        raise InputError("sub-tomograms: the STAR gives no image pixel size (rlnImagePixelSize / "
                         "rlnDetectorPixelSize); give the coordinate pixel size")
    if np.ptp(pixel) > 1e-6 * np.max(pixel):
        raise InputError(f"sub-tomograms: the STAR mixes image pixel sizes {sorted(set(np.round(pixel, 4)))}; "
                         "a Scipion set has one sampling rate")
    return float(pixel[0])


# --- Scipion → ParticleTable -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SetRows:
    """Values read from a Scipion set, one row per item: ts id, position px (SCIPION origin) at
    ``coord_sampling_rate``, 4x4 matrix (``convention=None``) with translation px at ``matrix_sampling_rate``."""

    ts_ids: np.ndarray
    positions_px: np.ndarray
    matrices: np.ndarray
    coord_sampling_rate: float
    matrix_sampling_rate: float
    image_names: np.ndarray | None
    ctf_image_names: np.ndarray | None
    random_subset: np.ndarray | None
    extras: pd.DataFrame


def _item_text(item, attribute: str) -> str | None:
    value = getattr(item, attribute, None)
    return None if value is None else value.get()


def _collect(items, get_coord, get_matrix, get_image) -> dict[str, list]:
    out: dict[str, list] = {"ts": [], "pos": [], "mat": [], "img": [], "ctf": [], "subset": [], "extras": []}
    for item in items:
        coord = get_coord(item)
        out["ts"].append(coord.getTomoId())
        out["pos"].append(coord.getPosition(SCIPION))
        out["mat"].append(get_matrix(item))
        out["img"].append(get_image(item))
        out["ctf"].append(_item_text(item, CTF_ATTR))
        subset = getattr(item, SUBSET_ATTR, None)
        out["subset"].append(None if subset is None else subset.get())
        out["extras"].append(_item_text(item, EXTRAS_ATTR))
    return out


def _image_name(subtomo) -> str:
    """RELION image name of a sub-tomogram: absolute path, ``index@path`` for stacks."""
    index, file_name = subtomo.getLocation()
    path = os.path.abspath(file_name)
    return f"{index:06d}@{path}" if index else path


def read_scipion_set(particles) -> SetRows:
    """``SetOfSubTomograms`` or ``SetOfCoordinates3D`` → :class:`SetRows` (one Python pass over the items)."""
    if hasattr(particles, "iterSubtomos"):
        coords = particles.getCoordinates3D()
        if coords is None or not coords.getSamplingRate():
            raise InputError("sub-tomograms: the set has no Coordinates3D with a sampling rate")
        coord_sr, matrix_sr = float(coords.getSamplingRate()), float(particles.getSamplingRate())
        rows = _collect(particles.iterSubtomos(), lambda s: s.getCoordinate3D(),
                        lambda s: s.getTransform(convention=TR_SCIPION).getMatrix(), _image_name)
        images = np.array(rows["img"], dtype=object)
        ctf = rows["ctf"]
        ctfs = np.array([os.path.abspath(c) if c else "" for c in ctf], dtype=object) if any(ctf) else None
    elif hasattr(particles, "iterCoordinates"):
        coord_sr = matrix_sr = float(particles.getSamplingRate() or 0)
        rows = _collect(particles.iterCoordinates(), lambda c: c,
                        lambda c: c.getMatrix(convention=TR_SCIPION), lambda c: None)
        images, ctfs = None, None
    else:
        raise InputError(f"expected SetOfCoordinates3D or SetOfSubTomograms, got {type(particles).__name__}")
    if not coord_sr:
        raise InputError("the coordinates have no sampling rate (pixel size)")
    if not rows["ts"]:
        raise InputError("the input set is empty")
    subsets = rows["subset"]
    return SetRows(
        ts_ids=np.array(rows["ts"], dtype=object), positions_px=np.array(rows["pos"], dtype=np.float64),
        matrices=np.array(rows["mat"], dtype=np.float64), coord_sampling_rate=coord_sr,
        matrix_sampling_rate=matrix_sr, image_names=images, ctf_image_names=ctfs,
        random_subset=np.array(subsets, dtype=np.int64) if all(s is not None for s in subsets) else None,
        extras=extras_from_json(rows["extras"]))


def star_tomo_names(ts_ids: np.ndarray, dialect: Dialect) -> np.ndarray:
    """Tomogram names to write: the ts id; ``<ts id>.tomostar`` for Warp/M (their tomogram file names)."""
    if dialect in TOMOSTAR_DIALECTS:
        return np.array([t if str(t).endswith(".tomostar") else f"{t}.tomostar" for t in ts_ids], dtype=object)
    return np.asarray(ts_ids, dtype=object)


def rows_to_particle_table(rows: SetRows, dialect: Dialect | str, coord_pixel_size_angst: float,
                           tomo_shape_px: Mapping[str, Sequence[int]] | None,
                           image_pixel_size_angst: float | None = None) -> ParticleTable:
    """:class:`SetRows` → :class:`ParticleTable` ready for ``write_particle_star``.

    ``coord_pixel_size_angst``: Å/px of the written coordinates; ``tomo_shape_px``: ts id → (nx, ny, nz) at that
    pixel size (corner-based dialects); ``image_pixel_size_angst``: sub-tomogram pixel size (None for coordinates).
    """
    dialect = Dialect(dialect)
    euler, origins = scipion_matrix_to_relion(rows.matrices, rows.matrix_sampling_rate)
    positions = rows.positions_px * rows.coord_sampling_rate - origins
    names = star_tomo_names(rows.ts_ids, dialect)
    shapes = None
    if tomo_shape_px is not None:
        shapes = {str(n): tuple(int(v) for v in tomo_shape_px[str(t)]) for n, t in zip(names, rows.ts_ids)}
    n = len(rows.ts_ids)
    extras = rows.extras
    for column in ("rlnImageName", "rlnCtfImage"):  # interpreted from the set itself when it has images
        if rows.image_names is not None and column in extras.columns:
            extras = extras.drop(columns=[column])
    return ParticleTable(
        poses=ParticlePoses(positions, euler, names), dialect=dialect, origins_angst=origins,
        origin_units="angst" if np.any(origins) else None,
        coord_pixel_size_angst=np.full(n, float(coord_pixel_size_angst)),
        image_pixel_size_angst=None if image_pixel_size_angst is None else np.full(n, float(image_pixel_size_angst)),
        tomo_shape_px=shapes, random_subset=rows.random_subset, image_names=rows.image_names,
        ctf_image_names=rows.ctf_image_names, source_hashes=None, has_angles=True, optics=None, optics_group=None,
        general=None, extras=extras, column_order=(), source_row=np.arange(n))


def export_set_to_star(particles, path: str | os.PathLike[str], dialect: Dialect | str, *,
                       tomograms: Mapping[str, TomogramInfo], coord_pixel_size_angst: float | None = None,
                       tomo_size_px: Sequence[int] | None = None, microscope: Microscope | None = None
                       ) -> ParticleTable:
    """Write a Scipion set as a particle STAR in ``dialect``; returns the table written.

    ``coord_pixel_size_angst`` default: the sub-tomogram sampling rate for RELION 3.0 / Warp 3D sub-tomograms
    (one pixel size in those files), else the coordinate set's. ``tomo_size_px``: (nx, ny, nz) at that pixel size
    for every tomogram, default :func:`shape_at_pixel` of ``tomograms`` (ts id → :class:`TomogramInfo`).
    """
    from mspecies.formats.star_write import write_particle_star

    dialect = Dialect(dialect)
    rows = read_scipion_set(particles)
    image_sr = rows.matrix_sampling_rate if rows.image_names is not None else None
    pixel = coord_pixel_size_angst or (image_sr if image_sr and dialect in (Dialect.RELION30, Dialect.WARP3D)
                                       else rows.coord_sampling_rate)
    shapes = None
    if dialect in CORNER_DIALECTS:
        missing = sorted(set(rows.ts_ids) - set(tomograms))
        if missing and tomo_size_px is None:
            raise InputError(f"no tomogram for ts id(s) {missing[:5]}: their size is needed by dialect {dialect}")
        shapes = {str(t): (tuple(tomo_size_px) if tomo_size_px is not None else shape_at_pixel(tomograms[t], pixel))
                  for t in set(rows.ts_ids)}
    table = rows_to_particle_table(rows, dialect, pixel, shapes, image_sr)
    write_particle_star(table, path, dialect, microscope=microscope)
    return table
