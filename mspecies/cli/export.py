"""``python -m mspecies export``: sub-tomograms + 3D CTFs (or RELION 5 particle series) from raw tilt series.

Three ways to give the input (no Scipion needed):

1. ``--manifest manifest.json [--ts-id TS_01]``: the synthetic dataset of ``python -m mspecies synth``
   (ground-truth geometry; all tilt series unless ``--ts-id``).
2. ``--geometry ts.json --particles particles.star``: one tilt series described by a JSON file (this is what
   the Scipion protocol writes, one per tilt series). Schema (units in the names; arrays in stack order)::

       {
         "ts_id": "TS_01",                      # tomogram name, matched against rlnTomoName / rlnMicrographName
         "stack_path": "TS_01/TS_01.mrc",       # raw (non-aligned) stack; relative to the JSON file's folder
         "pixel_size_angst": 4.0,
         "image_shape_yx": [512, 512],
         "tilt_angles_deg": [...],              # T values
         "xf": [[[A11, A12, DX], [A21, A22, DY]], ...],   # IMOD .xf per image: aligned = A raw + d (centred px)
         "defocus_u_angst": [...], "defocus_v_angst": [...], "defocus_angle_deg": [...],
         "phase_shift_deg": [...],              # optional, default 0
         "dose_e_per_angst2": [...],            # accumulated dose INCLUDING the tilt (Scipion getAccumDose)
         "acquisition_order": [...],            # optional 0-based ranks, default: by dose
         "excluded": [...],                     # optional booleans, default all false
         "voltage_kv": 300.0, "cs_mm": 2.7, "amplitude_contrast": 0.07,
         "tomogram_shape_xyz_px": [512, 512, 250]   # unbinned tomogram at pixel_size_angst
       }

3. The files of a tilt series as IMOD, AreTomo, SerialEM and CTFFIND write them (no Scipion, no JSON)::

       python -m mspecies export --stack TS.mrc --mdoc TS.mrc.mdoc --xf TS.xf --ctf TS_ctffind.txt \
           --tomogram TS_bin4.mrc --particles particles.star --box 64 --diameter 150 --out OUT

   ``--aln TS.aln`` (AreTomo) instead of ``--xf``; ``--tlt``, ``--dose``, ``--defocus`` (IMOD) as alternatives
   or in addition to the mdoc / CTFFIND; particles as STAR or as a text list ``x y z [rot tilt psi]`` (px).
   Pixel size, voltage, Cs, amplitude contrast, tomogram size and binning are read from the files; every value
   is logged with its source and a flag overrides it (with a warning when it disagrees).
   Which file wins where several give a value: :mod:`mspecies.cli.export_inputs`.

Particles STAR: any dialect of :func:`mspecies.formats.star_dialects.read_particle_star` (RELION 3.0/3.1/4/5, Warp,
M); corner-based coordinates are in pixels at the file's pixel size, else ``--coord-pixel-size-angst`` (default: the
``--tomogram``'s pixel size, else the tilt series'), origins subtracted, angles 0 if absent. Rows belong to the tilt
series whose name equals the tomogram name, or its normalised form (``/a/TS_01.mrc`` → ``TS_01``).

``--mode series``: RELION 5 particle series instead (``.mrcs`` stacks, ``particles.star``, ``tomograms.star``,
``optimisation_set.star``; :mod:`mspecies.cli.relion5_files`).

Writes the MRCs and ``particles.star`` (RELION 3.1 with optics; ``--star-flavour 3.0`` for M's style) into
``--out``; logs per tilt series the particles done, particles/s, padded box, backend and memory plan.
Bad input: exit code 2 and a message naming the parameter or file. Its last act is the success record
``export_record.json`` (:mod:`mspecies.cli.export_record`): no record, no success, whatever the exit code says.

Before the first byte is written every parameter, the memory plan of every tilt series, the particles
(:mod:`mspecies.cli.export_checks`: those outside the tomogram or the images are skipped and listed in
``excluded_particles.tsv``, duplicates warned or dropped) and the free space are checked. The files are written into
a hidden staging folder of ``--out`` under the folder's lock and moved to their final names when all are complete,
``particles.star`` last (:mod:`mspecies.cli.atomic`); a folder that holds an earlier export is refused unless
``--overwrite``, which replaces that export whole.

The first tilt series' engine (its stack read and prepared, its tables) is built on a background thread from the
moment its geometry is read, while the particles are read and checked (:func:`start_first_engine`); each later one
while the tilt series before it reconstructs. Neither writes a file.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from mspecies.common.types import InputError, Microscope, ParticlePoses, TiltSeriesData
from mspecies.formats import validate
from mspecies.formats.dose import DOSE_LAYOUTS

if TYPE_CHECKING:
    import pandas as pd

    from mspecies.cli.export_checks import ExportJob
    from mspecies.cli.export_overlap import Prefetch
    from mspecies.core.extract import StackReuse
    from mspecies.core.reconstruct import TiltSeriesEngine

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Declare ``export`` and its options (they mirror :class:`~mspecies.core.reconstruct.ExportOptions`)."""
    parser = subparsers.add_parser("export", help="reconstruct sub-tomograms + 3D CTFs from raw tilt series")
    source = parser.add_argument_group("input")
    source.add_argument("--manifest", help="synthetic dataset manifest.json")
    source.add_argument("--geometry", help="tilt-series geometry JSON (schema in the module docstring)")
    source.add_argument("--ts-id", help="tilt series to export (manifest: default all; files: its name, default "
                        "the stack file name without extension)")
    source.add_argument("--stack", help="raw (non-aligned) tilt stack, MRC; pixel size from its header")
    source.add_argument("--mdoc", help="SerialEM .mdoc of the stack: tilt angles, dose (ExposureDose, "
                        "PriorRecordDose), acquisition order (DateTime), pixel size, voltage")
    source.add_argument("--tlt", help="IMOD .tlt tilt angles (deg, stack order); wins over --aln and --mdoc")
    source.add_argument("--xf", help="IMOD .xf alignment (raw → aligned, one line per image)")
    source.add_argument("--aln", help="AreTomo/AreTomo2/AreTomo3 .aln alignment instead of --xf: tilt axis, "
                        "shifts, tilt angles; views without a row are excluded")
    source.add_argument("--ctf", help="CTFFIND 4/5 output .txt: per-tilt defocus, and voltage, Cs, amplitude "
                        "contrast and pixel size from its header")
    source.add_argument("--defocus", help="IMOD ctfphaseflip .defocus instead of --ctf (nm in the file)")
    source.add_argument("--dose", help="dose list, one row per image in stack order (e/A^2): prior and own dose, "
                        "or tilt angle and accumulated dose (told apart by content), or one column with "
                        "--dose-layout; default: the --mdoc's dose")
    source.add_argument("--dose-layout", choices=DOSE_LAYOUTS, default="auto",
                        help="what the --dose columns hold: prior-own, tilt-accumulated, accumulated (1 column, "
                        "including the tilt) or own (1 column, summed in the --mdoc's acquisition order); auto "
                        "decides for 2 columns or refuses and says why")
    source.add_argument("--tomogram", help="the (binned) tomogram the particles were picked in: its header gives "
                        "the tomogram size and binning (unbinned size = size × its pixel / tilt-series pixel)")
    source.add_argument("--tomo-shape", type=int, nargs=3, metavar=("X", "Y", "Z"),
                        help="unbinned tomogram size in px at the tilt-series pixel size (instead of --tomogram)")
    source.add_argument("--particles", help="particles: a STAR file (RELION 3.0-5, Warp, M) or a text list "
                        "'x y z [rot tilt psi]' in pixels from the tomogram corner")
    source.add_argument("--pixel-size", type=float,
                        help="tilt-series pixel size (A; default: the stack header, else the mdoc, else CTFFIND)")
    source.add_argument("--coord-pixel-size-angst", "--coords-pixel-size", dest="coords_pixel_size", type=float,
                        help="pixel size of the particle coordinates (A; the same flag as convert and intersect; "
                        "--coords-pixel-size is the old spelling; default: the STAR file's own "
                        "rlnMicrographPixelSize/rlnImagePixelSize..., else the --tomogram's pixel size, else the "
                        "tilt-series pixel size)")
    source.add_argument("--voltage", type=float, help="kV (default: the mdoc, else the CTFFIND header, else 300)")
    source.add_argument("--cs", type=float, help="spherical aberration, mm (default: CTFFIND header, else 2.7)")
    source.add_argument("--amplitude-contrast", type=float,
                        help="fraction 0-1 (default: CTFFIND header, else 0.07)")
    options = parser.add_argument_group("export options")
    options.add_argument("--out", required=True, help="output folder (created)")
    options.add_argument("--pixel-size-out", type=float,
                         help="output pixel size (A; default: the tilt series'; a manifest's tilt series at "
                         "different pixel sizes need it, as particles.star has one optics group)")
    options.add_argument("--box", type=int, required=True, help="output box (px, even)")
    options.add_argument("--diameter", type=float, required=True,
                         help="particle diameter (A): the mask of the output normalisation (mean 0, sd 1 outside "
                         "it) and a term of the aliasing-free padded box size")
    options.add_argument("--padding-factor", type=float, default=2.0,
                         help="f in the padded box M = min(1024, max(even(ceil(f x box)), box + 2, aliasing-free "
                         "size)) of the reconstruction (>= 1; default 2 = M's; smaller is faster but RELION's FSC "
                         "drops at the highest shells: benchmarks/export/README.md)")
    options.add_argument("--mode", choices=("volumes", "series"), default="volumes",
                         help="volumes: a sub-tomogram + 3D CTF per particle (RELION 3.1 STAR); series: RELION 5 "
                         "particle series (2D stacks, tomograms.star, optimisation_set.star; --no-ctf: raw stacks)")
    options.add_argument("--shift", type=float, nargs=3, default=(0.0, 0.0, 0.0), metavar=("X", "Y", "Z"),
                         help="shift in the reference frame (A)")
    options.add_argument("--prerotate", action="store_true",
                         help="reconstruct each particle in the reference frame (rotated by its angles); the STAR "
                         "angles are then 0")
    options.add_argument("--n-tilts-by-dose", type=int, help="keep only the first N tilts by dose")
    options.add_argument("--no-invert", action="store_true", help="do not invert the contrast")
    options.add_argument("--no-normalize-input", action="store_true",
                         help="do not normalise each tilt image (mean 0, sd 1) before extraction")
    options.add_argument("--no-normalize-output", action="store_true",
                         help="do not normalise the sub-tomograms (mean 0, sd 1 outside --diameter)")
    options.add_argument("--sparse-ctf", action="store_true", help="set 3D-CTF voxels with |value| < 0.01 to 0")
    options.add_argument("--ctf-layout", choices=("half", "centred"), default="half",
                         help="3D CTF volume layout RELION 3.1 reads: half = FFTW half ((box/2+1) × box × box), "
                         "centred = full cube with the origin at box/2")
    options.add_argument("--ctf-method", choices=("direct", "padded"), default="direct",
                         help="3D CTF on the output grid (direct, fast) or M's padded reconstruction + crop (padded)")
    options.add_argument("--defocus-gradient-sign", type=int, choices=(-1, 1), default=-1,
                         help="sign s in particle defocus = tilt defocus + s × particle height along the beam: -1 "
                         "(IMOD/Dynamo) makes the right side of the aligned image more underfocused at positive "
                         "tilt; +1 the opposite (use it if your tilt angles have the other handedness)")
    options.add_argument("--no-ctf", action="store_true", help="diagnostic: C_u = C_w = 1 (no CTF or dose weighting)")
    options.add_argument("--backend", choices=("auto", "numpy", "cupy"), default="auto",
                         help="array backend: cupy (GPU), numpy (CPU), auto = cupy when a GPU is usable")
    options.add_argument("--memory-gb", type=float,
                         help="memory budget (GB; default 25%% of the memory available on this machine, but at most "
                         "75%% of what this process's memory cgroup leaves (a SLURM job's --mem, a container's limit) "
                         "and, on a GPU, at most 75%% of its free memory)")
    options.add_argument("--max-batch", type=int, default=16,
                         help="most particles reconstructed at once (the memory plan may use fewer)")
    options.add_argument("--threads", type=int,
                         help="CPU threads (default: the cores this process may run on: its affinity mask, which "
                         "taskset or a SLURM allocation narrows); for several exports at once on one machine")
    options.add_argument("--star-flavour", choices=("3.1", "3.0", "5"), default="3.1",
                         help="particles.star: 3.1 = RELION 3.1 with data_optics (relion_refine 3.1 and 5 with "
                         "default flags); 3.0 = one table, as M writes; 5 = as 3.1 but the data declared "
                         "CTF-premultiplied, for RELION 5's default flags (relion_refine and relion_reconstruct)")
    checks = parser.add_argument_group("particles and outputs")
    checks.add_argument("--min-visible-tilts", type=int, default=1,
                        help="skip particles whose box lies inside the images in fewer used tilts (RELION's "
                             "--min_frames; default 1); skipped ones are listed in excluded_particles.tsv")
    checks.add_argument("--drop-duplicates", action="store_true",
                        help="drop particles identical to an earlier one (same tomogram, position, angles); "
                             "default: keep them and warn")
    checks.add_argument("--buffered-writes", action="store_true",
                        help="write every MRC through the page cache; default: files of 4 MiB or more "
                             "(sub-tomograms from box 102) bypass it with direct I/O where the file system allows, as "
                             "a large export does not stay cached and only pushes the tilt series out; the files are "
                             "the same")
    checks.add_argument("--overwrite", action="store_true",
                        help="replace an earlier export in --out (its STAR and every exported MRC) once this one "
                             "is complete; without it a folder holding an export is refused")


