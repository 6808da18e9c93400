"""The tuning-job driver: Optuna ask/tell over Ray worker actors, every trial stored in SQL.

Crash safety, in the order things are written: a trial's result goes to the database *before*
it is told to Optuna, so a driver killed at any moment leaves at worst an Optuna trial RUNNING
whose result is already in the database. `run` on a job that was interrupted repairs exactly
that (tells Optuna the stored result), marks trials that were still in flight as failed
("interrupted"), and carries on until the job's trial budget is used; no finished trial is
run or counted twice.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import optuna

from db import Database, queries
from illava import Schedule
from optimizer import (
    Constraints,
    Objectives,
    Point,
    SearchSpace,
    make_study,
    metrics_summary,
    pareto_front,
    seed_reductions,
    seed_study,
    tell_failure,
    tell_result,
)

from .worker import FAULTS_ENV, TrialWorker, parse_faults

INTERRUPTED = "interrupted: the driver stopped while this trial was in flight"
CANCEL_POLL_S = 2.0  # longest wait for a trial before looking at the cancel flag again
CHECK_IN_S = 1.0  # how often the driver reads the cancel flag and writes its heartbeat


@dataclass(frozen=True)
class Progress:
    done: int
    total: int
    failed: int
    front_size: int
    elapsed_s: float
    eta_s: float | None


def _ray_init(address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)


def _plan_workers(requested: int) -> tuple[int, str, dict[str, float]]:
    """(how many actors, device, actor resources): one per GPU when the cluster has GPUs,
    otherwise `requested` CPU workers sharing the CPUs."""
    import ray

    gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus:
        return min(requested, gpus) if requested else gpus, "cuda", {"num_gpus": 1}
    cpus = int(ray.cluster_resources().get("CPU", 1))
    count = max(1, requested or 1)
    return count, "cpu", {"num_cpus": max(1, cpus // count)}


class _Pool:
    """Worker actors; a dead one is replaced by a fresh actor (which loads the model again)."""

    def __init__(self, count: int, resources: dict[str, float], args: tuple, kwargs: dict):
        import ray

        threads = int(resources.get("num_cpus", 1))
        self.remote_class = ray.remote(max_concurrency=1, **resources)(TrialWorker).options(
            runtime_env={"env_vars": {"OMP_NUM_THREADS": str(threads)}}
        )
        self.args, self.kwargs = args, kwargs
        self.idle = [self._spawn() for _ in range(count)]

    def _spawn(self):
        return self.remote_class.remote(*self.args, **self.kwargs)

    def replace(self, dead) -> None:
        import ray

        ray.kill(dead, no_restart=True)
        self.idle.append(self._spawn())

    def shutdown(self) -> None:
        import ray

        for actor in self.idle:
            ray.kill(actor, no_restart=True)


def _study_setup(job) -> tuple[SearchSpace, Constraints, Objectives]:
    return SearchSpace.from_dict(job.search_space), Constraints.from_dict(job.constraints), Objectives()


def point(row) -> Point:
    """A stored trial or published schedule as the optimizer's front sees it (quality = accuracy,
    or first-token fidelity on unlabelled workloads)."""
    quality = row.accuracy if row.accuracy is not None else row.fidelity
    feasible = getattr(row, "feasible", True)
    return Point(row.latency_ms, row.memory_mib, quality, row.retention, feasible is not False,
                 getattr(row, "state", "complete"), ref=row)  # fmt: skip


def _repair(database: Database, job_id: str, study: optuna.Study, objectives: Objectives, constraints: Constraints):
    """After a driver death: Optuna trials still RUNNING either have a stored result (tell it)
    or were in flight (fail them in both places). No database session is held while Optuna
    writes: on SQLite an open session's read lock would block Optuna's commit."""
    running = [t.number for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.RUNNING]
    if not running:
        return
    with database.session() as s:
        stored = {
            t.number: (t.state, t.metrics, t.schedule) for t in queries.list_trials(s, queries.get_job(s, job_id))
        }
    interrupted = []
    for number in running:
        state, metrics, schedule = stored.get(number, (None, None, None))
        if state == "complete":
            tell_result(study, number, metrics, constraints=constraints, objectives=objectives)
        else:
            tell_failure(study, number)
            if schedule is not None:
                interrupted.append((number, schedule))
    with database.session() as s:
        job = queries.get_job(s, job_id)
        for number, schedule in interrupted:
            queries.record_trial(s, job, number, state="failed", schedule=schedule, error=INTERRUPTED)


def run(
    database: Database,
    job_id: str,
    *,
    ray_address: str | None = None,
    on_progress: Callable[[Progress], None] | None = None,
) -> str:
    """Run (or continue) a job to its end; returns its final status."""
    import ray

    with database.session() as s:
        job = queries.get_job(s, job_id)
        job_id = job.id
        if job.status in ("completed", "cancelled"):
            return job.status
        space, constraints, objectives = _study_setup(job)
        backbone, workload, n_trials = job.backbone.name, job.workload.spec, job.n_trials
        dtype, attention = queries.runtime_of(job.hardware.profile)
        sampler, seed, n_workers, study_name = job.sampler, job.seed, job.n_workers, job.study_name
        queries.set_job_status(s, job, "running")
    started = time.monotonic()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # progress is ours to report, not Optuna's INFO lines
    study = make_study(database.optuna_storage_url, study_name, sampler=sampler, seed=seed, objectives=objectives)
    _repair(database, job_id, study, objectives, constraints)

    _ray_init(ray_address)
    count, device, resources = _plan_workers(n_workers)
    pool = _Pool(count, resources, (backbone, workload),
                 dict(device=device, dtype=dtype, attention=attention, repeats=3, warmup=1,
                      faults=parse_faults(os.environ.get(FAULTS_ENV))))  # fmt: skip
    in_flight: dict[Any, tuple[optuna.Trial, Any, Schedule]] = {}  # Ray ref -> (trial, actor, schedule)
    cancel, stop_reason = False, "cancelled"
    try:
        encoder_depth, llm_depth = ray.get(pool.idle[0].depths.remote())
        seed_study(study, space, encoder_depth=encoder_depth, llm_depth=llm_depth, reductions=seed_reductions(space))
        with database.session() as s:
            finished = sum(t.state != "running" for t in queries.list_trials(s, queries.get_job(s, job_id)))

        def dispatch() -> None:
            """Give every idle worker a new trial while the budget allows."""
            while pool.idle and finished + len(in_flight) < n_trials:
                trial = study.ask()
                schedule = space.suggest(trial, encoder_depth=encoder_depth, llm_depth=llm_depth)
                with database.session() as s:
                    queries.record_trial(s, queries.get_job(s, job_id), trial.number, state="running",
                                         schedule=schedule.to_dict())  # fmt: skip
                actor = pool.idle.pop()
                in_flight[actor.evaluate.remote(trial.number, schedule.to_dict())] = (trial, actor, schedule)

        next_check_in = 0.0
        while True:
            if time.monotonic() >= next_check_in:  # the cancel flag and the heartbeat, about once a second
                cancel = _check_in(database, job_id)
                next_check_in = time.monotonic() + CHECK_IN_S
                if cancel:
                    break
            dispatch()
            if not in_flight:
                break
            # Wake up now and then even when no trial ends, so a cancel request is seen promptly.
            ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=CANCEL_POLL_S)
            if not ready:
                continue
            trial, actor, schedule = in_flight.pop(ready[0])
            outcome = _collect(ready[0], actor, pool)
            summary = _record(database, job_id, trial, schedule, outcome, constraints)  # database first
            finished += 1
            dispatch()  # the freed worker starts its next trial before Optuna's bookkeeping below
            if summary is None:
                tell_failure(study, trial)
            else:
                tell_result(study, trial, summary, constraints=constraints, objectives=objectives)
            if on_progress:
                on_progress(progress(database, job_id, started=started))
    except BaseException as error:
        stop_reason = f"driver stopped: {_describe(error)}"
        with database.session() as s:
            queries.set_job_status(s, queries.get_job(s, job_id), "failed", error=stop_reason)
        raise
    finally:
        for trial, actor, schedule in in_flight.values():  # cancelled or failed driver: stop what runs
            ray.kill(actor, no_restart=True)
            tell_failure(study, trial)
            with database.session() as s:
                queries.record_trial(s, queries.get_job(s, job_id), trial.number, state="failed",
                                     schedule=schedule.to_dict(), error=stop_reason)  # fmt: skip
        pool.shutdown()
    return _close(database, job_id, cancelled=cancel)


def _check_in(database: Database, job_id: str) -> bool:
    """Heartbeat; returns whether a cancel was requested."""
    with database.session() as s:
        job = queries.get_job(s, job_id)
        queries.heartbeat(s, job)
        return job.cancel_requested


def _collect(ref, actor, pool: _Pool) -> dict[str, Any] | str:
    """A finished task's measurement, or the error that ended it; its actor goes back to the
    pool (a dead one is replaced by a fresh actor)."""
    import ray

    try:
        metrics = ray.get(ref)
    except ray.exceptions.ActorDiedError as error:  # the worker process died (OOM, crash)
        pool.replace(actor)
        return f"worker died: {error}".splitlines()[0]
    except Exception as error:  # noqa: BLE001 - any error inside a trial fails that trial only
        pool.idle.append(actor)
        return _describe(error)
    pool.idle.append(actor)
    return metrics


def _record(database: Database, job_id: str, trial, schedule: Schedule, outcome, constraints: Constraints):
    """Store a finished trial; returns its metrics summary, or None for a failed trial."""
    with database.session() as s:
        job = queries.get_job(s, job_id)
        if isinstance(outcome, str):
            queries.record_trial(s, job, trial.number, state="failed", schedule=schedule.to_dict(), error=outcome)
            return None
        summary = metrics_summary(outcome)
        queries.record_trial(
            s, job, trial.number, state="complete", schedule=schedule.to_dict(), metrics=outcome,
            latency_ms=summary.latency_ms, memory_mib=summary.memory_mib, accuracy=summary.accuracy,
            retention=summary.retention, fidelity=summary.fidelity, feasible=constraints.feasible(summary),
        )  # fmt: skip
        return summary


def _describe(error: BaseException) -> str:
    cause = getattr(error, "cause", None) or error
    return f"{type(cause).__name__}: {cause}".splitlines()[0][:2000]


def _close(database: Database, job_id: str, *, cancelled: bool) -> str:
    with database.session() as s:
        job = queries.get_job(s, job_id)
        if cancelled:
            queries.set_job_status(s, job, "cancelled")
            return "cancelled"
        front = pareto_front(point(t) for t in queries.list_trials(s, job, state="complete"))
        queries.publish_front(s, job, [p.ref for p in front])
        queries.set_job_status(s, job, "completed")
        return "completed"


def progress(database: Database, job_id: str, *, started: float | None = None) -> Progress:
    with database.session() as s:
        job = queries.get_job(s, job_id)
        trials = queries.list_trials(s, job)
        done = [t for t in trials if t.state != "running"]
        failed = sum(t.state == "failed" for t in trials)
        front = pareto_front(point(t) for t in trials if t.state == "complete")
        begun = job.started_at.timestamp() if job.started_at else time.time()
    elapsed = time.monotonic() - started if started is not None else time.time() - begun
    eta = elapsed / len(done) * (job.n_trials - len(done)) if done else None
    return Progress(len(done), job.n_trials, failed, len(front), elapsed, eta)
