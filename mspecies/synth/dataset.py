"""Synthetic cryo-ET dataset with known ground truth: raw tilt series, alignment, CTF, dose, particles.

Conventions (those of :mod:`mspecies.common.types`):

* particle positions in Å centred on the tomogram centre; RELION ZYZ Euler angles; a reference blob at
  ``r_b`` lands at ``position + A r_b`` with ``A = euler_to_matrix(angles)``;
* raw image positions from :func:`~mspecies.core.geometry.project_positions_to_tilts` (tilt rotation,
  then the inverse of the IMOD ``.xf``); the ``.xf`` rotation part is a pure rotation, so an isotropic
  Gaussian blob projects to an isotropic 2D Gaussian in the raw image;
* every particle image is rendered analytically in Fourier space in a padded patch, multiplied by the
  RELION CTF with the particle's own defocus (:func:`~mspecies.core.geometry.particle_defocus_angst`) and by
  Warp's dose filter ``exp(−B k²/4)`` with ``B = −4 · d_mid``, where ``d_mid`` = dose received before the tilt
  + half of the tilt's own dose (the mean exposure during the tilt);
* protein is dark: ``raw = −(CTF ⊗ projected density)``; the projected density is the line integral of the
  (dimensionless) map along the beam in voxel units, i.e. what summing the ground-truth map along z gives;
* stack order = tilt angles ascending; acquisition is dose-symmetric (Hagen);
* accumulated dose per tilt includes the tilt itself (Scipion).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.fft

from mspecies.common.types import InputError, Microscope, TiltSeriesData
from mspecies.core import geometry
from mspecies.core.backend import usable_cores
from mspecies.core.ctf import ctf_2d, electron_wavelength_angst, rfft_frequencies
from mspecies.formats import aretomo, coordinates, ctffind, dose, imod, serialem
from mspecies.formats.mrc import write_mrc
from mspecies.formats.star import write_relion31_particles

from .manifest import MANIFEST_FORMAT
from .phantom import BlobModel, make_blob_model, render_blob_map
from .wbp import align_and_bin_stack, weighted_back_projection

WORKERS = usable_cores()

CONVENTIONS = {
    "positions": "position_angst: (x, y, z) in Angstrom relative to the tomogram centre (Scipion default origin).",
    "relion_coordinates": "rlnCoordinateX/Y/Z: pixels at the tilt-series pixel size from the corner of the unbinned "
                          "tomogram: coordinate = centred_px + N // 2 with N = (nx, ny, nz_unbinned).",
    "orientations": "RELION ZYZ Euler (rot, tilt, psi) deg; A = Euler_angles2matrix; particle(r) = "
                    "reference(A^T (r - position)); Scipion's matrix is A^T.",
    "tilt_geometry": "x_ali = x cos(t) + z sin(t), y_ali = y, z_tilt = -x sin(t) + z cos(t) (IMOD); raw = inverse .xf.",
    "xf": "IMOD .xf per stack image: aligned = A @ raw + d, centred pixels; stored [[A11, A12, DX], [A21, A22, DY]].",
    "stack_order": "Raw stack sorted by tilt angle ascending; every per-tilt list is in stack order.",
    "acquisition_order": "0-based rank of each stack image in the dose-symmetric acquisition.",
    "dose": "dose_e_per_angst2 = accumulated dose including the tilt (Scipion); pre_exposure = dose before it.",
    "ctf": "RELION CTF; defocus in Angstrom, underfocus positive, angle of U counter-clockwise from +X of the raw "
           "image (CTFFIND). Particle defocus = tilt defocus + defocus_gradient_sign * z_tilt.",
    "dose_filter": "Warp: exp(-B k^2 / 4) with B = -4 * (pre_exposure + dose_per_tilt / 2).",
    "polarity": "Raw images: dark protein (raw = -(CTF * projected density)). Ground-truth map: white protein.",
    "pixels": "Pixel/voxel index i centred at coordinate i; the centre of an axis of size N is N // 2; "
              "arrays [z, y, x].",
    "tomogram": "Binned WBP tomogram of the aligned images, raw polarity (dark protein), same centre as unbinned.",
    "snr": "Variance of the noise-free images inside the particle boxes (box_px squared around every projected "
           "particle centre) divided by the variance of the added white Gaussian noise.",
}


@dataclass(frozen=True)
class SynthParameters:
    """Everything that defines a synthetic dataset (with the seed, it is reproducible bit for bit)."""

    seed: int = 0
    n_tomograms: int = 1
    n_particles: int = 50
    n_tilts: int = 41
    max_tilt_deg: float = 60.0
    box_px: int = 64
    pixel_size_angst: float = 4.0
    image_shape_yx: tuple[int, int] = (512, 512)
    thickness_angst: float = 1000.0
    snr: float | None = 0.05
    tomogram_binning: int = 4
    voltage_kv: float = 300.0
    cs_mm: float = 2.7
    amplitude_contrast: float = 0.07
    dose_per_tilt_e_per_angst2: float = 3.0
    tilt_axis_angle_deg: float = 85.0
    rotation_jitter_deg: float = 0.3
    shift_sd_px: float = 3.0
    defocus_mean_angst: float = 30000.0
    defocus_spread_angst: float = 2000.0
    astigmatism_range_angst: tuple[float, float] = (500.0, 1500.0)
    defocus_gradient_sign: int = -1
    min_distance_fraction: float = 0.6
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        checks = [
            ("n_tomograms", self.n_tomograms >= 1, "an integer >= 1"),
            ("n_particles", self.n_particles >= 1, "an integer >= 1"),
            ("n_tilts", self.n_tilts >= 2, "an integer >= 2"),
            ("box_px", self.box_px >= 8 and self.box_px % 2 == 0, "an even integer >= 8"),
            ("pixel_size_angst", self.pixel_size_angst > 0, "a number > 0"),
            ("image_shape_yx", len(self.image_shape_yx) == 2 and min(self.image_shape_yx) >= 2 * self.box_px,
             f"two sizes >= 2 * box_px = {2 * self.box_px}"),
            ("thickness_angst", self.thickness_angst >= self.box_px * self.pixel_size_angst,
             f"a thickness >= box_px * pixel_size_angst = {self.box_px * self.pixel_size_angst:g} A"),
            ("snr", self.snr is None or self.snr > 0, "a number > 0, 'inf' or None (noise-free)"),
            ("tomogram_binning", self.tomogram_binning >= 1, "an integer >= 1"),
            ("max_tilt_deg", 0 < self.max_tilt_deg < 90, "a number in (0, 90)"),
            ("dose_per_tilt_e_per_angst2", self.dose_per_tilt_e_per_angst2 >= 0, "a number >= 0"),
            ("defocus_mean_angst", self.defocus_mean_angst > self.defocus_spread_angst + self.thickness_angst,
             "a mean defocus larger than its spread plus the thickness (underfocus everywhere)"),
            ("defocus_gradient_sign", self.defocus_gradient_sign in (-1, 1), "-1 or +1"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise InputError(f"{name}: expected {expected}, got {getattr(self, name)!r}")

    @property
    def microscope(self) -> Microscope:
        return Microscope(self.voltage_kv, self.cs_mm, self.amplitude_contrast)

    @property
    def noise_free(self) -> bool:
        return self.snr is None or not np.isfinite(self.snr)


# ----------------------------------------------------------------------------------------------- acquisition


def tilt_angles(n_tilts: int, max_tilt_deg: float) -> np.ndarray:
    """(T,) tilt angles (deg), ascending, evenly spaced over ``[−max_tilt_deg, +max_tilt_deg]``."""
    return np.linspace(-max_tilt_deg, max_tilt_deg, n_tilts)


def dose_symmetric_order(tilt_angles_deg: np.ndarray) -> np.ndarray:
    """0-based acquisition rank of each tilt in a Hagen dose-symmetric scheme.

    Starts at the tilt closest to 0°, then one tilt on the positive side, then alternates sides in
    groups of two (0, +3, −3, −6, +6, +9, −9, −12, ...); when a side is used up the other one continues.

    Parameters
    ----------
    tilt_angles_deg
        (T,) tilt angles in degrees (any order).

    Returns
    -------
    (T,) int64 rank of each tilt (same order as the input).
    """
    angles = np.asarray(tilt_angles_deg, dtype=np.float64)
    start = int(np.argmin(np.abs(angles)))
    others = [i for i in np.argsort(np.abs(angles), kind="stable") if i != start]
    sides = {1: [i for i in others if angles[i] >= angles[start]], -1: [i for i in others if angles[i] < angles[start]]}
    sequence, side, take = [start], 1, 1
    while sides[1] or sides[-1]:
        if not sides[side]:
            side = -side
        for _ in range(take):
            if sides[side]:
                sequence.append(sides[side].pop(0))
        side, take = -side, 2
    order = np.empty(angles.size, dtype=np.int64)
    order[np.asarray(sequence)] = np.arange(angles.size)
    return order


def rotation_2d(angle_deg: np.ndarray) -> np.ndarray:
    """(..., 2, 2) counter-clockwise rotation matrices for angles in degrees."""
    a = np.deg2rad(np.asarray(angle_deg, dtype=np.float64))
    c, s = np.cos(a), np.sin(a)
    return np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2)


def make_tilt_series(params: SynthParameters, ts_id: str, rng: np.random.Generator) -> TiltSeriesData:
    """Random acquisition of one tilt series: alignment (.xf), per-tilt astigmatic defocus and dose.

    The ``.xf`` rotation maps the raw tilt axis (``tilt_axis_angle_deg`` counter-clockwise from raw +X) onto
    the aligned +Y axis, plus a random per-tilt jitter (normal, sd ``rotation_jitter_deg``); the shifts are
    normal with sd ``shift_sd_px``. Defocus: tilt mean uniform in ``defocus_mean ± defocus_spread``,
    astigmatism (U − V) uniform in ``astigmatism_range``, angle uniform in [−90, 90).
    """
    angles = tilt_angles(params.n_tilts, params.max_tilt_deg)
    n = angles.size
    order = dose_symmetric_order(angles)
    rotation = 90.0 - params.tilt_axis_angle_deg + rng.normal(0.0, params.rotation_jitter_deg, n)
    xf = np.concatenate([rotation_2d(rotation), rng.normal(0.0, params.shift_sd_px, (n, 2, 1))], axis=2)
    mean = params.defocus_mean_angst + rng.uniform(-params.defocus_spread_angst, params.defocus_spread_angst, n)
    astigmatism = rng.uniform(*params.astigmatism_range_angst, n)
    return TiltSeriesData(
        ts_id=ts_id, pixel_size_angst=params.pixel_size_angst, image_shape_yx=tuple(params.image_shape_yx),
        tilt_angles_deg=angles, xf=xf, defocus_u_angst=mean + astigmatism / 2, defocus_v_angst=mean - astigmatism / 2,
        defocus_angle_deg=rng.uniform(-90.0, 90.0, n),
        dose_e_per_angst2=params.dose_per_tilt_e_per_angst2 * (order + 1),
        acquisition_order=order, excluded=np.zeros(n, dtype=bool), microscope=params.microscope)


# ----------------------------------------------------------------------------------------------- particles


def random_rotation_matrices(n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 3, 3) rotation matrices uniform on SO(3) (normalised Gaussian quaternions)."""
    q = rng.normal(size=(n, 4))
    w, x, y, z = (q / np.linalg.norm(q, axis=1, keepdims=True)).T
    return np.stack([
        np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
        np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
        np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1)], -2)


