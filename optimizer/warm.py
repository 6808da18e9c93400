"""Warm-start schedules: what a study tries right after a job's seeds, before its sampler takes over.

Superseded by `optimizer.GuidedSearch`, which draws the trials after the seeds among the schedules a
speed model calibrated on the seeds predicts faster than the unmerged model: on the `demo` replay it
reaches 91.1% of the grid front's hypervolume at 30 trials where this warm start with TPE reaches
88.2% (docs/benchmarks.md, "Search efficiency on `demo` (issue 17)"). Kept while `jobs/driver.py`
still enqueues these; remove it once the driver asks through `GuidedSearch`.

A sampler starts blind: TPE's first 10 trials and NSGA-II's whole first population are random
draws, a third of a 30-trial job or more. A warm start spends those trials on schedules chosen
without measuring anything, from what decides where a schedule lands on the front:

* the speedup the FLOPs model predicts (`illava.predicted_speedup`): it folds the reduction, the
  share removed in the encoder and how early the merges happen into the compute a schedule saves;
* the encoder share itself, which accuracy feels differently from the FLOPs it saves;
* how many layers merge. The seeds are the paper's defaults: gradual removal over three encoder
  blocks and three decoder layers. The other end of that axis is a single merge per stage, which
  at a given reduction removes the tokens earliest (the most compute saved) and pays the merge's
  own cost (scoring, recycling; not in the FLOPs model) once per stage instead of three times.

`warm_schedules` draws a pool through `SearchSpace.suggest` (so each schedule is one the space can
reproduce, `schedule_params`, of one of the space's methods) and picks two kinds, each by a greedy
maximin design (the next pick is the candidate farthest from the seeds and the picks so far, axes
scaled to [0, 1] over the pool, the predicted speedup by rank): most of them (`fewest`, default two
thirds) among the schedules with the fewest merging layers their method allows, spread over
(predicted speedup, encoder share); the rest from the whole pool, spread over (predicted speedup,
encoder share, merging layers). A space of several methods (`submit --methods`) adds the method as
one more axis of both (two methods lie as far apart as the ends of an axis), so the picks spread
over the methods too, and "fewest" is per method: FastV always merges after one LLM layer,
DivPrune in none, and a space-wide minimum would pick nothing else. The picks come back in the
order picked, which a job keeps: the replay measured that order, and TPE's later suggestions
depend on it (the same schedules in another order lead it elsewhere).
Deterministic for a seed; nothing is measured to choose them.

On the `demo` grid (`benchmarks/search_efficiency.py`, docs/benchmarks.md,
benchmarks/results/search/demo_replay.md; iLLaVA only, the default space) 10 of the 14 schedules
faster than the unmerged model merge in a single encoder block and 13 remove >= 45% in the encoder;
with these 6 schedules after the seeds, TPE reaches 85% of the grid front's hypervolume in 16
trials instead of 24 (median over 50 seeds) and 88.2% at 30 trials instead of 86.3%. Spaces with
other methods were not replayed: the FLOPs model counts their compute as it counts iLLaVA's, and
no measurement says how well it ranks them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import optuna

from illava.schedule import Schedule

from .space import SearchSpace


def warm_schedules(
    space: SearchSpace,
    *,
    encoder_depth: int,
    llm_depth: int,
    predict: Callable[[Schedule], float],
    count: int = 6,
    seed: int = 0,
    pool: int = 512,
    after: Sequence[Schedule] = (),
    fewest: float = 2 / 3,
) -> list[Schedule]:
    """`count` distinct merged schedules of `space` to enqueue after the seeds `after` (see the
    module docstring): ``round(count * fewest)`` of them at the fewest merging layers their method
    allows, the rest spread over the whole space, none equal to a seed; in the order picked, which
    is the order a job runs them in (a design of `count`: a job with room for fewer asks for fewer).

    `predict` gives a schedule's FLOPs-predicted speedup (``illava.predicted_speedup`` on the
    workload's inputs). Raises ValueError for a negative `count`, a `pool` smaller than it, or
    `fewest` outside [0, 1].
    """
    if count < 0 or pool < count or not 0 <= fewest <= 1:
        raise ValueError(f"need count >= 0, pool >= count and 0 <= fewest <= 1; got {count}, {pool}, {fewest}")
    seen = {s.to_json(sort_keys=True) for s in after}
    candidates = [
        s for s in _draw(space, encoder_depth, llm_depth, pool, seed) if s.to_json(sort_keys=True) not in seen
    ]
    known = [s for s in after if not s.removes_nothing]
    speeds = [predict(s) for s in candidates + known]
    described = _describe(candidates + known, speeds, space)
    points, chosen = described[: len(candidates)], list(described[len(candidates) :])
    least: dict[str, int] = {}
    for s in candidates:
        least[s.method] = min(least.get(s.method, _layers(s)), _layers(s))
    single = [i for i, s in enumerate(candidates) if _layers(s) == least[s.method]]
    picks = _maximin(points[:, :-1], single, [c[:-1] for c in chosen], min(round(count * fewest), len(single)))
    chosen += [points[i] for i in picks]
    rest = [i for i in range(len(candidates)) if i not in picks]
    picks += _maximin(points, rest, chosen, count - len(picks))
    return [candidates[i] for i in picks]


def _maximin(points: np.ndarray, allowed: Sequence[int], chosen: Sequence[np.ndarray], count: int) -> list[int]:
    """`count` indices of `allowed`, each the point farthest from `chosen` and the earlier picks
    (the first, when nothing is chosen yet, the one nearest the centre)."""
    picks: list[int] = []
    taken = [np.asarray(c)[: points.shape[1]] for c in chosen]
    for _ in range(min(count, len(allowed))):
        options = [i for i in allowed if i not in picks]
        candidates = points[options]
        if taken:
            gaps = np.min(np.linalg.norm(candidates[:, None] - np.array(taken)[None], axis=2), axis=1)
        else:
            gaps = -np.linalg.norm(candidates - 0.5, axis=1)
        best = options[int(np.argmax(gaps))]
        picks.append(best)
        taken.append(points[best])
    return picks


def _layers(schedule: Schedule) -> int:
    return len(schedule.encoder_layers) + len(schedule.llm_layers)


def _draw(space: SearchSpace, encoder_depth: int, llm_depth: int, count: int, seed: int) -> list[Schedule]:
    """Up to `count` distinct merged schedules drawn at random through the space's own `suggest`."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    drawn: dict[str, Schedule] = {}
    for _ in range(count * 4):
        schedule = space.suggest(study.ask(), encoder_depth=encoder_depth, llm_depth=llm_depth)
        if not schedule.removes_nothing:
            drawn.setdefault(schedule.to_json(sort_keys=True), schedule)
        if len(drawn) == count:
            break
    return list(drawn.values())


