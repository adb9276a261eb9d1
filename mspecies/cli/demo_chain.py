"""The main job on the embedded default dataset (``python -m mspecies demo``; ``scripts/demo.sh``).

It generates the synthetic tilt-series dataset, creates a headless Scipion project, imports
everything into it and checks the imported objects against the ground truth; then runs the particle chain
(:func:`run_export_chain`): a second particle set (the dataset's STAR with particles dropped, jittered by a Gaussian
of a few Å and decoys added) is intersected with the imported coordinates, the selected union is exported from the tilt
series by ``ProtMSpeciesExportSubtomograms``, reconstructed by ``relion_reconstruct --ctf`` (or, without RELION,
by the CTF-weighted average of the export) and compared with the ground truth (FSC, CC). Writes report.md + JSON.
Imports pyworkflow: :func:`mspecies.scipion_env.configure_headless_scipion` must have run first.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd

from mspecies.core.geometry import project_positions_to_tilts
from mspecies.synth import check as synth_check
from mspecies.synth import dataset as synth
from mspecies.synth import manifest as synth_manifest

PROJECT_NAME = "mspecies_demo"


def run_demo(out_dir: Path, *, seed: int = 0, n_tomograms: int = 2, n_particles: int = 50) -> Path:
    """Run the demo chain into ``out_dir``; return the path of ``report.md``."""
    out_dir = Path(out_dir).resolve()
    timings: dict[str, float] = {}

    start = time.perf_counter()
    manifest_path = synth.generate_dataset(out_dir / "dataset", seed=seed, n_tomograms=n_tomograms,
                                           n_particles=n_particles)
    timings["generate dataset (s)"] = time.perf_counter() - start
    start = time.perf_counter()
    self_check = synth_check.self_check(manifest_path)
    timings["self-check (s)"] = time.perf_counter() - start

    start = time.perf_counter()
    project = _fresh_project(PROJECT_NAME)
    from .workflow import import_synthetic_dataset, inside_project

    imported = import_synthetic_dataset(project, manifest_path)
    timings["Scipion import (s)"] = time.perf_counter() - start

    manifest = synth_manifest.load_manifest(manifest_path)
    with inside_project(project):  # set files are stored relative to the project folder
        checks = _check_against_truth(imported, manifest)
        imported_summary = _describe_imported(imported)
    chain = run_export_chain(project, imported, manifest_path, out_dir)
    timings.update(chain["timings"])
    figure = _write_figure(out_dir, manifest_path, manifest)
    report = _write_report(out_dir, project.getPath(), manifest_path, self_check, checks, timings, imported_summary,
                           figure, chain)
    print(f"Scipion project: {project.getPath()}")
    print(f"Report:          {report}")
    return report


def _fresh_project(name: str):  # pyworkflow Project
    from pyworkflow.project import Manager

    manager = Manager()
    if manager.hasProject(name):
        manager.deleteProject(name)
    return manager.createProject(name)


def _check_against_truth(imported: dict, manifest: dict) -> dict[str, float]:
    """Largest deviations of the imported (and converted) objects from the manifest ground truth."""
    from mspecies.convert.particles import coordinates_to_poses
    from mspecies.convert.tilt_series import tilt_series_set_to_data

    tilt_series = tilt_series_set_to_data(imported["tilt_series"], imported["ctfs"])
    poses = coordinates_to_poses(imported["coordinates"])
    truth_poses = synth_manifest.manifest_particles(manifest)
    worst = {"tilt angle (deg)": 0.0, "xf": 0.0, "defocus U (Å)": 0.0, "dose (e/Å²)": 0.0,
             "position (Å)": 0.0, "projected position (px)": 0.0}
    for ts_id, data in tilt_series.items():
        truth = synth_manifest.manifest_tilt_series(manifest, ts_id)
        worst["tilt angle (deg)"] = max(worst["tilt angle (deg)"],
                                        float(np.abs(data.tilt_angles_deg - truth.tilt_angles_deg).max()))
        worst["xf"] = max(worst["xf"], float(np.abs(data.xf - truth.xf).max()))
        worst["defocus U (Å)"] = max(worst["defocus U (Å)"],
                                     float(np.abs(data.defocus_u_angst - truth.defocus_u_angst).max()))
        worst["dose (e/Å²)"] = max(worst["dose (e/Å²)"],
                                   float(np.abs(data.dose_e_per_angst2 - truth.dose_e_per_angst2).max()))
        mine = poses.subset(poses.tomo_names == ts_id)
        true = truth_poses.subset(truth_poses.tomo_names == ts_id)
        order_mine = np.lexsort(mine.positions_angst.T)
        order_true = np.lexsort(true.positions_angst.T)
        worst["position (Å)"] = max(worst["position (Å)"], float(np.abs(
            mine.positions_angst[order_mine] - true.positions_angst[order_true]).max()))
        projected, _ = project_positions_to_tilts(mine.positions_angst[order_mine], data)
        projected_truth, _ = project_positions_to_tilts(true.positions_angst[order_true], truth)
        worst["projected position (px)"] = max(worst["projected position (px)"],
                                               float(np.abs(projected - projected_truth).max()))
    return worst


def _describe_imported(imported: dict) -> list[str]:
    lines = []
    for key, value in imported.items():
        if key.startswith("prot_"):
            lines.append(f"- protocol `{value.getObjLabel()}`: {value.getStatus()}")
        else:
            lines.append(f"- {key}: {type(value).__name__} with {value.getSize()} items")
    return lines


def _write_figure(out_dir: Path, manifest_path: Path, manifest: dict) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mspecies.formats.mrc import read_mrc

    root = manifest_path.parent
    reference, _ = read_mrc(root / manifest["ground_truth_map"])
    first = manifest["tilt_series"][0]
    tomogram, tomo_pixel_angst = read_mrc(root / first["tomogram"])
    centre = np.array(reference.shape) // 2
    fig, axes = plt.subplots(1, 4, figsize=(16, 4))
    for ax, image, title in zip(axes[:3], (reference[centre[0]], reference[:, centre[1]], reference[:, :, centre[2]]),
                                ("ground truth, XY", "ground truth, XZ", "ground truth, YZ")):
        ax.imshow(image, cmap="gray", origin="lower")
        ax.set_title(title)
    slab = tomogram[tomogram.shape[0] // 2 - 3: tomogram.shape[0] // 2 + 4].mean(axis=0)
    axes[3].imshow(slab, cmap="gray", origin="lower")
    particles = [p for p in manifest["particles"] if p["ts_id"] == first["ts_id"]]
    xy = np.array([p["position_angst"][:2] for p in particles]) / tomo_pixel_angst + np.array(slab.shape[::-1]) // 2
    axes[3].scatter(xy[:, 0], xy[:, 1], s=40, facecolors="none", edgecolors="tab:orange")
    axes[3].set_title(f"{first['ts_id']}: tomogram central slab, all particles (xy)")
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    path = out_dir / "demo_overview.png"
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return path


def _write_report(out_dir: Path, project_path: str, manifest_path: Path, self_check: dict,
                  checks: dict[str, float], timings: dict[str, float], imported: list[str], figure: Path,
                  chain: dict) -> Path:
    lines = ["# mspecies demo report", "",
             f"- Scipion project: `{project_path}`",
             f"- Dataset manifest: `{manifest_path}`",
             f"- Overview figure: `{figure.name}`", "",
             "## Imported into Scipion", ""]
    lines += imported
    lines += ["", "## Intersect, export, reconstruct", ""] + chain["report_lines"]
    lines += ["", "## Imported values vs ground truth (largest deviation)", ""]
    lines += [f"- {name}: {value:.3g}" for name, value in checks.items()]
    lines += ["", "## Dataset self-check", "", "```", json.dumps(self_check, indent=2, default=str), "```",
              "", "## Timings", ""]
    lines += [f"- {name}: {value:.1f}" for name, value in timings.items()]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    (out_dir / "report.json").write_text(json.dumps({"project": project_path, "checks": checks,
                                                     "timings": timings, "self_check": self_check,
                                                     "chain": chain["scores"]},
                                                    indent=2, default=str))
    return path


# ----------------------------------------------------------------------------------------------- export chain

JITTER_SD_ANGST = 2.0  # sd of the Gaussian jitter along each axis: distances spread over ~1-7 Å (mean ~3.2 Å)
TOLERANCE_ANGST = 10.0
JITTER_MAX_ANGST = 0.8 * TOLERANCE_ANGST  # jitters beyond (p < 1e-4 each) are drawn again: all stay true pairs
DROP_EVERY = 5  # the derived set lacks every 5th particle
DECOYS_PER_TOMOGRAM = 1


def derive_particle_star(manifest_path: Path, out_path: Path, *, seed: int = 0) -> dict[str, int]:
    """A second particle set from the dataset's ``particles.star`` (RELION 3.1, corner px): every
    ``DROP_EVERY``-th particle dropped, the others jittered (:func:`gaussian_jitter_angst`), and
    ``DECOYS_PER_TOMOGRAM`` decoys per tomogram (a copy of a particle moved by 20 x the tolerance in x, towards
    the centre) added. Returns the counts."""
    from mspecies.formats.star import StarBlock, read_star_text, write_star_text

    manifest = synth_manifest.load_manifest(manifest_path)
    blocks, _ = read_star_text(Path(manifest_path).parent / manifest.get("particles_star", "particles.star"))
    optics, particles = blocks["optics"].table.copy(), blocks["particles"].table.copy()
    pixel = float(optics["rlnImagePixelSize"].iloc[0])
    rng = np.random.default_rng(seed)
    kept = particles[np.arange(len(particles)) % DROP_EVERY != 0].reset_index(drop=True)
    jitter_px = gaussian_jitter_angst(len(kept), rng) / pixel
    for k, axis in enumerate("XYZ"):
        kept[f"rlnCoordinate{axis}"] = kept[f"rlnCoordinate{axis}"].astype(float) + jitter_px[:, k]
    decoys = kept.groupby("rlnTomoName", sort=True).head(DECOYS_PER_TOMOGRAM).copy()
    x = decoys["rlnCoordinateX"].astype(float)
    towards_centre = np.where(x > manifest["tilt_series"][0]["unbinned_tomogram_shape_zyx"][2] / 2, -1.0, 1.0)
    decoys["rlnCoordinateX"] = x + towards_centre * 20 * TOLERANCE_ANGST / pixel
    derived = pd.concat([kept, decoys], ignore_index=True)
    for column in derived.columns:
        if column.startswith(("rlnCoordinate", "rlnAngle")):
            derived[column] = derived[column].astype(float)
    write_star_text(out_path, [StarBlock("optics", optics), StarBlock("particles", derived)],
                    ["mspecies demo: derived particle set (dropped, jittered, decoys)"])
    return {"original": len(particles), "dropped": len(particles) - len(kept), "jittered": len(kept),
            "decoys": len(decoys)}


def gaussian_jitter_angst(n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 3) offsets (Å): Gaussian with ``JITTER_SD_ANGST`` along each axis, so the distances follow a Maxwell
    distribution (a peak near 2.8 Å and a tail) as a real re-picking would, not one spike; an offset longer than
    ``JITTER_MAX_ANGST`` is drawn again, so every jittered particle stays within the tolerance."""
    jitter = rng.normal(scale=JITTER_SD_ANGST, size=(n, 3))
    while (far := np.linalg.norm(jitter, axis=1) > JITTER_MAX_ANGST).any():
        jitter[far] = rng.normal(scale=JITTER_SD_ANGST, size=(int(far.sum()), 3))
    return jitter


