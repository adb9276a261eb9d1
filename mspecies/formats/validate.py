"""Checks of values read from files or flags: finite, physical ranges with unit hints, one value per tilt, dose
consistent with the acquisition order.

One layer for the standalone export (``python -m mspecies export``) and the Scipion importers: every reader of
a tilt-series file calls these before it returns, so a NaN, a wrong unit or a misread column stops the run with
:class:`~mspecies.common.types.InputError` naming the source (file and line, or flag) and what was expected.

``source`` is the file or flag the values came from; ``lines`` (optional, (T,) 1-based) the line of each value,
so the message can point at it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mspecies.common.types import InputError

MAX_TILT_DEG = 90.0
MIN_DEFOCUS_ANGST = 100.0      # 10 nm: below it the value is almost surely in µm (a phase-plate focus is ≥ 0.1 µm)
MAX_DEFOCUS_ANGST = 200_000.0  # 20 µm: above it the value is almost surely in a smaller unit or not a defocus
MAX_ACCUMULATED_DOSE = 1000.0  # e⁻/Å²: a whole tilt series gets ~60–200; 1000 means e⁻/px or a misread column
VOLTAGE_RANGE_KV = (20.0, 1000.0)
MAX_CS_MM = 10.0
PIXEL_RANGE_ANGST = (0.1, 200.0)
DOSE_ORDER_TOLERANCE = 1e-3    # e⁻/Å²: rounding of text files


def _where(source: str, lines: Sequence[int] | np.ndarray | None, index: int) -> str:
    """``source`` plus ``, line N`` (or ``, entry N`` 1-based when no line numbers are known)."""
    if lines is not None and len(lines) > index:
        return f"{source}, line {int(lines[index])}"
    return f"{source}, entry {index + 1}"


def check_finite(values: np.ndarray, what: str, source: str, lines: Sequence[int] | np.ndarray | None = None
                 ) -> np.ndarray:
    """``values`` as float64; InputError at the first NaN/inf (first axis = entry)."""
    array = np.asarray(values, dtype=np.float64)
    bad = ~np.isfinite(array.reshape(array.shape[0], -1)).all(axis=1) if array.ndim else ~np.isfinite(array[None])
    if np.any(bad):
        index = int(np.flatnonzero(bad)[0])
        raise InputError(f"{_where(source, lines, index)}: {what} is not a finite number ({array[index].tolist()})")
    return array


def check_one_per_tilt(n_values: int, n_tilts: int, what: str, source: str, reference: str) -> None:
    """InputError unless there are exactly ``n_tilts`` values (``reference`` says where that count comes from)."""
    if n_values != n_tilts:
        raise InputError(f"{source}: {n_values} {what} values, but {reference} has {n_tilts} tilts (one value per "
                         "tilt expected, in stack order)")


def check_tilt_angles_deg(angles_deg: np.ndarray, source: str, lines: Sequence[int] | np.ndarray | None = None
                          ) -> np.ndarray:
    """(T,) tilt angles: finite and within ±90°."""
    angles = check_finite(angles_deg, "tilt angle", source, lines)
    outside = np.flatnonzero(np.abs(angles) > MAX_TILT_DEG)
    if outside.size:
        index = int(outside[0])
        raise InputError(f"{_where(source, lines, index)}: tilt angle {angles[index]:g}° is outside ±90° "
                         "(expected degrees)")
    return angles


def check_xf(xf: np.ndarray, source: str, lines: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
    """(T, 2, 3) IMOD transforms: finite, invertible 2×2 part with a plausible scale (0.2–5)."""
    matrices = check_finite(xf, "transform", source, lines)
    det = np.linalg.det(matrices[:, :, :2])
    bad = np.flatnonzero(~((np.abs(det) > 0.04) & (np.abs(det) < 25.0)))
    if bad.size:
        index = int(bad[0])
        raise InputError(f"{_where(source, lines, index)}: the 2×2 matrix {matrices[index, :, :2].tolist()} is "
                         f"singular or not a rotation (determinant {det[index]:.3g}; expected about 1)")
    return matrices


def check_defocus_angst(defocus_angst: np.ndarray, source: str, lines: Sequence[int] | np.ndarray | None = None,
                        what: str = "defocus") -> np.ndarray:
    """(T,) defocus in Å, underfocus positive: finite, > 0, within 10 nm–20 µm (else a unit hint)."""
    values = check_finite(defocus_angst, what, source, lines)
    for index, value in enumerate(values):
        if value <= 0:
            raise InputError(f"{_where(source, lines, index)}: {what} {value:g} Å is not an underfocus (expected "
                             "> 0, underfocus positive)")
        if value < MIN_DEFOCUS_ANGST:
            raise InputError(f"{_where(source, lines, index)}: {what} {value:g} Å is below 10 nm: wrong unit? "
                             "(IMOD .defocus is in nm, CTFFIND in Å; a value in µm must be converted)")
        if value > MAX_DEFOCUS_ANGST:
            raise InputError(f"{_where(source, lines, index)}: {what} {value:g} Å is above 20 µm: wrong unit? "
                             "(expected Å for CTFFIND, nm for IMOD .defocus)")
    return values


def check_dose(accumulated_e_per_angst2: np.ndarray, source: str, lines: Sequence[int] | np.ndarray | None = None,
               *, acquisition_order: np.ndarray | None = None, order_source: str = "") -> np.ndarray:
    """(T,) accumulated dose including each tilt (e⁻/Å²): finite, ≥ 0, plausible total, and, when the
    acquisition order is known, non-decreasing in that order."""
    dose = check_finite(accumulated_e_per_angst2, "dose", source, lines)
    negative = np.flatnonzero(dose < 0)
    if negative.size:
        index = int(negative[0])
        raise InputError(f"{_where(source, lines, index)}: dose {dose[index]:g} e/A^2 is negative (expected "
                         "≥ 0; a column of tilt angles read as doses?)")
    if dose.size and dose.max() > MAX_ACCUMULATED_DOSE:
        index = int(np.argmax(dose))
        raise InputError(f"{_where(source, lines, index)}: accumulated dose {dose[index]:g} e/A^2 is above "
                         f"{MAX_ACCUMULATED_DOSE:g}: wrong unit (e/px?) or column?")
    if acquisition_order is not None:
        check_dose_follows_order(dose, np.asarray(acquisition_order), source, lines, order_source)
    return dose


def check_dose_follows_order(accumulated: np.ndarray, acquisition_order: np.ndarray, source: str,
                             lines: Sequence[int] | np.ndarray | None, order_source: str) -> None:
    """InputError where the accumulated dose decreases from one acquired tilt to the next."""
    by_time = np.argsort(acquisition_order, kind="stable")
    steps = np.diff(accumulated[by_time])
    drops = np.flatnonzero(steps < -DOSE_ORDER_TOLERANCE)
    if drops.size:
        later = int(by_time[drops[0] + 1])
        earlier = int(by_time[drops[0]])
        raise InputError(f"{_where(source, lines, later)}: accumulated dose {accumulated[later]:g} e/A^2 is below "
                         f"that of the tilt acquired before it (image {earlier + 1}: {accumulated[earlier]:g}; "
                         f"acquisition order from {order_source or 'the dose'}): the dose must grow with "
                         "acquisition")


def dose_not_growing_outward(tilt_angles_deg: np.ndarray, accumulated: np.ndarray) -> list[int]:
    """Images (0-based, stack order) whose accumulated dose is below that of the tilt next to them on the side of
    the first-acquired (lowest-dose) tilt, tilts sorted by angle.

    Every usual scheme (unidirectional, bidirectional, dose-symmetric, any start angle) acquires each side of its
    start tilt outward, so the dose grows away from the start on both sides; a dose list whose rows are not in
    stack order almost never does. Used where the acquisition order is unknown (no mdoc) and cannot be checked.
    """
    angles = np.asarray(tilt_angles_deg, dtype=np.float64)
    dose = np.asarray(accumulated, dtype=np.float64)
    by_angle = np.argsort(angles, kind="stable")
    start = int(np.argmin(dose[by_angle]))
    left = by_angle[:start + 1][::-1]  # from the start outward, towards negative angles
    right = by_angle[start:]
    low = []
    for side in (left, right):
        low += [int(side[i + 1]) for i in np.flatnonzero(np.diff(dose[side]) < -DOSE_ORDER_TOLERANCE)]
    return sorted(low)


def check_acquisition_order(order: np.ndarray, source: str) -> np.ndarray:
    """(T,) 0-based acquisition ranks: a permutation of 0..T−1."""
    ranks = np.asarray(order)
    if sorted(ranks.tolist()) != list(range(ranks.size)):
        raise InputError(f"{source}: acquisition order must be a permutation of 0..{ranks.size - 1}, got "
                         f"{ranks.tolist()[:10]}")
    return ranks.astype(np.int64)


def check_voltage_kv(voltage_kv: float, source: str) -> float:
    """Acceleration voltage in kV (20–1000); a value in volts gets a hint."""
    value = float(voltage_kv)
    if not np.isfinite(value):
        raise InputError(f"{source}: voltage is not a finite number ({value})")
    if 1e4 <= value <= 1e6:
        raise InputError(f"{source}: voltage {value:g} looks like volts; expected kV ({value / 1000:g})")
    low, high = VOLTAGE_RANGE_KV
    if not low <= value <= high:
        raise InputError(f"{source}: voltage {value:g} kV is outside {low:g}–{high:g} kV (expected kV)")
    return value


def check_cs_mm(cs_mm: float, source: str) -> float:
    """Spherical aberration in mm (0–10); a value in µm gets a hint."""
    value = float(cs_mm)
    if not np.isfinite(value) or value < 0:
        raise InputError(f"{source}: spherical aberration {value} must be a number ≥ 0 (mm)")
    if value > MAX_CS_MM:
        raise InputError(f"{source}: spherical aberration {value:g} mm is above {MAX_CS_MM:g} mm: in µm? "
                         f"(expected mm, e.g. {value / 1000:g})")
    return value


def check_amplitude_contrast(amplitude_contrast: float, source: str) -> float:
    """Amplitude contrast as a fraction in [0, 1); a percentage gets a hint."""
    value = float(amplitude_contrast)
    if not np.isfinite(value) or value < 0:
        raise InputError(f"{source}: amplitude contrast {value} must be a fraction in [0, 1)")
    if 1.0 <= value <= 100.0:
        raise InputError(f"{source}: amplitude contrast {value:g} looks like a percentage; expected a fraction "
                         f"({value / 100:g})")
    if value >= 1.0:
        raise InputError(f"{source}: amplitude contrast {value:g} must be a fraction in [0, 1)")
    return value


def check_pixel_size_angst(pixel_angst: float, source: str) -> float:
    """Pixel size in Å (0.1–200); a value in nm gets a hint."""
    value = float(pixel_angst)
    low, high = PIXEL_RANGE_ANGST
    if not np.isfinite(value) or value <= 0:
        raise InputError(f"{source}: pixel size {value} must be > 0 (Å)")
    if value < low:
        raise InputError(f"{source}: pixel size {value:g} Å is below {low:g} Å: in nm? (expected Å, e.g. "
                         f"{value * 10:g})")
    if value > high:
        raise InputError(f"{source}: pixel size {value:g} Å is above {high:g} Å (expected Å)")
    return value
