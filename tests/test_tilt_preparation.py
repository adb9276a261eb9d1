"""The tilt preparation (Warp §5.1) done on one single-precision spectrum per tilt against the same steps written
plainly in double precision: Fourier crop, least-squares plane, hard band-pass [1/N, Nyquist], mean 0 / sd 1, ×−1.
"""

import numpy as np
import pytest

from mspecies.common.types import InputError
from mspecies.core import extract
from mspecies.core.backend import cupy_unavailable_reason

BOX = 32
DATA_PIXEL_ANGST = 4.0


def plain_preparation(image: np.ndarray, box_px: int, shape_yx: tuple[int, int], *, normalize: bool,
                      invert: bool) -> np.ndarray:
    """Warp's preparation in float64, one real-space statement per step."""
    plain = image.astype(np.float64)
    ny, nx = plain.shape
    my, mx = shape_yx
    if (my, mx) != (ny, nx):  # Fourier crop to the output pixel size, the mean kept
        rows = np.r_[0:my // 2, ny - my // 2:ny]
        plain = np.fft.irfft2(np.fft.rfft2(plain)[rows, :mx // 2 + 1], s=(my, mx)) * (my * mx / (ny * nx))
    y, x = np.mgrid[:my, :mx]
    if normalize:  # least-squares plane on centred coordinates
        xc, yc = x - (mx - 1) / 2, y - (my - 1) / 2
        slope_x, slope_y = (plain * xc).sum() / (xc * xc).sum(), (plain * yc).sum() / (yc * yc).sum()
        plain = plain - plain.mean() - slope_x * xc - slope_y * yc
    radius = np.hypot(np.fft.fftfreq(my)[:, None] * 2, np.fft.rfftfreq(mx)[None, :] * 2)
    plain = np.fft.irfft2(np.fft.rfft2(plain) * ((radius >= 1 / box_px) & (radius <= 1)), s=(my, mx))
    if normalize:
        plain = (plain - plain.mean()) / plain.std()
    return -plain if invert else plain


def raw_tilt(shape_yx: tuple[int, int], rescaled_yx: tuple[int, int], mean: float, seed: int = 4) -> np.ndarray:
    """float32 noise (sd 30) on a mean, with a plane and the two patterns that the half-spectrum weights decide:
    a cosine at the rescaled image's x Nyquist (phase 0.3, on the row ky = 0) and one along y (column kx = 0)."""
    ny, nx = shape_yx
    y, x = np.mgrid[:ny, :nx]
    rng = np.random.default_rng(seed)
    image = rng.normal(size=(ny, nx)) * 30 + mean + 0.2 * x - 0.1 * y
    image += 40 * np.cos(np.pi * rescaled_yx[1] / nx * x + 0.3) + 40 * np.cos(2 * np.pi * 3 * y / ny)
    return image.astype(np.float32)


@pytest.mark.parametrize("shape_yx", [(256, 320), (255, 321)])
@pytest.mark.parametrize("output_pixel_angst", [DATA_PIXEL_ANGST, 5.0, 6.0])
@pytest.mark.parametrize("normalize, invert", [(True, True), (True, False), (False, True), (False, False)])
@pytest.mark.parametrize("mean", [0.0, 5000.0])
def test_preparation_on_one_spectrum_matches_the_plain_double_precision_steps(shape_yx, output_pixel_angst,
                                                                              normalize, invert, mean):
    """Even and odd, non-square images, with and without rescale; a mean of 170 sd costs no precision.
    Measured: RMS difference ≤ 2.5e-7, largest ≤ 1.4e-6 of the reference's RMS (not centred first: 2.0e-5)."""
    rescaled = extract.rescaled_shape(shape_yx, DATA_PIXEL_ANGST, output_pixel_angst)
    image = raw_tilt(shape_yx, rescaled, mean)
    reference = plain_preparation(image, BOX, rescaled, normalize=normalize, invert=invert)
    prepared = extract.preprocess_image(image, BOX, normalize=normalize, invert=invert, shape_yx=rescaled)
    rms = np.sqrt(np.mean(reference ** 2))
    assert prepared.dtype == np.float32 and prepared.shape == rescaled
    assert np.sqrt(np.mean((prepared - reference) ** 2)) < 1e-6 * rms
    assert np.abs(prepared - reference).max() < 1e-5 * rms


@pytest.mark.parametrize("shape_yx", [(256, 320), (255, 321), (1100, 37)])
@pytest.mark.parametrize("output_pixel_angst", [DATA_PIXEL_ANGST, 5.0, 6.0])
@pytest.mark.parametrize("normalize, invert", [(True, True), (False, False)])
@pytest.mark.parametrize("workers", [1, 2])
def test_the_inverse_in_place_gives_the_values_of_irfft2_bit_for_bit(monkeypatch, shape_yx, output_pixel_angst,
                                                                     normalize, invert, workers):
    """The inverse transform along y in place, then along x by blocks of rows (blocks of 64 rows here, so that
    every image has several and a short last one), against ``irfft2`` and one multiply, as before."""
    import scipy.fft

    rescaled = extract.rescaled_shape(shape_yx, DATA_PIXEL_ANGST, output_pixel_angst)
    image = raw_tilt(shape_yx, rescaled, 500.0)
    monkeypatch.setattr(extract, "_ROW_BLOCK_BYTES", 64 * 4 * rescaled[1])
    in_place = extract.preprocess_image(image, BOX, normalize=normalize, invert=invert, shape_yx=rescaled,
                                        workers=workers)

    def irfft2_then_factor(spectrum, shape, factor, out, workers):
        return np.multiply(scipy.fft.irfft2(spectrum, s=shape, workers=workers), factor, out=out)

    monkeypatch.setattr(extract, "_inverse_rfft2_into", irfft2_then_factor)
    reference = extract.preprocess_image(image, BOX, normalize=normalize, invert=invert, shape_yx=rescaled,
                                         workers=workers)
    assert in_place.dtype == np.float32 and np.array_equal(in_place, reference)


@pytest.mark.parametrize("shape_yx", [(256, 320), (255, 321), (1100, 37)])
@pytest.mark.parametrize("output_pixel_angst", [DATA_PIXEL_ANGST, 5.0, 8.0, 16.0])
@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_the_forward_transform_by_blocks_of_rows_gives_the_bits_of_the_whole_image_steps(monkeypatch, shape_yx,
                                                                                         output_pixel_angst, workers,
                                                                                         dtype):
    """Along x by blocks of 16 rows (several per image, a short last one), the columns a binned size keeps, then
    along y only those: the bits of ``rfft2`` of the centred image and the crop, and the image's extremes; not
    binned, and binned by 1.25, 2 and 4, float32, float64 and float16 images. With 2 workers the columns go into
    a kept work array that holds NaN beforehand (as ``prepare_stack`` gives each thread one for all its tilts)."""
    import scipy.fft

    rescaled = extract.rescaled_shape(shape_yx, DATA_PIXEL_ANGST, output_pixel_angst)
    image = raw_tilt(shape_yx, rescaled, 500.0).astype(dtype)
    monkeypatch.setattr(extract, "_FORWARD_BLOCK_BYTES", 16 * 4 * shape_yx[1])
    kept = np.full((shape_yx[0], rescaled[1] // 2 + 1), np.nan, dtype=np.complex64) if workers == 2 else None
    spectrum, extremes = extract._forward_by_rows(image, rescaled, workers, kept)
    reference = extract.crop_spectrum(scipy.fft.rfft2(extract._centred(image, np, None), workers=workers), rescaled)
    assert spectrum.shape == (rescaled[0], rescaled[1] // 2 + 1)
    assert spectrum.dtype == np.complex64 and np.array_equal(spectrum.view(np.uint32), reference.view(np.uint32))
    assert extremes == (float(image.min()), float(image.max()))


@pytest.mark.parametrize("output_pixel_angst", [DATA_PIXEL_ANGST, 8.0])
@pytest.mark.parametrize("bad, message", [
    (lambda tilt: tilt.__setitem__((150, 7), np.nan), r"tilt 2 \(\S+°\) has 1 NaN and 0 infinite"),
    (lambda tilt: tilt.__setitem__((150, 7), -np.inf), r"tilt 2 \(\S+°\) has 0 NaN and 1 infinite"),
    (lambda tilt: tilt.fill(3.5), r"tilt 2 \(\S+°\) is blank \(every pixel is 3.5\)"),
])
def test_a_bad_tilt_is_named_whether_or_not_the_stack_is_binned(monkeypatch, output_pixel_angst, bad, message):
    """The extremes that the binned forward transform finds by blocks of rows (the NaN in a later block) make
    the same errors as those of the whole image."""
    from test_reconstruct import make_tilt_series

    monkeypatch.setattr(extract, "_FORWARD_BLOCK_BYTES", 32 * 4 * 192)
    tilt_series = make_tilt_series(n_tilts=4, shape=(192, 192))
    stack = np.random.default_rng(13).normal(size=(4, 192, 192)).astype(np.float32)
    bad(stack[2])
    with pytest.raises(InputError, match=message):
        extract.prepare_stack(stack, tilt_series, output_pixel_angst, 16, normalize=True, invert=False)


@pytest.mark.parametrize("shape_yx", [(64, 80), (63, 81), (80, 64)])
def test_plane_removed_from_the_spectrum_is_the_real_space_least_squares_plane(shape_yx):
    ny, nx = shape_yx
    image = raw_tilt(shape_yx, shape_yx, 100.0, seed=1).astype(np.float64)
    y, x = np.mgrid[:ny, :nx]
    xc, yc = x - (nx - 1) / 2, y - (ny - 1) / 2
    flat = image - (image * xc).sum() / (xc * xc).sum() * xc - (image * yc).sum() / (yc * yc).sum() * yc
    spectrum = np.fft.rfft2(image)
    extract.remove_plane_from_spectrum(spectrum, shape_yx)
    assert np.allclose(np.fft.irfft2(spectrum, s=shape_yx), flat, atol=1e-9 * np.abs(flat).max())


@pytest.mark.parametrize("shape_yx", [(64, 80), (63, 81), (64, 81), (63, 80)])
def test_spectrum_rms_is_the_image_rms_by_parseval(shape_yx):
    image = np.random.default_rng(2).normal(size=shape_yx)
    image[:, ::2] += 3.0  # power at the x Nyquist of even widths
    assert np.isclose(extract.spectrum_rms(np.fft.rfft2(image), shape_yx), np.sqrt(np.mean(image ** 2)),
                      rtol=1e-12)


def test_cropped_spectrum_resamples_a_band_limited_image_onto_the_coarser_grid():
    """Cosines below the coarse Nyquist, sampled on a (100, 130) grid, Fourier-cropped to (80, 104): the same
    cosines sampled on the coarse grid (its pixel i at fine coordinate i·130/104)."""
    def cosines(shape_yx):
        y, x = np.mgrid[:shape_yx[0], :shape_yx[1]]
        u, v = x / shape_yx[1], y / shape_yx[0]
        return 5 + np.cos(2 * np.pi * (7 * u + 0.1)) + 0.5 * np.cos(2 * np.pi * (3 * u - 11 * v) + 1.0)

    spectrum = extract.crop_spectrum(np.fft.rfft2(cosines((100, 130))), (80, 104))
    rescaled = np.fft.irfft2(spectrum, s=(80, 104)) * (80 * 104 / (100 * 130))
    assert np.allclose(rescaled, cosines((80, 104)), atol=1e-12)


def test_image_constant_after_band_pass_cannot_be_normalized():
    """A checkerboard's power is at DC and at (Nyquist, Nyquist), both outside [1/N, Nyquist]."""
    checkerboard = (np.indices((64, 64)).sum(0) % 2).astype(np.float32) * 7 + 3
    with pytest.raises(InputError, match="constant after band-pass filtering; cannot normalize it"):
        extract.preprocess_image(checkerboard, BOX, normalize=True, invert=False)
    unnormalized = extract.preprocess_image(checkerboard, BOX, normalize=False, invert=False)
    assert np.abs(unnormalized).max() < 1e-5


@pytest.mark.parametrize("normalize", [True, False])
def test_cupy_preparation_matches_numpy(normalize):
    reason = cupy_unavailable_reason()
    if reason is not None:
        print(f"CuPy tilt preparation not run: {reason}")
        pytest.skip(reason)
    import cupy

    rescaled = extract.rescaled_shape((256, 320), DATA_PIXEL_ANGST, 5.0)
    image = raw_tilt((256, 320), rescaled, 500.0)
    on_host = extract.preprocess_image(image, BOX, normalize=normalize, invert=True, shape_yx=rescaled)
    on_device = extract.preprocess_image(cupy.asarray(image), BOX, normalize=normalize, invert=True, xp=cupy,
                                         shape_yx=rescaled)
    assert np.allclose(cupy.asnumpy(on_device), on_host, atol=1e-5 * np.sqrt(np.mean(on_host ** 2)))


@pytest.mark.parametrize("output_pixel_angst", [DATA_PIXEL_ANGST, 8.0])
def test_each_thread_transforms_all_its_tilts_in_one_kept_work_array(monkeypatch, output_pixel_angst):
    """On a pool of 2 threads every tilt's transform along x goes into its thread's one work array where that
    array is as large as ``KEPT_COLUMNS_MIN_BYTES`` (here lowered; 32 MiB, 4096² tilts: above it the system maps
    and zeroes a new array per tilt), not binned and binned, and the images are those of each tilt prepared
    alone with the whole-image steps, bit for bit."""
    import threading

    from test_reconstruct import make_tilt_series

    from mspecies.core.insert import WorkerPool

    tilt_series = make_tilt_series(n_tilts=9, shape=(192, 160))
    stack = np.random.default_rng(21).normal(500.0, 30.0, size=(9, 192, 160)).astype(np.float32)
    shape = extract.rescaled_shape((192, 160), tilt_series.pixel_size_angst, output_pixel_angst)
    work_bytes = 192 * (shape[1] // 2 + 1) * 8  # one thread's work array
    monkeypatch.setattr(extract, "KEPT_COLUMNS_MIN_BYTES", work_bytes)
    arrays: dict[int, list[np.ndarray]] = {}
    forward = extract._forward_by_rows

    def spy(image, shape_yx, workers, columns=None):
        arrays.setdefault(threading.get_ident(), []).append(columns)
        return forward(image, shape_yx, workers, columns)

    monkeypatch.setattr(extract, "_forward_by_rows", spy)
    with WorkerPool(2) as pool:
        prepared = extract.prepare_stack(stack, tilt_series, output_pixel_angst, BOX, normalize=True, invert=True,
                                         pool=pool)
    assert sum(map(len, arrays.values())) == 9
    for kept in arrays.values():
        assert kept[0] is not None and all(columns is kept[0] for columns in kept)
    arrays.clear()  # below the size: no work array is kept, as before (unbinned: the whole-image steps)
    monkeypatch.setattr(extract, "KEPT_COLUMNS_MIN_BYTES", work_bytes + 1)
    again = extract.prepare_stack(stack, tilt_series, output_pixel_angst, BOX, normalize=True, invert=True)
    assert all(columns is None for kept in arrays.values() for columns in kept) and np.array_equal(again.images,
                                                                                                    prepared.images)
    monkeypatch.setattr(extract, "_forward_by_rows", forward)
    assert prepared.images.shape[1:] == shape
    binned = shape != stack.shape[1:]
    for t in range(9):  # not binned and given no work array: the whole-image rfft2
        alone = extract.preprocess_image(stack[t], BOX, normalize=True, invert=True, shape_yx=shape if binned else None)
        assert np.array_equal(prepared.images[t], alone), t


def test_prepared_stack_leaves_the_tilts_not_asked_for_zero(monkeypatch):
    """The prepared images are allocated uninitialised (huge pages): every tilt asked for is written whole, and the
    others are zeroed, even where the allocation held other values (here: NaN)."""
    from test_reconstruct import make_tilt_series

    tilt_series = make_tilt_series(n_tilts=5, shape=(64, 64))
    stack = np.random.default_rng(11).normal(size=(5, 64, 64)).astype(np.float32)
    empty = np.empty

    def dirty_empty(shape, dtype=float, *args, **kwargs):
        array = empty(shape, dtype, *args, **kwargs)
        if np.dtype(dtype) == np.float32 and len(np.atleast_1d(shape)) == 3:
            array.fill(np.nan)
        return array

    monkeypatch.setattr(np, "empty", dirty_empty)
    prepared = extract.prepare_stack(stack, tilt_series, 4.0, 16, normalize=True, invert=False,
                                     tilts=np.array([0, 2, 3]))
    images = prepared.images
    assert np.isfinite(images).all()
    assert not images[[1, 4]].any() and all(images[t].std() > 0.5 for t in (0, 2, 3))


def test_a_reused_array_of_another_tilt_series_gives_the_images_of_a_new_one():
    """An earlier tilt series' array (here full of NaN) of the same shape is filled: every tilt asked for written,
    the others zeroed, the values those of a new array. One of another shape is dropped, not filled."""
    from test_reconstruct import make_tilt_series

    tilt_series = make_tilt_series(n_tilts=5, shape=(64, 64))
    stack = np.random.default_rng(12).normal(size=(5, 64, 64)).astype(np.float32)
    tilts = np.array([0, 2, 3])
    fresh = extract.prepare_stack(stack, tilt_series, 4.0, 16, normalize=True, invert=False, tilts=tilts).images
    reuse = extract.StackReuse()
    earlier = np.full((5, 64, 64), np.nan, dtype=np.float32)
    reuse.give(earlier)
    prepared = extract.prepare_stack(stack, tilt_series, 4.0, 16, normalize=True, invert=False, tilts=tilts,
                                     reuse=reuse)
    assert prepared.images is earlier and np.array_equal(prepared.images, fresh)
    assert reuse.take((5, 64, 64)) is None  # handed over: not kept for another stack
    reuse.give(np.full((5, 32, 32), np.nan, dtype=np.float32))
    other = extract.prepare_stack(stack, tilt_series, 4.0, 16, normalize=True, invert=False, tilts=tilts, reuse=reuse)
    assert other.images.shape == (5, 64, 64) and np.array_equal(other.images, fresh)
    assert reuse.take((5, 32, 32)) is None  # the array of another shape was dropped
