"""The demo's derived particle set (``mspecies.cli.demo_chain.derive_particle_star``): its jitter spreads the
matched distances like a real re-picking (a Gaussian per axis, not one fixed length), so the intersect histogram
shows where to put the tolerance, and every jittered particle stays a true pair within it."""

import json

import numpy as np
import pandas as pd
import pytest

from mspecies.cli.demo_chain import (
    DECOYS_PER_TOMOGRAM,
    DROP_EVERY,
    JITTER_MAX_ANGST,
    JITTER_SD_ANGST,
    TOLERANCE_ANGST,
    derive_particle_star,
    gaussian_jitter_angst,
)
from mspecies.formats.star import StarBlock, read_star_text, write_star_text
from mspecies.synth.manifest import MANIFEST_FORMAT

PIXEL_ANGST = 4.0
N_PER_TOMOGRAM = 150


@pytest.fixture()
def dataset(tmp_path):
    """A manifest and a RELION 3.1 particles.star (2 tomograms x 150 particles on a 40 px grid, corner px)."""
    rng = np.random.default_rng(1)
    names = np.repeat(["TS_01", "TS_02"], N_PER_TOMOGRAM)
    grid = np.stack(np.meshgrid(np.arange(10), np.arange(15), indexing="ij"), axis=-1).reshape(-1, 2)
    particles = pd.DataFrame({"rlnTomoName": names,
                              "rlnCoordinateX": np.tile(40.0 + 40 * grid[:, 0], 2),
                              "rlnCoordinateY": np.tile(40.0 + 40 * grid[:, 1], 2),
                              "rlnCoordinateZ": rng.uniform(40, 60, names.size),
                              "rlnAngleRot": 0.0, "rlnAngleTilt": 0.0, "rlnAnglePsi": 0.0, "rlnOpticsGroup": 1})
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"],
                           "rlnImagePixelSize": [PIXEL_ANGST]})
    write_star_text(tmp_path / "particles.star", [StarBlock("optics", optics), StarBlock("particles", particles)])
    manifest = {"format": MANIFEST_FORMAT, "particles_star": "particles.star",
                "tilt_series": [{"unbinned_tomogram_shape_zyx": [100, 640, 480]}]}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    return tmp_path


def test_jitter_is_gaussian_per_axis_and_bounded():
    jitter = gaussian_jitter_angst(20000, np.random.default_rng(0))
    assert np.linalg.norm(jitter, axis=1).max() <= JITTER_MAX_ANGST < TOLERANCE_ANGST
    np.testing.assert_allclose(jitter.std(axis=0), JITTER_SD_ANGST, rtol=0.03)
    np.testing.assert_allclose(jitter.mean(axis=0), 0.0, atol=0.05)


def test_derived_distances_spread_over_several_angstroms_within_the_tolerance(dataset):
    out = dataset / "derived.star"
    counts = derive_particle_star(dataset / "manifest.json", out, seed=0)
    assert counts == {"original": 300, "dropped": 300 // DROP_EVERY, "jittered": 300 - 300 // DROP_EVERY,
                      "decoys": 2 * DECOYS_PER_TOMOGRAM}
    original = read_star_text(dataset / "particles.star")[0]["particles"].table
    derived = read_star_text(out)[0]["particles"].table.head(counts["jittered"])
    kept = original[np.arange(len(original)) % DROP_EVERY != 0]
    columns = ["rlnCoordinateX", "rlnCoordinateY", "rlnCoordinateZ"]
    offsets = (derived[columns].to_numpy(float) - kept[columns].to_numpy(float)) * PIXEL_ANGST
    distances = np.linalg.norm(offsets, axis=1)
    assert distances.max() < TOLERANCE_ANGST
    # a Maxwell distribution (sd 2 Å per axis): mean 2 sd sqrt(2/pi) = 3.19 Å, 10-90 % range ~1.5-5.0 Å
    assert distances.mean() == pytest.approx(2 * JITTER_SD_ANGST * np.sqrt(2 / np.pi), rel=0.1)
    low, high = np.percentile(distances, [10, 90])
    assert high - low > 2.5
    assert np.histogram(distances, bins=20, range=(0, TOLERANCE_ANGST))[0].max() < 0.25 * distances.size
