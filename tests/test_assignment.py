"""Intersect particle sets: gated optimal assignment, its solvers, and M-compatible mode."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from mspecies.common.types import InputError
from mspecies.core import assignment
from mspecies.core.assignment import (
    ANGLE_EPS_DEG,
    DISTANCE_EPS_ANGST,
    IntersectionResult,
    deduplicate_particles,
    distance_histogram,
    histogram_distances,
    match_particle_sets,
    nearest_new_particles,
    new_pose_wins,
    select_union,
)
from mspecies.core.symmetry import angular_distance_from_euler_deg

PROPERTY = settings(max_examples=80, deadline=None, derandomize=True)
GATED_METHODS = ("dense", "sparse", "auto")

# coordinates on a 1/4 Å grid in a small box: exact ties and exact translations are possible
grid_coord = st.integers(min_value=0, max_value=160).map(lambda v: v / 4.0)


def point_sets(max_size: int = 6):
    return arrays(np.float64, st.tuples(st.integers(0, max_size), st.just(3)), elements=grid_coord)


tolerances = st.sampled_from([0.0, 0.5, 2.0, 5.0, 10.0, 20.0, 80.0])


def brute_force(old: np.ndarray, new: np.ndarray, tol: float) -> tuple[int, float]:
    """Best (cardinality, total distance) over all partial matchings under the gate, by enumeration."""
    return brute_force_allowed(*allowed_matrix(old, new, tol))


def assert_consistent(result: IntersectionResult, old: np.ndarray, new: np.ndarray, tol: float) -> None:
    """Partner arrays are mutual, distances are true and within the gate."""
    i = np.flatnonzero(result.old_partner >= 0)
    j = result.old_partner[i]
    assert np.array_equal(result.new_partner[j], i)
    assert np.count_nonzero(result.new_partner >= 0) == i.size
    d = np.linalg.norm(old[i] - new[j], axis=1)
    np.testing.assert_allclose(result.old_distance_angst[i], d, atol=1e-9)
    np.testing.assert_allclose(result.new_distance_angst[j], d, atol=1e-9)
    assert np.all(d <= tol + DISTANCE_EPS_ANGST + 1e-9)
    assert np.isnan(result.old_distance_angst[result.only_old]).all()
    assert np.isnan(result.new_distance_angst[result.only_new]).all()


def same_optimum(a: IntersectionResult, b: IntersectionResult) -> None:
    assert a.n_pairs == b.n_pairs
    assert a.total_distance_angst == pytest.approx(b.total_distance_angst, rel=1e-9, abs=1e-9)


# --- exactness -----------------------------------------------------------------------------------------------------


@PROPERTY
@given(old=point_sets(), new=point_sets(), tol=tolerances)
def test_matches_brute_force_enumeration(old, new, tol):
    k, cost = brute_force(old, new, tol)
    for method in GATED_METHODS:
        result = match_particle_sets(old, new, tol, method=method)
        assert_consistent(result, old, new, tol)
        assert result.n_pairs == k, method
        assert result.total_distance_angst == pytest.approx(cost, rel=1e-9, abs=1e-9), method


@settings(max_examples=25, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**31), n=st.integers(1, 120), tol=st.sampled_from([3.0, 10.0, 25.0]))
def test_sparse_equals_dense_on_random_sets(seed, n, tol):
    rng = np.random.default_rng(seed)
    old = rng.uniform(0, 200, (n, 3))
    new = np.vstack([old[: n // 2] + rng.normal(0, 4, (n // 2, 3)), rng.uniform(0, 200, (n - n // 3, 3))])
    groups_old, groups_new = rng.integers(0, 3, len(old)), rng.integers(0, 3, len(new))
    dense = match_particle_sets(old, new, tol, old_groups=groups_old, new_groups=groups_new, method="dense")
    sparse = match_particle_sets(old, new, tol, old_groups=groups_old, new_groups=groups_new, method="sparse")
    same_optimum(dense, sparse)
    assert [g.in_both for g in dense.groups] == [g.in_both for g in sparse.groups]
    assert_consistent(sparse, old, new, tol)


def test_crowded_component_sparse_equals_dense():
    """One big connected component (many candidates per particle) goes through LAPJVsp."""
    rng = np.random.default_rng(3)
    old = rng.uniform(0, 60, (150, 3))
    new = np.vstack([old[:100] + rng.normal(0, 3, (100, 3)), rng.uniform(0, 60, (80, 3))])
    for tol in (5.0, 15.0, 40.0):
        same_optimum(match_particle_sets(old, new, tol, method="dense"),
                     match_particle_sets(old, new, tol, method="sparse"))


# --- recipes -------------------------------------------------------------------------------------------------------


@PROPERTY
@given(points=point_sets(8), tol=tolerances)
def test_self_intersection_puts_everything_in_both(points, tol):
    for method in GATED_METHODS:
        result = match_particle_sets(points, points, tol, method=method)
        assert result.in_both.all() and not result.only_new.any()
        assert np.all(result.old_distance_angst == 0.0)


@PROPERTY
@given(seed=st.integers(0, 2**31), n_old=st.integers(0, 30), n_new=st.integers(0, 30), n_dup=st.integers(0, 30))
def test_tolerance_zero_union_collapses_exact_duplicates(seed, n_old, n_new, n_dup):
    rng = np.random.default_rng(seed)
    old = rng.uniform(0, 1000, (n_old, 3))
    n_dup = min(n_dup, n_old)
    new = np.vstack([old[rng.permutation(n_old)[:n_dup]], rng.uniform(0, 1000, (n_new, 3))])
    result = match_particle_sets(old, new, 0.0)
    old_idx, new_idx = select_union(result, keep_only_old=True, keep_in_both=True, keep_only_new=True)
    assert old_idx.size + new_idx.size == n_old + len(new) - n_dup
    assert np.array_equal(old_idx, np.arange(n_old))  # duplicates are represented by the old particle


@PROPERTY
@given(old=point_sets(8), new=point_sets(8), tol=tolerances)
def test_only_old_plus_in_both_is_the_old_set(old, new, tol):
    result = match_particle_sets(old, new, tol)
    old_idx, new_idx = select_union(result, True, True, False)
    assert np.array_equal(old_idx, np.arange(len(old))) and new_idx.size == 0
    old_idx, new_idx = select_union(result, False, True, False)
    assert np.array_equal(old_idx, np.flatnonzero(result.in_both)) and new_idx.size == 0
    old_idx, new_idx = select_union(result, False, False, True)
    assert old_idx.size == 0 and np.array_equal(new_idx, np.flatnonzero(result.only_new))


# --- invariances ---------------------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**31), n=st.integers(0, 60))
def test_raising_tolerance_never_decreases_in_both(seed, n):
    rng = np.random.default_rng(seed)
    old = rng.uniform(0, 150, (n, 3))
    new = np.vstack([old[: n // 2] + rng.normal(0, 5, (n // 2, 3)), rng.uniform(0, 150, (n // 2, 3))])
    groups_old, groups_new = rng.integers(0, 2, len(old)), rng.integers(0, 2, len(new))
    for method in GATED_METHODS:
        previous = None
        for tol in (0.0, 2.0, 5.0, 10.0, 20.0, 40.0, 1e3):
            result = match_particle_sets(old, new, tol, old_groups=groups_old, new_groups=groups_new, method=method)
            counts = np.array([g.in_both for g in result.groups])
            if previous is not None:
                assert np.all(counts >= previous)
            previous = counts


def test_raising_tolerance_can_swap_members_but_keeps_the_count():
    """Old a=-5, b=0.5, c=11.5; new x=0, y=5.5 (1D).

    tol 5: only {a-x, b-y} (10 Å) has two pairs. tol 6 adds c-y (6 Å), and {b-x, c-y} (6.5 Å) is cheaper, so the
    count of pairs stays 2 but a leaves "in both": counts are monotonic, membership is not.
    """
    old = np.array([[-5.0, 0, 0], [0.5, 0, 0], [11.5, 0, 0]])
    new = np.array([[0.0, 0, 0], [5.5, 0, 0]])
    for method in GATED_METHODS:
        assert match_particle_sets(old, new, 5.0, method=method).old_partner.tolist() == [0, 1, -1]
        assert match_particle_sets(old, new, 6.0, method=method).old_partner.tolist() == [-1, 0, 1]


@PROPERTY
@given(seed=st.integers(0, 2**31), n_old=st.integers(0, 40), n_new=st.integers(0, 40),
       tol=st.sampled_from([2.0, 10.0, 30.0]))
def test_groups_never_mix_and_in_both_bounded(seed, n_old, n_new, tol):
    rng = np.random.default_rng(seed)
    old, new = rng.uniform(0, 100, (n_old, 3)), rng.uniform(0, 100, (n_new, 3))
    groups_old = rng.choice(["TS_01", "TS_02", "TS_03"], n_old)
    groups_new = rng.choice(["TS_02", "TS_03", "TS_04"], n_new)
    for method in GATED_METHODS:
        result = match_particle_sets(old, new, tol, old_groups=groups_old, new_groups=groups_new, method=method)
        i = np.flatnonzero(result.in_both)
        assert np.array_equal(groups_old[i], groups_new[result.old_partner[i]])
        for g in result.groups:
            assert g.in_both <= min(g.n_old, g.n_new)
            assert g.only_old == g.n_old - g.in_both and g.only_new == g.n_new - g.in_both
        assert {g.group for g in result.groups} == set(groups_old) | set(groups_new)


def test_identical_coordinates_in_different_tomograms_do_not_match():
    points = np.zeros((3, 3))
    for method in GATED_METHODS:
        result = match_particle_sets(points, points, 5.0, old_groups=["a", "a", "b"], new_groups=["c", "c", "c"],
                                     method=method)
        assert result.n_pairs == 0
        assert [(g.group, g.n_old, g.n_new, g.jaccard) for g in result.groups] == [
            ("a", 2, 0, 0.0), ("b", 1, 0, 0.0), ("c", 0, 3, 0.0)]


@PROPERTY
@given(old=point_sets(), new=point_sets(), tol=tolerances, seed=st.integers(0, 2**31))
def test_permuting_inputs_keeps_the_optimum(old, new, tol, seed):
    """Grid coordinates: ties are common, so only the optimum (cardinality, cost) must be invariant."""
    rng = np.random.default_rng(seed)
    p, q = rng.permutation(len(old)), rng.permutation(len(new))
    for method in GATED_METHODS:
        perm = match_particle_sets(old[p], new[q], tol, method=method)
        same_optimum(match_particle_sets(old, new, tol, method=method), perm)
        assert_consistent(perm, old[p], new[q], tol)


@PROPERTY
@given(old=point_sets(), new=point_sets(), tol=tolerances)
def test_swapping_old_and_new_keeps_the_optimum(old, new, tol):
    for method in GATED_METHODS:
        forward = match_particle_sets(old, new, tol, method=method)
        backward = match_particle_sets(new, old, tol, method=method)
        same_optimum(forward, backward)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**31), n=st.integers(1, 60), mode=st.sampled_from(["gated", "m_compatible"]))
def test_permutation_and_swap_map_pairs_exactly_without_ties(seed, n, mode):
    """Continuous random coordinates (no ties): permuting permutes the pairs, swapping mirrors them."""
    rng = np.random.default_rng(seed)
    old = rng.uniform(0, 100, (n, 3))
    new = np.vstack([old[: n // 2] + rng.normal(0, 4, (n // 2, 3)), rng.uniform(0, 100, (n - n // 4, 3))])
    groups_old, groups_new = rng.integers(0, 2, len(old)), rng.integers(0, 2, len(new))
    p, q = rng.permutation(len(old)), rng.permutation(len(new))
    base = match_particle_sets(old, new, 10.0, old_groups=groups_old, new_groups=groups_new, mode=mode)
    perm = match_particle_sets(old[p], new[q], 10.0, old_groups=groups_old[p], new_groups=groups_new[q], mode=mode)
    inverse_q = np.argsort(q)
    expected = np.where(base.old_partner[p] >= 0, inverse_q[base.old_partner[p]], -1)
    assert np.array_equal(perm.old_partner, expected)
    swapped = match_particle_sets(new, old, 10.0, old_groups=groups_new, new_groups=groups_old, mode=mode)
    assert np.array_equal(swapped.old_partner, base.new_partner)
    assert np.array_equal(swapped.new_partner, base.old_partner)


@PROPERTY
@given(old=point_sets(), new=point_sets(), tol=tolerances,
       shift=arrays(np.float64, 3, elements=st.integers(-4000, 4000).map(float)))
def test_translation_invariance(old, new, tol, shift):
    for method in GATED_METHODS:
        same_optimum(match_particle_sets(old, new, tol, method=method),
                     match_particle_sets(old + shift, new + shift, tol, method=method))


# --- known answers -------------------------------------------------------------------------------------------------


def test_known_jittered_pairs_are_recovered():
    rng = np.random.default_rng(7)
    n = 2000
    old = rng.uniform(0, [4000, 4000, 1500], (n, 3))
    shared = rng.random(n) < 0.8
    new = np.where(shared[:, None], old + rng.normal(0, 3, old.shape), rng.uniform(0, [4000, 4000, 1500], (n, 3)))
    result = match_particle_sets(old, new, 20.0)
    recovered = result.old_partner[shared] == np.flatnonzero(shared)
    assert recovered.mean() > 0.99
    false_matches = (result.old_partner >= 0) & (result.old_partner != np.arange(n))
    assert false_matches.sum() < 0.01 * n


def test_boundary_straddling_pair_matches():
    """9.9 Å and 10.1 Å truncate/round to different integers but are 0.2 Å apart."""
    old, new = np.array([[9.9, 0.0, 0.0]]), np.array([[10.1, 0.0, 0.0]])
    for method in GATED_METHODS:
        result = match_particle_sets(old, new, 0.5, method=method)
        assert result.n_pairs == 1
        assert result.old_distance_angst[0] == pytest.approx(0.2)


def test_tolerance_is_inclusive():
    old, new = np.array([[0.0, 0.0, 0.0]]), np.array([[3.0, 4.0, 0.0]])
    for method in GATED_METHODS:
        assert match_particle_sets(old, new, 5.0, method=method).n_pairs == 1
        assert match_particle_sets(old, new, 5.0 - 1e-3, method=method).n_pairs == 0


def test_gated_prefers_more_pairs_over_smaller_sum():
    """Old {0, 4}, new {3, 6}, tol 3: two pairs (0-3, 4-6; 5 Å) beat the single closest pair (4-3; 1 Å)."""
    old, new = np.array([[0.0, 0, 0], [4.0, 0, 0]]), np.array([[3.0, 0, 0], [6.0, 0, 0]])
    for method in GATED_METHODS:
        result = match_particle_sets(old, new, 3.0, method=method)
        assert result.old_partner.tolist() == [0, 1]
        assert result.total_distance_angst == pytest.approx(5.0)


def test_m_compatible_loses_a_true_pair():
    """Old {0, 10}, new {4, -100} on a line, tol 5.

    M assigns first: (0-4, 10-(-100)) costs 4 + 110 = 114, (0-(-100), 10-4) costs 100 + 6 = 106, so M pairs
    0 with -100 and 10 with 4, and the threshold then drops both. The gated solver keeps 0-4 (4 Å).
    """
    old = np.array([[0.0, 0, 0], [10.0, 0, 0]])
    new = np.array([[4.0, 0, 0], [-100.0, 0, 0]])
    gated = match_particle_sets(old, new, 5.0)
    m_like = match_particle_sets(old, new, 5.0, mode="m_compatible")
    assert gated.old_partner.tolist() == [0, -1]
    assert m_like.n_pairs == 0
    all_assigned = match_particle_sets(old, new, np.inf, mode="m_compatible")
    assert all_assigned.old_partner.tolist() == [1, 0]
    np.testing.assert_allclose(all_assigned.old_distance_angst, [100.0, 6.0])


@settings(max_examples=25, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**31), n=st.integers(1, 80), shared_fraction=st.sampled_from([0.3, 0.6, 0.9]))
def test_gated_in_both_at_least_m_compatible(seed, n, shared_fraction):
    rng = np.random.default_rng(seed)
    old = rng.uniform(0, 300, (n, 3))
    n_shared = int(shared_fraction * n)
    new = np.vstack([old[:n_shared] + rng.normal(0, 5, (n_shared, 3)), rng.uniform(0, 300, (n - n_shared, 3))])
    groups = rng.integers(0, 2, n)
    gated = match_particle_sets(old, new, 12.0, old_groups=groups, new_groups=groups)
    m_like = match_particle_sets(old, new, 12.0, old_groups=groups, new_groups=groups, mode="m_compatible")
    assert_consistent(m_like, old, new, 12.0)
    for g, m in zip(gated.groups, m_like.groups):
        assert g.in_both >= m.in_both


def test_m_compatible_keeps_min_of_sizes_at_infinite_tolerance():
    rng = np.random.default_rng(1)
    old, new = rng.uniform(0, 100, (7, 3)), rng.uniform(0, 100, (4, 3))
    result = match_particle_sets(old, new, np.inf, mode="m_compatible")
    assert result.n_pairs == 4
    same_optimum(result, match_particle_sets(old, new, np.inf))


# --- results, histogram, validation --------------------------------------------------------------------------------


def test_counts_and_jaccard():
    old = np.array([[0.0, 0, 0], [50, 0, 0], [100, 0, 0]])
    new = np.array([[1.0, 0, 0], [300, 0, 0]])
    result = match_particle_sets(old, new, 5.0, old_groups=["t"] * 3, new_groups=["t"] * 2)
    (g,) = result.groups
    assert (g.n_old, g.n_new, g.in_both, g.only_old, g.only_new) == (3, 2, 1, 2, 1)
    assert g.jaccard == pytest.approx(1 / 4) and result.jaccard == pytest.approx(1 / 4)
    assert result.only_old.tolist() == [False, True, True] and result.only_new.tolist() == [False, True]
    np.testing.assert_allclose(result.matched_distances_angst, [1.0])
    with pytest.raises(ValueError):
        result.old_partner[0] = 5  # read-only


def test_empty_inputs():
    empty = np.zeros((0, 3))
    for method in GATED_METHODS:
        result = match_particle_sets(empty, np.ones((2, 3)), 1.0, method=method)
        assert result.n_pairs == 0 and result.only_new.all()
        assert match_particle_sets(empty, empty, 1.0, method=method).groups == ()


def test_histogram_distances_and_bins():
    rng = np.random.default_rng(2)
    old = rng.uniform(0, 2000, (300, 3))
    new = old + rng.normal(0, 3, old.shape)
    distances = histogram_distances(old, new, 50.0)
    assert distances.size == 300 and distances.max() < 50
    counts, edges = distance_histogram(distances, n_bins=10, max_angst=50.0)
    assert counts.sum() == 300 and edges[0] == 0 and edges[-1] == 50 and counts.shape == (10,)
    counts, edges = distance_histogram(np.array([np.nan, 0.2]))
    assert edges[-1] == 1.0 and counts.sum() == 1
    m_hist = histogram_distances(old[:5], new[5:8], np.inf, mode="m_compatible")
    assert m_hist.size == 3


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(old_positions_angst=np.zeros((2, 2))), r"old_positions_angst: expected shape \(N, 3\)"),
    (dict(new_positions_angst=np.array([[0, 0, 0], [0, np.nan, 0.0]])), "new_positions_angst: row 1 is not finite"),
    (dict(tolerance_angst=-1.0), "tolerance_angst must be >= 0"),
    (dict(tolerance_angst=float("nan")), "tolerance_angst must be >= 0"),
    (dict(old_groups=["a", "b"]), "give both old_groups and new_groups"),
    (dict(old_groups=["a"], new_groups=["a", "b"]), r"old_groups: expected shape \(2,\)"),
    (dict(mode="hungarian"), "mode must be one of"),
    (dict(method="fast"), "method must be one of"),
])
def test_validation_messages(kwargs, message):
    args = dict(old_positions_angst=np.zeros((2, 3)), new_positions_angst=np.zeros((2, 3)), tolerance_angst=1.0)
    args.update(kwargs)
    with pytest.raises(InputError, match=message):
        match_particle_sets(**args)


# --- orientation gate, groups, deduplication ------------------------------------------------------------------------

# angles on a 45° grid: the angular distances hit the gate boundaries exactly
grid_angle = st.sampled_from([-135.0, -90.0, -45.0, 0.0, 45.0, 90.0, 135.0, 180.0])
angular_tolerances = st.sampled_from([None, 0.0, 30.0, 45.0, 90.0, 180.0])


def oriented_sets(max_size: int = 6):
    """(positions (n, 3), angles (n, 3), groups (n,)) with n shared by the three arrays."""
    return st.integers(0, max_size).flatmap(lambda n: st.tuples(
        arrays(np.float64, (n, 3), elements=grid_coord), arrays(np.float64, (n, 3), elements=grid_angle),
        arrays(np.int64, (n,), elements=st.integers(0, 1))))


def allowed_matrix(old, new, tol, old_angles=None, new_angles=None, ang_tol=None, symmetry="C1",
                   old_groups=None, new_groups=None):
    """The gate, written out pair by pair (distance, same group, then the angle)."""
    dist = np.sqrt(((old[:, None, :] - new[None, :, :]) ** 2).sum(-1))
    allowed = dist <= tol + DISTANCE_EPS_ANGST
    if old_groups is not None:
        allowed &= np.asarray(old_groups)[:, None] == np.asarray(new_groups)[None, :]
    if ang_tol is not None:
        for a in range(len(old)):
            for b in range(len(new)):
                angle = angular_distance_from_euler_deg(old_angles[a:a + 1], new_angles[b:b + 1], symmetry)[0]
                allowed[a, b] &= angle <= ang_tol + ANGLE_EPS_DEG
    return dist, allowed


def brute_force_allowed(dist: np.ndarray, allowed: np.ndarray) -> tuple[int, float]:
    """Best (cardinality, total distance) over all partial matchings using allowed pairs only."""
    best = (0, 0.0)

    def visit(i: int, used: frozenset, k: int, cost: float) -> None:
        nonlocal best
        if i == dist.shape[0]:
            if k > best[0] or (k == best[0] and cost < best[1]):
                best = (k, cost)
            return
        visit(i + 1, used, k, cost)
        for j in np.flatnonzero(allowed[i]):
            if j not in used:
                visit(i + 1, used | {j}, k + 1, cost + dist[i, j])

    visit(0, frozenset(), 0, 0.0)
    return best


@PROPERTY
@given(old=oriented_sets(), new=oriented_sets(), tol=tolerances, ang_tol=angular_tolerances,
       symmetry=st.sampled_from(["C1", "C4", "D2"]), grouped=st.booleans())
def test_matches_brute_force_with_angular_gate_and_groups(old, new, tol, ang_tol, symmetry, grouped):
    (old_pos, old_ang, old_grp), (new_pos, new_ang, new_grp) = old, new
    groups = dict(old_groups=old_grp, new_groups=new_grp) if grouped else {}
    dist, allowed = allowed_matrix(old_pos, new_pos, tol, old_ang, new_ang, ang_tol, symmetry, **groups)
    k, cost = brute_force_allowed(dist, allowed)
    for method in GATED_METHODS:
        result = match_particle_sets(old_pos, new_pos, tol, method=method, old_euler_zyz_deg=old_ang,
                                     new_euler_zyz_deg=new_ang, angular_tolerance_deg=ang_tol, symmetry=symmetry,
                                     **groups)
        assert_consistent(result, old_pos, new_pos, tol)
        assert result.n_pairs == k, method
        assert result.total_distance_angst == pytest.approx(cost, rel=1e-9, abs=1e-9), method
        i = np.flatnonzero(result.in_both)
        assert allowed[i, result.old_partner[i]].all()
        expected = angular_distance_from_euler_deg(old_ang[i], new_ang[result.old_partner[i]], symmetry)
        np.testing.assert_allclose(result.old_angle_deg[i], expected, atol=1e-9)


@settings(max_examples=15, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**31), n=st.integers(50, 400), ang_tol=st.sampled_from([None, 20.0, 60.0]),
       spacing_factor=st.sampled_from([0.5, 1.0, 2.0]))
def test_sparse_equals_dense_on_crowded_random_sets(seed, n, ang_tol, spacing_factor):
    """Crowded: mean nearest-neighbour spacing 0.5-2x the tolerance, so components are large (percolating at
    0.5x); with and without the orientation gate and classes."""
    rng = np.random.default_rng(seed)
    tol = 10.0
    side = (n * (spacing_factor * tol / 0.554) ** 3) ** (1 / 3)
    old = rng.uniform(0, side, (n, 3))
    new = np.vstack([old[: 2 * n // 3] + rng.normal(0, 3, (2 * n // 3, 3)), rng.uniform(0, side, (n // 2, 3))])
    old_ang = rng.uniform(-180, 180, (len(old), 3))
    new_ang = np.vstack([old_ang[: 2 * n // 3] + rng.normal(0, 10, (2 * n // 3, 3)),
                         rng.uniform(-180, 180, (n // 2, 3))])
    classes = dict(old_groups=rng.integers(0, 2, len(old)), new_groups=rng.integers(0, 2, len(new)))
    common = dict(old_euler_zyz_deg=old_ang, new_euler_zyz_deg=new_ang, angular_tolerance_deg=ang_tol,
                  symmetry="C2", **classes)
    dense = match_particle_sets(old, new, tol, method="dense", **common)
    sparse = match_particle_sets(old, new, tol, method="sparse", **common)
    same_optimum(dense, sparse)
    assert_consistent(sparse, old, new, tol)
    if ang_tol is not None:
        assert np.nanmax(sparse.old_angle_deg, initial=0.0) <= ang_tol + ANGLE_EPS_DEG


def test_orientation_controls():
    """Same place, 90° apart about z: C1 with a 30° gate keeps them apart; C4 matches them at 0°."""
    position = np.zeros((1, 3))
    old_ang, new_ang = np.array([[0.0, 0.0, 0.0]]), np.array([[90.0, 0.0, 0.0]])
    for method in GATED_METHODS:
        args = dict(method=method, old_euler_zyz_deg=old_ang, new_euler_zyz_deg=new_ang, angular_tolerance_deg=30.0)
        assert match_particle_sets(position, position, 5.0, symmetry="C1", **args).n_pairs == 0
        c4 = match_particle_sets(position, position, 5.0, symmetry="C4", **args)
        assert c4.n_pairs == 1 and c4.old_angle_deg[0] == pytest.approx(0.0, abs=1e-6)
        ungated = match_particle_sets(position, position, 5.0, method=method, old_euler_zyz_deg=old_ang,
                                      new_euler_zyz_deg=new_ang)
        assert ungated.n_pairs == 1 and ungated.old_angle_deg[0] == pytest.approx(90.0)
        assert ungated.angular_tolerance_deg is None


def test_tie_rule_distance_is_the_cost_and_the_gates_are_inclusive():
    """Old at 0; new A at 1 Å turned 40°, new B at 2 Å turned 0°. Both pass a 40° gate: the closer A wins (the
    angle never enters the cost). A 39.9° gate removes A and B wins. Boundaries are inclusive."""
    old, new = np.zeros((1, 3)), np.array([[1.0, 0, 0], [2.0, 0, 0]])
    old_ang, new_ang = np.zeros((1, 3)), np.array([[40.0, 0, 0], [0.0, 0, 0]])
    for method in GATED_METHODS:
        args = dict(method=method, old_euler_zyz_deg=old_ang, new_euler_zyz_deg=new_ang)
        assert match_particle_sets(old, new, 2.0, angular_tolerance_deg=40.0, **args).old_partner.tolist() == [0]
        assert match_particle_sets(old, new, 2.0, angular_tolerance_deg=39.9, **args).old_partner.tolist() == [1]
        assert match_particle_sets(old, new, 1.0, angular_tolerance_deg=39.9, **args).n_pairs == 0


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(angular_tolerance_deg=-1.0), "angular_tolerance_deg must be >= 0"),
    (dict(angular_tolerance_deg=float("nan")), "angular_tolerance_deg must be >= 0"),
    (dict(symmetry="Q7"), "symmetry 'Q7' is not known"),
    (dict(old_euler_zyz_deg=None, new_euler_zyz_deg=None, angular_tolerance_deg=10.0), "needs the angles"),
    (dict(new_euler_zyz_deg=None), "give both old_euler_zyz_deg"),
    (dict(old_euler_zyz_deg=np.zeros((3, 3))), r"old_euler_zyz_deg: expected shape \(2, 3\)"),
])
def test_orientation_validation_messages(kwargs, message):
    args = dict(old_positions_angst=np.zeros((2, 3)), new_positions_angst=np.zeros((2, 3)), tolerance_angst=1.0,
                old_euler_zyz_deg=np.zeros((2, 3)), new_euler_zyz_deg=np.zeros((2, 3)))
    args.update(kwargs)
    with pytest.raises(InputError, match=message):
        match_particle_sets(**args)


def test_m_compatible_applies_the_orientation_gate_after_assigning():
    old, new = np.zeros((1, 3)), np.array([[1.0, 0, 0]])
    args = dict(mode="m_compatible", old_euler_zyz_deg=np.zeros((1, 3)), new_euler_zyz_deg=np.array([[0, 90.0, 0]]))
    assert match_particle_sets(old, new, 5.0, angular_tolerance_deg=45.0, **args).n_pairs == 0
    assert match_particle_sets(old, new, 5.0, angular_tolerance_deg=90.0, **args).n_pairs == 1


def test_new_pose_wins_on_strictly_higher_scores():
    old, new = np.array([[0.0, 0, 0], [50, 0, 0], [100, 0, 0]]), np.array([[1.0, 0, 0], [51, 0, 0], [101, 0, 0]])
    result = match_particle_sets(old, new, 5.0)
    wins = new_pose_wins(result, np.array([1.0, 2.0, np.nan]), np.array([2.0, 2.0, 0.0]))
    assert wins.tolist() == [True, False, True]  # higher wins, a tie keeps old, NaN loses
    with pytest.raises(InputError, match="scores"):
        new_pose_wins(result, np.zeros(2), np.zeros(3))


@PROPERTY
@given(old=oriented_sets(8), new=oriented_sets(8), radius=st.sampled_from([0.0, 2.0, 10.0, 40.0]))
def test_nearest_new_particles_against_brute_force(old, new, radius):
    (old_pos, _, old_grp), (new_pos, _, new_grp) = old, new
    partner, distance = nearest_new_particles(old_pos, new_pos, radius, old_groups=old_grp, new_groups=new_grp)
    dist = np.sqrt(((old_pos[:, None, :] - new_pos[None, :, :]) ** 2).sum(-1))
    dist[old_grp[:, None] != new_grp[None, :]] = np.inf
    for a in range(len(old_pos)):
        best = dist[a].min(initial=np.inf)
        if best <= radius + DISTANCE_EPS_ANGST:
            assert distance[a] == pytest.approx(best) and dist[a, partner[a]] == pytest.approx(best)
        else:
            assert partner[a] == -1 and np.isnan(distance[a])


def test_histogram_is_cheap_on_a_crowded_tomogram():
    """10⁴ particles at a mean spacing of 2x the tolerance, histogram radius 3x: nearest-neighbour distances show
    the jitter peak (true pairs) apart from the chance neighbours, without solving an assignment."""
    rng = np.random.default_rng(5)
    n, tol = 10_000, 10.0
    side = (n * (2 * tol / 0.554) ** 3) ** (1 / 3)
    old = rng.uniform(0, side, (n, 3))
    shared = rng.random(n) < 0.7
    new = np.where(shared[:, None], old + rng.normal(0, 1.0, (n, 3)), rng.uniform(0, side, (n, 3)))
    distances = histogram_distances(old, new, 3 * tol)
    assert np.count_nonzero(distances < 5.0) >= shared.sum() * 0.99
    assert np.count_nonzero((distances > 5.0) & (distances < 8.0)) < 0.02 * n  # the valley


# --- deduplication ---------------------------------------------------------------------------------------------------


@PROPERTY
@given(points=oriented_sets(9), tol=st.sampled_from([0.0, 2.0, 10.0, 40.0]), ang_tol=angular_tolerances,
       scored=st.booleans(), seed=st.integers(0, 100))
def test_deduplicate_keeps_an_independent_maximal_set(points, tol, ang_tol, scored, seed):
    positions, angles, groups = points
    scores = np.random.default_rng(seed).integers(0, 3, len(positions)).astype(float) if scored else None
    result = deduplicate_particles(positions, tol, groups=groups, euler_zyz_deg=angles, angular_tolerance_deg=ang_tol,
                                   symmetry="C4", scores=scores)
    _, duplicate = allowed_matrix(positions, positions, tol, angles, angles, ang_tol, "C4", groups, groups)
    np.fill_diagonal(duplicate, False)
    kept = np.flatnonzero(result.keep)
    assert not duplicate[np.ix_(kept, kept)].any()  # no two kept particles are duplicates
    for r in np.flatnonzero(~result.keep):  # every removed particle has a kept, no-worse duplicate
        rep = result.representative[r]
        assert result.keep[rep] and duplicate[r, rep]
        if scores is not None:
            assert scores[rep] >= scores[r]
        assert result.distance_angst[r] == pytest.approx(np.linalg.norm(positions[r] - positions[rep]))
    assert np.array_equal(result.representative[kept], kept)


def test_deduplicate_cluster_of_mutual_duplicates_keeps_its_best():
    cluster = np.array([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0]])
    positions = np.vstack([cluster, cluster + 100, [[50.0, 50, 50]]])
    result = deduplicate_particles(positions, 2.0)
    assert result.keep.tolist() == [True, False, False, False, True, False, False, False, True]
    best = deduplicate_particles(positions, 2.0, scores=np.array([0, 0, 3, 1, 0, 5, 0, 5, 0.0]))
    assert np.flatnonzero(best.keep).tolist() == [2, 5, 8]  # highest score; equal scores: the earlier row
    grouped = deduplicate_particles(positions, 2.0, groups=np.array([0, 1, 0, 1, 0, 0, 0, 0, 0]))
    assert np.flatnonzero(grouped.keep).tolist() == [0, 1, 4, 8]
    turned = deduplicate_particles(cluster, 2.0, euler_zyz_deg=np.array([[0, 0, 0], [90, 0, 0], [0, 0, 0],
                                                                        [0, 0, 0.0]]), angular_tolerance_deg=10.0)
    assert turned.keep.tolist() == [True, True, False, False]
    assert deduplicate_particles(np.zeros((0, 3)), 1.0).keep.shape == (0,)


@pytest.mark.parametrize("batch_nodes", [2, 50, 4096])
def test_sparse_regions_solver_is_exact_on_a_percolating_tomogram(monkeypatch, batch_nodes):
    """1,200 particles at a mean spacing of half the tolerance (one giant component of the candidate graph):
    the maximum matching + Dulmage-Mendelsohn regions + per-region full matchings, in batches of any size, give the
    dense solver's cardinality and total distance."""
    monkeypatch.setattr(assignment, "LAPJVSP_BATCH_NODES", batch_nodes)
    rng = np.random.default_rng(11)
    n, tol = 1200, 10.0
    side = (n * (0.5 * tol / 0.554) ** 3) ** (1 / 3)
    old = rng.uniform(0, side, (n, 3))
    new = np.vstack([old[:900] + rng.normal(0, 2, (900, 3)), rng.uniform(0, side, (250, 3))])
    sparse = match_particle_sets(old, new, tol, method="sparse")
    same_optimum(match_particle_sets(old, new, tol, method="dense"), sparse)
    assert_consistent(sparse, old, new, tol)
