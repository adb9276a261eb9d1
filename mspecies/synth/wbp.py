"""Aligning raw tilt images with their IMOD ``.xf`` and weighted back-projection (WBP) of a tomogram.

Frames: images are ``[y, x]`` arrays with pixel index i centred at coordinate i and the image centre at
``N // 2``; the ``.xf`` maps raw to aligned centred pixels (``aligned = A @ raw + d``). After alignment the
tilt axis is the image Y axis and the IMOD tilt geometry holds: ``x_ali = x cosθ + z sinθ``, ``y_ali = y``.
A binned image/tomogram pixel k is centred at unbinned coordinate ``binning · (k − n_binned // 2)``
relative to the centre, so the binned and unbinned centres coincide.
"""

from __future__ import annotations

import numpy as np
import scipy.fft
from scipy import ndimage

from mspecies.common.types import InputError


def lowpass_stack(stack: np.ndarray, cutoff_cycles_per_px: float, *, workers: int = -1) -> np.ndarray:
    """Low-pass (T, ny, nx) images with a raised-cosine edge ending at ``cutoff_cycles_per_px`` (≤ 0.5)."""
    spectrum = scipy.fft.rfft2(np.asarray(stack, dtype=np.float32), workers=workers)
    fy = scipy.fft.fftfreq(stack.shape[-2])[:, None]
    fx = scipy.fft.rfftfreq(stack.shape[-1])[None, :]
    radius = np.sqrt(fx**2 + fy**2) / cutoff_cycles_per_px
    window = np.where(radius < 0.8, 1.0, np.where(radius < 1.0, 0.5 + 0.5 * np.cos(np.pi * (radius - 0.8) / 0.2),
                                                    0.0))
    return scipy.fft.irfft2(spectrum * window.astype(np.float32), s=stack.shape[-2:], workers=workers)


def align_and_bin_stack(stack: np.ndarray, xf: np.ndarray, binning: int, *, workers: int = -1) -> np.ndarray:
    """Apply the ``.xf`` transforms to raw images and bin them (anti-aliased, centre-preserving).

    Parameters
    ----------
    stack
        (T, ny, nx) raw images.
    xf
        (T, 2, 3) IMOD transforms, ``aligned = A @ raw + d`` in centred unbinned px.
    binning
        Integer binning factor ≥ 1.

    Returns
    -------
    (T, ny // binning, nx // binning) float32 aligned, binned images (outside the raw image: the image mean).
    """
    if binning < 1:
        raise InputError(f"binning must be an integer >= 1, got {binning}")
    n_tilts, ny, nx = stack.shape
    nyb, nxb = ny // binning, nx // binning
    smooth = lowpass_stack(stack, 0.5 / binning, workers=workers) if binning > 1 else np.asarray(stack, np.float32)
    yb, xb = np.meshgrid((np.arange(nyb) - nyb // 2) * binning, (np.arange(nxb) - nxb // 2) * binning,
                         indexing="ij")
    aligned_xy = np.stack([xb.ravel(), yb.ravel()], axis=0).astype(np.float64)  # (2, P)
    out = np.empty((n_tilts, nyb, nxb), dtype=np.float32)
    for t in range(n_tilts):
        raw_xy = np.linalg.solve(xf[t, :, :2], aligned_xy - xf[t, :, 2:3])
        coords = np.stack([raw_xy[1] + ny // 2, raw_xy[0] + nx // 2])
        out[t] = ndimage.map_coordinates(smooth[t], coords, order=1, mode="constant",
                                         cval=float(smooth[t].mean())).reshape(nyb, nxb)
    return out


def ramp_filter(images: np.ndarray, *, workers: int = -1) -> np.ndarray:
    """Ramp (|k_x|) filter along x of (T, ny, nx) aligned images, with a cosine roll-off to Nyquist."""
    nx = images.shape[-1]
    k = scipy.fft.rfftfreq(nx)
    weight = np.maximum(np.abs(k), 0.25 / nx) * (0.5 + 0.5 * np.cos(np.pi * k / 0.5))
    spectrum = scipy.fft.rfft(images, axis=-1, workers=workers)
    return scipy.fft.irfft(spectrum * weight, n=nx, axis=-1, workers=workers)


def weighted_back_projection(aligned: np.ndarray, tilt_angles_deg: np.ndarray, nz: int, *, workers: int = -1
                             ) -> np.ndarray:
    """Reconstruct a tomogram from aligned images by ramp-filtered back-projection.

    Parameters
    ----------
    aligned
        (T, ny, nx) aligned images (tilt axis along Y), any pixel size.
    tilt_angles_deg
        (T,) tilt angles in degrees.
    nz
        Tomogram thickness in pixels of ``aligned``.

    Returns
    -------
    (nz, ny, nx) float32 tomogram, voxel (iz, iy, ix) at centred coordinate (ix − nx//2, iy − ny//2, iz − nz//2);
    same polarity as the images.
    """
    n_tilts, ny, nx = aligned.shape
    filtered = ramp_filter(np.asarray(aligned, dtype=np.float64), workers=workers)
    xc = np.arange(nx) - nx // 2
    zc = (np.arange(nz) - nz // 2)[:, None]
    volume = np.zeros((ny, nz, nx))
    for t, theta in enumerate(np.deg2rad(np.asarray(tilt_angles_deg, dtype=np.float64))):
        x_ali = xc * np.cos(theta) + zc * np.sin(theta) + nx // 2  # (nz, nx) index into the image row
        i0 = np.floor(x_ali).astype(np.int64)
        w1 = x_ali - i0
        inside0 = (i0 >= 0) & (i0 < nx)
        inside1 = (i0 + 1 >= 0) & (i0 + 1 < nx)
        row = filtered[t]
        volume += row[:, np.clip(i0, 0, nx - 1)] * ((1 - w1) * inside0) \
            + row[:, np.clip(i0 + 1, 0, nx - 1)] * (w1 * inside1)
    return (np.transpose(volume, (1, 0, 2)) * (np.pi / n_tilts)).astype(np.float32)
