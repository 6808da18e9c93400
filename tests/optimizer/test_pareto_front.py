from dataclasses import dataclass

import pytest

from optimizer import Choice, Metrics, NoMatchError, Point, best_for_target, pareto_front


def test_dominated_infeasible_and_unfinished_points_are_dropped():
    points = [
        Point(10, 100, 0.5, ref="fast"),
        Point(20, 100, 0.7, ref="balanced"),
        Point(30, 100, 0.7, ref="slower-same-quality"),  # dominated by balanced
        Point(40, 90, 0.9, ref="small-accurate"),
        Point(5, 50, 0.99, feasible=False, ref="infeasible"),
        Point(5, 50, 0.99, state="failed", ref="failed"),
        Point(50, 200, 1.0, ref="unmerged"),
    ]
    front = pareto_front(points)
    assert [p.ref for p in front] == ["fast", "balanced", "small-accurate", "unmerged"]


def test_identical_points_both_stay_and_order_is_fastest_first():
    front = pareto_front([Point(20, 10, 0.5, ref="a"), Point(10, 10, 0.4, ref="b"), Point(20, 10, 0.5, ref="c")])
    assert [p.ref for p in front] == ["b", "a", "c"]


def test_dicts_and_rows_come_back_as_given():
    @dataclass
    class Row:  # like a database row: no feasible/state fields
        latency_ms: float
        memory_mib: float
        quality: float

    rows = [Row(1, 1, 0.1), Row(2, 2, 0.05)]
    assert pareto_front(rows) == [rows[0]]
    dicts = [{"latency_ms": 1, "memory_mib": 2, "quality": 0.5, "state": "complete"}, {"latency_ms": 1}]
    dicts[1] |= {"memory_mib": 1, "quality": 0.5, "state": "running"}
    assert pareto_front(dicts) == [dicts[0]]
    assert pareto_front([]) == []


def test_a_completed_point_without_values_is_an_error():
    with pytest.raises(ValueError, match="needs numeric latency_ms, memory_mib and quality"):
        pareto_front([{"latency_ms": 1, "memory_mib": None, "quality": 0.5}])


FRONT = [
    Point(10, 300, 0.50, retention=0.60, ref="fastest"),
    Point(20, 250, 0.70, retention=0.85, ref="mid-big"),
    Point(20, 200, 0.70, retention=0.85, ref="mid-small"),
    Point(30, 180, 0.80, retention=0.95, ref="accurate"),
    Point(60, 400, 0.84, retention=1.00, ref="unmerged"),
]


def test_best_for_target_meets_it_with_the_highest_quality():
    choice = best_for_target(FRONT, latency_ms=35)
    assert choice == Choice(point=FRONT[3], met=True, gap_ms=0.0)
    assert best_for_target(FRONT, latency_ms=30).point.ref == "accurate"  # the target itself counts


def test_best_for_target_breaks_quality_ties_by_memory():
    assert best_for_target(FRONT, latency_ms=25).point.ref == "mid-small"
    assert best_for_target(list(reversed(FRONT)), latency_ms=25).point.ref == "mid-small"


def test_unmet_target_gives_the_fastest_point_and_the_gap():
    choice = best_for_target(FRONT, latency_ms=4)
    assert (choice.point.ref, choice.met, choice.gap_ms) == ("fastest", False, 6)


def test_memory_cap_and_retention_floor_narrow_the_choice():
    assert best_for_target(FRONT, latency_ms=100, max_memory_mib=300).point.ref == "accurate"
    assert best_for_target(FRONT, latency_ms=25, min_retention=0.9) == Choice(FRONT[3], met=False, gap_ms=5)
    assert best_for_target(FRONT, latency_ms=15, max_memory_mib=260).point.ref == "mid-small"
    with pytest.raises(NoMatchError, match="no schedule uses <= 100 MiB; the least on the front is 180 MiB"):
        best_for_target(FRONT, latency_ms=25, max_memory_mib=100)
    with pytest.raises(NoMatchError, match="within the memory cap keeps retention >= 0.99; the best is 0.95"):
        best_for_target(FRONT, latency_ms=25, max_memory_mib=300, min_retention=0.99)


