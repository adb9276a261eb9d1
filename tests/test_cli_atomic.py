"""Outputs that never mix runs nor stay half-written: export into a folder holding an earlier export (refused
without --overwrite; replaced whole with it), a kill -9, Ctrl-C or SIGTERM mid-export, two runs into one folder, a
full disk, a read-only folder; intersect and convert replace their outputs only with complete ones."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import starfile

from mspecies.cli import main
from mspecies.cli.atomic import LOCK_NAME, STAGING_PREFIX, atomic_file, folder_lock
from mspecies.synth.dataset import generate_dataset

ROOT = Path(__file__).resolve().parents[1]
EXPORT = ["export", "--box", "24", "--diameter", "60", "--backend", "numpy"]


@pytest.fixture(scope="module")
def two_tomograms(tmp_path_factory) -> Path:
    """Synthetic dataset: 2 tilt series x 40 particles, 11 tilts of 128 x 128 px (manifest path)."""
    folder = tmp_path_factory.mktemp("atomic")
    return generate_dataset(folder / "data", n_tomograms=2, n_particles=40, n_tilts=11, box_px=24,
                            image_shape_yx=(128, 128), thickness_angst=300.0, snr=None)


def star_files(out: Path, columns: tuple[str, ...] = ("rlnImageName", "rlnCtfImage")) -> list[Path]:
    """Every file the export STAR of ``out`` names (sub-tomograms and 3D CTFs)."""
    particles = starfile.read(out / "particles.star", always_dict=True)["particles"]
    return [out / name for column in columns for name in particles[column].astype(str)]


def differ_from(paths: list[Path], earlier: dict[Path, str]) -> bool:
    """True when every file differs from the earlier run's file of the same name (the runs differ in contrast
    inversion, so every sub-tomogram does; the 3D CTFs do not depend on it)."""
    return all(digests([path])[path] != earlier[path] for path in paths)


def digests(paths: list[Path]) -> dict[Path, str]:
    return {path: hashlib.sha256(path.read_bytes()).hexdigest() for path in paths}


def exported_files(out: Path) -> set[Path]:
    return {path for path in out.rglob("*.mrc") if not any(p.startswith(".") for p in path.relative_to(out).parts)}


def test_a_second_export_into_the_folder_is_refused_and_overwrite_replaces_the_whole_earlier_export(
        two_tomograms, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(EXPORT + ["--manifest", str(two_tomograms), "--out", str(out)]) == 0
    earlier = digests(star_files(out))
    assert {p.parent.name for p in earlier} == {"TS_01", "TS_02"}
    capsys.readouterr()
    assert main(EXPORT + ["--manifest", str(two_tomograms), "--out", str(out), "--ts-id", "TS_01",
                          "--no-invert"]) == 2
    assert "--overwrite" in capsys.readouterr().err and digests(star_files(out)) == earlier
    assert main(EXPORT + ["--manifest", str(two_tomograms), "--out", str(out), "--ts-id", "TS_01", "--no-invert",
                          "--overwrite"]) == 0
    assert "replaced the earlier export" in capsys.readouterr().out
    now = star_files(out)
    assert {p.parent.name for p in now} == {"TS_01"}
    assert exported_files(out) == set(now), "files of the earlier, larger export were left behind"
    assert differ_from(star_files(out, ("rlnImageName",)), earlier), "a sub-tomogram of the earlier export is listed"
    assert not list(out.glob(f"{STAGING_PREFIX}*"))


def _stop_a_rerun_mid_write(manifest: Path, out: Path, stop: signal.Signals) -> tuple[int, str, dict[Path, str]]:
    """Export into ``out``, then send ``stop`` to an ``export --overwrite`` re-run once it has staged a few files;
    returns the re-run's exit status, its stderr and the digests of the files the earlier export's STAR names."""
    assert main(EXPORT + ["--manifest", str(manifest), "--out", str(out)]) == 0
    earlier = digests(star_files(out))
    command = [sys.executable, "-m", "mspecies", *EXPORT, "--manifest", str(manifest), "--out", str(out),
               "--overwrite", "--no-invert", "--ctf-method", "padded", "--max-batch", "1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for _ in range(5):
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while process.poll() is None and time.monotonic() < deadline:
            if len(list(out.glob(f"{STAGING_PREFIX}*/TS_0*/*.mrc"))) >= 6:
                process.send_signal(stop)
                return process.wait(), process.communicate()[1], earlier
            time.sleep(0.002)
        process.wait()
        assert main(EXPORT + ["--manifest", str(manifest), "--out", str(out), "--overwrite"]) == 0
        earlier = digests(star_files(out))
    pytest.fail("the export always finished before it could be stopped")


def test_a_killed_rerun_never_leaves_a_star_naming_files_of_two_runs(two_tomograms, tmp_path):
    """kill -9 of ``export --overwrite`` while it writes: the STAR is the earlier run's and every file it names is
    the earlier run's, unchanged; the next run removes the killed run's staging folder and replaces everything."""
    out = tmp_path / "out"
    returncode, _, earlier = _stop_a_rerun_mid_write(two_tomograms, out, signal.SIGKILL)
    assert returncode == -signal.SIGKILL
    assert digests(star_files(out)) == earlier
    assert exported_files(out) == set(earlier)
    assert list(out.glob(f"{STAGING_PREFIX}*")), "expected the killed run's hidden staging folder"
    assert main(EXPORT + ["--manifest", str(two_tomograms), "--out", str(out), "--overwrite", "--no-invert"]) == 0
    now = star_files(out)
    assert set(now) == set(earlier) and differ_from(star_files(out, ("rlnImageName",)), earlier)
    assert not list(out.glob(f"{STAGING_PREFIX}*"))


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_or_sigterm_mid_rerun_is_one_line_exit_128_plus_signal_and_removes_what_it_staged(
        two_tomograms, tmp_path, stop):
    """Ctrl-C or ``kill`` (a cancelled queue job) of ``export --overwrite`` while it writes: no traceback, exit
    128 + the signal, the earlier export untouched and no staging folder left."""
    out = tmp_path / "out"
    returncode, err, earlier = _stop_a_rerun_mid_write(two_tomograms, out, stop)
    assert returncode == 128 + stop, err
    assert "Traceback" not in err and f"interrupted by {stop.name}" in err.strip().splitlines()[-1], err
    assert digests(star_files(out)) == earlier and exported_files(out) == set(earlier)
    assert not list(out.glob(f"{STAGING_PREFIX}*")), "the stopped run left its staging folder"


def test_a_second_run_into_a_locked_folder_is_refused_at_once(two_tomograms, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    with folder_lock(out, "--out"):
        started = time.perf_counter()
        assert main(EXPORT + ["--manifest", str(two_tomograms), "--out", str(out)]) == 2
        assert time.perf_counter() - started < 30
    err = capsys.readouterr().err
    assert f"process {os.getpid()}" in err and "--out" in err and "Traceback" not in err
    assert not (out / "particles.star").exists() and not exported_files(out)
    assert main(EXPORT + ["--manifest", str(two_tomograms), "--out", str(out), "--ts-id", "TS_01"]) == 0


def test_the_lock_is_released_when_its_holder_is_killed(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from mspecies.cli.atomic import folder_lock\n"
                               "with folder_lock(sys.argv[1], '--out'):\n print('held', flush=True); time.sleep(60)",
                               str(tmp_path)], env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout.readline().strip() == "held"
    from mspecies.common.types import InputError

    with pytest.raises(InputError, match="another mspecies run"), folder_lock(tmp_path, "--out"):
        pass
    holder.kill()
    holder.wait()
    with folder_lock(tmp_path, "--out") as lock:
        assert lock == tmp_path / LOCK_NAME


def _mount_tmpfs(folder: Path, options: str) -> None:
    folder.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True,
                            text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")


@pytest.fixture()
def small_disk(tmp_path):
    """A 600 KiB tmpfs (root only): about 7 of the export's 87 KiB particles fit."""
    folder = tmp_path / "disk"
    _mount_tmpfs(folder, "size=600k")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_full_disk_is_refused_before_writing_by_the_free_space_check(two_tomograms, small_disk, capsys):
    assert main(EXPORT + ["--manifest", str(two_tomograms), "--out", str(small_disk / "out")]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "free" in err and "Traceback" not in err
    assert not exported_files(small_disk / "out") and not (small_disk / "out" / "particles.star").exists()


@pytest.mark.parametrize("direct", [False, True], ids=["through the page cache", "direct I/O"])
def test_a_disk_that_fills_up_while_writing_leaves_nothing_behind(two_tomograms, small_disk, capsys, monkeypatch,
                                                                   direct):
    """The free-space check passes (another writer fills the disk afterwards, simulated by skipping the check): the
    write fails with ENOSPC, the run ends with one message, and no truncated MRC or STAR remains."""
    monkeypatch.setattr("mspecies.cli.atomic.check_free_space", lambda *args, **kwargs: None)
    if direct:  # every file as a large box's are written (tmpfs takes O_DIRECT since Linux 6.6)
        monkeypatch.setattr("mspecies.cli.export_files.DIRECT_IO_MIN_BYTES", 0)
    out = small_disk / "out"
    assert main(EXPORT + ["--manifest", str(two_tomograms), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "no space left" in err and "--out" in err and "Traceback" not in err
    assert not out.exists(), "the failed run left its folder"


def test_a_read_only_output_folder_is_named(two_tomograms, tmp_path, capsys):
    folder = tmp_path / "ro"
    _mount_tmpfs(folder, "size=64k,ro")
    try:
        assert main(EXPORT + ["--manifest", str(two_tomograms), "--out", str(folder / "out")]) == 2
        err = capsys.readouterr().err
        assert "--out" in err and "Traceback" not in err and ("read-only" in err.lower() or "writable" in err)
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_atomic_file_replaces_the_target_only_when_complete(tmp_path):
    target = tmp_path / "out.star"
    target.write_text("earlier")
    with pytest.raises(RuntimeError), atomic_file(target) as temporary:
        temporary.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "earlier" and sorted(p.name for p in tmp_path.iterdir()) == ["out.star"]
    with atomic_file(target) as temporary:
        temporary.write_text("complete")
    assert target.read_text() == "complete" and sorted(p.name for p in tmp_path.iterdir()) == ["out.star"]


def test_convert_leaves_no_file_when_it_fails(tmp_path, capsys):
    source = tmp_path / "in.star"
    source.write_text("data_particles\nloop_\n_rlnCoordinateX #1\n_rlnCoordinateY #2\n_rlnCoordinateZ #3\n1 2 3\n")
    output = tmp_path / "out.star"
    assert main(["convert", str(source), "--to", "3.1", str(output)]) == 2  # no pixel size: refused
    assert "Traceback" not in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.star"]


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]], ids=["plain", "overwrite"])
def test_an_export_into_the_folder_of_its_particles_star_never_replaces_that_input(two_tomograms, overwrite,
                                                                                 capsys):
    """The synthetic folder holds the input ``particles.star``: exporting into it was refused as 'an earlier
    export' and, with --overwrite, replaced the user's input STAR by the export's. Refused either way now."""
    star = two_tomograms.parent / "particles.star"
    before = star.read_bytes()
    argv = EXPORT + ["--manifest", str(two_tomograms), "--particles", str(star), "--out", str(star.parent)]
    assert main(argv + overwrite) == 2
    err = capsys.readouterr().err
    assert f"which is its input --particles {star}" in err and "choose another --out folder" in err
    assert star.read_bytes() == before and not (star.parent / LOCK_NAME).exists()
