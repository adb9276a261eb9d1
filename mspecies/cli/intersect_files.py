"""Intersect particle sets: the glue shared by the CLI and the Scipion protocol (no pyworkflow import).

The numerics live in :mod:`mspecies.core.assignment`; this module

* matches the new set's tomogram names to the old set's (tolerant, :mod:`mspecies.formats.tomo_names`) and
  reports it **before** any matching work;
* runs the match per tomogram, or per tomogram and value of a chosen column (``group_by``), with an optional
  orientation gate (angular tolerance over a symmetry), and computes the distances and angles to plot;
* writes the results: per-particle distances and angles, ``summary.json``, the distance histogram and, with
  orientations, the angular-distance histogram (PNG) and, for STAR inputs, ``only_old.star``, ``in_both.star``,
  ``only_new.star`` and ``selected.star`` in the old file's dialect.

Particles in both sets are represented by the **old** particle (old poses, old columns), as in M; with a score
column, by the particle of the pair with the higher score (a tie keeps the old one). The same file as old and new
on the command line removes duplicates instead (:mod:`mspecies.cli.deduplicate_files`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from mspecies.cli.atomic import check_output_folder, locked_output_folder, publish, staging_folder
from mspecies.cli.intersect_checks import check_dense_memory, check_intersect_parameters
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
from mspecies.core.assignment import (
    DISTANCE_EPS_ANGST,
    MODES,
    IntersectionResult,
    group_counts,
    histogram_distances,
    match_particle_sets,
    nearest_new_particles,
    new_pose_wins,
    select_union,
)
from mspecies.core.symmetry import angular_distance_from_euler_deg, parse_symmetry
from mspecies.formats.star_dialects import (
    CORNER_DIALECTS,
    ParticleTable,
    PositionFrame,
    TomoShapes,
    read_particle_star,
)
from mspecies.formats.star_write import write_particle_star
from mspecies.formats.tomo_names import NameMatchReport, match_tomo_names

KEEP_CHOICES = ("only_old", "in_both", "only_new")
"""Names of the three sets, in output order (also the STAR file stems)."""

HISTOGRAM_RADIUS_FACTOR = 3.0
"""Default histogram radius = this factor x the tolerance (gated mode) ..."""

MIN_HISTOGRAM_RADIUS_ANGST = 20.0
"""... but at least this many Å, so that a tolerance of 0 still shows the neighbourhood."""

SUMMARY_JSON = "summary.json"
HISTOGRAM_DISTANCES_TXT = "histogram_distances.txt"
HISTOGRAM_ANGLES_TXT = "histogram_angles.txt"
PARTICLE_DISTANCES_TSV = "particle_distances.tsv"
DUPLICATES_STAR = "duplicates.star"
OUTPUT_FILES = (SUMMARY_JSON, *(f"{name}.star" for name in KEEP_CHOICES), "selected.star", HISTOGRAM_PNG,
                HISTOGRAM_DISTANCES_TXT, PARTICLE_DISTANCES_TSV, ANGLE_HISTOGRAM_PNG, HISTOGRAM_ANGLES_TXT,
                DUPLICATES_STAR)
"""Every file an intersection (or a duplicate removal) writes, the one that lists the others first; a run removes
the earlier run's files first, so none is left from another kind of run."""


@dataclass(frozen=True)
class MatchOptions:
    """What may match besides the distance, and which particle of a pair "in both" keeps.

    Attributes
    ----------
    angular_tolerance_deg
        Orientation gate (deg, >= 0) over ``symmetry``; None: none.
    symmetry
        Point group of the reference (RELION names: C1, Cn, Dn, T, O, I...).
    group_by
        Column (STAR) or attribute (Scipion) whose values must be equal, besides the tomogram; None: tomogram only.
    score
        Column / attribute with a "higher is better" number: the pair's better particle represents it in "in
        both" (tie: old). None: always the old particle (M).
    """

    angular_tolerance_deg: float | None = None
    symmetry: str = "C1"
    group_by: str | None = None
    score: str | None = None

    def __post_init__(self) -> None:
        if self.angular_tolerance_deg is not None and not float(self.angular_tolerance_deg) >= 0:
            raise InputError(f"--angular-tolerance-deg must be >= 0 deg, got {self.angular_tolerance_deg}")
        object.__setattr__(self, "symmetry", parse_symmetry(self.symmetry)[0])


@dataclass(frozen=True)
class SideColumns:
    """Per-particle values of one set for the options: ``group_values`` (N,) text and ``scores`` (N,) float."""

    group_values: np.ndarray | None = None
    scores: np.ndarray | None = None


NO_OPTIONS = MatchOptions()
"""Distance only, tomogram only, old particles represent the pairs (M)."""
NO_COLUMNS = SideColumns()