def _describe(schedules: Sequence[Schedule], speeds: Sequence[float], space: SearchSpace) -> np.ndarray:
    """(predicted speedup by rank, encoder share, the method, merging layers), each in [0, 1] over
    `schedules`; the method is one column per method of the space, 1/sqrt(2) for a schedule's own
    (two methods lie 1 apart, as two ends of an axis do), and no column when the space has one."""
    if not schedules:
        return np.zeros((0, 3 + (len(space.methods) if len(space.methods) > 1 else 0)))
    speed = np.asarray(speeds, dtype=float)
    ranks = np.argsort(np.argsort(speed, kind="stable"), kind="stable") / max(len(schedules) - 1, 1)
    low, high = space.bounds(space.encoder_share)
    # A method acting on one side of the LLM only has its share fixed at 0 or 1, maybe outside the range.
    share = np.array([min(max((s.encoder_share - low) / (high - low), 0.0), 1.0) if high > low else 0.0
                      for s in schedules])  # fmt: skip
    methods = space.methods if len(space.methods) > 1 else ()
    method = np.array([[(s.method == m) / np.sqrt(2) for m in methods] for s in schedules]).reshape(len(schedules), -1)
    layers = np.array([_layers(s) for s in schedules], dtype=float)
    spread = layers.max() - layers.min()
    layers = (layers - layers.min()) / spread if spread else np.zeros_like(layers)
    return np.column_stack([ranks, share, method, layers])