# ----------------------------------------------------------------------------------------------- inputs


def _require(args: argparse.Namespace, names: list[str], context: str) -> None:
    missing = [f"--{name.replace('_', '-')}" for name in names if getattr(args, name) is None]
    if missing:
        raise InputError(f"{context}: missing {', '.join(missing)}")


def _load_manifest_inputs(args: argparse.Namespace, tilt_series_read: Callable[[TiltSeriesData], object]
                          ) -> list[tuple[TiltSeriesData, ParticlePoses, tuple[int, ...]]]:
    from mspecies.synth.manifest import load_manifest, manifest_particles, manifest_tilt_series

    manifest = load_manifest(args.manifest)
    all_particles = manifest_particles(manifest)
    ids = [entry["ts_id"] for entry in manifest["tilt_series"]]  # type: ignore[union-attr]
    if args.ts_id is not None:
        if args.ts_id not in ids:
            raise InputError(f"--ts-id: {args.ts_id!r} not in {args.manifest} (has {ids})")
        ids = [args.ts_id]
    entries = {entry["ts_id"]: entry for entry in manifest["tilt_series"]}  # type: ignore[union-attr]
    inputs = []
    for ts_id in ids:
        nz, ny, nx = entries[ts_id]["unbinned_tomogram_shape_zyx"]
        tilt_series = manifest_tilt_series(manifest, ts_id)
        if not inputs:
            tilt_series_read(tilt_series)
        inputs.append((tilt_series, all_particles.subset(all_particles.tomo_names == ts_id), (nx, ny, nz)))
    return inputs


