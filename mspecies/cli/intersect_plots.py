"""Histograms of an intersection (no Scipion imports; used by the CLI, the protocol's match step and its viewer).

Two histograms help choose the two tolerances (what they show is defined in
:func:`mspecies.core.assignment.histogram_distances` and :func:`mspecies.cli.intersect_files.intersect_poses`):

* distances (Å): each old particle's distance to its nearest new particle of the same group, up to the histogram
  radius (M-compatible mode: M's histogram, the distances of the dense assignment);
* angular distances (deg, smallest over the symmetry): the same nearest pairs, those within the distance
  tolerance; drawn only when both sets have orientations.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mspecies.common.types import InputError

DEFAULT_HISTOGRAM_BINS = 50
HISTOGRAM_PNG = "distance_histogram.png"
ANGLE_HISTOGRAM_PNG = "angle_histogram.png"


def draw_histogram(ax, values: np.ndarray, tolerance: float | None, *, unit: str, xlabel: str, title: str,
                   n_bins: int = DEFAULT_HISTOGRAM_BINS, log_scale: bool = False, upper: float | None = None) -> None:
    """Histogram of ``values`` (NaN ignored) into a matplotlib Axes, the tolerance as a dashed vertical line."""
    if n_bins < 1:
        raise InputError(f"histogram bins must be >= 1, got {n_bins}")
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if upper is None:
        upper = max(1.0, float(values.max()) if values.size else 1.0,
                    1.05 * float(tolerance) if tolerance is not None else 1.0)
    ax.hist(values, bins=n_bins, range=(0.0, upper), color="#4a7ab5", edgecolor="white", linewidth=0.3,
            log=log_scale, label=f"{values.size} pair(s)")
    if tolerance is not None:
        ax.axvline(float(tolerance), color="#c0392b", linestyle="--", linewidth=1.5,
                   label=f"tolerance {float(tolerance):g} {unit}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("pairs (log scale)" if log_scale else "pairs")
    ax.set_title(title)
    ax.set_xlim(0.0, upper)
    ax.legend(loc="upper right", fontsize="small")


def draw_distance_histogram(ax, distances_angst: np.ndarray, tolerance_angst: float, *,
                            n_bins: int = DEFAULT_HISTOGRAM_BINS, log_scale: bool = False,
                            title: str = "Nearest-neighbour distances") -> None:
    """Histogram of the histogram distances (Å) with the distance tolerance."""
    draw_histogram(ax, distances_angst, tolerance_angst, unit="Å", xlabel="distance to the nearest new particle (Å)",
                   title=title, n_bins=n_bins, log_scale=log_scale)


def draw_angle_histogram(ax, angles_deg: np.ndarray, angular_tolerance_deg: float | None, symmetry: str, *,
                         n_bins: int = DEFAULT_HISTOGRAM_BINS, log_scale: bool = False) -> None:
    """Histogram of angular distances (deg, over ``symmetry``) on [0, 180], with the angular tolerance if any."""
    draw_histogram(ax, angles_deg, angular_tolerance_deg, unit="°",
                   xlabel=f"angular distance to that particle ({symmetry}, deg)",
                   title="Angular distances (nearest pairs within the distance tolerance)", n_bins=n_bins,
                   log_scale=log_scale, upper=180.0)


def histogram_title(histogram_radius_angst: float | None, mode: str = "gated") -> str:
    """Plot title naming what the distances are and the radius (Å) they were computed with."""
    if mode == "m_compatible":
        if histogram_radius_angst is None or not np.isfinite(histogram_radius_angst):
            return "Matched pair distances (M: all assigned pairs)"
        return f"Matched pair distances (M: assignment within {histogram_radius_angst:g} Å)"
    if histogram_radius_angst is None:
        return "Nearest-neighbour distances"
    other = "other" if mode == "deduplicate" else "new"
    return f"Distance to the nearest {other} particle (up to {histogram_radius_angst:g} Å)"


def save_histogram_png(path: str | Path, draw, **kwargs) -> Path:  # noqa: ANN001 (a draw_* function)
    """Write the histogram drawn by ``draw(ax, **kwargs)`` as a PNG (Agg canvas, no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 4.0), dpi=100)
    FigureCanvasAgg(figure)
    draw(figure.add_subplot(1, 1, 1), **kwargs)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path)
    return path
