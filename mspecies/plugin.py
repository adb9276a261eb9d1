"""Scipion plugin class for mspecies (imports pwem; never imported by core or formats)."""

import os

import pwem
import pyworkflow.utils as pwutils
from pyworkflow import TOMO

# Environment variable that forces the array backend of the export worker: auto, numpy or cupy.
MSPECIES_BACKEND = "MSPECIES_BACKEND"


class Plugin(pwem.Plugin):
    """Pure-Python plugin: no binaries to install, CuPy is an optional pip extra."""

    _url = "https://github.com/mspecies/scipion-em-mspecies"
    _processingField = [TOMO]
    _pathVars = []
    _supportedVersions = []

    @classmethod
    def _defineVariables(cls):
        cls._defineVar(MSPECIES_BACKEND, "auto", description="Array backend of the export worker: auto, numpy or cupy")

    @classmethod
    def getEnviron(cls):
        return pwutils.Environ(os.environ)

    # The class lives in mspecies.plugin (so that ``import mspecies.core`` never loads pwem), while pyworkflow
    # derives the plugin's name and folder from the class's module: answer for the package instead.
    def getName(self):
        """The plugin (package) name, shown in protocol labels and passed to queue templates."""
        return __package__

    def getPath(self):
        """The package folder (pyworkflow would look for ``__path__`` on this non-package module)."""
        return os.path.dirname(os.path.abspath(__file__))

    @classmethod
    def defineBinaries(cls, env):
        """Nothing to build: mspecies is installed with pip (``[gpu]`` extra for CuPy)."""
