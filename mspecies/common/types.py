"""Plain data classes shared by every layer (no Scipion imports).

Conventions (see ``docs/conventions.md``):

* positions are (x, y, z) in Å, centred on the tomogram centre;
* 2D pixel coordinates are (x, y) with pixel index i centred at coordinate i, and the
  centre of an axis of size N at index ``N // 2``;
* orientations are RELION ZYZ Euler angles (rot, tilt, psi) in degrees;
* a tilt image's 2D alignment is an IMOD ``.xf`` row: ``aligned = A @ raw + d`` in pixels
  relative to the image centre, stored as a (2, 3) matrix ``[A | d]``;
* defocus in Å, underfocus positive, astigmatism angle of the U axis counter-clockwise
  from +X of the raw image (CTFFIND);
* dose is the accumulated dose in e⁻/Å² *including* the tilt itself (Scipion's
  ``getAccumDose``); the pre-exposure of a tilt is ``dose − dose of the tilt``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


class InputError(ValueError):
    """Bad user input; the message names the file, field or parameter and what was expected."""


def _as_1d(name: str, values: object, length: int, dtype: type = np.float64) -> np.ndarray:
    array = np.asarray(values, dtype=dtype)
    if array.shape != (length,):
        raise InputError(f"{name}: expected {length} values (one per tilt), got shape {array.shape}")
    return array


@dataclass(frozen=True)
class Microscope:
    """Optics shared by a tilt series: voltage (kV), spherical aberration (mm), amplitude contrast (0..1)."""

    voltage_kv: float
    cs_mm: float
    amplitude_contrast: float

    def __post_init__(self) -> None:
        if not self.voltage_kv > 0:
            raise InputError(f"voltage_kv must be > 0, got {self.voltage_kv}")
        if not 0.0 <= self.amplitude_contrast < 1.0:
            raise InputError(f"amplitude_contrast must be in [0, 1), got {self.amplitude_contrast}")


@dataclass(frozen=True)
class TiltSeriesData:
    """One raw (non-interpolated) tilt series with its alignment, CTF and dose, one entry per tilt.

    Arrays are in stack order (index t = position of the image in the raw stack, 0-based).
    ``xf`` has shape (T, 2, 3): ``aligned_px = xf[t, :, :2] @ raw_px + xf[t, :, 2]``, both
    relative to the image centre (IMOD ``.xf``). ``acquisition_order`` is 0-based.
    """

    ts_id: str
    pixel_size_angst: float
    image_shape_yx: tuple[int, int]
    tilt_angles_deg: np.ndarray
    xf: np.ndarray
    defocus_u_angst: np.ndarray
    defocus_v_angst: np.ndarray
    defocus_angle_deg: np.ndarray
    dose_e_per_angst2: np.ndarray
    acquisition_order: np.ndarray
    excluded: np.ndarray
    microscope: Microscope
    stack_path: str = ""
    phase_shift_deg: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if not self.pixel_size_angst > 0:
            raise InputError(f"{self.ts_id}: pixel_size_angst must be > 0, got {self.pixel_size_angst}")
        n_tilts = np.asarray(self.tilt_angles_deg).shape[0] if np.ndim(self.tilt_angles_deg) == 1 else -1
        if n_tilts < 1:
            raise InputError(f"{self.ts_id}: tilt_angles_deg must be a non-empty 1D array")
        set_ = object.__setattr__
        set_(self, "image_shape_yx", tuple(int(v) for v in self.image_shape_yx))
        for name in ("tilt_angles_deg", "defocus_u_angst", "defocus_v_angst", "defocus_angle_deg",
                     "dose_e_per_angst2"):
            set_(self, name, _as_1d(f"{self.ts_id}: {name}", getattr(self, name), n_tilts))
        set_(self, "acquisition_order", _as_1d(f"{self.ts_id}: acquisition_order", self.acquisition_order,
                                                n_tilts, np.int64))
        set_(self, "excluded", _as_1d(f"{self.ts_id}: excluded", self.excluded, n_tilts, bool))
        phase = np.zeros(n_tilts) if self.phase_shift_deg is None else self.phase_shift_deg
        set_(self, "phase_shift_deg", _as_1d(f"{self.ts_id}: phase_shift_deg", phase, n_tilts))
        xf = np.asarray(self.xf, dtype=np.float64)
        if xf.shape != (n_tilts, 2, 3):
            raise InputError(f"{self.ts_id}: xf must have shape ({n_tilts}, 2, 3), got {xf.shape}")
        set_(self, "xf", xf)
        if sorted(self.acquisition_order.tolist()) != list(range(n_tilts)):
            raise InputError(f"{self.ts_id}: acquisition_order must be a permutation of 0..{n_tilts - 1}")

    @property
    def n_tilts(self) -> int:
        return int(self.tilt_angles_deg.shape[0])

    @property
    def pre_exposure_e_per_angst2(self) -> np.ndarray:
        """(T,) dose received before each tilt, from the accumulated dose and the acquisition order."""
        order = np.argsort(self.acquisition_order)
        pre = np.zeros(self.n_tilts)
        pre[order[1:]] = self.dose_e_per_angst2[order[:-1]]
        return pre


@dataclass(frozen=True)
class ParticlePoses:
    """N particles: centred positions (Å), RELION Euler angles (deg) and tomogram names.

    The particle in the tomogram is the reference rotated by ``A = euler_to_matrix(rot, tilt, psi)``
    (RELION): ``particle(r) = reference(Aᵀ (r − position))``.
    """

    positions_angst: np.ndarray
    euler_zyz_deg: np.ndarray
    tomo_names: np.ndarray

    def __post_init__(self) -> None:
        positions = np.asarray(self.positions_angst, dtype=np.float64).reshape(-1, 3)
        n = positions.shape[0]
        angles = np.asarray(self.euler_zyz_deg, dtype=np.float64)
        if angles.shape != (n, 3):
            raise InputError(f"euler_zyz_deg must have shape ({n}, 3), got {angles.shape}")
        names = np.asarray(self.tomo_names, dtype=object)
        if names.shape != (n,):
            raise InputError(f"tomo_names must have shape ({n},), got {names.shape}")
        object.__setattr__(self, "positions_angst", positions)
        object.__setattr__(self, "euler_zyz_deg", angles)
        object.__setattr__(self, "tomo_names", names)

    def __len__(self) -> int:
        return int(self.positions_angst.shape[0])

    def subset(self, mask_or_index: np.ndarray) -> ParticlePoses:
        return ParticlePoses(self.positions_angst[mask_or_index], self.euler_zyz_deg[mask_or_index],
                             self.tomo_names[mask_or_index])
