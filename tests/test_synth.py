"""The synthetic dataset: phantom chirality, exact sub-pixel projections, polarity, files and self-check."""

import dataclasses
import json
import shutil

import numpy as np
import pytest
from scipy import ndimage

from mspecies import cli
from mspecies.common.types import Microscope
from mspecies.core import geometry
from mspecies.core.ctf import ctf_2d, rfft_frequencies
from mspecies.formats import dose, imod, serialem
from mspecies.formats.mrc import read_mrc
from mspecies.formats.star import read_relion31_particles
from mspecies.synth import check as synth_check
from mspecies.synth import dataset as synth
from mspecies.synth import manifest as synth_manifest
from mspecies.synth.phantom import (
    BlobModel,
    make_blob_model,
    make_phantom_map,
    mirrored,
    model_correlation,
)

SMALL = dict(n_particles=10, n_tilts=21, image_shape_yx=(256, 256), box_px=32, pixel_size_angst=8.0,
             thickness_angst=800.0, tomogram_binning=2, snr=0.05)


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    return synth.generate_dataset(tmp_path_factory.mktemp("synth") / "data", seed=7, **SMALL)


def _map_cc(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float(np.sum(a * b) / np.sqrt(np.sum(a * a) * np.sum(b * b)))


def test_phantom_is_chiral_mirror_never_matches_under_any_rotation():
    """A chiral map cannot be rotated onto its mirror image. Over 20 000 random rotations the best analytic
    correlation of the model with its rotated mirror stays below 0.75, while the model matches itself (CC 1)."""
    model = make_blob_model(64, 4.0)
    rotations = synth.random_rotation_matrices(20000, np.random.default_rng(0))
    mirror = mirrored(model)
    best_mirror = max(model_correlation(model, mirror.rotated(r)) for r in rotations)
    assert model_correlation(model, model) == pytest.approx(1.0)
    assert best_mirror < 0.75


def test_phantom_has_no_rotational_symmetry():
    """No rotation further than 30° from the identity maps the model onto itself (best CC < 0.75)."""
    model = make_blob_model(64, 4.0)
    rotations = synth.random_rotation_matrices(20000, np.random.default_rng(1))
    angles = np.arccos(np.clip((np.trace(rotations, axis1=1, axis2=2) - 1) / 2, -1, 1))
    assert max(model_correlation(model, model.rotated(r)) for r in rotations[angles > np.deg2rad(30)]) < 0.75


def test_phantom_map_matches_analytic_model_and_spans_about_sixty_percent_of_the_box():
    model = make_blob_model(64, 4.0)
    volume = make_phantom_map(64, 4.0)
    assert volume.shape == (64, 64, 64) and volume.dtype == np.float32
    mirror_map = np.roll(volume[::-1], 1, axis=0)  # z → −z about voxel N // 2
    assert _map_cc(volume, mirror_map) == pytest.approx(model_correlation(model, mirrored(model)), abs=0.03)
    extent = np.max(np.linalg.norm(model.centres_angst, axis=1) + 1.5 * model.sigmas_angst)
    assert 0.5 < 2 * extent / (64 * 4.0) < 0.7
    np.testing.assert_allclose(model.masses @ model.centres_angst, 0.0, atol=1e-6)


def test_dose_symmetric_order_follows_hagen_groups_of_two():
    angles = synth.tilt_angles(41, 60.0)
    order = synth.dose_symmetric_order(angles)
    by_acquisition = angles[np.argsort(order)]
    np.testing.assert_allclose(by_acquisition[:9], [0, 3, -3, -6, 6, 9, -9, -12, 12])
    assert sorted(order.tolist()) == list(range(41))


def _flat_ctf_tilt_series(seed: int):
    params = synth.SynthParameters(**SMALL)
    ts = synth.make_tilt_series(params, "TS_01", np.random.default_rng(seed))
    zeros = np.zeros(ts.n_tilts)
    ts = dataclasses.replace(ts, defocus_u_angst=zeros, defocus_v_angst=zeros,
                             microscope=Microscope(300.0, 0.0, 0.99999))
    return params, ts


def test_flat_ctf_settings_give_unit_transfer():
    fx, fy = rfft_frequencies((16, 16), 8.0)
    np.testing.assert_allclose(ctf_2d(fx, fy, 0.0, 0.0, 0.0, Microscope(300.0, 0.0, 0.99999)), 1.0, atol=1e-4)


def test_point_blob_lands_at_projected_subpixel_position_in_every_raw_tilt():
    params, ts = _flat_ctf_tilt_series(3)
    rng = np.random.default_rng(3)
    position = synth.place_particles(ts, 1, params, rng)
    euler = synth.random_euler_angles(1, rng)
    offset = np.array([[20.0, -12.0, 16.0]])
    model = BlobModel(offset, np.array([1.2 * params.pixel_size_angst]), np.array([1.0]))
    image = synth.simulate_noise_free(ts, position, euler, model, apply_dose=False)
    expected, _ = geometry.project_positions_to_tilts(position + offset @ geometry.euler_to_matrix(euler)[0].T, ts)
    yy, xx = np.mgrid[:image.shape[1], :image.shape[2]]
    errors = []
    for t in range(ts.n_tilts):
        ex, ey = expected[0, t]
        window = (xx - ex) ** 2 + (yy - ey) ** 2 <= 6**2
        weight = -image[t] * window  # dark blob
        centroid = np.array([np.sum(weight * xx), np.sum(weight * yy)]) / np.sum(weight)
        errors.append(np.linalg.norm(centroid - expected[0, t]))
    assert max(errors) < 0.05


def test_protein_is_dark_in_noise_free_raw_images():
    params = synth.SynthParameters(**SMALL)
    rng = np.random.default_rng(5)
    ts = synth.make_tilt_series(params, "TS_01", rng)
    positions = synth.place_particles(ts, 3, params, rng)
    image = synth.simulate_noise_free(ts, positions, synth.random_euler_angles(3, rng),
                                      make_blob_model(params.box_px, params.pixel_size_angst))
    raw, _ = geometry.project_positions_to_tilts(positions, ts)
    for t in range(ts.n_tilts):
        low = ndimage.gaussian_filter(image[t], 4.0)
        values = ndimage.map_coordinates(low, [raw[:, t, 1], raw[:, t, 0]], order=1)
        assert np.all(values < -0.2 * np.abs(low).max())


def test_same_seed_gives_identical_dataset_and_other_seed_differs(tmp_path):
    paths = [synth.generate_dataset(tmp_path / name, seed=seed, **SMALL) for name, seed in
             (("a", 1), ("b", 1), ("c", 2))]
    stacks = [read_mrc(p.parent / "TS_01" / "TS_01.mrc")[0] for p in paths]
    np.testing.assert_array_equal(stacks[0], stacks[1])
    assert not np.array_equal(stacks[0], stacks[2])
    manifests = [json.loads(p.read_text()) for p in paths[:2]]
    for manifest in manifests:
        manifest.pop("generation_seconds")
    assert manifests[0] == manifests[1]


def test_manifest_lists_existing_files_and_rebuilds_core_objects(small_dataset):
    manifest = synth_manifest.load_manifest(small_dataset)
    root = small_dataset.parent
    assert all((root / name).is_file() for name in manifest["files"])
    ts = synth_manifest.manifest_tilt_series(manifest, "TS_01")
    np.testing.assert_allclose(imod.read_xf(root / "TS_01" / "TS_01.xf"), ts.xf, atol=2e-3)
    np.testing.assert_allclose(imod.read_tlt(root / "TS_01" / "TS_01.tlt"), ts.tilt_angles_deg, atol=1e-3)
    defocus = imod.read_imod_defocus(root / "TS_01" / "TS_01.defocus")
    np.testing.assert_allclose(defocus["defocus_u_angst"], ts.defocus_u_angst, atol=0.1)
    doses = dose.read_dose_list(root / "TS_01" / "TS_01_dose.txt")
    np.testing.assert_allclose(doses.accumulated_e_per_angst2, ts.dose_e_per_angst2, atol=1e-3)
    mdoc = serialem.read_mdoc(root / "TS_01" / "TS_01.mrc.mdoc")
    assert mdoc["header"]["PixelSpacing"] == SMALL["pixel_size_angst"]
    stamps = [s["DateTime"] for s in sorted(mdoc["sections"], key=lambda s: ts.acquisition_order[s["ZValue"]])]
    assert stamps == sorted(stamps)
    stack, pixel = read_mrc(ts.stack_path)
    assert stack.shape == (21, 256, 256) and pixel == pytest.approx(8.0)
    assert len(synth_manifest.manifest_particles(manifest)) == SMALL["n_particles"]


def test_star_coordinates_convert_back_to_manifest_positions(small_dataset):
    manifest = synth_manifest.load_manifest(small_dataset)
    optics, particles = read_relion31_particles(small_dataset.parent / "particles.star")
    assert optics["rlnImagePixelSize"].iloc[0] == pytest.approx(SMALL["pixel_size_angst"])
    nz, ny, nx = manifest["tilt_series"][0]["unbinned_tomogram_shape_zyx"]
    centred = particles[["rlnCoordinateX", "rlnCoordinateY", "rlnCoordinateZ"]].to_numpy(float) - [nx // 2, ny // 2,
                                                                                                     nz // 2]
    poses = synth_manifest.manifest_particles(manifest)
    np.testing.assert_allclose(centred * SMALL["pixel_size_angst"], poses.positions_angst, atol=1e-3)
    np.testing.assert_allclose(particles[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy(float),
                               poses.euler_zyz_deg, atol=1e-4)


def test_tomogram_shows_dark_particles_at_their_positions(small_dataset):
    manifest = synth_manifest.load_manifest(small_dataset)
    entry = manifest["tilt_series"][0]
    tomogram, pixel = read_mrc(small_dataset.parent / entry["files"]["tomogram"])
    assert list(tomogram.shape) == entry["tomogram_shape_zyx"] and pixel == entry["tomogram_pixel_size_angst"]
    smooth = ndimage.gaussian_filter(tomogram.astype(np.float64), 3.0)
    index = synth_manifest.manifest_particles(manifest).positions_angst / pixel + np.array(smooth.shape[::-1]) // 2
    values = ndimage.map_coordinates(smooth, index[:, ::-1].T, order=1)
    assert np.mean(values) < smooth.mean() - 2 * smooth.std()


def test_self_check_passes_on_small_noisy_dataset(small_dataset):
    result = synth_check.self_check(small_dataset)
    assert result["passed"], result
    assert result["peak_offset_px"] < 1.0
    assert result["displaced_peak_offset_px"] > 6.0
    assert result["contrast_ratio_flipped"] > 1.5
    assert json.loads((small_dataset.parent / "self_check.json").read_text())["passed"]


def test_self_check_fails_when_star_positions_are_displaced(small_dataset, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(small_dataset.parent, copy)
    star = copy / "particles.star"
    optics, particles = read_relion31_particles(star)
    particles["rlnCoordinateX"] += 8.0
    from mspecies.formats.star import write_relion31_particles

    write_relion31_particles(star, optics, particles)
    result = synth_check.self_check(copy / "manifest.json")
    assert not result["passed"]
    assert result["peak_offset_px"] > 6.0


@pytest.mark.parametrize(("arguments", "fragment"), [
    (["--box", "63"], "box_px"),
    (["--n-particles", "0"], "n_particles"),
    (["--pixel-size", "0"], "pixel_size_angst"),
    (["--snr", "abc"], "--snr"),
    (["--n-tilts", "x"], "--n-tilts"),
])
def test_cli_synth_bad_input_exits_2_with_message(tmp_path, capsys, arguments, fragment):
    assert cli.main(["synth", "--out", str(tmp_path / "o"), *arguments]) == 2
    assert fragment in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_synth_output_dir_that_is_a_file_exits_2(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    assert cli.main(["synth", "--out", str(target)]) == 2
    assert "out_dir" in capsys.readouterr().err


def test_cli_synth_generates_and_self_checks(tmp_path, capsys):
    code = cli.main(["synth", "--out", str(tmp_path / "d"), "--seed", "2", "--n-particles", "8", "--n-tilts", "21",
                     "--box", "32", "--pixel-size", "8", "--image-size", "256", "256", "--thickness", "800",
                     "--binning", "2", "--snr", "inf"])
    out = capsys.readouterr().out
    assert code == 0 and "manifest:" in out and '"passed": true' in out
    assert json.loads((tmp_path / "d" / "manifest.json").read_text())["snr"] is None
