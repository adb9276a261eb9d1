"""The NumPy build of the shared insertion (:func:`mspecies.core.shared_insertion.build_shared_insertion`) against a
plain reference construction: the splat entries of :func:`~mspecies.core.insert.splat_entries` through a COO matrix
(``tocsr`` with ``sum_duplicates``), cut into the same row blocks, and ``bincount`` for the multiplicity. Every
array must be equal bit for bit (same structure, same float32 values, same dtypes), block by block, on random
orientations and on the geometries that fill the x = 0 plane (Friedel mates). The last tests prove that the
comparison catches a build that drops the Friedel mates or a conjugation sign, and that an engine built on the
new insertion gives the same sub-tomograms and 3D CTFs as one built on the reference."""

import dataclasses

import numpy as np
import pytest
import scipy.sparse
from test_reconstruct import options, realistic  # noqa: F401 (fixture)

from mspecies.core import insert, shared_insertion
from mspecies.core.reconstruct import TiltSeriesEngine, _normalisation_scale
from mspecies.synth.dataset import rotation_2d


def orientations(kind: str, n_tilts: int, seed: int) -> np.ndarray:
    """(T, 3, 2) slice orientations: ``random`` tilt series (random in-plane rotation and magnification), or
    ``untilted`` (identity: every sample on a grid point, the kx = 0 line on the x = 0 plane), or ``edge-on``
    (tilt 90°: the whole slice lies in the x = 0 plane, every entry has a Friedel mate), or ``near-grid``
    (magnified by 1 + 1e-9: samples a hair off the grid points, so many weights are tiny and the multiplicity's
    float64 sums depend on their order)."""
    rng = np.random.default_rng(seed)
    if kind in ("random", "near-grid"):
        tilt = np.sort(rng.uniform(-70, 70, n_tilts)) if kind == "random" else np.zeros(n_tilts)
        xf = np.concatenate([rotation_2d(rng.uniform(-180, 180, n_tilts) if kind == "random" else np.zeros(n_tilts)),
                             np.zeros((n_tilts, 2, 1))], 2)
        xf[:, :, :2] *= rng.uniform(0.97, 1.03, (n_tilts, 1, 1)) if kind == "random" else 1 / (1 + 1e-9)
    else:
        tilt = np.full(n_tilts, 0.0 if kind == "untilted" else 90.0)
        xf = np.concatenate([rotation_2d(rng.uniform(-3, 3, n_tilts)), np.zeros((n_tilts, 2, 1))], 2)
        xf[0, :, :2] = np.eye(2)
    return insert.slice_orientation(tilt, xf)


def reference_insertion(orientation: np.ndarray, m: int, y_major: bool) -> dict[str, object]:
    """Plain construction: COO → CSR with duplicates summed, row blocks by fancy selection."""
    splat = insert.splat_entries(orientation, insert.make_sample_grid(m))
    width = m // 2 + 1
    rows = splat.rows
    if y_major:  # [z, y, x] → [y, z, x]
        z, y, x = rows // (m * width), (rows // width) % m, rows % width
        rows = (y * m + z) * width + x
    direct = ~splat.mirror
    matrix = scipy.sparse.coo_matrix((splat.weights[direct], (rows[direct], splat.cols[direct])),
                                     shape=(splat.n_voxels, splat.n_columns)).tocsr()
    matrix.sum_duplicates()
    multiplicity = np.bincount(rows, weights=splat.weights, minlength=splat.n_voxels).astype(np.float32)
    block_rows = m * width if y_major else insert.BLOCK_ROWS
    bounds = [(start, min(start + block_rows, splat.n_voxels)) for start in range(0, splat.n_voxels, block_rows)]
    voxels = [start + np.flatnonzero(multiplicity[start:end] > 0) for start, end in bounds] if y_major else None
    blocks = [matrix[v] for v in voxels] if y_major else [matrix[start:end] for start, end in bounds]
    mirror_rows, local = np.unique(rows[splat.mirror], return_inverse=True)
    mirror = scipy.sparse.coo_matrix((splat.weights[splat.mirror], (local, splat.cols[splat.mirror])),
                                     shape=(mirror_rows.size, splat.n_columns)).tocsr()
    mirror.sum_duplicates()
    column_sign = np.ones(splat.n_columns, dtype=np.float32)
    column_sign[splat.cols[direct]] = splat.conj_sign[direct]
    return dict(blocks=blocks, bounds=bounds, block_voxels=voxels, multiplicity=multiplicity, mirror=mirror,
                mirror_rows=mirror_rows, column_sign=column_sign)


