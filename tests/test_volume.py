"""Volume helpers: RELION placement of a rotated reference, correlation and FSC."""

import numpy as np
import pytest

from mspecies.core.geometry import euler_to_matrix
from mspecies.core.volume import (
    fourier_shell_correlation,
    normalized_cross_correlation,
    rotate_volume_relion,
    spherical_mask,
)


def _blob(shape, centre_xyz, sigma=1.5):
    z, y, x = np.ogrid[tuple(slice(0, n) for n in shape)]
    cx, cy, cz = centre_xyz
    return np.exp(-((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) / (2 * sigma**2))


def test_feature_at_r_in_the_reference_lands_at_a_times_r():
    n = 32
    offset = np.array([6.0, -2.0, 3.0])
    reference = _blob((n,) * 3, offset + n // 2)
    angles = np.array([40.0, 65.0, -120.0])
    particle = rotate_volume_relion(reference, angles)
    expected = euler_to_matrix(angles) @ offset + n // 2
    z, y, x = np.indices(particle.shape)
    weights = np.clip(particle, 0, None)
    centroid = np.array([(x * weights).sum(), (y * weights).sum(), (z * weights).sum()]) / weights.sum()
    np.testing.assert_allclose(centroid, expected, atol=0.05)


def test_identity_rotation_keeps_the_volume():
    volume = np.random.default_rng(0).normal(size=(16, 16, 16))
    np.testing.assert_allclose(rotate_volume_relion(volume, np.zeros(3)), volume, atol=1e-10)


def test_correlation_and_fsc_of_a_volume_with_itself_are_one():
    volume = np.random.default_rng(1).normal(size=(16, 16, 16))
    assert normalized_cross_correlation(volume, volume) == pytest.approx(1.0)
    np.testing.assert_allclose(fourier_shell_correlation(volume, volume), 1.0)
    assert normalized_cross_correlation(volume, -volume, spherical_mask(volume.shape, 6)) == pytest.approx(-1.0)


def test_correlation_with_a_constant_is_an_error():
    with pytest.raises(ValueError, match="constant"):
        normalized_cross_correlation(np.ones((4, 4)), np.arange(16.0).reshape(4, 4))
