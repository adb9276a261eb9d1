"""What a user sees in Scipion's forms before running anything: every parameter of every mspecies protocol and
viewer has help (the "?" button next to it), the export form is grouped with its key parameters in bold, and the
package citations render as "Author et al., journal, year" (no project needed: forms are built in memory)."""

import re
import unittest
from types import SimpleNamespace

import pyworkflow.protocol.params as params
import pyworkflow.utils as pwutils
from pyworkflow.protocol import Protocol
from pyworkflow.viewer import ProtocolViewer

import mspecies
import mspecies.protocols
import mspecies.viewers
from mspecies import bibtex
from mspecies.protocols import ProtMSpeciesExportSubtomograms

# A Scipion citation line: [[link][Surname et al., journal, year]]
CITATION = re.compile(r"^\[\[\S+\]\[[^{}(),]+ et al\., [^{},]+, \d{4}\]\]$")


def classes_in(module, base: type) -> list[type]:
    """Classes of ``module``'s namespace that subclass ``base`` (what Scipion discovers), by name."""
    return sorted((v for v in vars(module).values() if isinstance(v, type) and issubclass(v, base)),
                  key=lambda cls: cls.__name__)


def params_without_help(form: params.Form) -> list[str]:
    """Names of the parameters and one-line groups of a form whose help is missing or blank (framed groups
    have no help button and are left out)."""
    return [name for name, param in form.iterAllParams()
            if not isinstance(param, params.Group) and not (param.getHelp() or "").strip()]


def viewer_form(viewer: type) -> params.Form:
    """The form a viewer defines once its protocol is set (a stand-in protocol that exported two tilt series)."""
    form = params.Form(Protocol())
    protocol = SimpleNamespace(_exportTsIds=lambda: ["TS_01", "TS_02"])
    viewer._defineParams(SimpleNamespace(protocol=protocol), form)
    return form


class TestFormsHelpEveryParameter(unittest.TestCase):
    """The form walk: each protocol's and viewer's parameters, one failure message naming all that lack help."""

    def test_every_protocol_parameter_has_help(self):
        protocols = classes_in(mspecies.protocols, Protocol)
        self.assertGreaterEqual(len(protocols), 7, [p.__name__ for p in protocols])
        missing = {p.__name__: params_without_help(p()._definition) for p in protocols}
        self.assertEqual({k: v for k, v in missing.items() if v}, {})

    def test_every_viewer_parameter_has_help(self):
        viewers = classes_in(mspecies.viewers, ProtocolViewer)
        self.assertEqual(len(viewers), 2, [v.__name__ for v in viewers])
        missing = {v.__name__: params_without_help(viewer_form(v)) for v in viewers}
        self.assertEqual({k: v for k, v in missing.items() if v}, {})

    def test_walk_reports_a_parameter_without_help(self):
        form = params.Form(Protocol())
        form.addSection(label="Input")
        group = form.addGroup("Box")
        group.addParam("helped", params.IntParam, label="Helped", help="Some help.")
        group.addParam("bare", params.IntParam, label="Bare")
        line = group.addLine("Shift")
        line.addParam("blank", params.FloatParam, label="X", help="  ")
        self.assertEqual(params_without_help(form), ["bare", "Shift", "blank"])


class TestExportFormLayout(unittest.TestCase):
    """The export form in groups (as reliontomo's extraction), box and output pixel size in bold."""

    def setUp(self):
        self.form = ProtMSpeciesExportSubtomograms()._definition

    def _groups(self) -> dict[str, list[str]]:
        section = self.form.getSection("Input")
        return {group.getLabel(): [name for name, _ in group.iterParams()]
                for _, group in section.iterParams() if isinstance(group, params.Group)}

    def test_parameters_in_groups(self):
        groups = self._groups()
        self.assertEqual(list(groups), ["Input", "Output geometry", "Particle operations", "Image processing",
                                        "Advanced"])
        self.assertEqual(groups["Output geometry"], ["outputPixelSize", "boxSize", "particleDiameter", "outputMode",
                                                    "premultiplyCtf"])
        self.assertEqual(groups["Image processing"], ["invertContrast", "normalizeInput", "normalizeOutput"])
        line = self.form.getParam(groups["Particle operations"][0])
        self.assertIsInstance(line, params.Line)
        self.assertEqual([name for name, _ in line.iterParams()], ["shiftX", "shiftY", "shiftZ"])
        self.assertTrue(self.form.getParam("Advanced").isExpert())

    def test_box_and_output_pixel_size_in_bold(self):
        important = {name for name, param in self.form.iterParams() if param.isImportant()}
        self.assertLessEqual({"boxSize", "outputPixelSize"}, important)

    def test_labels_spell_normalize(self):
        labels = " ".join(f"{p.getLabel()} {p.getHelp()}" for _, p in self.form.iterAllParams())
        self.assertNotRegex(labels, "[Nn]ormalis")
        self.assertIn("Normalize input images", labels)


class TestCitations(unittest.TestCase):
    """Scipion renders a citation as "first author's surname et al., journal, year" from the bibtex entry."""

    def test_package_references_render_author_journal_year(self):
        entries = pwutils.parseBibTex(bibtex.__doc__)
        self.assertLessEqual(set(mspecies._references), set(entries))
        for key in mspecies._references:
            line = Protocol()._getCiteText(entries[key]).strip()
            self.assertRegex(line, CITATION, key)

    def test_rendering_check_rejects_an_entry_without_journal(self):
        entry = {"author": "{mspecies developers}", "year": "2026", "url": "https://example.org"}
        self.assertNotRegex(Protocol()._getCiteText(entry).strip(), CITATION)