def export_parameters(manifest: dict) -> dict[str, float]:
    """Box (px, the dataset's) and particle diameter (Å, ~0.73 of the box: the phantom spans ~60 %)."""
    box = int(manifest["box_px"])
    pixel = float(manifest["tilt_series"][0]["pixel_size_angst"])
    return {"box_px": box, "diameter_angst": round(0.73 * box * pixel), "pixel_size_angst": pixel}


def reconstruct(prot_export, project_path: str, box_px: int) -> tuple[np.ndarray, str]:
    """``relion_reconstruct --ctf`` of the export's merged STAR when RELION is on PATH, else the CTF-weighted
    average of the exported volumes (rotated back by their poses) → (map, method)."""
    from mspecies.formats.mrc import read_mrc

    extra = Path(project_path) / prot_export.getMergedStar()
    relion = shutil.which("relion_reconstruct")
    if relion:
        run = subprocess.run([relion, "--i", extra.name, "--o", "rec.mrc", "--ctf"], cwd=extra.parent,
                             capture_output=True, text=True, timeout=1800)
        if run.returncode != 0:
            raise RuntimeError(f"relion_reconstruct failed: {run.stderr[-2000:]}")
        return read_mrc(extra.parent / "rec.mrc")[0], "relion_reconstruct --ctf"
    from . import qc

    sums = None
    for ts_id in sorted(prot_export.inputParticles.get().getTSIds()):
        average, _ = prot_export.exportAverage(ts_id, maxParticles=10**6)
        sums = average if sums is None else sums + average
    return np.asarray(sums), f"mspecies CTF-weighted average (ε = {qc.WIENER_FRACTION} x mean weight)"


