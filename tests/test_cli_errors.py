"""One error path for every command: each expected failure of export, intersect and convert (bad parameters, bad
or binary input, output paths, memory, broken stacks) ends with exit code 2 and one message naming the flag or
file, never a traceback, and parameters are refused before anything is written; unexpected errors keep their
traceback; intersect's logs stay a screenful for 1000 tomograms."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_cli_intersect import SHAPE, write_star

from mspecies.cli import main
from mspecies.core.memory import Availability
from mspecies.formats.mrc import read_mrc, write_mrc
from mspecies.synth.dataset import generate_dataset

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    """Paths of a small synthetic dataset (1 tilt series, 4 particles, 11 tilts of 128 x 128 px), its IMOD-style
    files, stacks with a NaN / infinite / blank tilt, a binary file, an empty particle STAR and a plain file."""
    folder = tmp_path_factory.mktemp("errors")
    manifest_path = generate_dataset(folder / "data", n_particles=4, n_tilts=11, box_px=24, image_shape_yx=(128, 128),
                                     thickness_angst=300.0, snr=None)
    manifest = json.loads(manifest_path.read_text())
    entry = manifest["tilt_series"][0]
    paths = {role: str(manifest_path.parent / path) for role, path in entry["files"].items()}
    nz, ny, nx = entry["unbinned_tomogram_shape_zyx"]
    paths |= {"manifest": str(manifest_path), "particles": str(manifest_path.parent / "particles.star"),
              "tomo_shape": [str(nx), str(ny), str(nz)], "angle3": f"{entry['tilt_angles_deg'][3]:+.1f}"}
    stack, pixel = read_mrc(paths["stack"])
    for name, value in (("nan", np.nan), ("inf", np.inf), ("blank", None)):
        broken = stack.copy()
        if value is None:
            broken[3] = 7.0
        else:
            broken[3, 10:12, 20] = value
        paths[f"stack_{name}"] = str(write_mrc(folder / f"{name}.mrc", broken, pixel))
    (folder / "binary.star").write_bytes(bytes(range(256)) * 20)
    (folder / "empty.star").write_text("data_particles\n\nloop_\n_rlnCoordinateX #1\n_rlnCoordinateY #2\n"
                                       "_rlnCoordinateZ #3\n_rlnTomoName #4\n")
    (folder / "empty_with_optics.star").write_text(
        "data_optics\n\nloop_\n_rlnOpticsGroup #1\n_rlnImagePixelSize #2\n1 4.0\n\n"
        "data_particles\n\nloop_\n_rlnTomoName #1\n_rlnCoordinateX #2\n_rlnCoordinateY #3\n_rlnCoordinateZ #4\n"
        "_rlnOpticsGroup #5\n")
    (folder / "a_file").write_text("not a folder")
    paths |= {"binary": str(folder / "binary.star"), "empty": str(folder / "empty.star"),
              "empty_with_optics": str(folder / "empty_with_optics.star"),
              "file": str(folder / "a_file")}
    return paths


def imod(data: dict, stack: str | None = None, particles: str | None = None, defocus: list[str] | None = None
         ) -> list[str]:
    return ["--stack", stack or data["stack"], "--tlt", data["tlt"], "--xf", data["xf"],
            *(defocus or ["--defocus", data["defocus"]]),
            "--dose", data["dose"], "--particles", particles or data["particles"], "--pixel-size", "4",
            "--tomo-shape", *data["tomo_shape"], "--ts-id", "TS_01"]


def export(data: dict, *extra: str, source: list[str] | None = None) -> list[str]:
    return ["export", *(source or ["--manifest", data["manifest"]]), "--box", "24", "--diameter", "60",
            "--backend", "numpy", *extra]


def intersect(data: dict, *extra: str, old: str | None = None) -> list[str]:
    return ["intersect", "--old", old or data["particles"], "--new", data["particles"],
            "--tomo-size", *data["tomo_shape"], *extra]


# (case, argv builder (data, output folder) -> argv, text the message must contain)
CASES = [
    ("export: --out is a file", lambda d, o: export(d, "--out", d["file"]), "--out"),
    ("export: --out under a file", lambda d, o: export(d, "--out", d["file"] + "/out"), "is a file"),
    ("export: binary --particles", lambda d, o: export(d, "--out", o, source=imod(d, particles=d["binary"])),
     "error: --particles: {binary} is not a text file"),
    ("export: empty --particles", lambda d, o: export(d, "--out", o, source=imod(d, particles=d["empty"])),
     "--particles"),
    ("export: empty --particles with an optics pixel size",
     lambda d, o: export(d, "--out", o, source=imod(d, particles=d["empty_with_optics"])),
     "--particles: {empty_with_optics} holds no particles"),
    ("export: missing --particles", lambda d, o: export(d, "--out", o, source=imod(d, particles=o + ".star")),
     "--particles"),
    ("export: CTFFIND output given as --defocus",
     lambda d, o: export(d, "--out", o, source=imod(d, defocus=["--defocus", d["ctffind"]])),
     "is CTFFIND output (its first line says so), not an IMOD .defocus; pass it as --ctf {ctffind}"),
    ("export: IMOD .defocus given as --ctf",
     lambda d, o: export(d, "--out", o, source=imod(d, defocus=["--ctf", d["defocus"]])),
     "--ctf {defocus} is not CTFFIND output (no '# Output from CTFFIND' header line; an IMOD .defocus goes to "
     "--defocus)"),
    ("export: --shift NaN", lambda d, o: export(d, "--out", o, "--shift", "nan", "0", "0"),
     "--shift: expected three finite shifts"),
    ("export: --box odd", lambda d, o: export(d, "--out", o, "--box", "23"), "--box (box_px): expected an even"),
    ("export: --n-tilts-by-dose 0", lambda d, o: export(d, "--out", o, "--n-tilts-by-dose", "0"),
     "--n-tilts-by-dose (n_tilts_by_dose)"),
    ("export: --max-batch 0", lambda d, o: export(d, "--out", o, "--max-batch", "0"), "--max-batch (max_batch)"),
    ("export: --threads 0", lambda d, o: export(d, "--out", o, "--threads", "0"),
     "--threads (workers): expected None or an integer >= 1"),
    ("export: --padding-factor below 1", lambda d, o: export(d, "--out", o, "--padding-factor", "0.9"),
     "--padding-factor (padding_factor): expected a finite number >= 1"),
    ("export: --pixel-size-out 0", lambda d, o: export(d, "--out", o, "--pixel-size-out", "0"), "--pixel-size-out"),
    ("export: --n-tilts-by-dose > tilts", lambda d, o: export(d, "--out", o, "--n-tilts-by-dose", "12"),
     "--n-tilts-by-dose"),
    ("export: diameter > box", lambda d, o: export(d, "--out", o, "--diameter", "100"), "--diameter"),
    ("export: --memory-gb above the machine", lambda d, o: export(d, "--out", o, "--memory-gb", "1e9"),
     "--memory-gb"),
    ("export: --memory-gb too small for the plan", lambda d, o: export(d, "--out", o, "--memory-gb", "0.001"),
     "--memory-gb"),
    ("export: --box above the images", lambda d, o: export(d, "--out", o, "--box", "512"), "--box"),
    ("export: NaN in a tilt", lambda d, o: export(d, "--out", o, source=imod(d, d["stack_nan"])),
     "tilt 3 ({angle3}°) has 2 NaN"),
    ("export: Inf in a tilt", lambda d, o: export(d, "--out", o, source=imod(d, d["stack_inf"])),
     "tilt 3 ({angle3}°) has 0 NaN and 2 infinite"),
    ("export: blank tilt", lambda d, o: export(d, "--out", o, source=imod(d, d["stack_blank"])),
     "tilt 3 ({angle3}°) is blank"),
    ("export: --min-visible-tilts 0", lambda d, o: export(d, "--out", o, "--min-visible-tilts", "0"),
     "--min-visible-tilts"),
    ("intersect: --bins 0", lambda d, o: intersect(d, "--tolerance-angst", "5", "--out", o, "--bins", "0"),
     "--bins"),
    ("intersect: --tolerance-angst inf", lambda d, o: intersect(d, "--tolerance-angst", "inf", "--out", o),
     "--tolerance-angst"),
    ("intersect: --tolerance-angst nan", lambda d, o: intersect(d, "--tolerance-angst", "nan", "--out", o),
     "--tolerance-angst"),
    ("intersect: --histogram-radius-angst 0", lambda d, o: intersect(d, "--tolerance-angst", "5", "--out", o,
                                                                     "--histogram-radius-angst", "0"),
     "--histogram-radius-angst"),
    ("intersect: binary --old", lambda d, o: intersect(d, "--tolerance-angst", "5", "--out", o, old=d["binary"]),
     "--old"),
    ("intersect: empty --old", lambda d, o: intersect(d, "--tolerance-angst", "5", "--out", o, "--coord-pixel-size-"
                                                      "angst", "4", old=d["empty"]), "--old"),
    ("intersect: --out is a file", lambda d, o: intersect(d, "--tolerance-angst", "5", "--out", d["file"]), "--out"),
    ("convert: binary input", lambda d, o: ["convert", d["binary"], "--to", "5", o + ".star"], "input"),
    ("convert: missing input", lambda d, o: ["convert", o + ".missing", "--to", "5", o + ".star"], "not found"),
    ("convert: empty input", lambda d, o: ["convert", d["empty"], "--to", "3.1", o + ".star"], "holds no particles"),
    ("convert: empty input, every value given", lambda d, o: ["convert", d["empty"], "--to", "3.1", o + ".star",
                                                              "--coord-pixel-size-angst", "4", "--voltage", "300",
                                                              "--cs", "2.7", "--amplitude-contrast", "0.07"],
     "holds no particles"),
    ("convert: output is a folder", lambda d, o: ["convert", d["particles"], "--to", "5", str(Path(o).parent)],
     "is a folder"),
    ("convert: output under a file", lambda d, o: ["convert", d["particles"], "--to", "5", d["file"] + "/x.star",
                                                   "--tomo-size", *d["tomo_shape"]], "is a file"),
]


@pytest.mark.parametrize("case, argv, expected", CASES, ids=[case for case, _, _ in CASES])
def test_every_expected_failure_is_one_message_with_exit_2_and_nothing_written(data, tmp_path, capsys, case, argv,
                                                                                expected):
    out = tmp_path / "out"
    started = time.perf_counter()
    assert main(argv(data, str(out))) == 2, case
    seconds = time.perf_counter() - started
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert expected.format(**data) in err, err
    assert not out.exists() and not Path(str(out) + ".star").exists(), "written before the parameters were checked"
    assert seconds < 60, f"refused only after {seconds:.0f} s"


def test_the_real_entry_point_prints_no_traceback(data, tmp_path):
    """``python -m mspecies`` as a user runs it: the message, exit code 2, no traceback (a few classes)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for argv in (export(data, "--out", data["file"]), intersect(data, "--tolerance-angst", "inf", "--out", "x"),
                 ["convert", data["binary"], "--to", "5", str(tmp_path / "x.star")]):
        result = subprocess.run([sys.executable, "-m", "mspecies", *argv], env=env, capture_output=True, text=True,
                                cwd=tmp_path)
        assert result.returncode == 2 and "Traceback" not in result.stderr and "error:" in result.stderr, result


