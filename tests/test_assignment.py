"""Intersect particle sets: gated optimal assignment, its solvers, and M-compatible mode."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from mspecies.common.types import InputError
from mspecies.core.assignment import (
    DISTANCE_EPS_ANGST,
    IntersectionResult,
    distance_histogram,
    histogram_distances,
    match_particle_sets,
    select_union,
)

PROPERTY = settings(max_examples=80, deadline=None, derandomize=True)
GATED_METHODS = ("dense", "sparse", "auto")

# coordinates on a 1/4 Å grid in a small box: exact ties and exact translations are possible
grid_coord = st.integers(min_value=0, max_value=160).map(lambda v: v / 4.0)


def point_sets(max_size: int = 6):
    return arrays(np.float64, st.tuples(st.integers(0, max_size), st.just(3)), elements=grid_coord)


tolerances = st.sampled_from([0.0, 0.5, 2.0, 5.0, 10.0, 20.0, 80.0])


def brute_force(old: np.ndarray, new: np.ndarray, tol: float) -> tuple[int, float]:
    """Best (cardinality, total distance) over all partial matchings under the gate, by enumeration."""
    dist = np.sqrt(((old[:, None, :] - new[None, :, :]) ** 2).sum(-1))
    allowed = dist <= tol + DISTANCE_EPS_ANGST
    best = (0, 0.0)

    def visit(i: int, used: frozenset, k: int, cost: float) -> None:
        nonlocal best
        if i == len(old):
            if k > best[0] or (k == best[0] and cost < best[1]):
                best = (k, cost)
            return
        visit(i + 1, used, k, cost)
        for j in np.flatnonzero(allowed[i]):
            if j not in used:
                visit(i + 1, used | {j}, k + 1, cost + dist[i, j])

    visit(0, frozenset(), 0, 0.0)
    return best


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
