"""RELION 4/5 subtomogram orientations: rlnTomoSubtomogramRot/Tilt/Psi composed with rlnAngle* into the pose.

RELION (3dem/relion ver5.0, src/jaz/tomography/particle_set.cpp, ParticleSet::getMatrix3x3 and getPosition): the
particle in the tomogram is ``A_subtomogram · A_angle`` and sits at ``coordinate − A_subtomogram · origin``, both
matrices being ``Euler_angles2matrix`` (our ``euler_to_matrix``).
"""

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mspecies.cli.intersect_files import merge_into_old_dialect
from mspecies.common.types import InputError, Microscope, ParticlePoses
from mspecies.core.geometry import euler_to_matrix
from mspecies.formats.star import StarBlock, read_star_text, write_star_text
from mspecies.formats.star_dialects import SUBTOMOGRAM_COLUMNS, Dialect, read_particle_star
from mspecies.formats.star_write import write_particle_star

PIXEL = 2.5
SHAPES = {"TS_01": (400, 380, 151), "TS_02": (512, 512, 200)}
SCOPE = Microscope(300.0, 2.7, 0.07)
ANGLES = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
ORIGINS = ("rlnOriginXAngst", "rlnOriginYAngst", "rlnOriginZAngst")


def write_tomo_star(path, dialect: Dialect, names, centred_angst, subtomo, angles, origins, *, extra=None) -> None:
    """A RELION 4 or 5 particle file; ``subtomo``/``angles``/``origins`` None leave those columns out."""
    n = len(names)
    xyz = ("X", "Y", "Z")
    frame: dict = {"rlnTomoName": np.asarray(names, dtype=object)}
    if dialect == Dialect.RELION5:
        frame |= {f"rlnCenteredCoordinate{a}Angst": centred_angst[:, k] for k, a in enumerate(xyz)}
    else:
        corner = centred_angst / PIXEL + [[s // 2 for s in SHAPES[m]] for m in names]
        frame |= {f"rlnCoordinate{a}": corner[:, k] for k, a in enumerate(xyz)}
    frame |= {"rlnTomoParticleName": np.array([f"{m}/{i}" for i, m in enumerate(names)], dtype=object),
              "rlnOpticsGroup": np.ones(n, dtype=int), "myScore": np.arange(n) * 0.5}
    if origins is not None:
        frame |= {c: origins[:, k] for k, c in enumerate(ORIGINS)}
    if subtomo is not None:
        frame |= {c: subtomo[:, k] for k, c in enumerate(SUBTOMOGRAM_COLUMNS)}
    if angles is not None:
        frame |= {c: angles[:, k] for k, c in enumerate(ANGLES)}
    frame |= extra or {}
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"],
                           "rlnImagePixelSize": [PIXEL], "rlnTomoTiltSeriesPixelSize": [PIXEL],
                           "rlnVoltage": [300.0], "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.07],
                           "rlnImageDimensionality": [3]})
    blocks = [StarBlock("optics", optics), StarBlock("particles", pd.DataFrame(frame))]
    if dialect == Dialect.RELION5:
        blocks.insert(0, StarBlock("general", pd.DataFrame({"rlnTomoSubTomosAre2DStacks": ["0"]}), False))
    write_star_text(path, blocks)


def random_set(n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"names": np.array(["TS_01", "TS_02"], dtype=object)[rng.integers(0, 2, n)],
            "centred_angst": rng.uniform(-150, 150, (n, 3)), "subtomo": rng.uniform(-180, 180, (n, 3)),
            "angles": rng.uniform(-180, 180, (n, 3)), "origins": rng.uniform(-20, 20, (n, 3))}


def read(path, dialect=None):
    return read_particle_star(path, dialect, tomo_shape_px=SHAPES)


def rotations(table) -> np.ndarray:
    return euler_to_matrix(table.poses.euler_zyz_deg)


def particle_text(path) -> pd.DataFrame:
    blocks, _ = read_star_text(path)
    return blocks["particles"].table


