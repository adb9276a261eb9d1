"""The padding factor f of the padded box ``M = min(1024, max(even(ceil(f · N)), aliasing-free size))`` (issue 17):
validated, M as the formula says, and every volume path (plain and pre-rotated, direct and padded 3D CTF) right at
padded boxes that are not powers of two; the particle series does not use it."""

import numpy as np
import pytest
from test_reconstruct import BOX, PIXEL, POINT, REAL, gaussian_peak, make_tilt_series, options, poses

from mspecies.common.types import InputError
from mspecies.core import extract, reconstruct
from mspecies.core.reconstruct import TiltSeriesEngine, plan_memory
from mspecies.synth.dataset import simulate_noise_free


@pytest.mark.parametrize("factor", [0.99, 0.0, -2.0, float("nan"), float("inf")])
def test_a_padding_factor_below_one_or_not_finite_is_refused_naming_it(factor):
    with pytest.raises(InputError, match=r"padding_factor: expected a finite number >= 1"):
        options(padding_factor=factor)


@pytest.mark.parametrize(("factor", "padded"), [(2.0, 64), (1.5, 48), (1.25, 40), (1.1, 36), (1.03, 34), (1.0, 34),
                                                (3.0, 96)])
def test_padded_box_is_the_even_ceiling_of_factor_times_box_above_the_aliasing_free_size(factor, padded):
    """Without CTF phase (Cs 0, defocus 0) the aliasing-free size is the diameter (80 Å = 20 px < N), so f · N
    decides, rounded up to an even size, and never less than N + 2 (f = 1: 34, not 32)."""
    flat = make_tilt_series()
    assert extract.padded_box_px(flat, BOX, PIXEL, 80.0, factor) == padded
    assert extract.padded_multiple_px(80, 1.1) == 88  # 1.1 · 80 = 88.00000000000001 in floating point


def test_the_aliasing_free_size_bounds_a_smaller_factor_and_1024_bounds_all():
    """~3 µm underfocus at 4 Å/px needs 76 px for a 140 Å particle: f = 2 keeps M's 2N = 96 for box 48, f = 1.5
    (72) and 1.25 (60) both give the aliasing-free 76; 1024 caps any factor."""
    defocused = make_tilt_series(microscope=REAL, defocus_angst=30000.0)
    alias = extract.aliasing_free_size_px(REAL, 30150.0, 0.0, PIXEL, 140.0 / PIXEL)
    assert alias == 76
    assert [extract.padded_box_px(defocused, 48, PIXEL, 140.0, f) for f in (2.0, 1.5, 1.25, 1.0)] == [96, 76, 76, 76]
    assert extract.padded_box_px(defocused, 600, 1.0, 80.0, 1.75) == extract.MAX_PADDED_BOX_PX  # 1050 capped
    far = make_tilt_series(microscope=REAL, defocus_angst=60000.0)
    assert extract.padded_box_px(far, 100, 1.0, 80.0, 1.0) == extract.MAX_PADDED_BOX_PX  # aliasing-free > 1024


def test_the_engine_and_its_memory_plan_use_the_padded_box_of_the_factor():
    tilt_series = make_tilt_series()
    budget = 2 * 10**9  # given: the default follows the machine's available memory, which moves between two calls
    m, plan = plan_memory(tilt_series, options(padding_factor=1.5, memory_budget_bytes=budget))
    engine = TiltSeriesEngine.create(tilt_series, None, options(padding_factor=1.5, memory_budget_bytes=budget))
    assert m == engine.padded_box_px == engine.grid.padded_box_px == 48
    assert engine.plan == plan
    m2, plan2 = plan_memory(tilt_series, options(memory_budget_bytes=budget))
    assert m2 == 64 and plan.per_particle_bytes < plan2.per_particle_bytes and plan.fixed_bytes < plan2.fixed_bytes


def test_the_particle_series_ignores_the_padding_factor():
    tilt_series = make_tilt_series()
    assert plan_memory(tilt_series, options(mode="series", padding_factor=1.25))[0] == BOX
    assert plan_memory(tilt_series, options(mode="series"))[0] == BOX


