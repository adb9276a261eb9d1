"""Viewer of the intersect protocol: histogram of matched-pair distances with the tolerance line."""

from __future__ import annotations

import pyworkflow.protocol.params as params
from pyworkflow.gui.plotter import Plotter
from pyworkflow.viewer import DESKTOP_TKINTER, ProtocolViewer

from mspecies.cli.intersect_files import (
    DEFAULT_HISTOGRAM_BINS,
    HISTOGRAM_DISTANCES_TXT,
    SUMMARY_JSON,
    draw_distance_histogram,
    histogram_title,
    read_histogram_distances,
    read_summary_json,
)
from mspecies.protocols.protocol_intersect import ProtMSpeciesIntersect


class MSpeciesIntersectViewer(ProtocolViewer):
    """Distance histogram of an intersect run (distances of the matched pairs at the histogram radius, Å)."""

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
                      help="Distances of the matched pairs; the dashed line is the tolerance. Put the tolerance in "
                           "the valley between the peak of true pairs and the tail of chance neighbours.")

    def _getVisualizeDict(self):
        return {"displayHistogram": self._showHistogram}

    def _showHistogram(self, paramName=None):
        """[Plotter] with the histogram read from the run's ``extra/`` folder."""
        summary = read_summary_json(self.protocol._getExtraPath(SUMMARY_JSON))
        distances = read_histogram_distances(self.protocol._getExtraPath(HISTOGRAM_DISTANCES_TXT))
        plotter = Plotter(windowTitle="Intersect: matched distances", figsize=(6.4, 4.0))
        ax = plotter.createSubPlot("Matched pair distances", "distance (Å)", "pairs")
        draw_distance_histogram(ax, distances, summary["tolerance_angst"], n_bins=int(self.nBins.get()),
                                log_scale=bool(self.logScale.get()),
                                title=histogram_title(summary.get("histogram_radius_angst")))
        return [plotter]