def random_euler_angles(n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 3) RELION Euler angles (deg) of rotations uniform on SO(3)."""
    return geometry.matrix_to_euler(random_rotation_matrices(n, rng))


def place_particles(tilt_series: TiltSeriesData, n_particles: int, params: SynthParameters,
                    rng: np.random.Generator) -> np.ndarray:
    """Uniform random particle positions (N, 3) in Å, centred, inside the tomogram slab.

    A candidate is kept when its box stays inside every raw tilt image (projected centre at least
    ``box_px // 2 + 2`` px from each edge), its whole particle (radius 0.3 box) lies inside the slab
    of thickness ``thickness_angst``, and it is at least ``min_distance_fraction · box`` from every kept one.
    """
    pixel = params.pixel_size_angst
    ny, nx = params.image_shape_yx
    half_z = params.thickness_angst / 2 - 0.3 * params.box_px * pixel
    margin = params.box_px // 2 + 2
    min_distance = params.min_distance_fraction * params.box_px * pixel
    kept: list[np.ndarray] = []
    for _ in range(200):
        candidates = rng.uniform([-nx / 2 * pixel, -ny / 2 * pixel, -half_z], [nx / 2 * pixel, ny / 2 * pixel, half_z],
                                 size=(256, 3))
        raw, _ = geometry.project_positions_to_tilts(candidates, tilt_series)
        inside = np.all((raw >= margin) & (raw <= np.array([nx, ny]) - 1 - margin), axis=(1, 2))
        for candidate in candidates[inside]:
            if not kept or np.min(np.linalg.norm(np.asarray(kept) - candidate, axis=1)) >= min_distance:
                kept.append(candidate)
                if len(kept) == n_particles:
                    return np.asarray(kept)
    raise InputError(f"n_particles: could only place {len(kept)} of {n_particles} particles of box {params.box_px} px "
                     f"inside images of {nx}x{ny} px at every tilt; use fewer particles or larger images")


# ----------------------------------------------------------------------------------------------- rendering


def patch_size_px(tilt_series: TiltSeriesData, box_px: int, max_defocus_angst: float) -> int:
    """Even FFT-friendly patch size holding the box plus the CTF delocalisation ``λ Δf k_Nyquist`` on each side."""
    wavelength = electron_wavelength_angst(tilt_series.microscope.voltage_kv)
    pixel = tilt_series.pixel_size_angst
    delocalisation_px = wavelength * max_defocus_angst / (2 * pixel) / pixel
    size = scipy.fft.next_fast_len(int(np.ceil(box_px + 2 * delocalisation_px + 8)), real=True)
    return size + size % 2


def render_patches(centres_px: np.ndarray, sigmas_px: np.ndarray, masses_vox: np.ndarray, transfer: np.ndarray | None,
                   patch_px: int) -> np.ndarray:
    """Analytic projections of Gaussian blobs, filtered in Fourier space, in (C, P, P) real patches.

    Parameters
    ----------
    centres_px
        (C, B, 2) blob centres (x, y) in pixels relative to the patch pixel [0, 0].
    sigmas_px
        (B,) blob standard deviations in pixels.
    masses_vox
        (B,) blob masses in voxel units (sum of the projection = mass).
    transfer
        (C, P, P // 2 + 1) real filter on the ``rfft2`` grid (CTF × dose filter), or None.
    patch_px
        Patch size P.

    Returns
    -------
    (C, P, P) float64 patches: Σ_b mass_b · N(x; c_b, σ_b²) convolved with the filter (periodic in P).
    """
    ky = scipy.fft.fftfreq(patch_px)
    kx = scipy.fft.rfftfreq(patch_px)
    sig2 = (2 * np.pi**2) * sigmas_px[:, None] ** 2
    along_y = (masses_vox[:, None] * np.exp(-sig2 * ky**2))[None] \
        * np.exp(-2j * np.pi * centres_px[..., 1:2] * ky)  # (C, B, P)
    along_x = np.exp(-sig2 * kx**2)[None] * np.exp(-2j * np.pi * centres_px[..., 0:1] * kx)  # (C, B, K)
    spectrum = np.matmul(np.transpose(along_y, (0, 2, 1)), along_x)  # (C, P, K)
    if transfer is not None:
        spectrum *= transfer
    return scipy.fft.irfft2(spectrum, s=(patch_px, patch_px), workers=WORKERS)


def _dose_filter_bfactor(tilt_series: TiltSeriesData) -> np.ndarray:
    """(T,) Warp B-factors −4 · (pre-exposure + half the tilt's own dose), Å²."""
    pre = tilt_series.pre_exposure_e_per_angst2
    own = tilt_series.dose_e_per_angst2 - pre
    return -4.0 * (pre + 0.5 * own)


def simulate_noise_free(tilt_series: TiltSeriesData, positions_angst: np.ndarray, euler_zyz_deg: np.ndarray,
                        model: BlobModel, *, defocus_gradient_sign: int = -1, apply_ctf: bool = True,
                        apply_dose: bool = True, chunk_pairs: int = 256) -> np.ndarray:
    """Noise-free raw tilt images of the particles (dark protein).

    Parameters
    ----------
    tilt_series
        Geometry, CTF and dose of the tilt series (stack order).
    positions_angst
        (N, 3) centred particle positions in Å.
    euler_zyz_deg
        (N, 3) RELION Euler angles in degrees.
    model
        Blob model of the reference (Å, relative to the box centre).
    apply_ctf, apply_dose
        Switch the CTF / dose filter off (flat transfer) for tests.

    Returns
    -------
    (T, ny, nx) float64 raw images: ``−(CTF ⊗ dose filter ⊗ projected density)``.
    """
    positions = np.asarray(positions_angst, dtype=np.float64).reshape(-1, 3)
    n, n_blobs, pixel = positions.shape[0], model.masses.size, tilt_series.pixel_size_angst
    ny, nx = tilt_series.image_shape_yx
    rotations = geometry.euler_to_matrix(euler_zyz_deg)
    blob_positions = positions[:, None, :] + np.einsum("nij,bj->nbi", rotations, model.centres_angst)
    blob_raw, _ = geometry.project_positions_to_tilts(blob_positions.reshape(-1, 3), tilt_series)
    blob_raw = blob_raw.reshape(n, n_blobs, tilt_series.n_tilts, 2)
    centre_raw, height = geometry.project_positions_to_tilts(positions, tilt_series)
    defocus_u, defocus_v = geometry.particle_defocus_angst(tilt_series, height, defocus_gradient_sign)
    extent = float(np.max(np.linalg.norm(model.centres_angst, axis=1) + 3 * model.sigmas_angst)) / pixel
    patch = patch_size_px(tilt_series, int(np.ceil(2 * extent)), float(np.max(defocus_u)))
    offsets = np.rint(centre_raw).astype(np.int64) - patch // 2  # (N, T, 2) raw px of patch pixel [0, 0]
    freq_x, freq_y = (np.asarray(g) for g in rfft_frequencies((patch, patch), pixel))
    bfactor = _dose_filter_bfactor(tilt_series) if apply_dose else np.zeros(tilt_series.n_tilts)
    pairs = np.stack(np.meshgrid(np.arange(n), np.arange(tilt_series.n_tilts), indexing="ij"), -1).reshape(-1, 2)
    image = np.zeros((tilt_series.n_tilts, ny, nx))
    for start in range(0, pairs.shape[0], chunk_pairs):
        p, t = pairs[start:start + chunk_pairs].T
        local = blob_raw[p, :, t, :] - offsets[p, t][:, None, :]  # (C, B, 2)
        dose_filter = bfactor[t][:, None, None]
        if apply_ctf:
            transfer = ctf_2d(freq_x, freq_y, defocus_u[p, t][:, None, None], defocus_v[p, t][:, None, None],
                              tilt_series.defocus_angle_deg[t][:, None, None], tilt_series.microscope,
                              bfactor_angst2=dose_filter)
        else:
            transfer = np.exp(dose_filter / 4.0 * (freq_x**2 + freq_y**2))
        patches = render_patches(local, model.sigmas_angst / pixel, model.masses / pixel**3, transfer, patch)
        for k in range(p.size):
            _add_patch(image[t[k]], -patches[k], offsets[p[k], t[k]])
    return image


def _add_patch(image: np.ndarray, patch: np.ndarray, offset_xy: np.ndarray) -> None:
    """Add a (P, P) patch into a (ny, nx) image with its pixel [0, 0] at raw pixel ``offset_xy``, clipped."""
    ny, nx = image.shape
    size = patch.shape[0]
    x0, y0 = int(offset_xy[0]), int(offset_xy[1])
    ix0, iy0, ix1, iy1 = max(x0, 0), max(y0, 0), min(x0 + size, nx), min(y0 + size, ny)
    if ix0 < ix1 and iy0 < iy1:
        image[iy0:iy1, ix0:ix1] += patch[iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0]


def particle_box_mask(tilt_series: TiltSeriesData, positions_angst: np.ndarray, box_px: int) -> np.ndarray:
    """(T, ny, nx) bool: pixels within the ``box_px`` square around each particle's projected centre."""
    ny, nx = tilt_series.image_shape_yx
    raw, _ = geometry.project_positions_to_tilts(positions_angst, tilt_series)
    mask = np.zeros((tilt_series.n_tilts, ny, nx), dtype=bool)
    corner = np.rint(raw).astype(np.int64) - box_px // 2
    for n, t in np.ndindex(raw.shape[:2]):
        x0, y0 = corner[n, t]
        mask[t, max(y0, 0):max(y0 + box_px, 0), max(x0, 0):max(x0 + box_px, 0)] = True
    return mask


def noise_sd_for_snr(noise_free: np.ndarray, mask: np.ndarray, snr: float | None) -> float:
    """Noise sd giving ``snr`` = var(noise-free images inside ``mask``) / noise variance (0 if None/inf)."""
    if snr is None or not np.isfinite(snr):
        return 0.0
    return float(np.sqrt(np.var(noise_free[mask]) / snr))


def simulate_tilt_series(tilt_series: TiltSeriesData, positions_angst: np.ndarray, euler_zyz_deg: np.ndarray,
                         model: BlobModel, *, box_px: int, snr: float | None, rng: np.random.Generator,
                         defocus_gradient_sign: int = -1) -> tuple[np.ndarray, float]:
    """Raw tilt images with white Gaussian noise at a given SNR.

    SNR = variance of the noise-free images over the pixels inside the particle boxes (``box_px`` squares
    around every projected particle centre, all tilts) divided by the noise variance; ``None`` or ``inf``
    gives noise-free images.

    Returns
    -------
    stack
        (T, ny, nx) float32 raw images in stack order (dark protein).
    noise_sd
        The standard deviation of the added noise (0 for noise-free).
    """
    image = simulate_noise_free(tilt_series, positions_angst, euler_zyz_deg, model,
                                defocus_gradient_sign=defocus_gradient_sign)
    noise_sd = noise_sd_for_snr(image, particle_box_mask(tilt_series, positions_angst, box_px), snr)
    if noise_sd > 0:
        image += rng.normal(0.0, noise_sd, image.shape)
    return image.astype(np.float32), noise_sd


# ----------------------------------------------------------------------------------------------- files


def _prepare_out_dir(out_dir: str | Path) -> Path:
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"out_dir: {out} is a file, expected a directory (existing or new)")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _mdoc_sections(tilt_series: TiltSeriesData, params: SynthParameters) -> list[dict[str, object]]:
    """One SerialEM section per stack image; DateTime and SubFramePath follow the acquisition order."""
    start = datetime(2024, 1, 1, 10, 0, 0)
    own_dose = tilt_series.dose_e_per_angst2 - tilt_series.pre_exposure_e_per_angst2
    sections = []
    for t in range(tilt_series.n_tilts):
        rank = int(tilt_series.acquisition_order[t])
        angle = float(tilt_series.tilt_angles_deg[t])
        mean_defocus_um = (tilt_series.defocus_u_angst[t] + tilt_series.defocus_v_angst[t]) / 2e4
        sections.append({
            "ZValue": t, "TiltAngle": round(angle, 4), "ExposureDose": round(float(own_dose[t]), 4),
            "PriorRecordDose": round(float(tilt_series.pre_exposure_e_per_angst2[t]), 4),
            "PixelSpacing": params.pixel_size_angst, "Defocus": round(-float(mean_defocus_um), 4),
            "RotationAngle": params.tilt_axis_angle_deg,
            "DateTime": (start + timedelta(seconds=45 * rank)).strftime("%d-%b-%y  %H:%M:%S"),
            "SubFramePath": f"X:\\frames\\{tilt_series.ts_id}_{rank + 1:03d}_{angle:.1f}.tif",
            "NumSubFrames": 10,
        })
    return sections


def write_tilt_series_files(out: Path, tilt_series: TiltSeriesData, stack: np.ndarray, tomogram: np.ndarray,
                            params: SynthParameters, positions_angst: np.ndarray, euler_zyz_deg: np.ndarray
                            ) -> dict[str, str]:
    """Write the raw stack and every side file a user may hold → role → path relative to ``out``.

    IMOD ``.tlt``/``.xf``/``.defocus``, CTFFIND 4 output (with the optics header), the dose as a prior/own list
    (with a header line) and as a tilt/accumulated list, the SerialEM ``.mdoc``, an AreTomo3 ``.aln`` holding the
    same alignment as the ``.xf`` file (converted from it as written, so both give the same transforms), the binned
    tomogram, and the particles as a text list ``x y z rot tilt psi`` in the binned tomogram's pixels.
    """
    ts_id = tilt_series.ts_id
    folder = out / ts_id
    folder.mkdir(exist_ok=True)
    binned_pixel = params.pixel_size_angst * params.tomogram_binning
    names = {"stack": f"{ts_id}.mrc", "tlt": f"{ts_id}.tlt", "xf": f"{ts_id}.xf", "defocus": f"{ts_id}.defocus",
             "ctffind": f"{ts_id}_ctffind.txt", "dose": f"{ts_id}_dose.txt", "tilt_dose": f"{ts_id}.tlt_dose",
             "mdoc": f"{ts_id}.mrc.mdoc", "aln": f"{ts_id}.aln",
             "tomogram": f"{ts_id}_bin{params.tomogram_binning}.mrc",
             "coordinates": f"{ts_id}_bin{params.tomogram_binning}_particles.txt"}
    paths = {role: folder / name for role, name in names.items()}
    write_mrc(paths["stack"], stack, params.pixel_size_angst)
    imod.write_tlt(paths["tlt"], tilt_series.tilt_angles_deg)
    imod.write_xf(paths["xf"], tilt_series.xf)
    imod.write_imod_defocus(paths["defocus"], tilt_series.tilt_angles_deg, tilt_series.defocus_u_angst,
                            tilt_series.defocus_v_angst, tilt_series.defocus_angle_deg)
    ctffind.write_ctffind(paths["ctffind"], tilt_series.defocus_u_angst, tilt_series.defocus_v_angst,
                          tilt_series.defocus_angle_deg, pixel_size_angst=params.pixel_size_angst,
                          voltage_kv=params.voltage_kv, cs_mm=params.cs_mm,
                          amplitude_contrast=params.amplitude_contrast, stack_name=names["stack"])
    pre = tilt_series.pre_exposure_e_per_angst2
    dose.write_dose_list(paths["dose"], pre, tilt_series.dose_e_per_angst2 - pre)
    dose.write_tilt_dose(paths["tilt_dose"], tilt_series.tilt_angles_deg, tilt_series.dose_e_per_angst2)
    header = {"PixelSpacing": params.pixel_size_angst, "Voltage": params.voltage_kv, "ImageFile": names["stack"],
              "ImageSize": [params.image_shape_yx[1], params.image_shape_yx[0]], "DataMode": 2,
              "TiltAxisAngle": params.tilt_axis_angle_deg}
    titles = ["SerialEM: mspecies synthetic tilt series", f"Tilt axis angle = {params.tilt_axis_angle_deg:.2f}, "
              "binning = 1  spot = 8  camera = 0"]
    serialem.write_mdoc(paths["mdoc"], header, _mdoc_sections(tilt_series, params), titles)
    ny, nx = stack.shape[1:]
    aretomo.write_aln(paths["aln"], imod.read_xf(paths["xf"]), imod.read_tlt(paths["tlt"]), (nx, ny, stack.shape[0]),
                      tilt_series.excluded)
    write_mrc(paths["tomogram"], tomogram, binned_pixel)
    binned_coords = geometry.centred_angst_to_corner_px(positions_angst, tomogram.shape[::-1], binned_pixel)
    coordinates.write_coordinates(paths["coordinates"], binned_coords, euler_zyz_deg)
    return {role: path.relative_to(out).as_posix() for role, path in paths.items()}


def binned_tomogram_nz(params: SynthParameters) -> int:
    """Slab thickness in binned tomogram voxels (≥ 1)."""
    return max(1, int(round(params.thickness_angst / (params.pixel_size_angst * params.tomogram_binning))))


def unbinned_tomogram_shape_zyx(params: SynthParameters) -> tuple[int, int, int]:
    """(nz, ny, nx) of the unbinned tomogram: the binned tomogram's thickness × binning (so that the binned
    tomogram's header gives this size back) and the image size."""
    ny, nx = (int(v) for v in params.image_shape_yx)
    return binned_tomogram_nz(params) * params.tomogram_binning, ny, nx


def relion_coordinates_px(positions_angst: np.ndarray, params: SynthParameters) -> np.ndarray:
    """(N, 3) RELION rlnCoordinateX/Y/Z: centred Å → px from the corner of the unbinned tomogram."""
    return geometry.centred_angst_to_corner_px(positions_angst, unbinned_tomogram_shape_zyx(params)[::-1],
                                               params.pixel_size_angst)


def _tilt_series_entry(tilt_series: TiltSeriesData, files: dict[str, str], params: SynthParameters,
                       tomogram_shape_zyx: tuple[int, ...], noise_sd: float) -> dict[str, object]:
    pre = tilt_series.pre_exposure_e_per_angst2
    return {
        "ts_id": tilt_series.ts_id, "files": files, "stack": files["stack"], "tomogram": files["tomogram"],
        "tomogram_file": files["tomogram"], "image_shape_yx": list(tilt_series.image_shape_yx),
        "pixel_size_angst": tilt_series.pixel_size_angst, "tilt_axis_angle_deg": params.tilt_axis_angle_deg,
        "tilt_angles_deg": tilt_series.tilt_angles_deg.tolist(), "xf": tilt_series.xf.tolist(),
        "defocus_u_angst": tilt_series.defocus_u_angst.tolist(),
        "defocus_v_angst": tilt_series.defocus_v_angst.tolist(),
        "defocus_angle_deg": tilt_series.defocus_angle_deg.tolist(),
        "phase_shift_deg": tilt_series.phase_shift_deg.tolist(),
        "dose_e_per_angst2": tilt_series.dose_e_per_angst2.tolist(), "pre_exposure_e_per_angst2": pre.tolist(),
        "dose_per_tilt_e_per_angst2": (tilt_series.dose_e_per_angst2 - pre).tolist(),
        "acquisition_order": tilt_series.acquisition_order.tolist(), "excluded": tilt_series.excluded.tolist(),
        "tomogram_shape_zyx": list(tomogram_shape_zyx),
        "tomogram_pixel_size_angst": params.pixel_size_angst * params.tomogram_binning,
        "tomogram_binning": params.tomogram_binning,
        "unbinned_tomogram_shape_zyx": list(unbinned_tomogram_shape_zyx(params)),
        "thickness_angst": params.thickness_angst, "noise_sd": noise_sd,
    }


def _star_tables(params: SynthParameters, particles: list[dict[str, object]], stacks: dict[str, str]
                 ) -> tuple[pd.DataFrame, pd.DataFrame]:
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"],
                           "rlnImagePixelSize": [params.pixel_size_angst], "rlnVoltage": [params.voltage_kv],
                           "rlnSphericalAberration": [params.cs_mm],
                           "rlnAmplitudeContrast": [params.amplitude_contrast]})
    coords = np.array([p["relion_coordinate_px"] for p in particles])
    angles = np.array([p["euler_zyz_deg"] for p in particles])
    table = pd.DataFrame({
        "rlnTomoName": [p["ts_id"] for p in particles], "rlnMicrographName": [stacks[p["ts_id"]] for p in particles],
        "rlnCoordinateX": coords[:, 0], "rlnCoordinateY": coords[:, 1], "rlnCoordinateZ": coords[:, 2],
        "rlnAngleRot": angles[:, 0], "rlnAngleTilt": angles[:, 1], "rlnAnglePsi": angles[:, 2],
        "rlnOpticsGroup": np.ones(len(particles), dtype=np.int64)})
    return optics, table


