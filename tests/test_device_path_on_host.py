"""The engine's device (CuPy) code path, run on the host through a NumPy stand-in for CuPy.

No GPU is lent to CI, so the branches that only CuPy takes (``xp is not np``: the stack prepared without the
thread pool, the whole-batch per-sample values, the insertion from :func:`~mspecies.core.insert.splat_entries`,
whole padded spectra and their batched transforms, the device-side masks) would never run. The stand-in is a
module that is not ``numpy`` but gives NumPy's functions, with ``cupyx.scipy.fft`` / ``cupyx.scipy.sparse``
answered by SciPy; the engine then runs those branches with NumPy arrays, and must give what the NumPy path
gives. What it cannot show is that CuPy has each function (``tests/test_reconstruct.py::
test_cupy_backend_matches_numpy`` does, where a device answers).
"""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import scipy.fft
import scipy.sparse
from test_reconstruct import BOX, PIXEL, REAL, make_tilt_series, options, poses

import mspecies.core.backend
import mspecies.core.reconstruct
from mspecies.common.types import InputError
from mspecies.core import extract
from mspecies.core.backend import device_free_bytes
from mspecies.core.reconstruct import TiltSeriesEngine, reconstruct_particles
from mspecies.synth.dataset import simulate_noise_free
from mspecies.synth.phantom import make_blob_model

STAND_IN = "numpy_stand_in_for_cupy"


@pytest.fixture
def device_on_host(monkeypatch):
    """``backend="cupy"`` gives a NumPy stand-in module (the device branches run on the host)."""
    device = types.ModuleType(STAND_IN)
    device.__getattr__ = lambda name: getattr(np, name)  # module-level __getattr__ (PEP 562)
    device.asnumpy = np.asarray
    cupyx, cupyx_scipy = types.ModuleType("cupyx"), types.ModuleType("cupyx.scipy")
    cupyx.scipy, cupyx_scipy.fft, cupyx_scipy.sparse = cupyx_scipy, scipy.fft, scipy.sparse
    for name, module in (("cupyx", cupyx), ("cupyx.scipy", cupyx_scipy), ("cupyx.scipy.fft", scipy.fft),
                         ("cupyx.scipy.sparse", scipy.sparse)):
        monkeypatch.setitem(sys.modules, name, module)
    host_select = mspecies.core.backend.select_backend

    def select(name: str = "auto") -> types.ModuleType:
        return device if name == "cupy" else host_select(name)

    monkeypatch.setattr(mspecies.core.backend, "select_backend", select)
    monkeypatch.setattr(mspecies.core.reconstruct, "select_backend", select)
    return device


@pytest.fixture(scope="module")
def two_particles():
    tilt_series = make_tilt_series(n_tilts=41, microscope=REAL, defocus_angst=25000.0, shape=(192, 192),
                                   dose_per_tilt=3.0)
    positions = np.array([[20.5, -30.2, 40.3], [-60.1, 50.7, -30.9]])
    euler = np.array([[30.0, 50.0, -70.0], [100.0, 120.0, 10.0]])
    stack = simulate_noise_free(tilt_series, positions, euler, make_blob_model(BOX, PIXEL), apply_dose=False)
    return tilt_series, stack, poses(positions, euler)


VARIANTS = {
    "direct 3D CTF": {},
    "padded 3D CTF": {"ctf_method": "padded"},
    "normalised, inverted, first 20 tilts by dose": {"normalize_input": True, "normalize_output": True,
                                                     "invert_contrast": True, "n_tilts_by_dose": 20},
    "pre-rotated": {"prerotate": True},
    "particle series": {"mode": "series"},
}


@pytest.mark.parametrize("changes", VARIANTS.values(), ids=VARIANTS.keys())
def test_the_device_code_path_gives_the_host_path_values(device_on_host, two_particles, changes):
    tilt_series, stack, particles = two_particles
    host = list(reconstruct_particles(tilt_series, stack, particles, options(**changes)))
    engine = TiltSeriesEngine.create(tilt_series, stack, options(backend="cupy", max_batch=2, **changes))
    assert engine.xp is device_on_host
    device = list(engine.reconstruct(particles))
    assert [result.index for result in device] == [result.index for result in host]
    for on_host, on_device in zip(host, device):
        for name in ("volume", "ctf", "series"):
            expected, found = getattr(on_host, name), getattr(on_device, name)
            assert (expected is None) == (found is None), name
            if expected is not None:
                assert found.dtype == np.float32 and found.shape == expected.shape, name
                scale = float(np.abs(expected).max())
                assert np.abs(found - expected).max() <= 1e-6 * scale, (name, np.abs(found - expected).max() / scale)


