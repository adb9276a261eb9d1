"""``python -m mspecies export`` runs OpenBLAS on one thread, and NumPy without 2 MiB pages where the host takes
free memory back (both set before NumPy loads), unless the user chose."""

import os
import subprocess
import sys

import pytest

from mspecies.worker_threads import (
    BLAS_THREADS_VARIABLE,
    FREE_PAGE_REPORTING_BIT,
    HUGE_PAGES_VARIABLE,
    avoid_huge_pages_the_host_took_back,
    host_takes_back_free_memory,
    limit_blas_threads,
)


def test_export_gets_one_blas_thread_and_other_commands_keep_the_default():
    exported, converted, bare = {}, {}, {}
    assert limit_blas_threads(["export", "--manifest", "m.json"], exported) is True
    assert limit_blas_threads(["convert", "--help"], converted) is False
    assert limit_blas_threads([], bare) is False
    assert exported == {BLAS_THREADS_VARIABLE: "1"} and converted == {} and bare == {}


def test_a_thread_count_the_user_set_is_kept():
    environ = {BLAS_THREADS_VARIABLE: "8"}
    assert limit_blas_threads(["export"], environ) is False
    assert environ == {BLAS_THREADS_VARIABLE: "8"}


def _when_numpy_loads(arguments: list[str], variable: str = BLAS_THREADS_VARIABLE, **extra: str) -> str:
    """What ``variable`` holds when ``python -m mspecies ARGUMENTS`` first imports NumPy (the user's environment
    without ``variable``, with ``extra``)."""
    code = ("import os, runpy, sys\n"
            "class Spy:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'numpy':\n"
            f"            print('numpy loads with', os.environ.get({variable!r}, 'unset'), flush=True)\n"
            "            sys.meta_path.remove(self)\n"
            "sys.meta_path.insert(0, Spy())\n"
            "sys.argv = ['mspecies', *sys.argv[1:]]\n"
            "runpy.run_module('mspecies', run_name='__main__')\n")
    environ = {key: value for key, value in os.environ.items() if key != variable} | extra
    done = subprocess.run([sys.executable, "-c", code, *arguments], capture_output=True, text=True, timeout=120,
                          env=environ)
    assert done.returncode == 0, done.stderr
    return next(line for line in done.stdout.splitlines() if line.startswith("numpy loads with")).split()[-1]


@pytest.mark.parametrize(("arguments", "extra", "expected"), [
    (["export", "--help"], {}, "1"),
    (["export", "--help"], {BLAS_THREADS_VARIABLE: "3"}, "3"),
    (["convert", "--help"], {}, "unset"),
])
def test_the_entry_point_sets_the_blas_threads_before_numpy_loads(arguments, extra, expected):
    assert _when_numpy_loads(arguments, **extra) == expected


def _balloon(folder, *features: str) -> str:
    """A stand-in for ``/sys/bus/virtio/drivers/virtio_balloon``: one device per ``features`` string (and the
    driver's own entries, which are not devices)."""
    for number, bits in enumerate(features):
        device = folder / f"virtio{number}"
        device.mkdir(parents=True)
        (device / "features").write_text(bits + "\n")
    folder.mkdir(exist_ok=True)
    (folder / "uevent").write_text("DRIVER=virtio_balloon\n")
    return str(folder)


REPORTING = "0110010100000000000000000000000010000000"  # as this project's 2-core VM reads: bits 1, 2, 5, 7, 32
NOT_REPORTING = REPORTING[:FREE_PAGE_REPORTING_BIT] + "0" + REPORTING[FREE_PAGE_REPORTING_BIT + 1:]


def test_free_page_reporting_is_read_from_the_balloon_devices_features(tmp_path):
    assert host_takes_back_free_memory(_balloon(tmp_path / "reporting", NOT_REPORTING, REPORTING)) is True
    assert host_takes_back_free_memory(_balloon(tmp_path / "keeping", NOT_REPORTING)) is False
    assert host_takes_back_free_memory(_balloon(tmp_path / "short", "0110")) is False
    assert host_takes_back_free_memory(str(tmp_path / "no_balloon")) is False


def test_export_gets_numpy_without_huge_pages_only_where_the_host_takes_free_memory_back(tmp_path):
    reporting = _balloon(tmp_path / "reporting", REPORTING)
    keeping = _balloon(tmp_path / "keeping", NOT_REPORTING)
    exported, converted, on_metal, chosen = {}, {}, {}, {HUGE_PAGES_VARIABLE: "1"}
    assert avoid_huge_pages_the_host_took_back(["export", "--manifest", "m.json"], exported, reporting) is True
    assert avoid_huge_pages_the_host_took_back(["convert"], converted, reporting) is False
    assert avoid_huge_pages_the_host_took_back(["export"], on_metal, keeping) is False
    assert avoid_huge_pages_the_host_took_back(["export"], chosen, reporting) is False  # the user's choice stands
    assert exported == {HUGE_PAGES_VARIABLE: "0"} and converted == {} and on_metal == {}
    assert chosen == {HUGE_PAGES_VARIABLE: "1"}


def test_the_entry_point_sets_numpy_s_huge_pages_before_numpy_loads_as_this_machine_needs():
    expected = "0" if host_takes_back_free_memory() else "unset"
    assert _when_numpy_loads(["export", "--help"], HUGE_PAGES_VARIABLE) == expected
    assert _when_numpy_loads(["export", "--help"], HUGE_PAGES_VARIABLE, **{HUGE_PAGES_VARIABLE: "1"}) == "1"
    assert _when_numpy_loads(["convert", "--help"], HUGE_PAGES_VARIABLE) == "unset"