def generate_dataset(out_dir: str | Path, **parameters: object) -> Path:
    """Generate the synthetic dataset and its manifest in ``out_dir``.

    Parameters
    ----------
    out_dir
        Output folder (created; must not be a file).
    **parameters
        Any :class:`SynthParameters` field: ``seed=0, n_tomograms=1, n_particles=50, n_tilts=41, box_px=64,
        pixel_size_angst=4.0, image_shape_yx=(512, 512), thickness_angst=1000.0, snr=0.05, tomogram_binning=4``,
        optics, acquisition and defocus settings.

    Returns
    -------
    Path of ``manifest.json``. Files: ``ground_truth.mrc``, ``particles.star``, per tilt series ``TS_xx/``
    with the raw stack, ``.tlt``, ``.xf``, ``.defocus``, ``_ctffind.txt``, ``_dose.txt``, ``.tlt_dose``,
    ``.mrc.mdoc``, ``.aln``, the binned WBP tomogram and the particles as a text list in its pixels.
    """
    unknown = set(parameters) - set(SynthParameters.__dataclass_fields__)
    if unknown:
        raise InputError(f"generate_dataset: unknown parameters {sorted(unknown)}")
    params = SynthParameters(**parameters)  # type: ignore[arg-type]
    out = _prepare_out_dir(out_dir)
    started = time.perf_counter()
    model = make_blob_model(params.box_px, params.pixel_size_angst)
    write_mrc(out / "ground_truth.mrc", render_blob_map(model, params.box_px, params.pixel_size_angst),
              params.pixel_size_angst)
    entries, particles, stacks = [], [], {}
    for index in range(params.n_tomograms):
        ts_id = f"TS_{index + 1:02d}"
        rng = np.random.default_rng([params.seed, index])
        tilt_series = make_tilt_series(params, ts_id, rng)
        positions = place_particles(tilt_series, params.n_particles, params, rng)
        euler = random_euler_angles(params.n_particles, rng)
        stack, noise_sd = simulate_tilt_series(tilt_series, positions, euler, model, box_px=params.box_px,
                                               snr=params.snr, rng=rng,
                                               defocus_gradient_sign=params.defocus_gradient_sign)
        tomogram = weighted_back_projection(align_and_bin_stack(stack, tilt_series.xf, params.tomogram_binning),
                                            tilt_series.tilt_angles_deg, binned_tomogram_nz(params))
        files = write_tilt_series_files(out, tilt_series, stack, tomogram, params, positions, euler)
        stacks[ts_id] = files["stack"]
        entries.append(_tilt_series_entry(tilt_series, files, params, tomogram.shape, noise_sd))
        coords = relion_coordinates_px(positions, params)
        particles += [{"ts_id": ts_id, "position_angst": positions[i].tolist(), "euler_zyz_deg": euler[i].tolist(),
                       "relion_coordinate_px": coords[i].tolist()} for i in range(params.n_particles)]
    write_relion31_particles(out / "particles.star", *_star_tables(params, particles, stacks))
    manifest = _manifest(params, model, entries, particles, time.perf_counter() - started)
    path = out / "manifest.json"
    path.write_text(json.dumps(manifest, indent=1))
    return path


