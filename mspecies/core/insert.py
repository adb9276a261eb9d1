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
particles of a tilt series share it (not pre-rotated) it is built once and applied to a batch with one
sparse × dense product; otherwise each particle is splatted with ``bincount``.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import numpy as np

from .geometry import tilt_rotation

_FLOOR_EPSILON = 1e-5


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
    inverse_transposed = np.transpose(np.linalg.inv(np.asarray(xf, dtype=np.float64)[:, :, :2]), (0, 2, 1))
    orientation = np.einsum("tji,tjk->tik", beam, inverse_transposed)  # R2ᵀ A⁻ᵀ: (T, 3, 2)
    if particle_matrices is None:
        return orientation
    return np.einsum("bji,tjk->btik", np.asarray(particle_matrices, dtype=np.float64), orientation)


@dataclass(frozen=True)
class Splat:
    """Trilinear splatting entries of all samples of all tilts: sample ``cols`` adds ``weights`` × value
    (conjugated where ``conj_sign`` is −1) to voxel ``rows`` of the flattened half volume."""

    rows: np.ndarray
    cols: np.ndarray
    weights: np.ndarray
    conj_sign: np.ndarray
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
    rows, cols, weights, signs = [], [], [], []
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
                mirror = (x == 0) & ((y != 0) | (z != 0))
                rows.append(((-z[mirror] % m) * m + (-y[mirror] % m)) * width)
                cols.append(c[mirror])
                weights.append(w[mirror])
                signs.append(-s[mirror])
    return Splat(xp.concatenate(rows), xp.concatenate(cols), xp.concatenate(weights).astype(xp.float32),
                 xp.concatenate(signs).astype(xp.float32), m * m * width, n_tilts * grid.n_samples)


def _sparse_module(xp: ModuleType) -> ModuleType:
    if xp is np:
        import scipy.sparse

        return scipy.sparse
    import cupyx.scipy.sparse

    return cupyx.scipy.sparse


@dataclass(frozen=True)
class InsertionOperator:
    """A splat as two CSR matrices (n_voxels × n_columns): ``plain`` for real values and real parts,
    ``signed`` (weights × conjugation sign) for imaginary parts."""

    plain: object
    signed: object
    n_voxels: int

    @classmethod
    def from_splat(cls, splat: Splat, *, xp: ModuleType = np) -> InsertionOperator:
        sparse = _sparse_module(xp)
        shape = (splat.n_voxels, splat.n_columns)
        plain = sparse.csr_matrix((splat.weights, (splat.rows, splat.cols)), shape=shape)
        signed = sparse.csr_matrix((splat.weights * splat.conj_sign, (splat.rows, splat.cols)), shape=shape)
        plain.sum_duplicates()
        signed.sum_duplicates()
        return cls(plain, signed, splat.n_voxels)


Accumulated = tuple  # (Re D, Im D, W1 = Σ w |C_u|, D2 = Σ w C_u C_w, W0 = Σ w), each (n_voxels,) float32


def insert_shared(operator: InsertionOperator, data: np.ndarray, weight: np.ndarray, ctf: np.ndarray,
                  multiplicity: np.ndarray, *, xp: ModuleType = np) -> list[Accumulated]:
    """Insert a batch through one shared operator → one accumulated tuple per particle.

    Parameters
    ----------
    data
        (B, C) complex64 sample values (image spectrum × C_w).
    weight, ctf
        (B, C) float32 |C_u| and C_u · C_w.
    multiplicity
        (n_voxels,) Σ w of the operator (computed once).

    One sparse matrix-vector product per particle and quantity: the outputs are contiguous volumes, where a
    single (n_voxels × C) · (C × B) product would need a slow transpose of its tall result.
    """

    def apply(matrix: object, values: np.ndarray) -> np.ndarray:
        return matrix @ xp.ascontiguousarray(values, dtype=xp.float32)

    return [(apply(operator.plain, data[b].real), apply(operator.signed, data[b].imag),
             apply(operator.plain, weight[b]), apply(operator.plain, ctf[b]), multiplicity)
            for b in range(data.shape[0])]


def operator_multiplicity(operator: InsertionOperator, *, xp: ModuleType = np) -> np.ndarray:
    """(n_voxels,) Σ of the trilinear weights (values 1)."""
    return operator.plain @ xp.ones(operator.plain.shape[1], dtype=xp.float32)


def insert_one(splat: Splat, data: np.ndarray, weight: np.ndarray, ctf: np.ndarray, *,
               xp: ModuleType = np) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Insert one particle with its own splat (pre-rotated geometry) → Re D, Im D, W1, D2, W0 (n_voxels,)."""
    cols, w, n = splat.cols, splat.weights, splat.n_voxels

    def scatter(values: np.ndarray | None) -> np.ndarray:
        contribution = w if values is None else w * values[cols]
        return xp.bincount(splat.rows, weights=contribution, minlength=n).astype(xp.float32)

    return (scatter(data.real), xp.bincount(splat.rows, weights=w * splat.conj_sign * data.imag[cols],
                                            minlength=n).astype(xp.float32),
            scatter(weight), scatter(ctf), scatter(None))
