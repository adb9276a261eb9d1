"""MRC reading and writing (``mrcfile``): float32 data with the pixel size in the header.

Arrays are indexed ``[z, y, x]`` (a 2D image ``[y, x]``; a stack of images ``[image, y, x]``).
"""

from __future__ import annotations

from pathlib import Path

import mrcfile
import numpy as np

from mspecies.common.types import InputError


def write_mrc(path: str | Path, data: np.ndarray, pixel_size_angst: float, *, overwrite: bool = True) -> Path:
    """Write ``data`` as float32 MRC with the voxel size set to ``pixel_size_angst`` (Å) on every axis.

    Parameters
    ----------
    path
        Output file.
    data
        (ny, nx) image, (n, ny, nx) stack or (nz, ny, nx) volume.
    pixel_size_angst
        Pixel size in Å (> 0).

    Returns
    -------
    The path written.
    """
    if not pixel_size_angst > 0:
        raise InputError(f"{path}: pixel_size_angst must be > 0, got {pixel_size_angst}")
    path = Path(path)
    array = np.ascontiguousarray(data, dtype=np.float32)
    with mrcfile.new(path, overwrite=overwrite) as mrc:
        mrc.set_data(array)  # also sets the header statistics (min, max, mean, rms); the voxel size leaves them
        mrc.voxel_size = float(pixel_size_angst)
    return path


def read_mrc(path: str | Path, mmap: bool = False) -> tuple[np.ndarray, float]:
    """Read an MRC file → (array, pixel_size_angst).

    Parameters
    ----------
    path
        MRC file.
    mmap
        Memory-map the data (read-only) instead of loading it.

    Returns
    -------
    array
        The data as stored ([z, y, x] or [y, x]); a copy unless ``mmap``.
    pixel_size_angst
        The X voxel size from the header in Å (0.0 if the header has none).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: MRC file not found")
    try:
        if mmap:
            handle = mrcfile.mmap(path, mode="r", permissive=False)
            return handle.data, float(handle.voxel_size.x)
        with mrcfile.open(path, mode="r", permissive=False) as mrc:
            return np.array(mrc.data), float(mrc.voxel_size.x)
    except ValueError as error:
        raise InputError(f"{path}: not a valid MRC file ({error})") from error
