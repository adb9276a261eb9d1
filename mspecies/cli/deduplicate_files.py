"""Self-intersection (``--old X --new X``) removes duplicates: one particle per cluster of mutual duplicates.

Intersecting a set with itself in M's sense would pair every particle with itself (everything "in both"), which is
not what a user who gives the same file twice wants: PEET's ``removeDuplicates``, cryoCAT and RELION's
``--remove_duplicates`` keep one particle of each group of particles closer than a tolerance. Here two particles
are duplicates when they are on the same tomogram (and have the same ``group_by`` value), within the distance
tolerance and, with an angular tolerance, within it over the symmetry; :func:`mspecies.core.assignment.
deduplicate_particles` keeps the best-scored particle of each cluster (without a score: the first row) and removes
its duplicates, and no two kept particles are duplicates of each other.

Outputs, in the same layout as an intersection: ``in_both.star`` = the deduplicated set (every particle is in both
sets; duplicates are counted once), ``duplicates.star`` = the removed particles, ``only_old.star`` and
``only_new.star`` empty, ``selected.star`` = the deduplicated set when ``in_both`` is kept (else empty), the
histogram of each particle's distance to its nearest other particle of its group, ``particle_distances.tsv``
(partner = the kept particle that removed it) and ``summary.json`` (mode ``deduplicate``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from mspecies.cli.atomic import check_output_folder, locked_output_folder, publish, staging_folder
from mspecies.cli.intersect_checks import check_intersect_parameters
from mspecies.cli.intersect_files import (
    HISTOGRAM_ANGLES_TXT,
    HISTOGRAM_DISTANCES_TXT,
    NO_COLUMNS,
    NO_OPTIONS,
    OUTPUT_FILES,
    PARTICLE_DISTANCES_TSV,
    SUMMARY_JSON,
    MatchOptions,
    SideColumns,
    default_histogram_radius_angst,
    group_labels,
    read_star_input,
    refuse_replaced_inputs,
    star_side_columns,
    summary_lines,
    write_histogram_distances,
    write_summary_json,
    write_table_tsv,
)
from mspecies.cli.intersect_plots import (
    ANGLE_HISTOGRAM_PNG,
    DEFAULT_HISTOGRAM_BINS,
    HISTOGRAM_PNG,
    draw_angle_histogram,
    draw_distance_histogram,
    histogram_title,
    save_histogram_png,
)
from mspecies.common.types import InputError, Microscope, ParticlePoses
from mspecies.core.assignment import DuplicateResult, deduplicate_particles, nearest_new_particles
from mspecies.core.symmetry import angular_distance_from_euler_deg
from mspecies.formats.star_dialects import TomoShapes
from mspecies.formats.star_write import write_particle_star


@dataclass(frozen=True)
class DeduplicateOutcome:
    """Result of :func:`deduplicate_poses`: the kept/removed particles, their groups and what to plot
    (each particle's distance to its nearest other particle of its group, Å; the angles of those within the
    tolerance, deg, or None without orientations)."""

    result: DuplicateResult
    tomograms: np.ndarray
    histogram_distances_angst: np.ndarray
    histogram_radius_angst: float
    histogram_angles_deg: np.ndarray | None
    tolerance_angst: float
    options: MatchOptions


def deduplicate_poses(poses: ParticlePoses, tolerance_angst: float, *, options: MatchOptions = NO_OPTIONS,
                      columns: SideColumns = NO_COLUMNS, use_angles: bool = True,
                      histogram_radius_angst: float | None = None) -> DeduplicateOutcome:
    """Remove duplicates within one set (positions Å centred per tomogram, RELION angles)."""
    if options.angular_tolerance_deg is not None and not use_angles:
        raise InputError("--angular-tolerance-deg: the set has no orientations (no angle columns)")
    if options.group_by is not None and columns.group_values is None:
        raise InputError(f"--group-by {options.group_by}: no values for the set")
    tomograms = np.asarray(poses.tomo_names, dtype=object).astype(str).astype(object)
    groups = group_labels(tomograms, columns.group_values, options.group_by)
    euler = poses.euler_zyz_deg if use_angles else None
    result = deduplicate_particles(poses.positions_angst, tolerance_angst, groups=groups, euler_zyz_deg=euler,
                                   angular_tolerance_deg=options.angular_tolerance_deg, symmetry=options.symmetry,
                                   scores=columns.scores)
    radius = (default_histogram_radius_angst(tolerance_angst, "gated") if histogram_radius_angst is None
              else float(histogram_radius_angst))
    partner, distance = nearest_new_particles(poses.positions_angst, poses.positions_angst, radius,
                                              old_groups=groups, new_groups=groups, exclude_same_index=True)
    angles = None
    if use_angles:
        close = np.flatnonzero((partner >= 0) & (distance <= float(tolerance_angst)))
        angles = angular_distance_from_euler_deg(poses.euler_zyz_deg[close], poses.euler_zyz_deg[partner[close]],
                                                 options.symmetry)
    return DeduplicateOutcome(result, tomograms, distance[np.isfinite(distance)], radius, angles,
                              float(tolerance_angst), options)


def deduplicate_summary(outcome: DeduplicateOutcome, keep: tuple[bool, bool, bool]) -> dict:
    """JSON-ready summary with the keys of an intersection summary (``in_both`` = kept particles, nothing only
    old or only new) plus ``removed_duplicates``."""
    result, options = outcome.result, outcome.options
    removed = ~result.keep
    names = pd.Series(outcome.tomograms, dtype=object)
    per_tomogram = []
    for name in sorted(names.unique()):
        rows = (names == name).to_numpy()
        n, kept = int(rows.sum()), int(np.count_nonzero(result.keep & rows))
        per_tomogram.append({"tomogram": name, "n_old": n, "n_new": n, "in_both": kept, "only_old": 0,
                             "only_new": 0, "removed_duplicates": n - kept, "jaccard": None})
    angles = result.angle_deg[removed]
    angles = angles[np.isfinite(angles)]
    n_kept = int(np.count_nonzero(result.keep))
    return {
        "mode": "deduplicate", "tolerance_angst": outcome.tolerance_angst, "n_old": int(result.keep.size),
        "n_new": int(result.keep.size), "in_both": n_kept, "only_old": 0, "only_new": 0,
        "removed_duplicates": result.n_removed, "jaccard": None,
        "median_distance_angst": float(np.median(result.distance_angst[removed])) if removed.any() else None,
        "histogram_radius_angst": outcome.histogram_radius_angst, "per_tomogram": per_tomogram,
        "angular_tolerance_deg": options.angular_tolerance_deg, "symmetry": options.symmetry,
        "median_angle_deg": float(np.median(angles)) if angles.size else None, "group_by": options.group_by,
        "score": options.score, "keep": [name for name, flag in zip(("only_old", "in_both", "only_new"), keep) if flag],
        "selected": n_kept if keep[1] else 0,
    }


def deduplicate_lines(summary: dict, max_tomograms: int | None = None) -> list[str]:
    """Human-readable lines of a :func:`deduplicate_summary` (at most ``max_tomograms`` per-tomogram lines)."""
    gate = summary["angular_tolerance_deg"]
    lines = [f"Duplicates removed within one set (the same input as old and new): tolerance "
             f"{summary['tolerance_angst']:g} Å"
             + ("" if gate is None else f", angular tolerance {gate:g} deg ({summary['symmetry']})")
             + (f", within equal {summary['group_by']}" if summary["group_by"] else "")
             + (f", the higher {summary['score']} kept" if summary["score"] else ", the first row kept")
             + f": {summary['n_old']} particles -> {summary['in_both']} kept ('in both'), "
               f"{summary['removed_duplicates']} duplicate(s) removed"]
    groups = summary["per_tomogram"]
    for group in groups if max_tomograms is None else groups[:max_tomograms]:
        lines.append(f"  {group['tomogram']}: {group['n_old']} -> {group['in_both']} kept, "
                     f"{group['removed_duplicates']} removed")
    if max_tomograms is not None and len(groups) > max_tomograms:
        lines.append(f"  ... and {len(groups) - max_tomograms} more tomograms (all in {SUMMARY_JSON})")
    return lines


def write_deduplicate_files(out_dir: str | Path, outcome: DeduplicateOutcome, keep: tuple[bool, bool, bool], *,
                            n_bins: int = DEFAULT_HISTOGRAM_BINS, log_scale: bool = False,
                            extra: dict | None = None) -> dict:
    """Write the summary, the histogram values and PNGs and ``particle_distances.tsv``; returns the summary."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = deduplicate_summary(outcome, keep) | {"histogram_bins": int(n_bins)} | (extra or {})
    result = outcome.result
    write_histogram_distances(out / HISTOGRAM_DISTANCES_TXT, outcome.histogram_distances_angst,
                              header="distance (A) to the nearest other particle of the set, up to the radius")
    save_histogram_png(out / HISTOGRAM_PNG, draw_distance_histogram, distances_angst=outcome.histogram_distances_angst,
                       tolerance_angst=outcome.tolerance_angst, n_bins=n_bins, log_scale=log_scale,
                       title=histogram_title(outcome.histogram_radius_angst, "deduplicate"))
    summary["angle_histogram"] = outcome.histogram_angles_deg is not None
    if outcome.histogram_angles_deg is not None:
        write_histogram_distances(out / HISTOGRAM_ANGLES_TXT, outcome.histogram_angles_deg,
                                  header="angular distance (deg) of nearest pairs within the distance tolerance")
        save_histogram_png(out / ANGLE_HISTOGRAM_PNG, draw_angle_histogram, angles_deg=outcome.histogram_angles_deg,
                           angular_tolerance_deg=outcome.options.angular_tolerance_deg,
                           symmetry=outcome.options.symmetry, n_bins=n_bins, log_scale=log_scale)
    removed = ~result.keep
    write_table_tsv(out / PARTICLE_DISTANCES_TSV, pd.DataFrame({
        "set": "old", "index": np.arange(result.keep.size), "tomogram": outcome.tomograms,
        "partner": np.where(removed, result.representative, -1),
        "distance_angst": np.where(removed, result.distance_angst, -1.0),
        "angle_deg": np.where(removed, np.nan_to_num(result.angle_deg, nan=-1.0), -1.0),
        "status": np.where(removed, "duplicate", "in_both")}))
    write_summary_json(out / SUMMARY_JSON, summary)
    return summary


