"""AreTomo / AreTomo2 / AreTomo3 alignment file (``.aln``): tilt axis, shifts, tilt angles and excluded views.

Format (AreTomo3 ``MrcUtil/CSaveAlignFile.cpp`` writes it, ``CLoadAlignFile.cpp`` reads it; AreTomo2 likewise)::

    # AreTomo Alignment / Priims bprmMn
    # RawSize = 4096 4096 31              (nx ny nz of the raw stack; absent in AreTomo 1.x files)
    # NumPatches = 16
    # DarkFrame =     0   31    45.01     (one per excluded view: index by tilt, section, tilt angle)
    # AlphaOffset =     0.00
    # BetaOffset =     0.00
    # Thickness = 1500
    # SEC     ROT         GMAG       TX          TY      SMEAN     SFIT    SCALE     BASE     TILT
        1    83.9316    1.00000     -3.761     12.890     1.00     1.00     1.00     0.00    -45.01
    ...
    # Local Alignment                      (then per tilt and patch: t p x y sx sy good; not read here)

One global row per aligned view, sorted by tilt angle. ``SEC`` is the view's section in the raw stack: 1-based
in AreTomo3, 0-based in older versions (``CLoadAlignFile::mToOneBased``: "older version is zero based"); a file
whose smallest section (rows and dark frames) is 0 is read as 0-based. ``ROT`` is the tilt axis (deg, from +Y),
``TX TY`` the shift (raw px), ``TILT`` the tilt angle (deg). AreTomo writes ``GMAG``, ``SMEAN``, ``SFIT``,
``SCALE``, ``BASE`` as constants (1, 1, 1, 1, 0); they are read past.

The IMOD ``.xf`` of a view is AreTomo's own (``ImodUtil/CSaveXF.cpp``, ``-OutImod``): ``A = R(−ROT)``,
``d = A·(−TX, −TY)``, so ``aligned = A·raw + d`` in centred pixels. Views without a global row (dark frames,
or sections AreTomo skipped) are excluded, with the identity transform as AreTomo writes for them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mspecies.common.types import InputError
from mspecies.formats.text_table import parse_row, read_lines
from mspecies.formats.validate import check_finite, check_tilt_angles_deg, check_xf

GLOBAL_COLUMNS = 10
HEADER = "# SEC     ROT         GMAG       TX          TY      SMEAN     SFIT    SCALE     BASE     TILT"


@dataclass(frozen=True)
class AreTomoAlignment:
    """An ``.aln`` in stack order: (T,) arrays, T = raw sections (``RawSize``, else the largest section)."""

    xf: np.ndarray                 # (T, 2, 3) IMOD transforms; identity for excluded views
    tilt_angles_deg: np.ndarray    # (T,) TILT, or the DarkFrame tilt; NaN for a view the file does not list
    tilt_axis_deg: np.ndarray      # (T,) ROT; NaN for excluded views
    excluded: np.ndarray           # (T,) bool: no global row
    raw_size_xyz: tuple[int, int, int] | None
    zero_based: bool
    lines: np.ndarray              # (T,) line of each view's row (0 when none)

    @property
    def n_tilts(self) -> int:
        return int(self.excluded.size)


def aln_to_xf(rot_deg: np.ndarray, shift_px: np.ndarray) -> np.ndarray:
    """(T, 2, 3) IMOD ``[A | d]`` from (T,) ROT (deg) and (T, 2) TX, TY (px): ``A = R(−ROT)``, ``d = −A·t``."""
    angle = -np.deg2rad(np.asarray(rot_deg, dtype=np.float64))
    c, s = np.cos(angle), np.sin(angle)
    matrices = np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2)
    shifts = -np.einsum("tij,tj->ti", matrices, np.asarray(shift_px, dtype=np.float64))
    return np.concatenate([matrices, shifts[:, :, None]], axis=2)


def xf_to_aln(xf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`aln_to_xf`: (T,) ROT (deg) and (T, 2) TX, TY (px); InputError unless A is a rotation."""
    xf = np.asarray(xf, dtype=np.float64)
    matrices = xf[:, :, :2]
    rot_deg = -np.rad2deg(np.arctan2(matrices[:, 1, 0], matrices[:, 0, 0]))
    rebuilt = aln_to_xf(rot_deg, np.zeros((xf.shape[0], 2)))[:, :, :2]
    worst = float(np.max(np.abs(rebuilt - matrices))) if xf.size else 0.0
    if worst > 1e-5:
        raise InputError(f"an .aln holds rotations only; these transforms scale or shear (deviation {worst:.2g})")
    shifts = -np.linalg.solve(matrices, xf[:, :, 2:3])[:, :, 0]  # d = −A·t
    return rot_deg, shifts


def _header_value(body: str) -> list[str]:
    return body.split("=", 1)[1].split() if "=" in body else []


