"""RELION STAR files through ``starfile`` (pandas tables).

RELION 3.1 particle files have two blocks: ``data_optics`` (one row per optics group) and
``data_particles`` (one row per particle, ``rlnOpticsGroup`` pointing into the optics table).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import starfile

from mspecies.core.types import InputError


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
