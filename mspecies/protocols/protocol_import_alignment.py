"""Import IMOD ``.xf`` (or AreTomo ``.aln``) alignment transforms onto an existing (raw) ``SetOfTiltSeries``."""

from __future__ import annotations

import numpy as np
from pwem.objects import Transform
from tomo.objects import SetOfTiltSeries, TiltSeries

from mspecies.convert.files import read_xf_array

from .protocol_base import ProtMSpeciesTsFileImportBase


class ProtMSpeciesImportTsAlignment(ProtMSpeciesTsFileImportBase):
    """Attach IMOD ``.xf`` transforms (aligned = A·raw + d, centred px; one row per stack image) to each tilt
    image of a raw tilt series; an AreTomo ``.aln`` (file name ending ``.aln``) is converted as AreTomo's own
    ``-OutImod`` does. The pixels are not touched: the output is non-interpolated."""

    _label = "import tilt-series alignment (IMOD xf)"
    _possibleOutputs = {"TiltSeries": SetOfTiltSeries}
    FILE_KIND = "IMOD .xf"
    DEFAULT_PATTERN = "{TS}/{TS}.xf"

    def _insertAllSteps(self):
        self._insertFunctionStep(self.createOutputStep, needsGPU=False)

    def _readFor(self, ts):
        path = self._fileFor(ts.getTsId())
        xf = read_xf_array(path)
        self._checkCount(path, xf.shape[0], ts)
        return xf

    def createOutputStep(self):
        inSet = self.inputSetOfTiltSeries.get()
        outSet = self._createSetOfTiltSeries()
        outSet.copyInfo(inSet)
        for ts in self._inputTiltSeries().values():
            self._appendAligned(outSet, ts, self._readFor(ts))
        outSet.setAlignment2D()
        self._defineOutputs(TiltSeries=outSet)
        self._defineSourceRelation(self.inputSetOfTiltSeries, outSet)

    @staticmethod
    def _appendAligned(outSet, ts, xf):
        """Copy one tilt series with the transform of stack index i (1-based) = xf[i-1]."""
        newTs = TiltSeries(tsId=ts.getTsId())
        newTs.copyInfo(ts)
        outSet.append(newTs)
        for ti in sorted((ti.clone() for ti in ts.iterItems()), key=lambda t: t.getIndex()):
            matrix = np.vstack([xf[ti.getIndex() - 1], [0.0, 0.0, 1.0]])  # 3x3 [[A | d], [0 0 1]], px
            ti.setTransform(Transform(matrix=matrix))
            newTs.append(ti)
        newTs.setDim(ts.getDim())
        newTs.setInterpolated(False)
        newTs.setAlignment2D()
        newTs.write()
        outSet.update(newTs)
        outSet.write()

    def _methods(self):
        return ["The 2D alignment of each tilt image (IMOD .xf transform) was imported with mspecies, "
                "without interpolating the images."]
