"""Intersect particle sets (M's "Intersect with another particle set") as a Scipion protocol.

Old set: ``SetOfCoordinates3D`` or ``SetOfSubTomograms``. New set: another Scipion set or a RELION/Warp/M particle
STAR. Particles are matched one-to-one per tomogram within a tolerance (Å) by :mod:`mspecies.core.assignment`,
through the shared glue :mod:`mspecies.cli.intersect_files`. Outputs (all of the old set's class): ``onlyOld``,
``inBoth`` (old particles, old poses), ``onlyNew`` and ``selected`` (the union chosen in the form). Every item carries
``_mspeciesMatchDistance`` (Å to its partner, -1 when it has none).
"""

from __future__ import annotations

import os

import numpy as np
import pyworkflow.protocol.params as params
from pwem.objects import Transform
from pwem.protocols import EMProtocol
from pyworkflow import BETA
from pyworkflow.object import Float
from pyworkflow.utils import Message
from tomo.constants import SCIPION, TR_SCIPION
from tomo.objects import Coordinate3D, SetOfCoordinates3D, SetOfSubTomograms, SubTomogram
from tomo.protocols import ProtTomoBase

from mspecies.cli.intersect_files import (
    HISTOGRAM_PNG,
    SUMMARY_JSON,
    intersect_poses,
    match_names,
    name_report_lines,
    read_summary_json,
    summary_lines,
    write_match_files,
)
from mspecies.common.types import InputError, ParticlePoses
from mspecies.convert.particles import particles_to_poses
from mspecies.convert.poses import relion_to_scipion_matrix
from mspecies.formats.star_dialects import CORNER_DIALECTS, ParticleTable, read_particle_star

SOURCE_SCIPION, SOURCE_STAR = 0, 1
MODE_CHOICES = ("gated", "m_compatible")
MATCH_NPZ = "match.npz"
DISTANCE_ATTR = "_mspeciesMatchDistance"
UNMATCHED_DISTANCE = -1.0
OUTPUT_NAMES = ("onlyOld", "inBoth", "onlyNew", "selected")
RECIPES_HELP = ("Recipes (M): add new particles = tolerance 0 + only old + only new (exact duplicates are 'in both'; "
                "add 'in both' to keep one copy of them); remove particles = only old; keep the survivors of a "
                "classification = in both; 'in both' against the species' first STAR drops the particles that "
                "moved further than the tolerance.")


def _conformTo(item, template) -> None:
    """Give ``item`` every stored attribute of ``template`` it lacks, empty (recursively, e.g. the coordinate of a
    sub-tomogram): a set's columns come from its first item, so all items must carry the same attributes."""
    for name, value in template.getAttributesToStore():
        current = getattr(item, name, None)
        if current is None:
            setattr(item, name, value.__class__())
        elif not value.isPointer():
            _conformTo(current, value)


