"""Where the real files of ``../shared`` are: the particle STAR corpus (``real_star/files``, provenance in
``SOURCES.md`` there) and other programs' outputs the tests read (e.g. ``aretomo/``)."""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def shared_dir(relative: str) -> Path | None:
    """``$MSPECIES_SHARED/<relative>``, else ``../shared/<relative>`` beside the repository (or beside the folder
    holding a git worktree of it); None when absent."""
    candidates = [Path(os.environ["MSPECIES_SHARED"])] if "MSPECIES_SHARED" in os.environ else []
    candidates += [ROOT.parent / "shared", ROOT.parent.parent / "shared"]
    return next((shared / relative for shared in candidates if (shared / relative).is_dir()), None)


def corpus_dir() -> Path | None:
    """The real particle STAR corpus (``real_star/files`` of :func:`shared_dir`); None when absent."""
    return shared_dir("real_star/files")
