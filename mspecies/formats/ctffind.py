"""CTFFIND 4/5 per-tilt output text: defocus per tilt and the optics in its header.

Layout (CTFFIND 4.1, one row per image of the stack it ran on)::

    # Output from CTFFIND version 4.1.14, run on 2023-02-02 15:13:07
    # Input file: TS_01.mrc ; Number of micrographs: 41
    # Pixel size: 1.350 Angstroms ; acceleration voltage: 300.0 keV ; spherical aberration: 2.70 mm ; ...
    # Box size: 512 pixels ; min. res.: 30.0 Angstroms ; max. res.: 5.0 Angstroms ; ...
    # Columns: #1 - micrograph number; #2 - defocus 1 [Angstroms]; #3 - defocus 2; #4 - azimuth of astigmatism; ...
    1.000000 9982.502930 9982.502930 0.000000 0.035256 0.565683 1.980663

Columns 1–7: micrograph number (1-based image of the stack), defocus 1 and 2 (Å, underfocus positive), azimuth
of astigmatism (deg, defocus-1 axis from +X), additional phase shift (rad), cross correlation, fit resolution
(Å). The elided header ends: ``amplitude contrast: 0.07`` and ``min. def.: 5000.0 um; max. def. 50000.0 um``.
CTFFIND 5 appends tilt-axis angle, tilt angle and sample thickness (columns 8–10), which are read past.
Defocus 1 is our U, the azimuth our ``defocus_angle_deg``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mspecies.common.types import InputError
from mspecies.formats.text_table import read_lines, read_table
from mspecies.formats.validate import (
    check_amplitude_contrast,
    check_cs_mm,
    check_defocus_angst,
    check_finite,
    check_pixel_size_angst,
    check_voltage_kv,
)

CTFFIND_COLUMNS = (7, 8, 9, 10)
_HEADER_FIELDS = {  # header key → (regular expression of its value, checker)
    "pixel_size_angst": (r"Pixel size:\s*([-+0-9.eE]+)", check_pixel_size_angst),
    "voltage_kv": (r"acceleration voltage:\s*([-+0-9.eE]+)", check_voltage_kv),
    "cs_mm": (r"spherical aberration:\s*([-+0-9.eE]+)", check_cs_mm),
    "amplitude_contrast": (r"amplitude contrast:\s*([-+0-9.eE]+)", check_amplitude_contrast),
}


@dataclass(frozen=True)
class CtffindFit:
    """One CTFFIND output file: (T,) arrays in stack order and the header's optics (None where absent)."""

    defocus_u_angst: np.ndarray
    defocus_v_angst: np.ndarray
    defocus_angle_deg: np.ndarray
    phase_shift_deg: np.ndarray
    cross_correlation: np.ndarray
    fit_resolution_angst: np.ndarray
    lines: np.ndarray
    pixel_size_angst: float | None
    voltage_kv: float | None
    cs_mm: float | None
    amplitude_contrast: float | None

    @property
    def n_tilts(self) -> int:
        return int(self.defocus_u_angst.size)


def _header_values(path: Path) -> dict[str, float | None]:
    """Optics of the ``# Pixel size: ...`` header line (None for each value not found)."""
    header = " ".join(text for _, text in read_lines(path) if text.startswith("#"))
    values: dict[str, float | None] = {}
    for key, (pattern, check) in _HEADER_FIELDS.items():
        match = re.search(pattern, header, flags=re.IGNORECASE)
        values[key] = check(float(match.group(1)), f"{path} header") if match else None
    return values


def _stack_order(path: Path, numbers: np.ndarray, lines: np.ndarray) -> np.ndarray:
    """Row index of each stack image: rows sorted by micrograph number 1..T (all-equal numbers: file order)."""
    n = numbers.size
    if np.all(numbers == numbers[0]) and n > 1:  # one CTFFIND run per image, outputs concatenated
        return np.arange(n)
    ranks = np.rint(numbers).astype(np.int64)
    if sorted(ranks.tolist()) != list(range(1, n + 1)):
        bad = next(i for i, r in enumerate(ranks) if not 1 <= r <= n or np.sum(ranks == r) > 1)
        raise InputError(f"{path}, line {int(lines[bad])}: micrograph number {numbers[bad]:g}; expected each of "
                         f"1..{n} once (one row per image of the stack)")
    return np.argsort(ranks, kind="stable")


def read_ctffind(path: str | Path) -> CtffindFit:
    """Read a CTFFIND 4/5 output text → :class:`CtffindFit` (defocus checked: finite, > 0, 10 nm–20 µm)."""
    path = Path(path)
    table, lines = read_table(path, CTFFIND_COLUMNS, comment="#")
    check_finite(table[:, :7], "CTFFIND value", str(path), lines)
    order = _stack_order(path, table[:, 0], lines)
    table, lines = table[order], lines[order]
    u = check_defocus_angst(table[:, 1], str(path), lines, what="defocus 1")
    v = check_defocus_angst(table[:, 2], str(path), lines, what="defocus 2")
    return CtffindFit(defocus_u_angst=u, defocus_v_angst=v, defocus_angle_deg=table[:, 3].copy(),
                      phase_shift_deg=np.rad2deg(table[:, 4]), cross_correlation=table[:, 5].copy(),
                      fit_resolution_angst=table[:, 6].copy(), lines=lines, **_header_values(path))


def write_ctffind(path: str | Path, defocus_u_angst: np.ndarray, defocus_v_angst: np.ndarray,
                  defocus_angle_deg: np.ndarray, *, pixel_size_angst: float, voltage_kv: float, cs_mm: float,
                  amplitude_contrast: float, stack_name: str = "stack.mrc", phase_shift_rad: np.ndarray | float = 0.0,
                  cross_correlation: np.ndarray | float = 0.9, fit_resolution_angst: np.ndarray | float = 8.0
                  ) -> Path:
    """Write a CTFFIND 4.1 output text (header with the optics, one row per tilt, micrograph numbers 1..T)."""
    u = np.asarray(defocus_u_angst, dtype=np.float64).reshape(-1)
    columns = [np.arange(1, u.size + 1, dtype=np.float64), u]
    for values in (defocus_v_angst, defocus_angle_deg, phase_shift_rad, cross_correlation, fit_resolution_angst):
        columns.append(np.broadcast_to(np.asarray(values, dtype=np.float64), u.shape))
    header = (
        "# Output from CTFFIND version 4.1.14 (written by mspecies)\n"
        f"# Input file: {stack_name} ; Number of micrographs: {u.size}\n"
        f"# Pixel size: {pixel_size_angst:.3f} Angstroms ; acceleration voltage: {voltage_kv:.1f} keV ; "
        f"spherical aberration: {cs_mm:g} mm ; amplitude contrast: {amplitude_contrast:g}\n"
        "# Box size: 512 pixels ; min. res.: 30.0 Angstroms ; max. res.: 5.0 Angstroms ; min. def.: 5000.0 um; "
        "max. def. 50000.0 um\n"
        "# Columns: #1 - micrograph number; #2 - defocus 1 [Angstroms]; #3 - defocus 2; "
        "#4 - azimuth of astigmatism; #5 - additional phase shift [radians]; #6 - cross correlation; "
        "#7 - spacing (in Angstroms) up to which CTF rings were fit successfully\n")
    body = "".join(" ".join(f"{value:.6f}" for value in row) + "\n" for row in np.column_stack(columns))
    Path(path).write_text(header + body)
    return Path(path)
