"""Export one tilt series: reconstruct every particle, check it, write MRCs, return the STAR rows.

File names follow M (m_reference §6.1): ``{ts_id}_{p:07d}_{pixel:.2f}A.mrc`` and
``{ts_id}_{p:07d}_ctf_{pixel:.2f}A.mrc`` (p = 0-based index within the tilt series); RELION 5 particle series:
``{ts_id}_{pixel:.2f}A_{p+1:06d}.mrcs`` (the rows then also carry ``rlnTomoVisibleFrames``, the centred Å
coordinates and the particle name, :mod:`mspecies.cli.relion5_files`). Every volume is checked before it is
written (finite, not all zero, not constant); a bad one stops the export with
:class:`~mspecies.core.reconstruct.ReconstructionError` and no file is written for it.

The checks and writes of a batch run on a writer thread while the engine reconstructs the next batch
(:class:`~mspecies.cli.export_overlap.ParticleWriter`, at most one batch queued), and those of the last batch on
that thread and the calling one; the files and the errors are those of the serial path (``overlap_writes=False``).
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from mspecies.cli.export_overlap import ParticleWriter
from mspecies.cli.relion5_files import OPTIMISATION_SET, TOMOGRAMS_STAR
from mspecies.common.types import InputError, ParticlePoses, TiltSeriesData
from mspecies.core.extract import StackReuse
from mspecies.core.geometry import centred_angst_to_corner_px
from mspecies.core.reconstruct import ExportOptions, TiltSeriesEngine, check_volume, shifted_positions_angst
from mspecies.formats import relion5
from mspecies.formats.mrc import write_mrc_direct, write_mrc_stream

STAR_NAME = "particles.star"
"""The export's STAR, beside the per-tilt-series folders of MRCs."""

EXCLUDED_TSV = "excluded_particles.tsv"
"""Particles the export skipped or dropped, one row each (tilt series, input row, reason)."""

DIRECT_IO_MIN_BYTES = 4 * 1024**2
"""MRC files of this many data bytes or more (sub-tomograms from box 102, 3D CTFs in half layout from box 128) are
written without the page cache (:func:`~mspecies.formats.mrc.write_mrc_direct`) unless ``--buffered-writes``: an
export of large boxes writes gigabytes that stay cached only to push out the tilt series still to be read, and a
new page-cache page costs system time (here 10–18 ms per 4–8 MB file through the cache, 0.3–0.7 ms without it; at
1–2 MB the cache cost 0.5 ms and direct writes wait twice as long for the disk)."""

SERIES_STARS = (TOMOGRAMS_STAR, OPTIMISATION_SET)
"""The RELION 5 particle series' other STAR files, beside ``particles.star``."""

_EXPORT_FILE = re.compile(r"_(\d{7}_(ctf_)?\d+\.\d{2}A\.mrc|\d+\.\d{2}A_\d{6}\.mrcs)")


