"""Viewer of the sub-tomogram export: per tilt series, central slices and the rotationally averaged power spectrum
of the CTF-weighted average of its exported sub-tomograms (in the reference frame), and central sections of one
3D CTF (plots from :mod:`mspecies.cli.qc`; the output step also writes them as ``extra/qc_<tsId>.png``)."""

from __future__ import annotations

import pyworkflow.protocol.params as params
from pyworkflow.gui.plotter import Plotter
from pyworkflow.viewer import DESKTOP_TKINTER, ProtocolViewer

from mspecies.cli import qc
from mspecies.protocols.protocol_export_subtomograms import ProtMSpeciesExportSubtomograms


class MSpeciesExportViewer(ProtocolViewer):
    """QC of an export run, one tilt series at a time."""

    _label = "export QC viewer"
    _targets = [ProtMSpeciesExportSubtomograms]
    _environments = [DESKTOP_TKINTER]

    def _defineParams(self, form):
        form.addSection(label="Visualization")
        form.addParam("tsIndex", params.EnumParam, choices=self.protocol._exportTsIds(), default=0,
                      display=params.EnumParam.DISPLAY_COMBO, label="Tilt series (tsId)",
                      help="The exported tilt series whose sub-tomograms are averaged (the first by default).")
        form.addParam("maxParticles", params.IntParam, default=200, validators=[params.Positive],
                      label="Particles to average (at most)",
                      help="The average uses the first N exported particles of the tilt series (all if fewer): "
                           "enough to judge the contrast and the 3D CTF, quick to read.")
        form.addParam("displayQc", params.LabelParam, label="Show the average and a 3D CTF",
                      help="Central XY/XZ/YZ slices and the radial power spectrum of the CTF-weighted average of "
                           "the tilt series' sub-tomograms (rotated back by their poses unless pre-rotated), and "
                           "central sections of its first 3D CTF.")

    def _getVisualizeDict(self):
        return {"displayQc": self._showQc}

    def _tsIdToShow(self) -> str:
        return self.protocol._exportTsIds()[int(self.tsIndex.get())]

    def _showQc(self, paramName=None):
        """[Plotter] with the QC figure of the chosen tilt series."""
        tsId = self._tsIdToShow()
        average, ctf = self.protocol.exportAverage(tsId, maxParticles=int(self.maxParticles.get()))
        plotter = Plotter(windowTitle=f"Export QC: {tsId}", figsize=(16, 8))
        qc.draw_volume_qc(plotter.getFigure(), average, self.protocol._outputPixel(), ctf, title=tsId)
        return [plotter]
