"""Text-exact STAR I/O (``mspecies.formats.star``): the C-parser path keeps every carried value as the file's
string, float columns parse to the same numbers, the writer's vectorised ``%.6f`` equals Python's text."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mspecies.common.types import InputError
from mspecies.formats.star import StarBlock, _fixed_matrix, read_star_text, write_star_text

ODD = """
# written by hand
data_optics

loop_
_rlnOpticsGroup #1
_rlnVoltage #2
	1	300.000
# version 30001

data_particles

loop_
_rlnMicrographName #1
_rlnCoordinateX #2
_rlnClassNumber #3
_rlnLogLikeliContribution #4
  TS_01.tomostar   1.5   nan   2.664582e+07
TS_02	-0.000	None	1e-3

"""


def test_c_parser_keeps_every_carried_value_as_written(tmp_path):
    (tmp_path / "a.star").write_text(ODD)
    blocks, comments = read_star_text(tmp_path / "a.star")
    particles = blocks["particles"].table
    assert particles.to_dict("list") == {"rlnMicrographName": ["TS_01.tomostar", "TS_02"],
                                         "rlnCoordinateX": ["1.5", "-0.000"], "rlnClassNumber": ["nan", "None"],
                                         "rlnLogLikeliContribution": ["2.664582e+07", "1e-3"]}
    assert blocks["optics"].table.to_dict("list") == {"rlnOpticsGroup": ["1"], "rlnVoltage": ["300.000"]}
    assert comments == ["# written by hand", "# version 30001"]
    floats, _ = read_star_text(tmp_path / "a.star", lambda headers: {"particles": {"rlnCoordinateX"}})
    assert floats["particles"].table["rlnCoordinateX"].tolist() == [1.5, -0.0]
    assert floats["particles"].table["rlnClassNumber"].tolist() == ["nan", "None"]


def test_quoted_values_and_bad_rows_take_the_python_tokenizer(tmp_path):
    (tmp_path / "q.star").write_text('data_\nloop_\n_a\n_b\n"x y" 1\n\'z\' 2\n')
    assert read_star_text(tmp_path / "q.star")[0][""].table.to_dict("list") == {"a": ["x y", "z"], "b": ["1", "2"]}
    (tmp_path / "d.star").write_text('data_\nloop_\n_a\n_b\n"x y" 1\n"" 2\n')  # double quotes only: C parser
    assert read_star_text(tmp_path / "d.star")[0][""].table.to_dict("list") == {"a": ["x y", ""], "b": ["1", "2"]}
    (tmp_path / "b.star").write_text("data_\nloop_\n_a\n_b\n1 2\n3\n")
    with pytest.raises(InputError, match=r"b.star: line 6: 1 values for 2 columns"):
        read_star_text(tmp_path / "b.star")
    (tmp_path / "c.star").write_text("data_\nloop_\n_a\n_b\n1 2\n3 abc\n")
    with pytest.raises(ValueError):  # not a float: the caller's numeric check names column and row
        pd.to_numeric(read_star_text(tmp_path / "c.star", lambda h: {"": {"b"}})[0][""].table["b"])


def test_written_text_reads_back_identically(tmp_path):
    table = pd.DataFrame({"name": ["a", "b c", ""], "x": [1.0, -2.5, np.nan], "n": [1, -2, 3]})
    write_star_text(tmp_path / "w.star", [StarBlock("particles", table)])
    back = read_star_text(tmp_path / "w.star")[0]["particles"].table
    assert back.to_dict("list") == {"name": ["a", "b c", ""], "x": ["1.000000", "-2.500000", "nan"],
                                    "n": ["1", "-2", "3"]}


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(allow_nan=True, allow_infinity=True, width=64), min_size=1, max_size=50))
def test_vectorised_fixed_point_text_equals_python(values):
    matrix = _fixed_matrix(np.array(values, dtype=np.float64))
    assert [row[row != 0].tobytes().decode() for row in matrix] == [f"{v:.6f}" for v in values]


def test_fixed_point_text_on_halves_and_roundings():
    values = np.array([0.0, -0.0, -1e-9, 1 / 128, 0.0000005, 0.0000015, 0.9999995, 2.5e-7, 123.4565, 9.9999995e6,
                       1e7, 2.664582e7, 1e300, -1e-300] + list(np.random.default_rng(0).uniform(-1e4, 1e4, 5000)))
    matrix = _fixed_matrix(values)
    assert [row[row != 0].tobytes().decode() for row in matrix] == [f"{v:.6f}" for v in values]


def test_a_file_without_data_block_is_not_a_star_file(tmp_path):
    (tmp_path / "t.star").write_text("# nothing here\n_rlnX 1\n")
    with pytest.raises(InputError, match=r"t.star: no data_ block: not a STAR file"):
        read_star_text(tmp_path / "t.star")
    (tmp_path / "b.star").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(InputError, match=r"b.star is not a text file \(undecodable byte at offset \d+\)"):
        read_star_text(tmp_path / "b.star")
