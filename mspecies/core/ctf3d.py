"""3D CTF evaluated directly on the output grid (``ExportOptions.ctf_method = "direct"``, the default).

M/Warp (m_reference §5.9; ``ctf_method = "padded"``) makes a particle's 3D CTF by reconstructing the CTF
numerator on the padded M³ grid, cropping its point-spread function to N³ in real space and transforming it
back: an M³ round trip per particle. The direct method evaluates the same normalised quantity on the
(N, N, N//2+1) half grid of the output, in work proportional to the voxels the tilt slices cover:

* **coverage** (geometry only, shared by all particles of a tilt series unless pre-rotated): the central
  slice of tilt t (the plane spanned by the columns g₁, g₂ of its 3 × 2 slice orientation G_t, see
  :func:`mspecies.core.insert.slice_orientation`) covers the voxels v with ``|n_t · v| < 1`` (n_t its unit
  normal) with the tent profile ``τ = (1 − |n_t · v|) · clip(N/2 + ½ − |k|, 0, 1) / |g₁ × g₂|``: the
  thickness of a trilinear splat, a rim one voxel wide around |k| = N/2 that brings the slice continuously to 0
  (M's samples end at radius M/2 and their splats reach half an output voxel further), and the sample density.
  ``k = G_t⁺ v`` is the voxel's in-plane (raw-image) frequency in cycles per N px. The Nyquist rows y, z = ±N/2
  are left empty, so the x = 0 plane stays exactly Hermitian. Every weight is continuous in the geometry: a
  rounding of the alignment moves values slightly, never switches a voxel on or off.
* **CTF power over a voxel**: ``⟨C²⟩ = ½ − ½ · sinc(Δ) · cos 2γ`` with γ the RELION phase at k (the
  particle's own defocus, the tilt's astigmatism and phase shift) and ``Δ = |∂γ/∂k| / (N p)`` the phase
  change across one output voxel (from the tilt's defocus: a particle's offset changes it by a few %): the box
  average of sin²γ over that voxel along the radius. Where the CTF oscillates faster than the output grid it
  averages to ½ instead of aliasing (the padded box exists for the same reason).
* **normalisation** as M's, with ``|C_u| → √⟨C²⟩`` and ``C_u · C_w → ⟨C²⟩ · w_t(k)``::

      ctf(v) = min(1, (N/M) Σ τ) · Σ τ ⟨C²⟩ w  /  max(Σ τ √⟨C²⟩, 1e-4)

  with ``w_t(k) = cos θ_t · exp(−pre-exposure_t · k²) · dose-limit_t`` (sums over the slices covering v).
  N/M is the thickness of M's slices in output voxels: an isolated slice carries N/M of its weight into the
  cropped sub-tomogram; where slices overlap (low frequency) the multiplicity saturates at 1, so the DC is
  the amplitude contrast × the mean tilt weight.

This is a deliberate departure from M: the sinc ringing that M's real-space crop leaves around each slice
(and around DC) is not reproduced. Measured on the synthetic data (``benchmarks/export/README.md``):
``relion_reconstruct --ctf`` gives the same FSC against the ground truth with either method (noise-free and
noisy), at 1/25 (box 64) to 1/47 (box 128) of the cost.

Per (particle, slice) only the defocus offset changes (``particle defocus = tilt defocus + offset``), so the
per-particle work is one fused pass over the covered (voxel, tilt) slots: ``2γ = 2γ_tilt − 2πλ · offset · k²``,
one cosine, a square root and the sums. Slots are grouped by how many slices cover a voxel (classes of
fixed width, padded with empty slots), so the per-voxel sums are plain reshaped sums.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType

import numpy as np

from mspecies.common.types import Microscope

from .ctf import phase_constants
from .geometry import pseudo_inverse_3x2

WEIGHT_FLOOR = 1e-4
# Slot widths of the per-voxel classes: a voxel covered by c slices goes to the smallest width ≥ c.
_WIDTHS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 40, 48, 64, 80, 96, 128)


@dataclass(frozen=True)
class Coverage:
    """The (voxel, tilt) pairs that the tilt slices cover on the (N, N, N//2+1) half grid.

    Attributes
    ----------
    box_px
        N.
    voxel
        (P,) flat index into the (N, N, N//2+1) half layout (``[z, y, x]``, z and y modulo N).
    tilt
        (P,) index of the slice (into the orientations given).
    profile
        (P,) float64 tent weight τ.
    freq_px
        (P, 2) in-plane (raw-image) frequency (kx, ky) in cycles per N px.
    """

    box_px: int
    voxel: np.ndarray
    tilt: np.ndarray
    profile: np.ndarray
    freq_px: np.ndarray

    @property
    def n_voxels(self) -> int:
        return self.box_px * self.box_px * (self.box_px // 2 + 1)


def _axis_range(axis: int, n: int) -> np.ndarray:
    """Integer frequencies of half-layout axis 0 (x: 0..N/2) or 1, 2 (y, z: −N/2+1..N/2−1, Nyquist left out)."""
    return np.arange(0, n // 2 + 1) if axis == 0 else np.arange(-(n // 2) + 1, n // 2)


def _cover_slice(g: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Voxels (P, 3) integer (x, y, z), tent profile (P,) and in-plane frequency (P, 2) of one slice."""
    normal = np.cross(g[:, 0], g[:, 1])
    area = float(np.linalg.norm(normal))
    normal = normal / area
    a = int(np.argmax(np.abs(normal)))
    b, c = [axis for axis in range(3) if axis != a]
    vb, vc = np.meshgrid(_axis_range(b, n), _axis_range(c, n), indexing="ij")
    vb, vc = vb.reshape(-1, 1), vc.reshape(-1, 1)
    along_b, along_c = normal[b] * vb, normal[c] * vc  # (Q, 1): shared by the candidates of a line
    centre = -(along_b + along_c) / normal[a]
    reach = 1.0 / abs(normal[a])  # |n · v| < 1 spans ±reach along the dominant axis
    va = np.floor(centre - reach).astype(np.int64) + np.arange(1, int(np.ceil(2 * reach)) + 2)
    distance = normal[a] * va + along_b
    distance += along_c  # (n_a v_a + n_b v_b) + n_c v_c
    allowed = _axis_range(a, n)
    keep = (np.abs(distance) < 1.0) & (va >= allowed[0]) & (va <= allowed[-1])
    per_line = keep.sum(axis=1)
    voxels = np.empty((int(per_line.sum()), 3), dtype=np.int64)
    voxels[:, a], voxels[:, b], voxels[:, c] = va[keep], np.repeat(vb[:, 0], per_line), np.repeat(vc[:, 0], per_line)
    freq = voxels @ pseudo_inverse_3x2(g).T  # least-squares in-plane coordinates (exact for v on the slice)
    edge = np.clip(n / 2 + 0.5 - np.sqrt(np.einsum("pi,pi->p", freq, freq)), 0.0, 1.0)  # the rim, 1 voxel wide
    inside = edge > 0
    return voxels[inside], (1.0 - np.abs(distance[keep][inside])) * edge[inside] / area, freq[inside]


def slice_coverage(orientation: np.ndarray, box_px: int) -> Coverage:
    """Coverage of the (N, N, N//2+1) half grid by (T, 3, 2) slice orientations (cycles per N px in and out)."""
    n = int(box_px)
    voxels, tilts, profiles, freqs = [], [], [], []
    for t, g in enumerate(np.asarray(orientation, dtype=np.float64)):
        v, profile, freq = _cover_slice(g, n)
        voxels.append(v)
        tilts.append(np.full(profile.size, t, dtype=np.int32))
        profiles.append(profile)
        freqs.append(freq)
    v = np.concatenate(voxels)
    flat = ((v[:, 2] % n) * n + (v[:, 1] % n)) * (n // 2 + 1) + v[:, 0]
    return Coverage(n, flat, np.concatenate(tilts), np.concatenate(profiles), np.concatenate(freqs))


@dataclass(frozen=True)
class SlotLayout:
    """Pairs arranged as per-voxel slots: class j holds ``width_j`` slot rows × ``count_j`` voxels (slot-major,
    so a voxel's sum runs over contiguous rows), padded with the empty pair (index P, profile 0).

    Attributes
    ----------
    pair
        (S,) pair index of each slot (P for padding).
    voxel
        (U,) flat voxel of each covered voxel, in class order.
    classes
        (slot offset, voxel offset, count, width) per class.
    """

    pair: np.ndarray
    voxel: np.ndarray
    classes: tuple[tuple[int, int, int, int], ...]


def slot_layout(voxel: np.ndarray, widths: Sequence[int] = _WIDTHS) -> SlotLayout:
    """Group pairs by voxel into fixed-width classes (see :class:`SlotLayout`)."""
    order = np.argsort(voxel, kind="stable")
    unique, first, count = np.unique(voxel[order], return_index=True, return_counts=True)
    widths = list(widths)
    while widths[-1] < count.max(initial=1):
        widths.append(2 * widths[-1])
    width_of = np.asarray(widths)[np.searchsorted(widths, count)]
    pieces, voxels, classes = [], [], []
    slot_offset = voxel_offset = 0
    empty = voxel.size
    for width in widths:
        members = np.flatnonzero(width_of == width)
        if members.size == 0:
            continue
        slot = np.arange(width)[:, None]
        index = first[members] + slot  # (width, members)
        pieces.append(np.where(slot < count[members], order[np.minimum(index, voxel.size - 1)], empty).ravel())
        voxels.append(unique[members])
        classes.append((slot_offset, voxel_offset, int(members.size), width))
        slot_offset += members.size * width
        voxel_offset += members.size
    return SlotLayout(np.concatenate(pieces), np.concatenate(voxels), tuple(classes))


def ctf_phase_terms(freq_px: np.ndarray, box_px: int, pixel_size_angst: float, defocus_u_angst: np.ndarray,
                    defocus_v_angst: np.ndarray, defocus_angle_deg: np.ndarray, phase_shift_deg: np.ndarray,
                    microscope: Microscope, *, tilt: np.ndarray | None = None
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per pair: RELION phase γ (rad), k² (1/Å²) and the phase change Δ across one output voxel (rad).

    ``γ = πλ Δf(α) k² + (π/2) Cs λ³ k⁴ − phase − atan(Q₀/√(1−Q₀²))`` with ``Δf(α) = −(U+V)/2 − (U−V)/2 ·
    cos 2(α − angle)`` (RELION ``ctf.cpp``; defocus arrays per pair, Å) and ``Δ = |∂γ/∂|k|| / (N p)``.
    With ``tilt`` (P,) the defocus, angle and phase arrays are per tilt (T,) instead: their terms are computed
    once per tilt and then spread to the pairs (the same values).
    """
    f = np.asarray(freq_px, dtype=np.float64) / (box_px * pixel_size_angst)
    k2 = f[:, 0] ** 2 + f[:, 1] ** 2
    safe = np.where(k2 > 0, k2, 1.0)
    cos2, sin2 = (f[:, 0] ** 2 - f[:, 1] ** 2) / safe, 2 * f[:, 0] * f[:, 1] / safe  # exact under k → −k
    c1, c2, c3 = phase_constants(microscope)
    angle = np.deg2rad(defocus_angle_deg)
    terms = (-(defocus_u_angst + defocus_v_angst) / 2, (defocus_u_angst - defocus_v_angst) / 2, np.cos(2 * angle),
             np.sin(2 * angle), np.deg2rad(phase_shift_deg) + c3)
    mean, half, cos_angle, sin_angle, phase = terms if tilt is None else (term[tilt] for term in terms)
    delta_f = mean - half * (cos_angle * cos2 + sin_angle * sin2)
    gamma = c1 * delta_f * k2 + c2 * k2 * k2 - phase
    k = np.sqrt(k2)
    step = np.abs(2 * c1 * delta_f * k + 4 * c2 * k2 * k) / (box_px * pixel_size_angst)
    return gamma, k2, step


@dataclass(frozen=True)
class PairTables:
    """Per (voxel, tilt) pair of a coverage, float64: everything but the particle's own defocus offset.

    Attributes
    ----------
    coverage
        The pairs.
    base2
        (P,) 2γ with the tilt's defocus (rad).
    offset_tables
        (R', P) change of 2γ per unit of each used offset coefficient (rad).
    used_rows
        Indices of the offset-basis rows that are not all zero (R').
    half_sinc
        (P,) ½ sinc(Δ), a hair below ½ so that ½ − ½ sinc(Δ) cos 2γ can never round below 0.
    weight
        (P,) w = cos θ · exp(−pre-exposure · k²) · dose limit.
    multiplicity
        (n_voxels,) min(1, N/M Σ τ) of every voxel of the half grid.
    apply_ctf
        False: C ≡ 1 (the 3D CTF is the multiplicity).
    """

    coverage: Coverage
    base2: np.ndarray
    offset_tables: np.ndarray
    used_rows: np.ndarray
    half_sinc: np.ndarray
    weight: np.ndarray
    multiplicity: np.ndarray
    apply_ctf: bool


def pair_tables(coverage: Coverage, *, pixel_size_angst: float, padded_box_px: int, defocus_u_angst: np.ndarray,
                defocus_v_angst: np.ndarray, defocus_angle_deg: np.ndarray, phase_shift_deg: np.ndarray,
                tilt_weight_scale: np.ndarray, pre_exposure_e_per_angst2: np.ndarray, offset_basis: np.ndarray,
                microscope: Microscope, apply_ctf: bool = True) -> PairTables:
    """Per-tilt arrays (T,) belong to the slices of ``coverage``: tilt defocus U/V (Å), astigmatism angle and
    phase shift (degrees), ``tilt_weight_scale`` (cos θ × dose-limit mask), pre-exposure (e/Å²);
    ``offset_basis`` (R, T) maps R per-particle coefficients to defocus offsets (Å)."""
    n, t = coverage.box_px, coverage.tilt
    gamma, k2, step = ctf_phase_terms(coverage.freq_px, n, pixel_size_angst, defocus_u_angst, defocus_v_angst,
                                      defocus_angle_deg, phase_shift_deg, microscope, tilt=t)
    covered = np.bincount(coverage.voxel, coverage.profile, minlength=coverage.n_voxels)
    basis = np.atleast_2d(np.asarray(offset_basis, dtype=np.float64))
    used_rows = np.flatnonzero(np.any(basis != 0, axis=1))
    # 2γ changes by −2πλ · offset · k² (the defocus term of γ, twice)
    offset_tables = -2 * phase_constants(microscope)[0] * basis[used_rows][:, t] * k2
    return PairTables(coverage, 2 * gamma, offset_tables, used_rows, 0.5 * (1 - 1e-6) * np.sinc(step / np.pi),
                      tilt_weight_scale[t] * np.exp(-pre_exposure_e_per_angst2[t] * k2),
                      np.minimum(1.0, covered * (n / padded_box_px)), apply_ctf)


def evaluate_pairs(tables: PairTables, coefficients: np.ndarray) -> np.ndarray:
    """One particle's 3D CTF straight from the pairs (``bincount``): (N, N, N//2+1) float32 from its (R,) offset
    coefficients. The NumPy statement of :func:`mspecies.core.kernels.rotated_ctf`, which the export uses for a
    pre-rotated particle's own coverage (the reference of its tests)."""
    coverage = tables.coverage
    n = coverage.box_px
    if not tables.apply_ctf:  # C ≡ 1: the multiplicity (0 where no slice reaches)
        return tables.multiplicity.astype(np.float32).reshape(n, n, n // 2 + 1)
    phase = tables.base2 + np.asarray(coefficients, dtype=np.float64)[tables.used_rows] @ tables.offset_tables
    power = 0.5 - tables.half_sinc * np.cos(phase)
    numerator = np.bincount(coverage.voxel, coverage.profile * tables.weight * power, minlength=coverage.n_voxels)
    denominator = np.bincount(coverage.voxel, coverage.profile * np.sqrt(power), minlength=coverage.n_voxels)
    volume = tables.multiplicity * numerator / np.maximum(denominator, WEIGHT_FLOOR)
    return volume.astype(np.float32).reshape(n, n, n // 2 + 1)


@dataclass(frozen=True)
class DirectCtf:
    """The per-slot tables of one coverage, ready to evaluate the 3D CTF of any particle.

    Build with :meth:`create`; :meth:`evaluate` gives one (N, N, N//2+1) float32 CTF per particle. A particle's
    defocus offset in tilt t (``particle − tilt defocus``, Å) is linear in R per-particle coefficients,
    ``offset_t = Σ_r coefficient_r · basis_{r,t}`` (for the IMOD geometry: the position in Å and the tilt's
    height direction × the defocus-gradient sign), so each slot's phase is its tilt phase plus R
    multiply-adds: no per-slot gather. Slot arrays are float32 (S slots, class order). The first ``single``
    slots are the voxels that one slice covers: their value is ``min(1, N/M τ) · w · √⟨C²⟩`` (the ratio with
    one term), with no sums; only the rest go through the per-voxel sums.
    """

    box_px: int
    voxel: np.ndarray
    classes: tuple[tuple[int, int, int, int], ...]
    single: int
    base2: np.ndarray
    offset_tables: np.ndarray
    used_rows: np.ndarray
    half_sinc: np.ndarray
    single_factor: np.ndarray
    profile: np.ndarray
    weighted_profile: np.ndarray
    multiplicity: np.ndarray
    apply_ctf: bool
    xp: ModuleType = np

    @classmethod
    def create(cls, coverage: Coverage, *, xp: ModuleType = np, **ctf: object) -> DirectCtf:
        """Slot tables of ``coverage`` for the CTF arguments of :func:`pair_tables` (on ``xp``'s device)."""
        return cls.from_pairs(pair_tables(coverage, **ctf), xp=xp)  # type: ignore[arg-type]

    @classmethod
    def from_pairs(cls, tables: PairTables, *, xp: ModuleType = np) -> DirectCtf:
        """Arrange :class:`PairTables` as per-voxel slots (:func:`slot_layout`), float32."""
        coverage = tables.coverage
        layout = slot_layout(coverage.voxel)

        def slots(values: np.ndarray) -> np.ndarray:
            padded = np.concatenate([values, np.zeros(values.shape[:-1] + (1,))], axis=-1)  # the empty pair
            return padded[..., layout.pair].astype(np.float32)

        multiplicity = tables.multiplicity[layout.voxel]
        first = layout.classes[0]
        single = first[2] if first[3] == 1 else 0
        classes = tuple((slot - single, voxel - single, count, width) for slot, voxel, count, width in layout.classes
                        if width > 1)
        device = xp.asarray
        return cls(coverage.box_px, device(layout.voxel), classes, single, device(slots(tables.base2)),
                   device(slots(tables.offset_tables)), tables.used_rows, device(slots(tables.half_sinc)),
                   device((multiplicity[:single] * slots(tables.weight)[:single]).astype(np.float32)),
                   device(slots(coverage.profile)[single:]), device(slots(coverage.profile * tables.weight)[single:]),
                   device(multiplicity.astype(np.float32)), tables.apply_ctf, xp)

    @property
    def n_slots(self) -> int:
        return int(self.base2.shape[-1])

    def evaluate(self, coefficients: np.ndarray, *, pool: object | None = None) -> list[np.ndarray]:
        """3D CTFs of B particles from their (B, R) offset coefficients (see the class docstring).

        Returns B new (N, N, N//2+1) float32 arrays in the numpy ``rfftn`` half layout. With NumPy one particle
        is evaluated at a time (its work arrays stay small) and ``pool`` (a
        :class:`mspecies.core.insert.WorkerPool`) shares the particles out over its threads; with CuPy the
        batch is evaluated at once (views of one device array).
        """
        from .insert import run_split

        xp, n = self.xp, self.box_px
        coefficients = np.asarray(coefficients, dtype=np.float64).reshape(len(coefficients), -1)[:, self.used_rows]
        batch = coefficients.shape[0]
        shape = (n, n, n // 2 + 1)
        if xp is not np:
            out = xp.zeros((batch,) + shape, dtype=xp.float32)
            self._evaluate(coefficients, out.reshape(batch, -1), self._buffers(batch))
            return list(out)
        results: list[np.ndarray] = [None] * batch  # type: ignore[list-item]

        def work(first: int, last: int) -> None:
            buffers = self._buffers(1)
            for b in range(first, last):
                volume = np.zeros(shape, dtype=np.float32)
                self._evaluate(coefficients[b:b + 1], volume.reshape(1, -1), buffers)
                results[b] = volume

        run_split(pool, work, batch)
        return results

    def _buffers(self, rows: int) -> dict[str, np.ndarray]:
        return _work_buffers(self.xp, rows, self.n_slots, self.single, int(self.voxel.size))

    def _evaluate(self, coefficients: np.ndarray, out: np.ndarray, buffers: dict[str, np.ndarray]) -> None:
        """CTFs of (b, R') coefficients into the flat, zeroed (b, N·N·(N//2+1)) ``out``."""
        xp, single = self.xp, self.single
        if not self.apply_ctf:
            _scatter(out, self.voxel, self.multiplicity[None, :])
            return
        phase, work = buffers["phase"], buffers["work"]
        if coefficients.shape[1] == 0:
            phase[...] = self.base2
        for row in range(coefficients.shape[1]):  # 2γ with the particle's own defocus
            column = coefficients[:, row:row + 1].astype(np.float32)
            factor = column[0, 0] if column.shape[0] == 1 else xp.asarray(column)  # a scalar multiplies faster
            xp.multiply(self.offset_tables[row], factor, out=work if row else phase)
            xp.add(phase, work if row else self.base2, out=phase)
        xp.cos(phase, out=phase)
        xp.multiply(phase, self.half_sinc, out=phase)
        xp.subtract(xp.float32(0.5), phase, out=phase)  # ⟨sin²γ⟩ over the voxel (≥ 0)
        if single:
            one = phase[:, :single]
            xp.sqrt(one, out=one)
            xp.multiply(one, self.single_factor, out=one)
            _scatter(out, self.voxel[:single], one)
        if single == phase.shape[1]:
            return
        rest, terms, sums = phase[:, single:], buffers["terms"], buffers["sums"]
        xp.multiply(rest, self.weighted_profile, out=terms[:, 0])  # numerator terms
        xp.sqrt(rest, out=rest)
        xp.multiply(rest, self.profile, out=terms[:, 1])  # denominator terms
        rows = coefficients.shape[0]
        for slot, voxel, count, width in self.classes:
            terms[:, :, slot:slot + count * width].reshape(rows, 2, width, count).sum(
                axis=2, out=sums[:, :, voxel:voxel + count])
        num, den = sums[:, 0], sums[:, 1]
        xp.maximum(den, buffers["floor"], out=den)
        xp.divide(num, den, out=num)
        xp.multiply(num, self.multiplicity[single:], out=num)
        _scatter(out, self.voxel[single:], num)


def _scatter(out: np.ndarray, voxels: np.ndarray, values: np.ndarray) -> None:
    """``out[:, voxels] = values`` for (b, V) ``out``; one row as a 1-D assignment (NumPy's fancy assignment is
    about 2× faster without the extra axis)."""
    if out.shape[0] == 1:
        out[0][voxels] = values[0]
    else:
        out[:, voxels] = values


_LOCAL = threading.local()


def _work_buffers(xp: ModuleType, rows: int, n_slots: int, single: int, n_voxels: int) -> dict[str, np.ndarray]:
    """Per-thread work arrays for ``rows`` particles, kept between calls (fresh large arrays cost page faults
    every time)."""
    key = (xp.__name__, rows, n_slots, single, n_voxels)
    buffers = getattr(_LOCAL, "buffers", None)
    if buffers is None or buffers["key"] != key:
        buffers = {name: xp.empty((rows, n_slots), dtype=xp.float32) for name in ("phase", "work")}
        buffers["terms"] = xp.empty((rows, 2, n_slots - single), dtype=xp.float32)  # numerator, denominator terms
        buffers["sums"] = xp.empty((rows, 2, n_voxels - single), dtype=xp.float32)
        buffers["floor"] = xp.full((rows, n_voxels - single), WEIGHT_FLOOR, dtype=xp.float32)  # faster than a scalar
        buffers["key"] = key
        _LOCAL.buffers = buffers
    return buffers
