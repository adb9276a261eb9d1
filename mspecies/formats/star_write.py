"""Write a :class:`~mspecies.formats.star_dialects.ParticleTable` in any particle STAR dialect.

Columns the table does not interpret are written back as read, in the user's column order; interpreted columns
take the place of their counterpart in the source file, new ones follow. Shifts are written back as read
(``rlnOriginX/Y/ZAngst`` in Å, or ``rlnOriginX/Y/Z`` in coordinate pixels for RELION 3.0 / Warp 3D), so round
trips are exact; M species tables have no shift columns, so there the shifts are folded into the coordinates.

Optics: RELION 3.1.3 ignores a ``data_optics`` table without ``rlnVoltage``, ``rlnSphericalAberration`` and
``rlnAmplitudeContrast`` (and converts a 3.0 file only when those are per-particle columns), so converting into 3.0
or 3.1 requires them, from the table or from ``microscope``. A table written back in its own layout (3.1 as 3.1, 3.0
or Warp 3D as 3.0) carries what the input carried and needs nothing more: Warp-written 3.1 files and RELION's
refinements of them lack the amplitude contrast, and RELION read them as input. Converting from a table without an
optics table groups the per-particle optics columns (:data:`OPTICS_LABELS`) into optics groups; converting to 3.0,
Warp 3D or M joins the optics columns into every particle row. RELION 3.0 has one pixel size, so coordinates, shifts
and ``rlnDetectorPixelSize`` (with ``rlnMagnification = 10000``) use the coordinate pixel size there.

Subtomogram angles (RELION 4/5 ``rlnTomoSubtomogramRot/Tilt/Psi``, see :mod:`~mspecies.formats.star_dialects`):
written back to RELION 4/5 with ``rlnAngle*`` and ``rlnOrigin*Angst`` relative to the subtomogram box (the values
as read while pose and shift are unchanged); every other dialect gets the composed pose and the tomogram-frame shift.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from mspecies.common.euler import euler_to_matrix
from mspecies.common.types import InputError, Microscope
from mspecies.formats.star import StarBlock, write_star_text
from mspecies.formats.star_dialects import (
    _CORNER_PX,
    _OPTICS_PIXEL,
    _PIXEL_COLUMNS_30,
    CORNER_DIALECTS,
    MICROSCOPE_LABELS,
    OPTICS_DIALECTS,
    OPTICS_LABELS,
    PX_ORIGIN_DIALECTS,
    ROLE_COLUMNS,
    SUBTOMOGRAM_COLUMNS,
    SUBTOMOGRAM_DIALECTS,
    Dialect,
    ParticleTable,
    PositionFrame,
    TomoShapes,
    _centres_angst,
    subtomogram_box_values,
    tomo_shape_lookup,
)

_HEADER = {Dialect.RELION31: ("version 30001",), Dialect.RELION4: ("version 30001",),
           Dialect.RELION5: ("Relion star file version 50001",)}


def _pixel_for_writing(table: ParticleTable, override_angst: float | None, dialect: Dialect,
                       between_frames: bool) -> np.ndarray | None:
    if override_angst is not None:
        if not override_angst > 0:
            raise InputError(f"coord_pixel_size_angst must be > 0, got {override_angst}")
        return np.full(len(table), float(override_angst))
    needed = (dialect in CORNER_DIALECTS and dialect != Dialect.M_SPECIES) or between_frames
    if table.coord_pixel_size_angst is None and needed and len(table):
        raise InputError(f"writing dialect {dialect} needs the coordinate pixel size, which the {table.dialect} "
                         "table does not carry; pass it (--coord-pixel-size-angst)")
    return table.coord_pixel_size_angst


def _needs_centres(table: ParticleTable, dialect: Dialect) -> bool:
    """True where the table's frame and the dialect's differ (corner-based ⇄ RELION 5): only there does the
    tomogram size change the written coordinates."""
    return (dialect in CORNER_DIALECTS) != (table.frame == PositionFrame.CORNER)


def _shapes_for_writing(table: ParticleTable, override: TomoShapes, dialect: Dialect
                        ) -> dict[str, tuple[int, int, int]]:
    names = [str(u) for u in pd.unique(pd.Series(table.poses.tomo_names, dtype=object))]
    if override is not None:
        return tomo_shape_lookup(override, names)  # type: ignore[return-value]
    known = table.tomo_shape_px or {}
    missing = [name for name in names if name not in known]
    if missing:
        have, want = (("the tomogram corner", "its centre") if table.frame == PositionFrame.CORNER
                      else ("the tomogram centre", "its corner"))
        raise InputError(f"writing dialect {dialect} from a {table.dialect} table: the coordinates are stored from "
                         f"{have} and must be written from {want}, so the centre of each tomogram is needed: give "
                         f"the tomogram size of {missing[:5]} (--tomo-size NX NY NZ or --tomo-sizes FILE, px at the "
                         "coordinate pixel size)")
    return known


def _coordinate_columns(table: ParticleTable, dialect: Dialect, pixel: np.ndarray | None,
                        shapes: dict[str, tuple[int, int, int]] | None,
                        box_origins: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Coordinates and shifts of ``dialect``: column → (N,) values (shifts ``box_origins`` when given)."""
    roles = ROLE_COLUMNS[dialect]
    absolute = table.poses.positions_angst + table.origins_angst  # Å in the table's frame, before the shift
    if shapes is not None:  # between frames: Å from the corner = centred Å + (N // 2) · pixel
        centres = _centres_angst(table.poses.tomo_names, shapes, pixel)
        absolute = absolute + centres if dialect in CORNER_DIALECTS else absolute - centres
    if dialect in CORNER_DIALECTS:
        if dialect == Dialect.M_SPECIES:
            absolute = absolute - table.origins_angst  # no shift columns in M: fold the shifts in
        else:
            absolute = absolute / pixel[:, None]  # corner px
    out = {roles[a]: _no_negative_zero(absolute[:, k]) for k, a in enumerate(("x", "y", "z"))}
    write_origins = dialect != Dialect.M_SPECIES and (table.origin_units is not None or
                                                      bool(np.any(table.origins_angst)))
    if write_origins:
        origins = table.origins_angst if box_origins is None else box_origins
        origins = origins / pixel[:, None] if dialect in PX_ORIGIN_DIALECTS else origins
        out.update({roles[f"origin_{a}"]: _no_negative_zero(origins[:, k]) for k, a in enumerate(("x", "y", "z"))})
    return out