PATHS = {"plain, direct 3D CTF (line by line)": {}, "plain, padded 3D CTF (whole spectrum)": {"ctf_method": "padded"},
         "pre-rotated, direct 3D CTF": {"prerotate": True},
         "pre-rotated, padded 3D CTF": {"prerotate": True, "ctf_method": "padded"}}


@pytest.fixture(scope="module")
def rotated_points():
    """Point sources with random poses (pre-rotation turns them; a point stays a point at the centre)."""
    tilt_series = make_tilt_series()
    rng = np.random.default_rng(7)
    positions = np.array([[-150.3, -121.7, 37.1], [140.2, 100.9, -40.4], [-21.9, 160.4, 19.6]])
    euler = rng.uniform(-180, 180, (3, 3))
    stack = simulate_noise_free(tilt_series, positions, euler, POINT, apply_ctf=False, apply_dose=False)
    return tilt_series, poses(positions, euler), stack


@pytest.mark.parametrize("factor", [1.5, 1.25, 1.0, 3.0])  # M = 48, 40, 34, 96
@pytest.mark.parametrize("path", list(PATHS))
def test_every_path_centres_a_point_source_at_padded_boxes_that_are_not_powers_of_two(rotated_points, path, factor):
    """At M = 48, 40, 34 and 96 the sub-tomogram's point lands on the box centre; without CTF the direct 3D CTF is
    1 at DC (31 slices of N/M each saturate it) and the padded one (M's crop of the M³ reconstruction) follows the
    direct one as it does at M's 2N (correlation 0.99 at M = 64, 0.93 at M = 34)."""
    tilt_series, particles, stack = rotated_points
    settings = dict(padding_factor=factor, max_batch=2, apply_ctf=False, **PATHS[path])
    engine = TiltSeriesEngine.create(tilt_series, stack, options(**settings))
    assert engine.padded_box_px == extract.padded_multiple_px(BOX, factor)
    results = list(engine.reconstruct(particles))
    assert [r.index for r in results] == [0, 1, 2]
    direct = TiltSeriesEngine.create(tilt_series, None, options(**{**settings, "ctf_method": "direct"}))
    for result, expected in zip(results, direct.reconstruct_ctfs(particles), strict=True):
        assert np.all(np.abs(gaussian_peak(result.volume) - BOX // 2) < 0.1), gaussian_peak(result.volume)
        assert result.ctf.shape == (BOX, BOX, BOX // 2 + 1) and np.all(np.isfinite(result.ctf))
        assert expected.ctf[0, 0, 0] == pytest.approx(1.0, abs=1e-6)
        assert np.corrcoef(result.ctf.ravel(), expected.ctf.ravel())[0, 1] > 0.9


@pytest.mark.parametrize("factor", [2.0, 1.25])
def test_line_by_line_equals_the_whole_spectrum_path_at_the_padded_box_of_the_factor(monkeypatch, factor):
    tilt_series = make_tilt_series(n_tilts=21, microscope=REAL, defocus_angst=20000.0)
    stack = np.random.default_rng(2).normal(size=(21, 160, 160)).astype(np.float32)
    particles = poses(np.random.default_rng(3).uniform(-60, 60, (3, 3)))
    opts = options(max_batch=2, padding_factor=factor, particle_diameter_angst=40.0)
    engine = TiltSeriesEngine.create(tilt_series, stack, opts)
    assert engine.by_lines and engine.padded_box_px == {2.0: 64, 1.25: 40}[factor]
    lines = list(engine.reconstruct(particles))
    monkeypatch.setattr(reconstruct, "_by_lines", lambda xp, options: False)
    for a, b in zip(lines, TiltSeriesEngine.create(tilt_series, stack, opts).reconstruct(particles), strict=True):
        assert np.array_equal(a.volume, b.volume) and np.array_equal(a.ctf, b.ctf)
