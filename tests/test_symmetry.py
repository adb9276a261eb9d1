"""Point groups (RELION's names and axes) and the angular distance between poses over a symmetry."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.transform import Rotation

from mspecies.common.euler import euler_to_matrix
from mspecies.common.types import InputError
from mspecies.core.symmetry import (
    angular_distance_deg,
    angular_distance_from_euler_deg,
    axis_rotation,
    symmetry_matrices,
)

ORDERS = {"C1": 1, "C2": 2, "C4": 4, "C7": 7, "D1": 2, "D2": 4, "D6": 12, "T": 12, "O": 24, "I": 60, "I1": 60,
          "I2": 60, "I3": 60, "I4": 60}
PROPERTY = settings(max_examples=40, deadline=None, derandomize=True)
angles = st.tuples(st.floats(-180, 180), st.floats(0, 180), st.floats(-180, 180))


def _contains(group: np.ndarray, matrix: np.ndarray, atol: float = 1e-9) -> bool:
    return bool((np.abs(group - matrix).max(axis=(1, 2)) < atol).any())


@pytest.mark.parametrize(("name", "order"), ORDERS.items())
def test_groups_have_their_order_and_are_closed(name, order):
    group = symmetry_matrices(name)
    assert group.shape == (order, 3, 3)
    np.testing.assert_allclose(group[0], np.eye(3))
    np.testing.assert_allclose(np.einsum("gji,gjk->gik", group, group), np.broadcast_to(np.eye(3), group.shape),
                               atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(group), 1.0)
    for a in group:
        for b in group[:: max(1, order // 6)]:
            assert _contains(group, a @ b)


@pytest.mark.parametrize(("name", "fold", "axis"), [
    # RELION symmetries.cpp (fill_symmetry_class): the axes as RELION writes them
    ("C5", 5, (0, 0, 1)), ("D3", 2, (1, 0, 0)), ("T", 2, (0.0, 0.816496, 0.577350)),
    ("T", 3, (0, 0, 1)), ("O", 3, (0.5773502, 0.5773502, 0.5773502)), ("O", 4, (0, 0, 1)),
    ("I", 3, (0, 0.356822076, 0.934172364)), ("I2", 5, (0.525731114, 0, 0.850650807)),
    ("I1", 3, (0.9341723640, 0.3568220765, 0)), ("I1", 5, (0.85065080702670, 0, -0.5257311142635)),
    ("I3", 3, (-0.4911234778630044, 0.3568220764705179, 0.7946544753759428)), ("I3", 5, (0, 0, 1)),
    ("I4", 3, (0.4911234778630044, 0.3568220764705179, 0.7946544753759428)),
    ("I4", 5, (0.8944271932547096, 0, 0.4472135909903704)),
])
def test_relion_axes_are_elements(name, fold, axis):
    assert _contains(symmetry_matrices(name), axis_rotation(fold, axis), atol=1e-6)


def test_unknown_symmetry_is_refused():
    for bad in ("C0", "X3", "D", "I5", "C1.5", ""):
        with pytest.raises(InputError, match="symmetry .* is not known"):
            symmetry_matrices(bad)
    assert len(symmetry_matrices(" c3 ")) == 3  # case and spaces are forgiven


def test_c4_particle_rotated_by_90_degrees_is_at_0():
    a = euler_to_matrix(np.array([[10.0, 50.0, -30.0]]))
    turned = a @ axis_rotation(4, (0, 0, 1))  # the reference turned by 90° about its 4-fold axis
    assert angular_distance_deg(a, turned, "C4")[0] == pytest.approx(0.0, abs=1e-6)
    assert angular_distance_deg(a, turned, "C1")[0] == pytest.approx(90.0)
    assert angular_distance_deg(a, turned, "C2")[0] == pytest.approx(90.0)
    assert angular_distance_deg(a, a @ axis_rotation(2, (1, 0, 0)), "D4")[0] == pytest.approx(0.0, abs=1e-6)


@PROPERTY
@given(first=angles, second=angles)
def test_c1_distance_is_the_relative_rotation_angle(first, second):
    """Oracle: scipy's rotation magnitude of A1ᵀ·A2 (independent code)."""
    a1, a2 = euler_to_matrix(np.array([first])), euler_to_matrix(np.array([second]))
    expected = np.rad2deg(Rotation.from_matrix(a1[0].T @ a2[0]).magnitude())
    assert angular_distance_deg(a1, a2)[0] == pytest.approx(expected, abs=1e-5)
    assert angular_distance_from_euler_deg(np.array([first]), np.array([second]))[0] == pytest.approx(expected,
                                                                                                      abs=1e-5)


@PROPERTY
@given(first=angles, second=angles, name=st.sampled_from(["C3", "D5", "T", "O", "I", "I3"]),
       k=st.integers(0, 59), m=st.integers(0, 59))
def test_distance_is_invariant_under_the_group_and_symmetric(first, second, name, k, m):
    group = symmetry_matrices(name)
    a1, a2 = euler_to_matrix(np.array([first])), euler_to_matrix(np.array([second]))
    base = angular_distance_deg(a1, a2, name)[0]
    moved = angular_distance_deg(a1 @ group[k % len(group)], a2 @ group[m % len(group)], name)[0]
    assert moved == pytest.approx(base, abs=1e-5)
    assert angular_distance_deg(a2, a1, name)[0] == pytest.approx(base, abs=1e-5)
    assert 0.0 <= base <= angular_distance_deg(a1, a2, "C1")[0] + 1e-9
    brute = min(np.rad2deg(Rotation.from_matrix(g.T @ a1[0].T @ a2[0]).magnitude()) for g in group)
    assert base == pytest.approx(brute, abs=1e-5)


def test_empty_input():
    assert angular_distance_deg(np.zeros((0, 3, 3)), np.zeros((0, 3, 3)), "I").shape == (0,)


@pytest.mark.parametrize("name", ["C1", "C3", "D7", "T", "O", "I", "I4"])
def test_identical_and_symmetric_poses_are_at_zero_to_rounding(name):
    """Near 0° the angle comes from the skew part (atan2), not arccos: 1e-9° precision, so a 0° angular tolerance
    (+ ANGLE_EPS_DEG) still matches identical or symmetry-related poses."""
    a = euler_to_matrix(np.random.default_rng(4).uniform(-180, 180, (50, 3)))
    group = symmetry_matrices(name)
    turned = a @ group[np.arange(50) % len(group)]
    assert angular_distance_deg(a, a, name).max() < 1e-9
    assert angular_distance_deg(a, turned, name).max() < 1e-9
    np.testing.assert_allclose(angular_distance_deg(a, a @ axis_rotation(2, (0.6, 0.8, 0.0)), "C1"), 180.0)