def _check_geometry_values(path: Path, data: dict) -> None:
    """The validation layer on a geometry JSON's values (finite, physical ranges, units), each named by its key."""
    where = f"--geometry {path}"
    validate.check_tilt_angles_deg(data["tilt_angles_deg"], f"{where} tilt_angles_deg")
    validate.check_xf(np.asarray(data["xf"], dtype=np.float64).reshape(-1, 2, 3), f"{where} xf")
    for key in ("defocus_u_angst", "defocus_v_angst"):
        validate.check_defocus_angst(data[key], f"{where} {key}")
    validate.check_pixel_size_angst(data["pixel_size_angst"], f"{where} pixel_size_angst")
    validate.check_voltage_kv(data["voltage_kv"], f"{where} voltage_kv")
    validate.check_cs_mm(data["cs_mm"], f"{where} cs_mm")
    validate.check_amplitude_contrast(data["amplitude_contrast"], f"{where} amplitude_contrast")


def tilt_series_from_geometry(path: str | Path) -> tuple[TiltSeriesData, tuple[int, int, int]]:
    """Read a geometry JSON (schema in the module docstring) → (tilt series, tomogram shape (x, y, z) px)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--geometry: {path} not found")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise InputError(f"--geometry: {path} is not valid JSON ({error})") from error
    required = ("ts_id", "stack_path", "pixel_size_angst", "image_shape_yx", "tilt_angles_deg", "xf", "defocus_u_angst",
                "defocus_v_angst", "defocus_angle_deg", "dose_e_per_angst2", "voltage_kv", "cs_mm",
                "amplitude_contrast", "tomogram_shape_xyz_px")
    missing = [key for key in required if key not in data]
    if missing:
        raise InputError(f"--geometry: {path} lacks {missing}")
    n = len(data["tilt_angles_deg"])
    _check_geometry_values(path, data)
    dose = np.asarray(data["dose_e_per_angst2"], dtype=np.float64)
    order = data.get("acquisition_order")
    if order is None:
        order = np.argsort(np.argsort(dose, kind="stable"), kind="stable")
    validate.check_dose(dose, f"--geometry {path} dose_e_per_angst2", acquisition_order=np.asarray(order),
                        order_source="acquisition_order")
    stack = Path(data["stack_path"])
    stack = stack if stack.is_absolute() else path.parent / stack
    tilt_series = TiltSeriesData(
        ts_id=str(data["ts_id"]), pixel_size_angst=float(data["pixel_size_angst"]),
        image_shape_yx=tuple(data["image_shape_yx"]), tilt_angles_deg=data["tilt_angles_deg"], xf=data["xf"],
        defocus_u_angst=data["defocus_u_angst"], defocus_v_angst=data["defocus_v_angst"],
        defocus_angle_deg=data["defocus_angle_deg"], dose_e_per_angst2=dose, acquisition_order=order,
        excluded=data.get("excluded", [False] * n),
        microscope=Microscope(float(data["voltage_kv"]), float(data["cs_mm"]), float(data["amplitude_contrast"])),
        stack_path=str(stack), phase_shift_deg=data.get("phase_shift_deg"))
    shape = tuple(int(v) for v in data["tomogram_shape_xyz_px"])
    if len(shape) != 3:
        raise InputError(f"--geometry: tomogram_shape_xyz_px must have 3 values, got {shape}")
    return tilt_series, shape  # type: ignore[return-value]


def load_inputs(args: argparse.Namespace, tilt_series_read: Callable[[TiltSeriesData], object] = lambda _: None
                ) -> list[tuple[TiltSeriesData, ParticlePoses, tuple[int, ...]]]:
    """(tilt series, its particles, tomogram shape xyz) for every tilt series to export; ``tilt_series_read`` is
    called with the first tilt series as soon as it is read, before any particle (the export starts building its
    engine then: :func:`start_first_engine`)."""
    if args.manifest:
        return _load_manifest_inputs(args, tilt_series_read)
    from mspecies.cli.export_inputs import read_particles, tilt_series_from_files

    _require(args, ["particles"], "--geometry / file input")
    tomogram_pixel = None
    if args.geometry:
        tilt_series, shape = tilt_series_from_geometry(args.geometry)
    else:
        tilt_series, files = tilt_series_from_files(args)
        shape, tomogram_pixel = files.tomogram_shape_xyz_px, files.tomogram_pixel_angst
    tilt_series_read(tilt_series)
    particles = read_particles(args.particles, tilt_series.ts_id, shape, tilt_series.pixel_size_angst,
                               args.coords_pixel_size, tomogram_pixel)
    return [(tilt_series, particles, shape)]


def export_options(args: argparse.Namespace, data_pixel_angst: float):  # noqa: ANN201 (lazy import)
    """:class:`~mspecies.core.reconstruct.ExportOptions` from the command line."""
    from mspecies.cli.export_checks import with_flag
    from mspecies.core.reconstruct import ExportOptions

    try:
        return ExportOptions(
            output_pixel_size_angst=args.pixel_size_out or data_pixel_angst, box_px=args.box,
            particle_diameter_angst=args.diameter, padding_factor=args.padding_factor, mode=args.mode,
            shift_angst=tuple(args.shift),
            prerotate=args.prerotate, n_tilts_by_dose=args.n_tilts_by_dose,
            invert_contrast=not args.no_invert, normalize_input=not args.no_normalize_input,
            normalize_output=not args.no_normalize_output, sparse_ctf=args.sparse_ctf, ctf_layout=args.ctf_layout,
            ctf_method=args.ctf_method,
            defocus_gradient_sign=args.defocus_gradient_sign, apply_ctf=not args.no_ctf, backend=args.backend,
            # rounded, not truncated: 0.0157 GB is 15 700 000 B, where int() gave 1 B less
            memory_budget_bytes=None if args.memory_gb is None else round(args.memory_gb * 1e9),
            max_batch=args.max_batch, workers=args.threads)
    except InputError as error:  # core names its fields (box_px: ...); name the flag too
        raise with_flag(error) from error


# ----------------------------------------------------------------------------------------------- run


def run(args: argparse.Namespace) -> int:
    """Check everything, then export every requested tilt series into a staging folder of ``--out`` and move the
    files to their final names (``particles.star`` last) under the folder's lock. Returns the exit code."""
    from mspecies.cli.atomic import check_free_space, check_output_folder, locked_output_folder, staging_folder
    from mspecies.cli.export_checks import check_export_arguments, check_one_optics_group, export_bytes, plan_job
    from mspecies.core.memory import retain_freed_memory
    from mspecies.core.reconstruct import ReconstructionError
    from mspecies.formats.mrc import mrc_dtype

    retain_freed_memory()  # this process is the worker: per-particle arrays reuse freed pages

    out = check_output_folder(args.out, "--out")
    check_export_arguments(args)
    first: list[FirstEngine] = []
    inputs = load_inputs(args, lambda tilt_series: first.append(start_first_engine(args, tilt_series)))
    # the writers (pandas, starfile: 0.2 s) load here, while the first engine is being built
    from mspecies.cli.export_files import STAR_NAME, earlier_export_files
    from mspecies.cli.export_record import discard_export_record, write_export_record

    check_inputs_not_replaced(args, out)
    jobs = [plan_job(tilt_series, particles, shape, export_options(args, tilt_series.pixel_size_angst),
                     min_visible_tilts=args.min_visible_tilts, drop_duplicates=args.drop_duplicates,
                     stack_dtype=mrc_dtype(tilt_series.stack_path))
            for tilt_series, particles, shape in inputs]
    check_one_optics_group([(job.tilt_series, job.options.output_pixel_size_angst) for job in jobs],
                           f"--manifest {args.manifest}" if args.manifest else "the input")
    try:
        with locked_output_folder(out, "--out"):
            earlier = earlier_export_files(out)
            if earlier and not args.overwrite:
                raise InputError(f"--out: {out} holds an earlier export ({len(earlier)} files, e.g. "
                                 f"{earlier[0].name}); give --overwrite to replace it, or choose another folder")
            check_free_space(out, export_bytes(jobs), "--out", "the export")
            with staging_folder(out, "export") as staging:
                table, summaries = _write_export(jobs, staging, args, first[0] if first else None)
                discard_export_record(out)
                publish_export(staging, out, earlier)
                print(f"success record: {write_export_record(out, table, summaries, vars(args))}", flush=True)
    except ReconstructionError as error:
        print(f"mspecies export: error: {error}", file=sys.stderr)
        return EXIT_FAILED
    print(f"wrote {len(table)} particles: {out / STAR_NAME}")
    return EXIT_OK


