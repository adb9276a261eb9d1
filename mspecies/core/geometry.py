"""Rotations and tilt-series projection geometry (pure NumPy).

Euler angles follow RELION (``Euler_angles2matrix``): ZYZ, (rot, tilt, psi) in degrees,
``A = Rz(psi)·Ry(tilt)·Rz(rot)`` written with RELION's passive sign convention; ``A`` maps
reference coordinates to particle coordinates through ``particle(r) = reference(Aᵀ r)``.

Tilt geometry follows IMOD and scipion-em-tomo: for a point (x, y, z) relative to the tomogram
centre and tilt angle θ, the aligned image position is ``x_ali = x cosθ + z sinθ``,
``y_ali = y`` and the height along the beam is ``z_tilt = −x sinθ + z cosθ``. The raw-image
position is the inverse of the tilt's ``.xf`` transform (``aligned = A raw + d``, centred px).
"""

from __future__ import annotations

import numpy as np

from mspecies.common.euler import euler_to_matrix, matrix_to_euler
from mspecies.common.types import TiltSeriesData

__all__ = ["euler_to_matrix", "matrix_to_euler"]  # re-exported for core's callers

def tilt_rotation(tilt_angles_deg: np.ndarray) -> np.ndarray:
    """(T,) tilt angles → (T, 3, 3) matrices mapping tomogram (x, y, z) to (x_ali, y_ali, z_tilt)."""
    theta = np.deg2rad(np.asarray(tilt_angles_deg, dtype=np.float64))
    c, s = np.cos(theta), np.sin(theta)
    zero, one = np.zeros_like(theta), np.ones_like(theta)
    return np.stack([np.stack([c, zero, s], -1),
                     np.stack([zero, one, zero], -1),
                     np.stack([-s, zero, c], -1)], axis=-2)


def inverse_2x2(matrices: np.ndarray) -> np.ndarray:
    """(..., 2, 2) inverses in closed form, float64 (adjugate over determinant).

    Written out rather than ``np.linalg.inv``: LAPACK on a stack of 2 × 2 matrices wakes OpenBLAS's thread pool,
    whose threads then spin (``sched_yield``) on the cores that the export's own workers need
    (``benchmarks/export/README.md``, fifth pass)."""
    m = np.asarray(matrices, dtype=np.float64)
    a, b, c, d = m[..., 0, 0], m[..., 0, 1], m[..., 1, 0], m[..., 1, 1]
    det = a * d - b * c
    if not np.all(np.isfinite(det)) or np.any(det == 0):
        raise np.linalg.LinAlgError("Singular matrix")
    return np.stack([np.stack([d, -b], -1), np.stack([-c, a], -1)], -2) / det[..., None, None]


def pseudo_inverse_3x2(matrices: np.ndarray) -> np.ndarray:
    """(..., 2, 3) Moore–Penrose pseudo-inverses of (..., 3, 2) matrices of rank 2: ``(gᵀg)⁻¹ gᵀ`` (as
    :func:`inverse_2x2`, without waking OpenBLAS's threads)."""
    g = np.asarray(matrices, dtype=np.float64)
    transposed = np.swapaxes(g, -1, -2)
    return np.einsum("...ij,...jk->...ik", inverse_2x2(np.einsum("...ij,...jk->...ik", transposed, g)), transposed)


def aligned_to_raw_px(aligned_px: np.ndarray, xf: np.ndarray) -> np.ndarray:
    """Invert IMOD ``.xf`` transforms: (..., T, 2) aligned centred px and (T, 2, 3) xf → raw centred px."""
    inverse = inverse_2x2(xf[:, :, :2])
    return np.einsum("tij,...tj->...ti", inverse, aligned_px - xf[:, :, 2])


def raw_to_aligned_px(raw_px: np.ndarray, xf: np.ndarray) -> np.ndarray:
    """Apply IMOD ``.xf`` transforms: (..., T, 2) raw centred px → aligned centred px."""
    return np.einsum("tij,...tj->...ti", xf[:, :, :2], raw_px) + xf[:, :, 2]