@dataclass(frozen=True)
class IntersectOutcome:
    """Result of :func:`intersect_poses`.

    Attributes
    ----------
    result
        The assignment (old/new partners and distances in Å, per-tomogram counts).
    name_report
        How the new set's tomogram names matched the old set's.
    new_groups
        (M,) tomogram of each new particle: the matched old name, or its own name when unmatched.
    histogram_distances_angst
        (K,) matched distances (Å) at ``histogram_radius_angst``, to plot when choosing the tolerance.
    histogram_radius_angst
        Radius (Å) the histogram distances were computed with (may be ``inf``).
    histogram_angles_deg
        (K2,) angular distances (deg, over the symmetry) of each old particle and its nearest new particle when
        within the distance tolerance; None when a set has no orientations or in M-compatible mode.
    options
        The :class:`MatchOptions` used.
    new_wins
        (N,) bool over old particles: "in both" keeps the new partner (higher score); None without a score.
    old_tomograms
        (N,) tomogram of each old particle (for per-tomogram counts when groups are finer).
    """

    result: IntersectionResult
    name_report: NameMatchReport
    new_groups: np.ndarray
    histogram_distances_angst: np.ndarray
    histogram_radius_angst: float
    histogram_angles_deg: np.ndarray | None = None
    options: MatchOptions = NO_OPTIONS
    new_wins: np.ndarray | None = None
    old_tomograms: np.ndarray | None = None

    def per_tomogram(self):  # noqa: ANN201 (tuple of GroupCounts)
        """Counts per tomogram (the result's groups when matching used the tomogram alone)."""
        if self.options.group_by is None or self.old_tomograms is None:
            return self.result.groups
        return group_counts(self.result, self.old_tomograms, self.new_groups)


def parse_keep(text: str | Sequence[str]) -> tuple[bool, bool, bool]:
    """``"only_old,in_both"`` (or a list of names) → (keep only old, keep in both, keep only new)."""
    items = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    unknown = [t for t in items if t not in KEEP_CHOICES]
    if unknown:
        raise InputError(f"--keep: unknown set(s) {unknown}; choose from {list(KEEP_CHOICES)}")
    if not items:
        raise InputError(f"--keep: choose at least one of {list(KEEP_CHOICES)}")
    return tuple(name in items for name in KEEP_CHOICES)  # type: ignore[return-value]


def default_histogram_radius_angst(tolerance_angst: float, mode: str) -> float:
    """Radius (Å) for the histogram distances: ``inf`` in M-compatible mode (M's histogram), else
    ``max(HISTOGRAM_RADIUS_FACTOR x tolerance, MIN_HISTOGRAM_RADIUS_ANGST)``."""
    if mode == "m_compatible":
        return float("inf")
    return max(HISTOGRAM_RADIUS_FACTOR * float(tolerance_angst), MIN_HISTOGRAM_RADIUS_ANGST)


def match_names(old_names: Sequence[str] | np.ndarray, new_names: Sequence[str] | np.ndarray,
                mapping: str | dict[str, str] | None = None) -> NameMatchReport:
    """Match every new particle's tomogram name to the old set's tomogram names (tolerant: directories,
    extensions such as ``.tomostar``, binning tags and case; ``mapping`` 'new=old, ...' wins). Ambiguous names
    raise :class:`InputError`."""
    old_unique = [str(u) for u in pd.unique(pd.Series(np.asarray(old_names, dtype=object)).astype(str))]
    report = match_tomo_names(np.asarray(new_names, dtype=object).astype(str), old_unique, mapping)
    report.raise_if_ambiguous()
    return report


def new_group_labels(report: NameMatchReport, new_names: Sequence[str] | np.ndarray) -> np.ndarray:
    """(M,) group label per new particle: the old tomogram name it matched, else its own name."""
    names = np.asarray(new_names, dtype=object).astype(str)
    matched = report.ts_ids_for(names)
    return np.where(pd.isna(matched), names, matched).astype(object)


def name_report_lines(report: NameMatchReport, old_names: Sequence[str] | np.ndarray,
                      max_tomograms: int | None = None) -> list[str]:
    """Per old tomogram: old particles, new particles matched to it and from which new names (the first
    ``max_tomograms``, then one line counting the others); then problems."""
    old_counts = pd.Series(np.asarray(old_names, dtype=object)).astype(str).value_counts(sort=False)
    per_ts = report.particles_per_ts_id
    lines = []
    names = sorted(old_counts.index)
    if max_tomograms is not None and len(names) > max_tomograms:
        lines.append(f"{len(names)} old tomograms; the first {max_tomograms} (all in {SUMMARY_JSON}):")
        names = names[:max_tomograms]
    for name in names:
        sources = sorted(n for n, t in report.matches.items() if t == name)
        how = ", ".join(f"{s!r} ({report.methods[s]})" for s in sources) or "no new name"
        lines.append(f"{name}: {int(old_counts[name])} old, {per_ts.get(name, 0)} new particle(s) from {how}")
    if max_tomograms is not None and len(old_counts) > max_tomograms:
        lines.append(f"... and {len(old_counts) - max_tomograms} more old tomograms")
    if report.unmatched:
        lines.append(f"new tomogram name(s) matching no old tomogram ({report.n_unmatched_particles} particle(s), "
                     f"all 'only new'): {list(report.unmatched)[:10]}")
    return lines


def group_labels(tomograms: np.ndarray, values: np.ndarray | None, column: str | None) -> np.ndarray:
    """(N,) matching groups: the tomogram, or ``"tomogram | column=value"`` with a group column. Values that read
    as numbers are compared as numbers (``1`` = ``1.0``), others as text."""
    names = np.asarray(tomograms, dtype=object).astype(str)
    if column is None or values is None:
        return names.astype(object)
    text = pd.Series(np.asarray(values, dtype=object)).astype(str).str.strip()
    numbers = pd.to_numeric(text, errors="coerce")
    normalised = np.where(numbers.notna(), numbers.map(lambda v: f"{v:.12g}"), text)
    return np.char.add(np.char.add(names, f" | {column}="), normalised.astype(str)).astype(object)


