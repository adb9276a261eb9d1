"""RELION 5 particle series (2D stacks): ``particles.star``, ``tomograms.star``, one per-tilt STAR per tomogram and
``optimisation_set.star``, as RELION 5.0.1 reads them (``../shared/reference/relion5_contract.md`` §B).

* ``particles.star``: ``data_general`` (``rlnTomoSubTomosAre2DStacks 1``), ``data_optics`` (dimensionality 2,
  ``rlnImagePixelSize`` of the stacks, ``rlnTomoTiltSeriesPixelSize``, premultiplied flag) and ``data_particles``
  (one ``.mrcs`` per particle, ``rlnTomoVisibleFrames`` as ``[1,0,1]`` without spaces, centred Å coordinates).
* ``tomograms.star``: ``data_global``, one row per tomogram, pointing at ``<ts_id>.star`` with the table
  ``data_<ts_id>``: one row per frame f (the order of ``rlnTomoVisibleFrames``), its image ``f+1@stack.mrcs``,
  alignment, defocus at the tomogram centre and pre-exposure.
* ``optimisation_set.star``: the particles and tomograms files.

Bools are written 0/1 (RELION reads them with ``istream >> bool``); RELION wants ``.mrcs`` for ``n@`` references.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import starfile

from mspecies.common.types import InputError, Microscope

PARTICLE_COLUMNS = ("rlnTomoName", "rlnTomoParticleName", "rlnImageName", "rlnTomoVisibleFrames",
                    "rlnCenteredCoordinateXAngst", "rlnCenteredCoordinateYAngst", "rlnCenteredCoordinateZAngst",
                    "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnRandomSubset")
PRE_ROTATION_COLUMNS = ("rlnTomoSubtomogramRot", "rlnTomoSubtomogramTilt", "rlnTomoSubtomogramPsi")
OPTICS_GROUP = "opticsGroup1"  # in tomograms.star too: RELION reads it only without optics, zarr-particle-tools always
TILT_COLUMNS = ("rlnMicrographName", "rlnTomoNominalStageTiltAngle", "rlnTomoXTilt", "rlnTomoYTilt", "rlnTomoZRot",
                "rlnTomoXShiftAngst", "rlnTomoYShiftAngst", "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle",
                "rlnPhaseShift", "rlnCtfScalefactor", "rlnMicrographPreExposure")


def visible_frames(visible: Sequence[bool] | np.ndarray) -> str:
    """``rlnTomoVisibleFrames`` value: ``[1,0,1]`` (no spaces: a space would end the STAR token)."""
    return "[" + ",".join("1" if v else "0" for v in visible) + "]"


def even_size(size_px: int) -> int:
    """Tomogram size for ``rlnTomoSize*``: RELION's centre is size/2.0 but it rotates about int(size/2), so an odd
    size would put the two 0.5 px apart; ours is index size // 2, which the even size 2·(size // 2) keeps."""
    return 2 * (int(size_px) // 2)


def tomogram_row(ts_id: str, tilt_star: str, *, tilt_series_pixel_angst: float, microscope: Microscope,
                 tomogram_shape_xyz_px: Sequence[int], hand: int) -> dict[str, object]:
    """One ``data_global`` row of ``tomograms.star``. ``hand`` (``rlnTomoHand``, ±1): the defocus grows by
    hand · height along the beam (our ``defocus_gradient_sign``)."""
    if hand not in (-1, 1):
        raise InputError(f"rlnTomoHand: expected -1 or 1, got {hand}")
    x, y, z = (even_size(n) for n in tomogram_shape_xyz_px)
    return {"rlnTomoName": ts_id, "rlnOpticsGroupName": OPTICS_GROUP, "rlnVoltage": float(microscope.voltage_kv),
            "rlnSphericalAberration": float(microscope.cs_mm),
            "rlnAmplitudeContrast": float(microscope.amplitude_contrast),
            "rlnTomoTiltSeriesPixelSize": float(tilt_series_pixel_angst), "rlnTomoHand": int(hand),
            "rlnTomoSizeX": x, "rlnTomoSizeY": y, "rlnTomoSizeZ": z, "rlnTomoTiltSeriesStarFile": tilt_star}


TILT_VALUES = {"rlnTomoNominalStageTiltAngle": "tilt_angle_deg", "rlnTomoXTilt": "x_tilt_deg",
               "rlnTomoYTilt": "y_tilt_deg", "rlnTomoZRot": "z_rot_deg", "rlnTomoXShiftAngst": "x_shift_angst",
               "rlnTomoYShiftAngst": "y_shift_angst", "rlnDefocusU": "defocus_u_angst",
               "rlnDefocusV": "defocus_v_angst", "rlnDefocusAngle": "defocus_angle_deg",
               "rlnPhaseShift": "phase_shift_deg", "rlnMicrographPreExposure": "pre_exposure_e_per_angst2"}


def tilt_table(stack_reference: str, frames: np.ndarray, values: dict[str, np.ndarray]) -> pd.DataFrame:
    """Per-tilt table of one tomogram: row f = stack slice ``frames[f]`` (0-based), ``values`` per frame (F,)
    arrays named as in :data:`TILT_VALUES` (defocus in Å at the tomogram centre, angles in degrees, shifts in Å,
    pre-exposure in e/Å²)."""
    if not stack_reference.endswith((".mrcs", ".st")):
        raise InputError(f"tilt stack {stack_reference}: RELION reads n@ references only from .mrcs or .st files")
    missing = [name for name in TILT_VALUES.values() if name not in values]
    if missing:
        raise InputError(f"tilt table of {stack_reference}: missing {missing}")
    table = pd.DataFrame({"rlnMicrographName": [f"{int(f) + 1}@{stack_reference}" for f in frames]})
    for label, name in TILT_VALUES.items():
        table[label] = np.asarray(values[name], dtype=np.float64)
    table["rlnCtfScalefactor"] = 1.0
    return table[list(TILT_COLUMNS)]


def write_tilt_star(path: str | Path, ts_id: str, table: pd.DataFrame) -> Path:
    """The per-tilt STAR of one tomogram: a single table named ``data_<ts_id>`` (``tomogram_set.cpp:81-97``)."""
    path = Path(path)
    starfile.write({ts_id: table}, path, overwrite=True)
    return path


def write_tomograms_star(path: str | Path, rows: Sequence[dict[str, object]]) -> Path:
    """``tomograms.star``: table ``data_global``, one row per tomogram (:func:`tomogram_row`)."""
    if not rows:
        raise InputError(f"{path}: no tomograms to write")
    path = Path(path)
    starfile.write({"global": pd.DataFrame(list(rows))}, path, overwrite=True)
    return path


def optics_table(*, image_pixel_angst: float, tilt_series_pixel_angst: float, box_px: int, microscope: Microscope,
                 premultiplied: bool) -> pd.DataFrame:
    """One optics group of 2D stacks: the stack pixel (Å) and the tilt-series pixel (Å) both, as RELION needs."""
    return pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": [OPTICS_GROUP],
                         "rlnVoltage": [float(microscope.voltage_kv)],
                         "rlnSphericalAberration": [float(microscope.cs_mm)],
                         "rlnAmplitudeContrast": [float(microscope.amplitude_contrast)],
                         "rlnImagePixelSize": [float(image_pixel_angst)], "rlnImageSize": [int(box_px)],
                         "rlnImageDimensionality": [2],
                         "rlnTomoTiltSeriesPixelSize": [float(tilt_series_pixel_angst)],
                         "rlnCtfDataAreCtfPremultiplied": [int(premultiplied)]})


