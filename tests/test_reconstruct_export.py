"""Memory plan, volume checks, files and STAR of the export; the ``export`` CLI's handling of bad input."""

import json
import tracemalloc

import numpy as np
import pandas as pd
import pytest
import starfile
from test_reconstruct import BOX, PIXEL, make_tilt_series, options, poses

from mspecies.cli import main
from mspecies.cli.export_files import export_tilt_series, relion_coordinates_px
from mspecies.common.types import InputError, Microscope
from mspecies.core.memory import BATCH_WORK_BYTES, FULL_BATCH, estimate_bytes, plan_batches
from mspecies.core.reconstruct import CTF_METHODS, ReconstructionError, TiltSeriesEngine, check_volume
from mspecies.formats.mrc import read_mrc
from mspecies.formats.relion_subtomo import write_subtomo_star
from mspecies.synth.dataset import generate_dataset


def test_memory_plan_batches_within_the_budget_and_refuses_with_numbers():
    fixed, per_particle = estimate_bytes(128, 64, 41, 41 * 512 * 512, shared_geometry=True)
    assert fixed > 41 * 512 * 512 * 4 and per_particle > 128**3 * 4
    plan = plan_batches(128, 64, 41, 41 * 512 * 512, shared_geometry=True, budget_bytes=fixed + 3 * per_particle)
    assert plan.batch_size == 3 and plan.total_bytes <= plan.budget_bytes
    refusal = (r"memory: one particle needs [\d.]+ MiB .* budget is [\d.]+ MiB; "
               r"raise the memory budget to at least [\d.]+ GB")
    with pytest.raises(InputError, match=refusal):
        plan_batches(128, 64, 41, 41 * 512 * 512, shared_geometry=True, budget_bytes=fixed)
    _, own = estimate_bytes(128, 64, 41, 0, shared_geometry=False)
    assert own > per_particle  # pre-rotation builds one insertion per particle
    _, direct = estimate_bytes(128, 64, 41, 41 * 512 * 512, shared_geometry=True, padded_ctf=False)
    assert direct < per_particle  # the direct 3D CTF needs no padded CTF spectrum