def intersect_poses(old: ParticlePoses, new: ParticlePoses, tolerance_angst: float, *, mode: str = "gated",
                    name_mapping: str | dict[str, str] | None = None,
                    histogram_radius_angst: float | None = None,
                    log: Callable[[str], None] | None = None, max_log_tomograms: int | None = None,
                    options: MatchOptions = NO_OPTIONS, old_columns: SideColumns = NO_COLUMNS,
                    new_columns: SideColumns = NO_COLUMNS, use_angles: bool = True) -> IntersectOutcome:
    """Match ``new`` against ``old`` per tomogram (positions in Å centred on the tomogram centre).

    The name report (at most ``max_log_tomograms`` per-tomogram lines) is passed line by line to ``log`` before
    the match runs. No common tomogram is an :class:`InputError` (nothing could match); a dense solve that cannot
    fit this machine's memory is refused before it starts (:func:`~mspecies.cli.intersect_checks.check_dense_memory`).
    ``options`` add the orientation gate, groups and the score; ``old_columns``/``new_columns`` carry the group
    values and scores they need; ``use_angles=False`` (a set without orientations) refuses an angular tolerance
    and skips the angles.
    """
    if mode not in MODES:
        raise InputError(f"mode must be one of {MODES}, got {mode!r}")
    if not float(tolerance_angst) >= 0:
        raise InputError(f"tolerance must be >= 0 Å, got {tolerance_angst}")
    old_groups = np.asarray(old.tomo_names, dtype=object).astype(str).astype(object)
    report = match_names(old_groups, new.tomo_names, name_mapping)
    for line in name_report_lines(report, old_groups, max_log_tomograms):
        (log or (lambda _: None))(line)
    if len(old) and len(new) and not report.matches:
        raise InputError(f"no tomogram of the new set matches one of the old set (old: "
                         f"{sorted(set(old_groups))[:5]}, new: {list(report.unmatched)[:5]}); "
                         "give a name mapping 'new_name=old_name, ...'")
    if options.angular_tolerance_deg is not None and not use_angles:
        raise InputError("--angular-tolerance-deg: a set has no orientations (no angle columns)")
    new_groups = new_group_labels(report, new.tomo_names)
    for side, columns in (("old", old_columns), ("new", new_columns)):
        if options.group_by is not None and columns.group_values is None:
            raise InputError(f"--group-by {options.group_by}: no values for the {side} set")
        if options.score is not None and columns.scores is None:
            raise InputError(f"--score {options.score}: no values for the {side} set")
    old_match = group_labels(old_groups, old_columns.group_values, options.group_by)
    new_match = group_labels(new_groups, new_columns.group_values, options.group_by)
    radius = (default_histogram_radius_angst(tolerance_angst, mode) if histogram_radius_angst is None
              else float(histogram_radius_angst))
    if mode != "m_compatible" and not np.isfinite(radius):
        raise InputError(f"--histogram-radius-angst: the nearest-neighbour histogram needs a finite radius, got "
                         f"{radius:g} (an infinite radius is M's histogram: --mode m_compatible)")
    # gated: the solve is dense only at an infinite tolerance; the histogram is never dense
    check_dense_memory(old_match, new_match, mode, radius if mode == "m_compatible" else float(tolerance_angst))
    angles = dict(old_euler_zyz_deg=old.euler_zyz_deg, new_euler_zyz_deg=new.euler_zyz_deg) if use_angles else {}
    result = match_particle_sets(old.positions_angst, new.positions_angst, tolerance_angst, old_groups=old_match,
                                 new_groups=new_match, mode=mode, angular_tolerance_deg=options.angular_tolerance_deg,
                                 symmetry=options.symmetry, **angles)
    distances, hist_angles = _histogram_values(old, new, old_match, new_match, tolerance_angst, radius, mode,
                                               options.symmetry if use_angles else None)
    wins = None if options.score is None else new_pose_wins(result, old_columns.scores, new_columns.scores)
    return IntersectOutcome(result, report, new_groups, distances, radius, hist_angles, options, wins, old_groups)


