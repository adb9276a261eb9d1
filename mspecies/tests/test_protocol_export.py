"""Headless Scipion project: the demo chain (import → intersect → export sub-tomograms → reconstruct) on a small
noise-free dataset; the export's outputs, merged STAR, QC figures, viewer, "continue" skip, a failing run that
registers nothing, every validation message, the workflow template (loading; the full run is in test_template.py)
and the RELION 5 particle-series mode (STAR files, stacks, particle centred in its tilt images)."""

import json
import os
from pathlib import Path

import numpy as np
from pyworkflow.plugin import Domain
from pyworkflow.tests import BaseTest
from tomo.constants import SCIPION, TR_SCIPION
from tomo.objects import SetOfSubTomograms

from mspecies.cli.demo_chain import run_export_chain
from mspecies.cli.export_record import read_export_record
from mspecies.cli.workflow import inside_project, launch
from mspecies.convert.particles import coordinates_to_poses
from mspecies.convert.poses import scipion_matrix_to_relion
from mspecies.convert.reliontomo import reliontomo_missing
from mspecies.core.backend import usable_cores
from mspecies.core.ctf import ctf_2d
from mspecies.core.geometry import euler_to_matrix, project_positions_to_tilts
from mspecies.formats.mrc import read_mrc
from mspecies.formats.star import read_relion31_particles, read_star_blocks
from mspecies.protocols import (
    ProtMSpeciesExportSubtomograms,
    ProtMSpeciesImportTiltSeries,
    ProtMSpeciesImportTsAlignment,
    ProtMSpeciesImportTsCtf,
    ProtMSpeciesIntersect,
)
from mspecies.protocols.protocol_export_subtomograms import CTF_ATTR, DONE_JSON, MODE_SERIES, RELIONTOMO_OUTPUT
from mspecies.synth.manifest import manifest_particles, manifest_tilt_series
from mspecies.tests.checks import registered_outputs, setup_synthetic_project

SYNTH = dict(seed=5, n_tomograms=2, n_particles=20, n_tilts=31, box_px=32, image_shape_yx=(320, 320),
             pixel_size_angst=4.0, thickness_angst=500.0, snr=None)

# pytest marks (conftest.py adds them; the package's tests never import pytest)
PYTEST_MARKS = ("scipion", "slow")


