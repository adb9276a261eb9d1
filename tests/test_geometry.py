"""Geometry invariants: RELION Euler angles and the IMOD tilt/.xf projection."""

import numpy as np

from mspecies.common.types import Microscope, TiltSeriesData
from mspecies.core import geometry
from mspecies.synth.dataset import random_rotation_matrices, rotation_2d


def _passive_z(angle_deg: float) -> np.ndarray:
    c, s = np.cos(np.deg2rad(angle_deg)), np.sin(np.deg2rad(angle_deg))
    return np.array([[c, s, 0], [-s, c, 0], [0, 0, 1]])


def _passive_y(angle_deg: float) -> np.ndarray:
    c, s = np.cos(np.deg2rad(angle_deg)), np.sin(np.deg2rad(angle_deg))
    return np.array([[c, 0, -s], [0, 1, 0], [s, 0, c]])


def _tilt_series(angles_deg, xf=None, shape=(200, 300), pixel=2.0) -> TiltSeriesData:
    n = len(angles_deg)
    if xf is None:
        xf = np.tile(np.array([[1.0, 0, 0], [0, 1.0, 0]]), (n, 1, 1))
    return TiltSeriesData("t", pixel, shape, angles_deg, xf, np.full(n, 2e4), np.full(n, 2e4), np.zeros(n),
                          np.arange(1, n + 1), np.arange(n), np.zeros(n, bool), Microscope(300, 2.7, 0.07))


def test_euler_round_trip_gives_the_same_rotation_for_random_poses():
    rng = np.random.default_rng(1)
    matrices = random_rotation_matrices(500, rng)
    angles = geometry.matrix_to_euler(matrices)
    np.testing.assert_allclose(geometry.euler_to_matrix(angles), matrices, atol=1e-9)


def test_euler_to_matrix_equals_composition_of_passive_elementary_rotations():
    rng = np.random.default_rng(2)
    for rot, tilt, psi in rng.uniform([-180, 0, -180], [180, 180, 180], size=(50, 3)):
        expected = _passive_z(psi) @ _passive_y(tilt) @ _passive_z(rot)
        np.testing.assert_allclose(geometry.euler_to_matrix([rot, tilt, psi]), expected, atol=1e-12)


def test_random_rotations_are_proper_rotations():
    matrices = random_rotation_matrices(100, np.random.default_rng(3))
    np.testing.assert_allclose(matrices @ np.transpose(matrices, (0, 2, 1)), np.broadcast_to(np.eye(3), (100, 3, 3)),
                               atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(matrices), 1.0, atol=1e-12)


def test_zero_tilt_identity_xf_projects_to_position_over_pixel_plus_centre():
    ts = _tilt_series([0.0])
    positions = np.array([[10.0, -6.0, 40.0], [-3.0, 5.0, -8.0]])
    raw, height = geometry.project_positions_to_tilts(positions, ts)
    np.testing.assert_allclose(raw[:, 0], positions[:, :2] / 2.0 + [150, 100])
    np.testing.assert_allclose(height[:, 0], positions[:, 2])


def test_ninety_degree_tilt_puts_z_on_aligned_x():
    ts = _tilt_series([90.0])
    raw, height = geometry.project_positions_to_tilts(np.array([[8.0, 4.0, 20.0]]), ts)
    np.testing.assert_allclose(raw[0, 0], [20.0 / 2 + 150, 4.0 / 2 + 100], atol=1e-12)
    np.testing.assert_allclose(height[0, 0], -8.0, atol=1e-12)


def test_aligned_and_raw_px_conversions_are_inverse():
    rng = np.random.default_rng(4)
    xf = np.concatenate([rotation_2d(rng.uniform(-180, 180, 7)), rng.normal(0, 5, (7, 2, 1))], axis=2)
    raw = rng.normal(0, 100, (5, 7, 2))
    np.testing.assert_allclose(geometry.aligned_to_raw_px(geometry.raw_to_aligned_px(raw, xf), xf), raw, atol=1e-9)


def test_xf_rotation_maps_raw_tilt_axis_to_aligned_y():
    axis_deg = 85.0
    rotation = rotation_2d(90.0 - axis_deg)
    axis = np.array([np.cos(np.deg2rad(axis_deg)), np.sin(np.deg2rad(axis_deg))])
    np.testing.assert_allclose(rotation @ axis, [0.0, 1.0], atol=1e-12)


def test_corner_pixels_put_the_tomogram_centre_at_n_floordiv_2_and_round_trip():
    from mspecies.core.geometry import centred_angst_to_corner_px, corner_px_to_centred_angst

    shape_xyz = (512, 511, 150)
    corner = centred_angst_to_corner_px(np.array([[0.0, 0.0, 0.0], [8.0, -4.0, 2.0]]), shape_xyz, 4.0)
    np.testing.assert_allclose(corner, [[256, 255, 75], [258, 254, 75.5]])
    positions = np.random.default_rng(3).uniform(-500, 500, (20, 3))
    np.testing.assert_allclose(corner_px_to_centred_angst(centred_angst_to_corner_px(positions, shape_xyz, 2.5),
                                                          shape_xyz, 2.5), positions, atol=1e-12)


def test_closed_form_2x2_inverse_matches_lapack_on_stacks_and_refuses_singular_matrices():
    rng = np.random.default_rng(7)
    matrices = rotation_2d(rng.uniform(-180, 180, 41)) * rng.uniform(0.8, 1.2, (41, 1, 1))
    matrices[:, 0, 1] += rng.normal(0, 0.05, 41)  # stretch and skew, as IMOD fits have
    np.testing.assert_allclose(geometry.inverse_2x2(matrices), np.linalg.inv(matrices), rtol=0, atol=1e-14)
    stacked = matrices.reshape(41, 1, 2, 2).repeat(3, axis=1)
    np.testing.assert_allclose(geometry.inverse_2x2(stacked) @ stacked, np.broadcast_to(np.eye(2), stacked.shape),
                               atol=1e-14)
    singular = matrices.copy()
    singular[5] = [[1.0, 2.0], [2.0, 4.0]]
    with np.testing.assert_raises(np.linalg.LinAlgError):
        geometry.inverse_2x2(singular)


def test_closed_form_3x2_pseudo_inverse_matches_lapack():
    rng = np.random.default_rng(8)
    slices = np.einsum("bij,tjk->btik", random_rotation_matrices(5, rng), rng.normal(size=(41, 3, 2)))
    ours = geometry.pseudo_inverse_3x2(slices)
    assert ours.shape == (5, 41, 2, 3)
    np.testing.assert_allclose(ours, np.linalg.pinv(slices), rtol=0, atol=1e-12)
    np.testing.assert_allclose(ours @ slices, np.broadcast_to(np.eye(2), (5, 41, 2, 2)), atol=1e-12)
