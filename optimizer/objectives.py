"""What a trial is scored on (objectives) and what it must not exceed (constraints).

The optimizer never imports the profiler: it reads the plain dict ``profiler.Measurement.to_dict()``
gives (or any object with that ``to_dict``) through `metrics_summary`, which reduces it to the
handful of numbers the search, the database rows and the target queries use.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

MIB = 2**20


@dataclass(frozen=True)
class Metrics:
    """One measurement, reduced to what the optimizer uses.

    ``quality`` is the third objective: ``accuracy`` on a labelled workload, else ``fidelity``
    (the share of samples whose first generated token equals the unmerged model's).
    """

    latency_ms: float  # median prefill (time to first token) at the workload's batch size
    memory_mib: float | None  # peak memory, see `metrics_summary` for which reading
    accuracy: float | None  # labelled workloads only
    retention: float | None  # accuracy / the unmerged model's accuracy, same session; labelled only
    quality: float
    fidelity: float | None = None  # first-token agreement with the unmerged model
    # Median of the per-round ratios unmerged / this schedule, the two prefills interleaved on the
    # same worker and inputs (None: measured before speedups were, or the reference itself).
    speedup: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def metrics_summary(measurement: Mapping[str, Any] | Any) -> Metrics:
    """`Metrics` of a ``profiler.Measurement`` (or its ``to_dict()``).

    * latency_ms: ``prefill_s.median`` in milliseconds; speedup: ``speedup.median``.
    * memory_mib: ``peak_memory.objective_bytes``, the deterministic figure the profiler names in
      ``peak_memory.objective_source`` (CUDA: torch's allocator peak; CPU: the peak of live
      tensor bytes, weights included, from torch's memory profiling), else
      ``peak_memory.torch_peak_bytes`` (measurements stored before that field), else None. A
      process's resident-set size is never read: it is noise at these sizes.
    * quality: accuracy when the workload is labelled (accuracy is not None), else
      ``fidelity.first_token_agreement``.
    """
    data = measurement.to_dict() if hasattr(measurement, "to_dict") else measurement
    if not isinstance(data, Mapping):
        raise TypeError(f"metrics_summary needs a Measurement or its to_dict(), got {type(measurement).__name__}")
    missing = [key for key in ("prefill_s", "peak_memory") if key not in data]
    if missing:
        raise ValueError(f"measurement lacks {missing}; expected the dict profiler.Measurement.to_dict() gives")
    latency_s = _number(data["prefill_s"].get("median"), "prefill_s.median")
    if latency_s is None:
        raise ValueError("measurement has no prefill_s.median, so no latency")
    memory = data["peak_memory"] or {}
    peak = memory.get("objective_bytes")
    if peak is None:
        peak = memory.get("torch_peak_bytes")
    accuracy = _number(data.get("accuracy"), "accuracy")
    fidelity = _number((data.get("fidelity") or {}).get("first_token_agreement"), "fidelity.first_token_agreement")
    quality = accuracy if accuracy is not None else fidelity
    if quality is None:
        raise ValueError("measurement has neither accuracy nor fidelity.first_token_agreement, so no quality")
    return Metrics(
        latency_ms=latency_s * 1000.0,
        memory_mib=None if peak is None else peak / MIB,
        accuracy=accuracy,
        retention=_number(data.get("retention"), "retention"),
        quality=quality,
        fidelity=fidelity,
        speedup=_number((data.get("speedup") or {}).get("median"), "speedup.median"),
    )


def _number(value: Any, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {value!r}")
    return float(value)


def _as_metrics(metrics: Metrics | Mapping[str, Any] | Any) -> Metrics:
    return metrics if isinstance(metrics, Metrics) else metrics_summary(metrics)


#: The speed objectives a job can optimise (`Objectives.latency`).
LATENCY_OBJECTIVES = ("speedup", "latency")


@dataclass(frozen=True)
class Objectives:
    """Three objectives: speed, memory_mib (minimised) and quality (maximised).

    Speed is `latency`: "speedup" (the default; maximised) is the paired speedup over the unmerged
    model, whose prefill runs are interleaved with the schedule's on the same worker, so a machine
    that slows down in the middle of a job slows both and the ratio stays; "latency" (minimised)
    is the median prefill in ms, which drifts with the machine and means something only on it."""

    latency: str = "speedup"

    def __post_init__(self) -> None:
        if self.latency not in LATENCY_OBJECTIVES:
            raise ValueError(f"unknown objective {self.latency!r}; allowed: {', '.join(LATENCY_OBJECTIVES)}")

    @property
    def names(self) -> tuple[str, str, str]:
        return ("speedup" if self.latency == "speedup" else "latency_ms", "memory_mib", "quality")

    @property
    def directions(self) -> tuple[str, str, str]:
        return ("maximize" if self.latency == "speedup" else "minimize", "minimize", "maximize")

    def values(self, metrics: Metrics | Mapping[str, Any]) -> tuple[float, float, float]:
        """Objective values for Optuna, in `names` order. Raises ValueError for a missing or
        non-finite value (a trial without one cannot be ranked; tell it as failed)."""
        metrics = _as_metrics(metrics)
        values = tuple(getattr(metrics, name) for name in self.names)
        bad = [name for name, value in zip(self.names, values) if value is None or not math.isfinite(value)]
        if bad:
            raise ValueError(f"objective(s) {bad} missing or not finite in {metrics}")
        return values  # type: ignore[return-value]


@dataclass(frozen=True)
class Constraints:
    """Hard limits on a schedule. None means no limit. Validated on construction.

    `violations` follows Optuna's convention (a value <= 0 is satisfied) and is relative, so
    the violations of different units add up meaningfully when a sampler ranks infeasible
    trials: ``(floor - retention) / floor``, ``(memory - cap) / cap``, ``(latency - cap) / cap``.
    """

    min_retention: float | None = None
    max_memory_mib: float | None = None
    max_latency_ms: float | None = None

    names: ClassVar[tuple[str, ...]] = ("min_retention", "max_memory_mib", "max_latency_ms")

    def __post_init__(self) -> None:
        problems = self._problems()
        if problems:
            raise ValueError("impossible constraints: " + "; ".join(problems))

    def _problems(self) -> list[str]:
        problems = []
        for name in self.names:
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
                problems.append(f"{name} must be a number or None, got {value!r}")
            elif value is not None and not math.isfinite(value):
                problems.append(f"{name} must be finite, got {value!r}")
        if problems:
            return problems
        if self.min_retention is not None and not 0 < self.min_retention <= 1:
            problems.append(
                f"min_retention {self.min_retention} must be in (0, 1]: retention is accuracy relative to the "
                "unmerged model, and a floor above 1 asks every schedule to beat the model it merges"
            )
        if self.max_memory_mib is not None and self.max_memory_mib <= 0:
            problems.append(f"max_memory_mib {self.max_memory_mib} must be > 0")
        if self.max_latency_ms is not None and self.max_latency_ms <= 0:
            problems.append(f"max_latency_ms {self.max_latency_ms} must be > 0")
        return problems

    @property
    def active(self) -> tuple[str, ...]:
        """Names of the limits that are set, in `names` order."""
        return tuple(name for name in self.names if getattr(self, name) is not None)

    def violations(self, metrics: Metrics | Mapping[str, Any]) -> tuple[float, ...]:
        """One value per active limit (`active` order); <= 0 means satisfied.

        Retention is ``metrics.retention``; on an unlabelled workload (no retention) it is the
        first-token agreement with the unmerged model, the fidelity counterpart of retention.
        """
        return tuple(self.violation_dict(metrics).values())

    def violation_dict(self, metrics: Metrics | Mapping[str, Any]) -> dict[str, float]:
        """`violations` keyed by limit name (what `trial.set_constraint` is given)."""
        metrics = _as_metrics(metrics)
        out: dict[str, float] = {}
        if self.min_retention is not None:
            retention = retention_of(metrics)
            if retention is None:
                raise ValueError("min_retention is set but the metrics have neither retention nor fidelity")
            out["min_retention"] = (self.min_retention - retention) / self.min_retention
        if self.max_memory_mib is not None:
            if metrics.memory_mib is None:
                raise ValueError("max_memory_mib is set but the metrics have no memory reading")
            out["max_memory_mib"] = (metrics.memory_mib - self.max_memory_mib) / self.max_memory_mib
        if self.max_latency_ms is not None:
            out["max_latency_ms"] = (metrics.latency_ms - self.max_latency_ms) / self.max_latency_ms
        return out

    def feasible(self, metrics: Metrics | Mapping[str, Any]) -> bool:
        return all(v <= 0 for v in self.violations(metrics))

    def check_satisfiable(
        self,
        reference: Metrics | Mapping[str, Any] | None = None,
        *,
        floor: Metrics | Mapping[str, Any] | None = None,
    ) -> None:
        """Raise ValueError when no schedule can satisfy these limits.

        Without measurements only the limits themselves are checked (as on construction).
        `reference` is the unmerged model's measurement on the job's workload: a retention floor
        needs retention or fidelity to exist there. `floor` is a measurement no schedule of the
        search can beat on latency or memory (the most aggressive schedule of the space, or the
        model given no image at all): a latency or memory cap below it is impossible. The
        unmerged model is no such floor (merging makes runs faster and smaller), so a cap below
        the unmerged model's numbers is accepted.
        """
        problems = self._problems()
        if reference is not None and self.min_retention is not None and retention_of(_as_metrics(reference)) is None:
            problems.append("min_retention is set but the workload gives neither accuracy nor fidelity")
        if floor is not None:
            floor = _as_metrics(floor)
            if self.max_latency_ms is not None and self.max_latency_ms < floor.latency_ms:
                problems.append(
                    f"max_latency_ms {self.max_latency_ms:g} is below {floor.latency_ms:.4g} ms, "
                    "the fastest any schedule of this search can be"
                )
            if (
                self.max_memory_mib is not None
                and floor.memory_mib is not None
                and self.max_memory_mib < floor.memory_mib
            ):
                problems.append(
                    f"max_memory_mib {self.max_memory_mib:g} is below {floor.memory_mib:.4g} MiB, "
                    "the least memory any schedule of this search can use"
                )
        if problems:
            raise ValueError("impossible constraints: " + "; ".join(problems))

    def to_dict(self) -> dict[str, float | None]:
        return {name: getattr(self, name) for name in self.names}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> Constraints:
        data = dict(data or {})
        unknown = sorted(str(key) for key in data if key not in cls.names)
        if unknown:
            raise ValueError(f"unknown constraint keys {unknown}; allowed keys are {list(cls.names)}")
        return cls(**data)


def retention_of(metrics: Metrics) -> float | None:
    """Retention for the min_retention limit: measured retention, else first-token agreement."""
    return metrics.retention if metrics.retention is not None else metrics.fidelity
