"""Contrast transfer function with RELION's formula (``ctf.cpp``), array-backend agnostic.

Defocus in Å with underfocus positive; the astigmatism angle (deg) is that of the U axis,
counter-clockwise from +X of the raw image. ``ctf(0) = +sin(atan(Q0/√(1−Q0²))) ≈ Q0``.
Spatial frequencies are in 1/Å.
"""

from __future__ import annotations

from types import ModuleType

import numpy as np

from mspecies.common.types import Microscope


def electron_wavelength_angst(voltage_kv: float) -> float:
    """Relativistic electron wavelength (Å) for an acceleration voltage in kV."""
    volts = voltage_kv * 1e3
    return 12.2643247 / np.sqrt(volts * (1.0 + volts * 0.978466e-6))


def phase_constants(microscope: Microscope) -> tuple[float, float, float]:
    """RELION's ``γ = k1 Δf k² + k2 k⁴ − phase − k3`` constants: k1 = πλ (1/Å), k2 = (π/2) Cs λ³ (Cs in Å),
    k3 = atan(Q0 / √(1 − Q0²)) (the amplitude contrast as a phase)."""
    wavelength = electron_wavelength_angst(microscope.voltage_kv)
    q0 = microscope.amplitude_contrast
    return (np.pi * wavelength, np.pi / 2 * (microscope.cs_mm * 1e7) * wavelength**3,
            float(np.arctan(q0 / np.sqrt(1.0 - q0 * q0))))


def rfft_frequencies(shape_yx: tuple[int, int], pixel_size_angst: float, *, xp: ModuleType = np
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Frequency grids (1/Å) of an ``rfft2`` half spectrum of an image of shape (ny, nx) → (ny, nx//2+1) each."""
    ny, nx = shape_yx
    fy = xp.fft.fftfreq(ny, d=pixel_size_angst)
    fx = xp.fft.rfftfreq(nx, d=pixel_size_angst)
    return xp.broadcast_to(fx[None, :], (ny, fx.shape[0])), xp.broadcast_to(fy[:, None], (ny, fx.shape[0]))


def ctf_2d(freq_x: np.ndarray, freq_y: np.ndarray, defocus_u_angst: np.ndarray, defocus_v_angst: np.ndarray,
           defocus_angle_deg: np.ndarray, microscope: Microscope, *, phase_shift_deg: np.ndarray | float = 0.0,
           bfactor_angst2: np.ndarray | float = 0.0, scale: np.ndarray | float = 1.0) -> np.ndarray:
    """RELION CTF value at frequencies (freq_x, freq_y) in 1/Å.

    Defocus, angle, phase, B-factor and scale broadcast against the frequency grids; give them
    a trailing ``[..., None, None]`` to evaluate a stack of CTFs on one grid. The B-factor envelope
    is ``exp(−B k²/4)`` (negative B damps, RELION sign: ``bfactor_angst2 = −4·dose`` is Warp's dose filter).
    """
    xp = _namespace(freq_x)
    k1, k2, k3 = phase_constants(microscope)
    u2 = freq_x * freq_x + freq_y * freq_y
    azimuth = xp.arctan2(freq_y, freq_x) - xp.deg2rad(xp.asarray(defocus_angle_deg))
    defocus_average = -(xp.asarray(defocus_u_angst) + xp.asarray(defocus_v_angst)) / 2
    defocus_deviation = -(xp.asarray(defocus_u_angst) - xp.asarray(defocus_v_angst)) / 2
    delta_f = defocus_average + defocus_deviation * xp.cos(2 * azimuth)
    gamma = k1 * delta_f * u2 + k2 * u2 * u2 - xp.deg2rad(xp.asarray(phase_shift_deg)) - k3
    envelope = xp.exp(xp.asarray(bfactor_angst2) / 4.0 * u2)
    return -xp.sin(gamma) * envelope * xp.asarray(scale)


def _namespace(array: object) -> ModuleType:
    from .backend import get_xp

    return get_xp(array)
