"""The export's MRC writers: without the page cache (``O_DIRECT``) and through it from a kept header
(``write_mrc_stream``); the bytes of mrcfile's own, wherever the file system refuses direct I/O or cuts a write
short, and the export's choice between them by file size."""

from __future__ import annotations

import datetime
import errno
import itertools
import os
import sys
import threading

import mrcfile.mrcobject
import numpy as np
import pytest
from test_export_overlap import EXPORT, mrc_contents, two_tomograms  # noqa: F401 (fixture)

from mspecies.cli.main import main
from mspecies.core.reconstruct import ExportOptions, ReconstructionError, check_volume
from mspecies.formats import mrc
from mspecies.formats.mrc import DIRECT_IO_ALIGNMENT, write_mrc, write_mrc_direct, write_mrc_stream

SHAPES = [(64, 64, 64), (33, 20, 17), (5, 64, 64), (40, 41), (128, 128, 65), (100, 100, 100)]


class _Midnight(datetime.datetime):
    @classmethod
    def now(cls, tz=None):  # noqa: ANN001, ANN206 (datetime's own signature)
        return cls(2026, 12, 6)


@pytest.fixture(autouse=True)
def fixed_label_time(monkeypatch):
    """mrcfile labels each new file with the time of day (``datetime.now()``): one time for every writer, and no
    header kept from another test (made in the same second with the real time)."""
    monkeypatch.setattr(mrcfile.mrcobject, "datetime", _Midnight)
    monkeypatch.setattr(mrc, "_HEADERS", {})


def random_volume(shape: tuple[int, ...], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * rng.uniform(0.1, 1e3) + rng.uniform(-5, 5)).astype(np.float32)


@pytest.mark.parametrize("shape", SHAPES)
def test_direct_writes_give_the_bytes_mrcfile_writes(tmp_path, shape):
    volume = random_volume(shape, len(shape) + shape[0])
    write_mrc(tmp_path / "mrcfile.mrc", volume, 3.37)
    write_mrc_direct(tmp_path / "direct.mrc", volume, 3.37)
    write_mrc_direct(tmp_path / "given.mrc", volume, 3.37, extremes=(volume.min(), volume.max()))
    expected = (tmp_path / "mrcfile.mrc").read_bytes()
    assert b"2026-12-06 00:00:00" in expected[:1024]  # the fixed label time: a new second cannot split the two
    assert (tmp_path / "direct.mrc").read_bytes() == expected
    assert (tmp_path / "given.mrc").read_bytes() == expected


def test_a_direct_write_replaces_a_longer_file_and_converts_to_float32(tmp_path):
    volume = random_volume((30, 30, 30), 3)
    write_mrc(tmp_path / "mrcfile.mrc", volume, 2.0)
    (tmp_path / "direct.mrc").write_bytes(b"x" * 500_000)
    write_mrc_direct(tmp_path / "direct.mrc", volume.astype(np.float64), 2.0)
    assert (tmp_path / "direct.mrc").read_bytes() == (tmp_path / "mrcfile.mrc").read_bytes()


def test_direct_writes_open_with_o_direct_where_the_file_system_has_it(tmp_path, monkeypatch):
    opened, real_open = [], os.open

    def recording_open(path, flags, *args):
        try:
            fd = real_open(path, flags, *args)
        except OSError as error:
            opened.append((bool(flags & os.O_DIRECT), error.errno))
            raise
        opened.append((bool(flags & os.O_DIRECT), 0))
        return fd

    monkeypatch.setattr(os, "open", recording_open)
    write_mrc_direct(tmp_path / "direct.mrc", random_volume((64, 64, 64), 4), 1.0)
    # ext4/xfs (CI, here): opened directly; a file system without direct I/O refuses it with EINVAL first
    assert opened in ([(True, 0)], [(True, errno.EINVAL), (False, 0)])


