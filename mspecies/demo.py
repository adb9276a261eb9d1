"""The main job on the embedded default dataset (``python -m mspecies demo``; ``scripts/demo.sh``).

It generates the synthetic tilt-series dataset, creates a headless Scipion project, imports
everything into it, checks the imported objects against the ground truth and writes a short report.
Imports pyworkflow: :func:`mspecies.scipion_env.configure_headless_scipion` must have run first.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from .core import synth, synth_check
from .core.geometry import project_positions_to_tilts

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

    manifest = synth.load_manifest(manifest_path)
    with inside_project(project):  # set files are stored relative to the project folder
        checks = _check_against_truth(imported, manifest)
        imported_summary = _describe_imported(imported)
    figure = _write_figure(out_dir, manifest_path, manifest)
    report = _write_report(out_dir, project.getPath(), manifest_path, self_check, checks, timings, imported_summary,
                           figure)
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
    from .convert.particles import coordinates_to_poses
    from .convert.tilt_series import tilt_series_set_to_data

    tilt_series = tilt_series_set_to_data(imported["tilt_series"], imported["ctfs"])
    poses = coordinates_to_poses(imported["coordinates"])
    truth_poses = synth.manifest_particles(manifest)
    worst = {"tilt angle (deg)": 0.0, "xf": 0.0, "defocus U (Å)": 0.0, "dose (e/Å²)": 0.0,
             "position (Å)": 0.0, "projected position (px)": 0.0}
    for ts_id, data in tilt_series.items():
        truth = synth.manifest_tilt_series(manifest, ts_id)
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

    from .formats.mrc import read_mrc

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
                  checks: dict[str, float], timings: dict[str, float], imported: list[str], figure: Path) -> Path:
    lines = ["# mspecies demo report", "",
             f"- Scipion project: `{project_path}`",
             f"- Dataset manifest: `{manifest_path}`",
             f"- Overview figure: `{figure.name}`", "",
             "## Imported into Scipion", ""]
    lines += imported
    lines += ["", "## Imported values vs ground truth (largest deviation)", ""]
    lines += [f"- {name}: {value:.3g}" for name, value in checks.items()]
    lines += ["", "## Dataset self-check", "", "```", json.dumps(self_check, indent=2, default=str), "```",
              "", "## Timings", ""]
    lines += [f"- {name}: {value:.1f}" for name, value in timings.items()]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    (out_dir / "report.json").write_text(json.dumps({"project": project_path, "checks": checks,
                                                     "timings": timings, "self_check": self_check},
                                                    indent=2, default=str))
    return path
