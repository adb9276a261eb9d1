"""The CTF follows RELION's formula and sign conventions (ctf.cpp), pinned with hand-derived values."""

import numpy as np
import pytest

from mspecies.common.types import Microscope
from mspecies.core.ctf import ctf_2d, electron_wavelength_angst, rfft_frequencies

NO_CS = Microscope(voltage_kv=300.0, cs_mm=0.0, amplitude_contrast=0.0)


def test_wavelength_at_300_and_200_kv_matches_textbook_values():
    assert electron_wavelength_angst(300.0) == pytest.approx(0.019687, abs=2e-6)
    assert electron_wavelength_angst(200.0) == pytest.approx(0.025079, abs=2e-6)


def test_dc_value_is_the_amplitude_contrast():
    microscope = Microscope(300.0, 2.7, 0.07)
    value = ctf_2d(np.array(0.0), np.array(0.0), 25000.0, 20000.0, 33.0, microscope)
    assert value == pytest.approx(0.07, abs=1e-12)


def test_underfocus_gives_positive_ctf_before_the_first_zero_and_zeros_where_theory_puts_them():
    defocus = 20000.0
    wavelength = electron_wavelength_angst(300.0)
    first_zero = np.sqrt(1.0 / (wavelength * defocus))  # π λ Δf k² = π
    k = np.array([np.sqrt(0.5) * first_zero, first_zero, np.sqrt(2.0) * first_zero])
    values = ctf_2d(k, np.zeros(3), defocus, defocus, 0.0, NO_CS)
    assert values[0] == pytest.approx(1.0)  # γ = −π/2 there: underfocus gives +1, the first maximum
    assert values[1] == pytest.approx(0.0, abs=1e-9)
    assert values[2] == pytest.approx(0.0, abs=1e-9)


def test_astigmatism_angle_points_the_u_defocus_counter_clockwise_from_x():
    u, v, angle = 30000.0, 15000.0, 30.0
    wavelength = electron_wavelength_angst(300.0)
    direction_u = np.deg2rad(angle)
    k_zero_u = np.sqrt(1.0 / (wavelength * u))
    k_zero_v = np.sqrt(1.0 / (wavelength * v))
    along_u = ctf_2d(np.array(k_zero_u * np.cos(direction_u)), np.array(k_zero_u * np.sin(direction_u)),
                     u, v, angle, NO_CS)
    direction_v = direction_u + np.pi / 2
    along_v = ctf_2d(np.array(k_zero_v * np.cos(direction_v)), np.array(k_zero_v * np.sin(direction_v)),
                     u, v, angle, NO_CS)
    assert along_u == pytest.approx(0.0, abs=1e-9)
    assert along_v == pytest.approx(0.0, abs=1e-9)


def test_bfactor_envelope_is_relion_sign_exp_b_k2_over_4():
    k = np.array([0.1])
    plain = ctf_2d(k, np.zeros(1), 20000.0, 20000.0, 0.0, NO_CS)
    damped = ctf_2d(k, np.zeros(1), 20000.0, 20000.0, 0.0, NO_CS, bfactor_angst2=-400.0)
    assert damped / plain == pytest.approx(np.exp(-400.0 / 4 * 0.01))


def test_stack_of_ctfs_broadcasts_against_one_grid():
    fx, fy = rfft_frequencies((32, 32), 2.0)
    defoci = np.array([10000.0, 20000.0, 30000.0])[:, None, None]
    stack = ctf_2d(fx, fy, defoci, defoci, np.zeros((3, 1, 1)), Microscope(300.0, 2.7, 0.1))
    assert stack.shape == (3, 32, 17)
    single = ctf_2d(fx, fy, 20000.0, 20000.0, 0.0, Microscope(300.0, 2.7, 0.1))
    np.testing.assert_allclose(stack[1], single)


def test_rfft_frequencies_match_the_rfft2_layout():
    fx, fy = rfft_frequencies((6, 8), 2.0)
    assert fx.shape == fy.shape == (6, 5)
    assert fx[0, 4] == pytest.approx(0.25)  # Nyquist of 2 Å pixels along x
    assert fy[3, 0] == pytest.approx(-0.25)  # row N/2 is the negative Nyquist (numpy fftfreq)
