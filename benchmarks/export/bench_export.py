"""Export speed: particles/s of the engine (NumPy; CuPy where a GPU exists) and 3D CTFs vs RELION's way.

Usage: ``python benchmarks/export/bench_export.py [--boxes 64 128] [--particles 48] [--relion-particles 8]``

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
from mspecies.core.reconstruct import ExportOptions, TiltSeriesEngine
from mspecies.formats.mrc import read_mrc, write_mrc
from mspecies.formats.star import write_relion31_particles
from mspecies.synth.dataset import SynthParameters, make_tilt_series, random_euler_angles


def make_inputs(box_px: int, n_particles: int, seed: int = 0):
    params = SynthParameters(box_px=box_px, image_shape_yx=(1024, 1024), n_tilts=41)
    rng = np.random.default_rng(seed)
    tilt_series = make_tilt_series(params, "TS", rng)
    stack = rng.normal(size=(41, 1024, 1024)).astype(np.float32)
    positions = rng.uniform(-1200, 1200, (n_particles, 3)) * [1, 1, 0.2]
    particles = ParticlePoses(positions, random_euler_angles(n_particles, rng), np.array(["TS"] * n_particles, object))
    return tilt_series, stack, particles


def bench_engine(box_px: int, n_particles: int, backend: str, ctf_method: str) -> dict[str, float]:
    """Particles/s of the full pipeline and seconds per particle of the 3D CTF alone (setup excluded)."""
    tilt_series, stack, particles = make_inputs(box_px, n_particles)
    options = ExportOptions(4.0, box_px, 0.6 * box_px * 4.0, backend=backend, ctf_method=ctf_method)
    started = time.perf_counter()
    engine = TiltSeriesEngine.create(tilt_series, stack, options)
    setup = time.perf_counter() - started
    started = time.perf_counter()
    count = sum(1 for _ in engine.reconstruct(particles))
    seconds = time.perf_counter() - started
    ctf_engine = TiltSeriesEngine.create(tilt_series, None, options)
    ctf_seconds = best_of(3, lambda: sum(1 for _ in ctf_engine.reconstruct_ctfs(particles))) / n_particles
    return {"box": box_px, "M": engine.padded_box_px, "setup_s": setup, "particles_per_s": count / seconds,
            "s_per_particle": seconds / count, "ctf_s_per_particle": ctf_seconds}


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


def relion_ctf_star(path: Path, tilt_series, position: np.ndarray, box_px: int) -> Path:
    """41 rows: per tilt the projection angles (rot 0, tilt θ, psi = in-plane from the .xf), own defocus, dose B."""
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
    return write_relion31_particles(path, optics, rows)


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


def bench_relion(box_px: int, n_particles: int, repeats: int = 3) -> tuple[float, str] | None:
    """Seconds per particle for ``relion_reconstruct --reconstruct_ctf`` (STAR written and program run per
    particle; the fastest of ``repeats`` runs, as for the engine) and a check of its last output (None without
    RELION)."""
    program = shutil.which("relion_reconstruct")
    if program is None or n_particles < 1:
        return None
    tilt_series, _, particles = make_inputs(box_px, n_particles)
    with tempfile.TemporaryDirectory() as folder:
        def run_all() -> None:
            for old in Path(folder).glob("ctf*.mrc"):  # every run writes new files, as the first one does
                old.unlink()
            for p in range(n_particles):
                star = relion_ctf_star(Path(folder) / f"p{p}.star", tilt_series, particles.positions_angst[p], box_px)
                subprocess.run([program, "--i", str(star), "--o", str(Path(folder) / f"ctf{p}.mrc"),
                                "--reconstruct_ctf", str(box_px), "--angpix", "4"], check=True, capture_output=True,
                               cwd=folder)

        seconds = best_of(repeats, run_all) / n_particles
        return seconds, relion_ctf_check(Path(folder) / f"ctf{n_particles - 1}.mrc", box_px)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--boxes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--particles", type=int, default=48)
    parser.add_argument("--relion-particles", type=int, default=8)
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()
    retain_freed_memory()  # as the export worker does
    backends = ["numpy"] + (["cupy"] if cupy_unavailable_reason() is None else [])
    figures = []
    for box in args.boxes:
        n_particles = args.particles if box <= 64 else max(8, args.particles // 4)
        for backend in backends:
            results = {method: bench_engine(box, n_particles, backend, method) for method in ("direct", "padded")}
            files = bench_ctf_files(box, 4 * n_particles, backend)
            for method, result in results.items():
                print(f"box {box} (M {result['M']}), {backend}, {method} 3D CTF: {result['particles_per_s']:.1f} "
                      f"particles/s (sub-tomogram + 3D CTF; setup {result['setup_s']:.1f} s), 3D CTF only "
                      f"{result['ctf_s_per_particle'] * 1e3:.2f} ms/particle")
            direct, padded = results["direct"]["ctf_s_per_particle"], results["padded"]["ctf_s_per_particle"]
            print(f"box {box}, {backend}: direct 3D CTF written to new MRC files {files * 1e3:.2f} ms/particle; "
                  f"padded / direct (in memory) = {padded / direct:.1f}")
            figures.append({"box": box, "backend": backend, "files_s_per_particle": files,
                            **{f"{method}_{key}": value for method, result in results.items()
                               for key, value in result.items()}})
        relion = bench_relion(box, args.relion_particles)
        if relion is not None:
            seconds, check = relion
            print(f"box {box}: relion_reconstruct --reconstruct_ctf {seconds * 1e3:.1f} ms/particle ({check}); "
                  f"RELION / engine: direct in memory {seconds / direct:.0f}, direct with files {seconds / files:.1f}, "
                  f"padded in memory {seconds / padded:.1f}")
            figures[-1]["relion_s_per_particle"] = seconds
    if "cupy" not in backends:
        print(f"CuPy not benchmarked: {cupy_unavailable_reason()}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
