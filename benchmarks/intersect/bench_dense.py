"""Benchmark "intersect particle sets" on crowded tomograms (issue 16): this version vs the previous one vs M.

Usage::

    python benchmarks/intersect/bench_dense.py                     # the run in README.md (about 10 minutes)
    python benchmarks/intersect/bench_dense.py --quick             # small sizes only, no CLI run

Data: tomograms of ``--per-tomo`` particles in a slab ``--thickness`` Å thick whose area is chosen so that the
mean nearest-neighbour spacing of the old particles is ``--spacing-factor`` x the tolerance (Poisson points: mean
spacing = 0.554 ρ^(-1/3)). ``1 - non_shared`` of the old particles reappear in the new set with Gaussian jitter
(σ per axis) and orientations turned by a random rotation of ``--angle-jitter-deg`` (Gaussian rotation vector);
the others are uniform with uniform orientations. The new rows are shuffled; the true pairs are known.

Methods, on the same data in the same run (the machine may be shared: compare ratios within one run):

* ``new``: this checkout (the fastest of ``--repeats`` runs):
  :func:`mspecies.core.assignment.match_particle_sets` (gated, ``method="auto"``) plus the histogram values
  (each old particle's nearest new particle within 3 x the tolerance).
* ``new +20° C1`` / ``new +20° I``: the same with the orientation gate (20°, symmetry C1 or I) and the angular
  histogram values.
* ``previous``: the gated solver and histogram of ``--baseline-ref`` (default ``main``; the histogram there is an
  optimal assignment at 3 x the tolerance), run in a subprocess with a time limit.
* ``M-dense``: M 1.x semantics (dense ``linear_sum_assignment`` on the full per-tomogram distance matrix, then the
  threshold; ``mode="m_compatible"``), only where a tomogram has at most ``--m-max-per-tomo`` particles (its
  matrix needs about 32 bytes per entry).
* ``CLI``: ``python -m mspecies intersect`` end to end on two RELION 5 STAR files (reading, matching, histogram,
  writing every output), this checkout vs ``--baseline-ref``, each in a subprocess with a time limit.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mspecies.common.euler import euler_to_matrix, matrix_to_euler
from mspecies.core.assignment import match_particle_sets, nearest_new_particles
from mspecies.core.symmetry import angular_distance_from_euler_deg

REPO = Path(__file__).resolve().parents[2]
NN_SPACING_FACTOR = 0.554  # mean nearest-neighbour distance of a Poisson process = 0.554 ρ^(-1/3)
HISTOGRAM_FACTOR = 3.0


@dataclass(frozen=True)
class Crowded:
    """Old/new particle sets with known true pairs (``true_partner[i]``: new index of old ``i`` or -1)."""

    old: np.ndarray
    new: np.ndarray
    old_euler: np.ndarray
    new_euler: np.ndarray
    old_groups: np.ndarray
    new_groups: np.ndarray
    true_partner: np.ndarray
    area_side_angst: float


def make_crowded(n_tomos: int, per_tomo: int, args: argparse.Namespace) -> Crowded:
    """Crowded synthetic sets (see the module docstring)."""
    rng = np.random.default_rng(args.seed)
    n = n_tomos * per_tomo
    volume = per_tomo * (args.spacing_factor * args.tol / NN_SPACING_FACTOR) ** 3  # Å³ per tomogram
    side = float(np.sqrt(volume / args.thickness))
    box = np.array([side, side, args.thickness])
    groups = np.arange(n) // per_tomo
    old = rng.uniform(0, box, (n, 3))
    shared = rng.random(n) >= args.non_shared
    new = np.where(shared[:, None], old + rng.normal(0, args.jitter, (n, 3)), rng.uniform(0, box, (n, 3)))
    old_euler = random_euler(rng, n)
    turn = rng.normal(0, np.deg2rad(args.angle_jitter_deg), (n, 3))
    turned = matrix_to_euler(euler_to_matrix(old_euler) @ rotation_vectors_to_matrices(turn))
    new_euler = np.where(shared[:, None], turned, random_euler(rng, n))
    order = rng.permutation(n)
    true_partner = np.where(shared, np.argsort(order), -1)
    return Crowded(old, new[order], old_euler, new_euler[order], groups, groups[order], true_partner, side)


def random_euler(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, 3) RELION angles of uniformly random rotations."""
    quaternions = rng.normal(size=(n, 4))
    quaternions /= np.linalg.norm(quaternions, axis=1, keepdims=True)
    w, x, y, z = quaternions.T
    matrices = np.stack([np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
                         np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
                         np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1)], -2)
    return matrix_to_euler(matrices)


