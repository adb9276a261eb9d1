"""Particle STAR dialects: detection, round trips, origin semantics, bad input, speed, and RELION reading our files."""

import subprocess
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from _relion import require_relion
from hypothesis import given, settings
from hypothesis import strategies as st

from mspecies.cli import main
from mspecies.common.types import InputError, Microscope
from mspecies.core.geometry import euler_to_matrix
from mspecies.formats.star import StarBlock, read_star_text, write_star_text
from mspecies.formats.star_dialects import Dialect, PositionFrame, read_particle_star
from mspecies.formats.star_write import write_particle_star

PIXEL = 2.5
SHAPE = (400, 380, 151)  # odd nz: centre index 75
SHAPES = {"TS_01": SHAPE, "TS_02": (512, 512, 200)}
ALL = list(Dialect)
SCOPE = Microscope(300.0, 2.7, 0.07)


def _base(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    names = np.array(["TS_01", "TS_02"], dtype=object)[rng.integers(0, 2, n)]
    centre_px = np.array([[s // 2 for s in SHAPES[name]] for name in names], dtype=float)
    return {"names": names, "corner_px": centre_px + rng.uniform(-60, 60, (n, 3)),
            "origins_angst": rng.uniform(-20, 20, (n, 3)), "angles": rng.uniform(-180, 180, (n, 3)),
            "subset": rng.integers(1, 3, n), "extra": rng.normal(size=n)}


def _angles(frame: dict, data: dict, names: tuple[str, str, str]) -> None:
    frame.update({c: data["angles"][:, k] for k, c in enumerate(names)})


def _optics(extra_columns: dict | None = None) -> pd.DataFrame:
    return pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"], "rlnImagePixelSize": [PIXEL],
                         "rlnVoltage": [300.0], "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.07],
                         "rlnImageDimensionality": [3], **(extra_columns or {})})


def write_example(path, dialect: Dialect, data: dict) -> None:
    """A file of ``dialect`` holding ``data`` (extra column ``myScore`` and a string extra with a space)."""
    n = len(data["names"])
    xyz = ("X", "Y", "Z")
    frame: dict = {"myScore": data["extra"], "myLabel": np.array(["a b"] * n, dtype=object)}
    if dialect in (Dialect.RELION30, Dialect.WARP3D):
        names = data["names"] + ".tomostar" if dialect == Dialect.WARP3D else data["names"]
        frame |= {"rlnMicrographName": names, **{f"rlnCoordinate{a}": data["corner_px"][:, k] for k, a in
                                                  enumerate(xyz)}}
        frame |= {f"rlnOrigin{a}": data["origins_angst"][:, k] / PIXEL for k, a in enumerate(xyz)}
        _angles(frame, data, ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"))
        frame |= {"rlnMagnification": np.full(n, 10000.0), "rlnDetectorPixelSize": np.full(n, PIXEL),
                  "rlnVoltage": np.full(n, 300.0), "rlnSphericalAberration": np.full(n, 2.7),
                  "rlnAmplitudeContrast": np.full(n, 0.07), "rlnRandomSubset": data["subset"]}
        if dialect == Dialect.WARP3D:
            frame["rlnPixelSize"] = np.full(n, PIXEL)
        blocks = [StarBlock("", pd.DataFrame(frame))]
    elif dialect == Dialect.M_SPECIES:
        corner_angst = data["corner_px"] * PIXEL - data["origins_angst"]
        frame |= {f"wrpCoordinate{a}1": corner_angst[:, k] for k, a in enumerate(xyz)}
        _angles(frame, data, ("wrpAngleRot1", "wrpAngleTilt1", "wrpAnglePsi1"))
        frame |= {"wrpRandomSubset": data["subset"], "wrpSourceName": data["names"] + ".tomostar",
                  "wrpSourceHash": np.array(["hash"] * n, dtype=object)}
        blocks = [StarBlock("", pd.DataFrame(frame))]
    else:
        if dialect == Dialect.RELION5:
            centred = (data["corner_px"] - [[s // 2 for s in SHAPES[m]] for m in data["names"]]) * PIXEL
            frame |= {f"rlnCenteredCoordinate{a}Angst": centred[:, k] for k, a in enumerate(xyz)}
        else:
            frame |= {f"rlnCoordinate{a}": data["corner_px"][:, k] for k, a in enumerate(xyz)}
        name_column = "rlnMicrographName" if dialect == Dialect.RELION31 else "rlnTomoName"
        frame |= {name_column: data["names"], "rlnOpticsGroup": np.ones(n, dtype=int),
                  "rlnRandomSubset": data["subset"]}
        frame |= {f"rlnOrigin{a}Angst": data["origins_angst"][:, k] for k, a in enumerate(xyz)}
        _angles(frame, data, ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"))
        tomo = {"rlnTomoTiltSeriesPixelSize": [PIXEL]} if dialect != Dialect.RELION31 else {}
        blocks = [StarBlock("optics", _optics(tomo)), StarBlock("particles", pd.DataFrame(frame))]
        if dialect == Dialect.RELION5:
            blocks.insert(0, StarBlock("general", pd.DataFrame({"rlnTomoSubTomosAre2DStacks": ["0"]}), False))
    write_star_text(path, blocks)


def expected_positions(data: dict) -> np.ndarray:
    centre = np.array([[s // 2 for s in SHAPES[m]] for m in data["names"]], dtype=float)
    return (data["corner_px"] - centre) * PIXEL - data["origins_angst"]


def read(path, dialect=None, **kwargs):
    kwargs.setdefault("tomo_shape_px", SHAPES)
    return read_particle_star(path, dialect, **kwargs)


def assert_same_particles(a, b, *, extras: bool = True) -> None:
    np.testing.assert_allclose(a.poses.positions_angst, b.poses.positions_angst, atol=1e-3)
    np.testing.assert_allclose(euler_to_matrix(a.poses.euler_zyz_deg), euler_to_matrix(b.poses.euler_zyz_deg),
                               atol=1e-6)
    assert [str(n).removesuffix(".tomostar") for n in a.poses.tomo_names] == \
        [str(n).removesuffix(".tomostar") for n in b.poses.tomo_names]
    np.testing.assert_array_equal(a.random_subset, b.random_subset)
    if extras:
        for column in ("myScore", "myLabel"):
            assert a.extras[column].tolist() == b.extras[column].tolist()


@pytest.mark.parametrize("dialect", ALL)
def test_detect_and_read_every_dialect(tmp_path, dialect):
    data = _base(40, np.random.default_rng(1))
    write_example(tmp_path / "a.star", dialect, data)
    table = read(tmp_path / "a.star", coord_pixel_size_angst=PIXEL if dialect == Dialect.M_SPECIES else None)
    assert table.dialect == dialect
    np.testing.assert_allclose(table.poses.positions_angst, expected_positions(data), atol=1e-4)
    np.testing.assert_allclose(table.poses.euler_zyz_deg, data["angles"], atol=1e-5)
    assert table.extras["myLabel"].tolist() == ["a b"] * 40
    np.testing.assert_array_equal(table.source_row, np.arange(40))


@pytest.mark.parametrize("dialect", ALL)
def test_read_write_read_is_exact(tmp_path, dialect):
    data = _base(50, np.random.default_rng(2))
    write_example(tmp_path / "a.star", dialect, data)
    pixel = PIXEL if dialect == Dialect.M_SPECIES else None
    first = read(tmp_path / "a.star", coord_pixel_size_angst=pixel)
    write_particle_star(first, tmp_path / "b.star")
    second = read(tmp_path / "b.star", coord_pixel_size_angst=pixel)
    assert second.dialect == dialect
    assert_same_particles(first, second)
    np.testing.assert_allclose(first.origins_angst, second.origins_angst, atol=1e-5)
    assert list(second.column_order) == list(first.column_order)


@pytest.mark.parametrize("source", ALL)
@pytest.mark.parametrize("target", ALL)
def test_dialect_a_to_b_to_a(tmp_path, source, target):
    data = _base(30, np.random.default_rng(3))
    write_example(tmp_path / "a.star", source, data)
    pixel = PIXEL if Dialect.M_SPECIES in (source, target) else None
    first = read(tmp_path / "a.star", coord_pixel_size_angst=pixel if source == Dialect.M_SPECIES else None)
    write_particle_star(first, tmp_path / "b.star", target, coord_pixel_size_angst=pixel, tomo_shape_px=SHAPES,
                        microscope=SCOPE)
    detected = read(tmp_path / "b.star", coord_pixel_size_angst=PIXEL if target == Dialect.M_SPECIES else None)
    # RELION 3.0 with Warp's .tomostar names is detected as a Warp 3D table (the same layout).
    assert detected.dialect == target or {detected.dialect, target} == {Dialect.RELION30, Dialect.WARP3D}
    middle = read(tmp_path / "b.star", target, coord_pixel_size_angst=PIXEL if target == Dialect.M_SPECIES else None)
    assert_same_particles(first, middle)
    write_particle_star(middle, tmp_path / "c.star", source, coord_pixel_size_angst=pixel, tomo_shape_px=SHAPES,
                        microscope=SCOPE)
    last = read(tmp_path / "c.star", source, coord_pixel_size_angst=pixel if source == Dialect.M_SPECIES else None)
    assert_same_particles(first, last)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(*[st.floats(-1e4, 1e4, allow_nan=False)] * 3, *[st.floats(-500, 500)] * 3,
                          *[st.floats(-720, 720)] * 3), min_size=1, max_size=20),
       st.sampled_from([Dialect.RELION30, Dialect.RELION31, Dialect.RELION4, Dialect.RELION5]))
def test_property_poses_and_origins_round_trip(tmp_path_factory, rows, dialect):
    values = np.array(rows, dtype=float)
    n = len(values)
    data = {"names": np.array(["TS_01"] * n, dtype=object), "corner_px": values[:, :3] / PIXEL + 200,
            "origins_angst": values[:, 3:6], "angles": values[:, 6:9], "subset": np.ones(n, dtype=int),
            "extra": np.zeros(n)}
    path = tmp_path_factory.mktemp("p") / "a.star"
    write_example(path, dialect, data)
    table = read(path)
    np.testing.assert_allclose(table.poses.positions_angst, expected_positions(data), atol=1e-3)
    for target in (Dialect.RELION30, Dialect.RELION5, Dialect.M_SPECIES):
        write_particle_star(table, path.with_name("b.star"), target, microscope=SCOPE)
        back = read(path.with_name("b.star"), coord_pixel_size_angst=PIXEL if target == Dialect.M_SPECIES else None)
        assert_same_particles(table, back)


def test_origin_semantics(tmp_path):
    optics = StarBlock("optics", _optics())
    angst = pd.DataFrame({"rlnMicrographName": ["TS_01"], "rlnCoordinateX": [100.0], "rlnCoordinateY": [190.0],
                          "rlnCoordinateZ": [75.0], "rlnOriginXAngst": [7.0], "rlnOpticsGroup": [1]})
    write_star_text(tmp_path / "a.star", [optics, StarBlock("particles", angst)])
    table = read(tmp_path / "a.star")
    np.testing.assert_allclose(table.poses.positions_angst[0], [100 * PIXEL - 200 * PIXEL - 7.0, 0, 0])
    px = pd.DataFrame({"rlnMicrographName": ["TS_01"], "rlnCoordinateX": [100.0], "rlnCoordinateY": [190.0],
                       "rlnCoordinateZ": [75.0], "rlnOriginX": [3.0], "rlnMagnification": [10000.0],
                       "rlnDetectorPixelSize": [PIXEL]})
    write_star_text(tmp_path / "b.star", [StarBlock("", px)])
    table = read(tmp_path / "b.star")
    assert table.dialect == Dialect.RELION30
    np.testing.assert_allclose(table.poses.positions_angst[0], [(100 - 200) * PIXEL - 3.0 * PIXEL, 0, 0])
    assert not table.has_angles


def test_100k_rows_round_trip_through_relion5_and_back(tmp_path):
    """Large files keep every row and position (speed is measured in benchmarks/star, not asserted here)."""
    data = _base(100_000, np.random.default_rng(4))
    write_example(tmp_path / "a.star", Dialect.RELION31, data)
    table = read(tmp_path / "a.star")
    write_particle_star(table, tmp_path / "b.star", Dialect.RELION5)
    write_particle_star(read(tmp_path / "b.star"), tmp_path / "c.star", Dialect.RELION31)
    back = read(tmp_path / "c.star")
    assert len(back) == 100_000
    np.testing.assert_allclose(back.poses.positions_angst, table.poses.positions_angst, atol=1e-3)


def _particles(tmp_path, frame: dict, optics: bool = True, name: str = "a.star"):
    blocks = ([StarBlock("optics", _optics())] if optics else []) + [StarBlock("particles", pd.DataFrame(frame))]
    write_star_text(tmp_path / name, blocks)
    return tmp_path / name


GOOD = {"rlnMicrographName": ["TS_01", "TS_01"], "rlnCoordinateX": [1.0, 2.0], "rlnCoordinateY": [1.0, 2.0],
        "rlnCoordinateZ": [1.0, 2.0], "rlnAngleRot": [0.0, 1.0], "rlnAngleTilt": [0.0, 1.0],
        "rlnAnglePsi": [0.0, 1.0], "rlnOpticsGroup": [1, 1]}


@pytest.mark.parametrize(("change", "optics", "message"), [
    ({"rlnCoordinateY": ["1.0", "abc"]}, True, "column rlnCoordinateY, row 2"),
    ({"rlnAngleTilt": None, "rlnAnglePsi": None}, True, "rlnAngleRot"),
    ({"rlnMagnification": [1e4, 1e4]}, True, "RELION 3.0 column"),
    ({"rlnOpticsGroup": None, "rlnImagePixelSize": [2.0, 2.0], "rlnMagnification": [1e4, 1e4],
      "rlnDetectorPixelSize": [2.0, 2.0], "rlnOriginX": [0.0, 0.0]}, False, "optics-table column"),
    ({"rlnOpticsGroup": [1, 5]}, True, "row 2: group 5"),
    ({}, False, "rlnOpticsGroup"),
])
def test_bad_input_names_column_and_row(tmp_path, change, optics, message):
    frame = {**GOOD, **change}
    frame = {k: v for k, v in frame.items() if v is not None}
    with pytest.raises(InputError, match=message):
        read(_particles(tmp_path, frame, optics))


def test_missing_pixel_size_and_tomo_size(tmp_path):
    frame = {k: v for k, v in GOOD.items() if k != "rlnOpticsGroup"}
    frame["rlnMicrographName"] = ["TS_01", "TS_01"]
    write_star_text(tmp_path / "a.star", [StarBlock("", pd.DataFrame(frame))])
    with pytest.raises(InputError, match="rlnDetectorPixelSize·1e4/rlnMagnification or rlnPixelSize"):
        read(tmp_path / "a.star")
    table = read(tmp_path / "a.star", coord_pixel_size_angst=2.0)
    assert table.coord_pixel_size_angst[0] == 2.0
    corner = read_particle_star(tmp_path / "a.star", coord_pixel_size_angst=2.0)  # no size: from the corner
    assert corner.frame == PositionFrame.CORNER and corner.tomo_shape_px is None
    np.testing.assert_allclose(corner.poses.positions_angst, table.poses.positions_angst +
                               np.array(SHAPE) // 2 * 2.0)
    write_particle_star(corner, tmp_path / "b.star", Dialect.RELION31, microscope=SCOPE)  # corner to corner
    with pytest.raises(InputError, match="tomogram size.*--tomo-size"):
        write_particle_star(corner, tmp_path / "c.star", Dialect.RELION5)
    write_example(tmp_path / "m.star", Dialect.M_SPECIES, _base(3, np.random.default_rng(0)))
    with pytest.raises(InputError, match="coordinate pixel size is missing"):
        read(tmp_path / "m.star")


def test_mixed_centred_and_corner_coordinates(tmp_path):
    data = _base(5, np.random.default_rng(5))
    write_example(tmp_path / "a.star", Dialect.RELION5, data)
    blocks, _ = read_star_text(tmp_path / "a.star")
    particles = blocks["particles"].table
    for k, a in enumerate("XYZ"):
        particles[f"rlnCoordinate{a}"] = data["corner_px"][:, k].astype(str)
    write_star_text(tmp_path / "b.star", list(blocks.values()))
    read(tmp_path / "b.star")  # consistent: accepted
    particles["rlnCoordinateX"] = (data["corner_px"][:, 0] + 3).astype(str)
    write_star_text(tmp_path / "c.star", list(blocks.values()))
    with pytest.raises(InputError, match="row 1: rlnCoordinateX/Y/Z and rlnCenteredCoordinate"):
        read(tmp_path / "c.star")


def test_optics_built_and_joined(tmp_path):
    data = _base(10, np.random.default_rng(6))
    write_example(tmp_path / "a.star", Dialect.RELION30, data)
    write_particle_star(read(tmp_path / "a.star"), tmp_path / "b.star", Dialect.RELION31)
    blocks, comments = read_star_text(tmp_path / "b.star")
    assert blocks["optics"].table["rlnVoltage"].tolist() == ["300.000000"]
    assert "rlnVoltage" not in blocks["particles"].table.columns
    assert "rlnMicrographName" in blocks["particles"].table.columns
    write_particle_star(read(tmp_path / "b.star"), tmp_path / "c.star", Dialect.RELION30)
    assert read_star_text(tmp_path / "c.star")[0][""].table["rlnAmplitudeContrast"].tolist() == ["0.070000"] * 10


def test_writer_requires_microscope_for_relion31(tmp_path):
    data = _base(4, np.random.default_rng(7))
    write_example(tmp_path / "a.star", Dialect.RELION4, data)
    blocks, _ = read_star_text(tmp_path / "a.star")
    blocks["optics"].table = blocks["optics"].table.drop(columns=["rlnVoltage"])
    write_star_text(tmp_path / "a.star", list(blocks.values()))
    table = read(tmp_path / "a.star")
    with pytest.raises(InputError, match="rlnVoltage"):
        write_particle_star(table, tmp_path / "b.star", Dialect.RELION31)
    write_particle_star(table, tmp_path / "b.star", Dialect.RELION31, microscope=Microscope(200.0, 2.0, 0.1))
    assert read_star_text(tmp_path / "b.star")[0]["optics"].table["rlnVoltage"].tolist() == ["200.000000"]


def test_written_back_in_its_own_layout_a_file_needs_no_microscope(tmp_path):
    """Warp-written 3.1 files lack rlnAmplitudeContrast: written back as 3.1 they keep exactly their optics."""
    write_example(tmp_path / "a.star", Dialect.RELION31, _base(4, np.random.default_rng(7)))
    blocks, _ = read_star_text(tmp_path / "a.star")
    blocks["optics"].table = blocks["optics"].table.drop(columns=["rlnAmplitudeContrast"])
    write_star_text(tmp_path / "a.star", list(blocks.values()))
    table = read(tmp_path / "a.star")
    write_particle_star(table, tmp_path / "b.star")
    assert list(read_star_text(tmp_path / "b.star")[0]["optics"].table.columns) == list(
        blocks["optics"].table.columns)
    with pytest.raises(InputError, match="rlnAmplitudeContrast"):
        write_particle_star(table, tmp_path / "c.star", Dialect.RELION30)


def test_cli_convert(tmp_path, capsys):
    data = _base(20, np.random.default_rng(8))
    write_example(tmp_path / "a.star", Dialect.RELION5, data)
    sizes = tmp_path / "sizes.txt"
    sizes.write_text("# name nx ny nz\nTS_01 400 380 151\nTS_02.mrc 512 512 200\n")
    assert main(["convert", str(tmp_path / "a.star"), "--to", "3.0", str(tmp_path / "b.star"),
                 "--tomo-sizes", str(sizes)]) == 0
    back = read(tmp_path / "b.star")
    np.testing.assert_allclose(back.poses.positions_angst, expected_positions(data), atol=1e-3)
    assert main(["convert", str(tmp_path / "a.star"), "--to", "3.0", str(tmp_path / "c.star")]) == 2
    assert "tomogram size" in capsys.readouterr().err
    frame = {**GOOD, "rlnCoordinateZ": ["1", "nan?"]}
    assert main(["convert", str(_particles(tmp_path, frame, name="bad.star")), "--to", "5",
                 str(tmp_path / "d.star"), "--tomo-size", "10", "10", "10"]) == 2
    assert "column rlnCoordinateZ, row 2" in capsys.readouterr().err


def _relion_counts(tmp_path, dialect: Dialect) -> None:
    program = require_relion("relion_star_handler")
    data = _base(6, np.random.default_rng(9))
    data["names"][:] = "TS_01"
    data["corner_px"][3] = data["corner_px"][2] + 0.05  # 0.125 Å from particle 2 (same shift): a duplicate
    data["origins_angst"][3] = data["origins_angst"][2]
    write_example(tmp_path / "a.star", Dialect.RELION31, data)
    ours = tmp_path / f"ours_{dialect}.star"
    table = read(tmp_path / "a.star")
    images = np.array([f"subtomo/TS_01_{i:07d}.mrc" for i in range(6)], dtype=object)
    write_particle_star(replace(table, image_names=images, ctf_image_names=images), ours, dialect)
    combined = tmp_path / "combined.star"
    run = subprocess.run([program, "--i", f"{ours} {ours}", "--o", str(combined), "--combine"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert len(read_star_text(combined)[0]["particles"].table) == 12
    unique = tmp_path / "unique.star"
    run = subprocess.run([program, "--i", str(ours), "--o", str(unique), "--remove_duplicates", "1"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "Removed 1 duplicated objects from 6 objects" in run.stdout
    assert len(read_star_text(unique)[0]["particles"].table) == 5
    kept = read(unique, "3.1").poses.positions_angst
    distances = np.linalg.norm(kept[:, None] - table.poses.positions_angst[None], axis=2)
    assert distances.min(axis=1).max() < 1e-3  # RELION's output reads back as the particles we wrote


@pytest.mark.parametrize("dialect", [Dialect.RELION30, Dialect.RELION31])
def test_relion_reads_what_we_write(tmp_path, dialect):
    _relion_counts(tmp_path, dialect)


def test_reads_starfile_written_synth_table(tmp_path):
    """The synthetic dataset's RELION 3.1 file (``write_relion31_particles``, rlnTomoName + stack paths)."""
    from mspecies.formats.star import write_relion31_particles

    particles = pd.DataFrame({"rlnTomoName": ["TS_01", "TS_02"], "rlnMicrographName": ["TS_01/a.mrcs", "TS_02/b.mrcs"],
                              "rlnCoordinateX": [200.0, 256.0], "rlnCoordinateY": [190.0, 256.0],
                              "rlnCoordinateZ": [75.0, 100.0], "rlnAngleRot": [10.0, 0.0],
                              "rlnAngleTilt": [20.0, 0.0], "rlnAnglePsi": [30.0, 0.0], "rlnOpticsGroup": [1, 1]})
    write_relion31_particles(tmp_path / "a.star", _optics(), particles)
    table = read(tmp_path / "a.star")
    assert table.dialect == Dialect.RELION31 and table.extras["rlnMicrographName"].tolist() == ["TS_01/a.mrcs",
                                                                                                 "TS_02/b.mrcs"]
    np.testing.assert_allclose(table.poses.positions_angst, 0, atol=1e-9)
    write_particle_star(table, tmp_path / "b.star")
    blocks, _ = read_star_text(tmp_path / "b.star")
    assert blocks["particles"].table["rlnMicrographName"].tolist() == ["TS_01/a.mrcs", "TS_02/b.mrcs"]


def test_take_keeps_rows_aligned(tmp_path):
    data = _base(10, np.random.default_rng(10))
    write_example(tmp_path / "a.star", Dialect.RELION4, data)
    table = read(tmp_path / "a.star")
    part = table.take(table.poses.tomo_names == "TS_02")
    assert len(part) == int(np.sum(data["names"] == "TS_02"))
    np.testing.assert_array_equal(part.source_row, np.flatnonzero(data["names"] == "TS_02"))
    assert part.extras["myScore"].tolist() == table.extras["myScore"].to_numpy()[part.source_row].tolist()
    write_particle_star(part, tmp_path / "b.star")
    assert_same_particles(part, read(tmp_path / "b.star"))


def test_warptools_export_coordinates_are_in_particle_pixels(tmp_path):
    """WarpTools ts_export_particles (rlnTomoName *.tomostar, optics with rlnTomoSubtomogramBinning): coordinates
    at rlnImagePixelSize, not rlnTomoTiltSeriesPixelSize; written back as RELION 4 the optics stay as read."""
    optics = pd.DataFrame({"rlnOpticsGroup": ["1"], "rlnOpticsGroupName": ["opticsGroup1"],
                           "rlnTomoTiltSeriesPixelSize": ["1.66700"], "rlnTomoSubtomogramBinning": ["7.19856"],
                           "rlnImagePixelSize": ["12.00000"], "rlnVoltage": ["300.000"]})
    particles = pd.DataFrame({"rlnTomoName": ["TS_1.tomostar"] * 2, "rlnCoordinateX": ["100.000", "400.000"],
                              "rlnCoordinateY": ["50.000", "60.000"], "rlnCoordinateZ": ["20.000", "90.000"],
                              "rlnOpticsGroup": ["1", "1"]})
    write_star_text(tmp_path / "w.star", [StarBlock("optics", optics), StarBlock("particles", particles)])
    table = read_particle_star(tmp_path / "w.star")
    np.testing.assert_allclose(table.poses.positions_angst, particles.filter(like="Coordinate").astype(float) * 12)
    write_particle_star(table, tmp_path / "b.star")
    assert read_star_text(tmp_path / "b.star")[0]["optics"].table.astype(str).to_dict("list") == optics.to_dict("list")
    renamed = particles.assign(rlnTomoName=["TS_1"] * 2)  # RELION's own names: tilt-series pixels
    write_star_text(tmp_path / "r.star", [StarBlock("optics", optics), StarBlock("particles", renamed)])
    np.testing.assert_allclose(read_particle_star(tmp_path / "r.star").coord_pixel_size_angst, 1.667)


def test_coordinates_given_as_fractions_of_the_tomogram_are_refused(tmp_path):
    frame = {k: v for k, v in GOOD.items() if k != "rlnOpticsGroup"}
    frame |= {"rlnMicrographName": ["TS_1.tomostar"] * 2, "rlnCoordinateX": [0.25, 0.5], "rlnCoordinateY": [0.1, 1.0],
              "rlnCoordinateZ": [0.0, 0.3]}
    write_star_text(tmp_path / "f.star", [StarBlock("", pd.DataFrame(frame))])
    with pytest.raises(InputError, match=r"f.star.*within \[0, 1\]: these are fractions"):
        read_particle_star(tmp_path / "f.star", coord_pixel_size_angst=10.0)


def test_every_flag_named_in_a_star_message_exists_on_the_commands():
    """One spelling per concept: each ``--flag`` the STAR layer's messages name is an option of convert or
    intersect (the commands that read and write particle STARs)."""
    import argparse
    import inspect
    import re

    from mspecies.cli import convert, intersect_files
    from mspecies.cli.main import build_parser
    from mspecies.formats import star, star_dialects, star_write

    text = "".join(inspect.getsource(m) for m in (star, star_dialects, star_write, intersect_files, convert))
    named = set(re.findall(r"--[a-z][a-z-]+[a-z](?![\w-])", text)) - {"--to", "--from"}  # not WarpTools' a_b
    commands = build_parser()._subparsers._group_actions[0].choices  # noqa: SLF001
    options = {flag for name in ("convert", "intersect") for action in commands[name]._actions  # noqa: SLF001
               if not isinstance(action, argparse._HelpAction) for flag in action.option_strings}  # noqa: SLF001
    assert named and named <= options, sorted(named - options)
    assert {"--coord-pixel-size-angst", "--tomo-size", "--tomo-sizes"} <= {
        f for a in commands["convert"]._actions for f in a.option_strings} & {  # noqa: SLF001
        f for a in commands["intersect"]._actions for f in a.option_strings}  # noqa: SLF001


def test_pixel_size_message_names_the_pixel_columns_the_file_carries(tmp_path):
    frame = {k: v for k, v in GOOD.items() if k != "rlnOpticsGroup"} | {"rlnTomoName": ["TS_01"] * 2}
    optics = pd.DataFrame({"rlnOpticsGroup": ["1"], "rlnImagePixelSize": ["3.5"]})
    write_star_text(tmp_path / "p.star", [StarBlock("optics", optics),
                                          StarBlock("particles", pd.DataFrame(frame | {"rlnOpticsGroup": [1, 1]}))])
    with pytest.raises(InputError, match=r"p.star.*--coord-pixel-size-angst") as error:
        read_particle_star(tmp_path / "p.star", Dialect.RELION4)
    assert "data_optics rlnImagePixelSize 3.5" in str(error.value)


def test_a_carried_pixel_size_column_follows_a_new_coordinate_grid_in_relion30(tmp_path):
    """Warp's rlnPixelSize is carried as written while it agrees with the grid, replaced where it would not."""
    frame = {k: v for k, v in GOOD.items() if k != "rlnOpticsGroup"} | {
        "rlnMagnification": ["10000.0"] * 2, "rlnDetectorPixelSize": ["5.36400"] * 2, "rlnPixelSize": ["5.36400"] * 2,
        "rlnVoltage": ["300"] * 2, "rlnSphericalAberration": ["2.7"] * 2, "rlnAmplitudeContrast": ["0.1"] * 2}
    write_star_text(tmp_path / "w.star", [StarBlock("", pd.DataFrame(frame))])
    table = read_particle_star(tmp_path / "w.star")
    write_particle_star(table, tmp_path / "same.star")
    assert read_star_text(tmp_path / "same.star")[0][""].table["rlnPixelSize"].tolist() == ["5.36400"] * 2
    write_particle_star(table, tmp_path / "binned.star", coord_pixel_size_angst=10.728)
    rows = read_star_text(tmp_path / "binned.star")[0][""].table
    assert rows["rlnPixelSize"].tolist() == rows["rlnDetectorPixelSize"].tolist() == ["10.728000"] * 2
