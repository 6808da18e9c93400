"""The Pareto front of measured schedules, and the best one for a latency target.

Works on plain points, never Optuna objects, so the same code serves a live study and database
rows: a point is a `Point`, a mapping, or any object with ``latency_ms``, ``memory_mib`` and
``quality`` (optionally ``feasible``, ``state`` and ``retention``). Functions return the very
objects they were given, so a caller passing rows gets rows back.

Dominance is Optuna's: a point dominates another when it is no worse on every objective (lower
latency, lower memory, higher quality) and better on at least one. Identical points do not
dominate each other, so both stay on the front (as in ``study.best_trials``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from .objectives import Metrics, retention_of

P = TypeVar("P")


class NoMatchError(LookupError):
    """No point on the front satisfies the memory cap or retention floor of a query."""


@dataclass(frozen=True)
class Point:
    """One measured schedule, as the front and target queries see it. ``ref`` is the caller's
    handle on it (a trial number, a row id, the row itself)."""

    latency_ms: float
    memory_mib: float
    quality: float
    retention: float | None = None
    feasible: bool = True
    state: str = "complete"
    ref: Any = None

    @classmethod
    def from_metrics(
        cls, metrics: Metrics, *, feasible: bool = True, state: str = "complete", ref: Any = None
    ) -> Point:
        if metrics.memory_mib is None:
            raise ValueError(f"metrics without a memory reading cannot be a point: {metrics}")
        return cls(
            latency_ms=metrics.latency_ms,
            memory_mib=metrics.memory_mib,
            quality=metrics.quality,
            retention=retention_of(metrics),
            feasible=feasible,
            state=state,
            ref=ref,
        )


@dataclass(frozen=True)
class Choice:
    """Answer of `best_for_target`: ``met`` says whether ``point`` meets the latency target;
    ``gap_ms`` is how far above the target it is (0.0 when met)."""

    point: Any
    met: bool
    gap_ms: float


def _get(point: Any, name: str, default: Any = None) -> Any:
    if isinstance(point, Mapping):
        return point.get(name, default)
    return getattr(point, name, default)


def _usable(point: Any) -> bool:
    """Completed and feasible; a point without those fields counts as both."""
    state = _get(point, "state")
    if state is not None and str(getattr(state, "name", state)).lower() != "complete":
        return False
    return _get(point, "feasible") is not False


def _objectives(point: Any) -> tuple[float, float, float]:
    values = tuple(_get(point, name) for name in ("latency_ms", "memory_mib", "quality"))
    if any(v is None or isinstance(v, bool) or not isinstance(v, int | float) or math.isnan(v) for v in values):
        raise ValueError(f"a completed, feasible point needs numeric latency_ms, memory_mib and quality: {point!r}")
    return values  # type: ignore[return-value]


def _dominates(a: tuple[float, float, float], b: tuple[float, float, float]) -> bool:
    no_worse = a[0] <= b[0] and a[1] <= b[1] and a[2] >= b[2]
    return no_worse and (a[0] < b[0] or a[1] < b[1] or a[2] > b[2])


def pareto_front(points: Iterable[P]) -> list[P]:
    """The completed, feasible points no other such point dominates, fastest first (then less
    memory, then higher quality; ties keep the input order)."""
    candidates = [(point, _objectives(point)) for point in points if _usable(point)]
    front = [(p, v) for p, v in candidates if not any(_dominates(w, v) for _, w in candidates)]
    front.sort(key=lambda item: (item[1][0], item[1][1], -item[1][2]))
    return [p for p, _ in front]


def best_for_target(
    front: Sequence[P],
    *,
    latency_ms: float,
    max_memory_mib: float | None = None,
    min_retention: float | None = None,
) -> Choice:
    """The point to deploy for a latency target.

    Among the usable points within ``max_memory_mib`` and at or above ``min_retention``
    (retention, else the point's ``quality`` when it has no retention): the highest quality
    with latency <= ``latency_ms`` (ties: less memory, then lower latency), ``met=True``.
    When none is that fast: the fastest (ties: less memory, then higher quality),
    ``met=False`` and ``gap_ms`` = its latency minus the target. Raises `NoMatchError` when
    the memory cap or retention floor leaves nothing, ValueError for a bad query.
    """
    _check_query(latency_ms, max_memory_mib, min_retention)
    usable = [(p, _objectives(p)) for p in front if _usable(p)]
    if not usable:
        raise NoMatchError("the front is empty: no completed, feasible schedule to choose from")
    allowed = [(p, v) for p, v in usable if max_memory_mib is None or v[1] <= max_memory_mib]
    if not allowed:
        least = min(v[1] for _, v in usable)
        raise NoMatchError(f"no schedule uses <= {max_memory_mib:g} MiB; the least on the front is {least:.4g} MiB")
    if min_retention is not None:
        kept = [(p, v) for p, v in allowed if _retention(p, v) >= min_retention]
        if not kept:
            best = max(_retention(p, v) for p, v in allowed)
            raise NoMatchError(
                f"no schedule{' within the memory cap' if max_memory_mib is not None else ''} keeps retention "
                f">= {min_retention:g}; the best is {best:.4g}"
            )
        allowed = kept
    fast = [(p, v) for p, v in allowed if v[0] <= latency_ms]
    if fast:
        point, _ = min(fast, key=lambda item: (-item[1][2], item[1][1], item[1][0]))
        return Choice(point=point, met=True, gap_ms=0.0)
    point, values = min(allowed, key=lambda item: (item[1][0], item[1][1], -item[1][2]))
    return Choice(point=point, met=False, gap_ms=values[0] - latency_ms)


def _retention(point: Any, values: tuple[float, float, float]) -> float:
    retention = _get(point, "retention")
    return float(retention) if retention is not None else values[2]


def _check_query(latency_ms: Any, max_memory_mib: Any, min_retention: Any) -> None:
    problems = []
    for name, value, allow_none in (
        ("latency_ms", latency_ms, False),
        ("max_memory_mib", max_memory_mib, True),
        ("min_retention", min_retention, True),
    ):
        if value is None and allow_none:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
            problems.append(f"{name} must be a finite number > 0, got {value!r}")
    if problems:
        raise ValueError("bad target query: " + "; ".join(problems))
