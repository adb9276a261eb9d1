"""Import 3D coordinates with orientations from a RELION 3.1 particle STAR, linked to tomograms by name."""

from __future__ import annotations

import os

import numpy as np
import pyworkflow.protocol.params as params
from pwem.protocols import EMProtocol
from pyworkflow import BETA
from pyworkflow.utils import Message
from tomo.constants import SCIPION, TR_SCIPION
from tomo.objects import Coordinate3D, SetOfCoordinates3D
from tomo.protocols import ProtTomoBase

from mspecies.convert.coordinates import star_pose_matrices, star_positions_to_centred_px
from mspecies.convert.files import read_particle_star
from mspecies.core.types import InputError


class ProtMSpeciesImportCoordinates3D(EMProtocol, ProtTomoBase):
    """Coordinates and orientations from a RELION 3.x particle STAR (rlnTomoName, rlnCoordinateX/Y/Z in px from
    the tomogram corner, rlnAngleRot/Tilt/Psi, optional rlnOrigin*Angst). tomo's own coordinate importer drops
    orientations; this one keeps them (Scipion matrix = transpose of RELION's rotation, see convert/poses.py)."""

    _label = "import 3D coordinates with orientations (RELION STAR)"
    _devStatus = BETA
    _possibleOutputs = {"Coordinates3D": SetOfCoordinates3D}

    def _defineParams(self, form):
        form.addSection(label=Message.LABEL_INPUT)
        form.addParam("inputTomograms", params.PointerParam, pointerClass="SetOfTomograms", important=True,
                      label="Tomograms", help="Tomograms whose tsId equals the STAR's rlnTomoName.")
        form.addParam("starFile", params.FileParam, important=True, label="Particle STAR file",
                      help="RELION 3.0/3.1 particle STAR (coordinates in px from the tomogram corner).")
        form.addParam("starPixelSize", params.FloatParam, allowsNull=True, label="Coordinates pixel size (Å)",
                      help="Pixel size of rlnCoordinateX/Y/Z. Empty: read it from the optics table "
                           "(rlnImagePixelSize / rlnTomoTiltSeriesPixelSize).")
        form.addParam("starTomoSize", params.StringParam, allowsNull=True, label="Tomogram size at the STAR pixel size",
                      help="'nx ny nz' (px) of the tomogram the STAR coordinates refer to (their corner origin; "
                           "centre = N // 2). Empty: tomogram dimensions x tomogram pixel size / STAR pixel size.")
        form.addParam("boxSize", params.IntParam, default=32, validators=[params.Positive],
                      label="Box size (px at the tomogram pixel size)")

    def _insertAllSteps(self):
        self._insertFunctionStep(self.createOutputStep, needsGPU=False)

    # --------------------------- STEPS ---------------------------------------
    def createOutputStep(self):
        table, pixelSize = self._readStar()
        tomoSet = self.inputTomograms.get()
        tomoSr = tomoSet.getSamplingRate()
        tomos = {tomo.getTsId(): tomo.clone() for tomo in tomoSet.iterItems()}
        dims = np.array([tomos[name].getDim() for name in table["rlnTomoName"]], dtype=np.float64)
        if self.starTomoSize.get():
            dims = np.broadcast_to(np.array(self.starTomoSize.get().split(), dtype=np.float64), dims.shape)
            dims = dims * pixelSize / tomoSr
        positions = star_positions_to_centred_px(table, pixelSize, dims, tomoSr)
        matrices = star_pose_matrices(table, tomoSr)
        coords = self._createSetOfCoordinates3D(self.inputTomograms)
        coords.setSamplingRate(tomoSr)
        coords.setBoxSize(self.boxSize.get())
        for name, position, matrix in zip(table["rlnTomoName"], positions, matrices):
            coord = Coordinate3D()
            coord.setVolume(tomos[name])
            coord.setPosition(*position, SCIPION)
            coord.setMatrix(matrix, convention=TR_SCIPION)
            coords.append(coord)
        self._defineOutputs(Coordinates3D=coords)
        self._defineSourceRelation(self.inputTomograms, coords)

    # --------------------------- UTILS ---------------------------------------
    def _readStar(self):
        """(particles table, coordinates pixel size Å); :class:`InputError` naming the file/field."""
        path = self.starFile.get("") or ""
        table, starPixel = read_particle_star(path)
        pixelSize = self.starPixelSize.get() or starPixel
        if not pixelSize:
            raise InputError(f"{path}: no pixel size (optics rlnImagePixelSize / rlnTomoTiltSeriesPixelSize) "
                             "and the form field 'Coordinates pixel size (Å)' is empty")
        table = table.assign(rlnTomoName=table["rlnTomoName"].astype(str))
        return table, float(pixelSize)

    # --------------------------- INFO ----------------------------------------
    def _validate(self):
        tomoSet = self.inputTomograms.get()
        if tomoSet is None:
            return ["Tomograms: no set selected"]
        if not tomoSet.getSamplingRate():
            return ["Tomograms: the set has no pixel size (samplingRate)"]
        try:
            table, _ = self._readStar()
        except (InputError, OSError, ValueError) as exc:
            return [str(exc)]
        unknown = sorted(set(table["rlnTomoName"]) - set(tomoSet.getTSIds()))
        if unknown:
            return [f"{self.starFile.get()}: rlnTomoName values without a tomogram of that tsId: {unknown} "
                    f"(tomograms: {sorted(tomoSet.getTSIds())})"]
        return []

    def _summary(self):
        output = getattr(self, "Coordinates3D", None)
        if output is None:
            return ["Output not ready yet."]
        return [f"Imported *{output.getSize()}* coordinates with orientations from {self.starFile.get()} "
                f"(sampling rate {output.getSamplingRate():.3f} Å/px)"]

    def _methods(self):
        name = os.path.basename(self.starFile.get("") or "")
        return [f"3D coordinates and orientations were imported from the RELION STAR file {name} with mspecies."]
