"""Standalone export from the files a tilt series comes with (issue: IMOD, AreTomo, SerialEM, CTFFIND users).

The synthetic dataset writes every format; each route (mdoc / tlt+dose / aln; CTFFIND / IMOD defocus; STAR / text
coordinates) must give the same sub-tomograms and 3D CTFs (≤ 1e-4 relative; measured ≈ 2e-6, the text files'
rounding), and the same as the manifest's ground-truth geometry within the files' rounding (≤ 1e-3; measured
≈ 3e-4). RELION reconstructs the file route in tests/test_export_relion.py.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import starfile

from mspecies.cli.main import build_parser, main
from mspecies.formats.mrc import read_mrc
from mspecies.formats.star import write_relion31_particles
from mspecies.synth.dataset import generate_dataset
from mspecies.synth.manifest import load_manifest

COMMON = ["export", "--box", "24", "--diameter", "60", "--backend", "numpy"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("standalone")
    manifest = generate_dataset(folder / "data", seed=2, n_particles=4, n_tilts=11, box_px=24,
                                image_shape_yx=(128, 128), thickness_angst=300.0, snr=None)
    entry = load_manifest(manifest)["tilt_series"][0]
    files = {role: str(manifest.parent / path) for role, path in entry["files"].items()}
    files["star"] = str(manifest.parent / "particles.star")
    return folder, manifest, files


def _routes(files: dict[str, str]) -> dict[str, list[str]]:
    f = files
    return {
        "mdoc_xf_ctffind_star": ["--stack", f["stack"], "--mdoc", f["mdoc"], "--xf", f["xf"], "--ctf", f["ctffind"],
                                 "--tomogram", f["tomogram"], "--particles", f["star"]],
        "tlt_dose_xf_imod_text": ["--stack", f["stack"], "--tlt", f["tlt"], "--dose", f["dose"], "--xf", f["xf"],
                                  "--defocus", f["defocus"], "--tomogram", f["tomogram"],
                                  "--particles", f["coordinates"]],
        "aln_tiltdose_ctffind_text": ["--stack", f["stack"], "--aln", f["aln"], "--dose", f["tilt_dose"],
                                      "--ctf", f["ctffind"], "--tomogram", f["tomogram"],
                                      "--particles", f["coordinates"]],
        "aln_mdoc_imod_star_shape": ["--stack", f["stack"], "--aln", f["aln"], "--mdoc", f["mdoc"],
                                     "--defocus", f["defocus"], "--tomo-shape", "128", "128", "76",
                                     "--particles", f["star"]],
    }


def _export(out, arguments) -> pd.DataFrame:
    assert main(COMMON + arguments + ["--out", str(out)]) == 0
    return starfile.read(out / "particles.star", always_dict=True)["particles"]


def _worst_relative_difference(folder_a, table_a, folder_b, table_b) -> float:
    worst = 0.0
    for column in ("rlnImageName", "rlnCtfImage"):
        for a, b in zip(table_a[column], table_b[column], strict=True):
            x, _ = read_mrc(folder_a / a)
            y, _ = read_mrc(folder_b / b)
            worst = max(worst, float(np.abs(x - y).max() / np.abs(x).max()))
    return worst


def test_every_route_gives_the_same_subtomograms(dataset):
    folder, manifest, files = dataset
    reference = _export(folder / "manifest", ["--manifest", str(manifest)])
    routes = _routes(files)
    first = next(iter(routes))
    tables = {name: _export(folder / name, arguments) for name, arguments in routes.items()}
    pose_columns = [f"rlnCoordinate{axis}" for axis in "XYZ"] + ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]
    for name, table in tables.items():
        assert len(table) == len(reference) == 4
        difference = _worst_relative_difference(folder / first, tables[first], folder / name, table)
        print(f"{name}: max |Δ| / max = {difference:.2g} against {first}")
        assert difference <= 1e-4, name
        assert np.allclose(table[pose_columns].to_numpy(), reference[pose_columns].to_numpy(), atol=1e-4), name
    to_truth = _worst_relative_difference(folder / "manifest", reference, folder / first, tables[first])
    print(f"{first}: max |Δ| / max = {to_truth:.2g} against the manifest (ground-truth geometry)")
    assert to_truth <= 1e-3


def test_minimal_call_logs_every_value_with_its_source(dataset, capsys):
    folder, _, files = dataset
    _export(folder / "minimal", _routes(files)["mdoc_xf_ctffind_star"])
    log = capsys.readouterr()
    for line in ("pixel size: 4 A (from --stack", "voltage: 300 kV (from --mdoc",
                 "spherical aberration: 2.7 mm (from --ctf", "amplitude contrast: 0.07 (from --ctf",
                 "accumulated dose: 11 values (from", "PriorRecordDose + ExposureDose",
                 "acquisition order: from", "DateTime", "tilt angles: 11 values (from --mdoc",
                 "(binning 4) = 128 × 128 × 76 unbinned (from --tomogram", "coordinate pixel size 4 A (from",
                 "tilt series: TS_01 (the stack file name)"):
        assert line in log.out, line
    assert "warning" not in log.err


def test_a_flag_overrides_a_file_with_a_warning(dataset, capsys):
    folder, _, files = dataset
    arguments = _routes(files)["mdoc_xf_ctffind_star"] + ["--voltage", "200", "--amplitude-contrast", "0.1",
                                                          "--tomo-shape", "128", "128", "80"]
    _export(folder / "flags", arguments)
    log = capsys.readouterr()
    assert "--voltage 200 kV disagrees with --mdoc" in log.err and "using --voltage" in log.err
    assert "--amplitude-contrast 0.1 disagrees with --ctf" in log.err
    assert "--tomo-shape (128, 128, 80) disagrees with --tomogram" in log.err
    optics = starfile.read(folder / "flags" / "particles.star", always_dict=True)["optics"]
    assert float(optics["rlnVoltage"][0]) == 200.0 and float(optics["rlnAmplitudeContrast"][0]) == 0.1


def test_a_bin4_star_is_read_at_its_own_pixel_size(dataset):
    """The issue: --coords-pixel-size defaulted to the tilt-series pixel and refused a bin-4 STAR ('4 Å was passed')."""
    folder, _, files = dataset
    blocks = starfile.read(files["star"], always_dict=True)
    optics, particles = blocks["optics"].copy(), blocks["particles"].copy()
    optics["rlnImagePixelSize"] = 16.0
    corner = particles[[f"rlnCoordinate{axis}" for axis in "XYZ"]].to_numpy(float) - [64, 64, 38]
    # centres N // 2 of the unbinned (128, 128, 76) and the binned (32, 32, 19) tomogram
    particles[[f"rlnCoordinate{axis}" for axis in "XYZ"]] = corner / 4.0 + [16, 16, 9]
    binned = write_relion31_particles(folder / "bin4.star", optics, particles)
    arguments = _routes(files)["mdoc_xf_ctffind_star"]
    arguments[arguments.index(files["star"])] = str(binned)
    reference = _export(folder / "unbinned_star", _routes(files)["mdoc_xf_ctffind_star"])
    table = _export(folder / "bin4_star", arguments)
    assert _worst_relative_difference(folder / "unbinned_star", reference, folder / "bin4_star", table) <= 1e-4


def test_star_tomogram_names_differing_in_case_and_extension_match_the_tilt_series(dataset, capsys):
    """'ts_01.mrc' in rlnTomoName is TS_01 (as intersect matches names); the sub-tomograms are those of 'TS_01'."""
    folder, _, files = dataset
    blocks = starfile.read(files["star"], always_dict=True)
    particles = blocks["particles"].copy()
    particles["rlnTomoName"] = "ts_01.mrc"
    renamed = write_relion31_particles(folder / "lower_case.star", blocks["optics"], particles)
    arguments = _routes(files)["mdoc_xf_ctffind_star"]
    arguments[arguments.index(files["star"])] = str(renamed)
    reference = _export(folder / "names_as_is", _routes(files)["mdoc_xf_ctffind_star"])
    capsys.readouterr()
    table = _export(folder / "names_lower_case", arguments)
    assert "['ts_01.mrc'] of" in capsys.readouterr().out
    assert len(table) == len(reference) == 4
    assert _worst_relative_difference(folder / "names_as_is", reference, folder / "names_lower_case", table) == 0


@pytest.mark.parametrize(("change", "fragment"), [
    ({"--tomogram": None}, "--tomogram / --tomo-shape: the tomogram size is needed"),
    ({"--xf": None}, "--xf / --aln: give the alignment"),
    ({"--ctf": None}, "--ctf / --defocus: give the defocus"),
    ({"--mdoc": None}, "--tlt / --aln / --mdoc: no tilt angles"),
    ({"--mdoc": "missing.mdoc"}, "--mdoc: missing.mdoc not found"),
    ({"--voltage": "300000"}, "--voltage: voltage 300000 looks like volts; expected kV (300)"),
])
def test_missing_or_bad_inputs_name_the_flag(dataset, tmp_path, capsys, change, fragment):
    _, _, files = dataset
    arguments = _routes(files)["mdoc_xf_ctffind_star"]
    for flag, value in change.items():
        if flag in arguments:
            index = arguments.index(flag)
            del arguments[index:index + 2]
        if value is not None:
            arguments += [flag, value]
    assert main(COMMON + arguments + ["--out", str(tmp_path / "out")]) == 2
    assert fragment in capsys.readouterr().err


def test_ambiguous_dose_list_is_refused_and_the_layout_can_be_told(dataset, tmp_path, capsys):
    _, _, files = dataset
    accumulated = np.loadtxt(files["tilt_dose"])[:, 1]
    ambiguous = tmp_path / "dose.txt"  # (accumulated, own): neither a tilt column nor a running sum
    ambiguous.write_text("".join(f"{a} 3.0\n" for a in accumulated))
    arguments = ["--stack", files["stack"], "--xf", files["xf"], "--ctf", files["ctffind"], "--tlt", files["tlt"],
                 "--tomogram", files["tomogram"], "--particles", files["star"], "--dose", str(ambiguous)]
    assert main(COMMON + arguments + ["--out", str(tmp_path / "a")]) == 2
    assert "pass --dose-layout prior-own or tilt-accumulated" in capsys.readouterr().err
    one_column = tmp_path / "accumulated.txt"
    one_column.write_text("".join(f"{a}\n" for a in accumulated))
    arguments[-1] = str(one_column)
    assert main(COMMON + arguments + ["--dose-layout", "accumulated", "--out", str(tmp_path / "b")]) == 0
    assert "as accumulated (as told (--dose-layout))" in capsys.readouterr().out


@pytest.mark.parametrize(("name", "text", "fragment"), [
    ("particles.txt", "10 10 10\n12 12\n", "{path}, line 2: expected 3 columns"),
    ("empty.star", "data_optics\n\nloop_\n_rlnOpticsGroup #1\n1\n", "--particles: {path}: no data_particles block"),
])
def test_bad_particle_files_name_the_flag_file_and_line(dataset, tmp_path, capsys, name, text, fragment):
    _, _, files = dataset
    bad = tmp_path / name
    bad.write_text(text)
    arguments = _routes(files)["mdoc_xf_ctffind_star"]
    arguments[arguments.index(files["star"])] = str(bad)
    assert main(COMMON + arguments + ["--out", str(tmp_path / "o")]) == 2
    assert fragment.format(path=bad) in capsys.readouterr().err


def test_every_export_option_has_help():
    parser = build_parser()
    export = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    undocumented = [action.option_strings[0] for action in export.choices["export"]._actions
                    if action.option_strings and action.option_strings[0] != "-h" and not action.help]
    assert undocumented == []


def test_geometry_json_values_go_through_the_same_checks(dataset, tmp_path, capsys):
    folder, manifest, files = dataset
    entry = load_manifest(manifest)["tilt_series"][0]
    geometry = {key: entry[key] for key in ("ts_id", "pixel_size_angst", "image_shape_yx", "tilt_angles_deg", "xf",
                                            "defocus_u_angst", "defocus_v_angst", "defocus_angle_deg",
                                            "dose_e_per_angst2")}
    geometry.update(stack_path=files["stack"], voltage_kv=300000.0, cs_mm=2.7, amplitude_contrast=0.07,
                    tomogram_shape_xyz_px=[128, 128, 76])
    path = tmp_path / "ts.json"
    path.write_text(json.dumps(geometry))
    arguments = ["--geometry", str(path), "--particles", files["star"], "--out", str(tmp_path / "o")]
    assert main(COMMON + arguments) == 2
    assert "voltage_kv: voltage 300000 looks like volts" in capsys.readouterr().err
    geometry.update(voltage_kv=300.0, defocus_u_angst=[0.0] * len(geometry["defocus_v_angst"]))
    path.write_text(json.dumps(geometry))
    assert main(COMMON + arguments) == 2
    assert "defocus_u_angst, entry 1: defocus 0 Å is not an underfocus" in capsys.readouterr().err


def test_aretomo_excluded_views_are_left_out_and_their_tilt_taken_from_the_mdoc(dataset, tmp_path, capsys):
    from mspecies.formats import aretomo, imod

    _, _, files = dataset
    xf, angles = imod.read_xf(files["xf"]), imod.read_tlt(files["tlt"])
    excluded = np.zeros(len(angles), dtype=bool)
    excluded[[0, 10]] = True  # the two highest tilts
    aln = aretomo.write_aln(tmp_path / "TS.aln", xf, angles, (128, 128, len(angles)), excluded)
    aln.write_text("".join(line for line in aln.read_text().splitlines(keepends=True) if "DarkFrame" not in line))
    arguments = _routes(files)["aln_mdoc_imod_star_shape"]
    arguments[arguments.index(files["aln"])] = str(aln)
    table = _export(tmp_path / "out", arguments)
    log = capsys.readouterr().out
    assert "11 views, 2 excluded (from --aln" in log and "2 value(s) of views" in log and len(table) == 4
    full = _export(tmp_path / "full", _routes(files)["aln_mdoc_imod_star_shape"])
    assert _worst_relative_difference(tmp_path / "full", full, tmp_path / "out", table) > 1e-3


def test_a_dose_list_out_of_stack_order_without_mdoc_is_warned_about(dataset, tmp_path, capsys):
    """Without an mdoc the acquisition order is unknown and the dose cannot be checked against it: rows out of
    stack order (here shifted by two rows) are exported with a warning naming the images; the list in order gives
    none."""
    folder, _, files = dataset
    lines = Path(files["dose"]).read_text().splitlines()
    shifted_rows = tmp_path / "dose_shifted.txt"
    shifted_rows.write_text("\n".join(lines[:1] + lines[3:] + lines[1:3]) + "\n")
    route = _routes(files)["tlt_dose_xf_imod_text"]
    _export(folder / "dose_in_order", route)
    assert "does not grow away" not in capsys.readouterr().err
    route[route.index(files["dose"])] = str(shifted_rows)
    _export(folder / "dose_shifted", route)
    err = capsys.readouterr().err
    assert "warning: accumulated dose does not grow away from the first-acquired tilt" in err
    assert "are the dose rows in stack order?" in err


def test_an_mdoc_without_datetime_or_prior_dose_warns_that_section_order_is_assumed(dataset, tmp_path, capsys):
    """ExposureDose alone is summed in the section order, wrong for a stack sorted by angle: warned, not silent."""
    folder, _, files = dataset
    text = Path(files["mdoc"]).read_text().splitlines()
    stripped = tmp_path / "TS_01.mrc.mdoc"
    stripped.write_text("\n".join(line for line in text if not line.startswith(("DateTime", "PriorRecordDose")))
                        + "\n")
    route = _routes(files)["mdoc_xf_ctffind_star"]
    route[route.index(files["mdoc"])] = str(stripped)
    _export(folder / "mdoc_exposure_only", route)
    assert "neither DateTime nor PriorRecordDose; taken as its section order" in capsys.readouterr().err


def test_an_export_from_a_manifest_loads_neither_the_simulation_nor_the_file_readers(dataset, tmp_path):
    """``export --manifest`` reads the manifest (:mod:`mspecies.synth.manifest`) without the dataset generator, its
    back-projection (SciPy's ndimage) or the readers of IMOD/SerialEM/CTFFIND files: start-up is paid by every
    export, one per tilt series under Scipion."""
    _, manifest, _ = dataset
    unwanted = ("mspecies.synth.dataset", "mspecies.synth.wbp", "mspecies.synth.phantom", "scipy.ndimage",
                "mspecies.cli.export_inputs")
    code = (f"import sys; from mspecies.cli.main import main; "
            f"code = main({COMMON + ['--manifest', str(manifest), '--out', str(tmp_path / 'out')]!r}); "
            f"print(code, sorted(name for name in {unwanted!r} if name in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "0 []"
    assert (tmp_path / "out" / "particles.star").is_file()
