"""Thin adapters from :mod:`mspecies.formats.imod` readers to the per-stack-index arrays the
Scipion import protocols need. No parsing happens here.

Units: xf in px (IMOD, centred), defocus in Å (underfocus positive), angles in degrees.
"""

from __future__ import annotations

import os

import numpy as np

from mspecies.common.types import InputError

DEFOCUS_FORMATS = ("imod", "ctffind")


def require_file(path: str | os.PathLike[str], what: str) -> None:
    """Raise :class:`InputError` naming ``path`` if it is not an existing file."""
    if not os.path.isfile(path):
        raise InputError(f"{what}: file not found: {path}")


def read_xf_array(path: str | os.PathLike[str]) -> np.ndarray:
    """(T, 2, 3) IMOD ``.xf`` transforms in stack order: ``[[A11, A12, DX], [A21, A22, DY]]`` (px)."""
    from mspecies.formats.imod import read_xf

    require_file(path, "IMOD .xf")
    xf = np.asarray(read_xf(path), dtype=np.float64)
    if xf.ndim == 2 and xf.shape[1] == 6:  # raw rows A11 A12 A21 A22 DX DY
        xf = np.stack([xf[:, [0, 1, 4]], xf[:, [2, 3, 5]]], axis=1)
    if xf.ndim != 3 or xf.shape[1:] != (2, 3):
        raise InputError(f"{path}: expected one IMOD transform (6 numbers) per tilt, got shape {xf.shape}")
    return xf


def _defocus_table(result) -> np.ndarray:
    """Accept a (T, 3) array, a dict or an object with defocus_u_angst/defocus_v_angst/defocus_angle_deg."""
    names = ("defocus_u_angst", "defocus_v_angst", "defocus_angle_deg")
    if isinstance(result, dict):
        return np.stack([np.asarray(result[n], dtype=np.float64) for n in names], axis=1)
    if hasattr(result, names[0]):
        return np.stack([np.asarray(getattr(result, n), dtype=np.float64) for n in names], axis=1)
    return np.asarray(result, dtype=np.float64)[:, :3]


def read_defocus_array(path: str | os.PathLike[str], file_format: str, n_tilts: int) -> np.ndarray:
    """(T, 3) defocus U (Å), V (Å), astigmatism angle (deg, CTFFIND convention) per stack index.

    ``file_format`` is ``"imod"`` (ctfphaseflip ``.defocus``) or ``"ctffind"`` (CTFFIND4 ``.txt``).
    """
    from mspecies.formats import imod

    require_file(path, f"defocus file ({file_format})")
    if file_format == "imod":
        table = _defocus_table(imod.read_imod_defocus(path))
    elif file_format == "ctffind":
        table = _defocus_table(imod.read_ctffind_txt(path))
    else:
        raise InputError(f"unknown defocus file format {file_format!r}; expected one of {DEFOCUS_FORMATS}")
    if table.shape[0] != n_tilts:
        raise InputError(f"{path}: {table.shape[0]} tilts in the defocus file, {n_tilts} in the tilt series")
    return table
