"""Where the real particle STAR corpus is (``../shared/real_star/files``, provenance in ``SOURCES.md`` there)."""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def corpus_dir() -> Path | None:
    """``$MSPECIES_SHARED/real_star/files``, else ``../shared/real_star/files`` beside the repository (or beside
    the folder holding a git worktree of it); None when absent."""
    candidates = [Path(os.environ["MSPECIES_SHARED"])] if "MSPECIES_SHARED" in os.environ else []
    candidates += [ROOT.parent / "shared", ROOT.parent.parent / "shared"]
    for shared in candidates:
        if (shared / "real_star" / "files").is_dir():
            return shared / "real_star" / "files"
    return None
