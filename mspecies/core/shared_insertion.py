"""The NumPy build of the shared insertion (:class:`~mspecies.core.insert.SharedInsertion`) straight from the slice
orientations: the same matrix, bit for bit, as ``SharedInsertion.from_splat(splat_entries(...))``, at a fraction of
the cost and memory of that statement (which the CuPy path keeps).

``splat_entries`` makes all 8 trilinear entries of every sample at once in int64/float64 lists joined corner by
corner (hundreds of MB at M = 256) and ``from_splat`` turns them into a COO matrix, sorts it into CSR, sums
duplicates and cuts the row blocks by fancy indexing. Here the entries are made tilt chunk by tilt chunk into
preallocated (C, 8) int32/float32 arrays, column by column: that is the matrix in CSC form, whose one conversion
to CSR leaves each row's columns sorted, and the blocks are cut by row pointer. The multiplicity (the float64
``bincount`` of the weights, rounded to float32) is reproduced bit for bit by :func:`_multiplicity`.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import ModuleType

import numpy as np

from .insert import _FLOOR_EPSILON, BLOCK_ROWS, SampleGrid, SharedInsertion, friedel_mates, splat_entries

# Columns (samples) per chunk of the NumPy build of the shared insertion: the chunk's temporaries (about 300 B
# per column, under 10 MiB) stay far under the 32 MiB of freed heap that the export worker keeps
# (memory.retain_freed_memory), so a warm build reuses their pages.
_CHUNK_COLUMNS = 32768


@dataclass
class _Entries:
    """The 8 trilinear entries of every column, (C, 8) (corner = 4 dz + 2 dy + dx): float32 weight and voxel
    (int32; the dropped ones at the extra voxel ``n_voxels``); per column (C,) whether it has an entry, its flip
    and its integer base (3, C) ``(x, y, z)``; per corner its Friedel-mate entries (voxel, column, weight)."""

    weights: np.ndarray
    voxels: np.ndarray
    has_entry: np.ndarray
    flip: np.ndarray
    base: np.ndarray
    mirrors: list[list[tuple[np.ndarray, np.ndarray, np.ndarray]]]


def _voxel_rows(x: np.ndarray, y: np.ndarray, z: np.ndarray, m: int, y_major: bool) -> np.ndarray:
    """Flat voxel of signed (x ≥ 0, y, z) in the (M, M, M//2+1) ``[z, y, x]`` layout (``[y, z, x]`` if
    ``y_major``), broadcast."""
    outer, inner = (y % m, z % m) if y_major else (z % m, y % m)
    return (outer * m + inner) * (m // 2 + 1) + x


def _voxel_coordinates(voxels: np.ndarray, m: int, y_major: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Signed (x, y, z) of flat voxels inside radius M/2 (the inverse of :func:`_voxel_rows`)."""
    width = m // 2 + 1
    outer, inner = np.divmod(voxels // width, m)
    y, z = (outer, inner) if y_major else (inner, outer)
    return voxels % width, np.where(y > m // 2, y - m, y), np.where(z > m // 2, z - m, z)


def _chunk_entries(entries: _Entries, orientation: np.ndarray, k2: np.ndarray, first_column: int, m: int,
                   y_major: bool) -> None:
    """Fill the entries of the columns of (t, 3, 2) ``orientation`` × (2, s) sample frequencies ``k2`` (from
    ``first_column`` on; t = 1 unless s is every sample): the statements of :func:`splat_entries` (same float64
    operations, so the same weights) on (dz, dy, dx, n) corner arrays."""
    half = m // 2
    position = np.einsum("tij,js->tsi", orientation, k2).reshape(-1, 3).T  # (3, n) in (x, y, z)
    n = position.shape[1]
    columns = slice(first_column, first_column + n)
    flip = entries.flip[columns]
    np.less(position[0], 0, out=flip)
    np.negative(position, out=position, where=flip)
    base = np.floor(position + _FLOOR_EPSILON)
    fraction = position - base
    base = entries.base[:, columns] = base.astype(np.int32)
    low = 1 - fraction
    # (dz, dy, dx, n): (x factor · y factor) · z factor, as splat_entries multiplies them
    factor = [np.stack([low[axis], fraction[axis]]) for axis in range(3)]
    weight = (factor[0][None, None] * factor[1][None, :, None]) * factor[2][:, None, None]
    step = np.arange(2, dtype=np.int32)[:, None]
    x, y, z = (base[axis] + step for axis in range(3))  # (2, n) each
    x, y, z = x[None, None], y[None, :, None], z[:, None, None]
    keep = (weight > 0) & (x * x + y * y + z * z < half * half)
    np.logical_or.reduce(keep.reshape(8, n), axis=0, out=entries.has_entry[columns])
    entries.weights[columns] = weight.reshape(8, n).T
    entries.voxels[columns] = np.where(keep, _voxel_rows(x, y, z, m, y_major), m * m * (half + 1)).reshape(8, n).T
    on_plane = np.flatnonzero(base[0] == 0)  # x = 0 needs base x = 0 and dx = 0 (x ≥ 0 after the flip)
    for dz, dy in itertools.product((0, 1), (0, 1)):
        kept = on_plane[keep[dz, dy, 0, on_plane]]
        yc, zc = base[1, kept] + dy, base[2, kept] + dz
        off_axis = (yc != 0) | (zc != 0)  # the Friedel mate of every x = 0 voxel but the DC
        mirror = kept[off_axis]
        entries.mirrors[4 * dz + 2 * dy].append((_voxel_rows(0, -yc[off_axis], -zc[off_axis], m, y_major),
                                                 (first_column + mirror).astype(np.int32),
                                                 weight[dz, dy, 0, mirror].astype(np.float32)))


def _chunks(n_tilts: int, n_samples: int) -> Iterator[tuple[slice, slice]]:
    """(tilts, samples) of the chunks of at most ``_CHUNK_COLUMNS`` columns, in column order: whole tilts, or
    parts of one tilt where a tilt has more samples."""
    if n_samples <= _CHUNK_COLUMNS:
        step = _CHUNK_COLUMNS // n_samples
        for t in range(0, n_tilts, step):
            yield slice(t, min(t + step, n_tilts)), slice(0, n_samples)
        return
    for t in range(n_tilts):
        for s in range(0, n_samples, _CHUNK_COLUMNS):
            yield slice(t, t + 1), slice(s, min(s + _CHUNK_COLUMNS, n_samples))


def build_shared_insertion(orientation: np.ndarray, grid: SampleGrid, *, xp: ModuleType = np,
                           block_rows: int = BLOCK_ROWS, y_major_box_px: int | None = None) -> SharedInsertion:
    """The shared insertion of (T, 3, 2) slice orientations, bit for bit
    ``SharedInsertion.from_splat(splat_entries(orientation, grid), ...)`` (same arguments); on CuPy those two
    statements.

    Entries are made tilt chunk by tilt chunk (:func:`_chunk_entries`), 8 per column: the direct matrix in CSC
    form with one extra voxel (row) that holds the dropped entries. Its conversion to CSR leaves every row's
    columns sorted (no entry repeats a (voxel, column) pair: the 8 corners of a sample are distinct voxels) and
    the extra row last, where it is cut off; the row blocks are cut from that one matrix by row pointer. The
    multiplicity is :func:`_multiplicity`.
    """
    if xp is not np:
        return SharedInsertion.from_splat(splat_entries(orientation, grid, xp=xp), xp=xp, block_rows=block_rows,
                                          y_major_box_px=y_major_box_px)
    import scipy.sparse  # as insert does: not imported by commands that never build an insertion

    orientation = np.asarray(orientation, dtype=np.float64)
    m = grid.padded_box_px
    y_major = y_major_box_px is not None
    n_voxels, n_tilts, n_samples = m * m * (m // 2 + 1), orientation.shape[0], grid.n_samples
    n_columns = n_tilts * n_samples
    if y_major:
        block_rows = m * (m // 2 + 1)
    entries = _Entries(np.empty((n_columns, 8), dtype=np.float32), np.empty((n_columns, 8), dtype=np.int32),
                       np.empty(n_columns, dtype=bool), np.empty(n_columns, dtype=bool),
                       np.empty((3, n_columns), dtype=np.int32), [[] for _ in range(8)])
    k2 = np.stack([grid.kx, grid.ky])
    for tilts, samples in _chunks(n_tilts, n_samples):
        _chunk_entries(entries, orientation[tilts], k2[:, samples], tilts.start * n_samples + samples.start, m,
                       y_major)
    column_start = np.arange(0, 8 * n_columns + 1, 8, dtype=np.int32)
    full = scipy.sparse.csc_matrix((entries.weights.reshape(-1), entries.voxels.reshape(-1), column_start),
                                   shape=(n_voxels + 1, n_columns)).tocsr()
    end = full.indptr[n_voxels]
    matrix = scipy.sparse.csr_matrix((full.data[:end], full.indices[:end], full.indptr[:-1]),
                                     shape=(n_voxels, n_columns))
    del full
    column_sign = np.where(entries.flip & entries.has_entry, np.float32(-1), np.float32(1))
    mirrors = [_concatenate_entries(corner) for corner in entries.mirrors]
    mirror_voxels, mirror_columns, mirror_weights = _concatenate_entries(mirrors)
    multiplicity = _multiplicity(matrix, mirrors, mirror_voxels, mirror_weights, entries.base, m, y_major)
    del entries
    bounds = [(start, min(start + block_rows, n_voxels)) for start in range(0, n_voxels, block_rows)]
    block_voxels = None
    if y_major:
        reached = multiplicity > 0
        voxels = np.flatnonzero(reached)
        matrix = _reached_rows(matrix, reached, voxels)
        cuts = np.searchsorted(voxels, [start for start, _ in bounds] + [n_voxels])
        block_voxels = [voxels[a:b] for a, b in zip(cuts[:-1], cuts[1:])]
        blocks = [_row_view(matrix, a, b) for a, b in zip(cuts[:-1], cuts[1:])]
    else:
        blocks = [_row_view(matrix, start, end) for start, end in bounds]
    mirror = friedel_mates(mirror_voxels.astype(np.int64), mirror_columns, mirror_weights, n_columns, bounds,
                            block_voxels, np)
    return SharedInsertion(blocks, bounds, *mirror, column_sign, multiplicity, n_voxels, block_voxels)


def _multiplicity(matrix: object, mirrors: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
                  mirror_voxels: np.ndarray, mirror_weights: np.ndarray, base: np.ndarray, m: int, y_major: bool
                  ) -> np.ndarray:
    """(n_voxels,) float32 Σ of a voxel's direct and Friedel-mate weights, bit for bit :meth:`from_splat`'s
    ``bincount`` of :func:`splat_entries` (float64 sums in the order corner by corner, each corner's mates after
    it, columns ascending, then rounded to float32). ``mirror_voxels``, ``mirror_weights``: the Friedel-mate
    entries of ``mirrors`` (one triple per corner) joined in order.

    Float32 weights of at least 2^(k − 30) are multiples of 2^(k − 53); when every sum stays below 2^k, each of
    their partial sums is exact in float64, whatever the order. So the sums are taken along the CSR rows, and
    only the voxels that hold a smaller weight are summed again, in ``bincount``'s order (their entries' corners
    from ``base``, the (3, C) integer base of each column).
    """
    indptr, weights = matrix.indptr, matrix.data
    filled = np.flatnonzero(indptr[1:] != indptr[:-1])
    sums = np.add.reduceat(weights, indptr[filled], dtype=np.float64) if filled.size else np.zeros(0)
    mated, mate = np.unique(mirror_voxels, return_inverse=True)
    mated_sums = np.zeros(mated.size)
    np.add.at(mated_sums, mate, mirror_weights.astype(np.float64))
    row = np.minimum(np.searchsorted(filled, mated), max(filled.size - 1, 0))
    with_row = filled[row] == mated if filled.size else np.zeros(mated.size, dtype=bool)
    mated_sums[with_row] += sums[row[with_row]]
    multiplicity = np.zeros(matrix.shape[0], dtype=np.float32)
    multiplicity[filled], multiplicity[mated] = sums, mated_sums
    largest = max(float(sums.max(initial=0.0)), float(mated_sums.max(initial=0.0)))
    if largest == 0:
        return multiplicity
    small = np.float32(2.0 ** (int(np.ceil(np.log2(largest))) + 1 - 30))  # k with a factor 2 of margin
    # the entries' indices in the row pointer's own type (exact: int32 only where there are fewer than 2³¹ entries):
    # searchsorted would otherwise cast the whole row pointer (M³/2 int32, 270 MB at M = 512) to int64, a new 540 MB
    # array mapped afresh at every build (about 1 s of system time there)
    small_entries = np.flatnonzero(weights < small).astype(indptr.dtype)
    inexact = np.unique(np.concatenate([np.searchsorted(indptr, small_entries, side="right") - 1,
                                        mirror_voxels[mirror_weights < small]]))
    if inexact.size:
        multiplicity[inexact] = _ordered_sums(matrix, mirrors, base, inexact, m, y_major)
    return multiplicity


def _ordered_sums(matrix: object, mirrors: list[tuple[np.ndarray, np.ndarray, np.ndarray]], base: np.ndarray,
                  voxels: np.ndarray, m: int, y_major: bool) -> np.ndarray:
    """float64 sums of the weights of the sorted ``voxels`` in :func:`splat_entries`'s order: by corner, each
    corner's direct entries before its Friedel mates, then by column."""
    start, end = matrix.indptr[voxels], matrix.indptr[voxels + 1]
    count = end - start
    index = np.arange(int(count.sum())) + np.repeat(start - np.cumsum(count) + count, count)  # their entries
    voxel, column = np.repeat(voxels, count), matrix.indices[index]
    x, y, z = _voxel_coordinates(voxel, m, y_major)
    corner = 4 * (z - base[2, column]) + 2 * (y - base[1, column]) + (x - base[0, column])
    parts = [(voxel, 2 * corner, column, matrix.data[index])]
    for c, (mirror_voxels, mirror_columns, mirror_weights) in enumerate(mirrors):
        inside = np.isin(mirror_voxels, voxels)
        parts.append((mirror_voxels[inside], np.full(int(inside.sum()), 2 * c + 1), mirror_columns[inside],
                      mirror_weights[inside]))
    voxel, key, column, weight = (np.concatenate(values) for values in zip(*parts))
    order = np.lexsort((column, key, voxel))
    sums = np.zeros(voxels.size)
    np.add.at(sums, np.searchsorted(voxels, voxel[order]), weight[order].astype(np.float64))  # in order
    return sums


def _concatenate_entries(parts: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]]
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(voxel int32, column int32, weight float32) entry triples joined in order (empty arrays for none)."""
    empty = (np.empty(0, np.int32), np.empty(0, np.int32), np.empty(0, np.float32))
    return tuple(np.concatenate([e, *(part[i] for part in parts)]) for i, e in enumerate(empty))  # type: ignore


def _reached_rows(matrix: object, reached: np.ndarray, voxels: np.ndarray) -> object:
    """``matrix[voxels]`` for ``voxels`` = ``flatnonzero(reached)``: a new row pointer over the same entries
    when every non-empty row is reached (a voxel with entries has a positive multiplicity unless all its
    float32 weights are 0), else the fancy row selection."""
    indptr = matrix.indptr
    if np.any((indptr[1:] != indptr[:-1]) & ~reached):
        return matrix[voxels]
    reached = np.append(indptr[voxels], indptr[-1]).astype(indptr.dtype, copy=False)  # of that type already
    return type(matrix)((matrix.data, matrix.indices, reached), shape=(voxels.size, matrix.shape[1]))


def _row_view(matrix: object, start: int, end: int) -> object:
    """Rows [start, end) of a CSR ``matrix`` from its row pointer (SciPy copies the entries of a small view)."""
    indptr = matrix.indptr
    first, last = indptr[start], indptr[end]
    return type(matrix)((matrix.data[first:last], matrix.indices[first:last], indptr[start:end + 1] - first),
                        shape=(end - start, matrix.shape[1]))
