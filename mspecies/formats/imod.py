"""IMOD / SerialEM / CTFFIND text files of a tilt series: readers and writers.

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
* CTFFIND4 diagnostic ``.txt``: ``#`` comment header then ``micrograph_number defocus1_angst
  defocus2_angst azimuth_deg phase_shift_rad cross_correlation fit_resolution_angst``.
* dose ``.txt`` (IMOD ``mtffilter -dfile`` two-column form): per line the prior accumulated dose and
  the dose of the image, e⁻/Å².
* SerialEM ``.mdoc``: ``key = value`` header, ``[T = ...]`` title lines and ``[ZValue = i]`` sections.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mspecies.common.types import InputError

DEFOCUS_FLAG_ASTIGMATISM = 1
DEFOCUS_FLAG_RADIANS = 2
DEFOCUS_FLAG_PHASE = 4
DEFOCUS_FLAG_CUTON = 16


def _read_lines(path: str | Path) -> list[tuple[int, str]]:
    """(1-based line number, stripped text) of the non-empty lines of a text file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    with open(path, encoding="utf-8", errors="replace") as handle:
        return [(number, line.strip()) for number, line in enumerate(handle, start=1) if line.strip()]


def _parse_row(path: str | Path, number: int, text: str, n_columns: int | tuple[int, ...]) -> np.ndarray:
    """Split one line into floats, checking the column count (an int or the allowed counts)."""
    tokens = text.split()
    allowed = (n_columns,) if isinstance(n_columns, int) else n_columns
    if len(tokens) not in allowed:
        expected = " or ".join(str(n) for n in allowed)
        raise InputError(f"{path}, line {number}: expected {expected} columns, got {len(tokens)}: {text!r}")
    try:
        return np.array([float(token) for token in tokens])
    except ValueError as error:
        raise InputError(f"{path}, line {number}: non-numeric value in {text!r}") from error


def _read_table(path: str | Path, n_columns: int, comment: str | None = None) -> np.ndarray:
    """(rows, n_columns) float table of a whitespace-separated text file, ``comment`` lines skipped."""
    rows = [_parse_row(path, number, text, n_columns) for number, text in _read_lines(path)
            if comment is None or not text.startswith(comment)]
    if not rows:
        raise InputError(f"{path}: no data lines")
    return np.vstack(rows)


def read_tlt(path: str | Path) -> np.ndarray:
    """IMOD ``.tlt`` → (T,) tilt angles in degrees, stack order."""
    return _read_table(path, 1)[:, 0]


def write_tlt(path: str | Path, tilt_angles_deg: np.ndarray) -> Path:
    """Write (T,) tilt angles (deg) one per line."""
    angles = np.asarray(tilt_angles_deg, dtype=np.float64).reshape(-1)
    Path(path).write_text("".join(f"{angle:10.4f}\n" for angle in angles))
    return Path(path)


def read_xf(path: str | Path) -> np.ndarray:
    """IMOD ``.xf`` → (T, 2, 3) ``[A | d]`` with ``aligned = A @ raw + d`` (centred px)."""
    table = _read_table(path, 6)
    xf = np.empty((table.shape[0], 2, 3))
    xf[:, 0, :] = table[:, [0, 1, 4]]
    xf[:, 1, :] = table[:, [2, 3, 5]]
    return xf


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
    lines += [f"{i + 1:d}  {i + 1:d}  {a:.2f}  {a:.2f}  {du:.2f}  {dv:.2f}  {ang:.2f}\n"
              for i, (a, du, dv, ang) in enumerate(zip(angles, u_nm, v_nm, astig, strict=True))]
    Path(path).write_text("".join(lines))
    return Path(path)


