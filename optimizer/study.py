"""The Optuna study of a tuning job: creation and resume, seeding, and telling results.

Facts of Optuna 5.0 this relies on (read from its source):

* Constraints are per trial: ``trial.set_constraint(name, value)`` stores one system attribute
  per name (<= 0 satisfied; NaN rejected; setting a name twice is ignored with a warning).
  Samplers read ``trial.constraints`` themselves; their ``constraints_func`` argument is
  deprecated since 5.0, so none is passed. With ask/tell the constraints must be set before
  ``study.tell``, because telling runs the sampler's ``after_trial`` and finishes the trial.
* ``study.best_trials``: completed trials only; when any trial carries constraints, only
  trials whose constraint values are all <= 0 are considered (a trial with none counts as
  feasible); duplicates of a non-dominated point are all returned.
* ``enqueue_trial(params, user_attrs, skip_if_exists=True)`` skips params equal to the fixed
  params of any trial of the study, waiting, running or finished (floats compared with
  ``np.isclose``), so seeding twice enqueues once, also after a resume on an RDB storage.
* ``create_study(storage=URL, study_name=..., load_if_exists=True)`` loads a study of that name
  without checking its directions; `make_study` checks them.
* Multi-objective `TPESampler` is the independent TPE unless ``multivariate=True``, with
  ``constant_liar=True`` by default (trials in flight are penalised, which suits parallel workers).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from illava.methods import get_method
from illava.schedule import PAPER_REDUCTIONS, Schedule

from .front import Point
from .objectives import Constraints, Metrics, Objectives, metrics_summary
from .space import SearchSpace, schedule_params

if TYPE_CHECKING:
    from optuna.storages import BaseStorage

SAMPLERS = ("tpe", "nsga2", "random")
SEED_ATTR = "illava_seed"  # user attribute naming why a trial was enqueued: a seed's role, or guide.EXPLORE_ROLE
#: User attribute of a told trial: its paired speedup over the unmerged model, whatever the speed
#: objective (what `optimizer.GuidedSearch` calibrates its speed model on).
SPEEDUP_ATTR = "illava_speedup"


def make_study(
    storage_url: str | BaseStorage | None,
    study_name: str,
    *,
    sampler: str = "tpe",
    seed: int = 0,
    objectives: Objectives | None = None,
    load_if_exists: bool = True,
) -> optuna.Study:
    """Create the multi-objective study of a job, or continue it (same name, same storage).

    `storage_url`: None for in-memory, a SQLAlchemy URL (``sqlite:///illava.db``,
    ``postgresql+psycopg://...``; a bare ``postgresql://`` is read as psycopg 3), or an Optuna
    storage. `sampler`: ``"tpe"`` (multi-objective TPE), ``"nsga2"`` or ``"random"``, seeded
    with `seed` (replayed on `demo`, NSGA-II searched exactly as random search did: its crossover
    sees only the parameters every trial has, and the unmerged seed has only ``reduction``;
    benchmarks/results/search/demo_replay.md). A continued study gets its sampler seeded from
    ``(seed, trials so far)``: the same seed again would replay the suggestions made before the
    interruption.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; allowed: {', '.join(SAMPLERS)}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    objectives = objectives or Objectives()
    study = optuna.create_study(
        storage=_storage(storage_url),
        study_name=study_name,
        directions=list(objectives.directions),
        load_if_exists=load_if_exists,
        sampler=optuna.samplers.RandomSampler(seed=seed),  # replaced below, once the trial count is known
    )
    wanted = [optuna.study.StudyDirection[d.upper()] for d in objectives.directions]
    if study.directions != wanted:
        raise ValueError(
            f"study {study_name!r} exists with directions {[d.name.lower() for d in study.directions]}, "
            f"not {list(objectives.directions)}; it belongs to something else"
        )
    done = len(study.get_trials(deepcopy=False))
    study.sampler = _sampler(sampler, seed if done == 0 else (seed * 1_000_003 + done) % 2**32)
    if study.metric_names != list(objectives.names):
        with warnings.catch_warnings():  # experimental since 3.2 and still flagged so in 5.0
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(list(objectives.names))
    return study


def _storage(storage_url: str | BaseStorage | None) -> str | BaseStorage | None:
    if isinstance(storage_url, str):
        scheme, sep, rest = storage_url.partition("://")
        if sep and scheme in ("postgresql", "postgres"):
            return f"postgresql+psycopg://{rest}"  # the driver this project installs
    return storage_url


def _sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)


