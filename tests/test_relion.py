"""RELION 3.1 (the real consumer) runs on our files and agrees with our orientation convention.

Sub-volumes are cut from the chiral ground truth by rotating it into random RELION poses with
``rotate_volume_relion`` (particle(r) = reference(Aᵀ r)); ``relion_reconstruct`` must give back the
ground truth. The same volumes with the inverse rotations written as angles (the classic transposed
convention mistake) must not: that negative control is what makes the positive result meaningful.
"""

import subprocess

import numpy as np
import pandas as pd
import pytest
from _relion import require_relion

from mspecies.core.geometry import euler_to_matrix, matrix_to_euler
from mspecies.core.volume import normalized_cross_correlation, rotate_volume_relion, spherical_mask
from mspecies.formats.mrc import read_mrc, write_mrc
from mspecies.formats.star import write_relion31_particles
from mspecies.synth.dataset import random_rotation_matrices
from mspecies.synth.phantom import make_phantom_map

pytestmark = pytest.mark.relion

BOX_PX = 40
PIXEL_SIZE_ANGST = 4.0
# Noise-free, 80 well-spread poses, cubic-spline rotation: RELION's gridding reconstruction
# reproduces the map to CC 1.000 (measured); the transposed-angle control scored 0.74 (the blob
# phantom is smooth, so a wrong pose still overlaps). 0.9 separates them on both sides.
CC_THRESHOLD = 0.9


def _optics() -> pd.DataFrame:
    return pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"],
                         "rlnImagePixelSize": [PIXEL_SIZE_ANGST], "rlnImageSize": [BOX_PX],
                         "rlnImageDimensionality": [3], "rlnVoltage": [300.0],
                         "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.07]})


def _reconstruct(tmp_path, names, euler_zyz_deg, tag):
    particles = pd.DataFrame({"rlnImageName": names, "rlnAngleRot": euler_zyz_deg[:, 0],
                              "rlnAngleTilt": euler_zyz_deg[:, 1], "rlnAnglePsi": euler_zyz_deg[:, 2],
                              "rlnOriginXAngst": 0.0, "rlnOriginYAngst": 0.0, "rlnOriginZAngst": 0.0,
                              "rlnOpticsGroup": 1})
    star = write_relion31_particles(tmp_path / f"{tag}.star", _optics(), particles)
    output = tmp_path / f"{tag}.mrc"
    run = subprocess.run([require_relion(), "--i", str(star), "--o", str(output)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    volume, pixel_size = read_mrc(output)
    assert pixel_size == pytest.approx(PIXEL_SIZE_ANGST)
    return volume


@pytest.fixture(scope="module")
def rotated_copies(tmp_path_factory):
    folder = tmp_path_factory.mktemp("relion_subvolumes")
    reference = make_phantom_map(BOX_PX, PIXEL_SIZE_ANGST)
    matrices = random_rotation_matrices(80, np.random.default_rng(7))
    euler = matrix_to_euler(matrices)
    names = []
    for index, angles in enumerate(euler):
        name = f"subvolume_{index:03d}.mrc"
        write_mrc(folder / name, rotate_volume_relion(reference, angles).astype(np.float32), PIXEL_SIZE_ANGST)
        names.append(name)
    return folder, reference, euler, names


def test_relion_reconstruct_recovers_the_ground_truth_from_relion_posed_subvolumes(rotated_copies):
    folder, reference, euler, names = rotated_copies
    volume = _reconstruct(folder, names, euler, "posed")
    mask = spherical_mask(reference.shape, BOX_PX // 2 - 2)
    cc = normalized_cross_correlation(volume, reference, mask)
    print(f"CC(RELION map, ground truth) = {cc:.4f}")
    assert cc > CC_THRESHOLD


def test_transposed_angles_fail_the_same_threshold(rotated_copies):
    folder, reference, euler, names = rotated_copies
    inverse = matrix_to_euler(np.transpose(euler_to_matrix(euler), (0, 2, 1)))
    volume = _reconstruct(folder, names, inverse, "transposed")
    mask = spherical_mask(reference.shape, BOX_PX // 2 - 2)
    cc = normalized_cross_correlation(volume, reference, mask)
    print(f"CC(RELION map from transposed angles, ground truth) = {cc:.4f}")
    assert cc < CC_THRESHOLD