def test_a_file_system_refusing_direct_io_at_open_gets_the_same_file(tmp_path, monkeypatch):
    real_open = os.open

    def no_direct_open(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument", str(path))
        return real_open(path, flags, *args)

    volume = random_volume((48, 50, 52), 5)
    write_mrc(tmp_path / "mrcfile.mrc", volume, 1.5)
    monkeypatch.setattr(os, "open", no_direct_open)
    write_mrc_direct(tmp_path / "direct.mrc", volume, 1.5)
    assert (tmp_path / "direct.mrc").read_bytes() == (tmp_path / "mrcfile.mrc").read_bytes()


@pytest.mark.parametrize("failure", ["einval", "short"])
def test_a_refused_or_short_direct_write_goes_on_through_the_cache(tmp_path, monkeypatch, failure):
    real_write, calls = os.write, []

    def flaky_write(fd, data):
        calls.append(len(data))
        if len(calls) == 1:
            if failure == "einval":
                raise OSError(errno.EINVAL, "Invalid argument")
            return real_write(fd, data[:DIRECT_IO_ALIGNMENT + 100])  # unaligned: the next write must not be direct
        return real_write(fd, data)

    volume = random_volume((40, 40, 40), 6)
    write_mrc(tmp_path / "mrcfile.mrc", volume, 1.0)
    monkeypatch.setattr(os, "write", flaky_write)
    write_mrc_direct(tmp_path / "direct.mrc", volume, 1.0)
    assert len(calls) == 2
    assert (tmp_path / "direct.mrc").read_bytes() == (tmp_path / "mrcfile.mrc").read_bytes()


def test_other_write_errors_are_raised_with_the_file_left_closed(tmp_path, monkeypatch):
    closed, real_close = [], os.close

    def full_disk(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full_disk)
    monkeypatch.setattr(os, "close", lambda fd: (closed.append(fd), real_close(fd)))
    with pytest.raises(OSError, match="No space left") as error:
        write_mrc_direct(tmp_path / "direct.mrc", random_volume((20, 20, 20), 7), 1.0)
    assert len(closed) == 1
    assert error.value.errno == errno.ENOSPC and error.value.filename == str(tmp_path / "direct.mrc")


def test_a_direct_write_into_a_missing_folder_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        write_mrc_direct(tmp_path / "missing" / "direct.mrc", random_volume((8, 8, 8), 8), 1.0)
    assert error.value.filename == str(tmp_path / "missing" / "direct.mrc")


def test_the_staging_buffer_grows_to_the_largest_file_and_is_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(mrc._STAGING, "buffer", None, raising=False)  # this thread's, from earlier tests
    for shape in [(16, 16, 16), (40, 40, 40), (16, 16, 16)]:
        write_mrc_direct(tmp_path / "f.mrc", random_volume(shape, 9), 1.0)
    kept = mrc._STAGING.buffer
    assert len(kept) == -(-(40 ** 3 * 4 + 1024) // DIRECT_IO_ALIGNMENT) * DIRECT_IO_ALIGNMENT
    write_mrc_direct(tmp_path / "f.mrc", random_volume((30, 30, 30), 10), 1.0)
    assert mrc._STAGING.buffer is kept


# ------------------------------------------------------------------------------- through the cache, header kept


@pytest.mark.parametrize("shape", SHAPES)
def test_stream_writes_give_the_bytes_mrcfile_writes(tmp_path, shape):
    volume = random_volume(shape, len(shape) + shape[-1])
    write_mrc(tmp_path / "mrcfile.mrc", volume, 1.7)
    write_mrc_stream(tmp_path / "stream.mrc", volume, 1.7)
    write_mrc_stream(tmp_path / "given.mrc", volume.astype(np.float64), 1.7, extremes=(volume.min(), volume.max()))
    expected = (tmp_path / "mrcfile.mrc").read_bytes()
    assert b"2026-12-06 00:00:00" in expected[:1024]
    assert (tmp_path / "stream.mrc").read_bytes() == expected
    assert (tmp_path / "given.mrc").read_bytes() == expected


def test_files_sharing_a_kept_header_each_get_their_own_statistics_and_pixel_size(tmp_path):
    """Ten volumes of one shape (one header made, then copied) and the same shapes at another pixel size."""
    for k in range(10):
        pixel = 2.0 if k < 7 else 3.5
        volume = random_volume((12, 13, 14), 100 + k)
        write_mrc(tmp_path / "mrcfile.mrc", volume, pixel)
        write_mrc_stream(tmp_path / "stream.mrc", volume, pixel)
        write_mrc_direct(tmp_path / "direct.mrc", volume, pixel)
        expected = (tmp_path / "mrcfile.mrc").read_bytes()
        assert (tmp_path / "stream.mrc").read_bytes() == expected, k
        assert (tmp_path / "direct.mrc").read_bytes() == expected, k
    assert sorted(key[:2] for key in mrc._HEADERS) == [((12, 13, 14), 2.0), ((12, 13, 14), 3.5)]


def test_kept_headers_are_remade_each_second_so_the_label_tells_the_time(tmp_path, monkeypatch):
    clock = [1_000.2]
    monkeypatch.setattr(mrc.time, "time", lambda: clock[0])
    volume = random_volume((8, 9, 10), 12)
    write_mrc_stream(tmp_path / "a.mrc", volume, 1.0)
    monkeypatch.setattr(mrcfile.mrcobject, "datetime", type("_Later", (datetime.datetime,), {
        "now": classmethod(lambda cls, tz=None: cls(2026, 12, 6, 0, 0, 1))}))
    clock[0] = 1_001.1
    write_mrc_stream(tmp_path / "b.mrc", volume, 1.0)
    assert list(mrc._HEADERS) == [((8, 9, 10), 1.0, 1_001)]  # the earlier second's dropped
    assert b"2026-12-06 00:00:00" in (tmp_path / "a.mrc").read_bytes()[:1024]
    assert b"2026-12-06 00:00:01" in (tmp_path / "b.mrc").read_bytes()[:1024]


def test_writer_threads_share_the_kept_headers_while_the_seconds_change(tmp_path, monkeypatch):
    """Four threads write four shapes while every 7th clock reading starts a new second, switching threads as
    often as the interpreter allows: no thread trips over another's dropping of the old headers, and every
    file has mrcfile's bytes."""
    ticks = itertools.count()
    monkeypatch.setattr(mrc.time, "time", lambda: next(ticks) / 7)
    volumes = [random_volume(shape, 20 + k) for k, shape in enumerate([(4, 5, 6), (6, 5, 4), (3, 3, 3), (2, 8, 8)])]
    errors = []

    def write(thread: int) -> None:
        try:
            for i in range(150):
                write_mrc_stream(tmp_path / f"{thread}_{i}.mrc", volumes[(thread + i) % 4], 1.0)
        except Exception as error:  # noqa: BLE001 (reported below with the others)
            errors.append(error)

    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=write, args=(k,)) for k in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(previous)
    assert errors == []
    for k, volume in enumerate(volumes):
        write_mrc(tmp_path / f"mrcfile_{k}.mrc", volume, 1.0)
    expected = [(tmp_path / f"mrcfile_{k}.mrc").read_bytes() for k in range(4)]
    for thread, i in itertools.product(range(4), range(150)):
        assert (tmp_path / f"{thread}_{i}.mrc").read_bytes() == expected[(thread + i) % 4], (thread, i)


def test_a_short_stream_write_goes_on_where_it_stopped(tmp_path, monkeypatch):
    real_writev, calls = os.writev, []

    def short_writev(fd, buffers):
        calls.append(sum(len(b) for b in buffers))
        return real_writev(fd, [bytes(b)[:5000] for b in buffers][:1] if len(calls) < 4 else buffers)

    volume = random_volume((20, 30, 40), 13)
    write_mrc(tmp_path / "mrcfile.mrc", volume, 1.0)
    monkeypatch.setattr(os, "writev", short_writev)
    write_mrc_stream(tmp_path / "stream.mrc", volume, 1.0)
    assert len(calls) == 4 and calls[0] == 1024 + volume.nbytes
    assert (tmp_path / "stream.mrc").read_bytes() == (tmp_path / "mrcfile.mrc").read_bytes()


@pytest.mark.parametrize("failure", ["enospc", "no progress"])
def test_a_failing_stream_write_is_raised_with_the_file_left_closed(tmp_path, monkeypatch, failure):
    closed, real_close = [], os.close

    def failing_writev(fd, buffers):
        if failure == "enospc":
            raise OSError(errno.ENOSPC, "No space left on device")
        return 0

    monkeypatch.setattr(os, "writev", failing_writev)
    monkeypatch.setattr(os, "close", lambda fd: (closed.append(fd), real_close(fd)))
    with pytest.raises(OSError, match="No space left" if failure == "enospc" else "no progress") as error:
        write_mrc_stream(tmp_path / "stream.mrc", random_volume((20, 20, 20), 14), 1.0)
    assert len(closed) == 1
    assert error.value.errno == (errno.ENOSPC if failure == "enospc" else errno.EIO)
    assert error.value.filename == str(tmp_path / "stream.mrc")  # the command's message names it


@pytest.mark.parametrize("volume", [np.zeros((4, 4, 4), np.float32), np.full((4, 4, 4), 2.5, np.float32),
                                    np.where(np.arange(64).reshape(4, 4, 4) == 37, np.nan, 1.0),
                                    np.where(np.arange(64).reshape(4, 4, 4) == 5, -np.inf, 1.0),
                                    np.where(np.arange(64).reshape(4, 4, 4) == 5, np.inf, -1.0)])
def test_check_volume_rejects_one_bad_voxel_from_its_extremes(volume):
    with pytest.raises(ReconstructionError):
        check_volume(volume, "particle 0")


def test_check_volume_returns_the_extremes_the_header_needs():
    volume = random_volume((10, 11, 12), 11)
    assert check_volume(volume, "particle 0") == (volume.min(), volume.max())


# ----------------------------------------------------------------------------------------------- the export


def export_arguments(manifest, out) -> list[str]:
    return EXPORT + ["--manifest", str(manifest), "--ts-id", "TS_01", "--out", str(out)]


def test_the_export_writes_large_files_directly_and_the_same_files_buffered(two_tomograms, tmp_path,  # noqa: F811
                                                                          monkeypatch):
    direct_calls, real_direct = [], mrc.write_mrc_direct

    def counted(*args, **kwargs):
        direct_calls.append(args[0])
        return real_direct(*args, **kwargs)

    stream_calls, real_stream = [], mrc.write_mrc_stream

    def counted_stream(*args, **kwargs):
        stream_calls.append(args[0])
        return real_stream(*args, **kwargs)

    monkeypatch.setattr("mspecies.cli.export_files.write_mrc_direct", counted)
    monkeypatch.setattr("mspecies.cli.export_files.write_mrc_stream", counted_stream)
    monkeypatch.setattr("mspecies.cli.export_files.DIRECT_IO_MIN_BYTES", 24 ** 3 * 4)  # the sub-tomograms only
    assert main(export_arguments(two_tomograms, tmp_path / "direct")) == 0
    written = sorted(tmp_path.glob("direct/TS_01/*.mrc"))
    sub_tomograms = sorted(path.name for path in written if "_ctf_" not in path.name)
    assert sorted(path.name for path in direct_calls) == sub_tomograms != []  # written in staging, then moved
    assert sorted(path.name for path in stream_calls) == sorted(path.name for path in written if "_ctf_" in path.name)
    direct_calls.clear()
    stream_calls.clear()
    assert main(export_arguments(two_tomograms, tmp_path / "buffered") + ["--buffered-writes"]) == 0
    assert direct_calls == [] and len(stream_calls) == len(written)
    assert mrc_contents(tmp_path / "direct") == mrc_contents(tmp_path / "buffered")


def test_the_memory_check_counts_the_staging_buffers_of_direct_writes():
    from mspecies.cli.export_checks import overlap_fits

    class Plan:
        batch_size, total_bytes = 4, 10_000_000

        def __init__(self, budget: int) -> None:
            self.budget_bytes = budget

    class Job:
        class tilt_series:  # noqa: N801 (stands in for a TiltSeriesData)
            excluded = np.zeros(41, bool)

        def __init__(self, budget: int, options: ExportOptions) -> None:
            self.plan, self.options = Plan(budget), options

    volumes = ExportOptions(4.0, 64, 150.0)
    waiting = 4 * (64 ** 3 + 64 * 64 * 33) * 4
    staging = 2 * (64 ** 3 * 4 + 1024)
    assert overlap_fits(Job(10_000_000 + waiting + staging, volumes), None)
    assert not overlap_fits(Job(10_000_000 + waiting + staging - 1, volumes), None)
    series = ExportOptions(4.0, 16, 40.0, mode="series")  # one stack of 41 tilts: larger than a 16³ volume
    waiting, staging = 4 * 41 * 16 * 16 * 4, 2 * (41 * 16 * 16 * 4 + 1024)
    assert overlap_fits(Job(10_000_000 + waiting + staging, series), None)
    assert not overlap_fits(Job(10_000_000 + waiting + staging - 1, series), None)
