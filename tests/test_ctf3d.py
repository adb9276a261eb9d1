"""The 3D CTF on the output grid (``ctf_method="direct"``, :mod:`mspecies.core.ctf3d`).

The physics tests shared with M's padded method (layout, Hermitian x = 0 plane, missing wedge, DC, invariance,
pre-rotation, sparse, dose limit, sub-tomogram = truth × CTF) run on both methods in ``test_reconstruct.py``;
these are the properties of the direct method itself.
"""

import dataclasses
import subprocess
import sys
import types

import numpy as np
import pytest
from test_reconstruct import BOX, FLAT, PIXEL, REAL, make_tilt_series, options, poses, realistic  # noqa: F401 (fixture)

from mspecies.core import ctf3d, insert
from mspecies.core.ctf import ctf_2d
from mspecies.core.geometry import tilt_rotation
from mspecies.core.reconstruct import TiltSeriesEngine, dose_limit_mask

N_HALF = BOX * BOX * (BOX // 2 + 1)


def shell_index(n: int) -> np.ndarray:
    """(N, N, N//2+1) integer radius of every half-layout voxel."""
    f = np.fft.fftfreq(n, 1.0 / n)
    return np.rint(np.sqrt(f[:, None, None] ** 2 + f[None, :, None] ** 2 + np.arange(n // 2 + 1) ** 2)).astype(int)


def ctfs(tilt_series, particles, **changes) -> np.ndarray:
    engine = TiltSeriesEngine.create(tilt_series, None, options(**changes))
    return np.array([result.ctf for result in engine.reconstruct_ctfs(particles)])


def reference_direct_ctf(tilt_series, position_angst: np.ndarray, padded_box_px: int) -> np.ndarray:
    """The direct method written plainly (coverage → per-pair values → bincount), as the module docstring says
    (Δ from the tilt's own defocus, as the engine computes it once per tilt series)."""
    t = np.flatnonzero(~tilt_series.excluded)
    coverage = ctf3d.slice_coverage(insert.slice_orientation(tilt_series.tilt_angles_deg[t], tilt_series.xf[t]), BOX)
    base = tilt_series.defocus_u_angst[t][coverage.tilt], tilt_series.defocus_v_angst[t][coverage.tilt]
    pair_tilt = t[coverage.tilt]
    offset = -(tilt_rotation(tilt_series.tilt_angles_deg)[:, 2, :] @ position_angst)[pair_tilt]
    angle, phase = tilt_series.defocus_angle_deg[pair_tilt], tilt_series.phase_shift_deg[pair_tilt]
    gamma, k2, _ = ctf3d.ctf_phase_terms(coverage.freq_px, BOX, PIXEL, base[0] + offset, base[1] + offset, angle,
                                         phase, tilt_series.microscope)
    _, _, step = ctf3d.ctf_phase_terms(coverage.freq_px, BOX, PIXEL, *base, angle, phase, tilt_series.microscope)
    power = 0.5 - 0.5 * np.sinc(step / np.pi) * np.cos(2 * gamma)
    weight = np.cos(np.deg2rad(tilt_series.tilt_angles_deg[pair_tilt])) * np.exp(
        -tilt_series.pre_exposure_e_per_angst2[pair_tilt] * k2)
    numerator = np.bincount(coverage.voxel, coverage.profile * power * weight, N_HALF)
    denominator = np.bincount(coverage.voxel, coverage.profile * np.sqrt(power), N_HALF)
    multiplicity = np.minimum(1.0, BOX / padded_box_px * np.bincount(coverage.voxel, coverage.profile, N_HALF))
    return (multiplicity * numerator / np.maximum(denominator, 1e-4)).reshape(BOX, BOX, BOX // 2 + 1)


def test_engine_matches_the_plain_formula_of_the_module(realistic):  # noqa: F811
    tilt_series, _, particles, _ = realistic
    dosed = dataclasses.replace(tilt_series, dose_e_per_angst2=np.full(tilt_series.n_tilts, 2.5))
    engine = TiltSeriesEngine.create(dosed, None, options())
    for result, position in zip(engine.reconstruct_ctfs(particles), particles.positions_angst, strict=True):
        expected = reference_direct_ctf(dosed, position, engine.padded_box_px)
        assert np.abs(result.ctf - expected).max() < 1e-4 * np.abs(expected).max()


def test_two_threads_give_the_serial_result_bit_for_bit(realistic):  # noqa: F811
    tilt_series, _, particles, _ = realistic
    assert np.array_equal(ctfs(tilt_series, particles, workers=2), ctfs(tilt_series, particles, workers=1))


def test_dc_is_exactly_the_amplitude_contrast_times_the_mean_tilt_weight(realistic):  # noqa: F811
    """Every slice passes through DC with full weight; there C = −sin γ(0) = A (no phase plate), so the
    normalisation gives A² Σ w / Σ A = A · mean(cos θ · dose limit)."""
    tilt_series, _, particles, _ = realistic
    for limit in (None, 10):
        dc = ctfs(tilt_series, particles, n_tilts_by_dose=limit)[:, 0, 0, 0]
        weight = np.cos(np.deg2rad(tilt_series.tilt_angles_deg)) * dose_limit_mask(tilt_series, limit)
        assert dc == pytest.approx(REAL.amplitude_contrast * weight.mean(), rel=1e-4)


def test_x0_plane_is_exactly_hermitian_and_values_are_never_negative(realistic):  # noqa: F811
    tilt_series, _, particles, _ = realistic
    flip = (-np.arange(BOX)) % BOX
    for ctf in ctfs(tilt_series, particles):
        assert np.array_equal(ctf[:, :, 0], ctf[flip][:, flip, 0])
        assert ctf.min() >= 0.0


def test_each_slice_carries_one_weight_per_image_sample():
    """Σ τ = the number of 2D samples of the half disc |k| < N/2 (the tent integrates to 1 across the slice and
    the density 1 / |g₁ × g₂| follows an in-plane magnification), for any tilt. Voxels of the x = 0 plane count
    half: the half layout stores that plane in full, shared with the mirrored half."""
    rng = np.random.default_rng(4)
    for tilt_deg in (0.0, 23.0, 37.0, 58.0, 90.0):
        for magnification in (1.0, 1.03):
            xf = np.concatenate([magnification * rotation(rng.uniform(0, 360)), np.zeros((1, 2, 1))], 2)
            coverage = ctf3d.slice_coverage(insert.slice_orientation(np.array([tilt_deg]), xf), BOX)
            shared = np.where(coverage.voxel % (BOX // 2 + 1) == 0, 0.5, 1.0)
            assert (coverage.profile * shared).sum() == pytest.approx(np.pi * (BOX / 2) ** 2 / 2, rel=0.015)


def rotation(angle_deg: float) -> np.ndarray:
    a = np.deg2rad(angle_deg)
    return np.array([[[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]])


def test_voxel_averaged_power_is_the_mean_of_sin2_over_the_voxel():
    """½ − ½ sinc(Δ) cos 2γ against a brute-force average of sin² γ(k) over the voxel's radial extent, from a
    slowly oscillating CTF (≈ sin² γ) to one that turns several times per voxel (≈ ½)."""
    rng = np.random.default_rng(7)
    freq = rng.uniform(-BOX / 2, BOX / 2, (400, 2))
    freq = freq[np.hypot(freq[:, 0], freq[:, 1]) > 1]
    ones = np.ones(len(freq))
    for defocus in (5000.0, 30000.0, 120000.0):
        gamma, _, step = ctf3d.ctf_phase_terms(freq, BOX, 4.0, defocus * ones, (defocus - 400) * ones, 30 * ones,
                                               0 * ones, REAL)
        analytic = 0.5 - 0.5 * np.sinc(step / np.pi) * np.cos(2 * gamma)
        radial = freq / np.hypot(freq[:, 0], freq[:, 1])[:, None]
        brute = np.zeros(len(freq))
        for u in np.linspace(-0.5, 0.5, 201):
            shifted = (freq + u * radial) / (BOX * 4.0)
            brute += ctf_2d(shifted[:, 0], shifted[:, 1], defocus, defocus - 400, 30.0, REAL) ** 2 / 201
        assert np.abs(analytic - brute).max() < 0.03
    fast = step > 2 * np.pi  # the last defocus turns the phase more than 2π per voxel: the average is ≈ ½
    assert fast.mean() > 0.5 and np.abs(analytic[fast] - 0.5).max() < 0.1


def test_direct_and_padded_ctfs_agree_shell_by_shell(realistic):  # noqa: F811
    """Measured (this fixture, box 32, M = 64): shell means within 7 % of M's padded CTF from shell 2 to 14
    (direct higher at low frequency, where M's crop smooths the steep CTF rise, lower by ≤ 7 % at high
    frequency) and voxel correlation ≥ 0.97 per shell. Shell 0 (DC smoothing) and the corner shell are left out."""
    tilt_series, _, particles, _ = realistic
    direct, padded = ctfs(tilt_series, particles), ctfs(tilt_series, particles, ctf_method="padded")
    shells = shell_index(BOX)
    for radius in range(2, BOX // 2 - 1):
        inside = shells == radius
        a, b = direct[:, inside], padded[:, inside]
        assert 0.88 < a.mean() / b.mean() < 1.12, radius
        assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.93, radius


def test_a_tiny_change_of_the_alignment_changes_the_ctf_only_a_little(realistic):  # noqa: F811
    """Every weight is continuous in the geometry: an .xf rounded to 3 decimals (as IMOD writes it) moves
    values by far less than a voxel switching on or off would (about 0.3 here)."""
    tilt_series, _, particles, _ = realistic
    rounded = dataclasses.replace(tilt_series, xf=np.round(tilt_series.xf, 3))
    assert np.abs(ctfs(rounded, particles) - ctfs(tilt_series, particles)).max() < 0.02


def test_prerotated_identity_pose_gives_the_shared_ctf(realistic):  # noqa: F811
    tilt_series, _, particles, _ = realistic
    still = poses(particles.positions_angst)
    shared = ctfs(tilt_series, still)
    own = ctfs(tilt_series, still, prerotate=True)
    assert np.abs(own - shared).max() < 1e-5


def test_without_ctf_the_volume_is_the_slice_multiplicity():
    """apply_ctf False: C ≡ 1, so the 3D CTF is min(1, N/M Σ τ). One slice carries N/M of the padded weight
    (at most N/M, reached on the slice); many slices saturate at DC (1); the missing wedge stays 0."""
    one = make_tilt_series(n_tilts=1, max_tilt=0.0, microscope=FLAT)
    engine = TiltSeriesEngine.create(one, None, options(apply_ctf=False))
    ctf = next(engine.reconstruct_ctfs(poses([[0.0, 0.0, 0.0]]))).ctf
    assert ctf.max() == pytest.approx(BOX / engine.padded_box_px) and ctf.min() == 0.0
    assert ctf[0, 0, 0] == pytest.approx(BOX / engine.padded_box_px)
    assert np.all(ctf[BOX // 4:BOX // 2, 0, 0] == 0)  # along kz: only the untilted slice, which has no thickness there
    many = make_tilt_series(n_tilts=21, microscope=FLAT)
    ctf = next(TiltSeriesEngine.create(many, None, options(apply_ctf=False)).reconstruct_ctfs(poses([[0.0] * 3]))).ctf
    assert ctf[0, 0, 0] == 1.0 and ctf.max() == 1.0 and np.all(ctf[4:BOX // 2, 0, 0] == 0)


class _NumpyUnderAnotherName(types.ModuleType):
    """NumPy under another module name: drives the batched (CuPy) branch of the evaluation on the CPU."""

    def __getattr__(self, name: str) -> object:
        return getattr(np, name)


def test_batched_evaluation_of_the_gpu_branch_equals_the_per_particle_one(realistic):  # noqa: F811
    """The CuPy code path evaluates a whole batch at once ((B, S) arrays, broadcast coefficients, 2-D scatter);
    run with NumPy under another name it must give the per-particle NumPy results."""
    tilt_series, _, particles, _ = realistic
    engine = TiltSeriesEngine.create(tilt_series, None, options())
    t = engine.tilts
    alias = _NumpyUnderAnotherName("numpy_alias")
    kwargs = dict(pixel_size_angst=PIXEL, padded_box_px=engine.padded_box_px,
                  defocus_u_angst=tilt_series.defocus_u_angst[t], defocus_v_angst=tilt_series.defocus_v_angst[t],
                  defocus_angle_deg=tilt_series.defocus_angle_deg[t], phase_shift_deg=tilt_series.phase_shift_deg[t],
                  tilt_weight_scale=np.cos(np.deg2rad(tilt_series.tilt_angles_deg[t])),
                  pre_exposure_e_per_angst2=tilt_series.pre_exposure_e_per_angst2[t],
                  offset_basis=-tilt_rotation(tilt_series.tilt_angles_deg[t])[:, 2, :].T, microscope=REAL)
    coverage = ctf3d.slice_coverage(insert.slice_orientation(tilt_series.tilt_angles_deg[t], tilt_series.xf[t]), BOX)
    batched = ctf3d.DirectCtf.create(coverage, xp=alias, **kwargs).evaluate(particles.positions_angst)
    single = ctf3d.DirectCtf.create(coverage, **kwargs).evaluate(particles.positions_angst)
    shared = [result.ctf for result in engine.reconstruct_ctfs(particles)]
    for a, b, c in zip(batched, single, shared, strict=True):
        assert np.allclose(a, b, rtol=1e-6, atol=1e-7) and np.array_equal(b, c)


def test_the_worker_keeps_freed_memory_for_the_next_particles():
    """glibc accepts the allocation settings of the export worker (a subprocess: they are process-wide)."""
    code = "from mspecies.core.memory import retain_freed_memory; print(retain_freed_memory())"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stdout.strip() == "True", run.stderr


THREAD_ARENA_REUSE = """
import resource, sys, threading
import numpy as np
from mspecies.core import memory
if sys.argv[1] == "default pad":
    memory._TOP_PAD = 128 * 1024  # glibc's own M_TOP_PAD
assert memory.retain_freed_memory()
faults = []
def work():
    for _ in range(4):
        before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        blocks = [np.ones(5 * 1024**2, dtype=np.float32) for _ in range(6)]  # 6 × 20 MiB: more than one heap
        del blocks
        faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)
worker = threading.Thread(target=work)
worker.start()
worker.join()
print(*faults)
"""


def _thread_faults(setting: str) -> list[int]:
    """Page faults of each of 4 rounds in which a worker thread allocates and frees 120 MiB (a new process)."""
    run = subprocess.run([sys.executable, "-c", THREAD_ARENA_REUSE, setting], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stderr
    return [int(value) for value in run.stdout.split()]


def test_worker_threads_reuse_the_memory_they_freed():
    """The export's pool and writer threads allocate from glibc's thread arenas, whose extra 64 MiB heaps glibc
    deletes once empty (whatever M_TRIM_THRESHOLD says) unless M_TOP_PAD covers a heap: with the worker's
    settings only the first round faults; with glibc's default pad every round faults again (control). Relative
    bounds: with transparent huge pages on for all memory a round faults ~60 times instead of ~3000."""
    kept, control = _thread_faults("worker"), _thread_faults("default pad")
    assert kept[0] > 0 and max(kept[1:]) <= kept[0] // 20, kept
    assert min(control[1:]) >= kept[0] // 4, (kept, control)
