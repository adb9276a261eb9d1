"""Real particle STAR files written by RELION 3.0-5, Warp/WarpTools, TOMOMAN, STOPGAP, cryoCAT, tomoDRGN, CrESTA,
cylindra and the CryoET Data Portal (``../shared/real_star/files``; ``tests/_star_corpus.py`` says what each file
is expected to be read as, and why).

Per accepted file: the dialect, the positions (from the raw columns, 1e-3 Å) and rotations (1e-6), a round trip
through every dialect keeping count, positions, rotations and unknown columns, ``intersect`` with itself and with a
jittered copy; a tomogram size is given only where the corner-based and the centred (RELION 5) frames meet.
Per refused file: an :class:`InputError` naming the file and what is missing.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import starfile
from _star_corpus import (
    ACCEPTED,
    EXPECTED,
    REFUSED,
    corpus_dir,
    raw_blocks,
    raw_particles,
    raw_pixel,
    raw_positions,
    raw_rotations,
)

from mspecies.cli import main
from mspecies.cli.intersect_files import intersect_star_files
from mspecies.common.euler import euler_to_matrix
from mspecies.common.types import InputError, Microscope
from mspecies.formats.star import read_star_text
from mspecies.formats.star_dialects import CORNER_DIALECTS, Dialect, PositionFrame, read_particle_star
from mspecies.formats.star_write import write_particle_star

CORPUS = corpus_dir()
if CORPUS is None:
    print("real STAR corpus tests skipped: ../shared/real_star/files not found (set MSPECIES_SHARED)")
pytestmark = pytest.mark.skipif(CORPUS is None, reason="../shared/real_star/files not found (set MSPECIES_SHARED "
                                                        "to the shared folder); CI has it")
SAME_LAYOUT = {Dialect.RELION30: {Dialect.RELION30, Dialect.WARP3D}, Dialect.WARP3D: {Dialect.RELION30, Dialect.WARP3D}}
"""RELION 3.0 and Warp's 3D export share one layout; a carried per-particle rlnPixelSize makes a 3.0 file Warp's."""
SCOPE = Microscope(voltage_kv=300.0, cs_mm=2.7, amplitude_contrast=0.1)
"""Only for converting into RELION 3.0/3.1 from files that lack voltage/Cs/amplitude contrast (RELION 3.1.3
ignores optics without them)."""


def test_every_corpus_file_has_an_expectation():
    assert sorted(p.name for p in CORPUS.glob("*.star")) == sorted(EXPECTED)


@pytest.fixture(scope="module")
def raw():
    """name → (raw blocks, coordinate pixel per row, expected positions, centred?, rotations)."""
    out = {}
    for name in ACCEPTED:
        blocks = raw_blocks(CORPUS / name)
        pixel = raw_pixel(name, blocks)
        positions, centred = raw_positions(name, blocks, pixel)
        out[name] = (blocks, pixel, positions, centred, raw_rotations(name, blocks))
    return out


def implied_sizes(table, positions_angst: np.ndarray, pixel: np.ndarray, centred: bool) -> dict[str, tuple]:
    """A tomogram size (px at the coordinate pixel size) per name that holds every particle: what a user would
    give where the corner and centred frames meet."""
    names = table.poses.tomo_names.astype(str)
    sizes = {}
    for name in np.unique(names):
        rows = names == name
        extent = np.abs(positions_angst[rows]).max(axis=0) / pixel[rows].min()
        sizes[name] = tuple(int(v) for v in (2 * np.ceil(extent) + 2 if centred else np.ceil(extent) + 2))
    return sizes


def to_frame(positions_angst: np.ndarray, centred: bool, frame: PositionFrame, names: np.ndarray,
             sizes: dict | None, pixel: np.ndarray | None) -> np.ndarray:
    """Expected positions in ``frame``: centre = (N // 2) · pixel (``docs/conventions.md``)."""
    if (frame == PositionFrame.CENTRED) == centred:
        return positions_angst
    centre = np.array([[s // 2 for s in sizes[str(n)]] for n in names], dtype=float) * pixel[:, None]
    return positions_angst - centre if centred is False else positions_angst + centre


def assert_same_rows(table, positions_angst, rotations, label: str) -> None:
    assert len(table) == len(positions_angst), label
    np.testing.assert_allclose(table.poses.positions_angst, positions_angst, atol=1e-3, err_msg=label)
    np.testing.assert_allclose(euler_to_matrix(table.poses.euler_zyz_deg), rotations, atol=1e-6, err_msg=label)


@pytest.mark.parametrize("name", ACCEPTED)
def test_accepted_file_reads_as_expected_dialect_and_positions_without_a_tomogram_size(name, raw):
    """No tomogram size, no pixel size: the file's own frame (corner Å, or centred Å for RELION 5)."""
    _, pixel, positions, centred, rotations = raw[name]
    table = read_particle_star(CORPUS / name)
    assert table.dialect == Dialect(EXPECTED[name].dialect), EXPECTED[name].why
    assert table.frame == (PositionFrame.CENTRED if centred else PositionFrame.CORNER)
    assert_same_rows(table, positions, rotations, name)
    if pixel is not None and not isinstance(EXPECTED[name].pixel, float):
        np.testing.assert_allclose(table.coord_pixel_size_angst, pixel, rtol=1e-9)


def _round_trip_args(table, target: Dialect, sizes: dict, source_corner: bool) -> dict:
    target_corner = target in CORNER_DIALECTS
    return {"tomo_shape_px": sizes if target_corner != source_corner else None,
            "microscope": SCOPE if target in (Dialect.RELION30, Dialect.RELION31) else None}


@pytest.mark.parametrize("target", list(Dialect), ids=str)
@pytest.mark.parametrize("name", ACCEPTED)
def test_accepted_file_round_trips_through_every_dialect(name, target, raw, tmp_path):
    """source → target → source: count, positions (1e-3 Å), rotations (1e-6) and unknown columns as read."""
    _, raw_px, positions, centred, rotations = raw[name]
    table = read_particle_star(CORPUS / name, coord_pixel_size_angst=EXPECTED[name].pixel
                               if isinstance(EXPECTED[name].pixel, float) else None)
    pixel = table.coord_pixel_size_angst
    if pixel is None:  # RELION 5 without a pixel size: only the centred dialect can be written
        with pytest.raises(InputError, match="pixel size"):
            write_particle_star(table, tmp_path / "mid.star", target)
        return
    sizes = implied_sizes(table, positions, pixel, centred)
    source = table.dialect
    write_particle_star(table, tmp_path / "mid.star", target, **_round_trip_args(table, target, sizes, not centred))
    middle = read_particle_star(tmp_path / "mid.star")
    names = table.poses.tomo_names
    assert_same_rows(middle, to_frame(positions, centred, middle.frame, names, sizes, pixel), rotations,
                     f"{name} as {target}")
    if middle.coord_pixel_size_angst is None:  # M species tables carry no pixel size: the user gives it back
        middle = replace(middle, coord_pixel_size_angst=pixel)
    write_particle_star(middle, tmp_path / "back.star", source,
                        **_round_trip_args(middle, source, sizes, middle.frame == PositionFrame.CORNER))
    back = read_particle_star(tmp_path / "back.star", coord_pixel_size_angst=EXPECTED[name].pixel
                              if isinstance(EXPECTED[name].pixel, float) else None)
    assert back.dialect in SAME_LAYOUT.get(source, {source})
    assert_same_rows(back, positions, rotations, f"{name} {source} -> {target} -> {source}")
    kept = table.extras.columns.difference(["rlnCoordinateX", "rlnCoordinateY", "rlnCoordinateZ"]
                                           if source == Dialect.RELION5 else [])
    for column in kept:
        assert per_particle_text(back, column) == list(table.extras[column]), \
            f"{column} lost or changed on {source} -> {target} -> {source}"


def per_particle_text(table, column: str) -> list[str] | None:
    """Text of ``column`` per particle: a particle column, or an optics column through the particle's group."""
    if column in table.extras.columns:
        return list(table.extras[column])
    if table.optics is not None and column in table.optics.columns:
        by_group = dict(zip(table.optics["rlnOpticsGroup"].astype(int), table.optics[column]))
        return [by_group[g] for g in table.optics_group]
    return None


def _jittered_copy(name: str, raw, path: Path, rng: np.random.Generator) -> int:
    """Copy of the file with every particle moved 2 Å in a random direction and 10 % of rows (at least one)
    removed, written with ``starfile``; returns the number of rows kept."""
    blocks, pixel, _, centred, _ = raw[name]
    blocks = {k: v.copy() for k, v in blocks.items()}
    particles = raw_particles(blocks)
    n = len(particles)
    step = rng.normal(size=(n, 3))
    step *= 2.0 / np.linalg.norm(step, axis=1, keepdims=True)
    for k, axis in enumerate("XYZ"):
        column = f"rlnCenteredCoordinate{axis}Angst" if centred else f"rlnCoordinate{axis}"
        particles[column] = particles[column].astype(float) + (step[:, k] if centred else step[:, k] / pixel)
    removed = rng.choice(n, size=max(1, round(0.1 * n)), replace=False)
    key = "particles" if "particles" in blocks else ""
    blocks[key] = particles.drop(index=particles.index[removed])
    starfile.write({k: (v.iloc[0].to_dict() if k == "general" else v) for k, v in blocks.items()}, path,
                   overwrite=True, float_format="%.6f")
    return n - len(removed)


@pytest.mark.parametrize("name", ACCEPTED)
def test_intersect_with_itself_and_a_jittered_copy_gives_the_known_counts(name, raw, tmp_path):
    """With itself: all in both. With a copy moved 2 Å and 10 % removed (tolerance 3 Å): the kept rows in both,
    the removed ones only old. No tomogram size is given: both files are in the same frame."""
    n = len(raw[name][2])
    summary = intersect_star_files(CORPUS / name, CORPUS / name, 3.0, tmp_path / "self", log=lambda _: None)
    assert (summary["in_both"], summary["only_old"], summary["only_new"]) == (n, 0, 0)
    kept = _jittered_copy(name, raw, tmp_path / "jittered.star", np.random.default_rng(7))
    summary = intersect_star_files(CORPUS / name, tmp_path / "jittered.star", 3.0, tmp_path / "jit",
                                   log=lambda _: None)
    assert (summary["in_both"], summary["only_old"], summary["only_new"]) == (kept, n - kept, 0)
    written = read_particle_star(tmp_path / "jit" / "selected.star")
    assert len(written) == n and written.dialect == Dialect(EXPECTED[name].dialect)


@pytest.mark.parametrize("name", REFUSED)
def test_refused_file_message_names_the_file_and_what_is_missing(name):
    with pytest.raises(InputError) as error:
        read_particle_star(CORPUS / name)
    message = str(error.value)
    assert name in message
    for word in EXPECTED[name].words:
        assert word in message, f"{word!r} not in {message!r} ({EXPECTED[name].why})"


@pytest.mark.parametrize("name", REFUSED)
def test_convert_refuses_with_exit_code_2_naming_the_file(name, tmp_path, capsys):
    assert main(["convert", str(CORPUS / name), "--to", "3.1", str(tmp_path / "out.star")]) == 2
    assert name in capsys.readouterr().err


def test_corner_dialect_conversions_need_no_tomogram_size_and_are_exact(tmp_path):
    """3.0 → 3.1 → 4 → Warp 3D → 3.0 without --tomo-size: same coordinates as the input, to the printed digit."""
    source = CORPUS / "teamtomo__starfile__tests__data__one_loop.star"
    path = source
    for step, dialect in enumerate(("3.1", "4", "warp3d", "3.0")):
        out = tmp_path / f"{step}.star"
        extra = ["--voltage", "300", "--cs", "2.7", "--amplitude-contrast", "0.1"] if dialect == "3.1" else []
        assert main(["convert", str(path), "--to", dialect, str(out), *extra]) == 0
        path = out
    first, last = read_star_text(source)[0][""].table, read_star_text(path)[0][""].table
    for axis in "XYZ":
        np.testing.assert_allclose(last[f"rlnCoordinate{axis}"].astype(float),
                                   first[f"rlnCoordinate{axis}"].astype(float), atol=5e-7)


def test_centred_to_corner_conversion_asks_for_the_tomogram_size_and_says_why(tmp_path, capsys):
    source = CORPUS / "turonova__cryoCAT__tests__test_data__motl_data__relion5__clean__R5_tutorial_run_data.star"
    assert main(["convert", str(source), "--to", "3.1", str(tmp_path / "out.star")]) == 2
    err = capsys.readouterr().err
    assert "--tomo-size" in err and "centre" in err


def test_intersect_writes_a_warp_relion31_file_without_amplitude_contrast_in_its_own_dialect(tmp_path):
    """Defect 1: the output carries what the input carried (no microscope flag exists or is needed)."""
    source = CORPUS / "turonova__cryoCAT__tests__test_data__relion_3.1_optics.star"
    assert main(["intersect", "--old", str(source), "--new", str(source), "--tolerance-angst", "3",
                 "--out", str(tmp_path / "o")]) == 0
    blocks, _ = read_star_text(tmp_path / "o" / "in_both.star")
    original, _ = read_star_text(source)
    assert list(blocks["optics"].table.columns) == list(original["optics"].table.columns)
    assert len(blocks["particles"].table) == len(original["particles"].table)


@pytest.mark.parametrize("path", [
    "turonova__cryoCAT__tests__test_data__relion_3.1_optics.star",
    "chanzuckerberg__cryoet-data-portal-backend__test_infra__test_files__input_bucket__20002__annotations__"
    "tomoman_relion_star.star"])
def test_pixel_size_column_survives_a_trip_through_relion30(path, tmp_path):
    """Defect 3: rlnPixelSize (per particle) is still there after X → 3.0 → X."""
    table = read_particle_star(CORPUS / path)
    write_particle_star(table, tmp_path / "a.star", "3.0", microscope=SCOPE)
    middle = read_particle_star(tmp_path / "a.star")
    write_particle_star(middle, tmp_path / "b.star", table.dialect, microscope=SCOPE)
    blocks, _ = read_star_text(tmp_path / "b.star")
    particles = blocks["particles"].table
    assert "rlnPixelSize" in particles.columns
    np.testing.assert_allclose(particles["rlnPixelSize"].astype(float), table.coord_pixel_size_angst
                               if table.dialect == Dialect.RELION4 else raw_particles(
                                   raw_blocks(CORPUS / path))["rlnPixelSize"].astype(float))


@pytest.mark.parametrize("name", [n for n in ACCEPTED if EXPECTED[n].pixel is not None])
def test_positions_fit_the_tomogram_the_file_implies(name, raw):
    """Defect 4: as read (no pixel size given), positions span a plausible tomogram (0.3-12 µm across,
    0.05-2.5 µm thick, from -1 µm) — at WarpTools' rlnTomoTiltSeriesPixelSize they would be 5-7x too small."""
    positions = read_particle_star(CORPUS / name).poses.positions_angst
    centred = raw[name][3]
    if len(positions) < 20:
        pytest.skip(f"{name}: {len(positions)} particles do not span a tomogram")
    span = positions.max(axis=0) - positions.min(axis=0)
    assert 3000 <= max(span[:2]) <= 120000, (name, span)
    assert 500 <= span[2] <= 25000, (name, span)
    if not centred:
        assert positions.min() >= -10000, name