def _no_negative_zero(values: np.ndarray) -> np.ndarray:
    """Values that print as ±0.000000 written as 0 (a shift subtracted and added back can leave −1e-16)."""
    return np.where(np.abs(values) < 5e-7, 0.0, values)


def _role_columns(table: ParticleTable, dialect: Dialect, pixel: np.ndarray | None,
                  shapes: dict[str, tuple[int, int, int]] | None) -> dict[str, np.ndarray]:
    """Every interpreted column of ``dialect`` (without optics groups), in canonical order."""
    roles = ROLE_COLUMNS[dialect]
    name_column = roles["name"]
    if name_column in table.extras.columns and dialect != Dialect.M_SPECIES:
        name_column = "rlnTomoName"  # the file's own rlnMicrographName is carried as read
    out: dict[str, np.ndarray] = {name_column: table.poses.tomo_names}
    if dialect == Dialect.RELION31 and _name_column_of(table) == "rlnTomoName":
        out = {"rlnTomoName": table.poses.tomo_names}  # RELION 3.1 needs rlnMicrographName too: keep the file's
        if "rlnMicrographName" not in table.extras.columns:
            out["rlnMicrographName"] = table.poses.tomo_names
    box = subtomogram_box_values(table) if dialect in SUBTOMOGRAM_DIALECTS else None
    out.update(_coordinate_columns(table, dialect, pixel, shapes, None if box is None else box[2]))
    angles = table.poses.euler_zyz_deg
    write_angles = table.has_angles or table.subtomogram_euler_deg is not None
    if box is not None:
        out.update({column: box[0][:, k] for k, column in enumerate(SUBTOMOGRAM_COLUMNS)})
        angles = box[1]  # relative to the subtomogram box; left out, like the file, when absent and identity
        write_angles = table.has_angles or bool(np.any(np.abs(euler_to_matrix(angles) - np.eye(3)) > 1e-9))
    if write_angles:
        out.update({roles[r]: angles[:, k] for k, r in enumerate(("rot", "tilt", "psi"))})
    optional = {"subset": table.random_subset, "image": table.image_names, "ctf": table.ctf_image_names,
                "hash": table.source_hashes}
    out.update({roles[role]: values for role, values in optional.items() if values is not None and role in roles})
    if dialect in PX_ORIGIN_DIALECTS and pixel is not None:
        out["rlnMagnification"] = np.full(len(table), 10000.0)
        out["rlnDetectorPixelSize"] = pixel
    carried = "rlnPixelSize" in table.extras.columns
    if pixel is not None and not carried and (dialect == Dialect.WARP3D or table.coord_pixel_column == "rlnPixelSize"):
        out["rlnPixelSize"] = pixel  # Warp's per-particle pixel size, and kept where the file gave it
    elif pixel is not None and carried and dialect in PX_ORIGIN_DIALECTS:
        # one pixel size in a 3.0 layout: a carried rlnPixelSize stays as written where it agrees with the grid
        written = pd.to_numeric(table.extras["rlnPixelSize"], errors="coerce").to_numpy(dtype=np.float64)
        agrees = np.isclose(written, pixel, rtol=1e-6)
        if not agrees.all():
            out["rlnPixelSize"] = np.where(agrees, table.extras["rlnPixelSize"].to_numpy(dtype=object),
                                           np.array([f"{v:.6f}" for v in pixel], dtype=object))
    return out


