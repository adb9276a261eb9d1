"""QC plots and the CTF-weighted average of :mod:`mspecies.cli.qc` (no Scipion)."""

import numpy as np
import pytest

from mspecies.cli import qc
from mspecies.core.reconstruct import half_to_centred_cube
from mspecies.core.volume import normalized_cross_correlation, rotate_volume_relion, spherical_mask
from mspecies.synth.phantom import make_phantom_map

BOX, PIXEL = 32, 4.0


def test_central_slices_pick_the_centre_planes():
    volume = np.zeros((8, 8, 8))
    volume[4, :, :] = 1.0
    slices = qc.central_slices(volume)
    assert set(slices) == {"XY", "XZ", "YZ"}
    assert slices["XY"].sum() == 64 and slices["XZ"][4].sum() == 8 and slices["YZ"][4].sum() == 8


def test_radial_power_spectrum_units_and_white_noise_flat():
    rng = np.random.default_rng(0)
    frequency, power = qc.radial_power_spectrum(rng.normal(size=(BOX, BOX, BOX)), PIXEL)
    assert frequency.shape == power.shape == (BOX // 2 + 1,)
    assert frequency[-1] == pytest.approx(1 / (2 * PIXEL))
    assert np.std(power[2:]) / np.mean(power[2:]) < 0.3


def test_centred_ctf_accepts_both_layouts():
    half = np.random.default_rng(1).random((BOX, BOX, BOX // 2 + 1))
    np.testing.assert_allclose(qc.centred_ctf(half), half_to_centred_cube(half))
    cube = np.ones((BOX, BOX, BOX))
    assert qc.centred_ctf(cube) is not None and qc.centred_ctf(cube).shape == (BOX,) * 3
    with pytest.raises(ValueError):
        qc.centred_ctf(np.ones((BOX, BOX, 3)))


def test_inverse_euler_undoes_the_rotation():
    reference = make_phantom_map(BOX, PIXEL)
    euler = np.array([30.0, 50.0, -70.0])
    back = rotate_volume_relion(rotate_volume_relion(reference, euler), qc.inverse_euler(euler))
    mask = spherical_mask(reference.shape, BOX // 2 - 4)
    assert normalized_cross_correlation(back, reference, mask) > 0.95


def test_ctf_weighted_average_recovers_rotated_copies_with_unit_ctf():
    reference = make_phantom_map(BOX, PIXEL)
    rng = np.random.default_rng(2)
    ones = np.ones((BOX, BOX, BOX // 2 + 1))
    angles = [rng.uniform(-180, 180, 3) for _ in range(3)]
    particles = [(rotate_volume_relion(reference, e), ones, e) for e in angles]
    average = qc.ctf_weighted_average(particles)
    mask = spherical_mask(reference.shape, BOX // 2 - 4)
    assert normalized_cross_correlation(average, reference, mask) > 0.9
    prerotated = qc.ctf_weighted_average([(reference, ones, None)] * 2)
    assert normalized_cross_correlation(prerotated, reference) > 0.999
    with pytest.raises(ValueError):
        qc.ctf_weighted_average([])


def test_fsc_resolution():
    fsc = np.array([1.0, 0.9, 0.8, 0.6, 0.4, 0.1])
    assert qc.fsc_resolution_angst(fsc, 10, 2.0, 0.5) == pytest.approx(10 * 2.0 / 3)
    assert qc.fsc_resolution_angst(np.ones(6), 10, 2.0, 0.5) == pytest.approx(10 * 2.0 / 5)
    assert qc.fsc_resolution_angst(np.array([0.1, 0.0]), 10, 2.0, 0.5) == float("inf")


def test_figures_are_written_as_png(tmp_path):
    reference = make_phantom_map(BOX, PIXEL)
    ctf = np.random.default_rng(3).random((BOX, BOX, BOX // 2 + 1))
    path = qc.save_figure(qc.volume_qc_figure(reference, PIXEL, ctf, title="TS_01"), tmp_path / "qc.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
    path = qc.save_figure(qc.volume_qc_figure(reference, PIXEL), tmp_path / "qc_no_ctf.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
    fsc = np.linspace(1, 0, BOX // 2 + 1)
    path = qc.save_figure(qc.fsc_figure({"export": fsc}, BOX, PIXEL), tmp_path / "fsc.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
