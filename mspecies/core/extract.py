"""Tilt-image preparation and particle-patch extraction for the export (M/Warp §4.4, §5.1–5.4).

Images are indexed ``[y, x]``; pixel index i is centred at coordinate i. Positions are (x, y) pixel index
coordinates of the (rescaled) raw image. Spectra follow ``rfft2`` (``[ky, kx]``, kx ≥ 0).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import numpy as np

from mspecies.common.types import InputError, Microscope, TiltSeriesData

from .ctf import phase_constants


def fft_module(xp: ModuleType) -> ModuleType:
    """``scipy.fft`` for NumPy arrays, ``cupyx.scipy.fft`` for CuPy arrays."""
    if xp is np:
        import scipy.fft

        return scipy.fft
    import cupyx.scipy.fft

    return cupyx.scipy.fft


def fft_kwargs(xp: ModuleType, workers: int) -> dict[str, int]:
    """``workers=`` for scipy.fft on the CPU; nothing for CuPy."""
    return {"workers": workers} if xp is np else {}


# ----------------------------------------------------------------------------------------------- box sizes


def aliasing_free_size_px(microscope: Microscope, defocus_angst: float, phase_shift_deg: float,
                          pixel_size_angst: float, diameter_px: float) -> int:
    """Warp ``CTF.GetAliasingFreeSize(maxRes = 2p, diameter)``: box keeping the CTF phase change per Fourier
    pixel below π/1.1 up to Nyquist, plus the particle diameter (px). Astigmatism is ignored."""
    k1, k2, _ = phase_constants(microscope)
    k = (np.arange(1000) + 1) / 1000.0 / (2.0 * pixel_size_angst)
    gamma = k1 * (-defocus_angst) * k**2 + k2 * k**4 - np.deg2rad(phase_shift_deg)
    steps = np.abs(np.diff(gamma / np.pi))
    return int(np.ceil(steps.max() / 0.5 * 1000 * 1.1 + diameter_px))


MAX_PADDED_BOX_PX = 1024
"""M's upper bound on the padded box (px)."""


def padded_box_px(tilt_series: TiltSeriesData, box_px: int, pixel_size_angst: float, diameter_angst: float,
                  padding_factor: float = 2.0) -> int:
    """``M = min(1024, max(even(ceil(f · N)), N + 2, even-rounded aliasing-free size of the lowest-dose tilt's CTF))``.

    ``padding_factor`` f = 2 is M's ``max(2N, ...)``; a smaller f lets the aliasing-free size decide where it is
    smaller than 2N (f ≥ 1; even(x) rounds up to the next even integer; see :func:`padded_multiple_px`).
    """
    t = int(np.argmin(tilt_series.dose_e_per_angst2))
    defocus = 0.5 * (tilt_series.defocus_u_angst[t] + tilt_series.defocus_v_angst[t])
    size = aliasing_free_size_px(tilt_series.microscope, float(defocus), float(tilt_series.phase_shift_deg[t]),
                                 pixel_size_angst, diameter_angst / pixel_size_angst)
    minimum = int(round(size / 2)) * 2  # Python round is half-to-even like .NET Math.Round
    return int(min(MAX_PADDED_BOX_PX, max(padded_multiple_px(box_px, padding_factor), minimum)))


def padded_multiple_px(box_px: int, padding_factor: float) -> int:
    """``max(even(ceil(f · N)), N + 2)`` px: the padding factor's share of the padded box (2N for f = 2).

    At least N + 2: the padded 3D CTF's real-space crop reads N + 1 planes around M/2, so M = N (f = 1) would
    leave it nothing to read at the box edge.
    """
    # the tolerance keeps f · N that is an integer up to rounding (1.1 · 80 = 88.00000000000001) at that integer
    padded = int(np.ceil(padding_factor * box_px - 1e-9))
    return max(padded + padded % 2, box_px + 2)


# ----------------------------------------------------------------------------------------------- images


def rescaled_shape(image_shape_yx: tuple[int, int], data_pixel_angst: float, output_pixel_angst: float
                   ) -> tuple[int, int]:
    """Even image shape after Fourier rescaling to the output pixel size (unchanged when equal)."""
    if output_pixel_angst == data_pixel_angst:
        return tuple(int(v) for v in image_shape_yx)  # type: ignore[return-value]
    factor = data_pixel_angst / output_pixel_angst
    return tuple(int(round(n * factor / 2)) * 2 for n in image_shape_yx)  # type: ignore[return-value]


