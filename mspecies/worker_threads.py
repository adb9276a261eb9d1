"""Thread settings of the ``python -m mspecies`` workers, made before NumPy loads (standard library only: this
module is imported first by :mod:`mspecies.__main__`)."""

from __future__ import annotations

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
