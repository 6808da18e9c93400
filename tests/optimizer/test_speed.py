"""`optimizer.SpeedModel`: the FLOPs model plus a fitted cost per merge step. Fitted on the `demo`
seeds' measured speedups (benchmarks/results/search/demo_grid.jsonl), it calls the schedules that
really ran faster than the unmerged model faster, where the FLOPs model calls everything faster."""

from __future__ import annotations

import math

import pytest

import illava
from illava import Schedule
from illava.backbones import backbone_config
from optimizer import SpeedModel, merge_steps

CONFIG = backbone_config("demo")  # its config only: no weights are built
DEPTHS = illava.depths(CONFIG)
GRIDS, TEXT_TOKENS = [[1, 16, 16]], 45  # the batch the demo grid timed


def flops_speedup(schedule: Schedule) -> float:
    return illava.predicted_speedup(CONFIG, schedule, GRIDS, TEXT_TOKENS)


def paper(reduction: float) -> Schedule:
    return Schedule.paper_default(reduction, encoder_depth=DEPTHS[0], llm_depth=DEPTHS[1])


# The job's seeds as the demo grid measured them (CPU, paired speedup over the unmerged model).
SEEDS = [(Schedule.vanilla(), 0.996394964191715), (paper(2 / 3), 0.7755344314148941),
         (paper(7 / 9), 0.7878839151392095), (paper(8 / 9), 0.788476244149825)]  # fmt: skip
ONE_MERGE_EACH = Schedule(method="illava", reduction=0.9295657384476725, encoder_share=0.7112886049771413,
                          encoder_layers=(2,), llm_layers=(4,),
                          params={"recycle_share": 0.23180200489782493, "group_size": 8})  # grid row 186: 1.116x  # fmt: skip


def test_merge_steps_counts_the_steps_that_remove_tokens():
    assert merge_steps(Schedule.vanilla()) == 0
    assert merge_steps(paper(7 / 9)) == 6  # three encoder blocks, three decoder layers
    assert merge_steps(ONE_MERGE_EACH) == 2
    llm_only = ONE_MERGE_EACH.with_(encoder_share=0.0)  # its encoder block merges nothing
    assert merge_steps(llm_only) == 1
    visionzip = Schedule(method="visionzip", reduction=0.7, encoder_share=1.0)  # one step between encoder and LLM
    assert merge_steps(visionzip) == 1
    assert merge_steps(Schedule(method="downsample", reduction=0.5, encoder_share=1.0)) == 0  # resized inputs


def test_fit_recovers_the_per_merge_cost_it_was_made_with():
    truth = SpeedModel(flops_speedup, per_merge=0.07)
    schedules = [paper(0.6), paper(0.9), ONE_MERGE_EACH, ONE_MERGE_EACH.with_(reduction=0.6)]
    fitted = SpeedModel.fit(flops_speedup, [(s, truth.speedup(s)) for s in schedules])
    assert fitted.per_merge == pytest.approx(0.07, rel=1e-9)
    assert fitted.fitted_on == 4
    assert fitted.speedup(paper(0.75)) == pytest.approx(truth.speedup(paper(0.75)), rel=1e-9)


def test_the_demo_seeds_calibrate_a_merge_cost_that_tells_fast_schedules_apart():
    model = SpeedModel.fit(flops_speedup, SEEDS)
    assert model.fitted_on == 3  # the unmerged model has no merge step to fit
    assert model.per_merge == pytest.approx(0.0946, abs=5e-4)  # of the unmerged prefill, per merge step
    # Grid row 186 measured 1.116x, the paper default at 7/9 0.788x; the FLOPs model calls both faster.
    assert flops_speedup(ONE_MERGE_EACH) > 1.7 and flops_speedup(paper(7 / 9)) > 1.3
    assert model.speedup(ONE_MERGE_EACH) > 1.0 > model.speedup(paper(7 / 9))
    # The seeds themselves are fitted within 4% (one parameter for three ratios).
    for schedule, measured in SEEDS[1:]:
        assert model.speedup(schedule) == pytest.approx(measured, rel=0.04)


def test_without_a_merged_measurement_it_is_the_flops_model():
    for measured in ([], [(Schedule.vanilla(), 1.0)], [(paper(0.7), math.nan)], [(paper(0.7), None)]):
        model = SpeedModel.fit(flops_speedup, measured)
        assert model.per_merge == 0.0 and model.fitted_on == 0
        assert model.speedup(paper(0.7)) == flops_speedup(paper(0.7))
    assert SpeedModel(flops_speedup).speedup(Schedule.vanilla()) == 1.0


def test_merges_never_fit_as_a_gain():
    """Measured faster than the FLOPs model predicts (noise, or a memory-bound run): no negative cost."""
    model = SpeedModel.fit(flops_speedup, [(paper(0.7), 1.2 * flops_speedup(paper(0.7)))])
    assert model.per_merge == 0.0 and model.fitted_on == 1
