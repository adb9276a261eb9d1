"""Tolerant matching of tomogram names in STAR files to known tilt-series ids (Scipion tsIds).

STAR files name tomograms in many ways (``rlnTomoName TS_01``, ``rlnMicrographName Tomograms/TS_01_10.00Apx.mrc``,
``wrpSourceName TS_01.tomostar``). :func:`match_tomo_names` tries, per distinct STAR name and in order: the user's
mapping, exact equality, equality after :func:`normalise_tomo_name`, then the same ignoring case. The result is a
:class:`NameMatchReport` to log and check *before* any matching work: what each name matched and how, the names
that matched nothing, names with several candidates, and ts ids claimed by several STAR names.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath, PureWindowsPath

import numpy as np
import pandas as pd

from mspecies.common.types import InputError

# Stripped repeatedly from the end: file extensions, reconstruction/binning/pixel-size tags.
_SUFFIXES = re.compile(
    r"(\.(mrcs?|st|ali|rec|tomostar|xml|star|tif{1,2}|eer|map|hdf|em)"
    r"|[_.-]rec|[_.-]bin\d+|[_.-]\d+(\.\d+)?apx|[_.-]flipped|[_.-]filtered|[_.-]denoised)$",
    re.IGNORECASE)


def normalise_tomo_name(name: str) -> str:
    """Strip directories and the usual suffixes: ``/a/TS_01_10.00Apx.mrc`` → ``TS_01``; case is kept."""
    text = str(name).strip()
    text = PureWindowsPath(PurePosixPath(text).name).name if text else text
    while True:
        stripped = _SUFFIXES.sub("", text)
        if stripped == text or not stripped:
            return text
        text = stripped


def parse_name_mapping(text: str) -> dict[str, str]:
    """``"TS_1.tomostar=TS_01, TS_2.tomostar=TS_02"`` (commas, semicolons or new lines) → {star name: ts id}."""
    mapping: dict[str, str] = {}
    for item in re.split(r"[,;\n]", text or ""):
        item = item.strip()
        if not item:
            continue
        if item.count("=") != 1 or not all(part.strip() for part in item.split("=")):
            raise InputError(f"name mapping: expected 'star_name=ts_id', got {item!r}")
        star_name, ts_id = (part.strip() for part in item.split("="))
        if star_name in mapping and mapping[star_name] != ts_id:
            raise InputError(f"name mapping: {star_name!r} is mapped to both {mapping[star_name]!r} and {ts_id!r}")
        mapping[star_name] = ts_id
    return mapping


@dataclass(frozen=True)
class NameMatchReport:
    """Outcome of matching STAR tomogram names to ts ids.

    Attributes
    ----------
    matches
        STAR name → ts id, for names with exactly one candidate.
    methods
        STAR name → how it matched: ``"mapping"``, ``"exact"``, ``"normalised"``, ``"case-insensitive"`` or
        ``"Scipion ts id"`` (:func:`scipion_ts_id`).
    unmatched
        STAR names with no candidate.
    ambiguous
        STAR name → the several ts ids it could be.
    collisions
        ts id → the several STAR names matched to it (without a user mapping saying so).
    particles_per_name
        STAR name → number of particles (rows) with that name.
    unused_ts_ids
        Known ts ids no STAR name matched.
    """

    matches: dict[str, str]
    methods: dict[str, str]
    unmatched: tuple[str, ...]
    ambiguous: dict[str, tuple[str, ...]]
    collisions: dict[str, tuple[str, ...]]
    particles_per_name: dict[str, int]
    unused_ts_ids: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        """True when no name is ambiguous and no ts id is claimed by two STAR names (unmatched names allowed)."""
        return not self.ambiguous and not self.collisions

    @property
    def particles_per_ts_id(self) -> dict[str, int]:
        """ts id → particles matched to it."""
        counts: dict[str, int] = {}
        for name, ts_id in self.matches.items():
            counts[ts_id] = counts.get(ts_id, 0) + self.particles_per_name.get(name, 0)
        return counts

    @property
    def n_unmatched_particles(self) -> int:
        return sum(self.particles_per_name.get(name, 0) for name in self.unmatched)

    def summary_lines(self) -> list[str]:
        """Human-readable lines for a log: per ts id the particles matched, then the problems."""
        lines = [f"{ts_id}: {count} particle(s) from {sorted(n for n, t in self.matches.items() if t == ts_id)}"
                 for ts_id, count in sorted(self.particles_per_ts_id.items())]
        if self.unmatched:
            lines.append(f"no tilt series for {len(self.unmatched)} STAR name(s) ({self.n_unmatched_particles} "
                         f"particle(s)): {list(self.unmatched)[:10]}")
        lines += [f"ambiguous: {name!r} could be any of {list(ids)}" for name, ids in self.ambiguous.items()]
        lines += [f"duplicated: {list(names)} all match {ts_id!r}" for ts_id, names in self.collisions.items()]
        if self.unused_ts_ids:
            lines.append(f"tilt series without particles: {list(self.unused_ts_ids)[:10]}")
        return lines

    def raise_if_ambiguous(self) -> None:
        """InputError listing ambiguous names and collisions, with the mapping syntax that settles them."""
        if self.ok:
            return
        problems = [line for line in self.summary_lines() if line.startswith(("ambiguous", "duplicated"))]
        raise InputError("tomogram names do not match tilt series one to one: " + "; ".join(problems) +
                         ". Settle it with a mapping such as 'TS_1.tomostar=TS_01, ...'")

    def ts_ids_for(self, star_names: Sequence[str] | np.ndarray) -> np.ndarray:
        """(N,) ts id per particle name, None where unmatched or ambiguous."""
        names = pd.Series(np.asarray(star_names, dtype=object))
        return names.map(self.matches).astype(object).where(names.isin(list(self.matches)), None).to_numpy()


_SCIPION_TS_ID_CHARACTERS = (("-", "_"), (".", ""), ("[", ""), ("]", ""), ("__", "_"))


def scipion_ts_id(name: str) -> str:
    """The ts id Scipion's tomography importers give a file named ``name`` (scipion-em-tomo
    ``tomo/convert/mdoc.py`` ``normalizeTSId``, l. 457-482: text before the first dot, ``TS_`` before a leading
    digit, ``-`` → ``_``, ``[``/``]`` removed, ``__`` → ``_``): Warp's ``0243_12.23Apx.mrc`` is ``TS_0243``."""
    text = normalise_tomo_name(name).split(".")[0]
    text = f"TS_{text}" if text[:1].isdigit() else text
    for old, new in _SCIPION_TS_ID_CHARACTERS:
        text = text.replace(old, new)
    return text


