"""Benchmark "intersect particle sets": gated sparse solver vs M-style dense assignment vs RELION duplicate removal.

Usage::

    python benchmarks/intersect/bench_intersect.py [--sizes 1e3 1e4 1e5 1e6] [--quick] [--out DIR]

Synthetic data: ``n`` old particles spread over tomograms of ``--per-tomo`` particles in a
4000 x 4000 x 1500 Å slab. A ``1 - non_shared`` fraction of them reappear in the new set with Gaussian jitter
(σ per axis, Å); the other new particles are uniform. Both sets have ``n`` particles. The true pairs are known,
so recall = correct pairs / true pairs and precision = correct pairs / reported pairs.

Methods (each timed end to end on the same data):

* ``gated-sparse``: :func:`mspecies.core.assignment.match_particle_sets` (``method="sparse"``).
* ``M-dense``: M 1.x semantics, ``scipy.optimize.linear_sum_assignment`` on the full per-tomogram distance
  matrix, then pairs beyond the tolerance dropped (``mode="m_compatible"``); up to ``--m-max`` particles.
* ``relion``: ``relion_star_handler --remove_duplicates <tol>`` on old + new written to one RELION 3.1 STAR
  (old rows first). RELION keeps the *last* of two particles closer than the threshold, so each removed old
  particle is one detected pair; a removed particle counts as correct when it is an old particle whose true
  partner is in the new set. RELION reports no pairing, so this recall is optimistic (the removing particle is
  not checked to be the true partner) and its precision is the fraction of removed particles that are old
  particles with a true partner. Its time includes writing the STAR file (in parentheses: the
  ``relion_star_handler`` process alone, which reads and writes the STAR files). RELION 3.1.3 takes the pixel
  size from ``rlnMicrographOriginalPixelSize`` in the optics table, which it only reads when the table also
  has ``rlnVoltage``, ``rlnSphericalAberration`` and ``rlnAmplitudeContrast``; it needs ``rlnOriginX/YAngst``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mspecies.core.assignment import match_particle_sets

SLAB_ANGST = np.array([4000.0, 4000.0, 1500.0])


@dataclass(frozen=True)
class Synthetic:
    """Two particle sets with known true pairs: ``true_partner[i]`` is the new index of old ``i`` or -1."""

    old: np.ndarray
    new: np.ndarray
    old_groups: np.ndarray
    new_groups: np.ndarray
    true_partner: np.ndarray


def make_sets(n: int, per_tomo: int, jitter_angst: float, non_shared: float, seed: int = 0) -> Synthetic:
    """Synthetic old/new sets of ``n`` particles each, ``per_tomo`` per tomogram (new rows shuffled)."""
    rng = np.random.default_rng(seed)
    groups = np.arange(n) // per_tomo
    old = rng.uniform(0, SLAB_ANGST, (n, 3))
    shared = rng.random(n) >= non_shared
    new = np.where(shared[:, None], old + rng.normal(0, jitter_angst, (n, 3)), rng.uniform(0, SLAB_ANGST, (n, 3)))
    order = rng.permutation(n)  # new row k is generated row order[k]
    inverse = np.argsort(order)
    true_partner = np.where(shared, inverse, -1)
    return Synthetic(old, new[order], groups, groups[order], true_partner)


def true_pairs_within(data: Synthetic, tol: float) -> int:
    """Number of true pairs whose jittered distance is within the tolerance (the best achievable recall)."""
    i = np.flatnonzero(data.true_partner >= 0)
    return int(np.count_nonzero(np.linalg.norm(data.old[i] - data.new[data.true_partner[i]], axis=1) <= tol))


def score_pairs(data: Synthetic, old_partner: np.ndarray) -> tuple[int, float, float]:
    """(pairs, recall, precision) of a pairing against the true pairs."""
    n_pairs = int(np.count_nonzero(old_partner >= 0))
    correct = int(np.count_nonzero((old_partner >= 0) & (old_partner == data.true_partner)))
    n_true = int(np.count_nonzero(data.true_partner >= 0))
    return n_pairs, correct / max(n_true, 1), correct / max(n_pairs, 1)


def run_ours(data: Synthetic, tol: float, mode: str, method: str) -> dict:
    start = time.perf_counter()
    result = match_particle_sets(data.old, data.new, tol, old_groups=data.old_groups, new_groups=data.new_groups,
                                 mode=mode, method=method)
    seconds = time.perf_counter() - start
    pairs, recall, precision = score_pairs(data, result.old_partner)
    return dict(seconds=seconds, pairs=pairs, recall=recall, precision=precision)


def write_relion_star(path: Path, data: Synthetic) -> None:
    """Old then new particles in one RELION 3.1 STAR at 1 Å/px (rlnMicrographName = tomogram)."""
    xyz = np.vstack([data.old, data.new])
    names = np.concatenate([data.old_groups, data.new_groups])
    ids = [f"old_{i}" for i in range(len(data.old))] + [f"new_{j}" for j in range(len(data.new))]
    header = ("# version 30001\n\ndata_optics\n\nloop_\n_rlnOpticsGroupName #1\n_rlnOpticsGroup #2\n"
              "_rlnMicrographOriginalPixelSize #3\n_rlnImagePixelSize #4\n_rlnImageSize #5\n"
              "_rlnImageDimensionality #6\n_rlnVoltage #7\n_rlnSphericalAberration #8\n_rlnAmplitudeContrast #9\n"
              "opticsGroup1 1 1.0 1.0 64 3 300.0 2.7 0.1\n\n# version 30001\n\ndata_particles\n\nloop_\n")
    labels = ["rlnMicrographName", "rlnCoordinateX", "rlnCoordinateY", "rlnCoordinateZ", "rlnOriginXAngst",
              "rlnOriginYAngst", "rlnOriginZAngst", "rlnImageName", "rlnOpticsGroup"]
    with open(path, "w") as handle:
        handle.write(header + "".join(f"_{label} #{k + 1}\n" for k, label in enumerate(labels)))
        handle.writelines(f"tomo_{g:05d} {x:.4f} {y:.4f} {z:.4f} 0 0 0 {name} 1\n"
                          for g, (x, y, z), name in zip(names, xyz, ids))


def read_kept_ids(path: Path) -> set[str]:
    """Values of rlnImageName (column 8) in the particles table of a STAR file written by RELION."""
    kept, in_particles = set(), False
    with open(path) as handle:
        for line in handle:
            if line.startswith("data_particles"):
                in_particles = True
            fields = line.split()
            if in_particles and len(fields) == 9 and not line.startswith("_"):
                kept.add(fields[7])
    return kept


def run_relion(data: Synthetic, tol: float, workdir: Path) -> dict:
    star_in, star_out = workdir / "combined.star", workdir / "out.star"
    start = time.perf_counter()
    write_relion_star(star_in, data)
    start_relion = time.perf_counter()
    log = subprocess.run(["relion_star_handler", "--i", str(star_in), "--o", str(star_out),
                          "--remove_duplicates", str(tol)], capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - start
    relion_seconds = time.perf_counter() - start_relion
    kept = read_kept_ids(star_out)
    removed_old = np.array([f"old_{i}" not in kept for i in range(len(data.old))])
    removed_new = sum(f"new_{j}" not in kept for j in range(len(data.new)))
    removed = int(removed_old.sum()) + removed_new
    correct = int(np.count_nonzero(removed_old & (data.true_partner >= 0)))
    n_true = int(np.count_nonzero(data.true_partner >= 0))
    summary = [line for line in log.stdout.splitlines() if "Removed" in line]
    return dict(seconds=seconds, relion_seconds=relion_seconds, pairs=removed, recall=correct / max(n_true, 1),
                precision=correct / max(removed, 1), note=summary[0].strip() if summary else "")


def bench_size(n: int, args: argparse.Namespace, workdir: Path) -> list[dict]:
    data = make_sets(n, args.per_tomo, args.jitter, args.non_shared, seed=args.seed)
    common = dict(n=n, true_pairs=int(np.count_nonzero(data.true_partner >= 0)),
                  true_within_tol=true_pairs_within(data, args.tol))
    rows = [dict(common, method="gated-sparse", **run_ours(data, args.tol, "gated", "sparse"))]
    if n <= args.m_max:
        rows.append(dict(common, method="M-dense", **run_ours(data, args.tol, "m_compatible", "auto")))
    if shutil.which("relion_star_handler") is None:
        print("  relion_star_handler not found: RELION skipped")
    elif n <= args.relion_max:
        rows.append(dict(common, method="relion", **run_relion(data, args.tol, workdir)))
    ours = rows[0]["seconds"]
    for row in rows:
        row["x_ours"] = row["seconds"] / ours
        print(f"  {row['method']:>13}  {row['seconds']:9.3f} s  x{row['x_ours']:8.1f}  pairs {row['pairs']:8d}  "
              f"recall {row['recall']:.4f}  precision {row['precision']:.4f}  {row.get('note', '')}", flush=True)
    return rows


def markdown_table(rows: list[dict]) -> str:
    lines = ["| particles per set | method | wall time (s) | time / ours | pairs reported | true pairs | "
             "true pairs within tol | recall | precision |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        seconds = f"{r['seconds']:.3f}" + (f" ({r['relion_seconds']:.3f})" if "relion_seconds" in r else "")
        lines.append(f"| {r['n']:,} | {r['method']} | {seconds} | {r['x_ours']:.1f} | {r['pairs']:,} | "
                     f"{r['true_pairs']:,} | {r['true_within_tol']:,} | {r['recall']:.4f} | {r['precision']:.4f} |")
    return "\n".join(lines)


def machine() -> str:
    return f"{platform.node()}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, " \
           f"Python {platform.python_version()}, numpy {np.__version__}, scipy {__import__('scipy').__version__}"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", type=float, default=[1e3, 1e4, 1e5, 1e6],
                        help="particles per set")
    parser.add_argument("--quick", action="store_true", help="sizes 1e3 1e4 1e5 (RELION up to 1e4)")
    parser.add_argument("--per-tomo", type=int, default=1000, help="particles per tomogram")
    parser.add_argument("--jitter", type=float, default=5.0, help="positional jitter σ per axis (Å)")
    parser.add_argument("--non-shared", type=float, default=0.2, help="fraction of particles not shared")
    parser.add_argument("--tol", type=float, default=20.0, help="tolerance (Å)")
    parser.add_argument("--m-max", type=float, default=1e5, help="largest size for the dense M-style solve")
    parser.add_argument("--relion-max", type=float, default=1e5, help="largest size for RELION")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.relion_max = [1e3, 1e4, 1e5], min(args.relion_max, 1e4)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            print(f"n = {int(size):,} per set", flush=True)
            rows += bench_size(int(size), args, Path(tmp))
    date = datetime.date.today().isoformat()
    settings = (f"{args.per_tomo} particles/tomogram in a 4000 x 4000 x 1500 Å slab, jitter σ = {args.jitter} Å "
                f"per axis, {args.non_shared:.0%} non-shared, tolerance {args.tol} Å, seed {args.seed}")
    table = markdown_table(rows)
    print("\n" + table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(f"# Intersect benchmark ({date})\n\nMachine: {machine()}\n\n"
                                         f"Data: {settings}\n\n{table}\n")
    (args.out / "results.json").write_text(json.dumps(dict(date=date, machine=machine(), settings=settings,
                                                           rows=rows), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
