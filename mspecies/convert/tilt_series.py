"""Scipion ``SetOfTiltSeries`` (+ alignment) and ``SetOfCTFTomoSeries`` → :class:`TiltSeriesData`.

Units: pixel size Å/px; ``xf`` IMOD rows in px of the tilt series (``aligned = A·raw + d``, centred);
defocus Å (underfocus positive), astigmatism angle degrees (CTFFIND, as ``CTFTomo`` holds it);
accumulated dose e⁻/Å² including the tilt (``TomoAcquisition.getAccumDose``). Arrays are in
raw-stack order (``TiltImage.getIndex()``, 1-based in Scipion, 0-based position here).
"""

from __future__ import annotations

import numpy as np

from mspecies.common.types import InputError, Microscope, TiltSeriesData


def _sorted_tilt_images(ts) -> list:
    """Clones of the tilt images of ``ts`` sorted by their 1-based stack index."""
    images = [ti.clone() for ti in ts.iterItems()]
    if not images:
        raise InputError(f"tilt series {ts.getTsId()}: it has no tilt images")
    return sorted(images, key=lambda ti: ti.getIndex())


def _xf_of(ts, images: list) -> np.ndarray:
    """(T, 2, 3) IMOD transforms of the tilt images; clear error if the series is unaligned or interpolated."""
    ts_id = ts.getTsId()
    if ts.interpolated():
        raise InputError(f"tilt series {ts_id}: it is interpolated (alignment applied to the pixels); "
                         "mspecies needs the raw tilt series with its alignment transforms")
    if not ts.hasAlignment() or any(ti.getTransform() is None for ti in images):
        raise InputError(f"tilt series {ts_id}: it has no alignment (no transform per tilt image); import the "
                         "IMOD .xf with 'mspecies - import tilt-series alignment' or align it first")
    return np.stack([np.asarray(ti.getTransform().getMatrix(), dtype=np.float64)[:2, :3] for ti in images])


def _ctf_of(ctf_series, images: list, ts_id: str) -> np.ndarray:
    """(T, 4) defocus U, V (Å), angle (deg), phase shift (deg) matched by acquisition order."""
    if ctf_series is None:
        raise InputError(f"tilt series {ts_id}: no CTF estimation for this tsId in the CTF set")
    rows = []
    for ti in images:
        ctf = ctf_series.getCtfTomoFromTi(ti, onlyEnabled=False)
        if ctf is None:
            raise InputError(f"tilt series {ts_id}: no CTF for the tilt image with acquisition order "
                             f"{ti.getAcquisitionOrder()} (stack index {ti.getIndex()})")
        phase = ctf.getPhaseShift() if ctf.hasPhaseShift() else 0.0
        rows.append((ctf.getDefocusU(), ctf.getDefocusV(), ctf.getDefocusAngle(), phase or 0.0))
    return np.asarray(rows, dtype=np.float64)


def _microscope_of(ts, fallback_acquisition=None) -> Microscope:
    """Voltage (kV), Cs (mm) and amplitude contrast of the tilt series (or the set's acquisition)."""
    for acq in (ts.getAcquisition(), fallback_acquisition):
        if acq is not None and acq.getVoltage():
            return Microscope(voltage_kv=float(acq.getVoltage()), cs_mm=float(acq.getSphericalAberration()),
                              amplitude_contrast=float(acq.getAmplitudeContrast()))
    raise InputError(f"tilt series {ts.getTsId()}: acquisition has no voltage")


def _zero_based_order(images: list) -> np.ndarray:
    """Acquisition order normalised to 0..T-1 (Scipion imports may be 1-based)."""
    raw = np.array([ti.getAcquisitionOrder() for ti in images], dtype=np.float64)
    if np.any(np.isnan(raw)):
        raise InputError(f"tilt series {images[0].getTsId()}: tilt images without acquisition order")
    return np.argsort(np.argsort(raw, kind="stable"), kind="stable")


def tilt_series_to_data(ts, ctf_series, set_acquisition=None) -> TiltSeriesData:
    """One Scipion ``TiltSeries`` with alignment and its ``CTFTomoSeries`` → :class:`TiltSeriesData`."""
    ts_id = ts.getTsId()
    pixel_size = ts.getSamplingRate()
    if not pixel_size:
        raise InputError(f"tilt series {ts_id}: no pixel size (samplingRate)")
    images = _sorted_tilt_images(ts)
    ctf = _ctf_of(ctf_series, images, ts_id)
    x_dim, y_dim, _ = images[0].getDim()
    return TiltSeriesData(
        ts_id=ts_id, pixel_size_angst=float(pixel_size), image_shape_yx=(int(y_dim), int(x_dim)),
        tilt_angles_deg=[ti.getTiltAngle() for ti in images], xf=_xf_of(ts, images),
        defocus_u_angst=ctf[:, 0], defocus_v_angst=ctf[:, 1], defocus_angle_deg=ctf[:, 2],
        dose_e_per_angst2=[ti.getAcquisition().getAccumDose() or 0.0 for ti in images],
        acquisition_order=_zero_based_order(images), excluded=[not ti.isEnabled() for ti in images],
        microscope=_microscope_of(ts, set_acquisition), stack_path=str(images[0].getFileName()),
        phase_shift_deg=ctf[:, 3])


def tilt_series_set_to_data(ts_set, ctf_set, ts_ids: list[str] | None = None) -> dict[str, TiltSeriesData]:
    """``SetOfTiltSeries`` + ``SetOfCTFTomoSeries`` → {tsId: TiltSeriesData} (all tsIds or ``ts_ids``)."""
    ctf_by_id = {ctf.getTsId(): ctf.clone() for ctf in ctf_set.iterItems()} if ctf_set is not None else {}
    wanted = None if ts_ids is None else set(ts_ids)
    result = {}
    for ts in ts_set.iterItems():
        ts_id = ts.getTsId()
        if wanted is not None and ts_id not in wanted:
            continue
        result[ts_id] = tilt_series_to_data(ts.clone(), ctf_by_id.get(ts_id), ts_set.getAcquisition())
    missing = (wanted or set()) - set(result)
    if missing:
        raise InputError(f"tsIds not found in the tilt-series set: {sorted(missing)}")
    return result
