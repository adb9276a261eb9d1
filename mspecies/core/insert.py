"""Fourier insertion of 2D tilt-image spectra into a 3D half spectrum (trilinear splatting, M/Warp §5.6).

Frames and layouts
------------------
* 2D samples: the ``rfft2`` half plane of an M × M patch, frequency index (kx, ky) with kx = 0..M/2 and ky
  signed; only samples strictly inside radius M/2 are used, and the kx = 0, ky < 0 half line is skipped
  (those are the Friedel mates of the ky > 0 samples).
* 3D volume: the numpy ``rfftn`` layout of an M³ volume, shape (M, M, M//2+1) indexed ``[z, y, x]`` with
  signed z, y indices stored modulo M.
* A sample (kx, ky) goes to the 3D frequency ``G @ (kx, ky)`` where G (3 × 2) is the per-tilt slice
  orientation (see :func:`slice_orientation`). Samples landing at x < 0 are inserted at ``−k`` with the
  conjugate value; a neighbour voxel on the x = 0 plane is also added at its mirror ``(−z, −y)``,
  conjugated (except the DC voxel), which keeps that plane Hermitian.

Accumulated quantities are linear in the sample values, so the insertion is a sparse matrix. When all
particles of a tilt series share it (not pre-rotated) it is built once, split into row blocks, and each block
is applied to the whole batch in one sparse × dense product (:class:`SharedInsertion`; on NumPy built by
:mod:`mspecies.core.shared_insertion`, the same matrix as :meth:`SharedInsertion.from_splat`); otherwise each
particle is splatted with ``bincount``.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from types import ModuleType

import numpy as np

from .geometry import inverse_2x2, tilt_rotation

_FLOOR_EPSILON = 1e-5


class WorkerPool(ThreadPoolExecutor):
    """A thread pool that knows its thread count (``threads``)."""

    def __init__(self, threads: int) -> None:
        super().__init__(threads, thread_name_prefix="mspecies-export")
        self.threads = threads


_POOLS: dict[tuple[int, int], WorkerPool] = {}  # by (process id, threads): a forked child gets its own


def thread_pool(threads: int) -> WorkerPool | None:
    """A process-wide pool of ``threads`` threads (None for 1): SciPy's sparse products, pocketfft and NumPy's
    large elementwise operations release the GIL, so the batch steps that are single-threaded in those
    libraries run on all cores when split into runs (:func:`run_split`)."""
    if threads <= 1:
        return None
    key = (os.getpid(), threads)
    pool = _POOLS.get(key)
    if pool is None:
        pool = _POOLS[key] = WorkerPool(threads)
    return pool


def run_split(pool: WorkerPool | None, work: Callable[[int, int], None], size: int,
              cuts: Sequence[int] | None = None) -> None:
    """Run ``work(start, end)`` over [0, size) split into one contiguous range per pool thread (``cuts``: the
    inner boundaries, default even); serially without a pool. ``work`` must not use the pool itself.
    Exceptions propagate once every range has finished."""
    if pool is None or size < 2:
        work(0, size)
        return
    parts = pool.threads
    edges = [0, *(cuts if cuts is not None else [size * i // parts for i in range(1, parts)]), size]
    futures = [pool.submit(work, a, b) for a, b in zip(edges[:-1], edges[1:]) if b > a]
    wait(futures)  # all of them, even when one fails: they write into shared buffers
    for future in futures:
        future.result()


def run_each(pool: WorkerPool | None, work: Callable[[int], None], size: int) -> None:
    """Run ``work(i)`` for i in [0, size), each pool thread taking the next i when it is free (serially without
    a pool): for items of unequal cost (a pre-rotated particle's own splat varies with its orientation), where
    :func:`run_split`'s even ranges would leave one thread waiting, and for items read in order (the tilts of a
    stack: the threads read neighbouring tilts, one stream through the file). After a failure no item is handed out;
    once all threads have stopped, the error of the lowest failing item is raised, as the serial loop would (every
    lower item was handed out before it)."""
    if pool is None or size < 2:
        for i in range(size):
            work(i)
        return
    counter = itertools.count()  # next() on it is atomic under the GIL
    errors: dict[int, BaseException] = {}

    def take() -> None:
        for i in iter(counter.__next__, None):
            if i >= size or errors:
                return
            try:
                work(i)
            except BaseException as error:
                errors[i] = error
                return

    futures = [pool.submit(take) for _ in range(min(pool.threads, size))]
    wait(futures)
    if errors:
        raise errors[min(errors)]


@dataclass(frozen=True)
class SampleGrid:
    """The 2D Fourier samples of an M × M patch used for insertion.

    Attributes
    ----------
    padded_box_px
        M.
    kx, ky
        (S,) signed frequency indices (cycles per M pixels).
    flat_index
        (S,) index into the flattened (M, M//2+1) ``rfft2`` array.
    """

    padded_box_px: int
    kx: np.ndarray
    ky: np.ndarray
    flat_index: np.ndarray

    @property
    def n_samples(self) -> int:
        return int(self.kx.shape[0])


def make_sample_grid(padded_box_px: int) -> SampleGrid:
    """Half-plane samples strictly inside radius M/2, without the kx = 0, ky < 0 half line."""
    m = padded_box_px
    half = m // 2
    ky = np.fft.fftfreq(m, 1.0 / m).astype(np.int64)[:, None]
    kx = np.arange(half + 1, dtype=np.int64)[None, :]
    keep = (kx * kx + ky * ky < half * half) & ~((kx == 0) & (ky < 0))
    rows, cols = np.nonzero(keep)
    return SampleGrid(m, kx[0, cols].astype(np.float64), ky[rows, 0].astype(np.float64),
                      (rows * (half + 1) + cols).astype(np.int64))


def slice_orientation(tilt_angles_deg: np.ndarray, xf: np.ndarray,
                      particle_matrices: np.ndarray | None = None) -> np.ndarray:
    """Per-tilt 3 × 2 matrices G mapping a raw-image frequency (kx, ky) to the 3D frequency (x, y, z).

    A raw tilt image relates to the tomogram by ``raw = A⁻¹ (R_θ[:2] r) + const`` (``A`` = ``.xf`` 2 × 2 part,
    ``R_θ`` = :func:`~mspecies.core.geometry.tilt_rotation`). By the projection-slice theorem its spectrum at
    raw frequency k is the 3D spectrum at ``R_θ[:2]ᵀ A⁻ᵀ k``. For a pre-rotated sub-tomogram
    ``g(v) = f(c + P v)`` (``P`` = the particle's RELION matrix) the frequency becomes ``Pᵀ R_θ[:2]ᵀ A⁻ᵀ k``.

    Parameters
    ----------
    tilt_angles_deg
        (T,) tilt angles.
    xf
        (T, 2, 3) IMOD ``.xf`` transforms (only the 2 × 2 part matters).
    particle_matrices
        Optional (B, 3, 3) RELION matrices for pre-rotation.

    Returns
    -------
    (T, 3, 2) or, with particle matrices, (B, T, 3, 2) float64.
    """
    beam = tilt_rotation(tilt_angles_deg)[:, :2, :]  # (T, 2, 3)
    inverse_transposed = np.transpose(inverse_2x2(np.asarray(xf, dtype=np.float64)[:, :, :2]), (0, 2, 1))
    orientation = np.einsum("tji,tjk->tik", beam, inverse_transposed)  # R2ᵀ A⁻ᵀ: (T, 3, 2)
    if particle_matrices is None:
        return orientation
    return np.einsum("bji,tjk->btik", np.asarray(particle_matrices, dtype=np.float64), orientation)


@dataclass(frozen=True)
class Splat:
    """Trilinear splatting entries of all samples of all tilts: sample ``cols`` adds ``weights`` × value
    (conjugated where ``conj_sign`` is −1) to voxel ``rows`` of the flattened half volume. ``mirror`` marks
    the entries added at the Friedel mate (−z, −y, 0) of an x = 0 voxel."""

    rows: np.ndarray
    cols: np.ndarray
    weights: np.ndarray
    conj_sign: np.ndarray
    mirror: np.ndarray
    n_voxels: int
    n_columns: int


def splat_entries(orientation: np.ndarray, grid: SampleGrid, *, xp: ModuleType = np) -> Splat:
    """Trilinear splatting entries for (T, 3, 2) slice orientations.

    Columns are ``t · S + s`` (tilt-major, S = ``grid.n_samples``). Entries of zero weight and voxels at
    or beyond radius M/2 (removed by the reconstruction mask anyway) are dropped.
    """
    m = grid.padded_box_px
    half = m // 2
    width = half + 1
    n_tilts = orientation.shape[0]
    k2 = xp.stack([xp.asarray(grid.kx), xp.asarray(grid.ky)])  # (2, S)
    position = xp.einsum("tij,js->tsi", xp.asarray(orientation), k2).reshape(-1, 3)  # (T·S, 3) in (x, y, z)
    flip = position[:, 0] < 0
    position = xp.where(flip[:, None], -position, position)
    sign = xp.where(flip, -1.0, 1.0)
    base = xp.floor(position + _FLOOR_EPSILON)
    fraction = position - base
    base = base.astype(xp.int64)
    columns = xp.arange(n_tilts * grid.n_samples, dtype=xp.int64)
    rows, cols, weights, signs, mirrors = [], [], [], [], []
    for dz in (0, 1):
        for dy in (0, 1):
            for dx in (0, 1):
                weight = ((fraction[:, 0] if dx else 1 - fraction[:, 0])
                          * (fraction[:, 1] if dy else 1 - fraction[:, 1])
                          * (fraction[:, 2] if dz else 1 - fraction[:, 2]))
                x, y, z = base[:, 0] + dx, base[:, 1] + dy, base[:, 2] + dz
                keep = (weight > 0) & (x * x + y * y + z * z < half * half)
                x, y, z, w, c, s = x[keep], y[keep], z[keep], weight[keep], columns[keep], sign[keep]
                rows.append(((z % m) * m + (y % m)) * width + x)
                cols.append(c)
                weights.append(w)
                signs.append(s)
                mirrors.append(xp.zeros(c.shape, dtype=bool))
                mirror = (x == 0) & ((y != 0) | (z != 0))
                rows.append(((-z[mirror] % m) * m + (-y[mirror] % m)) * width)
                cols.append(c[mirror])
                weights.append(w[mirror])
                signs.append(-s[mirror])
                mirrors.append(xp.ones(c[mirror].shape, dtype=bool))
    return Splat(xp.concatenate(rows), xp.concatenate(cols), xp.concatenate(weights).astype(xp.float32),
                 xp.concatenate(signs).astype(xp.float32), xp.concatenate(mirrors), m * m * width,
                 n_tilts * grid.n_samples)


def _sparse_module(xp: ModuleType) -> ModuleType:
    if xp is np:
        import scipy.sparse

        return scipy.sparse
    import cupyx.scipy.sparse

    return cupyx.scipy.sparse


# Row-block height of the shared insertion: a block's accumulators (rows × 4 quantities × batch, float32) stay
# in the CPU cache while they are normalised (2 MiB at a batch of 16).
BLOCK_ROWS = 8192


@dataclass(frozen=True)
class SharedInsertion:
    """The insertion shared by every particle of a tilt series (not pre-rotated), ready for batches.

    The direct entries form CSR row blocks of ``BLOCK_ROWS`` voxels with plain trilinear weights; the
    conjugation of a sample inserted at −k is a per-column sign (``column_sign``), applied to the imaginary
    parts of the sample values. The Friedel-mate entries on the x = 0 plane form one small CSR matrix over
    the voxels ``mirror_rows`` (their conjugation negates the imaginary part once more).

    Attributes
    ----------
    blocks
        CSR matrices (rows of one block × C columns, C = T · S samples).
    bounds
        (first, end) voxel of each block.
    mirror
        CSR (n_mirror × C) Friedel-mate entries.
    mirror_rows
        (n_mirror,) voxel of each mirror row (unique).
    mirror_by_block
        Per block, the indices of the mirror rows inside it.
    mirror_local
        Per block, the positions of those mirror rows among the block's rows.
    column_sign
        (C,) float32 ±1: −1 where the sample is inserted at −k.
    multiplicity
        (n_voxels,) float32 Σ of the trilinear weights W0.
    block_voxels
        None: block i holds every voxel of ``bounds[i]``; else per block the voxels it holds (the voxels of its
        bounds that any sample reaches, the others being 0 after normalisation).
    """

    blocks: list[object]
    bounds: list[tuple[int, int]]
    mirror: object
    mirror_rows: np.ndarray
    mirror_by_block: list[np.ndarray]
    mirror_local: list[np.ndarray]
    column_sign: np.ndarray
    multiplicity: np.ndarray
    n_voxels: int
    block_voxels: list[np.ndarray] | None = None

    @classmethod
    def from_splat(cls, splat: Splat, *, xp: ModuleType = np, block_rows: int = BLOCK_ROWS,
                   y_major_box_px: int | None = None) -> SharedInsertion:
        """Blocks of ``block_rows`` voxels of the (M, M, M//2+1) ``[z, y, x]`` half layout; with
        ``y_major_box_px`` = M, of the ``[y, z, x]`` layout instead, one block per y (``block_rows`` ignored), so
        that a block holds whole lines along z (for :func:`normalise_block` followed by a transform along z),
        and only the voxels that samples reach (``block_voxels``)."""
        sparse = _sparse_module(xp)
        if y_major_box_px is not None:
            m = y_major_box_px
            width = m // 2 + 1
            block_rows = m * width
            rows = splat.rows  # ((z · M) + y) · W + x  →  ((y · M) + z) · W + x
            splat = Splat((((rows // width) % m) * m + rows // block_rows) * width + rows % width, splat.cols,
                          splat.weights, splat.conj_sign, splat.mirror, splat.n_voxels, splat.n_columns)
        direct = ~splat.mirror
        matrix = sparse.csr_matrix((splat.weights[direct], (splat.rows[direct], splat.cols[direct])),
                                   shape=(splat.n_voxels, splat.n_columns))
        matrix.sum_duplicates()
        bounds = [(start, min(start + block_rows, splat.n_voxels)) for start in range(0, splat.n_voxels, block_rows)]
        multiplicity = xp.bincount(splat.rows, weights=splat.weights, minlength=splat.n_voxels).astype(xp.float32)
        block_voxels = None
        if y_major_box_px is not None:
            block_voxels = [start + xp.flatnonzero(multiplicity[start:end] > 0) for start, end in bounds]
            blocks = [matrix[voxels] for voxels in block_voxels]
        else:
            blocks = [matrix[start:end] for start, end in bounds]
        column_sign = xp.ones(splat.n_columns, dtype=xp.float32)
        column_sign[splat.cols[direct]] = splat.conj_sign[direct]
        mirror = friedel_mates(splat.rows[splat.mirror], splat.cols[splat.mirror], splat.weights[splat.mirror],
                                splat.n_columns, bounds, block_voxels, xp)
        return cls(blocks, bounds, *mirror, column_sign, multiplicity, splat.n_voxels, block_voxels)


def friedel_mates(voxels: np.ndarray, columns: np.ndarray, weights: np.ndarray, n_columns: int,
                   bounds: list[tuple[int, int]], block_voxels: list[np.ndarray] | None, xp: ModuleType
                   ) -> tuple[object, np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """The Friedel-mate part of a :class:`SharedInsertion` from its entries (voxel, column, weight): the CSR
    matrix over the distinct voxels, those voxels, and per block the mates inside it and their rows there."""
    mirror_rows, local = xp.unique(voxels, return_inverse=True)
    mirror = _sparse_module(xp).csr_matrix((weights, (local, columns)), shape=(int(mirror_rows.size), n_columns))
    mirror.sum_duplicates()
    by_block = [xp.flatnonzero((mirror_rows >= start) & (mirror_rows < end)) for start, end in bounds]
    if block_voxels is None:
        mirror_local = [mirror_rows[inside] - start for inside, (start, _) in zip(by_block, bounds)]
    else:  # every mirror voxel is reached (its weight counts in the multiplicity)
        mirror_local = [xp.searchsorted(reached, mirror_rows[inside]) for inside, reached in zip(by_block,
                                                                                               block_voxels)]
    return mirror, mirror_rows, by_block, mirror_local


def sample_columns(data: np.ndarray | None, weight: np.ndarray, ctf: np.ndarray | None,
                   column_sign: np.ndarray | None, *, xp: ModuleType = np, out: np.ndarray | None = None,
                   pool: WorkerPool | None = None) -> np.ndarray:
    """Sample values of a batch as the dense right-hand side of the insertion.

    Parameters
    ----------
    data
        (B, C) complex64 image samples × C_w, or None (3D CTF only).
    weight
        (B, C) float32 |C_u|.
    ctf
        (B, C) float32 C_u · C_w, or None (the 3D CTF is not made on the padded grid).
    column_sign
        (C,) conjugation sign applied to the imaginary parts (None: +1).
    out
        Optional (C, Q · B) float32 buffer to fill.
    pool
        Optional thread pool: the transposition is split into column ranges.

    Returns
    -------
    (C, Q · B) float32: [Re D₀, Im D₀, Re D₁, Im D₁, …] (2B, the complex64 layout; absent without data), then
    W1 (B), then D2 (B; absent without ``ctf``).
    """
    batch, n_columns = weight.shape
    n_data = 0 if data is None else 2 * batch
    shape = (n_columns, n_data + batch * (1 if ctf is None else 2))
    columns = out if out is not None and out.shape == shape else xp.empty(shape, dtype=xp.float32)

    def fill(start: int, end: int) -> None:
        part = columns[start:end]
        if data is not None:
            complex_view = part[:, :n_data].view(xp.complex64)
            complex_view[...] = data[:, start:end].T
            if column_sign is not None:
                complex_view.imag *= column_sign[start:end, None]
        part[:, n_data:n_data + batch] = weight[:, start:end].T
        if ctf is not None:
            part[:, n_data + batch:] = ctf[:, start:end].T

    run_split(pool if xp is np else None, fill, n_columns)
    return columns


def block_cuts(insertion: SharedInsertion, pool: WorkerPool | None) -> list[int] | None:
    """Inner boundaries that share the row blocks out over the pool's threads in contiguous runs of about
    equal work (non-zeros + rows); None without a pool."""
    if pool is None:
        return None
    work = np.cumsum([block.nnz + (end - start) for block, (start, end) in zip(insertion.blocks, insertion.bounds)])
    return [int(np.searchsorted(work, work[-1] * i / pool.threads)) for i in range(1, pool.threads)]


def mirrored_columns(insertion: SharedInsertion, columns: np.ndarray, n_data: int) -> np.ndarray:
    """(n_mirror, Q · B) Friedel-mate accumulators of the x = 0 plane (data conjugated: its ``n_data`` first
    columns are [Re, Im] pairs)."""
    mirrored = insertion.mirror @ columns
    mirrored[:, 1:n_data:2] *= -1  # conjugated at the Friedel mate
    return mirrored


def normalise_block(insertion: SharedInsertion, i: int, columns: np.ndarray, mirrored: np.ndarray,
                    scale: np.ndarray, floor: float, *, batch: int, n_data: int, xp: ModuleType = np,
                    spectrum: np.ndarray | None = None, ctf_spectrum: np.ndarray | None = None) -> None:
    """Insert a batch through row block ``i`` and normalise it while it is in cache: ``spectrum`` (rows, B)
    complex64 gets ``D · scale / max(W1, floor)``, ``ctf_spectrum`` (rows, B) float32 ``D2 · scale / max(W1,
    floor)`` (either may be None), rows = the block's voxels. ``columns`` from :func:`sample_columns`
    (``n_data`` = 2B with data, else 0), ``mirrored`` from :func:`mirrored_columns`."""
    block, inside = insertion.blocks[i], insertion.mirror_by_block[i]
    accumulated = block @ columns
    if inside.size:
        accumulated[insertion.mirror_local[i]] += mirrored[inside]
    start, end = insertion.bounds[i]
    voxel_scale = scale[start:end] if insertion.block_voxels is None else scale[insertion.block_voxels[i]]
    factor = xp.maximum(accumulated[:, n_data:n_data + batch], xp.float32(floor))
    xp.divide(voxel_scale[:, None], factor, out=factor)
    if ctf_spectrum is not None:
        xp.multiply(accumulated[:, n_data + batch:], factor, out=ctf_spectrum)
    if spectrum is not None:
        xp.multiply(accumulated[:, :n_data].view(xp.complex64), factor, out=spectrum)


def insert_normalised(insertion: SharedInsertion, columns: np.ndarray, scale: np.ndarray, floor: float, *,
                      batch: int, with_data: bool, with_ctf: bool = True, xp: ModuleType = np,
                      buffers: tuple[np.ndarray, np.ndarray | None] | None = None,
                      pool: WorkerPool | None = None) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Insert a batch through the shared blocks and normalise block by block (still in cache).

    Each voxel gets ``D · scale / max(W1, floor)`` and ``D2 · scale / max(W1, floor)``.

    Parameters
    ----------
    columns
        (C, Q · B) from :func:`sample_columns`.
    scale
        (n_voxels,) float32 per-voxel numerator factor (shared by the batch).
    batch
        B, the particles in ``columns``.
    with_data, with_ctf
        Which of D (complex data) and D2 (CTF numerator) ``columns`` holds besides W1.
    buffers
        Optional (n_voxels, B) complex64 and (n_voxels, ≥ B) float32 arrays (or None); their first B columns are
        filled.
    pool
        Optional thread pool: the row blocks are shared out in contiguous runs of about equal non-zeros (each
        block writes its own rows, so the result does not depend on the split).

    Returns
    -------
    spectrum
        (n_voxels, B) complex64 normalised D (None without data).
    ctf_spectrum
        (n_voxels, B) float32 normalised D2 (None without ``with_ctf``).
    """
    n_data = 2 * batch if with_data else 0
    mirrored = mirrored_columns(insertion, columns, n_data)
    shape = (insertion.n_voxels, batch)
    spectrum, ctf_spectrum = buffers if buffers is not None else (None, None)
    if with_data and (spectrum is None or spectrum.shape != shape):
        spectrum = xp.empty(shape, dtype=xp.complex64)
    if with_ctf and (ctf_spectrum is None or ctf_spectrum.shape[0] != shape[0]):
        ctf_spectrum = xp.empty(shape, dtype=xp.float32)
    spectrum = spectrum if with_data else None
    ctf_spectrum = ctf_spectrum if with_ctf else None

    def run_blocks(first: int, last: int) -> None:
        for i in range(first, last):
            start, end = insertion.bounds[i]
            normalise_block(insertion, i, columns, mirrored, scale, floor, batch=batch, n_data=n_data, xp=xp,
                            spectrum=None if spectrum is None else spectrum[start:end],
                            ctf_spectrum=None if ctf_spectrum is None else ctf_spectrum[start:end, :batch])

    pool = pool if xp is np else None
    run_split(pool, run_blocks, len(insertion.blocks), block_cuts(insertion, pool))
    return spectrum, ctf_spectrum


def insert_one(splat: Splat, data: np.ndarray, weight: np.ndarray, ctf: np.ndarray | None, *,
               xp: ModuleType = np) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]:
    """Insert one particle with its own splat (pre-rotated geometry) → Re D, Im D, W1, D2 (None without
    ``ctf``), W0 (n_voxels,)."""
    cols, w, n = splat.cols, splat.weights, splat.n_voxels

    def scatter(values: np.ndarray | None) -> np.ndarray:
        contribution = w if values is None else w * values[cols]
        return xp.bincount(splat.rows, weights=contribution, minlength=n).astype(xp.float32)

    return (scatter(data.real), xp.bincount(splat.rows, weights=w * splat.conj_sign * data.imag[cols],
                                            minlength=n).astype(xp.float32),
            scatter(weight), None if ctf is None else scatter(ctf), scatter(None))