def test_hand_built_composition(tmp_path):
    """Subtomogram (90, 0, 0), rlnAngle (0, 90, 0), origin (5, 0, 0) Å.

    euler_to_matrix(90, 0, 0) = [[0, 1, 0], [-1, 0, 0], [0, 0, 1]], euler_to_matrix(0, 90, 0) = [[0, 0, -1],
    [0, 1, 0], [1, 0, 0]]; their product (subtomogram first) is [[0, 1, 0], [0, 0, 1], [1, 0, 0]] =
    euler_to_matrix(0, 90, 90) (the other order would give [[0, 0, -1], [-1, 0, 0], [0, 1, 0]]). The origin in the
    tomogram frame is A_subtomogram · (5, 0, 0) = (0, -5, 0).
    """
    np.testing.assert_allclose(euler_to_matrix([90.0, 0, 0]), [[0, 1, 0], [-1, 0, 0], [0, 0, 1]], atol=1e-15)
    np.testing.assert_allclose(euler_to_matrix([0, 90.0, 0]), [[0, 0, -1], [0, 1, 0], [1, 0, 0]], atol=1e-15)
    expected = np.array([[0, 1, 0], [0, 0, 1], [1, 0, 0]], dtype=float)
    for dialect in (Dialect.RELION5, Dialect.RELION4):
        path = tmp_path / f"{dialect}.star"
        write_tomo_star(path, dialect, ["TS_01"], np.array([[10.0, 20.0, 30.0]]), np.array([[90.0, 0, 0]]),
                        np.array([[0, 90.0, 0]]), np.array([[5.0, 0, 0]]))
        table = read(path)
        assert table.dialect == dialect
        np.testing.assert_allclose(rotations(table)[0], expected, atol=1e-12)
        np.testing.assert_allclose(table.poses.euler_zyz_deg[0], [0, 90, 90], atol=1e-9)
        np.testing.assert_allclose(table.origins_angst[0], [0, -5, 0], atol=1e-12)
        np.testing.assert_allclose(table.poses.positions_angst[0], [10, 25, 30], atol=1e-6)
        assert not set(SUBTOMOGRAM_COLUMNS) & set(table.extras.columns)
        np.testing.assert_array_equal(table.subtomogram_euler_deg, [[90, 0, 0]])
        np.testing.assert_array_equal(table.box_euler_deg, [[0, 90, 0]])
        np.testing.assert_array_equal(table.box_origins_angst, [[5, 0, 0]])


@pytest.mark.parametrize("dialect", [Dialect.RELION4, Dialect.RELION5])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_poses_compose_as_relion(tmp_path, dialect, seed):
    data = random_set(300, seed)
    write_tomo_star(tmp_path / "a.star", dialect, data["names"], data["centred_angst"], data["subtomo"],
                    data["angles"], data["origins"])
    table = read(tmp_path / "a.star")
    a_sub = euler_to_matrix(data["subtomo"])
    np.testing.assert_allclose(rotations(table), a_sub @ euler_to_matrix(data["angles"]), atol=1e-6)
    shift = np.einsum("nij,nj->ni", a_sub, data["origins"])
    np.testing.assert_allclose(table.poses.positions_angst, data["centred_angst"] - shift, atol=1e-4)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(*[st.one_of(st.sampled_from([0.0, 90.0, 180.0, -180.0, -90.0]),
                                      st.floats(-360, 360))] * 6), min_size=1, max_size=10))
def test_property_composition_and_round_trip(tmp_path_factory, rows):
    values = np.array(rows, dtype=float)
    n = len(values)
    path = tmp_path_factory.mktemp("p") / "a.star"
    origins = np.tile([3.0, -4.0, 7.5], (n, 1))
    write_tomo_star(path, Dialect.RELION5, ["TS_01"] * n, np.zeros((n, 3)), values[:, :3], values[:, 3:], origins)
    table = read(path)
    want = euler_to_matrix(np.round(values[:, :3], 6)) @ euler_to_matrix(np.round(values[:, 3:], 6))
    np.testing.assert_allclose(rotations(table), want, atol=1e-6)
    write_particle_star(table, path.with_name("b.star"))
    assert particle_text(path.with_name("b.star")).equals(particle_text(path))
    write_particle_star(table, path.with_name("c.star"), Dialect.RELION31)
    back = read(path.with_name("c.star"))  # detected as 3.1 although rlnTomoName/rlnTomoParticleName are carried
    assert back.dialect == Dialect.RELION31
    np.testing.assert_allclose(rotations(back), want, atol=1e-6)
    np.testing.assert_allclose(back.poses.positions_angst, table.poses.positions_angst, atol=1e-5)


