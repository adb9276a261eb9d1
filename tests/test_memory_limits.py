"""The memory a process may use is the least of the machine's and its memory cgroups' (a SLURM job's ``--mem``
under ``task/cgroup``, a container's limit): a budget taken from the machine alone let the export plan batches the
job could not hold, and the kernel killed it without a message.

Unit tests read made-up ``/proc`` and cgroup files; one runs the export command in a real memory cgroup (root only,
skipped elsewhere with the reason). The last ones check that the plan holds the stack preparation's work arrays
(measured with ``tracemalloc``), prepares on fewer threads where they would not fit, and builds a next engine ahead
only with room for them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tracemalloc
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from _cgroup_files import in_cgroup, new_cgroup, proc_files, write_files
from test_reconstruct import make_tilt_series, options

from mspecies.core import extract, insert, memory, reconstruct
from mspecies.core.memory import Availability, cgroup_memory_left, memory_availability, plan_batches, preparation_bytes
from mspecies.core.reconstruct import TiltSeriesEngine
from mspecies.synth.dataset import generate_dataset

GB = 10**9


def _v2(tmp_path: Path, membership: str = "0::/job_7/step_0/task_0\n") -> tuple[str, str]:
    return proc_files(tmp_path, membership, "30 22 0:26 / {root}/cg rw,nosuid - cgroup2 cgroup2 rw,nsdelegate")


def test_a_slurm_job_limit_above_the_process_cgroup_is_found_and_its_reclaimable_cache_not_counted(tmp_path):
    write_files(tmp_path / "cg" / "job_7", {
        "memory.max": f"{4 * GB}\n", "memory.current": f"{GB}\n", "memory.stat": f"anon 1\ninactive_file {GB // 2}\n",
        "step_0/memory.max": "max\n", "step_0/memory.current": f"{GB}\n",
        "step_0/task_0/memory.max": "max\n", "step_0/task_0/memory.current": f"{GB}\n"})
    left, folder, limit = cgroup_memory_left(*_v2(tmp_path))
    assert (left, limit) == (4 * GB - GB // 2, 4 * GB)  # the limit less the usage without inactive file cache
    assert folder == str(tmp_path / "cg" / "job_7")


def test_the_tightest_of_several_limits_wins_and_memory_high_counts(tmp_path):
    write_files(tmp_path / "cg" / "job_7", {
        "memory.max": f"{8 * GB}\n", "memory.current": f"{GB}\n",
        "step_0/memory.max": f"{6 * GB}\n", "step_0/memory.high": f"{3 * GB}\n", "step_0/memory.current": f"{GB}\n",
        "step_0/task_0/memory.max": "max\n", "step_0/task_0/memory.current": f"{GB}\n"})
    left, folder, limit = cgroup_memory_left(*_v2(tmp_path))
    assert (left, limit, folder) == (2 * GB, 3 * GB, str(tmp_path / "cg" / "job_7" / "step_0"))


def test_cgroup_v1_memory_hierarchy_is_read_and_its_no_limit_value_ignored(tmp_path):
    mounts = proc_files(tmp_path, "5:cpu,cpuacct:/slurm/uid_0/job_3\n4:memory:/slurm/uid_0/job_3/step_batch\n0::/\n",
                   "31 22 0:27 / {root}/memory rw - cgroup cgroup rw,memory")
    no_limit = "9223372036854771712\n"
    write_files(tmp_path / "memory" / "slurm" / "uid_0", {
        "memory.limit_in_bytes": no_limit, "memory.usage_in_bytes": f"{9 * GB}\n",
        "job_3/memory.limit_in_bytes": f"{2 * GB}\n", "job_3/memory.usage_in_bytes": f"{GB}\n",
        "job_3/memory.stat": f"cache 5\ntotal_inactive_file {GB // 4}\n",
        "job_3/step_batch/memory.limit_in_bytes": no_limit, "job_3/step_batch/memory.usage_in_bytes": f"{GB}\n"})
    left, folder, limit = cgroup_memory_left(*mounts)
    assert (left, limit, folder) == (GB + GB // 4, 2 * GB, str(tmp_path / "memory" / "slurm" / "uid_0" / "job_3"))


def test_a_container_that_sees_only_its_own_subtree_reads_the_mount_point(tmp_path):
    mounts = proc_files(tmp_path, "0::/docker/abc\n", "30 22 0:26 /docker/abc {root}/cg ro - cgroup2 cgroup2 rw")
    write_files(tmp_path / "cg", {"memory.max": f"{GB}\n", "memory.current": f"{GB // 10}\n"})
    assert cgroup_memory_left(*mounts) == (GB - GB // 10, str(tmp_path / "cg"), GB)


def test_no_limit_no_memory_cgroup_or_unreadable_files_give_none(tmp_path):
    write_files(tmp_path / "cg" / "job_7", {"memory.max": "max\n", "memory.current": f"{GB}\n"})
    assert cgroup_memory_left(*_v2(tmp_path, "0::/job_7\n")) is None
    assert cgroup_memory_left(*proc_files(tmp_path, "0::/job_7\n", "30 22 0:26 / {root}/x rw - tmpfs tmpfs rw")) is None
    assert cgroup_memory_left(str(tmp_path / "absent"), str(tmp_path / "absent")) is None


def test_availability_is_the_least_of_the_machine_and_the_cgroup(tmp_path):
    write_files(tmp_path / "cg" / "job_7", {"memory.max": f"{4 * GB}\n", "memory.current": "0\n"})
    mounts = _v2(tmp_path, "0::/job_7\n")
    (tmp_path / "meminfo").write_text(f"MemTotal: 1 kB\nMemAvailable: {16 * GB // 1024} kB\n")
    limited = memory_availability(str(tmp_path / "meminfo"), *mounts)
    assert limited.bytes == 4 * GB and "job_7" in limited.source and "4.00 GB" in limited.source
    (tmp_path / "meminfo").write_text(f"MemAvailable: {GB // 1024} kB\n")
    machine = memory_availability(str(tmp_path / "meminfo"), *mounts)
    assert machine.bytes == GB // 1024 * 1024 and machine.source == "this machine's MemAvailable"


@pytest.mark.parametrize(("machine_gb", "cgroup_gb", "budget_gb", "words"), [
    (500, None, 125, "25% of this machine's 500.00 GB"),  # a workstation: a quarter
    (500, 64, 48, "75% of the 64.00 GB the memory cgroup /job_7 leaves"),  # a job on a large node: its --mem
    (20, 64, 5, "25% of this machine's 20.00 GB"),  # a cgroup larger than what the machine has left
    (24, 3, 2.25, "75% of the 3.00 GB"),
])
def test_the_default_budget_is_a_quarter_of_the_machine_but_at_most_three_quarters_of_the_cgroup(
        machine_gb, cgroup_gb, budget_gb, words):
    cgroup = None if cgroup_gb is None else (int(cgroup_gb * GB), "/job_7", int(cgroup_gb * GB))
    budget, how = Availability(int(machine_gb * GB), cgroup).default_budget()
    assert budget == int(budget_gb * GB) and words in how


def test_the_plan_says_where_its_budget_came_from_and_a_refusal_names_the_cgroup(monkeypatch):
    monkeypatch.setattr(memory, "memory_availability", lambda: Availability(24 * GB, (2 * GB, "/job_7", 3 * GB)))
    plan = plan_batches(128, 64, 41, 41 * 1024 * 1024, shared_geometry=True, padded_ctf=False, by_lines=True)
    assert plan.budget_bytes == 3 * GB // 2
    assert "75% of the 2.00 GB the memory cgroup /job_7 leaves; its limit: 3.00 GB" in plan.describe()
    with pytest.raises(memory.InputError, match="/job_7"):
        plan_batches(512, 256, 41, 41 * 4096 * 4096, shared_geometry=True)


# ------------------------------------------------------------------------------------------- a real cgroup


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("limits") / "data", seed=3, n_particles=4, n_tilts=11,
                            box_px=24, image_shape_yx=(128, 128), thickness_angst=300.0, snr=None)


def _export_in(cgroup: Path, manifest: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "mspecies", "export", "--manifest", str(manifest), "--box", "24",
               "--diameter", "60", "--backend", "numpy", "--out", str(out), *extra]
    return subprocess.run(in_cgroup(cgroup, command),
                          capture_output=True, text=True, timeout=300)


def test_the_export_in_a_memory_cgroup_plans_within_its_limit_and_refuses_a_larger_budget(small_dataset, tmp_path):
    limit = 600 * 1024**2
    folder = new_cgroup("memory", f"mspecies_test_{os.getpid()}", {1: {"memory.limit_in_bytes": str(limit)},
                                                                    2: {"memory.max": str(limit)}})
    try:
        done = _export_in(folder, small_dataset, tmp_path / "out")
        assert done.returncode == 0, done.stderr
        plan = next(line for line in done.stdout.splitlines() if "memory plan" in line)
        budget_mib = float(plan.split(" MiB budget")[0].rsplit(" ", 1)[1])
        assert budget_mib <= 0.75 * limit / 1024**2 + 1
        assert f"memory cgroup {folder}" in plan
        assert "preparing the stack: +" in plan  # the command read the stack's data type to plan its preparation
        refused = _export_in(folder, small_dataset, tmp_path / "refused", "--memory-gb", "1")
        assert refused.returncode == 2
        assert "--memory-gb: 1 GB is more than" in refused.stderr and str(folder) in refused.stderr
        assert not (tmp_path / "refused").exists()
    finally:
        folder.rmdir()


# ------------------------------------------------------------------------------- the stack preparation


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("binning", [1, 4])
def test_the_preparation_bytes_hold_what_preparing_a_stack_allocates(dtype, binning):
    """Peak of the NumPy allocations while two threads prepare 8 tilts of 1024², less the prepared stack, against
    :func:`preparation_bytes` for two threads (the per-pixel constants come from 1024² and 4096², same way)."""
    tilt_series = make_tilt_series(n_tilts=8, shape=(1024, 1024))
    stack = np.random.default_rng(5).normal(100.0, 10.0, (8, 1024, 1024)).astype(dtype)
    output = extract.rescaled_shape(tilt_series.image_shape_yx, tilt_series.pixel_size_angst,
                                    tilt_series.pixel_size_angst * binning)
    extract._bandpass_mask.cache_clear()  # the mask is built once per process: count it
    tracemalloc.start()
    try:
        prepared = extract.prepare_stack(stack, tilt_series, tilt_series.pixel_size_angst * binning, 64,
                                         normalize=True, invert=True, pool=insert.WorkerPool(2))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    per_thread, once = preparation_bytes(tilt_series.image_shape_yx, output, converted=dtype != np.float32)
    planned, used = 2 * per_thread + once, peak - prepared.images.nbytes
    # at most the two threads' plan; at least most of one thread's (however the threads' tilts overlapped in time)
    assert 0.6 * (per_thread + once) <= used <= planned, (used, per_thread, once)


def test_a_budget_too_small_for_every_thread_prepares_on_fewer_and_one_too_small_for_one_is_refused():
    raw, out = (4096, 4096), (4096, 4096)
    per_thread, once = preparation_bytes(raw, out, converted=True)
    arguments = dict(shared_geometry=True, padded_ctf=False, by_lines=True, preparation=(per_thread, once), threads=16)
    fixed, _ = memory.estimate_bytes(128, 64, 41, 41 * 4096 * 4096, shared_geometry=True, padded_ctf=False,
                                     by_lines=True)
    roomy = plan_batches(128, 64, 41, 41 * 4096 * 4096, budget_bytes=fixed + once + 16 * per_thread, **arguments)
    assert roomy.preparation_threads == 16 and roomy.preparation_bytes == once + 16 * per_thread
    assert roomy.peak_bytes == roomy.fixed_bytes + roomy.preparation_bytes  # above the batches' peak here
    tight = plan_batches(128, 64, 41, 41 * 4096 * 4096, budget_bytes=fixed + once + 3 * per_thread + 1, **arguments)
    assert tight.preparation_threads == 3 and "preparing the stack" in tight.describe()
    assert tight.peak_bytes <= tight.budget_bytes
    with pytest.raises(memory.InputError, match="preparing the stack needs"):
        plan_batches(128, 64, 41, 41 * 4096 * 4096, budget_bytes=fixed + once + per_thread - 1, **arguments)


@pytest.mark.parametrize("what", ["one particle", "preparing the stack"])
@pytest.mark.parametrize("short_by_bytes", [1, 200 * 1024, 900 * 1024])
def test_a_refusal_shows_the_need_above_the_budget_and_a_budget_in_gb_that_suffices(what, short_by_bytes):
    """Both refusals of the plan: the amounts have the decimals that tell them apart (a need of 8.8 MiB against
    a budget of 8.6 MiB read "9 MiB but the budget is 9 MiB"), and the budget they suggest, in the GB of
    ``--memory-gb``, plans when given (one particle and the preparation: the first refusal does not lead to the
    second) and is not far above the least budget that plans."""
    fixed, per_particle = memory.estimate_bytes(58, 24, 11, 11 * 128 * 128, shared_geometry=True)
    per_thread, once = preparation_bytes((128, 128), (128, 128), converted=False)
    assert once + per_thread > per_particle + short_by_bytes  # the preparation's refusal comes second
    needs = fixed + per_particle, fixed + once + per_thread
    need = needs[0] if what == "one particle" else needs[1]
    arguments = dict(shared_geometry=True, preparation=(per_thread, once), threads=2)
    with pytest.raises(memory.InputError, match=f"{what} needs") as refused:
        plan_batches(58, 24, 11, 11 * 128 * 128, budget_bytes=need - short_by_bytes, **arguments)
    message = str(refused.value)
    shown_need = float(message.split(f"{what} needs ")[1].split(" MiB")[0])
    shown_budget = float(message.split("the budget is ")[1].split(" MiB")[0])
    assert shown_need > shown_budget
    assert abs(shown_need - need / 1024**2) < 0.01 * need / 1024**2
    suggested_gb = float(message.split("at least ")[1].split(" GB")[0])
    plan = plan_batches(58, 24, 11, 11 * 128 * 128, budget_bytes=int(suggested_gb * 1e9), **arguments)
    assert plan.batch_size >= 1 and plan.preparation_threads >= 1
    assert suggested_gb * 1e9 < 1.1 * max(needs)  # not far above the plan's least budget


def test_the_budget_a_refusal_suggests_exports_when_given_back_to_the_command(small_dataset, tmp_path):
    """The user's loop: a budget too small is refused with one that suffices, in ``--memory-gb``'s GB, and that
    value, typed back, exports (the command rounds GB to bytes: 0.0157 GB is 15 700 000 B, int() gave 1 B less)."""
    command = [sys.executable, "-m", "mspecies", "export", "--manifest", str(small_dataset), "--box", "24",
               "--diameter", "60", "--backend", "numpy"]
    refused = subprocess.run([*command, "--out", str(tmp_path / "refused"), "--memory-gb", "0.005"],
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "--memory-gb" in refused.stderr, refused.stderr
    suggested = refused.stderr.split("raise the memory budget to at least ")[1].split(" GB")[0]
    done = subprocess.run([*command, "--out", str(tmp_path / "done"), "--memory-gb", suggested],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "memory plan: batch " in done.stdout and not (tmp_path / "refused").exists()


def test_memory_gb_is_rounded_to_bytes_not_truncated():
    from mspecies.cli.export import export_options
    from mspecies.cli.main import build_parser

    arguments = ["export", "--manifest", "m.json", "--box", "24", "--diameter", "60", "--out", "o"]
    for gb, expected in (("0.0157", 15_700_000), ("0.0092", 9_200_000), ("2.9", 2_900_000_000)):
        args = build_parser().parse_args([*arguments, "--memory-gb", gb])
        assert export_options(args, 4.0).memory_budget_bytes == expected


def test_the_engine_prepares_on_the_threads_its_plan_allows_with_the_same_images(monkeypatch):
    tilt_series = make_tilt_series(n_tilts=11)
    stack = np.random.default_rng(8).normal(size=(11, 160, 160)).astype(np.float16)
    free = TiltSeriesEngine.create(tilt_series, stack, options(workers=2))
    assert free.plan.preparation_threads == 2 and free.plan.preparation_bytes > 0
    pools = []
    original = reconstruct.insert.thread_pool
    monkeypatch.setattr(reconstruct.insert, "thread_pool", lambda threads: pools.append(threads) or original(threads))
    per_thread, once = preparation_bytes((160, 160), (160, 160), converted=True)
    assert free.plan.preparation_bytes == once + 2 * per_thread
    budget = free.plan.fixed_bytes + once + per_thread + per_thread // 2  # one thread's work arrays and a half
    limited = TiltSeriesEngine.create(tilt_series, stack, options(workers=2, memory_budget_bytes=budget))
    assert limited.plan.preparation_threads == 1 and pools[0] == 1
    assert np.array_equal(limited.prepared.images, free.prepared.images)


def test_building_the_next_engine_ahead_needs_room_for_its_preparation_too():
    from mspecies.cli.export_checks import overlap_fits
    from mspecies.core.reconstruct import ExportOptions

    volumes = ExportOptions(4.0, 64, 150.0)
    waiting = 4 * (64 ** 3 + 64 * 64 * 33) * 4 + 2 * (64 ** 3 * 4 + 1024)

    def job(budget: int, preparation: int) -> SimpleNamespace:
        plan = memory.MemoryPlan(10_000_000, 1, 4, budget, preparation_bytes=preparation, preparation_threads=2)
        return SimpleNamespace(plan=plan, options=volumes, tilt_series=SimpleNamespace(excluded=np.zeros(41, bool)))

    room = 10_000_004 + waiting + 10_000_000 + 5_000_000  # this job, its outputs, the next stack and preparation
    assert overlap_fits(job(room, 0), job(room, 5_000_000))
    assert not overlap_fits(job(room - 1, 0), job(room, 5_000_000))
