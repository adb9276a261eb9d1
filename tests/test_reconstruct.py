"""Physics of the sub-tomogram + 3D-CTF engine (m_reference §8 items 9–16).

Tilt images are simulated analytically (``synth.simulate_noise_free``: Gaussian blobs projected with the
IMOD geometry, the inverse ``.xf`` and a random tilt axis), so every property is checked against
independent ground truth rather than against the engine's own forward model.
"""

import dataclasses

import numpy as np
import pytest
import scipy.fft
from test_tilt_preparation import plain_preparation

from mspecies.common.types import InputError, Microscope, ParticlePoses, TiltSeriesData
from mspecies.core import extract, insert
from mspecies.core.backend import cupy_unavailable_reason
from mspecies.core.ctf import ctf_2d, rfft_frequencies
from mspecies.core.reconstruct import (
    CTF_METHODS,
    ExportOptions,
    TiltSeriesEngine,
    half_to_centred_cube,
    reconstruct_particles,
)
from mspecies.core.volume import normalized_cross_correlation, rotate_volume_relion, spherical_mask
from mspecies.synth.dataset import rotation_2d, simulate_noise_free
from mspecies.synth.phantom import BlobModel, make_blob_model, render_blob_map

PIXEL = 4.0
BOX = 32
FLAT = Microscope(300.0, 0.0, 0.99999)  # C ≡ 1 (m_reference §8.9)
REAL = Microscope(300.0, 2.7, 0.07)


def make_tilt_series(n_tilts: int = 31, shape=(160, 160), microscope=FLAT, defocus_angst: float = 0.0,
                     dose_per_tilt: float = 0.0, max_tilt: float = 60.0, seed: int = 0) -> TiltSeriesData:
    """A tilt series with a tilt axis at 73° ± jitter and random .xf shifts (arbitrary, not axis-aligned)."""
    rng = np.random.default_rng(seed)
    angles = np.linspace(-max_tilt, max_tilt, n_tilts)
    xf = np.concatenate([rotation_2d(17.0 + rng.normal(0, 0.5, n_tilts)), rng.normal(0, 3, (n_tilts, 2, 1))], 2)
    order = np.argsort(np.argsort(np.abs(angles), kind="stable"), kind="stable")
    defocus = np.full(n_tilts, defocus_angst)
    return TiltSeriesData("TS", PIXEL, shape, angles, xf, defocus + 300 * (defocus > 0), defocus,
                          rng.uniform(-90, 90, n_tilts), dose_per_tilt * (order + 1), order,
                          np.zeros(n_tilts, bool), microscope)


def poses(positions, euler=None) -> ParticlePoses:
    positions = np.asarray(positions, dtype=float).reshape(-1, 3)
    euler = np.zeros_like(positions) if euler is None else np.asarray(euler, dtype=float)
    return ParticlePoses(positions, euler, np.array(["TS"] * len(positions), dtype=object))


def options(**changes) -> ExportOptions:
    base = dict(output_pixel_size_angst=PIXEL, box_px=BOX, particle_diameter_angst=80.0, normalize_input=False,
                normalize_output=False, backend="numpy", workers=1)
    base.update(changes)
    return ExportOptions(**base)


def run(tilt_series, stack, particles, **changes):
    return list(reconstruct_particles(tilt_series, stack, particles, options(**changes)))


def gaussian_peak(volume: np.ndarray) -> np.ndarray:
    """Sub-voxel (z, y, x) peak: 3-point log-parabola per axis around the maximum within 4 voxels of the centre."""
    centre = volume.shape[0] // 2
    core = volume[centre - 4:centre + 5, centre - 4:centre + 5, centre - 4:centre + 5]
    index = tuple(int(i) + centre - 4 for i in np.unravel_index(np.argmax(core), core.shape))
    peak = []
    for axis in range(3):
        values = []
        for step in (-1, 0, 1):
            at = list(index)
            at[axis] += step
            values.append(np.log(volume[tuple(at)]))
        a, b, c = values
        peak.append(index[axis] + 0.5 * (a - c) / (a - 2 * b + c))
    return np.array(peak)


POINT = BlobModel(np.zeros((1, 3)), np.array([PIXEL]), np.array([1.0]))  # σ = 1 px


@pytest.fixture(scope="module")
def point_sources():
    tilt_series = make_tilt_series()
    positions = np.array([[-150.3, -121.7, 37.1], [140.2, 100.9, -40.4], [-21.9, 160.4, 19.6]])
    stack = simulate_noise_free(tilt_series, positions, np.zeros((3, 3)), POINT, apply_ctf=False, apply_dose=False)
    return tilt_series, positions, stack


