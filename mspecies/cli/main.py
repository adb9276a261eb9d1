"""Command-line workers: ``python -m mspecies <command> ...``.

Each subcommand has a function that declares its arguments and one that does the work and returns an exit code
(``add_parser`` and ``run`` of its module, ``_add_synth_parser`` and ``_run_synth`` here); register new ones in
:data:`COMMAND_MODULES`. A command's module is imported only when it runs (or for ``--help`` of all commands):
``export`` does not load the assignment and STAR-dialect modules of ``intersect`` and ``convert``. Expected failures
(:data:`mspecies.cli.errors.EXPECTED_ERRORS`: bad input, I/O, memory) end with exit code 2 and one line on stderr
naming the file or parameter; unexpected errors keep their traceback.
Nothing here imports pyworkflow, pwem or tomo.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence

from mspecies.cli.errors import EXPECTED_ERRORS, expected_error_message

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class Interrupted(KeyboardInterrupt):
    """A stop signal (SIGINT = Ctrl-C, SIGTERM = ``kill``, a cancelled queue job) raised where the command runs, so
    that its ``finally`` blocks remove what it had not finished, as for Ctrl-C."""

    def __init__(self, signal_number: int) -> None:
        super().__init__(signal.Signals(signal_number).name)
        self.signal_number = signal_number


def _raise_interrupted(signal_number: int, _frame: object) -> None:
    raise Interrupted(signal_number)


@contextlib.contextmanager
def _stop_signals_raise() -> Iterator[None]:
    """SIGINT and SIGTERM raise :class:`Interrupted` for the block (main thread only; handlers restored after)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {number: signal.signal(number, _raise_interrupted) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


class _ArgumentParser(argparse.ArgumentParser):
    """argparse that reports bad arguments as one line and exit code 2 (no usage dump)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _snr(text: str) -> float | None:
    """``--snr`` value: a positive number, or 'inf'/'none' for noise-free images."""
    if text.strip().lower() in ("inf", "none", "infinity"):
        return None
    try:
        value = float(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected a number > 0 or 'inf', got {text!r}") from error
    if math.isinf(value):
        return None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0 or 'inf', got {text!r}")
    return value


def _add_synth_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("synth", help="generate a synthetic tilt-series dataset with known ground truth")
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-tomograms", type=int, default=1)
    parser.add_argument("--n-particles", type=int, default=50)
    parser.add_argument("--n-tilts", type=int, default=41)
    parser.add_argument("--box", type=int, default=64, help="particle box in px (even)")
    parser.add_argument("--pixel-size", type=float, default=4.0, help="tilt-series pixel size in Å")
    parser.add_argument("--image-size", type=int, nargs=2, default=(512, 512), metavar=("NY", "NX"))
    parser.add_argument("--thickness", type=float, default=1000.0, help="specimen thickness in Å")
    parser.add_argument("--snr", type=_snr, default=0.05, help="signal-to-noise ratio, or 'inf' for noise-free")
    parser.add_argument("--binning", type=int, default=4, help="tomogram binning")
    parser.add_argument("--no-check", action="store_true", help="skip the self-check")


def _run_synth(args: argparse.Namespace) -> int:
    from mspecies.synth.check import self_check
    from mspecies.synth.dataset import generate_dataset

    started = time.perf_counter()
    manifest = generate_dataset(
        args.out, seed=args.seed, n_tomograms=args.n_tomograms, n_particles=args.n_particles, n_tilts=args.n_tilts,
        box_px=args.box, pixel_size_angst=args.pixel_size, image_shape_yx=tuple(args.image_size),
        thickness_angst=args.thickness, snr=args.snr, tomogram_binning=args.binning)
    print(f"manifest: {manifest}")
    print(f"generated in {time.perf_counter() - started:.1f} s")
    if args.no_check:
        return EXIT_OK
    result = self_check(manifest)
    summary = {key: (round(value, 3) if isinstance(value, float) else value) for key, value in result.items()
               if not key.endswith("xyz_px")}
    print(f"self-check: {json.dumps(summary)}")
    return EXIT_OK if result["passed"] else EXIT_FAILED


COMMAND_MODULES = {"synth": __name__, "export": "mspecies.cli.export", "convert": "mspecies.cli.convert",
                   "demo": "mspecies.cli.demo", "intersect": "mspecies.cli.intersect"}
"""Each command's module: its ``add_parser`` (declares the arguments) and ``run`` (does the work, returns the exit
code); ``synth`` lives here."""

QUICK_EXIT = frozenset({"synth", "export", "convert", "intersect"})
"""Commands after which ``python -m mspecies`` leaves with ``os._exit`` once its output is flushed: they hold no
open file, temporary folder, exit handler or Scipion project when :func:`main` returns (``demo`` runs Scipion,
which may)."""

Command = tuple[Callable[[argparse._SubParsersAction], None], Callable[[argparse.Namespace], int]]


def command(name: str) -> Command:
    """(declare the arguments, run) of command ``name``, importing its module."""
    if name == "synth":
        return _add_synth_parser, _run_synth
    module = importlib.import_module(COMMAND_MODULES[name])
    return module.add_parser, module.run


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The top-level parser with one subparser per command of :data:`COMMAND_MODULES`, or with command ``only``
    alone (what :func:`main` builds to run it: the other commands' modules are not imported)."""
    parser = _ArgumentParser(prog="mspecies", description="mspecies command-line workers")
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=_ArgumentParser)
    for name in [only] if only in COMMAND_MODULES else COMMAND_MODULES:
        command(name)[0](subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run a subcommand; returns 0 on success, 1 on a failed check, 2 on bad input, 128 + the signal number when
    stopped by SIGINT (Ctrl-C) or SIGTERM (after removing what the run had not completed, without a traceback)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser(argv[0] if argv else None).parse_args(argv)
    except SystemExit as exit_:  # argparse: --help (0) or a bad argument (2), message already printed
        return int(exit_.code or 0)
    try:
        with _stop_signals_raise():
            return command(args.command)[1](args)
    except KeyboardInterrupt as stop:
        number = getattr(stop, "signal_number", signal.SIGINT)
        print(f"mspecies {args.command}: interrupted by {signal.Signals(number).name}; the files this run had not "
              "completed were removed", file=sys.stderr)
        return 128 + number
    except EXPECTED_ERRORS as error:
        message = expected_error_message(error, args)
        if message is None:
            raise
        print(f"mspecies {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USAGE