def crop_spectrum(spectrum: np.ndarray, shape_yx: tuple[int, int], *, xp: ModuleType = np) -> np.ndarray:
    """The ``rfft2`` spectrum of a (ny, nx) image cropped to that of a (my, mx) image (even my ≤ ny, mx ≤ nx),
    unscaled: the Fourier rescale of the image to ``shape_yx`` is ``irfft2(crop, s=shape_yx) · my·mx / (ny·nx)``
    (the mean kept). Rows ``ky ∈ [−my/2, my/2)`` and columns ``kx ∈ [0, mx/2]`` are kept; the spectrum itself
    is returned when the shapes are equal."""
    ny, width = spectrum.shape
    my, mx = shape_yx
    if my == ny and mx // 2 + 1 == width:
        return spectrum
    half, kept = my // 2, mx // 2 + 1
    return xp.concatenate([spectrum[:half, :kept], spectrum[ny - half:, :kept]])


def remove_plane_from_spectrum(spectrum: np.ndarray, shape_yx: tuple[int, int], *, xp: ModuleType = np) -> None:
    """Subtract in place the x and y ramps of the least-squares plane ``a x + b y + c`` of the (my, mx) image
    whose ``rfft2`` is ``spectrum`` (Warp ``SubtractMeanGrid(1×1)``); the constant c is the DC term.

    With centred coordinates ``x = i − (mx − 1)/2``, ``y = j − (my − 1)/2`` (px), ``a = Σ image·x / (my·Σ x²)``
    and ``b = Σ image·y / (mx·Σ y²)``. The ramp a x touches only the ky = 0 row, the 1D transform of the
    image's column sums ``s(x) = Σ_y image(y, x)``, and in them it is ``my·a·x``, their least-squares linear
    trend; likewise b y in the kx = 0 column and the row sums. The sums are recovered by one short inverse
    transform each, detrended and transformed back in double precision, so the row and the column come back
    Hermitian as those of a real image (the DC term and their Nyquist terms real: the crop of a larger
    spectrum leaves them complex).
    """
    fft = fft_module(xp)
    my, mx = shape_yx
    column_sums = fft.irfft(spectrum[0].astype(xp.complex128), n=mx)  # (mx,) Σ over y
    row_sums = fft.ifft(spectrum[:, 0].astype(xp.complex128)).real  # (my,) Σ over x
    spectrum[0] = fft.rfft(_without_linear_trend(column_sums, xp))
    spectrum[:, 0] = fft.fft(_without_linear_trend(row_sums, xp))


def _without_linear_trend(values: np.ndarray, xp: ModuleType) -> np.ndarray:
    """(n,) float64 values minus their least-squares slope along ``t = i − (n − 1)/2`` (mean kept)."""
    centred = xp.arange(values.shape[0], dtype=xp.float64) - (values.shape[0] - 1) / 2
    return values - centred * ((values * centred).sum() / (centred * centred).sum())


@functools.lru_cache(maxsize=8)
def _bandpass_mask(ny: int, nx: int, box_px: int, xp: ModuleType = np) -> np.ndarray:
    """(ny, nx//2+1) bool ``r ∈ [1/N, 1]`` on the ``rfft2`` layout, r = radius in per-axis Nyquist units (Warp
    ``Bandpass``, hard; cached for NumPy: every tilt of every tilt series with this image shape and box uses it)."""
    ry = xp.fft.fftfreq(ny)[:, None] * 2.0
    rx = xp.fft.rfftfreq(nx)[None, :] * 2.0
    radius = xp.sqrt(rx * rx + ry * ry)
    mask = (radius >= 1.0 / box_px) & (radius <= 1.0)
    if xp is np:
        mask.flags.writeable = False
    return mask


