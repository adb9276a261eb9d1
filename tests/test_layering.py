"""Layering: the one-way floors of DESIGN.md (read from every module's imports), core/formats/synth/cli never
load Scipion; the plugin, its entry point, protocols.conf and protocols are discoverable (fresh interpreters); the
package's tests import only what an installed plugin's Scipion environment holds."""

import ast
import importlib.metadata
import importlib.util
import os
import re
import subprocess
import sys
import tempfile

SCIPION_PREFIXES = ("pyworkflow", "pwem", "tomo")
PURE_MODULES = ["mspecies", "mspecies.common.types", "mspecies.common.euler", "mspecies.core.geometry",
                "mspecies.core.ctf", "mspecies.core.reconstruct", "mspecies.core.assignment", "mspecies.synth.dataset",
                "mspecies.synth.manifest",
                "mspecies.synth.check", "mspecies.formats.imod", "mspecies.formats.star", "mspecies.formats.star_write",
                "mspecies.cli", "mspecies.cli.export", "mspecies.cli.intersect_files", "mspecies.cli.qc"]
PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "mspecies")
# Which mspecies packages each floor may import (its own always). Data flows Scipion -> convert -> core -> files.
ALLOWED = {
    "common": set(),
    "core": {"common"},
    "formats": {"common"},
    "synth": {"common", "core", "formats"},
    "cli": {"common", "core", "formats", "synth", "convert", "protocols", "scipion_env"},  # the last 3: demo, lazily
    "convert": {"common", "core", "formats"},
}


def _mspecies_imports(path: str, package: str) -> list[tuple[int, str]]:
    """(line, first-level mspecies package) of every import in a module, relative ones resolved."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                names = [node.module or ""]
            elif node.level == 1:
                names = [f"mspecies.{package}"]
            else:
                names = [f"mspecies.{node.module}" if node.module else "mspecies"]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "mspecies" and len(parts) > 1:
                found.append((node.lineno, parts[1]))
    return found


def test_floors_import_only_downwards():
    wrong = []
    for package, allowed in ALLOWED.items():
        for folder, _, files in os.walk(os.path.join(PACKAGE, package)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    wrong += [f"{os.path.relpath(path, PACKAGE)}:{line} imports mspecies.{target}"
                              for line, target in _mspecies_imports(path, package)
                              if target != package and target not in allowed]
    assert wrong == [], "\n".join(wrong)


def test_floor_check_sees_a_wrong_import(tmp_path):
    module = tmp_path / "bad.py"
    module.write_text("from mspecies.formats import mrc\nfrom ..cli import main\nfrom .types import X\n")
    assert _mspecies_imports(str(module), "core") == [(1, "formats"), (2, "cli"), (3, "core")]


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


def _top_level_imports(path: str) -> list[tuple[int, str]]:
    """(line, top-level module) of every absolute import in a module."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module.split(".")[0]))
    return found


def _outside_plugin_environment(path: str) -> list[tuple[int, str]]:
    """Imports of a module that neither the standard library, mspecies nor a distribution the plugin requires
    (requirements.txt: Scipion, tomo, numpy, ...) provides: what Scipion's runner could not import."""
    requirements = os.path.join(os.path.dirname(PACKAGE), "requirements.txt")
    required = {re.split(r"[<>=!~\[; ]", line.strip())[0].lower().replace("_", "-")
                for line in open(requirements, encoding="utf-8") if line.strip() and not line.startswith("#")}
    providers = importlib.metadata.packages_distributions()
    return [(line, name) for line, name in _top_level_imports(path)
            if name not in sys.stdlib_module_names and name != "mspecies"
            and not {d.lower().replace("_", "-") for d in providers.get(name, [])} & required]


def test_package_tests_import_only_what_a_plugin_environment_holds():
    folder = os.path.join(PACKAGE, "tests")
    wrong = [f"mspecies/tests/{name}:{line} imports {module}" for name in sorted(os.listdir(folder))
             if name.endswith(".py") for line, module in _outside_plugin_environment(os.path.join(folder, name))]
    assert wrong == [], "\n".join(wrong)


def test_plugin_environment_check_sees_pytest_and_the_repository_tests(tmp_path):
    module = tmp_path / "test_bad.py"
    module.write_text("import os\nimport numpy as np\nimport pytest\nfrom tests._relion import require_relion\n"
                      "from pyworkflow.tests import BaseTest\nfrom mspecies.tests.checks import require_relion\n")
    assert _outside_plugin_environment(str(module)) == [(3, "pytest"), (4, "tests")]


def test_a_command_imports_only_its_own_module():
    """``python -m mspecies export`` builds the export's parser alone: the assignment (scipy.optimize) and STAR
    dialect modules of intersect and convert stay unloaded; the full parser still lists every command."""
    code = ("import sys; from mspecies.cli.main import build_parser; build_parser('export'); "
            "print(sorted(name for name in ('mspecies.cli.intersect', 'mspecies.cli.convert', "
            "'mspecies.core.assignment', 'scipy.optimize') if name in sys.modules)); "
            "print(sorted(build_parser()._subparsers._group_actions[0].choices))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["[]", "['convert', 'demo', 'export', 'intersect', 'synth']"]