def score_against_truth(volume: np.ndarray, manifest: dict, pixel_size_angst: float) -> dict:
    """FSC (per shell) and CC inside a sphere of the map against the ground truth rendered at the output pixel
    size (no alignment: the synthetic positions are exact)."""
    from mspecies.core.volume import fourier_shell_correlation, normalized_cross_correlation, spherical_mask
    from mspecies.synth.phantom import make_blob_model, render_blob_map

    from . import qc

    box = volume.shape[0]
    model = make_blob_model(int(manifest["box_px"]), float(manifest["tilt_series"][0]["pixel_size_angst"]))
    truth = render_blob_map(model, box, pixel_size_angst)
    fsc = fourier_shell_correlation(volume, truth)
    cc = normalized_cross_correlation(volume, truth, spherical_mask(volume.shape, box // 2 - 2))
    return {"cc": cc, "fsc": fsc.tolist(), "box_px": box, "pixel_size_angst": pixel_size_angst,
            "fsc_0.5_angst": qc.fsc_resolution_angst(fsc, box, pixel_size_angst, 0.5),
            "fsc_0.143_angst": qc.fsc_resolution_angst(fsc, box, pixel_size_angst, 0.143)}


def run_export_chain(project, imported: dict, manifest_path: Path, out_dir: Path, *, n_threads: int = 3) -> dict:
    """Intersect (imported coordinates vs a derived STAR), export the selected union, reconstruct, score.

    Runs inside the project folder (set files are stored relative to it). Returns ``prot_intersect``,
    ``prot_export``, ``scores`` (JSON-able), ``timings`` (s), ``report_lines`` and the figure paths ``fsc_png``,
    ``histogram_png``, ``qc_png``.
    """
    from .workflow import inside_project

    with inside_project(project):
        return _run_export_chain(project, imported, Path(manifest_path).resolve(), Path(out_dir).resolve(),
                                 n_threads)


def _run_export_chain(project, imported: dict, manifest_path: Path, out_dir: Path, n_threads: int) -> dict:
    from mspecies.protocols import ProtMSpeciesExportSubtomograms, ProtMSpeciesIntersect
    from mspecies.protocols.protocol_intersect import SOURCE_STAR

    from . import qc
    from .workflow import launch

    out_dir = Path(out_dir)
    manifest = synth_manifest.load_manifest(manifest_path)
    timings: dict[str, float] = {}
    derived = out_dir / "derived_particles.star"
    counts = derive_particle_star(Path(manifest_path), derived)
    tomo_size = " ".join(str(v) for v in manifest["tilt_series"][0]["unbinned_tomogram_shape_zyx"][::-1])
    start = time.perf_counter()
    prot_intersect = launch(project, ProtMSpeciesIntersect, "intersect imported vs derived STAR",
                            inputOld=imported["coordinates"], newSource=SOURCE_STAR, newStarFile=str(derived),
                            starTomoSize=tomo_size, tolerance=TOLERANCE_ANGST, keepOnlyOld=True, keepInBoth=True,
                            keepOnlyNew=True)
    timings["intersect protocol (s)"] = time.perf_counter() - start
    settings = export_parameters(manifest)
    start = time.perf_counter()
    prot_export = launch(project, ProtMSpeciesExportSubtomograms, "export sub-tomograms",
                         inputParticles=prot_intersect.selected, inputTiltSeries=imported["tilt_series"],
                         inputCtf=imported["ctfs"], boxSize=settings["box_px"],
                         particleDiameter=settings["diameter_angst"], numberOfThreads=n_threads)
    timings["export protocol (s)"] = time.perf_counter() - start
    start = time.perf_counter()
    volume, method = reconstruct(prot_export, project.getPath(), settings["box_px"])
    timings["reconstruction (s)"] = time.perf_counter() - start
    scores = score_against_truth(volume, manifest, settings["pixel_size_angst"])
    scores.update(method=method, counts=counts, intersect=prot_intersect.getOutcomeSummary(),
                  exported=prot_export.SubTomograms.getSize(), export_summary=prot_export.summary())
    figures = _chain_figures(project.getPath(), prot_intersect, prot_export, scores, out_dir, qc)
    lines = _chain_report_lines(scores, figures, prot_intersect, prot_export)
    return {"prot_intersect": prot_intersect, "prot_export": prot_export, "scores": scores, "timings": timings,
            "report_lines": lines, **figures}


def _chain_figures(project_path: str, prot_intersect, prot_export, scores: dict, out_dir: Path, qc) -> dict:  # noqa: ANN001
    """Copy the histogram and QC PNGs next to the report; draw the FSC plot."""
    fsc_png = qc.save_figure(qc.fsc_figure({scores["method"]: np.array(scores["fsc"])}, scores["box_px"],
                                           scores["pixel_size_angst"]), out_dir / "demo_fsc.png")
    histogram = out_dir / "demo_distance_histogram.png"
    shutil.copyfile(Path(project_path) / prot_intersect.getHistogramPath(), histogram)
    first = sorted(prot_export.inputParticles.get().getTSIds())[0]
    qc_png = out_dir / "demo_export_qc.png"
    shutil.copyfile(Path(project_path) / prot_export.getQcPng(first), qc_png)
    return {"fsc_png": fsc_png, "histogram_png": histogram, "qc_png": qc_png}


def _chain_report_lines(scores: dict, figures: dict, prot_intersect, prot_export) -> list[str]:  # noqa: ANN001
    counts = scores["counts"]
    lines = [f"- Derived set: {counts['original']} particles, {counts['dropped']} dropped, {counts['jittered']} "
             f"jittered (Gaussian, sd {JITTER_SD_ANGST:g} Å per axis), {counts['decoys']} decoys added",
             f"- `{prot_intersect.getObjLabel()}` (tolerance {TOLERANCE_ANGST:g} Å, selected = only old + in both "
             f"+ only new):"]
    lines += [f"  - {line}" for line in prot_intersect.summary()]
    lines += [f"- `{prot_export.getObjLabel()}`: {scores['exported']} sub-tomograms"]
    lines += [f"  - {line}" for line in scores["export_summary"]]
    lines += [f"- Reconstruction: {scores['method']}",
              f"- Against the ground truth: CC {scores['cc']:.3f}, FSC 0.5 at {scores['fsc_0.5_angst']:.1f} Å, "
              f"FSC 0.143 at {scores['fsc_0.143_angst']:.1f} Å (Nyquist {2 * scores['pixel_size_angst']:g} Å)",
              f"- Figures: `{figures['fsc_png'].name}` (FSC), `{figures['histogram_png'].name}` (intersect "
              f"distances), `{figures['qc_png'].name}` (export QC)"]
    return lines
