"""SerialEM ``.mdoc`` (parsed by :func:`mspecies.formats.imod.read_mdoc`) → per-stack-index tilt metadata.

``ZValue`` is the 0-based index in the raw stack. Acquisition order is the rank of ``DateTime`` (file
order when absent). The accumulated dose (e⁻/Å², including the tilt) is ``PriorRecordDose + ExposureDose``
when ``PriorRecordDose`` is present, else the cumulative sum of ``ExposureDose`` in acquisition order.
"""

from __future__ import annotations

import os
from datetime import datetime

import numpy as np

from mspecies.common.types import InputError

DATE_FORMATS = ("%d-%b-%y %H:%M:%S", "%d-%b-%Y %H:%M:%S")


def _timestamp(text: object) -> float:
    for fmt in DATE_FORMATS:
        try:
            return datetime.strptime(" ".join(str(text).split()), fmt).timestamp()
        except ValueError:
            continue
    raise InputError(f"mdoc DateTime {text!r}: unknown format")


def read_mdoc_tilts(path: str | os.PathLike[str]) -> dict:
    """→ dict: ``stack`` (path), ``pixel_size_angst`` / ``voltage_kv`` (or None), and stack-order (T,) arrays
    ``tilt_angles_deg``, ``acquisition_order`` (0-based), ``accumulated_dose_e_per_angst2``, ``dose_e_per_angst2``."""
    from mspecies.formats.imod import read_mdoc

    if not os.path.isfile(path):
        raise InputError(f"mdoc: file not found: {path}")
    mdoc = read_mdoc(path)
    header, sections = mdoc["header"], sorted(mdoc["sections"], key=lambda s: int(s["ZValue"]))
    if not sections:
        raise InputError(f"{path}: no [ZValue = ...] sections")
    angles = np.array([float(s["TiltAngle"]) for s in sections])
    own = np.array([float(s.get("ExposureDose", 0.0)) for s in sections])
    if all("DateTime" in s for s in sections):
        keys = np.array([_timestamp(s["DateTime"]) for s in sections])
    else:
        keys = np.arange(len(sections), dtype=np.float64)
    order = np.argsort(np.argsort(keys, kind="stable"), kind="stable")
    if all("PriorRecordDose" in s for s in sections):
        accumulated = np.array([float(s["PriorRecordDose"]) for s in sections]) + own
    else:
        accumulated = np.cumsum(own[np.argsort(order)])[order]
    first = sections[0]
    pixel = header.get("PixelSpacing", first.get("PixelSpacing"))
    voltage = header.get("Voltage", first.get("Voltage"))
    stack_name = str(header.get("ImageFile") or os.path.basename(str(path)).removesuffix(".mdoc"))
    return {"stack": os.path.join(os.path.dirname(os.fspath(path)), stack_name),
            "pixel_size_angst": float(pixel) if pixel else None, "voltage_kv": float(voltage) if voltage else None,
            "tilt_angles_deg": angles, "acquisition_order": order, "dose_e_per_angst2": own,
            "accumulated_dose_e_per_angst2": accumulated}
