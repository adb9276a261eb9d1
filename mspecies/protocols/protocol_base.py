"""Shared form and validation for mspecies importers that attach one file per tsId to a tilt-series set."""

from __future__ import annotations

import os

import pyworkflow.protocol.params as params
from pwem.protocols import EMProtocol
from pyworkflow import BETA
from pyworkflow.utils import Message
from tomo.protocols import ProtTomoBase

from mspecies.common.types import InputError

TS_TAG = "{TS}"


class ProtMSpeciesTsFileImportBase(EMProtocol, ProtTomoBase):
    """Base (abstract): a ``SetOfTiltSeries`` plus a folder and a file pattern with the ``{TS}`` tag."""

    _label = None
    _devStatus = BETA
    FILE_KIND = "file"
    DEFAULT_PATTERN = "{TS}/{TS}.txt"

    def _defineParams(self, form):
        form.addSection(label=Message.LABEL_INPUT)
        form.addParam("inputSetOfTiltSeries", params.PointerParam, pointerClass="SetOfTiltSeries",
                      important=True, label="Input tilt-series",
                      help="Raw (non-interpolated) tilt series; files are matched to them by tsId.")
        form.addParam("filesPath", params.PathParam, label="Files directory",
                      help=f"Folder holding the {self.FILE_KIND} files.")
        form.addParam("filesPattern", params.StringParam, default=self.DEFAULT_PATTERN, label="Pattern",
                      help=f"Path of each {self.FILE_KIND} relative to the folder; {TS_TAG} is replaced by the tsId "
                           f"(e.g. {self.DEFAULT_PATTERN}).")

    # --------------------------- UTILS ---------------------------------------
    def _fileFor(self, tsId: str) -> str:
        """Path of the file of one tsId (pattern with ``{TS}`` replaced)."""
        return os.path.join(self.filesPath.get("").strip(), self.filesPattern.get("").strip().replace(TS_TAG, tsId))

    def _inputTiltSeries(self) -> dict:
        """{tsId: TiltSeries clone} of the input set."""
        return {ts.getTsId(): ts.clone() for ts in self.inputSetOfTiltSeries.get().iterItems()}

    def _readFor(self, ts) -> object:
        """Read and check the file of one tilt series (subclasses); raise :class:`InputError`."""
        raise NotImplementedError

    def _validate(self):
        tsSet = self.inputSetOfTiltSeries.get()
        if tsSet is None:
            return ["Input tilt-series: no set selected"]
        errors = []
        if not tsSet.getSamplingRate():
            errors.append("Input tilt-series: the set has no pixel size (samplingRate)")
        if TS_TAG not in (self.filesPattern.get() or ""):
            errors.append(f"Pattern: it must contain {TS_TAG} (replaced by each tsId)")
            return errors
        for ts in self._inputTiltSeries().values():
            try:
                self._readFor(ts)
            except (InputError, OSError, ValueError) as exc:
                errors.append(f"tsId {ts.getTsId()}: {exc}")
        return errors

    def _nTilts(self, ts) -> int:
        return ts.getSize()

    def _checkCount(self, path: str, n_file: int, ts) -> None:
        if n_file != self._nTilts(ts):
            raise InputError(f"{path}: {n_file} tilts in the file, but tilt series {ts.getTsId()} has "
                             f"{self._nTilts(ts)} tilt images")

    def _summary(self):
        output = self._outputSet()
        if output is None:
            return ["Output not ready yet."]
        return [f"Imported {self.FILE_KIND} for *{output.getSize()}* tilt series from "
                f"{os.path.join(self.filesPath.get(''), self.filesPattern.get(''))}"]

    def _outputSet(self):
        name = next(iter(self._possibleOutputs))
        return getattr(self, name, None)
