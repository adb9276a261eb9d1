"""RELION STAR files: typed tables through ``starfile``, and a text-exact reader/writer.

RELION 3.1 particle files have two blocks: ``data_optics`` (one row per optics group) and
``data_particles`` (one row per particle, ``rlnOpticsGroup`` pointing into the optics table).
:func:`read_star_text` keeps every value as the string in the file, so columns a caller does not
interpret are written back unchanged by :func:`write_star_text` (dialects: ``star_dialects.py``).
"""

from __future__ import annotations

import csv
import io
import re
import shlex
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import starfile

from mspecies.common.types import InputError


def write_relion31_particles(path: str | Path, optics: pd.DataFrame, particles: pd.DataFrame) -> Path:
    """Write a RELION 3.1 particle STAR with ``data_optics`` and ``data_particles`` blocks.

    Parameters
    ----------
    optics
        One row per optics group; must hold ``rlnOpticsGroup``.
    particles
        One row per particle; must hold ``rlnOpticsGroup`` values present in ``optics``.
    """
    for name, table in (("optics", optics), ("particles", particles)):
        if "rlnOpticsGroup" not in table.columns:
            raise InputError(f"{path}: the {name} table needs an rlnOpticsGroup column")
    unknown = set(particles["rlnOpticsGroup"]) - set(optics["rlnOpticsGroup"])
    if unknown:
        raise InputError(f"{path}: particles refer to optics groups {sorted(unknown)} missing from data_optics")
    starfile.write({"optics": optics, "particles": particles}, path, overwrite=True)
    return Path(path)


def read_star_blocks(path: str | Path) -> dict[str, pd.DataFrame]:
    """Read every data block of a STAR file → block name (without ``data_``) → table."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: STAR file not found")
    blocks = starfile.read(path, always_dict=True)
    return {name: (table if isinstance(table, pd.DataFrame) else pd.DataFrame([table]))
            for name, table in blocks.items()}


def read_relion31_particles(path: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read a RELION 3.1 particle STAR → (optics, particles); fails if either block is missing."""
    blocks = read_star_blocks(path)
    for name in ("optics", "particles"):
        if name not in blocks:
            raise InputError(f"{path}: missing data_{name} block (found {sorted(blocks)})")
    return blocks["optics"], blocks["particles"]


# --- Text-exact STAR I/O: every value kept as the string written in the file -------------------------------------
#
# Loops are parsed by pandas' C engine (whitespace-separated tokens, no type inference: text columns stay the strings
# of the file). A caller may name columns it interprets as numbers (``float_columns``): those are parsed straight to
# float64, which skips creating a Python string per value (the main cost of reading 10^6 rows). Single quotes,
# rows with the wrong number of values and non-numeric values in such columns take the Python tokenizer below,
# which keeps every value as text and names the offending line.


@dataclass
class StarBlock:
    """One ``data_<name>`` block; ``table`` holds strings exactly as written (one row for a key-value block), or
    float64 for the columns a reader asked to parse as numbers."""

    name: str
    table: pd.DataFrame
    is_loop: bool = True


FloatColumns = Callable[[Mapping[str, list[str]]], Mapping[str, Collection[str]]]
"""Given the loop columns of every block (block name → labels), the columns to parse as float64 per block."""

_TOKEN = re.compile(r"\"([^\"]*)\"|'([^']*)'|(\S+)")
_DATA_LINE = re.compile(rb"^[ \t]*data_(\S*)[^\n]*$", re.M)
_COMMENT_LINE = re.compile(rb"^[ \t]*(#[^\n]*?)[ \t\r]*$", re.M)
_LOOP_LINE = re.compile(rb"^[ \t]*loop_", re.M)


def _split_quoted(lines: list[str]) -> list[list[str]]:
    """Split data lines on whitespace, honouring STAR single/double quotes."""
    return [[a or b or c for a, b, c in _TOKEN.findall(line)] for line in lines]


def _python_table(path: Path, columns: list[str], data: bytes, first_line_no: int) -> pd.DataFrame:
    """Data lines → string DataFrame with the Python tokenizer; a row with the wrong field count is an InputError
    naming its line."""
    numbered = [(first_line_no + k, line.strip()) for k, line in enumerate(data.decode().split("\n"))]
    numbered = [(k, line) for k, line in numbered if line and not line.startswith("#")]
    lines = [line for _, line in numbered]
    rows = _split_quoted(lines) if any('"' in line or "'" in line for line in lines) else [line.split()
                                                                                              for line in lines]
    bad = next((i for i, row in enumerate(rows) if len(row) != len(columns)), None)
    if bad is not None:
        raise InputError(f"{path}: line {numbered[bad][0]}: {len(rows[bad])} values for {len(columns)} columns "
                         f"({', '.join(columns[:4])}{', ...' if len(columns) > 4 else ''})")
    if not rows:
        return pd.DataFrame({name: pd.Series([], dtype=object) for name in columns})
    return pd.DataFrame(rows, columns=columns, dtype=object)


