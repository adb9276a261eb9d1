"""RELION STAR files: typed tables through ``starfile``, and a text-exact reader/writer.

RELION 3.1 particle files have two blocks: ``data_optics`` (one row per optics group) and
``data_particles`` (one row per particle, ``rlnOpticsGroup`` pointing into the optics table).
:func:`read_star_text` keeps every value as the string in the file, so columns a caller does not
interpret are written back unchanged by :func:`write_star_text` (dialects: ``star_dialects.py``).
"""

from __future__ import annotations

import re
import shlex
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


@dataclass
class StarBlock:
    """One ``data_<name>`` block; ``table`` holds strings exactly as written (one row for a key-value block)."""

    name: str
    table: pd.DataFrame
    is_loop: bool = True


_TOKEN = re.compile(r"\"([^\"]*)\"|'([^']*)'|(\S+)")


def _split_quoted(lines: list[str]) -> list[list[str]]:
    """Split data lines on whitespace, honouring STAR single/double quotes (used only for lines with quotes)."""
    return [[a or b or c for a, b, c in _TOKEN.findall(line)] for line in lines]


def _loop_table(path: Path, columns: list[str], lines: list[str], first_line_no: int) -> pd.DataFrame:
    """Data lines of a loop → string DataFrame; a row with the wrong field count is an InputError naming its line."""
    if not lines:
        return pd.DataFrame({name: pd.Series([], dtype=object) for name in columns})
    if any('"' in line or "'" in line for line in lines):
        rows = _split_quoted(lines)
    else:
        rows = [line.split() for line in lines]
    bad = next((i for i, row in enumerate(rows) if len(row) != len(columns)), None)
    if bad is not None:
        raise InputError(f"{path}: line {first_line_no + bad}: {len(rows[bad])} values for {len(columns)} columns "
                         f"({', '.join(columns[:4])}{', ...' if len(columns) > 4 else ''})")
    return pd.DataFrame(rows, columns=columns, dtype=object)


def read_star_text(path: str | Path) -> tuple[dict[str, StarBlock], list[str]]:
    """Read a STAR file keeping every value as text → (blocks by name without ``data_``, header comment lines).

    Loops become one row per data line, key-value blocks one row. Duplicate column names or a data line with the
    wrong number of values raise :class:`InputError` naming the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: STAR file not found")
    raw = path.read_text().splitlines()
    lines = [line.strip() for line in raw]
    comments = [line for line in lines if line.startswith("#")]
    blocks: dict[str, StarBlock] = {}
    i = 0
    while i < len(lines):
        if not lines[i].startswith("data_"):
            i += 1
            continue
        name, i = lines[i][5:], i + 1
        block, i = _read_block(path, name, lines, i)
        if name in blocks:
            raise InputError(f"{path}: data_{name} appears twice")
        blocks[name] = block
    return blocks, [c for c in comments if c != "#"]


def _read_block(path: Path, name: str, lines: list[str], i: int) -> tuple[StarBlock, int]:
    """Parse one block starting after its ``data_`` line → (block, index of the next unread line)."""
    while i < len(lines) and (not lines[i] or lines[i].startswith("#")):
        i += 1
    if i < len(lines) and lines[i].startswith("loop_"):
        i += 1
        columns: list[str] = []
        while i < len(lines) and (lines[i].startswith("_") or not lines[i]):
            if lines[i]:
                columns.append(lines[i].split()[0][1:])
            i += 1
        start = i
        while i < len(lines) and not lines[i].startswith("data_"):
            if lines[i].startswith("loop_"):
                label = next((line.split()[0] for line in lines[i + 1:] if line.startswith("_")), "no label")
                raise InputError(f"{path}: line {i + 1}: data_{name} holds a second loop ({label} ...) after its "
                                 f"{len(columns)}-column loop; a STAR data block holds one loop (RELION reads one "
                                 "table per block): put it in a data block of its own")
            i += 1
        data = [line for line in lines[start:i] if line and not line.startswith("#")]
        _check_unique(path, name, columns)
        return StarBlock(name, _loop_table(path, columns, data, start + 1)), i
    values: dict[str, str] = {}
    while i < len(lines) and not lines[i].startswith("data_"):
        if lines[i].startswith("_"):
            parts = shlex.split(lines[i])
            if len(parts) != 2:
                raise InputError(f"{path}: line {i + 1}: expected '_label value', got {lines[i]!r}")
            values[parts[0][1:]] = parts[1]
        i += 1
    return StarBlock(name, pd.DataFrame([values], dtype=object), is_loop=False), i


def _check_unique(path: Path, block: str, columns: list[str]) -> None:
    seen = pd.Index(columns)
    if seen.has_duplicates:
        raise InputError(f"{path}: data_{block} repeats column(s) {sorted(set(seen[seen.duplicated()]))}")


def _quote(values: pd.Series) -> pd.Series:
    """Quote strings that are empty or contain whitespace (STAR tokens are whitespace-separated)."""
    text = values.astype(str)
    needs = text.str.contains(r"\s", regex=True) | (text == "")
    return text.where(~needs, '"' + text + '"')


def format_star_column(values: pd.Series | np.ndarray, float_format: str = "{:.6f}") -> pd.Series:
    """Column → strings for a STAR file: floats with ``float_format``, integers and text as they are."""
    series = pd.Series(values) if not isinstance(values, pd.Series) else values
    if pd.api.types.is_bool_dtype(series):
        return series.astype(int).astype(str)
    if pd.api.types.is_integer_dtype(series):
        return series.astype(str)
    if pd.api.types.is_float_dtype(series):
        return series.map(float_format.format)
    return _quote(series)


def _block_text(block: StarBlock) -> str:
    table = block.table
    out = [f"data_{block.name}", ""]
    if not block.is_loop:
        row = table.iloc[0] if len(table) else pd.Series(dtype=object)
        out += [f"_{column} {format_star_column(pd.Series([row[column]])).iloc[0]}" for column in table.columns]
        return "\n".join(out) + "\n\n"
    out += ["loop_"] + [f"_{column} #{k + 1}" for k, column in enumerate(table.columns)]
    if len(table) and len(table.columns):
        texts = [format_star_column(table[column]).reset_index(drop=True) for column in table.columns]
        rows = texts[0].str.cat(texts[1:], sep=" ") if len(texts) > 1 else texts[0]
        out.append("\n".join(rows.tolist()))
    return "\n".join(out) + "\n\n"


def write_star_text(path: str | Path, blocks: list[StarBlock], header_comments: list[str] = ()) -> Path:
    """Write STAR blocks in order; string cells are written as they are (quoted if they hold whitespace).

    Float columns are written with 6 decimals, integer columns as integers.
    """
    path = Path(path)
    head = "".join(f"{line if line.startswith('#') else '# ' + line}\n" for line in header_comments)
    path.write_text(("\n" + head + "\n" if head else "\n") + "".join(_block_text(block) for block in blocks))
    return path
