"""Everything the export checks before its first byte is written.

* the arguments: ``--pixel-size-out`` > 0, ``--memory-gb`` within the memory available to this process (the
  machine's, or less where its memory cgroup limits it: a SLURM job's ``--mem``, a container's limit), a usable
  backend;
* the tilt series together: one output pixel size and one set of optics, as ``particles.star`` has one optics group
  (:func:`check_one_optics_group`; a manifest's tilt series at different pixel sizes need ``--pixel-size-out``);
* per tilt series: the options against the data and the memory plan (:func:`~mspecies.core.reconstruct.plan_memory`,
  refused at once when one particle cannot fit), named by flag;
* the particles: those outside the tomogram's x–y area, and those whose output box lies inside the images in fewer
  than ``--min-visible-tilts`` used tilts (RELION's ``relion_tomo_subtomo --min_frames``, default 1), are skipped;
  exact duplicates (same tomogram, position and angles) are counted and, with ``--drop-duplicates``, dropped.
  Every excluded particle is listed (input row, reason) in ``excluded_particles.tsv`` and counted in the log;
* the disk: the bytes the export will write (:func:`export_bytes`), checked against the free space of ``--out``.

The tomogram's z extent does not exclude: its thickness is often a guess (the protocol's default is 2000 Å), and a
particle above or below it still projects into the images; particles beyond it are exported with a warning that
names them (a z far off usually means a wrong coordinate pixel size, binning or origin).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from mspecies.common.types import InputError, Microscope, ParticlePoses, TiltSeriesData
from mspecies.core.geometry import project_positions_to_tilts
from mspecies.core.memory import MemoryPlan, memory_availability
from mspecies.core.reconstruct import ExportOptions, plan_memory, shifted_positions_angst
from mspecies.formats.mrc import MRC_HEADER_BYTES

if TYPE_CHECKING:
    import pandas as pd

STAR_BYTES_PER_PARTICLE = 400
"""Generous size of one particle's STAR row(s), for the free-space estimate."""

OPTION_FLAGS = {"output_pixel_size_angst": "--pixel-size-out", "box_px": "--box", "particle_diameter_angst":
                "--diameter", "n_tilts_by_dose": "--n-tilts-by-dose", "shift_angst": "--shift", "max_batch":
                "--max-batch", "memory": "--memory-gb", "padding_factor": "--padding-factor", "workers": "--threads"}
"""Export option (as core's messages name it) → the command-line flag that sets it."""

EXCLUDED_COLUMNS = ["ts_id", "particle", "reason", "visible_tilts", "x_angst", "y_angst", "z_angst"]


@dataclass(frozen=True)
class ExportJob:
    """One tilt series, checked and planned: the particles to export and those excluded (with reasons)."""

    tilt_series: TiltSeriesData
    particles: ParticlePoses
    tomogram_shape_xyz_px: tuple[int, ...]
    options: ExportOptions
    padded_box_px: int
    plan: MemoryPlan
    excluded: pd.DataFrame
    n_duplicates: int
    visible_tilts: np.ndarray
    beyond_z_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    """Input rows of exported particles whose z lies beyond the tomogram's thickness (warned about, not skipped)."""


def check_export_arguments(args: argparse.Namespace) -> None:
    """Arguments that need no data: output pixel size, memory budget against this machine, backend."""
    if args.pixel_size_out is not None and not (args.pixel_size_out > 0 and math.isfinite(args.pixel_size_out)):
        raise InputError(f"--pixel-size-out: expected a pixel size > 0 Å (leave it out for the tilt series' own), "
                         f"got {args.pixel_size_out:g}")
    if not (args.diameter > 0 and math.isfinite(args.diameter)):
        raise InputError(f"--diameter: expected a diameter > 0 Å, got {args.diameter:g}")
    if not all(math.isfinite(value) for value in args.shift):
        raise InputError(f"--shift: expected three finite shifts in Å, got {' '.join(f'{v:g}' for v in args.shift)}")
    if args.min_visible_tilts < 1:
        raise InputError(f"--min-visible-tilts: expected an integer >= 1, got {args.min_visible_tilts}")
    if args.memory_gb is not None:
        check_memory_budget(args.memory_gb)
    if args.backend == "cupy":
        from mspecies.core.backend import cupy_unavailable_reason

        reason = cupy_unavailable_reason()
        if reason is not None:
            raise InputError(f"--backend cupy: {reason}; use --backend numpy or auto")


