"""Layering: core/formats/cli never load Scipion; the plugin, its entry point, protocols.conf and protocols
are discoverable (each check in a fresh interpreter)."""

import importlib.util
import os
import subprocess
import sys
import tempfile

SCIPION_PREFIXES = ("pyworkflow", "pwem", "tomo")
PURE_MODULES = ["mspecies", "mspecies.core.types", "mspecies.core.geometry", "mspecies.core.ctf",
                "mspecies.core.synth", "mspecies.core.synth_check", "mspecies.core.assignment",
                "mspecies.formats.imod", "mspecies.formats.star", "mspecies.cli"]


def _run(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_pure_layers_do_not_import_scipion():
    present = [m for m in PURE_MODULES if importlib.util.find_spec(m) is not None]
    out = _run(f"import importlib, sys\nfor m in {present!r}: importlib.import_module(m)\n"
               f"print(sorted(n for n in sys.modules if n.split('.')[0] in {SCIPION_PREFIXES!r}))")
    assert out.strip() == "[]", out


def test_plugin_entry_point_and_protocols_conf():
    out = _run("import importlib.metadata as md, os, mspecies\n"
               "eps = [e for e in md.entry_points(group='pyworkflow.plugin') if e.name == 'mspecies']\n"
               "print(len(eps), eps[0].value)\n"
               "print(os.path.isfile(os.path.join(os.path.dirname(mspecies.__file__), 'protocols.conf')))")
    assert out.split() == ["1", "mspecies", "True"], out


def test_domain_finds_protocols():
    code = ("import os, tempfile\nfrom mspecies.scipion_env import configure_headless_scipion\n"
            "configure_headless_scipion(tempfile.mkdtemp())\nimport mspecies\nprint(mspecies.Plugin.__name__)\n"
            "from pyworkflow.plugin import Domain\nprotocols = Domain.getProtocols()\n"
            "print(protocols['ProtMSpeciesImportTsCtf'].getClassLabel())\n"
            "print(Domain.getPlugin('mspecies').Plugin().getPath() == os.path.dirname(mspecies.__file__))\n"
            "print(sorted(n for n in protocols if n.startswith('ProtMSpecies')))")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCIPION_")}
    with tempfile.TemporaryDirectory() as folder:
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env,
                                cwd=folder)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0] == "Plugin"
    assert lines[1].startswith("mspecies - "), lines[1]  # the package name, not the module defining Plugin
    assert lines[2] == "True"  # the plugin folder is the package folder (protocols.conf, icon)
    for name in ("ProtMSpeciesImportTiltSeries", "ProtMSpeciesImportTsAlignment", "ProtMSpeciesImportTsCtf",
                 "ProtMSpeciesImportParticlesStar"):
        assert name in lines[-1], lines
