"""End to end against the real consumer: RELION 3.1 reconstructs our exported sub-tomograms + 3D CTFs.

A noise-free synthetic tilt series (1 tomogram, 80 particles of the chiral blob phantom, 41 tilts ±60°, box 48,
4 Å/px, realistic CTF: 300 kV, Cs 2.7, Q0 0.07, ~3 µm defocus, dose-symmetric 3 e/Å² per tilt) is exported with
the CLI (not pre-rotated, so RELION applies the angles), then ``relion_reconstruct --ctf`` must give back the
ground truth. The comparison allows a sub-voxel shift (alignment by cross-correlation) but NOT a sign flip:
polarity is one of the things proven (white protein after inversion).

Measured (noise-free, this dataset): good export CC 0.997 and FSC ≥ 0.5 up to shell 20 of 24, with either 3D-CTF
method (``direct`` on the output grid, the default, or M's ``padded`` crop). Negative controls
with the same pipeline: tilt sign flipped CC 0.72 / FSC-0.5 shell ≤ 8; x/y of the images swapped CC 0.20;
no CTF weighting (C_u = C_w = 1) CC 0.73 (FSC oscillates through the CTF zeros); no contrast inversion
CC −0.997. Thresholds: CC ≥ 0.95 and FSC ≥ 0.5 up to shell ≥ 0.6 · N/2 = 14. The blob phantom is smooth, so a
wrong geometry still overlaps at low resolution (hence CC up to 0.73 for controls); 0.95 sits between.

A slow variant repeats the good export and three controls on a noisy dataset (default SNR; threshold below).
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.fft
from _relion import require_relion

from mspecies.common.types import Microscope
from mspecies.core.volume import fourier_shell_correlation, normalized_cross_correlation, spherical_mask
from mspecies.formats.mrc import read_mrc, write_mrc
from mspecies.formats.relion_subtomo import PARTICLE_COLUMNS, write_subtomo_star
from mspecies.formats.star import read_relion31_particles
from mspecies.synth.dataset import generate_dataset
from mspecies.synth.manifest import load_manifest
from mspecies.synth.phantom import make_phantom_map

pytestmark = pytest.mark.relion

BOX = 48
CC_THRESHOLD = 0.95
FSC_SHELL_FRACTION = 0.6


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("export_relion")
    manifest = generate_dataset(folder / "data", seed=3, n_tomograms=1, n_particles=80, n_tilts=41, box_px=BOX,
                                pixel_size_angst=4.0, image_shape_yx=(448, 448), thickness_angst=600.0, snr=None)
    return folder, load_manifest(manifest)


def _geometry(path: Path, manifest: dict, **changes) -> Path:
    entry = manifest["tilt_series"][0]
    keys = ("ts_id", "pixel_size_angst", "image_shape_yx", "tilt_angles_deg", "xf", "defocus_u_angst",
            "defocus_v_angst", "defocus_angle_deg", "dose_e_per_angst2", "acquisition_order", "excluded",
            "phase_shift_deg")
    geometry = {key: entry[key] for key in keys}
    nz, ny, nx = entry["unbinned_tomogram_shape_zyx"]
    geometry.update(stack_path=str(Path(manifest["root"]) / entry["stack"]), voltage_kv=manifest["voltage_kv"],
                    cs_mm=manifest["cs_mm"], amplitude_contrast=manifest["amplitude_contrast"],
                    tomogram_shape_xyz_px=[nx, ny, nz])
    geometry.update(changes)
    path.write_text(json.dumps(geometry))
    return path


def _export(out: Path, inputs: list[str], *extra: str) -> None:
    command = [sys.executable, "-m", "mspecies", "export", *inputs, "--out", str(out), "--box", str(BOX),
               "--diameter", "140", "--backend", "numpy", *extra]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr


def _relion_reconstruct(out: Path) -> np.ndarray:
    run = subprocess.run([require_relion(), "--i", "particles.star", "--o", "rec.mrc", "--ctf"], cwd=out,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    volume, pixel = read_mrc(out / "rec.mrc")
    assert pixel == pytest.approx(4.0)
    return volume


def align_subvoxel(volume: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Shift ``volume`` onto ``reference`` (integer cross-correlation peak + parabolic sub-voxel refinement,
    Fourier shift). Only the positive peak is used: a sign flip is not forgiven."""
    fa, fb = scipy.fft.rfftn(volume), scipy.fft.rfftn(reference)
    correlation = scipy.fft.irfftn(fb * np.conj(fa), s=volume.shape)
    peak = np.array(np.unravel_index(np.argmax(correlation), correlation.shape))
    shift = []
    for axis in range(3):
        values = [correlation[tuple((peak + step * np.eye(3, dtype=int)[axis]) % volume.shape)] for step in (-1, 0, 1)]
        denominator = values[0] - 2 * values[1] + values[2]
        fraction = 0.5 * (values[0] - values[2]) / denominator if denominator != 0 else 0.0
        shift.append(((peak[axis] + fraction + volume.shape[axis] / 2) % volume.shape[axis]) - volume.shape[axis] / 2)
    k = [np.fft.fftfreq(n) for n in volume.shape[:2]] + [np.fft.rfftfreq(volume.shape[2])]
    phase = np.exp(-2j * np.pi * (shift[0] * k[0][:, None, None] + shift[1] * k[1][None, :, None]
                                  + shift[2] * k[2][None, None, :]))
    return scipy.fft.irfftn(fa * phase, s=volume.shape)