def assert_identical(actual: np.ndarray, expected: np.ndarray, what: str) -> None:
    """Same dtype, shape and bits."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    assert actual.tobytes() == expected.tobytes(), what


def assert_same_csr(actual: object, expected: object, what: str) -> None:
    assert actual.shape == expected.shape, what
    for field in ("indptr", "indices", "data"):
        assert_identical(getattr(actual, field), getattr(expected, field), f"{what}.{field}")


def assert_matches_reference(built: insert.SharedInsertion, reference: dict[str, object]) -> None:
    assert built.bounds == reference["bounds"] and len(built.blocks) == len(reference["blocks"])
    for i, (block, expected) in enumerate(zip(built.blocks, reference["blocks"])):
        assert_same_csr(block, expected, f"block {i}")
        if reference["block_voxels"] is not None:
            assert_identical(built.block_voxels[i], reference["block_voxels"][i], f"voxels of block {i}")
    assert built.block_voxels is None or reference["block_voxels"] is not None
    assert_identical(built.multiplicity, reference["multiplicity"], "multiplicity")
    assert_same_csr(built.mirror, reference["mirror"], "Friedel mates")
    assert_identical(built.mirror_rows, reference["mirror_rows"], "Friedel-mate voxels")
    assert_identical(built.column_sign, reference["column_sign"], "column sign")


CASES = [("random", 16, 5, 0), ("random", 24, 9, 1), ("random", 32, 41, 2), ("untilted", 16, 3, 3),
         ("edge-on", 16, 3, 4), ("near-grid", 16, 3, 5)]


@pytest.mark.parametrize("y_major", [True, False], ids=["y-major", "z-major"])
@pytest.mark.parametrize("kind, m, n_tilts, seed", CASES)
def test_build_equals_the_plain_coo_construction_block_by_block(kind, m, n_tilts, seed, y_major):
    orientation = orientations(kind, n_tilts, seed)
    grid = insert.make_sample_grid(m)
    if y_major:
        built = shared_insertion.build_shared_insertion(orientation, grid, y_major_box_px=m)
        reference = reference_insertion(orientation, m, True)
    else:  # in small blocks, so that several hold Friedel mates
        built = shared_insertion.build_shared_insertion(orientation, grid, block_rows=512)
        reference = reference_for_blocks(orientation, m, 512)
    assert reference["mirror_rows"].size > 0  # the Friedel mates are exercised
    assert_matches_reference(built, reference)


def reference_for_blocks(orientation: np.ndarray, m: int, block_rows: int) -> dict[str, object]:
    """The z-major reference with row blocks of ``block_rows`` voxels."""
    reference = reference_insertion(orientation, m, False)
    matrix = scipy.sparse.vstack(reference["blocks"], format="csr")
    n_voxels = matrix.shape[0]
    bounds = [(start, min(start + block_rows, n_voxels)) for start in range(0, n_voxels, block_rows)]
    return dict(reference, bounds=bounds, blocks=[matrix[start:end] for start, end in bounds])


@pytest.mark.parametrize("tilts_per_chunk", [2, 1 / 3], ids=["two tilts", "third of a tilt"])
def test_build_equals_from_splat_whatever_the_chunks(monkeypatch, tilts_per_chunk):
    """Chunks of a few tilts or parts of a tilt (one default chunk holds all 7 tilts at M = 32) change nothing;
    from_splat is the statement the CuPy path keeps."""
    orientation = orientations("random", 7, 5)
    grid = insert.make_sample_grid(32)
    expected = insert.SharedInsertion.from_splat(insert.splat_entries(orientation, grid), y_major_box_px=32)
    monkeypatch.setattr(shared_insertion, "_CHUNK_COLUMNS", int(tilts_per_chunk * grid.n_samples))
    built = shared_insertion.build_shared_insertion(orientation, grid, y_major_box_px=32)
    for field in dataclasses.fields(insert.SharedInsertion):
        value, wanted = getattr(built, field.name), getattr(expected, field.name)
        for i, (a, b) in enumerate(zip(*([value, wanted] if isinstance(value, list) else [[value], [wanted]]))):
            if scipy.sparse.issparse(a):
                assert_same_csr(a, b, f"{field.name} {i}")
            else:
                assert_identical(a, b, f"{field.name} {i}")


def test_tiny_weights_are_summed_again_in_the_reference_order(monkeypatch):
    """The near-grid geometry holds weights too small for order-free float64 sums: they go through
    ``_ordered_sums``, and the multiplicity is still bit for bit the reference's."""
    ordered_sums, summed = shared_insertion._ordered_sums, []

    def counted(matrix, mirrors, base, voxels, *args):
        summed.append(voxels.size)
        return ordered_sums(matrix, mirrors, base, voxels, *args)

    monkeypatch.setattr(shared_insertion, "_ordered_sums", counted)
    orientation = orientations("near-grid", 3, 5)
    built = shared_insertion.build_shared_insertion(orientation, insert.make_sample_grid(16), y_major_box_px=16)
    assert summed and summed[0] > 10
    assert_identical(built.multiplicity, reference_insertion(orientation, 16, True)["multiplicity"], "multiplicity")


