"""``python -m mspecies convert IN.star --to DIALECT OUT.star``: particle STAR dialect conversion.

Dialects: RELION ``3.0``, ``3.1``, ``4``, ``5``, ``warp3d`` (Warp/WarpTools 3D export table) and ``warp``
(M species table). Bad input ends with exit code 2 and one line naming the column and row. The output is
written under a temporary name beside it and renamed when complete: a failed run leaves no file, and an existing
output is replaced only by a complete one.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mspecies.cli.atomic import atomic_file, check_output_folder, output_folder
from mspecies.common.types import InputError, Microscope
from mspecies.formats.star_dialects import Dialect, read_particle_star
from mspecies.formats.star_write import write_particle_star

DIALECTS = [d.value for d in Dialect]


def read_tomo_sizes(path: str | Path) -> dict[str, tuple[int, int, int]]:
    """Text file with one ``name NX NY NZ`` line per tomogram (``#`` comments) → {name: (nx, ny, nz)}."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--tomo-sizes: file {path} not found")
    sizes: dict[str, tuple[int, int, int]] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        try:
            if len(fields) != 4:
                raise ValueError
            sizes[fields[0]] = (int(fields[1]), int(fields[2]), int(fields[3]))
        except ValueError as error:
            raise InputError(f"--tomo-sizes {path}: line {number}: expected 'name NX NY NZ' (integers), "
                             f"got {line.strip()!r}") from error
    return sizes


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("convert", help="convert a particle STAR between RELION/Warp/M dialects")
    parser.add_argument("input", help="input particle STAR")
    parser.add_argument("--to", required=True, choices=DIALECTS, help="output dialect")
    parser.add_argument("output", help="output particle STAR")
    parser.add_argument("--from", dest="from_dialect", choices=DIALECTS, help="input dialect (default: detected)")
    add_frame_arguments(parser)
    add_microscope_arguments(parser)


def add_frame_arguments(parser: argparse.ArgumentParser) -> None:
    """The coordinate grid and tomogram-size flags shared by convert and intersect."""
    parser.add_argument("--coord-pixel-size-angst", type=float,
                        help="Å/px of the coordinates, for a file that does not carry it")
    sizes = parser.add_mutually_exclusive_group()
    sizes.add_argument("--tomo-size", type=int, nargs=3, metavar=("NX", "NY", "NZ"),
                       help="tomogram size in px at the coordinate pixel size; only needed where coordinates from the "
                            "tomogram corner (3.0, 3.1, 4, warp3d, warp) meet centred ones (RELION 5)")
    sizes.add_argument("--tomo-sizes", help="file with one 'name NX NY NZ' line per tomogram")


def add_microscope_arguments(parser: argparse.ArgumentParser) -> None:
    """``--voltage``, ``--cs``, ``--amplitude-contrast``: the optics a RELION 3.0/3.1 STAR must carry, for input
    files whose optics table lacks them (convert, intersect)."""
    parser.add_argument("--voltage", type=float, help="kV, for optics tables that lack rlnVoltage")
    parser.add_argument("--cs", type=float, help="mm, for optics tables that lack rlnSphericalAberration")
    parser.add_argument("--amplitude-contrast", type=float, help="0..1, for optics lacking rlnAmplitudeContrast")


def microscope_from_args(args: argparse.Namespace) -> Microscope | None:
    """The :func:`add_microscope_arguments` values, checked (kV, mm, fraction), or None when none is given."""
    from mspecies.formats import validate

    values = (args.voltage, args.cs, args.amplitude_contrast)
    if all(v is None for v in values):
        return None
    if any(v is None for v in values):
        raise InputError("--voltage, --cs and --amplitude-contrast go together")
    return Microscope(voltage_kv=validate.check_voltage_kv(args.voltage, "--voltage"),
                      cs_mm=validate.check_cs_mm(args.cs, "--cs"),
                      amplitude_contrast=validate.check_amplitude_contrast(args.amplitude_contrast,
                                                                           "--amplitude-contrast"))


def run(args: argparse.Namespace) -> int:
    output = Path(args.output)
    if output.is_dir():
        raise InputError(f"output: {output} is a folder, expected a STAR file name")
    check_output_folder(output.parent, "output")
    microscope = microscope_from_args(args)
    shapes = read_tomo_sizes(args.tomo_sizes) if args.tomo_sizes else (tuple(args.tomo_size) if args.tomo_size
                                                                        else None)
    if not Path(args.input).is_file():
        raise InputError(f"input: {args.input} not found")
    try:
        table = read_particle_star(args.input, args.from_dialect, coord_pixel_size_angst=args.coord_pixel_size_angst,
                                   tomo_shape_px=shapes)
    except InputError as error:
        raise InputError(f"input: {error}") from error
    if not len(table):
        raise InputError(f"input: {args.input} holds no particles (its particle table has no rows); nothing to "
                         "convert")
    output_folder(output.parent, "output")
    with atomic_file(output) as temporary:
        write_particle_star(table, temporary, args.to, microscope=microscope)
    print(f"{args.input} ({table.dialect}, {len(table)} particles) -> {args.output} ({args.to})")
    return 0
