"""Backend selection: NumPy is always available; CuPy only with a real device, and asking for it fails loudly."""

import numpy as np
import pytest

from mspecies.core.backend import cupy_unavailable_reason, get_xp, select_backend, to_numpy


def test_numpy_backend_is_always_available():
    assert select_backend("numpy") is np
    assert get_xp(np.zeros(3)) is np
    assert isinstance(to_numpy([1, 2]), np.ndarray)


def test_auto_falls_back_to_numpy_without_a_device_and_forced_cupy_says_why():
    reason = cupy_unavailable_reason()
    if reason is None:
        pytest.skip("a CUDA device is present; the fallback path cannot be exercised here")
    print(f"CuPy path not run here: {reason}")
    assert select_backend("auto") is np
    with pytest.raises(RuntimeError, match="backend 'cupy' was requested but cannot run"):
        select_backend("cupy")


def test_unknown_backend_name_is_rejected():
    with pytest.raises(ValueError, match="backend must be one of"):
        select_backend("opencl")


def test_the_engine_uses_the_cores_this_process_may_run_on(monkeypatch):
    """A SLURM allocation, taskset or a container's cpuset narrows the affinity mask, not os.cpu_count()."""
    import os

    from mspecies.core.backend import usable_cores
    from mspecies.core.reconstruct import ExportOptions

    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3, 5, 9, 11}, raising=False)
    assert usable_cores() == 4
    assert ExportOptions(output_pixel_size_angst=4.0, box_px=32, particle_diameter_angst=80.0).n_workers == 4
    assert ExportOptions(output_pixel_size_angst=4.0, box_px=32, particle_diameter_angst=80.0, workers=2).n_workers == 2
    monkeypatch.delattr(os, "sched_getaffinity")
    assert usable_cores() == 64