def _source_role_map(table: ParticleTable) -> dict[str, str]:
    """Source column → role (``"name"``, ``"x"``, ``"origin_x"``, ...) for ordering the output."""
    mapping = {column: role for role, column in ROLE_COLUMNS[table.dialect].items()}
    for axis in ("X", "Y", "Z"):
        mapping[f"rlnOrigin{axis}"] = mapping[f"rlnOrigin{axis}Angst"] = f"origin_{axis.lower()}"
    mapping.update({c: c for c in _PIXEL_COLUMNS_30 + SUBTOMOGRAM_COLUMNS +
                    ("rlnOpticsGroup", "rlnTomoName", "rlnMicrographName")})
    mapping[_name_column_of(table)] = "name"
    return mapping


def _name_column_of(table: ParticleTable) -> str:
    for column in ("rlnTomoName", "rlnMicrographName", "wrpSourceName"):
        if column in table.column_order and column not in table.extras.columns:
            return column
    return ROLE_COLUMNS[table.dialect]["name"]


def _ordered(table: ParticleTable, dialect: Dialect, columns: dict[str, object], extras: pd.DataFrame
             ) -> pd.DataFrame:
    """Output particle table: the source column order where a column has a counterpart, new columns after."""
    roles = ROLE_COLUMNS[dialect]
    source_roles = _source_role_map(table)
    order: list[str] = []
    for column in table.column_order:
        if column in extras.columns:
            order.append(column)
            continue
        role = source_roles.get(column)
        target = roles.get(role, role) if role else None
        if target in columns:
            order.append(target)
    order += [c for c in columns if c not in order] + [c for c in extras.columns if c not in order]
    merged = {**{c: extras[c].to_numpy(dtype=object) for c in extras.columns}, **columns}
    return pd.DataFrame({c: merged[c] for c in dict.fromkeys(order)})


def _format_value(value: float) -> str:
    return f"{value:.6f}"


def _set_optics_column(optics: pd.DataFrame, column: str, values: np.ndarray) -> None:
    """Set a numeric optics column, keeping the file's text where it already holds the same value."""
    text = np.array([_format_value(v) for v in values], dtype=object)
    if column in optics.columns:
        old = pd.to_numeric(optics[column], errors="coerce").to_numpy(dtype=np.float64)
        keep = np.isclose(old, values, rtol=1e-9, atol=1e-9)
        text = np.where(keep, optics[column].to_numpy(dtype=object), text)
    optics[column] = text


def _group_pixel(groups: np.ndarray, pixel: np.ndarray, optics_groups: np.ndarray) -> np.ndarray:
    """Per optics group the single coordinate pixel size of its particles; differing sizes are an InputError."""
    frame = pd.DataFrame({"group": groups, "pixel": pixel}).groupby("group")["pixel"]
    spread = frame.max() - frame.min()
    if (spread > 1e-9 * frame.max()).any():
        raise InputError(f"optics group {spread.idxmax()} mixes coordinate pixel sizes; cannot write one per group")
    by_group = frame.first()
    return by_group.reindex(optics_groups).fillna(float(np.median(pixel))).to_numpy()


