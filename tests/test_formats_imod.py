"""Round trips and error messages of the IMOD / SerialEM / CTFFIND / dose / MRC / STAR readers and writers."""

import numpy as np
import pandas as pd
import pytest

from mspecies.common.types import InputError
from mspecies.formats import ctffind, dose, imod, serialem
from mspecies.formats.mrc import read_mrc, write_mrc
from mspecies.formats.star import read_relion31_particles, write_relion31_particles

RNG = np.random.default_rng(0)


def test_tlt_round_trip(tmp_path):
    angles = np.linspace(-60, 60, 41)
    np.testing.assert_allclose(imod.read_tlt(imod.write_tlt(tmp_path / "a.tlt", angles)), angles, atol=1e-4)


def test_xf_round_trip_keeps_matrix_layout(tmp_path):
    xf = RNG.normal(size=(5, 2, 3))
    path = imod.write_xf(tmp_path / "a.xf", xf)
    first = path.read_text().split("\n")[0].split()
    np.testing.assert_allclose([float(v) for v in first], [xf[0, 0, 0], xf[0, 0, 1], xf[0, 1, 0], xf[0, 1, 1],
                                                           xf[0, 0, 2], xf[0, 1, 2]], atol=1e-3)
    np.testing.assert_allclose(imod.read_xf(path), xf, atol=1e-3)


def test_imod_defocus_version3_round_trip_in_angstrom(tmp_path):
    angles = np.linspace(-30, 30, 7)
    u, v, ang = RNG.uniform(2e4, 4e4, 7), RNG.uniform(2e4, 4e4, 7), RNG.uniform(-90, 90, 7)
    path = imod.write_imod_defocus(tmp_path / "a.defocus", angles, u, v, ang)
    assert path.read_text().split("\n")[0].split() == ["1", "0", "0.0", "0.0", "0.0", "3"]
    out = imod.read_imod_defocus(path)
    np.testing.assert_allclose(out["defocus_u_angst"], u, atol=0.1)
    np.testing.assert_allclose(out["defocus_v_angst"], v, atol=0.1)
    np.testing.assert_allclose(out["defocus_angle_deg"], ang, atol=0.01)
    np.testing.assert_allclose(out["tilt_angles_deg"], angles, atol=0.01)


def test_imod_defocus_version2_view_ranges_are_expanded(tmp_path):
    path = tmp_path / "old.defocus"
    path.write_text("1 2 -3.0 0.0 3000.0 2\n3 3 3.0 3.0 3100.0\n")
    out = imod.read_imod_defocus(path)
    np.testing.assert_allclose(out["defocus_u_angst"], [30000, 30000, 31000])
    np.testing.assert_allclose(out["defocus_v_angst"], out["defocus_u_angst"])
    np.testing.assert_allclose(out["tilt_angles_deg"], [-3.0, 0.0, 3.0])


def test_ctffind_round_trip(tmp_path):
    u, v, ang = RNG.uniform(2e4, 4e4, 4), RNG.uniform(2e4, 4e4, 4), RNG.uniform(-90, 90, 4)
    out = ctffind.read_ctffind(ctffind.write_ctffind(tmp_path / "c.txt", u, v, ang, pixel_size_angst=1.35,
                                                     voltage_kv=300.0, cs_mm=2.7, amplitude_contrast=0.1))
    np.testing.assert_allclose(out.defocus_u_angst, u, atol=1e-5)
    np.testing.assert_allclose(out.defocus_v_angst, v, atol=1e-5)
    np.testing.assert_allclose(out.defocus_angle_deg, ang, atol=1e-5)
    assert (out.pixel_size_angst, out.voltage_kv, out.cs_mm, out.amplitude_contrast) == (1.35, 300.0, 2.7, 0.1)


def test_dose_round_trip_gives_accumulated_dose_including_the_tilt(tmp_path):
    out = dose.read_dose_list(dose.write_dose_list(tmp_path / "d.txt", [3.0, 0.0, 6.0], 3.0))
    np.testing.assert_allclose(out.accumulated_e_per_angst2, [6.0, 3.0, 9.0])
    assert out.layout == "prior-own"


def test_mdoc_round_trip(tmp_path):
    header = {"PixelSpacing": 4.0, "Voltage": 300.0, "ImageFile": "TS_01.mrc", "ImageSize": [512, 256]}
    sections = [{"ZValue": i, "TiltAngle": a, "DateTime": f"01-Jan-24  10:0{i}:00", "SubFramePath": f"X:\\f\\{i}.tif"}
                for i, a in enumerate([-3.0, 0.0, 3.5])]
    out = serialem.read_mdoc(serialem.write_mdoc(tmp_path / "a.mrc.mdoc", header, sections,
                                                 ["Tilt axis angle = 85.0"]))
    assert out["header"] == {"PixelSpacing": 4.0, "Voltage": 300.0, "ImageFile": "TS_01.mrc", "ImageSize": [512, 256]}
    assert out["titles"] == ["Tilt axis angle = 85.0"]
    assert out["sections"] == sections


def test_mrc_round_trip_keeps_pixel_size_and_float32(tmp_path):
    data = RNG.normal(size=(3, 8, 10)).astype(np.float64)
    array, pixel = read_mrc(write_mrc(tmp_path / "a.mrc", data, 3.25))
    assert array.dtype == np.float32 and array.shape == (3, 8, 10)
    assert pixel == pytest.approx(3.25)
    np.testing.assert_allclose(array, data.astype(np.float32))
    mapped, _ = read_mrc(tmp_path / "a.mrc", mmap=True)
    np.testing.assert_array_equal(mapped, array)


def test_star_round_trip_with_optics(tmp_path):
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnImagePixelSize": [4.0]})
    particles = pd.DataFrame({"rlnTomoName": ["TS_01"], "rlnCoordinateX": [1.5], "rlnOpticsGroup": [1]})
    o, p = read_relion31_particles(write_relion31_particles(tmp_path / "p.star", optics, particles))
    assert o["rlnImagePixelSize"].iloc[0] == 4.0 and p["rlnCoordinateX"].iloc[0] == 1.5


@pytest.mark.parametrize(("reader", "text", "fragment"), [
    (imod.read_xf, "1 0 0 1 2\n", "line 1: expected 6 columns"),
    (imod.read_tlt, "0.0\nabc\n", "line 2: non-numeric"),
    (dose.read_dose_list, "1 2 3\n", "line 1: expected 1 or 2 columns"),
    (ctffind.read_ctffind, "# c\n1 2 3\n", "line 2: expected 7 or 8 or 9 or 10 columns"),
    (imod.read_imod_defocus, "1 0 0.0 0.0 0.0 3\n1 1 0.0 0.0 3000\n", "line 2: expected 7 columns"),
    (serialem.read_mdoc, "PixelSpacing 4\n", "line 1: expected 'key = value'"),
])
def test_readers_name_file_and_line_on_bad_content(tmp_path, reader, text, fragment):
    path = tmp_path / "bad.txt"
    path.write_text(text)
    with pytest.raises(InputError, match=fragment) as error:
        reader(path)
    assert str(path) in str(error.value)


@pytest.mark.parametrize("reader", [imod.read_tlt, imod.read_xf, imod.read_imod_defocus, ctffind.read_ctffind,
                                    dose.read_dose_list, serialem.read_mdoc, read_mrc])
def test_readers_report_missing_file(tmp_path, reader):
    with pytest.raises(InputError, match="not found"):
        reader(tmp_path / "missing.file")
