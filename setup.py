"""Packaging for scipion-em-mspecies (import name ``mspecies``).

The version is parsed from ``mspecies/__init__.py`` with a regex so that building the
package never imports pyworkflow (which would break pip's build isolation).
"""

import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(
    r'^__version__\s*=\s*"([^"]+)"', (HERE / "mspecies" / "__init__.py").read_text(), re.M
).group(1)

setup(
    name="scipion-em-mspecies",
    version=VERSION,
    description="M-style particle-set intersection and sub-tomogram + 3D CTF export for Scipion",
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    license="GPL-3.0-or-later",
    python_requires=">=3.11,<3.12",
    packages=find_packages(include=["mspecies", "mspecies.*"]),
    package_data={"mspecies": ["protocols.conf", "icon.png", "templates/*"]},
    install_requires=[line.strip() for line in (HERE / "requirements.txt").read_text().splitlines()
                      if line.strip() and not line.startswith("#")],
    extras_require={
        "gpu": ["cupy-cuda12x<14"],
        "test": ["pytest==9.2.0", "hypothesis==6.170.17", "ruff==0.17.6"],
        # RELION 5 particle series as reliontomo's RelionSetOfPseudoSubtomograms (mspecies/convert/reliontomo.py);
        # its converter imports scipion.install (scipion-app) without declaring it
        "reliontomo": ["scipion-em-reliontomo==4.0.5", "scipion-app"],
    },
    entry_points={"pyworkflow.plugin": ["mspecies = mspecies"]},
    keywords=["scipion", "cryoem", "cryoet", "imageprocessing", "scipion-3.0"],
    classifiers=["Programming Language :: Python :: 3.11"],
)
