"""`benchmarks/search_efficiency.py`: the replay on a synthetic table (no model) gives sane
hypervolume percentages for every strategy, and `measure` on `demo` resumes from its own file."""

import dataclasses
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

import illava
from illava import Schedule
from illava.backbones import backbone_config
from optimizer import Metrics, SearchSpace, SpeedModel

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "search_efficiency.py"


def _script():
    spec = importlib.util.spec_from_file_location("benchmark_search_efficiency", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


se = _script()
SPACE = SearchSpace()
DEPTHS = (8, 6)  # demo's


def _metrics(schedule: Schedule) -> Metrics:
    """A made-up but structured response: more reduction and earlier merges are faster and less accurate."""
    if schedule.removes_nothing:
        return Metrics(latency_ms=100.0, memory_mib=22.0, accuracy=0.9, retention=1.0, quality=0.9, speedup=1.0)
    early = 1 - (sum(schedule.llm_layers) / len(schedule.llm_layers)) / (DEPTHS[1] - 2)
    speedup = 1 + 2 * schedule.reduction * (0.5 + 0.5 * early) * (0.6 + 0.4 * schedule.encoder_share)
    quality = round(0.9 - 0.6 * schedule.reduction**3 * (0.5 + early) * (0.5 + schedule.encoder_share), 2)
    memory = 20 + 2 * (1 - schedule.reduction) + 0.1 * len(schedule.encoder_layers)
    return Metrics(latency_ms=100 / speedup, memory_mib=memory, accuracy=quality, retention=quality / 0.9,
                   quality=quality, speedup=speedup)  # fmt: skip


def _table(count: int) -> "se.Table":
    """The job's seeds plus `count` grid schedules, measured by `_metrics`."""
    header = {"kind": "header", "format": se.FORMAT, "backbone": "demo", "space": SPACE.to_dict(),
              "depths": list(DEPTHS), "workload": {"name": "synthetic", "samples": 0},
              "hardware": {"kind": "cpu", "name": "none", "threads": 0},
              "flop_inputs": {"grids": [[1, 16, 16]], "text_tokens": 45}}  # fmt: skip
    candidates = se.design(SPACE, encoder_depth=DEPTHS[0], llm_depth=DEPTHS[1], count=count, seed=0)
    rows = [se.Row(index=i, role=c.role, params=c.params, schedule=c.schedule.to_dict(), metrics=_metrics(c.schedule))
            for i, c in enumerate(candidates)]  # fmt: skip
    return se.Table(se.TableFile(header, rows))


@pytest.fixture(scope="module")
def table():
    return _table(40)


@pytest.mark.parametrize("name", list(se.STRATEGIES))
def test_replay_percentages_are_sane_for_every_strategy(table, name):
    budget = 24
    results = se.run_replays(table, [se.STRATEGIES[name]], 2, budget, se.flops_context(table))
    for curve in results[0].curves:
        assert len(curve) == budget
        assert all(0.0 <= value <= 100.0 + 1e-9 for value in curve)
        assert all(later >= earlier - 1e-9 for earlier, later in zip(curve, curve[1:]))  # more trials never lose
        assert curve[3] > 0  # the four seeds are measured first, the unmerged model among them


def test_every_row_visited_is_the_whole_front():
    """A table of only the job's seeds: four trials visit all of it, so every strategy reaches 100%."""
    seeds_only = _table(0)
    assert len(seeds_only.rows) == 4
    results = se.run_replays(seeds_only, list(se.STRATEGIES.values()), 2, 4, se.flops_context(seeds_only))
    for result in results:
        assert result.at(4) == [pytest.approx(100.0)] * 2
        assert result.trials_to(100.0 - 1e-9) <= 4


def test_seeds_match_exactly_and_other_schedules_their_nearest_row(table):
    for row in table.rows[:4]:
        assert table.nearest(Schedule.from_dict(row.schedule)) is row
    target = Schedule.from_dict(table.rows[10].schedule)
    nudged = target.with_(reduction=target.reduction + 1e-4)
    assert table.nearest(nudged) is table.rows[10]
    assert not Schedule.from_dict(table.nearest(nudged.with_(reduction=0.5)).schedule).removes_nothing


def test_report_prints_one_row_per_strategy(table):
    results = se.run_replays(table, list(se.STRATEGIES.values()), 2, 12, se.flops_context(table))
    text = se.report(table, results, [6, 12], command="replay", goals=[85.0, 90.0])
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| strategy"))
    rows = [line for line in lines[start + 2 :] if line.startswith("| ")]
    assert "| row | speedup" in text  # the table front, above
    assert [line.split("|")[1].strip() for line in rows] == list(se.STRATEGIES)


def test_design_is_the_job_seeds_then_distinct_grid_schedules_and_extends():
    short = se.design(SPACE, encoder_depth=8, llm_depth=6, count=10, seed=0)
    longer = se.design(SPACE, encoder_depth=8, llm_depth=6, count=20, seed=0)
    assert [c.role for c in short[:4]] == ["unmerged", "paper_default@0.6667", "paper_default@0.7778",
                                           "paper_default@0.8889"]  # fmt: skip
    keys = [se.schedule_key(c.schedule) for c in longer]
    assert len(set(keys)) == len(keys) == 24
    assert keys[:14] == [se.schedule_key(c.schedule) for c in short]
    low, high = SPACE.reduction
    assert all(low <= c.schedule.reduction <= high for c in longer[4:])


def _measure(out: Path) -> str:
    command = [sys.executable, str(SCRIPT), "measure", "--schedules", "3", "--limit", "2", "--out", str(out)]
    return subprocess.run(command, check=True, capture_output=True, text=True, timeout=300).stderr


@pytest.mark.slow  # ~22 s (a subprocess that loads demo and measures); the replay tests stay in the default suite
def test_measure_writes_rows_and_resumes_without_measuring_again(tmp_path):
    out = tmp_path / "grid.jsonl"
    assert "measuring 7 " in _measure(out)  # the 4 seeds and 3 grid schedules
    first = se.TableFile.read(out)
    assert [row.role for row in first.rows] == ["unmerged", "paper_default@0.6667", "paper_default@0.7778",
                                                "paper_default@0.8889", "grid", "grid", "grid"]  # fmt: skip
    assert all(row.metrics is not None and row.metrics.speedup > 0 for row in first.rows)
    assert first.header["workload"]["samples"] == 2 and first.header["hardware"]["kind"] in ("cpu", "cuda")
    # Interrupted while writing the last row: its line is cut short. The next run measures only that one.
    lines = out.read_text().splitlines()
    out.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:40])
    assert "6 of 7 schedules measured already; measuring 1 " in _measure(out)
    second = se.TableFile.read(out)
    assert [row.schedule for row in second.rows] == [row.schedule for row in first.rows]
    assert len(second.sessions) == 2
    assert all(json.loads(line) for line in out.read_text().splitlines())
    assert not math.isnan(se.Table(second).nearest(Schedule.from_dict(first.rows[-1].schedule)).metrics.quality)


