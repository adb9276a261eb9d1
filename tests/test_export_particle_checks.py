"""The export's particle checks: particles outside the tomogram or whose box lies in too few tilt images are skipped
(counted, listed with their input row and reason), exact duplicates are counted with a warning or dropped, and the
bytes to write are estimated for the free-space check."""

from __future__ import annotations

import dataclasses
import json

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
from test_reconstruct import BOX, PIXEL, make_tilt_series, options, poses

from mspecies.cli import main
from mspecies.cli.export_checks import (
    check_one_optics_group,
    exclusion_lines,
    export_bytes,
    first_identical,
    plan_job,
    visible_tilt_counts,
)
from mspecies.cli.export_files import EXCLUDED_TSV
from mspecies.common.types import InputError, Microscope, ParticlePoses
from mspecies.synth.dataset import generate_dataset

SHAPE_XYZ = (160, 160, 100)  # the test tilt series' 160 x 160 px images, at PIXEL


def test_visible_tilts_fall_from_all_to_none_as_the_box_crosses_the_image_edge():
    tilt_series = make_tilt_series(n_tilts=5)  # 160 x 160 px images at PIXEL, tilt axis rotated ~17° by the .xf
    towards_edge = np.array([[0.0, y, 0.0] for y in (0.0, 150.0, 250.0, 300.0, 400.0, 10_000.0)])
    counts = visible_tilt_counts(tilt_series, towards_edge, BOX, PIXEL)
    assert counts[0] == 5 and counts[-1] == 0 and np.all(np.diff(counts) <= 0) and 0 < counts[2] < 5


def test_plan_job_skips_particles_outside_and_lists_them():
    tilt_series = make_tilt_series(n_tilts=5)
    # inside the tomogram (±320 Å) but its box crosses the image edge in every tilt; outside the tomogram
    particles = poses([[0.0, 0.0, 0.0], [0.0, 310.0, 0.0], [0.0, -10_000.0, 0.0], [20.0, 12.0, -8.0]])
    job = plan_job(tilt_series, particles, SHAPE_XYZ, options(), min_visible_tilts=1, drop_duplicates=False)
    assert len(job.particles) == 2
    assert np.allclose(job.particles.positions_angst, particles.positions_angst[[0, 3]])
    assert job.excluded["particle"].tolist() == [1, 2]
    assert job.excluded["reason"].tolist() == ["box inside the images in fewer than 1 of 5 used tilts",
                                               "outside the tomogram's x-y area"]


def test_particles_beyond_the_tomogram_thickness_are_exported_with_a_warning_naming_them():
    """z is not a reason to skip (thickness is often a guess), but a z far beyond it (a wrong coordinate pixel
    size, binning or origin) must not pass silently: the warning names the input rows."""
    tilt_series = make_tilt_series(n_tilts=5)
    half_thickness = 0.5 * SHAPE_XYZ[2] * PIXEL
    particles = poses([[0.0, 0.0, 0.0], [0.0, 0.0, 5.0 * half_thickness], [0.0, 0.0, -half_thickness - 1.0],
                       [0.0, 0.0, half_thickness - 1.0]])
    job = plan_job(tilt_series, particles, SHAPE_XYZ, options(), min_visible_tilts=1, drop_duplicates=False)
    assert len(job.particles) == 4 and job.beyond_z_rows.tolist() == [1, 2]
    warning = [line for line in exclusion_lines(job) if "thickness" in line]
    assert len(warning) == 1 and warning[0].startswith("warning: ") and "input rows 1, 2" in warning[0]
    inside = plan_job(tilt_series, particles.subset(np.array([True, False, False, True])), SHAPE_XYZ, options(),
                      min_visible_tilts=1, drop_duplicates=False)
    assert not any("thickness" in line for line in exclusion_lines(inside))


def test_a_stricter_minimum_of_visible_tilts_skips_edge_particles():
    tilt_series = make_tilt_series(n_tilts=5)  # tilts -60 .. 60
    # x + box/2 leaves the image at 0° but stays inside at ±60° (x cos 60° = x / 2)
    edge = poses([[300.0, 0.0, 0.0]])
    visible = visible_tilt_counts(tilt_series, edge.positions_angst, BOX, PIXEL)[0]
    assert 0 < visible < 5
    kept = plan_job(tilt_series, edge, SHAPE_XYZ, options(), min_visible_tilts=int(visible), drop_duplicates=False)
    skipped = plan_job(tilt_series, edge, SHAPE_XYZ, options(), min_visible_tilts=int(visible) + 1,
                       drop_duplicates=False)
    assert len(kept.particles) == 1 and len(skipped.particles) == 0


