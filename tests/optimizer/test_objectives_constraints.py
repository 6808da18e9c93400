import math

import pytest

from optimizer import Constraints, Metrics, Objectives, metrics_summary
from profiler import Fidelity, Measurement, MemoryReading, Spread

MIB = 2**20


def _measurement(*, cuda: bool, accuracy: float | None, retention: float | None, agreement: float = 0.75):
    """A real profiler.Measurement (not run, built), so the dict shape is the profiler's own."""
    memory = MemoryReading(
        device="cuda:0" if cuda else "cpu",
        source="nvml" if cuda else "rss",
        baseline_bytes=1000 * MIB,
        peak_bytes=1300 * MIB,
        samples=10,
        interval_s=0.005,
        duration_s=1.0,
        torch_peak_bytes=2048 * MIB if cuda else None,
        torch_reserved_peak_bytes=2100 * MIB if cuda else None,
    )
    spread = Spread(median=0.125, p90=0.13, low=0.12, high=0.14, cv=0.02, runs=5)
    return Measurement(
        backbone="tiny",
        schedule={},
        workload={},
        hardware={},
        versions={},
        prefill_s=spread,
        encoder_s=spread,
        merger_s=spread,
        llm_s=spread,
        decode_tokens_per_s=50.0,
        samples_per_s=2.0,
        image_tokens_to_llm=64.0,
        tokens_per_llm_layer=80.0,
        peak_memory=memory.to_dict(),
        accuracy=accuracy,
        retention=retention,
        fidelity=Fidelity(first_token_agreement=agreement, mean_kl=0.1, greedy_match_rate=0.5),
        n_samples=8,
    )


def test_summary_of_a_cpu_measurement_uses_its_deterministic_figure_never_resident_memory():
    data = _measurement(cuda=False, accuracy=0.6, retention=0.9).to_dict()
    assert metrics_summary(data).memory_mib is None  # 300 MiB of resident memory above baseline: noise, unused
    data["peak_memory"]["objective_bytes"] = 96 * MIB
    data["speedup"] = {"median": 1.25, "p90": 1.3, "low": 1.2, "high": 1.31, "cv": 0.03, "runs": 5}
    assert metrics_summary(data) == Metrics(
        latency_ms=125.0, memory_mib=96.0, accuracy=0.6, retention=0.9, quality=0.6, fidelity=0.75, speedup=1.25
    )


def test_summary_of_a_cuda_measurement_uses_the_torch_peak_and_accepts_the_object():
    metrics = metrics_summary(_measurement(cuda=True, accuracy=None, retention=None))
    assert metrics.memory_mib == 2048.0
    assert (metrics.accuracy, metrics.retention, metrics.quality) == (None, None, 0.75)  # unlabelled: fidelity


def test_summary_without_memory_source_has_no_memory_and_objectives_refuse_it():
    data = _measurement(cuda=False, accuracy=0.5, retention=1.0).to_dict()
    data["peak_memory"].update(baseline_bytes=None, peak_bytes=None, peak_above_baseline_bytes=None, source="none")
    metrics = metrics_summary(data)
    assert metrics.memory_mib is None
    with pytest.raises(ValueError, match=r"\['memory_mib'\] missing"):
        Objectives("latency").values(metrics)


@pytest.mark.parametrize(
    ("change", "says"),
    [
        (lambda d: d.pop("prefill_s"), r"lacks \['prefill_s'\]"),
        (lambda d: d["prefill_s"].pop("median"), "no prefill_s.median"),
        (lambda d: d.update(accuracy="high"), "accuracy must be a number"),
        (lambda d: d.update(accuracy=None, fidelity={}), "neither accuracy nor"),
    ],
)
def test_summary_rejects_malformed_measurements(change, says):
    data = _measurement(cuda=False, accuracy=0.5, retention=1.0).to_dict()
    change(data)
    with pytest.raises(ValueError, match=says):
        metrics_summary(data)
    with pytest.raises(TypeError, match="Measurement or its to_dict"):
        metrics_summary([1, 2])


def test_the_default_speed_objective_is_the_paired_speedup():
    objectives = Objectives()
    assert (objectives.names, objectives.directions) == (
        ("speedup", "memory_mib", "quality"), ("maximize", "minimize", "maximize")
    )  # fmt: skip
    metrics = Metrics(latency_ms=10.0, memory_mib=500.0, accuracy=0.4, retention=0.8, quality=0.4, speedup=1.5)
    assert objectives.values(metrics) == (1.5, 500.0, 0.4)
    with pytest.raises(ValueError, match="speedup"):
        objectives.values(Metrics(10.0, 1.0, None, None, 0.5))  # measured without a paired reference
    with pytest.raises(ValueError, match="unknown objective 'fast'"):
        Objectives("fast")


