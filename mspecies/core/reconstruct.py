"""Sub-tomograms and 3D CTFs reconstructed from raw tilt images (M/Warp ``ReconstructSubtomos``, m_reference §5).

For a tilt series, its raw stack and its particles, every particle gets

* a (N, N, N) float32 sub-tomogram ``[z, y, x]`` centred on voxel N/2 (tomogram frame, or the reference frame
  when pre-rotated), white protein when ``invert_contrast``;
* its 3D CTF: (N, N, N//2+1) float32 in the FFTW/numpy ``rfftn`` half layout (RELION's (N/2+1)×N×N), or a
  centred (N, N, N) cube.

Per tilt t and 2D frequency k of the particle's M × M patch (M = aliasing-free padded box):

* ``C_u`` = RELION CTF with the particle's own defocus (tilt defocus + sign · height);
* ``C_w`` = ``C_u · cos θ_t · exp(−pre-exposure_t · k²)`` (Warp dose filter, B = −4 · pre-exposure) × the
  first-N-by-dose mask (on ``C_w`` only);
* inserted: data ``F_t · C_w``, weight ``|C_u|``, CTF ``C_u · C_w``, multiplicity 1 (:mod:`mspecies.core.insert`);
* ``F = D · min(1, W0) / max(W1, 1e-4)`` inside |k| < M/2, centred inverse FFT (× M²), ÷ sinc²(r/M), crop N;
* the 3D CTF (``ctf_method="padded"``, M's) is the same reconstruction of the CTF numerator, cropped in real
  space and transformed back (÷ M²), real part; by default (``"direct"``) the same normalised quantity is
  evaluated on the N³ output grid instead (:mod:`mspecies.core.ctf3d`), without the M³ round trip.

Excluded tilts (``TiltSeriesData.excluded``) are left out altogether (M down-weights them by 1e-4 in the
numerator but keeps them in the denominator; leaving them out is the cleaner choice for bad images).
"""

from __future__ import annotations

import functools
import itertools
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from types import ModuleType

import numpy as np

from mspecies.common.types import InputError, ParticlePoses, TiltSeriesData

from . import ctf3d, extract, insert
from .backend import device_free_bytes, select_backend, to_numpy, usable_cores
from .geometry import euler_to_matrix, particle_defocus_angst, project_positions_to_tilts, tilt_rotation
from .memory import MemoryPlan, device_budget, memory_availability, plan_batches, preparation_bytes
from .shared_insertion import build_shared_insertion

MODES = ("volumes", "series")
CTF_LAYOUTS = ("half", "centred")
CTF_METHODS = ("direct", "padded")
WEIGHT_FLOOR = ctf3d.WEIGHT_FLOOR  # M's 1e-4 floor of the normalisation, the same for both 3D-CTF methods
SPARSE_THRESHOLD = 0.01


class ReconstructionError(RuntimeError):
    """A reconstructed volume is unusable (constant, all zero or not finite); nothing is written for it."""


