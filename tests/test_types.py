"""Core data classes validate shapes and name the offending field."""

import numpy as np
import pytest

from mspecies.common.types import InputError, Microscope, ParticlePoses, TiltSeriesData


def _tilt_series(n_tilts=5, **overrides):
    values = dict(ts_id="TS_01", pixel_size_angst=2.0, image_shape_yx=(64, 64),
                  tilt_angles_deg=np.linspace(-60, 60, n_tilts), xf=np.tile(np.eye(2, 3), (n_tilts, 1, 1)),
                  defocus_u_angst=np.full(n_tilts, 3e4), defocus_v_angst=np.full(n_tilts, 2.9e4),
                  defocus_angle_deg=np.zeros(n_tilts), dose_e_per_angst2=3.0 * (np.arange(n_tilts) + 1),
                  acquisition_order=np.arange(n_tilts), excluded=np.zeros(n_tilts, bool),
                  microscope=Microscope(300.0, 2.7, 0.07))
    values.update(overrides)
    return TiltSeriesData(**values)


def test_tilt_count_mismatch_names_the_field():
    with pytest.raises(InputError, match="defocus_u_angst: expected 5 values"):
        _tilt_series(defocus_u_angst=np.zeros(4))


def test_missing_pixel_size_is_rejected():
    with pytest.raises(InputError, match="pixel_size_angst must be > 0"):
        _tilt_series(pixel_size_angst=0.0)


def test_acquisition_order_must_be_a_permutation():
    with pytest.raises(InputError, match="acquisition_order must be a permutation"):
        _tilt_series(acquisition_order=np.array([0, 1, 1, 2, 3]))


def test_pre_exposure_follows_acquisition_order():
    order = np.array([4, 2, 0, 1, 3])  # tilt 2 first, then 3, 1, 4, 0
    accumulated = np.zeros(5)
    accumulated[np.argsort(order)] = 3.0 * (np.arange(5) + 1)
    series = _tilt_series(acquisition_order=order, dose_e_per_angst2=accumulated)
    np.testing.assert_allclose(series.pre_exposure_e_per_angst2, accumulated - 3.0)


def test_particle_poses_check_shapes_and_subset():
    poses = ParticlePoses(np.zeros((3, 3)), np.zeros((3, 3)), np.array(["a", "b", "a"]))
    assert len(poses.subset(poses.tomo_names == "a")) == 2
    with pytest.raises(InputError, match="euler_zyz_deg must have shape"):
        ParticlePoses(np.zeros((3, 3)), np.zeros((2, 3)), np.array(["a", "b", "a"]))
