"""Export a SetOfSubTomograms or SetOfCoordinates3D to a particle STAR (RELION 3.0/3.1/4/5 or M species)."""

from __future__ import annotations

import os

import pyworkflow.protocol.params as params
from pwem.protocols import EMProtocol
from pyworkflow import BETA
from pyworkflow.object import Integer, String
from pyworkflow.utils import Message
from tomo.protocols import ProtTomoBase

from mspecies.common.types import InputError, Microscope
from mspecies.convert.star_sets import TomogramInfo, export_set_to_star, parse_tomo_size
from mspecies.formats.star_dialects import CORNER_DIALECTS, Dialect

EXPORT_DIALECTS = (Dialect.RELION30, Dialect.RELION31, Dialect.RELION4, Dialect.RELION5, Dialect.M_SPECIES)
EXPORT_LABELS = ["RELION 3.0", "RELION 3.1", "RELION 4", "RELION 5", "Warp/M (species table)"]
STAR_NAME = "particles.star"


class ProtMSpeciesExportParticlesStar(EMProtocol, ProtTomoBase):
    """Write sub-tomograms (image, 3D CTF, pose) or coordinates (position, orientation) as a particle STAR.

    Coordinates are written in px at the chosen pixel size (RELION 3/4 and M: from the tomogram corner, using the
    tomograms' sizes; RELION 5: centred Å); poses through convert/poses.py; columns carried from an imported STAR
    are written back. RELION 3.0/3.1 files get the microscope values (voltage, Cs, amplitude contrast) from the
    acquisition. The file is ``extra/particles.star`` (not a Scipion object: see the summary for its path).
    """

    _label = "export particles to STAR"
    _devStatus = BETA

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.starPath = String()
        self.nParticles = Integer()

    def _defineParams(self, form):
        form.addSection(label=Message.LABEL_INPUT)
        form.addParam("inputParticles", params.PointerParam, pointerClass="SetOfSubTomograms, SetOfCoordinates3D",
                      important=True, label="Particles", help="Sub-tomograms or 3D coordinates to write.")
        form.addParam("outputDialect", params.EnumParam, choices=EXPORT_LABELS, default=1,
                      display=params.EnumParam.DISPLAY_COMBO, label="STAR dialect",
                      help="RELION 3.1 (default): optics table + rlnOrigin*Angst. RELION 3.0: one pixel size, "
                           "shifts in px. RELION 4: rlnTomoName. RELION 5: rlnCenteredCoordinate*Angst. "
                           "Warp/M: wrpCoordinate*1 in Å from the corner, names <tsId>.tomostar.")
        form.addParam("coordPixelSize", params.FloatParam, allowsNull=True, label="Coordinate pixel size (Å)",
                      help="Pixel size of the written coordinates. Empty: the coordinate set's sampling rate "
                           "(RELION 3.0 sub-tomograms: the sub-tomogram sampling rate).")
        form.addParam("tomoSize", params.StringParam, default="", expertLevel=params.LEVEL_ADVANCED,
                      label="Tomogram size at that pixel size",
                      help="'nx ny nz' px of every tomogram at the coordinate pixel size (corner-based dialects). "
                           "Empty: each tomogram's dimensions rescaled to that pixel size.")

    def _insertAllSteps(self):
        self._insertFunctionStep(self.writeStarStep, needsGPU=False)

    # --------------------------- STEPS ---------------------------------------
    def writeStarStep(self):
        particles = self.inputParticles.get()
        path = self._getExtraPath(STAR_NAME)
        table = export_set_to_star(particles, path, self._dialect(), tomograms=self._tomograms(),
                                   coord_pixel_size_angst=self.coordPixelSize.get(),
                                   tomo_size_px=parse_tomo_size(self.tomoSize.get()),
                                   microscope=self._microscope())
        self.starPath.set(os.path.abspath(path))
        self.nParticles.set(len(table))
        self._store(self.starPath, self.nParticles)
        self.info(f"wrote {len(table)} particle(s) to {self.starPath.get()} (dialect {self._dialect()})")

    # --------------------------- UTILS ---------------------------------------
    def _dialect(self) -> Dialect:
        return EXPORT_DIALECTS[self.outputDialect.get()]

    def _tomogramSet(self):
        particles = self.inputParticles.get()
        coords = particles.getCoordinates3D() if hasattr(particles, "getCoordinates3D") else particles
        return coords.getPrecedents() if coords is not None else None

    def _tomograms(self) -> dict[str, TomogramInfo]:
        """ts id → tomogram size px and pixel size Å/px (from the precedent tomograms)."""
        tomoSet = self._tomogramSet()
        if tomoSet is None:
            return {}
        sr = float(tomoSet.getSamplingRate())
        return {t.getTsId(): TomogramInfo(tuple(int(v) for v in t.getDim()), sr) for t in tomoSet.iterItems()}

    def _microscope(self) -> Microscope | None:
        """Voltage (kV), Cs (mm), amplitude contrast from the set's (or its tomograms') acquisition."""
        for source in (self.inputParticles.get(), self._tomogramSet()):
            acquisition = source.getAcquisition() if source is not None and hasattr(source, "getAcquisition") \
                else None
            if acquisition is not None and acquisition.getVoltage():
                return Microscope(float(acquisition.getVoltage()), float(acquisition.getSphericalAberration() or 0),
                                  float(acquisition.getAmplitudeContrast() or 0))
        return None

    # --------------------------- INFO ----------------------------------------
    def _validate(self):
        particles = self.inputParticles.get()
        if particles is None or not particles.getSize():
            return ["Particles: the set is missing or empty"]
        errors = []
        pixel = self.coordPixelSize.get()
        if pixel is not None and not pixel > 0:
            errors.append(f"Coordinate pixel size (Å): must be > 0, got {pixel}")
        try:
            parse_tomo_size(self.tomoSize.get())
        except InputError as exc:
            errors.append(str(exc))
        dialect = self._dialect()
        if dialect in CORNER_DIALECTS and not self._tomograms() and not self.tomoSize.get():
            errors.append(f"dialect {dialect} writes coordinates from the tomogram corner: the particles' tomograms "
                          "are unknown, give 'Tomogram size at that pixel size'")
        if dialect in (Dialect.RELION30, Dialect.RELION31) and self._microscope() is None:
            errors.append(f"RELION {dialect} needs voltage, Cs and amplitude contrast: the particles' acquisition "
                          "has no voltage")
        return errors

    def _summary(self):
        if not self.starPath.get():
            return ["Output not ready yet."]
        return [f"Wrote *{self.nParticles.get()}* particles ({EXPORT_LABELS[self.outputDialect.get()]}) to "
                f"{self.starPath.get()}"]

    def _methods(self):
        if not self.starPath.get():
            return []
        return [f"{self.nParticles.get()} particles were exported to a {EXPORT_LABELS[self.outputDialect.get()]} "
                "STAR file with mspecies."]
