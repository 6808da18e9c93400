"""Exact hypervolume of a set of points, every objective minimised, in one to three dimensions.

The hypervolume of points ``P`` against a reference point ``r`` is the volume of the union of the
boxes ``[p, r]`` over the points ``p`` that lie strictly below ``r`` in every coordinate: the part
of objective space that ``P`` dominates, bounded by ``r``. It grows with every point that adds
something to the front and never with a dominated one, so "hypervolume of what a search found / that
of the best front known" measures how much of that front a search reached (`benchmarks/search_efficiency.py`).

What holds:

* a point with any coordinate at or beyond the reference adds nothing (its box is empty or flat);
* dominated points and duplicates add nothing; the result does not depend on the points' order;
* 2-D: sort by the first coordinate and sweep, adding one horizontal strip per point that lowers the
  best second coordinate so far: O(n log n);
* 3-D: sort by the third coordinate; between two consecutive third coordinates the dominated region's
  cross-section is the 2-D hypervolume of the points seen so far: O(n^2), exact for the few hundred
  points a tuning front has.

Objectives that are maximised enter negated (and their reference with them).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Sequence
from numbers import Real

Point = tuple[float, ...]


class HypervolumeError(ValueError):
    """Points or a reference point the hypervolume cannot be computed for; the message says why."""


def hypervolume(points: Iterable[Sequence[float]], reference: Sequence[float]) -> float:
    """Exact hypervolume dominated by `points` and bounded by `reference`, all coordinates minimised.

    `reference` has 1, 2 or 3 finite coordinates and every point as many. Points not strictly
    below the reference in every coordinate are ignored. An empty set has hypervolume 0. Raises
    `HypervolumeError` for a wrong dimension or a value that is not a finite real number.
    """
    ref = _reference(reference)
    inside = [p for p in _points(points, len(ref)) if all(a < b for a, b in zip(p, ref, strict=True))]
    if not inside:
        return 0.0
    if len(ref) == 1:
        return ref[0] - min(p[0] for p in inside)
    if len(ref) == 2:
        return _area(sorted(inside), ref)
    return _volume(inside, ref)


def _area(points: Sequence[Point], ref: Point) -> float:
    """2-D hypervolume of points sorted by (x, y), all strictly inside `ref`."""
    area, best_y = 0.0, ref[1]
    for x, y in points:
        if y < best_y:  # the strip between y and the best y so far is dominated from x to ref x
            area += (ref[0] - x) * (best_y - y)
            best_y = y
    return area


def _volume(points: Sequence[Point], ref: Point) -> float:
    """3-D hypervolume: slices between consecutive third coordinates, each a 2-D hypervolume."""
    ordered = sorted(points, key=lambda p: p[2])
    seen: list[tuple[float, float]] = []  # (x, y) of the points with z <= the current slice, sorted
    volume = 0.0
    for index, (x, y, z) in enumerate(ordered):
        bisect.insort(seen, (x, y))
        top = ordered[index + 1][2] if index + 1 < len(ordered) else ref[2]
        if top > z:
            volume += _area(seen, ref) * (top - z)
    return volume


def _reference(reference: Sequence[float]) -> Point:
    try:
        values = tuple(reference)
    except TypeError:
        raise HypervolumeError(f"the reference point must be a sequence of numbers, got {reference!r}") from None
    if not 1 <= len(values) <= 3:
        raise HypervolumeError(f"the reference point must have 1, 2 or 3 coordinates, got {len(values)}")
    return tuple(_finite(v, "reference point") for v in values)


def _points(points: Iterable[Sequence[float]], dims: int) -> list[Point]:
    out = []
    for index, point in enumerate(points):
        try:
            values = tuple(point)
        except TypeError:
            raise HypervolumeError(f"point {index} must be a sequence of numbers, got {point!r}") from None
        if len(values) != dims:
            raise HypervolumeError(
                f"point {index} has {len(values)} coordinates but the reference point has {dims}: {values!r}"
            )
        out.append(tuple(_finite(v, f"point {index}") for v in values))
    return out


def _finite(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise HypervolumeError(f"{where}: every coordinate must be a finite real number, got {value!r}")
    return float(value)
