"""The shipped workflow template (``mspecies/templates/mspecies_export.json.template``), filled through pyworkflow's
template API with a synthetic dataset's values, loaded into a fresh project and run protocol by protocol: every
step finishes and the export registers one sub-tomogram (with its files) per selected particle."""

import os
import shutil
import tempfile
from pathlib import Path

from pyworkflow.template import LocalTemplate
from pyworkflow.tests import BaseTest, setupTestProject

from mspecies.cli.demo_chain import TOLERANCE_ANGST, derive_particle_star
from mspecies.cli.workflow import inside_project
from mspecies.formats.star import read_relion31_particles
from mspecies.protocols import ProtMSpeciesExportSubtomograms, ProtMSpeciesIntersect
from mspecies.synth.dataset import generate_dataset
from mspecies.synth.manifest import load_manifest

TEMPLATE = Path(__file__).resolve().parents[1] / "templates" / "mspecies_export.json.template"
SYNTH = dict(seed=7, n_tomograms=2, n_particles=6, n_tilts=15, box_px=32, image_shape_yx=(256, 256),
             pixel_size_angst=4.0, thickness_angst=400.0, snr=None)
BOX_PX, DIAMETER_ANGST = 32, 100.0

# pytest marks (conftest.py adds them; the package's tests never import pytest)
PYTEST_MARKS = ("scipion",)


def link_tomograms(manifest_path: Path, folder: Path) -> Path:
    """The flat tomogram folder the template expects: ``<tsId>.mrc`` links to the dataset's tomograms."""
    manifest = load_manifest(manifest_path)
    folder.mkdir(parents=True, exist_ok=True)
    for entry in manifest["tilt_series"]:
        (folder / f"{entry['ts_id']}.mrc").symlink_to(manifest_path.parent / entry["tomogram_file"])
    return folder


def template_values(manifest_path: Path, tomograms: Path, new_star: Path) -> dict[str, str]:
    """Value of every template field (by alias) for the synthetic dataset."""
    manifest = load_manifest(manifest_path)
    first = manifest["tilt_series"][0]
    return {"dataFolder": str(manifest_path.parent), "pixelSize": str(manifest["pixel_size_angst"]),
            "tomoFolder": str(tomograms), "tomoPattern": "{TS}.mrc",
            "tomoPixelSize": str(first["tomogram_pixel_size_angst"]),
            "particlesStar": str(manifest_path.parent / manifest["particles_star"]),
            "tomoSize": " ".join(str(v) for v in first["unbinned_tomogram_shape_zyx"][::-1]),
            "newStar": str(new_star), "tolerance": str(TOLERANCE_ANGST), "box": str(BOX_PX),
            "diameter": str(DIAMETER_ANGST)}


class TestWorkflowTemplateRun(BaseTest):
    """Fill, load and run the template on a 2-tilt-series noise-free dataset."""

    @classmethod
    def setUpClass(cls):
        setupTestProject(cls)
        cls.tmp = Path(tempfile.mkdtemp(prefix="mspecies-template-"))
        cls.manifest_path = generate_dataset(cls.tmp / "data", **SYNTH)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def _filled_template(self) -> str:
        """Path of the workflow JSON with every field filled (pyworkflow's own template API)."""
        template = LocalTemplate("mspecies", str(TEMPLATE))
        template.replaceEnvVariables()
        template.parseContent()
        new_star = self.tmp / "new_particles.star"
        derive_particle_star(self.manifest_path, new_star)
        values = template_values(self.manifest_path, link_tomograms(self.manifest_path, self.tmp / "tomograms"),
                                 new_star)
        self.assertEqual({p.getAlias() for p in template.getParams().values()}, set(values))
        for alias, value in values.items():
            self.assertGreater(template.setParamValue(alias, value), 0, alias)
        return template.createTemplateFile()

    def test_template_runs_to_the_export(self):
        workflow = self._filled_template()
        try:
            with inside_project(self.proj):
                loaded = self.proj.loadProtocols(workflow)
        finally:
            os.remove(workflow)
        protocols = sorted(loaded.values(), key=lambda p: p.getObjId())
        for prot in protocols:
            with inside_project(self.proj):
                self.proj.launchProtocol(prot, wait=True)
            self.assertTrue(prot.isFinished(), f"{prot.getObjLabel()}: {prot.getStatus()} {prot.getErrorMessage()}")
        intersect = next(p for p in protocols if isinstance(p, ProtMSpeciesIntersect))
        export = next(p for p in protocols if isinstance(p, ProtMSpeciesExportSubtomograms))
        self.assertEqual(export.SubTomograms.getSize(), intersect.selected.getSize())
        self.assertGreaterEqual(export.SubTomograms.getSize(), SYNTH["n_tomograms"] * SYNTH["n_particles"])
        star = Path(self.proj.getPath()) / export.getMergedStar()
        _, particles = read_relion31_particles(star)
        self.assertEqual(len(particles), export.SubTomograms.getSize())
        self.assertEqual(set(particles["rlnTomoName"]), {"TS_01", "TS_02"})
        for name in list(particles["rlnImageName"]) + list(particles["rlnCtfImage"]):
            self.assertTrue((star.parent / name).is_file(), name)
