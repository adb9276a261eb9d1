"""The export's overlapped work (writer thread, next tilt series' engine built ahead) changes nothing but the time:
the same files as the serial path, the same stop with the same message when a volume is bad, a write fails or the
next tilt series' stack is broken, nothing registered after a failure, and a write queue that never holds more
than one batch however many particles there are."""

from __future__ import annotations

import errno
import functools
import json
import shutil
import threading
import time
import weakref
from pathlib import Path

import mrcfile
import numpy as np
import pytest

import mspecies.cli.export as cli_export
from mspecies.cli import main
from mspecies.cli.export_files import export_tilt_series
from mspecies.cli.export_overlap import ParticleWriter, Prefetch
from mspecies.core.reconstruct import ExportOptions, ReconstructionError, TiltSeriesEngine, check_volume
from mspecies.formats.mrc import read_mrc, write_mrc, write_mrc_stream
from mspecies.synth.dataset import generate_dataset
from mspecies.synth.manifest import load_manifest, manifest_particles, manifest_tilt_series

EXPORT = ["export", "--box", "24", "--diameter", "60", "--backend", "numpy", "--max-batch", "3"]


@pytest.fixture(scope="module")
def two_tomograms(tmp_path_factory) -> Path:
    """Synthetic dataset: 2 tilt series x 10 particles, 11 tilts of 128 x 128 px (manifest path)."""
    folder = tmp_path_factory.mktemp("overlap")
    return generate_dataset(folder / "data", n_tomograms=2, n_particles=10, n_tilts=11, box_px=24,
                            image_shape_yx=(128, 128), thickness_angst=300.0, snr=None)


def mrc_contents(out: Path) -> dict[str, tuple[bytes, bytes]]:
    """Every MRC below ``out`` (relative path → data bytes, header bytes without the creation-time labels)."""
    contents = {}
    for path in sorted(out.rglob("*.mrc*")):
        with mrcfile.open(path) as mrc:
            header = mrc.header.copy()
            header["label"] = b""
            contents[path.relative_to(out).as_posix()] = (mrc.data.tobytes(), header.tobytes())
    return contents


def star_rows(out: Path) -> list[str]:
    """The data lines of the export's STAR (its 'Created by' comment line aside)."""
    return [line for line in (out / "particles.star").read_text().splitlines() if not line.startswith("# Created")]


def test_overlapped_writes_give_the_files_of_the_serial_path(two_tomograms, tmp_path):
    manifest = load_manifest(two_tomograms)
    tilt_series = manifest_tilt_series(manifest, "TS_01")
    particles = manifest_particles(manifest)
    particles = particles.subset(particles.tomo_names == "TS_01")
    stack, _ = read_mrc(tilt_series.stack_path)
    options = ExportOptions(tilt_series.pixel_size_angst, 24, 60.0, max_batch=3)
    shape = (128, 128, 75)
    overlapped, _ = export_tilt_series(tilt_series, stack, particles, options, tmp_path / "overlapped",
                                       tomogram_shape_xyz_px=shape)
    serial, _ = export_tilt_series(tilt_series, stack, particles, options, tmp_path / "serial",
                                   tomogram_shape_xyz_px=shape, overlap_writes=False)
    assert overlapped.equals(serial)
    files = mrc_contents(tmp_path / "overlapped")
    assert len(files) == 2 * len(particles) and files == mrc_contents(tmp_path / "serial")


def test_engines_built_ahead_give_the_files_of_engines_built_in_turn(two_tomograms, tmp_path, monkeypatch):
    """Ahead: the first engine while the particles are read, the second while the first tilt series reconstructs."""
    assert main(EXPORT + ["--manifest", str(two_tomograms), "--out", str(tmp_path / "ahead")]) == 0
    monkeypatch.setattr("mspecies.cli.export._build_engine_ahead", lambda job, next_job, reuse=None: None)
    monkeypatch.setattr("mspecies.cli.export.start_first_engine",
                        lambda args, tilt_series: cli_export.FirstEngine(tilt_series, None))
    assert main(EXPORT + ["--manifest", str(two_tomograms), "--out", str(tmp_path / "in_turn")]) == 0
    ahead = mrc_contents(tmp_path / "ahead")
    assert {name.split("/")[0] for name in ahead} == {"TS_01", "TS_02"} and len(ahead) == 40
    assert ahead == mrc_contents(tmp_path / "in_turn")
    assert star_rows(tmp_path / "ahead") == star_rows(tmp_path / "in_turn")