INPUT_FLAGS = ("manifest", "geometry", "particles", "stack", "mdoc", "tlt", "xf", "aln", "ctf", "defocus", "dose",
               "tomogram")
"""Flags of :func:`add_parser` that name an input file."""


def check_inputs_not_replaced(args: argparse.Namespace, out: Path) -> None:
    """InputError when the export into ``out`` would replace or remove one of its own input files (a
    ``particles.star`` given as ``--particles`` in the folder chosen as ``--out``, with or without ``--overwrite``)."""
    from mspecies.cli.export_files import EXCLUDED_TSV, STAR_NAME, earlier_export_files
    from mspecies.cli.export_record import RECORD_JSON

    if not out.is_dir():
        return
    written = {(out / name).resolve(): out / name for name in (STAR_NAME, EXCLUDED_TSV, RECORD_JSON)}
    written |= {path.resolve(): path for path in earlier_export_files(out)}
    for flag in INPUT_FLAGS:
        value = getattr(args, flag, None)
        if value and Path(value).resolve() in written:
            raise InputError(f"--out: the export writes {written[Path(value).resolve()]}, which is its input "
                             f"--{flag.replace('_', '-')} {value}; choose another --out folder (or move the input)")


def publish_export(staging: Path, out: Path, earlier: list[Path]) -> None:
    """Replace the earlier export (if any) by the complete one in ``staging``; say what was removed."""
    from mspecies.cli.atomic import publish
    from mspecies.cli.export_files import STAR_NAME

    publish(staging, out, replaced=earlier, last=STAR_NAME)
    if earlier:
        print(f"replaced the earlier export in {out}: removed its {len(earlier)} files")


