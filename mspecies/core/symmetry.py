"""Point-group symmetry of a reference and the angular distance between two particle orientations.

Groups follow RELION's names and axes (``src/symmetries.cpp``, ``fill_symmetry_class``), proper rotations only:

=======  ==========================================================================  =====
name     generators (n-fold axis in the reference frame, x y z)                      order
=======  ==========================================================================  =====
``Cn``   n along (0, 0, 1)                                                           n
``Dn``   n along (0, 0, 1); 2 along (1, 0, 0)                                        2n
``T``    3 along (0, 0, 1); 2 along (0, √(2/3), √(1/3))                              12
``O``    3 along (1, 1, 1)/√3; 4 along (0, 0, 1)                                     24
``I``    = ``I2``: 2 along (0, 0, 1); 5 along (1, 0, φ)/√(1+φ²)                        60
``I1``   2 along (1, 0, 0); 5 along (φ, 0, −1)/√(1+φ²)                                  60
``I3``   2 along (−1, 0, φ)/√(1+φ²); 5 along (0, 0, 1)                                  60
``I4``   2 along (1, 0, φ)/√(1+φ²); 5 along (2, 0, 1)/√5                                60
=======  ==========================================================================  =====

(φ = golden ratio; RELION also lists a 3-fold axis for I, which the 2- and 5-fold axes already generate). The
whole group is the closure of the generators under multiplication.

Orientation convention (``docs/conventions.md``): a particle with RELION matrix ``A`` is the reference rotated by
``A`` (``particle(r) = reference(Aᵀ r)``). If the reference is invariant under ``R`` (``reference(R r) =
reference(r)`` for every ``R`` of the group), the poses ``A`` and ``A·R`` describe the same particle, so the angular
distance between poses ``A1`` and ``A2`` is ``min over R of angle(Rᵀ·A1ᵀ·A2)``, the rotation angle of a matrix ``Q``
being ``arccos((trace Q − 1) / 2)`` in [0°, 180°] (computed as ``atan2(|skew part of Q|, trace Q − 1)``, exact
to rounding near 0°).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from mspecies.common.euler import euler_to_matrix
from mspecies.common.types import InputError

_GOLDEN = (1.0 + np.sqrt(5.0)) / 2.0
_SNAP = 1e-9  # matrices equal within this (element-wise) are the same group element

# (fold, axis) generators of the fixed groups, RELION's axes (symmetries.cpp)
_FIXED_GENERATORS: dict[str, tuple[tuple[int, tuple[float, float, float]], ...]] = {
    "T": ((3, (0.0, 0.0, 1.0)), (2, (0.0, np.sqrt(2.0 / 3.0), np.sqrt(1.0 / 3.0)))),
    "O": ((3, (1.0, 1.0, 1.0)), (4, (0.0, 0.0, 1.0))),
    # icosahedral: the 2- and 5-fold axes generate the group; RELION's 3-fold axes are elements of it (I3/I4 to
    # 2e-8, the precision of the numbers in symmetries.cpp; tests/test_symmetry.py)
    "I2": ((2, (0.0, 0.0, 1.0)), (5, (1.0, 0.0, _GOLDEN))),
    "I1": ((2, (1.0, 0.0, 0.0)), (5, (_GOLDEN, 0.0, -1.0))),
    "I3": ((2, (-1.0, 0.0, _GOLDEN)), (5, (0.0, 0.0, 1.0))),
    "I4": ((2, (1.0, 0.0, _GOLDEN)), (5, (2.0, 0.0, 1.0))),
}
_FIXED_GENERATORS["I"] = _FIXED_GENERATORS["I2"]
SYMMETRY_HELP = "C1 (none), Cn, Dn, T, O, I (= I2), I1, I2, I3, I4 (RELION's axes)"


def axis_rotation(fold: int, axis_xyz: tuple[float, float, float]) -> np.ndarray:
    """(3, 3) rotation by 360°/fold about ``axis_xyz`` (normalised here; Rodrigues' formula)."""
    axis = np.asarray(axis_xyz, dtype=np.float64)
    axis = axis / np.linalg.norm(axis)
    angle = 2.0 * np.pi / fold
    cross = np.array([[0.0, -axis[2], axis[1]], [axis[2], 0.0, -axis[0]], [-axis[1], axis[0], 0.0]])
    return np.cos(angle) * np.eye(3) + np.sin(angle) * cross + (1.0 - np.cos(angle)) * np.outer(axis, axis)


def _closure(generators: list[np.ndarray]) -> np.ndarray:
    """(G, 3, 3) every product of the generators (the group they generate), identity first."""
    elements = [np.eye(3)]
    frontier = [np.eye(3)]
    while frontier:
        grown = []
        for element in frontier:
            for generator in generators:
                product = generator @ element
                if not any(np.abs(product - known).max() < _SNAP for known in elements):
                    elements.append(product)
                    grown.append(product)
        frontier = grown
        if len(elements) > 120:
            raise AssertionError("symmetry closure did not converge (bad generators)")
    return np.stack(elements)


def parse_symmetry(name: str) -> tuple[str, list[tuple[int, tuple[float, float, float]]]]:
    """Canonical name (upper case, ``I`` → ``I2``) and its (fold, axis) generators; unknown → InputError."""
    text = str(name).strip().upper()
    if text in _FIXED_GENERATORS:
        return ("I2" if text == "I" else text), list(_FIXED_GENERATORS[text])
    if len(text) >= 2 and text[0] in "CD" and text[1:].isdigit() and int(text[1:]) >= 1:
        fold = int(text[1:])
        generators = [(fold, (0.0, 0.0, 1.0))] if fold > 1 else []
        if text[0] == "D":
            generators.append((2, (1.0, 0.0, 0.0)))
        return f"{text[0]}{fold}", generators
    raise InputError(f"symmetry {name!r} is not known; expected {SYMMETRY_HELP}")


@lru_cache(maxsize=32)
def _group_cached(canonical: str) -> np.ndarray:
    _, generators = parse_symmetry(canonical)
    group = _closure([axis_rotation(fold, axis) for fold, axis in generators])
    group.setflags(write=False)
    return group


def symmetry_matrices(name: str) -> np.ndarray:
    """(G, 3, 3) rotations of the point group ``name`` (RELION's names and axes), identity first."""
    canonical, _ = parse_symmetry(name)
    return _group_cached(canonical)


def angular_distance_deg(old_matrices: np.ndarray, new_matrices: np.ndarray, symmetry: str = "C1") -> np.ndarray:
    """Smallest rotation angle (deg) between paired poses over the reference's symmetry.

    Parameters
    ----------
    old_matrices, new_matrices : (K, 3, 3)
        RELION matrices ``A`` (reference → particle) of the paired particles.
    symmetry
        Point group of the reference (see the module docstring).

    Returns
    -------
    (K,) float64 in [0, 180]: ``min over R of angle(Rᵀ·A_oldᵀ·A_new)``.
    """
    group = symmetry_matrices(symmetry)
    relative = np.swapaxes(np.asarray(old_matrices, np.float64), -1, -2) @ np.asarray(new_matrices, np.float64)
    if len(group) > 1 and len(relative):
        # trace(Rᵀ·Q) = Σ_ij R_ij Q_ij for every group element R at once ((K, 9) @ (9, G)); keep the best Rᵀ·Q
        best = np.argmax(relative.reshape(-1, 9) @ group.reshape(-1, 9).T, axis=1)
        relative = np.swapaxes(group[best], -1, -2) @ relative
    return rotation_angle_deg(relative)


def rotation_angle_deg(matrices: np.ndarray) -> np.ndarray:
    """(K,) rotation angles (deg, [0, 180]) of (K, 3, 3) rotations: ``atan2(|skew part|, trace − 1)``, which is
    exact to rounding also near 0° and 180° (``arccos((trace − 1) / 2)`` loses half the digits there)."""
    q = np.asarray(matrices, np.float64)
    trace = q[..., 0, 0] + q[..., 1, 1] + q[..., 2, 2]
    skew = np.stack([q[..., 2, 1] - q[..., 1, 2], q[..., 0, 2] - q[..., 2, 0], q[..., 1, 0] - q[..., 0, 1]], axis=-1)
    return np.rad2deg(np.arctan2(np.linalg.norm(skew, axis=-1), trace - 1.0))


def angular_distance_from_euler_deg(old_euler_zyz_deg: np.ndarray, new_euler_zyz_deg: np.ndarray,
                                    symmetry: str = "C1") -> np.ndarray:
    """:func:`angular_distance_deg` for (K, 3) RELION Euler angles (rot, tilt, psi) in degrees."""
    return angular_distance_deg(euler_to_matrix(old_euler_zyz_deg), euler_to_matrix(new_euler_zyz_deg), symmetry)
