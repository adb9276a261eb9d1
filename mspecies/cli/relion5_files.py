"""RELION 5 particle series on disk: per tomogram its per-tilt STAR and tilt stack, then ``particles.star``,
``tomograms.star`` and ``optimisation_set.star`` over all tomograms (:mod:`mspecies.formats.relion5`).

Every path inside the STAR files is relative to the folder of ``particles.star`` (``star_dir``), where RELION is
run (``relion_refine --ios optimisation_set.star``, ``relion_tomo_reconstruct_particle --i ...``). The tilt
stack is referenced as ``n@<ts_id>/<ts_id>_tilts.mrcs``: RELION refuses ``n@`` on ``.mrc``, so a symbolic
link with the ``.mrcs`` name points at the raw stack (no copy); a ``.mrcs``/``.st`` stack is used as it is.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from mspecies.common.types import Microscope, TiltSeriesData
from mspecies.core.geometry import relion_tilt_alignment
from mspecies.formats import relion5

PARTICLES_STAR, TOMOGRAMS_STAR, OPTIMISATION_SET = "particles.star", "tomograms.star", "optimisation_set.star"
SCALE_WARNING = 1e-3


def used_frames(tilt_series: TiltSeriesData) -> np.ndarray:
    """Stack indices of the frames RELION sees (the tilts not excluded, in stack order): frame f is slice
    ``used_frames[f]``, the order of ``rlnTomoVisibleFrames``."""
    return np.flatnonzero(~tilt_series.excluded)


def _relative(path: Path, star_dir: Path) -> str:
    return Path(os.path.relpath(path.absolute(), star_dir.absolute())).as_posix()


def _stack_reference(tilt_series: TiltSeriesData, folder: Path, star_dir: Path) -> str:
    stack = Path(tilt_series.stack_path)
    if stack.suffix in (".mrcs", ".st"):
        return _relative(stack, star_dir)
    link = folder / f"{tilt_series.ts_id}_tilts.mrcs"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(stack.absolute())
    return _relative(link, star_dir)


def write_tomogram(tilt_series: TiltSeriesData, tomogram_shape_xyz_px: Sequence[int], folder: str | Path,
                   star_dir: str | Path, *, defocus_gradient_sign: int,
                   log: Callable[[str], None] | None = None) -> dict[str, object]:
    """Write ``<folder>/<ts_id>.star`` (per-tilt table) and the stack link; return the ``tomograms.star`` row."""
    folder, star_dir = Path(folder), Path(star_dir)
    folder.mkdir(parents=True, exist_ok=True)
    frames = used_frames(tilt_series)
    alignment = relion_tilt_alignment(tilt_series)
    if log is not None and float(alignment["scale_error"][frames].max()) > SCALE_WARNING:
        log(f"{tilt_series.ts_id}: the alignment scales a tilt by up to {alignment['scale_error'].max():.4f}; "
            "RELION 5 keeps only its rotation and shift")
    ts = tilt_series
    values = {name: alignment[name][frames] for name in ("x_tilt_deg", "y_tilt_deg", "z_rot_deg", "x_shift_angst",
                                                         "y_shift_angst")}
    values.update(tilt_angle_deg=ts.tilt_angles_deg[frames], defocus_u_angst=ts.defocus_u_angst[frames],
                  defocus_v_angst=ts.defocus_v_angst[frames], defocus_angle_deg=ts.defocus_angle_deg[frames],
                  phase_shift_deg=ts.phase_shift_deg[frames],
                  pre_exposure_e_per_angst2=ts.pre_exposure_e_per_angst2[frames])
    table = relion5.tilt_table(_stack_reference(ts, folder, star_dir), frames, values)
    tilt_star = relion5.write_tilt_star(folder / f"{ts.ts_id}.star", ts.ts_id, table)
    return relion5.tomogram_row(ts.ts_id, _relative(tilt_star, star_dir), tilt_series_pixel_angst=ts.pixel_size_angst,
                                microscope=ts.microscope, tomogram_shape_xyz_px=tomogram_shape_xyz_px,
                                hand=defocus_gradient_sign)


def write_particle_series(out: str | Path, particles: pd.DataFrame, tomograms: Sequence[dict[str, object]], *,
                          image_pixel_angst: float, box_px: int, premultiplied: bool, root: Path | None = None) -> Path:
    """``particles.star`` + ``tomograms.star`` + ``optimisation_set.star`` in ``out``; returns the optimisation set
    (which names the other two relative to ``root``, default ``out``).

    ``particles``: rows of every tomogram (:data:`mspecies.formats.relion5.PARTICLE_COLUMNS`); random subsets are
    renumbered 1, 2, 1, … over the merged rows.
    """
    out = Path(out)
    first = tomograms[0]
    microscope = Microscope(float(first["rlnVoltage"]), float(first["rlnSphericalAberration"]),
                            float(first["rlnAmplitudeContrast"]))
    optics = relion5.optics_table(image_pixel_angst=image_pixel_angst,
                                  tilt_series_pixel_angst=float(first["rlnTomoTiltSeriesPixelSize"]), box_px=box_px,
                                  microscope=microscope, premultiplied=premultiplied)
    table = particles.reset_index(drop=True).copy()
    table["rlnRandomSubset"] = np.arange(len(table)) % 2 + 1
    relion5.write_particles_star(out / PARTICLES_STAR, table, optics)
    relion5.write_tomograms_star(out / TOMOGRAMS_STAR, tomograms)
    if root is None:
        return relion5.write_optimisation_set(out / OPTIMISATION_SET, PARTICLES_STAR, TOMOGRAMS_STAR)
    return relion5.write_optimisation_set(out / OPTIMISATION_SET, _relative(out / PARTICLES_STAR, root),
                                          _relative(out / TOMOGRAMS_STAR, root))


def merge_particle_series(out: str | Path, folders: Sequence[str | Path], *, absolute_images: bool = False,
                          root: str | Path | None = None) -> Path:
    """Merge the particle series that the CLI wrote per tilt series (``folders``, one export each) into ``out``.

    Paths inside every STAR become relative to ``root`` (default ``out``: where RELION will run; stacks absolute
    with ``absolute_images``): the per-tilt tables are rewritten as ``out/<folder name>/<ts_id>_merged.star``.
    Returns the merged optimisation set.
    """
    from mspecies.formats.star import read_star_blocks

    out = Path(out)
    base = out if root is None else Path(root)
    particles, tomograms, optics = [], [], None
    for folder in map(Path, folders):
        blocks = read_star_blocks(folder / PARTICLES_STAR)
        optics = blocks["optics"] if optics is None else optics
        table = blocks["particles"].copy()
        table["rlnImageName"] = [(folder / name).absolute().as_posix() if absolute_images
                                 else _relative(folder / name, base) for name in table["rlnImageName"].astype(str)]
        particles.append(table)
        for row in read_star_blocks(folder / TOMOGRAMS_STAR)["global"].to_dict("records"):
            (tilts,) = read_star_blocks(folder / str(row["rlnTomoTiltSeriesStarFile"])).values()
            tilts = tilts.copy()
            tilts["rlnMicrographName"] = [f"{ref.split('@')[0]}@{_relative(folder / ref.split('@', 1)[1], base)}"
                                          for ref in tilts["rlnMicrographName"].astype(str)]
            merged_star = out / folder.name / f"{row['rlnTomoName']}_merged.star"
            merged_star.parent.mkdir(parents=True, exist_ok=True)
            relion5.write_tilt_star(merged_star, str(row["rlnTomoName"]), tilts)
            tomograms.append({**row, "rlnTomoTiltSeriesStarFile": _relative(merged_star, base)})
    return write_particle_series(out, pd.concat(particles, ignore_index=True), tomograms,
                                 image_pixel_angst=float(optics["rlnImagePixelSize"][0]),
                                 box_px=int(optics["rlnImageSize"][0]),
                                 premultiplied=bool(int(optics["rlnCtfDataAreCtfPremultiplied"][0])),
                                 root=None if root is None else base)