def _write_export(jobs: list, staging: Path, args: argparse.Namespace, first_engine: FirstEngine | None = None
                  ) -> tuple[pd.DataFrame, list]:
    """Export every job into ``staging`` (MRCs per tilt series, excluded particles, STAR) → (STAR rows written,
    :class:`~mspecies.cli.export_files.ExportSummary` per tilt series); ``first_engine``: the first tilt series' engine
    started early (:func:`start_first_engine`)."""
    import pandas as pd

    from mspecies.cli.export_checks import exclusion_lines, overlap_fits
    from mspecies.cli.export_files import EXCLUDED_TSV, STAR_NAME, export_tilt_series
    from mspecies.cli.relion5_files import write_particle_series, write_tomogram
    from mspecies.core.extract import StackReuse
    from mspecies.formats.mrc import read_mrc
    from mspecies.formats.relion_subtomo import write_subtomo_star

    tables, tomograms, summaries, first = [], [], [], 0
    for job in jobs:
        for line in exclusion_lines(job):
            print(line, file=sys.stderr if line.startswith("warning") else sys.stdout, flush=True)
    excluded = pd.concat([job.excluded for job in jobs], ignore_index=True)
    if len(excluded):
        excluded.to_csv(staging / EXCLUDED_TSV, sep="\t", index=False, float_format="%.3f")
    if not any(len(job.particles) for job in jobs):
        raise InputError(f"particles: all {len(excluded)} particles were excluded (see the lines above); "
                         "nothing to export")
    todo = [job for job in jobs if len(job.particles)]
    ahead: dict[int, Prefetch | None] = {}  # job index → its engine, built while the job before it reconstructs
    if first_engine is not None:
        ahead[0] = first_engine.for_job(todo[0])
    stacks = StackReuse()  # a finished tilt series' prepared images, for the next engine built
    for k, job in enumerate(todo):
        built = ahead.pop(k, None)
        engine = adopt_engine(built.result()) if built is not None else None
        built = None
        stack = None if engine is not None else read_mrc(job.tilt_series.stack_path, mmap=True)[0]

        def start_next(k: int = k, job: ExportJob = job) -> None:
            ahead[k + 1] = _build_engine_ahead(job, todo[k + 1] if k + 1 < len(todo) else None, stacks)
            if ahead[k + 1] is None:
                stacks.clear()  # the next engine is built in its turn, from this tilt series' images

        def done(finished: TiltSeriesEngine, k: int = k) -> None:
            # keep the images only for an engine still to be built: the next in its turn, or the one after
            later = (k + 1 < len(todo) and ahead.get(k + 1) is None) or k + 2 < len(todo)
            if later and finished.prepared is not None:
                stacks.give(finished.prepared.images)

        ts_id = job.tilt_series.ts_id
        rows, summary = export_tilt_series(job.tilt_series, stack, job.particles, job.options, staging / ts_id,
                                           star_dir=staging, tomogram_shape_xyz_px=job.tomogram_shape_xyz_px,
                                           first_subset_index=first, log=lambda line: print(line, flush=True),
                                           engine=engine, overlap_writes=overlap_fits(job, None),
                                           engine_ready=start_next, direct_io=not args.buffered_writes,
                                           reuse=stacks, engine_done=done,
                                           engine_built=FIRST_ENGINE_BUILT if k == 0 else "during the previous "
                                           "tilt series")
        engine = None
        tables.append(rows)
        summaries.append(summary)
        if args.mode == "series":
            tomograms.append(write_tomogram(job.tilt_series, job.tomogram_shape_xyz_px, staging / ts_id, staging,
                                            defocus_gradient_sign=job.options.defocus_gradient_sign,
                                            log=lambda line: print(line, flush=True)))
        first += len(job.particles)
    stacks.clear()
    particles_table = pd.concat(tables, ignore_index=True)
    options = jobs[0].options
    optics = {"pixel_size_angst": options.output_pixel_size_angst, "box_px": options.box_px,
              "microscope": jobs[0].tilt_series.microscope}
    if args.mode == "series":
        write_particle_series(staging, particles_table, tomograms, image_pixel_angst=options.output_pixel_size_angst,
                              box_px=options.box_px, premultiplied=options.apply_ctf)
    else:
        write_subtomo_star(staging / STAR_NAME, particles_table, flavour=args.star_flavour, **optics)
    return particles_table, summaries