def _candidates(name: str, ts_ids: Sequence[str], normalised: Mapping[str, list[str]],
                lowered: Mapping[str, list[str]]) -> tuple[list[str], str]:
    if name in ts_ids:
        return [name], "exact"
    key = normalise_tomo_name(name)
    if key in normalised:
        return normalised[key], "normalised"
    if key.lower() in lowered:
        return lowered[key.lower()], "case-insensitive"
    return normalised.get(scipion_ts_id(name), []), "Scipion ts id"


def _index(ts_ids: Iterable[str], lower: bool) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for ts_id in ts_ids:
        key = normalise_tomo_name(ts_id)
        out.setdefault(key.lower() if lower else key, []).append(ts_id)
    return out


def match_tomo_names(star_names: Sequence[str] | np.ndarray, ts_ids: Sequence[str],
                     mapping: Mapping[str, str] | str | None = None) -> NameMatchReport:
    """Match the tomogram name of every particle to ``ts_ids``.

    Parameters
    ----------
    star_names
        (N,) tomogram name per particle (``rlnTomoName``, ``rlnMicrographName``, ``wrpSourceName``).
    ts_ids
        Known tilt-series ids.
    mapping
        {star name: ts id} or its text form (:func:`parse_name_mapping`); wins over every other rule and settles
        ambiguity. Keys may be given as the STAR name or its normalised form.
    """
    user = parse_name_mapping(mapping) if isinstance(mapping, str) else dict(mapping or {})
    ts_list = [str(t) for t in ts_ids]
    unknown = sorted(set(user.values()) - set(ts_list))
    if unknown:
        raise InputError(f"name mapping: ts id(s) {unknown} are not among the tilt series {ts_list[:10]}")
    user_normalised = {normalise_tomo_name(k): v for k, v in user.items()}
    counts = pd.Series(np.asarray(star_names, dtype=object)).astype(str).value_counts(sort=False)
    normalised, lowered = _index(ts_list, False), _index(ts_list, True)
    matches, methods, ambiguous, unmatched = {}, {}, {}, []
    for name in counts.index:
        if name in user or normalise_tomo_name(name) in user_normalised:
            matches[name] = user.get(name, user_normalised.get(normalise_tomo_name(name)))
            methods[name] = "mapping"
            continue
        found, method = _candidates(name, ts_list, normalised, lowered)
        if len(found) == 1:
            matches[name], methods[name] = found[0], method
        elif found:
            ambiguous[name] = tuple(found)
        else:
            unmatched.append(name)
    claimed: dict[str, list[str]] = {}
    for name, ts_id in matches.items():
        claimed.setdefault(ts_id, []).append(name)
    collisions = {ts_id: tuple(names) for ts_id, names in claimed.items()
                  if len(names) > 1 and any(methods[n] != "mapping" for n in names)}
    return NameMatchReport(matches=matches, methods=methods, unmatched=tuple(unmatched), ambiguous=ambiguous,
                           collisions=collisions, particles_per_name={str(k): int(v) for k, v in counts.items()},
                           unused_ts_ids=tuple(t for t in ts_list if t not in claimed))
