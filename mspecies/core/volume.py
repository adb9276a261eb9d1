"""Real-space volume helpers (rotation, correlation) used by tests, the demo report and the export engine.

Volumes are indexed ``[z, y, x]``; voxel index i is centred at coordinate i and the rotation
centre of an axis of size N is ``N // 2``.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .geometry import euler_to_matrix

_XYZ_TO_ZYX = np.eye(3)[::-1]


def rotate_volume_relion(reference: np.ndarray, euler_zyz_deg: np.ndarray, *, order: int = 3) -> np.ndarray:
    """Rotate a (Z, Y, X) volume as RELION places a particle: ``particle(r) = reference(Aᵀ r)``.

    ``A = euler_to_matrix(rot, tilt, psi)`` (degrees), r relative to the centre ``N // 2``.
    Spline interpolation of the given ``order``; outside values are 0.
    """
    matrix_xyz = euler_to_matrix(np.asarray(euler_zyz_deg, dtype=np.float64)).T
    matrix_zyx = _XYZ_TO_ZYX @ matrix_xyz @ _XYZ_TO_ZYX
    centre = np.array(reference.shape) // 2
    offset = centre - matrix_zyx @ centre
    return ndimage.affine_transform(reference, matrix_zyx, offset=offset, order=order, mode="constant", cval=0.0)


def normalized_cross_correlation(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Pearson correlation of two equally shaped arrays, optionally inside a boolean mask."""
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    if mask is not None:
        x, y = x[mask], y[mask]
    x = x - x.mean()
    y = y - y.mean()
    denominator = np.sqrt((x * x).sum() * (y * y).sum())
    if denominator == 0:
        raise ValueError("correlation undefined: one of the arrays is constant")
    return float((x * y).sum() / denominator)


def spherical_mask(shape_zyx: tuple[int, int, int], radius_px: float) -> np.ndarray:
    """Boolean mask of voxels within ``radius_px`` of the centre ``N // 2``."""
    grids = np.ogrid[tuple(slice(0, n) for n in shape_zyx)]
    r2 = sum((g - n // 2) ** 2 for g, n in zip(grids, shape_zyx))
    return r2 <= radius_px**2


def fourier_shell_correlation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """FSC of two cubic volumes per integer shell 0..N//2 (shell index = frequency · N)."""
    if a.shape != b.shape or len(set(a.shape)) != 1:
        raise ValueError(f"FSC needs two cubic volumes of equal shape, got {a.shape} and {b.shape}")
    from scipy import fft

    n = a.shape[0]
    fa, fb = fft.rfftn(a), fft.rfftn(b)
    kz = np.fft.fftfreq(n) * n
    kx = np.fft.rfftfreq(n) * n
    shell = np.rint(np.sqrt(kz[:, None, None] ** 2 + kz[None, :, None] ** 2 + kx[None, None, :] ** 2)).astype(int)
    valid = shell <= n // 2
    index = shell[valid]
    cross = np.bincount(index, (fa * np.conj(fb)).real[valid], minlength=n // 2 + 1)
    pa = np.bincount(index, (np.abs(fa) ** 2)[valid], minlength=n // 2 + 1)
    pb = np.bincount(index, (np.abs(fb) ** 2)[valid], minlength=n // 2 + 1)
    return cross / np.sqrt(np.maximum(pa * pb, np.finfo(float).tiny))
