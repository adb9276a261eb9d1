"""Intersect two particle sets: gated optimal one-to-one assignment per tomogram (M's "Intersect particle sets").

Two modes (see ``docs``/``m_reference.md`` §2):

``"gated"`` (default)
    Among all one-to-one matchings of old to new particles that only use pairs with distance
    ``d <= tolerance + DISTANCE_EPS_ANGST``, choose one with the **maximum number of pairs** and, among those,
    the **minimum total distance**. The tolerance is only a gate, so the distances of the matched pairs at a
    generous radius (:func:`histogram_distances`) are a meaningful guide for choosing the tolerance.
``"m_compatible"``
    M 1.x: dense minimum-sum assignment on the full old x new distance matrix (always ``min(n_old, n_new)``
    pairs per tomogram), then pairs with ``d > tolerance + DISTANCE_EPS_ANGST`` are dropped. Because distant
    leftovers compete in the global sum, this loses true pairs when the sets do not fully overlap.

Raising the tolerance never decreases the number of pairs of a group, but a particular particle can leave
"in both" when new allowed pairs make a cheaper matching of the same size possible.

**Orientation gate** (optional): with RELION Euler angles for both sets and ``angular_tolerance_deg``, a pair is a
candidate only when it also passes ``angle <= angular_tolerance_deg + ANGLE_EPS_DEG``, the angle being the
smallest rotation between the two poses over the reference's point group (:mod:`mspecies.core.symmetry`). The
distance stays the only cost. **Tie rule**: the angle never enters the cost or breaks a tie; among the gated
matchings of maximum size, one of minimum total distance is returned (which one, when several have exactly the
same total, is the solver's deterministic choice for a given input order; size and total are unique). Every
matched pair carries its angular distance whenever both sets have angles.

**Groups**: particles match only within equal labels (the tomogram, or any composite label such as tomogram and
class). **Histogram**: :func:`histogram_distances` gives each old particle's distance to its nearest new particle
of the same group (one KD-tree query, no assignment; see there). **Deduplication**: :func:`deduplicate_particles`
keeps one particle per cluster of mutual duplicates within one set.

Particles of different groups (tomograms) never match. Distances are Euclidean, in Å, float64
(M uses float32). Solvers: an exact dense solver (square augmented matrix) and a sparse solver (KD-tree candidate
pairs, connected components in batches, a maximum matching and its Dulmage-Mendelsohn regions, LAPJVsp full
matchings per region: :func:`_solve_by_regions`); both give the same cardinality and total distance. The sparse
solver stays fast on crowded tomograms where the candidate graph percolates into one giant component.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix, csr_matrix
from scipy.sparse.csgraph import (
    breadth_first_order,
    connected_components,
    maximum_bipartite_matching,
    min_weight_full_bipartite_matching,
)
from scipy.spatial import cKDTree

from mspecies.common.euler import euler_to_matrix
from mspecies.common.types import InputError
from mspecies.core.symmetry import angular_distance_deg, parse_symmetry

DISTANCE_EPS_ANGST = 1e-6
"""Pairs with ``d <= tolerance + DISTANCE_EPS_ANGST`` pass the gate (M: ``d <= tol + 1e-6``)."""

ANGLE_EPS_DEG = 1e-6
"""Pairs with ``angle <= angular_tolerance + ANGLE_EPS_DEG`` pass the orientation gate."""

DENSE_MAX_PARTICLES = 400
"""``method='auto'`` uses the dense solver when a group has at most this many particles on each side."""

LAPJVSP_BATCH_NODES = 4096
"""Components are handed to LAPJVsp in batches of about this many particles: scipy's LAPJVsp spends time
proportional to the whole graph on each augmentation, so one call on 10⁵ particles in small components takes
seconds where batches take a fraction (the components are independent, so the optimum is the same)."""

MODES = ("gated", "m_compatible")
METHODS = ("auto", "dense", "sparse")
_EDGE_OFFSET = 1.0  # added to every sparse edge weight: LAPJVsp needs non-zero weights (explicit zeros are dropped)


@dataclass(frozen=True)
class GroupCounts:
    """Counts of one group (tomogram); ``jaccard = in_both / (n_old + n_new - in_both)``."""

    group: str
    n_old: int
    n_new: int
    in_both: int
    only_old: int
    only_new: int
    jaccard: float


@dataclass(frozen=True)
class IntersectionResult:
    """Outcome of :func:`match_particle_sets`.

    Attributes
    ----------
    old_partner : (N,) int64
        Index of the matched new particle for each old particle, or -1.
    old_distance_angst : (N,) float64
        Distance to that partner (Å), NaN when unmatched.
    new_partner : (M,) int64
        Index of the matched old particle for each new particle, or -1.
    new_distance_angst : (M,) float64
        Distance to that partner (Å), NaN when unmatched.
    groups : tuple of GroupCounts
        Per-group counts, sorted by group name (groups present in either set).
    tolerance_angst : float
        The tolerance used (Å).
    mode : str
        ``"gated"`` or ``"m_compatible"``.
    old_angle_deg, new_angle_deg : (N,), (M,) float64
        Angular distance (deg, smallest over the symmetry) to the partner; NaN when unmatched or without angles.
    angular_tolerance_deg : float or None
        The orientation gate (deg), None without one.
    symmetry : str
        Point group used for the angular distances.
    """

    old_partner: np.ndarray
    old_distance_angst: np.ndarray
    new_partner: np.ndarray
    new_distance_angst: np.ndarray
    groups: tuple[GroupCounts, ...]
    tolerance_angst: float
    mode: str
    old_angle_deg: np.ndarray | None = None
    new_angle_deg: np.ndarray | None = None
    angular_tolerance_deg: float | None = None
    symmetry: str = "C1"

    @property
    def in_both(self) -> np.ndarray:
        """(N,) bool: old particles that have a partner (they keep their old poses)."""
        return self.old_partner >= 0

    @property
    def only_old(self) -> np.ndarray:
        """(N,) bool: old particles without a partner."""
        return self.old_partner < 0

    @property
    def only_new(self) -> np.ndarray:
        """(M,) bool: new particles without a partner."""
        return self.new_partner < 0

    @property
    def n_pairs(self) -> int:
        """Number of matched pairs."""
        return int(np.count_nonzero(self.old_partner >= 0))

    @property
    def matched_distances_angst(self) -> np.ndarray:
        """(n_pairs,) float64: distances of the matched pairs (Å), in old-index order."""
        return self.old_distance_angst[self.old_partner >= 0]

    @property
    def matched_angles_deg(self) -> np.ndarray:
        """(n_pairs,) float64: angular distances of the matched pairs (deg; NaN without angles), old-index order."""
        if self.old_angle_deg is None:
            return np.full(self.n_pairs, np.nan)
        return self.old_angle_deg[self.old_partner >= 0]

    @property
    def total_distance_angst(self) -> float:
        """Sum of the matched distances (Å)."""
        return float(self.matched_distances_angst.sum())

    @property
    def jaccard(self) -> float:
        """Jaccard index over all groups: ``in_both / (n_old + n_new - in_both)`` (NaN for two empty sets)."""
        union = self.old_partner.size + self.new_partner.size - self.n_pairs
        return self.n_pairs / union if union else float("nan")


def select_union(result: IntersectionResult, keep_only_old: bool, keep_in_both: bool,
                 keep_only_new: bool, new_wins: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Old and new indices forming the chosen union (M's three check-boxes).

    Particles in both sets are represented by the **old** particle (old poses), as in M, except the pairs where
    ``new_wins`` ((N,) bool over old particles, :func:`new_pose_wins`) is True: those are represented by the new
    partner.

    Returns
    -------
    old_indices : (K_old,) int64, ascending
    new_indices : (K_new,) int64, ascending
    """
    wins = np.zeros(result.old_partner.shape, bool) if new_wins is None else np.asarray(new_wins, bool)
    keep_old = (result.only_old & bool(keep_only_old)) | (result.in_both & ~wins & bool(keep_in_both))
    keep_new = result.only_new & bool(keep_only_new)
    if keep_in_both:
        keep_new[result.old_partner[wins]] = True
    return np.flatnonzero(keep_old), np.flatnonzero(keep_new)


