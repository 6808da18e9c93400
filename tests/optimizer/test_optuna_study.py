import dataclasses
import random
import warnings

import optuna
import pytest
from optuna.trial import TrialState

from illava.schedule import Schedule
from optimizer import (
    SEED_ATTR,
    Constraints,
    Metrics,
    Objectives,
    SearchSpace,
    make_study,
    pareto_front,
    points_from_study,
    seed_study,
    tell_failure,
    tell_result,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)
DEPTHS = {"encoder_depth": 16, "llm_depth": 6}
LATENCY = Objectives("latency")  # these studies rank by latency in ms; speedup studies are checked below


def _metrics(schedule: Schedule, rng: random.Random) -> Metrics:
    """Synthetic but shaped like the real thing: more reduction is faster, smaller, less accurate."""
    r = schedule.reduction
    quality = round(0.8 - 0.5 * r**3 + rng.uniform(-0.03, 0.03), 2)  # rounded: some ties on purpose
    return Metrics(
        latency_ms=round(100 * (1 - 0.7 * r) + rng.uniform(0, 5), 1),
        memory_mib=round(1000 - 300 * r * (1 - schedule.encoder_share / 2)),
        accuracy=quality,
        retention=quality / 0.8,
        quality=quality,
    )


@pytest.fixture
def sqlite_url(tmp_path):
    return f"sqlite:///{tmp_path / 'optuna.db'}"


@pytest.mark.parametrize("sampler", ["tpe", "nsga2", "random"])
def test_make_study_is_multi_objective_with_named_metrics(sampler):
    study = make_study(None, f"s-{sampler}", objectives=LATENCY, sampler=sampler, seed=0)
    assert [d.name for d in study.directions] == ["MINIMIZE", "MINIMIZE", "MAXIMIZE"]
    assert study.metric_names == ["latency_ms", "memory_mib", "quality"]
    expected = {"tpe": optuna.samplers.TPESampler, "nsga2": optuna.samplers.NSGAIISampler}
    assert isinstance(study.sampler, expected.get(sampler, optuna.samplers.RandomSampler))


def test_a_speedup_study_maximises_it_and_its_front_is_optunas():
    study = make_study(None, "speed", sampler="random", seed=4)  # the default objective
    assert ([d.name for d in study.directions], study.metric_names) == (
        ["MAXIMIZE", "MINIMIZE", "MAXIMIZE"], ["speedup", "memory_mib", "quality"]
    )  # fmt: skip
    space, rng = SearchSpace(), random.Random(4)
    for _ in range(25):
        trial = study.ask()
        metrics = _metrics(space.suggest(trial, **DEPTHS), rng)
        tell_result(study, trial, dataclasses.replace(metrics, speedup=round(100 / metrics.latency_ms, 2)))
    front = pareto_front(points_from_study(study), objective="speedup", memory_noise=0.0)
    assert sorted(p.ref for p in front) == sorted(t.number for t in study.best_trials)
    assert [p.speedup for p in front] == sorted((p.speedup for p in front), reverse=True)  # fastest first


def test_make_study_refuses_bad_arguments(sqlite_url):
    with pytest.raises(ValueError, match="unknown sampler 'cmaes'; allowed: tpe, nsga2, random"):
        make_study(None, "s", objectives=LATENCY, sampler="cmaes")
    with pytest.raises(ValueError, match="seed must be an integer"):
        make_study(None, "s", objectives=LATENCY, seed="1")
    optuna.create_study(storage=sqlite_url, study_name="other", directions=["minimize"])
    with pytest.raises(ValueError, match="exists with directions \\['minimize'\\]"):
        make_study(sqlite_url, "other", objectives=LATENCY)
    make_study(sqlite_url, "mine", objectives=LATENCY)
    with pytest.raises(optuna.exceptions.DuplicatedStudyError):
        make_study(sqlite_url, "mine", objectives=LATENCY, load_if_exists=False)


