"""Quality-control plots of exported sub-tomograms (no Scipion imports; used by the export viewer, its output step
and the demo).

Volumes are ``[z, y, x]`` with the centre at voxel N//2. 3D CTFs come in either export layout: the numpy
``rfftn`` half (N, N, N//2+1) or the centred cube (N, N, N) with DC at N/2. The CTF-weighted average is RELION's
``Σ CTF·F / (Σ CTF² + ε)`` with ``ε`` a small fraction of the mean weight (Wiener-like), computed in the
reference frame: pre-rotated volumes as they are, others rotated back by their RELION pose.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from mspecies.core.reconstruct import half_to_centred_cube
from mspecies.core.volume import rotate_volume_relion

WIENER_FRACTION = 0.05


def central_slices(volume: np.ndarray) -> dict[str, np.ndarray]:
    """Central sections ``XY`` (z = N//2), ``XZ`` (y = N//2) and ``YZ`` (x = N//2) of a (Z, Y, X) volume."""
    cz, cy, cx = (n // 2 for n in volume.shape)
    return {"XY": volume[cz], "XZ": volume[:, cy, :], "YZ": volume[:, :, cx]}


def radial_power_spectrum(volume: np.ndarray, pixel_size_angst: float) -> tuple[np.ndarray, np.ndarray]:
    """Rotationally averaged power spectrum of a cubic volume.

    Returns
    -------
    frequency
        Shell centres 0..N//2 in 1/Å (shell / (N · pixel)).
    power
        Mean |F|² per integer shell.
    """
    n = volume.shape[0]
    spectrum = np.abs(np.fft.rfftn(np.asarray(volume, dtype=np.float64))) ** 2
    kz = np.fft.fftfreq(n) * n
    kx = np.fft.rfftfreq(n) * n
    shell = np.rint(np.sqrt(kz[:, None, None] ** 2 + kz[None, :, None] ** 2 + kx[None, None, :] ** 2)).astype(int)
    valid = shell <= n // 2
    total = np.bincount(shell[valid], spectrum[valid], minlength=n // 2 + 1)
    count = np.bincount(shell[valid], minlength=n // 2 + 1)
    return np.arange(n // 2 + 1) / (n * float(pixel_size_angst)), total / np.maximum(count, 1)


def centred_ctf(ctf: np.ndarray) -> np.ndarray:
    """A 3D CTF in either export layout → centred (N, N, N) cube with DC at N/2."""
    n = ctf.shape[0]
    if ctf.shape == (n, n, n):
        return np.asarray(ctf, dtype=np.float64)
    if ctf.shape == (n, n, n // 2 + 1):
        return half_to_centred_cube(np.asarray(ctf, dtype=np.float64))
    raise ValueError(f"3D CTF of shape {ctf.shape}: expected (N, N, N) or (N, N, N//2+1)")


def inverse_euler(euler_zyz_deg: np.ndarray) -> np.ndarray:
    """RELION angles of ``Aᵀ`` for ``A = euler(rot, tilt, psi)``: (−psi, −tilt, −rot)."""
    rot, tilt, psi = np.asarray(euler_zyz_deg, dtype=np.float64)
    return np.array([-psi, -tilt, -rot])


def ctf_weighted_average(particles: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray | None]],
                         wiener_fraction: float = WIENER_FRACTION) -> np.ndarray:
    """CTF-weighted average of sub-tomograms in the reference frame.

    Parameters
    ----------
    particles
        ``(volume (N, N, N), 3D CTF (either layout), euler_zyz_deg or None)``; with angles the volume and its CTF
        are rotated back (``reference(r) = particle(A r)``); None means already pre-rotated.
    wiener_fraction
        ``ε = wiener_fraction · mean(Σ CTF²)``.
    """
    numerator = denominator = None
    for volume, ctf, euler in particles:
        cube = centred_ctf(ctf)
        data = np.asarray(volume, dtype=np.float64)
        if euler is not None and np.any(np.asarray(euler) != 0):
            back = inverse_euler(euler)
            data = rotate_volume_relion(data, back, order=1)
            cube = rotate_volume_relion(cube, back, order=1)
        spectrum = np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(data)))
        numerator = cube * spectrum if numerator is None else numerator + cube * spectrum
        denominator = cube**2 if denominator is None else denominator + cube**2
    if numerator is None:
        raise ValueError("no sub-tomograms to average")
    epsilon = wiener_fraction * float(denominator.mean()) + np.finfo(float).tiny
    average = np.fft.fftshift(np.fft.ifftn(np.fft.ifftshift(numerator / (denominator + epsilon))))
    return average.real.astype(np.float32)


def fsc_resolution_angst(fsc: np.ndarray, box_px: int, pixel_size_angst: float, threshold: float) -> float:
    """Resolution (Å) of the last shell before the FSC first drops below ``threshold`` (inf if shell 0)."""
    below = np.flatnonzero(np.asarray(fsc) < threshold)
    shell = int(below[0] - 1) if below.size else len(fsc) - 1
    return float("inf") if shell <= 0 else box_px * float(pixel_size_angst) / shell


def volume_qc_figure(average: np.ndarray, pixel_size_angst: float, ctf: np.ndarray | None = None,
                     title: str = ""):  # noqa: ANN201 (matplotlib Figure, imported lazily)
    """New Figure drawn by :func:`draw_volume_qc`."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(16, 8 if ctf is not None else 4))
    return draw_volume_qc(figure, average, pixel_size_angst, ctf, title)


def draw_volume_qc(figure, average: np.ndarray, pixel_size_angst: float, ctf: np.ndarray | None = None,  # noqa: ANN001
                   title: str = ""):  # noqa: ANN201
    """Draw into ``figure``: central XY/XZ/YZ slices and the radial power spectrum of ``average``; below,
    central sections of one 3D CTF (centred) when given. Returns the figure."""
    rows = 2 if ctf is not None else 1
    axes = figure.subplots(rows, 4, squeeze=False)
    for ax, (name, image) in zip(axes[0, :3], central_slices(average).items()):
        ax.imshow(image, cmap="gray", origin="lower")
        ax.set_title(f"{title} average {name}".strip())
        ax.set_xticks([])
        ax.set_yticks([])
    frequency, power = radial_power_spectrum(average, pixel_size_angst)
    axes[0, 3].semilogy(frequency[1:], np.maximum(power[1:], np.finfo(float).tiny))
    axes[0, 3].set_xlabel("spatial frequency (1/Å)")
    axes[0, 3].set_ylabel("power")
    axes[0, 3].set_title("rotationally averaged power spectrum")
    if ctf is not None:
        for ax, (name, image) in zip(axes[1, :3], central_slices(centred_ctf(ctf)).items()):
            ax.imshow(image, cmap="RdBu_r", origin="lower")
            ax.set_title(f"3D CTF central section {name}")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[1, 3].axis("off")
    figure.tight_layout()
    return figure


def fsc_figure(curves: dict[str, np.ndarray], box_px: int, pixel_size_angst: float,
               title: str = "FSC against the ground truth"):  # noqa: ANN201
    """Figure of one or more FSC curves (x: 1/Å) with the 0.5 and 0.143 thresholds."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4))
    ax = figure.subplots()
    for label, fsc in curves.items():
        ax.plot(np.arange(len(fsc)) / (box_px * float(pixel_size_angst)), fsc, label=label)
    for level in (0.5, 0.143):
        ax.axhline(level, color="gray", linestyle=":", linewidth=1)
    ax.set_xlabel("spatial frequency (1/Å)")
    ax.set_ylabel("FSC")
    ax.set_ylim(-0.2, 1.05)
    ax.set_title(title)
    ax.legend()
    figure.tight_layout()
    return figure


def save_figure(figure, path: str | Path, dpi: int = 80) -> Path:  # noqa: ANN001
    """Write a matplotlib Figure as PNG (Agg canvas, no display needed); return the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    path = Path(path)
    figure.savefig(path, dpi=dpi)
    return path
