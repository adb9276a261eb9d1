"""The compiled per-particle kernels of the pre-rotated export (:mod:`mspecies.core.kernels`) against the NumPy
statements of the same computation (:func:`mspecies.core.insert.splat_entries` + ``insert_one``, and
:func:`mspecies.core.ctf3d.evaluate_pairs`), on random orientations, several particles in a row (the kept
accumulators must come back zeroed)."""

import dataclasses
import threading
from collections.abc import Callable

import numpy as np
import pytest
from test_reconstruct import BOX, PIXEL, options, realistic  # noqa: F401 (fixture)

from mspecies.common.euler import euler_to_matrix
from mspecies.core import ctf3d, insert, kernels
from mspecies.core.reconstruct import WEIGHT_FLOOR, TiltSeriesEngine, _checkerboard, _normalisation_scale

M = 24  # padded box of the splat tests


def random_orientations(n_particles: int, n_tilts: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    tilt = np.linspace(-60, 60, n_tilts)
    xf = np.zeros((n_tilts, 2, 3))
    angle = np.deg2rad(rng.uniform(-90, 90, n_tilts))
    xf[:, 0, 0], xf[:, 0, 1], xf[:, 1, 0], xf[:, 1, 1] = np.cos(angle), -np.sin(angle), np.sin(angle), np.cos(angle)
    xf[:, :, :2] *= rng.uniform(0.98, 1.02, (n_tilts, 1, 1))  # magnification
    return insert.slice_orientation(tilt, xf, euler_to_matrix(rng.uniform(-180, 180, (n_particles, 3))))


def reference_spectra(orientation, grid, data, weight, ctf):
    """The NumPy (and CuPy) path of one pre-rotated particle: its own splat, bincounts, M's normalisation."""
    splat = insert.splat_entries(orientation, grid)
    zeros = np.zeros(weight.shape, dtype=np.complex64)
    d_re, d_im, w1, d2, w0 = insert.insert_one(splat, zeros if data is None else data, weight, ctf)
    factor = _normalisation_scale(w0, M, np) / np.maximum(w1, np.float32(WEIGHT_FLOOR))
    return (d_re * factor) + 1j * (d_im * factor), None if ctf is None else d2 * factor


@pytest.mark.parametrize("with_data, with_ctf", [(True, False), (True, True), (False, True)])
def test_compiled_splat_gives_the_numpy_insertion_of_each_particle(with_data, with_ctf):
    grid = insert.make_sample_grid(M)
    orientations = random_orientations(3, 9, seed=1)
    rng = np.random.default_rng(2)
    n_columns = orientations.shape[1] * grid.n_samples
    n_voxels = M * M * (M // 2 + 1)
    spectrum = np.full((n_voxels, 3), np.nan, dtype=np.complex64)
    ctf_spectrum = np.full((n_voxels, 3), np.nan, dtype=np.float32)
    for b, orientation in enumerate(orientations):
        data = (rng.normal(size=n_columns) + 1j * rng.normal(size=n_columns)).astype(np.complex64)
        weight = rng.uniform(0, 1, n_columns).astype(np.float32)
        ctf = rng.normal(size=n_columns).astype(np.float32)
        kernels.splat_normalised(orientation, grid.kx, grid.ky, M, data if with_data else None, weight,
                                 ctf if with_ctf else None, _checkerboard(M), WEIGHT_FLOOR,
                                 spectrum if with_data else None, ctf_spectrum if with_ctf else None, b)
        expected, expected_ctf = reference_spectra(orientation, grid, data if with_data else None, weight,
                                                   ctf if with_ctf else None)
        if with_data:  # float32 sums instead of float64 ones: float32 rounding of the largest value
            assert np.abs(spectrum[:, b] - expected).max() <= 1e-6 * np.abs(expected).max()
            assert np.count_nonzero(expected) > n_voxels // 4
        if with_ctf:
            assert np.abs(ctf_spectrum[:, b] - expected_ctf).max() <= 1e-6 * np.abs(expected_ctf).max()


def test_ball_lines_hold_exactly_the_voxels_inside_the_padded_nyquist_sphere():
    for m in (8, 10, 24, 130):
        start, length = kernels.ball_lines(m)
        k = np.fft.fftfreq(m, 1.0 / m).astype(int)
        z, y, x = np.meshgrid(k, k, np.arange(m // 2 + 1), indexing="ij")
        inside = x * x + y * y + z * z < (m // 2) ** 2
        assert np.array_equal(inside, x < length[..., None])
        assert np.array_equal(start.ravel(), np.concatenate([[0], np.cumsum(length.ravel())[:-1]]))


@pytest.mark.parametrize("apply_ctf", [True, False])
def test_compiled_rotated_ctf_gives_the_numpy_pairs_of_each_particle(realistic, apply_ctf):  # noqa: F811
    tilt_series, stack, particles, _ = realistic
    dosed = dataclasses.replace(tilt_series, dose_e_per_angst2=np.linspace(0, 120, tilt_series.n_tilts))
    engine = TiltSeriesEngine.create(dosed, None, options(prerotate=True, apply_ctf=apply_ctf, n_tilts_by_dose=30))
    t = engine.tilts
    orientations = insert.slice_orientation(dosed.tilt_angles_deg[t], dosed.xf[t],
                                            euler_to_matrix(np.random.default_rng(3).uniform(-180, 180, (3, 3))))
    positions = np.array([[20.5, -30.2, 40.3], [-60.1, 50.7, -30.9], [300.0, 10.0, -150.0]])
    ctfs = engine._direct_ctfs(positions, np.zeros((3, 3)))  # noqa: SLF001 (the engine's own call)
    for b in range(3):  # the engine's call with zero angles is the identity pose; these are the kernel's own
        own = kernels.rotated_ctf(
            orientations[b], box_px=BOX, padded_box_px=engine.padded_box_px, pixel_size_angst=PIXEL,
            defocus_u_angst=dosed.defocus_u_angst[t], defocus_v_angst=dosed.defocus_v_angst[t],
            defocus_angle_deg=dosed.defocus_angle_deg[t], phase_shift_deg=dosed.phase_shift_deg[t],
            tilt_weight_scale=np.cos(np.deg2rad(dosed.tilt_angles_deg[t])) * engine.tilt_weights_by_tilt,
            pre_exposure_e_per_angst2=dosed.pre_exposure_e_per_angst2[t],
            defocus_offset_angst=positions[b] @ engine._offset_basis(), microscope=dosed.microscope,  # noqa: SLF001
            apply_ctf=apply_ctf)
        expected = ctf3d.evaluate_pairs(engine._direct_pair_tables(orientations[b]), positions[b])  # noqa: SLF001
        assert np.abs(own - expected).max() <= 1e-6 * np.abs(expected).max()  # single-precision sin, cos, exp
        assert np.count_nonzero(expected) > expected.size // 4
        identity = ctf3d.evaluate_pairs(engine._direct_pair_tables(  # noqa: SLF001
            insert.slice_orientation(dosed.tilt_angles_deg[t], dosed.xf[t])), positions[b])
        assert np.abs(ctfs[b] - identity).max() <= 1e-6 * np.abs(identity).max()


def test_run_each_gives_every_item_to_exactly_one_thread_and_raises_the_first_error():
    pool = insert.thread_pool(2)
    seen: list[int] = []
    insert.run_each(pool, seen.append, 37)
    assert sorted(seen) == list(range(37))
    serial: list[int] = []
    insert.run_each(None, serial.append, 5)
    assert serial == list(range(5))

    def fail(i: int) -> None:
        if i == 3:
            raise ValueError("item 3")

    with pytest.raises(ValueError, match="item 3"):
        insert.run_each(pool, fail, 10)


def _two_threads_failing_at_item_2(item_1: Callable[[], None]) -> tuple[list[int], Callable[[int], None]]:
    """Work for :func:`insert.run_each` on two threads: items 0 and 1 run at once (0 waits for 1 to start), the
    thread of item 0 then takes item 2, which fails; item 1 waits for that failure, then runs ``item_1``."""
    started: list[int] = []
    one_started, two_failed = threading.Event(), threading.Event()

    def work(i: int) -> None:
        started.append(i)
        if i == 0:
            assert one_started.wait(timeout=60)
        elif i == 1:
            one_started.set()
            assert two_failed.wait(timeout=60)
            item_1()
        elif i == 2:
            two_failed.set()
            raise ValueError("item 2")

    return started, work


def test_run_each_raises_the_error_of_the_lowest_failing_item_as_the_serial_loop_does():
    def fail() -> None:
        raise ValueError("item 1")

    started, work = _two_threads_failing_at_item_2(fail)
    with pytest.raises(ValueError, match="item 1"):
        insert.run_each(insert.thread_pool(2), work, 1000)
    assert sorted(started) == [0, 1, 2]


def test_run_each_hands_out_no_item_after_a_failure():
    started, work = _two_threads_failing_at_item_2(lambda: None)
    with pytest.raises(ValueError, match="item 2"):
        insert.run_each(insert.thread_pool(2), work, 1000)
    assert sorted(started) == [0, 1, 2]  # the thread of item 1 did not go on to item 3


@pytest.mark.parametrize("method", ["direct", "padded"])
def test_prerotated_export_is_the_same_bit_for_bit_on_one_or_two_threads(realistic, method):  # noqa: F811
    tilt_series, stack, particles, _ = realistic
    results = [[(r.volume, r.ctf) for r in TiltSeriesEngine.create(
        tilt_series, stack, options(prerotate=True, ctf_method=method, workers=workers, max_batch=3)).reconstruct(
        particles)] for workers in (1, 2)]
    assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(*results))
