"""Made-up ``/proc/self/cgroup``, ``/proc/self/mountinfo`` and cgroup files in a test's folder, for the readers of
:mod:`mspecies.core.cgroups` (memory limits, CPU quotas); and real cgroups (root) to run a command in."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mspecies.core.cgroups import controller_hierarchy


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


def new_cgroup(controller: str, name: str, files: dict[int, dict[str, str]]) -> Path:
    """A new real cgroup ``name`` with ``controller``, its ``files[version]`` written (e.g. a limit); skips where
    that cannot be made (not root, no hierarchy with ``controller``). The caller removes it (``rmdir``)."""
    if os.geteuid() != 0:
        pytest.skip(f"making a {controller} cgroup needs root")
    hierarchy = controller_hierarchy(controller)
    if hierarchy is None:
        pytest.skip(f"no {controller} cgroup controller to make a cgroup in (neither v1 nor enabled in v2's root)")
    version, point = hierarchy
    folder = Path(point) / name
    try:
        folder.mkdir(exist_ok=True)
        for file, value in files[version].items():
            (folder / file).write_text(value)
    except OSError as error:
        pytest.skip(f"cannot make a {controller} cgroup at {folder}: {error}")
    return folder


def in_cgroup(folder: Path, command: list[str]) -> list[str]:
    """``command`` started inside the cgroup ``folder`` (the shell moves itself there, then becomes the command)."""
    return ["sh", "-c", f'echo $$ > "{folder / "cgroup.procs"}" && exec "$@"', "sh", *command]