def seed_reductions(space: SearchSpace) -> list[float]:
    """The reductions the study starts from: the paper's ratios inside the searched range."""
    if isinstance(space.reduction, float | int):
        return [float(space.reduction)]
    low, high = space.reduction
    inside = [r for r in PAPER_REDUCTIONS if low <= r <= high]
    return inside or [(low + high) / 2]


def seed_schedules(
    space: SearchSpace, *, encoder_depth: int, llm_depth: int, reductions: Iterable[float] = PAPER_REDUCTIONS
) -> list[Schedule]:
    """The schedules a study starts from, in order: the unmerged model, then the paper's default
    schedule at each of `reductions` (mapped to these depths).

    The paper default uses the space's method and group size when the paper's ("illava", 5)
    are not among its choices (the nearest group size), so `suggest` can reproduce it, and its
    encoder share clipped into the space's range (a space that keeps merges out of the encoder, for
    a backbone that cannot merge there, is never seeded with encoder merges)."""
    schedules = [Schedule.vanilla()]
    for reduction in reductions:
        if isinstance(reduction, bool) or not isinstance(reduction, int | float) or not 0 <= reduction < 1:
            raise ValueError(f"reductions must be numbers in [0, 1), got {reduction!r}")
        if reduction == 0:
            continue  # the unmerged model is already first
        default = Schedule.paper_default(float(reduction), encoder_depth=encoder_depth, llm_depth=llm_depth)
        schedules.append(_within_choices(default, space))
    return schedules


def seed_role(schedule: Schedule) -> str:
    """What a seed trial is, as its `SEED_ATTR` says: ``"unmerged"`` or ``"paper_default@0.7778"``."""
    return "unmerged" if schedule.removes_nothing else f"paper_default@{schedule.reduction:.4g}"


def enqueue_seed(study: optuna.Study, schedule: Schedule, space: SearchSpace, *, role: str | None = None) -> bool:
    """Enqueue `schedule` unless a trial of the study (waiting, running or finished) already has
    its parameters; returns whether it was enqueued. The next `study.ask()` takes it.

    `role` is stored as the trial's `SEED_ATTR` (why it was enqueued): `EXPLORE_ROLE` for a draw of
    `optimizer.GuidedSearch`; by default the seed's own (`seed_role`)."""
    before = len(study.get_trials(deepcopy=False))
    role = seed_role(schedule) if role is None else role
    study.enqueue_trial(schedule_params(schedule, space), user_attrs={SEED_ATTR: role}, skip_if_exists=True)
    return len(study.get_trials(deepcopy=False)) > before


def seed_study(
    study: optuna.Study,
    space: SearchSpace,
    *,
    encoder_depth: int,
    llm_depth: int,
    reductions: Iterable[float] = PAPER_REDUCTIONS,
) -> list[Schedule]:
    """Enqueue `seed_schedules(...)`, each once: what an earlier call (or run) enqueued is skipped.
    Returns the schedules newly enqueued, in order.

    Every enqueued schedule is a WAITING trial until it is asked. A tuning job with a trial budget
    enqueues one seed at a time, right before its ask (`enqueue_seed`), so the seeds count toward
    the budget and none is left waiting."""
    schedules = seed_schedules(space, encoder_depth=encoder_depth, llm_depth=llm_depth, reductions=reductions)
    return [schedule for schedule in schedules if enqueue_seed(study, schedule, space)]


def fail_waiting(study: optuna.Study) -> list[FrozenTrial]:
    """Finish every WAITING trial (enqueued, never asked) as FAILED, so nothing is left waiting
    in a study whose job has ended; returns them as finished. Optuna tells only running trials, so
    each is asked (which takes the waiting ones first) and failed at once."""
    failed = []
    while any(t.state == TrialState.WAITING for t in study.get_trials(deepcopy=False)):
        failed.append(study.tell(study.ask(), state=TrialState.FAIL))
    return failed


