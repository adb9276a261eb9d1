"""The validation layer: every reader refuses NaN, wrong units and unphysical values with the file and line."""

import numpy as np
import pytest

from mspecies.common.types import InputError
from mspecies.convert.files import read_defocus_array, read_xf_array
from mspecies.formats import aretomo, ctffind, dose, imod, serialem, validate


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(("name", "text", "reader", "fragment"), [
    ("a.tlt", "-3.0\nnan\n3.0\n", imod.read_tlt, "line 2: tilt angle is not a finite number"),
    ("a.tlt", "-3.0\n0.0\n95.0\n", imod.read_tlt, "line 3: tilt angle 95° is outside ±90°"),
    ("a.xf", "1 0 0 1 0 0\n1 0 0 1 nan 0\n", imod.read_xf, "line 2: transform is not a finite number"),
    ("a.xf", "1 0 0 1 0 0\n0 0 0 0 3 1\n", imod.read_xf, "line 2: the 2×2 matrix .* is singular"),
    ("a.defocus", "1 0 0.0 0.0 0.0 3\n1 1 0 0 3000 3000 10\n2 2 3 3 0 0 10\n", imod.read_imod_defocus,
     "line 3: defocus 1 0 Å is not an underfocus"),
    ("a.defocus", "1 0 0.0 0.0 0.0 3\n1 1 0 0 -3000 -3000 10\n", imod.read_imod_defocus, "not an underfocus"),
    ("a.defocus", "1 0 0.0 0.0 0.0 3\n1 1 0 0 3 3 10\n", imod.read_imod_defocus,
     r"line 2: defocus 1 30 Å is below 10 nm: wrong unit\?"),
    ("a.defocus", "1 0 0.0 0.0 0.0 3\n1 1 0 0 30000 30000 10\n", imod.read_imod_defocus,
     r"line 2: defocus 1 300000 Å is above 20 µm: wrong unit\?"),
    ("a.defocus", "1 0 0.0 0.0 0.0 3\n1 1 0 0 nan 3000 10\n", imod.read_imod_defocus, "line 2: not a finite number"),
    ("c.txt", "# CTFFIND\n1 3.1 3.0 10 0 0.1 8\n", ctffind.read_ctffind, "line 2: defocus 1 3.1 Å is below 10 nm"),
    ("c.txt", "# CTFFIND\n1 30000 nan 10 0 0.1 8\n", ctffind.read_ctffind, "line 2: CTFFIND value is not a finite"),
])
def test_readers_refuse_bad_values_with_file_and_line(tmp_path, name, text, reader, fragment):
    path = _write(tmp_path, name, text)
    with pytest.raises(InputError, match=fragment) as error:
        reader(path)
    assert str(path) in str(error.value)


@pytest.mark.parametrize("reader", [imod.read_tlt, imod.read_xf, imod.read_imod_defocus, ctffind.read_ctffind,
                                    serialem.read_mdoc, aretomo.read_aln, dose.read_dose_list],
                         ids=lambda reader: f"{reader.__module__.rsplit('.', 1)[-1]}.{reader.__name__}")
def test_text_readers_refuse_a_binary_file_as_not_text(tmp_path, reader):
    """A binary file (an MRC, a TIFF) given where text is expected is named as such, not as 'line 1: expected 6
    columns, got 3: <garbage bytes>'."""
    path = tmp_path / "binary.txt"
    path.write_bytes(bytes(range(256)) * 20)
    with pytest.raises(InputError, match="not a text file") as error:
        reader(path)
    assert str(path) in str(error.value) and "\ufffd" not in str(error.value)


def test_a_stray_non_utf8_character_in_a_text_file_is_still_read(tmp_path):
    path = tmp_path / "dose.txt"
    path.write_bytes(b"# accumulated dose in e/\xc5\xb2 (Windows-1252)\n3.0\n6.0\n9.0\n")
    assert dose.read_dose_list(path, "accumulated").accumulated_e_per_angst2.tolist() == [3.0, 6.0, 9.0]


def test_a_non_finite_matrix_is_named_on_one_line(tmp_path):
    path = _write(tmp_path, "a.xf", "1 0 0 1 0 0\nnan nan nan nan 0 0\n")
    with pytest.raises(InputError) as error:
        imod.read_xf(path)
    assert "\n" not in str(error.value) and "line 2" in str(error.value)


@pytest.mark.parametrize(("check", "value", "fragment"), [
    (validate.check_voltage_kv, 300000.0, r"looks like volts; expected kV \(300\)"),
    (validate.check_voltage_kv, 5.0, "outside 20–1000 kV"),
    (validate.check_voltage_kv, float("nan"), "not a finite number"),
    (validate.check_cs_mm, 2700.0, r"in µm\? \(expected mm, e.g. 2.7\)"),
    (validate.check_cs_mm, -1.0, "must be a number ≥ 0"),
    (validate.check_amplitude_contrast, 7.0, r"looks like a percentage; expected a fraction \(0.07\)"),
    (validate.check_amplitude_contrast, 100.5, "must be a fraction"),
    (validate.check_pixel_size_angst, 0.04, r"in nm\?"),
    (validate.check_pixel_size_angst, 0.0, "must be > 0"),
])
def test_scalar_checks_give_unit_hints(check, value, fragment):
    with pytest.raises(InputError, match=fragment) as error:
        check(value, "--flag")
    assert "--flag" in str(error.value)