def test_the_speed_model_summary_recovers_a_known_merge_cost():
    """Rows whose speedups are the FLOPs model plus 0.1 of the unmerged prefill per merge step: the
    model fitted on the seeds finds that cost, and calls faster exactly the rows that are."""
    config = backbone_config("demo")
    truth = SpeedModel(lambda s: illava.predicted_speedup(config, s, [[1, 16, 16]], 45), per_merge=0.1)
    table = _table(40)
    rows = []
    for row in table.rows:
        schedule = Schedule.from_dict(row.schedule)
        metrics = dataclasses.replace(row.metrics, speedup=truth.speedup(schedule))
        rows.append(dataclasses.replace(row, metrics=metrics, predicted_speedup=truth.flops_speedup(schedule)))
    line = se.speed_model_summary(se.Table(se.TableFile(table.file.header, rows)))[0]
    faster = sum(row.metrics.speedup > 1 for row in rows if row.role == "grid")
    assert 0 < faster < 40
    assert (
        "0.100 of the unmerged prefill per merge step" in line
        and "rank correlation with the measured speedup is 1.00" in line
    )
    assert f"predicts {faster} faster than the unmerged model, {faster} of the {faster} that are" in line
    assert "(the FLOPs model: 40," in line
    assert se.speed_model_summary(table) == []  # no FLOPs predictions in the rows: nothing to say