def _build_optics(table: ParticleTable, dialect: Dialect, pixel: np.ndarray | None, extras: pd.DataFrame
                  ) -> tuple[pd.DataFrame, np.ndarray, pd.DataFrame]:
    """New optics groups from per-particle optics columns and pixel sizes → (optics, groups, remaining extras)."""
    moved = [c for c in OPTICS_LABELS if c in extras.columns]
    image_pixel = table.image_pixel_size_angst if table.image_pixel_size_angst is not None else pixel
    keys = pd.DataFrame({c: extras[c].astype(str) for c in moved})
    if image_pixel is not None:
        keys["__image_pixel"] = image_pixel
    if pixel is not None:
        keys["__pixel"] = pixel
    if keys.shape[1]:
        groups = keys.groupby(list(keys.columns), sort=False).ngroup().to_numpy() + 1
    else:
        groups = np.ones(len(table), dtype=np.int64)
    first = pd.Series(np.arange(len(table))).groupby(groups).first().to_numpy()
    optics = pd.DataFrame({"rlnOpticsGroup": [str(g) for g in range(1, len(first) + 1)],
                           "rlnOpticsGroupName": [f"opticsGroup{g}" for g in range(1, len(first) + 1)]})
    for column in moved:
        optics[column] = extras[column].to_numpy(dtype=object)[first]
    if image_pixel is not None:
        optics["rlnImagePixelSize"] = [_format_value(v) for v in image_pixel[first]]
    if "rlnImageDimensionality" not in optics.columns and table.image_names is not None:
        optics["rlnImageDimensionality"] = "3"
    return optics, groups.astype(np.int64), extras.drop(columns=moved)


def _optics_for(table: ParticleTable, dialect: Dialect, pixel: np.ndarray | None, extras: pd.DataFrame,
                microscope: Microscope | None) -> tuple[pd.DataFrame, np.ndarray, pd.DataFrame]:
    """Optics table, (N,) groups and the particle extras left for an optics dialect."""
    if table.optics is not None and table.optics_group is not None:
        optics, groups = table.optics.copy(), table.optics_group
    else:
        optics, groups, extras = _build_optics(table, dialect, pixel, extras)
    optics_groups = pd.to_numeric(optics["rlnOpticsGroup"]).to_numpy()
    if pixel is not None and len(table):
        group_pixel = _group_pixel(groups, pixel, optics_groups)
        if dialect == Dialect.RELION31:
            optics = optics.drop(columns=["rlnTomoTiltSeriesPixelSize"], errors="ignore")  # marks RELION 4
            image = pd.to_numeric(optics.get("rlnImagePixelSize"), errors="coerce")
            if "rlnMicrographPixelSize" in optics.columns or image is None or not np.allclose(image, group_pixel):
                _set_optics_column(optics, "rlnMicrographPixelSize", group_pixel)
        elif table.coord_pixel_column == "rlnImagePixelSize" and table.dialect in SUBTOMOGRAM_DIALECTS:
            _set_optics_column(optics, "rlnImagePixelSize", group_pixel)  # WarpTools: particle pixels, as read
        else:
            _set_optics_column(optics, "rlnTomoTiltSeriesPixelSize", group_pixel)
    _fill_microscope(optics, microscope)
    return optics, groups, extras


def _fill_microscope(frame: pd.DataFrame, microscope: Microscope | None) -> None:
    """Add voltage, Cs and amplitude contrast columns from ``microscope`` where ``frame`` lacks them."""
    if microscope is None:
        return
    for column, attribute in MICROSCOPE_LABELS.items():
        if column not in frame.columns:
            frame[column] = _format_value(getattr(microscope, attribute))


def _require_microscope(columns: pd.Index, dialect: Dialect, where: str) -> None:
    missing = [c for c in MICROSCOPE_LABELS if c not in columns]
    if missing:
        raise InputError(f"{where}: RELION 3.1.3 ignores {where} without {missing} (dialect {dialect}); pass the "
                         "microscope (--voltage, --cs, --amplitude-contrast)")