def _c_table(columns: list[str], data: bytes, floats: Collection[str]) -> pd.DataFrame | None:
    """Data lines → DataFrame with pandas' C parser (text as read, "double-quoted" values unquoted, ``floats`` as
    float64); None where it cannot give the exact table (single quotes, wrong field counts, a non-number in a float
    column, an empty last value that may be a short row)."""
    if b"'" in data:
        return None
    dtypes = {c: (np.float64 if c in floats else object) for c in columns}
    try:
        table = pd.read_csv(io.BytesIO(data), sep=r"\s+", header=None, names=columns, dtype=dtypes,
                            na_filter=False, engine="c", quotechar='"', quoting=csv.QUOTE_MINIMAL, index_col=False)
    except (ValueError, pd.errors.ParserError):
        return None
    last = columns[-1]
    if len(table) and last not in floats and (table[last] == "").any():  # a short row
        return None
    return table


def _loop_table(path: Path, name: str, columns: list[str], data: bytes, first_line_no: int,
                floats: Collection[str]) -> pd.DataFrame:
    """A loop's data bytes → table; a second ``loop_`` in the block is an InputError naming its line."""
    second = _LOOP_LINE.search(data) if b"loop_" in data else None
    if second:
        line_no = first_line_no + data.count(b"\n", 0, second.start())
        label = next((t.split()[0] for t in data[second.end():].decode().split("\n") if t.strip().startswith("_")),
                     "?")
        raise InputError(f"{path}: line {line_no}: data_{name} holds a second loop ({label} ...) after its "
                         f"{len(columns)}-column loop; a STAR data block holds one loop (RELION reads one table per "
                         "block): put it in a data block of its own")
    if b"#" in data:
        data = _COMMENT_LINE.sub(b"", data)
    if not data.strip():
        return pd.DataFrame({column: pd.Series([], dtype=object) for column in columns})
    table = _c_table(columns, data, floats)
    return table if table is not None else _python_table(path, columns, data, first_line_no)


def _header(body: bytes, start_line_no: int) -> tuple[bool, list[str], int, int]:
    """Header of one block body → (is_loop, labels or key-value lines, offset where data starts, its line number)."""
    position, line_no, is_loop, labels = 0, start_line_no, False, []
    while position < len(body):
        end = body.find(b"\n", position)
        end = len(body) if end < 0 else end
        line = body[position:end].decode().strip()
        if line.startswith("loop_") and not is_loop and not labels:
            is_loop = True
        elif line.startswith("_") and is_loop:
            labels.append(line.split()[0][1:])
        elif line and not line.startswith("#") and (is_loop or not line.startswith("_")):
            break
        elif line.startswith("_"):
            labels.append(line)
        position, line_no = end + 1, line_no + 1
    return is_loop, labels, position, line_no


def _block_starts(text: bytes) -> list[re.Match]:
    """``data_`` lines; the regex runs only around the (few) ``data_`` substrings, not over every data line."""
    if text.count(b"data_") > 10_000:  # e.g. a path with "data_" on every row: scan the whole text
        return list(_DATA_LINE.finditer(text))
    found, position = [], text.find(b"data_")
    while position >= 0:
        line_start = text.rfind(b"\n", 0, position) + 1
        match = _DATA_LINE.match(text, line_start)
        if match and match.end() > position:
            found.append(match)
        position = text.find(b"data_", max(position + 1, match.end() if match else 0))
    return found


def _comments(text: bytes) -> list[str]:
    return [c.decode() for c in _COMMENT_LINE.findall(text) if c != b"#"]