def aligned_to_truth(volume: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(``volume`` aligned onto the ground truth, the ground truth)."""
    truth = make_phantom_map(volume.shape[0], 4.0)
    return align_subvoxel(volume, truth), truth


def fsc_against_truth(volume: np.ndarray) -> np.ndarray:
    """FSC per shell 0..N/2 of ``volume`` (aligned) against the ground truth."""
    return fourier_shell_correlation(*aligned_to_truth(volume))


def score(volume: np.ndarray) -> tuple[float, int]:
    """(CC inside a sphere, last shell before FSC first drops below 0.5) against the ground truth."""
    aligned, truth = aligned_to_truth(volume)
    mask = spherical_mask(volume.shape, volume.shape[0] // 2 - 2)
    fsc = fourier_shell_correlation(aligned, truth)
    below = np.flatnonzero(fsc < 0.5)
    return normalized_cross_correlation(aligned, truth, mask), int(below[0] - 1 if below.size else fsc.size - 1)


def passes(cc: float, shell: int) -> bool:
    return cc >= CC_THRESHOLD and shell >= FSC_SHELL_FRACTION * BOX / 2


@pytest.mark.parametrize("ctf_method", ["direct", "padded"])
def test_relion_reconstructs_the_ground_truth_from_the_cli_export(dataset, ctf_method):
    """Both 3D-CTF methods (output grid, the default; M's padded crop) must give RELION the ground truth."""
    folder, manifest = dataset
    out = folder / f"good_{ctf_method}"
    _export(out, ["--manifest", str(Path(manifest["root"]) / "manifest.json")], "--ctf-method", ctf_method)
    optics, particles = read_relion31_particles(out / "particles.star")
    assert int(optics["rlnImageDimensionality"][0]) == 3 and len(particles) == 80
    cc, shell = score(_relion_reconstruct(out))
    print(f"good export ({ctf_method} 3D CTF): CC {cc:.3f}, FSC >= 0.5 up to shell {shell} of {BOX // 2}")
    assert passes(cc, shell)


def test_geometry_json_input_gives_the_same_result(dataset):
    folder, manifest = dataset
    out = folder / "geometry"
    geometry = _geometry(folder / "ts.json", manifest)
    _export(out, ["--geometry", str(geometry), "--particles", str(Path(manifest["root"]) / "particles.star")])
    cc, shell = score(_relion_reconstruct(out))
    print(f"geometry JSON export: CC {cc:.3f}, shell {shell}")
    assert passes(cc, shell)


def test_standalone_files_export_gives_the_ground_truth(dataset):
    """The standalone route from the files a user holds (stack, mdoc, AreTomo .aln, CTFFIND, binned tomogram, text
    particle list; no flag for any value the files give) reconstructs to the ground truth in RELION; the other file
    routes give the same sub-tomograms (tests/test_export_standalone.py)."""
    folder, manifest = dataset
    root = Path(manifest["root"])
    files = {role: str(root / path) for role, path in manifest["tilt_series"][0]["files"].items()}
    out = folder / "standalone"
    _export(out, ["--stack", files["stack"], "--mdoc", files["mdoc"], "--aln", files["aln"], "--ctf", files["ctffind"],
                  "--tomogram", files["tomogram"], "--particles", files["coordinates"]])
    cc, shell = score(_relion_reconstruct(out))
    print(f"standalone files export (mdoc, aln, CTFFIND, tomogram, text particles): CC {cc:.3f}, shell {shell}")
    assert passes(cc, shell)


def _control_export(folder: Path, manifest: dict, control: str) -> Path:
    """Export the dataset through a geometry JSON, deliberately broken as ``control`` says ("good": unchanged)."""
    entry = manifest["tilt_series"][0]
    particles = str(Path(manifest["root"]) / "particles.star")
    extra: list[str] = []
    changes: dict = {}
    if control == "tilt_sign_flipped":
        changes["tilt_angles_deg"] = (-np.asarray(entry["tilt_angles_deg"])).tolist()
    elif control == "xy_swapped":
        stack, pixel = read_mrc(Path(manifest["root"]) / entry["stack"])
        swapped = write_mrc(folder / "swapped.mrc", np.ascontiguousarray(np.transpose(stack, (0, 2, 1))), pixel)
        changes["stack_path"] = str(swapped)
    elif control == "no_ctf":
        extra.append("--no-ctf")
    elif control == "no_inversion":
        extra.append("--no-invert")
    geometry = _geometry(folder / f"{control}.json", manifest, **changes)
    out = folder / control
    _export(out, ["--geometry", str(geometry), "--particles", particles], *extra)
    return out


@pytest.mark.parametrize("control", ["tilt_sign_flipped", "xy_swapped", "no_ctf", "no_inversion"])
def test_negative_controls_fail_the_same_thresholds(dataset, control):
    folder, manifest = dataset
    cc, shell = score(_relion_reconstruct(_control_export(folder, manifest, control)))
    print(f"negative control {control}: CC {cc:.3f}, FSC >= 0.5 up to shell {shell}")
    assert not passes(cc, shell)


# Noisy variant: the synthetic default SNR 0.05 (noise variance 20x the particle signal in its box), 200 particles.
# Measured: good export CC 0.73 with the default (direct) 3D CTF, 0.74 with M's padded one (FSC >= 0.5 to shell 11 of
# 24 with either); controls: tilt sign flipped CC 0.09, no CTF weighting CC 0.60, no contrast inversion CC < 0.05.
# More particles do not raise the CC much here (400: 0.76; neighbours overlap the boxes in this 448 px field), and
# the FSC of a noisy map is not a stable criterion at its first shells, so the threshold is on CC alone: 0.68,
# between the best control (0.60) and the good export (0.73).
NOISY_PARTICLES = 200
NOISY_CC_THRESHOLD = 0.68


@pytest.fixture(scope="module")
def noisy_dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("export_relion_noisy")
    manifest = generate_dataset(folder / "data", seed=3, n_tomograms=1, n_particles=NOISY_PARTICLES, n_tilts=41,
                                box_px=BOX, pixel_size_angst=4.0, image_shape_yx=(448, 448), thickness_angst=600.0)
    return folder, load_manifest(manifest)


@pytest.mark.slow
@pytest.mark.parametrize("control", ["good", "tilt_sign_flipped", "no_ctf", "no_inversion"])
def test_noisy_export_passes_and_negative_controls_fail(noisy_dataset, control):
    folder, manifest = noisy_dataset
    assert manifest["snr"] is not None and len(manifest["particles"]) == NOISY_PARTICLES
    cc, shell = score(_relion_reconstruct(_control_export(folder, manifest, control)))
    print(f"noisy {control}: CC {cc:.3f}, FSC >= 0.5 up to shell {shell}")
    assert (cc >= NOISY_CC_THRESHOLD) == (control == "good")


# A smaller padding factor (issue 17; benchmarks/export/README.md, "Padding factor"): on the noise-free dataset the
# default (f = 2, M = 2N = 96) and f = 1.25 (M = the aliasing-free 74 px; f = 1.5 gives the same M here) give RELION
# maps whose FSC against the ground truth agrees within 0.004 up to shell 14 = 0.6 · N/2 (where the f = 2 FSC is still
# 0.98), and drops by 0.012-0.168 at shells 16-22 (the f = 2 FSC falls below 0.143 after shell 22). So the check is
# split: within ±0.01 up to shell 14 (a geometry, CTF or normalisation error at M ≠ 2N fails it), and a loss above 0.01
# between there and the 0.143 shell, the measured reason why the default stays 2: if that part fails, a smaller
# factor has become as good; re-measure and reconsider the default.
PADDING_FSC_TOLERANCE = 0.01


def _recorded_padding(out: Path) -> tuple[float, int]:
    """(padding factor, padded box M) that the export's success record holds."""
    record = json.loads((out / "export_record.json").read_text())
    return record["arguments"]["padding_factor"], int(next(iter(record["per_tilt_series"].values()))["padded_box_px"])


def test_smaller_padding_factor_keeps_relions_fsc_to_shell_14_and_loses_above(dataset):
    folder, manifest = dataset
    source = ["--manifest", str(Path(manifest["root"]) / "manifest.json")]
    curves = {}
    for factor, padded in ((None, 2 * BOX), (1.25, 74)):  # None: the default, M's factor 2
        out = folder / f"padding_{factor}"
        _export(out, source, *([] if factor is None else ["--padding-factor", str(factor)]))
        assert _recorded_padding(out) == (factor or 2.0, padded)
        curves[factor] = fsc_against_truth(_relion_reconstruct(out))
    reference, delta = curves[None], np.abs(curves[1.25] - curves[None])
    kept = int(FSC_SHELL_FRACTION * BOX / 2)
    below = np.flatnonzero(reference[1:] < 0.143) + 1  # shell 0 (the mean of normalised maps) left out
    resolved = int(below[0] - 1 if below.size else reference.size - 1)
    print(f"padding factor 1.25 vs 2: max |ΔFSC| {delta[1:kept + 1].max():.4f} up to shell {kept}, "
          f"{delta[kept + 1:resolved + 1].max():.4f} from there to shell {resolved} (FSC of f = 2 >= 0.143)")
    assert delta[1:kept + 1].max() <= PADDING_FSC_TOLERANCE
    assert delta[kept + 1:resolved + 1].max() > PADDING_FSC_TOLERANCE


def test_relion_refine_accepts_the_export(dataset):
    folder, manifest = dataset
    out = folder / "refine"
    _export(out, ["--manifest", str(Path(manifest["root"]) / "manifest.json")])
    write_mrc(out / "reference.mrc", make_phantom_map(BOX, 4.0), 4.0)
    (out / "run").mkdir()
    command = [require_relion("relion_refine"), "--i", "particles.star", "--o", "run/run", "--ref", "reference.mrc",
               "--ini_high", "20", "--iter", "1", "--K", "1", "--tau2_fudge", "4", "--particle_diameter", "160",
               "--ctf", "--flatten_solvent", "--zero_mask", "--oversampling", "1", "--healpix_order", "1",
               "--offset_range", "2", "--offset_step", "2", "--sym", "C1", "--j", "2", "--pad", "1",
               "--skip_gridding", "--firstiter_cc", "--dont_check_norm"]
    run = subprocess.run(command, cwd=out, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    volume, _ = read_mrc(out / "run" / "run_it001_class001.mrc")
    cc = normalized_cross_correlation(volume, make_phantom_map(BOX, 4.0), spherical_mask(volume.shape, BOX // 2 - 2))
    print(f"relion_refine iteration 1 class vs ground truth: CC {cc:.3f}")
    assert cc > 0.5


# What the 3D CTF means to relion_refine (docs/conventions.md, "3D CTF and RELION"): our STAR says
# rlnCtfDataAreCtfPremultiplied 0 and RELION must model the data as V x reference. relion_refine 3.1.3 with its default
# flags reconstructs from the given angles (--skip_align, one iteration, so the map is its own M-step with our
# weights); the control is the same files in the RELION 5 flavour (--star-flavour 5: declared premultiplied), which
# RELION 3.1 reads as a model V^2 x reference (W += V^2 with X += img): a CTF-weighting error, visible below the first
# CTF zero (~shell 8 here) and in the CC. Measured on the noisy dataset (200 particles): CC 0.89 (ours) vs 0.69
# (control); FSC >= 0.5 up to shell 10 (ours) vs 9 (control). With 100 particles: 0.84 vs 0.65. (By hand with RELION
# 5.0.1 built here, 100 particles: flavour 3.1 CC 0.86 and flavour 5 CC 0.89 with default flags; flavour 5 with
# --ctf3d_not_squared 0.67.) Our FSC at shell 10 sits at 0.49-0.50 and relion_refine moves it by +-0.015 for changes
# of the exported values at float32 rounding (main fbb5cca's export x (1 + 4e-7 N(0, 1)): shell 9 for 2 of 4 seeds,
# CC 0.890-0.891), so the shell is only required not to fall behind the control's; the weighting error shows in the
# CC and in the mean FSC over shells 1-10: ours 0.852-0.858, control 0.784-0.822 over those seeds and the float32
# tilt preparation.
WEIGHTING_CC_THRESHOLD = 0.78


def _refine_fixed_angles(out: Path, star: str) -> np.ndarray:
    """relion_refine (default CTF flags), one iteration at the STAR's angles → the class map."""
    run_dir = out / Path(star).stem
    run_dir.mkdir()
    command = [require_relion("relion_refine"), "--i", star, "--o", f"{run_dir.name}/run", "--ref", "reference.mrc",
               "--ini_high", "8.5", "--iter", "1", "--K", "1", "--particle_diameter", "160", "--ctf", "--sym", "C1",
               "--skip_align", "--firstiter_cc", "--j", "2"]
    run = subprocess.run(command, cwd=out, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    volume, _ = read_mrc(run_dir / "run_it001_class001.mrc")
    return volume


@pytest.mark.slow
def test_relion_refine_weights_the_3d_ctf_as_written(noisy_dataset):
    folder, manifest = noisy_dataset
    out = folder / "ctf_weighting"
    _export(out, ["--manifest", str(Path(manifest["root"]) / "manifest.json")])
    text = (out / "particles.star").read_text()
    assert "--ctf3d_not_squared" in text.split("data_")[0]  # the header comment tells RELION 5 users the flag
    optics, particles = read_relion31_particles(out / "particles.star")
    assert int(optics["rlnCtfDataAreCtfPremultiplied"][0]) == 0
    # the control: the same rows as the RELION 5 flavour (declared premultiplied), which RELION 3.1 must read wrong
    optics_row = optics.iloc[0]
    relion5_star = write_subtomo_star(
        out / "claims_premultiplied.star", particles[list(PARTICLE_COLUMNS)], flavour="5",
        pixel_size_angst=float(optics_row["rlnImagePixelSize"]), box_px=int(optics_row["rlnImageSize"]),
        microscope=Microscope(float(optics_row["rlnVoltage"]), float(optics_row["rlnSphericalAberration"]),
                              float(optics_row["rlnAmplitudeContrast"])))
    assert int(read_relion31_particles(relion5_star)[0]["rlnCtfDataAreCtfPremultiplied"][0]) == 1
    write_mrc(out / "reference.mrc", make_phantom_map(BOX, 4.0), 4.0)
    maps = [_refine_fixed_angles(out, star) for star in ("particles.star", "claims_premultiplied.star")]
    (ours, control), (ours_fsc, control_fsc) = map(score, maps), map(mean_fsc_to_first_ctf_zero, maps)
    print(f"relion_refine 3.1, default flags: our STAR CC {ours[0]:.3f} (FSC >= 0.5 to shell {ours[1]}, mean FSC "
          f"{ours_fsc:.3f}); claiming premultiplied CC {control[0]:.3f} (shell {control[1]}, {control_fsc:.3f})")
    assert ours[0] >= WEIGHTING_CC_THRESHOLD > control[0]
    assert ours[1] >= control[1] and ours_fsc > control_fsc


def mean_fsc_to_first_ctf_zero(volume: np.ndarray) -> float:
    """Mean FSC against the ground truth over shells 1-10 (the first CTF zero is near shell 8 here)."""
    return float(fourier_shell_correlation(*aligned_to_truth(volume))[1:11].mean())
