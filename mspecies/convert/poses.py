"""The one place that converts orientations between RELION and Scipion (tomo) matrices.

RELION stores a particle pose as ZYZ Euler angles (rot, tilt, psi) in degrees, giving
``A = Euler_angles2matrix(rot, tilt, psi)`` (:func:`mspecies.core.geometry.euler_to_matrix`),
plus an origin offset ``rlnOrigin{X,Y,Z}Angst`` in Å. Scipion (pwem/tomo) stores a 4x4
matrix ``M`` with ``f'(r) = f(M r)``. Every Scipion plugin that reads RELION poses
(relion, reliontomo, xmipptomo, emantomo) uses ``matrixFromGeometry(shifts_px, angles,
inverseTransform=True)``, which is

    ``M = inverse([[E, −s], [0, 1]])`` with ``E = euler_matrix(−rot, −tilt, −psi, 'szyz') = A``,

so ``M = [[Aᵀ, Aᵀ·s], [0, 1]]`` where ``s = origin_angst / pixel_size_angst`` (px). The rotation
part of the Scipion matrix is therefore ``Aᵀ`` (DESIGN.md). The pair below is tested as a round
trip, against pwem's ``euler_matrix`` and against tomo's ``convertMatrix``; note that tomo's
``getMatrix(convention='relion')`` returns the *same* ``Aᵀ`` for a pure rotation (it only moves the
translation), so "relion" in tomo's API does not mean RELION's ``A``.

Store these matrices with ``convention=None`` (``tomo.constants.TR_SCIPION``), always passed explicitly.
"""

from __future__ import annotations

import numpy as np

from mspecies.core.geometry import euler_to_matrix, matrix_to_euler


def relion_to_scipion_matrix(euler_zyz_deg: np.ndarray, origin_angst: np.ndarray | None,
                             pixel_size_angst: float) -> np.ndarray:
    """RELION pose → Scipion 4x4 matrix(es).

    Parameters
    ----------
    euler_zyz_deg
        (..., 3) RELION (rot, tilt, psi) in degrees.
    origin_angst
        (..., 3) ``rlnOrigin{X,Y,Z}Angst`` in Å, or None for zero.
    pixel_size_angst
        Pixel size (Å/px) in which Scipion expresses the translation (px).

    Returns
    -------
    (..., 4, 4) ``[[Aᵀ, Aᵀ·origin/pixel], [0, 1]]``.
    """
    rot_a = euler_to_matrix(euler_zyz_deg)
    shifts_px = np.zeros(rot_a.shape[:-1]) if origin_angst is None else \
        np.asarray(origin_angst, dtype=np.float64) / float(pixel_size_angst)
    rot_t = np.swapaxes(rot_a, -1, -2)
    matrix = np.zeros(rot_a.shape[:-2] + (4, 4))
    matrix[..., :3, :3] = rot_t
    matrix[..., :3, 3] = np.einsum("...ij,...j->...i", rot_t, shifts_px)
    matrix[..., 3, 3] = 1.0
    return matrix


def scipion_matrix_to_relion(matrix: np.ndarray, pixel_size_angst: float) -> tuple[np.ndarray, np.ndarray]:
    """Scipion 4x4 matrix(es) → RELION ``(euler_zyz_deg (..., 3), origin_angst (..., 3))``; inverse of
    :func:`relion_to_scipion_matrix`."""
    m = np.asarray(matrix, dtype=np.float64)
    rot_a = np.swapaxes(m[..., :3, :3], -1, -2)
    shifts_px = np.einsum("...ij,...j->...i", rot_a, m[..., :3, 3])
    return matrix_to_euler(rot_a), shifts_px * float(pixel_size_angst)