def _run(study, space, n, rng, constraints=None):
    for _ in range(n):
        trial = study.ask()
        schedule = space.suggest(trial, **DEPTHS)
        tell_result(study, trial, _metrics(schedule, rng), constraints=constraints, objectives=LATENCY)


def test_same_seed_same_suggestions():
    space = SearchSpace()
    runs = []
    for _ in range(2):
        study = make_study(None, "s", objectives=LATENCY, seed=7)
        _run(study, space, 15, random.Random(0))
        runs.append([t.params for t in study.trials])
    assert runs[0] == runs[1]


def test_sqlite_resume_continues_the_same_study_and_seeds_once(sqlite_url):
    space = SearchSpace()
    study = make_study(sqlite_url, "illava-job", objectives=LATENCY, seed=3)
    added = seed_study(study, space, **DEPTHS)
    assert [s.reduction for s in added] == [0.0, 2 / 3, 7 / 9, 8 / 9]
    assert seed_study(study, space, **DEPTHS) == []  # same process, again
    rng = random.Random(1)
    _run(study, space, 6, rng)  # the 4 seeded trials, then 2 sampled ones
    first = study.trials
    assert [t.user_attrs.get(SEED_ATTR) for t in first[:4]] == [
        "unmerged",
        "paper_default@0.6667",
        "paper_default@0.7778",
        "paper_default@0.8889",
    ]
    assert first[0].params == {"reduction": 0.0}

    resumed = make_study(
        sqlite_url, "illava-job", objectives=LATENCY, seed=3
    )  # "another process": a fresh storage object
    assert optuna.get_all_study_names(sqlite_url) == ["illava-job"] and len(resumed.trials) == 6
    assert seed_study(resumed, space, **DEPTHS) == []  # already enqueued and run: not again
    _run(resumed, space, 4, rng)
    trials = resumed.trials
    assert [t.number for t in trials] == list(range(10))
    assert all(t.state == TrialState.COMPLETE for t in trials)
    # Reseeded on resume: the new trials do not replay the ones drawn before the interruption.
    assert not any(t.params == first[4].params for t in trials[6:])