def series_offset_px(image: np.ndarray, raw: np.ndarray, centre_xy: np.ndarray, ctf: np.ndarray) -> np.ndarray:
    """(x, y) px of the particle centre in an exported, CTF-premultiplied tilt image minus the image centre N // 2.

    ``raw`` is the raw tilt image, ``centre_xy`` the particle's ground-truth position in it and ``ctf`` the CTF on
    the box's rfft2 grid. The raw box around the rounded position, multiplied by the CTF, is cross-correlated with
    the image: both carry the CTF once more, so the cross-spectrum is ``w C^2 |R|^2`` (one sign) and its peak (sub-
    pixel by a parabola) is the shift between them; the rounding is added back.
    """
    n = image.shape[0]
    corner = np.round(centre_xy).astype(int) - n // 2
    box = raw[corner[1]:corner[1] + n, corner[0]:corner[0] + n].astype(np.float64)
    reference = np.fft.rfft2(box - box.mean()) * ctf
    cc = np.fft.irfft2(np.conj(reference) * np.fft.rfft2(image - image.mean()), s=(n, n))
    cc = np.fft.fftshift(cc)
    peak = np.unravel_index(np.argmax(np.abs(cc)), cc.shape)
    cc = cc * np.sign(cc[peak])
    shift = []
    for axis in (1, 0):
        a, b, c = (cc[tuple(np.add(peak, np.eye(2, dtype=int)[axis] * d))] for d in (-1, 0, 1))
        shift.append(peak[axis] - n // 2 + 0.5 * (a - c) / (a - 2 * b + c))
    return np.array(shift) + (centre_xy - np.round(centre_xy))


class TestExportProtocol(BaseTest):
    """One import and one chain (intersect + export with 3 threads + reconstruction)."""

    @classmethod
    def setUpClass(cls):
        setup_synthetic_project(cls, "mspecies-export-", **SYNTH)
        cls.chain = run_export_chain(cls.proj, cls.imported, cls.manifest_path, cls.tmp)
        cls.prot = cls.chain["prot_export"]

    def _path(self, relative: str) -> Path:
        return Path(self.proj.getPath()) / relative

    def test_output_set_items(self):
        output = self.prot.SubTomograms
        selected = self.chain["prot_intersect"].selected
        self.assertIsInstance(output, SetOfSubTomograms)
        self.assertEqual(output.getSize(), selected.getSize())
        self.assertAlmostEqual(output.getSamplingRate(), SYNTH["pixel_size_angst"])
        poses = coordinates_to_poses(selected)
        by_position = {tuple(np.round(p, 2)): e for p, e in zip(poses.positions_angst, poses.euler_zyz_deg)}
        coord_sr = output.getCoordinates3D().getSamplingRate()
        with inside_project(self.proj):
            for subtomo in output.iterSubtomos():
                volume, pixel = read_mrc(subtomo.getFileName())
                self.assertEqual(volume.shape, (SYNTH["box_px"],) * 3)
                self.assertAlmostEqual(pixel, SYNTH["pixel_size_angst"], places=3)
                ctf = getattr(subtomo, CTF_ATTR).get()
                self.assertEqual(read_mrc(ctf)[0].shape, (32, 32, 17))
                coord = subtomo.getCoordinate3D()
                self.assertIn(coord.getTomoId(), {"TS_01", "TS_02"})
                position = tuple(np.round(np.asarray(coord.getPosition(SCIPION)) * coord_sr, 2))
                self.assertIn(position, by_position)
                euler, origin = scipion_matrix_to_relion(subtomo.getTransform(convention=TR_SCIPION).getMatrix(),
                                                         pixel)
                np.testing.assert_allclose(origin, 0.0, atol=1e-6)
                np.testing.assert_allclose(euler_to_matrix(euler), euler_to_matrix(by_position[position]),
                                           atol=1e-6)

    def test_merged_star_and_summary(self):
        star = self._path(self.prot.getMergedStar())
        optics, particles = read_relion31_particles(star)
        self.assertEqual(int(optics["rlnImageDimensionality"][0]), 3)
        self.assertEqual(len(particles), self.prot.SubTomograms.getSize())
        self.assertEqual(set(particles["rlnTomoName"]), {"TS_01", "TS_02"})
        for name in list(particles["rlnImageName"][:3]) + list(particles["rlnCtfImage"][:3]):
            self.assertTrue((star.parent / name).is_file(), name)
        summary = "\n".join(self.prot.summary())
        self.assertIn(f"{len(particles)} particles from 2 tilt series", summary)
        self.assertIn("padded box", summary)
        self.assertTrue(self.prot.methods())
        for ts_id in ("TS_01", "TS_02"):
            self.assertEqual(self._path(self.prot.getQcPng(ts_id)).read_bytes()[:4], b"\x89PNG")
        self.assertNotIn("Traceback", self._path(self.prot.getLogPaths()[1]).read_text())

    def test_chain_reconstruction_matches_ground_truth(self):
        scores = self.chain["scores"]
        print(f"chain: {scores['method']} CC {scores['cc']:.3f}, FSC 0.5 at {scores['fsc_0.5_angst']:.1f} Å")
        self.assertGreater(scores["cc"], 0.8)
        for key in ("fsc_png", "histogram_png", "qc_png"):
            self.assertEqual(Path(self.chain[key]).read_bytes()[:4], b"\x89PNG")

    def test_logs_carry_the_worker_progress(self):
        log = "\n".join(self.prot.getLogsLastLines(400))
        stdout = self._path(self.prot.getLogsPath()).read_text() if hasattr(self.prot, "getLogsPath") else log
        for text in ("particles/s", "padded box M", "memory plan", "python"):
            self.assertIn(text, stdout + log)

    def test_viewer(self):
        from mspecies.viewers import MSpeciesExportViewer

        self.assertIn(MSpeciesExportViewer, Domain.findViewers(self.prot, "tkinter"))
        viewer = MSpeciesExportViewer(project=self.proj, protocol=self.prot)
        viewer.setProtocol(self.prot)
        self.assertEqual(list(viewer.getParam("tsIndex").choices), ["TS_01", "TS_02"])
        viewer.tsIndex.set(1)
        with inside_project(self.proj):
            plotters = viewer._showQc()
        self.assertTrue(plotters[0].getFigure().axes[0].get_title().startswith("TS_02 average"))
        png = self.tmp / "viewer_qc.png"
        plotters[0].getFigure().savefig(png)
        self.assertEqual(png.read_bytes()[:4], b"\x89PNG")

    def test_continue_skips_finished_tilt_series(self):
        marker = self._path(self.prot._getExtraPath("TS_01", DONE_JSON))
        self.assertTrue(marker.is_file())
        before = {p: p.stat().st_mtime for p in marker.parent.rglob("*.mrc")}
        with inside_project(self.proj):
            self.prot.exportStep("TS_01")
        after = {p: p.stat().st_mtime for p in marker.parent.rglob("*.mrc")}
        self.assertEqual(before, after)

    def test_failed_run_registers_nothing(self):
        prot = self.proj.newProtocol(ProtMSpeciesExportSubtomograms, inputParticles=self.imported["coordinates"],
                                     inputTiltSeries=self.imported["tilt_series"], inputCtf=self.imported["ctfs"],
                                     boxSize=32, particleDiameter=100.0, outputPixelSize=2.0)
        with inside_project(self.proj):
            self.proj.launchProtocol(prot, wait=True)
        self.assertTrue(prot.isFailed())
        self.assertFalse(hasattr(prot, "SubTomograms") and prot.SubTomograms is not None)
        self.assertEqual(registered_outputs(prot), [])

    def test_relion5_particle_series_mode(self):
        """RELION 5 particle series through the protocol: no Scipion set; the merged particles, tomograms and
        optimisation set read back with paths valid from extra/; every stack has one slice per visible frame and the
        particle sits at the centre of its tilt images (noise-free data, checked on five frames per particle)."""
        prot = launch(self.proj, ProtMSpeciesExportSubtomograms, "export RELION 5 particle series",
                      inputParticles=self.imported["coordinates"], inputTiltSeries=self.imported["tilt_series"],
                      inputCtf=self.imported["ctfs"], boxSize=32, particleDiameter=100.0, outputMode=MODE_SERIES,
                      numberOfThreads=3)
        self.assertEqual(registered_outputs(prot), [] if reliontomo_missing() else [RELIONTOMO_OUTPUT])
        star = self._path(prot.getMergedStar())
        self.assertIn(f"STAR (RELION 5 particle series): {prot.getMergedStar()}", "\n".join(prot.summary()))
        for tsId in ("TS_01", "TS_02"):  # two steps at once (3 Scipion threads): each worker its share of the cores
            arguments = read_export_record(star.parent / tsId)["arguments"]
            self.assertEqual(arguments["threads"], max(1, usable_cores() // 2))
            self.assertGreater(arguments["memory_gb"], 0)
        extra = star.parent
        optimisation = read_star_blocks(extra / "optimisation_set.star")["optimisation_set"]
        self.assertEqual(optimisation["rlnTomoTomogramsFile"][0], "tomograms.star")
        blocks = read_star_blocks(star)
        self.assertEqual(int(blocks["general"]["rlnTomoSubTomosAre2DStacks"][0]), 1)
        self.assertEqual(int(blocks["optics"]["rlnImageDimensionality"][0]), 2)
        self.assertEqual(int(blocks["optics"]["rlnCtfDataAreCtfPremultiplied"][0]), 1)
        particles = blocks["particles"]
        self.assertEqual(len(particles), SYNTH["n_tomograms"] * SYNTH["n_particles"])
        self.assertEqual(set(particles["rlnTomoName"]), {"TS_01", "TS_02"})
        tomograms = read_star_blocks(extra / "tomograms.star")["global"]
        tilts = {}
        for name, tilt_star in zip(tomograms["rlnTomoName"], tomograms["rlnTomoTiltSeriesStarFile"], strict=True):
            (table,) = read_star_blocks(extra / tilt_star).values()
            self.assertTrue((extra / str(table["rlnMicrographName"][0]).split("@")[1]).exists())
            tilts[name] = table
        hand = dict(zip(tomograms["rlnTomoName"], tomograms["rlnTomoHand"].astype(int), strict=True))
        stacks = {name: read_mrc(extra / name)[0] for name in particles["rlnImageName"]}
        for row in particles.itertuples():
            visible = str(row.rlnTomoVisibleFrames).strip("[]").split(",")
            self.assertEqual(len(visible), len(tilts[row.rlnTomoName]))
            self.assertEqual(stacks[row.rlnImageName].shape, (visible.count("1"), 32, 32))
        self._check_series_centred(particles, tilts, hand, stacks)

    def _check_series_centred(self, particles, tilts: dict, hand: dict, stacks: dict[str, np.ndarray]) -> None:
        """Match each exported particle to its ground-truth particle, then measure the centring on 5 frames."""
        manifest = self.manifest
        truth = manifest_particles(manifest)
        microscope = manifest_tilt_series(manifest, "TS_01").microscope
        offsets = []
        for row in particles.itertuples():
            ts_id = str(row.rlnTomoName)
            series = manifest_tilt_series(manifest, ts_id)
            raw = read_mrc(series.stack_path, mmap=True)[0]
            mine = truth.subset(np.flatnonzero(truth.tomo_names.astype(str) == ts_id))
            position = np.array([[getattr(row, f"rlnCenteredCoordinate{axis}Angst") for axis in "XYZ"]], float)
            match = int(np.argmin(np.linalg.norm(mine.positions_angst - position, axis=1)))
            self.assertLess(np.linalg.norm(mine.positions_angst[match] - position), 0.01, f"{ts_id} {row.Index}")
            projected, height = project_positions_to_tilts(position, series)
            table = tilts[ts_id]
            frames = [f for f, flag in enumerate(str(row.rlnTomoVisibleFrames).strip("[]").split(",")) if flag == "1"]
            for k in np.linspace(0, len(frames) - 1, 5).astype(int):
                f = frames[k]
                t = int(str(table["rlnMicrographName"][f]).split("@")[0]) - 1
                n = stacks[row.rlnImageName].shape[1]
                fy = np.fft.fftfreq(n, SYNTH["pixel_size_angst"])[:, None] * np.ones((1, n // 2 + 1))
                fx = np.fft.rfftfreq(n, SYNTH["pixel_size_angst"])[None, :] * np.ones((n, 1))
                depth = hand[ts_id] * height[0, t]
                ctf = ctf_2d(fx, fy, float(table["rlnDefocusU"][f]) + depth, float(table["rlnDefocusV"][f]) + depth,
                             float(table["rlnDefocusAngle"][f]), microscope)
                offsets.append(series_offset_px(stacks[row.rlnImageName][k].astype(np.float64), raw[t],
                                                projected[0, t], ctf))
        offsets = np.array(offsets)
        print(f"particle series: {len(offsets)} tilt images, centre offset max {np.abs(offsets).max():.3f} px, "
              f"rms {np.sqrt(np.mean(offsets ** 2)):.3f} px")
        self.assertLess(np.abs(offsets).max(), 0.5)

    def _errors(self, **changes) -> str:
        values = dict(inputParticles=self.imported["coordinates"], inputTiltSeries=self.imported["tilt_series"],
                      inputCtf=self.imported["ctfs"], boxSize=32, particleDiameter=100.0)
        values.update(changes)
        return "\n".join(self.proj.newProtocol(ProtMSpeciesExportSubtomograms, **values).validate())

    def test_3d_ctf_method_reaches_the_worker(self):
        """The form's 3D-CTF method (default: on the output grid) is what the worker's command line asks for;
        the chain above ran with the default and passed against the ground truth."""
        for choice, method in ((0, "direct"), (1, "padded")):
            values = dict(inputParticles=self.imported["coordinates"], inputTiltSeries=self.imported["tilt_series"],
                          inputCtf=self.imported["ctfs"], boxSize=32, particleDiameter=100.0, ctfMethod=choice)
            arguments = self.proj.newProtocol(ProtMSpeciesExportSubtomograms, **values)._cliArgs("extra/TS_01").split()
            self.assertEqual(arguments[arguments.index("--ctf-method") + 1], method)
        self.assertEqual(self.prot.ctfMethod.get(), 0)

    def test_padding_factor_reaches_the_worker(self):
        """The form's padding factor is the worker's --padding-factor; M's default (2) is the worker's own and is
        not passed, so the recorded arguments of runs made before the option existed still match."""
        for factor, expected in ((None, None), (2.0, None), (1.25, "1.25")):
            changes = {} if factor is None else {"paddingFactor": factor}
            values = dict(inputParticles=self.imported["coordinates"], inputTiltSeries=self.imported["tilt_series"],
                          inputCtf=self.imported["ctfs"], boxSize=32, particleDiameter=100.0, **changes)
            arguments = self.proj.newProtocol(ProtMSpeciesExportSubtomograms, **values)._cliArgs("extra/TS_01").split()
            if expected is None:
                self.assertNotIn("--padding-factor", arguments)
            else:
                self.assertEqual(arguments[arguments.index("--padding-factor") + 1], expected)

    def test_buffered_writes_reach_the_worker(self):
        """'Write through the page cache' = Yes is the worker's --buffered-writes; the default passes nothing (large
        files written directly)."""
        values = dict(inputParticles=self.imported["coordinates"], inputTiltSeries=self.imported["tilt_series"],
                      inputCtf=self.imported["ctfs"], boxSize=32, particleDiameter=100.0)
        for buffered in (False, True):
            protocol = self.proj.newProtocol(ProtMSpeciesExportSubtomograms, bufferedWrites=buffered, **values)
            self.assertEqual("--buffered-writes" in protocol._cliArgs("extra/TS_01").split(), buffered)
        self.assertFalse(self.prot.bufferedWrites.get())

    def test_raw_particle_series_reaches_the_worker(self):
        """'CTF-premultiply the stacks' = No asks the worker for raw stacks (--no-ctf), in the particle series only."""
        values = dict(inputParticles=self.imported["coordinates"], inputTiltSeries=self.imported["tilt_series"],
                      inputCtf=self.imported["ctfs"], boxSize=32, particleDiameter=100.0, premultiplyCtf=False)
        for mode, raw in ((MODE_SERIES, True), (0, False)):
            protocol = self.proj.newProtocol(ProtMSpeciesExportSubtomograms, outputMode=mode, **values)
            self.assertEqual("--no-ctf" in protocol._cliArgs("extra/TS_01").split(), raw)

    def test_validation_messages(self):
        self.assertEqual(self._errors(), "")
        self.assertIn("finer than the tilt-series pixel size", self._errors(outputPixelSize=2.0))
        self.assertIn("must be an even number", self._errors(boxSize=31))
        self.assertIn("larger than the tilt images", self._errors(boxSize=400))
        self.assertIn("larger than the box", self._errors(particleDiameter=200.0))
        self.assertIn("N tilts: must be >= 1", self._errors(limitTilts=True, nTilts=0))
        self.assertIn("Padding factor: must be a number >= 1", self._errors(paddingFactor=0.9))
        self.assertIn("no alignment", self._errors(inputTiltSeries=self.imported["prot_ts"].TiltSeries))
        self_intersect = launch(self.proj, ProtMSpeciesIntersect, "self intersect (empty only-old)",
                                inputOld=self.imported["coordinates"], inputNew=self.imported["coordinates"],
                                tolerance=1.0)
        empty = self_intersect.onlyOld
        self.assertEqual(empty.getSize(), 0)
        self.assertIn("Particles: the set is empty", self._errors(inputParticles=empty))
        partial = self._partialImport()
        self.assertIn("No CTF estimation for the tilt series ['TS_02']", self._errors(inputCtf=partial["ctfs"]))
        self.assertIn("Particles on tomograms with no tilt series: ['TS_02']",
                      self._errors(inputTiltSeries=partial["tilt_series"]))

    def _partialImport(self) -> dict:
        """Tilt series (aligned) and CTFs of TS_01 only, imported from a folder holding TS_01 alone."""
        folder = self.tmp / "only_ts01"
        if not folder.exists():
            folder.mkdir()
            (folder / "TS_01").symlink_to(self.tmp / "data" / "TS_01")
        if not hasattr(self, "_partial"):
            info = dict(filesPath=str(folder))
            prot_ts = launch(self.proj, ProtMSpeciesImportTiltSeries, "import TS_01 only",
                             filesPattern="{TS}/{TS}.mrc.mdoc", samplingRate=SYNTH["pixel_size_angst"], voltage=300.0,
                             sphericalAberration=2.7, amplitudeContrast=0.07, **info)
            prot_ali = launch(self.proj, ProtMSpeciesImportTsAlignment, "alignment TS_01 only",
                              inputSetOfTiltSeries=prot_ts.TiltSeries, filesPattern="{TS}/{TS}.xf", **info)
            prot_ctf = launch(self.proj, ProtMSpeciesImportTsCtf, "CTF TS_01 only",
                              inputSetOfTiltSeries=prot_ali.TiltSeries, filesPattern="{TS}/{TS}.defocus",
                              fileFormat=0, **info)
            type(self)._partial = {"tilt_series": prot_ali.TiltSeries, "ctfs": prot_ctf.CTFs}
        return self._partial

    def test_workflow_template_loads(self):
        from pyworkflow.template import LocalTemplate

        template_path = Path(__file__).resolve().parents[1] / "templates" / "mspecies_export.json.template"
        template = LocalTemplate("mspecies", str(template_path))
        template.replaceEnvVariables()
        template.parseContent()
        aliases = {p.getAlias() for p in template.getParams().values()}
        self.assertIn("dataFolder", aliases)
        template.setParamValue("dataFolder", str(self.tmp / "data"))
        workflow = template.createTemplateFile()
        try:
            protocols = json.loads(Path(workflow).read_text())
            project = self.proj
            with inside_project(project):
                loaded = project.loadProtocols(workflow)
        finally:
            os.remove(workflow)
        classes = [p.getClassName() for p in loaded.values()]
        for name in ("ProtMSpeciesImportTiltSeries", "ProtMSpeciesImportTsAlignment", "ProtMSpeciesImportTsCtf",
                     "ProtMSpeciesImportParticlesStar", "ProtMSpeciesIntersect", "ProtMSpeciesExportSubtomograms"):
            self.assertIn(name, classes)
        export = next(p for p in loaded.values() if isinstance(p, ProtMSpeciesExportSubtomograms))
        intersect = next(p for p in loaded.values() if isinstance(p, ProtMSpeciesIntersect))
        self.assertIs(export.inputParticles.getObjValue(), intersect)
        self.assertEqual(export.inputParticles.getExtended(), "selected")
        self.assertEqual(len(protocols), len(loaded))
