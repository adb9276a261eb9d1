"""Compiled per-particle kernels of the pre-rotated export (Numba, CPU, the GIL released).

A pre-rotated particle has its own slice geometry, so nothing of its insertion or of its 3D-CTF coverage can
be shared with other particles: per particle the NumPy statement of that work (:func:`mspecies.core.insert.
splat_entries` + :func:`~mspecies.core.insert.insert_one`, and :func:`mspecies.core.ctf3d.slice_coverage` +
:func:`~mspecies.core.ctf3d.pair_tables` + :func:`~mspecies.core.ctf3d.evaluate_pairs`) builds arrays of millions
of entries and reduces them with ``bincount``: 9× the cost of a particle of the plain path at box 64. These
kernels do the same arithmetic in one pass each, without the intermediate arrays:

* :func:`splat_normalised`: the trilinear insertion of one particle's samples (the entries of ``splat_entries``)
  into float32 sums on the voxels of the padded half ball, and M's normalisation into a padded half spectrum;
* :func:`rotated_ctf`: one particle's direct 3D CTF on the (N, N, N//2+1) half grid from its own slice
  orientations (the coverage, CTF phase and normalisation of :mod:`mspecies.core.ctf3d`, pair by pair).

Both give the NumPy values up to float32 rounding (``tests/test_kernels.py``: ≤ 1e-6 of the largest value).
The NumPy statements stay: they are the CuPy path of the insertion and the reference of the tests. Each kernel
is compiled once per machine (``cache=True``: a few seconds, then kept in ``__pycache__`` or Numba's user cache).
"""

from __future__ import annotations

import functools
import math
import threading

import numba
import numpy as np

from mspecies.common.types import Microscope

from .ctf import phase_constants
from .ctf3d import WEIGHT_FLOOR
from .geometry import pseudo_inverse_3x2
from .insert import _FLOOR_EPSILON

_TWO_PI = 2 * np.pi


@numba.njit(cache=True, nogil=True)
def _splat_particle(orientation: np.ndarray, kx: np.ndarray, ky: np.ndarray, m: int, data: np.ndarray,
                    weight: np.ndarray, ctf: np.ndarray, with_data: bool, with_ctf: bool, line_start: np.ndarray,
                    acc: np.ndarray) -> None:
    """Add one particle's splat to ``acc`` (n_ball, 4 or 5) float32 zeroed: Re D, Im D, W1, W0 (and D2 with
    ``with_ctf``), on the voxels of the half ball |k| < M/2 only (:func:`ball_lines`; the others get no entry).

    Sample by sample, its 8 corners (with the Friedel mate of an x = 0 voxel right after it): the entries of
    ``splat_entries``, whose corner-major order would touch the whole volume 8 times (twice as slow), and
    float32 sums (those of ``bincount`` are float64: the spectra differ by float32 rounding, ~3e-7 of their
    range). Rows of 16 bytes on half the voxels of the half volume stay in cache (float64 rows of every voxel
    took 1.5× as long), and most samples take the short way: 8 corners inside the ball, off the x = 0 plane,
    none of weight 0 (1.7× faster than checking each corner; box 64, M = 128).
    """
    half = m // 2
    n_samples = kx.shape[0]
    base = np.empty(3, dtype=np.int64)
    fraction = np.empty(3, dtype=np.float64)
    re = im = ct = np.float32(0)
    for t in range(orientation.shape[0]):
        for s in range(n_samples):
            c = t * n_samples + s
            sign = _sample_frame(orientation, t, kx[s], ky[s], base, fraction)
            if with_data:
                re, im = data[c].real, sign * data[c].imag
            if with_ctf:
                ct = ctf[c]
            wt = weight[c]
            fx, fy, fz = fraction[0], fraction[1], fraction[2]
            bx, by, bz = base[0], base[1], base[2]
            if (bx > 0 and fx > 0 and fy > 0 and fz > 0
                    and (bx + 1) ** 2 + max(by * by, (by + 1) ** 2) + max(bz * bz, (bz + 1) ** 2) < half * half):
                # the common case: all 8 corners inside the ball, none on the x = 0 plane, none of weight 0
                for dz in range(2):
                    for dy in range(2):
                        row = line_start[_wrap(bz + dz, m), _wrap(by + dy, m)] + bx
                        wy, wz = (fy if dy else 1 - fy), (fz if dz else 1 - fz)
                        _add(acc, row, np.float32(((1 - fx) * wy) * wz), re, im, wt, ct, with_ctf)
                        _add(acc, row + 1, np.float32((fx * wy) * wz), re, im, wt, ct, with_ctf)
                continue
            for dz in range(2):
                for dy in range(2):
                    for dx in range(2):
                        w = ((fx if dx else 1 - fx) * (fy if dy else 1 - fy)) * (fz if dz else 1 - fz)
                        x, y, z = bx + dx, by + dy, bz + dz
                        if not (w > 0 and x * x + y * y + z * z < half * half):
                            continue
                        row = line_start[_wrap(z, m), _wrap(y, m)] + x
                        _add(acc, row, np.float32(w), re, im, wt, ct, with_ctf)
                        if x == 0 and (y != 0 or z != 0):  # the Friedel mate, conjugated
                            mirror = line_start[_wrap(-z, m), _wrap(-y, m)]
                            _add(acc, mirror, np.float32(w), re, -im, wt, ct, with_ctf)


