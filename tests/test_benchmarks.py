"""The benchmark scripts are the project's measuring instruments: they must run, and time what they say they time.

``benchmarks/export/bench_cli.py --profile`` patches the export's functions by name to time its phases; a renamed
function made it fail (the eighth pass replaced ``write_mrc`` by two writers), unnoticed until the next pass needed it.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mspecies.synth.dataset import generate_dataset

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def small_manifest(tmp_path_factory):
    return generate_dataset(tmp_path_factory.mktemp("bench") / "data", seed=2, n_particles=4, n_tilts=11, box_px=24,
                            image_shape_yx=(128, 128), thickness_angst=300.0, snr=None)


def test_the_command_benchmark_times_the_engine_the_command_and_every_phase_of_its_profile(small_manifest, tmp_path):
    figures = tmp_path / "figures.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "export" / "bench_cli.py"), "--manifest", str(small_manifest),
         "--box", "24", "--diameter", "60", "--rounds", "1", "--profile", "--prepared-too", "--pause", "0.1",
         "--json", str(figures), "--scratch", str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(figures.read_text())
    assert report["engine"][0]["particles"] == 4 and report["engine"][0]["warm_s"] > 0
    run = report["cli"]["this tree"]["runs"][0]
    assert run["particles"] == 4 and run["wall_s"] > 0 and 0 < run["system_s"] < run["cpu_s"]
    assert report["pause_s"] == 0.1
    assert report["cli"]["this tree"]["startup_s"][0] > 0 and run["prepared_stacks_mapped"] == 0
    # without its stack preparation: the command mapped the one tilt series' prepared images and wrote every particle
    unprepared = report["cli"]["this tree, no stack preparation"]["runs"][0]
    assert unprepared["particles"] == 4 and unprepared["prepared_stacks_mapped"] == 1
    phases = report["profile"]
    for phase in ("inputs (manifest, particles)", "checks and memory plans", "stack read + preparation (all threads)",
                  "reconstruction (engine batches)", "volume checks (writer thread)", "STAR writing",
                  "publishing (renames)", "success record"):
        assert phases[phase] > 0, phase
    # box 24: every file is small and goes through the page cache; the direct writer is patched (a missing name
    # fails the run above) but never called
    assert phases["MRC writes through the page cache (writer thread)"] > 0
    assert phases.get("MRC writes, direct (writer thread)", 0) == 0


def test_the_cold_stack_benchmark_evicts_the_stacks_and_times_the_command(small_manifest, tmp_path):
    figures = tmp_path / "figures.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "export" / "bench_cold_stack.py"), "--manifest", str(small_manifest),
         "--box", "24", "--diameter", "60", "--rounds", "2", "--json", str(figures), "--scratch", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    if result.returncode != 0 and "stays in the page cache" in result.stderr:
        pytest.skip(f"the dataset's file system keeps files cached (tmpfs?): {result.stderr.splitlines()[-1]}")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(figures.read_text())
    assert report["cold"] and len(report["wall_s"]["this tree"]) == 2 and min(report["wall_s"]["this tree"]) > 0


def test_the_memory_limit_benchmark_runs_the_command_in_a_cgroup_and_reports_how_it_ended(small_manifest, tmp_path):
    import os

    if os.geteuid() != 0:
        pytest.skip("bench_memory_limit.py makes memory cgroups: it needs root")
    figures = tmp_path / "figures.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "export" / "bench_memory_limit.py"), "--manifest",
         str(small_manifest), "--box", "24", "--diameter", "60", "--limits-gb", "0.6", "0.0001", "--json",
         str(figures), "--scratch", str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    if result.returncode != 0 and "no memory cgroup hierarchy" in result.stderr:
        pytest.skip(result.stderr.splitlines()[-1])
    assert result.returncode == 0, result.stderr[-3000:]
    roomy, starved = json.loads(figures.read_text())["results"]
    assert roomy["returncode"] == 0 and "particles in" in roomy["said"] and "memory cgroup" in roomy["said"]
    assert roomy["limit_bytes"] == 600_000_000 and 0 < roomy["peak_bytes"] <= 600_000_000
    assert starved["returncode"] != 0  # 100 kB: killed at start-up, or refused


def test_the_overhead_benchmark_splits_the_command_cpu_beyond_a_warm_engine_pass_by_function(small_manifest, tmp_path):
    figures = tmp_path / "figures.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "export" / "bench_overhead.py"), "--manifest", str(small_manifest),
         "--box", "24", "--diameter", "60", "--rounds", "1", "--passes", "2", "--json", str(figures), "--scratch",
         str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    if result.returncode == 2 and "perf" in result.stderr:
        pytest.skip(result.stderr.strip().splitlines()[-1])
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(figures.read_text())
    assert report["command_cpu_s"] > 0 and report["warm_pass_cpu_s"] > 0
    rows = report["functions"]
    assert sum(row["command_s"] for row in rows) == pytest.approx(report["command_cpu_s"])
    assert all(row["extra_s"] == pytest.approx(row["command_s"] - row["warm_pass_s"]) for row in rows)
    listed = rows[:-1] if rows[-1]["function"].endswith("ms each)") else rows  # the small ones, summed, last
    assert [row["extra_s"] for row in listed] == sorted((row["extra_s"] for row in listed), reverse=True)
    # the interpreter runs the command's imports and the engine's Python; the transforms are pocketfft's
    assert report["groups"]["Python interpreter"]["command_s"] > 0
    assert report["groups"]["FFT (pocketfft)"]["warm_pass_s"] > 0
    assert sum(group["extra_s"] for group in report["groups"].values()) == pytest.approx(
        report["command_cpu_s"] - report["warm_pass_cpu_s"])


def test_the_overhead_benchmark_groups_kernel_page_zeroing_apart_from_the_rest_of_the_kernel():
    folder = str(ROOT / "benchmarks" / "export")
    sys.path.insert(0, folder)
    try:
        import bench_overhead  # it puts its folder on sys.path too, for bench_cli
    finally:
        sys.path[:] = [entry for entry in sys.path if entry != folder]
    assert bench_overhead.group_of("clear_page_erms [kernel.kallsyms]") == "kernel: page zeroing"
    assert bench_overhead.group_of("clear_huge_page [kernel.kallsyms]") == "kernel: page zeroing"
    assert bench_overhead.group_of("exc_page_fault [kernel.kallsyms]") == "kernel: other"
    assert bench_overhead.group_of("csr_matvecs<int, float> [_sparsetools.cpython-311-x86_64-linux-gnu.so]") == (
        "sparse products (SciPy)")
    assert bench_overhead.group_of("somewhere [libfoo.so]") == "other"
    one, many = {"a [x.so]": 1.0, "b [x.so]": 0.5}, {"a [x.so]": 3.0, "b [x.so]": 0.4, "c [x.so]": 0.2}
    assert bench_overhead.warm_pass(one, many, 3) == pytest.approx({"a [x.so]": 1.0, "b [x.so]": 0.0,
                                                                     "c [x.so]": 0.1})
