"""The RELION 5 particle series as scipion-em-reliontomo's ``RelionSetOfPseudoSubtomograms`` (optional extra).

reliontomo's refine and classify protocols (and the warp plugin's M refinement) take only that class
(``pointerClass='RelionSetOfPseudoSubtomograms'``). The set is built with reliontomo's own functions
(``createSetOfRelionPSubtomograms`` + ``readSetOfPseudoSubtomograms``) from an optimisation set whose paths are
relative to the Scipion project folder, the working folder of reliontomo's steps.

reliontomo is optional (``pip install scipion-em-mspecies[reliontomo]``); without it the export registers no set
for the particle series and :func:`reliontomo_missing` says why. Its converter imports ``scipion.install`` (the
``scipion-app`` package) and reads the RELION version from ``RELION_ENV_ACTIVATION`` / its home at import time.
"""

from __future__ import annotations

from pathlib import Path


def reliontomo_missing() -> str | None:
    """None when reliontomo's set and converter import here; else the reason (import error)."""
    try:
        from pyworkflow.plugin import Domain

        Domain.getPlugins()  # defines the plugins' variables, which reliontomo's converter reads on import
        import reliontomo.convert  # noqa: F401
        import reliontomo.objects  # noqa: F401
    except Exception as error:  # noqa: BLE001 (any import failure means: not usable here)
        return f"scipion-em-reliontomo not usable: {type(error).__name__}: {error}"
    return None


def pseudo_subtomograms(protocol_path: str, optimisation_set: str | Path, coordinates_pointer: object, *,
                        tilt_series_pixel_angst: float, output_pixel_angst: float, box_px: int,
                        acquisition: object):  # noqa: ANN201 (reliontomo's class, imported lazily)
    """A ``RelionSetOfPseudoSubtomograms`` of 2D stacks read by reliontomo from ``optimisation_set``.

    Parameters
    ----------
    protocol_path
        The protocol's folder (the set's sqlite goes there).
    optimisation_set
        Optimisation set whose particle and tomogram paths are relative to the project folder.
    coordinates_pointer
        Pointer to the input ``SetOfCoordinates3D`` (reliontomo keeps it as the set's coordinates).
    tilt_series_pixel_angst, output_pixel_angst
        Å/px of the tilt series and of the stacks (RELION binning = their ratio).
    """
    from reliontomo.convert import readSetOfPseudoSubtomograms
    from reliontomo.objects import createSetOfRelionPSubtomograms

    output = createSetOfRelionPSubtomograms(protocol_path, str(optimisation_set), coordinates_pointer,
                                            tsSamplingRate=tilt_series_pixel_angst,
                                            relionBinning=output_pixel_angst / tilt_series_pixel_angst,
                                            boxSize=box_px, are2dStacks=True, acquisition=acquisition)
    readSetOfPseudoSubtomograms(output)
    return output