def _histogram_values(old: ParticlePoses, new: ParticlePoses, old_match: np.ndarray, new_match: np.ndarray,
                      tolerance_angst: float, radius_angst: float, mode: str,
                      symmetry: str | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Distances (Å) and angles (deg; None without ``symmetry`` or in M-compatible mode) to plot.

    Gated: each old particle's nearest new particle of its group within the radius (distances), and the angular
    distances of those nearest pairs within the distance tolerance (angles), independent of the angular tolerance.
    """
    if mode == "m_compatible":
        return histogram_distances(old.positions_angst, new.positions_angst, radius_angst, old_groups=old_match,
                                   new_groups=new_match, mode=mode), None
    partner, distance = nearest_new_particles(old.positions_angst, new.positions_angst, radius_angst,
                                              old_groups=old_match, new_groups=new_match)
    if symmetry is None:
        return distance[np.isfinite(distance)], None
    close = np.flatnonzero((partner >= 0) & (distance <= float(tolerance_angst) + DISTANCE_EPS_ANGST))
    angles = angular_distance_from_euler_deg(old.euler_zyz_deg[close], new.euler_zyz_deg[partner[close]], symmetry)
    return distance[np.isfinite(distance)], angles


# --- summary ---------------------------------------------------------------------------------------------------------


def _finite_or_none(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def summary_dict(outcome: IntersectOutcome, keep: tuple[bool, bool, bool] | None = None) -> dict:
    """JSON-ready summary: totals, per-tomogram counts with Jaccard index, tolerance (Å), mode, median matched
    distance (Å), histogram radius (Å), the name-matching report and (with ``keep``) the selected count."""
    result, report = outcome.result, outcome.name_report
    matched = result.matched_distances_angst
    summary = {
        "tolerance_angst": float(result.tolerance_angst), "mode": result.mode,
        "n_old": int(result.old_partner.size), "n_new": int(result.new_partner.size),
        "in_both": result.n_pairs, "only_old": int(result.only_old.sum()), "only_new": int(result.only_new.sum()),
        "jaccard": _finite_or_none(result.jaccard),
        "median_distance_angst": float(np.median(matched)) if matched.size else None,
        "histogram_radius_angst": _finite_or_none(outcome.histogram_radius_angst),
        "per_tomogram": _counts_rows(outcome.per_tomogram(), "tomogram"),
        "name_matching": {"matches": dict(report.matches), "methods": dict(report.methods),
                          "unmatched_new_names": list(report.unmatched),
                          "old_tomograms_without_new": list(report.unused_ts_ids)},
    }
    summary |= _options_summary(outcome)
    if keep is not None:
        old_idx, new_idx = select_union(result, *keep, new_wins=outcome.new_wins)
        summary["keep"] = [name for name, flag in zip(KEEP_CHOICES, keep) if flag]
        summary["selected"] = int(old_idx.size + new_idx.size)
    return summary


def _counts_rows(groups, key: str) -> list[dict]:  # noqa: ANN001 (tuple of GroupCounts)
    return [{key: g.group, "n_old": g.n_old, "n_new": g.n_new, "in_both": g.in_both, "only_old": g.only_old,
             "only_new": g.only_new, "jaccard": _finite_or_none(g.jaccard)} for g in groups]


def _options_summary(outcome: IntersectOutcome) -> dict:
    """Summary entries of the orientation gate, groups and score."""
    options, result = outcome.options, outcome.result
    angles = result.matched_angles_deg
    angles = angles[np.isfinite(angles)]
    summary = {"angular_tolerance_deg": options.angular_tolerance_deg, "symmetry": options.symmetry,
               "median_angle_deg": float(np.median(angles)) if angles.size else None,
               "group_by": options.group_by, "score": options.score}
    if options.group_by is not None:
        summary["per_group"] = _counts_rows(result.groups, "group")
    if outcome.new_wins is not None:
        summary["in_both_from_new"] = int(np.count_nonzero(outcome.new_wins))
    return summary


def summary_lines(summary: dict, max_tomograms: int | None = None) -> list[str]:
    """Human-readable lines of a :func:`summary_dict` (for logs and the protocol summary); at most
    ``max_tomograms`` per-tomogram lines, then one line counting the others."""

    jaccard = summary["jaccard"]
    median = summary["median_distance_angst"]
    lines = [f"Tolerance {summary['tolerance_angst']:g} Å ({summary['mode']}): {summary['n_old']} old, "
             f"{summary['n_new']} new -> {summary['only_old']} only old, {summary['in_both']} in both, "
             f"{summary['only_new']} only new; Jaccard index "
             f"{'n/a' if jaccard is None else f'{jaccard:.3f}'}; median matched distance "
             f"{'n/a' if median is None else f'{median:.2f} Å'}"]
    if summary.get("angular_tolerance_deg") is not None or summary.get("median_angle_deg") is not None:
        gate = summary.get("angular_tolerance_deg")
        median_angle = summary.get("median_angle_deg")
        lines.append(f"Orientation: {'no angular gate' if gate is None else f'angular tolerance {gate:g} deg'}, "
                     f"symmetry {summary.get('symmetry', 'C1')}; median angular distance of the pairs "
                     f"{'n/a' if median_angle is None else f'{median_angle:.2f} deg'}")
    if summary.get("group_by"):
        lines.append(f"Matched within tomogram and {summary['group_by']} ({len(summary['per_group'])} group(s))")
    if summary.get("score"):
        lines.append(f"In both keeps the higher {summary['score']}: {summary['in_both_from_new']} pair(s) "
                     "represented by the new particle, the others by the old one")
    groups = summary["per_tomogram"]
    for group in groups if max_tomograms is None else groups[:max_tomograms]:
        jac = group["jaccard"]
        lines.append(f"  {group['tomogram']}: old {group['n_old']}, new {group['n_new']}, in both "
                     f"{group['in_both']}, only old {group['only_old']}, only new {group['only_new']}, Jaccard "
                     f"{'n/a' if jac is None else f'{jac:.3f}'}")
    if max_tomograms is not None and len(groups) > max_tomograms:
        lines.append(f"  ... and {len(groups) - max_tomograms} more tomograms (all in {SUMMARY_JSON})")
    if "selected" in summary:
        lines.append(f"Selected ({' + '.join(summary['keep'])}): {summary['selected']} particle(s)")
    return lines


def write_summary_json(path: str | Path, summary: dict) -> Path:
    """Write ``summary`` as indented JSON."""
    path = Path(path)
    path.write_text(json.dumps(summary, indent=1))
    return path


def read_summary_json(path: str | Path) -> dict:
    """Read a summary written by :func:`write_summary_json`; missing file → :class:`InputError`."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: summary not found (has the intersection run?)")
    return json.loads(path.read_text())


# --- distances files -----------------------------------------------------------------------------------------------