def test_objectives_are_latency_memory_quality():
    objectives = Objectives(latency="latency")
    assert objectives.names == ("latency_ms", "memory_mib", "quality")
    assert objectives.directions == ("minimize", "minimize", "maximize")
    metrics = Metrics(latency_ms=10.0, memory_mib=500.0, accuracy=0.4, retention=0.8, quality=0.4)
    assert objectives.values(metrics) == (10.0, 500.0, 0.4)
    assert objectives.values(_measurement(cuda=True, accuracy=0.5, retention=1.0).to_dict()) == (125.0, 2048.0, 0.5)
    with pytest.raises(ValueError, match="latency_ms"):
        objectives.values(Metrics(math.nan, 1.0, None, None, 0.5))


def test_violations_are_relative_and_follow_optunas_sign():
    constraints = Constraints(min_retention=0.9, max_memory_mib=1000.0, max_latency_ms=50.0)
    assert constraints.active == ("min_retention", "max_memory_mib", "max_latency_ms")
    good = Metrics(latency_ms=40.0, memory_mib=800.0, accuracy=0.5, retention=0.95, quality=0.5)
    assert constraints.feasible(good) and all(v <= 0 for v in constraints.violations(good))
    bad = Metrics(latency_ms=75.0, memory_mib=1500.0, accuracy=0.4, retention=0.45, quality=0.4)
    assert constraints.violations(bad) == pytest.approx((0.5, 0.5, 0.5))
    assert not constraints.feasible(bad)
    edge = Metrics(latency_ms=50.0, memory_mib=1000.0, accuracy=0.5, retention=0.9, quality=0.5)
    assert constraints.feasible(edge)  # a limit met exactly is met


def test_only_set_limits_are_reported_and_unlabelled_retention_is_fidelity():
    assert Constraints().violations(Metrics(1.0, 1.0, None, None, 0.5)) == ()
    floor = Constraints(min_retention=0.8)
    unlabelled = Metrics(latency_ms=1.0, memory_mib=1.0, accuracy=None, retention=None, quality=0.6, fidelity=0.6)
    assert floor.violation_dict(unlabelled) == {"min_retention": pytest.approx(0.25)}
    with pytest.raises(ValueError, match="neither retention nor fidelity"):
        floor.violations(Metrics(1.0, 1.0, None, None, 0.5))
    with pytest.raises(ValueError, match="no memory reading"):
        Constraints(max_memory_mib=10).violations(Metrics(1.0, None, None, None, 0.5))


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"min_retention": 1.2}, r"min_retention 1.2 must be in \(0, 1\]"),
        ({"min_retention": 0}, r"must be in \(0, 1\]"),
        ({"max_latency_ms": 0}, "max_latency_ms 0 must be > 0"),
        ({"max_memory_mib": -5}, "max_memory_mib -5 must be > 0"),
        ({"max_latency_ms": math.inf}, "must be finite"),
        ({"max_latency_ms": "fast"}, "must be a number or None"),
    ],
)
def test_impossible_limits_cannot_be_built(fields, says):
    with pytest.raises(ValueError, match=says):
        Constraints(**fields)


def test_check_satisfiable_against_reference_and_floor():
    constraints = Constraints(min_retention=0.9, max_memory_mib=900.0, max_latency_ms=30.0)
    unmerged = Metrics(latency_ms=100.0, memory_mib=1000.0, accuracy=0.5, retention=1.0, quality=0.5)
    constraints.check_satisfiable()
    constraints.check_satisfiable(unmerged)  # caps below the unmerged model are what merging is for
    fastest = Metrics(latency_ms=35.0, memory_mib=950.0, accuracy=0.2, retention=0.4, quality=0.2)
    with pytest.raises(ValueError, match=r"max_latency_ms 30 is below 35 ms.*max_memory_mib 900 is below 950 MiB"):
        constraints.check_satisfiable(unmerged, floor=fastest)
    with pytest.raises(ValueError, match="neither accuracy nor fidelity"):
        Constraints(min_retention=0.9).check_satisfiable(Metrics(1.0, 1.0, None, None, math.nan, None))


def test_constraints_json_round_trip_and_unknown_keys():
    constraints = Constraints(min_retention=0.95, max_latency_ms=120.0)
    assert Constraints.from_dict(constraints.to_dict()) == constraints
    assert Constraints.from_dict(None) == Constraints()
    with pytest.raises(ValueError, match=r"unknown constraint keys \['max_latency'\]"):
        Constraints.from_dict({"max_latency": 3})
