"""The profiler end to end on the built-in `tiny` backbone (a real transformers model, on CPU)."""

import dataclasses
import json
import statistics

import pytest

import illava
from illava import Schedule
from profiler import Measurement, Profiler, Spread, make_demo_dataset, resolve_workload, write_dataset
from profiler import measure as measure_module


@pytest.fixture(scope="module")
def profiler():
    return Profiler("tiny", repeats=3, warmup=1)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "demo.tsv"
    write_dataset(make_demo_dataset(6, seed=3), path)
    return dataclasses.replace(resolve_workload("single-448"), dataset=str(path), samples=6, output_tokens=4)


def schedule(reduction, **fields):
    return Schedule.paper_default(reduction, encoder_depth=6, llm_depth=6, **fields)


def test_a_full_measurement_fills_every_field(profiler, labelled):
    result = profiler.measure(schedule(7 / 9), labelled)
    assert result.n_samples == 6 and result.backbone == "tiny"
    for spread in (result.prefill_s, result.encoder_s, result.merger_s, result.llm_s):
        assert spread.runs == 3 and 0 < spread.low <= spread.median <= spread.p90 <= spread.high
    breakdown = result.encoder_s.median + result.merger_s.median + result.llm_s.median
    assert breakdown == pytest.approx(result.prefill_s.median, rel=0.5)  # medians of parts vs of the whole
    assert result.decode_tokens_per_s > 0 and result.samples_per_s > 0
    assert result.image_tokens_to_llm == schedule(7 / 9).plan(64).after_encoder  # demo images: 224x224 -> 64 tokens
    assert 0 < result.tokens_per_llm_layer < result.image_tokens_to_llm + 100
    memory = result.peak_memory
    assert memory["samples"] >= 1 and memory["source"] == "rss"  # kept for information
    assert memory["objective_source"] == "cpu tensor peak (measured, torch profiler)"
    weights = sum(p.numel() * p.element_size() for p in profiler.model.parameters())
    assert memory["objective_bytes"] == memory["tensor_peak_bytes"] > memory["tensor_resident_bytes"] > weights
    assert result.speedup.runs == result.reference_prefill_s.runs == result.prefill_s.runs == 3
    assert 0.0 <= result.accuracy <= 1.0 and result.retention is not None and result.accuracy_score == "logits"
    assert 0.0 <= result.fidelity.first_token_agreement <= 1.0 and result.fidelity.mean_kl >= 0
    assert result.hardware["kind"] == "cpu" and result.versions["transformers"].startswith("5.")
    assert result.schedule["reduction"] == pytest.approx(7 / 9) and result.workload["dataset"].endswith(".tsv")


def test_the_schedule_that_removes_nothing_has_retention_and_fidelity_one(profiler, labelled):
    result = profiler.measure(Schedule.vanilla(), labelled)  # runs the patched model, compares to the untouched one
    assert result.retention == 1.0
    assert result.fidelity.first_token_agreement == 1.0
    assert result.fidelity.mean_kl == 0.0
    assert result.fidelity.greedy_match_rate == 1.0
    assert result.accuracy == profiler.reference(labelled).accuracy


def test_more_reduction_sends_fewer_tokens_to_the_llm(profiler):
    workload = dataclasses.replace(resolve_workload("single-448"), samples=2, output_tokens=2)
    light, heavy = (profiler.measure(schedule(r), workload) for r in (2 / 3, 8 / 9))
    assert heavy.image_tokens_to_llm < light.image_tokens_to_llm < profiler.reference(workload).image_tokens_to_llm
    assert heavy.tokens_per_llm_layer < light.tokens_per_llm_layer
    assert light.accuracy is None and light.retention is None  # synthetic: no labels, fidelity only
    assert light.accuracy_score is None


def test_measurement_json_round_trip(profiler):
    workload = dataclasses.replace(resolve_workload("single-448"), samples=1, output_tokens=2)
    result = profiler.measure(schedule(2 / 3), workload)
    again = Measurement.from_dict(json.loads(result.to_json()))
    assert again == result
    new_fields = ("accuracy_score", "speedup", "reference_prefill_s")
    older = {k: v for k, v in result.to_dict().items() if k not in new_fields}  # stored before the fields existed
    old = Measurement.from_dict(older)
    assert old.accuracy_score is None and old.speedup is None and old.reference_prefill_s is None
    assert old.prefill_s == result.prefill_s


def test_the_speedup_is_the_ratio_of_the_reference_and_schedule_runs_of_each_round(profiler, monkeypatch):
    workload = dataclasses.replace(resolve_workload("single-448"), samples=1, output_tokens=2)
    reference = profiler.reference(workload)  # outputs first, so below only the measurement's own runs are timed
    assert reference.speedup is None and reference.reference_prefill_s is None
    calls = []  # (merging?, seconds) of every timed call, in order

    def spy(fn, device=None):
        merging = illava.is_applied(profiler.model)  # under sdpa the reference is the untouched model
        seconds = real(fn, device)
        calls.append((merging, seconds))
        return seconds

    real = measure_module.time_once
    monkeypatch.setattr(measure_module, "time_once", spy)
    result = profiler.measure(schedule(7 / 9), workload)
    rounds = profiler.warmup + profiler.repeats
    prefills = calls[: 2 * rounds]  # then the timed generate
    assert [merging for merging, _ in prefills] == [False, True] * rounds  # round r: reference, then schedule
    timed = prefills[2 * profiler.warmup :]
    references, own = [s for _, s in timed[0::2]], [s for _, s in timed[1::2]]
    ratios = [r / s for r, s in zip(references, own)]
    assert result.reference_prefill_s == Spread.of(references) and result.prefill_s == Spread.of(own)
    assert result.speedup == Spread.of(ratios) and result.speedup.median == statistics.median(ratios)
    assert (result.speedup.low, result.speedup.high) == (min(ratios), max(ratios))
    # The breakdown is the schedule's: its stage marks, not the reference's, are within its own runs.
    assert result.encoder_s.median + result.merger_s.median < result.prefill_s.median


def test_bad_profiler_arguments_are_clear():
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        Profiler("tiny", repeats=0)
    with pytest.raises(ValueError, match="score must be one of logits, generate, options"):
        Profiler("tiny", score="vibes")