def distance_histogram(distances_angst: np.ndarray, n_bins: int = 100,
                       max_angst: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Histogram of matched distances on ``[0, max_angst]``.

    Parameters
    ----------
    distances_angst : (K,) float
        Distances (Å); NaN entries (unmatched) are ignored.
    n_bins : int
        Number of bins (M uses 100).
    max_angst : float, optional
        Upper edge (Å). Default ``max(1, max(distances))`` as in M (1 Å for an empty input).

    Returns
    -------
    counts : (n_bins,) int64
    edges_angst : (n_bins + 1,) float64
    """
    if n_bins < 1:
        raise InputError(f"n_bins must be >= 1, got {n_bins}")
    values = np.asarray(distances_angst, dtype=np.float64).ravel()
    values = values[np.isfinite(values)]
    if max_angst is None:
        max_angst = max(1.0, float(values.max())) if values.size else 1.0
    if not max_angst > 0:
        raise InputError(f"max_angst must be > 0, got {max_angst}")
    counts, edges = np.histogram(values, bins=n_bins, range=(0.0, float(max_angst)))
    return counts.astype(np.int64), edges




def histogram_distances(old_positions_angst: np.ndarray, new_positions_angst: np.ndarray,
                        histogram_radius_angst: float, *, old_groups: np.ndarray | None = None,
                        new_groups: np.ndarray | None = None, mode: str = "gated") -> np.ndarray:
    """Distances (Å) to plot when choosing the tolerance.

    Gated mode: for every old particle, the distance to its **nearest new particle of the same group** when it is
    within ``histogram_radius_angst`` (:func:`nearest_new_particles`; one KD-tree query, no assignment, so it stays
    cheap on crowded tomograms). True pairs form a peak at the jitter of the positions; old particles without a
    partner give the tail of chance neighbours, which starts near the typical spacing of the new particles; the
    tolerance is best put in the valley between them. It does not depend on the tolerance nor on the orientation
    gate. ``mode="m_compatible"`` gives M's histogram instead: the distances of the dense assignment at this radius
    (with ``np.inf``: all assigned pairs before thresholding).

    Returns
    -------
    (K,) float64, distances (Å) in old-index order (gated: old particles with a new particle within the radius).
    """
    if mode == "m_compatible":
        result = match_particle_sets(old_positions_angst, new_positions_angst, histogram_radius_angst,
                                     old_groups=old_groups, new_groups=new_groups, mode=mode)
        return result.matched_distances_angst
    _, distance = nearest_new_particles(old_positions_angst, new_positions_angst, histogram_radius_angst,
                                        old_groups=old_groups, new_groups=new_groups)
    return distance[np.isfinite(distance)]


def nearest_new_particles(old_positions_angst: np.ndarray, new_positions_angst: np.ndarray, radius_angst: float, *,
                          old_groups: np.ndarray | None = None, new_groups: np.ndarray | None = None,
                          exclude_same_index: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Nearest new particle of the same group for every old particle, within ``radius_angst`` (finite, Å).

    ``exclude_same_index=True`` (old and new are the same set): the nearest *other* particle.

    Returns
    -------
    partner : (N,) int64
        Index of the nearest new particle, -1 when none is within the radius.
    distance_angst : (N,) float64
        Its distance (Å), NaN when none.
    """
    old = _validate_positions("old_positions_angst", old_positions_angst)
    new = _validate_positions("new_positions_angst", new_positions_angst)
    radius = _validate_tolerance(radius_angst)
    if not np.isfinite(radius):
        raise InputError(f"radius_angst must be finite for the nearest-neighbour histogram, got {radius_angst}")
    _, old_codes, new_codes = _group_codes(old_groups, new_groups, len(old), len(new))
    partner = np.full(len(old), -1, np.int64)
    distance = np.full(len(old), np.nan)
    if not len(old) or not len(new):
        return partner, distance
    shifted_old, shifted_new, margin = _side_by_side(old, new, old_codes, new_codes, radius)
    if exclude_same_index:
        _, two = _kd_tree(shifted_new).query(shifted_old, k=2, distance_upper_bound=radius + margin, workers=-1)
        j = np.where(two[:, 0] == np.arange(len(old)), two[:, 1], two[:, 0])
    else:
        _, j = _kd_tree(shifted_new).query(shifted_old, k=1, distance_upper_bound=radius + margin, workers=-1)
    found = np.flatnonzero(j < len(new))
    found = found[old_codes[found] == new_codes[j[found]]]
    d = _pair_distances(old[found], new[j[found]])
    keep = _gate(d, radius)
    partner[found[keep]], distance[found[keep]] = j[found[keep]], d[keep]
    return partner, distance


def match_particle_sets(old_positions_angst: np.ndarray, new_positions_angst: np.ndarray, tolerance_angst: float,
                        *, old_groups: np.ndarray | None = None, new_groups: np.ndarray | None = None,
                        mode: str = "gated", method: str = "auto", old_euler_zyz_deg: np.ndarray | None = None,
                        new_euler_zyz_deg: np.ndarray | None = None, angular_tolerance_deg: float | None = None,
                        symmetry: str = "C1") -> IntersectionResult:
    """Match old to new particles one-to-one within each group (tomogram).

    Parameters
    ----------
    old_positions_angst : (N, 3) float
        Old particle positions (Å); any common origin.
    new_positions_angst : (M, 3) float
        New particle positions (Å), same frame as the old ones.
    tolerance_angst : float
        Maximum pair distance (Å, inclusive up to ``DISTANCE_EPS_ANGST``); ``>= 0``, may be ``inf``.
    old_groups, new_groups : (N,), (M,) labels, optional
        Tomogram (or composite label) of each particle: integers, or labels compared as strings. Default:
        everything in one group.
    mode : {"gated", "m_compatible"}
        See the module docstring.
    method : {"auto", "dense", "sparse"}
        Solver for gated mode (ignored in m_compatible mode, which is always dense). ``"auto"`` uses the
        dense solver when every group has at most ``DENSE_MAX_PARTICLES`` per side, the sparse one
        otherwise. An infinite tolerance always uses the dense solver.
    old_euler_zyz_deg, new_euler_zyz_deg : (N, 3), (M, 3) float, optional
        RELION Euler angles (rot, tilt, psi) in degrees, in the tomogram frame. With both, every matched pair
        carries its angular distance.
    angular_tolerance_deg : float, optional
        Largest angular distance (deg, inclusive up to ``ANGLE_EPS_DEG``, >= 0) of a candidate pair; needs both
        angle arrays. None: no orientation gate.
    symmetry : str
        Point group of the reference for the angular distance (RELION names: C1, Cn, Dn, T, O, I...).

    Returns
    -------
    IntersectionResult
    """
    old = _validate_positions("old_positions_angst", old_positions_angst)
    new = _validate_positions("new_positions_angst", new_positions_angst)
    tol = _validate_tolerance(tolerance_angst)
    if mode not in MODES:
        raise InputError(f"mode must be one of {MODES}, got {mode!r}")
    if method not in METHODS:
        raise InputError(f"method must be one of {METHODS}, got {method!r}")
    names, old_codes, new_codes = _group_codes(old_groups, new_groups, len(old), len(new))
    gate = _Gate.build(tol, old_euler_zyz_deg, new_euler_zyz_deg, len(old), len(new), angular_tolerance_deg,
                       symmetry)
    if mode == "m_compatible":
        pairs = _per_group(old, new, old_codes, new_codes, lambda a, b: _solve_m_compatible(old, new, a, b, gate))
    elif method == "dense" or not np.isfinite(tol) or (method == "auto" and _all_small(old_codes, new_codes)):
        pairs = _per_group(old, new, old_codes, new_codes, lambda a, b: _solve_gated_dense(old, new, a, b, gate))
    else:
        pairs = _solve_gated_sparse(old, new, old_codes, new_codes, gate)
    return _build_result(pairs, old, new, names, old_codes, new_codes, gate, mode)


def new_pose_wins(result: IntersectionResult, old_scores: np.ndarray, new_scores: np.ndarray) -> np.ndarray:
    """(N,) bool over old particles: matched, and the new partner's score is strictly higher (a tie keeps the
    old particle, M's default). Scores are any "higher is better" number (log-likelihood contribution, maximum
    probability, template-matching score); NaN never wins.

    Parameters
    ----------
    old_scores, new_scores : (N,), (M,) float
    """
    old_s = np.asarray(old_scores, dtype=np.float64)
    new_s = np.asarray(new_scores, dtype=np.float64)
    if old_s.shape != result.old_partner.shape or new_s.shape != result.new_partner.shape:
        raise InputError(f"scores: expected {result.old_partner.size} old and {result.new_partner.size} new values, "
                         f"got {old_s.shape} and {new_s.shape}")
    matched = result.old_partner >= 0
    wins = np.zeros(matched.shape, bool)
    partner_scores = new_s[result.old_partner[matched]]
    wins[matched] = partner_scores > np.where(np.isnan(old_s[matched]), -np.inf, old_s[matched])
    return wins


@dataclass(frozen=True)
class DuplicateResult:
    """Outcome of :func:`deduplicate_particles` on one set of N particles.

    Attributes
    ----------
    keep : (N,) bool
        Particles kept (one per cluster of mutual duplicates, and every particle without duplicates).
    representative : (N,) int64
        For a removed particle, the kept particle that removed it; for a kept particle, itself.
    distance_angst, angle_deg : (N,) float64
        Distance (Å) and angular distance (deg; NaN without angles) to the representative; 0 for kept ones.
    """

    keep: np.ndarray
    representative: np.ndarray
    distance_angst: np.ndarray
    angle_deg: np.ndarray

    @property
    def n_removed(self) -> int:
        return int(np.count_nonzero(~self.keep))


def deduplicate_particles(positions_angst: np.ndarray, tolerance_angst: float, *, groups: np.ndarray | None = None,
                          euler_zyz_deg: np.ndarray | None = None, angular_tolerance_deg: float | None = None,
                          symmetry: str = "C1", scores: np.ndarray | None = None) -> DuplicateResult:
    """Remove duplicates within one set (what ``--old X --new X`` means): keep one particle per cluster.

    Two particles are duplicates when they share a group and pass the same gate as :func:`match_particle_sets`
    (distance, and the orientation over the symmetry when ``angular_tolerance_deg`` is given). Particles are
    visited from the highest score to the lowest (without scores: in row order, the first row wins; equal scores:
    the earlier row wins); a visited particle that no kept particle has removed is kept, and removes all its
    duplicates. So no two kept particles are duplicates of each other, every removed particle is a duplicate of a
    kept one with a score at least as high, and a cluster of mutual duplicates keeps exactly one particle (its
    best). A chain a–b–c where a and c are not duplicates keeps a and c.

    Parameters
    ----------
    positions_angst : (N, 3); groups : (N,) labels; euler_zyz_deg : (N, 3) RELION angles (deg);
    scores : (N,) float, higher is better (NaN counts as lowest).
    """
    positions = _validate_positions("positions_angst", positions_angst)
    tol = _validate_tolerance(tolerance_angst)
    if not np.isfinite(tol):
        raise InputError(f"tolerance_angst must be finite to remove duplicates, got {tolerance_angst}")
    n = len(positions)
    _, codes, _ = _group_codes(groups, groups, n, n)
    gate = _Gate.build(tol, euler_zyz_deg, euler_zyz_deg, n, n, angular_tolerance_deg, symmetry)
    i, j, d = _candidate_pairs(positions, positions, codes, codes, gate)
    other = i != j
    i, j, d = i[other], j[other], d[other]
    order = _visit_order(n, scores)
    rank = np.empty(n, np.int64)
    rank[order] = np.arange(n)
    keep, representative = _greedy_keep(n, i, j, rank)
    distance = np.zeros(n)
    angle = np.zeros(n) if gate.has_angles else np.full(n, np.nan)
    removed = np.flatnonzero(~keep)
    distance[removed] = _pair_distances(positions[removed], positions[representative[removed]])
    if gate.has_angles and removed.size:
        angle[removed] = gate.angles_deg(representative[removed], removed)
    for array in (keep, representative, distance, angle):
        array.setflags(write=False)
    return DuplicateResult(keep, representative, distance, angle)


def _visit_order(n: int, scores: np.ndarray | None) -> np.ndarray:
    """(N,) particle indices from the best to the worst score (stable: earlier rows first among equals)."""
    if scores is None:
        return np.arange(n)
    values = np.asarray(scores, dtype=np.float64)
    if values.shape != (n,):
        raise InputError(f"scores: expected ({n},) values, got {values.shape}")
    return np.argsort(-np.where(np.isnan(values), -np.inf, values), kind="stable")


def _greedy_keep(n: int, i: np.ndarray, j: np.ndarray, rank: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Greedy maximal independent set of the duplicate graph (edges i-j, both directions) in ``rank`` order."""
    keep = np.ones(n, bool)
    representative = np.arange(n, dtype=np.int64)
    if i.size == 0:
        return keep, representative
    graph = csr_matrix((np.ones(i.size, np.int8), (i, j)), shape=(n, n))
    indptr, indices = graph.indptr, graph.indices
    with_duplicates = np.flatnonzero(np.diff(indptr) > 0)
    removed = np.zeros(n, bool)
    for node in with_duplicates[np.argsort(rank[with_duplicates], kind="stable")].tolist():
        if removed[node]:
            continue
        neighbours = indices[indptr[node]:indptr[node + 1]]
        fresh = neighbours[~removed[neighbours]]
        removed[fresh] = True
        representative[fresh] = node
    keep[removed] = False
    return keep, representative


def group_counts(result: IntersectionResult, old_groups: np.ndarray,
                 new_groups: np.ndarray) -> tuple[GroupCounts, ...]:
    """Per-label counts of a result under other labels (e.g. per tomogram when the match used tomogram + class)."""
    names, old_codes, new_codes = _group_codes(old_groups, new_groups, result.old_partner.size,
                                               result.new_partner.size)
    return _group_counts(names, old_codes, new_codes, result.in_both)


# --- validation and grouping -------------------------------------------------------------------------------------


def _validate_positions(name: str, positions: np.ndarray) -> np.ndarray:
    array = np.asarray(positions, dtype=np.float64)
    if array.ndim != 2 or array.shape[1] != 3:
        raise InputError(f"{name}: expected shape (N, 3), got {array.shape}")
    bad = np.flatnonzero(~np.isfinite(array).all(axis=1))
    if bad.size:
        raise InputError(f"{name}: row {bad[0]} is not finite ({array[bad[0]].tolist()}); "
                         f"{bad.size} bad row(s) in total")
    return array


def _validate_tolerance(tolerance_angst: float) -> float:
    tol = float(tolerance_angst)
    if np.isnan(tol) or tol < 0:
        raise InputError(f"tolerance_angst must be >= 0 Å, got {tolerance_angst}")
    return tol


def _group_codes(old_groups: np.ndarray | None, new_groups: np.ndarray | None, n_old: int,
                 n_new: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Integer group codes (into the sorted list of names) for old and new particles."""
    if (old_groups is None) != (new_groups is None):
        raise InputError("give both old_groups and new_groups, or neither")
    if old_groups is None:
        names = [""] if n_old + n_new else []
        return names, np.zeros(n_old, np.int64), np.zeros(n_new, np.int64)
    labels = []
    for name, groups, n in (("old_groups", old_groups, n_old), ("new_groups", new_groups, n_new)):
        array = np.asarray(groups)
        if array.shape != (n,):
            raise InputError(f"{name}: expected shape ({n},) (one label per particle), got {array.shape}")
        labels.append(array)
    combined = np.concatenate(labels)
    if combined.dtype.kind not in "iu":  # integer labels are kept as numbers (fast); others compared as strings
        combined = combined.astype(str)
    names, codes = np.unique(combined, return_inverse=True)
    codes = codes.astype(np.int64).ravel()
    return [str(v) for v in names.tolist()], codes[:n_old], codes[n_old:]


def _all_small(old_codes: np.ndarray, new_codes: np.ndarray) -> bool:
    n_groups = int(max(old_codes.max(initial=-1), new_codes.max(initial=-1))) + 1
    counts = np.concatenate([np.bincount(old_codes, minlength=n_groups), np.bincount(new_codes, minlength=n_groups)])
    return counts.size == 0 or int(counts.max()) <= DENSE_MAX_PARTICLES


def _pair_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distances (Å) of rows ``a[k]`` and ``b[k]``; the one formula every solver uses (bitwise equal)."""
    dx, dy, dz = (a[..., 0] - b[..., 0]), (a[..., 1] - b[..., 1]), (a[..., 2] - b[..., 2])
    return np.sqrt(dx * dx + dy * dy + dz * dz)


def _distance_matrix(old: np.ndarray, new: np.ndarray) -> np.ndarray:
    """(n_old, n_new) distances (Å)."""
    return _pair_distances(old[:, None, :], new[None, :, :])


Pairs = tuple[np.ndarray, np.ndarray, np.ndarray]  # old indices, new indices, distances (Å)


def _per_group(old: np.ndarray, new: np.ndarray, old_codes: np.ndarray, new_codes: np.ndarray, solve) -> Pairs:
    """Run ``solve(old_idx, new_idx) -> (local_old, local_new, d)`` per group shared by both sets (global index
    arrays in, indices local to them out); returns global indices."""
    old_order, new_order = np.argsort(old_codes, kind="stable"), np.argsort(new_codes, kind="stable")
    shared = np.intersect1d(old_codes, new_codes)
    old_starts = np.searchsorted(old_codes[old_order], shared)
    old_ends = np.searchsorted(old_codes[old_order], shared, side="right")
    new_starts = np.searchsorted(new_codes[new_order], shared)
    new_ends = np.searchsorted(new_codes[new_order], shared, side="right")
    out_i, out_j, out_d = [], [], []
    for a0, a1, b0, b1 in zip(old_starts, old_ends, new_starts, new_ends):
        old_idx, new_idx = old_order[a0:a1], new_order[b0:b1]
        i, j, d = solve(old_idx, new_idx)
        out_i.append(old_idx[i])
        out_j.append(new_idx[j])
        out_d.append(d)
    return _concat_pairs(out_i, out_j, out_d)


def _concat_pairs(out_i: list, out_j: list, out_d: list) -> Pairs:
    if not out_i:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    return (np.concatenate(out_i).astype(np.int64), np.concatenate(out_j).astype(np.int64),
            np.concatenate(out_d).astype(np.float64))


@dataclass(frozen=True)
class _Gate:
    """Which pairs may match: distance (Å) and, optionally, orientation (deg over the symmetry)."""

    tolerance_angst: float
    old_matrices: np.ndarray | None  # (N, 3, 3) RELION A, or None without angles
    new_matrices: np.ndarray | None
    angular_tolerance_deg: float | None
    symmetry: str

    @staticmethod
    def build(tol: float, old_euler: np.ndarray | None, new_euler: np.ndarray | None, n_old: int, n_new: int,
              angular_tolerance_deg: float | None, symmetry: str) -> _Gate:
        canonical, _ = parse_symmetry(symmetry)
        if (old_euler is None) != (new_euler is None):
            raise InputError("give both old_euler_zyz_deg and new_euler_zyz_deg, or neither")
        matrices = [None, None]
        if old_euler is not None:
            for k, (name, euler, n) in enumerate((("old_euler_zyz_deg", old_euler, n_old),
                                                  ("new_euler_zyz_deg", new_euler, n_new))):
                matrices[k] = euler_to_matrix(_validate_angles(name, euler, n))
        angular = None
        if angular_tolerance_deg is not None:
            angular = float(angular_tolerance_deg)
            if np.isnan(angular) or angular < 0:
                raise InputError(f"angular_tolerance_deg must be >= 0 deg, got {angular_tolerance_deg}")
            if old_euler is None:
                raise InputError("angular_tolerance_deg needs the angles of both sets (old_euler_zyz_deg, "
                                 "new_euler_zyz_deg)")
        return _Gate(tol, matrices[0], matrices[1], angular, canonical)

    @property
    def has_angles(self) -> bool:
        return self.old_matrices is not None

    def angles_deg(self, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        """(K,) angular distances (deg) of old ``i[k]`` and new ``j[k]`` (global indices)."""
        return angular_distance_deg(self.old_matrices[i], self.new_matrices[j], self.symmetry)

    def passes(self, i: np.ndarray, j: np.ndarray, d: np.ndarray) -> np.ndarray:
        """(K,) bool: pairs passing the distance gate and, with an angular tolerance, the orientation gate."""
        allowed = _gate(d, self.tolerance_angst)
        if self.angular_tolerance_deg is not None and allowed.any():
            where = np.flatnonzero(allowed)
            angles = self.angles_deg(i[where], j[where])
            allowed[where] = angles <= self.angular_tolerance_deg + ANGLE_EPS_DEG
        return allowed


def _validate_angles(name: str, euler: np.ndarray, n: int) -> np.ndarray:
    array = np.asarray(euler, dtype=np.float64)
    if array.shape != (n, 3):
        raise InputError(f"{name}: expected shape ({n}, 3) (rot, tilt, psi per particle), got {array.shape}")
    bad = np.flatnonzero(~np.isfinite(array).all(axis=1))
    if bad.size:
        raise InputError(f"{name}: row {bad[0]} is not finite ({array[bad[0]].tolist()})")
    return array


# --- solvers -------------------------------------------------------------------------------------------------------


def _gate(d: np.ndarray, tol: float) -> np.ndarray:
    return d <= tol + DISTANCE_EPS_ANGST


def _solve_m_compatible(old: np.ndarray, new: np.ndarray, old_idx: np.ndarray, new_idx: np.ndarray,
                        gate: _Gate) -> Pairs:
    """M 1.x: min-sum assignment on the full distance matrix, then drop pairs beyond the tolerance(s).

    Memory is O(n_old * n_new) per group (about 32 bytes per entry while the matrix is built).
    """
    dist = _distance_matrix(old[old_idx], new[new_idx])
    rows, cols = linear_sum_assignment(dist)
    keep = gate.passes(old_idx[rows], new_idx[cols], dist[rows, cols])
    return rows[keep], cols[keep], dist[rows[keep], cols[keep]]


def _dummy_cost(n_nodes: int, max_distance_angst: float) -> float:
    """Cost C of leaving one particle unmatched, large enough that cardinality dominates.

    In the augmented problems a matching with k real pairs costs ``S_k + C (n_old + n_new - 2k)`` where
    ``S_k <= k * max_d`` is the sum of its distances. Going from k to k + 1 pairs changes the cost by
    ``S_{k+1} - S_k - 2C <= (k + 1) max_d - 2C``; since ``k + 1 <= min(n_old, n_new) <= n_nodes / 2``,
    ``C = n_nodes * max_d + 1`` makes this <= -2, so every larger matching is cheaper than every smaller one
    (with a margin far above rounding). Among matchings of maximum size the C terms are equal, so the optimum
    minimises S. C only depends on the distances of allowed pairs, never on the tolerance itself.
    """
    return float(n_nodes) * float(max_distance_angst) + 1.0


def _solve_gated_dense(old: np.ndarray, new: np.ndarray, old_idx: np.ndarray, new_idx: np.ndarray,
                       gate: _Gate) -> Pairs:
    """Exact gated assignment with a square augmented matrix of size n_old + n_new.

    Rows: old particles, then one "unmatched" row per new particle. Columns: new particles, then one
    "unmatched" column per old particle. Blocks: [[D gated (forbidden = inf), C], [C, 0]]. A matching with k
    real pairs leaves n_old - k old rows on dummy columns and n_new - k dummy rows on new columns (cost C each);
    the remaining k dummy rows take the k free dummy columns at cost 0. See :func:`_dummy_cost`.
    """
    n_old, n_new = len(old_idx), len(new_idx)
    dist = _distance_matrix(old[old_idx], new[new_idx])
    rows_all, cols_all = np.indices(dist.shape).reshape(2, -1)
    allowed = gate.passes(old_idx[rows_all], new_idx[cols_all], dist.ravel()).reshape(dist.shape)
    if not allowed.any():
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    cost_c = _dummy_cost(n_old + n_new, dist[allowed].max())
    matrix = np.zeros((n_old + n_new, n_new + n_old))
    matrix[:n_old, :n_new] = np.where(allowed, dist, np.inf)
    matrix[:n_old, n_new:] = cost_c
    matrix[n_old:, :n_new] = cost_c
    rows, cols = linear_sum_assignment(matrix)
    real = (rows < n_old) & (cols < n_new)
    rows, cols = rows[real], cols[real]
    return rows, cols, dist[rows, cols]


def _kd_tree(points: np.ndarray) -> cKDTree:
    """KD-tree built by sliding midpoints without compacting nodes: 3-4x faster to build than scipy's default
    (balanced, compact) for 10⁶ particles, and as fast to query for particles spread through a volume."""
    return cKDTree(points, balanced_tree=False, compact_nodes=False)


def _side_by_side(old: np.ndarray, new: np.ndarray, old_codes: np.ndarray, new_codes: np.ndarray,
                  radius: float) -> tuple[np.ndarray, np.ndarray, float]:
    """Copies of the positions with the groups laid side by side along x (shift ``code * span``, ``span`` > x
    extent + 2 radius), so that particles of different groups are farther apart than ``radius``; and the margin
    (Å) to add to a query radius for the rounding of the shifted coordinates."""
    lo = min(old[:, 0].min(initial=np.inf), new[:, 0].min(initial=np.inf))
    hi = max(old[:, 0].max(initial=-np.inf), new[:, 0].max(initial=-np.inf))
    span = (hi - lo) + 2.0 * radius + 1.0
    shifted_old, shifted_new = old.copy(), new.copy()
    shifted_old[:, 0] += old_codes * span - lo
    shifted_new[:, 0] += new_codes * span - lo
    magnitude = max(np.abs(shifted_old).max(initial=0.0), np.abs(shifted_new).max(initial=0.0))
    return shifted_old, shifted_new, 2.0 * DISTANCE_EPS_ANGST + 4.0 * float(np.spacing(magnitude))


def _candidate_pairs(old: np.ndarray, new: np.ndarray, old_codes: np.ndarray, new_codes: np.ndarray,
                     gate: _Gate) -> Pairs:
    """All same-group pairs passing the gate, from one KD-tree query over all groups (:func:`_side_by_side`).

    Distances are recomputed from the unshifted positions with the same formula as the dense solvers and gated
    exactly (then the orientation gate, on the survivors only).
    """
    tol = gate.tolerance_angst
    shifted_old, shifted_new, margin = _side_by_side(old, new, old_codes, new_codes, tol)
    found = _kd_tree(shifted_old).sparse_distance_matrix(_kd_tree(shifted_new), max_distance=tol + margin,
                                                        output_type="ndarray")
    i, j = found["i"].astype(np.int64), found["j"].astype(np.int64)
    same = old_codes[i] == new_codes[j]
    i, j = i[same], j[same]
    d = _pair_distances(old[i], new[j])
    keep = gate.passes(i, j, d)
    return i[keep], j[keep], d[keep]


def _solve_gated_sparse(old: np.ndarray, new: np.ndarray, old_codes: np.ndarray, new_codes: np.ndarray,
                        gate: _Gate) -> Pairs:
    """Exact gated assignment from KD-tree candidate pairs, split into connected components.

    Components with a single candidate pair are matched directly; isolated particles stay unmatched; the other
    components are solved by :func:`_solve_by_regions` in batches of whole components of about
    ``LAPJVSP_BATCH_NODES`` particles. Each component is an independent problem, so solving them apart gives the
    same optimum. Groups never mix because candidate pairs
    never cross groups.
    """
    n_old = len(old)
    i, j, d = _candidate_pairs(old, new, old_codes, new_codes, gate)
    if i.size == 0:
        return i, j, d
    n_nodes = n_old + len(new)
    graph = coo_matrix((np.ones(i.size), (i, n_old + j)), shape=(n_nodes, n_nodes)).tocsr()
    _, labels = connected_components(graph, directed=False)
    edge_comp = labels[i]
    edges_per_comp = np.bincount(edge_comp, minlength=labels.max() + 1)
    single = edges_per_comp[edge_comp] == 1
    out_i, out_j, out_d = [i[single]], [j[single]], [d[single]]
    for batch in _component_batches(labels, edge_comp, ~single):
        bi, bj, bd = _solve_by_regions(i[batch], j[batch], d[batch])
        out_i.append(bi)
        out_j.append(bj)
        out_d.append(bd)
    return _concat_pairs(out_i, out_j, out_d)


def _component_batches(labels: np.ndarray, edge_comp: np.ndarray, wanted: np.ndarray) -> list[np.ndarray]:
    """Indices of the ``wanted`` edges grouped into batches of whole components of about ``LAPJVSP_BATCH_NODES``
    particles (a larger component is a batch of its own)."""
    edges = np.flatnonzero(wanted)
    if edges.size == 0:
        return []
    nodes_per_comp = np.bincount(labels, minlength=labels.max() + 1)
    comps = np.unique(edge_comp[edges])
    ends = np.cumsum(nodes_per_comp[comps])
    batch_of_comp = np.zeros(labels.max() + 1, np.int64)
    batch_of_comp[comps] = (ends - nodes_per_comp[comps]) // LAPJVSP_BATCH_NODES
    edge_batch = batch_of_comp[edge_comp[edges]]
    order = np.argsort(edge_batch, kind="stable")
    splits = np.flatnonzero(np.diff(edge_batch[order])) + 1
    return np.split(edges[order], splits)


def _solve_by_regions(i: np.ndarray, j: np.ndarray, d: np.ndarray) -> Pairs:
    """Max-cardinality, min-distance matching of the candidate edges, exactly, without dummy nodes.

    1. A maximum matching M (Hopcroft-Karp, ``maximum_bipartite_matching``) gives the cardinality.
    2. The Dulmage-Mendelsohn decomposition splits the particles into three regions: A = reachable from an
       unmatched old particle by alternating paths (old → new along any edge, new → old along M), B = the same
       from an unmatched new particle, C = the rest. Every maximum matching saturates A's new particles with A's
       old ones, B's old particles with B's new ones, and is perfect on C, using only edges inside a region (an
       edge between regions in a maximum matching would give an augmenting path or move a region's border); and
       every combination of such three matchings is maximum. So the minimum total distance among maximum
       matchings is the sum of three independent minima.
    3. Each region is a *full* matching problem of its smaller side (``min_weight_full_bipartite_matching``,
       LAPJVsp): no dummy nodes and no large dummy cost, which is what made crowded tomograms slow (a giant
       component of 4·10⁴ particles: 28 s with dummy nodes, 0.3 s this way). Every weight gets ``_EDGE_OFFSET``
       (LAPJVsp drops explicit zeros); all full matchings of a region have the same number of edges.
    """
    if i.size == 0:
        return i, j, d
    old_ids, li = np.unique(i, return_inverse=True)
    new_ids, lj = np.unique(j, return_inverse=True)
    a, b = old_ids.size, new_ids.size
    old_match = maximum_bipartite_matching(csr_matrix((np.ones(i.size, np.int8), (li, lj)), shape=(a, b)),
                                           perm_type="column")
    new_match = np.full(b, -1, np.int64)
    matched_old = np.flatnonzero(old_match >= 0)
    new_match[old_match[matched_old]] = matched_old
    a_old, a_new = _alternating_reach(li, lj, old_match, new_match, a, b)
    b_new, b_old = _alternating_reach(lj, li, new_match, old_match, b, a)
    c_old, c_new = ~(a_old | b_old), ~(a_new | b_new)
    rows_a, cols_a = _full_matching(a_new, a_old, lj, li, d)  # rows: A's new particles (the smaller side)
    rows_b, cols_b = _full_matching(b_old, b_new, li, lj, d)
    rows_c, cols_c = _full_matching(c_old, c_new, li, lj, d)
    local_old = np.concatenate([cols_a, rows_b, rows_c])
    local_new = np.concatenate([rows_a, cols_b, cols_c])
    # distance of each chosen pair: look it up among the candidate edges
    key = li.astype(np.int64) * b + lj
    order = np.argsort(key)
    pos = order[np.searchsorted(key[order], local_old.astype(np.int64) * b + local_new)]
    return old_ids[local_old], new_ids[local_new], d[pos]


def _alternating_reach(src: np.ndarray, dst: np.ndarray, src_match: np.ndarray, dst_match: np.ndarray, n_src: int,
                       n_dst: int) -> tuple[np.ndarray, np.ndarray]:
    """(n_src,), (n_dst,) bool: particles reachable from an unmatched ``src`` particle by alternating paths
    (src → dst along any edge ``src[k]-dst[k]``, dst → src along the matching), by one breadth-first search from
    a super-source."""
    matched_dst = np.flatnonzero(dst_match >= 0)
    free_src = np.flatnonzero(src_match < 0)
    source = n_src + n_dst
    rows = np.concatenate([src, n_src + matched_dst, np.full(free_src.size, source)])
    cols = np.concatenate([n_src + dst, dst_match[matched_dst], free_src])
    graph = csr_matrix((np.ones(rows.size, np.int8), (rows, cols)), shape=(source + 1, source + 1))
    reached = np.zeros(source + 1, bool)
    reached[breadth_first_order(graph, source, directed=True, return_predecessors=False)] = True
    return reached[:n_src], reached[n_src:source]


def _full_matching(row_in: np.ndarray, col_in: np.ndarray, rows: np.ndarray, cols: np.ndarray,
                   d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Min-distance matching that matches every row of a region (``row_in``/``col_in`` masks; edges
    ``rows[k]-cols[k]`` at ``d[k]``, only those inside the region are used) → (row indices, column indices).

    The region's own connected components (often many, once the edges to other regions are gone) are solved in
    batches, as independent problems."""
    inside = row_in[rows] & col_in[cols]
    r, c, w = rows[inside], cols[inside], d[inside]
    if r.size == 0:
        return r, c
    n_rows = row_in.size
    graph = csr_matrix((np.ones(r.size, np.int8), (r, n_rows + c)), shape=(n_rows + col_in.size,) * 2)
    _, labels = connected_components(graph, directed=False)
    out_r, out_c = [], []
    for batch in _component_batches(labels, labels[r], np.ones(r.size, bool)):
        rows_b, cols_b = _lapjvsp_full(r[batch], c[batch], w[batch])
        out_r.append(rows_b)
        out_c.append(cols_b)
    return np.concatenate(out_r), np.concatenate(out_c)


def _lapjvsp_full(r: np.ndarray, c: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``min_weight_full_bipartite_matching`` on the edges ``r[k]-c[k]`` (weights ``w + _EDGE_OFFSET``)."""
    row_ids, lr = np.unique(r, return_inverse=True)
    col_ids, lc = np.unique(c, return_inverse=True)
    graph = csr_matrix((w + _EDGE_OFFSET, (lr, lc)), shape=(row_ids.size, col_ids.size))
    matched_rows, matched_cols = min_weight_full_bipartite_matching(graph)
    return row_ids[matched_rows], col_ids[matched_cols]


# --- result --------------------------------------------------------------------------------------------------------


def _build_result(pairs: Pairs, old: np.ndarray, new: np.ndarray, names: list[str], old_codes: np.ndarray,
                  new_codes: np.ndarray, gate: _Gate, mode: str) -> IntersectionResult:
    i, j, d = pairs
    old_partner = np.full(len(old), -1, np.int64)
    new_partner = np.full(len(new), -1, np.int64)
    old_dist = np.full(len(old), np.nan)
    new_dist = np.full(len(new), np.nan)
    old_partner[i], new_partner[j] = j, i
    old_dist[i], new_dist[j] = d, d
    old_angle, new_angle = np.full(len(old), np.nan), np.full(len(new), np.nan)
    if gate.has_angles and i.size:
        old_angle[i] = new_angle[j] = gate.angles_deg(i, j)
    groups = _group_counts(names, old_codes, new_codes, old_partner >= 0)
    for array in (old_partner, new_partner, old_dist, new_dist, old_angle, new_angle):
        array.setflags(write=False)
    return IntersectionResult(old_partner, old_dist, new_partner, new_dist, groups, gate.tolerance_angst, mode,
                              old_angle, new_angle, gate.angular_tolerance_deg, gate.symmetry)


def _group_counts(names: list[str], old_codes: np.ndarray, new_codes: np.ndarray,
                  old_matched: np.ndarray) -> tuple[GroupCounts, ...]:
    n = len(names)
    n_old = np.bincount(old_codes, minlength=n)
    n_new = np.bincount(new_codes, minlength=n)
    both = np.bincount(old_codes[old_matched], minlength=n)
    out = []
    for k, name in enumerate(names):
        union = int(n_old[k] + n_new[k] - both[k])
        out.append(GroupCounts(name, int(n_old[k]), int(n_new[k]), int(both[k]), int(n_old[k] - both[k]),
                               int(n_new[k] - both[k]), both[k] / union if union else float("nan")))
    return tuple(out)