@dataclass(frozen=True)
class ExportOptions:
    """Options of the sub-tomogram export (M's dialog, m_reference §3.1).

    Attributes
    ----------
    output_pixel_size_angst
        Output pixel size p (Å), ≥ the tilt-series pixel size; images are Fourier-rescaled to it.
    box_px
        Output box N (even).
    particle_diameter_angst
        Diameter (Å): output-normalisation mask and a term of the padded-box size.
    mode
        ``volumes`` (sub-tomogram + 3D CTF) or ``series`` (2D tilt images per particle).
    shift_angst
        (3,) shift of every particle in the reference-map frame (Å), applied as ``position += A · shift``.
    prerotate
        Reconstruct in the reference frame (STAR angles become 0).
    n_tilts_by_dose
        Keep CTF weight only for the first N tilts by dose (None = all).
    invert_contrast, normalize_input, normalize_output, sparse_ctf
        As in M; sparse sets 3D-CTF voxels with |v| < 0.01 to 0.
    ctf_layout
        ``half`` (numpy rfftn (N, N, N//2+1)) or ``centred`` (N, N, N) with DC at N/2.
    ctf_method
        ``direct`` (default): the 3D CTF is evaluated on the N³ output grid (:mod:`mspecies.core.ctf3d`);
        ``padded``: M's, reconstructed on the padded M³ grid and cropped in real space (25× slower at box 64,
        47× at box 128; the same RELION map quality was measured with either).
    padding_factor
        f in the padded box ``M = min(1024, max(even(ceil(f · N)), N + 2, aliasing-free size))`` (≥ 1; 2 = M's,
        the default: smaller is faster but loses FSC at high resolution, benchmarks/export/README.md).
    defocus_gradient_sign
        Sign s of ``defocus = tilt defocus + s · height`` (−1: IMOD/Dynamo).
    apply_ctf
        Diagnostic switch: False uses ``C_u = C_w = 1`` (no CTF, no dose or tilt weighting).
    backend
        ``auto``, ``numpy`` or ``cupy``.
    memory_budget_bytes
        Budget for the memory plan (None: :meth:`mspecies.core.memory.Availability.default_budget`).
    max_batch
        Upper bound on particles per batch.
    workers
        CPU threads for scipy.fft and the batch steps (None = every core this process may run on,
        :func:`~mspecies.core.backend.usable_cores`).
    """

    output_pixel_size_angst: float
    box_px: int
    particle_diameter_angst: float
    mode: str = "volumes"
    shift_angst: tuple[float, float, float] = (0.0, 0.0, 0.0)
    prerotate: bool = False
    n_tilts_by_dose: int | None = None
    invert_contrast: bool = True
    normalize_input: bool = True
    normalize_output: bool = True
    sparse_ctf: bool = False
    ctf_layout: str = "half"
    ctf_method: str = "direct"
    padding_factor: float = 2.0
    defocus_gradient_sign: int = -1
    apply_ctf: bool = True
    backend: str = "numpy"
    memory_budget_bytes: int | None = None
    max_batch: int = 16
    workers: int | None = None

    def __post_init__(self) -> None:
        checks = [
            ("output_pixel_size_angst", self.output_pixel_size_angst > 0, "a number > 0"),
            ("box_px", int(self.box_px) == self.box_px and self.box_px >= 4 and self.box_px % 2 == 0,
             "an even integer >= 4"),
            ("particle_diameter_angst", self.particle_diameter_angst > 0, "a number > 0"),
            ("padding_factor", bool(np.isfinite(self.padding_factor)) and self.padding_factor >= 1,
             "a finite number >= 1 (2 = M's padded box)"),
            ("mode", self.mode in MODES, f"one of {MODES}"),
            ("ctf_layout", self.ctf_layout in CTF_LAYOUTS, f"one of {CTF_LAYOUTS}"),
            ("ctf_method", self.ctf_method in CTF_METHODS, f"one of {CTF_METHODS}"),
            ("n_tilts_by_dose", self.n_tilts_by_dose is None or self.n_tilts_by_dose >= 1, "None or an integer >= 1"),
            ("defocus_gradient_sign", self.defocus_gradient_sign in (-1, 1), "-1 or +1"),
            ("backend", self.backend in ("auto", "numpy", "cupy"), "auto, numpy or cupy"),
            ("max_batch", self.max_batch >= 1, "an integer >= 1"),
            ("workers", self.workers is None or (int(self.workers) == self.workers and self.workers >= 1),
             "None or an integer >= 1"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise InputError(f"{name}: expected {expected}, got {getattr(self, name)!r}")
        shift = tuple(float(v) for v in np.asarray(self.shift_angst, dtype=np.float64).reshape(-1))
        if len(shift) != 3:
            raise InputError(f"shift_angst: expected 3 values (x, y, z) in Å, got {self.shift_angst!r}")
        object.__setattr__(self, "shift_angst", shift)
        object.__setattr__(self, "box_px", int(self.box_px))

    @property
    def n_workers(self) -> int:
        return self.workers or usable_cores()


# ----------------------------------------------------------------------------------------------- poses


def shifted_positions_angst(particles: ParticlePoses, shift_angst: tuple[float, float, float]) -> np.ndarray:
    """(N, 3) positions moved by ``A · shift`` (shift in the reference-map frame, Å)."""
    shift = np.asarray(shift_angst, dtype=np.float64)
    if not np.any(shift):
        return particles.positions_angst.copy()
    return particles.positions_angst + np.einsum("nij,j->ni", euler_to_matrix(particles.euler_zyz_deg), shift)


def dose_limit_mask(tilt_series: TiltSeriesData, n_tilts_by_dose: int | None) -> np.ndarray:
    """(T,) 1 for the first ``n`` tilts by accumulated dose among the used (not excluded) tilts, else 0."""
    used = np.flatnonzero(~tilt_series.excluded)
    mask = np.zeros(tilt_series.n_tilts, dtype=np.float32)
    order = used[np.argsort(tilt_series.dose_e_per_angst2[used], kind="stable")]
    mask[order if n_tilts_by_dose is None else order[:n_tilts_by_dose]] = 1.0
    return mask


def validate_inputs(tilt_series: TiltSeriesData, options: ExportOptions) -> None:
    """Raise :class:`InputError` for options that cannot work with this tilt series."""
    if options.output_pixel_size_angst < tilt_series.pixel_size_angst * (1 - 1e-6):
        raise InputError(f"output_pixel_size_angst: {options.output_pixel_size_angst} Å is smaller than the "
                         f"tilt-series pixel size {tilt_series.pixel_size_angst} Å of {tilt_series.ts_id}")
    shape = extract.rescaled_shape(tilt_series.image_shape_yx, tilt_series.pixel_size_angst,
                                   options.output_pixel_size_angst)
    if options.box_px > min(shape):
        raise InputError(f"box_px: {options.box_px} px is larger than the images of {tilt_series.ts_id} "
                         f"({shape[1]} x {shape[0]} px at {options.output_pixel_size_angst} Å/px)")
    n_used = int(np.count_nonzero(~tilt_series.excluded))
    if n_used == 0:
        raise InputError(f"{tilt_series.ts_id}: every tilt is excluded")
    if options.n_tilts_by_dose is not None and options.n_tilts_by_dose > n_used:
        raise InputError(f"n_tilts_by_dose: {options.n_tilts_by_dose} tilts asked for but {tilt_series.ts_id} has "
                         f"{n_used} used tilts")
    box_angst = options.box_px * options.output_pixel_size_angst
    if options.particle_diameter_angst > box_angst:
        raise InputError(f"particle_diameter_angst: {options.particle_diameter_angst:g} Å is larger than the box "
                         f"({options.box_px} px x {options.output_pixel_size_angst:g} Å = {box_angst:g} Å)")
    radius = round(options.particle_diameter_angst / options.output_pixel_size_angst / 2)
    if options.normalize_output and radius >= options.box_px * np.sqrt(3) / 2 - 0.5:
        raise InputError(f"particle_diameter_angst: {options.particle_diameter_angst} Å leaves no background "
                         f"in a {options.box_px} px box for output normalisation")


def plan_memory(tilt_series: TiltSeriesData, options: ExportOptions,
                stack_dtype: np.dtype | None = None) -> tuple[int, MemoryPlan]:
    """Validate the options for this tilt series and plan its memory before any work: (padded box M px, plan).

    ``stack_dtype``: the data type of the stack that will be prepared here (NumPy), so that the plan holds the
    preparation's work arrays too (:func:`~mspecies.core.memory.preparation_bytes`); None: no stack is prepared.
    Raises :class:`InputError` when the options cannot work or one particle does not fit the budget.
    """
    validate_inputs(tilt_series, options)
    tilts = np.flatnonzero(~tilt_series.excluded)
    pixel = options.output_pixel_size_angst
    m = options.box_px if options.mode == "series" else extract.padded_box_px(
        tilt_series, options.box_px, pixel, options.particle_diameter_angst, options.padding_factor)
    shape = extract.rescaled_shape(tilt_series.image_shape_yx, tilt_series.pixel_size_angst, pixel)
    xp = select_backend(options.backend)
    volumes = options.mode != "series"
    preparation = None
    if stack_dtype is not None and xp is np:
        preparation = preparation_bytes(tilt_series.image_shape_yx, shape,
                                        converted=np.dtype(stack_dtype) != np.dtype(np.float32))
    budget, source = options.memory_budget_bytes, ""
    free = device_free_bytes(xp) if budget is None else None
    if free is not None:  # CuPy: every array of the plan is on the device
        budget, source = device_budget(free, memory_availability().default_budget())
    plan = plan_batches(m, options.box_px, tilts.size, tilts.size * shape[0] * shape[1],
                        shared_geometry=not options.prerotate, budget_bytes=budget, budget_source=source,
                        max_batch=options.max_batch, padded_ctf=options.ctf_method == "padded",
                        by_lines=volumes and _by_lines(xp, options),
                        compiled_threads=options.n_workers if volumes and options.prerotate and xp is np else 0,
                        preparation=preparation, threads=options.n_workers)
    return m, plan


# ----------------------------------------------------------------------------------------------- engine


@dataclass
class ParticleResult:
    """One exported particle: ``index`` into the particle set, and its arrays (host NumPy, float32)."""

    index: int
    volume: np.ndarray | None = None
    ctf: np.ndarray | None = None
    series: np.ndarray | None = None
    series_tilts: np.ndarray | None = None
    metadata: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class TiltSeriesEngine:
    """Everything about one tilt series that all of its particles share.

    Build with :meth:`create`; then :meth:`reconstruct` yields one :class:`ParticleResult` per particle
    (:meth:`reconstruct_ctfs`: the 3D CTFs alone).

    Dtype policy: images, patches, CTFs, weights and accumulators are float32, spectra complex64; only the
    geometry (positions, orientations, splat coordinates), the per-image phase exponentials and the output
    normalisation statistics are float64. Every array of the batch pipeline keeps the batch as its LAST axis
    from the insertion on, so the sparse products and the FFTs run once per batch, not once per particle.
    """

    tilt_series: TiltSeriesData
    options: ExportOptions
    xp: ModuleType
    prepared: extract.PreparedStack | None
    tilts: np.ndarray
    padded_box_px: int
    grid: insert.SampleGrid
    ctf_tables: extract.CtfTables
    tilt_weights: np.ndarray
    plan: MemoryPlan
    insertion: insert.SharedInsertion | None = None
    scale: np.ndarray | None = None
    direct_ctf: ctf3d.DirectCtf | None = None
    gridding: np.ndarray | None = None
    buffers: dict[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def create(cls, tilt_series: TiltSeriesData, stack: np.ndarray | None, options: ExportOptions, *,
               prepared: extract.PreparedStack | None = None,
               reuse: extract.StackReuse | None = None) -> TiltSeriesEngine:
        """Validate, plan memory, read and preprocess the stack once, and build the shared insertion.

        ``stack`` None builds an engine for :meth:`reconstruct_ctfs` only (the 3D CTF needs no image);
        ``prepared``: the stack already prepared by :func:`prepare_engine_stack` (e.g. on another thread while the
        previous tilt series reconstructs), used instead of ``stack``; ``reuse``: where to take the prepared
        images' array from (:class:`~mspecies.core.extract.StackReuse`).
        """
        m, plan = plan_memory(tilt_series, options, stack.dtype if prepared is None and stack is not None else None)
        xp = select_backend(options.backend)
        tilts = np.flatnonzero(~tilt_series.excluded)
        pixel = options.output_pixel_size_angst
        series = options.mode == "series"
        with_images = prepared is not None or stack is not None
        preparing = None
        if prepared is None and stack is not None:
            threads = plan.preparation_threads if xp is np else 1
            if threads >= 2:  # the pool prepares while this thread builds the geometry
                preparing = _prepare_beside(tilt_series, stack, options, reuse, threads)
            else:
                prepared = prepare_engine_stack(tilt_series, stack, options, reuse=reuse, threads=threads)
        try:
            grid = insert.make_sample_grid(m)
            tables = extract.CtfTables.from_samples(grid.kx, grid.ky, m, pixel, xp=xp)
            engine = cls(tilt_series, options, xp, prepared, tilts, m, grid, tables,
                         _tilt_weights(tilt_series, options, tilts, tables, xp), plan,
                         gridding=_gridding_sinc2(options.box_px, m, xp), buffers=thread_work_buffers(xp))
            if not series and not options.prerotate:
                orientation = insert.slice_orientation(tilt_series.tilt_angles_deg[tilts], tilt_series.xf[tilts])
                if with_images or options.ctf_method == "padded":
                    engine.insertion = build_shared_insertion(orientation, grid, xp=xp,
                                                              y_major_box_px=m if engine.by_lines else None)
                    engine.scale = _normalisation_scale(engine.insertion.multiplicity, m, xp)
                if options.ctf_method == "direct":
                    engine.direct_ctf = ctf3d.DirectCtf.from_pairs(engine._direct_pair_tables(orientation), xp=xp)
        finally:
            if preparing is not None:
                prepared = preparing.result()  # the preparation's own error first: it names the stack and tilt
        engine.prepared = prepared
        return engine

    def _direct_pair_tables(self, orientation: np.ndarray) -> ctf3d.PairTables:
        """Output-grid 3D-CTF pair tables for (T, 3, 2) slice orientations of the used tilts."""
        ts, options, t = self.tilt_series, self.options, self.tilts
        scale = _tilt_scale(ts, options, t)
        return ctf3d.pair_tables(
            ctf3d.slice_coverage(orientation, options.box_px), pixel_size_angst=options.output_pixel_size_angst,
            padded_box_px=self.padded_box_px, defocus_u_angst=ts.defocus_u_angst[t],
            defocus_v_angst=ts.defocus_v_angst[t], defocus_angle_deg=ts.defocus_angle_deg[t],
            phase_shift_deg=ts.phase_shift_deg[t], tilt_weight_scale=scale,
            pre_exposure_e_per_angst2=ts.pre_exposure_e_per_angst2[t], offset_basis=self._offset_basis(),
            microscope=ts.microscope, apply_ctf=options.apply_ctf)

    def _offset_basis(self) -> np.ndarray:
        """(3, T_used): a particle's defocus offset in each used tilt is ``position_angst @ basis`` (Å): the
        defocus-gradient sign × its height, the third row of the tilt rotation applied to the position."""
        sign = self.options.defocus_gradient_sign
        return sign * tilt_rotation(self.tilt_series.tilt_angles_deg[self.tilts])[:, 2, :].T

    def _particle_orientations(self, euler_zyz_deg: np.ndarray) -> np.ndarray:
        """(B, T_used, 3, 2) slice orientations of pre-rotated particles: each particle's rotation applied to the
        used tilts' slices (:func:`insert.slice_orientation`)."""
        return insert.slice_orientation(self.tilt_series.tilt_angles_deg[self.tilts], self.tilt_series.xf[self.tilts],
                                        euler_to_matrix(euler_zyz_deg))

    @property
    def own_volumes(self) -> bool:
        """True when each pre-rotated sub-tomogram is inserted and transformed on its own (:meth:`_own_volumes`:
        NumPy, direct 3D CTF); else through the batch's padded spectra (:meth:`_padded_spectra`)."""
        return self.xp is np and self.options.prerotate and self.options.ctf_method == "direct"

    @property
    def by_lines(self) -> bool:
        """True when the sub-tomograms are inserted and transformed line by line (:meth:`_line_volumes`: NumPy,
        direct 3D CTF, shared insertion); else through whole padded spectra (:meth:`_padded_spectra`)."""
        return _by_lines(self.xp, self.options)

    # ------------------------------------------------------------------------------------------- batches

    def reconstruct(self, particles: ParticlePoses) -> Iterator[ParticleResult]:
        """Yield one result per particle, in order, batch by batch."""
        if self.prepared is None:
            raise InputError("stack: this engine was built without a stack; it can only make 3D CTFs")
        positions = shifted_positions_angst(particles, self.options.shift_angst)
        for start in range(0, len(particles), self.plan.batch_size):
            index = np.arange(start, min(start + self.plan.batch_size, len(particles)))
            if self.options.mode == "series":
                yield from self._series_batch(index, positions[index])
            else:
                yield from self._volume_batch(index, positions[index], particles.euler_zyz_deg[index])

    def reconstruct_ctfs(self, particles: ParticlePoses) -> Iterator[ParticleResult]:
        """Yield the 3D CTF alone of every particle (``ctf`` set, ``volume`` None), bit for bit the one that
        :meth:`reconstruct` gives: the CTF does not depend on the images, so no patch is cut or transformed."""
        if self.options.mode != "volumes":
            raise InputError(f"mode: 3D CTFs need mode 'volumes', got {self.options.mode!r}")
        positions = shifted_positions_angst(particles, self.options.shift_angst)
        for start in range(0, len(particles), self.plan.batch_size):
            index = np.arange(start, min(start + self.plan.batch_size, len(particles)))
            yield from self._volume_batch(index, positions[index], particles.euler_zyz_deg[index], with_data=False)

    def _projections(self, positions_angst: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rescaled image positions (B, T, 2) and defocus U, V (B, T) of the used tilts."""
        raw_px, height = project_positions_to_tilts(positions_angst, self.tilt_series)
        defocus_u, defocus_v = particle_defocus_angst(self.tilt_series, height, self.options.defocus_gradient_sign)
        t = self.tilts
        scale_xy = self.prepared.scale_xy if self.prepared is not None else np.ones(2)
        return raw_px[:, t] * scale_xy, defocus_u[:, t], defocus_v[:, t]

    def _image_samples(self, image_px: np.ndarray, samples: np.ndarray, kwargs: dict[str, int]) -> None:
        """Fill ``samples`` (B, T, S) complex64 with the patch spectra on the samples, centred on the particle,
        ÷ M² (C# FFT scaling).

        One particle's patches are cut and transformed at a time (a (T, M, M) work array that stays in cache),
        so neither all patches nor the full spectra ever exist for the whole batch.
        """
        xp, m, grid = self.xp, self.padded_box_px, self.grid
        batch, n_tilts = image_px.shape[:2]
        fft = extract.fft_module(xp)
        flat_index = xp.asarray(grid.flat_index)
        patches = xp.empty((1, n_tilts, m, m), dtype=self.prepared.images.dtype)
        residual = np.empty(image_px.shape, dtype=np.float64) if xp is np else xp.empty(image_px.shape)
        for b in range(batch):
            patches, residual[b:b + 1] = extract.extract_patches(self.prepared.images, image_px[b:b + 1], self.tilts,
                                                                 m, xp=xp, out=patches)
            spectra = fft.rfft2(patches[0], **kwargs)
            xp.take(spectra.reshape(n_tilts, -1), flat_index, axis=1, out=samples[b])
        centre = xp.asarray(residual) + m // 2
        for block in self._sample_blocks(0, batch):
            samples[block] *= extract.shift_phase(grid.kx, grid.ky, centre[block], m, xp=xp, scale=1.0 / (m * m))

    SAMPLE_BLOCK = 2**21
    """Samples per block of :meth:`_sample_blocks` (8 MiB of float32, 16 MiB of complex64)."""

    def _sample_blocks(self, first: int, last: int) -> Iterator[tuple[int | slice, slice]]:
        """Index (particles, tilts) of the blocks in which the per-sample values of particles ``first`` to
        ``last`` (excluded) are computed: with NumPy one particle and at most :attr:`SAMPLE_BLOCK` samples (whole
        tilts) at a time, so that every temporary is below glibc's 32 MiB mmap threshold and reuses freed heap
        pages (a whole batch's temporaries were mapped afresh and zeroed by the kernel for every batch: 33–67 MiB
        each at box 128); on a GPU the whole batch at once. The values are element-wise, so blocks do not change
        them."""
        n_tilts = self.tilts.size
        if self.xp is not np:
            yield slice(first, last), slice(0, n_tilts)
            return
        step = max(1, self.SAMPLE_BLOCK // max(1, self.grid.n_samples))
        for b in range(first, last):
            for start in range(0, n_tilts, step):
                yield b, slice(start, min(start + step, n_tilts))

    def _sample_values(self, positions_angst: np.ndarray, with_data: bool = True, reserve: int = 0
                       ) -> tuple[np.ndarray | None, np.ndarray, np.ndarray | None]:
        """Per-sample values of a batch → data F·C_w (B, C) complex64 (None without data), |C_u| and C_u·C_w
        (B, C) float32 (work buffers, valid until the next batch; C_u·C_w None with the direct 3D CTF).
        ``reserve``: complex64 elements the data's buffer holds at least (another array of the batch shares it
        once the data are used).

        With a thread pool the batch is split into runs of particles, one per thread (single-threaded FFTs
        inside): every value is computed per particle, so the split does not change them.
        """
        xp = self.xp
        image_px, defocus_u, defocus_v = self._projections(positions_angst)
        batch, n_tilts = image_px.shape[:2]
        shape = (batch, n_tilts, self.grid.n_samples)
        n_columns = n_tilts * self.grid.n_samples
        apply_ctf = self.options.apply_ctf
        padded_ctf = self.options.ctf_method == "padded"
        samples = weight = ctf = None
        if with_data:
            samples = self._buffer("samples", shape, xp.complex64, reserve=reserve)
        if apply_ctf:
            weight = self._buffer("weight", shape)
            ctf = self._buffer("ctf", shape) if padded_ctf else None
        pool = self._pool()
        kwargs = extract.fft_kwargs(xp, 1) if pool is not None else self._fft()[1]

        def fill(first: int, last: int) -> None:
            if with_data:
                self._image_samples(image_px[first:last], samples[first:last], kwargs)
            if not apply_ctf:
                return
            for block in self._sample_blocks(first, last):
                tilts = block[1]
                c_u = self._ctf_u(self.ctf_tables, defocus_u[block], defocus_v[block], tilts)
                c_w = c_u * self.tilt_weights[tilts]
                if with_data:
                    samples[block] *= c_w
                if ctf is not None:
                    xp.multiply(c_w, c_u, out=ctf[block])
                xp.abs(c_u, out=weight[block])

        insert.run_split(pool, fill, batch)
        if samples is not None:
            samples = samples.reshape(batch, -1)
        if not apply_ctf:
            ones = xp.ones((batch, n_columns), dtype=xp.float32)
            return samples, ones, ones if padded_ctf else None
        return samples, weight.reshape(batch, -1), None if ctf is None else ctf.reshape(batch, -1)

    def _ctf_u(self, tables: extract.CtfTables, defocus_u: np.ndarray, defocus_v: np.ndarray,
               tilts: slice = slice(None)) -> np.ndarray:
        """(..., T, S) unweighted CTF of the used tilts (those of ``tilts``, a slice of them, when given) with the
        particles' own defocus ((..., T) Å)."""
        xp, ts = self.xp, self.tilt_series
        return extract.ctf_samples(tables, xp.asarray(defocus_u), xp.asarray(defocus_v),
                                   xp.asarray(ts.defocus_angle_deg[self.tilts][tilts]),
                                   xp.asarray(ts.phase_shift_deg[self.tilts][tilts]), ts.microscope, xp=xp)

    def _volume_batch(self, index: np.ndarray, positions_angst: np.ndarray, euler_zyz_deg: np.ndarray,
                      with_data: bool = True) -> Iterator[ParticleResult]:
        direct = self.options.ctf_method == "direct"
        spectrum = ctf_spectrum = None
        by_lines = with_data and self.by_lines
        own = with_data and self.own_volumes
        if (with_data or not direct) and not by_lines and not own:
            spectrum, ctf_spectrum = self._padded_spectra(positions_angst, euler_zyz_deg, with_data)
        volumes = None
        if by_lines:
            volumes = self._line_volumes(positions_angst)
        elif own:
            volumes = self._own_volumes(positions_angst, euler_zyz_deg)
        if spectrum is not None:
            volumes = self._inverse_volumes(spectrum)
            del spectrum
        if direct:
            ctf_volumes = self._direct_ctfs(positions_angst, euler_zyz_deg)
        else:
            ctf_volumes = self._inverse_ctfs(ctf_spectrum, index.size)
        finished: list[tuple[np.ndarray | None, np.ndarray]] = [None] * index.size  # type: ignore[list-item]

        def finish(first: int, last: int) -> None:
            for b in range(first, last):
                finished[b] = (None if volumes is None else self._finish_volume(volumes[b], divided=by_lines or own),
                               self._finish_ctf(ctf_volumes[b], scaled=not direct))

        insert.run_split(self._pool(), finish, index.size)
        for b in range(index.size):
            yield ParticleResult(int(index[b]), volume=finished[b][0], ctf=finished[b][1])

    def _padded_spectra(self, positions_angst: np.ndarray, euler_zyz_deg: np.ndarray, with_data: bool
                        ) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Normalised padded half spectra (n_voxels, B) of the data (None without data) and of the CTF
        numerator (None with the direct 3D CTF)."""
        data, weight, ctf = self._sample_values(positions_angst, with_data)
        if self.insertion is None:
            return self._insert_prerotated(data, weight, ctf, euler_zyz_deg)
        batch, n_columns = weight.shape
        quantities = (2 if with_data else 0) + (1 if ctf is None else 2)
        columns = insert.sample_columns(data, weight, ctf, self.insertion.column_sign, xp=self.xp,
                                        out=self._buffer("columns", (n_columns, quantities * batch)), pool=self._pool())
        del data, weight
        shape = (self.insertion.n_voxels, batch)
        buffers = (self._buffer("spectrum", shape, self.xp.complex64), None if ctf is None else self._ctf_buffer(shape))
        return insert.insert_normalised(self.insertion, columns, self.scale, WEIGHT_FLOOR, batch=batch,
                                        with_data=with_data, with_ctf=ctf is not None, xp=self.xp, buffers=buffers,
                                        pool=self._pool())

    def _line_volumes(self, positions_angst: np.ndarray) -> list[np.ndarray]:
        """B new (N, N, N) float32 sub-tomograms (÷ sinc², not output-normalised), inserted and transformed line
        by line: the values of :meth:`_padded_spectra` and :meth:`_inverse_volumes`, without whole spectra.

        The insertion is y-major (one row block per y, :func:`~.shared_insertion.build_shared_insertion`): each
        block is inserted, normalised and transformed along z while it is in cache, and only the N central planes are
        kept, in a (N, M, M//2+1, B) array (half a padded spectrum); each of those planes is then transformed
        along y, cropped, transformed along x (C2R), cropped and divided by sinc² into the particles' volumes.
        The threads of the pool share the lines (single-threaded transforms); every line is transformed as
        in the whole-spectrum passes, so the values are the same.
        """
        m, n = self.padded_box_px, self.options.box_px
        fft = extract.fft_module(np)
        batch = positions_angst.shape[0]
        planes = (n, m, m // 2 + 1, batch)
        # the planes take the samples' storage, free once the columns hold them: the samples' pages are not
        # faulted in apart (34 MB at box 64, 135 MB at box 128, in batches of 16)
        data, weight, _ = self._sample_values(positions_angst, reserve=int(np.prod(planes)))
        n_columns = weight.shape[1]
        pool = self._pool()
        columns = insert.sample_columns(data, weight, None, self.insertion.column_sign,
                                        out=self._buffer("columns", (n_columns, 3 * batch)), pool=pool)
        del data, weight
        mirrored = insert.mirrored_columns(self.insertion, columns, 2 * batch)
        crop = slice(m // 2 - n // 2, m // 2 + n // 2)
        partial = self._buffer("samples", planes, np.complex64)

        def along_z(first: int, last: int) -> None:
            line = np.empty((m, m // 2 + 1, batch), dtype=np.complex64)
            for y in range(first, last):
                voxels = self.insertion.block_voxels[y]
                values = np.empty((voxels.size, batch), dtype=np.complex64)
                insert.normalise_block(self.insertion, y, columns, mirrored, self.scale, WEIGHT_FLOOR, batch=batch,
                                       n_data=2 * batch, spectrum=values)
                flat = line.reshape(-1, batch)
                flat.fill(0)  # the voxels no sample reaches
                flat[voxels - self.insertion.bounds[y][0]] = values
                partial[:, y] = fft.ifft(line, axis=0, norm="forward", overwrite_x=True, workers=1)[crop]

        insert.run_split(pool, along_z, m, insert.block_cuts(self.insertion, pool))
        volumes = [np.empty((n, n, n), dtype=np.float32) for _ in range(batch)]

        def along_y_x(first: int, last: int) -> None:
            for z in range(first, last):
                plane = fft.ifft(partial[z], axis=0, norm="forward", overwrite_x=True, workers=1)[crop]
                real = fft.irfft(plane, n=m, axis=1, norm="forward", workers=1)[:, crop]
                for b in range(batch):
                    np.divide(real[..., b], self.gridding[z], out=volumes[b][z])

        insert.run_split(pool, along_y_x, n)
        return volumes

    def _own_volumes(self, positions_angst: np.ndarray, euler_zyz_deg: np.ndarray) -> list[np.ndarray]:
        """B new (N, N, N) float32 pre-rotated sub-tomograms (÷ sinc², not output-normalised), one particle at a
        time on each pool thread: its own insertion and normalisation (:func:`mspecies.core.kernels.
        splat_normalised`) into a padded half spectrum of the thread's, then its inverse transform on that
        thread. The values of :meth:`_padded_spectra` and :meth:`_inverse_volumes` for the batch."""
        m = self.padded_box_px
        data, weight, _ = self._sample_values(positions_angst)
        orientation = self._particle_orientations(euler_zyz_deg)
        checker = _checkerboard(m)
        volumes: list[np.ndarray] = [None] * weight.shape[0]  # type: ignore[list-item]

        def own(b: int) -> None:
            buffers = thread_work_buffers(np)
            spectrum = buffers.get("own_spectrum")
            if spectrum is None or spectrum.shape[0] != m * m * (m // 2 + 1):
                spectrum = buffers["own_spectrum"] = np.empty((m * m * (m // 2 + 1), 1), dtype=np.complex64)
            _kernels().splat_normalised(orientation[b], self.grid.kx, self.grid.ky, m, data[b], weight[b], None,
                                        checker, WEIGHT_FLOOR, spectrum, None, 0)
            volumes[b] = np.divide(self._inverse_volumes(spectrum, workers=1)[0], self.gridding, dtype=np.float32)

        insert.run_each(self._pool(), own, len(volumes))
        return volumes

    def _direct_ctfs(self, positions_angst: np.ndarray, euler_zyz_deg: np.ndarray) -> list[np.ndarray]:
        """B new (N, N, N//2+1) output-grid 3D CTFs (:mod:`mspecies.core.ctf3d`); pre-rotated particles each
        get their own coverage, evaluated by :func:`mspecies.core.kernels.rotated_ctf` (host arrays, copied to the
        device)."""
        if self.direct_ctf is not None:
            return self.direct_ctf.evaluate(positions_angst, pool=self._pool())
        orientation = self._particle_orientations(euler_zyz_deg)
        ctfs: list[np.ndarray] = [None] * positions_angst.shape[0]  # type: ignore[list-item]

        ts, options, t = self.tilt_series, self.options, self.tilts
        offsets = positions_angst @ self._offset_basis()  # (B, T) particle − tilt defocus, Å
        scale = _tilt_scale(ts, options, t)

        def own(b: int) -> None:
            ctfs[b] = self.xp.asarray(_kernels().rotated_ctf(
                orientation[b], box_px=options.box_px, padded_box_px=self.padded_box_px,
                pixel_size_angst=options.output_pixel_size_angst, defocus_u_angst=ts.defocus_u_angst[t],
                defocus_v_angst=ts.defocus_v_angst[t], defocus_angle_deg=ts.defocus_angle_deg[t],
                phase_shift_deg=ts.phase_shift_deg[t], tilt_weight_scale=scale,
                pre_exposure_e_per_angst2=ts.pre_exposure_e_per_angst2[t], defocus_offset_angst=offsets[b],
                microscope=ts.microscope, apply_ctf=options.apply_ctf))

        insert.run_each(self._pool(), own, len(ctfs))
        return ctfs

    def _insert_prerotated(self, data: np.ndarray | None, weight: np.ndarray, ctf: np.ndarray | None,
                           euler_zyz_deg: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Each particle splatted with its own orientation → normalised spectra (n_voxels, B) (CTF None when
        ``ctf`` is None): the compiled kernel on NumPy (:func:`mspecies.core.kernels.splat_normalised`), its NumPy
        statement (``splat_entries`` + ``insert_one``) on CuPy."""
        xp, m = self.xp, self.padded_box_px
        orientation = self._particle_orientations(euler_zyz_deg)
        batch = weight.shape[0]
        n_voxels = m * m * (m // 2 + 1)
        spectrum = None if data is None else self._buffer("spectrum", (n_voxels, batch), xp.complex64)
        ctf_spectrum = None if ctf is None else self._ctf_buffer((n_voxels, batch))
        if xp is np:  # compiled, one pass per particle, each writing its own columns
            checker = _checkerboard(m)

            def compiled(b: int) -> None:
                _kernels().splat_normalised(orientation[b], self.grid.kx, self.grid.ky, m,
                                            None if data is None else data[b], weight[b],
                                            None if ctf is None else ctf[b], checker, WEIGHT_FLOOR, spectrum,
                                            ctf_spectrum, b)

            insert.run_each(self._pool(), compiled, batch)
            return spectrum, ctf_spectrum
        zeros = xp.zeros(weight.shape[1], dtype=xp.complex64)

        def own(first: int, last: int) -> None:
            for b in range(first, last):
                splat = insert.splat_entries(orientation[b], self.grid, xp=xp)
                d_re, d_im, w1, d2, w0 = insert.insert_one(splat, zeros if data is None else data[b], weight[b],
                                                           None if ctf is None else ctf[b], xp=xp)
                factor = _normalisation_scale(w0, m, xp) / xp.maximum(w1, xp.float32(WEIGHT_FLOOR))
                if ctf_spectrum is not None:
                    ctf_spectrum[:, b] = d2 * factor
                if spectrum is not None:
                    spectrum[:, b] = (d_re * factor) + 1j * (d_im * factor)

        insert.run_split(self._pool(), own, batch)  # each particle writes its own columns
        return spectrum, ctf_spectrum

    def _pool(self) -> insert.WorkerPool | None:
        """Process-wide pool of ``n_workers`` threads for the batch steps that NumPy/SciPy run single-threaded
        (sparse products, normalisation, sample values, CTF pair separation and assembly, per-particle finish);
        None (serial) for one worker or CuPy."""
        return insert.thread_pool(self.options.n_workers) if self.xp is np else None

    def _buffer(self, name: str, shape: tuple[int, ...], dtype: type = np.float32, reserve: int = 0) -> np.ndarray:
        """A work array kept across batches and engines (uninitialised, :func:`thread_work_buffers`): fresh
        large allocations cost more than the arithmetic here (the kernel zeroes every new page). The storage
        only grows: a smaller batch (the last one) gets a contiguous view of the front of it. ``reserve``: the
        elements a new storage holds at least, for a later array of the same name and dtype that takes it over
        (one name, one array alive at a time)."""
        size = int(np.prod(shape))
        storage = self.buffers.get(name)
        if storage is None or storage.size < size or storage.dtype != dtype:
            storage = self.buffers[name] = self.xp.empty(max(size, reserve), dtype=dtype)
        return storage[:size].reshape(shape)

    def _ctf_buffer(self, shape: tuple[int, int]) -> np.ndarray:
        """(n_voxels, B rounded up to even) float32: pairs of CTF spectra are read as one complex64 column;
        the padding column of an odd batch is zero."""
        n_voxels, batch = shape
        buffer = self._buffer("ctf_spectrum", (n_voxels, batch + batch % 2))
        buffer[:, batch:] = 0
        return buffer

    # ------------------------------------------------------------------------------------------- inverse FFTs

    def _fft(self) -> tuple[ModuleType, dict[str, int]]:
        return extract.fft_module(self.xp), extract.fft_kwargs(self.xp, self.options.n_workers)

    def _inverse_volumes(self, spectrum: np.ndarray, workers: int | None = None) -> np.ndarray:
        """Normalised half spectra (n_voxels, B) → (B, N, N, N) sub-tomogram views, float32, not yet ÷ sinc²(r/M)
        (:meth:`_finish_volume` divides while it copies each particle out); ``workers``: threads of the
        transforms (default all, :attr:`ExportOptions.n_workers`).

        The spectra carry the checkerboard (−1)^(kz+ky+kx) of :func:`_normalisation_scale`, which moves the
        particle centre from voxel 0 to M/2: the central N³ crop is a slice, taken after each axis so only the
        needed lines are transformed, in place. The spectra are zero at |k| ≥ M/2 (the insertion never reaches those
        voxels, so their multiplicity and hence their value is 0: the C# ``DecenterKernel`` mask).
        """
        xp, m, n = self.xp, self.padded_box_px, self.options.box_px
        fft, kwargs = self._fft()
        if workers is not None:
            kwargs = extract.fft_kwargs(xp, workers)
        crop = slice(m // 2 - n // 2, m // 2 + n // 2)
        batch = spectrum.shape[-1]
        partial = fft.ifft(spectrum.reshape(m, m, m // 2 + 1, batch), axis=0, norm="forward", overwrite_x=True,
                           **kwargs)[crop]
        partial = fft.ifft(partial, axis=1, norm="forward", overwrite_x=True, **kwargs)[:, crop]
        volumes = fft.irfft(partial, n=m, axis=2, norm="forward", **kwargs)[:, :, crop]
        return xp.moveaxis(volumes, 3, 0)  # ÷ sinc² per particle in _finish_volume

    def _inverse_ctfs(self, ctf_spectrum: np.ndarray, batch: int) -> np.ndarray:
        """Normalised real CTF half spectra (n_voxels, B even) → (B, N, N, N//2+1) float32 3D CTFs (half layout).

        The CTF spectrum P is real and even, so its (checkerboarded) inverse transform p is real and
        point-symmetric about M/2. Along z, two particles' real spectra are transformed at once as the real
        and imaginary parts of one complex line (in place) and separated by Hermitian symmetry, only on the
        planes z ≤ M/2 of the crop; the planes z > M/2 are ``p(M − z, M − y, M − x)``. The crop (÷ sinc²) is
        then transformed back (÷ M²) and its real part kept, exactly as the full transform would.
        The views returned are not yet ÷ M²: :meth:`_finish_ctf` scales while it copies each particle out.
        """
        xp, m, n = self.xp, self.padded_box_px, self.options.box_px
        fft, kwargs = self._fft()
        low = m // 2 - n // 2
        wide = slice(low, low + n + 1)
        packed = ctf_spectrum.view(xp.complex64).reshape(m, m, m // 2 + 1, -1)
        packed = fft.ifft(packed, axis=0, norm="forward", overwrite_x=True, **kwargs)
        planes = np.arange(low, m // 2 + 1)
        pool = self._pool()
        partial = xp.empty((planes.size,) + packed.shape[1:-1] + (2 * packed.shape[-1],), dtype=xp.complex64)

        def separate(first: int, last: int) -> None:
            chunk = planes[first:last]
            _separate_pairs(packed[chunk], xp.conjugate(packed[(m - chunk) % m]), xp, out=partial[first:last])

        insert.run_split(pool, separate, planes.size)
        partial = fft.ifft(partial, axis=1, norm="forward", overwrite_x=True, **kwargs)[:, wide]
        lower = fft.irfft(partial, n=m, axis=2, norm="forward", **kwargs)[:, :, wide]  # (N/2+1, N+1, N+1, B)
        # psf = lower (z ≤ N/2) and its point mirror (z > N/2), ÷ sinc², written straight to its ifftshift
        # position (a permutation): ifftshift(psf)[z'] = psf[(z' + N/2) mod N], likewise along y and x.
        psf = xp.empty((n, n, n, batch), dtype=xp.float32)
        h = n // 2

        def assemble(first: int, last: int) -> None:
            for z in range(first, last):
                plane = lower[z, :n, :n, :batch] if z <= h else lower[n - z, n:0:-1, n:0:-1, :batch]
                sinc2, target = self.gridding[z][..., None], psf[(z - h) % n]
                for (ys, yd), (xs, xd) in itertools.product(((slice(h, n), slice(0, h)), (slice(0, h), slice(h, n))),
                                                            repeat=2):
                    xp.divide(plane[ys, xs], sinc2[ys, xs], out=target[yd, xd])

        insert.run_split(pool, assemble, n)
        ctf = fft.rfftn(psf, axes=(0, 1, 2), **kwargs).real
        return xp.moveaxis(ctf, 3, 0)  # × 1/M² per particle in _finish_ctf

    def _finish_volume(self, volume: np.ndarray, divided: bool = False) -> np.ndarray:
        """(N, N, N) sub-tomogram view → ÷ sinc², output-normalised (optional), contiguous host float32.
        ``divided``: a new contiguous array of its own, already ÷ sinc² (normalised in place)."""
        xp = self.xp
        if not divided:
            volume = xp.ascontiguousarray(xp.divide(volume, self.gridding, dtype=xp.float32))
        if self.options.normalize_output:
            volume = normalize_outside_radius(volume, self._mask_radius_px(), xp=xp, in_place=divided)
        return to_numpy(volume)

    def _finish_ctf(self, ctf_volume: np.ndarray, scaled: bool = True) -> np.ndarray:
        """(N, N, N//2+1) 3D CTF → sparse (optional), layout, contiguous host float32. ``scaled`` (the padded
        method): a view of a work buffer, ÷ M² into a new array; else (direct) a new array of its own, kept."""
        xp = self.xp
        m = self.padded_box_px
        if scaled:
            ctf_volume = xp.ascontiguousarray(xp.multiply(ctf_volume, np.float32(1.0 / (m * m)), dtype=xp.float32))
        if self.options.sparse_ctf:
            ctf_volume = xp.where(xp.abs(ctf_volume) < SPARSE_THRESHOLD, xp.float32(0), ctf_volume)
        if self.options.ctf_layout == "centred":
            ctf_volume = half_to_centred_cube(ctf_volume, xp=xp)
        return to_numpy(ctf_volume)

    def _mask_radius_px(self) -> int:
        return int(round(self.options.particle_diameter_angst / self.options.output_pixel_size_angst / 2))

    # ------------------------------------------------------------------------------------------- series

    def _series_batch(self, index: np.ndarray, positions_angst: np.ndarray) -> Iterator[ParticleResult]:
        """2D tilt images per particle, sub-pixel centred on N/2 and CTF-premultiplied (m_reference §6.4)."""
        xp, n = self.xp, self.options.box_px
        image_px, defocus_u, defocus_v = self._projections(positions_angst)
        # as RELION's extraction (extraction.h:127-214): the box at round(q) − N/2, the sub-pixel rest (≤ ½ px) by
        # a Fourier shift; a truncated corner would shift up to 1 px and wrap more of the box edge into it
        patches, residual = extract.extract_patches(self.prepared.images, image_px + 0.5, self.tilts, n, xp=xp)
        residual = residual + 0.5
        fft = extract.fft_module(xp)
        kwargs = extract.fft_kwargs(xp, self.options.n_workers)
        spectra = fft.rfft2(patches, **kwargs)
        ky = xp.asarray(np.fft.fftfreq(n, 1.0 / n), dtype=xp.float32)[:, None]
        kx = xp.asarray(np.arange(n // 2 + 1), dtype=xp.float32)[None, :]
        residual = xp.asarray(residual)
        phase = (-2.0 * np.pi / n) * (residual[..., 0, None, None] * kx + residual[..., 1, None, None] * ky)
        spectra = spectra * xp.exp(1j * phase.astype(xp.float32))
        if self.options.apply_ctf:
            spectra = spectra * self._series_filter(defocus_u, defocus_v)
        images = fft.irfft2(spectra, s=(n, n), **kwargs).astype(xp.float32)
        visible = self._visible(image_px)
        pre_exposure = self.tilt_series.pre_exposure_e_per_angst2[self.tilts]
        limited = self.tilt_weights_by_tilt > 0
        for b in range(index.size):
            used = visible[b] & limited
            yield ParticleResult(int(index[b]), series=to_numpy(images[b][xp.asarray(used)]),
                                 series_tilts=self.tilts[used],
                                 metadata={"tilt_index": self.tilts[used],
                                           "tilt_angle_deg": self.tilt_series.tilt_angles_deg[self.tilts][used],
                                           "defocus_u_angst": defocus_u[b][used], "defocus_v_angst": defocus_v[b][used],
                                           "pre_exposure_e_per_angst2": pre_exposure[used],
                                           "position_px": image_px[b][used]})

    @property
    def tilt_weights_by_tilt(self) -> np.ndarray:
        return dose_limit_mask(self.tilt_series, self.options.n_tilts_by_dose)[self.tilts]

    def _series_filter(self, defocus_u: np.ndarray, defocus_v: np.ndarray) -> np.ndarray:
        """(B, T, N, N//2+1) ``C_u · exp(−0.5 pre-exposure / d0(k))`` (Grant–Grigorieff critical exposure): what
        RELION 5 premultiplies its 2D stacks with and what ``relion_refine`` models (``subtomo.cpp:779-796``,
        ``damage.cpp:137-175``; no cos θ, which RELION's model would not know)."""
        xp, n, pixel = self.xp, self.options.box_px, self.options.output_pixel_size_angst
        ky = np.fft.fftfreq(n, 1.0 / n)[:, None] * np.ones((1, n // 2 + 1))
        kx = np.arange(n // 2 + 1)[None, :] * np.ones((n, 1))
        tables = extract.CtfTables.from_samples(kx.ravel(), ky.ravel(), n, pixel, xp=xp)
        ts = self.tilt_series
        c_u = self._ctf_u(tables, defocus_u, defocus_v)
        k = np.sqrt(tables.k2.astype(np.float64)) if xp is np else xp.sqrt(tables.k2.astype(xp.float64))
        with np.errstate(divide="ignore"):
            critical = 0.245 * xp.where(k > 0, k, 1.0) ** -1.665 + 2.81
        pre = xp.asarray(ts.pre_exposure_e_per_angst2[self.tilts])[:, None]
        weight = xp.where(k > 0, xp.exp(-0.5 * pre / critical), 1.0)
        filt = (c_u * weight.astype(xp.float32)).reshape(c_u.shape[:2] + (n, n // 2 + 1))
        return filt

    def _visible(self, image_px: np.ndarray) -> np.ndarray:
        """(B, T) bool: the particle centre lies farther than half a box from every image edge (RELION 5's rule,
        ``tomogram.cpp:155-161`` with radius = binning · box / 2, so that ``rlnTomoVisibleFrames`` is RELION's)."""
        ny, nx = self.prepared.images.shape[1:]
        margin = self.options.box_px / 2
        x, y = image_px[..., 0], image_px[..., 1]
        return (x > margin) & (x < nx - margin) & (y > margin) & (y < ny - margin)


def _kernels() -> ModuleType:
    """:mod:`mspecies.core.kernels`, imported at the first pre-rotated particle: importing Numba takes 0.15–0.4 s,
    which every other export, and every command that imports this module, would pay for nothing."""
    from . import kernels

    return kernels


_THREAD_BUFFERS = threading.local()


def _prepare_beside(tilt_series: TiltSeriesData, stack: np.ndarray, options: ExportOptions,
                    reuse: extract.StackReuse | None = None, threads: int | None = None) -> Future:
    """:func:`prepare_engine_stack` started on a thread of its own: its pool's threads do the work while the
    calling thread builds the geometry, which is single-threaded (0.1 s at box 64, 0.46 s at box 128). The future's
    ``result()`` gives the prepared stack or raises the preparation's error."""
    helper = ThreadPoolExecutor(1, thread_name_prefix="mspecies-prepare")
    try:
        return helper.submit(prepare_engine_stack, tilt_series, stack, options, reuse=reuse, threads=threads)
    finally:
        helper.shutdown(wait=False)  # the thread ends with its one task


def prepare_engine_stack(tilt_series: TiltSeriesData, stack: np.ndarray, options: ExportOptions, *,
                         pool: insert.WorkerPool | None = None,
                         reuse: extract.StackReuse | None = None,
                         threads: int | None = None) -> extract.PreparedStack:
    """The used tilts of ``stack`` read and preprocessed as :meth:`TiltSeriesEngine.create` needs them, on the
    threads of ``pool`` (default: the process-wide pool of ``threads`` threads, default ``options.n_workers``: the
    memory plan's :attr:`~mspecies.core.memory.MemoryPlan.preparation_threads`), into ``reuse``'s array where it
    fits; the values depend on none of them."""
    xp = select_backend(options.backend)
    pool = pool or insert.thread_pool(options.n_workers if threads is None else threads)
    return extract.prepare_stack(
        stack, tilt_series, options.output_pixel_size_angst, options.box_px, normalize=options.normalize_input,
        invert=options.invert_contrast, xp=xp, workers=options.n_workers, tilts=np.flatnonzero(~tilt_series.excluded),
        pool=pool if xp is np else None, reuse=reuse)


def thread_work_buffers(xp: ModuleType) -> dict[str, np.ndarray]:
    """The work arrays of the engines of this thread on ``xp``'s device, by name (:meth:`TiltSeriesEngine._buffer`).

    Engines are built one per tilt series; sharing their work arrays spares every tilt series after the first
    the page faults of arrays of hundreds of MB (the first pass of an engine cost 1.5–2× a warm one). A batch
    uses them only while it is computed (its results are new arrays), so engines of one thread may alternate;
    engines on other threads get their own. The arrays stay allocated for the life of the thread, at the size
    of the largest batch seen; :func:`release_work_buffers` frees them.
    """
    by_module = getattr(_THREAD_BUFFERS, "by_module", None)
    if by_module is None:
        by_module = _THREAD_BUFFERS.by_module = {}
    return by_module.setdefault(xp.__name__, {})


def release_work_buffers() -> None:
    """Free this thread's kept work arrays (engines built later allocate new ones)."""
    _THREAD_BUFFERS.by_module = {}


def _by_lines(xp: ModuleType, options: ExportOptions) -> bool:
    """See :attr:`TiltSeriesEngine.by_lines`."""
    return xp is np and options.ctf_method == "direct" and not options.prerotate


def _tilt_scale(tilt_series: TiltSeriesData, options: ExportOptions, tilts: np.ndarray) -> np.ndarray:
    """(T_used,) float64 ``cos θ · dose-limit mask``: the k-independent part of C_w / C_u."""
    return np.cos(np.deg2rad(tilt_series.tilt_angles_deg[tilts])) * dose_limit_mask(tilt_series,
                                                                                     options.n_tilts_by_dose)[tilts]


def _tilt_weights(tilt_series: TiltSeriesData, options: ExportOptions, tilts: np.ndarray, tables: extract.CtfTables,
                  xp: ModuleType) -> np.ndarray:
    """(T_used, S) float32 ``cos θ · exp(−pre-exposure · k²) · dose-limit mask`` (C_w / C_u)."""
    scale = _tilt_scale(tilt_series, options, tilts)
    pre = xp.asarray(tilt_series.pre_exposure_e_per_angst2[tilts], dtype=xp.float32)[:, None]
    return (xp.asarray(scale, dtype=xp.float32)[:, None] * xp.exp(-pre * tables.k2[None, :])).astype(xp.float32)


def _normalisation_scale(multiplicity: np.ndarray, m: int, xp: ModuleType) -> np.ndarray:
    """(n_voxels,) float32 ``min(1, W0) · (−1)^(kz+ky+kx) / M`` on the (M, M, M//2+1) half layout.

    ``min(1, W0)`` is the numerator of the normalisation; the checkerboard moves the reconstructed origin to
    voxel M/2 (so the central crop is a slice); 1/M is the C# scaling (unnormalised C2R × M² of an FFT that
    numpy scales by 1/M³).
    """
    return xp.minimum(multiplicity, xp.float32(1.0)).astype(xp.float32) * xp.asarray(_checkerboard(m))


@functools.lru_cache(maxsize=4)
def _checkerboard(m: int) -> np.ndarray:
    """(M·M·(M//2+1),) float32 ``(−1)^(kz+ky+kx) / M`` (read-only, cached: pre-rotated particles each need it)."""
    parity = (np.arange(m)[:, None, None] + np.arange(m)[None, :, None] + np.arange(m // 2 + 1)[None, None, :]) % 2
    checker = (1.0 - 2.0 * parity).astype(np.float32).reshape(-1) / np.float32(m)
    checker.flags.writeable = False
    return checker


def _separate_pairs(packed: np.ndarray, mirrored_conj: np.ndarray, xp: ModuleType,
                    out: np.ndarray | None = None) -> np.ndarray:
    """Transforms of two real lines from the transform Z of ``a + i b`` → (..., 2 · B/2) complex64.

    With ``packed`` = Z(z) and ``mirrored_conj`` = conj(Z(−z)) (..., B/2): A(z) = (Z(z) + conj Z(−z)) / 2 and
    B(z) = (Z(z) − conj Z(−z)) / 2i, interleaved as columns 2j (real part's particle) and 2j + 1.
    """
    if out is None:
        out = xp.empty(packed.shape[:-1] + (2 * packed.shape[-1],), dtype=xp.complex64)
    xp.add(packed, mirrored_conj, out=out[..., 0::2])
    out[..., 0::2] *= xp.float32(0.5)
    xp.subtract(packed, mirrored_conj, out=out[..., 1::2])
    out[..., 1::2] *= xp.complex64(-0.5j)
    return out


def _gridding_sinc2(n: int, m: int, xp: ModuleType) -> np.ndarray:
    """(N, N, N) ``sinc²(|v − N/2| / M)`` (trilinear-interpolation attenuation) on ``xp``'s device."""
    return xp.asarray(_host_gridding_sinc2(n, m))


@functools.lru_cache(maxsize=4)
def _host_gridding_sinc2(n: int, m: int) -> np.ndarray:
    """:func:`_gridding_sinc2` in host memory (read-only, cached: every tilt series of an export needs it)."""
    axis = np.arange(n) - n // 2
    r = np.sqrt(axis[:, None, None] ** 2 + axis[None, :, None] ** 2 + axis[None, None, :] ** 2) / m
    sinc2 = (np.sinc(r) ** 2).astype(np.float32)
    sinc2.flags.writeable = False
    return sinc2


def _outside_mask(n: int, radius_px: float, xp: ModuleType = np) -> np.ndarray:
    """(N, N, N) bool on ``xp``'s device: voxels farther than ``radius_px`` from the centre N/2."""
    axis = xp.arange(n) - n // 2
    return axis[:, None, None] ** 2 + axis[None, :, None] ** 2 + axis[None, None, :] ** 2 > radius_px**2


def normalize_outside_radius(volume: np.ndarray, radius_px: float, *, xp: ModuleType = np,
                             in_place: bool = False) -> np.ndarray:
    """Mean 0, population sd 1 over the voxels farther than ``radius_px`` from the centre N/2 (float32;
    ``in_place``: ``volume``, a float32 array, is changed and returned). The mean and sd are float64 sums over
    those voxels in C order (as ``ndarray.mean`` and ``ndarray.std`` of their float64 copy)."""
    n = volume.shape[0]
    if xp is np:
        background = _background_values(volume, float(radius_px))
        mean = background.mean()
        np.subtract(background, mean, out=background)  # ndarray.std's own steps, in place (same values)
        np.multiply(background, background, out=background)
        sd = float(np.sqrt(np.add.reduce(background) / background.size))
    else:
        background = volume[_outside_mask(n, radius_px, xp)].astype(xp.float64)
        mean, sd = background.mean(), float(background.std())
    factor = 1.0 / sd if sd > 0 else 0.0
    if in_place:
        volume -= mean
        volume *= factor
        return volume
    return ((volume - mean) * factor).astype(xp.float32)


_BACKGROUND = threading.local()


def _background_values(volume: np.ndarray, radius_px: float) -> np.ndarray:
    """float64 copy of the (N, N, N) ``volume``'s voxels outside ``radius_px`` in C order, in a work array of this
    thread kept between calls (valid until its next call): from box 170 or so it is larger than glibc's largest
    mmap threshold (32 MiB), and a new one was mapped and zeroed by the kernel for every particle."""
    index = _outside_indices(volume.shape[0], radius_px)
    work = getattr(_BACKGROUND, "arrays", None)
    if work is None or work[0].size != index.size:
        work = _BACKGROUND.arrays = (np.empty(index.size, np.float32), np.empty(index.size, np.float64))
    np.take(volume.reshape(-1), index, out=work[0], mode="clip")  # valid indices; "clip" writes out unbuffered
    np.copyto(work[1], work[0])
    return work[1]


@functools.lru_cache(maxsize=8)
def _outside_indices(n: int, radius_px: float) -> np.ndarray:
    """Flat C-order indices (cached: not to be changed; the mask itself is not kept) of the voxels of
    :func:`_outside_mask`. Left writeable: ``np.take`` copies read-only indices on every call."""
    return np.flatnonzero(_outside_mask(n, radius_px))


def half_to_centred_cube(half: np.ndarray, *, xp: ModuleType = np) -> np.ndarray:
    """(N, N, N//2+1) real Hermitian half spectrum → (N, N, N) full cube with DC at voxel N/2."""
    n = half.shape[0]
    full = xp.empty((n, n, n), dtype=half.dtype)
    full[:, :, : n // 2 + 1] = half
    mirror_x = xp.arange(n // 2 + 1, n)
    flip = (-xp.arange(n)) % n
    full[:, :, n // 2 + 1:] = half[flip][:, flip][:, :, (n - mirror_x)]
    return xp.fft.fftshift(full)


def check_volume(volume: np.ndarray, what: str) -> tuple[np.generic, np.generic]:
    """Raise :class:`ReconstructionError` if the volume is not finite, all zero or constant; else return its
    ``(min, max)`` (NumPy scalars of its dtype: the MRC header's ``dmin``, ``dmax``).

    Two passes over the volume and no temporary: a NaN anywhere makes both extremes NaN, an infinity one of them,
    and an all-zero volume is one whose extremes are both 0."""
    low, high = volume.min(), volume.max()
    if not (np.isfinite(low) and np.isfinite(high)):
        raise ReconstructionError(f"{what}: the volume has non-finite values")
    if low == 0 and high == 0:
        raise ReconstructionError(f"{what}: the volume is all zero")
    if low == high:
        raise ReconstructionError(f"{what}: the volume is constant ({float(low)})")
    return low, high


def reconstruct_particles(tilt_series: TiltSeriesData, stack: np.ndarray, particles: ParticlePoses,
                          options: ExportOptions) -> Iterator[ParticleResult]:
    """Sub-tomograms + 3D CTFs (or particle series) of the particles of one tilt series, in particle order.

    Parameters
    ----------
    tilt_series
        Geometry, CTF and dose of the raw tilt series.
    stack
        (T, ny, nx) raw stack (may be memory-mapped; each tilt is read once).
    particles
        Particles of this tilt series (centred Å positions, RELION angles).
    options
        :class:`ExportOptions`.
    """
    if len(particles) == 0:
        raise InputError(f"particles: no particles for tilt series {tilt_series.ts_id}")
    engine = TiltSeriesEngine.create(tilt_series, stack, options)
    yield from engine.reconstruct(particles)
