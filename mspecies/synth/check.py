"""Self-check of a synthetic dataset: from the written files alone, the particles are where the STAR says.

Kept apart from :mod:`mspecies.synth.dataset` (which writes the dataset) so that the check reads only files.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import scipy.fft
from scipy import ndimage

from mspecies.common.types import Microscope, TiltSeriesData
from mspecies.core import geometry
from mspecies.core.ctf import ctf_2d, rfft_frequencies
from mspecies.formats import imod
from mspecies.formats.mrc import read_mrc
from mspecies.formats.star import read_relion31_particles

from .dataset import WORKERS
from .manifest import load_manifest


def _files_tilt_series(root: Path, entry: dict[str, object], microscope: Microscope) -> tuple[np.ndarray,
                                                                                               TiltSeriesData]:
    """Raw stack and geometry read back from the written files (stack, .tlt, .xf, .defocus)."""
    files = entry["files"]
    stack, pixel = read_mrc(root / files["stack"], mmap=True)  # type: ignore[index]
    angles = imod.read_tlt(root / files["tlt"])  # type: ignore[index]
    ctf = imod.read_imod_defocus(root / files["defocus"])  # type: ignore[index]
    n = angles.size
    tilt_series = TiltSeriesData(
        ts_id=str(entry["ts_id"]), pixel_size_angst=pixel, image_shape_yx=stack.shape[1:], tilt_angles_deg=angles,
        xf=imod.read_xf(root / files["xf"]), defocus_u_angst=ctf["defocus_u_angst"],  # type: ignore[index]
        defocus_v_angst=ctf["defocus_v_angst"], defocus_angle_deg=ctf["defocus_angle_deg"],
        dose_e_per_angst2=np.zeros(n), acquisition_order=np.arange(n), excluded=np.zeros(n, bool),
        microscope=microscope)
    return stack, tilt_series


def extract_patches(stack: np.ndarray, raw_px: np.ndarray, size_px: int) -> tuple[np.ndarray, np.ndarray]:
    """Integer-cropped (N, T, S, S) patches around raw positions and the fractional remainder.

    Parameters
    ----------
    stack
        (T, ny, nx) raw images.
    raw_px
        (N, T, 2) (x, y) raw pixel positions.
    size_px
        Patch size S; the position lands at patch pixel ``S // 2 + fraction`` (zeros outside the image).

    Returns
    -------
    patches (N, T, S, S) float64 and fraction (N, T, 2) in [−0.5, 0.5] px.
    """
    n_tilts = stack.shape[0]
    padded = np.pad(np.asarray(stack, dtype=np.float32), ((0, 0), (size_px, size_px), (size_px, size_px)))
    nearest = np.rint(raw_px).astype(np.int64)
    corner = nearest - size_px // 2 + size_px
    steps = np.arange(size_px)
    rows = np.clip(corner[..., 1, None] + steps, 0, padded.shape[1] - 1)  # (N, T, S)
    cols = np.clip(corner[..., 0, None] + steps, 0, padded.shape[2] - 1)
    tilt_index = np.arange(n_tilts)[None, :, None, None]
    patches = padded[tilt_index, rows[..., :, None], cols[..., None, :]]
    return patches.astype(np.float64), raw_px - nearest


def _average_patches(stack: np.ndarray, tilt_series: TiltSeriesData, positions_angst: np.ndarray, size_px: int,
                     lowpass_angst: float, defocus_gradient_sign: int, chunk: int = 16) -> np.ndarray:
    """(T, S, S) average over particles of re-centred, phase-flipped, low-passed, contrast-inverted patches."""
    pixel = tilt_series.pixel_size_angst
    raw, height = geometry.project_positions_to_tilts(positions_angst, tilt_series)
    defocus_u, defocus_v = geometry.particle_defocus_angst(tilt_series, height, defocus_gradient_sign)
    freq_x, freq_y = rfft_frequencies((size_px, size_px), pixel)
    lowpass = np.exp(-(freq_x**2 + freq_y**2) * lowpass_angst**2 / 2)
    cx, cy = freq_x * pixel, freq_y * pixel  # cycles per pixel
    total = np.zeros((tilt_series.n_tilts, size_px, size_px // 2 + 1), dtype=np.complex128)
    for start in range(0, raw.shape[0], chunk):
        stop = start + chunk
        patches, fraction = extract_patches(stack, raw[start:stop], size_px)
        spectrum = scipy.fft.rfft2(patches, workers=WORKERS)
        shift = np.exp(2j * np.pi * (cx * fraction[..., 0, None, None] + cy * fraction[..., 1, None, None]))
        flip = np.sign(ctf_2d(freq_x, freq_y, defocus_u[start:stop, :, None, None],
                              defocus_v[start:stop, :, None, None], tilt_series.defocus_angle_deg[:, None, None],
                              tilt_series.microscope))
        total -= np.sum(spectrum * shift * flip, axis=0)
    # WBP weight |k| perpendicular to the tilt axis: the aligned x frequency of each raw frequency (xf rotation).
    ramp = np.abs(tilt_series.xf[:, 0, 0, None, None] * cx + tilt_series.xf[:, 0, 1, None, None] * cy) + 1.0 / size_px
    total *= lowpass * ramp
    return scipy.fft.irfft2(total / raw.shape[0], s=(size_px, size_px), workers=WORKERS)


def back_project_local(average: np.ndarray, tilt_series: TiltSeriesData) -> np.ndarray:
    """Real-space back-projection of (T, S, S) particle-centred raw patches into an (S, S, S) local volume.

    Voxel offset v = (x, y, z) px from the particle maps to raw offset ``A_t⁻¹ (R_θ v)[:2]`` (the ``.xf``
    shift cancels for offsets). Returns the unweighted sum over tilts, indexed [z, y, x], centre at S // 2.
    """
    size = average.shape[-1]
    offsets = np.arange(size) - size // 2
    z, y, x = np.meshgrid(offsets, offsets, offsets, indexing="ij")
    voxels = np.stack([x.ravel(), y.ravel(), z.ravel()], axis=1).astype(np.float64)
    aligned = np.einsum("tij,vj->tvi", geometry.tilt_rotation(tilt_series.tilt_angles_deg)[:, :2, :], voxels)
    raw = np.einsum("tij,tvj->tvi", np.linalg.inv(tilt_series.xf[:, :, :2]), aligned) + size // 2
    volume = np.zeros(voxels.shape[0])
    for t in range(tilt_series.n_tilts):
        volume += ndimage.map_coordinates(average[t], [raw[t, :, 1], raw[t, :, 0]], order=1, mode="constant")
    return volume.reshape(size, size, size)


def volume_peak_metrics(volume: np.ndarray, radius_px: float, iterations: int = 20) -> dict[str, float]:
    """Blob centre (px from the box centre) and central contrast of a white-protein local volume.

    ``peak_xyz_px``: mean-shift centroid of the positive density within ``radius_px`` (start at the centre,
    re-centre the sphere on the centroid until it moves < 0.01 px); ``peak_offset_px`` its distance from the
    centre. ``contrast``: mean density within ``radius_px / 2`` of the centre divided by the volume's sd.
    """
    size = volume.shape[0]
    grid = np.stack(np.meshgrid(*(np.arange(size),) * 3, indexing="ij"), -1).reshape(-1, 3) - size // 2
    values = np.clip(volume.reshape(-1), 0.0, None)
    centre = np.zeros(3)
    for _ in range(iterations):
        weight = values * (np.linalg.norm(grid - centre, axis=1) <= radius_px)
        if weight.sum() <= 0:
            break
        previous, centre = centre, weight @ grid / weight.sum()
        if np.linalg.norm(centre - previous) < 0.01:
            break
    central = np.linalg.norm(grid, axis=1) <= radius_px / 2
    return {"peak_offset_px": float(np.linalg.norm(centre)), "peak_xyz_px": [float(v) for v in centre[::-1]],
            "contrast": float(np.mean(volume.reshape(-1)[central]) / np.std(volume))}


def self_check(manifest_path: str | Path, *, displacement_px: float = 8.0, lowpass_angst: float = 30.0
               ) -> dict[str, object]:
    """Show, from the written files alone, that the particles are where the STAR file says.

    For every tilt series the stack, ``.tlt``, ``.xf`` and ``.defocus`` are read back, the STAR coordinates are
    converted to centred positions, and each particle's patch is cut at its projected raw position in every tilt
    (sub-pixel re-centring, CTF phase flip, Gaussian low-pass ``lowpass_angst``, contrast inversion). The patches
    are averaged over particles per tilt and back-projected into a local volume: with random orientations the
    average is a round white blob that must sit at the centre. The same is done with the positions displaced by
    ``displacement_px`` along x, and with the tilt angles negated; both must be clearly worse.

    Returns
    -------
    dict (also written to ``self_check.json`` beside the manifest): ``peak_offset_px``, ``contrast`` and their
    ``displaced_`` / ``tilt_flipped_`` counterparts, ``contrast_ratio_displaced`` and ``contrast_ratio_flipped``
    (true / perturbed), ``displaced_error_px`` (distance of the displaced blob centre from where the displacement
    must put it, (−d, 0, 0)), ``n_particles``, ``seconds`` and ``passed``: true offset < 1 px, displaced error
    < 1.5 px, and the tilt-flipped volume worse (contrast ratio > 1.3 or its blob > 2 px off centre). The
    particle (≈ 0.6 box wide) is larger than the displacement, so the displaced test is judged by where the
    blob moves (its contrast ratio is only reported).
    """
    started = time.perf_counter()
    manifest = load_manifest(manifest_path)
    root = Path(str(manifest["root"]))
    optics, table = read_relion31_particles(root / str(manifest["particles_star"]))
    microscope = Microscope(float(optics["rlnVoltage"].iloc[0]), float(optics["rlnSphericalAberration"].iloc[0]),
                            float(optics["rlnAmplitudeContrast"].iloc[0]))
    box = int(manifest["box_px"])
    sign = int(manifest["defocus_gradient_sign"])
    volumes = {"true": 0.0, "displaced": 0.0, "tilt_flipped": 0.0}
    for entry in manifest["tilt_series"]:  # type: ignore[union-attr]
        stack, tilt_series = _files_tilt_series(root, entry, microscope)
        rows = table[table["rlnTomoName"] == entry["ts_id"]]
        positions = geometry.corner_px_to_centred_angst(
            rows[["rlnCoordinateX", "rlnCoordinateY", "rlnCoordinateZ"]].to_numpy(float),
            entry["unbinned_tomogram_shape_zyx"][::-1], tilt_series.pixel_size_angst)
        flipped = dataclasses.replace(tilt_series, tilt_angles_deg=-tilt_series.tilt_angles_deg)
        displaced = positions + np.array([displacement_px * tilt_series.pixel_size_angst, 0.0, 0.0])
        for key, geometry_, where in (("true", tilt_series, positions), ("displaced", tilt_series, displaced),
                                      ("tilt_flipped", flipped, positions)):
            average = _average_patches(stack, geometry_, where, box, lowpass_angst, sign)
            volumes[key] = volumes[key] + back_project_local(average, geometry_) * len(rows)
    metrics = {key: volume_peak_metrics(np.asarray(volume), 0.3 * box) for key, volume in volumes.items()}
    result: dict[str, object] = {"n_particles": int(len(table)), "displacement_px": displacement_px}
    for key, values in metrics.items():
        prefix = "" if key == "true" else f"{key}_"
        result.update({f"{prefix}{name}": value for name, value in values.items()})
    result["contrast_ratio_displaced"] = metrics["true"]["contrast"] / max(metrics["displaced"]["contrast"], 1e-12)
    result["contrast_ratio_flipped"] = metrics["true"]["contrast"] / max(metrics["tilt_flipped"]["contrast"], 1e-12)
    expected = np.array([-displacement_px, 0.0, 0.0])  # content sits at −displacement relative to the shifted centre
    result["displaced_error_px"] = float(np.linalg.norm(np.array(metrics["displaced"]["peak_xyz_px"]) - expected))
    result["passed"] = bool(metrics["true"]["peak_offset_px"] < 1.0 and result["displaced_error_px"] < 1.5
                            and (result["contrast_ratio_flipped"] > 1.3
                                 or metrics["tilt_flipped"]["peak_offset_px"] > 2.0))
    result["seconds"] = round(time.perf_counter() - started, 3)
    (root / "self_check.json").write_text(json.dumps(result, indent=1))
    return result
