"""Export sub-tomograms (+ 3D CTFs) reconstructed from the raw tilt series (M's "Export sub-tomograms"), as a
Scipion protocol.

Steps: ``prepareStep`` writes, per tilt series, ``extra/<tsId>/geometry.json`` + ``particles_in.star``
(:mod:`mspecies.convert.export_geometry`); one ``exportStep`` per tilt series runs the CLI worker
(``python -m mspecies export --geometry … --particles … --out extra/<tsId>``) through ``runJob``, so a queue can
send each tilt series to a node and ``%(GPU)s`` picks its GPU; ``createOutputStep`` builds the
``SetOfSubTomograms`` (each item: MRC, its 3D CTF in ``_ctfImage``, cloned coordinate at the exported centre,
pose), the merged ``extra/particles.star`` and QC PNGs.

Whatever runs a step (threads, or one queue job per step with ``QUEUE_FOR_JOBS = Y``), success is the worker's
record ``extra/<tsId>/export_record.json`` (:mod:`mspecies.cli.export_record`), checked with its files after
``runJob``: a queue only says that a job left it, not how it ended. Only then the step writes its completion marker
``export_done.json``; a failed, cancelled or killed job fails the step, quoting the job's error file. A tilt series
with the marker and a valid record is not exported again: "continue" redoes exactly the others.

The RELION 5 particle-series mode registers no Scipion set: tomo 3.12 has no class for "one 2D tilt stack per
particle" (``TiltSeries`` means a whole raw acquisition to downstream protocols, ``SetOfParticles`` would lose the
per-particle grouping and the 3D coordinate). The result is ``extra/optimisation_set.star`` with
``extra/particles.star`` and ``extra/tomograms.star`` (:mod:`mspecies.cli.relion5_files`) and the stacks
``extra/<tsId>/<tsId>/*.mrcs``; the summary names them (:meth:`getMergedStar`).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pandas as pd
import pyworkflow.protocol.params as params
from pwem.objects import Transform
from pwem.protocols import EMProtocol
from pyworkflow import BETA
from pyworkflow.constants import QUEUE_FOR_JOBS
from pyworkflow.object import Pointer, String
from pyworkflow.protocol import STEPS_PARALLEL
from pyworkflow.utils import Message, removeExt
from tomo.constants import SCIPION, TR_SCIPION
from tomo.objects import SetOfSubTomograms, SubTomogram
from tomo.protocols import ProtTomoBase

from mspecies.cli.relion5_files import OPTIMISATION_SET
from mspecies.common.types import InputError, ParticlePoses
from mspecies.convert.export_geometry import (
    GEOMETRY_JSON,
    PARTICLES_IN_STAR,
    tomogram_mismatch_errors,
    tomogram_shape_px,
    write_geometry_json,
    write_particles_star,
)
from mspecies.convert.particles import particles_to_poses
from mspecies.convert.poses import relion_to_scipion_matrix
from mspecies.convert.tilt_series import tilt_series_set_to_data

MODE_VOLUMES, MODE_SERIES = 0, 1
MODES = ("volumes", "series")
STAR_FLAVOURS = ("3.1", "3.0", "5")
CTF_LAYOUTS = ("half", "centred")
CTF_METHODS = ("direct", "padded")
BACKEND_AUTO, BACKEND_CPU, BACKEND_GPU = 0, 1, 2
BACKENDS = ("auto", "numpy", "cupy")
DONE_JSON = "export_done.json"
IDS_JSON = "particle_ids.json"
CLI_STAR = "particles.star"
MERGED_STAR = "particles.star"
RELIONTOMO_DIR, RELIONTOMO_OUTPUT = "reliontomo", "RelionParticles"  # particle series as reliontomo's set
SUMMARY_JSON = "export_summary.json"
CTF_ATTR = "_ctfImage"
RECORD_WAIT_S = 10.0  # how long a queued step looks again for a missing record (shared file systems lag)
JOB_ERROR_LINES = 20  # lines of a failed job's error output quoted in the step's error


class ExportStepError(RuntimeError):
    """An export step whose worker left no valid success record (failed, cancelled or killed job)."""


def qcPngName(tsId: str) -> str:
    """File name (in ``extra/``) of the QC figure of one tilt series."""
    return f"qc_{tsId}.png"


class ProtMSpeciesExportSubtomograms(EMProtocol, ProtTomoBase):
    """Reconstruct, for every particle, a sub-tomogram and its 3D CTF directly from the aligned raw tilt series
    (not cropped from a tomogram), with an aliasing-free padded box, at a chosen pixel size and box; output a
    SetOfSubTomograms and a RELION 3.1 STAR ready for relion_refine / relion_reconstruct."""

    _label = "export sub-tomograms from tilt series"
    _devStatus = BETA
    _possibleOutputs = {"SubTomograms": SetOfSubTomograms}
    stepsExecutionMode = STEPS_PARALLEL

    # --------------------------- DEFINE param functions ----------------------
    def _defineParams(self, form):
        form.addSection(label=Message.LABEL_INPUT)
        form.addHidden(params.USE_GPU, params.BooleanParam, default=True, label="Use GPU for the export?",
                       help="Used when the backend is 'auto' or 'GPU'; each tilt series runs on the GPU assigned "
                            "to its step (CUDA_VISIBLE_DEVICES=%(GPU)s).")
        form.addHidden(params.GPU_LIST, params.StringParam, default="0", label="GPU IDs",
                       help="GPUs for the export steps; with several threads each step gets its own slot.")
        self._defineInputParams(form.addGroup("Input"))
        self._defineGeometryParams(form.addGroup("Output geometry"))
        self._defineParticleParams(form.addGroup("Particle operations"))
        self._defineImageParams(form.addGroup("Image processing"))
        self._defineAdvancedParams(form.addGroup("Advanced", expertLevel=params.LEVEL_ADVANCED))
        form.addParallelSection(threads=1, mpi=0)

    @staticmethod
    def _defineInputParams(group):
        group.addParam("inputParticles", params.PointerParam, pointerClass="SetOfCoordinates3D, SetOfSubTomograms",
                       important=True, label="Particles",
                       help="Coordinates or sub-tomograms (their poses are used; sub-tomogram shifts move the "
                            "centre). Matched to the tilt series by tomogram id (tsId).")
        group.addParam("inputTiltSeries", params.PointerParam, pointerClass="SetOfTiltSeries", important=True,
                       label="Tilt series (with alignment)",
                       help="Raw (non-interpolated) tilt series carrying their alignment transforms.")
        group.addParam("inputCtf", params.PointerParam, pointerClass="SetOfCTFTomoSeries", important=True,
                       label="CTF estimation", help="Per-tilt defocus of every tilt series used.")

    @staticmethod
    def _defineGeometryParams(group):
        group.addParam("outputPixelSize", params.FloatParam, allowsNull=True, important=True,
                       label="Output pixel size (Å/px)",
                       help="Empty: the tilt-series pixel size. Not finer than the data; the highest resolution "
                            "of the output is 2 x the pixel size (Nyquist). The tilt images are Fourier-cropped.")
        group.addParam("boxSize", params.IntParam, default=64, validators=[params.Positive], important=True,
                       label="Box size (px)",
                       help="Output box (even), in px at the output pixel size. Each tilt is reconstructed in an "
                            "aliasing-free padded box (min(1024, max(2 x box, the size the CTF of the lowest-dose "
                            "tilt needs)); 2 is the padding factor of Advanced) and cropped to this box. "
                            "High-defocus Thon rings oscillate faster than a small box can sample, so they may "
                            "vanish from the 3D CTF of small boxes: the padded box keeps the data right, but "
                            "choose a box well above the particle diameter for a faithful CTF.")
        group.addParam("particleDiameter", params.FloatParam, default=150.0, validators=[params.Positive],
                       label="Particle diameter (Å)",
                       help="Sets the mask of the output normalization (the background is the box outside this "
                            "diameter) and enters the aliasing-free padded box size. At most the box size x the "
                            "output pixel size.")
        group.addParam("outputMode", params.EnumParam, choices=["volumes", "RELION 5 particle series"],
                       default=MODE_VOLUMES, display=params.EnumParam.DISPLAY_HLIST, label="Export",
                       help="volumes: sub-tomogram + 3D CTF per particle (output: SetOfSubTomograms; STAR for "
                            "RELION 3.1 and 5). RELION 5 particle series: the visible tilt images of each "
                            "particle, centred on it, inverted, CTF- and dose-premultiplied as RELION 5 does "
                            "(extra/<tsId>/*.mrcs), with extra/particles.star, extra/tomograms.star (the real tilt "
                            "series: alignment, defocus, dose) and extra/optimisation_set.star for relion_refine "
                            "--ios and RELION's tilt-series programs (reconstruct particle, CTF refinement, frame "
                            "alignment). With scipion-em-reliontomo installed it is also registered as its "
                            "RelionSetOfPseudoSubtomograms (output RelionParticles) for reliontomo's refine and "
                            "classify; without it no Scipion set: give the optimisation set to RELION 5.")
        group.addParam("premultiplyCtf", params.BooleanParam, default=True, condition=f"outputMode == {MODE_SERIES}",
                       label="CTF-premultiply the stacks",
                       help="Yes (RELION's default): each tilt image is multiplied by its CTF and dose weight "
                            "(rlnCtfDataAreCtfPremultiplied 1). No: raw stacks (inverted, centred), as cryoDRGN-ET "
                            "and OPUS-TOMO read them (rlnCtfDataAreCtfPremultiplied 0).")

    @staticmethod
    def _defineParticleParams(group):
        shift = group.addLine("Shift (Å)",
                              help="Shift of every particle along X, Y, Z (Å), in the map frame when the particles "
                                   "have poses (position += A . shift), else in the tomogram frame: to centre the "
                                   "export on a part of the particle. 0 0 0: the particle positions as they are.")
        for axis in "XYZ":
            shift.addParam(f"shift{axis}", params.FloatParam, default=0.0, label=axis,
                           help=f"{axis} component of the shift (Å).")
        group.addParam("preRotate", params.BooleanParam, default=False, label="Pre-rotate particles",
                       help="Reconstruct in the reference frame: output angles become 0 (identity poses). RELION 5 "
                            "particle series: the poses go to rlnTomoSubtomogramRot/Tilt/Psi and the angles are 0.")
        group.addParam("limitTilts", params.BooleanParam, default=False, label="Limit to the first N tilts by dose",
                       help="Yes: only the N tilts with the lowest accumulated dose enter the sub-tomogram and its "
                            "3D CTF (particle series: only these tilts are visible); the others get zero weight. No: "
                            "every tilt is used, weighted by its dose.")
        group.addParam("nTilts", params.IntParam, default=20, condition="limitTilts", label="N tilts",
                       help="Only the N tilts with the lowest accumulated dose get CTF weight.")

    @staticmethod
    def _defineImageParams(group):
        group.addParam("invertContrast", params.BooleanParam, default=True, label="Invert contrast",
                       help="Raw cryo images have dark protein; RELION expects white.")
        group.addParam("normalizeInput", params.BooleanParam, default=True, label="Normalize input images",
                       help="Yes (as Warp and M): subtract a fitted plane from every tilt image and, after the "
                            "band-pass, scale it to mean 0, standard deviation 1, so that tilts of different "
                            "exposure enter with the same scale. No: the band-pass only.")
        group.addParam("normalizeOutput", params.BooleanParam, default=True, label="Normalize output",
                       help="Mean 0, sd 1 outside the particle diameter. Required for RELION.")

    @staticmethod
    def _defineAdvancedParams(group):
        group.addParam("sparseCtf", params.BooleanParam, default=False, expertLevel=params.LEVEL_ADVANCED,
                       label="Sparse 3D CTF",
                       help="Set 3D-CTF voxels with |value| < 0.01 to 0. Warning: needs a patched RELION.")
        group.addParam("starFlavour", params.EnumParam, choices=["RELION 3.1", "RELION 3.0", "RELION 5"],
                       default=0, expertLevel=params.LEVEL_ADVANCED, label="STAR flavour",
                       help="The 3D CTF is M's normalized CTF volume. RELION 3.1: optics + particles tables, data "
                            "not CTF-premultiplied (rlnCtfDataAreCtfPremultiplied 0): relion_refine 3.1 and 5 and "
                            "RELION 3.1's relion_reconstruct read it right with default flags; RELION 5's "
                            "relion_reconstruct needs --ctf3d_not_squared. RELION 3.0: single table (M's style), "
                            "read as 3.1. RELION 5: the same files declared premultiplied, right for RELION 5's "
                            "relion_refine and relion_reconstruct with default flags (not --ctf3d_not_squared), "
                            "wrong for RELION 3.1.")
        group.addParam("ctfLayout", params.EnumParam, choices=["FFTW half", "centred cube"], default=0,
                       expertLevel=params.LEVEL_ADVANCED, label="3D CTF layout",
                       help="FFTW half: the non-redundant half of the 3D CTF (box x box x (box/2 + 1)), RELION's "
                            "own layout. Centred cube: the full box³ with the origin at the centre, easier to "
                            "look at. Both are read by RELION 3.1.")
        group.addParam("ctfMethod", params.EnumParam, choices=["on the output grid", "padded (M)"], default=0,
                       expertLevel=params.LEVEL_ADVANCED, label="3D CTF method",
                       help="On the output grid: each tilt's CTF, averaged over a voxel, laid on its central slice "
                            "of the box³ grid and normalized as the sub-tomogram (fast). Padded: M's way, the "
                            "CTF reconstructed on the aliasing-free padded grid and cropped in real space (25-50x "
                            "slower). RELION maps of the same quality were measured with both.")
        group.addParam("paddingFactor", params.FloatParam, default=2.0, expertLevel=params.LEVEL_ADVANCED,
                       condition=f"outputMode == {MODE_VOLUMES}", label="Padding factor",
                       help="f in the padded box of the reconstruction, min(1024, max(f x box rounded up to an "
                            "even number, box + 2, the aliasing-free size the CTF of the lowest-dose tilt needs)). "
                            "2 is M's "
                            "(the default); a smaller f (>= 1) lets the aliasing-free size decide where it is below "
                            "2 x box: a smaller padded box, faster (f = 1.5: 1.7-2.3x at boxes 64-192), but the "
                            "RELION map's FSC drops at the highest resolution shells (by up to 0.02-0.17 at f = 1.5 "
                            "on the synthetic data; benchmarks/export/README.md of the plugin). Keep 2 unless speed "
                            "matters more than the last shells.")
        group.addParam("relativePaths", params.BooleanParam, default=True, expertLevel=params.LEVEL_ADVANCED,
                       label="Relative paths in the STAR",
                       help="Yes: image paths in extra/particles.star are relative to extra/ (the STAR moves with "
                            "the folder). No: absolute paths.")
        group.addParam("bufferedWrites", params.BooleanParam, default=False, expertLevel=params.LEVEL_ADVANCED,
                       label="Write through the page cache",
                       help="No: MRC files of 4 MiB or more (sub-tomograms from box 102) bypass the page cache "
                            "(direct I/O, where the file system allows it): gigabytes of sub-tomograms would only "
                            "push the tilt series out of it. Yes: every file through the cache (for a file system "
                            "where direct writes are slow). The files are the same.")
        group.addParam("backend", params.EnumParam, choices=["auto", "CPU", "GPU"], default=BACKEND_AUTO,
                       expertLevel=params.LEVEL_ADVANCED, label="Backend",
                       help="auto: CuPy when a GPU answers, else NumPy (the MSPECIES_BACKEND variable can force "
                            "it). CPU: NumPy. GPU: CuPy on the step's GPU (fails without one).")

    # --------------------------- INSERT steps functions ----------------------
    def _insertAllSteps(self):
        self._tiltSeriesCount = len(self._exportTsIds())  # for the workers' share of the machine (_concurrentSteps)
        self._dropUnprovenMarkers()
        prepare = self._insertFunctionStep(self.prepareStep, needsGPU=False)
        gpu = self._stepsNeedGpu()
        exports = [self._insertFunctionStep(self.exportStep, tsId, prerequisites=[prepare], needsGPU=gpu)
                   for tsId in self._exportTsIds()]
        self._insertFunctionStep(self.createOutputStep, prerequisites=exports, needsGPU=False)

    def _dropUnprovenMarkers(self):
        """Before a run ("continue"), delete the completion marker of every tilt series whose record no longer
        proves its export (files deleted or changed since, other settings): its step's result file is then missing,
        so pyworkflow runs that step again, and only that one."""
        for tsId in self._exportTsIds():
            marker = self._getExtraPath(tsId, DONE_JSON)
            problems = self._recordProblems(tsId) if os.path.isfile(marker) else []
            if problems:
                self.info(f"{tsId}: exported again ({'; '.join(problems)})")
                self._removeFile(marker)

    # --------------------------- STEPS functions -----------------------------
    def prepareStep(self):
        """Check tomogram ids, then write per tilt series its geometry JSON, particle STAR and particle ids."""
        poses, objIds = self._particlePoses()
        tsSet, ctfSet = self.inputTiltSeries.get(), self.inputCtf.get()
        errors = tomogram_mismatch_errors(sorted(set(poses.tomo_names.astype(str))), list(tsSet.getTSIds()),
                                          list(ctfSet.getTSIds()))
        if errors:
            raise InputError(" ".join(errors))
        tsIds = self._exportTsIds()
        data = tilt_series_set_to_data(tsSet, ctfSet, tsIds)
        tomos = self._tomograms()
        for tsId in tsIds:
            rows = np.flatnonzero(poses.tomo_names.astype(str) == tsId)
            tomo = tomos.get(tsId)
            shape = tomogram_shape_px(tomo.getDim() if tomo is not None else None,
                                      tomo.getSamplingRate() if tomo is not None else None, data[tsId])
            folder = self._getExtraPath(tsId)
            write_geometry_json(os.path.join(folder, GEOMETRY_JSON), data[tsId], shape)
            write_particles_star(os.path.join(folder, PARTICLES_IN_STAR), poses.subset(rows), tsId, shape,
                                 data[tsId].pixel_size_angst)
            with open(os.path.join(folder, IDS_JSON), "w") as handle:
                json.dump({"obj_ids": [int(objIds[r]) for r in rows]}, handle)
            self.info(f"{tsId}: {rows.size} particles, tomogram {shape[0]}x{shape[1]}x{shape[2]} px at "
                      f"{data[tsId].pixel_size_angst:g} Å/px")
        unused = sorted(set(tsSet.getTSIds()) - set(tsIds))
        if unused:
            self.info(f"Tilt series without particles (not exported): {unused[:20]}")

    def exportStep(self, tsId: str) -> list[str]:
        """Run the CLI worker on one tilt series, unless its completion marker and a valid success record exist.

        Any executor (local, threads, one queue job per step) only says that the worker is gone: success is its
        record (:mod:`mspecies.cli.export_record`), checked here with the files it lists. The completion marker
        is written after that check, and returned as the step's result file, so "continue" reruns the step when
        the marker is gone. A queued job's output goes to the protocol's log after the job."""
        folder = self._getExtraPath(tsId)
        marker = os.path.join(folder, DONE_JSON)
        if os.path.isfile(marker) and not self._recordProblems(tsId):
            self.info(f"{tsId}: already exported ({marker}), skipped")
            return [marker]
        self._removeExport(tsId)
        self.info(f"{tsId}: exporting")
        failure = None
        try:
            self.runJob(self._program(), self._cliArgs(folder))
        except subprocess.CalledProcessError as error:  # the local executor raises on a non-zero exit, queues never do
            failure = f"the worker exited with code {error.returncode}, its error is in the run's error log"
        except Exception as error:  # e.g. a queue that refused the job
            failure = str(error)
        jobLogs = self._stepJobLogs()
        for path in jobLogs:
            self._relayJobLog(tsId, path)
        problems = self._recordProblems(tsId, waitSeconds=RECORD_WAIT_S if jobLogs else 0)
        if problems or failure:
            raise ExportStepError(self._failureMessage(tsId, failure, problems, jobLogs))
        self._writeJsonAtomic(marker, self._stepReport(tsId))
        self.info(f"{tsId}: done")
        return [marker]

    def createOutputStep(self):
        """Merged STAR, QC figures, summary; then the SetOfSubTomograms (volumes mode), registered only if every
        tilt series has its marker and a valid record. A tilt series without them loses its marker, so that
        "continue" exports it again."""
        tsIds = self._exportTsIds()
        invalid = {t: self._recordProblems(t) or (["no completion marker"] if not os.path.isfile(
            self._getExtraPath(t, DONE_JSON)) else []) for t in tsIds}
        invalid = {t: problems for t, problems in invalid.items() if problems}
        if invalid:
            for tsId in invalid:
                self._removeFile(self._getExtraPath(tsId, DONE_JSON))
            raise ExportStepError("tilt series not exported (\"continue\" exports them again): " + "; ".join(
                f"{t}: {', '.join(problems)}" for t, problems in invalid.items()))
        merged = self._writeMergedStar(tsIds)
        reports = {t: self._readJson(self._getExtraPath(t, DONE_JSON)) for t in tsIds}
        summary = {"n_particles": int(sum(r["n_particles"] for r in reports.values())),
                   "n_tilt_series": len(tsIds), "pixel_size_angst": self._outputPixel(),
                   "box_px": int(self.boxSize.get()),
                   "padded_box_px": sorted({int(r["padded_box_px"]) for r in reports.values()}),
                   "star": merged, "mode": MODES[self.outputMode.get()], "per_tilt_series": reports}
        if self.outputMode.get() == MODE_VOLUMES:
            self._writeQcFigures(tsIds)
        with open(self._getExtraPath(SUMMARY_JSON), "w") as handle:
            json.dump(summary, handle, indent=1)
        if self.outputMode.get() == MODE_VOLUMES:
            output = self._buildSubtomograms(tsIds)
            self._defineOutputs(SubTomograms=output)
            self._defineSourceRelation(self.inputParticles, output)
            self._defineSourceRelation(self.inputTiltSeries, output)
        else:
            self._registerPseudoSubtomograms(tsIds)

    def _registerPseudoSubtomograms(self, tsIds: list[str]) -> None:
        """With scipion-em-reliontomo: the particle series also as its RelionSetOfPseudoSubtomograms (files in
        extra/reliontomo/, paths relative to the project, as reliontomo's steps run there)."""
        from mspecies.cli.relion5_files import merge_particle_series
        from mspecies.convert.reliontomo import pseudo_subtomograms, reliontomo_missing

        reason = reliontomo_missing()
        if reason is not None:
            self.info(f"No RelionSetOfPseudoSubtomograms registered ({reason}); the STAR files are the output.")
            return
        optimisation = merge_particle_series(self._getExtraPath(RELIONTOMO_DIR),
                                             [self._getExtraPath(t) for t in tsIds], root=os.getcwd())
        coordinates = (self.inputParticles.get().getCoordinates3D(asPointer=True) if self._isSubtomos()
                       else self.inputParticles)
        output = pseudo_subtomograms(self._getPath(), os.path.relpath(optimisation), coordinates,
                                     tilt_series_pixel_angst=self._dataPixel(), output_pixel_angst=self._outputPixel(),
                                     box_px=int(self.boxSize.get()),
                                     acquisition=self.inputTiltSeries.get().getAcquisition())
        self._defineOutputs(**{RELIONTOMO_OUTPUT: output})
        self._defineSourceRelation(self.inputParticles, output)
        self._defineSourceRelation(self.inputTiltSeries, output)

    # --------------------------- UTILS functions -----------------------------
    def _isSubtomos(self) -> bool:
        return isinstance(self.inputParticles.get(), SetOfSubTomograms)

    def _coordinates(self):
        particles = self.inputParticles.get()
        return particles.getCoordinates3D() if self._isSubtomos() else particles

    def _iterParticles(self):
        """Items in the order :func:`particles_to_poses` reads them."""
        particles = self.inputParticles.get()
        return particles.iterSubtomos() if self._isSubtomos() else particles.iterCoordinates()

    def _particlePoses(self) -> tuple[ParticlePoses, np.ndarray]:
        """(poses centred Å, object ids in the same order)."""
        poses = particles_to_poses(self.inputParticles.get())
        objIds = np.array([item.getObjId() for item in self._iterParticles()], dtype=np.int64)
        return poses, objIds

    def _particleTsIds(self) -> list[str]:
        particles = self.inputParticles.get()
        if self._isSubtomos():
            field = SubTomogram.COORD_VOL_NAME_FIELD
            return sorted(str(row[field]) for row in particles.aggregate(["count"], field, [field]))
        return sorted(str(t) for t in particles.getTSIds())

    def _exportTsIds(self) -> list[str]:
        """tsIds with particles and a tilt series (sorted)."""
        tsIds = set(self.inputTiltSeries.get().getTSIds())
        return [t for t in self._particleTsIds() if t in tsIds]

    def _coordinatesPointer(self) -> Pointer:
        """A new pointer to the input coordinates for the output set. The form's own ``inputParticles`` pointer
        must not be given: it would become a child of the output as well, and storing the protocol then fails
        with "Circular reference ... _coordsPointer found twice"."""
        source = (self.inputParticles.get().getCoordinates3D(asPointer=True) if self._isSubtomos()
                  else self.inputParticles)
        return Pointer(source.getObjValue(), extended=source.getExtended())

    def _tomograms(self) -> dict:
        coords = self._coordinates()
        precedents = coords.getPrecedents() if coords is not None else None
        return {tomo.getTsId(): tomo.clone() for tomo in precedents.iterItems()} if precedents is not None else {}

    def _dataPixel(self) -> float:
        return float(self.inputTiltSeries.get().getSamplingRate())

    def _outputPixel(self) -> float:
        return float(self.outputPixelSize.get() or self._dataPixel())

    def _shift(self) -> tuple[float, float, float]:
        return float(self.shiftX.get()), float(self.shiftY.get()), float(self.shiftZ.get())

    def _prerotated(self) -> bool:
        return bool(self.preRotate.get())

    def _stepsNeedGpu(self) -> bool:
        """GPU steps: backend GPU, or auto with a usable CuPy device here; 'Use GPU' on and a GPU list given.
        (On a CPU-only machine 'auto' steps take no GPU slot, so they run in parallel threads.)"""
        if self.backend.get() == BACKEND_CPU or not (self.usesGpu() and self.getGpuList()):
            return False
        if self.backend.get() == BACKEND_AUTO:
            from mspecies.core.backend import cupy_unavailable_reason

            return self._backend() != "numpy" and cupy_unavailable_reason() is None
        return True

    def _backend(self) -> str:
        if self.backend.get() == BACKEND_AUTO:
            from mspecies.plugin import MSPECIES_BACKEND, Plugin

            value = Plugin.getVar(MSPECIES_BACKEND) or "auto"
            return value if value in BACKENDS else "auto"
        return BACKENDS[self.backend.get()]

    def _program(self) -> str:
        """Python of this environment; on GPU steps prefixed with the step's GPU (``%(GPU)s``)."""
        python = sys.executable or "python3"
        return f"CUDA_VISIBLE_DEVICES=%(GPU)s {python}" if self._stepsNeedGpu() else python

    def _cliArgs(self, folder: str) -> str:
        """Arguments of ``python -m mspecies export`` for one tilt series (folder = extra/<tsId>)."""
        args = ["-m", "mspecies", "export", "--geometry", os.path.join(folder, GEOMETRY_JSON),
                "--particles", os.path.join(folder, PARTICLES_IN_STAR), "--out", folder,
                "--pixel-size-out", f"{self._outputPixel():.6g}", "--box", str(self.boxSize.get()),
                "--diameter", f"{self.particleDiameter.get():.6g}", "--mode", MODES[self.outputMode.get()],
                "--shift", *(f"{v:.6g}" for v in self._shift()), "--ctf-layout", CTF_LAYOUTS[self.ctfLayout.get()],
                "--ctf-method", CTF_METHODS[self.ctfMethod.get()], "--backend", self._backend(),
                "--star-flavour", "3.1", "--overwrite"]
        if self.paddingFactor.get() != 2.0:  # M's default is not passed: the runs' recorded arguments stay as they were
            args += ["--padding-factor", f"{self.paddingFactor.get():.6g}"]
        flags = {"--prerotate": self._prerotated(), "--no-invert": not self.invertContrast.get(),
                 "--no-normalize-input": not self.normalizeInput.get(),
                 "--no-normalize-output": not self.normalizeOutput.get(), "--sparse-ctf": self.sparseCtf.get(),
                 "--no-ctf": self.outputMode.get() == MODE_SERIES and not self.premultiplyCtf.get(),
                 "--buffered-writes": self.bufferedWrites.get()}
        args += [flag for flag, on in flags.items() if on]
        if self.limitTilts.get():
            args += ["--n-tilts-by-dose", str(self.nTilts.get())]
        args += self._shareArgs()
        return " ".join(f'"{a}"' if " " in a else a for a in args)

    def _concurrentSteps(self) -> int:
        """Export steps this process runs at once: Scipion threads less the main one, but no more than the tilt
        series, where steps run in parallel threads here (not as queue jobs, each with its own allocation); else 1.
        The tilt series are counted once per run, in the main thread (:meth:`_insertAllSteps`)."""
        threads = self.numberOfThreads.get() or 1
        if not (self.modeParallel() and threads > 1 and not self.useQueueForSteps()):
            return 1
        count = getattr(self, "_tiltSeriesCount", None)  # counted by _insertAllSteps: the steps' threads must not
        return max(1, min(threads - 1, count or threads - 1))  # read the sets (SQLite cursors are not shared)

    def _shareArgs(self) -> list[str]:
        """With several export steps at once on this machine, each worker gets its share of the cores and, on the
        CPU, of the default memory budget (:meth:`~mspecies.core.memory.Availability.default_budget`): each
        worker would otherwise use every core and plan a quarter of the memory as if alone. GPU steps each have
        their own device, whose free memory bounds their budget. Neither changes a byte of the output
        (:data:`mspecies.cli.export_record.WAYS_OF_WRITING`)."""
        from mspecies.core.backend import usable_cores
        from mspecies.core.memory import memory_availability

        share = self._concurrentSteps()
        if share == 1:
            return []
        args = ["--threads", str(max(1, usable_cores() // share))]
        if not self._stepsNeedGpu():
            budget, _ = memory_availability().default_budget()
            args += ["--memory-gb", f"{budget / share / 1e9:.4g}"]
        return args

    def _exportedObjIds(self, tsId: str) -> list[int]:
        """Object ids of the particles the CLI exported, in its order: the requested ones less those it skipped
        (outside the images) or dropped, listed by input row in its ``excluded_particles.tsv``."""
        from mspecies.cli.export_files import EXCLUDED_TSV

        objIds = self._readJson(self._getExtraPath(tsId, IDS_JSON))["obj_ids"]
        excludedPath = self._getExtraPath(tsId, EXCLUDED_TSV)
        if not os.path.isfile(excludedPath):
            return objIds
        excluded = set(pd.read_csv(excludedPath, sep="\t")["particle"].astype(int))
        return [objId for row, objId in enumerate(objIds) if row not in excluded]

    def _stepReport(self, tsId: str) -> dict:
        """Particles written, padded box and backend of one finished tilt series, from the worker's record."""
        from mspecies.cli.export_record import read_export_record

        done = read_export_record(self._getExtraPath(tsId))["per_tilt_series"][tsId]
        return {"ts_id": tsId, "n_particles": int(done["n_particles"]), "padded_box_px": int(done["padded_box_px"]),
                "backend": str(done["backend"])}

    def _expectedArguments(self, tsId: str) -> dict:
        """The worker's parsed command line for one tilt series, as its record stores it."""
        from mspecies.cli.main import build_parser

        args = shlex.split(self._cliArgs(self._getExtraPath(tsId)))
        return vars(build_parser().parse_args(args[args.index("mspecies") + 1:]))

    def _recordProblems(self, tsId: str, waitSeconds: float = 0.0) -> list[str]:
        """Why the worker's record does not prove the export of ``tsId`` (empty: it does). A missing record is
        looked for again for ``waitSeconds`` (a job's files may reach this host after the queue let it go)."""
        from mspecies.cli.export_record import RECORD_JSON, record_problems

        folder = self._getExtraPath(tsId)
        deadline = time.monotonic() + waitSeconds
        while not os.path.isfile(os.path.join(folder, RECORD_JSON)) and time.monotonic() < deadline:
            time.sleep(1.0)
        return record_problems(folder, tsId, len(self._exportedObjIds(tsId)), self._expectedArguments(tsId))

    def _removeExport(self, tsId: str) -> None:
        """Delete the marker, the record and the outputs of an earlier try of one tilt series."""
        from mspecies.cli.export_files import EXCLUDED_TSV
        from mspecies.cli.export_record import RECORD_JSON

        folder = self._getExtraPath(tsId)
        for name in (DONE_JSON, RECORD_JSON, CLI_STAR, EXCLUDED_TSV):
            self._removeFile(os.path.join(folder, name))
        shutil.rmtree(os.path.join(folder, tsId), ignore_errors=True)

    @staticmethod
    def _removeFile(path: str) -> None:
        if os.path.isfile(path):
            os.remove(path)

    @staticmethod
    def _writeJsonAtomic(path: str, content: dict) -> None:
        partial = f"{path}.{os.getpid()}.tmp"
        with open(partial, "w") as handle:
            json.dump(content, handle)
        os.replace(partial, path)

    def _failureMessage(self, tsId: str, failure: str | None, problems: list[str], jobLogs: list[str]) -> str:
        """Names the tilt series, the job, why it is not done and the last lines of the job's error output."""
        jobId = self._stepJobIds().get(threading.current_thread().name)
        job = f"queue job {jobId}" if jobId is not None else "export job"
        lines = [f"{tsId}: the {job} did not export it ({'; '.join(problems + ([failure] if failure else []))})."]
        errors = [path for path in jobLogs if path.endswith(".err")] + [p for p in jobLogs if p.endswith(".out")]
        for path in errors:
            tail = self._tail(path, JOB_ERROR_LINES)
            if tail:
                lines.append(f"Last lines of {path}:")
                lines += tail
                break
        return "\n".join(lines)

    @staticmethod
    def _tail(path: str, count: int) -> list[str]:
        with open(path, errors="replace") as handle:
            return [line.rstrip("\n") for line in handle.readlines()[-count:] if line.strip()]

    # --------------------------- queue helpers -------------------------------
    def getSubmitDict(self):
        """pyworkflow's submission values; a per-step job (QUEUE_FOR_JOBS = Y) asks what one export step uses: one
        task, one CPU, one GPU when the steps use GPUs (not the protocol's total threads and GPUs)."""
        values = super().getSubmitDict()
        if self.useQueue() and values.get(QUEUE_FOR_JOBS) == "Y":
            values.update(JOB_NODES=1, JOB_THREADS=1, JOB_CORES=1, GPU_COUNT=1 if self._stepsNeedGpu() else 0)
        return values

    def appendJobId(self, jobId):
        """Also remembers the queue job of the calling step's thread, for its failure message."""
        super().appendJobId(jobId)
        self._stepJobIds()[threading.current_thread().name] = jobId

    def _stepJobIds(self) -> dict:
        if not hasattr(self, "_queueJobByThread"):
            self._queueJobByThread = {}
        return self._queueJobByThread

    def _stepJobLogs(self) -> list[str]:
        """The ``.out``/``.err`` files of the queue job that the calling step just ran (none when not queued).

        pyworkflow 3.11's QueueStepExecutor names a step's n-th job ``<JOB_NAME>-<thread id>-<n>`` beside the job
        script and counts n per thread in ``threadCommands``; the job template writes ``<JOB_LOGS>.out/.err``."""
        executor = getattr(self, "_stepsExecutor", None)
        counts, submit = getattr(executor, "threadCommands", None), getattr(executor, "submitDict", None)
        threadId = getattr(threading.current_thread(), "thId", None)
        if counts is None or submit is None or threadId not in counts:
            return []
        suffix = f"-{threadId}-{counts[threadId]}"
        script = os.path.abspath(removeExt(submit["JOB_SCRIPT"]) + suffix + ".job")
        base = os.path.join(os.path.dirname(script), submit["JOB_NAME"] + suffix)
        return [path for path in (base + ".out", base + ".err") if os.path.isfile(path)]

    def _relayJobLog(self, tsId: str, path: str) -> None:
        """Copy a queue job's output file into the protocol's log, one line at a time, prefixed by the tsId."""
        with open(path, errors="replace") as handle:
            lines = [line.rstrip("\n") for line in handle if line.strip()]
        self.info(f"{tsId}: {len(lines)} lines of the job's {os.path.basename(path)}:")
        for line in lines:
            (self.warning if path.endswith(".err") else self.info)(f"{tsId} | {line}")

    @staticmethod
    def _readJson(path: str) -> dict:
        with open(path) as handle:
            return json.load(handle)

    def _cliTables(self, tsId: str) -> dict[str, pd.DataFrame]:
        from mspecies.formats.star import read_star_blocks

        return read_star_blocks(self._getExtraPath(tsId, CLI_STAR))

    def _starPath(self, tsId: str, name: str) -> str:
        """A CLI STAR path (relative to extra/<tsId>) → relative to extra/ or absolute."""
        if not name:
            return name
        path = os.path.join(tsId, name)
        return path if self.relativePaths.get() else os.path.abspath(self._getExtraPath(path))

    def _writeMergedStar(self, tsIds: list[str]) -> str:
        """``extra/particles.star`` over all tilt series (random subsets alternate over the merged rows)."""
        from mspecies.common.types import Microscope
        from mspecies.formats.relion_subtomo import PARTICLE_COLUMNS, write_subtomo_star

        if self.outputMode.get() == MODE_SERIES:
            from mspecies.cli.relion5_files import merge_particle_series

            merge_particle_series(self._getExtraPath(), [self._getExtraPath(t) for t in tsIds],
                                  absolute_images=not self.relativePaths.get())
            return self._getExtraPath(MERGED_STAR)
        particles = []
        for tsId in tsIds:
            blocks = self._cliTables(tsId)
            table = blocks["particles"][[c for c in PARTICLE_COLUMNS if c in blocks["particles"]]].copy()
            for column in {"rlnImageName", "rlnCtfImage"} & set(table.columns):
                table[column] = [self._starPath(tsId, str(v)) for v in table[column]]
            particles.append(table)
        merged = pd.concat(particles, ignore_index=True)
        for column in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnCoordinateX", "rlnCoordinateY",
                       "rlnCoordinateZ"):
            merged[column] = merged[column].astype(float)
        merged["rlnRandomSubset"] = np.arange(len(merged)) % 2 + 1
        geometry = self._readJson(self._getExtraPath(tsIds[0], GEOMETRY_JSON))
        microscope = Microscope(geometry["voltage_kv"], geometry["cs_mm"], geometry["amplitude_contrast"])
        path = self._getExtraPath(MERGED_STAR)
        optics = {"pixel_size_angst": self._outputPixel(), "box_px": int(self.boxSize.get()),
                  "microscope": microscope}
        write_subtomo_star(path, merged, flavour=STAR_FLAVOURS[self.starFlavour.get()], **optics)
        return path

    def _exportedRows(self, tsId: str) -> list[tuple[int, str, str]]:
        """(input object id, volume path, 3D CTF path) per exported particle of one tilt series (paths relative
        to the project)."""
        table = self._cliTables(tsId)["particles"]
        objIds = self._exportedObjIds(tsId)
        if len(table) != len(objIds):
            raise InputError(f"{tsId}: {len(table)} exported particles but {len(objIds)} requested")
        return [(int(i), self._getExtraPath(tsId, str(v)), self._getExtraPath(tsId, str(c)))
                for i, v, c in zip(objIds, table["rlnImageName"], table["rlnCtfImage"])]

    def _buildSubtomograms(self, tsIds: list[str]) -> SetOfSubTomograms:
        """The output set at the output pixel size (all items built before it is registered)."""
        from mspecies.core.reconstruct import shifted_positions_angst

        rows = {objId: (tsId, volume, ctf) for tsId in tsIds for objId, volume, ctf in self._exportedRows(tsId)}
        poses, objIds = self._particlePoses()
        centres = shifted_positions_angst(poses, self._shift())
        index = {int(i): k for k, i in enumerate(objIds)}
        coordSr = float(self._coordinates().getSamplingRate())
        pixel = self._outputPixel()
        acquisition = self.inputTiltSeries.get().getAcquisition()
        tomos = self._tomograms()
        output = self._createSetOfSubTomograms()
        output.setSamplingRate(pixel)
        output.setAcquisition(acquisition)
        output.setCoordinates3D(self._coordinatesPointer())
        for item in self._iterParticles():
            objId = item.getObjId()
            if objId not in rows:
                continue
            tsId, volume, ctf = rows[objId]
            k = index[objId]
            coord = (item.getCoordinate3D() if self._isSubtomos() else item).clone()
            coord.setPosition(*(centres[k] / coordSr), SCIPION)
            euler = np.zeros(3) if self._prerotated() else poses.euler_zyz_deg[k]
            subtomo = SubTomogram()
            subtomo.setLocation(volume)
            subtomo.setSamplingRate(pixel)
            subtomo.setCoordinate3D(coord)
            subtomo.setTransform(Transform(relion_to_scipion_matrix(euler, None, pixel)), convention=TR_SCIPION)
            subtomo.setAcquisition(acquisition)
            if tsId in tomos:
                subtomo.setVolName(tomos[tsId].getFileName())
            setattr(subtomo, CTF_ATTR, String(ctf))
            output.append(subtomo)
        return output

    def _writeQcFigures(self, tsIds: list[str]) -> None:
        """``extra/qc_<tsId>.png`` per tilt series (CTF-weighted average + one 3D CTF)."""
        from mspecies.cli import qc

        for tsId in tsIds:
            average, ctf = self.exportAverage(tsId)
            qc.save_figure(qc.volume_qc_figure(average, self._outputPixel(), ctf, title=tsId),
                           self._getExtraPath(qcPngName(tsId)))

    def exportAverage(self, tsId: str, maxParticles: int = 200) -> tuple[np.ndarray, np.ndarray]:
        """(CTF-weighted average in the reference frame, first 3D CTF) of the exported particles of one tilt
        series (at most ``maxParticles``)."""
        from mspecies.cli import qc
        from mspecies.formats.mrc import read_mrc

        table = self._cliTables(tsId)["particles"].head(maxParticles)
        angles = table[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy(dtype=np.float64)
        first = read_mrc(self._getExtraPath(tsId, str(table["rlnCtfImage"].iloc[0])))[0]

        def particles():
            for row, euler in zip(table.itertuples(), angles):
                yield (read_mrc(self._getExtraPath(tsId, row.rlnImageName))[0],
                       read_mrc(self._getExtraPath(tsId, row.rlnCtfImage))[0], euler)

        return qc.ctf_weighted_average(particles()), first

    # --------------------------- INFO functions ------------------------------
    def _validate(self):
        errors = []
        box = self.boxSize.get()
        if box is None or box % 2 or box < 4:
            errors.append(f"Box size: must be an even number of pixels >= 4, got {box}.")
        if self.limitTilts.get() and (self.nTilts.get() is None or self.nTilts.get() < 1):
            errors.append(f"N tilts: must be >= 1, got {self.nTilts.get()}.")
        factor = self.paddingFactor.get()
        if factor is None or not factor >= 1:
            errors.append(f"Padding factor: must be a number >= 1 (2 = M's padded box), got {factor}.")
        particles, tsSet, ctfSet = self.inputParticles.get(), self.inputTiltSeries.get(), self.inputCtf.get()
        if particles is None or not particles.getSize():
            return errors + ["Particles: the set is empty."]
        if tsSet is None or ctfSet is None:
            return errors
        errors += tomogram_mismatch_errors(self._particleTsIds(), list(tsSet.getTSIds()), list(ctfSet.getTSIds()))
        errors += self._validateTiltSeries(tsSet, box)
        diameter = self.particleDiameter.get()
        if box and diameter and diameter > box * self._outputPixel():
            errors.append(f"Particle diameter {diameter:g} Å is larger than the box ({box} px x "
                          f"{self._outputPixel():g} Å = {box * self._outputPixel():g} Å).")
        return errors

    def _validateTiltSeries(self, tsSet, box: int | None) -> list[str]:
        errors = []
        dataPixel = self._dataPixel()
        if self.outputPixelSize.get() is not None and self.outputPixelSize.get() < dataPixel * (1 - 1e-4):
            errors.append(f"Output pixel size {self.outputPixelSize.get():g} Å is finer than the tilt-series "
                          f"pixel size {dataPixel:g} Å.")
        wanted = set(self._particleTsIds())
        for ts in tsSet.iterItems():
            if ts.getTsId() not in wanted:
                continue
            if not ts.hasAlignment() or ts.interpolated():
                errors.append(f"Tilt series {ts.getTsId()}: no alignment (or interpolated); the export needs the "
                              "raw tilt series with its alignment transforms.")
            first = ts.getFirstItem()
            dims = first.getDim() if first is not None else None
            if box and dims and box * self._outputPixel() > min(dims[:2]) * dataPixel:
                errors.append(f"Box {box} px x {self._outputPixel():g} Å is larger than the tilt images of "
                              f"{ts.getTsId()} ({dims[0]}x{dims[1]} px x {dataPixel:g} Å).")
        return errors

    def _exportSummary(self) -> dict | None:
        path = self._getExtraPath(SUMMARY_JSON)
        return self._readJson(path) if os.path.isfile(path) else None

    def _summary(self):
        summary = self._exportSummary()
        if summary is None:
            return ["Output not ready yet."]
        lines = [f"{summary['n_particles']} particles from {summary['n_tilt_series']} tilt series exported as "
                 f"{summary['mode']}"]
        if summary["mode"] == MODES[MODE_SERIES]:
            return lines + [f"Pixel size {summary['pixel_size_angst']:g} Å, box {summary['box_px']} px; one "
                            "2D stack per particle (no Scipion set: give RELION 5 the optimisation set)",
                            f"STAR (RELION 5 particle series): {summary['star']}",
                            f"optimisation set: {os.path.join(os.path.dirname(summary['star']), OPTIMISATION_SET)}"]
        return lines + [f"Pixel size {summary['pixel_size_angst']:g} Å, box {summary['box_px']} px, padded box "
                        f"{', '.join(str(m) for m in summary['padded_box_px'])} px",
                        f"STAR (RELION): {summary['star']}"]

    def _methods(self):
        summary = self._exportSummary()
        if summary is None:
            return []
        if summary["mode"] == MODES[MODE_SERIES]:
            return [f"For {summary['n_particles']} particles of {summary['n_tilt_series']} tomograms, "
                    f"{summary['box_px']} px tilt images centred on each particle were extracted from the aligned "
                    f"raw tilt series at {summary['pixel_size_angst']:g} Å/px with mspecies as RELION 5 particle "
                    "series (2D stacks with per-particle defocus and dose weighting, tomograms.star of the tilt "
                    "series)."]
        return [f"{summary['n_particles']} sub-tomograms and their 3D CTFs were reconstructed directly from the "
                f"aligned raw tilt series of {summary['n_tilt_series']} tomograms at {summary['pixel_size_angst']:g} "
                f"Å/px in a {summary['box_px']} px box (aliasing-free padded box "
                f"{', '.join(str(m) for m in summary['padded_box_px'])} px, per-particle defocus, dose weighting) "
                "with mspecies, following M's sub-tomogram export; the 3D CTFs were "
                + ("reconstructed on the padded grid and cropped in real space, as in M."
                   if CTF_METHODS[self.ctfMethod.get()] == "padded" else
                   "evaluated on the output grid (each tilt's CTF averaged over a voxel on its central slice).")]

    def getQcPng(self, tsId: str) -> str:
        """Path of the QC figure of one tilt series written by the output step."""
        return self._getExtraPath(qcPngName(tsId))

    def getMergedStar(self) -> str:
        """Path of the merged RELION STAR of all tilt series."""
        return self._getExtraPath(MERGED_STAR)
