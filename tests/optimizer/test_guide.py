"""`optimizer.GuidedSearch`, the way a job asks its trials: seeds as enqueued, then random draws the
calibrated speed model predicts faster than the unmerged model, then the sampler with that guard.
Measured here by a known response (a merge step costs 10% of the unmerged prefill), so the model
the search fits is the truth after the seeds and every claim can be checked exactly."""

from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState

import illava
from illava import Schedule
from illava.backbones import backbone_config
from optimizer import (
    EXPLORE_ROLE,
    PRUNED_ATTR,
    SEED_ATTR,
    SPEEDUP_ATTR,
    GuidedSearch,
    Metrics,
    Objectives,
    SearchSpace,
    SpeedModel,
    enqueue_seed,
    make_study,
    seed_reductions,
    seed_schedules,
    tell_result,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)  # a line per seed already enqueued otherwise
CONFIG = backbone_config("demo")  # its config only: no weights are built
DEPTHS = illava.depths(CONFIG)
GRIDS, TEXT_TOKENS = [[1, 16, 16]], 45
SPACE = SearchSpace()
_FLOPS: dict[str, float] = {}


def flops_speedup(schedule: Schedule) -> float:
    key = schedule.to_json(sort_keys=True)
    if key not in _FLOPS:
        _FLOPS[key] = illava.predicted_speedup(CONFIG, schedule, GRIDS, TEXT_TOKENS)
    return _FLOPS[key]


TRUTH = SpeedModel(flops_speedup, per_merge=0.10)  # what "measuring" a schedule gives here


def measure(schedule: Schedule) -> Metrics:
    speedup = TRUTH.speedup(schedule)
    quality = round(0.9 - 0.4 * schedule.reduction**2, 2)
    return Metrics(latency_ms=20.0 / speedup, memory_mib=20.0, accuracy=quality, retention=quality / 0.9,
                   quality=quality, speedup=speedup)  # fmt: skip


def guide(**options) -> GuidedSearch:
    return GuidedSearch(SPACE, encoder_depth=DEPTHS[0], llm_depth=DEPTHS[1], flops_speedup=flops_speedup,
                        **{"seed": 0, "explore": 10, **options})  # fmt: skip


def run(search: GuidedSearch, trials: int, study: optuna.Study | None = None, objectives=None) -> optuna.Study:
    """A job's loop: each seed enqueued right before its ask, every ask through `search`, each
    measured trial told at once."""
    objectives = objectives or Objectives()
    study = study or make_study(None, "guided", seed=search.seed, objectives=objectives)
    seeds = seed_schedules(SPACE, encoder_depth=DEPTHS[0], llm_depth=DEPTHS[1], reductions=seed_reductions(SPACE))
    for _ in range(trials):
        for seed in seeds:
            if enqueue_seed(study, seed, SPACE):
                break
        trial, schedule = search.ask(study)
        tell_result(study, trial, measure(schedule), objectives=objectives)
    return study


def measured(study: optuna.Study) -> list[tuple[optuna.trial.FrozenTrial, Schedule]]:
    out = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        schedule = SPACE.suggest(optuna.trial.FixedTrial(trial.params), encoder_depth=DEPTHS[0], llm_depth=DEPTHS[1])
        out.append((trial, schedule))
    return out


@pytest.fixture(scope="module")
def study() -> optuna.Study:
    return run(guide(), 24)


def test_seeds_first_as_enqueued_then_draws_then_the_sampler(study):
    trials = measured(study)
    assert len(trials) == 24
    roles = [trial.user_attrs.get(SEED_ATTR) for trial, _ in trials]
    assert roles[:4] == ["unmerged", "paper_default@0.6667", "paper_default@0.7778", "paper_default@0.8889"]
    assert roles[4:10] == [EXPLORE_ROLE] * 6  # explore=10 counts the seeds
    # Then the sampler's, except a draw after `tries` (10) suggestions in a row were pruned.
    everything = study.get_trials(deepcopy=False)
    for trial, _ in trials[10:]:
        if trial.user_attrs.get(SEED_ATTR) is not None:
            assert trial.user_attrs[SEED_ATTR] == EXPLORE_ROLE
            before = everything[trial.number - 10 : trial.number]
            assert [t.state for t in before] == [TrialState.PRUNED] * 10
    assert roles[10:].count(None) >= 7
    # The seeds are measured although the model calls the paper defaults slower than the unmerged model.
    assert all(TRUTH.speedup(schedule) < 1 for _, schedule in trials[1:4])
    assert not [t for t in study.get_trials(deepcopy=False) if t.state in (TrialState.RUNNING, TrialState.WAITING)]


