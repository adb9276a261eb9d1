"""Memory planning for the sub-tomogram export: estimate bytes before any work, choose the batch size.

Every estimate is in bytes and counts the arrays the engine (:mod:`mspecies.core.reconstruct`) holds at
its peak: the preprocessed stack of one tilt series, the shared Fourier-insertion operator, and per particle
of a batch the extracted patches, their spectra, the per-sample values, the accumulated half volumes and the
inverse-FFT buffers; before the batches, the work arrays of each thread that prepares the stack
(:func:`preparation_bytes`). The budget is bounded by what this process may allocate: the machine's available
memory, or less where a memory cgroup limits it (:func:`memory_availability`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from mspecies.common.types import InputError

from .cgroups import MEMBERSHIP, MOUNTINFO, cgroup_folders, read_cgroup_int, read_cgroup_stat

DEFAULT_BUDGET_FRACTION = 0.25
"""Of the machine's available memory, the export's budget when none is given: a workstation is shared."""
CGROUP_BUDGET_FRACTION = 0.75
"""Of what a memory cgroup leaves (a SLURM job's ``--mem``, a container), the most the default budget takes: that
memory was given to the job; the rest holds the interpreter and its libraries (about 0.2 GB), the page cache of
the files written (charged to the cgroup until written back) and what the plan does not count. At box 128 the plan
of 16 particles said 2.7 GiB and the command peaked at 1.85 GB, page cache included (``memory.max_usage_in_bytes``)."""
DEVICE_BUDGET_FRACTION = 0.75
"""Of the free memory of the GPU (CuPy), the most the default budget takes: every array of the plan lives on the
device, and the rest is left for cuFFT's plans and work areas, which the plan does not count."""
MAX_BATCH = 32
BATCH_WORK_BYTES = 5 * 1024**3 // 2
"""A batch stops growing once its per-particle arrays would pass 2.5 GiB, but keeps :data:`FULL_BATCH` particles
where the budget holds them. Large boxes gain nothing from larger batches, which only touch more new memory:
box 192 (416 MiB per particle), batches of 6 against 11, 48 particles, warm passes 6.4–6.8 s against 6.1–6.8 s,
first passes 8.0 s against 8.8–9.5 s, and the export command of 94 particles 16.6–16.8 s against 19.9–21.9 s
(4.5 s less system time) on a 2-core VM (``benchmarks/export/README.md``)."""
FULL_BATCH = 4
"""Particles a batch keeps whatever :data:`BATCH_WORK_BYTES` says: box 256 (915 MiB per particle), batches of 2
made warm passes 12 % slower than batches of 4."""
# Trilinear splatting touches 8 voxels per sample, plus a few mirrored ones on the x = 0 plane.
NONZEROS_PER_SAMPLE = 8.5
# The stack preparation (:func:`mspecies.core.extract.prepare_stack`) holds, on each of its threads, one tilt's
# work arrays beside the prepared stack: bytes per raw pixel of a tilt, and per thread. Peaks measured with
# ``tracemalloc`` (41 tilts, 2 threads; 1024² and 4096²): float32 4.25 B, float16 8.25. Binned, the tilt is
# transformed along x by blocks of rows (:func:`mspecies.core.extract._forward_by_rows`): what it holds is the kept
# columns of every row and the cropped spectrum, 8 B (complex64) per element of each, and its blocks (at most
# 2.1 MB, within the thread's bytes): 1024² to 256²..820² and 4096² to 512²..3276², one thread, float32 and float16.
PREPARATION_BYTES_PER_PIXEL = 4.5  # unbinned: the spectrum (complex64, half as wide)
PREPARATION_BINNED_BYTES_PER_KEPT = 8  # binned: per element of the kept columns (ny × (mx/2+1)) and of the crop
PREPARATION_CONVERTED_BYTES_PER_PIXEL = 4  # a stack not in float32: the thread's converted tilt
PREPARATION_THREAD_BYTES = 4 * 1024**2  # the transforms' blocks of rows (forward when binned, then inverse)
PREPARATION_MASK_BYTES_PER_PIXEL = 8  # once, per output pixel: building the band-pass mask (float64 radii)


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_TOP_PAD = 64 * 1024**2  # a thread arena's heap size: an emptied heap stays (glibc deletes it unless pad ≥ its size)
_MMAP_THRESHOLD_MAX = 32 * 1024**2  # the largest value glibc accepts on 64-bit systems
_TRIM_THRESHOLD = 1024**3


def retain_freed_memory() -> bool:
    """Ask glibc to serve allocations up to 32 MiB from the heap and to keep freed heap memory (process-wide).

    The export makes one new array per particle (its 3D CTF, its sub-tomogram) and frees it once written.
    By default glibc maps each such array afresh and returns it to the system when freed, so every page of the
    next one faults again (about 1 ms per 4 MiB here: half the cost of a box-128 3D CTF). Called by the export
    worker (``python -m mspecies export``), never on import. Returns False where this is not glibc.

    Three settings: the mmap threshold at its largest (32 MiB), a trim threshold of 1 GiB (the main heap keeps
    its freed top), and a top pad of 64 MiB. The pad matters for the pool and writer threads: their thread
    arenas grow by 64 MiB heaps, and glibc deletes a heap as soon as it is empty unless the pad covers it (the
    trim threshold is not consulted there). Without it the output normalisation's temporaries faulted afresh
    for every particle: 112 k page faults per warm pass of 96 particles at box 128, 0.7 s of system time, and
    the box-128 export command 1–4 s of system time more than with it (``benchmarks/export/README.md``).
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return (bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
            and bool(mallopt(_M_TOP_PAD, _TOP_PAD)))


@dataclass(frozen=True)
class Availability:
    """Memory this process may still allocate, and what limits it.

    Attributes
    ----------
    machine_bytes
        The machine's ``MemAvailable`` (else its physical memory).
    cgroup
        (bytes left, folder, limit) of the tightest memory cgroup of the process (:func:`cgroup_memory_left`), or
        None where none has a limit.
    """

    machine_bytes: int
    cgroup: tuple[int, str, int] | None = None

    @property
    def limited_by_cgroup(self) -> bool:
        return self.cgroup is not None and self.cgroup[0] < self.machine_bytes

    @property
    def bytes(self) -> int:
        """The least of the machine's and the cgroup's."""
        return self.cgroup[0] if self.limited_by_cgroup else self.machine_bytes  # type: ignore[index]

    @property
    def source(self) -> str:
        """Words for a log or an error message."""
        if not self.limited_by_cgroup:
            return "this machine's MemAvailable"
        _, folder, limit = self.cgroup  # type: ignore[misc]
        return f"what the memory cgroup {folder} leaves (its limit: {limit / 1e9:.2f} GB)"

    def default_budget(self) -> tuple[int, str]:
        """(bytes, how they were chosen) of the export's memory budget when none is given:
        :data:`DEFAULT_BUDGET_FRACTION` of the machine's available memory (a workstation is shared), but at most
        :data:`CGROUP_BUDGET_FRACTION` of what a memory cgroup leaves (memory given to the job)."""
        shared = int(DEFAULT_BUDGET_FRACTION * self.machine_bytes)
        if self.cgroup is not None and CGROUP_BUDGET_FRACTION * self.cgroup[0] < shared:
            _, folder, limit = self.cgroup
            return (int(CGROUP_BUDGET_FRACTION * self.cgroup[0]),
                    f"{CGROUP_BUDGET_FRACTION:.0%} of the {self.cgroup[0] / 1e9:.2f} GB the memory cgroup {folder} "
                    f"leaves; its limit: {limit / 1e9:.2f} GB")
        return shared, f"{DEFAULT_BUDGET_FRACTION:.0%} of this machine's {self.machine_bytes / 1e9:.2f} GB available"


def device_budget(free_bytes: int, host_budget: tuple[int, str]) -> tuple[int, str]:
    """(bytes, how they were chosen) of the default budget of an export on a GPU with ``free_bytes`` free: the
    host's default (``host_budget``: :meth:`Availability.default_budget`), but at most
    :data:`DEVICE_BUDGET_FRACTION` of the device's free memory."""
    device = int(DEVICE_BUDGET_FRACTION * free_bytes)
    if device >= host_budget[0]:
        return host_budget
    return device, f"{DEVICE_BUDGET_FRACTION:.0%} of the {free_bytes / 1e9:.2f} GB free on the GPU"


def memory_availability(meminfo: str = "/proc/meminfo", mountinfo: str = MOUNTINFO,
                        membership: str = MEMBERSHIP) -> Availability:
    """The machine's ``MemAvailable``, and what the tightest memory cgroup of this process leaves
    (:func:`cgroup_memory_left`): a SLURM job's ``--mem`` under ``task/cgroup``, a container's limit. A process
    that allocates past its cgroup's limit is killed by the kernel, with no message of its own."""
    return Availability(_machine_available_bytes(meminfo), cgroup_memory_left(mountinfo, membership))


def _machine_available_bytes(meminfo: str) -> int:
    try:
        with open(meminfo) as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


_NO_LIMIT = 2**60
"""A cgroup limit at or above this many bytes is no limit (cgroup v1 writes 2^63 rounded down to a page)."""
_CGROUP_FILES = {  # version: (limit files, usage file, the inactive page cache's key in memory.stat)
    1: (("memory.limit_in_bytes",), "memory.usage_in_bytes", "total_inactive_file"),
    2: (("memory.max", "memory.high"), "memory.current", "inactive_file"),
}


def cgroup_memory_left(mountinfo: str = MOUNTINFO, membership: str = MEMBERSHIP) -> tuple[int, str, int] | None:
    """(bytes left, cgroup folder, its limit) of the most constraining memory cgroup of this process, or None
    where no memory cgroup it belongs to (its own or an ancestor up to the mounted root) has a limit, or none is
    mounted and readable (:func:`mspecies.core.cgroups.cgroup_folders`).

    cgroup v1 (``memory`` controller: ``memory.limit_in_bytes``) is used where it is mounted, else v2
    (``memory.max``, and ``memory.high``, past which the kernel throttles the process). What a cgroup leaves is
    its limit less its usage, the inactive page cache not counted (the kernel reclaims that before it kills)."""
    found = cgroup_folders("memory", mountinfo, membership)
    if found is None:
        return None
    version, folders = found
    limit_files, usage_file, inactive_key = _CGROUP_FILES[version]
    tightest: tuple[int, str, int] | None = None
    for folder in folders:
        limit = min((read_cgroup_int(os.path.join(folder, name)) for name in limit_files), default=None,
                    key=lambda value: _NO_LIMIT if value is None else value)
        usage = read_cgroup_int(os.path.join(folder, usage_file))
        if limit is not None and limit < _NO_LIMIT and usage is not None:
            inactive = read_cgroup_stat(os.path.join(folder, "memory.stat"), inactive_key)
            left = max(0, limit - max(0, usage - inactive))
            if tightest is None or left < tightest[0]:
                tightest = (left, folder, limit)
    return tightest


def disc_sample_count(padded_box_px: int) -> int:
    """Number of 2D half-plane Fourier samples strictly inside radius M/2 (about π M² / 8)."""
    half = padded_box_px // 2
    ky = np.arange(-half, half)[:, None]
    kx = np.arange(0, half + 1)[None, :]
    inside = (kx * kx + ky * ky < half * half) & ~((kx == 0) & (ky < 0))
    return int(inside.sum())


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes needed and the batch size chosen for one tilt series.

    Attributes
    ----------
    fixed_bytes
        Independent of the batch: preprocessed stack, insertion operator, frequency tables.
    per_particle_bytes
        Added by each particle of a batch.
    batch_size
        Particles reconstructed together.
    budget_bytes
        The budget the plan had to fit.
    budget_source
        Where the budget came from, for the log (empty: given by the caller).
    preparation_bytes
        Held beside the fixed bytes while the stack is prepared, before any batch (:func:`preparation_bytes`).
    preparation_threads
        Threads that prepare the stack: as many as asked, or fewer where their work arrays would not fit.
        Without a preparation to plan: as many as asked.
    """

    fixed_bytes: int
    per_particle_bytes: int
    batch_size: int
    budget_bytes: int
    budget_source: str = ""
    preparation_bytes: int = 0
    preparation_threads: int = 1

    @property
    def total_bytes(self) -> int:
        """At the batches' peak (the preparation's work arrays are freed by then: :attr:`peak_bytes`)."""
        return self.fixed_bytes + self.batch_size * self.per_particle_bytes

    @property
    def peak_bytes(self) -> int:
        """The larger of the batches' peak and the stack preparation's."""
        return max(self.total_bytes, self.fixed_bytes + self.preparation_bytes)

    def describe(self) -> str:
        mib = 1024**2
        capped = (self.batch_size == useful_batch(self.per_particle_bytes)
                  < (self.budget_bytes - self.fixed_bytes) // self.per_particle_bytes)
        return (f"batch {self.batch_size} particles, {self.total_bytes / mib:.0f} MiB "
                f"(fixed {self.fixed_bytes / mib:.0f} MiB + {self.per_particle_bytes / mib:.1f} MiB/particle) "
                f"of a {self.budget_bytes / mib:.0f} MiB budget"
                + (f" ({self.budget_source})" if self.budget_source else "")
                + ("; larger batches would not be faster at this size" if capped else "")
                + (f"; preparing the stack: +{self.preparation_bytes / mib:.0f} MiB on {self.preparation_threads} "
                   f"thread(s)" if self.preparation_bytes else ""))


def useful_batch(per_particle_bytes: int) -> int:
    """The largest batch worth its memory: :data:`BATCH_WORK_BYTES` of per-particle arrays, but at least
    :data:`FULL_BATCH` particles."""
    return max(FULL_BATCH, BATCH_WORK_BYTES // per_particle_bytes)


def estimate_bytes(padded_box_px: int, box_px: int, n_tilts: int, stack_pixels: int, *,
                   shared_geometry: bool, padded_ctf: bool = True, by_lines: bool = False,
                   compiled_threads: int = 0) -> tuple[int, int]:
    """Fixed and per-particle bytes of the volume export.

    Parameters
    ----------
    padded_box_px
        M, the aliasing-free padded box.
    box_px
        N, the output box.
    n_tilts
        Tilts inserted per particle.
    stack_pixels
        Pixels of the preprocessed (rescaled) stack, all tilts.
    shared_geometry
        True when all particles share the insertion operator (not pre-rotated): it is built once
        (fixed cost); otherwise each particle builds its own (per-particle cost).
    padded_ctf
        True for M's padded 3D CTF (a real M³ half spectrum and its transforms per particle); False for the
        direct one (:mod:`mspecies.core.ctf3d`: slot tables of about 2 voxel layers per tilt slice).
    by_lines
        True when the sub-tomograms are inserted and transformed line by line (NumPy, direct 3D CTF, shared
        geometry; ``TiltSeriesEngine.by_lines``): no whole padded spectrum, only its N central z planes
        after the first transform, and a few (M, M//2+1) lines per thread. The planes take over the storage of
        the complex samples, which this still counts apart: a margin of 8 bytes per sample (8 % of the per-particle
        bytes at box 64, 6 % at 128, 4 % at 192), left so that the batch sizes stay those that were measured.
    compiled_threads
        Without shared geometry on NumPy: the threads that insert one particle each with the compiled kernels
        (:mod:`mspecies.core.kernels`), each keeping a compact accumulator of the padded half ball and, with the
        direct 3D CTF, the particle's own padded spectrum, its inverse transforms and the 3D-CTF sums
        (``TiltSeriesEngine.own_volumes``): per thread, not per particle, and no splat entries. 0: the
        splat entries of every particle of a batch are built (CuPy).
    """
    m, n = padded_box_px, box_px
    half_voxels = m * m * (m // 2 + 1)
    samples = n_tilts * disc_sample_count(m)
    nonzeros = int(samples * NONZEROS_PER_SAMPLE)
    operator = nonzeros * (4 + 4) * 2 + half_voxels * 4 * 3  # CSR blocks + building copy; multiplicity, scale
    fixed = (stack_pixels * 4 + samples * 8 * 4
             + n_tilts * m * (m // 2 + 1) * 8)  # one particle's patch spectra at a time
    per_particle = (n_tilts * m * m * 4       # real patches (reused buffer)
                    + samples * (8 + 8 + 4 + 4 + 16)  # samples, phases, C_u, C_u C_w, insertion columns (4 floats)
                    + half_voxels * (8 + 4)   # normalised complex spectrum and real CTF spectrum (reused buffers)
                    + half_voxels * 4         # CTF pair separation and partial inverse FFTs (≤ half a complex volume)
                    + n * n * m * 4           # last inverse-FFT pass before the crop
                    + n ** 3 * 4 * 6)         # crops, point-spread function, its transform, outputs
    # direct 3D CTF: a slice covers about 2 voxel layers of its half disc; 7 float32 tables + 4 work arrays per slot
    slots = int(2.2 * n_tilts * np.pi * n * n / 8)
    direct_tables = slots * 4 * 7 + n * n * (n // 2 + 1) * 4 * 4
    if not padded_ctf:
        per_particle -= samples * 8 + half_voxels * 4  # no C_u C_w, one insertion column fewer, no CTF spectrum
        per_particle += n * n * (n // 2 + 1) * 4 * 2 + slots * 4 * 4  # its output, the per-thread work arrays
        fixed += direct_tables
    if by_lines:
        per_particle += (n * m * (m // 2 + 1) * 8  # the N central z planes after the transform along z
                         + m * (m // 2 + 1) * 8 * 4  # lines of two threads (spectrum, transform)
                         - half_voxels * (8 + 4) - n * n * m * 4)  # no whole spectra, no whole C2R output
    if shared_geometry:
        fixed += operator
    elif compiled_threads:
        ball_voxels = int(np.pi / 12 * m ** 3) + m * m  # the half ball |k| < M/2 (and a margin)
        per_thread = ball_voxels * 4 * (5 if padded_ctf else 4)
        if not padded_ctf:  # own volumes: one spectrum and its transforms per thread instead of per particle
            whole = half_voxels * (8 + 4) + n * n * m * 4
            per_particle -= whole
            # and the 3D-CTF sums, its pairs (voxel, tilt, 4 terms) and their vectorised values
            per_thread += whole + n * n * (n // 2 + 1) * 8 * 3 + int(1.1 * slots) * (8 * 2 + 4 * 4 + 4 * 6)
        fixed += compiled_threads * per_thread
    else:
        per_particle += nonzeros * (8 + 4 + 4 + 8 * 3)  # indices, weights, signs, gathered values (float64)
        per_particle += 0 if padded_ctf else direct_tables + slots * 8 * 6  # its own coverage (float64 pairs)
    return int(fixed), int(per_particle)


def preparation_bytes(raw_shape_yx: tuple[int, int], output_shape_yx: tuple[int, int], *,
                      converted: bool) -> tuple[int, int]:
    """(bytes per thread, bytes once) that preparing a stack of ``raw_shape_yx`` tilts at ``output_shape_yx``
    holds beside the prepared stack (:data:`PREPARATION_BYTES_PER_PIXEL` and the constants after it);
    ``converted``: the stack is not native float32 (float16, integers, big-endian)."""
    (ny, nx), (my, mx) = (tuple(int(n) for n in shape) for shape in (raw_shape_yx, output_shape_yx))
    converted_bytes = PREPARATION_CONVERTED_BYTES_PER_PIXEL * ny * nx if converted else 0
    if (my, mx) == (ny, nx):
        work = PREPARATION_BYTES_PER_PIXEL * ny * nx
    else:
        work = PREPARATION_BINNED_BYTES_PER_KEPT * (ny + my) * (mx // 2 + 1)
    once = PREPARATION_MASK_BYTES_PER_PIXEL * my * mx
    return int(work + converted_bytes) + PREPARATION_THREAD_BYTES, once


def _shortfall_mib(needed_bytes: int, budget_bytes: int) -> tuple[str, str, Callable[[int], str]]:
    """``needed_bytes`` (more than ``budget_bytes``) and ``budget_bytes`` in MiB with the fewest decimals (0–2) at
    which the need reads as more than the budget (8.8 and 8.6 MiB, not 9 and 9), else with 3 decimals, the need
    rounded up and the budget down; and the formatter of the message's other amounts at those decimals."""
    def in_mib(n_bytes: int, decimals: int) -> str:
        return f"{n_bytes / 1024**2:.{decimals}f}"

    for decimals in range(3):
        if float(in_mib(needed_bytes, decimals)) > float(in_mib(budget_bytes, decimals)):
            return in_mib(needed_bytes, decimals), in_mib(budget_bytes, decimals), functools.partial(
                in_mib, decimals=decimals)
    scaled = 1000 / 1024**2
    return (f"{math.ceil(needed_bytes * scaled) / 1000:.3f}", f"{math.floor(budget_bytes * scaled) / 1000:.3f}",
            functools.partial(in_mib, decimals=3))


def _gb_at_least(n_bytes: int) -> str:
    """``n_bytes`` in GB (10⁹ B, the unit of ``--memory-gb``) rounded up to 2 significant digits: a budget that
    holds them."""
    exponent = max(-9, math.floor(math.log10(max(1, n_bytes) / 1e9)) - 1)  # of 10 in GB, of the last digit
    units = -(-n_bytes // 10 ** (9 + exponent))  # whole steps of 10^exponent GB, rounded up (integers: exact)
    return f"{units * 10.0**exponent:.{max(0, -exponent)}f}"


def plan_batches(padded_box_px: int, box_px: int, n_tilts: int, stack_pixels: int, *, shared_geometry: bool,
                 budget_bytes: int | None = None, max_batch: int = MAX_BATCH, padded_ctf: bool = True,
                 by_lines: bool = False, compiled_threads: int = 0,
                 preparation: tuple[int, int] | None = None, threads: int = 1,
                 budget_source: str = "") -> MemoryPlan:
    """Choose the largest batch (≤ ``max_batch``) that fits the budget, at most :data:`BATCH_WORK_BYTES` of
    per-particle arrays (but :data:`FULL_BATCH` particles), or raise :class:`InputError`.

    Parameters
    ----------
    budget_bytes
        Bytes the export may use; None: :meth:`Availability.default_budget` (a quarter of the machine's available
        memory, at most three quarters of what a memory cgroup leaves).
    budget_source
        With ``budget_bytes``: where it came from, for the log (e.g. :func:`device_budget`).
    preparation
        (bytes per thread, bytes once) of the stack preparation (:func:`preparation_bytes`; None: the stack is not
        prepared here). It runs before the batches, on ``threads`` threads, or on fewer where their work arrays
        and the fixed bytes would not fit the budget.
    """
    source = budget_source
    if budget_bytes is None:
        budget_bytes, source = memory_availability().default_budget()
    budget = int(budget_bytes)
    fixed, per_particle = estimate_bytes(padded_box_px, box_px, n_tilts, stack_pixels,
                                         shared_geometry=shared_geometry, padded_ctf=padded_ctf, by_lines=by_lines,
                                         compiled_threads=compiled_threads)
    batch = min(max_batch, useful_batch(per_particle), (budget - fixed) // per_particle) if budget > fixed else 0
    # the least budget that plans: the preparation runs before the batches, on one thread at least
    least = fixed + max(per_particle, 0 if preparation is None else sum(preparation))
    if batch < 1:
        need, have, mib = _shortfall_mib(fixed + per_particle, budget)
        raise InputError(
            f"memory: one particle needs {need} MiB (fixed {mib(fixed)} MiB for the stack and insertion operator + "
            f"{mib(per_particle)} MiB per particle at padded box M = {padded_box_px}, {n_tilts} tilts) but the "
            f"budget is {have} MiB" + (f" ({source})" if source else "")
            + f"; raise the memory budget to at least {_gb_at_least(least)} GB"
            + (" (preparing the stack needs more than one particle)" if least > fixed + per_particle else "")
            + ", use a larger output pixel size or a smaller box")
    prepared_on, prepared_bytes = max(1, int(threads)), 0
    if preparation is not None:
        per_thread, once = preparation
        room = budget - fixed - once
        prepared_on = min(max(1, int(threads)), room // per_thread) if room > 0 else 0
        if prepared_on < 1:
            need, have, mib = _shortfall_mib(fixed + once + per_thread, budget)
            raise InputError(
                f"memory: preparing the stack needs {need} MiB (fixed {mib(fixed)} MiB + {mib(once + per_thread)} "
                f"MiB of work arrays for one tilt image) but the budget is {have} MiB"
                + (f" ({source})" if source else "")
                + f"; raise the memory budget to at least {_gb_at_least(least)} GB or use a "
                "larger output pixel size")
        prepared_bytes = once + prepared_on * per_thread
    return MemoryPlan(fixed, per_particle, int(batch), budget, source, prepared_bytes, int(prepared_on))