PIXEL_SIZE_REL_TOL = 1e-4
"""Output pixel sizes of tilt series closer than this (relative) count as one: 0.026 px at the edge of a box of 256."""


def check_one_optics_group(exports: list[tuple[TiltSeriesData, float]], source: str) -> None:
    """The STAR file the export writes has one optics group (one pixel size, voltage, Cs, amplitude contrast) for
    all tilt series of ``source``: InputError, naming the tilt series that differ, when their output pixel sizes
    (``exports``: each tilt series with the output pixel size of its export options, Å) or their microscopes
    differ. Otherwise RELION would read the sub-tomograms of all but the first at a wrong pixel size (or with a
    wrong CTF)."""
    if len(exports) < 2:
        return
    first, first_pixel = exports[0]
    other_pixel = [(ts.ts_id, pixel) for ts, pixel in exports[1:]
                   if not math.isclose(pixel, first_pixel, rel_tol=PIXEL_SIZE_REL_TOL)]
    if other_pixel:
        sizes = ", ".join(f"{ts_id} {pixel:g} Å" for ts_id, pixel in [(first.ts_id, first_pixel)] + other_pixel[:4])
        more = f" and {len(other_pixel) - 4} more" if len(other_pixel) > 4 else ""
        largest = math.ceil(max(pixel for _, pixel in exports) * 1e4) / 1e4  # printed in full, never below the largest
        raise InputError(f"{source}: its tilt series have different pixel sizes ({sizes}{more}), and particles.star "
                         f"has one optics group: give --pixel-size-out {largest:g} (or more) to export them all at "
                         f"one pixel size, or export them one at a time (--ts-id)")
    other = next((ts for ts, _ in exports[1:] if ts.microscope != first.microscope), None)
    if other is not None:
        raise InputError(f"{source}: tilt series {other.ts_id} was recorded with other optics than {first.ts_id} "
                         f"({_optics(other.microscope)} against {_optics(first.microscope)}), and particles.star has "
                         f"one optics group: export them one at a time (--ts-id)")


def _optics(microscope: Microscope) -> str:
    return (f"{microscope.voltage_kv:g} kV, Cs {microscope.cs_mm:g} mm, amplitude contrast "
            f"{microscope.amplitude_contrast:g}")


def check_memory_budget(memory_gb: float) -> None:
    """``--memory-gb`` must be > 0 and at most the memory available to this process now (the machine's
    MemAvailable, or what its memory cgroup leaves: :func:`~mspecies.core.memory.memory_availability`)."""
    if not (memory_gb > 0 and math.isfinite(memory_gb)):
        raise InputError(f"--memory-gb: expected a budget > 0 GB, got {memory_gb:g}")
    available = memory_availability()
    if memory_gb * 1e9 > available.bytes:
        raise InputError(f"--memory-gb: {memory_gb:g} GB is more than the {available.bytes / 1e9:.2f} GB available "
                         f"to this process ({available.source}); give at most that, or leave it out (default: "
                         f"{available.default_budget()[1]})")


def with_flag(error: InputError) -> InputError:
    """Core's message ``box_px: ...`` → ``--box (box_px): ...`` so that the user sees the flag to change."""
    message = str(error)
    field, sep, rest = message.partition(":")
    flag = OPTION_FLAGS.get(field.strip())
    return InputError(f"{flag} ({field.strip()}):{rest}") if sep and flag else error


