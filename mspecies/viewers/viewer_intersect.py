"""Viewer of the intersect protocol: the distance histogram (and, with orientations, the angular-distance histogram)
with the tolerance lines."""

from __future__ import annotations

import os

import pyworkflow.protocol.params as params
from pyworkflow.gui.plotter import Plotter
from pyworkflow.viewer import DESKTOP_TKINTER, ProtocolViewer

from mspecies.cli.intersect_files import (
    HISTOGRAM_ANGLES_TXT,
    HISTOGRAM_DISTANCES_TXT,
    SUMMARY_JSON,
    read_histogram_distances,
    read_summary_json,
)
from mspecies.cli.intersect_plots import (
    DEFAULT_HISTOGRAM_BINS,
    draw_angle_histogram,
    draw_distance_histogram,
    histogram_title,
)
from mspecies.common.types import InputError
from mspecies.protocols.protocol_intersect import ProtMSpeciesIntersect


class MSpeciesIntersectViewer(ProtocolViewer):
    """Histograms of an intersect run: each old particle's distance to its nearest new particle (Å), and the angular
    distance of those nearest pairs within the tolerance (deg, over the symmetry)."""

    _label = "intersect distance histogram"
    _targets = [ProtMSpeciesIntersect]
    _environments = [DESKTOP_TKINTER]

    def _defineParams(self, form):
        form.addSection(label="Visualization")
        form.addParam("nBins", params.IntParam, default=DEFAULT_HISTOGRAM_BINS, validators=[params.Positive],
                      label="Histogram bins",
                      help="Number of bins between 0 and the largest matched distance (at least just past the "
                           "tolerance).")
        form.addParam("logScale", params.BooleanParam, default=False, label="Log scale (counts)",
                      help="Logarithmic count axis: shows the few chance neighbours in the tail next to the peak "
                           "of true pairs.")
        form.addParam("displayHistogram", params.LabelParam, label="Show the distance histogram",
                      help="For every old particle, the distance to its nearest new particle (same tomogram and "
                           "group); the dashed line is the tolerance. True pairs make a peak at small distances, "
                           "unrelated neighbours a tail from about the particle spacing: put the tolerance in the "
                           "valley between them. M-compatible mode: M's histogram (distances of all assigned "
                           "pairs).")
        form.addParam("displayAngles", params.LabelParam, label="Show the angular-distance histogram",
                      help="Angular distance (smallest over the symmetry) of the nearest pairs within the distance "
                           "tolerance; the dashed line is the angular tolerance. Same particles picked twice sit "
                           "near 0 degrees; unrelated neighbours spread over all angles.")

    def _getVisualizeDict(self):
        return {"displayHistogram": self._showHistogram, "displayAngles": self._showAngles}

    def _showHistogram(self, paramName=None):
        """[Plotter] with the distance histogram read from the run's ``extra/`` folder."""
        summary = read_summary_json(self.protocol._getExtraPath(SUMMARY_JSON))
        distances = read_histogram_distances(self.protocol._getExtraPath(HISTOGRAM_DISTANCES_TXT))
        plotter = Plotter(windowTitle="Intersect: distances", figsize=(6.4, 4.0))
        ax = plotter.createSubPlot("Distances", "distance (Å)", "pairs")
        draw_distance_histogram(ax, distances, summary["tolerance_angst"], n_bins=int(self.nBins.get()),
                                log_scale=bool(self.logScale.get()),
                                title=histogram_title(summary.get("histogram_radius_angst"),
                                                      summary.get("mode", "gated")))
        return [plotter]

    def _showAngles(self, paramName=None):
        """[Plotter] with the angular-distance histogram (only when both sets had orientations)."""
        summary = read_summary_json(self.protocol._getExtraPath(SUMMARY_JSON))
        path = self.protocol._getExtraPath(HISTOGRAM_ANGLES_TXT)
        if not os.path.isfile(path):
            raise InputError("No angular distances: the run had no orientations, or used the M-compatible mode.")
        plotter = Plotter(windowTitle="Intersect: angular distances", figsize=(6.4, 4.0))
        ax = plotter.createSubPlot("Angular distances", "angle (deg)", "pairs")
        draw_angle_histogram(ax, read_histogram_distances(path), summary.get("angular_tolerance_deg"),
                             summary.get("symmetry", "C1"), n_bins=int(self.nBins.get()),
                             log_scale=bool(self.logScale.get()))
        return [plotter]