def rotation_vectors_to_matrices(vectors: np.ndarray) -> np.ndarray:
    """(n, 3) rotation vectors (rad) → (n, 3, 3) matrices (Rodrigues)."""
    angle = np.linalg.norm(vectors, axis=1)[:, None, None]
    axis = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-300)
    cross = np.zeros((len(vectors), 3, 3))
    cross[:, 0, 1], cross[:, 0, 2], cross[:, 1, 2] = -axis[:, 2], axis[:, 1], -axis[:, 0]
    cross -= np.swapaxes(cross, 1, 2)
    return np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * cross @ cross


def score(data: Crowded, old_partner: np.ndarray) -> dict:
    """Pairs, recall (correct / true pairs) and precision (correct / reported)."""
    n_pairs = int(np.count_nonzero(old_partner >= 0))
    correct = int(np.count_nonzero((old_partner >= 0) & (old_partner == data.true_partner)))
    n_true = int(np.count_nonzero(data.true_partner >= 0))
    return dict(pairs=n_pairs, recall=correct / max(n_true, 1), precision=correct / max(n_pairs, 1))


def run_new(data: Crowded, tol: float, angular: float | None = None, symmetry: str = "C1") -> dict:
    """This checkout: solve, then the histogram values (nearest neighbours; angles with a gate)."""
    angles = dict(old_euler_zyz_deg=data.old_euler, new_euler_zyz_deg=data.new_euler) if angular else {}
    cpu = time.process_time()
    start = time.perf_counter()
    result = match_particle_sets(data.old, data.new, tol, old_groups=data.old_groups, new_groups=data.new_groups,
                                 angular_tolerance_deg=angular, symmetry=symmetry, **angles)
    solved = time.perf_counter()
    partner, distance = nearest_new_particles(data.old, data.new, HISTOGRAM_FACTOR * tol,
                                              old_groups=data.old_groups, new_groups=data.new_groups)
    if angular:
        close = np.flatnonzero((partner >= 0) & (distance <= tol))
        angular_distance_from_euler_deg(data.old_euler[close], data.new_euler[partner[close]], symmetry)
    done = time.perf_counter()
    return dict(solve_s=solved - start, histogram_s=done - solved, seconds=done - start,
                cpu_s=time.process_time() - cpu, **score(data, result.old_partner))


def best_of(repeats: int, run, *args) -> dict:  # noqa: ANN001 (a run_* function)
    """The fastest of ``repeats`` runs (the machine is shared: the fastest is the least disturbed)."""
    return min((run(*args) for _ in range(max(1, repeats))), key=lambda row: row["seconds"])


def run_m_dense(data: Crowded, tol: float) -> dict:
    cpu = time.process_time()
    start = time.perf_counter()
    result = match_particle_sets(data.old, data.new, tol, old_groups=data.old_groups, new_groups=data.new_groups,
                                 mode="m_compatible")
    seconds = time.perf_counter() - start
    return dict(solve_s=seconds, histogram_s=None, seconds=seconds, cpu_s=time.process_time() - cpu,
                **score(data, result.old_partner))


# --- the previous version, in a subprocess ----------------------------------------------------------------------------


def export_ref(ref: str, folder: Path) -> str:
    """Copy of the repository at ``ref`` (``git archive``) into ``folder``; returns the commit."""
    folder.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", ref], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", ref], capture_output=True, text=True,
                          check=True).stdout.strip()