def write_particles_star(path: str | Path, particles: pd.DataFrame, optics: pd.DataFrame) -> Path:
    """``particles.star`` of 2D stacks: general (2D-stacks flag), optics, particles (:data:`PARTICLE_COLUMNS`,
    optionally :data:`PRE_ROTATION_COLUMNS`; zero ``rlnOrigin*Angst`` and optics group 1 are added)."""
    missing = [name for name in PARTICLE_COLUMNS if name not in particles.columns]
    if missing:
        raise InputError(f"{path}: particle rows lack {missing}")
    if len(particles) == 0:
        raise InputError(f"{path}: no particles to write")
    columns = list(PARTICLE_COLUMNS) + [name for name in PRE_ROTATION_COLUMNS if name in particles.columns]
    table = particles[columns].copy()
    for axis in "XYZ":
        table[f"rlnOrigin{axis}Angst"] = 0.0
    table["rlnOpticsGroup"] = 1
    path = Path(path)
    starfile.write({"general": {"rlnTomoSubTomosAre2DStacks": 1}, "optics": optics, "particles": table}, path,
                   overwrite=True)
    return path


def write_optimisation_set(path: str | Path, particles_star: str, tomograms_star: str) -> Path:
    """``optimisation_set.star``: what ``relion_refine --ios`` and the ``relion_tomo_*`` programs open (paths as
    given, relative to where RELION runs)."""
    path = Path(path)
    starfile.write({"optimisation_set": {"rlnTomoParticlesFile": particles_star,
                                         "rlnTomoTomogramsFile": tomograms_star}}, path, overwrite=True)
    return path