def _manifest(params: SynthParameters, model: BlobModel, entries: list[dict[str, object]],
              particles: list[dict[str, object]], seconds: float) -> dict[str, object]:
    files = ["ground_truth.mrc", "particles.star", "manifest.json"]
    files += [path for entry in entries for path in entry["files"].values()]  # type: ignore[union-attr]
    settings = {key: value for key, value in asdict(params).items() if key != "extra"}
    return {
        "format": MANIFEST_FORMAT, "conventions": CONVENTIONS, "files": files,
        "seed": params.seed, "pixel_size_angst": params.pixel_size_angst, "voltage_kv": params.voltage_kv,
        "cs_mm": params.cs_mm, "amplitude_contrast": params.amplitude_contrast,
        "defocus_gradient_sign": params.defocus_gradient_sign, "box_px": params.box_px,
        "snr": None if params.noise_free else params.snr,
        "ground_truth_map": "ground_truth.mrc",
        "map": {"file": "ground_truth.mrc", "pixel_size_angst": params.pixel_size_angst, "box_px": params.box_px,
                "polarity": "white protein"},
        "blob_model": {"centres_angst": model.centres_angst.tolist(), "sigmas_angst": model.sigmas_angst.tolist(),
                       "masses": model.masses.tolist()},
        "particles_star": "particles.star", "parameters": settings,
        "tilt_series": entries, "particles": particles, "generation_seconds": round(seconds, 3),
    }
