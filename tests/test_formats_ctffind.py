"""CTFFIND 4/5 output: defocus per tilt in stack order and the optics of its header."""

import numpy as np
import pytest

from mspecies.common.types import InputError
from mspecies.formats import coordinates, ctffind

# The header CTFFIND 4.1.14 writes (one micrograph), as in its own output files.
HEADER = """# Output from CTFFind version 4.1.14, run on 2023-02-02 15:13:07
# Input file: test_img.mrc ; Number of micrographs: 3
# Pixel size: 1.000 Angstroms ; acceleration voltage: 200.0 keV ; spherical aberration: 2.26 mm ; amplitude contrast: 0.07
# Box size: 1024 pixels ; min. res.: 30.0 Angstroms ; max. res.: 5.0 Angstroms ; min. def.: 5000.0 um; max. def. 50000.0 um
# Columns: #1 - micrograph number; #2 - defocus 1 [Angstroms]; #3 - defocus 2; #4 - azimuth of astigmatism; #5 - additional phase shift [radians]; #6 - cross correlation; #7 - spacing (in Angstroms) up to which CTF rings were fit successfully
"""  # noqa: E501
ROW = "1 30000 30000 0 0 0.5 6\n"


def test_ctffind4_header_gives_the_optics_and_rows_are_sorted_by_micrograph(tmp_path):
    path = tmp_path / "TS_ctffind.txt"
    path.write_text(HEADER + "2.000000 21000.0 20000.0 10.0 0.5 0.5 6.0\n1.000000 9982.5 9980.0 0.0 0.0 0.56 1.98\n"
                    "3.000000 31000.0 30500.0 -20.0 0.0 0.4 7.0\n")
    fit = ctffind.read_ctffind(path)
    assert (fit.pixel_size_angst, fit.voltage_kv, fit.cs_mm, fit.amplitude_contrast) == (1.0, 200.0, 2.26, 0.07)
    np.testing.assert_allclose(fit.defocus_u_angst, [9982.5, 21000.0, 31000.0])
    np.testing.assert_allclose(fit.phase_shift_deg, [0.0, np.rad2deg(0.5), 0.0])
    np.testing.assert_array_equal(fit.lines, [7, 6, 8])


def test_ctffind5_extra_columns_are_read_past_and_a_headerless_file_has_no_optics(tmp_path):
    path = tmp_path / "c5.txt"
    path.write_text("1 30000 29000 5 0 0.3 6 85.1 10.2 1500\n2 31000 30000 5 0 0.3 6 85.1 10.2 1500\n")
    fit = ctffind.read_ctffind(path)
    assert fit.n_tilts == 2 and fit.voltage_kv is None and fit.pixel_size_angst is None


@pytest.mark.parametrize(("header", "rows", "fragment"), [
    (HEADER.replace("200.0 keV", "200000.0 keV"), ROW, "header: voltage 200000 looks like volts"),
    (HEADER.replace("amplitude contrast: 0.07", "amplitude contrast: 7"), ROW, "percentage"),
    (HEADER, ROW + ROW.replace("1 ", "3 ", 1), "line 7: micrograph number 3; expected each of 1..2"),
])
def test_bad_ctffind_files_are_refused(tmp_path, header, rows, fragment):
    path = tmp_path / "c.txt"
    path.write_text(header + rows)
    with pytest.raises(InputError, match=fragment):
        ctffind.read_ctffind(path)


def test_text_coordinates_with_and_without_angles(tmp_path):
    path = coordinates.write_coordinates(tmp_path / "p.txt", [[1.5, 2.0, 3.0]], [[10.0, 20.0, 30.0]])
    read = coordinates.read_coordinates(path)
    assert read.has_angles and read.lines.tolist() == [2]
    np.testing.assert_allclose(read.coordinates_px, [[1.5, 2.0, 3.0]])
    np.testing.assert_allclose(read.euler_zyz_deg, [[10.0, 20.0, 30.0]])
    plain = tmp_path / "q.txt"
    plain.write_text("# picked in 3dmod\n4 5 6\n7 8 9\n")
    read = coordinates.read_coordinates(plain)
    assert not read.has_angles and read.euler_zyz_deg.shape == (2, 3) and not read.euler_zyz_deg.any()
    for text, fragment in (("1 2\n", "line 1: expected 3 columns"), ("1 2 3\n4 5\n", "line 2: expected 3 columns"),
                           ("1 2 nan\n", "line 1: coordinate is not a finite number")):
        plain.write_text(text)
        with pytest.raises(InputError, match=fragment):
            coordinates.read_coordinates(plain)