def test_running_out_of_memory_is_a_message(data, tmp_path, capsys, monkeypatch):
    def exhausted(*args, **kwargs):
        raise MemoryError("Unable to allocate 1017 MiB")

    monkeypatch.setattr("mspecies.cli.export_files.TiltSeriesEngine.create", exhausted)
    assert main(export(data, "--out", str(tmp_path / "out"))) == 2
    err = capsys.readouterr().err
    assert "out of memory" in err and "--memory-gb" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "particles.star").exists()


def test_an_unexpected_error_keeps_its_traceback(data, tmp_path, monkeypatch):
    def bug(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr("mspecies.cli.export_files.TiltSeriesEngine.create", bug)
    with pytest.raises(ZeroDivisionError):
        main(export(data, "--out", str(tmp_path / "out")))
    assert not (tmp_path / "out" / "particles.star").exists()


def test_cupy_requested_without_cupy_is_a_message(data, tmp_path, capsys):
    from mspecies.core.backend import cupy_unavailable_reason

    if cupy_unavailable_reason() is None:
        pytest.skip("CuPy runs here: the refusal cannot be provoked")
    argv = export(data, "--out", str(tmp_path / "out"))
    argv[argv.index("numpy")] = "cupy"
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--backend cupy" in err and "Traceback" not in err


def test_an_m_compatible_solve_that_cannot_fit_is_refused_with_the_number(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("mspecies.cli.intersect_checks.memory_availability",
                        lambda: Availability(10**12, (10_000, "/job_1", 20_000)))
    positions = np.random.default_rng(0).uniform(-300, 300, (40, 3))
    names = np.array(["TS_01"] * 40, dtype=object)
    write_star(tmp_path / "old.star", positions, names)
    write_star(tmp_path / "new.star", positions + 1.0, names)
    argv = ["intersect", "--old", str(tmp_path / "old.star"), "--new", str(tmp_path / "new.star"),
            "--tolerance-angst", "5", "--tomo-size", *map(str, SHAPE), "--out", str(tmp_path / "out")]
    assert main(argv + ["--mode", "m_compatible"]) == 2
    err = capsys.readouterr().err
    assert "40 old x 40 new" in err and "62.5 KiB" in err and "--mode gated" in err  # 40 B x 40 x 40
    assert "memory cgroup /job_1" in err
    assert not (tmp_path / "out").exists()
    assert main(argv) == 0  # gated, finite radius: sparse, no dense plan


def test_intersect_logs_stay_a_screenful_for_1000_tomograms(tmp_path, capsys):
    names = np.array([f"TS_{k:04d}" for k in range(1000) for _ in range(2)], dtype=object)
    positions = np.tile([[0.0, 0.0, 0.0], [200.0, 0.0, 0.0]], (1000, 1))
    write_star(tmp_path / "old.star", positions, names)
    write_star(tmp_path / "new.star", positions + 1.0, names)
    assert main(["intersect", "--old", str(tmp_path / "old.star"), "--new", str(tmp_path / "new.star"),
                 "--tolerance-angst", "5", "--tomo-size", *map(str, SHAPE), "--out", str(tmp_path / "out")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) <= 30, lines
    assert any("990 more" in line for line in lines)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert len(summary["per_tomogram"]) == 1000 and summary["in_both"] == 2000


def test_an_unusable_volume_ends_with_exit_1_and_leaves_nothing(data, tmp_path, capsys, monkeypatch):
    from mspecies.core.reconstruct import ReconstructionError

    def unusable(volume, what):
        raise ReconstructionError(f"{what}: the volume has non-finite values")

    monkeypatch.setattr("mspecies.cli.export_files.check_volume", unusable)
    assert main(export(data, "--out", str(tmp_path / "out"))) == 1
    err = capsys.readouterr().err
    assert "TS_01 particle 0 sub-tomogram" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def _run_module(arguments: list[str]) -> subprocess.CompletedProcess:
    """``python -m mspecies ARGUMENTS`` with an exit handler that prints 'teardown' (run by a normal exit only)."""
    code = ("import atexit, runpy, sys; atexit.register(lambda: print('teardown', flush=True)); "
            "sys.argv = ['mspecies', *sys.argv[1:]]; runpy.run_module('mspecies', run_name='__main__')")
    return subprocess.run([sys.executable, "-c", code, *arguments], capture_output=True, text=True, timeout=120)


def test_file_commands_leave_without_teardown_once_their_output_is_flushed(tmp_path):
    """export/convert/intersect/synth end with os._exit after flushing (help text and error message complete,
    exit codes kept); demo, which runs Scipion, exits normally."""
    helped = _run_module(["export", "--help"])
    failed = _run_module(["export", "--manifest", str(tmp_path / "missing.json"), "--box", "32", "--diameter",
                          "100", "--out", str(tmp_path / "out")])
    demo = _run_module(["demo", "--help"])
    assert helped.returncode == 0 and "--overwrite" in helped.stdout and "teardown" not in helped.stdout
    assert failed.returncode == 2 and "missing.json" in failed.stderr and "teardown" not in failed.stdout
    assert demo.returncode == 0 and demo.stdout.rstrip().endswith("teardown")
