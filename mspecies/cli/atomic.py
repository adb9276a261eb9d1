"""Outputs that are never half-written: folder locks, staging folders, atomic renames and free-space checks.

A command that writes several files into a folder (export, intersect) writes them into a hidden staging folder
inside it (``.mspecies-<kind>-<pid>.partial``), under the lock of the folder (``.mspecies.lock``, an advisory
``flock`` that the kernel releases when the process dies, so a killed run never leaves a stale lock). Only when
every file is complete are they moved to their final names, the file that lists the others (the STAR, the
summary) last; the files of the earlier run that the new one replaces are moved away first, the listing file
first. A failed run removes its staging folder; a run killed with SIGKILL leaves it behind, hidden, and the next
run into the folder removes it. A command that writes one file writes it under a temporary name beside it and
renames it (:func:`atomic_file`). Renames within one folder are atomic on POSIX file systems.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

from mspecies.common.types import InputError

LOCK_NAME = ".mspecies.lock"
STAGING_SUFFIX = ".partial"
STAGING_PREFIX = ".mspecies-"


def check_output_folder(path: str | Path, flag: str) -> Path:
    """Check, without creating anything, that the folder ``path`` can be created or written; raise
    :class:`InputError` naming ``flag`` for a path that is a file, a parent that is a file, or no write access."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{flag}: {folder} is a file, expected a folder")
    existing = next((p for p in (folder, *folder.parents) if p.exists()), Path("."))
    if not existing.is_dir():
        raise InputError(f"{flag}: {folder} cannot be created: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"{flag}: {existing} is not writable by this user; choose a folder you can write to")
    return folder


def output_folder(path: str | Path, flag: str) -> Path:
    """:func:`check_output_folder`, then create the folder (and its parents)."""
    folder = check_output_folder(path, flag)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"{flag}: cannot create the folder {folder} ({error.strerror or error})") from error
    return folder


@contextlib.contextmanager
def folder_lock(folder: str | Path, flag: str) -> Iterator[Path]:
    """Hold the exclusive lock of ``folder`` for the block; another holder → :class:`InputError` at once.

    The lock file keeps the holder's process id for the message; the lock itself is ``flock``, released by the
    kernel when the holder exits or is killed.
    """
    path = Path(folder) / LOCK_NAME
    handle = open(path, "a+")  # noqa: SIM115 (held for the whole block)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as error:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise InputError(f"{flag}: another mspecies run (process {holder}) is writing into {folder}; wait for "
                             "it to finish or choose another folder") from error
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        yield path
    finally:
        handle.close()  # closing releases the lock


@contextlib.contextmanager
def locked_output_folder(path: str | Path, flag: str) -> Iterator[Path]:
    """Create the output folder (:func:`output_folder`), hold its lock (:func:`folder_lock`) and remove the stale
    staging folders of killed runs (:func:`remove_stale_staging`) for the block. When the block fails and this
    run created the folder, the folder is removed again if nothing but the lock is in it: a failed run leaves
    nothing behind."""
    folder = Path(path)
    created = not folder.exists()
    output_folder(folder, flag)
    try:
        with folder_lock(folder, flag):
            remove_stale_staging(folder)
            yield folder
    except BaseException:
        if created and [p.name for p in folder.iterdir()] == [LOCK_NAME]:
            (folder / LOCK_NAME).unlink()
            folder.rmdir()
        raise


def remove_stale_staging(folder: str | Path) -> list[Path]:
    """Remove the staging folders that killed runs left in ``folder`` (call it while holding the lock)."""
    stale = sorted(p for p in Path(folder).glob(f"{STAGING_PREFIX}*{STAGING_SUFFIX}") if p.is_dir())
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


@contextlib.contextmanager
def staging_folder(folder: str | Path, kind: str) -> Iterator[Path]:
    """A fresh hidden folder inside ``folder`` for one run's files; removed when the block ends, completed or not
    (publish its files with :func:`publish` inside the block)."""
    staging = Path(folder) / f"{STAGING_PREFIX}{kind}-{os.getpid()}{STAGING_SUFFIX}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def publish(staging: str | Path, folder: str | Path, *, replaced: Iterable[Path] = (), last: str | None = None
            ) -> list[Path]:
    """Move every file of ``staging`` (relative paths kept) into ``folder``; returns the final paths.

    ``replaced`` are files of an earlier run to remove first (the first one first: give the file that lists the
    others first, so that it never names a missing file). ``last`` (a path relative to ``staging``) is moved
    after all the others, so that it appears only once every file it names is in place.
    """
    staging, folder = Path(staging), Path(folder)
    for path in replaced:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    files = sorted(p for p in staging.rglob("*") if p.is_file())
    if last is not None:
        files = [p for p in files if p != staging / last] + ([staging / last] if (staging / last).is_file() else [])
    final = []
    for path in files:
        target = folder / path.relative_to(staging)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)
        final.append(target)
    return final


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffix) to write; renamed to ``path`` when the block ends
    normally, removed when it raises."""
    path = Path(path)
    temporary = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()


def check_free_space(folder: str | Path, needed_bytes: int, flag: str, what: str) -> None:
    """Raise :class:`InputError` when the file system of ``folder`` has less than ``needed_bytes`` free."""
    free = shutil.disk_usage(folder).free
    if needed_bytes > free:
        raise InputError(f"{flag}: {what} needs about {format_bytes(needed_bytes)} but {folder} has "
                         f"{format_bytes(free)} free; free some space or choose another folder")


def is_disk_full(error: BaseException) -> bool:
    """True for the OSError of a full file system or an exceeded quota."""
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)


def format_bytes(n_bytes: float) -> str:
    """``1536`` → ``'1.5 KiB'`` (binary units up to GiB)."""
    if n_bytes < 1024:
        return f"{n_bytes:.0f} bytes"
    for unit in ("KiB", "MiB"):
        n_bytes /= 1024
        if n_bytes < 1024:
            return f"{n_bytes:.1f} {unit}"
    return f"{n_bytes / 1024:.1f} GiB"
