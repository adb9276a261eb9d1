"""Export speed: particles/s of the engine (NumPy; CuPy where a GPU exists) and 3D CTFs vs RELION's way.

Usage: ``python benchmarks/export/bench_export.py [--boxes 64 128] [--particles 48] [--relion-particles 8]``
(``--padding-factors 2 1.5 1.25``: the same engine at each padding factor, interleaved rounds, ratios to the
first factor)

* Engine: one synthetic tilt series (41 tilts, 1024² px at 4 Å/px, realistic CTF and dose), random particles,
  not pre-rotated, full pipeline with the default 3D CTF (``direct``, on the output grid) and with M's
  ``padded`` one (preprocessing excluded from the per-particle rate, reported separately).
* 3D CTF only, both methods: the engine built without a stack (:meth:`TiltSeriesEngine.reconstruct_ctfs`, bit for
  bit the CTF of the full pipeline), in memory; and the direct one with every CTF written to its own new MRC file
  (as the export does, and as RELION's way does).
* RELION's way to make a per-particle 3D CTF: ``relion_reconstruct --reconstruct_ctf <box>`` on a STAR with one
  row per tilt (41 rows: angles of the tilt, the particle's own defocus, dose-weight B-factor), one call per particle.
  Its output is checked: shape box³, non-zero, and empty in the missing wedge (cone within 20° of the beam axis).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from mspecies.common.types import ParticlePoses
from mspecies.core.backend import cupy_unavailable_reason
from mspecies.core.geometry import particle_defocus_angst, project_positions_to_tilts
from mspecies.core.memory import retain_freed_memory
from mspecies.core.reconstruct import ExportOptions, TiltSeriesEngine, release_work_buffers
from mspecies.formats.mrc import read_mrc, write_mrc
from mspecies.formats.star import write_relion31_particles
from mspecies.synth.dataset import SynthParameters, make_tilt_series, random_euler_angles


def make_inputs(box_px: int, n_particles: int, seed: int = 0):
    params = SynthParameters(box_px=box_px, image_shape_yx=(1024, 1024), n_tilts=41,
                             thickness_angst=max(1000.0, 1.25 * box_px * 4.0))  # 1000 Å up to box 200
    rng = np.random.default_rng(seed)
    tilt_series = make_tilt_series(params, "TS", rng)
    stack = rng.normal(size=(41, 1024, 1024)).astype(np.float32)
    positions = rng.uniform(-1200, 1200, (n_particles, 3)) * [1, 1, 0.2]
    particles = ParticlePoses(positions, random_euler_angles(n_particles, rng), np.array(["TS"] * n_particles, object))
    return tilt_series, stack, particles


def bench_engine(box_px: int, n_particles: int, backend: str, ctf_method: str, repeats: int = 3,
                 prerotate: bool = False, padding_factor: float = 2.0) -> dict[str, float]:
    """Seconds per particle of the full pipeline, first pass and fastest warm pass (setup excluded), each warm
    pass preceded by the reference (one inverse real FFT of the padded M³ box, :func:`padded_irfft_s`), and of
    the 3D CTF alone."""
    release_work_buffers()  # the previous engine's kept arrays would shrink this one's memory plan (its batch)
    tilt_series, stack, particles = make_inputs(box_px, n_particles)
    options = ExportOptions(4.0, box_px, 0.6 * box_px * 4.0, backend=backend, ctf_method=ctf_method,
                            prerotate=prerotate, padding_factor=padding_factor)
    started = time.perf_counter()
    engine = TiltSeriesEngine.create(tilt_series, stack, options)
    setup = time.perf_counter() - started
    m = engine.padded_box_px
    passes, references = [], []
    for _ in range(repeats):
        references.append(padded_irfft_s(m))
        started = time.perf_counter()
        count = sum(1 for _ in engine.reconstruct(particles))
        passes.append((time.perf_counter() - started) / count)
    warm = min(passes[1:]) if repeats > 1 else passes[0]
    ctf_engine = TiltSeriesEngine.create(tilt_series, None, options)
    ctf_seconds = best_of(3, lambda: sum(1 for _ in ctf_engine.reconstruct_ctfs(particles))) / n_particles
    reference = min(references)
    return {"box": box_px, "M": m, "batch": engine.plan.batch_size, "setup_s": setup, "first_s_per_particle": passes[0],
            "s_per_particle": warm, "particles_per_s": 1.0 / warm, "irfft_s": reference,
            "per_particle_over_irfft": warm / reference, "ctf_s_per_particle": ctf_seconds}


def bench_padding_factors(box_px: int, n_particles: int, backend: str, factors: list[float], rounds: int,
                          repeats: int) -> dict[float, dict[str, float]]:
    """:func:`bench_engine` (direct 3D CTF) at each padding factor, in ``rounds`` interleaved rounds (the order
    reversed every other round, so that a drift of the machine's load favours no factor); per factor the round
    with the fastest warm pass."""
    best: dict[float, dict[str, float]] = {}
    for round_index in range(rounds):
        for factor in factors if round_index % 2 == 0 else factors[::-1]:
            result = bench_engine(box_px, n_particles, backend, "direct", repeats, padding_factor=factor)
            if factor not in best or result["s_per_particle"] < best[factor]["s_per_particle"]:
                best[factor] = result
    return best


def print_padding_factors(box_px: int, backend: str, best: dict[float, dict[str, float]]) -> None:
    """One line per factor: padded box, batch, ms per particle and the speed-up over the first factor."""
    reference = next(iter(best.values()))["s_per_particle"]
    for factor, result in best.items():
        print(f"box {box_px}, {backend}, padding factor {factor:g} (M {result['M']}, batch {result['batch']}): "
              f"{result['s_per_particle'] * 1e3:.1f} ms/particle warm = {reference / result['s_per_particle']:.2f}× "
              f"the speed of factor {next(iter(best)):g}; {result['per_particle_over_irfft']:.2f} × one "
              f"{result['M']}³ inverse real FFT ({result['irfft_s'] * 1e3:.1f} ms, same run)")


def padded_irfft_s(padded_box_px: int, workers: int | None = None) -> float:
    """Fastest of 2 ``scipy.fft.irfftn`` of a (M, M, M//2+1) complex64 half spectrum to M³ (the floor of M's
    algorithm: one such transform per particle), on all cores (s)."""
    import scipy.fft

    m = padded_box_px
    spectrum = np.zeros((m, m, m // 2 + 1), dtype=np.complex64)
    spectrum[0, 0, 0] = 1
    workers = workers or os.cpu_count() or 1
    return best_of(2, lambda: scipy.fft.irfftn(spectrum, s=(m, m, m), workers=workers))


def best_of(repeats: int, work) -> float:  # noqa: ANN001 (a callable)
    """Fastest of ``repeats`` wall-clock runs of ``work()`` (s)."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return min(times)


def bench_ctf_files(box_px: int, n_particles: int, backend: str) -> float:
    """Seconds per particle for the direct 3D CTF written to one new MRC file per particle."""
    tilt_series, _, particles = make_inputs(box_px, n_particles)
    engine = TiltSeriesEngine.create(tilt_series, None, ExportOptions(4.0, box_px, 0.6 * box_px * 4.0,
                                                                      backend=backend))
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        for result in engine.reconstruct_ctfs(particles):
            write_mrc(Path(folder) / f"ctf{result.index}.mrc", result.ctf, 4.0)
        return (time.perf_counter() - started) / n_particles


def relion_ctf_star(path: Path, tilt_series, position: np.ndarray, box_px: int, n_rows: int | None = None) -> Path:
    """41 rows (the first ``n_rows``): per tilt the projection angles (rot 0, tilt θ, psi = in-plane from the
    .xf), own defocus, dose B."""
    _, height = project_positions_to_tilts(position[None], tilt_series)
    defocus_u, defocus_v = particle_defocus_angst(tilt_series, height)
    psi = np.rad2deg(np.arctan2(tilt_series.xf[:, 1, 0], tilt_series.xf[:, 0, 0]))
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["g1"], "rlnImagePixelSize": [4.0],
                           "rlnImageSize": [box_px], "rlnImageDimensionality": [2], "rlnVoltage": [300.0],
                           "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.07]})
    rows = pd.DataFrame({"rlnImageName": [f"{t + 1}@dummy.mrcs" for t in range(tilt_series.n_tilts)],
                         "rlnAngleRot": 0.0, "rlnAngleTilt": tilt_series.tilt_angles_deg, "rlnAnglePsi": psi,
                         "rlnDefocusU": defocus_u[0], "rlnDefocusV": defocus_v[0],
                         "rlnDefocusAngle": tilt_series.defocus_angle_deg,
                         "rlnCtfBfactor": -4.0 * tilt_series.pre_exposure_e_per_angst2,
                         "rlnCtfScalefactor": np.cos(np.deg2rad(tilt_series.tilt_angles_deg)), "rlnOpticsGroup": 1})
    return write_relion31_particles(path, optics, rows.iloc[:n_rows])


def relion_ctf_check(path: Path, box_px: int) -> str:
    """Describe RELION's 3D CTF: shape, non-zero fraction in 4 < r < box/2 − 4, and in the beam-axis cone."""
    volume, _ = read_mrc(path)
    axis = np.arange(box_px) - box_px // 2
    z, y, x = np.meshgrid(axis, axis, axis, indexing="ij")
    radius = np.sqrt(x * x + y * y + z * z)
    shell = (radius > 4) & (radius < box_px // 2 - 4)
    cone = shell & (np.abs(z) > np.cos(np.deg2rad(20)) * radius)
    nonzero = np.abs(volume) > 1e-3 * np.abs(volume).max()
    return (f"shape {volume.shape}, non-zero {nonzero[shell].mean():.0%} of the shell, {nonzero[cone].mean():.0%} "
            f"of the 20° beam-axis cone (missing wedge), range [{volume.min():.2f}, {volume.max():.2f}]")


def bench_relion(box_px: int, n_particles: int, repeats: int = 3) -> tuple[float, float, str] | None:
    """RELION's way, seconds per particle: per call (``relion_reconstruct --reconstruct_ctf``, STAR written and
    program run per particle, the fastest of ``repeats`` runs, as for the engine) and compute only (the same
    calls minus the same calls on a one-row STAR: start-up, STAR parsing and writing the box³ output are in
    both), and a check of its last output (None without RELION)."""
    program = shutil.which("relion_reconstruct")
    if program is None or n_particles < 1:
        return None
    tilt_series, _, particles = make_inputs(box_px, n_particles)
    with tempfile.TemporaryDirectory() as folder:
        stars = [relion_ctf_star(Path(folder) / f"p{p}.star", tilt_series, particles.positions_angst[p], box_px)
                 for p in range(n_particles)]
        one_row = relion_ctf_star(Path(folder) / "one_row.star", tilt_series, particles.positions_angst[0], box_px, 1)

        def run_all(inputs: list[Path]) -> None:
            for old in Path(folder).glob("ctf*.mrc"):  # every run writes new files, as the first one does
                old.unlink()
            for p, star in enumerate(inputs):
                subprocess.run([program, "--i", str(star), "--o", str(Path(folder) / f"ctf{p}.mrc"),
                                "--reconstruct_ctf", str(box_px), "--angpix", "4"], check=True, capture_output=True,
                               cwd=folder)

        per_call, start_up = [], []
        for _ in range(repeats):  # interleaved
            per_call.append(best_of(1, lambda: run_all(stars)) / n_particles)
            start_up.append(best_of(1, lambda: run_all([one_row] * n_particles)) / n_particles)
        run_all(stars)
        seconds = min(per_call)
        return seconds, max(seconds - min(start_up), 0.0), relion_ctf_check(Path(folder) / f"ctf{n_particles - 1}.mrc",
                                                                            box_px)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--boxes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--particles", type=int, default=48)
    parser.add_argument("--relion-particles", type=int, default=8)
    parser.add_argument("--methods", nargs="+", default=["direct", "padded"], choices=["direct", "padded"],
                        help="3D-CTF methods of the full pipeline (the padded one is slow at boxes > 128)")
    parser.add_argument("--padded-max-box", type=int, default=128,
                        help="the padded 3D-CTF pipeline only up to this box (minutes per particle above)")
    parser.add_argument("--prerotate", action="store_true",
                        help="also the pre-rotated pipeline (direct 3D CTF, and padded where --methods has it)")
    parser.add_argument("--repeats", type=int, default=3, help="passes of each engine (the first one is cold)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument("--padding-factors", type=float, nargs="+",
                        help="only the engine (direct 3D CTF) at these padding factors, ratios to the first one")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of --padding-factors")
    args = parser.parse_args()
    retain_freed_memory()  # as the export worker does
    backends = ["numpy"] + (["cupy"] if cupy_unavailable_reason() is None else [])
    if args.padding_factors:
        run_padding_factors(args, backends)
        return
    figures = []
    for box in args.boxes:
        n_particles = args.particles if box <= 64 else max(8, args.particles // 4)
        methods = [method for method in args.methods if method != "padded" or box <= args.padded_max_box]
        for backend in backends:
            results = {method: bench_engine(box, n_particles, backend, method, args.repeats) for method in methods}
            if args.prerotate:
                results["prerotated"] = bench_engine(box, n_particles, backend, "direct", args.repeats, prerotate=True)
                if "padded" in methods:
                    results["prerotated_padded"] = bench_engine(box, n_particles, backend, "padded", args.repeats,
                                                                prerotate=True)
            files = bench_ctf_files(box, 4 * n_particles, backend)
            for method, result in results.items():
                print(f"box {box} (M {result['M']}, batch {result['batch']}), {backend}, {method}: "
                      f"{result['s_per_particle'] * 1e3:.1f} ms/particle warm ({result['particles_per_s']:.1f} "
                      f"particles/s; first pass {result['first_s_per_particle'] * 1e3:.1f} ms, setup "
                      f"{result['setup_s']:.1f} s) = {result['per_particle_over_irfft']:.2f} × one {result['M']}³ "
                      f"inverse real FFT ({result['irfft_s'] * 1e3:.1f} ms, same run); 3D CTF only "
                      f"{result['ctf_s_per_particle'] * 1e3:.2f} ms/particle")
            if "prerotated" in results and "direct" in results:
                print(f"box {box}, {backend}: pre-rotated / plain = "
                      f"{results['prerotated']['s_per_particle'] / results['direct']['s_per_particle']:.2f}")
            if "prerotated_padded" in results:
                print(f"box {box}, {backend}: pre-rotated, direct 3D CTF / padded 3D CTF = "
                      f"{results['prerotated']['s_per_particle'] / results['prerotated_padded']['s_per_particle']:.2f}")
            print(f"box {box}, {backend}: direct 3D CTF written to new MRC files {files * 1e3:.2f} ms/particle")
            figures.append({"box": box, "backend": backend, "files_s_per_particle": files,
                            **{f"{method}_{key}": value for method, result in results.items()
                               for key, value in result.items()}})
        relion = bench_relion(box, args.relion_particles)
        if relion is not None:
            per_call, compute, check = relion
            ours = {method: results[method]["ctf_s_per_particle"] for method in methods}
            print(f"box {box}: relion_reconstruct --reconstruct_ctf {per_call * 1e3:.1f} ms/particle per call, "
                  f"{compute * 1e3:.1f} ms compute only ({check}); RELION / engine (3D CTF in memory): "
                  + ", ".join(f"{method} {per_call / value:.0f} per call, {compute / value:.1f} compute only"
                              for method, value in ours.items())
                  + f"; direct with files {per_call / files:.1f} per call")
            figures[-1].update(relion_s_per_particle=per_call, relion_compute_s_per_particle=compute)
    if "cupy" not in backends:
        print(f"CuPy not benchmarked: {cupy_unavailable_reason()}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))


def run_padding_factors(args: argparse.Namespace, backends: list[str]) -> None:
    """The ``--padding-factors`` benchmark: per box and backend, print and (``--json``) record each factor."""
    figures = []
    for box in args.boxes:
        n_particles = args.particles if box <= 64 else max(8, args.particles // 4)
        for backend in backends:
            best = bench_padding_factors(box, n_particles, backend, args.padding_factors, args.rounds, args.repeats)
            print_padding_factors(box, backend, best)
            figures += [{"box": box, "backend": backend, "padding_factor": factor, **result}
                        for factor, result in best.items()]
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