def _defocus_layout(path: str | Path, lines: list[tuple[int, str]]) -> tuple[int, list[tuple[int, str]]]:
    """(flag, data lines) of a defocus file: version ≥ 3 has a flag-only first line."""
    number, text = lines[0]
    first = _parse_row(path, number, text, tuple(range(5, 11)))
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
    raise an error.
    """
    lines = _read_lines(path)
    if not lines:
        raise InputError(f"{path}: empty defocus file")
    flag, data = _defocus_layout(path, lines)
    astig = bool(flag & DEFOCUS_FLAG_ASTIGMATISM)
    n_columns = 5 + (2 if astig else 0) + (1 if flag & DEFOCUS_FLAG_PHASE else 0) \
        + (1 if flag & DEFOCUS_FLAG_CUTON else 0)
    rows = [(number, _parse_row(path, number, text, n_columns)) for number, text in data]
    n_views = int(max(row[1] for _, row in rows))
    out = {key: np.full(n_views, np.nan) for key in
           ("defocus_u_angst", "defocus_v_angst", "defocus_angle_deg", "tilt_angles_deg", "phase_shift_deg")}
    for number, row in rows:
        start, end = int(row[0]), int(row[1])
        if not 1 <= start <= end:
            raise InputError(f"{path}, line {number}: view range {start}-{end} is not 1-based ascending")
        views = np.arange(start - 1, end)
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
    return out


CTFFIND_HEADER = (
    "# Output from CTFFIND version 4.1.14 (written by mspecies)\n"
    "# Columns: #1 - micrograph number; #2 - defocus 1 [Angstroms]; #3 - defocus 2; "
    "#4 - azimuth of astigmatism; #5 - additional phase shift [radians]; #6 - cross correlation; "
    "#7 - spacing (in Angstroms) up to which CTF rings were fit successfully\n"
)


def write_ctffind_txt(path: str | Path, defocus_u_angst: np.ndarray, defocus_v_angst: np.ndarray,
                      defocus_angle_deg: np.ndarray, *, phase_shift_rad: np.ndarray | float = 0.0,
                      cross_correlation: np.ndarray | float = 0.9, fit_resolution_angst: np.ndarray | float = 8.0
                      ) -> Path:
    """Write a CTFFIND4 diagnostic text file, one row per tilt (micrograph numbers 1..T)."""
    u = np.asarray(defocus_u_angst, dtype=np.float64).reshape(-1)
    columns = [np.arange(1, u.size + 1, dtype=np.float64), u]
    for values in (defocus_v_angst, defocus_angle_deg, phase_shift_rad, cross_correlation, fit_resolution_angst):
        columns.append(np.broadcast_to(np.asarray(values, dtype=np.float64), u.shape))
    body = "".join(" ".join(f"{value:.6f}" for value in row) + "\n" for row in np.column_stack(columns))
    Path(path).write_text(CTFFIND_HEADER + body)
    return Path(path)


def read_ctffind_txt(path: str | Path) -> dict[str, np.ndarray]:
    """CTFFIND4 diagnostic text → dict of (T,) arrays: ``micrograph_number``, ``defocus_u_angst``,
    ``defocus_v_angst``, ``defocus_angle_deg``, ``phase_shift_rad``, ``cross_correlation``,
    ``fit_resolution_angst``."""
    table = _read_table(path, 7, comment="#")
    keys = ("micrograph_number", "defocus_u_angst", "defocus_v_angst", "defocus_angle_deg", "phase_shift_rad",
            "cross_correlation", "fit_resolution_angst")
    return {key: table[:, i].copy() for i, key in enumerate(keys)}


def write_dose_txt(path: str | Path, pre_exposure_e_per_angst2: np.ndarray, dose_per_tilt_e_per_angst2: np.ndarray
                   ) -> Path:
    """Write the two-column dose file: prior accumulated dose and the tilt's own dose (e⁻/Å²), stack order."""
    pre = np.asarray(pre_exposure_e_per_angst2, dtype=np.float64).reshape(-1)
    own = np.broadcast_to(np.asarray(dose_per_tilt_e_per_angst2, dtype=np.float64), pre.shape)
    Path(path).write_text("".join(f"{a:.4f} {b:.4f}\n" for a, b in zip(pre, own, strict=True)))
    return Path(path)


def read_dose_txt(path: str | Path) -> dict[str, np.ndarray]:
    """Two-column dose file → (T,) ``pre_exposure_e_per_angst2``, ``dose_per_tilt_e_per_angst2`` and
    ``accumulated_dose_e_per_angst2`` (= prior + own, Scipion's accumulated dose including the tilt)."""
    table = _read_table(path, 2)
    return {"pre_exposure_e_per_angst2": table[:, 0].copy(), "dose_per_tilt_e_per_angst2": table[:, 1].copy(),
            "accumulated_dose_e_per_angst2": table[:, 0] + table[:, 1]}


def _mdoc_value(text: str) -> object:
    """A float, a list of floats, or the raw string of an mdoc value."""
    tokens = text.split()
    try:
        numbers = [float(token) for token in tokens]
    except ValueError:
        return text
    if len(numbers) == 1:
        return numbers[0]
    return numbers if numbers else text


def _format_mdoc_value(value: object) -> str:
    if isinstance(value, (list, tuple, np.ndarray)):
        return " ".join(_format_mdoc_value(item) for item in value)
    if isinstance(value, (float, np.floating)):
        return f"{float(value):g}" if float(value).is_integer() else f"{float(value):.6g}"
    return str(value)


def read_mdoc(path: str | Path) -> dict[str, object]:
    """Read a SerialEM ``.mdoc``.

    Returns
    -------
    dict with ``header`` (key → value before the first section), ``titles`` (the text of the ``[T = ...]``
    lines) and ``sections`` (one dict per ``[ZValue = i]`` section, in file order, with ``ZValue`` as int).
    Values are floats, lists of floats, or strings.
    """
    header: dict[str, object] = {}
    titles: list[str] = []
    sections: list[dict[str, object]] = []
    current = header
    for number, text in _read_lines(path):
        if text.startswith("[") and text.endswith("]"):
            key, _, value = text[1:-1].partition("=")
            key, value = key.strip(), value.strip()
            if key == "T":
                titles.append(value)
            elif key == "ZValue":
                try:
                    current = {"ZValue": int(value)}
                except ValueError as error:
                    raise InputError(f"{path}, line {number}: ZValue must be an integer, got {value!r}") from error
                sections.append(current)
            else:
                current = {"section": key, "value": value}
                sections.append(current)
            continue
        key, sep, value = text.partition("=")
        if not sep or not key.strip():
            raise InputError(f"{path}, line {number}: expected 'key = value', got {text!r}")
        current[key.strip()] = _mdoc_value(value.strip())
    return {"header": header, "titles": titles, "sections": sections}


def write_mdoc(path: str | Path, header: dict[str, object], sections: list[dict[str, object]],
               titles: list[str] = ()) -> Path:
    """Write a SerialEM ``.mdoc``: header keys, ``[T = title]`` lines, then ``[ZValue = i]`` sections.

    Each section dict may hold ``ZValue`` (defaults to its index); other keys are written as ``key = value``.
    """
    lines = [f"{key} = {_format_mdoc_value(value)}" for key, value in header.items()]
    for title in titles:
        lines += ["", f"[T = {title}]"]
    for index, section in enumerate(sections):
        lines += ["", f"[ZValue = {int(section.get('ZValue', index))}]"]
        lines += [f"{key} = {_format_mdoc_value(value)}" for key, value in section.items() if key != "ZValue"]
    Path(path).write_text("\n".join(lines) + "\n\n")
    return Path(path)