def spectrum_rms(spectrum: np.ndarray, shape_yx: tuple[int, int], *, xp: ModuleType = np) -> float:
    """Root mean square of the (my, mx) image ``irfft2(spectrum, s=shape_yx)``, by Parseval, summed in double
    precision: ``Σ image² = Σ |full spectrum|² / (my·mx)``, where a column of the half spectrum stands for
    itself and its mirror −kx, except ``kx = 0`` and, for even mx, ``kx = mx/2``. Exact when those two columns
    are Hermitian along ky (as a real image's are)."""
    my, mx = shape_yx
    pairs = xp.ascontiguousarray(spectrum).view(spectrum.real.dtype)  # (my, 2·(mx//2+1)): re, im side by side
    power = xp.einsum("ij,ij->j", pairs, pairs, dtype=xp.float64).reshape(-1, 2).sum(axis=1)  # (mx//2+1,)
    once = power[0] + (power[-1] if mx % 2 == 0 else 0.0)
    return float(xp.sqrt(2 * power.sum() - once)) / (my * mx)


def _centred(image: np.ndarray, xp: ModuleType, out: np.ndarray | None) -> np.ndarray:
    """(ny, nx) float32 image minus the mean of every 8th pixel of every 8th row (into ``out`` when given): a
    single-precision transform's rounding error grows with the image's whole norm, its mean included (with a
    mean of 170 standard deviations the prepared image was 2.0e-5 of its RMS off, 2.4e-7 centred), and the
    band-pass removes the constant anyway."""
    raw = xp.asarray(image, dtype=xp.float32)
    return xp.subtract(raw, _sampled_mean(raw, xp), out=out)


def _sampled_mean(image: np.ndarray, xp: ModuleType) -> np.float32:
    """float32 mean (summed in double precision) of every 8th pixel of every 8th row of the image in float32."""
    return xp.float32(float(xp.asarray(image[::8, ::8], dtype=xp.float32).mean(dtype=xp.float64)))


def preprocess_image(image: np.ndarray, box_px: int, *, normalize: bool, invert: bool, xp: ModuleType = np,
                     workers: int = 1, out: np.ndarray | None = None, shape_yx: tuple[int, int] | None = None,
                     check: Callable[[float, float], None] | None = None,
                     columns: np.ndarray | None = None) -> np.ndarray:
    """Warp §5.1 on one (ny, nx) tilt image: Fourier rescale to ``shape_yx`` (default: none) → [plane
    subtraction] → band-pass [1/N, Nyquist] → [mean 0, sd 1] → [× −1]; float32 (into ``out``, a float32 array
    of ``shape_yx``, when given).

    One forward and one inverse real 2D transform in single precision, every other step on the spectrum: the
    rescale is a crop of it (:func:`crop_spectrum`), the plane's ramps are its ky = 0 row and kx = 0 column
    (:func:`remove_plane_from_spectrum`; the plane is that of the rescaled image), the band-pass removes the
    mean with the DC term, the standard deviation comes from Parseval (:func:`spectrum_rms`), and the inverse
    transform is scaled by ±1/sd into ``out``. Without ``normalize``: no plane, the rescaled band-passed image
    (× −1 with ``invert``). The result agrees with the same steps written in double precision to 2.5e-7 of its
    RMS, 1.4e-6 at most (``tests/test_tilt_preparation.py``). CPU per 1024² tilt as :func:`prepare_stack` runs
    it (read, check, preparation): 10.0 → 5.8 ms, 17.7 → 6.1 ms rescaled to 820²; one float32 ``rfft2`` +
    ``irfft2`` pair alone costs 5.0 ms (``benchmarks/export/bench_tilt_preparation.py``, steady-state malloc).
    Per 4096² tilt 195 → 131 ms, under the pair's 137 ms: on NumPy the inverse runs in place
    (:func:`_inverse_rfft2_into`, the same values). Binned, the forward transform along y skips the columns the
    crop drops (4096² → 2048² 77 → 69 ms, → 1024² 64 → 46 ms), and the image is read once, a block of rows at a
    time, for its extremes, its centring and the transform along x (:func:`_forward_by_rows`, the same values):
    per 4096² tilt with its check, → 1024² 68 → 57 ms, → 2048² 107 → 93 ms, → 3276² 193 → 173 ms.

    ``check``, when given, is called with the image's (min, max) (NaN where it has a NaN pixel) before its
    values are used further; it may raise (:func:`check_tilt_image`). ``columns`` (NumPy): a (ny, mx//2+1)
    complex64 C-order work array (mx: the output width) for the transform along x (:func:`_forward_by_rows`),
    kept by the caller between tilts and overwritten; without it an unbinned tilt takes the whole-image steps.
    """
    fft = fft_module(xp)
    ny, nx = image.shape
    shape = (ny, nx) if shape_yx is None else (int(shape_yx[0]), int(shape_yx[1]))
    out = xp.empty(shape, dtype=xp.float32) if out is None else out
    if xp is np and (shape != (ny, nx) or columns is not None):
        spectrum, extremes = _forward_by_rows(image, shape, workers, columns)
        if check is not None:
            check(*extremes)
    else:
        if check is not None:
            check(float(image.min()), float(image.max()))  # NaN propagates into both
        centred = _centred(image, xp, out if shape == (ny, nx) else None)  # ``out`` as work array when it fits
        spectrum = crop_spectrum(fft.rfft2(centred, **fft_kwargs(xp, workers)), shape, xp=xp)
    if normalize:
        remove_plane_from_spectrum(spectrum, shape, xp=xp)
    spectrum *= _bandpass_mask(*shape, box_px) if xp is np else _bandpass_mask.__wrapped__(*shape, box_px, xp)
    scale = shape[0] * shape[1] / (ny * nx)  # the Fourier rescale keeps the mean
    if normalize:
        sd = spectrum_rms(spectrum, shape, xp=xp)  # the mean is 0: the band-pass removed the DC term
        if not sd > 0:
            raise InputError("stack: a tilt image is constant after band-pass filtering; cannot normalize it")
        scale = 1.0 / sd
    factor = xp.float32(-scale if invert else scale)
    if xp is not np:
        return xp.multiply(fft.irfft2(spectrum, s=shape), factor, out=out)
    return _inverse_rfft2_into(spectrum, shape, factor, out, workers)