@numba.njit(nogil=True)
def _sample_frame(orientation: np.ndarray, t: int, kx: float, ky: float, base: np.ndarray, fraction: np.ndarray
                  ) -> np.float32:
    """Sample (kx, ky) of tilt t → its base voxel (x, y, z) and fraction (written into ``base``, ``fraction``)
    and its sign (float32 −1: inserted at −k, conjugated), as :func:`mspecies.core.insert.splat_entries`."""
    flip = orientation[t, 0, 0] * kx + orientation[t, 0, 1] * ky < 0
    for i in range(3):
        p = orientation[t, i, 0] * kx + orientation[t, i, 1] * ky
        if flip:
            p = -p
        b = np.floor(p + _FLOOR_EPSILON)
        base[i] = np.int64(b)
        fraction[i] = p - b
    return np.float32(-1.0) if flip else np.float32(1.0)


@numba.njit(nogil=True)
def _wrap(i: int, m: int) -> int:
    """``i mod M`` for −M ≤ i < M (a signed frequency index in the FFT layout)."""
    return i + m if i < 0 else i


@numba.njit(nogil=True)
def _add(acc: np.ndarray, row: int, w: np.float32, re: np.float32, im: np.float32, weight: np.float32,
         ctf: np.float32, with_ctf: bool) -> None:
    """One splat entry: ``acc[row] += w · (Re D, ±Im D, |C_u|, 1, C_u · C_w)``, the float32 products of
    :func:`mspecies.core.insert.insert_one` (w · sign · Im D as w · (sign · Im D): the sign is ±1)."""
    acc[row, 0] += np.float32(w * re)
    acc[row, 1] += np.float32(w * im)
    acc[row, 2] += np.float32(w * weight)
    acc[row, 3] += w
    if with_ctf:
        acc[row, 4] += np.float32(w * ctf)