def write_histogram_distances(path: str | Path, distances_angst: np.ndarray,
                              header: str = "distance (A) to the nearest new particle, up to the histogram radius"
                              ) -> Path:
    """One value per line (distances in Å; also used for the angles in deg with another ``header``)."""
    path = Path(path)
    np.savetxt(path, np.asarray(distances_angst, dtype=np.float64).reshape(-1), fmt="%.4f", header=header)
    return path


def read_histogram_distances(path: str | Path) -> np.ndarray:
    """(K,) values written by :func:`write_histogram_distances`."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: histogram values not found (has the intersection run?)")
    return np.atleast_1d(np.loadtxt(path, dtype=np.float64, ndmin=1))


def write_particle_distances(path: str | Path, outcome: IntersectOutcome, old_groups: np.ndarray) -> Path:
    """Table of every particle: ``set`` (old/new), ``index`` (0-based row), ``tomogram``, ``partner`` (index in the
    other set, -1), ``distance_angst`` and ``angle_deg`` (angular distance over the symmetry; -1 when unmatched or
    without orientations), ``status`` (in_both/only_old/only_new) and ``represents_pair`` (1 for the particle of
    the pair that "in both" keeps, else 0)."""
    result = outcome.result
    wins = np.zeros(result.old_partner.size, bool) if outcome.new_wins is None else outcome.new_wins
    new_wins = np.zeros(result.new_partner.size, bool)
    new_wins[result.old_partner[wins]] = True
    frames = []
    for side, partner, distance, angle, groups, kept in (
            ("old", result.old_partner, result.old_distance_angst, result.old_angle_deg, old_groups,
             (result.old_partner >= 0) & ~wins),
            ("new", result.new_partner, result.new_distance_angst, result.new_angle_deg, outcome.new_groups,
             new_wins)):
        status = np.where(partner >= 0, "in_both", f"only_{side}")
        frames.append(pd.DataFrame({"set": side, "index": np.arange(partner.size), "tomogram": groups,
                                    "partner": partner, "distance_angst": np.nan_to_num(distance, nan=-1.0),
                                    "angle_deg": np.nan_to_num(angle, nan=-1.0), "status": status,
                                    "represents_pair": kept.astype(int)}))
    return write_table_tsv(path, pd.concat(frames, ignore_index=True))


def write_table_tsv(path: str | Path, frame: pd.DataFrame) -> Path:
    """Write a per-particle table as TSV: floats rounded to 4 decimals, text columns as categories (pandas
    formats those in bulk: 10⁶ particles take seconds, where a ``float_format`` takes tens of seconds)."""
    table = frame.copy()
    for column in table.columns:
        if table[column].dtype.kind == "f":
            table[column] = table[column].round(4)
        elif table[column].dtype == object:
            table[column] = table[column].astype("category")
    path = Path(path)
    table.to_csv(path, sep="\t", index=False)
    return path


# --- histogram files -------------------------------------------------------------------------------------------


def write_match_files(out_dir: str | Path, outcome: IntersectOutcome, old_groups: np.ndarray, *,
                      keep: tuple[bool, bool, bool] | None = None, n_bins: int = DEFAULT_HISTOGRAM_BINS,
                      log_scale: bool = False, extra: dict | None = None) -> dict:
    """Write ``summary.json``, ``histogram_distances.txt``, ``particle_distances.tsv`` and
    ``distance_histogram.png`` into ``out_dir``, and with orientations ``histogram_angles.txt`` and
    ``angle_histogram.png``; returns the summary (``extra`` items are added to it)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = summary_dict(outcome, keep)
    summary["histogram_bins"] = int(n_bins)
    summary.update(extra or {})
    write_histogram_distances(out / HISTOGRAM_DISTANCES_TXT, outcome.histogram_distances_angst)
    write_particle_distances(out / PARTICLE_DISTANCES_TSV, outcome, old_groups)
    save_histogram_png(out / HISTOGRAM_PNG, draw_distance_histogram, distances_angst=outcome.histogram_distances_angst,
                       tolerance_angst=outcome.result.tolerance_angst, n_bins=n_bins, log_scale=log_scale,
                       title=histogram_title(outcome.histogram_radius_angst, outcome.result.mode))
    summary["angle_histogram"] = outcome.histogram_angles_deg is not None
    if outcome.histogram_angles_deg is not None:
        write_histogram_distances(out / HISTOGRAM_ANGLES_TXT, outcome.histogram_angles_deg,
                                  header="angular distance (deg, over the symmetry) of the nearest pairs within the "
                                         "distance tolerance")
        save_histogram_png(out / ANGLE_HISTOGRAM_PNG, draw_angle_histogram, angles_deg=outcome.histogram_angles_deg,
                           angular_tolerance_deg=outcome.options.angular_tolerance_deg,
                           symmetry=outcome.options.symmetry, n_bins=n_bins, log_scale=log_scale)
    write_summary_json(out / SUMMARY_JSON, summary)
    return summary


# --- STAR inputs and outputs -----------------------------------------------------------------------------------------


def read_star_input(path: str | Path, dialect: str | None, *, role: str, coord_pixel_size_angst: float | None,
                    tomo_shape_px: TomoShapes) -> ParticleTable:
    """Read one particle STAR; errors are prefixed with the role (``--old``/``--new``) and name the file."""
    try:
        table = read_particle_star(path, dialect, coord_pixel_size_angst=coord_pixel_size_angst,
                                   tomo_shape_px=tomo_shape_px)
    except InputError as error:
        raise InputError(f"{role} {path}: {error}") from error
    except (ValueError, KeyError) as error:
        raise InputError(f"{role} {path}: cannot read it as a particle STAR ({error})") from error
    if not len(table):
        raise InputError(f"{role} {path}: no particles")
    return table