def deduplicate_star_file(path: str | Path, tolerance_angst: float, out_dir: str | Path, *,
                          keep: tuple[bool, bool, bool] = (True, True, True), dialect: str | None = None,
                          coord_pixel_size_angst: float | None = None, tomo_shape_px: TomoShapes = None,
                          histogram_radius_angst: float | None = None, n_bins: int = DEFAULT_HISTOGRAM_BINS,
                          log_scale: bool = False, log: Callable[[str], None] = print,
                          options: MatchOptions = NO_OPTIONS, microscope: Microscope | None = None) -> dict:
    """Remove duplicates from one particle STAR and write the outputs (see the module docstring) in its dialect,
    through a staging folder under the lock of ``out_dir``, as :func:`~mspecies.cli.intersect_files.
    intersect_star_files` (parameters checked before anything is written); ``microscope`` fills the optics the file
    lacks where its dialect needs them."""
    check_intersect_parameters(tolerance_angst, n_bins, histogram_radius_angst)
    check_output_folder(out_dir, "--out")
    refuse_replaced_inputs(out_dir, (("--old/--new", path),))
    table = read_star_input(path, dialect, role="--old/--new", coord_pixel_size_angst=coord_pixel_size_angst,
                            tomo_shape_px=tomo_shape_px)
    log(f"old and new are the same file: removing duplicates from {path} (dialect {table.dialect}, "
        f"{len(table)} particles)")
    if options.angular_tolerance_deg is not None and not table.has_angles:
        raise InputError(f"--angular-tolerance-deg: {path} has no angle columns (rlnAngleRot/Tilt/Psi)")
    outcome = deduplicate_poses(table.poses, tolerance_angst, options=options,
                                columns=star_side_columns(table, options, str(path)), use_angles=table.has_angles,
                                histogram_radius_angst=histogram_radius_angst)
    kept, none = np.flatnonzero(outcome.result.keep), np.arange(0)
    rows = {"in_both": kept, "duplicates": np.flatnonzero(~outcome.result.keep), "only_old": none,
            "only_new": none, "selected": kept if keep[1] else none}
    with locked_output_folder(out_dir, "--out") as out:
        with staging_folder(out, "deduplicate") as staging:
            files = {name: write_particle_star(table.take(index), staging / f"{name}.star", microscope=microscope)
                     for name, index in rows.items()}
            extra = {"old_file": str(path), "new_file": str(path), "old_dialect": str(table.dialect),
                     "new_dialect": str(table.dialect),
                     "files": {k: str(out / Path(v).relative_to(staging)) for k, v in files.items()}}
            summary = write_deduplicate_files(staging, outcome, keep, n_bins=n_bins, log_scale=log_scale,
                                              extra=extra)
            publish(staging, out, replaced=[out / name for name in OUTPUT_FILES], last=SUMMARY_JSON)
    return summary


def any_summary_lines(summary: dict, max_tomograms: int | None = None) -> list[str]:
    """Lines of an intersection or a deduplication summary (by its ``mode``)."""
    lines = deduplicate_lines if summary.get("mode") == "deduplicate" else summary_lines
    return lines(summary, max_tomograms)
