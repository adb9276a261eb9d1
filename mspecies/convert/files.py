"""Thin adapters from the :mod:`mspecies.formats` readers (one reader per format, values checked by
:mod:`mspecies.formats.validate`) to the per-stack-index arrays the Scipion import protocols need. No parsing
happens here.

Units: xf in px (IMOD, centred), defocus in Å (underfocus positive), angles in degrees.
"""

from __future__ import annotations

import os

import numpy as np

from mspecies.common.types import InputError
from mspecies.formats.validate import check_one_per_tilt

DEFOCUS_FORMATS = ("imod", "ctffind")


def require_file(path: str | os.PathLike[str], what: str) -> None:
    """Raise :class:`InputError` naming ``path`` if it is not an existing file."""
    if not os.path.isfile(path):
        raise InputError(f"{what}: file not found: {path}")


def read_xf_array(path: str | os.PathLike[str]) -> np.ndarray:
    """(T, 2, 3) transforms in stack order, ``[[A11, A12, DX], [A21, A22, DY]]`` (px), from an IMOD ``.xf`` or an
    AreTomo ``.aln`` (by extension; views AreTomo excluded get the identity, as its ``-OutImod`` writes)."""
    from mspecies.formats.aretomo import read_aln
    from mspecies.formats.imod import read_xf

    require_file(path, "alignment (.xf / .aln)")
    if os.fspath(path).lower().endswith(".aln"):
        return read_aln(path).xf
    return read_xf(path)


def read_defocus_array(path: str | os.PathLike[str], file_format: str, n_tilts: int) -> np.ndarray:
    """(T, 3) defocus U (Å), V (Å), astigmatism angle (deg, CTFFIND convention) per stack index.

    ``file_format`` is ``"imod"`` (ctfphaseflip ``.defocus``) or ``"ctffind"`` (CTFFIND 4/5 ``.txt``).
    """
    from mspecies.formats.ctffind import read_ctffind
    from mspecies.formats.imod import read_imod_defocus

    require_file(path, f"defocus file ({file_format})")
    if file_format == "imod":
        values = read_imod_defocus(path)
        table = np.stack([values["defocus_u_angst"], values["defocus_v_angst"], values["defocus_angle_deg"]], axis=1)
    elif file_format == "ctffind":
        fit = read_ctffind(path)
        table = np.stack([fit.defocus_u_angst, fit.defocus_v_angst, fit.defocus_angle_deg], axis=1)
    else:
        raise InputError(f"unknown defocus file format {file_format!r}; expected one of {DEFOCUS_FORMATS}")
    check_one_per_tilt(table.shape[0], n_tilts, "defocus", str(path), "the tilt series")
    return table
