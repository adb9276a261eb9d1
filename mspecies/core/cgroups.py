"""The control groups (cgroups) of this process, read from ``/proc`` and the cgroup file systems: where a SLURM job
(``task/cgroup``), a container or a systemd unit limits its memory or CPU time (standard library only).

:func:`cgroup_folders` finds the process's cgroup folder in the hierarchy of a controller (cgroup v1, where that
controller is mounted on its own, else the unified v2 hierarchy) and lists it with its parents up to the mount
point: a limit set on any of them applies (SLURM sets the job's on ``job_<id>``, above the step's and the task's).
The folder comes from the process's cgroup path (``/proc/self/cgroup``) relative to the root of the mount
(``/proc/self/mountinfo``), so it also works in a container that sees only its own subtree.
"""

from __future__ import annotations

import os

MOUNTINFO = "/proc/self/mountinfo"
MEMBERSHIP = "/proc/self/cgroup"


def cgroup_folders(controller: str, mountinfo: str = MOUNTINFO,
                   membership: str = MEMBERSHIP) -> tuple[int, list[str]] | None:
    """(cgroup version, [the process's cgroup folder, its parent, ..., the mount point]) for ``controller``
    (e.g. ``memory``, ``cpu``), or None where neither a v1 hierarchy with it nor a v2 one is mounted and
    readable."""
    try:
        with open(membership) as handle:
            paths = _cgroup_paths(handle.read(), controller)
        with open(mountinfo) as handle:
            mounts = _cgroup_mounts(handle.read(), controller)
    except OSError:
        return None
    for version in (1, 2):
        if version in paths and version in mounts:
            root, point = mounts[version]
            return version, _up_to(_cgroup_folder(root, point, paths[version]), point)
    return None


def controller_hierarchy(controller: str, mountinfo: str = MOUNTINFO) -> tuple[int, str] | None:
    """(cgroup version, mount point) of the hierarchy in which a new cgroup gets ``controller``: its own v1
    hierarchy, else the v2 one where the root hands ``controller`` to its children (``cgroup.subtree_control``);
    None where neither is mounted and readable."""
    try:
        with open(mountinfo) as handle:
            mounts = _cgroup_mounts(handle.read(), controller)
    except OSError:
        return None
    if 1 in mounts:
        return 1, mounts[1][1]
    words = read_cgroup_words(os.path.join(mounts[2][1], "cgroup.subtree_control")) if 2 in mounts else None
    return (2, mounts[2][1]) if words is not None and controller in words else None


def read_cgroup_int(path: str) -> int | None:
    """An integer file of a cgroup (None where absent, unreadable, ``max`` or negative: no limit)."""
    try:
        with open(path) as handle:
            text = handle.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def read_cgroup_words(path: str) -> list[str] | None:
    """The words of a cgroup file (e.g. v2 ``cpu.max``: ``quota period``), None where absent or unreadable."""
    try:
        with open(path) as handle:
            return handle.read().split()
    except OSError:
        return None


def read_cgroup_stat(path: str, key: str) -> int:
    """The value of ``key`` in a ``key value`` per line file (``memory.stat``), 0 where absent."""
    try:
        with open(path) as handle:
            for line in handle:
                name, _, value = line.partition(" ")
                if name == key:
                    return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _cgroup_paths(text: str, controller: str) -> dict[int, str]:
    """{1: path in the v1 hierarchy of ``controller``, 2: path in the unified hierarchy} from
    ``/proc/self/cgroup`` (lines ``id:controllers:path``; v2's has no controllers)."""
    paths: dict[int, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            paths[2] = path
        elif controller in controllers.split(","):
            paths[1] = path
    return paths


def _cgroup_mounts(text: str, controller: str) -> dict[int, tuple[str, str]]:
    """{version: (root of the mount inside the hierarchy, mount point)} from ``/proc/self/mountinfo``: fields
    ``id parent major:minor root mount-point options [optional...] - type source super-options``."""
    mounts: dict[int, tuple[str, str]] = {}
    for line in text.splitlines():
        before, sep, after = line.partition(" - ")
        fields, tail = before.split(), after.split()
        if not sep or len(fields) < 5 or len(tail) < 3:
            continue
        root, point = _unescape(fields[3]), _unescape(fields[4])
        if tail[0] == "cgroup2":
            mounts.setdefault(2, (root, point))
        elif tail[0] == "cgroup" and controller in tail[2].split(","):
            mounts.setdefault(1, (root, point))
    return mounts


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes (``\\040``)."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def _cgroup_folder(root: str, point: str, path: str) -> str:
    """The process's cgroup folder: ``path`` relative to the mount's ``root``, under the mount ``point`` (the mount
    point itself where the path lies outside what is mounted, as in a container without its own cgroup
    namespace)."""
    relative = os.path.relpath(path, root)
    if relative == "." or relative.startswith(".."):
        return point
    return os.path.join(point, relative)


def _up_to(folder: str, point: str) -> list[str]:
    """``folder`` and its parents up to the mount ``point`` (or the file system's root)."""
    folders = [folder]
    while os.path.normpath(folder) != os.path.normpath(point) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
        folders.append(folder)
    return folders