@pytest.mark.parametrize("value", [(validate.check_voltage_kv, 300.0), (validate.check_cs_mm, 0.01),
                                   (validate.check_amplitude_contrast, 0.1), (validate.check_pixel_size_angst, 1.35)])
def test_scalar_checks_pass_physical_values(value):
    check, number = value
    assert check(number, "x") == number


def test_dose_check_refuses_nan_negative_and_a_dose_that_falls_in_acquisition_order():
    with pytest.raises(InputError, match="f, line 12: dose is not a finite number"):
        validate.check_dose(np.array([3.0, np.nan]), "f", [11, 12])
    with pytest.raises(InputError, match="f, entry 2: dose -3 e/A.2 is negative"):
        validate.check_dose(np.array([3.0, -3.0]), "f")
    with pytest.raises(InputError, match="above 1000: wrong unit"):
        validate.check_dose(np.array([3.0, 3000.0]), "f")
    with pytest.raises(InputError, match=r"entry 1: accumulated dose 3 e/A\^2 is below that of the tilt acquired "
                                         r"before it \(image 2: 6; acquisition order from m.mdoc\)"):
        validate.check_dose(np.array([3.0, 6.0]), "f", acquisition_order=np.array([1, 0]), order_source="m.mdoc")
    np.testing.assert_array_equal(validate.check_dose(np.array([6.0, 3.0]), "f", acquisition_order=np.array([1, 0])),
                                  [6.0, 3.0])


def test_one_value_per_tilt_is_required():
    with pytest.raises(InputError, match="a.txt: 10 defocus values, but --stack has 11 tilts"):
        validate.check_one_per_tilt(10, 11, "defocus", "a.txt", "--stack")


def test_scipion_importers_use_the_same_checked_readers(tmp_path):
    """convert.files (the Scipion importers' adapter) refuses the same bad values and reads CTFFIND and .aln."""
    with pytest.raises(InputError, match="singular"):
        read_xf_array(_write(tmp_path, "a.xf", "0 0 0 0 3 1\n"))
    with pytest.raises(InputError, match="below 10 nm"):
        read_defocus_array(_write(tmp_path, "c.txt", "1 3.1 3.0 10 0 0.1 8\n"), "ctffind", 1)
    with pytest.raises(InputError, match="2 defocus values, but the tilt series has 3 tilts"):
        read_defocus_array(ctffind.write_ctffind(tmp_path / "d.txt", [3e4, 3e4], [3e4, 3e4], [0, 0],
                                                 pixel_size_angst=4.0, voltage_kv=300.0, cs_mm=2.7,
                                                 amplitude_contrast=0.07), "ctffind", 3)
    aln = _write(tmp_path, "a.aln", "# SEC ROT GMAG TX TY SMEAN SFIT SCALE BASE TILT\n"
                 "    0    90.0    1.0    2.0    0.0    1.0    1.0    1.0    0.0    0.0\n")
    np.testing.assert_allclose(read_xf_array(aln), [[[0.0, 1.0, 0.0], [-1.0, 0.0, 2.0]]], atol=1e-12)


ANGLES_41 = np.arange(-60.0, 61.0, 3.0)


def _scheme_dose(acquired_angles: list[float]) -> np.ndarray:
    """Accumulated dose (3 e/Å² per tilt) per image of ANGLES_41 (stack order) for an acquisition order."""
    rank = {angle: i for i, angle in enumerate(acquired_angles)}
    return np.array([3.0 * (rank[angle] + 1) for angle in ANGLES_41])


@pytest.mark.parametrize("acquired", [
    list(ANGLES_41),                                                             # unidirectional
    [a for a in ANGLES_41 if a >= -21] + [a for a in ANGLES_41 if a < -21][::-1],  # bidirectional from -21°
    [0.0] + [s * a for a in np.arange(3.0, 61.0, 3.0) for s in (1, -1)],         # dose-symmetric
    [0.0] + [s * a for b in np.arange(3.0, 61.0, 6.0) for s in (1, -1) for a in (b, b + 3)],  # grouped (2/side)
], ids=["unidirectional", "bidirectional", "dose-symmetric", "grouped-dose-symmetric"])
def test_dose_of_usual_acquisition_schemes_grows_away_from_the_start(acquired):
    assert sorted(acquired) == list(ANGLES_41)
    assert validate.dose_not_growing_outward(ANGLES_41, _scheme_dose(acquired)) == []


def test_a_dose_list_out_of_stack_order_does_not_grow_away_from_the_start():
    dose = _scheme_dose([0.0] + [s * a for a in np.arange(3.0, 61.0, 3.0) for s in (1, -1)])
    shuffled = np.random.default_rng(0).permutation(dose)
    assert validate.dose_not_growing_outward(ANGLES_41, shuffled)