@pytest.mark.parametrize("dialect", [Dialect.RELION4, Dialect.RELION5])
def test_same_dialect_round_trip_is_exact(tmp_path, dialect):
    data = random_set(200, 5)
    write_tomo_star(tmp_path / "a.star", dialect, data["names"], data["centred_angst"], data["subtomo"],
                    data["angles"], data["origins"])
    table = read(tmp_path / "a.star")
    write_particle_star(table, tmp_path / "b.star")
    before, after = particle_text(tmp_path / "a.star"), particle_text(tmp_path / "b.star")
    assert list(after.columns) == list(before.columns)
    assert after.equals(before)  # every value as written, subtomogram angles and rlnAngle* unchanged
    again = read(tmp_path / "b.star")
    np.testing.assert_allclose(rotations(again), rotations(table), atol=1e-12)
    np.testing.assert_array_equal(again.subtomogram_euler_deg, table.subtomogram_euler_deg)
    # 5 → 4 → 5 keeps the subtomogram angles too
    other = Dialect.RELION4 if dialect == Dialect.RELION5 else Dialect.RELION5
    write_particle_star(table, tmp_path / "c.star", other)
    write_particle_star(read(tmp_path / "c.star"), tmp_path / "d.star", dialect)
    assert particle_text(tmp_path / "d.star")[list(SUBTOMOGRAM_COLUMNS + ANGLES + ORIGINS)].equals(
        before[list(SUBTOMOGRAM_COLUMNS + ANGLES + ORIGINS)])


@pytest.mark.parametrize("target", [Dialect.RELION31, Dialect.RELION30, Dialect.WARP3D, Dialect.M_SPECIES])
def test_to_dialect_without_subtomogram_angles_and_back(tmp_path, target):
    data = random_set(100, 6)
    write_tomo_star(tmp_path / "a.star", Dialect.RELION5, data["names"], data["centred_angst"], data["subtomo"],
                    data["angles"], data["origins"])
    table = read(tmp_path / "a.star")
    pixel = PIXEL if target == Dialect.M_SPECIES else None
    write_particle_star(table, tmp_path / "b.star", target, microscope=SCOPE, coord_pixel_size_angst=pixel)
    assert not set(SUBTOMOGRAM_COLUMNS) & set(read_star_text(tmp_path / "b.star")[0][
        "particles" if target == Dialect.RELION31 else ""].table.columns)
    middle = read_particle_star(tmp_path / "b.star", target, tomo_shape_px=SHAPES, coord_pixel_size_angst=pixel)
    assert middle.subtomogram_euler_deg is None
    np.testing.assert_allclose(rotations(middle), rotations(table), atol=1e-6)
    np.testing.assert_allclose(middle.poses.positions_angst, table.poses.positions_angst, atol=1e-4)
    if target != Dialect.M_SPECIES:  # M folds shifts into the coordinates
        np.testing.assert_allclose(middle.origins_angst, table.origins_angst, atol=1e-4)
    write_particle_star(middle, tmp_path / "c.star", Dialect.RELION5, coord_pixel_size_angst=pixel)
    last = read(tmp_path / "c.star")
    assert last.subtomogram_euler_deg is None  # no subtomogram angles: rlnAngle* is the composed pose
    assert not set(SUBTOMOGRAM_COLUMNS) & set(particle_text(tmp_path / "c.star").columns)
    np.testing.assert_allclose(rotations(last), rotations(table), atol=1e-6)
    np.testing.assert_allclose(last.poses.positions_angst, table.poses.positions_angst, atol=1e-4)


def test_changed_pose_is_written_relative_to_the_subtomogram(tmp_path):
    data = random_set(50, 7)
    write_tomo_star(tmp_path / "a.star", Dialect.RELION5, data["names"], data["centred_angst"], data["subtomo"],
                    data["angles"], data["origins"])
    table = read(tmp_path / "a.star")
    new_euler = np.random.default_rng(8).uniform(-180, 180, (50, 3))
    new_origins = table.origins_angst + 1.0
    changed = replace(table, poses=ParticlePoses(table.poses.positions_angst, new_euler, table.poses.tomo_names),
                      origins_angst=new_origins)
    write_particle_star(changed, tmp_path / "b.star")
    text = particle_text(tmp_path / "b.star")
    assert text[list(SUBTOMOGRAM_COLUMNS)].equals(particle_text(tmp_path / "a.star")[list(SUBTOMOGRAM_COLUMNS)])
    back = read(tmp_path / "b.star")
    np.testing.assert_allclose(rotations(back), euler_to_matrix(new_euler), atol=1e-6)
    np.testing.assert_allclose(back.origins_angst, new_origins, atol=1e-5)
    np.testing.assert_allclose(back.poses.positions_angst, table.poses.positions_angst, atol=1e-4)
    part = table.take(np.arange(50)[::-3])
    write_particle_star(part, tmp_path / "c.star")
    np.testing.assert_allclose(rotations(read(tmp_path / "c.star")), rotations(table)[::-3], atol=1e-12)


