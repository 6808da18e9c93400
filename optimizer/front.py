"""The Pareto front of measured schedules, and the best one for a latency target.

Works on plain points, never Optuna objects, so the same code serves a live study and database
rows: a point is a `Point`, a mapping, or any object with ``latency_ms``, ``memory_mib`` and
``quality`` (optionally ``feasible``, ``state`` and ``retention``). Functions return the very
objects they were given, so a caller passing rows gets rows back.

The speed objective is either the median prefill latency (lower is better) or the speedup over the
unmerged model measured in the same interleaved rounds (higher is better): `objective` says which.

Dominance is Optuna's except for memory, whose readings are compared within `MEMORY_NOISE`: a point
dominates another when it is no worse on speed and quality, uses no more memory than the other's
plus the noise, and is better on at least one of them (on memory: by more than the noise). So a
schedule that is slower and less accurate than another is never kept on the front by a memory
reading a hair lower. Identical points do not dominate each other, so both stay on the front (as in
``study.best_trials``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from .objectives import Metrics, retention_of

P = TypeVar("P")
OBJECTIVES = ("speedup", "latency")
#: Relative difference below which two memory figures count as equal: the memory objectives are
#: deterministic (an allocator or tensor peak) to within 1% between measurements of one schedule.
MEMORY_NOISE = 0.01


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
    speedup: float | None = None  # over the unmerged model, paired rounds (None: not measured so)
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
            speedup=metrics.speedup,
            ref=ref,
        )


@dataclass(frozen=True)
class Choice:
    """Answer of `best_for_target`: ``met`` says whether ``point`` meets the target; ``gap_ms``
    is how far above a latency target it is, ``gap_speedup`` how far below a speedup target
    (0.0 when met, or for the other kind of target)."""

    point: Any
    met: bool
    gap_ms: float = 0.0
    gap_speedup: float = 0.0


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


def _check_objective(objective: str) -> None:
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown speed objective {objective!r}; allowed: {', '.join(OBJECTIVES)}")


def _objectives(point: Any, objective: str = "latency") -> tuple[float, float, float]:
    """(speed, memory, quality) of a usable point, each to be minimised: latency, or minus the speedup."""
    speed = "speedup" if objective == "speedup" else "latency_ms"
    values = tuple(_get(point, name) for name in (speed, "memory_mib", "quality"))
    if any(v is None or isinstance(v, bool) or not isinstance(v, int | float) or math.isnan(v) for v in values):
        raise ValueError(f"a completed, feasible point needs numeric {speed}, memory_mib and quality: {point!r}")
    first, memory, quality = values
    return (-first if objective == "speedup" else first), memory, -quality  # type: ignore[operator]


def _dominates(a: tuple[float, float, float], b: tuple[float, float, float], memory_noise: float) -> bool:
    noise = memory_noise * max(abs(a[1]), abs(b[1]))
    no_worse = a[0] <= b[0] and a[2] <= b[2] and a[1] <= b[1] + noise
    return no_worse and (a[0] < b[0] or a[2] < b[2] or a[1] < b[1] - noise)


def pareto_front(points: Iterable[P], *, objective: str = "latency", memory_noise: float = MEMORY_NOISE) -> list[P]:
    """The completed, feasible points no other such point dominates (see the module docstring),
    fastest first (then less memory, then higher quality; ties keep the input order)."""
    _check_objective(objective)
    candidates = [(point, _objectives(point, objective)) for point in points if _usable(point)]
    front = [(p, v) for p, v in candidates if not any(_dominates(w, v, memory_noise) for _, w in candidates)]
    front.sort(key=lambda item: item[1])
    return [p for p, _ in front]


def best_for_target(
    front: Sequence[P],
    *,
    latency_ms: float | None = None,
    min_speedup: float | None = None,
    max_memory_mib: float | None = None,
    min_retention: float | None = None,
) -> Choice:
    """The point to deploy for a target: a latency (``latency_ms``: at most this many ms) or a
    speedup (``min_speedup``: at least this many times faster than the unmerged model measured in
    the same job, which travels between machines); exactly one of the two.

    Among the usable points within ``max_memory_mib`` and at or above ``min_retention``
    (retention, else the point's ``quality`` when it has no retention): the highest quality
    that meets the target (ties: less memory, then faster), ``met=True``. When none does: the
    fastest (ties: less memory, then higher quality), ``met=False``, with ``gap_ms`` (its latency
    minus the target) or ``gap_speedup`` (the target minus its speedup). Raises `NoMatchError`
    when the memory cap or retention floor leaves nothing, ValueError for a bad query.
    """
    _check_query(latency_ms, min_speedup, max_memory_mib, min_retention)
    objective = "latency" if latency_ms is not None else "speedup"
    usable = [p for p in front if _usable(p)]
    if not usable:
        raise NoMatchError("the front is empty: no completed, feasible schedule to choose from")
    if objective == "speedup" and any(_get(p, "speedup") is None for p in usable):
        raise NoMatchError("these schedules were measured without a paired speedup: query them with a latency target")
    scored = [(p, _objectives(p, objective)) for p in usable]  # (speed, memory, -quality), all minimised
    allowed = [(p, v) for p, v in scored if max_memory_mib is None or v[1] <= max_memory_mib]
    if not allowed:
        least = min(v[1] for _, v in scored)
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
    limit = latency_ms if objective == "latency" else -min_speedup  # type: ignore[operator]
    meeting = [(p, v) for p, v in allowed if v[0] <= limit]
    if meeting:
        point, _ = min(meeting, key=lambda item: (item[1][2], item[1][1], item[1][0]))
        return Choice(point=point, met=True)
    point, values = min(allowed, key=lambda item: item[1])
    gap = values[0] - limit
    return Choice(point=point, met=False, **({"gap_ms": gap} if objective == "latency" else {"gap_speedup": gap}))


def _retention(point: Any, values: tuple[float, float, float]) -> float:
    retention = _get(point, "retention")
    return float(retention) if retention is not None else -values[2]


def _check_query(latency_ms: Any, min_speedup: Any, max_memory_mib: Any, min_retention: Any) -> None:
    if (latency_ms is None) == (min_speedup is None):
        raise ValueError(
            "bad target query: give exactly one target, a latency in ms or a speedup over the unmerged model"
        )
    problems = []
    for name, value in (("latency_ms", latency_ms), ("min_speedup", min_speedup),
                        ("max_memory_mib", max_memory_mib), ("min_retention", min_retention)):  # fmt: skip
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
            problems.append(f"{name} must be a finite number > 0, got {value!r}")
    if problems:
        raise ValueError("bad target query: " + "; ".join(problems))
