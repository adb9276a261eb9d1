"""``python -m mspecies export`` runs OpenBLAS on one thread (set before NumPy loads), unless the user chose."""

import os
import subprocess
import sys

import pytest

from mspecies.worker_threads import BLAS_THREADS_VARIABLE, limit_blas_threads


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


def _blas_threads_when_numpy_loads(arguments: list[str], **extra: str) -> str:
    """What ``OPENBLAS_NUM_THREADS`` holds when ``python -m mspecies ARGUMENTS`` first imports NumPy."""
    code = ("import os, runpy, sys\n"
            "class Spy:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'numpy':\n"
            "            print('numpy loads with', os.environ.get('OPENBLAS_NUM_THREADS', 'unset'), flush=True)\n"
            "            sys.meta_path.remove(self)\n"
            "sys.meta_path.insert(0, Spy())\n"
            "sys.argv = ['mspecies', *sys.argv[1:]]\n"
            "runpy.run_module('mspecies', run_name='__main__')\n")
    environ = {key: value for key, value in os.environ.items() if key != BLAS_THREADS_VARIABLE} | extra
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
    assert _blas_threads_when_numpy_loads(arguments, **extra) == expected