def test_subtomogram_angles_without_rlnangle(tmp_path):
    data = random_set(20, 9)
    write_tomo_star(tmp_path / "a.star", Dialect.RELION5, data["names"], data["centred_angst"], data["subtomo"],
                    None, None)
    table = read(tmp_path / "a.star")
    assert not table.has_angles
    np.testing.assert_allclose(rotations(table), euler_to_matrix(data["subtomo"]), atol=1e-6)
    write_particle_star(table, tmp_path / "b.star")
    assert particle_text(tmp_path / "b.star").equals(particle_text(tmp_path / "a.star"))  # no rlnAngle* added
    write_particle_star(table, tmp_path / "c.star", Dialect.RELION31, microscope=SCOPE)
    np.testing.assert_allclose(rotations(read(tmp_path / "c.star", Dialect.RELION31)), rotations(table), atol=1e-6)


def test_without_subtomogram_columns_unchanged(tmp_path):
    data = random_set(30, 10)
    write_tomo_star(tmp_path / "a.star", Dialect.RELION5, data["names"], data["centred_angst"], None,
                    data["angles"], data["origins"])
    table = read(tmp_path / "a.star")
    assert table.subtomogram_euler_deg is None and table.box_euler_deg is None
    np.testing.assert_allclose(table.poses.euler_zyz_deg, data["angles"], atol=1e-6)
    np.testing.assert_allclose(table.origins_angst, data["origins"], atol=1e-6)
    write_particle_star(table, tmp_path / "b.star")
    assert particle_text(tmp_path / "b.star").equals(particle_text(tmp_path / "a.star"))


def test_incomplete_subtomogram_columns(tmp_path):
    data = random_set(3, 11)
    write_tomo_star(tmp_path / "a.star", Dialect.RELION5, data["names"], data["centred_angst"], None,
                    data["angles"], None, extra={"rlnTomoSubtomogramRot": np.zeros(3)})
    with pytest.raises(InputError, match="rlnTomoSubtomogramTilt"):
        read(tmp_path / "a.star")


def test_uninterpreted_subtomogram_columns_are_not_written_to_relion5(tmp_path):
    """A RELION 3.1 file (no rlnTomoName) carries the columns as extras; its pose is already complete."""
    frame = {"rlnMicrographName": ["TS_01"], "rlnCoordinateX": [200.0], "rlnCoordinateY": [190.0],
             "rlnCoordinateZ": [75.0], "rlnAngleRot": [10.0], "rlnAngleTilt": [20.0], "rlnAnglePsi": [30.0],
             "rlnTomoSubtomogramRot": [90.0], "rlnTomoSubtomogramTilt": [0.0], "rlnTomoSubtomogramPsi": [0.0],
             "rlnOpticsGroup": [1]}
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"],
                           "rlnImagePixelSize": [PIXEL], "rlnVoltage": [300.0], "rlnSphericalAberration": [2.7],
                           "rlnAmplitudeContrast": [0.07]})
    write_star_text(tmp_path / "a.star", [StarBlock("optics", optics), StarBlock("particles", pd.DataFrame(frame))])
    table = read(tmp_path / "a.star")
    assert table.dialect == Dialect.RELION31 and table.subtomogram_euler_deg is None
    np.testing.assert_allclose(table.poses.euler_zyz_deg, [[10, 20, 30]])
    write_particle_star(table, tmp_path / "b.star", Dialect.RELION5)
    assert not set(SUBTOMOGRAM_COLUMNS) & set(particle_text(tmp_path / "b.star").columns)
    np.testing.assert_allclose(rotations(read(tmp_path / "b.star")), rotations(table), atol=1e-6)
    write_particle_star(table, tmp_path / "c.star")  # 3.1 → 3.1 keeps them
    assert set(SUBTOMOGRAM_COLUMNS) <= set(particle_text(tmp_path / "c.star").columns)


def test_intersect_merge_gives_new_rows_an_identity_subtomogram_box(tmp_path):
    old_data, new_data = random_set(6, 11), random_set(4, 12)
    write_tomo_star(tmp_path / "old.star", Dialect.RELION5, old_data["names"], old_data["centred_angst"],
                    old_data["subtomo"], old_data["angles"], old_data["origins"])
    write_tomo_star(tmp_path / "new.star", Dialect.RELION5, new_data["names"], new_data["centred_angst"],
                    new_data["subtomo"], new_data["angles"], new_data["origins"])
    old, new = read(tmp_path / "old.star"), read(tmp_path / "new.star")
    merged = merge_into_old_dialect(old, new, new.poses.tomo_names)
    write_particle_star(merged, tmp_path / "merged.star")
    back = read(tmp_path / "merged.star")
    np.testing.assert_allclose(rotations(back), np.concatenate([rotations(old), rotations(new)]), atol=1e-6)
    np.testing.assert_allclose(back.poses.positions_angst,
                               np.concatenate([old.poses.positions_angst, new.poses.positions_angst]), atol=1e-4)
    np.testing.assert_allclose(back.subtomogram_euler_deg[len(old):], 0.0)
