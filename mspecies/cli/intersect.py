"""``python -m mspecies intersect --old OLD.star --new NEW.star --tolerance-angst T --out DIR``.

Matches the new particles to the old ones per tomogram (one-to-one, within the tolerance; M's "Intersect particle
sets") and writes into ``DIR``: ``only_old.star``, ``in_both.star`` (old particles, old poses and columns),
``only_new.star``, ``selected.star`` (the union chosen with ``--keep``), all in the old file's dialect with new rows
renamed to the old tomograms,
``distance_histogram.png``, ``summary.json``, ``particle_distances.tsv`` and ``histogram_distances.txt``.
Bad input ends with exit code 2 and one line naming the file or column.

Beyond M: ``--angular-tolerance-deg A --symmetry C1`` also requires the two poses to be within A degrees (the
smallest angle over the reference's point group, RELION's names); the distance stays the cost. ``--group-by
COLUMN`` matches only particles with equal values of a column (e.g. ``rlnClassNumber``) besides the tomogram.
``--score COLUMN`` makes "in both" keep the particle of each pair with the higher value (a tie keeps the old one).
The histogram shows each old particle's distance to its nearest new particle (and, with angles, the angular
distance of those within the tolerance): the true pairs' peak and the chance neighbours' tail, with the tolerance
best in the valley. The same file as ``--old`` and ``--new`` removes duplicates (one particle per cluster of
mutual duplicates, the best-scored or the first; ``in_both.star`` = deduplicated set, ``duplicates.star`` = the
removed ones; :mod:`mspecies.cli.deduplicate_files`).

Recipes (M): add new particles = ``--tolerance-angst 0 --keep only_old,only_new`` (exact duplicates are "in
both" at tolerance 0, so add ``in_both`` to keep one copy of each); remove particles = ``--keep only_old``;
keep the survivors of a classification = ``--keep in_both``; remove duplicates = ``--old X --new X``.
"""

from __future__ import annotations

import argparse

from mspecies.cli.convert import (
    DIALECTS,
    add_frame_arguments,
    add_microscope_arguments,
    microscope_from_args,
    read_tomo_sizes,
)
from mspecies.cli.deduplicate_files import any_summary_lines, deduplicate_star_file
from mspecies.cli.intersect_files import (
    DEFAULT_HISTOGRAM_BINS,
    MatchOptions,
    intersect_star_files,
    parse_keep,
    same_file,
)
from mspecies.core.assignment import MODES
from mspecies.core.symmetry import SYMMETRY_HELP

SCREENFUL_TOMOGRAMS = 10
"""Per-tomogram lines printed in each of the name report and the counts; the others are counted in one line
(every tomogram is in summary.json)."""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Declare the ``intersect`` subcommand."""
    parser = subparsers.add_parser("intersect", help="intersect two particle STAR files (M's particle-set intersect)")
    parser.add_argument("--old", required=True, help="old particle STAR (its particles represent 'in both')")
    parser.add_argument("--new", required=True, help="new particle STAR")
    parser.add_argument("--tolerance-angst", type=float, required=True,
                        help="largest distance (Å) between a matched old and new particle")
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument("--keep", default="only_old,in_both,only_new",
                        help="sets forming selected.star, comma-separated: only_old, in_both, only_new "
                             "(default: all three)")
    parser.add_argument("--mode", choices=MODES, default="gated",
                        help="gated (default): most pairs within the tolerance, then least total distance; "
                             "m_compatible: M's dense assignment then threshold")
    parser.add_argument("--old-dialect", choices=DIALECTS, help="dialect of --old (default: detected)")
    parser.add_argument("--new-dialect", choices=DIALECTS, help="dialect of --new (default: detected)")
    add_frame_arguments(parser)
    parser.add_argument("--name-map", help="tomogram names of the new file → old file: 'a=b, c=d'")
    parser.add_argument("--histogram-radius-angst", type=float,
                        help="matching radius (Å) for the distance histogram (default: max(3 x tolerance, 20 Å); "
                             "inf in m_compatible mode)")
    parser.add_argument("--bins", type=int, default=DEFAULT_HISTOGRAM_BINS, help="histogram bins")
    add_microscope_arguments(parser)
    parser.add_argument("--log-scale", action="store_true", help="histogram counts on a log scale")
    parser.add_argument("--angular-tolerance-deg", type=float,
                        help="also require the two poses to be within this angle (deg, smallest over --symmetry); "
                             "default: no orientation gate")
    parser.add_argument("--symmetry", default="C1", help=f"point group of the reference: {SYMMETRY_HELP}")
    parser.add_argument("--group-by", metavar="COLUMN",
                        help="match only particles with equal values of this column (e.g. rlnClassNumber), "
                             "besides the tomogram; both files must have it")
    parser.add_argument("--score", metavar="COLUMN",
                        help="numeric column, higher is better (e.g. rlnMaxValueProbDistribution, "
                             "rlnLogLikeliContribution): 'in both' keeps the better particle of each pair "
                             "(default: the old one, as M)")


def run(args: argparse.Namespace) -> int:
    """Run the intersection; print the name report first, then the counts. Returns 0."""
    keep = parse_keep(args.keep)
    shapes = read_tomo_sizes(args.tomo_sizes) if args.tomo_sizes else (
        tuple(args.tomo_size) if args.tomo_size else None)
    options = MatchOptions(args.angular_tolerance_deg, args.symmetry, args.group_by, args.score)
    microscope = microscope_from_args(args)
    if same_file(args.old, args.new):
        summary = deduplicate_star_file(
            args.old, args.tolerance_angst, args.out, keep=keep, dialect=args.old_dialect,
            coord_pixel_size_angst=args.coord_pixel_size_angst, tomo_shape_px=shapes,
            histogram_radius_angst=args.histogram_radius_angst, n_bins=args.bins, log_scale=args.log_scale,
            options=options, microscope=microscope)
    else:
        summary = intersect_star_files(
            args.old, args.new, args.tolerance_angst, args.out, keep=keep, mode=args.mode,
            old_dialect=args.old_dialect, new_dialect=args.new_dialect,
            coord_pixel_size_angst=args.coord_pixel_size_angst, tomo_shape_px=shapes, name_mapping=args.name_map,
            histogram_radius_angst=args.histogram_radius_angst, n_bins=args.bins, log_scale=args.log_scale,
            max_log_tomograms=SCREENFUL_TOMOGRAMS, options=options, microscope=microscope)
    for line in any_summary_lines(summary, SCREENFUL_TOMOGRAMS):
        print(line)
    print(f"outputs in {args.out}")
    return 0