def image_centre_px(image_shape_yx: tuple[int, int]) -> np.ndarray:
    """(x, y) index of the centre of an image of shape (ny, nx): ``(nx // 2, ny // 2)``."""
    return np.array([image_shape_yx[1] // 2, image_shape_yx[0] // 2], dtype=np.float64)


def centred_angst_to_corner_px(positions_angst: np.ndarray, tomogram_shape_xyz_px: tuple[int, int, int] | np.ndarray,
                               pixel_size_angst: float) -> np.ndarray:
    """(N, 3) centred positions (Å) → RELION-style corner pixels: ``position / pixel + shape // 2``.

    ``tomogram_shape_xyz_px`` is the (nx, ny, nz) size of the tomogram at ``pixel_size_angst``.
    """
    centre_px = np.asarray(tomogram_shape_xyz_px, dtype=np.int64) // 2
    return np.asarray(positions_angst, dtype=np.float64) / float(pixel_size_angst) + centre_px


def corner_px_to_centred_angst(coordinates_px: np.ndarray, tomogram_shape_xyz_px: tuple[int, int, int] | np.ndarray,
                               pixel_size_angst: float) -> np.ndarray:
    """Inverse of :func:`centred_angst_to_corner_px`: (N, 3) corner pixels → centred positions (Å)."""
    centre_px = np.asarray(tomogram_shape_xyz_px, dtype=np.int64) // 2
    return (np.asarray(coordinates_px, dtype=np.float64) - centre_px) * float(pixel_size_angst)


def project_positions_to_tilts(positions_angst: np.ndarray, tilt_series: TiltSeriesData
                               ) -> tuple[np.ndarray, np.ndarray]:
    """Where each particle lands in each raw tilt image.

    Parameters
    ----------
    positions_angst
        (N, 3) particle positions (x, y, z) in Å relative to the tomogram centre.
    tilt_series
        Geometry of the raw tilt series (tilt angles, ``.xf`` alignment, pixel size).

    Returns
    -------
    raw_px
        (N, T, 2) (x, y) pixel index coordinates in the raw images (centre at ``N // 2``).
    height_angst
        (N, T) height ``z_tilt`` of each particle along the beam in each tilt, in Å.
    """
    positions_px = np.asarray(positions_angst, dtype=np.float64).reshape(-1, 3) / tilt_series.pixel_size_angst
    rotated = np.einsum("tij,nj->nti", tilt_rotation(tilt_series.tilt_angles_deg), positions_px)
    raw_centred = aligned_to_raw_px(rotated[..., :2], tilt_series.xf)
    return raw_centred + image_centre_px(tilt_series.image_shape_yx), rotated[..., 2] * tilt_series.pixel_size_angst


def particle_defocus_angst(tilt_series: TiltSeriesData, height_angst: np.ndarray,
                           defocus_gradient_sign: int = -1) -> tuple[np.ndarray, np.ndarray]:
    """Per-particle, per-tilt defocus U and V (Å) from the tilt's defocus and the particle height.

    ``defocus = tilt defocus + defocus_gradient_sign · z_tilt``. The default (−1) makes the
    right side of the aligned image more underfocused at positive tilt (IMOD/Dynamo).

    Parameters
    ----------
    height_angst
        (N, T) height of each particle along the beam (``z_tilt`` from
        :func:`project_positions_to_tilts`), Å.

    Returns
    -------
    (N, T) defocus U and (N, T) defocus V in Å; the astigmatism angle is the tilt's.
    """
    if defocus_gradient_sign not in (-1, 1):
        raise ValueError(f"defocus_gradient_sign must be -1 or +1, got {defocus_gradient_sign}")
    delta = defocus_gradient_sign * np.asarray(height_angst)
    return tilt_series.defocus_u_angst + delta, tilt_series.defocus_v_angst + delta


def relion_tilt_alignment(tilt_series: TiltSeriesData) -> dict[str, np.ndarray]:
    """Per-tilt RELION 5 alignment of the raw tilt images: (T,) arrays ``x_tilt_deg``, ``y_tilt_deg``,
    ``z_rot_deg``, ``x_shift_angst``, ``y_shift_angst`` and ``scale_error`` (stack order).

    RELION projects a point p (tilt-series px, centred) to ``Rz(ZRot)·Ry(YTilt)·Rx(XTilt)·p + c_img + shift/px``
    (``tomogram.cpp:17-63``; relion5_contract §B5). Ours is ``A⁻¹ (R_θ p − d)`` with R_θ = Ry(θ) and the
    ``.xf`` row ``[A | d]``, so YTilt = θ, XTilt = 0, Rz(ZRot) = the rotation of A⁻¹ and shift = −A⁻¹ d · px.
    RELION has no magnification or stretch per tilt: ``scale_error`` is the largest |singular value − 1| of A⁻¹
    that the rotation leaves out (IMOD fits usually keep it below 1e-2).
    """
    inverse = np.linalg.inv(tilt_series.xf[:, :, :2])
    u, singular, vt = np.linalg.svd(inverse)
    rotation = u @ vt  # polar decomposition: the rotation closest to A⁻¹
    shift_px = -np.einsum("tij,tj->ti", inverse, tilt_series.xf[:, :, 2])
    return {"x_tilt_deg": np.zeros(len(inverse)), "y_tilt_deg": np.asarray(tilt_series.tilt_angles_deg, float),
            "z_rot_deg": np.rad2deg(np.arctan2(rotation[:, 1, 0], rotation[:, 0, 0])),
            "x_shift_angst": shift_px[:, 0] * tilt_series.pixel_size_angst,
            "y_shift_angst": shift_px[:, 1] * tilt_series.pixel_size_angst,
            "scale_error": np.max(np.abs(singular - 1.0), axis=1)}
