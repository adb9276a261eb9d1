"""Whitespace-separated text tables (IMOD, CTFFIND, AreTomo, dose and coordinate lists): the one tokenizer.

Every reader of a text format goes through these helpers, so that a missing file, a wrong column count or a
non-numeric value fails the same way: :class:`~mspecies.common.types.InputError` naming the file and the line
(1-based).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mspecies.common.types import InputError

BINARY_SHARE = 0.05
"""Share of undecodable bytes (or any NUL) in a file's first 4 KiB above which it is binary, not text (a stray
non-UTF-8 character, such as a degree sign in a Windows-written mdoc, stays far below it)."""


def read_lines(path: str | Path) -> list[tuple[int, str]]:
    """(1-based line number, stripped text) of the non-empty lines of a text file; InputError for a binary file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    with open(path, encoding="utf-8", errors="replace") as handle:
        text = handle.read()
    head = text[:4096]
    if "\x00" in head or head.count("\ufffd") > BINARY_SHARE * len(head):
        raise InputError(f"{path}: not a text file (binary content in its first bytes); expected a text file")
    return [(number, line.strip()) for number, line in enumerate(text.split("\n"), start=1) if line.strip()]


def parse_row(path: str | Path, number: int, text: str, n_columns: int | tuple[int, ...]) -> np.ndarray:
    """Split one line into floats, checking the column count (an int or the allowed counts)."""
    tokens = text.split()
    allowed = (n_columns,) if isinstance(n_columns, int) else n_columns
    if len(tokens) not in allowed:
        expected = " or ".join(str(n) for n in allowed)
        raise InputError(f"{path}, line {number}: expected {expected} columns, got {len(tokens)}: {text!r}")
    try:
        return np.array([float(token) for token in tokens])
    except ValueError as error:
        raise InputError(f"{path}, line {number}: non-numeric value in {text!r}") from error


def is_numeric_row(text: str) -> bool:
    """Whether every whitespace-separated token of ``text`` is a number (a header line is not)."""
    try:
        [float(token) for token in text.split()]
    except ValueError:
        return False
    return bool(text.split())


def read_list(path: str | Path, what: str) -> tuple[np.ndarray, np.ndarray]:
    """(rows, columns) finite float table of a hand-made list and its (rows,) 1-based line numbers.

    ``#`` lines are comments and a first non-numeric line is a header; every row must have the first row's column
    count and only finite numbers (InputError naming the file, line and ``what`` otherwise).
    """
    data = [(number, text) for number, text in read_lines(path) if not text.startswith("#")]
    if data and not is_numeric_row(data[0][1]):
        data = data[1:]
    if not data:
        raise InputError(f"{path}: no {what} rows")
    width = len(data[0][1].split())
    table = np.vstack([parse_row(path, number, text, width) for number, text in data])
    lines = np.array([number for number, _ in data], dtype=np.int64)
    bad = np.flatnonzero(~np.isfinite(table).all(axis=1))
    if bad.size:
        raise InputError(f"{path}, line {lines[bad[0]]}: {what} is not a finite number ({table[bad[0]].tolist()})")
    return table, lines


def read_table(path: str | Path, n_columns: int | tuple[int, ...], comment: str | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """(rows, columns) float table of a whitespace-separated text file and the (rows,) 1-based line numbers.

    ``comment`` lines (starting with it) are skipped; with a tuple of allowed counts all rows must have the
    same count.
    """
    data = [(number, text) for number, text in read_lines(path) if comment is None or not text.startswith(comment)]
    if not data:
        raise InputError(f"{path}: no data lines")
    rows = [parse_row(path, number, text, n_columns) for number, text in data]
    widths = {row.size for row in rows}
    if len(widths) > 1:
        first = rows[0].size
        number = next(n for (n, _), row in zip(data, rows, strict=True) if row.size != first)
        raise InputError(f"{path}, line {number}: expected {first} columns like the first data line "
                         f"(line {data[0][0]})")
    return np.vstack(rows), np.array([number for number, _ in data], dtype=np.int64)
