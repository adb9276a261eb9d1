"""Backend selection: NumPy is always available; CuPy only with a real device, and asking for it fails loudly."""

import os

import numpy as np
import pytest
from _cgroup_files import in_cgroup, new_cgroup, proc_files, write_files

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
    monkeypatch.setattr("mspecies.core.backend.cpu_quota_cores", lambda: None)  # whatever this machine's cgroups say
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3, 5, 9, 11}, raising=False)
    assert usable_cores() == 4
    assert ExportOptions(output_pixel_size_angst=4.0, box_px=32, particle_diameter_angst=80.0).n_workers == 4
    assert ExportOptions(output_pixel_size_angst=4.0, box_px=32, particle_diameter_angst=80.0, workers=2).n_workers == 2
    monkeypatch.delattr(os, "sched_getaffinity")
    assert usable_cores() == 64


def test_a_cpu_quota_caps_the_cores_rounded_up_the_tightest_of_the_cgroup_and_its_parents(tmp_path, monkeypatch):
    """docker --cpus 2.5, a Kubernetes CPU limit: the affinity mask stays whole, the quota stops the threads."""
    from mspecies.core import backend

    proc = proc_files(tmp_path, "0::/kubepods/pod7/box\n", "30 22 0:26 / {root}/cg rw - cgroup2 cgroup2 rw")
    write_files(tmp_path / "cg" / "kubepods", {"cpu.max": "max 100000\n", "pod7/cpu.max": "250000 100000\n",
                                          "pod7/box/cpu.max": "max 100000\n"})
    assert backend.cpu_quota_cores(*proc) == 3  # 2.5 CPUs: three threads, each busy part of the time
    write_files(tmp_path / "cg" / "kubepods", {"pod7/box/cpu.max": "100000 100000\n"})
    assert backend.cpu_quota_cores(*proc) == 1
    write_files(tmp_path / "cg" / "kubepods", {"pod7/cpu.max": "max 100000\n", "pod7/box/cpu.max": "max 100000\n"})
    assert backend.cpu_quota_cores(*proc) is None
    v1 = proc_files(tmp_path, "6:cpu,cpuacct:/docker/abc\n0::/\n",
               "31 22 0:27 /docker/abc {root}/cpu rw - cgroup cgroup rw,cpu,cpuacct")
    write_files(tmp_path / "cpu", {"cpu.cfs_quota_us": "400000\n", "cpu.cfs_period_us": "100000\n"})
    assert backend.cpu_quota_cores(*v1) == 4
    write_files(tmp_path / "cpu", {"cpu.cfs_quota_us": "-1\n"})
    assert backend.cpu_quota_cores(*v1) is None
    monkeypatch.setattr(backend, "cpu_quota_cores", lambda: 3)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert backend.usable_cores() == 3


def test_in_a_real_cpu_cgroup_with_a_quota_of_one_cpu_the_worker_uses_one_core():
    import subprocess
    import sys

    folder = new_cgroup("cpu", f"mspecies_test_{os.getpid()}", {
        1: {"cpu.cfs_period_us": "100000", "cpu.cfs_quota_us": "100000"}, 2: {"cpu.max": "100000 100000"}})
    try:
        program = "from mspecies.core.backend import usable_cores; print(usable_cores())"
        done = subprocess.run(in_cgroup(folder, [sys.executable, "-c", program]), capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "1"
    finally:
        folder.rmdir()


def test_a_new_cgroup_gets_its_controller_from_the_v1_hierarchy_or_from_a_v2_root_that_hands_it_down(tmp_path):
    from mspecies.core.cgroups import controller_hierarchy

    v1, _ = proc_files(tmp_path, "6:cpu:/\n", "31 22 0:27 / {root}/cpu rw - cgroup cgroup rw,cpu,cpuacct")
    assert controller_hierarchy("cpu", v1) == (1, str(tmp_path / "cpu"))
    v2, _ = proc_files(tmp_path, "0::/\n", "30 22 0:26 / {root}/cg rw - cgroup2 cgroup2 rw")
    write_files(tmp_path / "cg", {"cgroup.subtree_control": "cpuset memory\n"})
    assert controller_hierarchy("memory", v2) == (2, str(tmp_path / "cg"))
    assert controller_hierarchy("cpu", v2) is None  # the root keeps cpu to itself