def read_star_text(path: str | Path, float_columns: FloatColumns | None = None
                   ) -> tuple[dict[str, StarBlock], list[str]]:
    """Read a STAR file keeping every value as text → (blocks by name without ``data_``, comment lines).

    Loops become one row per data line, key-value blocks one row. ``float_columns`` (see :data:`FloatColumns`)
    names loop columns to parse as float64 instead of text. Duplicate column names, a data line with the wrong
    number of values or a second loop in one block raise :class:`InputError` naming the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: STAR file not found")
    try:
        return _parse_star(path, path.read_bytes(), float_columns)
    except UnicodeDecodeError as error:
        raise InputError(f"{path} is not a text file (undecodable byte at offset {error.start}); "
                         "expected a STAR file") from error


def _parse_star(path: Path, text: bytes, float_columns: FloatColumns | None
                ) -> tuple[dict[str, StarBlock], list[str]]:
    """:func:`read_star_text` on the file's bytes (UnicodeDecodeError where they are not text)."""
    starts = _block_starts(text)
    if not starts:
        text.decode()  # a binary file is refused as such, not as "no data_ block"
        raise InputError(f"{path}: no data_ block: not a STAR file")
    comments = _comments(text[:starts[0].start()] if starts else text)
    parsed = []
    for k, match in enumerate(starts):
        body = text[match.end() + 1:starts[k + 1].start() if k + 1 < len(starts) else len(text)]
        first_line = text.count(b"\n", 0, match.end()) + 2
        is_loop, labels, offset, data_line = _header(body, first_line)
        comments += _comments(body[:offset])
        data = body[offset:]
        if b"#" in data:
            comments += _comments(data)
        parsed.append((match.group(1).decode(), is_loop, labels, data, data_line))
    floats = float_columns({name: labels for name, is_loop, labels, _, _ in parsed if is_loop}) if float_columns \
        else {}
    blocks: dict[str, StarBlock] = {}
    for name, is_loop, labels, data, data_line in parsed:
        if name in blocks:
            raise InputError(f"{path}: data_{name} appears twice")
        if is_loop:
            _check_unique(path, name, labels)
            table = _loop_table(path, name, labels, data, data_line, floats.get(name, ()))
            blocks[name] = StarBlock(name, table)
        else:
            lines = labels + [t for t in data.decode().split("\n") if t.strip().startswith("_")]
            blocks[name] = StarBlock(name, _key_values(path, lines), is_loop=False)
    return blocks, comments


def _key_values(path: Path, lines: list[str]) -> pd.DataFrame:
    values: dict[str, str] = {}
    for line in lines:
        parts = shlex.split(line.strip())
        if len(parts) != 2:
            raise InputError(f"{path}: expected '_label value', got {line.strip()!r}")
        values[parts[0][1:]] = parts[1]
    return pd.DataFrame([values], dtype=object)


def _check_unique(path: Path, block: str, columns: list[str]) -> None:
    seen = pd.Index(columns)
    if seen.has_duplicates:
        raise InputError(f"{path}: data_{block} repeats column(s) {sorted(set(seen[seen.duplicated()]))}")


def _quote(texts: list[str]) -> list[str]:
    """Quote strings that are empty or contain whitespace (STAR tokens are whitespace-separated)."""
    joined = "".join(texts)
    if all(texts) and not any(space in joined for space in " \t\r\n\v\f"):
        return texts  # the usual case, checked at C speed
    return [f'"{t}"' if not t or any(ch.isspace() for ch in t) else t for t in texts]


def format_star_column(values: pd.Series | np.ndarray, float_format: str = "{:.6f}") -> list[str]:
    """Column → strings for a STAR file: floats with ``float_format``, integers and text as they are."""
    array = values.to_numpy() if isinstance(values, pd.Series) else np.asarray(values)
    if array.dtype == bool:
        return array.astype(int).astype(str).tolist()
    if np.issubdtype(array.dtype, np.integer):
        return array.astype(str).tolist()
    if np.issubdtype(array.dtype, np.floating):
        return list(map(float_format.format, array.tolist()))
    return _quote([v if isinstance(v, str) else str(v) for v in array.tolist()])


# --- loop bodies as byte matrices: each column a (rows, width) uint8 array, NUL-padded, NULs dropped at the end ---

_DECIMALS = 6
_EXACT_LIMIT = 1e7
"""Below this magnitude, rint(|x| · 10^6) in float64 is off by < 1e-3 of a unit, so only values within 1e-3 of a
half unit (and non-finite or larger ones) need Python's correctly rounded formatting."""


