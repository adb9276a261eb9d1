"""``python -m mspecies intersect``: M's recipes, name matching, mixed dialects, outputs, summary, bad input."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from mspecies.cli import main
from mspecies.cli.intersect_files import merge_into_old_dialect, parse_keep
from mspecies.formats.star import StarBlock, write_star_text
from mspecies.formats.star_dialects import Dialect, read_particle_star

PIXEL = 5.0
SHAPE = (400, 400, 200)  # px at PIXEL; centre (200, 200, 100)
TOMOS = ("TS_01", "TS_02")


def grid_positions(n_per_tomo: int, spacing_angst: float = 120.0) -> tuple[np.ndarray, np.ndarray]:
    """(N, 3) centred Å on a grid (particles far apart) and (N,) tomogram names."""
    side = int(np.ceil(np.sqrt(n_per_tomo)))
    ij = np.array([(i, j) for i in range(side) for j in range(side)][:n_per_tomo], dtype=float)
    one = np.column_stack([(ij - side / 2) * spacing_angst, np.zeros(n_per_tomo)])
    return np.vstack([one] * len(TOMOS)), np.repeat(np.array(TOMOS, dtype=object), n_per_tomo)


def write_star(path, positions_angst: np.ndarray, names: np.ndarray, dialect: str = "3.1",
               angles: np.ndarray | None = None, score: np.ndarray | None = None, microscope: bool = True) -> None:
    """RELION 3.1 (corner px, optics) or 5 (centred Å) particle STAR with angles and an extra ``myScore``."""
    n = len(names)
    angles = np.zeros((n, 3)) if angles is None else angles
    frame: dict = {"rlnTomoName" if dialect == "5" else "rlnMicrographName": names}
    if dialect == "5":
        frame |= {f"rlnCenteredCoordinate{a}Angst": positions_angst[:, k] for k, a in enumerate("XYZ")}
    else:
        corner = positions_angst / PIXEL + np.array([s // 2 for s in SHAPE])
        frame |= {f"rlnCoordinate{a}": corner[:, k] for k, a in enumerate("XYZ")}
    frame |= {"rlnAngleRot": angles[:, 0], "rlnAngleTilt": angles[:, 1], "rlnAnglePsi": angles[:, 2],
              "rlnOpticsGroup": np.ones(n, dtype=int), "rlnRandomSubset": np.arange(n) % 2 + 1}
    if score is not None:
        frame["myScore"] = score
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"],
                           "rlnVoltage": [300.0], "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.07],
                           ("rlnTomoTiltSeriesPixelSize" if dialect == "5" else "rlnImagePixelSize"): [PIXEL]})
    if not microscope:
        optics = optics.drop(columns=["rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast"])
    header = ["Relion star file version 50001"] if dialect == "5" else ["version 30001"]
    write_star_text(path, [StarBlock("optics", optics), StarBlock("particles", pd.DataFrame(frame))], header)


def run_cli(old, new, out, tolerance: float, *extra: str) -> int:
    return main(["intersect", "--old", str(old), "--new", str(new), "--tolerance-angst", str(tolerance),
                 "--out", str(out), "--tomo-size", *map(str, SHAPE), *extra])


def read(path):
    return read_particle_star(path, tomo_shape_px=SHAPE)


@pytest.fixture()
def pair(tmp_path):
    """Old: 2 x 16 particles. New: the first 10 per tomogram jittered by 2 Å, 6 dropped, 3 added per tomogram."""
    rng = np.random.default_rng(1)
    old_pos, names = grid_positions(16)
    keep = np.concatenate([np.arange(10), 16 + np.arange(10)])
    jitter = rng.normal(size=(keep.size, 3))
    jitter *= 2.0 / np.linalg.norm(jitter, axis=1, keepdims=True)
    added = np.array([[700.0, 700.0, 60.0], [-700.0, 700.0, -60.0], [700.0, -700.0, 0.0]] * 2)
    new_pos = np.vstack([old_pos[keep] + jitter, added])
    new_names = np.concatenate([names[keep], np.repeat(np.array(TOMOS, dtype=object), 3)])
    angles = rng.uniform(-180, 180, (len(names), 3))
    write_star(tmp_path / "old.star", old_pos, names, angles=angles, score=np.arange(len(names)) * 0.5)
    write_star(tmp_path / "new.star", new_pos, new_names)
    return tmp_path, old_pos, angles


def test_outputs_counts_and_summary(pair, capsys):
    folder, old_pos, angles = pair
    out = folder / "out"
    assert run_cli(folder / "old.star", folder / "new.star", out, 5.0) == 0
    stdout = capsys.readouterr().out
    assert stdout.index("TS_01: 16 old, 13 new") < stdout.index("Tolerance 5 Å")
    for name in ("only_old.star", "in_both.star", "only_new.star", "selected.star", "distance_histogram.png",
                 "summary.json", "particle_distances.tsv", "histogram_distances.txt"):
        assert (out / name).is_file(), name
    assert (out / "distance_histogram.png").read_bytes()[:4] == b"\x89PNG"
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["n_old"], summary["n_new"], summary["in_both"], summary["only_old"], summary["only_new"]) == \
        (32, 26, 20, 12, 6)
    assert summary["jaccard"] == pytest.approx(20 / 38)
    assert summary["median_distance_angst"] == pytest.approx(2.0, abs=1e-3)
    assert summary["tolerance_angst"] == 5.0 and summary["mode"] == "gated"
    assert summary["selected"] == 38
    by_tomo = {g["tomogram"]: g for g in summary["per_tomogram"]}
    assert by_tomo["TS_02"] == {"tomogram": "TS_02", "n_old": 16, "n_new": 13, "in_both": 10, "only_old": 6,
                                "only_new": 3, "jaccard": pytest.approx(10 / 19)}
    assert summary["name_matching"]["methods"] == {"TS_01": "exact", "TS_02": "exact"}
    in_both = read(out / "in_both.star")
    assert len(in_both) == 20 and len(read(out / "only_old.star")) == 12 and len(read(out / "only_new.star")) == 6
    # in both keeps the OLD poses and the old extra columns
    rows = np.concatenate([np.arange(10), 16 + np.arange(10)])
    np.testing.assert_allclose(in_both.poses.positions_angst, old_pos[rows], atol=1e-4)
    np.testing.assert_allclose(in_both.poses.euler_zyz_deg, angles[rows], atol=1e-4)
    np.testing.assert_allclose(pd.to_numeric(in_both.extras["myScore"]), rows * 0.5)
    distances = np.loadtxt(out / "histogram_distances.txt")
    assert distances.size == 20 and np.allclose(distances, 2.0, atol=1e-3)


def test_recipe_add_new_particles_tolerance_zero(tmp_path):
    """M's "add new particles" (tol 0, only old + only new) concatenates disjoint sets; exact duplicates are in
    both, so that recipe drops both copies, while only old + in both + only new keeps one (the old) copy."""
    old_pos, names = grid_positions(9)
    extra = np.array([[900.0, 0.0, 0.0], [0.0, 900.0, 0.0]])
    new_pos = np.vstack([old_pos[:5], extra])  # exact duplicates of 5 old ones, 2 genuinely new
    write_star(tmp_path / "old.star", old_pos, names)
    write_star(tmp_path / "new.star", new_pos, np.array(["TS_01"] * 7, dtype=object))

    def selected(keep: str):
        assert run_cli(tmp_path / "old.star", tmp_path / "new.star", tmp_path / keep, 0.0, "--keep", keep) == 0
        table = read(tmp_path / keep / "selected.star")
        keys = [tuple(np.round(p, 3)) + (n,) for p, n in zip(table.poses.positions_angst, table.poses.tomo_names)]
        assert len(set(keys)) == len(keys)  # never a duplicate
        return table

    assert len(selected("only_old,only_new")) == len(old_pos) - 5 + 2
    union = selected("only_old,in_both,only_new")
    assert len(union) == len(old_pos) + 2
    np.testing.assert_allclose(union.poses.positions_angst[-2:], extra, atol=1e-4)


def test_recipe_only_old_plus_in_both_is_old(pair):
    folder, old_pos, angles = pair
    assert run_cli(folder / "old.star", folder / "new.star", folder / "out", 5.0, "--keep", "only_old,in_both") == 0
    selected = read(folder / "out" / "selected.star")
    order = np.argsort(selected.source_row)
    assert len(selected) == len(old_pos)
    np.testing.assert_allclose(np.sort(selected.poses.positions_angst[order], axis=0), np.sort(old_pos, axis=0),
                               atol=1e-4)
    summary = json.loads((folder / "out" / "summary.json").read_text())
    assert summary["keep"] == ["only_old", "in_both"] and summary["selected"] == 32


def test_recipe_in_both_against_first_star_drops_moved_particles(tmp_path):
    first, names = grid_positions(8)
    refined = first.copy()
    moved = np.array([1, 4, 10])
    refined[moved, 0] += 30.0  # drifted during refinement
    refined[np.setdiff1d(np.arange(len(first)), moved), 1] += 1.0
    write_star(tmp_path / "refined.star", refined, names)
    write_star(tmp_path / "first.star", first, names)
    assert run_cli(tmp_path / "refined.star", tmp_path / "first.star", tmp_path / "out", 5.0,
                   "--keep", "in_both") == 0
    selected = read(tmp_path / "out" / "selected.star")
    assert len(selected) == len(first) - moved.size
    kept = np.setdiff1d(np.arange(len(first)), moved)
    np.testing.assert_allclose(selected.poses.positions_angst, refined[kept], atol=1e-4)  # refined (old) poses


def test_name_matching_with_suffixes(pair, capsys):
    folder, old_pos, _ = pair
    new = read_particle_star(folder / "new.star", tomo_shape_px=SHAPE)
    renamed = np.array([f"{n}.tomostar" for n in new.poses.tomo_names], dtype=object)
    write_star(folder / "renamed.star", new.poses.positions_angst, renamed)
    assert run_cli(folder / "old.star", folder / "renamed.star", folder / "out", 5.0) == 0
    out = capsys.readouterr().out
    assert "'TS_01.tomostar' (normalised)" in out
    summary = json.loads((folder / "out" / "summary.json").read_text())
    assert summary["in_both"] == 20 and summary["name_matching"]["matches"]["TS_02.tomostar"] == "TS_02"
    for name in ("only_new.star", "selected.star"):  # new rows renamed to the old tomograms (old dialect)
        assert set(read(folder / "out" / name).poses.tomo_names) == {"TS_01", "TS_02"}


def test_name_map_and_unmatched_names(pair, capsys):
    folder, old_pos, _ = pair
    new = read_particle_star(folder / "new.star", tomo_shape_px=SHAPE)
    renamed = np.where(new.poses.tomo_names == "TS_01", "tomoA", "tomoB").astype(object)
    write_star(folder / "renamed.star", new.poses.positions_angst, renamed)
    assert run_cli(folder / "old.star", folder / "renamed.star", folder / "out", 5.0, "--name-map", "tomoA=TS_01") == 0
    out = capsys.readouterr().out
    assert "'tomoA' (mapping)" in out and "matching no old tomogram" in out and "tomoB" in out
    summary = json.loads((folder / "out" / "summary.json").read_text())
    assert summary["in_both"] == 10 and summary["only_new"] == 16
    assert summary["name_matching"]["unmatched_new_names"] == ["tomoB"]


def test_mixed_dialects_outputs_written_in_old_dialect(pair):
    folder, old_pos, _ = pair
    new = read_particle_star(folder / "new.star", tomo_shape_px=SHAPE)
    write_star(folder / "new5.star", new.poses.positions_angst, new.poses.tomo_names, dialect="5")
    assert read_particle_star(folder / "new5.star").dialect == Dialect.RELION5
    out = folder / "out"
    assert run_cli(folder / "old.star", folder / "new5.star", out, 5.0, "--keep", "only_old,only_new") == 0
    selected = read(out / "selected.star")
    assert selected.dialect == Dialect.RELION31
    assert len(selected) == 12 + 6
    expected = np.vstack([old_pos[np.r_[10:16, 26:32]], new.poses.positions_angst[-6:]])
    np.testing.assert_allclose(np.sort(selected.poses.positions_angst, axis=0), np.sort(expected, axis=0), atol=1e-4)
    only_new = read(out / "only_new.star")
    assert only_new.dialect == Dialect.RELION31
    np.testing.assert_allclose(np.sort(only_new.poses.positions_angst, axis=0),
                               np.sort(new.poses.positions_angst[-6:], axis=0), atol=1e-4)
    # new rows carry defaults for the old-only column myScore
    assert set(selected.extras["myScore"].iloc[12:]) == {"0"}


def test_merge_keeps_row_counts_and_subsets(pair):
    folder, _, _ = pair
    old, new = read(folder / "old.star"), read(folder / "new.star")
    merged = merge_into_old_dialect(old.take(np.arange(3)), new.take(np.arange(4)), new.poses.tomo_names[:4])
    assert len(merged) == 7 and merged.random_subset.tolist()[3:] == [1, 2, 1, 2]
    assert len(merged.extras) == 7 and merged.optics_group.tolist() == [1] * 7


def test_m_compatible_mode_and_histogram_options(pair):
    folder, _, _ = pair
    out = folder / "out"
    assert run_cli(folder / "old.star", folder / "new.star", out, 5.0, "--mode", "m_compatible", "--bins", "10",
                   "--log-scale") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "m_compatible" and summary["histogram_radius_angst"] is None  # inf: M's histogram
    assert summary["in_both"] == 20 and summary["histogram_bins"] == 10
    assert np.loadtxt(out / "histogram_distances.txt").size == 26 - 6 + 6  # min(n_old, n_new) per tomogram


@pytest.mark.parametrize("args, message", [
    (["--keep", "only_old,everything"], "--keep: unknown set"),
    (["--tolerance-angst", "-1"], "tolerance"),
])
def test_bad_options(pair, capsys, args, message):
    folder, _, _ = pair
    argv = ["intersect", "--old", str(folder / "old.star"), "--new", str(folder / "new.star"), "--out",
            str(folder / "out"), "--tomo-size", *map(str, SHAPE), "--tolerance-angst", "5", *args]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_bad_files(pair, capsys):
    folder, _, _ = pair
    assert run_cli(folder / "missing.star", folder / "new.star", folder / "out", 5.0) == 2
    assert "--old" in (err := capsys.readouterr().err) and "missing.star" in err
    text = (folder / "new.star").read_text().replace("_rlnCoordinateZ", "_rlnSomethingElse")
    (folder / "broken.star").write_text(text)
    assert run_cli(folder / "old.star", folder / "broken.star", folder / "out", 5.0) == 2
    assert "broken.star" in (err := capsys.readouterr().err) and "rlnCoordinateZ" in err
    old_pos, names = grid_positions(4)
    write_star(folder / "centred.star", old_pos, names, dialect="5")
    assert main(["intersect", "--old", str(folder / "old.star"), "--new", str(folder / "centred.star"),
                 "--tolerance-angst", "5", "--out", str(folder / "out")]) == 2
    assert "tomogram size" in (err := capsys.readouterr().err) and "centre" in err


def test_two_corner_based_files_intersect_without_a_tomogram_size(pair, capsys):
    """Same tomograms, same corner frame: the size cannot change the result, so none is asked for."""
    folder, _, _ = pair
    args = ["intersect", "--old", str(folder / "old.star"), "--new", str(folder / "new.star"),
            "--tolerance-angst", "5"]
    assert main([*args, "--out", str(folder / "plain")]) == 0
    assert run_cli(folder / "old.star", folder / "new.star", folder / "sized", 5.0) == 0
    plain, sized = (json.loads((folder / d / "summary.json").read_text()) for d in ("plain", "sized"))
    assert [plain[k] for k in ("in_both", "only_old", "only_new")] == [sized[k] for k in ("in_both", "only_old",
                                                                                           "only_new")]
    for stem in ("only_old", "in_both", "only_new", "selected"):
        assert (folder / "plain" / f"{stem}.star").read_text() == (folder / "sized" / f"{stem}.star").read_text()


def test_no_common_tomogram_is_an_error(pair, capsys):
    folder, old_pos, _ = pair
    write_star(folder / "other.star", old_pos[:3], np.array(["XX_9"] * 3, dtype=object))
    assert run_cli(folder / "old.star", folder / "other.star", folder / "out", 5.0) == 2
    assert "no tomogram of the new set" in capsys.readouterr().err


def test_parse_keep():
    assert parse_keep("in_both") == (False, True, False)
    assert parse_keep(["only_old", "only_new"]) == (True, False, True)


# --- beyond M: orientation gate, groups, score, deduplication ---------------------------------------------------------


def write_extra_star(path, positions_angst, names, angles, **columns) -> None:
    """RELION 3.1 STAR with angles and extra columns (``rlnClassNumber=...``, ``myScore=...``)."""
    write_star(path, positions_angst, names, angles=angles)
    text = path.read_text()
    head, _, body = text.partition("data_particles")
    lines = body.strip("\n").split("\n")
    labels = [line for line in lines if line.startswith("_")]
    rows = [line for line in lines if line.strip() and not line.startswith(("_", "loop_"))]
    for name, values in columns.items():
        labels.append(f"_{name} #{len(labels) + 1}")
        rows = [f"{row} {value}" for row, value in zip(rows, values)]
    path.write_text(head + "data_particles\n\nloop_\n" + "\n".join(labels) + "\n" + "\n".join(rows) + "\n")


@pytest.fixture()
def oriented(tmp_path):
    """One tomogram, 4 old particles; new: the same places, particle 1 turned 90° about z, 2 turned 10°, 3 in
    another class."""
    old_pos = np.array([[0.0, 0, 0], [300, 0, 0], [0, 300, 0], [300, 300, 0]])
    names = np.array(["TS_01"] * 4, dtype=object)
    old_ang = np.zeros((4, 3))
    new_ang = np.array([[0.0, 0, 0], [90, 0, 0], [10, 0, 0], [0, 0, 0]])
    write_extra_star(tmp_path / "old.star", old_pos, names, old_ang, rlnClassNumber=[1, 1, 1, 1],
                     rlnMaxValueProbDistribution=[0.5, 0.5, 0.5, 0.5])
    write_extra_star(tmp_path / "new.star", old_pos + [1.0, 0, 0], names, new_ang, rlnClassNumber=[1, 1, 1, 2],
                     rlnMaxValueProbDistribution=[0.9, 0.1, 0.5, 0.7])
    return tmp_path


def test_angular_tolerance_symmetry_and_angle_histogram(oriented):
    out = oriented / "out"
    assert run_cli(oriented / "old.star", oriented / "new.star", out, 5.0, "--angular-tolerance-deg", "20") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["in_both"] == 3 and summary["angular_tolerance_deg"] == 20.0 and summary["symmetry"] == "C1"
    table = pd.read_csv(out / "particle_distances.tsv", sep="\t")
    old_rows = table[table["set"] == "old"]
    assert old_rows["status"].tolist() == ["in_both", "only_old", "in_both", "in_both"]
    np.testing.assert_allclose(old_rows["angle_deg"], [0.0, -1.0, 10.0, 0.0], atol=1e-4)
    assert (out / "angle_histogram.png").read_bytes()[:4] == b"\x89PNG"
    np.testing.assert_allclose(np.sort(np.loadtxt(out / "histogram_angles.txt")), [0, 0, 10, 90], atol=1e-4)
    assert run_cli(oriented / "old.star", oriented / "new.star", out, 5.0, "--angular-tolerance-deg", "20",
                   "--symmetry", "C4") == 0
    assert json.loads((out / "summary.json").read_text())["in_both"] == 4  # 90° is 0° under C4


def test_group_by_class_and_score(oriented):
    out = oriented / "out"
    assert run_cli(oriented / "old.star", oriented / "new.star", out, 5.0, "--group-by", "rlnClassNumber",
                   "--score", "rlnMaxValueProbDistribution") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["in_both"], summary["only_old"], summary["only_new"]) == (3, 1, 1)  # class 2 never matches 1
    assert summary["per_tomogram"][0]["tomogram"] == "TS_01" and len(summary["per_group"]) == 2
    assert summary["in_both_from_new"] == 1  # only pair 0 has a strictly higher new score (0.9 > 0.5)
    in_both = read(out / "in_both.star")
    scores = sorted(pd.to_numeric(in_both.extras["rlnMaxValueProbDistribution"]).tolist())
    assert scores == [0.5, 0.5, 0.9]  # the new particle 0 (0.9) replaces old 0; the tie (0.5) keeps old 2
    np.testing.assert_allclose(np.sort(in_both.poses.positions_angst[:, 0]), [0.0, 1.0, 300.0], atol=1e-4)
    selected = read(out / "selected.star")
    assert len(selected) == 3 + 1 + 1


@pytest.mark.parametrize(("args", "message"), [
    (["--symmetry", "X9"], "symmetry 'X9' is not known"),
    (["--angular-tolerance-deg", "-5"], "--angular-tolerance-deg must be >= 0"),
    (["--group-by", "rlnNothing"], "--group-by rlnNothing"),
    (["--score", "rlnNothing"], "--score rlnNothing"),
])
def test_bad_beyond_m_options_write_nothing(oriented, capsys, args, message):
    out = oriented / "out"
    assert run_cli(oriented / "old.star", oriented / "new.star", out, 5.0, *args) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_group_column_absent_from_one_set_names_the_file(oriented, capsys):
    write_star(oriented / "plain.star", np.zeros((2, 3)), np.array(["TS_01"] * 2, dtype=object))
    assert run_cli(oriented / "old.star", oriented / "plain.star", oriented / "out", 5.0, "--group-by",
                   "rlnClassNumber") == 2
    err = capsys.readouterr().err
    assert "--group-by rlnClassNumber" in err and "plain.star" in err and "no column rlnClassNumber" in err
    assert not (oriented / "out").exists()


def test_same_file_twice_removes_duplicates(tmp_path, capsys):
    """Two clusters of mutual duplicates (3 and 2 particles) and 2 lone particles: 4 kept, 3 removed."""
    positions = np.array([[0.0, 0, 0], [2, 0, 0], [0, 2, 0], [500, 0, 0], [501, 0, 0], [0, 500, 0], [-500, 0, 0]])
    names = np.array(["TS_01"] * 7, dtype=object)
    write_extra_star(tmp_path / "set.star", positions, names, np.zeros((7, 3)),
                     myScore=[1, 5, 2, 0, 0, 0, 0])
    out = tmp_path / "out"
    assert run_cli(tmp_path / "set.star", tmp_path / "set.star", out, 5.0, "--score", "myScore") == 0
    assert "removing duplicates" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "deduplicate" and summary["in_both"] == 4 and summary["removed_duplicates"] == 3
    kept = read(out / "in_both.star")
    np.testing.assert_allclose(kept.poses.positions_angst[:, :2],
                               [[2, 0], [500, 0], [0, 500], [-500, 0]], atol=1e-4)  # the best-scored of cluster 1
    assert len(read(out / "duplicates.star")) == 3 and len(read(out / "selected.star")) == 4
    assert len(read(out / "only_old.star")) == 0 and len(read(out / "only_new.star")) == 0
    assert np.loadtxt(out / "histogram_distances.txt").size == 5  # nearest other particle within 20 Å


def test_infinite_histogram_radius_is_refused_in_gated_mode(oriented, capsys):
    assert run_cli(oriented / "old.star", oriented / "new.star", oriented / "out", 5.0,
                   "--histogram-radius-angst", "inf") == 2
    assert "--histogram-radius-angst: the nearest-neighbour histogram needs a finite radius" in capsys.readouterr().err
    assert not (oriented / "out" / "summary.json").exists()


def test_a_run_replaces_every_file_of_an_earlier_run(oriented):
    """Duplicate removal then an intersection into the same folder: duplicates.star of the first run is gone."""
    out = oriented / "out"
    assert run_cli(oriented / "old.star", oriented / "old.star", out, 5.0) == 0
    assert (out / "duplicates.star").is_file() and json.loads((out / "summary.json").read_text())["mode"] == \
        "deduplicate"
    assert run_cli(oriented / "old.star", oriented / "new.star", out, 5.0) == 0
    assert not (out / "duplicates.star").exists() and (out / "angle_histogram.png").is_file()
    assert json.loads((out / "summary.json").read_text())["mode"] == "gated"


def test_group_by_scipion_class_name_reads_the_relion_label(oriented):
    """``_classId`` (Scipion's name) reads a STAR's rlnClassNumber, so one name serves a Scipion set and a STAR."""
    for column in ("_classId", "rlnClassNumber"):
        out = oriented / column
        assert run_cli(oriented / "old.star", oriented / "new.star", out, 5.0, "--group-by", column) == 0
        assert json.loads((out / "summary.json").read_text())["in_both"] == 3


def test_intersect_fills_the_microscope_an_old_star_lacks_from_its_flags(tmp_path):
    """A RELION 3.1 STAR whose optics lack voltage, Cs and amplitude contrast is written back as it is; with
    --voltage/--cs/--amplitude-contrast (which intersect has, as convert) every output carries them."""
    positions = np.array([[0.0, 0.0, 0.0], [200.0, 0.0, 0.0]])
    names = np.array(["TS_01", "TS_01"])
    write_star(tmp_path / "old.star", positions, names, microscope=False)
    write_star(tmp_path / "new.star", positions + 1.0, names, microscope=False)
    out = tmp_path / "out"
    assert run_cli(tmp_path / "old.star", tmp_path / "new.star", out, 10, "--voltage", "300", "--cs", "2.7",
                   "--amplitude-contrast", "0.07") == 0
    for name in ("only_old", "in_both", "only_new", "selected"):
        optics = read_particle_star(out / f"{name}.star", tomo_shape_px=SHAPE).optics
        assert optics["rlnVoltage"].astype(float).tolist() == [300.0], name


@pytest.mark.parametrize("command", ["intersect", "convert"])
def test_a_voltage_in_volts_is_refused_by_intersect_and_convert(tmp_path, capsys, command):
    positions = np.array([[0.0, 0.0, 0.0]])
    write_star(tmp_path / "a.star", positions, np.array(["TS_01"]), microscope=False)
    optics = ["--voltage", "300000", "--cs", "2.7", "--amplitude-contrast", "0.07"]
    if command == "intersect":
        code = run_cli(tmp_path / "a.star", tmp_path / "a.star", tmp_path / "out", 10, *optics)
    else:
        code = main(["convert", str(tmp_path / "a.star"), "--to", "3.1", str(tmp_path / "b.star"), "--tomo-size",
                     *map(str, SHAPE), *optics])
    assert code == 2 and "--voltage: voltage 300000 looks like volts" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "b.star").exists()


def test_an_input_that_the_intersection_would_replace_is_refused(tmp_path, capsys):
    """Intersecting the selected.star of an earlier run again into the same --out would overwrite that input."""
    positions = np.array([[0.0, 0.0, 0.0], [200.0, 0.0, 0.0]])
    names = np.array(["TS_01", "TS_01"])
    write_star(tmp_path / "old.star", positions, names)
    write_star(tmp_path / "new.star", positions + 1.0, names)
    out = tmp_path / "out"
    assert run_cli(tmp_path / "old.star", tmp_path / "new.star", out, 10) == 0
    before = (out / "selected.star").read_bytes()
    capsys.readouterr()
    assert run_cli(out / "selected.star", tmp_path / "new.star", out, 10) == 2
    assert f"which is its input --old {out / 'selected.star'}" in capsys.readouterr().err
    assert (out / "selected.star").read_bytes() == before