def _fill_extras(old: ParticleTable, new: ParticleTable, new_names: np.ndarray) -> pd.DataFrame:
    """Old extra columns for the new rows: the new file's value when it has the column; a value constant per
    tomogram in the old rows (e.g. ``rlnMicrographName``) is copied from the same tomogram; else ``0`` (numeric
    columns) or ``None`` (text)."""
    old_names = pd.Series(old.poses.tomo_names, dtype=object).astype(str)
    filled = {}
    for column in old.extras.columns:
        if column in new.extras.columns:
            filled[column] = new.extras[column].to_numpy(dtype=object)
            continue
        values = old.extras[column].reset_index(drop=True)
        per_tomo = values.groupby(old_names).agg(["nunique", "first"])
        constant = per_tomo["first"][per_tomo["nunique"] == 1]
        numeric = pd.to_numeric(values, errors="coerce").notna().all()
        default = "0" if numeric else "None"
        filled[column] = pd.Series(new_names, dtype=object).map(constant).fillna(default).to_numpy(dtype=object)
    return pd.DataFrame(filled, index=pd.RangeIndex(len(new_names)), columns=list(old.extras.columns), dtype=object)


def _optional_concat(old_values: np.ndarray | None, new_values: np.ndarray | None, n_new: int,
                     fill) -> np.ndarray | None:
    """Old column followed by the ``n_new`` new rows' values (``fill(n_new)`` when the new table lacks it);
    None when the old table lacks the column."""
    if old_values is None:
        return None
    return np.concatenate([old_values, new_values if new_values is not None else fill(n_new)])


def _first(values: np.ndarray | None, default: object) -> object:
    """First element of an optional per-row array, or ``default`` when absent or empty."""
    return values[0] if values is not None and len(values) else default


def merge_into_old_dialect(old: ParticleTable, new: ParticleTable, new_group_names: np.ndarray, *,
                           template: ParticleTable | None = None) -> ParticleTable:
    """One table holding the rows of ``old`` then those of ``new`` (``new`` already subset), written in
    ``old``'s dialect: new rows are renamed to the old tomogram they matched (``new_group_names``), take the
    coordinate pixel size, first optics group and source hashes of ``template`` (default: ``old``; pass the
    whole old table when ``old`` is an empty subset), keep their positions (Å), shifts and angles;
    subsets default to ``row % 2 + 1``; image names missing in the new file are written as ``None``."""
    template = old if template is None else template
    n_new = len(new)
    names = np.asarray(new_group_names, dtype=object).astype(str).astype(object)
    poses = ParticlePoses(np.concatenate([old.poses.positions_angst, new.poses.positions_angst]),
                          np.concatenate([old.poses.euler_zyz_deg, new.poses.euler_zyz_deg]),
                          np.concatenate([old.poses.tomo_names, names]))
    pixel = None if old.coord_pixel_size_angst is None else np.concatenate(
        [old.coord_pixel_size_angst, np.full(n_new, _first(template.coord_pixel_size_angst, np.nan))])
    image_pixel = None if old.image_pixel_size_angst is None else np.concatenate(
        [old.image_pixel_size_angst, np.full(n_new, _first(template.image_pixel_size_angst, np.nan))])
    shapes = dict(new.tomo_shape_px or {})
    shapes = {**{str(n): shapes[str(o)] for n, o in zip(names, new.poses.tomo_names) if str(o) in shapes},
              **(old.tomo_shape_px or {})}
    hash_by_name = {} if template.source_hashes is None else dict(zip(template.poses.tomo_names.astype(str),
                                                                      template.source_hashes))
    extras = pd.concat([old.extras.reset_index(drop=True), _fill_extras(old, new, names)], ignore_index=True)
    groups = _optional_concat(old.optics_group, None, n_new, lambda n: np.full(
        n, _first(template.optics_group, 1), dtype=np.int64))
    return replace(
        old, poses=poses, origins_angst=np.concatenate([old.origins_angst, new.origins_angst]),
        origin_units=old.origin_units or new.origin_units, coord_pixel_size_angst=pixel,
        image_pixel_size_angst=image_pixel, tomo_shape_px=shapes or None,
        random_subset=_optional_concat(old.random_subset, new.random_subset, n_new,
                                       lambda n: np.arange(n, dtype=np.int64) % 2 + 1),
        image_names=_optional_concat(old.image_names, new.image_names, n_new, lambda n: np.full(n, "None", object)),
        ctf_image_names=_optional_concat(old.ctf_image_names, new.ctf_image_names, n_new,
                                         lambda n: np.full(n, "None", object)),
        source_hashes=_optional_concat(old.source_hashes, None, n_new,
                                       lambda n: np.array([hash_by_name.get(str(x), "None") for x in names],
                                                          dtype=object)),
        optics_group=groups, extras=extras, source_row=np.concatenate([old.source_row, new.source_row]),
        # RELION 4/5 subtomogram boxes: new rows get an identity box, so their rlnAngle*/origin are the full pose
        subtomogram_euler_deg=_optional_concat(old.subtomogram_euler_deg, None, n_new, lambda n: np.zeros((n, 3))),
        box_euler_deg=_optional_concat(old.box_euler_deg, new.poses.euler_zyz_deg, n_new, None),
        box_origins_angst=_optional_concat(old.box_origins_angst, new.origins_angst, n_new, None))


