"""Import per-tilt CTF (IMOD ctfphaseflip ``.defocus`` or CTFFIND4 ``.txt``) as a ``SetOfCTFTomoSeries``.

scipion-em-tomo's ``ProtImportTsCTF`` delegates the parsing to the imod / cistem plugins
(``Domain.importFromPlugin('imod.convert', 'ImodCtfParser')``); this importer needs neither.
"""

from __future__ import annotations

import pyworkflow.protocol.params as params
from tomo.objects import CTFTomo, CTFTomoSeries, SetOfCTFTomoSeries

from mspecies.convert.files import DEFOCUS_FORMATS, read_defocus_array

from .protocol_base import ProtMSpeciesTsFileImportBase


class ProtMSpeciesImportTsCtf(ProtMSpeciesTsFileImportBase):
    """Per-tilt defocus U/V (Å) and astigmatism angle (degrees, CTFFIND convention) read from one file per tilt
    series; rows are matched to tilt images by stack index and stored with their acquisition order."""

    _label = "import tilt-series CTF (IMOD defocus / CTFFIND)"
    _possibleOutputs = {"CTFs": SetOfCTFTomoSeries}
    FILE_KIND = "defocus"
    DEFAULT_PATTERN = "{TS}/{TS}.defocus"

    def _defineParams(self, form):
        super()._defineParams(form)
        form.addParam("fileFormat", params.EnumParam, choices=["IMOD ctfphaseflip .defocus", "CTFFIND4 .txt"],
                      default=0, display=params.EnumParam.DISPLAY_HLIST, label="File format",
                      help="IMOD .defocus (version 2 or 3, with astigmatism) or the CTFFIND4 output text file.")

    def _insertAllSteps(self):
        self._insertFunctionStep(self.createOutputStep, needsGPU=False)

    def _readFor(self, ts):
        return read_defocus_array(self._fileFor(ts.getTsId()), DEFOCUS_FORMATS[self.fileFormat.get()],
                                  ts.getSize())

    def createOutputStep(self):
        outSet = SetOfCTFTomoSeries.create(self._getPath(), template="CTFmodels%s.sqlite")
        outSet.setSetOfTiltSeries(self.inputSetOfTiltSeries)
        for ts in self._inputTiltSeries().values():
            self._appendSeries(outSet, ts, self._readFor(ts))
        self._defineOutputs(CTFs=outSet)
        self._defineSourceRelation(self.inputSetOfTiltSeries, outSet)

    @staticmethod
    def _appendSeries(outSet, ts, table):
        """One CTFTomoSeries; CTFTomo of stack index i (1-based) = table[i-1] (U Å, V Å, angle deg)."""
        series = CTFTomoSeries()
        series.copyInfo(ts)
        series.setTiltSeries(ts)
        series.setTsId(ts.getTsId())
        outSet.append(series)
        for ti in sorted((ti.clone() for ti in ts.iterItems()), key=lambda t: t.getIndex()):
            u, v, angle = (float(x) for x in table[ti.getIndex() - 1])
            ctf = CTFTomo(index=ti.getIndex(), acqOrder=ti.getAcquisitionOrder())
            ctf.setDefocusU(u)
            ctf.setDefocusV(v)
            ctf.setDefocusAngle(angle)
            ctf.setEnabled(ti.isEnabled())
            series.append(ctf)
        outSet.update(series)
        outSet.write()

    def _methods(self):
        return [f"Per-tilt CTF parameters were imported with mspecies from "
                f"{DEFOCUS_FORMATS[self.fileFormat.get()]} files (no re-estimation)."]
