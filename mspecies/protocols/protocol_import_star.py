"""Import particles (coordinates with orientations, or sub-tomograms) from a RELION 3.0/3.1/4/5 or Warp/M STAR."""

from __future__ import annotations

import os

import pyworkflow.protocol.params as params
from pwem.objects import Transform
from pwem.protocols import EMProtocol
from pyworkflow import BETA
from pyworkflow.object import Integer, String
from pyworkflow.utils import Message
from tomo.constants import SCIPION, TR_SCIPION
from tomo.objects import Coordinate3D, SetOfCoordinates3D, SetOfSubTomograms, SubTomogram
from tomo.protocols import ProtTomoBase

from mspecies.common.types import InputError
from mspecies.convert.star_sets import (
    CTF_ATTR,
    EXTRAS_ATTR,
    SUBSET_ATTR,
    ScipionParticles,
    StarImport,
    TomogramInfo,
    parse_tomo_size,
    read_star_for_tomograms,
    resolve_star_path,
    star_import_to_scipion,
)

DIALECT_CHOICES = ("auto", "3.0", "3.1", "4", "5", "warp3d", "warp")
DIALECT_LABELS = ["auto", "RELION 3.0", "RELION 3.1", "RELION 4", "RELION 5", "Warp 3D export", "M species"]
IMPORT_AUTO, IMPORT_COORDINATES = 0, 1