def plan_job(tilt_series: TiltSeriesData, particles: ParticlePoses, tomogram_shape_xyz_px: tuple[int, ...],
             options: ExportOptions, *, min_visible_tilts: int, drop_duplicates: bool,
             stack_dtype: np.dtype | None = None) -> ExportJob:
    """Check one tilt series' options and memory plan, and choose its particles (see the module docstring).
    ``stack_dtype``: the stack's data type, for the plan to count the preparation's work arrays (None: not
    counted)."""
    import pandas as pd

    try:
        padded, plan = plan_memory(tilt_series, options, stack_dtype)
    except InputError as error:
        raise with_flag(error) from error
    positions = shifted_positions_angst(particles, options.shift_angst)
    visible = visible_tilt_counts(tilt_series, positions, options.box_px, options.output_pixel_size_angst)
    outside = outside_tomogram_xy(positions, tomogram_shape_xyz_px, tilt_series.pixel_size_angst)
    duplicate_of = first_identical(particles)
    reasons = np.full(len(particles), "", dtype=object)
    reasons[visible < min_visible_tilts] = (f"box inside the images in fewer than {min_visible_tilts} of "
                                            f"{int(np.count_nonzero(~tilt_series.excluded))} used tilts")
    reasons[outside] = "outside the tomogram's x-y area"
    if drop_duplicates:
        dropped = (duplicate_of >= 0) & (reasons == "")
        reasons[dropped] = [f"duplicate of particle {k}" for k in duplicate_of[dropped]]
    excluded = np.flatnonzero(reasons != "")
    table = pd.DataFrame({"ts_id": tilt_series.ts_id, "particle": excluded, "reason": reasons[excluded],
                          "visible_tilts": visible[excluded], "x_angst": positions[excluded, 0],
                          "y_angst": positions[excluded, 1], "z_angst": positions[excluded, 2]},
                         columns=EXCLUDED_COLUMNS)
    kept = reasons == ""
    n_duplicates = int(np.count_nonzero((duplicate_of >= 0) & kept)) if not drop_duplicates else 0
    beyond_z = kept & outside_tomogram_z(positions, tomogram_shape_xyz_px, tilt_series.pixel_size_angst)
    return ExportJob(tilt_series, particles.subset(kept), tomogram_shape_xyz_px, options, padded, plan, table,
                     n_duplicates, visible[kept], np.flatnonzero(beyond_z))


def visible_tilt_counts(tilt_series: TiltSeriesData, positions_angst: np.ndarray, box_px: int,
                        output_pixel_angst: float) -> np.ndarray:
    """(N,) number of used tilts in whose raw image the particle's whole output box lies.

    The box is ``box_px`` output pixels wide, i.e. ``box_px · output / data`` raw pixels; pixel i covers
    [i − 0.5, i + 0.5], so an image of n pixels spans [−0.5, n − 0.5].
    """
    raw_px, _ = project_positions_to_tilts(positions_angst, tilt_series)
    used = ~tilt_series.excluded
    half = 0.5 * box_px * output_pixel_angst / tilt_series.pixel_size_angst
    ny, nx = tilt_series.image_shape_yx
    x, y = raw_px[:, used, 0], raw_px[:, used, 1]
    inside = (x - half >= -0.5) & (x + half <= nx - 0.5) & (y - half >= -0.5) & (y + half <= ny - 0.5)
    return inside.sum(axis=1).astype(np.int64)


def outside_tomogram_xy(positions_angst: np.ndarray, tomogram_shape_xyz_px: tuple[int, ...],
                        data_pixel_angst: float) -> np.ndarray:
    """(N,) True where the centred position lies beyond half the tomogram's size in x or y."""
    half_angst = 0.5 * np.asarray(tomogram_shape_xyz_px[:2], dtype=np.float64) * data_pixel_angst
    return np.any(np.abs(positions_angst[:, :2]) > half_angst, axis=1)


def outside_tomogram_z(positions_angst: np.ndarray, tomogram_shape_xyz_px: tuple[int, ...],
                       data_pixel_angst: float) -> np.ndarray:
    """(N,) True where the centred position lies beyond half the tomogram's thickness (z)."""
    return np.abs(positions_angst[:, 2]) > 0.5 * float(tomogram_shape_xyz_px[2]) * data_pixel_angst


