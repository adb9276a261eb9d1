"""SerialEM ``.mdoc``: the raw file (header, ``[T = ...]`` titles, ``[ZValue = i]`` sections) and the per-tilt
metadata it holds, in stack order.

``ZValue`` is the 0-based index in the raw stack. Acquisition order is the rank of ``DateTime`` (file order when
absent). The accumulated dose (e⁻/Å², including the tilt) is ``PriorRecordDose + ExposureDose`` when
``PriorRecordDose`` is present, else the cumulative sum of ``ExposureDose`` in acquisition order; without
``ExposureDose``, or with 0 in every section (SerialEM without a dose calibration), the mdoc gives no dose
(None). Values are checked by :mod:`mspecies.formats.validate`.
"""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

import numpy as np

from mspecies.common.types import InputError
from mspecies.formats.text_table import read_lines
from mspecies.formats.validate import (
    check_dose,
    check_finite,
    check_pixel_size_angst,
    check_tilt_angles_deg,
    check_voltage_kv,
)

DATE_FORMATS = ("%d-%b-%y %H:%M:%S", "%d-%b-%Y %H:%M:%S")


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
    for number, text in read_lines(path):
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


def _timestamp(path: str | os.PathLike[str], z_value: int, text: object) -> float:
    for fmt in DATE_FORMATS:
        try:
            return datetime.strptime(" ".join(str(text).split()), fmt).timestamp()
        except ValueError:
            continue
    raise InputError(f"{path} [ZValue = {z_value}]: DateTime {text!r}: unknown format (expected e.g. "
                     "'01-Jan-24  10:00:00')")


def _section_values(path: str | os.PathLike[str], sections: list[dict[str, object]], key: str) -> np.ndarray:
    """(T,) float values of ``key`` in every section; InputError naming the first section without it."""
    values = []
    for section in sections:
        if key not in section:
            raise InputError(f"{path} [ZValue = {section['ZValue']}]: no {key}")
        try:
            values.append(float(section[key]))  # type: ignore[arg-type]
        except (TypeError, ValueError) as error:
            raise InputError(f"{path} [ZValue = {section['ZValue']}]: {key} = {section[key]!r} is not a "
                             "number") from error
    return np.array(values)


def _header_or_first(mdoc: dict[str, object], key: str) -> float | None:
    header, first = mdoc["header"], mdoc["sections"][0]  # type: ignore[index]
    value = header.get(key, first.get(key))  # type: ignore[union-attr]
    return float(value) if isinstance(value, (int, float)) and value else None


def read_mdoc_tilts(path: str | os.PathLike[str]) -> dict[str, object]:
    """Per-tilt metadata of an mdoc, stack order.

    Returns
    -------
    dict: ``stack`` (path of ``ImageFile`` next to the mdoc, else the mdoc name without ``.mdoc``),
    ``pixel_size_angst`` / ``voltage_kv`` (header or first section, or None), ``tilt_angles_deg``,
    ``acquisition_order`` (0-based), ``order_source`` (``DateTime``, else ``PriorRecordDose``, else section order),
    ``accumulated_dose_e_per_angst2`` and ``dose_e_per_angst2`` (own dose; both None without ``ExposureDose``),
    ``dose_source`` (text), ``lines`` (None: values come from sections, named by ZValue).
    """
    mdoc = read_mdoc(path)
    sections = sorted(mdoc["sections"], key=lambda s: int(s.get("ZValue", -1)))  # type: ignore[arg-type]
    sections = [s for s in sections if "ZValue" in s]
    if not sections:
        raise InputError(f"{path}: no [ZValue = ...] sections")
    z_values = [int(s["ZValue"]) for s in sections]
    if z_values != list(range(len(sections))):
        raise InputError(f"{path}: ZValue sections must be 0..{len(sections) - 1} once each, got {z_values[:10]}")
    where = f"{path} (ZValue order)"
    angles = check_tilt_angles_deg(_section_values(path, sections, "TiltAngle"), where)
    if all("DateTime" in s for s in sections):
        keys, order_source = np.array([_timestamp(path, int(s["ZValue"]), s["DateTime"]) for s in sections]), \
            f"{path} DateTime"
    elif all("PriorRecordDose" in s for s in sections):  # the dose before each tilt orders them (a sorted stack)
        keys, order_source = _section_values(path, sections, "PriorRecordDose"), \
            f"{path} PriorRecordDose (no DateTime)"
    else:
        keys, order_source = np.arange(len(sections), dtype=np.float64), f"{path} section order"
    order = np.argsort(np.argsort(keys, kind="stable"), kind="stable")
    own = accumulated = None
    dose_source = "none (no ExposureDose, or 0 in every section: SerialEM without a dose calibration)"
    exposure = _section_values(path, sections, "ExposureDose") if all("ExposureDose" in s for s in sections) \
        else None
    if exposure is not None and np.any(exposure != 0):
        own = check_dose(exposure, f"{where} ExposureDose")
        if all("PriorRecordDose" in s for s in sections):
            prior = check_dose(_section_values(path, sections, "PriorRecordDose"), f"{where} PriorRecordDose")
            accumulated, dose_source = prior + own, f"{path} PriorRecordDose + ExposureDose"
        else:
            accumulated = np.cumsum(own[np.argsort(order)])[order]
            dose_source = f"{path} ExposureDose summed in acquisition order"
        check_dose(accumulated, where, acquisition_order=order, order_source=order_source)
    pixel, voltage = _header_or_first(mdoc, "PixelSpacing"), _header_or_first(mdoc, "Voltage")
    stack_name = str(mdoc["header"].get("ImageFile") or os.path.basename(str(path)).removesuffix(".mdoc"))  # type: ignore[union-attr]
    return {"stack": os.path.join(os.path.dirname(os.fspath(path)), os.path.basename(stack_name.replace("\\", "/"))),
            "pixel_size_angst": None if pixel is None else check_pixel_size_angst(pixel, f"{path} PixelSpacing"),
            "voltage_kv": None if voltage is None else check_voltage_kv(voltage, f"{path} Voltage"),
            "tilt_angles_deg": check_finite(angles, "TiltAngle", where), "acquisition_order": order,
            "order_source": order_source, "dose_e_per_angst2": own, "accumulated_dose_e_per_angst2": accumulated,
            "dose_source": dose_source}
