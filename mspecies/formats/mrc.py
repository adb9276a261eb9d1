"""MRC reading and writing (``mrcfile``): float32 data with the pixel size in the header.

Arrays are indexed ``[z, y, x]`` (a 2D image ``[y, x]``; a stack of images ``[image, y, x]``).

:func:`write_mrc_direct` writes the same bytes as :func:`write_mrc` without the page cache (``O_DIRECT``), for
large outputs that nothing reads back soon: a new file written through the page cache needs new page-cache
memory, which costs system time on every byte (here 61–70 ms of it per 28 MB box-192 sub-tomogram, against 1 ms
without the cache), and fills the cache that holds the tilt series still to be read. :func:`write_mrc_stream`
writes the same bytes through the cache with less work per file, for the export's many small files.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import mrcfile
import numpy as np
from mrcfile.mrcinterpreter import MrcInterpreter

from mspecies.common.types import InputError

MRC_HEADER_BYTES = 1024
"""Bytes of the header of a file :func:`write_mrc` writes (mrcfile writes no extended header for a new file)."""

DIRECT_IO_ALIGNMENT = 4096
"""Bytes: ``O_DIRECT`` needs the memory address, file offset and length of each write to be multiples of the
device's logical block size (512 or 4096 bytes); 4096 serves both."""


def write_mrc(path: str | Path, data: np.ndarray, pixel_size_angst: float, *, overwrite: bool = True) -> Path:
    """Write ``data`` as float32 MRC with the voxel size set to ``pixel_size_angst`` (Å) on every axis.

    Parameters
    ----------
    path
        Output file.
    data
        (ny, nx) image, (n, ny, nx) stack or (nz, ny, nx) volume.
    pixel_size_angst
        Pixel size in Å (> 0).

    Returns
    -------
    The path written.
    """
    path, array = _checked_float32(path, data, pixel_size_angst)
    with mrcfile.new(path, overwrite=overwrite) as mrc:
        mrc.set_data(array)  # also sets the header statistics (min, max, mean, rms); the voxel size leaves them
        mrc.voxel_size = float(pixel_size_angst)
    return path


def _checked_float32(path: str | Path, data: np.ndarray, pixel_size_angst: float) -> tuple[Path, np.ndarray]:
    """(path, data as C-ordered float32) for the writers; :class:`InputError` unless ``pixel_size_angst`` > 0."""
    if not pixel_size_angst > 0:
        raise InputError(f"{path}: pixel_size_angst must be > 0, got {pixel_size_angst}")
    return Path(path), np.ascontiguousarray(data, dtype=np.float32)


