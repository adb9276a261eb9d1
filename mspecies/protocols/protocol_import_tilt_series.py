"""Import raw tilt series from SerialEM ``.mdoc`` + stack, one tilt series per mdoc.

Why not tomo's ``ProtImportTs``: on this stack (pyworkflow 3.11.7, tomo 3.12.4, SQLite 3.40) it hangs in its
final ``_updateOutputSet`` commit (two SQLite connections to ``TiltSeries.sqlite``, one holding a read lock),
and its mdoc path assigns stack indices by tilt-angle rank. This importer keeps ``ZValue`` as the stack index.
"""

from __future__ import annotations

import glob
import os

import pyworkflow.protocol.params as params
from pwem.objects import Transform
from pwem.protocols import EMProtocol
from pyworkflow import BETA
from pyworkflow.utils import Message
from tomo.objects import SetOfTiltSeries, TiltImage, TiltSeries, TomoAcquisition
from tomo.protocols import ProtTomoBase

from mspecies.common.types import InputError
from mspecies.formats.serialem import read_mdoc_tilts

TS_TAG = "{TS}"


class ProtMSpeciesImportTiltSeries(EMProtocol, ProtTomoBase):
    """Raw tilt series from SerialEM mdoc files: tilt angle, stack index (ZValue), acquisition order (DateTime,
    stored 1-based as tomo does) and accumulated dose per tilt image; pixel size and voltage from the form or
    the mdoc."""

    _label = "import tilt-series (mdoc)"
    _devStatus = BETA
    _possibleOutputs = {"TiltSeries": SetOfTiltSeries}

    def _defineParams(self, form):
        form.addSection(label=Message.LABEL_INPUT)
        form.addParam("filesPath", params.PathParam, label="Files directory",
                      help="Folder holding the SerialEM .mdoc files (the tilt stacks they describe are next to "
                           "them); the pattern below is relative to it.")
        form.addParam("filesPattern", params.StringParam, default="{TS}/{TS}.mrc.mdoc", label="mdoc pattern",
                      help="Relative to the folder; {TS} marks the tsId (used as a glob '*').")
        form.addParam("samplingRate", params.FloatParam, allowsNull=True, label="Pixel size (Å/px)",
                      help="Empty: PixelSpacing of the mdoc.")
        form.addParam("voltage", params.FloatParam, allowsNull=True, label="Voltage (kV)",
                      help="Empty: Voltage of the mdoc.")
        form.addParam("sphericalAberration", params.FloatParam, default=2.7, label="Spherical aberration (mm)",
                      help="Cs of the objective lens (mm; the mdoc does not carry it), used by the CTF.")
        form.addParam("amplitudeContrast", params.FloatParam, default=0.1, label="Amplitude contrast",
                      help="Fraction of amplitude contrast (0 to 1; typically 0.07 to 0.1 for cryo samples), "
                           "used by the CTF.")

    def _insertAllSteps(self):
        self._insertFunctionStep(self.createOutputStep, needsGPU=False)

    # --------------------------- UTILS ---------------------------------------
    def _matches(self) -> dict[str, str]:
        """{tsId: mdoc path} from the pattern."""
        root, pattern = self.filesPath.get("").strip(), self.filesPattern.get("").strip()
        prefix, _, suffix = os.path.join(root, pattern).partition(TS_TAG)
        found = {}
        for path in sorted(glob.glob(os.path.join(root, pattern.replace(TS_TAG, "*")))):
            ts_id = path[len(prefix):len(path) - len(suffix.split(TS_TAG)[-1])].split(os.sep)[0]
            found[ts_id] = path
        return found

    def _readAll(self) -> dict[str, dict]:
        """{tsId: mdoc tilt metadata} with pixel size and voltage resolved; InputError naming file/field."""
        matches = self._matches()
        if not matches:
            raise InputError(f"no mdoc file matches {os.path.join(self.filesPath.get(''), self.filesPattern.get(''))}")
        result = {}
        for ts_id, path in matches.items():
            tilts = read_mdoc_tilts(path)
            tilts["pixel_size_angst"] = self.samplingRate.get() or tilts["pixel_size_angst"]
            tilts["voltage_kv"] = self.voltage.get() or tilts["voltage_kv"]
            for field, label in (("pixel_size_angst", "PixelSpacing"), ("voltage_kv", "Voltage"),
                                 ("accumulated_dose_e_per_angst2", "ExposureDose")):
                if tilts[field] is None:
                    raise InputError(f"{path}: no {label} in the mdoc and the form field is empty")
            if not os.path.isfile(tilts["stack"]):
                raise InputError(f"{path}: stack not found: {tilts['stack']}")
            result[ts_id] = tilts
        return result

    # --------------------------- STEPS ---------------------------------------
    def createOutputStep(self):
        data = self._readAll()
        first = next(iter(data.values()))
        outSet = self._createSetOfTiltSeries()
        outSet.setSamplingRate(first["pixel_size_angst"])
        outSet.setAcquisition(self._acquisition(first["voltage_kv"]))
        for ts_id, tilts in data.items():
            self._appendSeries(outSet, ts_id, tilts)
        self._defineOutputs(TiltSeries=outSet)

    def _acquisition(self, voltage_kv: float, **doses) -> TomoAcquisition:
        return TomoAcquisition(voltage=voltage_kv, sphericalAberration=self.sphericalAberration.get(),
                               amplitudeContrast=self.amplitudeContrast.get(), magnification=50000, **doses)

    def _appendSeries(self, outSet, ts_id: str, tilts: dict) -> None:
        stack = os.path.abspath(tilts["stack"])
        link = self._getExtraPath(os.path.basename(stack))
        if not os.path.exists(link):
            os.symlink(stack, link)
        ts = TiltSeries(tsId=ts_id)
        ts.setSamplingRate(tilts["pixel_size_angst"])
        ts.setAcquisition(self._acquisition(tilts["voltage_kv"], accumDose=float(max(tilts[
            "accumulated_dose_e_per_angst2"]))))
        outSet.append(ts)
        for index, angle in enumerate(tilts["tilt_angles_deg"]):
            ti = TiltImage(location=(index + 1, link), acquisitionOrder=int(tilts["acquisition_order"][index]) + 1,
                           tiltAngle=float(angle))
            accumulated, own = (float(tilts[k][index]) for k in ("accumulated_dose_e_per_angst2",
                                                                   "dose_e_per_angst2"))
            ti.setAcquisition(self._acquisition(tilts["voltage_kv"], accumDose=accumulated, dosePerFrame=own,
                                                doseInitial=accumulated - own))
            ti.setSamplingRate(tilts["pixel_size_angst"])
            ts.append(ti)
        dims = ts.getFirstItem().getDim()
        ts.setOrigin(Transform())
        ts.getOrigin().setShifts(-dims[0] / 2 * tilts["pixel_size_angst"], -dims[1] / 2 * tilts["pixel_size_angst"], 0)
        ts.setAnglesCount(ts.getSize())
        outSet.update(ts)
        outSet.write()

    # --------------------------- INFO ----------------------------------------
    def _validate(self):
        try:
            self._readAll()
        except (InputError, OSError, ValueError, KeyError) as exc:
            return [str(exc)]
        return []

    def _summary(self):
        output = getattr(self, "TiltSeries", None)
        if output is None:
            return ["Output not ready yet."]
        return [f"Imported *{output.getSize()}* tilt series (sampling rate {output.getSamplingRate():.3f} Å/px)."]

    def _methods(self):
        return ["Raw tilt series were imported from SerialEM mdoc files and their stacks with mspecies."]
