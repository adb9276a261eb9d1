"""STAR files for exported sub-tomograms with 3D CTFs, as RELION 3.1 (and 3.0) read them.

RELION 3.1 flavour: ``data_optics`` (one group: pixel size, box, ``rlnImageDimensionality 3`` — without it
RELION treats the images as 2D —, voltage, Cs, amplitude contrast) and ``data_particles`` (image, 3D CTF,
angles, coordinates in output pixels from the tomogram corner, zero origins, tomogram name, random subset).
RELION 3.0 flavour (what M writes): a single ``data_`` table with ``rlnMagnification 10000`` and
``rlnDetectorPixelSize`` = pixel size in Å (RELION computes pixel = detector pixel · 1e4 / magnification).

What the 3D CTF means (``docs/conventions.md``, "3D CTF and RELION"): the sub-tomogram is M's normalized
reconstruction, data = V · reference with V = Σ C·C_w / Σ|C| ≥ 0 the 3D CTF volume written beside it. In RELION's
terms that is *not* CTF-premultiplied data with CTF V, so the optics say ``rlnCtfDataAreCtfPremultiplied 0``
explicitly. ``relion_refine`` 3.1 and 5 then model the data as V · reference with their default flags
(``ml_optimiser.cpp``: reference × Fctf, back-projection X += V·img, W += V²). RELION 5's ``relion_reconstruct``
alone does not square a 3D CTF by default (``reconstructor.cpp:662``): it needs ``--ctf3d_not_squared``. Every
3.1 STAR says so in a header comment (:data:`CTF3D_COMMENT`). Flavour ``5`` declares the same files premultiplied
(V = CTF²), which RELION 5's default ``ctf3d_squared`` reads right in both programs and RELION 3.1 reads wrong.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import starfile

from mspecies.common.types import InputError, Microscope

FLAVOURS = ("3.1", "3.0", "5")
CTF3D_COMMENT = (
    "# 3D CTFs (rlnCtfImage): M's normalized CTF volume V >= 0, data = V x reference, not CTF-premultiplied\n"
    "# (rlnCtfDataAreCtfPremultiplied 0). relion_refine 3.1 and 5: default flags. relion_reconstruct: RELION 3.1\n"
    "# default flags; RELION 5 needs --ctf3d_not_squared (it does not square 3D CTFs by default).\n")
CTF3D_COMMENT_RELION5 = (
    "# 3D CTFs (rlnCtfImage): M's normalized CTF volume V >= 0, data = V x reference, written for RELION 5 as\n"
    "# premultiplied data whose CTF^2 is V (rlnCtfDataAreCtfPremultiplied 1): relion_refine and relion_reconstruct\n"
    "# 5 with default flags, NOT with --ctf3d_not_squared; RELION 3.1 reads it wrong (use flavour 3.1 there).\n")
PARTICLE_COLUMNS = ("rlnImageName", "rlnCtfImage", "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnCoordinateX",
                    "rlnCoordinateY", "rlnCoordinateZ", "rlnTomoName", "rlnMicrographName", "rlnRandomSubset")


def optics_table(pixel_size_angst: float, box_px: int, microscope: Microscope, *, dimensionality: int = 3,
                 group_name: str = "opticsGroup1", premultiplied: bool = False) -> pd.DataFrame:
    """One-row RELION 3.1 ``data_optics`` table (group 1); ``rlnCtfDataAreCtfPremultiplied`` always written
    (RELION reads a missing one as 0, but says nothing about it)."""
    return pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": [group_name],
                         "rlnImagePixelSize": [float(pixel_size_angst)], "rlnImageSize": [int(box_px)],
                         "rlnImageDimensionality": [int(dimensionality)], "rlnVoltage": [float(microscope.voltage_kv)],
                         "rlnSphericalAberration": [float(microscope.cs_mm)],
                         "rlnAmplitudeContrast": [float(microscope.amplitude_contrast)],
                         "rlnCtfDataAreCtfPremultiplied": [int(premultiplied)]})


def subtomo_particles_table(particles: pd.DataFrame, flavour: str, pixel_size_angst: float,
                            microscope: Microscope) -> pd.DataFrame:
    """The particle rows in a flavour: 3.1 adds zero ``rlnOrigin*Angst`` and ``rlnOpticsGroup``; 3.0 adds
    zero ``rlnOriginX/Y/Z`` (px) and the optics per row (magnification, detector pixel, V, Cs, Q0)."""
    missing = [name for name in PARTICLE_COLUMNS if name not in particles.columns]
    if missing:
        raise InputError(f"particles: missing columns {missing}")
    table = particles.copy()
    if flavour in ("3.1", "5"):
        for axis in "XYZ":
            table[f"rlnOrigin{axis}Angst"] = 0.0
        table["rlnOpticsGroup"] = 1
        return table
    for axis in "XYZ":
        table[f"rlnOrigin{axis}"] = 0.0
    table["rlnMagnification"] = 10000.0
    table["rlnDetectorPixelSize"] = float(pixel_size_angst)
    table["rlnVoltage"] = float(microscope.voltage_kv)
    table["rlnSphericalAberration"] = float(microscope.cs_mm)
    table["rlnAmplitudeContrast"] = float(microscope.amplitude_contrast)
    return table


def write_subtomo_star(path: str | Path, particles: pd.DataFrame, *, pixel_size_angst: float, box_px: int,
                       microscope: Microscope, flavour: str = "3.1") -> Path:
    """Write the sub-tomogram STAR.

    Parameters
    ----------
    particles
        One row per particle with :data:`PARTICLE_COLUMNS` (image paths relative to the STAR file).
    pixel_size_angst, box_px
        Output pixel size (Å) and box (px).
    flavour
        ``3.1`` (optics + particles), ``3.0`` (single table) or ``5`` (as 3.1, but the data declared
        premultiplied, so that RELION 5's default ``ctf3d_squared`` reads V right: :data:`CTF3D_COMMENT_RELION5`).
    """
    if flavour not in FLAVOURS:
        raise InputError(f"flavour: expected one of {FLAVOURS}, got {flavour!r}")
    if len(particles) == 0:
        raise InputError(f"{path}: no particles to write")
    table = subtomo_particles_table(particles, flavour, pixel_size_angst, microscope)
    path = Path(path)
    if flavour in ("3.1", "5"):
        relion5 = flavour == "5"
        starfile.write({"optics": optics_table(pixel_size_angst, box_px, microscope, premultiplied=relion5),
                        "particles": table}, path, overwrite=True)
        prepend_comment(path, CTF3D_COMMENT_RELION5 if relion5 else CTF3D_COMMENT)
    else:
        starfile.write(table, path, overwrite=True)
    return path


def prepend_comment(path: Path, comment: str) -> None:
    """Put ``comment`` (``#`` lines) at the top of a written STAR file (RELION and starfile skip them)."""
    path.write_text(comment + path.read_text())