@pytest.fixture(scope="module")
def four_tomograms(tmp_path_factory) -> Path:
    """Synthetic dataset: 4 tilt series x 4 particles, 11 tilts of 128 x 128 px (manifest path)."""
    folder = tmp_path_factory.mktemp("reuse")
    return generate_dataset(folder / "data", n_tomograms=4, n_particles=4, n_tilts=11, box_px=24,
                            image_shape_yx=(128, 128), thickness_angst=300.0, snr=None)


@pytest.mark.parametrize("in_turn", [False, True])
def test_later_tilt_series_prepare_their_stack_in_an_earlier_ones_array_with_the_same_files(
        four_tomograms, tmp_path, monkeypatch, in_turn):
    """Engines built ahead: TS_03 fills TS_01's array of prepared images and TS_04 TS_02's; engines built in turn:
    each fills the one before's. The files are those of an export that makes every array anew."""
    from mspecies.core.extract import StackReuse

    if in_turn:
        monkeypatch.setattr(cli_export, "_build_engine_ahead", lambda job, next_job, reuse=None: None)
    arrays = {}
    create = TiltSeriesEngine.create.__func__

    def recording_create(cls, tilt_series, *args, **kwargs):
        engine = create(cls, tilt_series, *args, **kwargs)
        arrays[tilt_series.ts_id] = engine.prepared.images  # kept alive: distinct arrays keep distinct ids
        return engine

    monkeypatch.setattr(TiltSeriesEngine, "create", classmethod(recording_create))
    assert main(EXPORT + ["--manifest", str(four_tomograms), "--out", str(tmp_path / "reused")]) == 0
    same = [("TS_01", "TS_03"), ("TS_02", "TS_04")] if not in_turn else [("TS_01", "TS_02"), ("TS_02", "TS_03"),
                                                                          ("TS_03", "TS_04")]
    assert all(arrays[earlier] is arrays[later] for earlier, later in same)
    assert len({id(images) for images in arrays.values()}) == (1 if in_turn else 2)
    arrays.clear()
    monkeypatch.setattr(StackReuse, "give", lambda self, images: None)  # every array made anew
    assert main(EXPORT + ["--manifest", str(four_tomograms), "--out", str(tmp_path / "anew")]) == 0
    assert len({id(images) for images in arrays.values()}) == 4
    reused = mrc_contents(tmp_path / "reused")
    assert len(reused) == 2 * 16 and reused == mrc_contents(tmp_path / "anew")
    assert star_rows(tmp_path / "reused") == star_rows(tmp_path / "anew")


def test_the_next_engine_is_built_while_the_current_tilt_series_reconstructs(two_tomograms, tmp_path, monkeypatch):
    """TS_02's engine is built on another thread, started before TS_01 reconstructs."""
    events: list[tuple[str, str]] = []
    create, reconstruct = TiltSeriesEngine.create.__func__, TiltSeriesEngine.reconstruct
    ahead = cli_export._build_engine_ahead

    def logged_create(cls, tilt_series, *args, **kwargs):
        events.append(("create", f"{tilt_series.ts_id} on {threading.current_thread().name}"))
        return create(cls, tilt_series, *args, **kwargs)

    def logged_reconstruct(self, particles):
        events.append(("reconstruct", self.tilt_series.ts_id))
        yield from reconstruct(self, particles)

    def logged_ahead(job, next_job, reuse=None):
        started = ahead(job, next_job, reuse)
        if started is not None:
            events.append(("ahead", next_job.tilt_series.ts_id))
        return started

    monkeypatch.setattr(TiltSeriesEngine, "create", classmethod(logged_create))
    monkeypatch.setattr(TiltSeriesEngine, "reconstruct", logged_reconstruct)
    monkeypatch.setattr(cli_export, "_build_engine_ahead", logged_ahead)
    assert main(EXPORT + ["--manifest", str(two_tomograms), "--out", str(tmp_path / "out")]) == 0
    assert events.index(("ahead", "TS_02")) < events.index(("reconstruct", "TS_01"))
    creates = sorted(where for kind, where in events if kind == "create")
    assert len(creates) == 2 and creates[0] == f"TS_01 on {cli_export.FIRST_ENGINE_THREAD}"
    assert creates[1].startswith("TS_02") and threading.main_thread().name not in creates[1]