def _digits(values: np.ndarray, width: int, keep_zeros: bool) -> np.ndarray:
    """(N,) non-negative int64 → (N, width) ASCII digits, leading zeros as NUL unless ``keep_zeros``."""
    out = np.empty((values.size, width), dtype=np.uint8)
    for k in range(width):
        power = 10 ** (width - 1 - k)
        digit = (48 + (values // power) % 10).astype(np.uint8)
        out[:, k] = digit if keep_zeros or k == width - 1 else np.where(values >= power, digit, 0)
    return out


def _text_matrix(texts: list[str]) -> np.ndarray:
    """Strings → (N, width) UTF-8 bytes, NUL-padded."""
    try:
        array = np.array(texts, dtype=object).astype(np.bytes_)  # ASCII, at C speed
    except UnicodeEncodeError:
        array = np.array([t.encode() for t in texts], dtype=np.bytes_)
    width = max(array.dtype.itemsize, 1)
    return np.frombuffer(array.astype(f"S{width}").tobytes(), dtype=np.uint8).reshape(len(texts), width)


def _fixed_matrix(values: np.ndarray) -> np.ndarray:
    """(N,) float64 → (N, width) bytes of ``f"{x:.6f}"`` (Python's correctly rounded text, NUL-padded)."""
    x = np.asarray(values, dtype=np.float64)
    safe = np.isfinite(x) & (np.abs(x) < _EXACT_LIMIT)
    scaled = np.abs(np.where(safe, x, 0.0)) * 10.0 ** _DECIMALS
    units = np.rint(scaled)
    safe &= np.abs(scaled - np.floor(scaled) - 0.5) > 1e-3  # near a half unit: Python decides
    units = units.astype(np.int64)
    integer, fraction = units // 10 ** _DECIMALS, units % 10 ** _DECIMALS
    width = max(1, len(str(int(integer.max(initial=0)))))
    matrix = np.concatenate([np.where(np.signbit(x), ord("-"), 0).astype(np.uint8)[:, None],
                             _digits(integer, width, False), np.full((x.size, 1), ord("."), np.uint8),
                             _digits(fraction, _DECIMALS, True)], axis=1)
    rows = np.flatnonzero(~safe)
    if rows.size:
        exact = _text_matrix([f"{v:.{_DECIMALS}f}" for v in x[rows].tolist()])
        if exact.shape[1] > matrix.shape[1]:
            matrix = np.pad(matrix, ((0, 0), (0, exact.shape[1] - matrix.shape[1])))
        matrix[rows] = 0
        matrix[rows, :exact.shape[1]] = exact
    return matrix


def _column_matrix(values: np.ndarray) -> np.ndarray:
    if values.dtype == bool:
        values = values.astype(np.int64)
    if np.issubdtype(values.dtype, np.integer):
        return _text_matrix(values.astype(str).tolist())
    if np.issubdtype(values.dtype, np.floating):
        return _fixed_matrix(values)
    return _text_matrix(format_star_column(values))


def _loop_body(table: pd.DataFrame, rows_per_chunk: int = 200_000) -> bytes:
    """Data lines of a loop: values separated by one space, one line per row (chunks bound the memory)."""
    arrays = [table[column].to_numpy() for column in table.columns]
    parts = []
    for start in range(0, len(table), rows_per_chunk):
        chunk = [array[start:start + rows_per_chunk] for array in arrays]
        n = len(chunk[0])
        space, newline = np.full((n, 1), ord(" "), np.uint8), np.full((n, 1), ord("\n"), np.uint8)
        pieces = [piece for values in chunk for piece in (_column_matrix(values), space)][:-1] + [newline]
        flat = np.concatenate(pieces, axis=1).ravel()
        parts.append(flat[flat != 0].tobytes())
    return b"".join(parts)


def _block_bytes(block: StarBlock) -> bytes:
    table = block.table
    out = [f"data_{block.name}", ""]
    if not block.is_loop:
        row = table.iloc[0] if len(table) else pd.Series(dtype=object)
        out += [f"_{column} {format_star_column(pd.Series([row[column]]))[0]}" for column in table.columns]
        return ("\n".join(out) + "\n\n").encode()
    out += ["loop_"] + [f"_{column} #{k + 1}" for k, column in enumerate(table.columns)]
    body = _loop_body(table) if len(table) and len(table.columns) else b""
    return ("\n".join(out) + "\n").encode() + body + b"\n"


def write_star_text(path: str | Path, blocks: list[StarBlock], header_comments: list[str] = ()) -> Path:
    """Write STAR blocks in order; string cells are written as they are (quoted if they hold whitespace).

    Float columns are written with 6 decimals, integer columns as integers.
    """
    path = Path(path)
    head = "".join(f"{line if line.startswith('#') else '# ' + line}\n" for line in header_comments)
    with path.open("wb") as handle:
        handle.write(("\n" + head + "\n" if head else "\n").encode())
        for block in blocks:
            handle.write(_block_bytes(block))
    return path
