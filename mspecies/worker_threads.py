"""Thread and memory settings of the ``python -m mspecies`` workers, made before NumPy loads (standard library
only: this module is imported first by :mod:`mspecies.__main__`)."""

from __future__ import annotations

import os
from collections.abc import MutableMapping, Sequence

OWN_THREADS = frozenset({"export"})
"""Commands that share the cores out themselves: the export's worker pool and ``scipy.fft`` workers."""

BLAS_THREADS_VARIABLE = "OPENBLAS_NUM_THREADS"
"""Read by the OpenBLAS that NumPy's and SciPy's wheels bundle, once, when the library loads."""


def limit_blas_threads(argv: Sequence[str], environ: MutableMapping[str, str]) -> bool:
    """Give the commands of :data:`OWN_THREADS` one OpenBLAS thread, unless the user set
    ``OPENBLAS_NUM_THREADS``; True when this set it.

    The export's matrix algebra is a few 2 × 2 and 3 × 2 matrices per tilt series (written out in closed form in
    :mod:`mspecies.core.geometry`); OpenBLAS still starts a pool of threads when NumPy loads, and after any call
    that wakes them they spin (``sched_yield``) on the cores that the export's own workers need: 26,900 calls in
    a box-64 export of 96 particles (``benchmarks/export/README.md``, fifth pass). ``argv`` is ``sys.argv[1:]``;
    ``environ`` is changed in place (``os.environ``: inherited by the command's children).
    """
    if not argv or argv[0] not in OWN_THREADS or BLAS_THREADS_VARIABLE in environ:
        return False
    environ[BLAS_THREADS_VARIABLE] = "1"
    return True


HUGE_PAGES_VARIABLE = "NUMPY_MADVISE_HUGEPAGE"
"""Read by NumPy once, when it loads: "0" stops it asking the kernel for 2 MiB pages (``madvise``) for its large
arrays."""

BALLOON_DEVICES = "/sys/bus/virtio/drivers/virtio_balloon"
"""Where Linux lists a virtual machine's balloon devices, each with its negotiated ``features`` (one character per
feature bit, "1" where it is on)."""

FREE_PAGE_REPORTING_BIT = 5
"""``VIRTIO_BALLOON_F_REPORTING`` (virtio 1.2, §5.5.3): the guest reports its free memory to the host, which takes
the memory back until the guest touches it again."""


def host_takes_back_free_memory(devices: str = BALLOON_DEVICES) -> bool:
    """True on a virtual machine whose balloon device reports free memory to its host (free page reporting).

    There the memory an export allocates anew is mostly memory the host has taken back: every page costs a fault
    on the host as well, and a 2 MiB page the most. Measured on such a VM (Firecracker, 2 cores, page reporting
    of free 8 MiB blocks): 600 MiB touched for the first time in a new process cost 0.9–1.3 s in 2 MiB pages
    against 0.23–0.25 s in 4 KiB pages; the same memory freed and allocated again in the process, 0.065 s
    (``benchmarks/export/README.md``, fifteenth pass). False where there is no such device or it cannot be read.
    """
    try:
        names = [name for name in os.listdir(devices) if name.startswith("virtio")]
    except OSError:
        return False
    for name in names:
        try:
            with open(os.path.join(devices, name, "features"), encoding="ascii") as features:
                bits = features.read().strip()
        except (OSError, ValueError):
            continue
        if len(bits) > FREE_PAGE_REPORTING_BIT and bits[FREE_PAGE_REPORTING_BIT] == "1":
            return True
    return False


def avoid_huge_pages_the_host_took_back(argv: Sequence[str], environ: MutableMapping[str, str],
                                        devices: str = BALLOON_DEVICES) -> bool:
    """Give the commands of :data:`OWN_THREADS` NumPy without 2 MiB pages (``NUMPY_MADVISE_HUGEPAGE=0``) where
    the host takes free memory back (:func:`host_takes_back_free_memory`), unless the user set the variable;
    True when this set it.

    Each export process touches its prepared stack and its batches' arrays for the first time (peak RSS 0.56 GB
    at box 64, 1.8 GB at box 128, 41 tilts of 1024²). On the VM of ``benchmarks/export`` that cost 3.6–4.1 s of system
    time at box 128 in 2 MiB pages and 1.7–1.8 s in 4 KiB pages, and the command took 8.6–8.9 s against
    9.1–10.4 s (``bench_cli.py --pause 5``: 0.66× the warm engine against 0.58×); at box 64 the 0.3–0.4 s of
    system time saved came back as user time, the command no faster; the warm engine's passes,
    whose memory is reused, did not change. Elsewhere NumPy keeps its default: where memory stays with the
    machine, 2 MiB pages fault less. ``environ`` is changed in place (``os.environ``: inherited by the
    command's children).
    """
    if not argv or argv[0] not in OWN_THREADS or HUGE_PAGES_VARIABLE in environ:
        return False
    if not host_takes_back_free_memory(devices):
        return False
    environ[HUGE_PAGES_VARIABLE] = "0"
    return True


def prepare_worker(argv: Sequence[str], environ: MutableMapping[str, str]) -> None:
    """The settings of this module for ``python -m mspecies ARGV`` (:func:`limit_blas_threads`,
    :func:`avoid_huge_pages_the_host_took_back`), made in ``environ`` before NumPy loads."""
    limit_blas_threads(argv, environ)
    avoid_huge_pages_the_host_took_back(argv, environ)