def write_mrc_direct(path: str | Path, data: np.ndarray, pixel_size_angst: float, *,
                     extremes: tuple[float, float] | None = None) -> Path:
    """Write ``data`` as :func:`write_mrc` does, byte for byte, bypassing the page cache where the file system
    allows it (``O_DIRECT``; elsewhere, e.g. where ``open`` or the first write says ``EINVAL``, through it).

    The file is assembled in a page-aligned staging buffer kept per thread (the header, then the data; grown to
    the largest file the thread writes, so a writer thread holds one file's bytes more), padded to
    :data:`DIRECT_IO_ALIGNMENT`, written, and truncated to its size. The header statistics are mrcfile's own
    (``min``, ``max``, ``mean`` and ``std`` in float32, the same values), the sd computed in the staging buffer
    before the data goes there, instead of in a temporary array as large as the data.

    Parameters
    ----------
    path
        Output file (replaced if it exists).
    data
        (ny, nx) image, (n, ny, nx) stack or (nz, ny, nx) volume.
    pixel_size_angst
        Pixel size in Å (> 0).
    extremes
        ``(data.min(), data.max())`` when the caller has them already (e.g. from its checks).
    """
    path, array = _checked_float32(path, data, pixel_size_angst)
    size = MRC_HEADER_BYTES + array.nbytes
    padded = -(-size // DIRECT_IO_ALIGNMENT) * DIRECT_IO_ALIGNMENT
    staging = _staging_buffer(padded)
    body = np.frombuffer(staging, dtype=np.float32, count=array.size, offset=MRC_HEADER_BYTES).reshape(array.shape)
    staging[:MRC_HEADER_BYTES] = _header(path, array, pixel_size_angst, _header_stats(array, extremes, body))
    np.copyto(body, array)
    staging[size:padded] = bytes(padded - size)
    _write_padded(path, memoryview(staging)[:padded], size)
    return path


def write_mrc_stream(path: str | Path, data: np.ndarray, pixel_size_angst: float, *,
                     extremes: tuple[float, float] | None = None) -> Path:
    """Write ``data`` as :func:`write_mrc` does, byte for byte, through the page cache, with less work per file:
    for the many small files of an export (two per particle).

    The header is mrcfile's own, made once per shape, pixel size and second (:func:`_header`) and given this
    file's statistics (the values mrcfile computes: ``min``, ``max``, ``mean`` and ``std`` in float32, the sd's
    deviations in this thread's staging buffer, as :func:`write_mrc_direct` does), and the header and data go
    out in one ``writev``. Through mrcfile the header's fields are set one by one on every file, and the sd
    takes a temporary array as large as the data: 1.4 against 0.75 ms of CPU per box-64 particle here. The
    parameters are those of :func:`write_mrc_direct`.
    """
    path, array = _checked_float32(path, data, pixel_size_angst)
    work = np.frombuffer(_staging_buffer(max(array.nbytes, 1)), dtype=np.float32, count=array.size)
    header = _header(path, array, pixel_size_angst, _header_stats(array, extremes, work.reshape(array.shape)))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
    try:
        _write_all(fd, [header, array])
    except OSError as error:
        _raise_naming(path, error)
    finally:
        os.close(fd)
    return path


_STAGING = threading.local()


def _staging_buffer(nbytes: int) -> mmap.mmap:
    """This thread's page-aligned (anonymous mmap) staging buffer of at least ``nbytes``, kept between calls."""
    buffer = getattr(_STAGING, "buffer", None)
    if buffer is None or len(buffer) < nbytes:
        _STAGING.buffer = None
        if buffer is not None:
            try:
                buffer.close()
            except BufferError:  # a view of it still alive (an earlier call's error being handled): unmapped with it
                pass
        buffer = _STAGING.buffer = mmap.mmap(-1, nbytes)
    return buffer


def _header_stats(array: np.ndarray, extremes: tuple[float, float] | None,
                  work: np.ndarray) -> tuple[np.float32, np.float32, np.float32, np.float32]:
    """(dmin, dmax, dmean, rms) as mrcfile's ``update_header_stats`` sets them: ``min``, ``max``,
    ``mean(dtype=float32)`` and ``std(dtype=float32)``; the mean and sd by ``ndarray.mean``'s and ``ndarray.std``'s
    own steps (NumPy's ``_methods._mean`` and ``_var``) from one float32 sum, with ``work`` (float32, the shape of
    ``array``) for the deviations."""
    low, high = (array.min(), array.max()) if extremes is None else extremes
    count = np.intp(array.size)
    centre = np.add.reduce(array, axis=None, dtype=np.float32, keepdims=True)
    total = centre.flat[0]  # the sum ``mean(dtype=float32)`` takes, and divides as ``_methods._mean`` does
    mean = total.dtype.type(total / count)
    np.true_divide(centre, count, out=centre, casting="unsafe", subok=False)
    np.subtract(array, centre, out=work)
    np.multiply(work, work, out=work)
    variance = np.add.reduce(work, axis=None, dtype=np.float32)
    variance = variance.dtype.type(variance / count)
    return np.float32(low), np.float32(high), mean, variance.dtype.type(np.sqrt(variance))


class _GivenStats(MrcInterpreter):
    """An MRC object in memory (no stream) whose header statistics are given instead of computed in
    ``set_data``."""

    def __init__(self, stats: tuple[np.float32, np.float32, np.float32, np.float32]) -> None:
        super().__init__()
        self._stats = stats
        self._create_default_attributes()  # mrcfile's way to a write-only interpreter (MrcInterpreter's docstring)

    def update_header_stats(self) -> None:
        self.header.dmin, self.header.dmax, self.header.dmean, self.header.rms = self._stats


_HEADERS: dict[tuple[tuple[int, ...], float, int], np.ndarray] = {}
"""The headers :func:`_header` made this second, by (shape, pixel size, second); changed under
:data:`_HEADERS_LOCK` only."""

_HEADERS_LOCK = threading.Lock()


def _header(path: Path, array: np.ndarray, pixel_size_angst: float,
            stats: tuple[np.float32, np.float32, np.float32, np.float32]) -> np.ndarray:
    """The header (:data:`MRC_HEADER_BYTES`) :func:`write_mrc` writes for ``array`` (float32, C order) with
    ``stats`` (dmin, dmax, dmean, rms), as bytes (uint8).

    mrcfile makes the header of the first file of each shape and pixel size in each second (its label holds the
    time to the second); later files copy it and set their statistics, the only fields that differ. Thread-safe:
    lookups need no lock (one dict operation); a miss makes its header, then stores it and drops the earlier
    seconds' under the lock (two threads that miss at once each make the same header)."""
    key = (array.shape, float(pixel_size_angst), int(time.time()))
    template = _HEADERS.get(key)
    if template is None:
        mrc = _GivenStats(stats)
        mrc.set_data(array)
        mrc.voxel_size = float(pixel_size_angst)
        if mrc.extended_header.nbytes or mrc.header.nbytes != MRC_HEADER_BYTES:
            raise AssertionError(f"{path}: unexpected MRC header of {mrc.header.nbytes} + "
                                 f"{mrc.extended_header.nbytes} bytes")
        template = np.array(mrc.header).reshape(1)  # a plain structured copy: its fields are set fast
        with _HEADERS_LOCK:
            if any(k[2] != key[2] for k in _HEADERS):
                _HEADERS.clear()  # only this second's are kept
            _HEADERS[key] = template
    header = template.copy()
    header["dmin"], header["dmax"], header["dmean"], header["rms"] = stats
    return header.view(np.uint8)


def _write_all(fd: int, buffers: Sequence[np.ndarray]) -> None:
    """Write the C-contiguous ``buffers`` in order to ``fd`` with ``writev``, again after a short write."""
    views = [memoryview(b).cast("B") for b in buffers if b.nbytes]
    while views:
        written = os.writev(fd, views)
        if written == 0:
            raise OSError(errno.EIO, "write made no progress")
        while views and written >= len(views[0]):
            written -= len(views.pop(0))
        if written:
            views[0] = views[0][written:]


def _write_padded(path: Path, view: memoryview, size: int) -> None:
    """Write ``view`` (aligned, a multiple of :data:`DIRECT_IO_ALIGNMENT` long) to a new ``path`` with
    ``O_DIRECT`` where allowed, then cut the file to ``size`` bytes."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
    try:
        fd = os.open(path, flags | os.O_DIRECT, 0o666)
    except OSError as error:
        if error.errno != errno.EINVAL:
            raise
        fd = os.open(path, flags, 0o666)  # this file system has no direct I/O
    try:
        done = 0
        while done < len(view):
            try:
                done += os.write(fd, view[done:])
            except OSError as error:
                if error.errno != errno.EINVAL or not _buffered(fd):
                    raise
                continue  # direct I/O refused at the write (alignment, file system): the rest through the cache
            if done % DIRECT_IO_ALIGNMENT:
                _buffered(fd)  # a short write leaves the next offset unaligned
        os.ftruncate(fd, size)
    except OSError as error:
        _raise_naming(path, error)
    finally:
        os.close(fd)


def _raise_naming(path: Path, error: OSError) -> NoReturn:
    """Raise ``error``, as an :class:`OSError` of its errno naming ``path`` where it names no file (those of
    ``write``, ``writev`` and ``ftruncate`` do not), so that the command's message can say which file and flag."""
    if error.filename is None and error.errno is not None:
        raise OSError(error.errno, error.strerror or str(error), str(path)) from error
    raise error


def _buffered(fd: int) -> bool:
    """Take ``O_DIRECT`` off ``fd``; False if it was off already."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    if not flags & os.O_DIRECT:
        return False
    fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)
    return True


def mrc_dtype(path: str | Path) -> np.dtype:
    """The data type (byte order included) of an MRC file's data, from its header alone."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: MRC file not found")
    try:
        with mrcfile.open(path, mode="r", header_only=True, permissive=False) as mrc:
            return mrcfile.utils.data_dtype_from_header(mrc.header)
    except ValueError as error:
        raise InputError(f"{path}: not a valid MRC file ({error})") from error


def read_mrc(path: str | Path, mmap: bool = False) -> tuple[np.ndarray, float]:
    """Read an MRC file → (array, pixel_size_angst).

    Parameters
    ----------
    path
        MRC file.
    mmap
        Memory-map the data (read-only) instead of loading it.

    Returns
    -------
    array
        The data as stored ([z, y, x] or [y, x]); a copy unless ``mmap``.
    pixel_size_angst
        The X voxel size from the header in Å (0.0 if the header has none).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: MRC file not found")
    try:
        if mmap:
            handle = mrcfile.mmap(path, mode="r", permissive=False)
            return handle.data, float(handle.voxel_size.x)
        with mrcfile.open(path, mode="r", permissive=False) as mrc:
            return np.array(mrc.data), float(mrc.voxel_size.x)
    except ValueError as error:
        raise InputError(f"{path}: not a valid MRC file ({error})") from error