def test_duplicates_are_found_per_tomogram_and_dropped_on_request():
    positions = np.array([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [5.0, 6.0, 7.0], [1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    angles = np.array([[10.0, 20.0, 30.0]] * 4 + [[10.0, 20.0, 31.0]])
    particles = ParticlePoses(positions, angles, np.array(["A", "A", "A", "B", "A"], dtype=object))
    assert first_identical(particles).tolist() == [-1, 0, -1, -1, -1]
    tilt_series = make_tilt_series(n_tilts=5)
    same_tomo = ParticlePoses(positions, angles, np.array(["TS"] * 5, dtype=object))
    warned = plan_job(tilt_series, same_tomo, SHAPE_XYZ, options(), min_visible_tilts=1, drop_duplicates=False)
    assert warned.n_duplicates == 2 and len(warned.particles) == 5 and warned.excluded.empty
    dropped = plan_job(tilt_series, same_tomo, SHAPE_XYZ, options(), min_visible_tilts=1, drop_duplicates=True)
    assert len(dropped.particles) == 3 and dropped.n_duplicates == 0
    assert dropped.excluded["reason"].tolist() == ["duplicate of particle 0", "duplicate of particle 0"]


def test_export_bytes_count_volumes_ctfs_and_headers():
    tilt_series = make_tilt_series(n_tilts=5)
    job = plan_job(tilt_series, poses([[0.0, 0.0, 0.0]] * 3), SHAPE_XYZ, options(), min_visible_tilts=1,
                   drop_duplicates=False)
    n = BOX
    assert export_bytes([job]) == 3 * ((n**3 + n * n * (n // 2 + 1)) * 4 + 2 * 1024 + 400)


@pytest.fixture(scope="module")
def imod_inputs(tmp_path_factory) -> tuple[list[str], str]:
    """IMOD-style export arguments of a synthetic tilt series (4 particles) and its particle STAR's text."""
    folder = tmp_path_factory.mktemp("particle_checks")
    manifest_path = generate_dataset(folder / "data", n_particles=4, n_tilts=11, box_px=24, image_shape_yx=(128, 128),
                                     thickness_angst=300.0, snr=None)
    entry = json.loads(manifest_path.read_text())["tilt_series"][0]
    files = {role: str(manifest_path.parent / path) for role, path in entry["files"].items()}
    nz, ny, nx = entry["unbinned_tomogram_shape_zyx"]
    arguments = ["export", "--stack", files["stack"], "--tlt", files["tlt"], "--xf", files["xf"], "--defocus",
                 files["defocus"], "--dose", files["dose"], "--pixel-size", "4", "--tomo-shape", str(nx), str(ny),
                 str(nz), "--ts-id", "TS_01", "--box", "24", "--diameter", "60", "--backend", "numpy"]
    return arguments, (manifest_path.parent / "particles.star").read_text()


def with_rows(text: str, rows: list[str]) -> str:
    return text.rstrip("\n") + "\n" + "\n".join(rows) + "\n"


def test_the_cli_skips_particles_outside_warns_on_duplicates_and_lists_them(imod_inputs, tmp_path, capsys):
    arguments, text = imod_inputs
    first = next(line for line in text.splitlines() if line.startswith("TS_01"))
    star = tmp_path / "particles.star"
    star.write_text(with_rows(text, ["TS_01\tTS_01/TS_01.mrc\t64\t1\t37\t0\t0\t0\t1",     # box crosses the edge
                                     "TS_01\tTS_01/TS_01.mrc\t-40\t-30\t30\t0\t0\t0\t1",  # negative coordinates
                                     first]))                                             # duplicate of row 0
    assert main(arguments + ["--particles", str(star), "--out", str(tmp_path / "kept")]) == 0
    captured = capsys.readouterr()
    assert "skipped 1 particle(s), box inside the images in fewer than 1 of 11 used tilts: input rows 4" in captured.out
    assert "skipped 1 particle(s), outside the tomogram's x-y area: input rows 5" in captured.out
    assert "1 particle(s) repeat an earlier one exactly" in captured.err and "--drop-duplicates" in captured.err
    exported = starfile.read(tmp_path / "kept" / "particles.star", always_dict=True)["particles"]
    assert len(exported) == 5
    excluded = pd.read_csv(tmp_path / "kept" / EXCLUDED_TSV, sep="\t")
    assert excluded["particle"].tolist() == [4, 5] and set(excluded["ts_id"]) == {"TS_01"}
    assert main(arguments + ["--particles", str(star), "--out", str(tmp_path / "dropped"), "--drop-duplicates"]) == 0
    assert len(starfile.read(tmp_path / "dropped" / "particles.star", always_dict=True)["particles"]) == 4
    excluded = pd.read_csv(tmp_path / "dropped" / EXCLUDED_TSV, sep="\t")
    assert excluded["particle"].tolist() == [4, 5, 6] and excluded["reason"].iloc[2] == "duplicate of particle 0"


def test_the_cli_refuses_when_every_particle_is_outside(imod_inputs, tmp_path, capsys):
    arguments, text = imod_inputs
    header = text[:text.index("\nTS_01")]
    star = tmp_path / "outside.star"
    star.write_text(with_rows(header, ["TS_01\tTS_01/TS_01.mrc\t-4000\t60\t30\t0\t0\t0\t1"] * 2))
    assert main(arguments + ["--particles", str(star), "--out", str(tmp_path / "out")]) == 2
    assert "all 2 particles were excluded" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def two_pixel_sizes(tmp_path_factory):
    """A manifest of two tilt series whose second was recorded at 1.5× the first's pixel size (4 and 6 Å)."""
    folder = tmp_path_factory.mktemp("two_pixel_sizes")
    manifest_path = generate_dataset(folder / "data", n_tomograms=2, n_particles=6, n_tilts=11, box_px=24,
                                     image_shape_yx=(128, 128), thickness_angst=300.0, snr=None)
    manifest = json.loads(manifest_path.read_text())
    manifest["tilt_series"][1]["pixel_size_angst"] *= 1.5
    manifest_path.write_text(json.dumps(manifest))
    return manifest_path, [entry["ts_id"] for entry in manifest["tilt_series"]]


def test_tilt_series_of_different_pixel_sizes_are_refused_for_one_optics_group(two_pixel_sizes, tmp_path, capsys):
    """particles.star has one optics group: exporting each tilt series at its own pixel size would give RELION the
    first one's pixel size for all of them. The command names the tilt series and the flag that fixes it."""
    manifest_path, (first, second) = two_pixel_sizes
    arguments = ["export", "--manifest", str(manifest_path), "--box", "24", "--diameter", "60", "--backend", "numpy"]
    assert main(arguments + ["--out", str(tmp_path / "refused")]) == 2
    error = capsys.readouterr().err
    assert f"different pixel sizes ({first} 4 Å, {second} 6 Å)" in error and "--pixel-size-out 6 (or more)" in error
    assert not (tmp_path / "refused").exists()
    assert main(arguments + ["--out", str(tmp_path / "one"), "--pixel-size-out", "6"]) == 0
    blocks = starfile.read(tmp_path / "one" / "particles.star", always_dict=True)
    assert blocks["optics"]["rlnImagePixelSize"].tolist() == [6.0]
    assert set(blocks["particles"]["rlnImageName"].str.split("/").str[0]) == {first, second}
    for name in blocks["particles"]["rlnImageName"].tolist() + blocks["particles"]["rlnCtfImage"].tolist():
        with mrcfile.open(tmp_path / "one" / name, header_only=True) as mrc:
            assert mrc.voxel_size.tolist() == pytest.approx([6.0] * 3)
    assert main(arguments + ["--out", str(tmp_path / "alone"), "--ts-id", second]) == 0
    alone = starfile.read(tmp_path / "alone" / "particles.star", always_dict=True)["optics"]
    assert alone["rlnImagePixelSize"].tolist() == [6.0]


def test_tilt_series_of_other_optics_or_pixel_sizes_within_rounding_are_told_apart():
    tilt_series = make_tilt_series(n_tilts=5)
    pixel = tilt_series.pixel_size_angst
    close = dataclasses.replace(tilt_series, ts_id="TS_02", pixel_size_angst=pixel * 1.00001)
    check_one_optics_group([(tilt_series, pixel), (close, pixel * 1.00001)], "--manifest m.json")  # within rounding
    check_one_optics_group([(tilt_series, pixel)], "--manifest m.json")
    other = dataclasses.replace(close, microscope=Microscope(200.0, 2.7, 0.1))
    with pytest.raises(InputError, match=r"TS_02 was recorded with other optics than TS \(200 kV, Cs 2\.7 mm, "
                                         r"amplitude contrast 0\.1 against"):
        check_one_optics_group([(tilt_series, pixel), (other, pixel)], "--manifest m.json")
    larger = dataclasses.replace(close, pixel_size_angst=2 * pixel)
    with pytest.raises(InputError, match="--manifest m.json: its tilt series have different pixel sizes"):
        check_one_optics_group([(tilt_series, pixel), (larger, 2 * pixel)], "--manifest m.json")
    check_one_optics_group([(tilt_series, 2 * pixel), (larger, 2 * pixel)], "--manifest m.json")  # --pixel-size-out
    odd = [(dataclasses.replace(tilt_series, ts_id=f"TS_{k}"), 4.1234549 + k) for k in range(6)]
    with pytest.raises(InputError, match=r"\(TS_0 4\.12345 Å, TS_1 5\.12345 Å, TS_2 6\.12345 Å, TS_3 7\.12345 Å, "
                                         r"TS_4 8\.12345 Å and 1 more\).*--pixel-size-out 9\.1235 \(or more\)"):
        check_one_optics_group(odd, "--manifest m.json")
