"""The export engine's fast paths give the values of its reference paths, bit for bit."""

import numpy as np
import pytest
from test_reconstruct import BOX, make_tilt_series, options, poses

from mspecies.common.types import Microscope
from mspecies.core import reconstruct
from mspecies.core.reconstruct import TiltSeriesEngine


@pytest.mark.parametrize("workers", [1, 2])
def test_line_by_line_sub_tomograms_equal_the_whole_spectrum_ones_bit_for_bit(monkeypatch, workers):
    """The line-by-line insertion and transforms (NumPy, direct 3D CTF) give exactly the values of the
    whole-spectrum path (used for CuPy and the padded 3D CTF), also for a last batch smaller than the others,
    which reuses the front of the kept work arrays instead of new ones."""
    tilt_series = make_tilt_series(n_tilts=21, microscope=Microscope(300.0, 2.7, 0.07), defocus_angst=20000.0)
    stack = np.random.default_rng(2).normal(size=(21, 160, 160)).astype(np.float32)
    particles = poses(np.random.default_rng(3).uniform(-60, 60, (5, 3)))
    opts = options(max_batch=2, workers=workers, normalize_output=True)
    engine = TiltSeriesEngine.create(tilt_series, stack, opts)
    assert engine.by_lines
    lines = list(engine.reconstruct(particles))
    m = engine.padded_box_px
    assert engine.buffers["partial"].size == BOX * m * (m // 2 + 1) * 2  # kept from the batches of 2
    monkeypatch.setattr(reconstruct, "_by_lines", lambda xp, options: False)
    whole_engine = TiltSeriesEngine.create(tilt_series, stack, opts)
    assert not whole_engine.by_lines
    for a, b in zip(lines, whole_engine.reconstruct(particles), strict=True):
        assert a.index == b.index and np.array_equal(a.volume, b.volume) and np.array_equal(a.ctf, b.ctf)
