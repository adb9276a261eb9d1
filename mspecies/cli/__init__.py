"""Command-line workers, ``python -m mspecies <command>`` (:mod:`.main`), and what they orchestrate:
reading files (formats) → numerics (core) → writing files (formats).

* :mod:`.main` — the entry point and the ``synth`` command; :mod:`.export`, :mod:`.intersect`,
  :mod:`.convert`, :mod:`.demo` — one module per command;
* :mod:`.export_files` — export one tilt series to MRC files + STAR rows (what the Scipion protocol's
  ``runJob`` runs through ``python -m mspecies export``); :mod:`.export_overlap` — its writer thread and the next
  tilt series' engine built ahead;
* :mod:`.intersect_files` — intersect two STAR files, outputs in the old file's dialect, histogram;
* :mod:`.export_checks`, :mod:`.intersect_checks` — what export and intersect check before their first byte
  (parameters, memory plans, particles outside the images, duplicates, free space);
* :mod:`.atomic` — outputs that never mix runs: folder locks, staging folders, renames, free-space checks;
  :mod:`.errors` — the one error path (expected failures → one message and exit code 2);
* :mod:`.qc` — QC figures (central slices, distance histograms) shared with the viewers;
* :mod:`.demo_chain` and :mod:`.workflow` — the demo's headless Scipion chain (they import Scipion lazily,
  inside functions, so importing this package never loads pyworkflow).
"""

from .main import EXIT_FAILED, EXIT_OK, EXIT_USAGE, build_parser, main

__all__ = ["EXIT_FAILED", "EXIT_OK", "EXIT_USAGE", "build_parser", "main"]