def _parse(path: Path) -> tuple[list[tuple[int, np.ndarray]], list[tuple[int, float]], tuple[int, int, int] | None]:
    """(global rows with line numbers, dark frames (section, tilt), RawSize)."""
    rows: list[tuple[int, np.ndarray]] = []
    darks: list[tuple[int, float]] = []
    raw_size = None
    for number, text in read_lines(path):
        if text.startswith("#"):
            body = text.lstrip("#").strip()
            key = body.split("=")[0].strip().lower()
            if key == "local alignment":
                break
            values = _header_value(body)
            if key == "rawsize":
                raw_size = tuple(int(float(v)) for v in values)
                if len(raw_size) != 3:
                    raise InputError(f"{path}, line {number}: RawSize needs 3 integers, got {values}")
            elif key == "darkframe":
                dark = parse_row(path, number, " ".join(values), 3)
                darks.append((int(dark[1]), float(dark[2])))
            continue
        rows.append((number, parse_row(path, number, text, GLOBAL_COLUMNS)))
    if not rows:
        raise InputError(f"{path}: no global alignment rows (expected '{HEADER.strip('# ')}' lines)")
    return rows, darks, raw_size  # type: ignore[return-value]


def read_aln(path: str | Path) -> AreTomoAlignment:
    """Read an AreTomo ``.aln`` → :class:`AreTomoAlignment` in stack order (checked: finite values, tilt within
    ±90°, each section once, sections within ``RawSize``)."""
    path = Path(path)
    rows, darks, raw_size = _parse(path)
    lines = np.array([number for number, _ in rows])
    table = check_finite(np.vstack([row for _, row in rows]), "alignment value", str(path), lines)
    sections = np.rint(table[:, 0]).astype(np.int64)
    zero_based = min([int(s) for s in sections] + [s for s, _ in darks]) == 0
    index = sections - (0 if zero_based else 1)
    dark_index = np.array([s - (0 if zero_based else 1) for s, _ in darks], dtype=np.int64)
    n = raw_size[2] if raw_size else int(max(index.max(), dark_index.max(initial=-1))) + 1
    for number, i in zip(lines, index, strict=True):
        if not 0 <= i < n:
            raise InputError(f"{path}, line {number}: section {i + (0 if zero_based else 1)} is outside the stack "
                             f"of {n} views ({'0' if zero_based else '1'}-based)")
    repeated = [int(i) for i in np.unique(index) if np.sum(index == i) > 1]
    if repeated:
        raise InputError(f"{path}: section(s) {repeated} have more than one global row")
    tilts = np.full(n, np.nan)
    tilts[dark_index[(dark_index >= 0) & (dark_index < n)]] = [t for (s, t), i in zip(darks, dark_index, strict=True)
                                                              if 0 <= i < n]
    tilts[index] = check_tilt_angles_deg(table[:, 9], str(path), lines)
    axis = np.full(n, np.nan)
    axis[index] = table[:, 1]
    xf = np.tile(np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), (n, 1, 1))
    xf[index] = check_xf(aln_to_xf(table[:, 1], table[:, 3:5]), str(path), lines)
    excluded = np.ones(n, dtype=bool)
    excluded[index] = False
    line_of = np.zeros(n, dtype=np.int64)
    line_of[index] = lines
    return AreTomoAlignment(xf=xf, tilt_angles_deg=tilts, tilt_axis_deg=axis, excluded=excluded,
                            raw_size_xyz=raw_size, zero_based=zero_based, lines=line_of)


def write_aln(path: str | Path, xf: np.ndarray, tilt_angles_deg: np.ndarray, raw_size_xyz: tuple[int, int, int],
              excluded: np.ndarray | None = None) -> Path:
    """Write an AreTomo3-style ``.aln`` (1-based sections, rows by tilt angle, excluded views as DarkFrame lines).

    ROT, TX, TY and TILT carry more decimals than AreTomo prints (6, 5, 5, 4), so that the transforms read back
    equal ``xf`` to ~1e-5 px; readers parse whitespace-separated numbers (AreTomo's own ``sscanf`` too).
    """
    xf = np.asarray(xf, dtype=np.float64)
    angles = np.asarray(tilt_angles_deg, dtype=np.float64).reshape(-1)
    excluded = np.zeros(angles.size, dtype=bool) if excluded is None else np.asarray(excluded, dtype=bool)
    rot_deg, shifts = xf_to_aln(xf)
    by_tilt = np.argsort(angles, kind="stable")
    nx, ny, nz = raw_size_xyz
    lines = ["# AreTomo Alignment / Priims bprmMn", f"# RawSize = {nx} {ny} {nz}", "# NumPatches = 0"]
    lines += [f"# DarkFrame =  {rank:4d} {t + 1:4d} {angles[t]:8.2f}" for rank, t in enumerate(by_tilt) if excluded[t]]
    lines += ["# AlphaOffset =     0.00", "# BetaOffset =     0.00", HEADER]
    lines += [f"{t + 1:5d}  {rot_deg[t]:11.6f}  {1.0:9.5f}  {shifts[t, 0]:11.5f}  {shifts[t, 1]:11.5f}  {1.0:7.2f}  "
              f"{1.0:7.2f}  {1.0:7.2f}  {0.0:7.2f}  {angles[t]:9.4f}" for t in by_tilt if not excluded[t]]
    Path(path).write_text("\n".join(lines) + "\n")
    return Path(path)
