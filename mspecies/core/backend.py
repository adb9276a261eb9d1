"""Array-backend helpers: NumPy by default, CuPy when asked for and a real device answers.

CuPy is imported lazily and never at module import time. ``import cupy`` succeeds on machines
without a GPU; only a device call tells, so detection calls ``getDeviceCount()``.
"""

from __future__ import annotations

import os
from types import ModuleType

import numpy as np

BACKENDS = ("auto", "numpy", "cupy")


def usable_cores() -> int:
    """CPUs this process may run on: its affinity mask, which a SLURM allocation, ``taskset`` or a container's
    cpuset narrows, else every CPU of the machine (``os.cpu_count()`` counts the whole node: on a 64-core node
    a job given 4 cores would start 64 threads on them)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no affinity masks on this platform
        return max(1, os.cpu_count() or 1)


def cupy_unavailable_reason() -> str | None:
    """None when CuPy can run on a device here, else a one-line reason (for logs and test skips)."""
    try:
        import cupy
    except ImportError as error:
        return f"CuPy is not installed ({error}); install the [gpu] extra"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as error:  # CUDA driver/runtime errors have several types
        return f"CuPy is installed but no CUDA device answered: {error}"
    return None if count > 0 else "CuPy is installed but reports 0 CUDA devices"


def select_backend(name: str = "auto") -> ModuleType:
    """Return the array module for ``name`` in {auto, numpy, cupy}; ``cupy`` fails loudly if unusable."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name == "numpy":
        return np
    reason = cupy_unavailable_reason()
    if reason is None:
        import cupy

        return cupy
    if name == "cupy":
        raise RuntimeError(f"backend 'cupy' was requested but cannot run: {reason}")
    return np


def device_free_bytes(xp: ModuleType) -> int | None:
    """Bytes the current CUDA device can still give this process: the driver's free memory plus what CuPy's
    memory pool holds unused (it keeps freed blocks for reuse); None on NumPy or where the device does not say."""
    if xp is np:
        return None
    try:
        free, _total = xp.cuda.runtime.memGetInfo()
        pooled = xp.get_default_memory_pool().free_bytes()
    except Exception:  # noqa: BLE001 (CUDA runtime errors have several types; then the host's budget applies)
        return None
    return int(free) + int(pooled)


def get_xp(*arrays: object) -> ModuleType:
    """The array module (NumPy or CuPy) of the given arrays, without importing CuPy needlessly."""
    for array in arrays:
        if type(array).__module__.startswith("cupy"):
            import cupy

            return cupy
    return np


def to_numpy(array: object) -> np.ndarray:
    """The single place where device arrays come back to the host."""
    if type(array).__module__.startswith("cupy"):
        return array.get()  # type: ignore[attr-defined, no-any-return]
    return np.asarray(array)