def first_identical(particles: ParticlePoses) -> np.ndarray:
    """(N,) for each particle the index of the first earlier particle with the same tomogram, position and
    angles (to 1e-4 Å / degree), else −1."""
    import pandas as pd

    key = pd.DataFrame(np.round(np.hstack([particles.positions_angst, particles.euler_zyz_deg]), 4))
    key["tomo"] = particles.tomo_names.astype(str)
    first = key.groupby(list(key.columns), sort=False, dropna=False).ngroup().to_numpy()
    first_index = pd.Series(np.arange(len(first))).groupby(first).transform("min").to_numpy()
    return np.where(first_index < np.arange(len(first)), first_index, -1)


def export_bytes(jobs: list[ExportJob]) -> int:
    """Bytes the export will write: per particle its volume and 3D CTF (or its image series over the tilts it is
    visible in), MRC headers and STAR rows."""
    total = 0
    for job in jobs:
        if job.options.mode == "series":
            n = job.options.box_px
            total += int(job.visible_tilts.sum()) * n * n * 4 + len(job.particles) * MRC_HEADER_BYTES
        else:
            total += len(job.particles) * (output_bytes_per_particle(job.options, 0) + 2 * MRC_HEADER_BYTES)
        total += len(job.particles) * STAR_BYTES_PER_PARTICLE
    return total


def output_bytes_per_particle(options: ExportOptions, n_tilts: int) -> int:
    """Bytes of one particle's output arrays: sub-tomogram + 3D CTF, or its particle series over ``n_tilts``."""
    n = options.box_px
    if options.mode == "series":
        return n_tilts * n * n * 4
    return (n ** 3 + (n ** 3 if options.ctf_layout == "centred" else n * n * (n // 2 + 1))) * 4


def overlap_fits(job: ExportJob, next_job: ExportJob | None) -> bool:
    """True when the memory budget of ``job`` also holds what the export overlaps with its reconstruction: one
    batch of outputs waiting for the writer, the staging buffers of direct writes (one file each on the two
    threads that write: :func:`~mspecies.formats.mrc.write_mrc_direct`), and ``next_job``'s engine built ahead
    (its fixed memory: prepared stack, insertion operator, tables; and its stack preparation's work arrays;
    None: no next job)."""
    used_tilts = int(np.count_nonzero(~job.tilt_series.excluded))
    largest = (output_bytes_per_particle(job.options, used_tilts) if job.options.mode == "series"
               else job.options.box_px ** 3 * 4)  # a particle series is one file; else the sub-tomogram
    staging = 2 * (largest + MRC_HEADER_BYTES)
    waiting = job.plan.batch_size * output_bytes_per_particle(job.options, used_tilts) + staging
    ahead = 0 if next_job is None else next_job.plan.fixed_bytes + next_job.plan.preparation_bytes
    return job.plan.total_bytes + waiting + ahead <= job.plan.budget_bytes


def exclusion_lines(job: ExportJob, limit: int = 10) -> list[str]:
    """Log lines: how many particles were excluded and why (the first ``limit`` rows named), and duplicates."""
    ts_id, lines = job.tilt_series.ts_id, []
    for reason, rows in job.excluded.groupby("reason", sort=False)["particle"]:
        listed = ", ".join(str(r) for r in rows.to_numpy()[:limit]) + (", ..." if len(rows) > limit else "")
        lines.append(f"{ts_id}: skipped {len(rows)} particle(s), {reason}: input rows {listed}")
    if job.beyond_z_rows.size:
        rows = job.beyond_z_rows
        listed = ", ".join(str(r) for r in rows[:limit]) + (", ..." if rows.size > limit else "")
        lines.append(f"warning: {ts_id}: {rows.size} particle(s) lie beyond the tomogram's thickness "
                     f"({job.tomogram_shape_xyz_px[2]} px at {job.tilt_series.pixel_size_angst:g} Å) and are exported "
                     f"all the same (input rows {listed}); check their z (coordinate pixel size, binning, origin)")
    if job.n_duplicates:
        lines.append(f"warning: {ts_id}: {job.n_duplicates} particle(s) repeat an earlier one exactly (same position "
                     "and angles); exported twice they fall into both random halves and inflate the gold-standard "
                     "FSC; --drop-duplicates drops them")
    return lines
