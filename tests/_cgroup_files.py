"""Made-up ``/proc/self/cgroup``, ``/proc/self/mountinfo`` and cgroup files in a test's folder, for the readers of
:mod:`mspecies.core.cgroups` (memory limits, CPU quotas)."""

from __future__ import annotations

from pathlib import Path


def write_files(root: Path, files: dict[str, str]) -> None:
    """Write ``{relative path: text}`` under ``root``, making the folders."""
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def proc_files(folder: Path, membership: str, mount_line: str) -> tuple[str, str]:
    """(mountinfo, cgroup membership) files in ``folder``: ``membership`` as ``/proc/self/cgroup`` says it, and a
    root file system plus ``mount_line`` (``{root}`` is replaced by ``folder``) as ``/proc/self/mountinfo``."""
    (folder / "cgroup").write_text(membership)
    (folder / "mountinfo").write_text(
        "22 1 8:1 / / rw,relatime - ext4 /dev/vda rw\n" + mount_line.format(root=folder) + "\n")
    return str(folder / "mountinfo"), str(folder / "cgroup")