def test_seed_study_adapts_to_the_spaces_choices():
    space = SearchSpace(group_size=(3, 8), methods=("prune",), reduction=(0.5, 0.7))
    study = make_study(None, "s", objectives=LATENCY)
    added = seed_study(study, space, **DEPTHS, reductions=[0.0, 0.85])
    assert [(s.method, s.params.to_dict(), s.reduction) for s in added] == [
        ("illava", {"recycle_share": 0.1, "group_size": 5}, 0.0),
        ("prune", {}, 0.85),  # prune has no group size: the space's choices do not apply to it
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        replayed = [space.suggest(study.ask(), **DEPTHS) for _ in added]
    assert replayed == added
    with pytest.raises(ValueError, match=r"reductions must be numbers in \[0, 1\), got 1.0"):
        seed_study(study, space, **DEPTHS, reductions=[1.0])


def test_tell_result_sets_constraints_before_telling_and_is_idempotent():
    study = make_study(None, "s", objectives=LATENCY)
    constraints = Constraints(min_retention=0.9, max_latency_ms=50)
    trial = study.ask()
    metrics = Metrics(latency_ms=60.0, memory_mib=100.0, accuracy=0.5, retention=0.95, quality=0.5)
    frozen = tell_result(study, trial, metrics, constraints=constraints, objectives=LATENCY)
    assert frozen.state == TrialState.COMPLETE and frozen.values == [60.0, 100.0, 0.5]
    assert frozen.constraints == {"min_retention": pytest.approx(-0.05 / 0.9), "max_latency_ms": pytest.approx(0.2)}
    again = tell_result(study, trial.number, Metrics(1.0, 1.0, 1.0, 1.0, 1.0), constraints=constraints,
                        objectives=LATENCY)  # fmt: skip
    assert again.values == [60.0, 100.0, 0.5]
    assert study.best_trials == []  # the only trial is infeasible


def test_tell_by_number_after_the_asking_process_is_gone(sqlite_url):
    study = make_study(sqlite_url, "s", objectives=LATENCY)
    number = study.ask().number  # the driver that asked dies here
    resumed = make_study(sqlite_url, "s", objectives=LATENCY)
    metrics = {
        "prefill_s": {"median": 0.02},
        "peak_memory": {"torch_peak_bytes": 3 * 2**20},
        "accuracy": None,
        "retention": None,
        "fidelity": {"first_token_agreement": 0.9, "mean_kl": 0.01, "greedy_match_rate": 0.8},
    }
    frozen = tell_result(resumed, number, metrics, constraints=Constraints(min_retention=0.8), objectives=LATENCY)
    assert frozen.values == pytest.approx([20.0, 3.0, 0.9]) and frozen.constraints["min_retention"] < 0
    with pytest.raises(ValueError, match="no trial number 5"):
        tell_result(resumed, 5, metrics, objectives=LATENCY)


def test_tell_failure_and_requeue():
    study = make_study(None, "s", objectives=LATENCY)
    space = SearchSpace()
    trial = study.ask()
    schedule = space.suggest(trial, **DEPTHS)
    frozen = tell_failure(study, trial, requeue=True)
    assert frozen.state == TrialState.FAIL
    assert tell_failure(study, trial.number).state == TrialState.FAIL  # idempotent
    retry = study.ask()
    assert retry.number == 1 and space.suggest(retry, **DEPTHS) == schedule


def test_a_trial_without_an_objective_stays_running():
    study = make_study(None, "s", objectives=LATENCY)
    trial = study.ask()
    with pytest.raises(ValueError, match="memory_mib"):
        tell_result(study, trial, Metrics(1.0, None, None, None, 0.5), objectives=LATENCY)
    assert study.trials[0].state == TrialState.RUNNING


@pytest.mark.parametrize("storage", ["memory", "sqlite"])
def test_pareto_front_equals_optunas_best_trials(storage, sqlite_url):
    study = make_study(None if storage == "memory" else sqlite_url, "pareto", objectives=LATENCY, seed=11)
    space = SearchSpace()
    constraints = Constraints(min_retention=0.85, max_memory_mib=950)
    seed_study(study, space, **DEPTHS)
    rng = random.Random(5)
    _run(study, space, 40, rng, constraints)
    for value in ([10.0, 100.0, 0.5], [10.0, 100.0, 0.5]):  # an exact duplicate pair, fastest and smallest
        trial = study.ask()
        trial.set_constraint("min_retention", -1.0)
        trial.set_constraint("max_memory_mib", -1.0)
        study.tell(trial, value)
    tell_failure(study, study.ask())
    study.ask()  # left running

    trials = study.trials
    states = {t.state for t in trials}
    assert {TrialState.COMPLETE, TrialState.FAIL, TrialState.RUNNING} <= states
    feasible = [t for t in trials if t.state == TrialState.COMPLETE and max(t.constraints.values()) <= 0]
    assert 0 < len(feasible) < sum(t.state == TrialState.COMPLETE for t in trials)  # infeasible ones exist

    best = study.best_trials
    front = pareto_front(points_from_study(study, LATENCY), memory_noise=0.0)  # Optuna's dominance
    assert sorted(p.ref for p in front) == sorted(t.number for t in best)
    assert sorted((p.latency_ms, p.memory_mib, p.quality) for p in front) == sorted(tuple(t.values) for t in best)
    assert {trials[-4].number, trials[-3].number} <= {p.ref for p in front}  # both duplicates


def test_unconstrained_study_front_equals_best_trials():
    study = make_study(None, "s", objectives=LATENCY, sampler="random", seed=2)
    _run(study, SearchSpace(), 30, random.Random(2))
    front = pareto_front(points_from_study(study, LATENCY), memory_noise=0.0)
    assert sorted(p.ref for p in front) == sorted(t.number for t in study.best_trials)