FIRST_ENGINE_THREAD = "mspecies-first-engine"
"""Name of the thread that builds the first tilt series' engine (:func:`start_first_engine`)."""

FIRST_ENGINE_BUILT = "while the particles were read and checked"
"""The log's words for when the first tilt series' engine was built."""


class FirstEngine(NamedTuple):
    """The engine of the first tilt series read, built on a background thread from the moment its geometry is
    known (:func:`start_first_engine`)."""

    tilt_series: TiltSeriesData
    build: Prefetch | None
    """None where it was not started."""

    def for_job(self, job: ExportJob) -> Prefetch | None:
        """The build when ``job`` exports this tilt series. Otherwise (its particles were all excluded) None, once
        the build has ended: its memory is free for the engines that follow, and its error, if any, concerns a
        tilt series that is not exported."""
        if self.build is None or job.tilt_series is self.tilt_series:
            return self.build
        with contextlib.suppress(Exception):
            self.build.result()
        return None


def start_first_engine(args: argparse.Namespace, tilt_series: TiltSeriesData) -> FirstEngine:
    """Start building ``tilt_series``' engine (its stack read and prepared, shared insertion, 3D-CTF tables: the
    setup of :meth:`~mspecies.core.reconstruct.TiltSeriesEngine.create`) on a background thread, while the command
    reads and checks the particles, imports what it writes with, and prepares the output folder.

    The build writes nothing; its error is raised where the engine is first needed, as when it is built there.
    A stack or memory plan that the build cannot use is refused first by the checks that follow (``plan_job``
    reads the stack's header and makes the same plan), so the build's own error then goes unread. Not started
    (``build`` None) for CuPy, or where the options are refused (the checks say why, in their order).
    """
    from mspecies.cli.errors import EXPECTED_ERRORS
    from mspecies.cli.export_overlap import Prefetch
    from mspecies.core.backend import select_backend
    from mspecies.core.reconstruct import TiltSeriesEngine
    from mspecies.formats.mrc import read_mrc

    try:
        options = export_options(args, tilt_series.pixel_size_angst)
        if select_backend(options.backend) is not np:
            return FirstEngine(tilt_series, None)
    except EXPECTED_ERRORS:
        return FirstEngine(tilt_series, None)

    def build() -> TiltSeriesEngine:
        return TiltSeriesEngine.create(tilt_series, read_mrc(tilt_series.stack_path, mmap=True)[0], options)

    return FirstEngine(tilt_series, Prefetch(build, name=FIRST_ENGINE_THREAD))


