"""The export engine's fast paths give the values of its reference paths, bit for bit."""

import numpy as np
import pytest
from test_reconstruct import BOX, make_tilt_series, options, poses

from mspecies.common.types import Microscope
from mspecies.core import reconstruct
from mspecies.core.reconstruct import TiltSeriesEngine, normalize_outside_radius


@pytest.mark.parametrize("workers", [1, 2])
def test_line_by_line_sub_tomograms_equal_the_whole_spectrum_ones_bit_for_bit(monkeypatch, workers):
    """The line-by-line insertion and transforms (NumPy, direct 3D CTF) give exactly the values of the
    whole-spectrum path (used for CuPy and the padded 3D CTF), also for a last batch smaller than the others,
    which reuses the front of the kept work arrays instead of new ones; the samples and the planes share one."""
    tilt_series = make_tilt_series(n_tilts=21, microscope=Microscope(300.0, 2.7, 0.07), defocus_angst=20000.0)
    stack = np.random.default_rng(2).normal(size=(21, 160, 160)).astype(np.float32)
    particles = poses(np.random.default_rng(3).uniform(-60, 60, (5, 3)))
    opts = options(max_batch=2, workers=workers, normalize_output=True)
    reconstruct.release_work_buffers()  # earlier tests of this thread may have kept larger arrays
    engine = TiltSeriesEngine.create(tilt_series, stack, opts)
    assert engine.by_lines
    lines = list(engine.reconstruct(particles))
    m = engine.padded_box_px
    # kept from the batches of 2: the planes after the transform along z take over the samples' storage
    planes, samples = BOX * m * (m // 2 + 1) * 2, 2 * engine.tilts.size * engine.grid.n_samples
    assert "partial" not in engine.buffers and engine.buffers["samples"].size == max(planes, samples)
    monkeypatch.setattr(reconstruct, "_by_lines", lambda xp, options: False)
    whole_engine = TiltSeriesEngine.create(tilt_series, stack, opts)
    assert not whole_engine.by_lines
    for a, b in zip(lines, whole_engine.reconstruct(particles), strict=True):
        assert a.index == b.index and np.array_equal(a.volume, b.volume) and np.array_equal(a.ctf, b.ctf)


def test_engines_of_one_thread_share_their_work_arrays_and_may_alternate():
    """A second engine (the next tilt series) reuses the first one's work arrays instead of faulting in new
    ones, and batches of two engines may alternate: each batch's results are its own arrays."""
    tilt_series = make_tilt_series(n_tilts=21, microscope=Microscope(300.0, 2.7, 0.07), defocus_angst=20000.0)
    stack = np.random.default_rng(4).normal(size=(21, 160, 160)).astype(np.float32)
    particles = poses(np.random.default_rng(5).uniform(-60, 60, (4, 3)))
    opts = options(max_batch=2)
    alone = [r.volume for r in TiltSeriesEngine.create(tilt_series, stack, opts).reconstruct(particles)]
    first, second = (TiltSeriesEngine.create(tilt_series, stack, opts) for _ in range(2))
    assert first.buffers is second.buffers
    storage = {name: array.__array_interface__["data"][0] for name, array in first.buffers.items()}
    alternated = [r.volume for pair in zip(first.reconstruct(particles), second.reconstruct(particles)) for r in pair]
    assert {name: array.__array_interface__["data"][0] for name, array in second.buffers.items()} == storage
    for volume, expected in zip(alternated, [v for v in alone for _ in range(2)], strict=True):
        assert np.array_equal(volume, expected)


@pytest.mark.parametrize("ctf_method", ["direct", "padded"])
def test_per_sample_values_in_small_blocks_equal_the_whole_batch_ones_bit_for_bit(monkeypatch, ctf_method):
    """The sample spectra's phase shifts and the CTF on the samples are computed one particle and a few tilts at
    a time (temporaries below glibc's mmap threshold, on reused heap pages); blocks of one tilt and blocks of
    whole batches give the same values."""
    tilt_series = make_tilt_series(n_tilts=21, microscope=Microscope(300.0, 2.7, 0.07), defocus_angst=20000.0)
    stack = np.random.default_rng(6).normal(size=(21, 160, 160)).astype(np.float32)
    particles = poses(np.random.default_rng(7).uniform(-60, 60, (5, 3)))
    opts = options(max_batch=3, workers=2, ctf_method=ctf_method)

    def whole_batch(self, first, last):
        yield slice(first, last), slice(0, self.tilts.size)

    results = {}
    for name, block in (("one tilt", 1), ("whole batch", None)):
        if block is None:
            monkeypatch.setattr(TiltSeriesEngine, "_sample_blocks", whole_batch)
        else:
            monkeypatch.setattr(TiltSeriesEngine, "SAMPLE_BLOCK", block)
        results[name] = list(TiltSeriesEngine.create(tilt_series, stack, opts).reconstruct(particles))
    for a, b in zip(results["one tilt"], results["whole batch"], strict=True):
        assert np.array_equal(a.volume, b.volume) and np.array_equal(a.ctf, b.ctf)


def test_sample_blocks_cover_every_particle_and_tilt_once_and_stay_below_the_mmap_threshold():
    tilt_series = make_tilt_series(n_tilts=41)
    stack = np.random.default_rng(8).normal(size=(41, 160, 160)).astype(np.float32)
    engine = TiltSeriesEngine.create(tilt_series, stack, options())
    n_samples = engine.grid.n_samples
    for block_samples in (1, n_samples * 7, 10**9):
        engine.SAMPLE_BLOCK = block_samples
        covered = np.zeros((5, 41), dtype=int)
        for particle, tilts in engine._sample_blocks(2, 5):
            covered[particle, tilts] += 1
            assert (tilts.stop - tilts.start) * n_samples <= max(block_samples, n_samples)
        assert (covered[2:] == 1).all() and not covered[:2].any()
    assert TiltSeriesEngine.SAMPLE_BLOCK * 8 < 32 * 2**20  # complex64 blocks below glibc's largest mmap threshold


def test_the_stack_is_prepared_beside_the_geometry_and_gives_the_same_engine(monkeypatch):
    """With NumPy and several workers the stack preparation runs on a thread of its own while the calling thread
    builds the geometry; the engine and its sub-tomograms are those of the serial build (one worker)."""
    import threading

    tilt_series = make_tilt_series(n_tilts=21, microscope=Microscope(300.0, 2.7, 0.07), defocus_angst=20000.0)
    stack = np.random.default_rng(9).normal(size=(21, 160, 160)).astype(np.float32)
    particles = poses(np.random.default_rng(10).uniform(-60, 60, (4, 3)))
    threads = []
    prepare = reconstruct.prepare_engine_stack

    def recorded(*args, **kwargs):
        threads.append(threading.current_thread())
        return prepare(*args, **kwargs)

    monkeypatch.setattr(reconstruct, "prepare_engine_stack", recorded)
    beside = TiltSeriesEngine.create(tilt_series, stack, options(workers=2))
    serial = TiltSeriesEngine.create(tilt_series, stack, options(workers=1))
    assert threads[0] is not threading.current_thread() and threads[1] is threading.current_thread()
    assert np.array_equal(beside.prepared.images, serial.prepared.images)
    assert np.array_equal(beside.insertion.multiplicity, serial.insertion.multiplicity)
    assert all((a != b).nnz == 0 for a, b in zip(beside.insertion.blocks, serial.insertion.blocks, strict=True))
    for a, b in zip(beside.reconstruct(particles), serial.reconstruct(particles), strict=True):
        assert np.array_equal(a.volume, b.volume) and np.array_equal(a.ctf, b.ctf)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_bad_tilt_found_while_the_geometry_is_built_is_the_error(workers):
    from mspecies.common.types import InputError

    tilt_series = make_tilt_series(n_tilts=21)
    stack = np.random.default_rng(12).normal(size=(21, 160, 160)).astype(np.float32)
    stack[7] = 0.0
    with pytest.raises(InputError, match="tilt 7 .* is blank"):
        TiltSeriesEngine.create(tilt_series, stack, options(workers=workers))
    stack[15] = np.nan  # two bad tilts: the first in stack order is named, on any number of threads
    with pytest.raises(InputError, match="tilt 7 .* is blank"):
        TiltSeriesEngine.create(tilt_series, stack, options(workers=workers))


class _RecordingStack:
    """A (T, ny, nx) stack that records the order in which its tilts are read."""

    def __init__(self, stack):
        self.stack, self.ndim, self.shape, self.dtype, self.read = stack, stack.ndim, stack.shape, stack.dtype, []

    def __getitem__(self, t):
        self.read.append(t)
        return self.stack[t]


def test_the_threads_read_the_tilts_in_stack_order():
    """Two threads take the next tilt when free: the file is read as one stream, not from its start and its middle
    (a stack not in the page cache is then read ahead as it is used: ``benchmarks/export/README.md``, tenth pass)."""
    tilt_series = make_tilt_series(n_tilts=21)
    stack = _RecordingStack(np.random.default_rng(13).normal(size=(21, 160, 160)).astype(np.float32))
    serial = TiltSeriesEngine.create(tilt_series, stack.stack, options(workers=1))
    engine = TiltSeriesEngine.create(tilt_series, stack, options(workers=2))
    assert sorted(stack.read) == list(range(21))
    assert all(abs(t - k) <= 1 for k, t in enumerate(stack.read)), stack.read
    assert np.array_equal(engine.prepared.images, serial.prepared.images)


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("dtype", ["float16", "int16", "uint16", ">f4", "float64"])
def test_a_stack_of_another_type_is_prepared_as_its_float32_copy_bit_for_bit(dtype, workers):
    """Tilts of half floats (RELION's motion correction), integers, big-endian or double floats are converted into
    an array of each preparing thread, reused for its tilts: the values of converting each tilt on its own."""
    tilt_series = make_tilt_series(n_tilts=21)
    values = np.random.default_rng(14).normal(size=(21, 160, 160)) * 40 + (1000 if dtype == "uint16" else 0)
    stack = values.astype(dtype)
    as_float32 = TiltSeriesEngine.create(tilt_series, stack.astype(np.float32), options(workers=workers))
    engine = TiltSeriesEngine.create(tilt_series, stack, options(workers=workers))
    assert np.array_equal(engine.prepared.images, as_float32.prepared.images)


def _normalised_by_float64_copy(volume, radius_px):
    """The output normalisation written plainly: mean and population sd of a float64 copy of the outside voxels."""
    axis = np.arange(volume.shape[0]) - volume.shape[0] // 2
    background = volume[(axis[:, None, None] ** 2 + axis[None, :, None] ** 2 + axis[None, None, :] ** 2)
                        > radius_px ** 2].astype(np.float64)
    return ((volume - background.mean()) * (1.0 / float(background.std()))).astype(np.float32)


@pytest.mark.parametrize("n, radius_px", [(24, 7.0), (32, 10.0), (33, 12.0), (64, 19.0)])
def test_output_normalisation_equals_the_float64_copy_bit_for_bit(n, radius_px):
    rng = np.random.default_rng(n)
    volume = (rng.normal(size=(n, n, n)) * 3 + 0.7).astype(np.float32)
    expected = _normalised_by_float64_copy(volume, radius_px)
    assert np.array_equal(normalize_outside_radius(volume, radius_px), expected)
    in_place = volume.copy()
    assert normalize_outside_radius(in_place, radius_px, in_place=True) is in_place
    assert np.array_equal(in_place, expected)


def test_output_normalisation_reuses_its_work_arrays_from_one_particle_to_the_next():
    """From box 170 or so, a fresh float64 copy of the background is larger than glibc's mmap threshold: mapped and
    faulted in again for every particle. The second particle allocates no array near the background's size."""
    import tracemalloc

    n, radius_px = 48, 14.0
    volumes = np.random.default_rng(1).normal(size=(2, n, n, n)).astype(np.float32)
    normalize_outside_radius(volumes[0], radius_px, in_place=True)
    tracemalloc.start()
    try:
        normalize_outside_radius(volumes[1], radius_px, in_place=True)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 ** 16, f"{peak} bytes allocated for a background of {4 * (n ** 3 - 4 * 14 ** 3)} or so"