def _joined_optics(table: ParticleTable, extras: pd.DataFrame) -> pd.DataFrame:
    """Optics columns (except groups and pixel sizes) joined into every particle row, for dialects without optics."""
    if table.optics is None or table.optics_group is None:
        return extras
    skip = {"rlnOpticsGroup", "rlnOpticsGroupName", *_OPTICS_PIXEL}
    optics = table.optics.set_index(pd.to_numeric(table.optics["rlnOpticsGroup"]).to_numpy())
    joined = extras.copy()
    for column in optics.columns:
        if column not in skip and column not in joined.columns:
            joined[column] = optics[column].reindex(table.optics_group).to_numpy(dtype=object)
    return joined


def write_particle_star(table: ParticleTable, path: str | Path, dialect: Dialect | str | None = None, *,
                        coord_pixel_size_angst: float | None = None, tomo_shape_px: TomoShapes = None,
                        microscope: Microscope | None = None) -> Path:
    """Write ``table`` as a particle STAR in ``dialect`` (default: the dialect it was read as).

    Parameters
    ----------
    coord_pixel_size_angst
        Å/px of the output coordinate grid; default the table's own (needed for corner-based dialects).
    tomo_shape_px
        (nx, ny, nz) or name → (nx, ny, nz) px at the output coordinate pixel size; default the table's. Used
        only between frames (a corner-based table written as RELION 5, a centred one written corner-based); pass
        it together with a new ``coord_pixel_size_angst`` there.
    microscope
        Voltage, Cs and amplitude contrast for optics that lack them (required by RELION 3.1.3 in 3.0 and 3.1).
    """
    dialect = Dialect(dialect) if dialect is not None else table.dialect
    between_frames = _needs_centres(table, dialect) and len(table) > 0
    if (coord_pixel_size_angst is not None and tomo_shape_px is None and table.coord_pixel_size_angst is not None
            and between_frames and not np.allclose(table.coord_pixel_size_angst, coord_pixel_size_angst)):
        raise InputError("a new coordinate pixel size needs the tomogram sizes at that pixel size (tomo_shape_px)")
    pixel = _pixel_for_writing(table, coord_pixel_size_angst, dialect, between_frames)
    shapes = _shapes_for_writing(table, tomo_shape_px, dialect) if between_frames else None
    columns: dict[str, object] = dict(_role_columns(table, dialect, pixel, shapes))
    dropped = set(_CORNER_PX.values()) if dialect == Dialect.RELION5 else set()
    if dialect in SUBTOMOGRAM_DIALECTS:  # uninterpreted subtomogram angles would re-rotate a complete pose
        dropped |= set(SUBTOMOGRAM_COLUMNS)
    extras = table.extras.drop(columns=[c for c in table.extras.columns if c in columns or c in dropped])
    blocks: list[StarBlock] = []
    if dialect in OPTICS_DIALECTS:
        optics, groups, extras = _optics_for(table, dialect, pixel, extras, microscope)
        if dialect == Dialect.RELION31 and table.dialect != dialect:
            _require_microscope(optics.columns, dialect, "data_optics")
        columns["rlnOpticsGroup"] = groups
        if dialect == Dialect.RELION5:
            general = table.general if table.general is not None else pd.DataFrame(
                {"rlnTomoSubTomosAre2DStacks": ["0"]}, dtype=object)
            blocks.append(StarBlock("general", general, is_loop=False))
        blocks.append(StarBlock("optics", optics))
    else:
        extras = _joined_optics(table, extras)
        _fill_microscope(extras, microscope)
        if dialect == Dialect.RELION30 and table.dialect not in PX_ORIGIN_DIALECTS:
            _require_microscope(extras.columns, dialect, "the particle table")
    particles = _ordered(table, dialect, columns, extras)
    blocks.append(StarBlock("particles" if dialect in OPTICS_DIALECTS else "", particles))
    return write_star_text(path, blocks, list(_HEADER.get(dialect, ())))


def convert_particle_star(in_path: str | Path, out_path: str | Path, to: Dialect | str, *,
                          from_dialect: Dialect | str | None = None, coord_pixel_size_angst: float | None = None,
                          tomo_shape_px: TomoShapes = None, microscope: Microscope | None = None) -> ParticleTable:
    """Read ``in_path`` (dialect detected unless ``from_dialect``), write it to ``out_path`` as ``to``."""
    from mspecies.formats.star_dialects import read_particle_star

    table = read_particle_star(in_path, from_dialect, coord_pixel_size_angst=coord_pixel_size_angst,
                               tomo_shape_px=tomo_shape_px)
    write_particle_star(table, out_path, to, microscope=microscope)
    return table
