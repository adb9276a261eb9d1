"""Scipion ``SetOfCoordinates3D`` / ``SetOfSubTomograms`` → :class:`ParticlePoses`.

Positions: ``Coordinate3D.getPosition(SCIPION)`` is px at the coordinate set's sampling rate,
relative to the tomogram centre; times that sampling rate gives core's centred Å. Orientations:
the 4x4 Scipion matrix (``convention=None``) → RELION Euler through :mod:`mspecies.convert.poses`.
A sub-tomogram's translation (RELION origin) is subtracted from the position (``position − origin``).
"""

from __future__ import annotations

import numpy as np
from tomo.constants import SCIPION, TR_SCIPION

from mspecies.common.types import InputError, ParticlePoses

from .poses import scipion_matrix_to_relion


def _coordinate_rows(coord, coord_sr: float) -> tuple[np.ndarray, str]:
    """(position Å centred (3,), tomo id) of one Coordinate3D."""
    return np.asarray(coord.getPosition(SCIPION), dtype=np.float64) * coord_sr, coord.getTomoId()


def coordinates_to_poses(coords) -> ParticlePoses:
    """``SetOfCoordinates3D`` → :class:`ParticlePoses` (Å centred, RELION Euler in degrees)."""
    coord_sr = coords.getSamplingRate()
    if not coord_sr:
        raise InputError("coordinates set: no sampling rate (pixel size)")
    positions, names, matrices = [], [], []
    for coord in coords.iterCoordinates():
        position, name = _coordinate_rows(coord, coord_sr)
        positions.append(position)
        names.append(name)
        matrices.append(coord.getMatrix(convention=TR_SCIPION))
    if not positions:
        raise InputError("coordinates set is empty")
    euler, origin = scipion_matrix_to_relion(np.stack(matrices), coord_sr)
    return ParticlePoses(np.stack(positions) - origin, euler, np.asarray(names, dtype=object))


def subtomograms_to_poses(subtomos) -> ParticlePoses:
    """``SetOfSubTomograms`` → :class:`ParticlePoses`; the transform's shift (px at the sub-tomogram
    sampling rate) is the RELION origin and is subtracted from the coordinate position."""
    coords = subtomos.getCoordinates3D()
    if coords is None or not coords.getSamplingRate():
        raise InputError("sub-tomograms: no Coordinates3D with a sampling rate attached to the set")
    coord_sr, subtomo_sr = coords.getSamplingRate(), subtomos.getSamplingRate()
    positions, names, eulers = [], [], []
    for subtomo in subtomos.iterSubtomos():
        position, name = _coordinate_rows(subtomo.getCoordinate3D(), coord_sr)
        euler, origin = scipion_matrix_to_relion(subtomo.getTransform(convention=TR_SCIPION).getMatrix(),
                                                 subtomo_sr)
        positions.append(position - origin)
        names.append(name)
        eulers.append(euler)
    if not positions:
        raise InputError("sub-tomogram set is empty")
    return ParticlePoses(np.stack(positions), np.stack(eulers), np.asarray(names, dtype=object))


def particles_to_poses(particles) -> ParticlePoses:
    """Dispatch on the set type: ``SetOfSubTomograms`` or ``SetOfCoordinates3D``."""
    if hasattr(particles, "iterSubtomos"):
        return subtomograms_to_poses(particles)
    if hasattr(particles, "iterCoordinates"):
        return coordinates_to_poses(particles)
    raise InputError(f"expected SetOfCoordinates3D or SetOfSubTomograms, got {type(particles).__name__}")


def particle_attribute_values(particles, name: str) -> np.ndarray:
    """(N,) values of one attribute of every item (id order, as :func:`particles_to_poses`), e.g. ``_classId``
    or a score stored by another protocol; ``name`` may omit the leading underscore. An item without it is an
    :class:`InputError` naming the set and the attribute."""
    values = []
    for item in particles.iterItems(orderBy="id"):
        attribute = _find_attribute(item, name)
        if attribute is None:
            raise InputError(f"{particles.getObjLabel() or type(particles).__name__}: item {item.getObjId()} has no "
                             f"attribute {name!r} (e.g. _classId, or a score stored by another protocol)")
        values.append(attribute.get() if hasattr(attribute, "get") else attribute)
    return np.asarray(values, dtype=object)


def has_particle_attribute(particles, name: str) -> bool:
    """Whether the set's first item has the attribute ``name`` (or ``_name``)."""
    return _find_attribute(particles.getFirstItem(), name) is not None


SCIPION_NAMES = {"rlnClassNumber": "_classId"}
"""RELION labels whose value Scipion items store under another name (so one form entry serves both sources)."""


def _find_attribute(item, name: str):
    """``item.name`` or ``item._name`` (Scipion stores attributes with a leading underscore), or the Scipion name of
    a RELION label (:data:`SCIPION_NAMES`); None when absent."""
    for candidate in (name, f"_{name.lstrip('_')}", SCIPION_NAMES.get(name, "")):
        if not candidate:
            continue
        attribute = getattr(item, candidate, None)
        if attribute is not None and not callable(attribute):
            return attribute
    return None