_WORKER = """
import json, sys, time
import mspecies
assert sys.argv[4] in mspecies.__file__, mspecies.__file__
import numpy as np
from mspecies.core.assignment import histogram_distances, match_particle_sets
d = np.load(sys.argv[1]); tol = float(sys.argv[2])
c0 = time.process_time()
t0 = time.perf_counter()
r = match_particle_sets(d["old"], d["new"], tol, old_groups=d["old_groups"], new_groups=d["new_groups"])
np.save(sys.argv[3], np.asarray(r.old_partner))
t1 = time.perf_counter()
print(json.dumps({"solve_s": t1 - t0}), flush=True)
histogram_distances(d["old"], d["new"], 3.0 * tol, old_groups=d["old_groups"], new_groups=d["new_groups"])
t2 = time.perf_counter()
print(json.dumps({"solve_s": t1 - t0, "histogram_s": t2 - t1, "cpu_s": time.process_time() - c0}), flush=True)
"""


def run_previous(data: Crowded, tol: float, source: Path, workdir: Path, timeout_s: float) -> dict:
    """Solve + histogram of the previous version (subprocess, ``PYTHONPATH=source``), stopped after ``timeout_s``."""
    arrays, partner_file = workdir / "data.npz", workdir / "partner.npy"
    np.savez(arrays, old=data.old, new=data.new, old_groups=data.old_groups, new_groups=data.new_groups)
    partner_file.unlink(missing_ok=True)
    env = dict(os.environ, PYTHONPATH=str(source))
    try:
        command = [sys.executable, "-c", _WORKER, str(arrays), str(tol), str(partner_file), str(source)]
        done = subprocess.run(command, env=env, cwd=source, capture_output=True, text=True, timeout=timeout_s,
                              check=True)
        lines = done.stdout.strip().splitlines()
    except subprocess.TimeoutExpired as expired:
        out = expired.stdout.decode() if isinstance(expired.stdout, bytes) else (expired.stdout or "")
        lines = out.strip().splitlines()
    timing = json.loads(lines[-1]) if lines else {}
    row = dict(solve_s=timing.get("solve_s"), histogram_s=timing.get("histogram_s"), cpu_s=timing.get("cpu_s"),
               timeout_s=timeout_s)
    finished = row["solve_s"] is not None and row["histogram_s"] is not None
    row["seconds"] = row["solve_s"] + row["histogram_s"] if finished else None
    if partner_file.is_file():
        row.update(score(data, np.load(partner_file)))
    return row


# --- command line end to end ---------------------------------------------------------------------------------------


def write_relion5(path: Path, positions: np.ndarray, euler: np.ndarray, groups: np.ndarray) -> None:
    """RELION 5 particle STAR: centred Å coordinates, angles, tomogram names."""
    centre = positions.mean(axis=0)
    header = ("# Relion star file version 50001\n\ndata_optics\n\nloop_\n_rlnOpticsGroup #1\n_rlnOpticsGroupName #2\n"
              "_rlnTomoTiltSeriesPixelSize #3\n_rlnVoltage #4\n_rlnSphericalAberration #5\n_rlnAmplitudeContrast #6\n"
              "1 opticsGroup1 1.0 300.0 2.7 0.07\n\n\ndata_particles\n\nloop_\n")
    labels = ["rlnTomoName", "rlnCenteredCoordinateXAngst", "rlnCenteredCoordinateYAngst",
              "rlnCenteredCoordinateZAngst", "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOpticsGroup"]
    rows = np.column_stack([positions - centre, euler])
    with open(path, "w") as handle:
        handle.write(header + "".join(f"_{label} #{k + 1}\n" for k, label in enumerate(labels)))
        handle.writelines(f"tomo_{g:03d} {x:.3f} {y:.3f} {z:.3f} {a:.3f} {b:.3f} {c:.3f} 1\n"
                          for g, (x, y, z, a, b, c) in zip(groups, rows))


def run_cli(source: Path, old: Path, new: Path, out: Path, tol: float, timeout_s: float, extra: list[str]) -> dict:
    command = [sys.executable, "-m", "mspecies", "intersect", "--old", str(old), "--new", str(new),
               "--tolerance-angst", str(tol), "--out", str(out), *extra]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    try:
        subprocess.run(command, env=dict(os.environ, PYTHONPATH=str(source), MPLBACKEND="Agg"), cwd=source,
                       capture_output=True, text=True, timeout=timeout_s, check=True)
    except subprocess.TimeoutExpired:
        return dict(seconds=None, timeout_s=timeout_s)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    summary = json.loads((out / "summary.json").read_text())
    return dict(seconds=seconds, cpu_s=cpu, pairs=summary["in_both"])