class ProtMSpeciesIntersect(EMProtocol, ProtTomoBase):
    """Match an old particle set against a new one (Scipion set or STAR file) one-to-one per tomogram with a distance
    tolerance, and output the particles only in the old set, in both (old poses kept), only in the new set, and
    a chosen union of these. The distance histogram helps choose the tolerance."""

    _label = "intersect particle sets"
    _devStatus = BETA
    _possibleOutputs = {"onlyOld": SetOfCoordinates3D, "inBoth": SetOfCoordinates3D,
                        "onlyNew": SetOfCoordinates3D, "selected": SetOfCoordinates3D}

    # --------------------------- DEFINE param functions ----------------------
    def _defineParams(self, form):
        form.addSection(label=Message.LABEL_INPUT)
        form.addParam("inputOld", params.PointerParam, pointerClass="SetOfCoordinates3D, SetOfSubTomograms",
                      important=True, label="Old particles",
                      help="Reference set; particles in both sets are output as these (their poses and attributes).")
        form.addParam("newSource", params.EnumParam, choices=["Scipion set", "STAR file"], default=SOURCE_SCIPION,
                      display=params.EnumParam.DISPLAY_HLIST, label="New particles from",
                      help="Scipion set: coordinates or sub-tomograms of this project. STAR file: a particle STAR "
                           "written by RELION, Warp or M, read directly (no import protocol needed).")
        form.addParam("inputNew", params.PointerParam, pointerClass="SetOfCoordinates3D, SetOfSubTomograms",
                      condition=f"newSource == {SOURCE_SCIPION}", allowsNull=True, label="New particles",
                      help="Coordinates or sub-tomograms on the same tomograms (matched by tsId).")
        form.addParam("newStarFile", params.FileParam, condition=f"newSource == {SOURCE_STAR}",
                      label="New particles STAR",
                      help="RELION 3.0/3.1/4/5, Warp 3D export or M species particle STAR. Tomogram names are matched "
                           "to the old set's tsIds tolerantly (folders, .tomostar/.mrc, binning tags, case).")
        form.addParam("starPixelSize", params.FloatParam, allowsNull=True, condition=f"newSource == {SOURCE_STAR}",
                      label="STAR coordinates pixel size (Å)",
                      help="Only needed when the STAR does not carry it (e.g. no optics table, M species tables).")
        form.addParam("starTomoSize", params.StringParam, allowsNull=True, condition=f"newSource == {SOURCE_STAR}",
                      expertLevel=params.LEVEL_ADVANCED, label="STAR tomogram size (px)",
                      help="Only for STARs with coordinates from the tomogram corner (RELION 3.0/3.1/4, Warp, M): "
                           "their centre (N // 2) meets the old set's centred positions. Leave empty to take each "
                           "tomogram's size from the project (dimensions x tomogram pixel size / STAR pixel size); "
                           "'nx ny nz' px at the STAR pixel size overrides it. Not used for RELION 5 (centred Å).")
        form.addParam("nameMapping", params.StringParam, default="", expertLevel=params.LEVEL_ADVANCED,
                      label="Tomogram name mapping",
                      help="'new_name=tsId, ...' for names the automatic matching cannot pair.")
        form.addParam("tolerance", params.FloatParam, default=10.0, label="Tolerance (Å)",
                      help="Largest distance between an old and a new particle counted as the same particle.")
        form.addParam("keepOnlyOld", params.BooleanParam, default=False, label="Selected: only old",
                      help="Old particles without a new partner go into the 'selected' output. " + RECIPES_HELP)
        form.addParam("keepInBoth", params.BooleanParam, default=True, label="Selected: in both",
                      help="Old particles with a new partner (old poses kept) go into 'selected'. " + RECIPES_HELP)
        form.addParam("keepOnlyNew", params.BooleanParam, default=False, label="Selected: only new",
                      help="New particles without an old partner go into 'selected'. " + RECIPES_HELP)
        form.addParam("matchMode", params.EnumParam, choices=["gated", "M-compatible"], default=0,
                      expertLevel=params.LEVEL_ADVANCED, label="Matching mode",
                      help="gated: most pairs within the tolerance, then the smallest total distance. M-compatible: "
                           "M's dense assignment of all particles, then pairs beyond the tolerance are dropped.")
        form.addParam("histogramBins", params.IntParam, default=50, validators=[params.Positive],
                      expertLevel=params.LEVEL_ADVANCED, label="Histogram bins",
                      help="Number of bins of the matched-distance histogram written to extra/distance_histogram.png "
                           "(the viewer has its own). It does not change the matching.")

    # --------------------------- INSERT steps functions ----------------------
    def _insertAllSteps(self):
        self._insertFunctionStep(self.matchStep, needsGPU=False)
        self._insertFunctionStep(self.createOutputStep, needsGPU=False)

    # --------------------------- STEPS functions -----------------------------
    def matchStep(self):
        """Match the sets; write ``extra/`` files (summary.json, distances, histogram PNG, match.npz)."""
        oldSet = self.inputOld.get()
        oldPoses = particles_to_poses(oldSet)
        oldIds = np.array([item.getObjId() for item in oldSet.iterItems(orderBy="id")], dtype=np.int64)
        newPoses, newIds, newOrigins, newImages, ignored = self._newParticles(oldPoses.tomo_names)
        outcome = intersect_poses(oldPoses, newPoses, self.tolerance.get(), mode=self._mode(),
                                  name_mapping=None, log=None)
        write_match_files(self._getExtraPath(), outcome, oldPoses.tomo_names, keep=self._keep(),
                          n_bins=self.histogramBins.get(), extra={"ignored_new_particles": ignored})
        np.savez(self._getExtraPath(MATCH_NPZ), old_ids=oldIds, old_partner=outcome.result.old_partner,
                 old_distance=outcome.result.old_distance_angst, new_ids=newIds,
                 new_partner=outcome.result.new_partner, new_distance=outcome.result.new_distance_angst,
                 new_positions=newPoses.positions_angst, new_euler=newPoses.euler_zyz_deg,
                 new_ts_ids=newPoses.tomo_names.astype(str), new_origins=newOrigins,
                 new_images=np.asarray(newImages, dtype=str))
        for line in summary_lines(read_summary_json(self._getExtraPath(SUMMARY_JSON))):
            self.info(line)

    def createOutputStep(self):
        """Build the four output sets fully, then register them (nothing is registered if this fails)."""
        match = np.load(self._getExtraPath(MATCH_NPZ))
        oldSet = self.inputOld.get()
        outputs = {name: self._createOutputSet(oldSet, name) for name in OUTPUT_NAMES}
        keepOld, keepBoth, keepNew = self._keep()
        oldRow = {int(objId): row for row, objId in enumerate(match["old_ids"])}
        for item in self._iterOld(oldSet):
            row = oldRow[item.getObjId()]
            both = match["old_partner"][row] >= 0
            targets = ["inBoth" if both else "onlyOld"]
            if (both and keepBoth) or (not both and keepOld):
                targets.append("selected")
            self._appendTo(outputs, targets, item, match["old_distance"][row])
        onlyNewRows = np.flatnonzero(match["new_partner"] < 0)
        template = oldSet.getFirstItem().clone()
        for item in self._newItems(oldSet, match, onlyNewRows):
            _conformTo(item, template)
            self._appendTo(outputs, ["onlyNew", "selected"] if keepNew else ["onlyNew"], item, UNMATCHED_DISTANCE)
        self._defineOutputs(**outputs)
        for output in outputs.values():
            self._defineSourceRelation(self.inputOld, output)
            if self.newSource.get() == SOURCE_SCIPION:
                self._defineSourceRelation(self.inputNew, output)

    # --------------------------- UTILS functions -----------------------------
    def _mode(self) -> str:
        return MODE_CHOICES[self.matchMode.get()]

    def _keep(self) -> tuple[bool, bool, bool]:
        return bool(self.keepOnlyOld.get()), bool(self.keepInBoth.get()), bool(self.keepOnlyNew.get())

    @staticmethod
    def _isSubtomos(particles) -> bool:
        return isinstance(particles, SetOfSubTomograms)

    @staticmethod
    def _tsIds(particles) -> list[str]:
        """tsIds present in a SetOfCoordinates3D or SetOfSubTomograms."""
        if isinstance(particles, SetOfSubTomograms):
            field = SubTomogram.COORD_VOL_NAME_FIELD
            return sorted(str(row[field]) for row in particles.aggregate(["count"], field, [field]))
        return sorted(str(t) for t in particles.getTSIds())

    @staticmethod
    def _tomograms(particles) -> dict:
        """{tsId: Tomogram} of the set's precedents."""
        coords = particles.getCoordinates3D() if isinstance(particles, SetOfSubTomograms) else particles
        return {tomo.getTsId(): tomo.clone() for tomo in coords.getPrecedents().iterItems()}

    @staticmethod
    def _coordSamplingRate(particles) -> float:
        coords = particles.getCoordinates3D() if isinstance(particles, SetOfSubTomograms) else particles
        return float(coords.getSamplingRate())

    def _iterOld(self, oldSet):
        return oldSet.iterSubtomos() if self._isSubtomos(oldSet) else oldSet.iterCoordinates()

    def _newParticles(self, oldNames: np.ndarray):
        """New particles on tomograms of the old set → (poses named by tsId, Scipion ids or -1, origins Å (M, 3),
        image names, info on ignored particles). Particles on tomograms absent from the old set are ignored."""
        if self.newSource.get() == SOURCE_STAR:
            table = self._readNewStar()
            poses, ids = table.poses, np.full(len(table), -1, dtype=np.int64)
            origins = table.origins_angst
            images = table.image_names if table.image_names is not None else np.full(len(table), "", object)
        else:
            newSet = self.inputNew.get()
            poses = particles_to_poses(newSet)
            ids = np.array([item.getObjId() for item in newSet.iterItems(orderBy="id")], dtype=np.int64)
            origins, images = np.zeros((len(poses), 3)), np.full(len(poses), "", object)
        report = match_names(oldNames, poses.tomo_names, self.nameMapping.get() or None)
        for line in name_report_lines(report, oldNames):
            self.info(line)
        tsIds = report.ts_ids_for(poses.tomo_names.astype(str))
        keep = np.array([t is not None for t in tsIds], dtype=bool)
        ignored = {"count": int((~keep).sum()), "names": list(report.unmatched)}
        if ignored["count"]:
            self.info(f"{ignored['count']} new particle(s) on tomograms absent from the old set are ignored: "
                      f"{ignored['names'][:10]}")
        named = ParticlePoses(poses.positions_angst[keep], poses.euler_zyz_deg[keep],
                              np.asarray(tsIds[keep], dtype=object))
        return named, ids[keep], origins[keep], np.asarray(images, dtype=object)[keep], ignored

    def _readNewStar(self) -> ParticleTable:
        """Read the STAR; corner-based dialects get the tomogram sizes from the form or from the old tomograms."""
        path = (self.newStarFile.get() or "").strip()
        if not path or not os.path.isfile(path):
            raise InputError(f"New particles STAR: file not found: {path!r}")
        pixel = self.starPixelSize.get() or None
        probe = read_particle_star(path, coord_pixel_size_angst=pixel)
        if probe.dialect not in CORNER_DIALECTS:
            return probe  # centred Å like the old set: no tomogram size needed
        if (self.starTomoSize.get() or "").strip():
            try:
                shape = tuple(int(v) for v in self.starTomoSize.get().split())
            except ValueError as error:
                raise InputError(f"STAR tomogram size: expected 'nx ny nz' integers, got "
                                 f"{self.starTomoSize.get()!r}") from error
            return read_particle_star(path, coord_pixel_size_angst=pixel, tomo_shape_px=shape)
        return read_particle_star(path, coord_pixel_size_angst=pixel,
                                  tomo_shape_px=self._starShapes(probe, float(probe.coord_pixel_size_angst[0])))

    def _starShapes(self, probe: ParticleTable, starPixel: float) -> dict:
        """{STAR name: (nx, ny, nz)} at the STAR pixel size from the old tomograms (unmatched names: a dummy size;
        their particles are ignored)."""
        tomos = self._tomograms(self.inputOld.get())
        report = match_names(list(tomos), probe.poses.tomo_names, self.nameMapping.get() or None)
        shapes = {}
        for name in {str(n) for n in probe.poses.tomo_names}:
            tomo = tomos.get(report.matches.get(name))
            dims = tomo.getDim() if tomo is not None else (2, 2, 2)
            factor = tomo.getSamplingRate() / starPixel if tomo is not None else 1.0
            shapes[name] = tuple(int(round(d * factor)) for d in dims)
        return shapes

    def _createOutputSet(self, oldSet, name: str):
        if self._isSubtomos(oldSet):
            output = self._createSetOfSubTomograms(suffix=name)
        else:
            output = self._createSetOfCoordinates3D(oldSet.getPrecedents(), suffix=name)
        output.copyInfo(oldSet)
        return output

    @staticmethod
    def _appendTo(outputs: dict, names: list[str], item, distanceAngst: float) -> None:
        """Append a copy of ``item`` with its match distance (Å, -1 when unmatched) to each named output."""
        distance = float(distanceAngst) if np.isfinite(distanceAngst) else UNMATCHED_DISTANCE
        for name in names:
            copy = item.clone()
            setattr(copy, DISTANCE_ATTR, Float(distance))
            outputs[name].append(copy)

    def _newItems(self, oldSet, match, rows: np.ndarray):
        """Items of the old set's class (no id) for the new particles ``rows``, on the old set's tomograms."""
        tomos = self._tomograms(oldSet)
        coordSr = self._coordSamplingRate(oldSet)
        newSubtomos = {}
        if self.newSource.get() == SOURCE_SCIPION and self._isSubtomos(oldSet):
            wanted = {int(match["new_ids"][row]) for row in rows}
            newSubtomos = {s.getObjId(): s.clone() for s in self.inputNew.get().iterSubtomos()
                           if s.getObjId() in wanted}
        for row in rows:
            tsId = str(match["new_ts_ids"][row])
            position, euler = match["new_positions"][row], match["new_euler"][row]
            if not self._isSubtomos(oldSet):
                yield self._newCoordinate(tomos[tsId], position, euler, coordSr)
            elif newSubtomos:
                yield self._reattachedSubtomo(newSubtomos[int(match["new_ids"][row])], tomos[tsId])
            else:
                yield self._subtomoFromStar(oldSet, tomos[tsId], position, euler, match["new_origins"][row],
                                            str(match["new_images"][row]), coordSr)

    @staticmethod
    def _newCoordinate(tomo, positionAngst: np.ndarray, euler: np.ndarray, coordSr: float) -> Coordinate3D:
        """Coordinate3D at a centred position (Å) with a RELION orientation, on ``tomo``."""
        coord = Coordinate3D()
        coord.setVolume(tomo)
        coord.setPosition(*(np.asarray(positionAngst) / coordSr), SCIPION)
        coord.setMatrix(relion_to_scipion_matrix(np.asarray(euler), None, coordSr), convention=TR_SCIPION)
        return coord

    @staticmethod
    def _reattachedSubtomo(subtomo, tomo):
        subtomo.setObjId(None)
        coord = subtomo.getCoordinate3D()
        coord.setVolume(tomo)
        subtomo.setCoordinate3D(coord)
        return subtomo

    def _subtomoFromStar(self, oldSet, tomo, positionAngst, euler, originAngst, image: str, coordSr: float):
        """SubTomogram for a STAR row: its image, coordinate = position + origin, transform with the origin shift."""
        subtomoSr = oldSet.getSamplingRate()
        subtomo = SubTomogram()
        index, path = self._imagePath(image)
        if index:
            subtomo.setLocation(index, path)
        else:
            subtomo.setLocation(path)
        subtomo.setSamplingRate(subtomoSr)
        subtomo.setCoordinate3D(self._newCoordinate(tomo, np.asarray(positionAngst) + originAngst, euler, coordSr))
        subtomo.setTransform(Transform(relion_to_scipion_matrix(np.asarray(euler), np.asarray(originAngst),
                                                                subtomoSr)), convention=TR_SCIPION)
        subtomo.setVolName(tomo.getFileName())
        subtomo.setAcquisition(oldSet.getAcquisition())
        return subtomo

    def _imagePath(self, image: str) -> tuple[int, str]:
        """A STAR image name (``file`` or ``index@file``) → (index, existing absolute path); relative paths are
        tried from the working folder, then from the STAR's folder."""
        index, _, name = image.rpartition("@") if "@" in image else ("", "", image)
        for candidate in (name, os.path.join(os.path.dirname(os.path.abspath(self.newStarFile.get() or "")), name)):
            if candidate and os.path.isfile(candidate):
                return (int(index) if index.isdigit() else 0), os.path.abspath(candidate)
        raise InputError(f"{self.newStarFile.get()}: rlnImageName {image!r} not found")

    def _outcomeSummary(self) -> dict | None:
        path = self._getExtraPath(SUMMARY_JSON)
        return read_summary_json(path) if os.path.isfile(path) else None

    # --------------------------- INFO functions ------------------------------
    def _validate(self):
        errors = []
        if self.tolerance.get() is None or not self.tolerance.get() >= 0:
            errors.append(f"Tolerance: must be >= 0 Å, got {self.tolerance.get()}")
        if not any(self._keep()):
            errors.append("Select at least one of 'only old', 'in both', 'only new' for the selected output.")
        oldSet = self.inputOld.get()
        if oldSet is None:
            return errors + ["Old particles: no set selected"]
        if not oldSet.getSize():
            return errors + ["Old particles: the set is empty"]
        try:
            errors += self._validateNew(oldSet)
        except InputError as error:
            errors.append(str(error))
        return errors

    def _validateNew(self, oldSet) -> list[str]:
        oldTsIds = self._tsIds(oldSet)
        if self.newSource.get() == SOURCE_SCIPION:
            newSet = self.inputNew.get()
            if newSet is None:
                return ["New particles: no set selected"]
            if not newSet.getSize():
                return ["New particles: the set is empty"]
            errors = self._validateClasses(oldSet, newSet)
            names = self._tsIds(newSet)
        else:
            table = self._readNewStar()
            if not len(table):
                return [f"{self.newStarFile.get()}: no particles"]
            errors = self._validateStarSubtomos(oldSet, table)
            names = sorted({str(n) for n in table.poses.tomo_names})
        report = match_names(oldTsIds, names, self.nameMapping.get() or None)
        if not report.matches:
            errors.append(f"No common tomograms: new tomogram names {names[:5]} match none of the old tsIds "
                          f"{oldTsIds[:5]}; give a tomogram name mapping 'new_name=tsId'.")
        return errors

    def _validateClasses(self, oldSet, newSet) -> list[str]:
        if not self._isSubtomos(oldSet):
            return []
        if not self._isSubtomos(newSet):
            return ["Old particles are sub-tomograms: the new set must be a SetOfSubTomograms too (only-new "
                    "particles become output sub-tomograms)."]
        if not np.isclose(newSet.getSamplingRate(), oldSet.getSamplingRate(), rtol=1e-3) or not np.isclose(
                self._coordSamplingRate(newSet), self._coordSamplingRate(oldSet), rtol=1e-3):
            return ["Old and new sub-tomograms must have the same sampling rates (sub-tomograms and coordinates)."]
        return []

    def _validateStarSubtomos(self, oldSet, table: ParticleTable) -> list[str]:
        if not self._isSubtomos(oldSet):
            return []
        if table.image_names is None:
            return [f"{self.newStarFile.get()}: old particles are sub-tomograms, so new particles from a STAR need "
                    "sub-tomogram images (rlnImageName), which this file does not have. Import the STAR as "
                    "coordinates and intersect coordinates instead."]
        try:
            self._imagePath(str(table.image_names[0]))
        except InputError as error:
            return [str(error)]
        return []

    def _summary(self):
        summary = self._outcomeSummary()
        if summary is None:
            return ["Output not ready yet."]
        lines = summary_lines(summary)
        ignored = summary.get("ignored_new_particles", {}).get("count", 0)
        if ignored:
            lines.append(f"{ignored} new particle(s) on tomograms absent from the old set were ignored.")
        return lines

    def _methods(self):
        summary = self._outcomeSummary()
        if summary is None:
            return []
        jaccard = summary["jaccard"]
        return [f"Particle sets of {summary['n_old']} (old) and {summary['n_new']} (new) particles were matched "
                f"one-to-one per tomogram by an optimal assignment of inter-particle distances with a tolerance of "
                f"{summary['tolerance_angst']:g} Å ({summary['mode']} mode, mspecies, following M), giving "
                f"{summary['in_both']} particles in both sets"
                + (f" (Jaccard index {jaccard:.3f})." if jaccard is not None else ".")]

    def getHistogramPath(self) -> str:
        """Path of the distance histogram PNG written by the match step."""
        return self._getExtraPath(HISTOGRAM_PNG)

    def getOutcomeSummary(self) -> dict | None:
        """The run's summary.json as a dict, or None before the match step."""
        return self._outcomeSummary()