@numba.njit(cache=True, nogil=True)
def _normalise_into(acc: np.ndarray, line_start: np.ndarray, line_length: np.ndarray, checker: np.ndarray,
                    floor: float, spectrum: np.ndarray, ctf_spectrum: np.ndarray, column: int, with_data: bool,
                    with_ctf: bool) -> None:
    """Column ``column`` of the (M·M·(M//2+1), B) spectra ← ``D · min(1, W0) · checker / max(W1, floor)`` in
    the float32 operations of the NumPy path (0 outside the ball); ``acc`` is left zeroed."""
    one, low = np.float32(1.0), np.float32(floor)
    m = line_start.shape[0]
    width = m // 2 + 1
    for z in range(m):
        for y in range(m):
            first = (z * m + y) * width
            for x in range(width):
                v = first + x
                if x >= line_length[z, y]:
                    if with_ctf:
                        ctf_spectrum[v, column] = 0
                    if with_data:
                        spectrum[v, column] = 0
                    continue
                row = line_start[z, y] + x
                factor = np.float32(min(acc[row, 3], one) * checker[v]) / max(acc[row, 2], low)
                if with_ctf:
                    ctf_spectrum[v, column] = acc[row, 4] * factor
                if with_data:
                    spectrum[v, column] = complex(acc[row, 0] * factor, acc[row, 1] * factor)
                for q in range(acc.shape[1]):  # zeroed for the next particle while in cache
                    acc[row, q] = 0