def write_star_outputs(out_dir: str | Path, old: ParticleTable, new: ParticleTable, outcome: IntersectOutcome,
                       keep: tuple[bool, bool, bool], microscope: Microscope | None = None) -> dict[str, Path]:
    """Write ``only_old.star``, ``in_both.star`` (old rows; with a score, the old rows that won then the new rows
    that won), ``only_new.star`` (new rows) and ``selected.star`` (the chosen union), all in the old file's
    dialect → {stem: path}; ``microscope`` for optics that lack it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = outcome.result
    paths = {"only_old": write_particle_star(old.take(np.flatnonzero(result.only_old)), out / "only_old.star",
                                             microscope=microscope)}
    both_old, both_new = select_union(result, False, True, False, new_wins=outcome.new_wins)
    paths["in_both"] = write_particle_star(
        merge_into_old_dialect(old.take(both_old), new.take(both_new), outcome.new_groups[both_new], template=old)
        if both_new.size else old.take(both_old), out / "in_both.star", microscope=microscope)
    only_new = np.flatnonzero(result.only_new)
    paths["only_new"] = write_particle_star(
        merge_into_old_dialect(old.take(np.arange(0)), new.take(only_new), outcome.new_groups[only_new],
                               template=old),
        out / "only_new.star", microscope=microscope)
    old_idx, new_idx = select_union(result, *keep, new_wins=outcome.new_wins)
    selected = merge_into_old_dialect(old.take(old_idx), new.take(new_idx), outcome.new_groups[new_idx],
                                      template=old)
    paths["selected"] = write_particle_star(selected, out / "selected.star", microscope=microscope)
    return paths



def intersect_star_files(old_path: str | Path, new_path: str | Path, tolerance_angst: float, out_dir: str | Path, *,
                         keep: tuple[bool, bool, bool] = (True, True, True), mode: str = "gated",
                         old_dialect: str | None = None, new_dialect: str | None = None,
                         coord_pixel_size_angst: float | None = None, tomo_shape_px: TomoShapes = None,
                         name_mapping: str | None = None, histogram_radius_angst: float | None = None,
                         n_bins: int = DEFAULT_HISTOGRAM_BINS, log_scale: bool = False,
                         log: Callable[[str], None] = print, max_log_tomograms: int | None = None,
                         options: MatchOptions = NO_OPTIONS, microscope: Microscope | None = None) -> dict:
    """Intersect two particle STAR files and write every output into ``out_dir``; returns the summary.

    ``microscope`` fills the optics the old file lacks where its dialect needs them (RELION 3.0/3.1).
    ``coord_pixel_size_angst`` (Å/px) is used for a file that does not carry its coordinate pixel size;
    ``tomo_shape_px`` (px at that pixel size) only where a corner-based file meets a centred one (RELION 5): two
    corner-based files of the same tomograms are compared from the corner, without it. New particles whose
    tomogram name matches an old tomogram inherit that tomogram's size when the new file needs one. ``options``:
    orientation gate, group column, score column (:class:`MatchOptions`). (The command line removes duplicates
    instead when both paths name the same file: :mod:`mspecies.cli.deduplicate_files`.)

    Every parameter is checked before anything is written; the outputs are written into a staging folder under
    the lock of ``out_dir`` and replace the earlier run's outputs only once all are complete (``summary.json``,
    which lists the others, removed first and written last; :mod:`mspecies.cli.atomic`).
    """
    if not any(keep):
        raise InputError(f"--keep: choose at least one of {list(KEEP_CHOICES)}")
    check_intersect_parameters(tolerance_angst, n_bins, histogram_radius_angst)
    check_output_folder(out_dir, "--out")
    refuse_replaced_inputs(out_dir, (("--old", old_path), ("--new", new_path)))
    old = read_star_input(old_path, old_dialect, role="--old", coord_pixel_size_angst=coord_pixel_size_angst,
                          tomo_shape_px=tomo_shape_px)
    new = read_star_input(new_path, new_dialect, role="--new", coord_pixel_size_angst=coord_pixel_size_angst,
                          tomo_shape_px=_new_shapes(new_path, new_dialect, old, tomo_shape_px, name_mapping,
                                                    coord_pixel_size_angst))
    _require_same_frame(old, new, old_path, new_path)
    log(f"old: {old_path} (RELION/Warp dialect {old.dialect}, {len(old)} particles); "
        f"new: {new_path} (dialect {new.dialect}, {len(new)} particles)")
    old_columns = star_side_columns(old, options, f"--old {old_path}")
    new_columns = star_side_columns(new, options, f"--new {new_path}")
    for role, path, table in (("--old", old_path, old), ("--new", new_path, new)):
        if options.angular_tolerance_deg is not None and not table.has_angles:
            raise InputError(f"--angular-tolerance-deg: {role} {path} has no angle columns (rlnAngleRot/Tilt/Psi)")
    outcome = intersect_poses(old.poses, new.poses, tolerance_angst, mode=mode, name_mapping=name_mapping,
                              histogram_radius_angst=histogram_radius_angst, log=log,
                              max_log_tomograms=max_log_tomograms, options=options, old_columns=old_columns,
                              new_columns=new_columns, use_angles=old.has_angles and new.has_angles)
    with locked_output_folder(out_dir, "--out") as out:
        with staging_folder(out, "intersect") as staging:
            files = write_star_outputs(staging, old, new, outcome, keep, microscope)
            extra = {"old_file": str(old_path), "new_file": str(new_path), "old_dialect": str(old.dialect),
                     "new_dialect": str(new.dialect),
                     "files": {k: str(out / Path(v).relative_to(staging)) for k, v in files.items()}}
            summary = write_match_files(staging, outcome, old.poses.tomo_names, keep=keep, n_bins=n_bins,
                                        log_scale=log_scale, extra=extra)
            publish(staging, out, replaced=[out / name for name in OUTPUT_FILES], last=SUMMARY_JSON)
    return summary


def refuse_replaced_inputs(out_dir: str | Path, inputs: Sequence[tuple[str, str | Path]]) -> None:
    """An input file (``(flag, path)``) that the outputs in ``out_dir`` would replace is an :class:`InputError`."""
    written = {(Path(out_dir) / name).resolve(): Path(out_dir) / name for name in OUTPUT_FILES}
    for flag, path in inputs:
        if Path(path).resolve() in written:
            raise InputError(f"--out: the intersection writes {written[Path(path).resolve()]}, which is its input "
                             f"{flag} {path}; choose another --out folder (or move the input)")


def _require_same_frame(old: ParticleTable, new: ParticleTable, old_path: str | Path, new_path: str | Path) -> None:
    """Both tables must hold positions from the same origin: two corner-based files of the same tomograms compare
    as they are; a corner-based file and a centred one (RELION 5) need each tomogram's centre."""
    if old.frame == new.frame:
        return
    corner, centred = ((old_path, old), (new_path, new)) if old.frame == PositionFrame.CORNER else \
        ((new_path, new), (old_path, old))
    raise InputError(f"{corner[0]} (dialect {corner[1].dialect}) stores coordinates from the tomogram corner and "
                     f"{centred[0]} (dialect {centred[1].dialect}) from its centre: to compare them the tomogram "
                     "centres are needed; give the tomogram size (--tomo-size NX NY NZ or --tomo-sizes FILE, px at "
                     "the coordinate pixel size of the corner-based file)")


