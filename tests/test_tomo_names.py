"""Tolerant tomogram-name matching: normalisation, ambiguity, collisions, user mappings."""

import numpy as np
import pytest

from mspecies.common.types import InputError
from mspecies.formats.tomo_names import match_tomo_names, normalise_tomo_name, parse_name_mapping


@pytest.mark.parametrize(("name", "expected"), [
    ("TS_01", "TS_01"), ("/data/Tomograms/TS_01.mrc", "TS_01"), ("TS_01.tomostar", "TS_01"),
    ("TS_01.tomostar.mrc", "TS_01"), ("TS_01_10.00Apx.mrc", "TS_01"), ("TS_01_rec.mrc", "TS_01"),
    ("TS_01_bin4.rec", "TS_01"), ("TS_01.st", "TS_01"), ("TS_01.mrcs", "TS_01"), (r"C:\x\TS_01.mrc", "TS_01"),
    ("rec", "rec"),
])
def test_normalise(name, expected):
    assert normalise_tomo_name(name) == expected


def test_match_report_counts_methods_and_unmatched():
    names = ["TS_01.tomostar"] * 3 + ["ts_02.mrc"] * 2 + ["TS_03"] + ["other"]
    report = match_tomo_names(names, ["TS_01", "TS_02", "TS_03", "TS_04"])
    assert report.matches == {"TS_01.tomostar": "TS_01", "ts_02.mrc": "TS_02", "TS_03": "TS_03"}
    assert report.methods == {"TS_01.tomostar": "normalised", "ts_02.mrc": "case-insensitive", "TS_03": "exact"}
    assert report.unmatched == ("other",) and report.n_unmatched_particles == 1
    assert report.particles_per_ts_id == {"TS_01": 3, "TS_02": 2, "TS_03": 1}
    assert report.unused_ts_ids == ("TS_04",)
    assert report.ok
    assert report.summary_lines()[0] == "TS_01: 3 particle(s) from ['TS_01.tomostar']"
    np.testing.assert_array_equal(report.ts_ids_for(["ts_02.mrc", "other"]), np.array(["TS_02", None], dtype=object))


def test_ambiguous_and_duplicated_names_need_a_mapping():
    report = match_tomo_names(["TS_1.mrc", "TS_2.tomostar", "ts_2.mrc"], ["TS_1", "TS_1.st", "TS_2"])
    assert report.ambiguous == {"TS_1.mrc": ("TS_1", "TS_1.st")}
    assert report.collisions == {"TS_2": ("TS_2.tomostar", "ts_2.mrc")}
    with pytest.raises(InputError, match="ambiguous: 'TS_1.mrc' could be any of"):
        report.raise_if_ambiguous()
    settled = match_tomo_names(["TS_1.mrc", "TS_2.tomostar", "ts_2.mrc"], ["TS_1", "TS_1.st", "TS_2"],
                               "TS_1.mrc=TS_1.st, TS_2.tomostar=TS_2; ts_2.mrc=TS_2")
    assert settled.ok and settled.matches["TS_1.mrc"] == "TS_1.st"
    assert set(settled.methods.values()) == {"mapping"}


def test_parse_mapping_errors():
    assert parse_name_mapping("a=b,\n c = d ;") == {"a": "b", "c": "d"}
    with pytest.raises(InputError, match="expected 'star_name=ts_id'"):
        parse_name_mapping("a=b, c")
    with pytest.raises(InputError, match="mapped to both"):
        parse_name_mapping("a=b, a=c")
    with pytest.raises(InputError, match="not among the tilt series"):
        match_tomo_names(["a"], ["TS_01"], {"a": "TS_99"})


def test_numeric_warp_names_match_the_ts_ids_scipion_gives_them():
    """Scipion's importers prefix a ts id that starts with a digit with ``TS_`` (tomo normalizeTSId)."""
    from mspecies.formats.tomo_names import scipion_ts_id

    assert scipion_ts_id("/a/b/0243_12.23Apx.mrc") == "TS_0243"
    assert scipion_ts_id("021.tomostar") == "TS_021"
    assert scipion_ts_id("tomo-ts01.mrc_15.00Apx.mrc") == "tomo_ts01"
    report = match_tomo_names(["0243_12.23Apx.mrc", "1006", "TS_01.tomostar"], ["TS_0243", "TS_1006", "TS_01"])
    assert report.matches == {"0243_12.23Apx.mrc": "TS_0243", "1006": "TS_1006", "TS_01.tomostar": "TS_01"}
    assert report.methods["1006"] == "Scipion ts id"