def test_points_without_retention_use_quality_for_the_floor():
    metrics = Metrics(latency_ms=5.0, memory_mib=10.0, accuracy=None, retention=None, quality=0.97, fidelity=0.97)
    point = Point.from_metrics(metrics, ref=1)
    assert point.retention == 0.97
    rows = [{"latency_ms": 5, "memory_mib": 10, "quality": 0.97}]
    assert best_for_target(rows, latency_ms=10, min_retention=0.95).point is rows[0]


@pytest.mark.parametrize(
    ("query", "says"),
    [
        ({"latency_ms": 0}, "latency_ms must be a finite number > 0, got 0"),
        ({"latency_ms": float("nan")}, "latency_ms must be"),
        ({"latency_ms": "50"}, "latency_ms must be"),
        ({"latency_ms": 50, "max_memory_mib": -1}, "max_memory_mib must be"),
        ({"latency_ms": 50, "min_retention": 0}, "min_retention must be"),
    ],
)
def test_bad_queries_are_refused(query, says):
    with pytest.raises(ValueError, match=says):
        best_for_target(FRONT, **query)


def test_an_empty_front_has_no_answer():
    with pytest.raises(NoMatchError, match="the front is empty"):
        best_for_target([Point(1, 1, 1, feasible=False)], latency_ms=10)
    with pytest.raises(ValueError, match="without a memory reading"):
        Point.from_metrics(Metrics(1.0, None, None, None, 0.5))


def test_a_slower_less_accurate_schedule_is_not_kept_on_the_front_by_memory_within_noise():
    # The README's front of an earlier release: schedules 4 and 5 slower and less accurate than the
    # unmerged model, kept only by memory readings a fraction of a MiB lower.
    unmerged = Point(20.3, 300.0, 0.86, speedup=1.0, ref="unmerged")
    slower = Point(21.3, 299.0, 0.84, speedup=0.95, ref="slower, 1 MiB less")  # 0.3% less memory: noise
    leaner = Point(22.5, 240.0, 0.84, speedup=0.90, ref="slower, 20% less memory")  # a real saving
    fast = Point(16.9, 280.0, 0.64, speedup=1.2, ref="fast")
    for objective in ("latency", "speedup"):
        front = pareto_front([unmerged, slower, leaner, fast], objective=objective)
        assert [p.ref for p in front] == ["fast", "unmerged", "slower, 20% less memory"]
    # Optuna's strict dominance (no noise) keeps the 1-MiB one.
    assert "slower, 1 MiB less" in [p.ref for p in pareto_front([unmerged, slower], memory_noise=0.0)]


SPEEDS = [
    Point(40, 300, 0.86, speedup=1.0, ref="unmerged"),
    Point(30, 250, 0.84, speedup=1.35, ref="1.35x"),
    Point(25, 240, 0.80, speedup=1.6, ref="1.6x"),
    Point(20, 230, 0.64, speedup=2.0, ref="2x"),
]


def test_a_speedup_target_picks_the_most_accurate_schedule_that_fast():
    assert best_for_target(SPEEDS, min_speedup=1.5) == Choice(point=SPEEDS[2], met=True)
    assert best_for_target(SPEEDS, min_speedup=1.0).point.ref == "unmerged"  # the most accurate is fast enough
    missed = best_for_target(SPEEDS, min_speedup=2.5)
    assert (missed.point.ref, missed.met, missed.gap_ms) == ("2x", False, 0.0)
    assert missed.gap_speedup == pytest.approx(0.5)
    with pytest.raises(ValueError, match="exactly one target"):
        best_for_target(SPEEDS, min_speedup=1.5, latency_ms=30)
    with pytest.raises(ValueError, match="exactly one target"):
        best_for_target(SPEEDS)
    with pytest.raises(NoMatchError, match="without a paired speedup"):
        best_for_target([Point(10, 10, 0.5)], min_speedup=1.2)
