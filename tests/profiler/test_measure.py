"""The profiler end to end on the built-in `tiny` backbone (a real transformers model, on CPU)."""

import dataclasses
import json

import pytest

from illava import Schedule
from profiler import Measurement, Profiler, make_demo_dataset, resolve_workload, write_dataset


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
    assert result.peak_memory["samples"] >= 1 and result.peak_memory["source"] == "rss"
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
    older = {k: v for k, v in result.to_dict().items() if k != "accuracy_score"}  # stored before the field existed
    assert Measurement.from_dict(older).accuracy_score is None


def test_bad_profiler_arguments_are_clear():
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        Profiler("tiny", repeats=0)
    with pytest.raises(ValueError, match="score must be one of logits, generate, options"):
        Profiler("tiny", score="vibes")
