"""IMOD text files of a tilt series (``.tlt``, ``.xf``, ``.defocus``): readers and writers.

All per-tilt arrays are in stack order (line i of a file = image i of the raw stack). Readers fail
with :class:`~mspecies.common.types.InputError` naming the file and the line (1-based) on a missing
file, a wrong column count or a non-numeric value.

Files:

* ``.tlt``: one tilt angle (deg) per line.
* ``.xf``: ``A11 A12 A21 A22 DX DY`` per line; ``aligned = A @ raw + d`` in pixels relative to the
  image centre; returned as (T, 2, 3) ``[[A11, A12, DX], [A21, A22, DY]]``.
* ``.defocus`` (``ctfphaseflip``/``ctfplotter``): version 3 with astigmatism. First line
  ``flag 0 0.0 0.0 0.0 3`` (flag = sum of 1: astigmatism, 2: angle in radians, 4: phase shift,
  16: cut-on frequency); then per line ``start_view end_view start_angle end_angle defocus1_nm
  defocus2_nm astig_angle_deg [phase_shift] [cuton]`` with 1-based inclusive view ranges.
  Older version-2 files (no astigmatism: ``start end a1 a2 defocus_nm``; first line has a trailing
  version number 2) are read too. Defocus 1 is our U, the angle is that of axis 1 from +X.

Values are checked by :mod:`mspecies.formats.validate` (finite tilt angles within ±90°, invertible transforms,
positive defocus in a physical range). CTFFIND: :mod:`~mspecies.formats.ctffind`; dose lists:
:mod:`~mspecies.formats.dose`; SerialEM ``.mdoc``: :mod:`~mspecies.formats.serialem`; AreTomo ``.aln``:
:mod:`~mspecies.formats.aretomo`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mspecies.common.types import InputError
from mspecies.formats.text_table import parse_row, read_lines, read_table
from mspecies.formats.validate import check_defocus_angst, check_tilt_angles_deg, check_xf

DEFOCUS_FLAG_ASTIGMATISM = 1
DEFOCUS_FLAG_RADIANS = 2
DEFOCUS_FLAG_PHASE = 4
DEFOCUS_FLAG_CUTON = 16


def read_tlt(path: str | Path) -> np.ndarray:
    """IMOD ``.tlt`` → (T,) tilt angles in degrees, stack order (checked: finite, within ±90°)."""
    table, lines = read_table(path, 1)
    return check_tilt_angles_deg(table[:, 0], str(path), lines)


def write_tlt(path: str | Path, tilt_angles_deg: np.ndarray) -> Path:
    """Write (T,) tilt angles (deg) one per line."""
    angles = np.asarray(tilt_angles_deg, dtype=np.float64).reshape(-1)
    Path(path).write_text("".join(f"{angle:10.4f}\n" for angle in angles))
    return Path(path)


def read_xf(path: str | Path) -> np.ndarray:
    """IMOD ``.xf`` → (T, 2, 3) ``[A | d]`` with ``aligned = A @ raw + d`` (centred px); checked: finite,
    invertible A."""
    table, lines = read_table(path, 6)
    xf = np.empty((table.shape[0], 2, 3))
    xf[:, 0, :] = table[:, [0, 1, 4]]
    xf[:, 1, :] = table[:, [2, 3, 5]]
    return check_xf(xf, str(path), lines)


def write_xf(path: str | Path, xf: np.ndarray) -> Path:
    """Write (T, 2, 3) transforms as ``A11 A12 A21 A22 DX DY`` lines."""
    xf = np.asarray(xf, dtype=np.float64)
    if xf.ndim != 3 or xf.shape[1:] != (2, 3):
        raise InputError(f"{path}: xf must have shape (T, 2, 3), got {xf.shape}")
    lines = [f"{m[0, 0]:12.7f}{m[0, 1]:12.7f}{m[1, 0]:12.7f}{m[1, 1]:12.7f}{m[0, 2]:12.3f}{m[1, 2]:12.3f}\n"
             for m in xf]
    Path(path).write_text("".join(lines))
    return Path(path)


def write_imod_defocus(path: str | Path, tilt_angles_deg: np.ndarray, defocus_u_angst: np.ndarray,
                       defocus_v_angst: np.ndarray, defocus_angle_deg: np.ndarray) -> Path:
    """Write a version-3 astigmatic ``ctfphaseflip`` defocus file (defocus in nm, one line per view).

    Parameters
    ----------
    tilt_angles_deg, defocus_u_angst, defocus_v_angst, defocus_angle_deg
        (T,) values in stack order; defocus in Å (underfocus positive), angle of U from +X (deg).
    """
    angles = np.asarray(tilt_angles_deg, dtype=np.float64).reshape(-1)
    u_nm = np.asarray(defocus_u_angst, dtype=np.float64).reshape(-1) / 10.0
    v_nm = np.asarray(defocus_v_angst, dtype=np.float64).reshape(-1) / 10.0
    astig = np.asarray(defocus_angle_deg, dtype=np.float64).reshape(-1)
    if not angles.shape == u_nm.shape == v_nm.shape == astig.shape:
        raise InputError(f"{path}: tilt angles and defocus arrays must have the same length")
    lines = [f"{DEFOCUS_FLAG_ASTIGMATISM}  0  0.0  0.0  0.0  3\n"]
    lines += [f"{i + 1:d}  {i + 1:d}  {a:.4f}  {a:.4f}  {du:.4f}  {dv:.4f}  {ang:.4f}\n"
              for i, (a, du, dv, ang) in enumerate(zip(angles, u_nm, v_nm, astig, strict=True))]
    Path(path).write_text("".join(lines))
    return Path(path)


def _defocus_layout(path: str | Path, lines: list[tuple[int, str]]) -> tuple[int, list[tuple[int, str]]]:
    """(flag, data lines) of a defocus file: version ≥ 3 has a flag-only first line."""
    number, text = lines[0]
    first = parse_row(path, number, text, tuple(range(5, 11)))
    if first.shape[0] == 6 and first[5] >= 3 and np.all(first[1:5] == 0):
        return int(first[0]), lines[1:]
    if first.shape[0] == 6 and first[5] == 2:  # version 2: first line = data + trailing version number
        return 0, [(number, " ".join(text.split()[:5]))] + lines[1:]
    return 0, lines


def read_imod_defocus(path: str | Path) -> dict[str, np.ndarray]:
    """Read an IMOD defocus file → per-view arrays (stack order, 1-based view ranges expanded).

    Returns
    -------
    dict with (T,) arrays ``defocus_u_angst``, ``defocus_v_angst`` (Å), ``defocus_angle_deg``
    (U axis from +X), ``tilt_angles_deg`` (linear between a range's start and end angle),
    ``phase_shift_deg`` (0 when absent). T is the largest end view. Views not covered by any line
    raise an error; defocus is checked (finite, positive, 10 nm–20 µm: the file holds nm).
    """
    lines = read_lines(path)
    if not lines:
        raise InputError(f"{path}: empty defocus file")
    flag, data = _defocus_layout(path, lines)
    astig = bool(flag & DEFOCUS_FLAG_ASTIGMATISM)
    n_columns = 5 + (2 if astig else 0) + (1 if flag & DEFOCUS_FLAG_PHASE else 0) \
        + (1 if flag & DEFOCUS_FLAG_CUTON else 0)
    rows = [(number, parse_row(path, number, text, n_columns)) for number, text in data]
    n_views = int(max(row[1] for _, row in rows))
    out = {key: np.full(n_views, np.nan) for key in
           ("defocus_u_angst", "defocus_v_angst", "defocus_angle_deg", "tilt_angles_deg", "phase_shift_deg")}
    line_of_view = np.zeros(n_views, dtype=np.int64)
    for number, row in rows:
        if not np.all(np.isfinite(row)):
            raise InputError(f"{path}, line {number}: not a finite number in {row.tolist()}")
        start, end = int(row[0]), int(row[1])
        if not 1 <= start <= end:
            raise InputError(f"{path}, line {number}: view range {start}-{end} is not 1-based ascending")
        views = np.arange(start - 1, end)
        line_of_view[views] = number
        fraction = (views - views[0]) / max(end - start, 1)
        out["tilt_angles_deg"][views] = row[2] + fraction * (row[3] - row[2])
        out["defocus_u_angst"][views] = row[4] * 10.0
        out["defocus_v_angst"][views] = (row[5] if astig else row[4]) * 10.0
        angle = row[6] if astig else 0.0
        out["defocus_angle_deg"][views] = np.rad2deg(angle) if flag & DEFOCUS_FLAG_RADIANS else angle
        out["phase_shift_deg"][views] = row[5 + 2 * astig] if flag & DEFOCUS_FLAG_PHASE else 0.0
    missing = np.flatnonzero(np.isnan(out["defocus_u_angst"]))
    if missing.size:
        raise InputError(f"{path}: no defocus for views {(missing + 1).tolist()} (1-based)")
    for key, what in (("defocus_u_angst", "defocus 1"), ("defocus_v_angst", "defocus 2")):
        check_defocus_angst(out[key], f"{path} (nm in the file)", line_of_view, what=what)
    return out
