"""One error path for every command: which failures are expected, and the one message each prints.

Expected failures end a command with exit code 2 and one line on stderr that names the file or flag:
:class:`~mspecies.common.types.InputError` (bad input, checked parameters, refused plans), I/O errors (a missing,
read-only or full output, a folder that is a file), a binary file where text was expected, and running out of
memory. Anything else is a bug and keeps its traceback (:func:`expected_error_message` returns None for it).
"""

from __future__ import annotations

import argparse
import errno
import os

from mspecies.cli.atomic import is_disk_full
from mspecies.common.types import InputError

EXPECTED_ERRORS = (InputError, OSError, MemoryError, UnicodeDecodeError)
"""Exception types the command line reports as one message (exit code 2) instead of a traceback."""

_POSITIONAL = ("input", "output")
"""Positional arguments (named as such in messages, without ``--``)."""


def flag_for_path(args: argparse.Namespace, path: str | os.PathLike | None) -> str | None:
    """The command-line flag whose value is ``path`` or a folder above it (``--out`` for a file it writes)."""
    if path is None:
        return None
    target = os.path.abspath(os.fspath(path))
    best, best_length = None, -1
    for name, value in vars(args).items():
        if not isinstance(value, (str, os.PathLike)) or not str(value):
            continue
        given = os.path.abspath(os.fspath(value))
        if (target == given or target.startswith(given.rstrip(os.sep) + os.sep)) and len(given) > best_length:
            best, best_length = ("--" + name.replace("_", "-")) if name not in _POSITIONAL else name, len(given)
    return best


def expected_error_message(error: BaseException, args: argparse.Namespace) -> str | None:
    """One line for an expected failure (see the module docstring), naming the file and flag; None otherwise."""
    if isinstance(error, InputError):
        return str(error)
    if isinstance(error, MemoryError):
        hint = ("lower --memory-gb or the box, raise --pixel-size-out" if hasattr(args, "memory_gb")
                else "split the input")
        return f"out of memory ({error or 'an allocation failed'}); {hint}, or use a machine with more memory"
    if isinstance(error, UnicodeDecodeError):
        return f"a binary file was given where a text file is expected ({error.reason} at byte {error.start})"
    if isinstance(error, OSError):
        return _os_error_message(error, args)
    return None


def _os_error_message(error: OSError, args: argparse.Namespace) -> str:
    filename = error.filename
    flag = flag_for_path(args, filename)
    reason = error.strerror or str(error)
    if is_disk_full(error):
        flag = flag or ("--out" if getattr(args, "out", None) else flag_for_path(args, getattr(args, "output", None)))
        target = filename or getattr(args, "out", None) or getattr(args, "output", None) or "the output"
        return (f"{flag + ': ' if flag else ''}no space left on the device while writing {target}; nothing of this "
                "run was left under its final name; free some space or choose another folder")
    where = f"{flag}: " if flag else ""
    what = f"{filename}: " if filename else ""
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{where}{what}permission denied ({reason}); choose a folder you can write to"
    if error.errno == errno.ENOENT:
        return f"{where}{what}no such file or folder"
    return f"{where}{what}{reason}"
