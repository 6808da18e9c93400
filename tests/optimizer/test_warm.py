"""`optimizer.warm_schedules`: the warm start a job enqueues after its seeds. Schedules of the space
it is given (any of its methods), distinct, none a seed, picked over the FLOPs-predicted speedup, a
design of the size asked for; and the role it is enqueued under."""

from __future__ import annotations

import optuna
import pytest

import illava
from illava.backbones import backbone_config
from optimizer import (
    SEED_ATTR,
    WARM_ROLE,
    SearchSpace,
    enqueue_seed,
    schedule_params,
    seed_reductions,
    seed_schedules,
    warm_schedules,
)

CONFIG = backbone_config("demo")  # its config only: no weights are built
DEPTHS = illava.depths(CONFIG)
GRIDS, TEXT_TOKENS = [[1, 16, 16]], 45  # demo at 224 px: 8 x 8 LLM tokens, a short question


_PREDICTED: dict[str, float] = {}  # the tests draw the same pools again: each schedule's FLOPs counted once


def predict(schedule: illava.Schedule) -> float:
    key = schedule.to_json(sort_keys=True)
    if key not in _PREDICTED:
        _PREDICTED[key] = illava.predicted_speedup(CONFIG, schedule, GRIDS, TEXT_TOKENS)
    return _PREDICTED[key]


def warm(space: SearchSpace, **options) -> tuple[list[illava.Schedule], list[illava.Schedule]]:
    seeds = seed_schedules(space, encoder_depth=DEPTHS[0], llm_depth=DEPTHS[1], reductions=seed_reductions(space))
    options = {"count": 6, "seed": 0, **options}
    chosen = warm_schedules(space, encoder_depth=DEPTHS[0], llm_depth=DEPTHS[1], predict=predict, after=seeds,
                            **options)  # fmt: skip
    return chosen, seeds


def assert_valid_for(space: SearchSpace, schedules: list[illava.Schedule], seeds: list[illava.Schedule]) -> None:
    """Each one is what `space.suggest` draws from its own parameters (what a job enqueues), merges,
    fits the model, is none of the seeds and appears once."""
    keys = [s.to_json(sort_keys=True) for s in schedules]
    assert len(set(keys)) == len(keys)
    assert not set(keys) & {s.to_json(sort_keys=True) for s in seeds}
    low, high = SearchSpace.bounds(space.reduction)
    for schedule in schedules:
        trial = optuna.trial.FixedTrial(schedule_params(schedule, space))
        assert space.suggest(trial, encoder_depth=DEPTHS[0], llm_depth=DEPTHS[1]) == schedule
        assert schedule.method in space.methods and not schedule.removes_nothing
        assert low <= schedule.reduction <= high
        schedule.check_fits(encoder_depth=DEPTHS[0], llm_depth=DEPTHS[1])


def test_the_default_space_gets_six_spread_schedules_most_at_one_merge_per_stage():
    space = SearchSpace()
    chosen, seeds = warm(space)
    assert len(chosen) == 6
    assert_valid_for(space, chosen, seeds)
    assert [len(s.encoder_layers) == len(s.llm_layers) == 1 for s in chosen] == [True] * 4 + [False] * 2
    assert chosen == warm(space)[0]  # deterministic for a seed
    assert chosen != warm(space, seed=1)[0]


def test_the_picks_spread_over_the_predicted_speedup():
    """Picked by where the FLOPs model puts them, not by chance: the 4 one-merge picks cover most of
    the predicted range of one-merge schedules of the space (by rank, as the design scales it)."""
    space = SearchSpace()
    chosen, _ = warm(space)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=7))
    drawn = [space.suggest(study.ask(), encoder_depth=DEPTHS[0], llm_depth=DEPTHS[1]) for _ in range(400)]
    single = [predict(s) for s in drawn if len(s.encoder_layers) == len(s.llm_layers) == 1]
    assert len(single) > 20
    ranks = sorted(sum(p < predict(s) for p in single) / len(single) for s in chosen[:4])
    assert ranks[-1] - ranks[0] > 0.5, ranks


@pytest.mark.parametrize("count", [0, 1, 2, 3])
def test_a_smaller_budget_asks_a_design_of_its_own_size(count):
    space = SearchSpace()
    chosen, seeds = warm(space, count=count)
    assert len(chosen) == count
    assert_valid_for(space, chosen, seeds)
    # the first round(count * 2/3) at one merge per stage (the rest may be too)
    assert all(len(s.encoder_layers) == len(s.llm_layers) == 1 for s in chosen[: round(count * 2 / 3)])


def test_a_space_of_several_methods_gets_schedules_of_its_methods_not_only_the_fewest_layered():
    """DivPrune merges in no layer and FastV after one: against a space-wide fewest-layers rule every
    pick would be theirs; per method, iLLaVA gets its share and every method is tried."""
    space = SearchSpace(methods=("illava", "fastv", "divprune"))
    chosen, seeds = warm(space)
    assert len(chosen) == 6
    assert_valid_for(space, chosen, seeds)
    assert {s.method for s in chosen} == set(space.methods)
    for schedule in chosen:  # each on the stages its method acts at
        assert illava.get_method(schedule.method).check_schedule(schedule) == []


def test_a_space_without_illava_gets_only_its_own_methods():
    space = SearchSpace(reduction=0.778, methods=("fastv", "divprune"))
    chosen, seeds = warm(space, count=3)
    assert 1 <= len(chosen) <= 3  # few distinct schedules exist at one fixed reduction
    assert_valid_for(space, chosen, seeds)


def test_a_warm_start_is_enqueued_under_its_role_and_once():
    space = SearchSpace()
    chosen, seeds = warm(space, count=2)
    study = optuna.create_study(directions=["maximize", "minimize", "maximize"])
    assert enqueue_seed(study, seeds[1], space)
    assert [enqueue_seed(study, s, space, role=WARM_ROLE) for s in chosen] == [True, True]
    assert not enqueue_seed(study, chosen[0], space, role=WARM_ROLE)  # a resumed job enqueues none twice
    roles = [t.user_attrs[SEED_ATTR] for t in study.get_trials(deepcopy=False)]
    assert roles == [f"paper_default@{seeds[1].reduction:.4g}", WARM_ROLE, WARM_ROLE]
