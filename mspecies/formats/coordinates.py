"""Plain text particle lists: ``x y z`` per line in pixels, optionally followed by ``rot tilt psi`` (deg).

Coordinates are pixels from the corner of the tomogram they were picked in (pixel index i centred at i, as
RELION's ``rlnCoordinateX/Y/Z``); angles are RELION ZYZ Euler angles. ``#`` lines are comments and a first
non-numeric line is a header. Which pixel size the coordinates are in is not in the file: the caller says
(``--coord-pixel-size-angst``, default the ``--tomogram``'s pixel size).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mspecies.common.types import InputError
from mspecies.formats.text_table import read_list

COORDINATE_COLUMNS = (3, 6)


@dataclass(frozen=True)
class CoordinateList:
    """(N, 3) corner-based pixel coordinates, (N, 3) ZYZ angles (zeros when the file has none), line numbers."""

    coordinates_px: np.ndarray
    euler_zyz_deg: np.ndarray
    has_angles: bool
    lines: np.ndarray


def read_coordinates(path: str | Path) -> CoordinateList:
    """Read a text particle list (3 or 6 columns, all rows alike) → :class:`CoordinateList`."""
    path = Path(path)
    table, lines = read_list(path, "coordinate")
    if table.shape[1] not in COORDINATE_COLUMNS:
        raise InputError(f"{path}, line {lines[0]}: expected 3 columns (x y z, px) or 6 (x y z rot tilt psi), got "
                         f"{table.shape[1]}")
    width = table.shape[1]
    angles = table[:, 3:6] if width == 6 else np.zeros((table.shape[0], 3))
    return CoordinateList(table[:, :3].copy(), angles.copy(), width == 6, lines)


def write_coordinates(path: str | Path, coordinates_px: np.ndarray, euler_zyz_deg: np.ndarray | None = None) -> Path:
    """Write ``x y z [rot tilt psi]`` per line (px, deg) with a header line."""
    coords = np.asarray(coordinates_px, dtype=np.float64).reshape(-1, 3)
    table = coords if euler_zyz_deg is None else np.hstack([coords, np.asarray(euler_zyz_deg).reshape(-1, 3)])
    header = "x y z" + ("" if euler_zyz_deg is None else " rot tilt psi")
    Path(path).write_text(header + "\n" + "".join(" ".join(f"{v:.6f}" for v in row) + "\n" for row in table))
    return Path(path)