# --- driver --------------------------------------------------------------------------------------------------------


def bench_scenario(name: str, n_tomos: int, per_tomo: int, args: argparse.Namespace, previous: Path,
                   workdir: Path) -> list[dict]:
    data = make_crowded(n_tomos, per_tomo, args)
    n = n_tomos * per_tomo
    first = slice(0, per_tomo)
    spacing = nearest_new_particles(data.old[first], data.old[first], 1e4, exclude_same_index=True)[1]
    common = dict(scenario=name, n=n, tomograms=n_tomos, per_tomo=per_tomo,
                  nn_spacing_angst=float(np.nanmean(spacing)), true_pairs=int(np.count_nonzero(data.true_partner >= 0)))
    print(f"{name}: {n:,} per set, {n_tomos} x {per_tomo:,}, mean NN spacing {common['nn_spacing_angst']:.1f} Å "
          f"(tolerance {args.tol} Å)", flush=True)
    rows = [dict(common, method="new", **best_of(args.repeats, run_new, data, args.tol))]
    rows.append(dict(common, method="previous", **run_previous(data, args.tol, previous, workdir, args.timeout)))
    rows.append(dict(common, method="new +20° C1", **best_of(args.repeats, run_new, data, args.tol, 20.0, "C1")))
    rows.append(dict(common, method="new +20° I", **best_of(args.repeats, run_new, data, args.tol, 20.0, "I")))
    if per_tomo <= args.m_max_per_tomo:
        rows.append(dict(common, method="M-dense", **run_m_dense(data, args.tol)))
    for row in rows:
        print("  " + describe(row), flush=True)
    return rows


def bench_cli(n_tomos: int, per_tomo: int, args: argparse.Namespace, previous: Path, workdir: Path) -> list[dict]:
    data = make_crowded(n_tomos, per_tomo, args)
    old, new = workdir / "old.star", workdir / "new.star"
    write_relion5(old, data.old, data.old_euler, data.old_groups)
    write_relion5(new, data.new, data.new_euler, data.new_groups)
    common = dict(scenario="CLI end to end (STAR I/O)", n=n_tomos * per_tomo, tomograms=n_tomos, per_tomo=per_tomo)
    rows = [dict(common, method="new CLI", **run_cli(REPO, old, new, workdir / "out_new", args.tol,
                                                     args.cli_timeout, [])),
            dict(common, method="previous CLI", **run_cli(previous, old, new, workdir / "out_previous", args.tol,
                                                          args.cli_timeout, [])),
            dict(common, method="new CLI +20° C1", **run_cli(REPO, old, new, workdir / "out_angles", args.tol,
                                                             args.cli_timeout, ["--angular-tolerance-deg", "20"]))]
    for row in rows:
        print("  " + describe(row), flush=True)
    return rows


def _seconds(value: float | None, limit: float | None = None) -> str:
    if value is None:
        return f"> {limit:g} (stopped)" if limit else "n/a"
    return f"{value:.2f}"


def describe(row: dict) -> str:
    recall = f"recall {row['recall']:.4f} precision {row['precision']:.4f}" if "recall" in row else ""
    return (f"{row['method']:>16}  total {_seconds(row.get('seconds'), row.get('timeout_s')):>16} s  CPU "
            f"{_seconds(row.get('cpu_s'), row.get('timeout_s'))} s  solve "
            f"{_seconds(row.get('solve_s'))} s  histogram {_seconds(row.get('histogram_s'), row.get('timeout_s'))} s "
            f" pairs {row.get('pairs', 'n/a')}  {recall}")


