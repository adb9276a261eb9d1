"""A chiral, asymmetric ground-truth particle made of isotropic 3D Gaussian blobs.

The blob list is the ground truth: projections of a Gaussian blob are analytic (a 2D Gaussian of the
same mass and sigma), so simulated tilt images need no interpolation of a voxel map.

Frame: blob centres (x, y, z) in Å relative to the box centre; a voxel map is indexed ``[z, y, x]``
with voxel index i centred at coordinate ``(i − N // 2) · pixel_size``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BlobModel:
    """Isotropic Gaussian blobs: density(r) = Σ_b mass_b · N(r; centre_b, sigma_b² I).

    Attributes
    ----------
    centres_angst
        (B, 3) blob centres (x, y, z) in Å relative to the box centre (mass-weighted centre at 0).
    sigmas_angst
        (B,) standard deviations in Å.
    masses
        (B,) integrated densities in Å³ (density is dimensionless; each default blob peaks at 1).
    """

    centres_angst: np.ndarray
    sigmas_angst: np.ndarray
    masses: np.ndarray

    def rotated(self, matrix: np.ndarray) -> BlobModel:
        """The model with every centre mapped by the (3, 3) matrix (``r → M r``)."""
        return BlobModel(self.centres_angst @ np.asarray(matrix).T, self.sigmas_angst, self.masses)


def make_blob_model(box_px: int, pixel_size_angst: float) -> BlobModel:
    """The default phantom: a right-handed helix of 9 blobs of decreasing size plus an off-axis arm.

    The particle spans about 60 % of the box (``box_px · pixel_size_angst`` Å). The helix winds
    counter-clockwise (seen from +z) while rising along +z (right-handed); a two-blob arm sticks out
    sideways at one end, so the model has no symmetry and its mirror image differs.
    """
    length = box_px * pixel_size_angst
    turns = np.linspace(0.0, 1.5 * 2 * np.pi, 9)
    helix_radius, height = 0.14 * length, 0.30 * length
    helix = np.column_stack([helix_radius * np.cos(turns), helix_radius * np.sin(turns),
                             height * (turns / turns[-1] - 0.5)])
    helix_sigmas = np.linspace(0.045, 0.025, turns.size) * length
    arm = np.array([[0.06, -0.03, 0.19], [0.14, -0.12, 0.20]]) * length
    arm_sigmas = np.array([0.035, 0.028]) * length
    centres = np.vstack([helix, arm])
    sigmas = np.concatenate([helix_sigmas, arm_sigmas])
    masses = (2 * np.pi * sigmas**2) ** 1.5  # every blob peaks at density 1
    centre_of_mass = masses @ centres / masses.sum()
    return BlobModel(centres - centre_of_mass, sigmas, masses)


def render_blob_map(model: BlobModel, box_px: int, pixel_size_angst: float) -> np.ndarray:
    """Sample the blob density on a cubic grid → (box, box, box) float32 ``[z, y, x]``, dimensionless density."""
    axis = (np.arange(box_px) - box_px // 2) * pixel_size_angst
    volume = np.zeros((box_px,) * 3)
    for (cx, cy, cz), sigma, mass in zip(model.centres_angst, model.sigmas_angst, model.masses, strict=True):
        norm = mass / (2 * np.pi * sigma**2) ** 1.5
        gx, gy, gz = (np.exp(-((axis - c) ** 2) / (2 * sigma**2)) for c in (cx, cy, cz))
        volume += norm * gz[:, None, None] * gy[None, :, None] * gx[None, None, :]
    return volume.astype(np.float32)


def make_phantom_map(box_px: int, pixel_size_angst: float) -> np.ndarray:
    """The default phantom (:func:`make_blob_model`) as a (box, box, box) float32 map ``[z, y, x]``."""
    return render_blob_map(make_blob_model(box_px, pixel_size_angst), box_px, pixel_size_angst)


def model_inner_product(a: BlobModel, b: BlobModel) -> float:
    """Analytic ∫ ρ_a ρ_b d³r of two blob models (Gaussian overlap integrals)."""
    variance = a.sigmas_angst[:, None] ** 2 + b.sigmas_angst[None, :] ** 2
    distance2 = np.sum((a.centres_angst[:, None, :] - b.centres_angst[None, :, :]) ** 2, axis=-1)
    overlap = np.exp(-distance2 / (2 * variance)) / (2 * np.pi * variance) ** 1.5
    return float(a.masses @ overlap @ b.masses)


def model_correlation(a: BlobModel, b: BlobModel) -> float:
    """Normalised correlation ⟨ρ_a, ρ_b⟩ / (‖ρ_a‖ ‖ρ_b‖) of two blob models (1 for identical models)."""
    return model_inner_product(a, b) / np.sqrt(model_inner_product(a, a) * model_inner_product(b, b))


def mirrored(model: BlobModel) -> BlobModel:
    """The mirror image (z → −z) of a blob model: opposite handedness."""
    return model.rotated(np.diag([1.0, 1.0, -1.0]))