def _within_choices(schedule: Schedule, space: SearchSpace) -> Schedule:
    method = schedule.method if schedule.method in space.methods else space.methods[0]
    low, high = space.bounds(space.encoder_share)
    schedule = schedule.with_(encoder_share=min(max(schedule.encoder_share, low), high))
    schedule = get_method(method).placement(schedule)  # onto the stages the space's method acts at
    own = schedule.params.to_dict()
    if "group_size" not in own:
        return schedule
    group_size = min(space.group_size, key=lambda m: (abs(m - own["group_size"]), m))
    return schedule.with_(group_size=group_size)


# ----------------------------------------------------------------------------------- telling
def _trial(study: optuna.Study, trial: optuna.Trial | int) -> optuna.Trial | None:
    """The live trial (None when it already finished); a number is looked up in the study."""
    frozen = _frozen(study, trial)
    if frozen.state.is_finished():
        return None
    # Optuna has no public lookup from number to live Trial; its own `tell(int)` uses the id too.
    return trial if isinstance(trial, optuna.Trial) else optuna.Trial(study, frozen._trial_id)


def tell_result(
    study: optuna.Study,
    trial: optuna.Trial | int,
    metrics: Metrics | Mapping[str, Any],
    *,
    constraints: Constraints | None = None,
    objectives: Objectives | None = None,
) -> FrozenTrial:
    """Finish a trial with its measurement: constraint values first, then the objective values;
    the paired speedup, when measured, is stored as the trial's `SPEEDUP_ATTR`.

    `trial` is the asked trial or its number (after a resume). Idempotent: a trial already
    finished is returned unchanged. Raises ValueError (trial left running) for metrics that
    lack an objective; tell those with `tell_failure`.
    """
    metrics = metrics if isinstance(metrics, Metrics) else metrics_summary(metrics)
    values = (objectives or Objectives()).values(metrics)
    live = _trial(study, trial)
    if live is None:
        return _frozen(study, trial)
    for name, value in (constraints or Constraints()).violation_dict(metrics).items():
        live.set_constraint(name, value)
    if metrics.speedup is not None:
        live.set_user_attr(SPEEDUP_ATTR, float(metrics.speedup))
    return study.tell(live, list(values))


def tell_failure(study: optuna.Study, trial: optuna.Trial | int, *, requeue: bool = False) -> FrozenTrial:
    """Finish a trial as FAILED (idempotent). With `requeue`, its parameters are enqueued again
    so a later ask retries the same schedule (e.g. a trial cut short by a dead driver)."""
    live = _trial(study, trial)
    if live is None:
        return _frozen(study, trial)
    frozen = study.tell(live, state=TrialState.FAIL)
    if requeue and frozen.params:
        study.enqueue_trial(dict(frozen.params), user_attrs=dict(frozen.user_attrs))
    return frozen


def _frozen(study: optuna.Study, trial: optuna.Trial | int) -> FrozenTrial:
    number = trial.number if isinstance(trial, optuna.Trial) else trial
    for frozen in study.get_trials(deepcopy=False):
        if frozen.number == number:
            return frozen
    raise ValueError(f"study {study.study_name!r} has no trial number {number}")


def points_from_study(study: optuna.Study, objectives: Objectives | None = None) -> list[Point]:
    """Every trial of `study` as a `Point` (``ref`` = trial number); trials without values
    (running, failed) keep NaN values and their state, so `pareto_front` skips them. With the
    speedup objective the point's ``speedup`` is set and its ``latency_ms`` is NaN (the study
    holds no latency)."""
    objectives = objectives or Objectives()
    points = []
    for trial in study.get_trials(deepcopy=False):
        values = trial.values if trial.values is not None else [math.nan] * len(objectives.names)
        speed, memory, quality = values
        latency, speedup = (math.nan, speed) if objectives.latency == "speedup" else (speed, None)
        points.append(
            Point(
                latency_ms=latency,
                memory_mib=memory,
                quality=quality,
                speedup=speedup,
                feasible=all(v <= 0 for v in trial.constraints.values()),
                state=trial.state.name.lower(),
                ref=trial.number,
            )
        )
    return points
