"""Dose lists: one row per tilt in stack order, e⁻/Å², in the layouts users have, told apart by what they hold.

Layouts (``layout`` argument; ``auto`` decides for two columns):

* ``prior-own``: prior accumulated dose and the tilt's own dose (IMOD ``mtffilter -dfile`` two-column form);
* ``tilt-accumulated``: tilt angle (deg) and accumulated dose including the tilt (Scipion's ``.tlt_dose``-style
  list, RELION's tilt/dose tables);
* ``accumulated``: one column, the accumulated dose including the tilt;
* ``own``: one column, the dose of each tilt, accumulated in the acquisition order (which must then be known).

``#`` lines are comments and a first non-numeric line is a header. Two columns are ambiguous:
``auto`` takes ``tilt-accumulated`` when the first column equals the known tilt angles (±0.05°) or has a negative
value (a prior dose cannot be negative), ``prior-own`` when the first column is the running sum of the second in
acquisition order (prior of the next tilt ≥ prior + own of this one; the first prior 0), and otherwise refuses,
naming the file and how to say which (``--dose-layout``). Every result is checked by
:func:`mspecies.formats.validate.check_dose` (finite, ≥ 0, plausible total, growing with acquisition when the order
is known).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mspecies.common.types import InputError
from mspecies.formats.text_table import read_list
from mspecies.formats.validate import check_dose, check_tilt_angles_deg

DOSE_LAYOUTS = ("auto", "prior-own", "tilt-accumulated", "accumulated", "own")
TILT_MATCH_DEG = 0.05
RUNNING_SUM_TOLERANCE = 0.01  # e⁻/Å²: rounding of the written doses


@dataclass(frozen=True)
class DoseList:
    """A dose list read in stack order: accumulated dose including each tilt (e⁻/Å²) and how it was read."""

    accumulated_e_per_angst2: np.ndarray
    layout: str
    reason: str
    lines: np.ndarray
    tilt_angles_deg: np.ndarray | None = None


def _is_running_sum(prior: np.ndarray, own: np.ndarray) -> bool:
    """Whether sorted priors start at 0 and each is ≥ the previous prior + its own dose (gaps allowed)."""
    order = np.argsort(prior, kind="stable")
    prior, own = prior[order], own[order]
    if abs(prior[0]) > RUNNING_SUM_TOLERANCE or np.any(own < 0):
        return False
    return bool(np.all(prior[1:] >= prior[:-1] + own[:-1] - RUNNING_SUM_TOLERANCE))


def _neither_dose_nor_tilt(path: Path, first: np.ndarray, lines: np.ndarray, tilt_angles_deg: np.ndarray,
                           tilt_source: str) -> InputError:
    """The error for a first column with a negative value that is not the known tilt angle of its row: names the
    first such row (a negative prior dose, or a tilt-angle list in another order than the stack)."""
    mismatch = np.abs(first - tilt_angles_deg) > TILT_MATCH_DEG
    rows = np.flatnonzero(mismatch & (first < 0))
    row = int(rows[0] if rows.size else np.flatnonzero(mismatch)[0])
    return InputError(f"{path}, line {lines[row]}: {first[row]:g} in the first column is neither a prior dose (a dose "
                      f"cannot be < 0) nor the tilt angle of that image in {tilt_source} ({tilt_angles_deg[row]:g}°); "
                      "expected rows of (prior dose, own dose) or (tilt angle, accumulated dose) in stack order")


def _auto_two_columns(path: Path, table: np.ndarray, lines: np.ndarray, tilt_angles_deg: np.ndarray | None,
                      tilt_source: str) -> tuple[str, str]:
    """(layout, reason) for a two-column list, or InputError saying how to tell."""
    first, second = table[:, 0], check_dose(table[:, 1], str(path), lines)  # a dose in either layout
    if tilt_angles_deg is not None and first.shape == tilt_angles_deg.shape \
            and np.max(np.abs(first - tilt_angles_deg)) <= TILT_MATCH_DEG:
        return "tilt-accumulated", f"its first column equals the tilt angles of {tilt_source}"
    if np.any(first < 0):
        if np.all(np.abs(first) <= 90.0) and np.all(second >= 0):
            if tilt_angles_deg is not None and first.shape == tilt_angles_deg.shape:
                raise _neither_dose_nor_tilt(path, first, lines, tilt_angles_deg, tilt_source)
            return "tilt-accumulated", "its first column has negative values (tilt angles; a dose cannot be < 0)"
        raise InputError(f"{path}: negative values in the first column that are not tilt angles; expected "
                         "(prior dose, own dose) or (tilt angle, accumulated dose) in e/A^2")
    if _is_running_sum(first, second):
        return "prior-own", "its first column is the running sum of the second (prior dose, own dose)"
    raise InputError(f"{path}: cannot tell what the two columns hold: the first is neither the tilt angles nor the "
                     "running sum of the second (prior dose, own dose); pass --dose-layout prior-own or "
                     "tilt-accumulated")


def _accumulate_own(path: Path, own: np.ndarray, acquisition_order: np.ndarray | None) -> np.ndarray:
    if acquisition_order is None:
        raise InputError(f"{path}: a list of each tilt's own dose needs the acquisition order (an .mdoc with "
                         "DateTime); give accumulated doses instead (--dose-layout accumulated)")
    by_time = np.argsort(acquisition_order, kind="stable")
    accumulated = np.empty_like(own)
    accumulated[by_time] = np.cumsum(own[by_time])
    return accumulated


def read_dose_list(path: str | Path, layout: str = "auto", *, tilt_angles_deg: np.ndarray | None = None,
                   tilt_source: str = "", acquisition_order: np.ndarray | None = None, order_source: str = ""
                   ) -> DoseList:
    """Read a dose list → :class:`DoseList` with the accumulated dose including each tilt (e⁻/Å², stack order).

    Parameters
    ----------
    layout
        One of :data:`DOSE_LAYOUTS`.
    tilt_angles_deg, tilt_source
        (T,) tilt angles known from another file (and its name), to recognise a tilt-angle column.
    acquisition_order, order_source
        (T,) 0-based acquisition ranks known from another file: needed by ``own``; checked against the dose.
    """
    path = Path(path)
    if layout not in DOSE_LAYOUTS:
        raise InputError(f"--dose-layout: {layout!r} is not one of {DOSE_LAYOUTS}")
    table, lines = read_list(path, "dose")
    n_columns = table.shape[1]
    expected = {"prior-own": 2, "tilt-accumulated": 2, "accumulated": 1, "own": 1}
    if layout == "auto":
        if n_columns == 2:
            layout, reason = _auto_two_columns(path, table, lines, tilt_angles_deg, tilt_source)
        elif n_columns == 1:
            raise InputError(f"{path}: one column: accumulated dose or each tilt's own dose? pass --dose-layout "
                             "accumulated or own")
        else:
            raise InputError(f"{path}, line {lines[0]}: expected 1 or 2 columns, got {n_columns}")
    else:
        reason = "as told (--dose-layout)"
        if n_columns != expected[layout]:
            raise InputError(f"{path}, line {lines[0]}: layout {layout} has {expected[layout]} column(s), the file "
                             f"has {n_columns}")
    tilts = None
    if layout == "prior-own":
        accumulated = table[:, 0] + table[:, 1]
        check_dose(table[:, 0], f"{path} (prior dose)", lines)
        check_dose(table[:, 1], f"{path} (own dose)", lines)
    elif layout == "tilt-accumulated":
        tilts = check_tilt_angles_deg(table[:, 0], str(path), lines)
        accumulated = table[:, 1]
    elif layout == "accumulated":
        accumulated = table[:, 0]
    else:
        check_dose(table[:, 0], f"{path} (own dose)", lines)
        accumulated = _accumulate_own(path, table[:, 0], acquisition_order)
    accumulated = check_dose(accumulated, str(path), lines, acquisition_order=acquisition_order,
                             order_source=order_source)
    return DoseList(accumulated.copy(), layout, reason, lines, tilts)


def write_dose_list(path: str | Path, pre_exposure_e_per_angst2: np.ndarray, dose_per_tilt_e_per_angst2: np.ndarray
                    ) -> Path:
    """Write the ``prior-own`` list with a header line: prior accumulated dose and own dose (e⁻/Å²), stack order."""
    pre = np.asarray(pre_exposure_e_per_angst2, dtype=np.float64).reshape(-1)
    own = np.broadcast_to(np.asarray(dose_per_tilt_e_per_angst2, dtype=np.float64), pre.shape)
    rows = "".join(f"{a:.4f} {b:.4f}\n" for a, b in zip(pre, own, strict=True))
    Path(path).write_text("prior_dose_e_per_A2 own_dose_e_per_A2\n" + rows)
    return Path(path)


def write_tilt_dose(path: str | Path, tilt_angles_deg: np.ndarray, accumulated_e_per_angst2: np.ndarray) -> Path:
    """Write the ``tilt-accumulated`` list: tilt angle (deg) and accumulated dose including the tilt, stack order."""
    angles = np.asarray(tilt_angles_deg, dtype=np.float64).reshape(-1)
    dose = np.asarray(accumulated_e_per_angst2, dtype=np.float64).reshape(-1)
    Path(path).write_text("".join(f"{a:.4f} {d:.4f}\n" for a, d in zip(angles, dose, strict=True)))
    return Path(path)
