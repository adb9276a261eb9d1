"""Benchmark the particle STAR reader and writer against ``starfile``, side by side in one run.

Usage::

    python benchmarks/star/bench_star.py [--rows 1e6] [--repeats 2] [--out DIR]

Input: a RELION 4 particle STAR (``data_optics`` + ``data_particles``) with ``--rows`` particles on 50 tomograms:
tomogram name, coordinates, angles, shifts (floats, 6 decimals), optics group, half set, class (integers), image
name and a log-likelihood carried as an unknown column (15 columns, about 160 bytes a row), written once by
``starfile``.

Timed (best of ``--repeats``, each on the same file, in this order so both share the machine's state):

* ``starfile.read`` → DataFrames (pandas' C parser with type inference);
* ``read_particle_star`` → :class:`~mspecies.formats.star_dialects.ParticleTable` (the text-exact reader: carried
  columns as the file's strings, interpreted columns as float64, positions in Å, dialect detection and checks);
* ``write_particle_star`` of that table in its own dialect (optics as read, carried columns as read);
* ``starfile.write`` of the DataFrames ``starfile.read`` returned.

The machine this was run on is named in ``results.json`` with its load average; on a shared machine report the
ratios (mspecies / starfile) of the same run, not the seconds.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import starfile

from mspecies.formats.star_dialects import read_particle_star
from mspecies.formats.star_write import write_particle_star

HERE = Path(__file__).resolve().parent
SHAPE_PX = (3000, 3000, 1200)
"""Tomogram size given to the reader so that the run also works with readers that require it (older mspecies)."""


def make_star(path: Path, rows: int, seed: int = 0) -> None:
    """Write the benchmark's particle STAR (RELION 4 with optics) with ``starfile``."""
    rng = np.random.default_rng(seed)
    index = np.arange(rows)
    particles = pd.DataFrame({
        "rlnTomoName": np.array([f"TS_{i:03d}" for i in range(50)], dtype=object)[index % 50],
        "rlnCoordinateX": rng.uniform(0, 4000, rows), "rlnCoordinateY": rng.uniform(0, 4000, rows),
        "rlnCoordinateZ": rng.uniform(0, 1500, rows), "rlnAngleRot": rng.uniform(-180, 180, rows),
        "rlnAngleTilt": rng.uniform(0, 180, rows), "rlnAnglePsi": rng.uniform(-180, 180, rows),
        "rlnOriginXAngst": rng.normal(0, 2, rows), "rlnOriginYAngst": rng.normal(0, 2, rows),
        "rlnOriginZAngst": rng.normal(0, 2, rows), "rlnOpticsGroup": np.ones(rows, dtype=int),
        "rlnRandomSubset": index % 2 + 1,
        "rlnImageName": [f"Subtomograms/TS_{i % 50:03d}/{i}_subtomo.mrc" for i in range(rows)],
        "rlnClassNumber": np.ones(rows, dtype=int), "rlnLogLikeliContribution": rng.normal(1e5, 1e3, rows)})
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"], "rlnVoltage": [300.0],
                           "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.07],
                           "rlnTomoTiltSeriesPixelSize": [1.35], "rlnImagePixelSize": [2.7], "rlnImageSize": [64],
                           "rlnImageDimensionality": [3]})
    starfile.write({"optics": optics, "particles": particles}, path, overwrite=True)


def best_of(repeats: int, action) -> tuple[float, object]:
    """Fastest wall time (s) of ``repeats`` calls of ``action`` and its last result."""
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = action()
        times.append(time.perf_counter() - started)
    return min(times), result


def run(rows: int, repeats: int, folder: Path) -> dict:
    source = folder / "particles.star"
    make_star(source, rows)
    seconds = {}
    seconds["starfile_read_s"], frames = best_of(repeats, lambda: starfile.read(source, always_dict=True))
    seconds["mspecies_read_s"], table = best_of(repeats, lambda: read_particle_star(source, tomo_shape_px=SHAPE_PX))
    seconds["mspecies_write_s"], _ = best_of(repeats, lambda: write_particle_star(table, folder / "mspecies.star"))
    seconds["starfile_write_s"], _ = best_of(repeats, lambda: starfile.write(frames, folder / "starfile.star",
                                                                              overwrite=True))
    back = read_particle_star(folder / "mspecies.star", tomo_shape_px=SHAPE_PX)
    assert len(back) == rows and np.allclose(back.poses.positions_angst, table.poses.positions_angst, atol=1e-3)
    return {"rows": rows, "file_mb": round(source.stat().st_size / 1e6, 1), "repeats": repeats,
            **{k: round(v, 3) for k, v in seconds.items()},
            "read_ratio_mspecies_over_starfile": round(seconds["mspecies_read_s"] / seconds["starfile_read_s"], 3),
            "write_ratio_mspecies_over_starfile": round(seconds["mspecies_write_s"] / seconds["starfile_write_s"], 3),
            "machine": {"cpus": os.cpu_count(), "load_average_1min": round(os.getloadavg()[0], 2),
                        "python": platform.python_version(), "pandas": pd.__version__,
                        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=float, default=1e6, help="particles in the file (default 1e6)")
    parser.add_argument("--repeats", type=int, default=2, help="best of this many runs per step")
    parser.add_argument("--out", type=Path, default=HERE, help="folder for results.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mspecies-star-bench-") as folder:
        result = run(int(args.rows), args.repeats, Path(folder))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
