"""RELION 3.x particle STAR rows → centred tomogram pixels + Scipion pose matrices (for the importer).

RELION 3 ``rlnCoordinateX/Y/Z`` are px (at the STAR's pixel size) from the corner of the
tomogram at that pixel size; its centre is ``N // 2`` with ``N`` the tomogram size at that pixel
size. ``rlnOrigin{X,Y,Z}Angst`` is subtracted (``position − origin``). The stored Scipion
coordinate is px at the tomogram's pixel size relative to the tomogram centre.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .poses import relion_to_scipion_matrix

ANGLE_LABELS = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
ORIGIN_LABELS = ("rlnOriginXAngst", "rlnOriginYAngst", "rlnOriginZAngst")
COORD_LABELS = ("rlnCoordinateX", "rlnCoordinateY", "rlnCoordinateZ")


def _columns(table: pd.DataFrame, labels: tuple[str, ...]) -> np.ndarray:
    """(N, 3) float columns; missing labels read as 0."""
    return np.stack([table[label].to_numpy(np.float64) if label in table.columns else np.zeros(len(table))
                     for label in labels], axis=1)


def star_positions_to_centred_px(table: pd.DataFrame, star_pixel_angst: float, tomo_dims_xyz: np.ndarray,
                                 tomo_pixel_angst: float) -> np.ndarray:
    """(N, 3) tomogram-centred px at ``tomo_pixel_angst`` from corner px at ``star_pixel_angst``.

    ``tomo_dims_xyz`` (N, 3) are the tomogram dimensions (voxels at ``tomo_pixel_angst``) of each row.
    """
    star_dims = np.rint(np.asarray(tomo_dims_xyz, dtype=np.float64) * tomo_pixel_angst / star_pixel_angst)
    centred_angst = (_columns(table, COORD_LABELS) - star_dims // 2) * star_pixel_angst
    return (centred_angst - _columns(table, ORIGIN_LABELS)) / tomo_pixel_angst


def star_pose_matrices(table: pd.DataFrame, tomo_pixel_angst: float) -> np.ndarray:
    """(N, 4, 4) Scipion matrices (pure rotations: origins are folded into the positions)."""
    return relion_to_scipion_matrix(_columns(table, ANGLE_LABELS), None, tomo_pixel_angst)