@pytest.mark.parametrize(("padded", "box", "expected"), [(128, 64, 16), (256, 128, 16), (384, 192, 6), (512, 256, 4)])
def test_batches_of_large_particles_stop_growing_at_the_work_bytes_but_keep_four(padded, box, expected):
    geometry = {"shared_geometry": True, "padded_ctf": False, "by_lines": True}
    fixed, per_particle = estimate_bytes(padded, box, 41, 41 * 1024 * 1024, **geometry)
    plan = plan_batches(padded, box, 41, 41 * 1024 * 1024, budget_bytes=fixed + 64 * per_particle, max_batch=16,
                        **geometry)
    assert plan.batch_size == expected == min(16, max(FULL_BATCH, BATCH_WORK_BYTES // per_particle))
    assert plan.describe().endswith("larger batches would not be faster at this size") == (expected < 16)
    small_budget = plan_batches(padded, box, 41, 41 * 1024 * 1024, budget_bytes=fixed + 3 * per_particle,
                                max_batch=16, **geometry)
    assert small_budget.batch_size == 3  # the budget still rules below the cap
    assert small_budget.describe().endswith("MiB budget")


@pytest.mark.parametrize("prerotate", [False, True])
@pytest.mark.parametrize("method", CTF_METHODS)
def test_the_memory_plan_covers_what_the_engine_allocates(method, prerotate):
    """Peak of the NumPy allocations (tracemalloc) while a tilt series is exported ≤ the plan's estimate."""
    tilt_series = make_tilt_series(n_tilts=41, microscope=Microscope(300.0, 2.7, 0.07), defocus_angst=25000.0,
                                   shape=(192, 192))
    stack = np.random.default_rng(0).normal(size=(41, 192, 192)).astype(np.float32)
    particles = poses(np.random.default_rng(1).uniform(-100, 100, (12, 3)))
    if prerotate:  # Numba compiles (or loads) the kernels at their first call: not the export's memory
        small = options(ctf_method=method, prerotate=True, box_px=16, particle_diameter_angst=40.0)
        next(TiltSeriesEngine.create(tilt_series, stack, small).reconstruct(particles))
    tracemalloc.start()
    try:
        engine = TiltSeriesEngine.create(tilt_series, stack, options(ctf_method=method, max_batch=6,
                                                                     prerotate=prerotate))
        assert sum(1 for _ in engine.reconstruct(particles)) == 12
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert engine.plan.batch_size == 6 and peak <= engine.plan.total_bytes

def test_engine_refuses_a_budget_too_small_before_any_work():
    tilt_series = make_tilt_series()
    with pytest.raises(InputError, match="memory"):
        export_tilt_series(tilt_series, np.zeros((1, 2, 2)), poses([[0, 0, 0]]), options(memory_budget_bytes=1000),
                           "/nonexistent-never-created", tomogram_shape_xyz_px=(160, 160, 100))

@pytest.mark.parametrize("volume", [np.zeros((4, 4, 4)), np.full((4, 4, 4), 2.5),
                                    np.where(np.eye(4)[None] > 0, np.nan, 1.0)])
def test_check_volume_rejects_zero_constant_and_non_finite(volume):
    with pytest.raises(ReconstructionError):
        check_volume(volume, "particle 0")

def test_a_blank_stack_gives_an_error_naming_the_tilt_and_no_file(tmp_path):
    tilt_series = make_tilt_series(n_tilts=5)
    stack = np.ones((5, 160, 160), dtype=np.float32)
    with pytest.raises(InputError, match=r"tilt 0 \(-60.0°\) is blank"):
        export_tilt_series(tilt_series, stack, poses([[0, 0, 0]]), options(), tmp_path / "out",
                           tomogram_shape_xyz_px=(160, 160, 100))
    assert not list((tmp_path / "out").glob("*.mrc"))

def test_export_writes_float32_mrcs_with_the_pixel_size_and_star_rows(tmp_path):
    tilt_series = make_tilt_series(n_tilts=11)
    rng = np.random.default_rng(0)
    stack = rng.normal(size=(11, 160, 160)).astype(np.float32)
    particles = poses([[8.0, -12.0, 4.0], [-40.0, 20.0, 0.0], [30.0, 30.0, -10.0]], rng.uniform(-90, 90, (3, 3)))
    rows, summary = export_tilt_series(tilt_series, stack, particles, options(normalize_output=True), tmp_path,
                                       tomogram_shape_xyz_px=(160, 160, 100), first_subset_index=1)
    assert summary.n_particles == 3 and summary.padded_box_px == 2 * BOX
    volume, pixel = read_mrc(tmp_path / rows["rlnImageName"][0])
    ctf, ctf_pixel = read_mrc(tmp_path / rows["rlnCtfImage"][0])
    assert volume.dtype == np.float32 and volume.shape == (BOX,) * 3 and pixel == pytest.approx(PIXEL)
    assert ctf.shape == (BOX, BOX, BOX // 2 + 1) and ctf_pixel == pytest.approx(PIXEL)
    assert rows["rlnImageName"][1] == "TS_0000001_4.00A.mrc" and rows["rlnCtfImage"][1] == "TS_0000001_ctf_4.00A.mrc"
    assert rows["rlnRandomSubset"].tolist() == [2, 1, 2]
    assert np.allclose(rows[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy(), particles.euler_zyz_deg)
    coords = rows[["rlnCoordinateX", "rlnCoordinateY", "rlnCoordinateZ"]].to_numpy()
    assert np.allclose((coords - [80, 80, 50]) * PIXEL, particles.positions_angst)
    prerotated, _ = export_tilt_series(tilt_series, stack, particles, options(prerotate=True), tmp_path / "pre",
                                       tomogram_shape_xyz_px=(160, 160, 100))
    assert np.all(prerotated[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy() == 0)

def test_relion_coordinates_at_a_larger_output_pixel():
    coords = relion_coordinates_px(np.array([[40.0, -20.0, 8.0]]), (1000, 800, 300), 2.0, 4.0)
    assert np.allclose(coords, [[10 + 250, -5 + 200, 2 + 75]])

def test_star_flavours(tmp_path):
    table = {"rlnImageName": ["a.mrc"], "rlnCtfImage": ["a_ctf.mrc"], "rlnAngleRot": [1.0], "rlnAngleTilt": [2.0],
             "rlnAnglePsi": [3.0], "rlnCoordinateX": [4.0], "rlnCoordinateY": [5.0], "rlnCoordinateZ": [6.0],
             "rlnTomoName": ["TS"], "rlnMicrographName": ["TS"], "rlnRandomSubset": [1]}

    scope = Microscope(300.0, 2.7, 0.07)
    path31 = write_subtomo_star(tmp_path / "p31.star", pd.DataFrame(table), pixel_size_angst=4.0, box_px=48,
                                microscope=scope)
    blocks = starfile.read(path31, always_dict=True)
    optics, particles = blocks["optics"], blocks["particles"]
    assert int(optics["rlnImageDimensionality"][0]) == 3 and int(optics["rlnImageSize"][0]) == 48
    assert {"rlnOriginXAngst", "rlnOpticsGroup", "rlnTomoName", "rlnCtfImage"} <= set(particles.columns)
    path30 = write_subtomo_star(tmp_path / "p30.star", pd.DataFrame(table), pixel_size_angst=4.0, box_px=48,
                                microscope=scope, flavour="3.0")
    single = starfile.read(path30, always_dict=True)
    (only,) = single.values()
    assert float(only["rlnMagnification"][0]) == 10000.0 and float(only["rlnDetectorPixelSize"][0]) == 4.0
    assert int(optics["rlnCtfDataAreCtfPremultiplied"][0]) == 0 and "--ctf3d_not_squared" in path31.read_text()
    path5 = write_subtomo_star(tmp_path / "p5.star", pd.DataFrame(table), pixel_size_angst=4.0, box_px=48,
                               microscope=scope, flavour="5")
    relion5 = starfile.read(path5, always_dict=True)
    assert int(relion5["optics"]["rlnCtfDataAreCtfPremultiplied"][0]) == 1
    assert relion5["particles"].equals(particles) and "NOT with --ctf3d_not_squared" in path5.read_text()

@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli_export")
    return generate_dataset(folder / "data", n_particles=4, n_tilts=11, box_px=24, image_shape_yx=(128, 128),
                            thickness_angst=300.0, snr=None)

@pytest.mark.parametrize("arguments, message", [
    (["--box", "23"], "box_px"),
    (["--pixel-size-out", "1.0"], "output_pixel_size_angst"),
    (["--ts-id", "TS_99"], "--ts-id"),
])
def test_cli_bad_input_exits_2_with_the_parameter_named(small_dataset, tmp_path, capsys, arguments, message):
    base = ["export", "--manifest", str(small_dataset), "--out", str(tmp_path / "out"), "--box", "24",
            "--diameter", "60", "--backend", "numpy"]
    assert main(base + arguments) == 2
    assert message in capsys.readouterr().err

def test_cli_missing_files_exit_2(tmp_path, capsys):
    code = main(["export", "--geometry", str(tmp_path / "missing.json"), "--particles", "p.star", "--out",
                 str(tmp_path / "o"), "--box", "24", "--diameter", "60"])
    assert code == 2 and "--geometry" in capsys.readouterr().err
    code = main(["export", "--stack", "s.mrc", "--particles", "p.star", "--out", str(tmp_path / "o"), "--box", "24",
                 "--diameter", "60"])
    assert code == 2 and "--stack" in capsys.readouterr().err

def test_cli_exports_volumes_and_series(small_dataset, tmp_path, capsys):
    common = ["export", "--manifest", str(small_dataset), "--box", "24", "--diameter", "60", "--backend", "numpy"]
    assert main(common + ["--out", str(tmp_path / "v"), "--sparse-ctf", "--ctf-layout", "centred"]) == 0
    log = capsys.readouterr().out
    assert "particles/s" in log and "padded box M =" in log and "memory" in log
    particles = starfile.read(tmp_path / "v" / "particles.star", always_dict=True)["particles"]
    ctf, _ = read_mrc(tmp_path / "v" / particles["rlnCtfImage"][0])
    assert len(particles) == 4 and ctf.shape == (24, 24, 24)
    assert main(common + ["--out", str(tmp_path / "s"), "--mode", "series"]) == 0
    blocks = starfile.read(tmp_path / "s" / "particles.star", always_dict=True)
    assert int(blocks["optics"]["rlnImageDimensionality"][0]) == 2 and int(blocks["general"]
                                                                          ["rlnTomoSubTomosAre2DStacks"]) == 1
    assert {"TS_01", "TS_02"} >= set(blocks["particles"]["rlnTomoName"])
    assert (tmp_path / "s" / "tomograms.star").is_file() and (tmp_path / "s" / "optimisation_set.star").is_file()


def test_cli_imod_style_input_gives_the_manifest_volumes(small_dataset, tmp_path):
    """The IMOD-style files written by the synthetic generator (stack, .tlt, .xf, .defocus, dose, particle STAR read
    through the dialect reader) give the same sub-tomograms and 3D CTFs as the manifest's ground-truth geometry; the
    text files round defocus to 0.01 nm, hence a tolerance above float32 round-off."""
    manifest = json.loads(small_dataset.read_text())
    entry = manifest["tilt_series"][0]
    root, ts_id = small_dataset.parent, entry["ts_id"]
    files = {role: str(root / path) for role, path in entry["files"].items()}
    nz, ny, nx = entry["unbinned_tomogram_shape_zyx"]
    common = ["export", "--box", "24", "--diameter", "60", "--backend", "numpy", "--ts-id", ts_id]
    assert main(common + ["--manifest", str(small_dataset), "--out", str(tmp_path / "manifest")]) == 0
    imod = ["--stack", files["stack"], "--tlt", files["tlt"], "--xf", files["xf"], "--defocus", files["defocus"],
            "--dose", files["dose"], "--particles", str(root / "particles.star"),
            "--pixel-size", str(manifest["pixel_size_angst"]), "--voltage", str(manifest["voltage_kv"]),
            "--cs", str(manifest["cs_mm"]), "--amplitude-contrast", str(manifest["amplitude_contrast"]),
            "--tomo-shape", str(nx), str(ny), str(nz)]
    assert main(common + imod + ["--out", str(tmp_path / "imod")]) == 0
    reference = starfile.read(tmp_path / "manifest" / "particles.star", always_dict=True)["particles"]
    exported = starfile.read(tmp_path / "imod" / "particles.star", always_dict=True)["particles"]
    assert len(reference) == len(exported) == int(np.sum(np.array(manifest_names(root)) == ts_id)) > 0
    for column in ("rlnImageName", "rlnCtfImage"):
        for a, b in zip(reference[column], exported[column]):
            assert a == b
            ours, _ = read_mrc(tmp_path / "imod" / b)
            theirs, _ = read_mrc(tmp_path / "manifest" / a)
            assert np.abs(ours - theirs).max() <= 1e-3 * np.abs(theirs).max()
    coords = [f"rlnCoordinate{axis}" for axis in "XYZ"] + ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]
    assert np.allclose(reference[coords].to_numpy(), exported[coords].to_numpy(), atol=1e-4)


def manifest_names(root) -> list[str]:
    """Tomogram name of every particle of the synthetic dataset's particles.star."""
    return starfile.read(root / "particles.star", always_dict=True)["particles"]["rlnTomoName"].astype(str).tolist()


@pytest.mark.parametrize("method", CTF_METHODS)
def test_ctf_only_engine_gives_the_full_pipeline_ctfs(method):
    tilt_series = make_tilt_series(n_tilts=11, microscope=Microscope(300.0, 2.7, 0.07))
    stack = np.random.default_rng(1).normal(size=(11, 160, 160)).astype(np.float32)
    particles = poses([[8.0, -12.0, 4.0], [-40.0, 20.0, 0.0], [30.0, 30.0, -10.0]])
    opts = options(max_batch=2, ctf_method=method)
    full = list(TiltSeriesEngine.create(tilt_series, stack, opts).reconstruct(particles))
    alone = list(TiltSeriesEngine.create(tilt_series, None, opts).reconstruct_ctfs(particles))
    assert [r.volume for r in alone] == [None] * 3
    for a, b in zip(full, alone):
        assert np.array_equal(a.ctf, b.ctf)
