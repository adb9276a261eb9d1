"""The tilt preparation of the export (read, rescale, plane, band-pass, normalisation) before and after a change.

Usage: ``python benchmarks/export/bench_tilt_preparation.py --before SRC [--rounds 5] [--size 1024] [--json FILE]``

Rounds alternate a worker process with ``SRC``'s ``mspecies`` on ``PYTHONPATH`` (a checkout of the earlier commit)
and one with this tree's, so that both see the same machine load. Each worker keeps freed memory as the export
worker does (``retain_freed_memory``) and times, on a memory-mapped stack of 41 float32 tilts of S² px (``--size``,
default 1024; 4096 for a detector's full frame) at 4 Å/px (noise of sd 30 on a mean of 500 and a plane; box 64):

* ``tilt_S`` / ``tilt_S_to_R``: CPU ms per tilt of one tilt's preparation on one thread, as ``prepare_stack`` runs
  it (read, finite/blank check, rescale, preprocess into the stack), at the data's pixel size, at 5 Å
  (S² → R², 1024² → 820²) and binned by 2 and 4 (8 and 16 Å), the mean of 20 tilts;
* ``fft_pair_S``: one float32 ``rfft2`` + ``irfft2`` pair of a tilt on one thread, CPU ms (same tilts, same
  loop): the floor as SciPy's 2D transforms give it;
* ``stack_41_wall`` / ``stack_41_cpu``: ``prepare_stack`` of the 41 tilts on a pool of 2 threads, wall and CPU ms
  (user + system, all threads); ``stack_41_bin2_wall`` / ``stack_41_bin2_cpu``: the same binned by 2.

Reported per figure: the fastest round and the median of the rounds, and after / before of each.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

THIS_TREE = Path(__file__).resolve().parents[2]
N_TILTS, PIXEL_ANGST, BOX_PX = 41, 4.0, 64


def make_stack(path: Path, size_px: int) -> None:
    """The 41 raw tilts of ``size_px``² as a ``.npy`` file (to be memory-mapped)."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[:size_px, :size_px]
    stack = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(N_TILTS, size_px, size_px))
    for t in range(N_TILTS):
        stack[t] = rng.normal(500.0, 30.0, (size_px, size_px)) + 0.01 * x - 0.02 * y
    stack.flush()


def tilt_series(n_tilts: int, size_px: int) -> object:
    """A :class:`TiltSeriesData` of ``n_tilts`` tilts of the benchmark's images (geometry and CTF unused)."""
    from mspecies.common.types import Microscope, TiltSeriesData

    ones = np.ones(n_tilts)
    xf = np.tile(np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), (n_tilts, 1, 1))
    return TiltSeriesData("bench", PIXEL_ANGST, (size_px, size_px), np.linspace(-60, 60, n_tilts), xf, 3e4 * ones,
                          3e4 * ones, 0 * ones, 3 * np.arange(n_tilts), np.arange(n_tilts),
                          np.zeros(n_tilts, bool), Microscope(300.0, 2.7, 0.07))


def per_tilt_ms(work: Callable[[int], object], n_tilts: int = 20) -> float:
    """CPU ms per call of ``work(t)`` over tilts 0..n_tilts−1, after one call to warm plans and caches."""
    work(0)
    start = time.process_time()
    for t in range(n_tilts):
        work(t)
    return (time.process_time() - start) / n_tilts * 1e3


def worker(stack_path: Path) -> dict[str, float]:
    """The figures of the ``mspecies`` on the path (ms)."""
    from mspecies.core import extract, insert
    from mspecies.core.memory import retain_freed_memory

    retain_freed_memory()  # as the export worker does
    stack = np.load(stack_path, mmap_mode="r")
    size = stack.shape[1]
    for t in range(N_TILTS):  # map every page first: the figures leave out the first reading of the file
        float(stack[t].sum())
    fft, figures = extract.fft_module(np), {}
    figures[f"fft_pair_{size}"] = per_tilt_ms(lambda t: fft.irfft2(fft.rfft2(stack[t]), s=(size, size)))
    one = tilt_series(1, size)
    sizes = {pixel: extract.rescaled_shape((size, size), PIXEL_ANGST, pixel)[0] for pixel in (5.0, 8.0, 16.0)}
    for name, pixel in [(f"tilt_{size}", PIXEL_ANGST)] + [(f"tilt_{size}_to_{r}", p) for p, r in sizes.items()]:
        figures[name] = per_tilt_ms(lambda t, pixel=pixel: extract.prepare_stack(stack[t:t + 1], one, pixel, BOX_PX,
                                                                                 normalize=True, invert=True))
    pool, whole = insert.thread_pool(2), tilt_series(N_TILTS, size)
    for name, pixel in (("stack_41", PIXEL_ANGST), ("stack_41_bin2", 2 * PIXEL_ANGST)):
        extract.prepare_stack(stack, whole, pixel, BOX_PX, normalize=True, invert=True, pool=pool)
        wall, cpu = time.perf_counter(), time.process_time()
        extract.prepare_stack(stack, whole, pixel, BOX_PX, normalize=True, invert=True, pool=pool)
        figures[f"{name}_wall"] = (time.perf_counter() - wall) * 1e3
        figures[f"{name}_cpu"] = (time.process_time() - cpu) * 1e3
    return figures


def run_worker(tree: Path, stack_path: Path) -> dict[str, float]:
    """One worker process with ``tree``'s package first on the path."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    run = subprocess.run([sys.executable, __file__, "--worker", str(stack_path)], capture_output=True, text=True,
                         env=env, cwd=tree, timeout=600, check=True)
    return json.loads(run.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, help="source tree of the earlier commit")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--size", type=int, default=1024, help="tilt images of SIZE² px (default 1024)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker)))
        return
    if args.before is None:
        parser.error("--before is required")
    with tempfile.TemporaryDirectory() as folder:
        stack_path = Path(folder) / "stack.npy"
        make_stack(stack_path, args.size)
        rounds: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
        for _ in range(args.rounds):
            for label, tree in (("before", args.before.resolve()), ("after", THIS_TREE)):
                rounds[label].append(run_worker(tree, stack_path))
    summary = {label: {name: {"fastest": min(r[name] for r in runs), "median": statistics.median(r[name] for r in runs)}
                       for name in runs[0]} for label, runs in rounds.items()}
    for name in summary["before"]:
        before, after = summary["before"][name], summary["after"][name]
        print(f"{name}: before {before['fastest']:.1f} ms (median {before['median']:.1f}), after "
              f"{after['fastest']:.1f} ms (median {after['median']:.1f}): after / before "
              f"{after['fastest'] / before['fastest']:.2f} ({after['median'] / before['median']:.2f})")
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "rounds": rounds}, indent=1))


if __name__ == "__main__":
    main()