def test_every_trial_after_the_seeds_is_predicted_faster_than_the_unmerged_model(study):
    """The fit on the seeds recovers the truth's merge cost, so the guard is exact here: nothing
    measured after the seeds is slower than the unmerged model, although most of the space is."""
    trials = measured(study)
    assert all(TRUTH.speedup(schedule) >= 1.0 for _, schedule in trials[4:])
    assert all(trial.user_attrs[SPEEDUP_ATTR] == pytest.approx(TRUTH.speedup(s)) for trial, s in trials)
    model = guide().model(study)
    assert model.per_merge == pytest.approx(0.10, rel=1e-9) and model.fitted_on == 23
    draws = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    space = [SPACE.suggest(draws.ask(), encoder_depth=DEPTHS[0], llm_depth=DEPTHS[1]) for _ in range(200)]
    assert sum(TRUTH.speedup(s) >= 1.0 for s in space) < 100  # the guard rules out most of the space


def test_suggestions_predicted_too_slow_are_pruned_unmeasured_and_say_why(study):
    pruned = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.PRUNED]
    assert pruned  # TPE did suggest slow schedules
    for trial in pruned:
        schedule = SPACE.suggest(optuna.trial.FixedTrial(trial.params), encoder_depth=DEPTHS[0], llm_depth=DEPTHS[1])
        assert TRUTH.speedup(schedule) < 1.0
        assert "below 1x" in trial.user_attrs[PRUNED_ATTR] and trial.values is None
    assert all(t.user_attrs.get(SEED_ATTR) is None for t in pruned)


def test_without_calibration_nothing_is_ruled_out():
    """The FLOPs model alone calls every merged schedule faster: no trial is pruned, and the search
    measures schedules slower than the unmerged model (what the calibrated guard prevents above)."""
    study = run(guide(calibrate=False), 14)
    assert not [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.PRUNED]
    assert sum(TRUTH.speedup(s) < 1.0 for _, s in measured(study)[4:]) >= 5


def test_deterministic_for_a_seed_and_resumable():
    first = [s for _, s in measured(run(guide(seed=5), 8))]
    assert first == [s for _, s in measured(run(guide(seed=5), 8))]
    assert first[4:] != [s for _, s in measured(run(guide(seed=6), 8))][4:]
    # A new GuidedSearch on the study (a resumed job) goes on where the first stopped: the draws are
    # seeded by the trials already asked, the exploration counted from the study.
    study = run(guide(seed=5), 6)
    resumed = run(guide(seed=5), 2, study=study)
    assert [s for _, s in measured(resumed)] == first


def test_speedups_calibrate_the_model_whatever_the_speed_objective():
    study = run(guide(), 6, objectives=Objectives("latency"))
    assert study.directions[0] == optuna.study.StudyDirection.MINIMIZE
    assert guide().model(study).per_merge == pytest.approx(0.10, rel=1e-9)


def test_a_space_with_nothing_fast_enough_still_measures_its_fastest_predicted():
    """Merges so costly that no schedule is predicted faster: each ask prunes at most `tries`
    suggestions and then measures the fastest predicted of a draw, instead of looping."""
    slow = SpeedModel(flops_speedup, per_merge=1.0)
    search = guide(explore=5, tries=3)
    study = make_study(None, "slow", seed=0)
    for schedule in seed_schedules(SPACE, encoder_depth=DEPTHS[0], llm_depth=DEPTHS[1], reductions=[0.7]):
        enqueue_seed(study, schedule, SPACE)
        trial, schedule = search.ask(study)
        tell_result(study, trial, Metrics(20.0, 20.0, 0.8, 1.0, 0.8, speedup=slow.speedup(schedule)))
    for _ in range(4):
        before = len(study.get_trials(deepcopy=False))
        trial, schedule = search.ask(study)
        assert len(study.get_trials(deepcopy=False)) - before <= 3 + 1
        assert search.model(study).speedup(schedule) < 1.0
        assert merge_count(schedule) == 2  # the fastest predicted: one merge per stage
        tell_result(study, trial, Metrics(20.0, 20.0, 0.8, 1.0, 0.8, speedup=slow.speedup(schedule)))


def merge_count(schedule: Schedule) -> int:
    return len(schedule.encoder_layers) + len(schedule.llm_layers)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="explore >= 0"):
        guide(explore=-1)
    with pytest.raises(ValueError, match="floor > 0"):
        guide(floor=0)


def test_a_space_of_several_methods_draws_each_method_early():
    """The draws go to the method the study has tried least, so 7 methods need 7 draws, not luck."""
    peers = ("fastv", "pdrop", "divprune", "visionzip", "sparsevlm", "tome", "downsample")
    space = SearchSpace(reduction=0.778, methods=peers)
    search = GuidedSearch(space, encoder_depth=DEPTHS[0], llm_depth=DEPTHS[1], flops_speedup=flops_speedup)
    study = make_study(None, "methods", seed=0)
    seeds = seed_schedules(space, encoder_depth=DEPTHS[0], llm_depth=DEPTHS[1], reductions=seed_reductions(space))
    methods = []
    for number in range(9):
        if number < len(seeds):
            enqueue_seed(study, seeds[number], space)
        trial, schedule = search.ask(study)
        methods.append(schedule.method)
        tell_result(study, trial, measure(schedule))
    assert methods[1] == "fastv"  # the paper default in the space's first method
    assert set(methods[2:9]) == set(peers)