def test_the_row_pointer_is_searched_without_a_cast_of_the_whole_pointer(monkeypatch):
    """``np.searchsorted`` casts its sorted array to the type of the values looked up: int64 entry indices made an
    int64 copy of the int32 row pointer, 8 bytes per voxel (540 MB at M = 512, mapped afresh at every build; the
    build's peak RSS there 1769 → 1319 MiB). Every search of a row pointer gets values of the pointer's type."""
    searchsorted, searches = np.searchsorted, []

    def checked(array, values, *args, **kwargs):
        searches.append((np.asarray(array).dtype, np.asarray(values).dtype, np.asarray(array).size))
        return searchsorted(array, values, *args, **kwargs)

    monkeypatch.setattr(shared_insertion.np, "searchsorted", checked)
    orientation = orientations("near-grid", 3, 5)  # holds tiny weights: the search of their rows runs
    built = shared_insertion.build_shared_insertion(orientation, insert.make_sample_grid(16), y_major_box_px=16)
    n_voxels = 16 * 16 * 9
    pointer_searches = [(a, v) for a, v, size in searches if size >= n_voxels]
    assert pointer_searches and all(a == v for a, v in pointer_searches)
    assert_identical(built.multiplicity, reference_insertion(orientation, 16, True)["multiplicity"], "multiplicity")


def _mutated_build(monkeypatch, mutate) -> None:
    """Build with ``mutate(entries)`` applied after each chunk and compare with the reference."""
    chunk_entries = shared_insertion._chunk_entries

    def mutated(entries, *args):
        chunk_entries(entries, *args)
        mutate(entries)

    monkeypatch.setattr(shared_insertion, "_chunk_entries", mutated)
    orientation = orientations("random", 5, 0)
    built = shared_insertion.build_shared_insertion(orientation, insert.make_sample_grid(16), y_major_box_px=16)
    assert_matches_reference(built, reference_insertion(orientation, 16, True))


def test_comparison_fails_without_the_friedel_mates(monkeypatch):
    with pytest.raises(AssertionError):
        _mutated_build(monkeypatch, lambda entries: [corner.clear() for corner in entries.mirrors])


def test_comparison_fails_with_a_wrong_conjugation_sign(monkeypatch):
    def unflip(entries):
        entries.flip[:] = False

    with pytest.raises(AssertionError):
        _mutated_build(monkeypatch, unflip)


@pytest.mark.parametrize("method", ["direct", "padded"])
def test_engine_outputs_are_those_of_the_reference_insertion(realistic, method):  # noqa: F811
    """Sub-tomograms and 3D CTFs of random particles, bit for bit, with the new build and with from_splat."""
    tilt_series, stack, _, _ = realistic
    rng = np.random.default_rng(7)
    particles = dataclasses.replace(realistic[2], positions_angst=rng.uniform(-80, 80, (2, 3)),
                                    euler_zyz_deg=rng.uniform(-180, 180, (2, 3)))
    opts = options(ctf_method=method, max_batch=2)
    built = TiltSeriesEngine.create(tilt_series, stack, opts)
    reference = TiltSeriesEngine.create(tilt_series, stack, opts)
    orientation = insert.slice_orientation(tilt_series.tilt_angles_deg, tilt_series.xf)
    reference.insertion = insert.SharedInsertion.from_splat(
        insert.splat_entries(orientation, reference.grid), y_major_box_px=reference.padded_box_px
        if reference.by_lines else None)
    reference.scale = _normalisation_scale(reference.insertion.multiplicity, reference.padded_box_px, np)
    for new, old in zip(built.reconstruct(particles), reference.reconstruct(particles)):
        assert_identical(new.volume, old.volume, "sub-tomogram")
        assert_identical(new.ctf, old.ctf, "3D CTF")
