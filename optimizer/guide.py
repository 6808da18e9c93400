"""The guided search a job runs: every trial after the seeds is one the calibrated speed model
predicts faster than the unmerged model, drawn at random for the first `explore` trials, then
by the study's sampler.

Why. The unmerged model is on every front, and merging never adds accuracy (except by measurement
noise), so a merged schedule that runs slower than the unmerged model is dominated by it. Whether a
merge pays depends on the hardware and the model: on the `demo` grid (a small model on a CPU) 14 of
303 merged schedules run faster than the unmerged model, where the FLOPs model predicts all of them
faster. `SpeedModel`, calibrated on what the job has measured (its seeds first), tells most of them
apart (`optimizer.speed`); where merges pay everywhere (a large model on a GPU) it rules out
little and the search is the sampler's.

How, trial by trial (`GuidedSearch.ask`):

1. A trial waiting in the study (a seed the job enqueued) is asked as it is.
2. While fewer than `explore` trials have been asked (seeds included; pruned ones not counted),
   the next is a random draw among the schedules the model, fitted on every measurement so far,
   predicts at least `floor` times as fast as the unmerged model: enqueued under the role
   `EXPLORE_ROLE` and asked. In a space of several methods (`submit --methods`) each draw is of
   the method the study has tried least, so every method is tried early.
3. Then the sampler suggests. A suggestion predicted slower than `floor` is not measured: it is
   told PRUNED (with `PRUNED_ATTR` saying why), which TPE reads as a poor region, and the sampler
   asks again; after `tries` of them the trial is a random draw as in 2.

Where no schedule is predicted fast enough (a draw of `DRAWS` finds none) the draw is the fastest
predicted one, so a job always measures something. The first `explore` trials are random rather
than the sampler's because the replay on `demo` found the exploration worth more than TPE's early
exploitation within 30 trials (measurements there are noisy: accuracy on 50 questions); the
numbers are in docs/benchmarks.md, "Search efficiency on `demo` (issue 17)".

Pruned trials are finished in Optuna and never measured: a job stores no row for them and they do
not count toward its trial budget. Deterministic for a seed, and resumable: the counts are read
from the study, and each draw is seeded by the seed and the number of trials asked before it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import optuna
from optuna.trial import TrialState

from illava.schedule import Schedule

from .space import SearchSpace
from .speed import SpeedModel
from .study import SPEEDUP_ATTR, enqueue_seed

EXPLORE_ROLE = "explore"  # the SEED_ATTR of a trial drawn in the exploration (step 2)
PRUNED_ATTR = "illava_pruned"  # why a suggestion was not measured
#: Trials, seeds included, drawn at random among the fast-predicted schedules before the sampler
#: suggests: the replay on `demo` compared 4 (none), 10, 20, 30 and all of them; 30 (a job's
#: typical budget) was the fastest to 90% of the front, and TPE takes over in longer jobs.
EXPLORE_TRIALS = 30
GUARD_TRIES = 10  # sampler suggestions predicted too slow before a trial is drawn instead
DRAWS = 500  # random schedules a draw looks through for one predicted fast enough


@dataclass
class GuidedSearch:
    """Asks a job's trials (see the module docstring). `flops_speedup`: the FLOPs model on the
    job's workload (``illava.predicted_speedup`` on its inputs); `calibrate=False` keeps the model
    at that (no merge cost), which rules out nothing a FLOPs count calls faster."""

    space: SearchSpace
    encoder_depth: int
    llm_depth: int
    flops_speedup: Callable[[Schedule], float]
    seed: int = 0
    explore: int = EXPLORE_TRIALS
    tries: int = GUARD_TRIES
    floor: float = 1.0
    calibrate: bool = True
    _schedules: dict[int, Schedule] = field(default_factory=dict, repr=False)  # trial number -> its schedule

    def __post_init__(self) -> None:
        if self.explore < 0 or self.tries < 0 or not self.floor > 0:
            raise ValueError(
                f"need explore >= 0, tries >= 0 and floor > 0; got {self.explore}, {self.tries}, {self.floor}"
            )
        self.space.check_fits(encoder_depth=self.encoder_depth, llm_depth=self.llm_depth)

    def ask(self, study: optuna.Study) -> tuple[optuna.Trial, Schedule]:
        """The next trial to measure and its schedule. The trial is RUNNING; every trial this call
        pruned on the way is finished."""
        trials = study.get_trials(deepcopy=False)
        if any(t.state == TrialState.WAITING for t in trials):
            return self._ask(study)
        model = self.model(study)
        asked = sum(t.state != TrialState.PRUNED for t in trials)
        if asked < self.explore:
            return self._ask_drawn(study, model, asked, trials)
        for _ in range(self.tries):
            trial, schedule = self._ask(study)
            predicted = model.speedup(schedule)
            if predicted >= self.floor:
                return trial, schedule
            trial.set_user_attr(
                PRUNED_ATTR, f"predicted {predicted:.3f}x the unmerged model's speed, below {self.floor:g}x"
            )
            study.tell(trial, state=TrialState.PRUNED)
        return self._ask_drawn(study, model, asked, study.get_trials(deepcopy=False))

    def model(self, study: optuna.Study) -> SpeedModel:
        """`SpeedModel` fitted on the study's measured trials (their speedups as `tell_result`
        stored them), or the FLOPs model when `calibrate` is off."""
        if not self.calibrate:
            return SpeedModel(self.flops_speedup)
        measured = []
        for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            speedup = trial.user_attrs.get(SPEEDUP_ATTR)
            if speedup is not None:
                measured.append((self._schedule_of(trial), speedup))
        return SpeedModel.fit(self.flops_speedup, measured)

    def draw(self, model: SpeedModel, asked: int, method: str | None = None) -> Schedule:
        """A random merged schedule of the space (of `method`, when given) predicted at least
        `floor` times as fast as the unmerged model (the fastest predicted of `DRAWS` when none is),
        seeded by `asked`."""
        sampler = optuna.samplers.RandomSampler(seed=(self.seed * 1_000_003 + asked) % 2**32)
        scratch = optuna.create_study(sampler=sampler)
        fastest, fastest_speed = None, 0.0
        for _ in range(DRAWS):
            if method is not None:
                scratch.enqueue_trial({"method": method})  # the other parameters drawn at random
            schedule = self._suggest(scratch.ask())
            if schedule.removes_nothing:
                continue
            predicted = model.speedup(schedule)
            if predicted >= self.floor:
                return schedule
            if predicted > fastest_speed:
                fastest, fastest_speed = schedule, predicted
        if fastest is None:
            raise ValueError("the search space drew no merged schedule")
        return fastest

    def _ask_drawn(
        self, study: optuna.Study, model: SpeedModel, asked: int, trials: list[optuna.trial.FrozenTrial]
    ) -> tuple[optuna.Trial, Schedule]:
        method = None
        if len(self.space.methods) > 1:  # the method tried least (pruned trials were not), the space's order on ties
            tried = [t.params.get("method") for t in trials if t.state != TrialState.PRUNED]
            method = min(self.space.methods, key=tried.count)
        enqueue_seed(study, self.draw(model, asked, method), self.space, role=EXPLORE_ROLE)
        return self._ask(study)  # a draw equal to an earlier trial is not enqueued: the sampler's, then

    def _ask(self, study: optuna.Study) -> tuple[optuna.Trial, Schedule]:
        trial = study.ask()
        schedule = self._suggest(trial)
        self._schedules[trial.number] = schedule
        return trial, schedule

    def _suggest(self, trial: optuna.Trial | optuna.trial.FixedTrial) -> Schedule:
        return self.space.suggest(trial, encoder_depth=self.encoder_depth, llm_depth=self.llm_depth)

    def _schedule_of(self, trial: optuna.trial.FrozenTrial) -> Schedule:
        if trial.number not in self._schedules:  # a trial of an earlier run (a resumed job)
            self._schedules[trial.number] = self._suggest(optuna.trial.FixedTrial(trial.params))
        return self._schedules[trial.number]