_FORWARD_BLOCK_BYTES = 1024**2
"""Bytes of float32 image per block of rows in :func:`_forward_by_rows` (the block and its transform stay in the
cache while they are read twice and written)."""

_FORWARD_BLOCKS = threading.local()


def _forward_block(rows: int, nx: int) -> np.ndarray:
    """This thread's (rows, nx) float32 work block of :func:`_forward_by_rows`, kept between tilts."""
    block = getattr(_FORWARD_BLOCKS, "block", None)
    if block is None or block.shape != (rows, nx):
        block = _FORWARD_BLOCKS.block = np.empty((rows, nx), dtype=np.float32)
    return block


def _forward_by_rows(image: np.ndarray, shape_yx: tuple[int, int], workers: int, columns: np.ndarray | None = None
                     ) -> tuple[np.ndarray, tuple[float, float]]:
    """``(crop_spectrum(rfft2(_centred(image)), shape_yx), (image.min(), image.max()))`` for a (ny, nx) ``image``
    at ``shape_yx`` (binned: even and smaller; or its own): the same complex64 values and extremes (NaN where the
    image has a NaN pixel).

    ``rfft2`` transforms every column along y before the crop drops those beyond ``mx/2``: binned, most of that
    pass is thrown away. Here the image is read once, a block of rows at a time (:data:`_FORWARD_BLOCK_BYTES`):
    the block's extremes, the block centred into this thread's kept work block, transformed along x, and its kept
    columns copied out (contiguous: the pass along y is faster than on a view); then only the kept columns along
    y. Unlike the whole-image steps it maps no tilt-sized array: the centred tilt and the transform along x of all
    its columns were each as large as the image (64 and 67 MB per 4096² tilt), mapped and zeroed by the system
    afresh for every tilt. The 1D transforms, the mean and the subtraction are those of ``rfft2`` on the centred
    image, so the values are bit for bit the same. CPU per 4096² tilt as :func:`prepare_stack`
    runs it (read, check, preparation), one thread: binned to 1024² 68 → 57 ms, to 2048² 107 → 93 ms; 41 tilts
    binned to 2048² on 2 threads 2.5 → 2.1 s (``benchmarks/export/bench_tilt_preparation.py --size 4096``).
    Unbinned, nothing is dropped and reading by blocks alone gained nothing; :func:`prepare_stack` uses it there
    too where its thread keeps ``columns`` for all its tilts (:data:`KEPT_COLUMNS_MIN_BYTES`: ``rfft2``'s new
    67 MB output per 4096² tilt was mapped and zeroed every time): 41 unbinned 4096² tilts on 2 threads
    6.3 → 6.0 s (median 7.2 → 6.4 s). Without ``columns`` a new array is made.
    """
    import scipy.fft

    ny, nx = image.shape
    kept = shape_yx[1] // 2 + 1
    mean = _sampled_mean(image, np)
    rows = max(1, min(ny, _FORWARD_BLOCK_BYTES // (4 * nx)))
    block = _forward_block(rows, nx)
    columns = np.empty((ny, kept), dtype=np.complex64) if columns is None else columns
    low = high = None
    for start in range(0, ny, rows):
        raw = image[start:start + rows]
        work = block[:raw.shape[0]]
        lowest, highest = raw.min(), raw.max()
        low = lowest if low is None else np.minimum(low, lowest)  # np.minimum keeps a NaN
        high = highest if high is None else np.maximum(high, highest)
        np.subtract(raw, mean, out=work, dtype=np.float32)
        columns[start:start + raw.shape[0]] = scipy.fft.rfft(work, axis=1, workers=workers)[:, :kept]
    spectrum = crop_spectrum(scipy.fft.fft(columns, axis=0, overwrite_x=True, workers=workers), shape_yx)
    return spectrum, (float(low), float(high))


KEPT_COLUMNS_MIN_BYTES = 32 * 1024**2
"""From this size on, :func:`prepare_stack` gives each of its threads one work array for the transforms along x of
all its tilts: glibc maps every larger array anew (its reuse limit, :func:`mspecies.core.memory.retain_freed_memory`),
and the system zeroes it page by page (67 MB per unbinned 4096² tilt, 34 MB binned to 2048²). Below it, freed
arrays are reused and a kept one gained nothing (41 tilts of 1024², unbinned and binned by 2)."""

_ROW_BLOCK_BYTES = 2 * 1024**2
"""Bytes of real output per block of rows in :func:`_inverse_rfft2_into` (a few cache-sized temporaries)."""


def _inverse_rfft2_into(spectrum: np.ndarray, shape_yx: tuple[int, int], factor: np.float32, out: np.ndarray,
                        workers: int) -> np.ndarray:
    """``out[:] = irfft2(spectrum, s=shape_yx) · factor``, the same float32 values, overwriting ``spectrum``
    ((my, mx//2+1) complex64, C order; ``out`` (my, mx) float32).

    ``irfft2`` transforms along y into a new array as large as the spectrum, then along x into another (134 MB
    of new memory per 4096² tilt): 85 ms of CPU against 49 ms for this, which transforms along y in place, then
    along x a block of rows at a time, scaled into ``out``. Bit for bit the same values: the same 1D transforms
    in the same order, and SciPy's scale 1/(my·mx) (computed in long double, as pocketfft does, and rounded to
    float32) multiplied into each value once, as pocketfft does at the end of the inverse along x.
    """
    import scipy.fft

    my, mx = shape_yx
    norm = np.float32(np.longdouble(1) / np.longdouble(my * mx))
    partial = scipy.fft.ifft(spectrum, axis=0, norm="forward", overwrite_x=True, workers=workers)
    rows = max(1, _ROW_BLOCK_BYTES // (4 * mx))
    for start in range(0, my, rows):
        block = scipy.fft.irfft(partial[start:start + rows], n=mx, axis=1, norm="forward", workers=workers)
        np.multiply(block, norm, out=block)
        np.multiply(block, factor, out=out[start:start + rows])
    return out


@dataclass(frozen=True)
class PreparedStack:
    """Preprocessed tilt images at the output pixel size.

    Attributes
    ----------
    images
        (T, ny', nx') float32 in the array namespace of the engine.
    scale_xy
        (2,) factor from raw index coordinates to rescaled index coordinates (``nx'/nx``, ``ny'/ny``).
    """

    images: np.ndarray
    scale_xy: np.ndarray


def check_tilt_image(image: np.ndarray, tilt_series: TiltSeriesData, tilt: int,
                     extremes: tuple[float, float] | None = None) -> None:
    """Raise :class:`InputError` naming the stack, the tilt (0-based stack index) and its angle when a raw tilt
    image has NaN or infinite pixels or is blank (one value everywhere). ``extremes``: the image's (min, max)
    where the caller has them (NaN where the image has a NaN pixel)."""
    where = (f"stack {tilt_series.stack_path or tilt_series.ts_id}: tilt {tilt} "
             f"({float(tilt_series.tilt_angles_deg[tilt]):+.1f}°)")
    if not image.size:
        return
    # NaN propagates into both, ±inf shows as an extreme
    low, high = (float(image.min()), float(image.max())) if extremes is None else map(float, extremes)
    if not (np.isfinite(low) and np.isfinite(high)):
        n_nan = int(np.isnan(image).sum())
        n_inf = int(image.size - np.isfinite(image).sum()) - n_nan
        raise InputError(f"{where} has {n_nan} NaN and {n_inf} infinite pixel(s); repair the stack or exclude "
                         "the tilt")
    if low == high:
        raise InputError(f"{where} is blank (every pixel is {float(image.flat[0]):g}); exclude the tilt")


class StackReuse:
    """At most one finished tilt series' prepared images (NumPy), handed to the next :func:`prepare_stack` of the
    same shape instead of a new array.

    A new array of prepared images has to be mapped and zeroed page by page by the system the first time it is
    written: 2.75 GB for 41 tilts of 4096², 0.24–8.4 s on the VM of ``benchmarks/export`` against 0.11 s to fill
    it once mapped. :meth:`take` hands the kept array over (or drops one of another shape, so that it is freed
    before the new one is made); the caller gives an array only once nothing reads it any more. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._images: np.ndarray | None = None

    def give(self, images: np.ndarray) -> None:
        """Keep ``images`` (a NumPy array nothing reads any more) for the next stack, instead of any kept one."""
        if isinstance(images, np.ndarray):
            with self._lock:
                self._images = images

    def take(self, shape: tuple[int, ...]) -> np.ndarray | None:
        """The kept float32 array if it has ``shape``, else None; either way nothing is kept afterwards."""
        with self._lock:
            images, self._images = self._images, None
        return images if images is not None and images.shape == shape and images.dtype == np.float32 else None

    def clear(self) -> None:
        """Drop the kept array."""
        with self._lock:
            self._images = None


def prepare_stack(stack: np.ndarray, tilt_series: TiltSeriesData, output_pixel_angst: float, box_px: int, *,
                  normalize: bool, invert: bool, xp: ModuleType = np, workers: int = 1,
                  tilts: np.ndarray | None = None, pool: object | None = None,
                  reuse: StackReuse | None = None) -> PreparedStack:
    """Read each tilt once (the stack may be memory-mapped), check it and prepare it at the output pixel size
    (:func:`preprocess_image`: one float32 transform pair per tilt).

    Parameters
    ----------
    stack
        (T, ny, nx) raw images in stack order (any float dtype; read tilt by tilt).
    tilts
        Stack indices to prepare (default all); the others are left zero.
    pool
        Optional :class:`mspecies.core.insert.WorkerPool` (NumPy only): each of its threads takes the next tilt
        in stack order when it is free and reads and filters it (single-threaded transforms), so reading overlaps
        filtering, the element-wise steps run on all cores, and a stack not yet in the page cache is read as one
        stream; the values are those of the serial loop.
    reuse
        Optional :class:`StackReuse` (NumPy only): its array is filled instead of a new one where it has this
        stack's shape (every tilt is written, so its old values do not matter).
    """
    from .insert import run_each

    if stack.ndim != 3 or stack.shape[0] != tilt_series.n_tilts:
        raise InputError(f"stack: expected shape ({tilt_series.n_tilts}, ny, nx) for {tilt_series.ts_id}, "
                         f"got {stack.shape}")
    if tuple(stack.shape[1:]) != tuple(tilt_series.image_shape_yx):
        raise InputError(f"stack: images are {stack.shape[1:]} (ny, nx) but the tilt series says "
                         f"{tilt_series.image_shape_yx}")
    shape = rescaled_shape(tilt_series.image_shape_yx, tilt_series.pixel_size_angst, output_pixel_angst)
    if min(shape) < 2:
        raise InputError(f"output_pixel_size_angst: {output_pixel_angst} Å shrinks the images to {shape} px")
    # Uninitialised, then every tilt written once: np.zeros maps its pages zeroed but small (42 k page faults for
    # 41 tilts of 1024², 0.06 s here), np.empty gets NumPy's huge pages (600).
    kept = reuse.take((tilt_series.n_tilts,) + shape) if reuse is not None and xp is np else None
    images = kept if kept is not None else xp.empty((tilt_series.n_tilts,) + shape, dtype=xp.float32)
    used = [int(t) for t in (range(tilt_series.n_tilts) if tilts is None else tilts)]
    for t in sorted(set(range(tilt_series.n_tilts)) - set(used)):
        images[t] = 0
    pool = pool if xp is np else None
    fft_workers = 1 if pool is not None else workers

    converted: dict[int, np.ndarray] = {}  # per thread, for a stack not in native float32: one array for its tilts
    spectra: dict[int, np.ndarray] = {}  # per thread (NumPy): one work array for its tilts' transforms along x
    columns_shape = (stack.shape[1], shape[1] // 2 + 1)
    keep_columns = xp is np and columns_shape[0] * columns_shape[1] * 8 >= KEPT_COLUMNS_MIN_BYTES

    def thread_array(arrays: dict[int, np.ndarray], shape_: tuple[int, ...], dtype: type) -> np.ndarray:
        """The calling thread's array of ``arrays``, made anew only where it has none of ``shape_``."""
        array = arrays.get(threading.get_ident())
        if array is None or array.shape != shape_:
            array = arrays[threading.get_ident()] = np.empty(shape_, dtype=dtype)
        return array

    def read(t: int) -> np.ndarray:
        """Tilt ``t`` as float32: a view of a float32 stack, else converted into the thread's array (a new array
        per tilt was mapped and zeroed by the system every time: 67 MB per 4096² tilt)."""
        tilt = stack[t]
        if tilt.dtype == np.float32:
            return np.asarray(tilt)
        buffer = thread_array(converted, tilt.shape, np.float32)
        np.copyto(buffer, tilt, casting="unsafe")  # the values of ``tilt.astype(np.float32)``
        return buffer

    def prepare(k: int) -> None:
        t = used[k]
        raw = read(t)

        def check(low: float, high: float) -> None:
            check_tilt_image(raw, tilt_series, t, (low, high))

        preprocess_image(xp.asarray(raw), box_px, normalize=normalize, invert=invert, xp=xp, workers=fft_workers,
                         out=images[t], shape_yx=shape, check=check,
                         columns=thread_array(spectra, columns_shape, np.complex64) if keep_columns else None)

    # the threads take the tilts in stack order, so the file is read as one stream (not one per half of it); the
    # lowest failing tilt's error is raised
    run_each(pool, prepare, len(used))  # type: ignore[arg-type]
    ny, nx = tilt_series.image_shape_yx
    return PreparedStack(images, np.array([shape[1] / nx, shape[0] / ny]))


# ----------------------------------------------------------------------------------------------- patches


def extract_patches(images: np.ndarray, positions_px: np.ndarray, tilts: np.ndarray, box_px: int, *,
                    xp: ModuleType = np, out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Cut box × box patches around sub-pixel positions with edge clamping (Warp §5.3).

    Parameters
    ----------
    images
        (T_all, ny, nx) prepared images.
    positions_px
        (B, T, 2) (x, y) index coordinates of the particle centres in the images ``tilts``.
    tilts
        (T,) image indices.
    out
        Optional (B, T, box, box) buffer to fill.

    Returns
    -------
    patches
        (B, T, box, box) float32; the particle centre is at patch coordinate ``box/2 − residual``.
    residual_px
        (B, T, 2) ``−(c − trunc(c))`` with ``c = position − box/2``: shifting a patch by
        ``residual`` puts the particle centre at pixel ``box/2``.

    Patches inside the image are plain slices; only those crossing an edge are gathered with clamped indices.
    """
    _, ny, nx = images.shape
    corner = xp.asarray(positions_px) - box_px // 2
    origin = xp.trunc(corner)
    residual = -(corner - origin)
    origin = to_host(origin).astype(np.int64)
    batch, n_tilts = origin.shape[:2]
    shape = (batch, n_tilts, box_px, box_px)
    patches = out if out is not None and out.shape == shape else xp.empty(shape, dtype=images.dtype)
    inside = ((origin[..., 0] >= 0) & (origin[..., 0] + box_px <= nx) & (origin[..., 1] >= 0)
              & (origin[..., 1] + box_px <= ny))
    offsets = np.arange(box_px, dtype=np.int64)
    for b, t in np.ndindex(batch, n_tilts):
        x0, y0 = origin[b, t]
        image = images[int(tilts[t])]
        if inside[b, t]:
            patches[b, t] = image[y0:y0 + box_px, x0:x0 + box_px]
        else:
            rows = xp.asarray(np.clip(y0 + offsets, 0, ny - 1))
            cols = xp.asarray(np.clip(x0 + offsets, 0, nx - 1))
            patches[b, t] = image[rows[:, None], cols[None, :]]
    return patches, residual


def to_host(array: np.ndarray) -> np.ndarray:
    """NumPy copy of a NumPy or CuPy array (small geometry arrays)."""
    return array.get() if hasattr(array, "get") else np.asarray(array)


def shift_phase(kx: np.ndarray, ky: np.ndarray, shift_px: np.ndarray, size_px: int, *, xp: ModuleType = np,
                scale: float = 1.0) -> np.ndarray:
    """(..., S) complex64 ``scale · exp(−2πi k·s/size)``: multiplying a spectrum by it moves the content by +s.

    ``kx, ky`` (S,) are integer-valued frequency indices; ``shift_px`` (..., 2) is (sx, sy) in pixels.
    Separable: one exponential per distinct kx and ky value (``scale`` folded into the x factors), then a
    gather and a product.
    """
    kx_index = xp.asarray(np.asarray(kx).astype(np.int64) % size_px)
    ky_index = xp.asarray(np.asarray(ky).astype(np.int64) % size_px)
    k = xp.asarray(np.fft.fftfreq(size_px, 1.0 / size_px), dtype=xp.float64)  # value of index j
    shift = xp.asarray(shift_px, dtype=xp.float64)
    along_x = (scale * xp.exp((-2j * np.pi / size_px) * shift[..., 0:1] * k)).astype(xp.complex64)
    along_y = xp.exp((-2j * np.pi / size_px) * shift[..., 1:2] * k).astype(xp.complex64)
    phase = xp.take(along_x, kx_index, axis=-1)
    phase *= xp.take(along_y, ky_index, axis=-1)
    return phase


@dataclass(frozen=True)
class CtfTables:
    """Per-sample frequency terms of the RELION CTF on a sample list (float32): k² (1/Å²), cos 2α, sin 2α."""

    k2: np.ndarray
    cos2: np.ndarray
    sin2: np.ndarray

    @classmethod
    def from_samples(cls, kx: np.ndarray, ky: np.ndarray, size_px: int, pixel_size_angst: float, *,
                     xp: ModuleType = np) -> CtfTables:
        fx = xp.asarray(kx, dtype=xp.float64) / (size_px * pixel_size_angst)
        fy = xp.asarray(ky, dtype=xp.float64) / (size_px * pixel_size_angst)
        angle = xp.arctan2(fy, fx)
        return cls((fx * fx + fy * fy).astype(xp.float32), xp.cos(2 * angle).astype(xp.float32),
                   xp.sin(2 * angle).astype(xp.float32))


def ctf_samples(tables: CtfTables, defocus_u_angst: np.ndarray, defocus_v_angst: np.ndarray,
                defocus_angle_deg: np.ndarray, phase_shift_deg: np.ndarray, microscope: Microscope, *,
                xp: ModuleType = np) -> np.ndarray:
    """RELION CTF (no envelope) on the samples → (..., S) float32 (same formula as :func:`~mspecies.core.ctf.ctf_2d`).

    Defocus and angles have shape (...,), broadcast against the S samples.
    """
    k1, k2, k3 = phase_constants(microscope)
    angle = xp.deg2rad(xp.asarray(defocus_angle_deg, dtype=xp.float64))
    average = (-(xp.asarray(defocus_u_angst) + xp.asarray(defocus_v_angst)) / 2).astype(xp.float32)[..., None]
    deviation = (-(xp.asarray(defocus_u_angst) - xp.asarray(defocus_v_angst)) / 2)
    dev_cos = (deviation * xp.cos(2 * angle)).astype(xp.float32)[..., None]
    dev_sin = (deviation * xp.sin(2 * angle)).astype(xp.float32)[..., None]
    phase = (xp.deg2rad(xp.asarray(phase_shift_deg, dtype=xp.float64)) + k3).astype(xp.float32)[..., None]
    delta_f = average + dev_cos * tables.cos2 + dev_sin * tables.sin2
    gamma = np.float32(k1) * delta_f * tables.k2 + np.float32(k2) * tables.k2 * tables.k2 - phase
    return -xp.sin(gamma)
