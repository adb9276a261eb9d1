"""AreTomo .aln: read as AreTomo itself converts it to IMOD .xf, 0-based (AreTomo ≤ 2) and 1-based (AreTomo3)
sections, excluded views; checked against a real AreTomo output pair (.aln + the .xf AreTomo wrote next to it).

Sources of the format: AreTomo3 ``AreTomo/MrcUtil/CSaveAlignFile.cpp`` (writer), ``CLoadAlignFile.cpp`` (reader;
``mToOneBased``: older files are 0-based) and AreTomo2 ``ImodUtil/CSaveXF.cpp`` (``.aln`` → ``.xf``).
Real files: ``../shared/aretomo/TS_121.aln`` and ``TS_121.xf`` from teamtomo/lil-aretomo (see the README there).
"""

from pathlib import Path

import numpy as np
import pytest

from mspecies.common.types import InputError
from mspecies.formats import aretomo, imod
from mspecies.tests.corpus import shared_dir

# ../shared beside the repository (MSPECIES_SHARED overrides, e.g. for a git worktree elsewhere)
SHARED = shared_dir("aretomo") or Path("../shared/aretomo")


def _row(section: int, rot: float, tx: float, ty: float, tilt: float) -> str:
    """One global row exactly as AreTomo3's CSaveAlignFile::mSaveGlobal prints it."""
    return f"{section:5d}  {rot:9.4f}  {1.0:9.5f}  {tx:9.3f}  {ty:9.3f}  {1.0:7.2f}  {1.0:7.2f}  {1.0:7.2f}  " \
           f"{0.0:7.2f}  {tilt:8.2f}\n"


def test_real_aretomo_aln_gives_the_xf_aretomo_wrote():
    aln_path, xf_path = SHARED / "TS_121.aln", SHARED / "TS_121.xf"
    if not aln_path.is_file():
        pytest.skip(f"{aln_path} absent (real AreTomo output, kept in ../shared)")
    aln = aretomo.read_aln(aln_path)
    written = imod.read_xf(xf_path)
    assert aln.zero_based and aln.n_tilts == 31 and not aln.excluded.any()
    np.testing.assert_allclose(aln.xf[:, :, :2], written[:, :, :2], atol=5e-4)  # .xf prints 3 decimals
    # shifts: the .xf prints 2 decimals (5e-3) and the .aln rounds TX, TY to 5e-4 px and ROT to 5e-5° (1e-4 px here)
    np.testing.assert_allclose(aln.xf[:, :, 2], written[:, :, 2], atol=6e-3)
    np.testing.assert_allclose(aln.tilt_angles_deg, np.arange(-42.0, 49.0, 3.0))


def test_aretomo3_file_is_one_based_sorted_by_tilt_with_dark_frames_excluded(tmp_path):
    path = tmp_path / "TS.aln"
    path.write_text("# AreTomo Alignment / Priims bprmMn\n# RawSize = 64 48 4\n# NumPatches = 0\n"
                    "# DarkFrame =     3    2    60.00\n# AlphaOffset =     0.00\n# BetaOffset =     0.00\n"
                    "# Thickness = 100\n" + aretomo.HEADER + "\n"
                    + _row(4, 85.0, 1.0, 2.0, -30.0) + _row(3, 85.5, 0.0, 0.0, 0.0) + _row(1, 86.0, -1.0, 3.0, 30.0)
                    + "# Local Alignment\n   0   0   -10.00     -5.00      0.10      0.20   1.0\n")
    aln = aretomo.read_aln(path)
    assert not aln.zero_based and aln.raw_size_xyz == (64, 48, 4)
    np.testing.assert_array_equal(aln.excluded, [False, True, False, False])
    np.testing.assert_allclose(aln.tilt_angles_deg, [30.0, 60.0, 0.0, -30.0])
    np.testing.assert_allclose(aln.xf[1], [[1, 0, 0], [0, 1, 0]])
    expected = aretomo.aln_to_xf(np.array([85.0]), np.array([[1.0, 2.0]]))[0]
    np.testing.assert_allclose(aln.xf[3], expected)
    np.testing.assert_array_equal(aln.lines[[0, 2, 3]], [11, 10, 9])


def test_xf_to_aln_and_back_is_exact_for_rotations(tmp_path):
    rng = np.random.default_rng(4)
    rot = rng.uniform(-180, 180, 6)
    xf = aretomo.aln_to_xf(rot, rng.normal(0, 20, (6, 2)))
    angles = np.linspace(-45, 45, 6)
    excluded = np.array([False, False, True, False, False, False])
    aln = aretomo.read_aln(aretomo.write_aln(tmp_path / "a.aln", xf, angles, (100, 80, 6), excluded))
    np.testing.assert_allclose(aln.xf[~excluded], xf[~excluded], atol=2e-5)
    np.testing.assert_allclose(aln.tilt_angles_deg, angles, atol=1e-6)
    np.testing.assert_array_equal(aln.excluded, excluded)
    with pytest.raises(InputError, match="rotations only"):
        aretomo.xf_to_aln(xf * 1.1)


@pytest.mark.parametrize(("body", "fragment"), [
    ("# RawSize = 64 48 2\n" + aretomo.HEADER + "\n" + _row(3, 85.0, 0, 0, 0), "line 3: section 3 is outside"),
    (aretomo.HEADER + "\n" + _row(1, 85.0, 0, 0, 0) + _row(1, 85.0, 0, 0, 3), r"section\(s\) \[0\] have more"),
    (aretomo.HEADER + "\n" + _row(1, 85.0, 0, 0, 0).replace("0.00\n", "nan\n"), "not a finite number"),
    (aretomo.HEADER + "\n", "no global alignment rows"),
    (aretomo.HEADER + "\n    1  85.0  1.0  0.0\n", "line 2: expected 10 columns"),
])
def test_bad_aln_files_are_refused_with_file_and_line(tmp_path, body, fragment):
    path = tmp_path / "bad.aln"
    path.write_text(body)
    with pytest.raises(InputError, match=fragment) as error:
        aretomo.read_aln(path)
    assert str(path) in str(error.value)