def _build_engine_ahead(job: ExportJob, next_job: ExportJob | None, reuse: StackReuse | None = None
                        ) -> Prefetch | None:
    """Start building ``next_job``'s engine (stack read and filtered on a pool of its own, shared insertion, 3D-CTF
    tables) on a background thread while ``job`` reconstructs; None when there is no next job, for CuPy, or when
    ``job``'s memory budget cannot also hold the next engine's fixed memory
    (:func:`~mspecies.cli.export_checks.overlap_fits`): that engine is then built when its turn comes."""
    from mspecies.cli.export_checks import overlap_fits
    from mspecies.cli.export_overlap import Prefetch, background_pool
    from mspecies.core.backend import select_backend
    from mspecies.core.reconstruct import TiltSeriesEngine, prepare_engine_stack
    from mspecies.formats.mrc import read_mrc

    if next_job is None or select_backend(next_job.options.backend) is not np or not overlap_fits(job, next_job):
        return None

    def build() -> TiltSeriesEngine:
        stack, _ = read_mrc(next_job.tilt_series.stack_path, mmap=True)
        prepared = prepare_engine_stack(next_job.tilt_series, stack, next_job.options,
                                        pool=background_pool(next_job.plan.preparation_threads), reuse=reuse,
                                        threads=next_job.plan.preparation_threads)
        return TiltSeriesEngine.create(next_job.tilt_series, None, next_job.options, prepared=prepared)

    return Prefetch(build)


def adopt_engine(engine: TiltSeriesEngine) -> TiltSeriesEngine:
    """An engine built on another thread, made to use the work arrays of this thread, which runs it
    (:func:`~mspecies.core.reconstruct.thread_work_buffers`: warm after the previous tilt series)."""
    from mspecies.core.reconstruct import thread_work_buffers

    engine.buffers = thread_work_buffers(engine.xp)
    return engine
