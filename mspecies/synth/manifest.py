"""Reading the synthetic dataset's ``manifest.json`` (written by :func:`mspecies.synth.dataset.generate_dataset`):
its tilt series and particles as the engine's data classes.

Apart from the generator on purpose: ``python -m mspecies export --manifest`` reads a manifest and should not load
the simulation and back-projection modules (SciPy's ndimage among them) to do so.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mspecies.common.types import InputError, Microscope, ParticlePoses, TiltSeriesData

MANIFEST_FORMAT = "mspecies-synth-1"
"""The ``format`` of a manifest this version writes and reads."""


def load_manifest(path: str | Path) -> dict[str, object]:
    """Read ``manifest.json``; adds ``root`` (its folder, absolute) to resolve the relative file paths."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: manifest not found")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise InputError(f"{path}: not valid JSON ({error})") from error
    if manifest.get("format") != MANIFEST_FORMAT:
        raise InputError(f"{path}: expected format {MANIFEST_FORMAT!r}, got {manifest.get('format')!r}")
    manifest["root"] = str(path.resolve().parent)
    return manifest


def manifest_microscope(manifest: dict[str, object]) -> Microscope:
    """The optics of a manifest."""
    return Microscope(float(manifest["voltage_kv"]), float(manifest["cs_mm"]), float(manifest["amplitude_contrast"]))


def manifest_tilt_series(manifest: dict[str, object], ts_id: str) -> TiltSeriesData:
    """Ground-truth :class:`TiltSeriesData` of one tilt series (``stack_path`` absolute when ``root`` is known)."""
    entries = {entry["ts_id"]: entry for entry in manifest["tilt_series"]}  # type: ignore[union-attr]
    if ts_id not in entries:
        raise InputError(f"ts_id: {ts_id!r} not in the manifest (has {sorted(entries)})")
    entry = entries[ts_id]
    root = Path(str(manifest.get("root", ".")))
    return TiltSeriesData(
        ts_id=ts_id, pixel_size_angst=entry["pixel_size_angst"], image_shape_yx=tuple(entry["image_shape_yx"]),
        tilt_angles_deg=entry["tilt_angles_deg"], xf=entry["xf"], defocus_u_angst=entry["defocus_u_angst"],
        defocus_v_angst=entry["defocus_v_angst"], defocus_angle_deg=entry["defocus_angle_deg"],
        dose_e_per_angst2=entry["dose_e_per_angst2"], acquisition_order=entry["acquisition_order"],
        excluded=entry["excluded"], microscope=manifest_microscope(manifest),
        stack_path=str(root / entry["files"]["stack"]), phase_shift_deg=entry["phase_shift_deg"])


def manifest_particles(manifest: dict[str, object]) -> ParticlePoses:
    """Ground-truth :class:`ParticlePoses` of all particles (centred Å, RELION Euler, tomogram names)."""
    particles = manifest["particles"]
    return ParticlePoses(np.array([p["position_angst"] for p in particles]).reshape(-1, 3),  # type: ignore[union-attr]
                         np.array([p["euler_zyz_deg"] for p in particles]).reshape(-1, 3),  # type: ignore[union-attr]
                         np.array([p["ts_id"] for p in particles], dtype=object))  # type: ignore[union-attr]