def _new_shapes(new_path: str | Path, new_dialect: str | None, old: ParticleTable, given: TomoShapes,
                name_mapping: str | None, coord_pixel_size_angst: float | None) -> TomoShapes:
    """Tomogram sizes for the new file: the given ones; else, when the new file is corner-based and the old table
    knows sizes, the old sizes under the new file's names (through tolerant name matching)."""
    if given is not None or not old.tomo_shape_px:
        return given
    try:
        probe = read_particle_star(new_path, new_dialect, coord_pixel_size_angst=coord_pixel_size_angst,
                                   tomo_shape_px=(2, 2, 2))
    except InputError:
        return given  # the real read reports the problem
    if probe.dialect not in CORNER_DIALECTS:
        return given
    report = match_tomo_names(probe.poses.tomo_names.astype(str), list(old.tomo_shape_px), name_mapping)
    shapes = {name: old.tomo_shape_px[ts] for name, ts in report.matches.items()}
    return shapes or given


# --- option columns of STAR tables ----------------------------------------------------------------------------------


def same_file(first: str | Path, second: str | Path) -> bool:
    """True when both paths name the same existing file (self-intersection = duplicate removal)."""
    try:
        return Path(first).resolve().samefile(Path(second).resolve())
    except OSError:
        return False


RELION_LABELS = {"classId": "rlnClassNumber"}
"""Scipion attribute names (without the leading underscore) whose values a STAR holds under a RELION label."""


def star_column_values(table: ParticleTable, column: str, where: str, flag: str) -> np.ndarray:
    """(N,) text values of a particle column (uninterpreted columns, the subset and the optics group; a Scipion
    name of :data:`RELION_LABELS` reads its RELION label); a column absent from the file is an
    :class:`InputError` naming the flag, the file and the columns it has."""
    relion = RELION_LABELS.get(column.lstrip("_"), column)
    for name in (column, relion):
        if name in table.extras.columns:
            return table.extras[name].to_numpy(dtype=object)
    known = {"rlnRandomSubset": table.random_subset, "rlnOpticsGroup": table.optics_group}
    if known.get(column) is not None:
        return np.asarray(known[column]).astype(str).astype(object)
    raise InputError(f"{flag} {column}: {where} has no column {column} (its other columns: "
                     f"{sorted(table.extras.columns)[:20]})")


def numeric_column(values: np.ndarray, column: str, where: str, flag: str) -> np.ndarray:
    """(N,) float of a text column; a non-numeric entry is an :class:`InputError` naming its row (1-based)."""
    numbers = pd.to_numeric(pd.Series(values, dtype=object), errors="coerce").to_numpy(dtype=np.float64)
    bad = np.flatnonzero(np.isnan(numbers))
    if bad.size:
        raise InputError(f"{flag} {column}: {where} row {int(bad[0]) + 1}: {values[bad[0]]!r} is not a number")
    return numbers


def star_side_columns(table: ParticleTable, options: MatchOptions, where: str) -> SideColumns:
    """The group values and scores that ``options`` need, from one STAR table."""
    group = None if options.group_by is None else star_column_values(table, options.group_by, where, "--group-by")
    scores = None if options.score is None else numeric_column(
        star_column_values(table, options.score, where, "--score"), options.score, where, "--score")
    return SideColumns(group, scores)
