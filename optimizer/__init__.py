"""Search for the schedules worth deploying: the search space, the multi-objective Optuna study
(latency, memory, quality; hard limits as constraints), the Pareto front and target queries.

Imports `illava` (the schedule type) and Optuna; never Ray, the database, jobs or the profiler:
measurements arrive as the plain dict ``profiler.Measurement.to_dict()`` gives.

    study = make_study("sqlite:///illava.db", "illava-demo", seed=0)
    guide = GuidedSearch(space, encoder_depth=32, llm_depth=28, seed=0,
                         flops_speedup=lambda s: illava.predicted_speedup(config, s, grids, text_tokens))
    for schedule in seed_schedules(space, encoder_depth=32, llm_depth=28):  # a job: one before each ask
        enqueue_seed(study, schedule, space)
    trial, schedule = guide.ask(study)  # the seeds first, then exploration draws, then the sampler's
    ...  # measure it
    tell_result(study, trial, measurement.to_dict(), constraints=constraints)
"""

from .front import MEMORY_NOISE, Choice, NoMatchError, Point, best_for_target, pareto_front
from .guide import EXPLORE_ROLE, EXPLORE_TRIALS, PRUNED_ATTR, GuidedSearch
from .hypervolume import HypervolumeError, hypervolume
from .objectives import LATENCY_OBJECTIVES, Constraints, Metrics, Objectives, metrics_summary, retention_of
from .space import SearchSpace, SearchSpaceError, parse_range, schedule_params
from .speed import SpeedModel, merge_steps
from .study import (
    SAMPLERS,
    SEED_ATTR,
    SPEEDUP_ATTR,
    enqueue_seed,
    fail_waiting,
    make_study,
    points_from_study,
    seed_reductions,
    seed_role,
    seed_schedules,
    seed_study,
    tell_failure,
    tell_result,
)

__all__ = [
    "EXPLORE_ROLE",
    "EXPLORE_TRIALS",
    "LATENCY_OBJECTIVES",
    "MEMORY_NOISE",
    "seed_reductions",
    "SAMPLERS",
    "PRUNED_ATTR",
    "SEED_ATTR",
    "SPEEDUP_ATTR",
    "Choice",
    "HypervolumeError",
    "Constraints",
    "GuidedSearch",
    "Metrics",
    "NoMatchError",
    "Objectives",
    "Point",
    "SearchSpace",
    "SearchSpaceError",
    "SpeedModel",
    "best_for_target",
    "enqueue_seed",
    "fail_waiting",
    "hypervolume",
    "make_study",
    "merge_steps",
    "metrics_summary",
    "pareto_front",
    "parse_range",
    "points_from_study",
    "retention_of",
    "schedule_params",
    "seed_role",
    "seed_schedules",
    "seed_study",
    "tell_failure",
    "tell_result",
]
