"""How fast a schedule will run, before it runs: the FLOPs model plus what each merge costs itself,
calibrated on the schedules a job has measured.

The FLOPs model (`illava.predicted_speedup`) counts the compute a schedule saves. It does not see
the merge steps' own cost (scoring, selection, recycling, repacking: launches and host work that
do not shrink with the tokens), which decides whether a merge pays where the model is small or the
hardware launch-bound. `SpeedModel` adds it, one parameter for all merge steps:

    time / unmerged time = 1 / FLOPs-predicted speedup + per_merge * merge steps

`per_merge` (a merge step's cost as a share of the unmerged prefill) is fitted by least squares on
the merged schedules measured so far, through the origin: the unmerged model itself (no merge
steps, no saved FLOPs) is its anchor. A job measures its seeds first, so the first fit is on the
paper's defaults (three encoder and three LLM merges each, at three reductions); every measured
trial refines it. Before any merged schedule is measured, `per_merge` is 0: the FLOPs model.

On the `demo` grid (benchmarks/results/search/demo_replay.md) the fit on the three seeds alone
gives 0.095 of the unmerged prefill per merge step, and ranks the grid's 300 other schedules by
measured speedup with a rank correlation of 0.81 (the FLOPs model: 0.56); it predicts 48 of them
faster than the unmerged model, 12 of the 14 that are. The FLOPs model predicts all 300 faster.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from illava.methods.downsample import downsamples
from illava.schedule import Schedule

#: A segment size at which every merge step with a nonzero share removes at least one token, so
#: `merge_steps` counts the steps a schedule runs on any real input of a few hundred tokens or more.
REFERENCE_TOKENS = 1024


def merge_steps(schedule: Schedule) -> int:
    """How many times `schedule` merges: its plan's steps that remove tokens (encoder blocks, the
    step between encoder and LLM, decoder layers); 0 for the unmerged model and for ``downsample``,
    which resizes the inputs and runs the model unmerged."""
    if schedule.removes_nothing or downsamples(schedule):
        return 0
    return sum(step.removed > 0 for step in schedule.plan(REFERENCE_TOKENS).steps)


@dataclass(frozen=True)
class SpeedModel:
    """Predicted speedup over the unmerged model (see the module docstring).

    `flops_speedup` is the FLOPs model on the job's workload (``illava.predicted_speedup`` on its
    inputs); `per_merge` the fitted cost of one merge step; `fitted_on` how many merged
    measurements the fit saw (0: the FLOPs model alone)."""

    flops_speedup: Callable[[Schedule], float]
    per_merge: float = 0.0
    fitted_on: int = 0

    @classmethod
    def fit(cls, flops_speedup: Callable[[Schedule], float], measured: Iterable[tuple[Schedule, float]]) -> SpeedModel:
        """Least squares on (schedule, measured speedup) pairs; the unmerged model and speedups that
        are not positive finite numbers are skipped. `per_merge` is never negative: a merge that
        costs nothing is the FLOPs model, and noise must not make merges look like a gain."""
        steps, excess = [], []
        for schedule, speedup in measured:
            count = merge_steps(schedule)
            if count == 0 or speedup is None or not math.isfinite(speedup) or speedup <= 0:
                continue
            steps.append(count)
            excess.append(1.0 / speedup - 1.0 / flops_speedup(schedule))  # time the FLOPs model misses
        if not steps:
            return cls(flops_speedup)
        per_merge = sum(n * e for n, e in zip(steps, excess)) / sum(n * n for n in steps)
        return cls(flops_speedup, max(per_merge, 0.0), len(steps))

    def speedup(self, schedule: Schedule) -> float:
        """Predicted speedup of `schedule` over the unmerged model (1.0 for the unmerged model)."""
        if schedule.removes_nothing:
            return 1.0
        return 1.0 / (1.0 / self.flops_speedup(schedule) + self.per_merge * merge_steps(schedule))