@functools.lru_cache(maxsize=4)
def ball_lines(padded_box_px: int) -> tuple[np.ndarray, np.ndarray]:
    """The voxels of the (M, M, M//2+1) half layout strictly inside |k| < M/2, as lines along x: per (z, y)
    (FFT order) the first compact row ``line_start`` and the count ``line_length`` (x = 0 … length − 1),
    (M, M) int64 each (read-only)."""
    m = padded_box_px
    k = np.fft.fftfreq(m, 1.0 / m).astype(np.int64)
    room = (m // 2) ** 2 - k[:, None] ** 2 - k[None, :] ** 2  # x² < room
    length = np.zeros((m, m), dtype=np.int64)
    inside = room > 0
    length[inside] = [math.isqrt(int(r) - 1) + 1 for r in room[inside]]  # 0 ≤ x ≤ ⌊√(room − 1)⌋
    start = (np.cumsum(length.ravel()) - length.ravel()).reshape(m, m)
    for array in (start, length):
        array.flags.writeable = False
    return start, length


def splat_normalised(orientation: np.ndarray, kx: np.ndarray, ky: np.ndarray, padded_box_px: int,
                     data: np.ndarray | None, weight: np.ndarray, ctf: np.ndarray | None, checker: np.ndarray,
                     floor: float, spectrum: np.ndarray | None, ctf_spectrum: np.ndarray | None, column: int) -> None:
    """Insert one particle with its own (T, 3, 2) slice orientations and write its normalised padded spectra.

    Parameters
    ----------
    orientation
        (T, 3, 2) float64 slice orientations of the particle (:func:`mspecies.core.insert.slice_orientation`).
    kx, ky
        (S,) float64 sample frequencies of the :class:`mspecies.core.insert.SampleGrid` (cycles per M px).
    padded_box_px
        M.
    data, weight, ctf
        (T · S,) sample values: F · C_w complex64 (None: no data), |C_u| float32, C_u · C_w float32 (None: no
        CTF numerator).
    checker
        (M·M·(M//2+1),) float32 ``(−1)^(kz+ky+kx) / M`` (:func:`mspecies.core.reconstruct._checkerboard`).
    floor
        M's floor of the normalisation weight (1e-4).
    spectrum, ctf_spectrum
        (M·M·(M//2+1), B) complex64 / float32 outputs (None where the input is None); column ``column`` is
        written.
    """
    with_data, with_ctf = data is not None, ctf is not None
    start, length = ball_lines(padded_box_px)
    acc = _accumulator(int(length.sum()), 5 if with_ctf else 4)
    no_data = np.zeros((1, 1), dtype=np.complex64)
    no_ctf = np.zeros((1, 1), dtype=np.float32)
    _splat_particle(orientation, kx, ky, padded_box_px, data if with_data else no_data[0], weight,
                    ctf if with_ctf else no_ctf[0], with_data, with_ctf, start, acc)
    _normalise_into(acc, start, length, checker, floor, spectrum if with_data else no_data,
                    ctf_spectrum if with_ctf else no_ctf, column, with_data, with_ctf)


_LOCAL = threading.local()


def _accumulator(n_rows: int, quantities: int) -> np.ndarray:
    """This thread's zeroed (n_rows, quantities) float32 accumulator, kept between particles (a fresh one costs
    more than the splat: every page is faulted in again); :func:`_normalise_into` leaves it zeroed."""
    acc = getattr(_LOCAL, "acc", None)
    if acc is None or acc.shape != (n_rows, quantities):
        acc = _LOCAL.acc = np.zeros((n_rows, quantities), dtype=np.float32)
    return acc


# ----------------------------------------------------------------------------------------------- 3D CTF


@numba.njit(cache=True, nogil=True)
def _rotated_ctf_pairs(normal: np.ndarray, area: np.ndarray, axes: np.ndarray, inverse: np.ndarray, n: int,
                       pixel_size_angst: float, tilt_defocus_sum: np.ndarray, tilt_defocus_difference: np.ndarray,
                       astigmatism: np.ndarray, phase_offset: np.ndarray, constants: np.ndarray,
                       pre_exposure: np.ndarray, particle_offset: np.ndarray, sums: np.ndarray,
                       pairs: np.ndarray, terms: np.ndarray) -> int:
    """Every covered (voxel, tilt) pair of one particle, in the pair order of :mod:`mspecies.core.ctf3d`: Σ τ
    added to ``sums[:, 0]`` (n_voxels, 3) float64, and per pair ``pairs`` (2, P) int64 (voxel, tilt) and
    ``terms`` (4, P) float32 (τ, 2γ reduced to [−π, π], the phase change Δ = |∂γ/∂|k|| / (N p) across a voxel,
    −pre-exposure · k²), for the transcendental functions to run vectorised (:func:`mspecies.core.ctf3d.
    ctf_phase_terms`, with the particle's defocus offset in each tilt; the phase is computed and reduced in double
    precision, so its single-precision cosine is good to 1e-7). Returns the pair count (pairs beyond P are
    counted and their τ summed, not stored: the caller retries with room for all). Written as one loop body:
    a call with this many arrays is not inlined and cost as much as the rest."""
    width = n // 2 + 1
    c1, c2 = constants[0], constants[1]
    scale = 1.0 / (n * pixel_size_angst)
    voxel = np.empty(3, dtype=np.int64)
    half_sum, half_difference = tilt_defocus_sum / 2, tilt_defocus_difference / 2
    offset2 = 2 * c1 * particle_offset
    count = 0
    for t in range(normal.shape[0]):
        a, b, c = axes[t, 0], axes[t, 1], axes[t, 2]
        na, nb, nc = normal[t, a], normal[t, b], normal[t, c]
        reach = 1.0 / abs(na)
        n_candidates = int(np.ceil(2 * reach)) + 1
        for vb in range(_axis_low(b, n), _axis_high(b, n) + 1):
            for vc in range(_axis_low(c, n), _axis_high(c, n) + 1):
                centre = -(nb * vb + nc * vc) / na
                first = np.int64(np.floor(centre - reach))
                for j in range(1, n_candidates + 1):
                    va = first + j
                    distance = na * va + nb * vb + nc * vc
                    if not (abs(distance) < 1.0 and _axis_low(a, n) <= va <= _axis_high(a, n)):
                        continue
                    voxel[a], voxel[b], voxel[c] = va, vb, vc
                    kx = inverse[t, 0, 0] * voxel[0] + inverse[t, 0, 1] * voxel[1] + inverse[t, 0, 2] * voxel[2]
                    ky = inverse[t, 1, 0] * voxel[0] + inverse[t, 1, 1] * voxel[1] + inverse[t, 1, 2] * voxel[2]
                    radius = np.sqrt(kx * kx + ky * ky)
                    edge = min(max(n / 2 + 0.5 - radius, 0.0), 1.0)
                    if not edge > 0:
                        continue
                    profile = (1.0 - abs(distance)) * edge / area[t]
                    row = (_wrap(voxel[2], n) * n + _wrap(voxel[1], n)) * width + voxel[0]
                    sums[row, 0] += profile
                    if count < pairs.shape[1]:
                        pairs[0, count], pairs[1, count] = row, t
                        terms[0, count] = profile
                        fx, fy, k = kx * scale, ky * scale, radius * scale
                        k2 = fx * fx + fy * fy
                        inv = 1.0 / k2 if k2 > 0 else 1.0
                        cos2, sin2 = (fx * fx - fy * fy) * inv, 2 * fx * fy * inv
                        delta_f = -half_sum[t] - half_difference[t] * (astigmatism[t, 0] * cos2
                                                                       + astigmatism[t, 1] * sin2)
                        phase = 2 * (c1 * delta_f * k2 + c2 * k2 * k2 - phase_offset[t]) - offset2[t] * k2
                        terms[1, count] = phase - _TWO_PI * np.floor(phase * (1 / _TWO_PI) + 0.5)
                        terms[2, count] = abs(2 * c1 * delta_f * k + 4 * c2 * k2 * k) * scale
                        terms[3, count] = -pre_exposure[t] * k2
                    count += 1
    return count


@numba.njit(cache=True, nogil=True)
def _add_pair_sums(voxels: np.ndarray, numerator: np.ndarray, denominator: np.ndarray, sums: np.ndarray) -> None:
    """``sums[voxel, 1] += numerator``, ``sums[voxel, 2] += denominator`` pair by pair (float64 sums)."""
    for i in range(voxels.shape[0]):
        sums[voxels[i], 1] += numerator[i]
        sums[voxels[i], 2] += denominator[i]


@numba.njit(nogil=True)
def _axis_low(axis: int, n: int) -> int:
    """Lowest frequency of half-layout axis 0 (x: 0) or 1, 2 (y, z: −N/2+1; the Nyquist rows are left out)."""
    return 0 if axis == 0 else -(n // 2) + 1


@numba.njit(nogil=True)
def _axis_high(axis: int, n: int) -> int:
    return n // 2 if axis == 0 else n // 2 - 1


@numba.njit(cache=True, nogil=True)
def _finish_ctf(sums: np.ndarray, thickness: float, floor: float, apply_ctf: bool, out: np.ndarray) -> None:
    """``out`` (n_voxels,) float32 ← ``min(1, thickness · Σ τ) · Σ τ w ⟨C²⟩ / max(Σ τ √⟨C²⟩, floor)``
    (the multiplicity alone without CTF); ``sums`` is left zeroed."""
    for v in range(sums.shape[0]):
        multiplicity = min(1.0, sums[v, 0] * thickness)
        if apply_ctf:
            out[v] = np.float32(multiplicity * sums[v, 1] / max(sums[v, 2], floor))
        else:
            out[v] = np.float32(multiplicity)
        sums[v, 0] = sums[v, 1] = sums[v, 2] = 0.0


def rotated_ctf(orientation: np.ndarray, *, box_px: int, padded_box_px: int, pixel_size_angst: float,
                defocus_u_angst: np.ndarray, defocus_v_angst: np.ndarray, defocus_angle_deg: np.ndarray,
                phase_shift_deg: np.ndarray, tilt_weight_scale: np.ndarray, pre_exposure_e_per_angst2: np.ndarray,
                defocus_offset_angst: np.ndarray, microscope: Microscope, apply_ctf: bool = True) -> np.ndarray:
    """One particle's direct 3D CTF from its own (T, 3, 2) slice orientations → new (N, N, N//2+1) float32.

    The value of ``ctf3d.evaluate_pairs(ctf3d.pair_tables(ctf3d.slice_coverage(orientation, N), ...),
    coefficients)`` (up to float64 rounding), with the per-tilt arrays (T,) of :func:`mspecies.core.ctf3d.
    pair_tables` and the particle's defocus offset in each tilt, ``defocus_offset_angst`` (T,) (Å, added to
    the tilt's defocus).
    """
    n = int(box_px)
    g = np.asarray(orientation, dtype=np.float64)
    normal = np.cross(g[:, :, 0], g[:, :, 1])
    area = np.linalg.norm(normal, axis=1)
    normal = normal / area[:, None]
    dominant = np.argmax(np.abs(normal), axis=1)
    axes = np.array([[a, *(axis for axis in range(3) if axis != a)] for a in dominant], dtype=np.int64)
    c1, c2, c3 = phase_constants(microscope)
    angle = np.deg2rad(np.asarray(defocus_angle_deg, dtype=np.float64))
    sums, pairs, terms = _ctf_work(n, len(normal))
    arguments = (normal, area, axes, pseudo_inverse_3x2(g), n, float(pixel_size_angst),
                 np.asarray(defocus_u_angst, dtype=np.float64) + defocus_v_angst,
                 np.asarray(defocus_u_angst, dtype=np.float64) - defocus_v_angst,
                 np.stack([np.cos(2 * angle), np.sin(2 * angle)], axis=1),
                 np.deg2rad(np.asarray(phase_shift_deg, dtype=np.float64)) + c3, np.array([c1, c2]),
                 np.asarray(pre_exposure_e_per_angst2, dtype=np.float64),
                 np.asarray(defocus_offset_angst, dtype=np.float64), sums)
    count = _rotated_ctf_pairs(*arguments, pairs, terms)
    if count > pairs.shape[1]:  # more pairs than room: again with room for all
        sums[:] = 0
        sums, pairs, terms = _ctf_work(n, len(normal), count)
        _rotated_ctf_pairs(*arguments, pairs, terms)
    if apply_ctf:
        numerator, denominator = _pair_values(terms[:, :count], pairs[1, :count],
                                              np.asarray(tilt_weight_scale, dtype=np.float32))
        _add_pair_sums(pairs[0, :count], numerator, denominator, sums)
    out = np.empty((n, n, n // 2 + 1), dtype=np.float32)
    _finish_ctf(sums, n / padded_box_px, WEIGHT_FLOOR, apply_ctf, out.reshape(-1))
    return out


def _pair_values(terms: np.ndarray, tilt: np.ndarray, tilt_weight_scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per pair τ w ⟨C²⟩ and τ √⟨C²⟩ (float32, NumPy's vectorised single-precision sin, cos and exp: 10× the
    scalar ones) from the ``terms`` (4, P) of :func:`_rotated_ctf_pairs`: ⟨C²⟩ = ½ − ½ (1 − 1e-6) sinc(Δ) cos 2γ
    and w = cos θ · dose limit · exp(−pre-exposure · k²) (:mod:`mspecies.core.ctf3d`)."""
    profile, phase, step, exposure = terms
    with np.errstate(invalid="ignore", divide="ignore"):
        half_sinc = np.where(step > 0, np.sin(step) / step, np.float32(1)) * np.float32(0.5 * (1 - 1e-6))
    power = np.float32(0.5) - half_sinc * np.cos(phase)
    weight = tilt_weight_scale[tilt] * np.exp(exposure)
    return profile * weight * power, profile * np.sqrt(power)


def _ctf_work(box_px: int, n_tilts: int, n_pairs: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """This thread's zeroed (N·N·(N//2+1), 3) float64 sums (:func:`_finish_ctf` leaves them zeroed) and its pair
    arrays, with room for ``n_pairs`` or for the usual count (about 2.2 voxel layers of each tilt's half disc),
    kept between particles."""
    n_voxels = box_px * box_px * (box_px // 2 + 1)
    room = max(n_pairs, int(2.4 * n_tilts * np.pi * box_px * box_px / 8))
    work = getattr(_LOCAL, "ctf_work", None)
    if work is None or work[0].shape[0] != n_voxels or work[1].shape[1] < room:
        work = _LOCAL.ctf_work = (np.zeros((n_voxels, 3), dtype=np.float64), np.empty((2, room), dtype=np.int64),
                                  np.empty((4, room), dtype=np.float32))
    return work