def _files_of(manifest: Path, ts_id: str) -> list[str]:
    """The export's file-route arguments for ``ts_id`` of a synthetic dataset (its particles from the STAR)."""
    entry = next(e for e in load_manifest(manifest)["tilt_series"] if e["ts_id"] == ts_id)
    files = {role: str(manifest.parent / path) for role, path in entry["files"].items()}
    return ["--stack", files["stack"], "--mdoc", files["mdoc"], "--xf", files["xf"], "--ctf", files["ctffind"],
            "--tomogram", files["tomogram"], "--particles", str(manifest.parent / "particles.star")]


def test_the_first_engine_is_built_while_the_particles_are_read(two_tomograms, tmp_path, monkeypatch):
    """The stack is read and prepared on another thread from the moment the tilt series' files are read: the
    particles (a STAR file: pandas, the dialect reader) are read meanwhile, not before."""
    import mspecies.cli.export_inputs as export_inputs

    started = threading.Event()
    create, read_particles = TiltSeriesEngine.create.__func__, export_inputs.read_particles
    waited: list[bool] = []

    def logged_create(cls, tilt_series, *args, **kwargs):
        if threading.current_thread().name == cli_export.FIRST_ENGINE_THREAD:
            started.set()
        return create(cls, tilt_series, *args, **kwargs)

    def read_after_the_start(*args, **kwargs):
        waited.append(started.wait(timeout=30))
        return read_particles(*args, **kwargs)

    monkeypatch.setattr(TiltSeriesEngine, "create", classmethod(logged_create))
    monkeypatch.setattr(export_inputs, "read_particles", read_after_the_start)
    assert main(EXPORT + _files_of(two_tomograms, "TS_01") + ["--out", str(tmp_path / "out")]) == 0
    assert waited == [True]
    assert len(mrc_contents(tmp_path / "out")) == 2 * 10


def test_a_first_tilt_series_without_particles_to_export_has_its_engine_dropped_before_the_next_is_built(
        two_tomograms, tmp_path, monkeypatch, capsys):
    """TS_01's particles all lie outside its tomogram and its stack has a NaN tilt: its engine, started before the
    particles were checked, fails; the export of TS_02 goes on, once that build has ended (its memory free), with
    the files of an export of TS_02 alone."""
    data = tmp_path / "data"
    shutil.copytree(two_tomograms.parent, data)
    manifest = load_manifest(data / two_tomograms.name)
    for particle in manifest["particles"]:
        if particle["ts_id"] == "TS_01":
            particle["position_angst"][0] = 1.0e6
    (data / two_tomograms.name).write_text(json.dumps(manifest))
    stack_path = manifest_tilt_series(manifest, "TS_01").stack_path
    with mrcfile.open(stack_path if Path(stack_path).is_absolute() else data / stack_path, mode="r+") as mrc:
        mrc.data[3, 5, 5] = np.nan
    events: list[str] = []
    create = TiltSeriesEngine.create.__func__

    def logged_create(cls, tilt_series, *args, **kwargs):
        events.append(f"start {tilt_series.ts_id}")
        try:
            return create(cls, tilt_series, *args, **kwargs)
        except Exception as error:
            events.append(f"{tilt_series.ts_id}: {error}")
            raise
        finally:
            events.append(f"end {tilt_series.ts_id}")

    monkeypatch.setattr(TiltSeriesEngine, "create", classmethod(logged_create))
    assert main(EXPORT + ["--manifest", str(data / two_tomograms.name), "--out", str(tmp_path / "out")]) == 0
    assert "skipped 10 particle(s), outside the tomogram's x-y area" in capsys.readouterr().out
    assert events[0] == "start TS_01" and events[1].startswith("TS_01: stack") and "has 1 NaN" in events[1]
    assert events[2:] == ["end TS_01", "start TS_02", "end TS_02"]
    assert main(EXPORT + ["--manifest", str(two_tomograms), "--ts-id", "TS_02", "--out", str(tmp_path / "alone")]) == 0
    assert mrc_contents(tmp_path / "out") == mrc_contents(tmp_path / "alone")


