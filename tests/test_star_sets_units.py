"""Fast checks of mspecies.convert.star_sets helpers (no Scipion project)."""

import numpy as np
import pandas as pd
import pytest

from mspecies.common.types import InputError, Microscope, ParticlePoses
from mspecies.convert.star_sets import (
    TomogramInfo,
    extras_from_json,
    extras_to_json,
    parse_tomo_size,
    read_star_for_tomograms,
    resolve_star_path,
    shape_at_pixel,
)
from mspecies.formats.star_dialects import Dialect, ParticleTable
from mspecies.formats.star_write import write_particle_star

TOMOS = {"TS_01": TomogramInfo((64, 64, 38), 16.0), "TS_02": TomogramInfo((64, 64, 38), 16.0)}


def _table(names, rng) -> ParticleTable:
    n = len(names)
    return ParticleTable(
        poses=ParticlePoses(rng.uniform(-200, 200, (n, 3)), rng.uniform(-90, 90, (n, 3)),
                            np.array(names, dtype=object)),
        dialect=Dialect.RELION31, origins_angst=rng.uniform(-5, 5, (n, 3)), origin_units="angst",
        coord_pixel_size_angst=np.full(n, 4.0), image_pixel_size_angst=None,
        tomo_shape_px={name: (256, 256, 152) for name in set(names)}, random_subset=None, image_names=None,
        ctf_image_names=None, source_hashes=None, has_angles=True, optics=None, optics_group=None, general=None,
        extras=pd.DataFrame({"note": [f"a b {k}" for k in range(n)]}), column_order=(), source_row=np.arange(n))


def test_extras_json_round_trip():
    frame = pd.DataFrame({"rlnClassNumber": ["1", "2"], "note": ["with space", "é"]})
    back = extras_from_json(extras_to_json(frame))
    pd.testing.assert_frame_equal(back, frame)
    assert extras_from_json(["{}", "{}"]).shape == (2, 0)
    assert list(extras_from_json(['{"a": "1"}', '{"b": "2"}']).fillna("").iloc[0]) == ["1", ""]


def test_parse_tomo_size_and_shape():
    assert parse_tomo_size(" 256 256,150 ") == (256, 256, 150)
    assert parse_tomo_size("") is None
    for bad in ("256 256", "a b c", "0 1 2"):
        with pytest.raises(InputError, match="tomogram size"):
            parse_tomo_size(bad)
    assert shape_at_pixel(TomogramInfo((64, 64, 38), 16.0), 4.0) == (256, 256, 152)


def test_resolve_star_path():
    assert resolve_star_path("sub/p1.mrc", "/data") == (0, "/data/sub/p1.mrc")
    assert resolve_star_path("000003@/abs/stack.mrcs", "/data") == (3, "/abs/stack.mrcs")


def test_read_star_links_and_skips(tmp_path):
    rng = np.random.default_rng(0)
    table = _table(["TS_01_bin4.mrc", "TS_02.tomostar", "TS_99"], rng)
    path = write_particle_star(table, tmp_path / "p.star", "3.1", microscope=Microscope(300, 2.7, 0.1))
    star = read_star_for_tomograms(path, TOMOS)  # default size: 64·16/4 = 256, 38·16/4 = 152
    assert list(star.ts_ids) == ["TS_01", "TS_02"] and star.n_skipped == 1
    np.testing.assert_allclose(star.table.poses.positions_angst, table.poses.positions_angst[:2], atol=1e-4)
    np.testing.assert_allclose(star.table.origins_angst, table.origins_angst[:2], atol=1e-5)
    assert list(star.table.extras["note"]) == ["a b 0", "a b 1"]
    mapped = read_star_for_tomograms(path, TOMOS, mapping="TS_99=TS_02, TS_02.tomostar=TS_02")
    assert list(mapped.ts_ids) == ["TS_01", "TS_02", "TS_02"]


def test_read_star_ambiguous(tmp_path):
    table = _table(["TS_01.mrc", "TS_01.tomostar"], np.random.default_rng(1))
    path = write_particle_star(table, tmp_path / "p.star", "3.1", microscope=Microscope(300, 2.7, 0.1))
    with pytest.raises(InputError, match="duplicated"):
        read_star_for_tomograms(path, TOMOS)
