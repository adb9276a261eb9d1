"""Inputs of the export CLI worker (``python -m mspecies export --geometry ts.json --particles particles.star``).

One geometry JSON per tilt series (schema: :mod:`mspecies.cli.export`) from a :class:`TiltSeriesData`, and one
particle STAR per tilt series: ``rlnCoordinateX/Y/Z`` in pixels of the tilt series from the corner of the
unbinned tomogram (``tomogram_shape_xyz_px`` at the tilt-series pixel size), RELION Euler angles (deg) and
``rlnTomoName`` = tsId. No pyworkflow import: the protocol converts Scipion objects first
(:mod:`mspecies.convert.tilt_series`, :mod:`mspecies.convert.particles`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd

from mspecies.common.types import InputError, ParticlePoses, TiltSeriesData
from mspecies.core.geometry import centred_angst_to_corner_px
from mspecies.formats.star import StarBlock, write_star_text

GEOMETRY_JSON = "geometry.json"
PARTICLES_IN_STAR = "particles_in.star"


def tomogram_shape_px(tomogram_dims_xyz: tuple[int, int, int] | None, tomogram_pixel_angst: float | None,
                      tilt_series: TiltSeriesData, thickness_angst: float = 2000.0) -> tuple[int, int, int]:
    """Unbinned tomogram size (x, y, z) in px at the tilt-series pixel size.

    From the tomogram's dimensions (voxels) and pixel size (Å) when known; else the tilt image size in x, y and
    ``thickness_angst`` in z. Only used for the corner-based ``rlnCoordinate*`` (positions stay centred).
    """
    pixel = tilt_series.pixel_size_angst
    if tomogram_dims_xyz is not None and tomogram_pixel_angst:
        return tuple(int(round(d * float(tomogram_pixel_angst) / pixel)) for d in tomogram_dims_xyz)  # type: ignore
    ny, nx = tilt_series.image_shape_yx
    return int(nx), int(ny), int(round(thickness_angst / pixel))


def geometry_dict(tilt_series: TiltSeriesData, tomogram_shape_xyz_px: tuple[int, int, int]) -> dict:
    """The geometry JSON content of one tilt series (absolute stack path, arrays in stack order)."""
    if not tilt_series.stack_path:
        raise InputError(f"tilt series {tilt_series.ts_id}: no stack file")
    return {
        "ts_id": tilt_series.ts_id,
        "stack_path": os.path.abspath(tilt_series.stack_path),
        "pixel_size_angst": float(tilt_series.pixel_size_angst),
        "image_shape_yx": [int(v) for v in tilt_series.image_shape_yx],
        "tilt_angles_deg": np.asarray(tilt_series.tilt_angles_deg, dtype=float).tolist(),
        "xf": np.asarray(tilt_series.xf, dtype=float).tolist(),
        "defocus_u_angst": np.asarray(tilt_series.defocus_u_angst, dtype=float).tolist(),
        "defocus_v_angst": np.asarray(tilt_series.defocus_v_angst, dtype=float).tolist(),
        "defocus_angle_deg": np.asarray(tilt_series.defocus_angle_deg, dtype=float).tolist(),
        "phase_shift_deg": np.asarray(tilt_series.phase_shift_deg, dtype=float).tolist(),
        "dose_e_per_angst2": np.asarray(tilt_series.dose_e_per_angst2, dtype=float).tolist(),
        "acquisition_order": np.asarray(tilt_series.acquisition_order, dtype=int).tolist(),
        "excluded": np.asarray(tilt_series.excluded, dtype=bool).tolist(),
        "voltage_kv": float(tilt_series.microscope.voltage_kv),
        "cs_mm": float(tilt_series.microscope.cs_mm),
        "amplitude_contrast": float(tilt_series.microscope.amplitude_contrast),
        "tomogram_shape_xyz_px": [int(v) for v in tomogram_shape_xyz_px],
    }


def write_geometry_json(path: str | Path, tilt_series: TiltSeriesData,
                        tomogram_shape_xyz_px: tuple[int, int, int]) -> Path:
    """Write the geometry JSON of one tilt series; return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(geometry_dict(tilt_series, tomogram_shape_xyz_px), indent=1))
    return path


def particles_star_table(poses: ParticlePoses, ts_id: str, tomogram_shape_xyz_px: tuple[int, int, int],
                         pixel_size_angst: float) -> pd.DataFrame:
    """RELION 3.1-style particle rows: corner pixels (``centred Å / pixel + shape // 2``), angles, tomogram name."""
    if len(poses) == 0:
        raise InputError(f"tilt series {ts_id}: no particles")
    coords = centred_angst_to_corner_px(poses.positions_angst, tomogram_shape_xyz_px, pixel_size_angst)
    return pd.DataFrame({
        "rlnTomoName": [ts_id] * len(poses),
        "rlnCoordinateX": coords[:, 0], "rlnCoordinateY": coords[:, 1], "rlnCoordinateZ": coords[:, 2],
        "rlnAngleRot": poses.euler_zyz_deg[:, 0], "rlnAngleTilt": poses.euler_zyz_deg[:, 1],
        "rlnAnglePsi": poses.euler_zyz_deg[:, 2]})


def write_particles_star(path: str | Path, poses: ParticlePoses, ts_id: str,
                         tomogram_shape_xyz_px: tuple[int, int, int], pixel_size_angst: float) -> Path:
    """Write the particles of one tilt series for the CLI worker (``data_particles``, 6 decimals)."""
    table = particles_star_table(poses, ts_id, tomogram_shape_xyz_px, pixel_size_angst)
    return write_star_text(path, [StarBlock("particles", table)], ["mspecies export input (one tilt series)"])


def tomogram_mismatch_errors(particle_ts_ids: list[str], tilt_series_ids: list[str],
                             ctf_ts_ids: list[str] | None = None) -> list[str]:
    """Messages for particles on tomograms with no tilt series (or no CTF); empty when all match."""
    errors = []
    missing_ts = sorted(set(particle_ts_ids) - set(tilt_series_ids))
    if missing_ts:
        errors.append(f"Particles on tomograms with no tilt series: {missing_ts[:10]} (tilt series have tsIds "
                      f"{sorted(tilt_series_ids)[:10]}). Tilt series and particles are matched by tomogram id.")
    if ctf_ts_ids is not None:
        missing_ctf = sorted(set(particle_ts_ids) & set(tilt_series_ids) - set(ctf_ts_ids))
        if missing_ctf:
            errors.append(f"No CTF estimation for the tilt series {missing_ctf[:10]} (CTF set has tsIds "
                          f"{sorted(ctf_ts_ids)[:10]}).")
    return errors