def test_the_device_path_prepares_the_stack_as_the_host_path(device_on_host, two_particles):
    tilt_series, stack, _ = two_particles
    wanted = np.arange(0, tilt_series.n_tilts, 3)
    kwargs = dict(normalize=True, invert=True, tilts=wanted)
    host = extract.prepare_stack(stack, tilt_series, PIXEL, BOX, **kwargs)
    device = extract.prepare_stack(stack, tilt_series, PIXEL, BOX, xp=device_on_host, **kwargs)
    assert np.array_equal(device.images, host.images)
    assert not np.any(device.images[np.setdiff1d(np.arange(tilt_series.n_tilts), wanted)])


@pytest.mark.parametrize("output_pixel_angst", [PIXEL, 2 * PIXEL])
@pytest.mark.parametrize("bad, message", [
    (lambda tilt: tilt.__setitem__((150, 7), np.nan), r"tilt 2 \(\S+°\) has 1 NaN and 0 infinite"),
    (lambda tilt: tilt.__setitem__((150, 7), np.inf), r"tilt 2 \(\S+°\) has 0 NaN and 1 infinite"),
    (lambda tilt: tilt.fill(-1.5), r"tilt 2 \(\S+°\) is blank \(every pixel is -1.5\)"),
])
def test_the_device_path_names_a_bad_tilt_as_the_host_path(device_on_host, output_pixel_angst, bad, message):
    """On the device the tilt's extremes are taken on the device array (no blocks of rows): a NaN, an infinite
    pixel or a blank tilt stops the preparation with the host path's message, binned or not."""
    tilt_series = make_tilt_series(n_tilts=4, shape=(192, 192))
    stack = np.random.default_rng(17).normal(size=(4, 192, 192)).astype(np.float32)
    bad(stack[2])
    for xp in (np, device_on_host):
        with pytest.raises(InputError, match=message):
            extract.prepare_stack(stack, tilt_series, output_pixel_angst, BOX, normalize=True, invert=False,
                                  xp=xp)


def _device_memory(device, free_bytes: int, pooled_bytes: int) -> None:
    """The stand-in's answers to ``cupy.cuda.runtime.memGetInfo()`` and the memory pool's ``free_bytes()``."""
    device.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(memGetInfo=lambda: (free_bytes, 8 * 10**9)))
    device.get_default_memory_pool = lambda: types.SimpleNamespace(free_bytes=lambda: pooled_bytes)


def test_on_a_gpu_the_default_budget_is_at_most_three_quarters_of_its_free_memory(device_on_host, two_particles):
    tilt_series, stack, particles = two_particles
    _device_memory(device_on_host, 300 * 1024**2, 100 * 1024**2)  # a small GPU: 400 MiB free with the pool's
    engine = TiltSeriesEngine.create(tilt_series, stack, options(backend="cupy"))
    assert engine.plan.budget_bytes == 300 * 1024**2
    assert "75% of the 0.42 GB free on the GPU" in engine.plan.describe()
    host = TiltSeriesEngine.create(tilt_series, stack, options())
    assert host.plan.budget_bytes > engine.plan.budget_bytes and "GPU" not in host.plan.describe()
    given = TiltSeriesEngine.create(tilt_series, stack, options(backend="cupy", memory_budget_bytes=10**9))
    assert given.plan.budget_bytes == 10**9  # a budget the user gives stands
    _device_memory(device_on_host, 1024**2, 0)
    with pytest.raises(InputError, match="free on the GPU"):
        TiltSeriesEngine.create(tilt_series, stack, options(backend="cupy"))


def test_a_device_that_does_not_say_its_free_memory_gets_the_host_budget(device_on_host, two_particles):
    tilt_series, stack, _ = two_particles
    assert device_free_bytes(device_on_host) is None  # the stand-in has no cuda module
    engine = TiltSeriesEngine.create(tilt_series, stack, options(backend="cupy"))
    host = TiltSeriesEngine.create(tilt_series, stack, options())
    assert "GPU" not in engine.plan.describe() and engine.plan.budget_source.startswith("25% of this machine's")
    assert abs(engine.plan.budget_bytes - host.plan.budget_bytes) <= 0.01 * host.plan.budget_bytes