def test_point_source_lands_on_the_box_centre(point_sources):
    tilt_series, positions, stack = point_sources
    for result in run(tilt_series, stack, poses(positions)):
        assert np.all(np.abs(gaussian_peak(result.volume) - BOX // 2) < 0.1), gaussian_peak(result.volume)


def test_point_source_follows_a_sub_voxel_offset_of_the_requested_position(point_sources):
    tilt_series, positions, stack = point_sources
    offset_xyz = np.array([0.37, -0.81, 1.45])  # voxels
    for result in run(tilt_series, stack, poses(positions - offset_xyz * PIXEL)):
        expected_zyx = BOX // 2 + offset_xyz[::-1]
        assert np.all(np.abs(gaussian_peak(result.volume) - expected_zyx) < 0.1)


def test_point_source_is_centred_after_fourier_rescaling_to_a_larger_pixel(point_sources):
    tilt_series, positions, stack = point_sources
    results = run(tilt_series, stack, poses(positions), output_pixel_size_angst=2 * PIXEL, box_px=16,
                  particle_diameter_angst=60.0)
    for result in results:
        assert np.all(np.abs(gaussian_peak(result.volume) - 8) < 0.1)


def test_exact_scaling_single_untilted_image():
    """§8.10: V(x, y, z) · M · sinc²(|v − c| / M) = the sub-pixel-centred patch low-passed to |k| < M/2."""
    rng = np.random.default_rng(1)
    image = rng.normal(size=(1, 96, 96)).astype(np.float32)
    tilt_series = TiltSeriesData("T", PIXEL, (96, 96), [0.0], [[[1, 0, 0], [0, 1, 0]]], [0.0], [0.0], [0.0], [0.0],
                                 [0], [False], FLAT)
    engine = TiltSeriesEngine.create(tilt_series, image, options(box_px=16, particle_diameter_angst=20.0,
                                                                 invert_contrast=False))
    m = engine.padded_box_px
    volume = next(engine.reconstruct(poses([[3.3 * PIXEL, -5.6 * PIXEL, 7.0]]))).volume
    centre = np.array([48 + 3.3, 48 - 5.6]) - m // 2
    origin = np.trunc(centre).astype(int)
    residual = -(centre - origin)
    patch = engine.prepared.images[0][origin[1]:origin[1] + m, origin[0]:origin[0] + m].astype(np.float64)
    ky = np.fft.fftfreq(m, 1 / m)[:, None]
    kx = np.arange(m // 2 + 1)[None, :]
    spectrum = scipy.fft.rfft2(patch) * np.exp(-2j * np.pi * (kx * residual[0] + ky * residual[1]) / m)
    spectrum *= kx**2 + ky**2 < (m // 2) ** 2
    expected = scipy.fft.irfft2(spectrum, s=(m, m))[m // 2 - 8:m // 2 + 8, m // 2 - 8:m // 2 + 8]
    axis = np.arange(16) - 8
    radius = np.sqrt(axis[:, None, None] ** 2 + axis[None, :, None] ** 2 + axis[None, None, :] ** 2)
    lhs = volume * m * np.sinc(radius / m) ** 2
    assert np.abs(lhs - expected[None]).max() < 1e-5 * np.abs(expected).max()


# ----------------------------------------------------------------------------------------------- 3D CTF


@pytest.fixture(scope="module")
def realistic():
    tilt_series = make_tilt_series(n_tilts=41, microscope=REAL, defocus_angst=25000.0, shape=(192, 192))
    model = make_blob_model(BOX, PIXEL)
    positions = np.array([[20.5, -30.2, 40.3], [-60.1, 50.7, -30.9]])
    euler = np.array([[30.0, 50.0, -70.0], [100.0, 120.0, 10.0]])
    stack = simulate_noise_free(tilt_series, positions, euler, model, apply_dose=False)
    return tilt_series, stack, poses(positions, euler), model


@pytest.mark.parametrize("method", CTF_METHODS)
def test_3d_ctf_layout_symmetry_wedge_and_dc(realistic, method):
    tilt_series, stack, particles, _ = realistic
    ctf = run(tilt_series, stack, particles.subset(np.array([0])), ctf_method=method)[0].ctf
    assert ctf.shape == (BOX, BOX, BOX // 2 + 1) and ctf.dtype == np.float32
    plane = ctf[:, :, 0]
    mirrored = plane[(-np.arange(BOX)) % BOX][:, (-np.arange(BOX)) % BOX]
    assert np.allclose(plane, mirrored, atol=1e-6)
    # real-space cropping M → N resamples the spectrum (sinc interpolation): small ringing at the wedge edges
    assert ctf.min() > -0.25 * ctf.max() and ctf.max() <= 1.2
    # missing wedge: along kz (the beam at 0°) nothing was measured (±60°); only crop ringing remains there
    # (measured ≤ 4 % of the maximum), while the same shells along kx and ky are filled (mean ≈ 0.7)
    assert np.abs(ctf[4:BOX // 2, 0, 0]).max() < 0.06 * ctf.max()
    assert ctf[0, 0, 4:BOX // 2].mean() > 0.4 and ctf[0, 4:BOX // 2, 0].mean() > 0.4


@pytest.mark.parametrize("method", CTF_METHODS)
def test_3d_ctf_dc_is_amplitude_times_mean_tilt_weight(point_sources, method):
    """Flat CTF (C ≡ A ≈ 1), dose off: DC ≈ A · mean cos θ.

    Padded: exact on the M grid; the N-grid DC averages a cell of about M/N voxels, where voxels away from the
    tilt axis see mostly low tilts (cos θ ≈ 1), hence the 10 % tolerance (measured +5.5 %). Direct: exact
    (every slice passes through DC with full weight; see test_ctf3d for the realistic CTF)."""
    tilt_series, positions, stack = point_sources
    ctf = run(tilt_series, stack, poses(positions[:1]), ctf_method=method)[0].ctf
    expected = FLAT.amplitude_contrast * np.mean(np.cos(np.deg2rad(tilt_series.tilt_angles_deg)))
    assert ctf[0, 0, 0] == pytest.approx(expected, rel=0.1)


@pytest.mark.parametrize("method", CTF_METHODS)
def test_3d_ctf_is_invariant_to_inversion_and_image_content(realistic, method):
    tilt_series, stack, particles, _ = realistic
    one = particles.subset(np.array([0]))
    reference = run(tilt_series, stack, one, ctf_method=method)[0].ctf
    noise = np.random.default_rng(5).normal(size=stack.shape).astype(np.float32)
    assert np.array_equal(run(tilt_series, stack, one, invert_contrast=False, ctf_method=method)[0].ctf, reference)
    assert np.array_equal(run(tilt_series, noise, one, ctf_method=method)[0].ctf, reference)


@pytest.mark.parametrize("method", CTF_METHODS)
def test_subtomogram_equals_the_ground_truth_filtered_by_its_3d_ctf(realistic, method):
    """The sub-tomogram is CTF-volume × reference (RELION's model), so the two agree almost perfectly.

    Measured CC: padded 0.996/0.997 (M's exact crop), direct 0.99 (it leaves out the crop's sinc ringing)."""
    tilt_series, stack, particles, model = realistic
    reference = render_blob_map(model, BOX, PIXEL)
    mask = spherical_mask((BOX,) * 3, BOX // 2 - 2)
    for result, euler in zip(run(tilt_series, stack, particles, ctf_method=method), particles.euler_zyz_deg,
                             strict=True):
        posed = np.fft.ifftshift(rotate_volume_relion(reference, euler))
        filtered = np.fft.fftshift(scipy.fft.irfftn(scipy.fft.rfftn(posed) * result.ctf, s=posed.shape))
        assert normalized_cross_correlation(result.volume, filtered, mask) > 0.98


@pytest.mark.parametrize("method", CTF_METHODS)
def test_prerotated_export_equals_the_rotated_tomogram_frame_export(realistic, method):
    tilt_series, stack, particles, _ = realistic
    mask = spherical_mask((BOX,) * 3, BOX // 2 - 2)
    plain = run(tilt_series, stack, particles, ctf_layout="centred", ctf_method=method)
    rotated = run(tilt_series, stack, particles, prerotate=True, ctf_layout="centred", ctf_method=method)
    for a, b, euler in zip(plain, rotated, particles.euler_zyz_deg, strict=True):
        assert normalized_cross_correlation(rotate_volume_relion(b.volume, euler), a.volume, mask) > 0.95
        assert normalized_cross_correlation(rotate_volume_relion(b.ctf, euler), a.ctf, mask) > 0.95
        assert normalized_cross_correlation(b.volume, a.volume, mask) < 0.8  # the rotation matters


def test_output_normalisation_and_inversion(realistic):
    tilt_series, stack, particles, _ = realistic
    one = particles.subset(np.array([0]))
    diameter = 80.0
    radius = round(diameter / PIXEL / 2)
    axis = np.arange(BOX) - BOX // 2
    background = (axis[:, None, None] ** 2 + axis[None, :, None] ** 2 + axis[None, None, :] ** 2) > radius**2
    for normalize in (True, False):
        common = dict(normalize_output=normalize, normalize_input=True, particle_diameter_angst=diameter)
        white = run(tilt_series, stack, one, **common)[0].volume
        dark = run(tilt_series, stack, one, invert_contrast=False, **common)[0].volume
        assert np.allclose(white, -dark, atol=1e-5 * np.abs(white).max())
        if normalize:
            assert abs(white[background].astype(np.float64).mean()) < 1e-5
            assert white[background].astype(np.float64).std() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("method", CTF_METHODS)
def test_sparse_ctf_zeroes_small_values_and_keeps_the_rest_bit_identical(realistic, method):
    tilt_series, stack, particles, _ = realistic
    one = particles.subset(np.array([0]))
    dense = run(tilt_series, stack, one, ctf_method=method)[0].ctf
    sparse = run(tilt_series, stack, one, sparse_ctf=True, ctf_method=method)[0].ctf
    small = np.abs(dense) < 0.01
    assert small.any() and (~small).any()
    assert np.all(sparse[small] == 0)
    assert np.array_equal(sparse[~small], dense[~small])


@pytest.mark.parametrize("method", CTF_METHODS)
def test_dose_limit_to_all_tilts_equals_no_limit_and_one_tilt_differs(method):
    tilt_series = make_tilt_series(n_tilts=21, microscope=REAL, defocus_angst=20000.0, dose_per_tilt=3.0)
    stack = simulate_noise_free(tilt_series, [[10.0, 5.0, 3.0]], np.zeros((1, 3)), make_blob_model(BOX, PIXEL))
    one = poses([[10.0, 5.0, 3.0]])
    free = run(tilt_series, stack, one, ctf_method=method)[0]
    limited = run(tilt_series, stack, one, n_tilts_by_dose=21, ctf_method=method)[0]
    assert np.array_equal(free.volume, limited.volume) and np.array_equal(free.ctf, limited.ctf)
    single = run(tilt_series, stack, one, n_tilts_by_dose=1, ctf_method=method)[0]
    # only the lowest-dose tilt (0°) keeps numerator weight: its slice is the kz = 0 plane
    assert single.ctf[0, 0, 0] < 0.2 * free.ctf[0, 0, 0]


def test_centred_ctf_layout_is_the_fftshifted_full_spectrum():
    rng = np.random.default_rng(2)
    volume = rng.normal(size=(8, 8, 8))
    full = np.fft.fftn(volume)
    half = np.fft.rfftn(volume)
    assert np.allclose(half_to_centred_cube(half.real), np.fft.fftshift(full.real))


# ----------------------------------------------------------------------------------------------- pieces


def test_ctf_on_samples_matches_the_relion_formula():
    grid = insert.make_sample_grid(64)
    tables = extract.CtfTables.from_samples(grid.kx, grid.ky, 64, PIXEL)
    got = extract.ctf_samples(tables, np.array([21000.0]), np.array([19500.0]), np.array([33.0]), np.array([0.0]), REAL)
    fx, fy = rfft_frequencies((64, 64), PIXEL)
    expected = ctf_2d(fx, fy, 21000.0, 19500.0, 33.0, REAL).reshape(-1)[grid.flat_index]
    assert np.allclose(got[0], expected, atol=2e-4)


def test_padded_box_follows_the_aliasing_free_size():
    flat = make_tilt_series()
    assert extract.padded_box_px(flat, 32, PIXEL, 80.0) == 64  # D = 0: max(2N, diameter)
    defocused = make_tilt_series(microscope=REAL, defocus_angst=60000.0)
    big = extract.padded_box_px(defocused, 32, 2.0, 80.0)
    assert big > 64 and big % 2 == 0
    assert extract.padded_box_px(defocused, 32, 1.0, 80.0) >= big  # grows with 1 / pixel
    assert extract.padded_box_px(defocused, 600, 1.0, 80.0) == 1024


def test_bad_options_raise_input_errors(point_sources):
    tilt_series, _, stack = point_sources
    with pytest.raises(InputError, match="box_px"):
        options(box_px=31)
    with pytest.raises(InputError, match="output_pixel_size_angst"):
        TiltSeriesEngine.create(tilt_series, stack, options(output_pixel_size_angst=PIXEL / 2))
    with pytest.raises(InputError, match="box_px"):
        TiltSeriesEngine.create(tilt_series, stack, options(box_px=200))
    with pytest.raises(InputError, match="stack"):
        TiltSeriesEngine.create(tilt_series, stack[:3], options())


def test_image_series_are_centred_on_the_particle(point_sources):
    tilt_series, positions, stack = point_sources
    for result in run(tilt_series, stack, poses(positions), mode="series", prerotate=True, box_px=24,
                      particle_diameter_angst=40.0):
        assert result.series.shape[1:] == (24, 24) and result.series.shape[0] > 0
        for image in result.series:
            index = np.unravel_index(np.argmax(image), image.shape)
            for axis in range(2):
                at = [list(index), list(index), list(index)]
                at[0][axis] -= 1
                at[2][axis] += 1
                a, b, c = (np.log(image[tuple(p)]) for p in at)
                assert abs(index[axis] + 0.5 * (a - c) / (a - 2 * b + c) - 12) < 0.1
        assert set(result.metadata) >= {"tilt_index", "tilt_angle_deg", "defocus_u_angst", "pre_exposure_e_per_angst2"}


def test_image_series_are_ctf_premultiplied(realistic):
    tilt_series, stack, particles, _ = realistic
    one = particles.subset(np.array([0]))
    plain = run(tilt_series, stack, one, mode="series", prerotate=True, apply_ctf=False)[0].series
    weighted = run(tilt_series, stack, one, mode="series", prerotate=True)[0].series
    spectrum_plain = np.abs(np.fft.rfft2(plain[20]))
    spectrum_weighted = np.abs(np.fft.rfft2(weighted[20]))
    ratio = spectrum_weighted[1:8, 1:8] / spectrum_plain[1:8, 1:8]
    assert ratio.max() < 1.0  # |C_u| · dose · cos θ ≤ 1


def test_excluded_tilts_are_left_out(realistic):
    tilt_series, stack, particles, _ = realistic
    excluded = np.zeros(tilt_series.n_tilts, bool)
    excluded[::2] = True
    reduced = dataclasses.replace(tilt_series, excluded=excluded)
    garbage = stack.copy()
    garbage[excluded] = np.random.default_rng(0).normal(size=garbage[excluded].shape)
    one = particles.subset(np.array([0]))
    a = run(reduced, stack, one)[0].volume
    b = run(reduced, garbage, one)[0].volume
    assert np.array_equal(a, b)


def test_cupy_backend_matches_numpy(realistic):
    reason = cupy_unavailable_reason()
    if reason is not None:
        print(f"CuPy path not run: {reason}")
        pytest.skip(reason)
    tilt_series, stack, particles, _ = realistic
    one = particles.subset(np.array([0]))
    reference = run(tilt_series, stack, one)[0]
    gpu = run(tilt_series, stack, one, backend="cupy")[0]
    assert np.allclose(gpu.volume, reference.volume, atol=1e-4 * np.abs(reference.volume).max())
    assert np.allclose(gpu.ctf, reference.ctf, atol=1e-4)


@pytest.mark.parametrize("normalize, invert", [(True, True), (True, False), (False, True)])
def test_tilt_preparation_matches_the_double_precision_filter(normalize, invert):
    """Warp's preparation written plainly in double precision (plane, hard band-pass [1/N, Nyquist] in per-axis
    Nyquist units, mean 0 and sd 1, inversion: ``test_tilt_preparation.plain_preparation``); the engine prepares
    on one single-precision spectrum."""
    rng = np.random.default_rng(4)
    ny, nx, box = 256, 320, 32
    y, x = np.mgrid[:ny, :nx]
    image = (rng.normal(size=(ny, nx)) * 30 + 500 + 0.2 * x - 0.1 * y).astype(np.float32)
    plain = plain_preparation(image, box, (ny, nx), normalize=normalize, invert=invert)
    prepared = extract.preprocess_image(image, box, normalize=normalize, invert=invert)
    rms = np.sqrt(np.mean(plain ** 2))
    assert prepared.dtype == np.float32
    assert np.sqrt(np.mean((prepared - plain) ** 2)) < 5e-6 * rms and np.abs(prepared - plain).max() < 5e-5 * rms


@pytest.mark.parametrize("prerotate", [False, True])
def test_the_export_calls_no_lapack_routine(realistic, monkeypatch, prerotate):
    """LAPACK (np.linalg.inv, pinv, solve, svd) wakes OpenBLAS's threads, which then spin against the export's
    own workers: the export's small matrices are inverted in closed form (``core.geometry``)."""
    tilt_series, stack, particles, _ = realistic

    def refused(*args, **kwargs):
        raise AssertionError("the export called a LAPACK routine")

    for name in ("inv", "pinv", "solve", "svd", "lstsq", "det"):
        monkeypatch.setattr(np.linalg, name, refused)
    results = run(tilt_series, stack, particles, prerotate=prerotate, ctf_method="direct")
    assert len(results) == len(particles.positions_angst) and all(np.isfinite(r.volume).all() for r in results)
