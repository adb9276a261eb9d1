"""Memory planning for the sub-tomogram export: estimate bytes before any work, choose the batch size.

Every estimate is in bytes and counts the arrays the engine (:mod:`mspecies.core.reconstruct`) holds at
its peak: the preprocessed stack of one tilt series, the shared Fourier-insertion operator, and per particle
of a batch the extracted patches, their spectra, the per-sample values, the accumulated half volumes and the
inverse-FFT buffers.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from dataclasses import dataclass

import numpy as np

from mspecies.common.types import InputError

DEFAULT_BUDGET_FRACTION = 0.25
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


def available_memory_bytes() -> int:
    """Memory available to new allocations (``MemAvailable`` of /proc/meminfo, else physical memory)."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


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
    """

    fixed_bytes: int
    per_particle_bytes: int
    batch_size: int
    budget_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.fixed_bytes + self.batch_size * self.per_particle_bytes

    def describe(self) -> str:
        mib = 1024**2
        capped = (self.batch_size == useful_batch(self.per_particle_bytes)
                  < (self.budget_bytes - self.fixed_bytes) // self.per_particle_bytes)
        return (f"batch {self.batch_size} particles, {self.total_bytes / mib:.0f} MiB "
                f"(fixed {self.fixed_bytes / mib:.0f} MiB + {self.per_particle_bytes / mib:.1f} MiB/particle) "
                f"of a {self.budget_bytes / mib:.0f} MiB budget"
                + ("; larger batches would not be faster at this size" if capped else ""))


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


def plan_batches(padded_box_px: int, box_px: int, n_tilts: int, stack_pixels: int, *, shared_geometry: bool,
                 budget_bytes: int | None = None, max_batch: int = MAX_BATCH, padded_ctf: bool = True,
                 by_lines: bool = False, compiled_threads: int = 0) -> MemoryPlan:
    """Choose the largest batch (≤ ``max_batch``) that fits the budget, at most :data:`BATCH_WORK_BYTES` of
    per-particle arrays (but :data:`FULL_BATCH` particles), or raise :class:`InputError`.

    Parameters
    ----------
    budget_bytes
        Bytes the export may use; None = ``DEFAULT_BUDGET_FRACTION`` of the available memory.
    """
    budget = int(budget_bytes if budget_bytes is not None else DEFAULT_BUDGET_FRACTION * available_memory_bytes())
    fixed, per_particle = estimate_bytes(padded_box_px, box_px, n_tilts, stack_pixels,
                                         shared_geometry=shared_geometry, padded_ctf=padded_ctf, by_lines=by_lines,
                                         compiled_threads=compiled_threads)
    batch = min(max_batch, useful_batch(per_particle), (budget - fixed) // per_particle) if budget > fixed else 0
    if batch < 1:
        mib = 1024**2
        raise InputError(
            f"memory: one particle needs {(fixed + per_particle) / mib:.0f} MiB (fixed {fixed / mib:.0f} MiB for the "
            f"stack and insertion operator + {per_particle / mib:.0f} MiB per particle at padded box M = "
            f"{padded_box_px}, {n_tilts} tilts) but the budget is {budget / mib:.0f} MiB; raise the memory budget, "
            f"use a larger output pixel size or a smaller box")
    return MemoryPlan(fixed, per_particle, int(batch), budget)