def markdown_table(rows: list[dict]) -> str:
    lines = ["| scenario | particles per set | method | total (s) | CPU (s) | solve (s) | histogram (s) | "
             "total / new | pairs | recall | precision |", "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    reference = {r["scenario"]: r["seconds"] for r in rows if r["method"] in ("new", "new CLI")}
    for r in rows:
        ratio = (f"{r['seconds'] / reference[r['scenario']]:.1f}" if r.get("seconds") and reference.get(r["scenario"])
                 else ("> " + f"{r['timeout_s'] / reference[r['scenario']]:.0f}" if r.get("timeout_s") else "n/a"))
        recall = (f"{r['recall']:.4f} | {r['precision']:.4f}" if "recall" in r else "n/a | n/a")
        pairs = f"{r['pairs']:,}" if "pairs" in r else "n/a"
        total = _seconds(r.get("seconds"), r.get("timeout_s"))
        cpu = _seconds(r.get("cpu_s"), r.get("timeout_s"))
        solve = _seconds(r.get("solve_s"))
        histogram = _seconds(r.get("histogram_s"), r.get("timeout_s")) if "histogram_s" in r else "n/a"
        lines.append(f"| {r['scenario']} | {r['n']:,} | {r['method']} | {total} | {cpu} | {solve} | {histogram} | "
                     f"{ratio} | {pairs} | {recall} |")
    return "\n".join(lines)


def machine() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{platform.node()}, {os.cpu_count()} cores (load average {load:.1f} at the end: shared), Python "
            f"{platform.python_version()}, numpy {np.__version__}, scipy {__import__('scipy').__version__}")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tol", type=float, default=25.0, help="tolerance (Å)")
    parser.add_argument("--spacing-factor", type=float, default=2.0, help="mean NN spacing / tolerance")
    parser.add_argument("--thickness", type=float, default=1500.0, help="slab thickness (Å)")
    parser.add_argument("--jitter", type=float, default=5.0, help="positional jitter σ per axis (Å)")
    parser.add_argument("--angle-jitter-deg", type=float, default=3.0, help="orientation jitter σ (deg)")
    parser.add_argument("--non-shared", type=float, default=0.2, help="fraction of particles not shared")
    parser.add_argument("--m-max-per-tomo", type=int, default=10_000, help="largest tomogram for M-dense")
    parser.add_argument("--timeout", type=float, default=180.0, help="time limit (s) of the previous version")
    parser.add_argument("--cli-timeout", type=float, default=300.0, help="time limit (s) of each CLI run")
    parser.add_argument("--baseline-ref", default="main", help="git ref of the previous version")
    parser.add_argument("--quick", action="store_true", help="small scenarios, no CLI")
    parser.add_argument("--no-cli", action="store_true", help="skip the command-line runs")
    parser.add_argument("--cli-only", action="store_true", help="only the command-line runs")
    parser.add_argument("--repeats", type=int, default=3, help="runs of this version's solves (the fastest is kept)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    scenarios = [("dense, 1 x 10,000", 1, 10_000), ("dense, 1 x 20,000", 1, 20_000),
                 ("dense, 10 x 20,000", 10, 20_000), ("dense, 50 x 20,000", 50, 20_000),
                 ("one tomogram, 1 x 100,000", 1, 100_000)]
    if args.quick:
        scenarios = scenarios[:2]
    if args.cli_only:
        scenarios = []
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        previous = Path(tmp) / "previous"
        commit = export_ref(args.baseline_ref, previous)
        for name, n_tomos, per_tomo in scenarios:
            rows += bench_scenario(name, n_tomos, per_tomo, args, previous, Path(tmp))
        if not (args.quick or args.no_cli):
            rows += bench_cli(50, 20_000, args, previous, Path(tmp))
    date = datetime.date.today().isoformat()
    settings = (f"tolerance {args.tol} Å, mean NN spacing ≈ {args.spacing_factor} x tolerance, slab "
                f"{args.thickness} Å thick, jitter σ = {args.jitter} Å per axis and {args.angle_jitter_deg}° "
                f"(orientation), {args.non_shared:.0%} non-shared, histogram radius {HISTOGRAM_FACTOR} x tolerance, "
                f"previous version = {args.baseline_ref} ({commit}), seed {args.seed}")
    table = markdown_table(rows)
    print("\n" + table)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "results_dense_cli" if args.cli_only else "results_dense"
    (args.out / f"{stem}.md").write_text(f"# Intersect benchmark, crowded tomograms ({date})\n\n"
                                               f"Machine: {machine()}\n\nData: {settings}\n\n{table}\n")
    (args.out / f"{stem}.json").write_text(json.dumps(dict(date=date, machine=machine(), settings=settings,
                                                                 rows=rows), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