def test_a_bad_volume_in_a_later_batch_stops_the_export_with_its_message_and_leaves_nothing(
        two_tomograms, tmp_path, capsys, monkeypatch):
    """Particle 7 of TS_02 (third batch of 3, its engine built ahead) is unusable: exit 1, its message, no folder."""
    def unusable_at_7(volume, what):
        if what == "TS_02 particle 7 3D CTF":
            raise ReconstructionError(f"{what}: the volume has non-finite values")
        check_volume(volume, what)

    monkeypatch.setattr("mspecies.cli.export_files.check_volume", unusable_at_7)
    out = tmp_path / "out"
    assert main(EXPORT + ["--manifest", str(two_tomograms), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "TS_02 particle 7 3D CTF: the volume has non-finite values" in err and "Traceback" not in err
    assert not out.exists(), "the failed export left files"


def test_a_failing_write_stops_the_export_with_a_message_naming_the_file_and_leaves_nothing(
        two_tomograms, tmp_path, capsys, monkeypatch):
    """The 9th MRC write fails (a folder that became unwritable): exit 2, one line naming --out and the file."""
    calls = []

    def write_until_refused(path, data, pixel_size_angst, **kwargs):
        calls.append(path)
        if len(calls) == 9:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return write_mrc_stream(path, data, pixel_size_angst, **kwargs)

    monkeypatch.setattr("mspecies.cli.export_files.write_mrc_stream", write_until_refused)
    out = tmp_path / "out"
    assert main(EXPORT + ["--manifest", str(two_tomograms), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--out" in err[0] and calls[8].name in err[0] and "permission denied" in err[0], err
    assert len(calls) == 9, "writes went on after the failing one"
    assert not out.exists(), "the failed export left files"


def test_a_broken_stack_of_the_next_tilt_series_stops_the_export_naming_its_tilt(two_tomograms, tmp_path, capsys):
    """TS_02's stack (read and filtered ahead, while TS_01 reconstructs) has a NaN pixel: the export stops with the
    message of the serial path, exit 2, nothing left."""
    copied = Path(shutil.copytree(two_tomograms.parent, tmp_path / "data")) / two_tomograms.name
    stack_path = manifest_tilt_series(load_manifest(copied), "TS_02").stack_path
    stack, pixel = read_mrc(stack_path)
    stack[4, 30, 40] = np.nan
    with pytest.warns(RuntimeWarning, match="NaN"):  # mrcfile's header statistics
        write_mrc(stack_path, stack, pixel)
    out = tmp_path / "out"
    assert main(EXPORT + ["--manifest", str(copied), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "TS_02" in err and "tilt 4" in err and "1 NaN" in err and "Traceback" not in err, err
    assert not out.exists()


def test_the_write_queue_holds_one_batch_however_many_particles(two_tomograms, tmp_path, monkeypatch):
    """With writes far slower than the reconstruction, the particle volumes alive at any write never exceed the
    engine's batch being handed out + one queued batch + the one being written, for 10 particles as for 4."""
    alive = [0]
    peaks = {}
    reconstruct = TiltSeriesEngine.reconstruct

    def tracked(self, particles):
        for result in reconstruct(self, particles):
            alive[0] += 1
            weakref.finalize(result.volume, lambda: alive.__setitem__(0, alive[0] - 1))
            yield result

    def slow_write(path, data, pixel_size_angst, **kwargs):
        peaks[n_particles] = max(peaks.get(n_particles, 0), alive[0])
        time.sleep(0.02)
        return write_mrc_stream(path, data, pixel_size_angst, **kwargs)

    monkeypatch.setattr(TiltSeriesEngine, "reconstruct", tracked)
    monkeypatch.setattr("mspecies.cli.export_files.write_mrc_stream", slow_write)
    manifest = load_manifest(two_tomograms)
    tilt_series = manifest_tilt_series(manifest, "TS_01")
    particles = manifest_particles(manifest)
    particles = particles.subset(particles.tomo_names == "TS_01")
    stack, _ = read_mrc(tilt_series.stack_path)
    batch = 2
    for n_particles in (4, 10):
        export_tilt_series(tilt_series, stack, particles.subset(np.arange(10) < n_particles),
                           ExportOptions(tilt_series.pixel_size_angst, 24, 60.0, max_batch=batch),
                           tmp_path / str(n_particles), tomogram_shape_xyz_px=(128, 128, 75))
    assert peaks[10] <= 2 * batch + 1 and peaks[10] <= peaks[4] + 1, peaks


def test_the_writer_blocks_the_submitter_once_max_pending_tasks_wait():
    release, started = threading.Event(), threading.Event()
    submitted = []

    def first():
        started.set()
        release.wait(10)

    with ParticleWriter(2) as writer:
        writer.submit(first)
        started.wait(10)

        def submit_more():
            for k in range(4):
                writer.submit(lambda: None)
                submitted.append(k)

        submitter = threading.Thread(target=submit_more)
        submitter.start()
        time.sleep(0.2)
        assert submitted == [0, 1], "more tasks were queued than max_pending while the writer was busy"
        release.set()
        submitter.join(10)
    assert submitted == [0, 1, 2, 3]


def test_a_failed_task_stops_the_writer_and_its_error_reaches_the_submitter():
    ran = []

    def fail():
        raise ReconstructionError("particle 1: the volume is all zero")

    with pytest.raises(ReconstructionError, match="particle 1"):
        with ParticleWriter(4) as writer:
            writer.submit(lambda: ran.append(0))
            writer.submit(fail)
            writer.submit(lambda: ran.append(2))
            writer.wait()
    assert ran == [0], "a task after the failed one ran"


def test_leaving_the_writer_by_an_exception_discards_queued_tasks_and_waits_for_the_running_one():
    ran, started = [], threading.Event()

    def slow():
        started.set()
        time.sleep(0.3)
        ran.append("slow")

    with pytest.raises(KeyboardInterrupt):
        with ParticleWriter(4) as writer:
            writer.submit(slow)
            writer.submit(lambda: ran.append("queued"))
            started.wait(10)
            raise KeyboardInterrupt
    assert ran == ["slow"], "the running task was not waited for, or a queued one ran after the stop"


def test_the_serial_writer_runs_each_task_at_once():
    ran = []
    with ParticleWriter(0) as writer:
        writer.submit(lambda: ran.append(1))
        assert ran == [1]


def test_prefetch_gives_the_value_or_raises_the_error_of_its_work():
    assert Prefetch(lambda: 42).result() == 42
    with pytest.raises(ValueError, match="broken"):
        Prefetch(lambda: (_ for _ in ()).throw(ValueError("broken"))).result()


def test_each_progress_line_follows_the_files_it_counts(two_tomograms, tmp_path):
    """The line '100/120 particles' is logged by the writer once the 100th particle's files are written."""
    manifest = load_manifest(two_tomograms)
    tilt_series = manifest_tilt_series(manifest, "TS_01")
    particles = manifest_particles(manifest)
    particles = particles.subset(particles.tomo_names == "TS_01")
    particles = particles.subset(np.arange(len(particles)).repeat(12))  # 120 particles (repeats are fine here)
    stack, _ = read_mrc(tilt_series.stack_path)
    out = tmp_path / "out"
    written_at_line = {}

    def log(line):
        written_at_line[line] = len(list(out.glob("*.mrc")))

    export_tilt_series(tilt_series, stack, particles, ExportOptions(tilt_series.pixel_size_angst, 24, 60.0),
                       out, tomogram_shape_xyz_px=(128, 128, 75), log=log)
    progress = [line for line in written_at_line if "100/120 particles" in line]
    assert len(progress) == 1 and "particles/s" in progress[0]
    assert written_at_line[progress[0]] >= 200, "the progress line came before the files it counts"


def test_closing_the_writer_writes_the_last_tasks_on_the_closing_thread_too():
    """The backlog left when the reconstruction ends runs on two threads: while the writer's thread is busy, the
    thread that closes the writer runs the queued tasks."""
    release, taken, ran_on = threading.Event(), threading.Event(), []

    def busy():
        taken.set()
        release.wait(10)
        ran_on.append(("busy", threading.current_thread().name))

    def record(k):
        ran_on.append((k, threading.current_thread().name))
        if k == 2:
            release.set()

    writer = ParticleWriter(4)
    writer.submit(busy)
    taken.wait(10)
    for k in range(3):
        writer.submit(functools.partial(record, k))
    writer.close()
    closing = threading.current_thread().name
    assert [entry for entry in ran_on if entry[0] != "busy"] == [(k, closing) for k in range(3)]
    assert ("busy", "mspecies-writer") in ran_on


def test_a_progress_task_starts_after_every_earlier_task_even_on_the_closing_thread():
    finished, seen_at_progress = [], []
    started = threading.Event()

    def slow():
        started.set()
        time.sleep(0.3)
        finished.append("slow")

    writer = ParticleWriter(4)
    writer.submit(slow)
    started.wait(10)
    writer.submit(lambda: seen_at_progress.append(list(finished)), after_earlier=True)
    writer.close()
    assert seen_at_progress == [["slow"]], "the progress task ran before the task submitted before it finished"


def test_when_two_threads_fail_at_close_the_error_of_the_task_submitted_first_is_raised():
    later_failed, taken = threading.Event(), threading.Event()

    def first():
        taken.set()
        later_failed.wait(10)
        raise ReconstructionError("particle 0: the volume is all zero")

    def second():
        later_failed.set()
        raise ReconstructionError("particle 1: the volume has non-finite values")

    writer = ParticleWriter(4)
    writer.submit(first)
    taken.wait(10)
    writer.submit(second)
    with pytest.raises(ReconstructionError, match="particle 0"):
        writer.close()


def test_a_stop_while_closing_leaves_no_writer_running():
    """Ctrl-C (here a signal handler's exception) while ``close`` waits for the writer: the writer is stopped and
    joined before the exception leaves ``close``, so the caller's cleanup never races a write."""
    import signal

    class Stop(Exception):
        pass

    def stop(_number, _frame):
        raise Stop

    release, taken, waiting = threading.Event(), threading.Event(), threading.Event()

    def busy():
        taken.set()
        release.wait(10)

    def interrupt_then_release():
        waiting.wait(10)  # close waits for the writer, which runs the first task
        time.sleep(0.1)
        signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR1)
        time.sleep(0.3)
        release.set()

    previous = signal.signal(signal.SIGUSR1, stop)
    try:
        writer = ParticleWriter(2)
        end_thread = writer._end_thread

        def spied_end_thread():
            waiting.set()
            end_thread()

        writer._end_thread = spied_end_thread
        writer.submit(busy)
        taken.wait(10)  # by the writer's thread
        helper = threading.Thread(target=interrupt_then_release)
        helper.start()
        with pytest.raises(Stop):
            writer.close()
        assert release.is_set(), "close let the stop through while the writer was still running a task"
        helper.join(10)
    finally:
        signal.signal(signal.SIGUSR1, previous)