class ProtMSpeciesImportParticlesStar(EMProtocol, ProtTomoBase):
    """Particles from a particle STAR of any RELION (3.0, 3.1, 4, 5) or Warp/M dialect, linked to tomograms by name.

    Positions are centred on each tomogram (corner-based dialects use the tomogram size at the STAR pixel size),
    orientations and shifts become Scipion matrices (convert/poses.py), and every column the reader does not
    interpret is kept on the items so that exporting writes it back. With ``rlnImageName`` the output is a
    ``SetOfSubTomograms`` (and its ``SetOfCoordinates3D``), otherwise a ``SetOfCoordinates3D``.
    """

    _label = "import particles from STAR"
    _devStatus = BETA
    _possibleOutputs = {"Coordinates3D": SetOfCoordinates3D, "SubTomograms": SetOfSubTomograms}

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.matchReport = String()

    def _defineParams(self, form):
        form.addSection(label=Message.LABEL_INPUT)
        form.addParam("starFile", params.FileParam, important=True, label="Particle STAR file",
                      help="RELION 3.0/3.1/4/5 particle STAR, a Warp 3D export or an M species table.")
        form.addParam("dialect", params.EnumParam, choices=DIALECT_LABELS, default=0,
                      display=params.EnumParam.DISPLAY_COMBO, label="STAR dialect",
                      help="auto: detected from the columns (optics table, rlnTomoName, rlnCenteredCoordinate*, "
                           "wrpCoordinateX1...).")
        form.addParam("inputTomograms", params.PointerParam, pointerClass="SetOfTomograms", important=True,
                      label="Tomograms", help="Particles are linked to tomograms whose tsId matches the STAR "
                                              "tomogram name (rlnTomoName / rlnMicrographName / wrpSourceName), "
                                              "exactly or after removing folders, extensions and binning tags.")
        form.addParam("nameMapping", params.StringParam, default="", label="Name mapping (optional)",
                      help="'star_name=tsId, ...' for names that do not match automatically or are ambiguous.")
        form.addParam("coordPixelSize", params.FloatParam, allowsNull=True, label="Coordinate pixel size (Å)",
                      help="Pixel size of the STAR coordinates; only for files that do not carry it (RELION 3.0 "
                           "without rlnDetectorPixelSize, M species tables...). Must agree with the file if set.")
        form.addParam("tomoSize", params.StringParam, default="", expertLevel=params.LEVEL_ADVANCED,
                      label="Tomogram size at the STAR pixel size",
                      help="'nx ny nz' px of the tomograms the corner-based coordinates refer to (centre = N // 2). "
                           "Empty: each tomogram's dimensions × its pixel size / the STAR pixel size, rounded.")
        form.addParam("importAs", params.EnumParam, choices=["auto (sub-tomograms if rlnImageName)", "coordinates"],
                      default=IMPORT_AUTO, label="Import as",
                      help="auto: sub-tomograms (with their coordinates) when the STAR names images "
                           "(rlnImageName; their 3D CTFs from rlnCtfImage), else coordinates only. coordinates: "
                           "only the 3D coordinates with their poses, even when the STAR names images.")
        form.addParam("imagesFolder", params.PathParam, default="", label="Folder of the image paths",
                      help="Relative rlnImageName / rlnCtfImage paths start here; empty: the STAR file's folder.")
        form.addParam("boxSize", params.IntParam, default=32, validators=[params.Positive],
                      label="Box size (px at the tomogram pixel size)",
                      help="Box size stored on the output coordinates (px at the pixel size of the tomograms), "
                           "used by Scipion's viewers and by extraction protocols that read it; the STAR files do "
                           "not carry it.")

    def _insertAllSteps(self):
        self._insertFunctionStep(self.createOutputStep, needsGPU=False)

    # --------------------------- STEPS ---------------------------------------
    def createOutputStep(self):
        star = self._readStar()
        for line in self._reportLines(star):
            self.info(line)
        self.matchReport.set("\n".join(self._reportLines(star)))
        self._store(self.matchReport)
        if not len(star.table):
            raise InputError(f"{self.starFile.get()}: no particle row matched a tomogram")
        tomoSet = self.inputTomograms.get()
        tomos = {tomo.getTsId(): tomo.clone() for tomo in tomoSet.iterItems()}
        values = star_import_to_scipion(star, float(tomoSet.getSamplingRate()), with_images=self._withImages(star),
                                        images_folder=self._imagesFolder())
        if values.image_names is not None:
            self._checkImageFiles(values)
        coords = self._createSetOfCoordinates3D(self.inputTomograms)
        coords.setSamplingRate(values.coord_sampling_rate)
        coords.setBoxSize(self.boxSize.get())
        coordItems = [self._coordinate(values, i, tomos) for i in range(len(values.ts_ids))]
        for i, coord in enumerate(coordItems):
            out = coord.clone()
            self._carry(out, values, i)
            coords.append(out)
        self._defineOutputs(Coordinates3D=coords)
        self._defineSourceRelation(self.inputTomograms, coords)
        if values.image_names is None:
            return
        subtomos = self._createSetOfSubTomograms()
        subtomos.setSamplingRate(values.image_sampling_rate)
        subtomos.setCoordinates3D(coords)
        subtomos.setAcquisition(tomoSet.getAcquisition())
        for i, coord in enumerate(coordItems):
            subtomos.append(self._subtomogram(values, i, coord, tomos[values.ts_ids[i]]))
        self._defineOutputs(SubTomograms=subtomos)
        self._defineSourceRelation(self.inputTomograms, subtomos)

    # --------------------------- UTILS ---------------------------------------
    @staticmethod
    def _coordinate(values: ScipionParticles, i: int, tomos: dict) -> Coordinate3D:
        coord = Coordinate3D()
        coord.setVolume(tomos[values.ts_ids[i]])
        coord.setPosition(*values.positions_px[i], SCIPION)
        coord.setMatrix(values.coord_matrices[i], convention=TR_SCIPION)
        return coord

    @staticmethod
    def _carry(item, values: ScipionParticles, i: int) -> None:
        """Extras JSON and random subset (identical attribute set on every item)."""
        setattr(item, EXTRAS_ATTR, String(values.extras_json[i]))
        if values.random_subset is not None:
            setattr(item, SUBSET_ATTR, Integer(int(values.random_subset[i])))

    def _subtomogram(self, values: ScipionParticles, i: int, coord: Coordinate3D, tomo) -> SubTomogram:
        index, path = resolve_star_path(values.image_names[i], "/")
        subtomo = SubTomogram()
        if index:
            subtomo.setLocation(index, path)
        else:
            subtomo.setLocation(path)
        subtomo.setSamplingRate(values.image_sampling_rate)
        subtomo.setCoordinate3D(coord)
        subtomo.setVolName(tomo.getFileName())
        subtomo.setAcquisition(tomo.getAcquisition())
        subtomo.setTransform(Transform(values.subtomo_matrices[i]), convention=TR_SCIPION)
        if values.ctf_image_names is not None:
            setattr(subtomo, CTF_ATTR, String(values.ctf_image_names[i]))
        self._carry(subtomo, values, i)
        return subtomo

    def _checkImageFiles(self, values: ScipionParticles) -> None:
        names = list(values.image_names) + (list(values.ctf_image_names) if values.ctf_image_names is not None else [])
        missing = [n for n in dict.fromkeys(resolve_star_path(str(n), "/")[1] for n in names) if not os.path.isfile(n)]
        if missing:
            raise InputError(f"{self.starFile.get()}: {len(missing)} image file(s) not found, e.g. {missing[:3]} "
                             "(set 'Folder of the image paths')")

    def _imagesFolder(self) -> str:
        folder = (self.imagesFolder.get() or "").strip()
        return os.path.abspath(folder or os.path.dirname(os.path.abspath(self.starFile.get(""))))

    def _withImages(self, star: StarImport) -> bool:
        return self.importAs.get() == IMPORT_AUTO and star.table.image_names is not None

    def _dialectValue(self) -> str | None:
        value = DIALECT_CHOICES[self.dialect.get()]
        return None if value == "auto" else value

    def _readStar(self) -> StarImport:
        """Read and link the STAR; :class:`InputError` naming the file, column or row on bad input."""
        path = (self.starFile.get() or "").strip()
        if not path or not os.path.isfile(path):
            raise InputError(f"Particle STAR file: file not found: {path!r}")
        tomoSet = self.inputTomograms.get()
        sr = float(tomoSet.getSamplingRate())
        tomos = {tomo.getTsId(): TomogramInfo(tuple(int(v) for v in tomo.getDim()), sr)
                 for tomo in tomoSet.iterItems()}
        pixel = self.coordPixelSize.get()
        if pixel is not None and not pixel > 0:
            raise InputError(f"Coordinate pixel size (Å): must be > 0, got {pixel}")
        return read_star_for_tomograms(path, tomos, dialect=self._dialectValue(), coord_pixel_size_angst=pixel,
                                       tomo_size_px=parse_tomo_size(self.tomoSize.get()),
                                       mapping=self.nameMapping.get() or None)

    @staticmethod
    def _reportLines(star: StarImport) -> list[str]:
        lines = [f"dialect {star.table.dialect}: {len(star.table)} of {star.n_rows} particle row(s) linked"]
        lines += [f"{name!r} -> {ts} ({star.report.methods[name]})" for name, ts in star.report.matches.items()]
        lines += star.report.summary_lines()
        if star.n_skipped:
            lines.append(f"WARNING: {star.n_skipped} row(s) skipped, tomogram name(s) without a tomogram: "
                         f"{list(star.report.unmatched)[:10]}")
        return lines

    # --------------------------- INFO ----------------------------------------
    def _validate(self):
        tomoSet = self.inputTomograms.get()
        if tomoSet is None or not tomoSet.getSize():
            return ["Tomograms: no tomograms selected (the set is missing or empty)"]
        if not tomoSet.getSamplingRate():
            return ["Tomograms: the set has no pixel size (samplingRate)"]
        try:
            star = self._readStar()
            if not len(star.table):
                return [f"{self.starFile.get()}: no particle row matched a tomogram"]
            if self._withImages(star):
                star_import_to_scipion(star, float(tomoSet.getSamplingRate()), with_images=True,
                                       images_folder=self._imagesFolder())
        except (InputError, OSError, ValueError, KeyError) as exc:
            return [str(exc)]
        return []

    def _warnings(self):
        try:
            star = self._readStar()
        except (InputError, OSError, ValueError, KeyError):
            return []
        return [line for line in self._reportLines(star) if line.startswith("WARNING")]

    def _summary(self):
        lines = []
        for name in ("SubTomograms", "Coordinates3D"):
            output = getattr(self, name, None)
            if output is not None:
                lines.append(f"{name}: *{output.getSize()}* imported from {self.starFile.get()} "
                             f"(sampling rate {output.getSamplingRate():.3f} Å/px)")
                break
        if not lines:
            lines.append("Output not ready yet.")
        report = self.matchReport.get()
        if report:
            lines += report.splitlines()
        return lines

    def _methods(self):
        name = os.path.basename(self.starFile.get("") or "")
        output = getattr(self, "SubTomograms", None) or getattr(self, "Coordinates3D", None)
        count = output.getSize() if output is not None else 0
        kind = "sub-tomograms" if getattr(self, "SubTomograms", None) is not None else "3D coordinates"
        return [f"{count} {kind} with orientations were imported from the STAR file {name} with mspecies."]