def earlier_export_files(out_dir: str | Path) -> list[Path]:
    """Files of an earlier export in ``out_dir``: its STAR first (it lists the others), the excluded-particle
    table, then every file named like an export's MRC (``<ts>/<ts>_<p>_...A.mrc``) in a subfolder. Other files
    (inputs such as a geometry JSON) are not part of it."""
    out = Path(out_dir)
    files = [path for path in (out / STAR_NAME, out / EXCLUDED_TSV, *(out / name for name in SERIES_STARS))
             if path.is_file()]
    for folder in sorted(p for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files += sorted(path for path in folder.iterdir() if path.is_file() and path.name.startswith(folder.name + "_")
                        and _EXPORT_FILE.fullmatch(path.name[len(folder.name):]))
        files += [path for path in (folder / f"{folder.name}.star", folder / f"{folder.name}_tilts.mrcs")
                  if path.is_file() or path.is_symlink()]  # a particle series' per-tilt STAR and stack link
    return files


@dataclass(frozen=True)
class ExportSummary:
    """What one tilt-series export did: particles written, seconds, padded box, backend and memory plan."""

    ts_id: str
    n_particles: int
    seconds: float
    padded_box_px: int
    backend: str
    memory_plan: str

    @property
    def particles_per_second(self) -> float:
        return self.n_particles / self.seconds if self.seconds > 0 else float("inf")

    def describe(self) -> str:
        return (f"{self.ts_id}: {self.n_particles} particles in {self.seconds:.1f} s "
                f"({self.particles_per_second:.1f} particles/s), padded box M = {self.padded_box_px}, "
                f"backend {self.backend}, memory: {self.memory_plan}")


def relion_coordinates_px(positions_angst: np.ndarray, tomogram_shape_xyz_px: tuple[int, int, int],
                          data_pixel_angst: float, output_pixel_angst: float) -> np.ndarray:
    """(N, 3) ``rlnCoordinateX/Y/Z``: output pixels from the corner of the tomogram rescaled to the output pixel.

    The tomogram of ``tomogram_shape_xyz_px`` voxels at ``data_pixel_angst`` becomes
    ``round(n · data / output)`` voxels; coordinate = centred position / output pixel + that size // 2.
    """
    shape = np.array([round(n * data_pixel_angst / output_pixel_angst) for n in tomogram_shape_xyz_px])
    return centred_angst_to_corner_px(positions_angst, shape, output_pixel_angst)


def _relative(path: Path, star_dir: Path) -> str:
    try:
        return path.relative_to(star_dir).as_posix()
    except ValueError:
        return path.as_posix()


def export_tilt_series(tilt_series: TiltSeriesData, stack: np.ndarray | None, particles: ParticlePoses,
                       options: ExportOptions, out_dir: str | Path, *,
                       tomogram_shape_xyz_px: tuple[int, int, int], star_dir: str | Path | None = None,
                       first_subset_index: int = 0, log: Callable[[str], None] | None = None,
                       engine: TiltSeriesEngine | None = None, overlap_writes: bool = True,
                       engine_ready: Callable[[], None] | None = None,
                       direct_io: bool = True, reuse: StackReuse | None = None,
                       engine_done: Callable[[TiltSeriesEngine], None] | None = None,
                       engine_built: str = "during the previous tilt series"
                       ) -> tuple[pd.DataFrame, ExportSummary]:
    """Reconstruct and write the particles of one tilt series.

    Parameters
    ----------
    tilt_series, stack, particles, options
        As for :func:`~mspecies.core.reconstruct.reconstruct_particles`; ``stack`` may be None when ``engine``
        is given.
    out_dir
        Folder for the MRC files (created).
    tomogram_shape_xyz_px
        Unbinned tomogram size (x, y, z) at the tilt-series pixel size, for ``rlnCoordinate*``.
    star_dir
        Folder of the STAR file that will list the rows (image paths are relative to it; default ``out_dir``).
    first_subset_index
        Global index of the first particle; random subsets alternate 1, 2 over global indices.
    engine
        This tilt series' engine built already (while the previous tilt series reconstructed, or the particles
        were read: its setup is then not in the summary's time), instead of building it here from ``stack``.
    overlap_writes
        Check and write each batch on a writer thread while the next batch is reconstructed (default); False
        checks and writes each particle before the next one is reconstructed. The files are the same.
    engine_ready
        Called once the engine exists, before the first particle (the export starts building the next tilt
        series' engine then, so that its stack preparation does not compete with this one's).
    direct_io
        Write files of :data:`DIRECT_IO_MIN_BYTES` or more without the page cache (default); False: every file
        through it. The files are the same.
    reuse
        Where an engine built here takes the array of its prepared images from
        (:class:`~mspecies.core.extract.StackReuse`; an earlier tilt series' array of the same shape).
    engine_done
        Called with the engine once every particle is written (its prepared images are read no more then).
    engine_built
        When the given ``engine`` was built, for the log.

    Returns
    -------
    rows
        One STAR row per particle (columns of :data:`mspecies.formats.relion_subtomo.PARTICLE_COLUMNS`; for the
        particle series also those of :data:`mspecies.formats.relion5.PARTICLE_COLUMNS`).
    summary
        :class:`ExportSummary`; its time ends when the last file is written.
    """
    if len(particles) == 0:
        raise InputError(f"particles: no particles for tilt series {tilt_series.ts_id}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    star_folder = Path(star_dir) if star_dir is not None else out
    started = time.perf_counter()
    ahead = engine is not None
    engine = engine if ahead else TiltSeriesEngine.create(tilt_series, stack, options, reuse=reuse)
    if log is not None:
        ctf = f", 3D CTF {options.ctf_method}" if options.mode == "volumes" else ""
        log(f"{tilt_series.ts_id}: {len(particles)} particles, padded box M = {engine.padded_box_px}, backend "
            f"{engine.xp.__name__}{ctf}, memory plan: {engine.plan.describe()}"
            + (f"; stack and engine prepared {engine_built}" if ahead else ""))
    if engine_ready is not None:
        engine_ready()
    pixel, ts_id = options.output_pixel_size_angst, tilt_series.ts_id
    names, ctf_names, visible = [], [], []
    with ParticleWriter(engine.plan.batch_size if overlap_writes else 0) as writer:
        for result in engine.reconstruct(particles):
            p = result.index
            if options.mode == "series":
                if result.series is None or result.series.shape[0] == 0:
                    writer.wait()  # the errors of earlier particles first, as in the serial path
                    raise InputError(f"{ts_id}: particle {p} is visible in no used tilt")
                files = [(out / f"{ts_id}_{pixel:.2f}A_{p + 1:06d}.mrcs", result.series,
                          f"{ts_id} particle {p} particle series")]
                visible.append(relion5.visible_frames(np.isin(engine.tilts, result.series_tilts)))
            else:
                files = [(out / f"{ts_id}_{p:07d}_{pixel:.2f}A.mrc", result.volume,
                          f"{ts_id} particle {p} sub-tomogram"),
                         (out / f"{ts_id}_{p:07d}_ctf_{pixel:.2f}A.mrc", result.ctf, f"{ts_id} particle {p} 3D CTF")]
            names.append(_relative(files[0][0], star_folder))
            ctf_names.append(_relative(files[1][0], star_folder) if len(files) > 1 else "")
            writer.submit(functools.partial(write_checked_files, files, pixel, direct_io=direct_io))
            if log is not None and (p + 1) % 100 == 0:
                writer.submit(functools.partial(_log_progress, log, ts_id, p + 1, len(particles), started),
                              after_earlier=True)
    if engine_done is not None:
        engine_done(engine)
    rows = _star_rows(tilt_series, particles, options, names, ctf_names, tomogram_shape_xyz_px, first_subset_index)
    if options.mode == "series":
        rows = _particle_series_rows(rows, particles, options, visible)
    summary = ExportSummary(ts_id, len(particles), time.perf_counter() - started, engine.padded_box_px,
                            engine.xp.__name__, engine.plan.describe())
    if log is not None:
        log(summary.describe())
    return rows, summary


def write_checked_files(files: list[tuple[Path, np.ndarray, str]], pixel_size_angst: float, *,
                        direct_io: bool = True) -> None:
    """Check every volume of one particle (:func:`~mspecies.core.reconstruct.check_volume`, ``what`` names it),
    then write each as float32 MRC at ``pixel_size_angst``: nothing of the particle is written when one is bad.

    ``files``: (path, volume, what) per file, in writing order. ``direct_io``: files of
    :data:`DIRECT_IO_MIN_BYTES` or more bypass the page cache (:func:`~mspecies.formats.mrc.write_mrc_direct`);
    the others, or every file with False, go through it (:func:`~mspecies.formats.mrc.write_mrc_stream`). The
    bytes are mrcfile's either way.
    """
    extremes = [check_volume(volume, what) for _, volume, what in files]
    for (path, volume, _), low_high in zip(files, extremes):
        if direct_io and volume.size * 4 >= DIRECT_IO_MIN_BYTES:
            write_mrc_direct(path, volume, pixel_size_angst, extremes=low_high)
        else:
            write_mrc_stream(path, volume, pixel_size_angst, extremes=low_high)


def _log_progress(log: Callable[[str], None], ts_id: str, done: int, total: int, started: float) -> None:
    """Progress line once the first ``done`` particles are written."""
    log(f"{ts_id}: {done}/{total} particles, {done / (time.perf_counter() - started):.1f} particles/s")


def _star_rows(tilt_series: TiltSeriesData, particles: ParticlePoses, options: ExportOptions, names: list[str],
               ctf_names: list[str], tomogram_shape_xyz_px: tuple[int, int, int], first_subset_index: int
               ) -> pd.DataFrame:
    positions = shifted_positions_angst(particles, options.shift_angst)
    coords = relion_coordinates_px(positions, tomogram_shape_xyz_px, tilt_series.pixel_size_angst,
                                   options.output_pixel_size_angst)
    angles = np.zeros_like(particles.euler_zyz_deg) if options.prerotate else particles.euler_zyz_deg
    subsets = (np.arange(len(particles)) + first_subset_index) % 2 + 1
    return pd.DataFrame({
        "rlnImageName": names, "rlnCtfImage": ctf_names,
        "rlnAngleRot": angles[:, 0], "rlnAngleTilt": angles[:, 1], "rlnAnglePsi": angles[:, 2],
        "rlnCoordinateX": coords[:, 0], "rlnCoordinateY": coords[:, 1], "rlnCoordinateZ": coords[:, 2],
        "rlnTomoName": tilt_series.ts_id, "rlnMicrographName": tilt_series.ts_id,
        "rlnRandomSubset": subsets.astype(np.int64)})


def _particle_series_rows(rows: pd.DataFrame, particles: ParticlePoses, options: ExportOptions,
                          visible: list[str]) -> pd.DataFrame:
    """Add the RELION 5 particle-series columns: visible frames, centred Å coordinates (shifted positions; the
    stacks are centred on them, so the origins stay 0), particle names, and the poses: the particle's angles, or
    with ``prerotate`` the same rotation as the pre-rotation ``rlnTomoSubtomogram*`` and zero angles (RELION
    composes them, ``particle_set.cpp:418-425``)."""
    positions = shifted_positions_angst(particles, options.shift_angst)
    rows = rows.copy()
    rows["rlnTomoVisibleFrames"] = visible
    rows["rlnTomoParticleName"] = [f"{name}/{p + 1}" for p, name in enumerate(rows["rlnTomoName"])]
    for axis, column in zip("XYZ", positions.T, strict=True):
        rows[f"rlnCenteredCoordinate{axis}Angst"] = column
    if options.prerotate:
        for name, column in zip(relion5.PRE_ROTATION_COLUMNS, particles.euler_zyz_deg.T, strict=True):
            rows[name] = column
    return rows
