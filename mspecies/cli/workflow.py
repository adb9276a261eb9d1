"""Scipion-side helper: import a synthetic mspecies dataset (``mspecies.synth.dataset``) into a project.

One function, :func:`import_synthetic_dataset`, used by the protocol tests and the demo. It runs,
as real protocol subprocesses: our mdoc tilt-series importer (tomo's ``ProtImportTs`` hangs on this
stack, see protocol_import_tilt_series.py), our
alignment importer (IMOD ``.xf``), our CTF importer (IMOD ``.defocus``), tomo's
``ProtImportTomograms`` (binned tomograms) and our STAR particle importer (oriented coordinates).
Needs a headless Scipion environment (:func:`mspecies.scipion_env.configure_headless_scipion`).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

from mspecies.common.types import InputError


@contextlib.contextmanager
def inside_project(project) -> Iterator[None]:
    """chdir into the project folder (``launchProtocol`` needs it) and back."""
    previous = os.getcwd()
    os.chdir(project.getPath())
    try:
        yield
    finally:
        os.chdir(previous)


def launch(project, prot_class, label: str, **params):
    """Create, launch (wait) and return a finished protocol; raise with its log tail if it fails."""
    prot = project.newProtocol(prot_class, objLabel=label, **params)
    with inside_project(project):
        project.launchProtocol(prot, wait=True)
    if not prot.isFinished():
        tail = "\n".join(prot.getLogsLastLines(30, logFile=1) or prot.getLogsLastLines(30) or [])
        raise RuntimeError(f"protocol '{label}' ended {prot.getStatus()}: {prot.getErrorMessage()}\n{tail}")
    return prot


def _dataset_info(manifest_path: Path) -> dict:
    """The few manifest values the import needs (pixel sizes Å, optics, tsIds, file names)."""
    manifest = json.loads(Path(manifest_path).read_text())
    series = {entry["ts_id"]: entry for entry in manifest["tilt_series"]}
    first = next(iter(series.values()))
    return {
        "root": Path(manifest_path).resolve().parent,
        "ts_ids": list(series),
        "pixel_size_angst": float(first["pixel_size_angst"]),
        "tomogram_pixel_size_angst": float(first["tomogram_pixel_size_angst"]),
        "unbinned_tomogram_size_xyz": " ".join(str(v) for v in first["unbinned_tomogram_shape_zyx"][::-1]),
        "tomogram_files": {ts_id: entry["tomogram_file"] for ts_id, entry in series.items()},
        "voltage_kv": float(manifest["voltage_kv"]),
        "cs_mm": float(manifest["cs_mm"]),
        "amplitude_contrast": float(manifest["amplitude_contrast"]),
        "box_px": int(manifest["box_px"]),
        "star": str(Path(manifest_path).resolve().parent / manifest.get("particles_star", "particles.star")),
    }


def _link_tomograms(info: dict, folder: Path) -> Path:
    """Flat folder of symlinks ``<tsId>.mrc`` (tomo's tomogram importer does not recurse into folders)."""
    folder.mkdir(parents=True, exist_ok=True)
    for ts_id, rel in info["tomogram_files"].items():
        source = info["root"] / rel
        if not source.is_file():
            raise InputError(f"tomogram of {ts_id} not found: {source}")
        link = folder / f"{ts_id}.mrc"
        if not link.exists():
            link.symlink_to(source)
    return folder


def import_synthetic_dataset(project, manifest_path: str | os.PathLike[str]) -> dict:
    """Import a synthetic dataset into ``project``; return the finished protocols and their outputs.

    Keys: ``prot_ts``, ``prot_alignment``, ``prot_ctf``, ``prot_tomograms``, ``prot_coordinates`` (protocols)
    and ``tilt_series`` (aligned SetOfTiltSeries), ``ctfs`` (SetOfCTFTomoSeries), ``tomograms``,
    ``coordinates`` (SetOfCoordinates3D).
    """
    from tomo.protocols import ProtImportTomograms

    from mspecies.protocols import (
        ProtMSpeciesImportParticlesStar,
        ProtMSpeciesImportTiltSeries,
        ProtMSpeciesImportTsAlignment,
        ProtMSpeciesImportTsCtf,
    )

    info = _dataset_info(Path(manifest_path))
    root = str(info["root"])
    prot_ts = launch(project, ProtMSpeciesImportTiltSeries, "import tilt series (mdoc)", filesPath=root,
                     filesPattern="{TS}/{TS}.mrc.mdoc", samplingRate=info["pixel_size_angst"],
                     voltage=info["voltage_kv"], sphericalAberration=info["cs_mm"],
                     amplitudeContrast=info["amplitude_contrast"])
    prot_ali = launch(project, ProtMSpeciesImportTsAlignment, "import alignment (xf)",
                      inputSetOfTiltSeries=prot_ts.TiltSeries, filesPath=root, filesPattern="{TS}/{TS}.xf")
    prot_ctf = launch(project, ProtMSpeciesImportTsCtf, "import CTF (defocus)",
                      inputSetOfTiltSeries=prot_ali.TiltSeries, filesPath=root, filesPattern="{TS}/{TS}.defocus",
                      fileFormat=0)
    links = _link_tomograms(info, Path(project.getPath()) / "mspecies_links")
    prot_tomo = launch(project, ProtImportTomograms, "import tomograms", filesPath=str(links),
                       filesPattern="{TS}.mrc", samplingRate=info["tomogram_pixel_size_angst"],
                       voltage=info["voltage_kv"], sphericalAberration=info["cs_mm"],
                       amplitudeContrast=info["amplitude_contrast"])
    prot_coords = launch(project, ProtMSpeciesImportParticlesStar, "import coordinates (STAR)",
                         inputTomograms=prot_tomo.Tomograms, starFile=info["star"],
                         tomoSize=info["unbinned_tomogram_size_xyz"],
                         boxSize=max(1, round(info["box_px"] * info["pixel_size_angst"]
                                              / info["tomogram_pixel_size_angst"])))
    return {"prot_ts": prot_ts, "prot_alignment": prot_ali, "prot_ctf": prot_ctf, "prot_tomograms": prot_tomo,
            "prot_coordinates": prot_coords, "tilt_series": prot_ali.TiltSeries, "ctfs": prot_ctf.CTFs,
            "tomograms": prot_tomo.Tomograms, "coordinates": prot_coords.Coordinates3D}
