"""``python -m mspecies demo``: the main job on the embedded default dataset (see :mod:`mspecies.cli.demo_chain`).

The headless Scipion environment is configured here, before anything imports pyworkflow.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo", help="generate the synthetic dataset, build a headless Scipion project from it and write a report")
    parser.add_argument("--out", default="demo-output", help="output folder (default: demo-output)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-tomograms", type=int, default=2)
    parser.add_argument("--n-particles", type=int, default=50, help="particles per tomogram")


def run(args: argparse.Namespace) -> int:
    from mspecies.scipion_env import configure_headless_scipion

    out = Path(args.out).resolve()
    if out.exists() and not out.is_dir():
        from mspecies.common.types import InputError

        raise InputError(f"--out {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    configure_headless_scipion(out / "scipion")
    from mspecies.cli.demo_chain import run_demo

    run_demo(out, seed=args.seed, n_tomograms=args.n_tomograms, n_particles=args.n_particles)
    return 0
