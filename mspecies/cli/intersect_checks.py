"""What ``intersect`` checks before its first byte is written: its parameters and the memory of dense solves.

M's assignment (``--mode m_compatible``, and any solve with an infinite tolerance or histogram radius) builds the
full old x new distance matrix of every tomogram; measured with ``tracemalloc`` on 1000-2000 particles per side it
peaks at 40 bytes per old-new pair (the matrix and its temporaries), and the gated dense solve at
``8 (n_old + n_new)² + 17 n_old n_new`` bytes (its square augmented matrix). Tomograms are solved one after the
other, so the largest one decides; it must fit the memory available on this machine, else the run is refused
with the number before any work.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from mspecies.cli.atomic import format_bytes
from mspecies.common.types import InputError
from mspecies.core.memory import memory_availability

M_COMPATIBLE_BYTES_PER_PAIR = 40
GATED_DENSE_BYTES_PER_PAIR = 17
GATED_DENSE_BYTES_PER_AUGMENTED_ENTRY = 8


def check_intersect_parameters(tolerance_angst: float, n_bins: int, histogram_radius_angst: float | None) -> None:
    """Refuse parameters that cannot work: a tolerance that is not finite and >= 0, fewer than 1 histogram bin,
    a histogram radius <= 0."""
    if not (math.isfinite(tolerance_angst) and tolerance_angst >= 0):
        raise InputError(f"--tolerance-angst: expected a finite distance >= 0 Å, got {tolerance_angst:g}")
    if n_bins < 1:
        raise InputError(f"--bins: expected at least 1 histogram bin, got {n_bins}")
    if histogram_radius_angst is not None and not histogram_radius_angst > 0:
        raise InputError(f"--histogram-radius-angst: expected a radius > 0 Å (or inf), got {histogram_radius_angst:g}")


def dense_solve_bytes(n_old: int, n_new: int, mode: str, radius_angst: float) -> int:
    """Peak bytes of one tomogram's dense solve, 0 when the solve is sparse (gated with a finite radius)."""
    if mode == "m_compatible":
        return M_COMPATIBLE_BYTES_PER_PAIR * n_old * n_new
    if math.isfinite(radius_angst):
        return 0
    return GATED_DENSE_BYTES_PER_AUGMENTED_ENTRY * (n_old + n_new) ** 2 + GATED_DENSE_BYTES_PER_PAIR * n_old * n_new


def check_dense_memory(old_groups: np.ndarray, new_groups: np.ndarray, mode: str, radius_angst: float,
                       available_bytes: int | None = None) -> None:
    """Refuse, with the number, a dense solve (match or histogram at ``radius_angst``) whose largest tomogram does
    not fit the memory available (default: :func:`~mspecies.core.memory.memory_availability`, the machine's
    MemAvailable or less where a memory cgroup limits this process)."""
    old_counts = pd.Series(np.asarray(old_groups, dtype=object).astype(str)).value_counts()
    new_counts = pd.Series(np.asarray(new_groups, dtype=object).astype(str)).value_counts()
    shared = old_counts.index.intersection(new_counts.index)
    if not len(shared):
        return
    needs = {name: dense_solve_bytes(int(old_counts[name]), int(new_counts[name]), mode, radius_angst)
             for name in shared}
    worst = max(needs, key=needs.get)
    if needs[worst] == 0:
        return
    availability = memory_availability() if available_bytes is None else None
    available = availability.bytes if availability is not None else int(available_bytes)
    source = f" ({availability.source})" if availability is not None else ""
    if needs[worst] > available:
        what = "M's dense assignment (--mode m_compatible)" if mode == "m_compatible" else (
            "the dense assignment of an infinite radius (--histogram-radius-angst inf)")
        raise InputError(
            f"memory: tomogram {worst} has {int(old_counts[worst])} old x {int(new_counts[worst])} new particles; "
            f"{what} needs about {format_bytes(needs[worst])} but {format_bytes(available)} are available to this "
            f"process{source}; use --mode gated with a finite --histogram-radius-angst (sparse: memory in proportion "
            "to the particles), or split the tomogram's particles")
