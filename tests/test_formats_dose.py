"""Dose lists are read as what they hold: (prior, own), (tilt, accumulated), one column when told; ambiguous
two-column lists are refused with the file and how to tell; mdoc doses are checked the same way."""

import numpy as np
import pytest

from mspecies.common.types import InputError
from mspecies.formats import dose, serialem

ANGLES = np.array([-6.0, -3.0, 0.0, 3.0, 6.0])
ORDER = np.array([3, 1, 0, 2, 4])  # dose-symmetric: 0, -3, +3, -6, +6
ACCUMULATED = 3.0 * (ORDER + 1)


def _write(tmp_path, text, name="dose.txt"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_tilt_and_accumulated_columns_are_no_longer_read_as_prior_doses(tmp_path):
    """The silent misreading of the issue: (tilt angle, accumulated dose) was taken as (prior, own)."""
    path = dose.write_tilt_dose(tmp_path / "TS.tlt_dose", ANGLES, ACCUMULATED)
    read = dose.read_dose_list(path)
    assert read.layout == "tilt-accumulated" and "negative values" in read.reason
    np.testing.assert_allclose(read.accumulated_e_per_angst2, ACCUMULATED)
    np.testing.assert_allclose(read.tilt_angles_deg, ANGLES)


def test_tilt_column_is_recognised_by_the_known_tilt_angles_even_without_negatives(tmp_path):
    angles = np.array([0.0, 3.0, 6.0, 9.0])
    path = dose.write_tilt_dose(tmp_path / "d.txt", angles, [3.0, 6.0, 9.0, 12.0])
    with pytest.raises(InputError, match="cannot tell what the two columns hold.*--dose-layout"):
        dose.read_dose_list(path)
    read = dose.read_dose_list(path, tilt_angles_deg=angles, tilt_source="TS.tlt")
    assert read.layout == "tilt-accumulated" and "tilt angles of TS.tlt" in read.reason


def test_prior_and_own_dose_with_a_header_line_and_comments(tmp_path):
    pre = ACCUMULATED - 3.0
    path = _write(tmp_path, "# written by hand\nprior own\n" + "".join(f"{p} 3.0\n" for p in pre))
    read = dose.read_dose_list(path, acquisition_order=ORDER, order_source="TS.mdoc")
    assert read.layout == "prior-own" and read.lines.tolist() == [3, 4, 5, 6, 7]
    np.testing.assert_allclose(read.accumulated_e_per_angst2, ACCUMULATED)


def test_tilt_column_that_disagrees_with_the_tilt_angles_is_refused(tmp_path):
    path = dose.write_tilt_dose(tmp_path / "d.txt", ANGLES[::-1] + 1.0, ACCUMULATED)
    with pytest.raises(InputError, match=r"line 4: -2 in the first column .* nor the tilt angle of that image in "
                                         r"TS.tlt \(3°\)"):
        dose.read_dose_list(path, tilt_angles_deg=ANGLES, tilt_source="TS.tlt")


def test_a_negative_prior_dose_is_named_by_its_line_not_taken_for_a_tilt_angle(tmp_path):
    """A (prior, own) list with one negative prior: the message names that line and both readings of the column."""
    pre = ACCUMULATED - 3.0
    pre[2] = -5.0
    path = _write(tmp_path, "prior own\n" + "".join(f"{p} 3.0\n" for p in pre))
    with pytest.raises(InputError, match=rf"line 4: -5 in the first column is neither a prior dose .* nor the tilt "
                                         rf"angle of that image in TS.tlt \({ANGLES[2]:g}°\)"):
        dose.read_dose_list(path, tilt_angles_deg=ANGLES, tilt_source="TS.tlt")


@pytest.mark.parametrize(("text", "fragment"), [
    ("0 3\n3 3\nnan 3\n", "line 3: dose is not a finite number"),
    ("0 3\n3 -3\n", r"line 2: dose -3 e/A\^2 is negative"),
    ("-100 3\n3 3\n", "negative values in the first column that are not tilt angles"),
    ("3\n6\n", "one column: accumulated dose or each tilt's own dose"),
    ("1 2 3\n", "expected 1 or 2 columns"),
])
def test_bad_dose_lists_are_refused_with_file_and_line(tmp_path, text, fragment):
    path = _write(tmp_path, text)
    with pytest.raises(InputError, match=fragment) as error:
        dose.read_dose_list(path)
    assert str(path) in str(error.value)


def test_dose_that_falls_in_acquisition_order_is_refused(tmp_path):
    path = _write(tmp_path, "".join(f"{a}\n" for a in ACCUMULATED[::-1]))
    with pytest.raises(InputError, match="below that of the tilt acquired before it.*order from TS.mdoc"):
        dose.read_dose_list(path, "accumulated", acquisition_order=ORDER, order_source="TS.mdoc")


def test_one_column_layouts_when_told(tmp_path):
    accumulated = dose.read_dose_list(_write(tmp_path, "".join(f"{a}\n" for a in ACCUMULATED)), "accumulated")
    np.testing.assert_allclose(accumulated.accumulated_e_per_angst2, ACCUMULATED)
    own_path = _write(tmp_path, "3\n3\n3\n3\n3\n", "own.txt")
    own = dose.read_dose_list(own_path, "own", acquisition_order=ORDER)
    np.testing.assert_allclose(own.accumulated_e_per_angst2, ACCUMULATED)
    with pytest.raises(InputError, match="needs the acquisition order"):
        dose.read_dose_list(own_path, "own")
    with pytest.raises(InputError, match="layout prior-own has 2 column"):
        dose.read_dose_list(own_path, "prior-own")


def _mdoc(tmp_path, sections):
    return serialem.write_mdoc(tmp_path / "TS.mrc.mdoc", {"PixelSpacing": 4.0, "Voltage": 300.0}, sections)


def test_mdoc_tilts_give_dose_order_and_optics(tmp_path):
    sections = [{"ZValue": z, "TiltAngle": a, "ExposureDose": 3.0, "PriorRecordDose": 3.0 * int(ORDER[z]),
                 "DateTime": f"01-Jan-24  10:0{int(ORDER[z])}:00"} for z, a in enumerate(ANGLES)]
    tilts = serialem.read_mdoc_tilts(_mdoc(tmp_path, sections))
    np.testing.assert_array_equal(tilts["acquisition_order"], ORDER)
    np.testing.assert_allclose(tilts["accumulated_dose_e_per_angst2"], ACCUMULATED)
    assert (tilts["pixel_size_angst"], tilts["voltage_kv"]) == (4.0, 300.0) and "DateTime" in tilts["order_source"]
    for section in sections:
        section.pop("PriorRecordDose")
    summed = serialem.read_mdoc_tilts(_mdoc(tmp_path, sections))
    np.testing.assert_allclose(summed["accumulated_dose_e_per_angst2"], ACCUMULATED)
    for section in sections:
        section["ExposureDose"] = 0.0  # SerialEM without a dose calibration: no dose, not a zero dose
    assert serialem.read_mdoc_tilts(_mdoc(tmp_path, sections))["accumulated_dose_e_per_angst2"] is None
    for section in sections:
        section.pop("ExposureDose")
    assert serialem.read_mdoc_tilts(_mdoc(tmp_path, sections))["accumulated_dose_e_per_angst2"] is None


def test_an_mdoc_of_a_sorted_stack_without_datetime_takes_the_acquisition_order_from_prior_record_dose(tmp_path):
    """Sections in stack (angle) order without DateTime: PriorRecordDose gives the order, not the section order
    (which refused the dose as 'below that of the tilt acquired before it')."""
    sections = [{"ZValue": z, "TiltAngle": a, "ExposureDose": 3.0, "PriorRecordDose": 3.0 * int(ORDER[z])}
                for z, a in enumerate(ANGLES)]
    tilts = serialem.read_mdoc_tilts(_mdoc(tmp_path, sections))
    np.testing.assert_array_equal(tilts["acquisition_order"], ORDER)
    np.testing.assert_allclose(tilts["accumulated_dose_e_per_angst2"], ACCUMULATED)
    assert "PriorRecordDose (no DateTime)" in tilts["order_source"]


@pytest.mark.parametrize(("change", "fragment"), [
    ({"ExposureDose": -3.0}, r"ExposureDose, entry 3: dose -3 e/A\^2 is negative"),
    ({"TiltAngle": "nan"}, "tilt angle is not a finite number"),
    ({"ZValue": 7}, "ZValue sections must be 0..4 once each"),
])
def test_mdoc_tilts_refuse_bad_values(tmp_path, change, fragment):
    sections = [{"ZValue": z, "TiltAngle": a, "ExposureDose": 3.0} for z, a in enumerate(ANGLES)]
    sections[2].update(change)
    with pytest.raises(InputError, match=fragment):
        serialem.read_mdoc_tilts(_mdoc(tmp_path, sections))
