"""RELION ⇄ Scipion pose matrices: round trip, third-party reference and tomo's own conventions.

No project needed (pure objects), BaseTest-style so ``pw_run_tests`` lists it too.
"""

import numpy as np
from pwem.convert.transformations import euler_from_matrix, euler_matrix
from pyworkflow.tests import BaseTest
from tomo.constants import TR_RELION, TR_SCIPION
from tomo.objects import Coordinate3D, convertMatrix

from mspecies.convert.poses import relion_to_scipion_matrix, scipion_matrix_to_relion
from mspecies.core.geometry import euler_to_matrix

N_POSES = 200
PIXEL_ANGST = 2.5


def _random_poses(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(N, 3) RELION angles (deg) away from gimbal lock and (N, 3) origins (Å)."""
    rng = np.random.default_rng(seed)
    angles = np.column_stack([rng.uniform(-180, 180, N_POSES), rng.uniform(1, 179, N_POSES),
                              rng.uniform(-180, 180, N_POSES)])
    return angles, rng.normal(0.0, 20.0, (N_POSES, 3))


def _matrix_from_geometry(shifts_px: np.ndarray, angles_deg: np.ndarray) -> np.ndarray:
    """scipion-em-relion / reliontomo ``matrixFromGeometry(shifts, angles, inverseTransform=True)``."""
    matrix = euler_matrix(*(-np.deg2rad(angles_deg)), "szyz")
    matrix[:3, 3] = -shifts_px[:3]
    return np.linalg.inv(matrix)


class TestPoses(BaseTest):
    """Conventions pinned against pwem's transformations and tomo's convertMatrix / Coordinate3D."""

    def test_round_trip(self):
        angles, origins = _random_poses()
        back_angles, back_origins = scipion_matrix_to_relion(relion_to_scipion_matrix(angles, origins, PIXEL_ANGST),
                                                             PIXEL_ANGST)
        np.testing.assert_allclose(euler_to_matrix(back_angles), euler_to_matrix(angles), atol=1e-9)
        np.testing.assert_allclose(back_origins, origins, atol=1e-9)

    def test_equals_relion_plugins_matrix_from_geometry(self):
        angles, origins = _random_poses(1)
        ours = relion_to_scipion_matrix(angles, origins, PIXEL_ANGST)
        for i in range(N_POSES):
            np.testing.assert_allclose(ours[i], _matrix_from_geometry(origins[i] / PIXEL_ANGST, angles[i]), atol=1e-9)
            back = -np.rad2deg(euler_from_matrix(np.linalg.inv(ours[i]), axes="szyz"))
            np.testing.assert_allclose(euler_to_matrix(back), euler_to_matrix(angles[i]), atol=1e-9)

    def test_rotation_is_transpose_of_relion_matrix(self):
        angles, _ = _random_poses(2)
        matrices = relion_to_scipion_matrix(angles, None, PIXEL_ANGST)
        np.testing.assert_allclose(matrices[:, :3, :3], np.swapaxes(euler_to_matrix(angles), 1, 2), atol=1e-12)
        np.testing.assert_allclose(matrices[:, :3, 3], 0.0, atol=1e-12)

    def test_tomo_relion_convention_keeps_pure_rotations(self):
        """tomo's convention='relion' only moves translations: for a rotation it returns the same Aᵀ."""
        angles, _ = _random_poses(3)
        for matrix in relion_to_scipion_matrix(angles[:20], None, PIXEL_ANGST):
            np.testing.assert_allclose(convertMatrix(matrix, convention=TR_RELION, direction="get"), matrix,
                                       atol=1e-9)
            np.testing.assert_allclose(convertMatrix(matrix, convention=TR_RELION, direction="set"), matrix,
                                       atol=1e-9)

    def test_coordinate3d_stores_matrix(self):
        angles, _ = _random_poses(4)
        matrix = relion_to_scipion_matrix(angles[0], None, PIXEL_ANGST)
        coord = Coordinate3D()
        coord.setMatrix(matrix, convention=TR_SCIPION)
        np.testing.assert_allclose(coord.getMatrix(convention=TR_SCIPION), matrix, atol=1e-12)
        np.testing.assert_allclose(coord.getMatrix(convention=TR_RELION), matrix, atol=1e-9)
        back, origin = scipion_matrix_to_relion(coord.getMatrix(convention=TR_SCIPION), PIXEL_ANGST)
        np.testing.assert_allclose(euler_to_matrix(back), euler_to_matrix(angles[0]), atol=1e-9)
        np.testing.assert_allclose(origin, 0.0, atol=1e-9)
