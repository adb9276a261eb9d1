"""RELION ZYZ Euler angles <-> rotation matrices (pure NumPy), shared by core and formats.

Euler angles follow RELION (``Euler_angles2matrix``): ZYZ, (rot, tilt, psi) in degrees,
``A = Rz(psi)·Ry(tilt)·Rz(rot)`` written with RELION's passive sign convention; ``A`` maps
reference coordinates to particle coordinates through ``particle(r) = reference(Aᵀ r)``.
"""

from __future__ import annotations

import numpy as np

_EPS = 16 * np.finfo(np.float32).eps


def euler_to_matrix(euler_zyz_deg: np.ndarray) -> np.ndarray:
    """RELION ``Euler_angles2matrix`` for (..., 3) angles (rot, tilt, psi) in degrees → (..., 3, 3)."""
    angles = np.deg2rad(np.asarray(euler_zyz_deg, dtype=np.float64))
    ca, cb, cg = np.cos(angles[..., 0]), np.cos(angles[..., 1]), np.cos(angles[..., 2])
    sa, sb, sg = np.sin(angles[..., 0]), np.sin(angles[..., 1]), np.sin(angles[..., 2])
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    matrix = np.empty(angles.shape[:-1] + (3, 3))
    matrix[..., 0, 0] = cg * cc - sg * sa
    matrix[..., 0, 1] = cg * cs + sg * ca
    matrix[..., 0, 2] = -cg * sb
    matrix[..., 1, 0] = -sg * cc - cg * sa
    matrix[..., 1, 1] = -sg * cs + cg * ca
    matrix[..., 1, 2] = sg * sb
    matrix[..., 2, 0] = sc
    matrix[..., 2, 1] = ss
    matrix[..., 2, 2] = cb
    return matrix


def matrix_to_euler(matrix: np.ndarray) -> np.ndarray:
    """RELION ``Euler_matrix2angles`` for (..., 3, 3) rotation matrices → (..., 3) degrees (rot, tilt, psi)."""
    m = np.asarray(matrix, dtype=np.float64)
    abs_sb = np.hypot(m[..., 0, 2], m[..., 1, 2])
    regular = abs_sb > _EPS
    gamma = np.arctan2(m[..., 1, 2], -m[..., 0, 2])
    alpha = np.arctan2(m[..., 2, 1], m[..., 2, 0])
    sin_g, cos_g = np.sin(gamma), np.cos(gamma)
    with np.errstate(divide="ignore", invalid="ignore"):
        sign_from_cos = np.sign(-m[..., 0, 2] / cos_g)
    sign_sb = np.where(np.abs(sin_g) < np.finfo(np.float32).eps, sign_from_cos,
                       np.where(sin_g > 0, np.sign(m[..., 1, 2]), -np.sign(m[..., 1, 2])))
    beta = np.arctan2(sign_sb * abs_sb, m[..., 2, 2])
    # Gimbal lock (tilt 0 or 180): RELION puts the whole in-plane rotation in psi.
    up = m[..., 2, 2] > 0
    alpha = np.where(regular, alpha, 0.0)
    beta = np.where(regular, beta, np.where(up, 0.0, np.pi))
    gamma = np.where(regular, gamma, np.where(up, np.arctan2(-m[..., 1, 0], m[..., 0, 0]),
                                              np.arctan2(m[..., 1, 0], -m[..., 0, 0])))
    return np.rad2deg(np.stack([alpha, beta, gamma], axis=-1))
