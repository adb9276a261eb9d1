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

Particles of different groups (tomograms) never match. Distances are Euclidean, in Å, float64
(M uses float32). Solvers: an exact dense solver (square augmented matrix) and a sparse solver (KD-tree candidate
pairs, connected components, LAPJVsp on an augmented graph); both give the same cardinality and total distance.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix, csr_matrix
from scipy.sparse.csgraph import connected_components, min_weight_full_bipartite_matching
from scipy.spatial import cKDTree

from mspecies.common.types import InputError

DISTANCE_EPS_ANGST = 1e-6
"""Pairs with ``d <= tolerance + DISTANCE_EPS_ANGST`` pass the gate (M: ``d <= tol + 1e-6``)."""

DENSE_MAX_PARTICLES = 400
"""``method='auto'`` uses the dense solver when a group has at most this many particles on each side."""

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
    """

    old_partner: np.ndarray
    old_distance_angst: np.ndarray
    new_partner: np.ndarray
    new_distance_angst: np.ndarray
    groups: tuple[GroupCounts, ...]
    tolerance_angst: float
    mode: str

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
    def total_distance_angst(self) -> float:
        """Sum of the matched distances (Å)."""
        return float(self.matched_distances_angst.sum())

    @property
    def jaccard(self) -> float:
        """Jaccard index over all groups: ``in_both / (n_old + n_new - in_both)`` (NaN for two empty sets)."""
        union = self.old_partner.size + self.new_partner.size - self.n_pairs
        return self.n_pairs / union if union else float("nan")


def select_union(result: IntersectionResult, keep_only_old: bool, keep_in_both: bool,
                 keep_only_new: bool) -> tuple[np.ndarray, np.ndarray]:
    """Old and new indices forming the chosen union (M's three check-boxes).

    Particles in both sets are represented by the **old** particle (old poses), as in M.

    Returns
    -------
    old_indices : (K_old,) int64, ascending
    new_indices : (K_new,) int64, ascending
    """
    keep_old = (result.only_old & bool(keep_only_old)) | (result.in_both & bool(keep_in_both))
    keep_new = result.only_new & bool(keep_only_new)
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
    """Matched distances (Å) to plot when choosing the tolerance.

    This is :func:`match_particle_sets` run with ``tolerance = histogram_radius_angst``, a radius chosen
    generously (e.g. 2-5x the expected tolerance), **independent of the user's tolerance**. In gated mode the
    histogram typically shows a peak of true pairs (jitter) and a tail of chance neighbours; the tolerance is
    best put in the valley between them. ``mode="m_compatible"`` with ``histogram_radius_angst=np.inf``
    reproduces M's histogram (all assigned distances before thresholding).

    Returns
    -------
    (K,) float64, the distances of the matched pairs (Å).
    """
    result = match_particle_sets(old_positions_angst, new_positions_angst, histogram_radius_angst,
                                 old_groups=old_groups, new_groups=new_groups, mode=mode)
    return result.matched_distances_angst


def match_particle_sets(old_positions_angst: np.ndarray, new_positions_angst: np.ndarray, tolerance_angst: float,
                        *, old_groups: np.ndarray | None = None, new_groups: np.ndarray | None = None,
                        mode: str = "gated", method: str = "auto") -> IntersectionResult:
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
        Tomogram of each particle: integers, or labels compared as strings. Default: everything in one group.
    mode : {"gated", "m_compatible"}
        See the module docstring.
    method : {"auto", "dense", "sparse"}
        Solver for gated mode (ignored in m_compatible mode, which is always dense). ``"auto"`` uses the
        dense solver when every group has at most ``DENSE_MAX_PARTICLES`` per side, the sparse one
        otherwise. An infinite tolerance always uses the dense solver.

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
    if mode == "m_compatible":
        pairs = _per_group(old, new, old_codes, new_codes, lambda a, b: _solve_m_compatible(a, b, tol))
    elif method == "dense" or not np.isfinite(tol) or (method == "auto" and _all_small(old_codes, new_codes)):
        pairs = _per_group(old, new, old_codes, new_codes, lambda a, b: _solve_gated_dense(a, b, tol))
    else:
        pairs = _solve_gated_sparse(old, new, old_codes, new_codes, tol)
    return _build_result(pairs, old, new, names, old_codes, new_codes, tol, mode)


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
    """Run ``solve(old_g, new_g) -> (local_old, local_new, d)`` per group shared by both sets; global indices."""
    old_order, new_order = np.argsort(old_codes, kind="stable"), np.argsort(new_codes, kind="stable")
    shared = np.intersect1d(old_codes, new_codes)
    old_starts = np.searchsorted(old_codes[old_order], shared)
    old_ends = np.searchsorted(old_codes[old_order], shared, side="right")
    new_starts = np.searchsorted(new_codes[new_order], shared)
    new_ends = np.searchsorted(new_codes[new_order], shared, side="right")
    out_i, out_j, out_d = [], [], []
    for a0, a1, b0, b1 in zip(old_starts, old_ends, new_starts, new_ends):
        old_idx, new_idx = old_order[a0:a1], new_order[b0:b1]
        i, j, d = solve(old[old_idx], new[new_idx])
        out_i.append(old_idx[i])
        out_j.append(new_idx[j])
        out_d.append(d)
    return _concat_pairs(out_i, out_j, out_d)


def _concat_pairs(out_i: list, out_j: list, out_d: list) -> Pairs:
    if not out_i:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    return (np.concatenate(out_i).astype(np.int64), np.concatenate(out_j).astype(np.int64),
            np.concatenate(out_d).astype(np.float64))


# --- solvers -------------------------------------------------------------------------------------------------------


def _gate(d: np.ndarray, tol: float) -> np.ndarray:
    return d <= tol + DISTANCE_EPS_ANGST


def _solve_m_compatible(old: np.ndarray, new: np.ndarray, tol: float) -> Pairs:
    """M 1.x: min-sum assignment on the full distance matrix, then drop pairs beyond the tolerance.

    Memory is O(n_old * n_new) per group (about 32 bytes per entry while the matrix is built).
    """
    dist = _distance_matrix(old, new)
    rows, cols = linear_sum_assignment(dist)
    keep = _gate(dist[rows, cols], tol)
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


def _solve_gated_dense(old: np.ndarray, new: np.ndarray, tol: float) -> Pairs:
    """Exact gated assignment with a square augmented matrix of size n_old + n_new.

    Rows: old particles, then one "unmatched" row per new particle. Columns: new particles, then one
    "unmatched" column per old particle. Blocks: [[D gated (forbidden = inf), C], [C, 0]]. A matching with k
    real pairs leaves n_old - k old rows on dummy columns and n_new - k dummy rows on new columns (cost C each);
    the remaining k dummy rows take the k free dummy columns at cost 0. See :func:`_dummy_cost`.
    """
    n_old, n_new = len(old), len(new)
    dist = _distance_matrix(old, new)
    allowed = _gate(dist, tol)
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


def _candidate_pairs(old: np.ndarray, new: np.ndarray, old_codes: np.ndarray, new_codes: np.ndarray,
                     tol: float) -> Pairs:
    """All same-group pairs with ``d <= tol + eps``, from one KD-tree query over all groups.

    Groups are laid side by side along x (shift ``code * span`` with ``span`` > x extent + 2 tol), so pairs of
    different groups are farther apart than the query radius. Distances are then recomputed from the unshifted
    positions with the same formula as the dense solvers and gated exactly; the query radius has a margin for
    the rounding of the shifted coordinates.
    """
    lo = min(old[:, 0].min(initial=np.inf), new[:, 0].min(initial=np.inf))
    hi = max(old[:, 0].max(initial=-np.inf), new[:, 0].max(initial=-np.inf))
    span = (hi - lo) + 2.0 * tol + 1.0
    shifted_old, shifted_new = old.copy(), new.copy()
    shifted_old[:, 0] += old_codes * span - lo
    shifted_new[:, 0] += new_codes * span - lo
    magnitude = max(np.abs(shifted_old).max(initial=0.0), np.abs(shifted_new).max(initial=0.0))
    radius = tol + 2.0 * DISTANCE_EPS_ANGST + 4.0 * float(np.spacing(magnitude))
    found = cKDTree(shifted_old).sparse_distance_matrix(cKDTree(shifted_new), max_distance=radius,
                                                        output_type="ndarray")
    i, j = found["i"].astype(np.int64), found["j"].astype(np.int64)
    same = old_codes[i] == new_codes[j]
    i, j = i[same], j[same]
    d = _pair_distances(old[i], new[j])
    keep = _gate(d, tol)
    return i[keep], j[keep], d[keep]


def _solve_gated_sparse(old: np.ndarray, new: np.ndarray, old_codes: np.ndarray, new_codes: np.ndarray,
                        tol: float) -> Pairs:
    """Exact gated assignment from KD-tree candidate pairs, split into connected components.

    Components with a single candidate pair are matched directly; isolated particles stay unmatched; all other
    components are solved together by :func:`_solve_components_lapjvsp` (a per-component dummy cost keeps the
    numbers small). Groups never mix because candidate pairs never cross groups.
    """
    n_old = len(old)
    i, j, d = _candidate_pairs(old, new, old_codes, new_codes, tol)
    if i.size == 0:
        return i, j, d
    n_nodes = n_old + len(new)
    graph = coo_matrix((np.ones(i.size), (i, n_old + j)), shape=(n_nodes, n_nodes)).tocsr()
    _, labels = connected_components(graph, directed=False)
    edge_comp = labels[i]
    edges_per_comp = np.bincount(edge_comp, minlength=labels.max() + 1)
    single = edges_per_comp[edge_comp] == 1
    ci, cj, cd = _solve_components_lapjvsp(i[~single], j[~single], d[~single], edge_comp[~single])
    return _concat_pairs([i[single], ci], [j[single], cj], [d[single], cd])


def _solve_components_lapjvsp(i: np.ndarray, j: np.ndarray, d: np.ndarray, comp: np.ndarray) -> Pairs:
    """Max-cardinality, min-distance matching of candidate edges with ``min_weight_full_bipartite_matching``.

    Standard augmented graph (a old and b new nodes touched by the edges): rows = [old (a) | dummy-of-new (b)],
    columns = [new (b) | dummy-of-old (a)]. Edges: old i - new j at d_ij; old i - its own dummy at C;
    dummy-of-new j - new j at C; dummy-of-new j - dummy-of-old i at 0 for every candidate edge (i, j), so every
    partial matching extends to a full one. C is per component (:func:`_dummy_cost`), which is valid because the
    components are independent. Every weight gets ``_EDGE_OFFSET`` (LAPJVsp needs non-zero weights); all full
    matchings have a + b edges, so the optimum is unchanged.
    """
    if i.size == 0:
        return i, j, d
    old_ids, li = np.unique(i, return_inverse=True)
    new_ids, lj = np.unique(j, return_inverse=True)
    a, b = old_ids.size, new_ids.size
    comp_ids, comp_local = np.unique(comp, return_inverse=True)
    n_comp = comp_ids.size
    old_comp = np.zeros(a, np.int64)
    old_comp[li] = comp_local
    new_comp = np.zeros(b, np.int64)
    new_comp[lj] = comp_local
    nodes = np.bincount(old_comp, minlength=n_comp) + np.bincount(new_comp, minlength=n_comp)
    max_d = np.zeros(n_comp)
    np.maximum.at(max_d, comp_local, d)
    cost_c = nodes * max_d + 1.0  # _dummy_cost, vectorised
    rows = np.concatenate([li, np.arange(a), a + np.arange(b), a + lj])
    cols = np.concatenate([lj, b + np.arange(a), np.arange(b), b + li])
    weights = np.concatenate([d, cost_c[old_comp], cost_c[new_comp], np.zeros(i.size)]) + _EDGE_OFFSET
    graph = csr_matrix((weights, (rows, cols)), shape=(a + b, a + b))
    match_rows, match_cols = min_weight_full_bipartite_matching(graph)
    real = (match_rows < a) & (match_cols < b)
    oi, nj = old_ids[match_rows[real]], new_ids[match_cols[real]]
    # distance of each chosen pair: look it up among the candidate edges
    key = li.astype(np.int64) * b + lj
    order = np.argsort(key)
    pos = order[np.searchsorted(key[order], match_rows[real].astype(np.int64) * b + match_cols[real])]
    return oi, nj, d[pos]


# --- result --------------------------------------------------------------------------------------------------------


def _build_result(pairs: Pairs, old: np.ndarray, new: np.ndarray, names: list[str], old_codes: np.ndarray,
                  new_codes: np.ndarray, tol: float, mode: str) -> IntersectionResult:
    i, j, d = pairs
    old_partner = np.full(len(old), -1, np.int64)
    new_partner = np.full(len(new), -1, np.int64)
    old_dist = np.full(len(old), np.nan)
    new_dist = np.full(len(new), np.nan)
    old_partner[i], new_partner[j] = j, i
    old_dist[i], new_dist[j] = d, d
    groups = _group_counts(names, old_codes, new_codes, old_partner >= 0)
    for array in (old_partner, new_partner, old_dist, new_dist):
        array.setflags(write=False)
    return IntersectionResult(old_partner, old_dist, new_partner, new_dist, groups, tol, mode)


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
