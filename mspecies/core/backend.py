"""Array-backend helpers: NumPy by default, CuPy when asked for and a real device answers.

CuPy is imported lazily and never at module import time. ``import cupy`` succeeds on machines
without a GPU; only a device call tells, so detection calls ``getDeviceCount()``.
"""

from __future__ import annotations

import math
import os
from types import ModuleType

import numpy as np

from .cgroups import MEMBERSHIP, MOUNTINFO, cgroup_folders, read_cgroup_int, read_cgroup_words

BACKENDS = ("auto", "numpy", "cupy")


def usable_cores() -> int:
    """CPUs this process may run on: its affinity mask, which a SLURM allocation, ``taskset`` or a container's
    cpuset narrows, else every CPU of the machine (``os.cpu_count()`` counts the whole node: on a 64-core node
    a job given 4 cores would start 64 threads on them); and no more than its CPU quota allows
    (:func:`cpu_quota_cores`: ``docker --cpus``, Kubernetes CPU limits, systemd's ``CPUQuota``), which leaves
    the mask whole but stops every thread once the quota of each period is used up."""
    try:
        cores = max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no affinity masks on this platform
        cores = max(1, os.cpu_count() or 1)
    quota = cpu_quota_cores()
    return cores if quota is None else max(1, min(cores, quota))


def cpu_quota_cores(mountinfo: str = MOUNTINFO, membership: str = MEMBERSHIP) -> int | None:
    """Whole CPUs' worth of the tightest CPU quota of this process's cgroups (quota / period, rounded up), or
    None where none has one: cgroup v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (−1: none), v2 ``cpu.max``
    (``quota period``, ``max``: none), over the process's cgroup and its parents (:func:`~mspecies.core.cgroups.
    cgroup_folders`)."""
    found = cgroup_folders("cpu", mountinfo, membership)
    if found is None:
        return None
    version, folders = found
    ratios = []
    for folder in folders:
        if version == 1:
            quota = read_cgroup_int(os.path.join(folder, "cpu.cfs_quota_us"))
            period = read_cgroup_int(os.path.join(folder, "cpu.cfs_period_us"))
        else:
            words = read_cgroup_words(os.path.join(folder, "cpu.max")) or []
            quota, period = (int(words[0]), int(words[1])) if len(words) == 2 and words[0].isdigit() else (None, None)
        if quota and period:
            ratios.append(quota / period)
    return max(1, math.ceil(min(ratios))) if ratios else None


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
