"""The tuning-job driver: Optuna ask/tell over Ray worker actors, every trial stored in SQL.

One driver owns a job at a time (`jobs.lease`): it takes the job's lease first, keeps it renewed,
and opens every write with a renewal, so a second driver is refused and a driver that lost its
job writes nothing more. The trial budget is checked by the database when a trial starts
(`db.queries.claim_trial`). Optuna's writes go through Optuna's own storage, which knows no
lease, so the driver renews the lease right before it enqueues or asks anything (`_reconcile`),
and an asked trial whose claim fails is failed in Optuna at once (`_abandon`): a driver that lost
its job asks nothing more, and one that lost it in the moment between its renewal and its ask
leaves a FAIL trial that the job's driver records as not run. Before each ask the driver also
settles any Optuna trial the database does not match, so the two hold the same trials in the
same states whatever happened to the drivers before it.

A job starts from its seed schedules (the unmerged model, the paper's defaults), enqueued one at a
time right before their ask, so they count toward the budget and no trial is ever left WAITING in
Optuna; each carries its role in Optuna (`optimizer.SEED_ATTR`). Every later trial is asked through
`optimizer.GuidedSearch`: random draws among the schedules a speed model (the FLOPs model on the
workload's first batch, which a worker reports, plus a per-merge cost fitted on the trials measured
so far) predicts faster than the unmerged model, role ``"explore"``, up to `EXPLORE_TRIALS` trials
in all, then the job's sampler, whose suggestions predicted slower are told PRUNED in Optuna without
being measured (no row, no budget). A resumed job counts what its study already holds, so no seed
runs twice and the exploration goes on where it stopped.

Crash safety, in the order things are written: a trial's row goes to the database *before* its
result is told to Optuna, so a driver killed at any moment leaves at worst an Optuna trial RUNNING
whose result (or start) is already in the database. `run` on a job that was interrupted repairs
exactly that (tells Optuna the stored result), marks trials that were still in flight as failed
("interrupted") in both places, and carries on until the job's trial budget is used; no finished
trial is run or counted twice. SIGTERM, SIGHUP and Ctrl-C stop the driver: its trials in flight
are failed, no trial is left WAITING in Optuna, the job is marked failed with the reason, and the
lease is released (`resume` continues it).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import optuna

import illava
from db import Database, LeaseLost, queries
from illava import Schedule
from optimizer import (
    Constraints,
    GuidedSearch,
    Objectives,
    Point,
    SearchSpace,
    enqueue_seed,
    make_study,
    metrics_summary,
    pareto_front,
    seed_reductions,
    seed_schedules,
    tell_failure,
    tell_result,
)

from . import cluster
from .lease import LEASE_S, LeaseKeeper, driver_id, release, take
from .worker import FAULTS_ENV, TrialWorker, parse_faults

INTERRUPTED = "interrupted: the driver stopped while this trial was in flight"
ASKED_BY_STALE = "not run: asked by a driver that no longer held the job"
CANCEL_POLL_S = 2.0  # longest wait for a trial before looking at the cancel flag and the lease again
#: Each trial's paired prefill rounds (unmerged, then the schedule): `MEASURE_REPEATS` timed after
#: `MEASURE_WARMUP` untimed (`profiler.Profiler`; benchmarks/search_efficiency.py measures its table so).
MEASURE_REPEATS, MEASURE_WARMUP = 3, 1


class DriverStopped(KeyboardInterrupt):
    """A signal (SIGTERM, SIGHUP) asked the driver to stop; like Ctrl-C, nothing catches it by accident."""


@dataclass(frozen=True)
class Progress:
    done: int
    total: int
    failed: int
    front_size: int
    elapsed_s: float
    eta_s: float | None


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
    return SearchSpace.from_dict(job.search_space), Constraints.from_dict(job.constraints), Objectives(job.objective)


def point(row) -> Point:
    """A stored trial or published schedule as the optimizer's front sees it (quality = accuracy,
    or first-token fidelity on unlabelled workloads)."""
    quality = row.accuracy if row.accuracy is not None else row.fidelity
    feasible = getattr(row, "feasible", True)
    return Point(row.latency_ms, row.memory_mib, quality, row.retention, feasible is not False,
                 getattr(row, "state", "complete"), speedup=getattr(row, "speedup", None), ref=row)  # fmt: skip


def run(
    database: Database,
    job_id: str,
    *,
    ray_address: str | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    force: bool = False,
    lease_s: float = LEASE_S,
    ray_timeout_s: float | None = None,
    owner: str | None = None,
    handed_from: str | None = None,
) -> str:
    """Run (or continue) a job to its end; returns its final status: "completed", "cancelled", or
    "failed" when no trial could be measured (the first error is the job's error).

    `ray_timeout_s`: how long joining a Ray cluster may take (`cluster.connect_timeout`). `owner`
    and `handed_from` are for a detached driver (`jobs.start_background`): its id, chosen by the
    process that started it, and that process's, whose lease it takes over (`jobs.lease.take`).

    Raises `db.LeaseHeld` (nothing done) when another driver owns the job (`force` takes over a
    lease that has expired, see `jobs.lease`); `db.LeaseLost` when another driver took the job over
    mid-run (this one stops and writes nothing more); `cluster.ClusterError` when Ray cannot be
    reached and `DriverStopped` / `KeyboardInterrupt` on a signal or Ctrl-C (both after marking the
    job failed with the reason)."""
    cluster.connect_timeout(ray_timeout_s)  # a bad value is refused before the job is touched
    owner = owner or driver_id()
    job_id = take(database, job_id, owner, force=force, ttl_s=lease_s, handed_from=handed_from)
    keeper = LeaseKeeper(database, job_id, owner, ttl_s=lease_s).start()
    try:
        with _StopSignals() as signals:
            driver = _Driver(database, job_id, owner, lease_s, keeper, signals)
            return driver.run(ray_address, on_progress, ray_timeout_s=ray_timeout_s)
    finally:
        keeper.stop()
        _quietly("releasing the lease", lambda: release(database, job_id, owner))


def _quietly(doing: str, action: Callable[[], Any]) -> None:
    """Clean-up on the way out: whatever fails now (the database, Optuna's storage) is reported,
    never hides the first error."""
    try:
        action()
    except Exception as error:  # noqa: BLE001 - reported, and the error that stopped the driver goes on
        print(f"illava-tune: {doing} failed: {_describe(error)}", file=sys.stderr)


class _StopSignals:
    """SIGTERM, SIGHUP and SIGINT raise `DriverStopped` in the driver's thread (the main one;
    elsewhere the process's own handlers stay). Inside `deferred()` a signal waits for the block's
    end, so no trial is ever asked in Optuna without its row in the database.

    Ray swallows an exception a signal handler raises while the driver blocks in ``ray.wait`` or
    ``ray.get`` and raises a bare ``KeyboardInterrupt`` instead: `stopped` keeps the reason, and
    `reason_of` gives it back for such an interrupt."""

    WANTED = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)

    def __init__(self) -> None:
        self.active = threading.current_thread() is threading.main_thread()
        self.pending: str | None = None
        self.stopped: str | None = None  # the reason of the last signal handled
        self.depth = 0
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> _StopSignals:
        if self.active:
            self.previous = {number: signal.getsignal(number) for number in self.WANTED}
            self.install()
        return self

    def __exit__(self, *_exc: object) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)

    def install(self) -> None:
        """(Again, after a library such as Ray's init installed its own handlers.)"""
        if self.active:
            for number in self.WANTED:
                signal.signal(number, self._handle)

    def _handle(self, signum: int, _frame: Any) -> None:
        reason = self.stopped = f"stopped by {signal.Signals(signum).name}"
        if self.depth:
            self.pending = reason
            return
        raise DriverStopped(reason)

    def reason_of(self, error: BaseException) -> DriverStopped | None:
        """The `DriverStopped` a bare ``KeyboardInterrupt`` stands for (one Ray raised for a signal
        this handled); None for anything else."""
        if type(error) is KeyboardInterrupt and self.stopped is not None:
            return DriverStopped(self.stopped)
        return None

    @contextmanager
    def deferred(self) -> Iterator[None]:
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
            if not self.depth and self.pending is not None:
                reason, self.pending = self.pending, None
                raise DriverStopped(reason)


class _Driver:
    """One driver's run of one job: the lease-fenced writes, the study, the trials in flight."""

    def __init__(self, database: Database, job_id: str, owner: str, ttl_s: float, keeper: LeaseKeeper,
                 signals: _StopSignals) -> None:  # fmt: skip
        self.database, self.job_id, self.owner, self.ttl_s, self.keeper = database, job_id, owner, ttl_s, keeper
        self.signals = signals
        self.study: optuna.Study | None = None
        self.in_flight: dict[Any, tuple[optuna.Trial, Any, Schedule]] = {}  # Ray ref -> (trial, actor, schedule)
        self.telling: int | None = None  # the trial whose result is stored and is being told to Optuna
        self.queue: list[Schedule] = []  # the seeds to enqueue, in order
        self.guide: GuidedSearch | None = None  # asks every trial; None: no FLOPs inputs, the sampler alone
        self.stored = 0  # the job's trial rows: what the budget counts

    @contextmanager
    def writing(self) -> Iterator[tuple[Any, Any]]:
        """(session, job row) in a transaction that renews the lease first: `LeaseLost`, and nothing
        written, once this driver no longer holds the job."""
        with self.database.session() as s:
            yield s, queries.renew_lease(s, self.job_id, self.owner, ttl_s=self.ttl_s)

    def run(self, ray_address: str | None, on_progress: Callable[[Progress], None] | None, *,
            ray_timeout_s: float | None = None) -> str:  # fmt: skip
        import ray

        from illava.backbones import backbone_config

        with self.writing() as (s, job):
            if job.status in ("completed", "cancelled"):
                return job.status
            if job.cancel_requested:  # cancelled before this driver got going: nothing to start
                queries.set_job_status(s, job, "cancelled")
                return "cancelled"
            self.space, self.constraints, self.objectives = _study_setup(job)
            backbone, workload, self.n_trials = job.backbone.name, job.workload.spec, job.n_trials
            dtype, attention = queries.runtime_of(job.hardware.profile)
            sampler, seed, n_workers, study_name = job.sampler, job.seed, job.n_workers, job.study_name
            queries.set_job_status(s, job, "running")
        started = time.monotonic()
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # progress is ours to report, not Optuna's INFO lines
        ray_started, pool, cancel, stop_reason, lost = False, None, False, None, False
        try:  # from here on, whatever stops the driver marks the job
            config = backbone_config(backbone)
            self.encoder_depth, self.llm_depth = illava.depths(config)
            with self.database.schema_lock():  # Optuna creates its tables on first use: one process at a time
                self.study = make_study(self.database.optuna_storage_url, study_name, sampler=sampler, seed=seed,
                                        objectives=self.objectives)  # fmt: skip
            self._reconcile()  # what a driver before this one left behind
            ray_started = cluster.connect(ray_address, timeout_s=ray_timeout_s)
            self.signals.install()
            count, device, resources = _plan_workers(n_workers)
            pool = _Pool(count, resources, (backbone, workload),
                         dict(device=device, dtype=dtype, attention=attention, repeats=MEASURE_REPEATS,
                              warmup=MEASURE_WARMUP, faults=parse_faults(os.environ.get(FAULTS_ENV))))  # fmt: skip
            seeds = seed_schedules(self.space, encoder_depth=self.encoder_depth, llm_depth=self.llm_depth,
                                   reductions=seed_reductions(self.space))  # fmt: skip
            self.queue = seeds[: self.n_trials]
            self.guide = self._guided_search(pool, config, seed)
            while True:
                self.keeper.check()
                if self.keeper.cancel_requested:
                    cancel = True
                    break
                self._dispatch(pool)
                if not self.in_flight:
                    break
                # Wake up now and then even when no trial ends, so a cancel request is seen promptly.
                ready, _ = ray.wait(list(self.in_flight), num_returns=1, timeout=CANCEL_POLL_S)
                if not ready:
                    continue
                trial, actor, schedule = self.in_flight.pop(ready[0])
                outcome = _collect(ready[0], actor, pool)
                summary = self._record(trial, schedule, outcome)  # database first
                self.telling = trial.number  # stored, told below: `_reconcile` leaves it to this loop
                if summary is None:
                    tell_failure(self.study, trial)
                else:
                    tell_result(self.study, trial, summary, constraints=self.constraints, objectives=self.objectives)
                self.telling = None
                if on_progress:
                    on_progress(progress(self.database, self.job_id, started=started))
        except LeaseLost:
            lost = True  # the job is someone else's now: write nothing more
            raise
        except BaseException as error:
            stopped = self.signals.reason_of(error)
            stop_reason = f"driver stopped: {_describe(stopped or error)}"
            if stopped is not None:
                raise stopped from error
            raise
        finally:
            self._stop_in_flight(None if lost else stop_reason or "cancelled")
            if pool is not None:
                pool.shutdown()
            cluster.disconnect(ray_started)
            if stop_reason is not None:  # the lease still holds: leave nothing waiting, then say why it stopped
                if self.study is not None:
                    _quietly("retiring the waiting trials", self._retire_waiting)
                _quietly("marking the job failed", lambda: self._fail(stop_reason))
        return self._close(cancelled=cancel)

    def _schedule_of(self, params: dict[str, Any]) -> Schedule | None:
        """The schedule a trial with these parameters stands for (None: its parameters are incomplete)."""
        try:
            with warnings.catch_warnings():  # the unmerged seed's reduction 0 lies outside the searched range
                warnings.simplefilter("ignore", UserWarning)
                return self.space.suggest(optuna.trial.FixedTrial(params), encoder_depth=self.encoder_depth,
                                          llm_depth=self.llm_depth)  # fmt: skip
        except ValueError:
            return None

    def _reconcile(self) -> None:
        """Renew the lease (`LeaseLost`, nothing touched, once the job is another driver's), count the
        job's trials (`stored`, what the budget counts) and settle every trial of the study the
        database does not match, except this driver's own (in flight, or being told):

        - RUNNING with a stored result: told it (its driver died between the two writes);
        - RUNNING without one: failed in both places, the database first ("interrupted": its driver
          died, or lost the job, while it was asked or in flight);
        - FAIL without a row: a driver that lost the job asked it and could not claim it; its row
          says it never ran.

        WAITING trials stay: the next ask takes them. No database session is held while Optuna
        writes: on SQLite an open session's write lock would block Optuna's commit."""
        with self.writing() as (s, job):
            stored = {t.number: t for t in queries.list_trials(s, job)}
        self.stored = len(stored)
        ours = {trial.number for trial, _, _ in self.in_flight.values()} | {self.telling}
        running, failed = optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.FAIL
        for frozen in self.study.get_trials(deepcopy=False):
            row = stored.get(frozen.number)
            if frozen.number in ours or frozen.state not in (running, failed):
                continue
            if frozen.state == running and row is not None and row.state == "complete":
                tell_result(self.study, frozen.number, row.metrics, constraints=self.constraints,
                            objectives=self.objectives)  # fmt: skip
                continue
            if row is None or row.state == "running":
                schedule, error = self._interrupted_schedule(frozen) if row is None else (row.schedule, INTERRUPTED)
                if frozen.state == failed and row is None:
                    error = ASKED_BY_STALE
                with self.writing() as (s, job):
                    queries.record_trial(s, job, frozen.number, state="failed", schedule=schedule, error=error)
                self.stored += int(row is None)
            if frozen.state == running:
                self._tell_failed(frozen.number)

    def _tell_failed(self, trial: optuna.Trial | int) -> None:
        """FAIL in Optuna. A trial another driver finished meanwhile (a stale driver failing what it
        asked, while this one settles it) stays as that driver left it."""
        try:
            tell_failure(self.study, trial)
        except ValueError:  # Optuna's "Cannot tell a FAIL trial": finished between the look and the tell
            number = trial if isinstance(trial, int) else trial.number
            if not any(t.number == number and t.state.is_finished() for t in self.study.get_trials(deepcopy=False)):
                raise

    def _abandon(self, trial: optuna.Trial, error: BaseException) -> None:
        """An asked trial that will not run (its claim failed, or the ask was cut short): its row is
        failed while this driver still holds the job (else the job's driver records it, `_reconcile`),
        then it is failed in Optuna, so nothing is left RUNNING there without a row."""
        if not isinstance(error, LeaseLost):

            def record() -> None:
                frozen = next(t for t in self.study.get_trials(deepcopy=False) if t.number == trial.number)
                schedule = self._interrupted_schedule(frozen)[0]
                with self.writing() as (s, job):
                    queries.record_trial(s, job, trial.number, state="failed", schedule=schedule,
                                         error=f"not run: {_describe(error)}")  # fmt: skip

            _quietly(f"recording trial {trial.number}", record)
        _quietly(f"failing trial {trial.number} in Optuna", lambda: self._tell_failed(trial))

    def _interrupted_schedule(self, frozen) -> tuple[dict[str, Any], str]:
        """The schedule of a trial a killed driver asked but never stored (from its drawn or enqueued
        parameters), and its error; when the draw itself was cut short, the parameters drawn so far."""
        params = {**frozen.system_attrs.get("fixed_params", {}), **frozen.params}
        schedule = self._schedule_of(params)
        if schedule is None:
            return {"params": params}, "interrupted before its schedule was drawn"
        return schedule.to_dict(), INTERRUPTED

    def _guided_search(self, pool: _Pool, config: Any, seed: int) -> GuidedSearch | None:
        """The job's `GuidedSearch`, its FLOPs model fed the batch the workers time, read off by one
        of them once its model is loaded; None (the sampler alone) when that failed."""
        inputs = self._flop_inputs(pool)
        if inputs is None:
            return None
        grids, text_tokens = inputs
        return GuidedSearch(
            self.space, encoder_depth=self.encoder_depth, llm_depth=self.llm_depth, seed=seed,
            flops_speedup=lambda schedule: illava.predicted_speedup(config, schedule, grids, text_tokens),
        )  # fmt: skip

    def _flop_inputs(self, pool: _Pool) -> tuple[list, int] | None:
        """(grids, text tokens) of the workload's first batch from a worker (`TrialWorker.flop_inputs`),
        waiting while it loads its model; None, and the job goes on without a guided search, when it
        failed or the job was cancelled meanwhile. A worker that died is replaced."""
        import ray

        actor = pool.idle[-1]
        ref = actor.flop_inputs.remote()
        while not ray.wait([ref], timeout=CANCEL_POLL_S)[0]:
            self.keeper.check()
            if self.keeper.cancel_requested:
                return None
        try:
            return ray.get(ref)
        except Exception as error:  # noqa: BLE001 - the guide is an optimisation; the trials report errors
            if isinstance(error, ray.exceptions.ActorDiedError):
                pool.idle.remove(actor)
                pool.replace(actor)
            print(f"illava-tune: job {self.job_id[:8]}: no guided search ({_describe(error)})", file=sys.stderr)
            return None

    def _next_enqueued(self) -> None:
        """Enqueue the next seed the study has not seen, unless a trial is already waiting (the
        next ask takes that one)."""
        if not self.queue:  # everything queued is in the study: nothing to look up
            return
        if any(t.state == optuna.trial.TrialState.WAITING for t in self.study.get_trials(deepcopy=False)):
            return
        while self.queue:
            if enqueue_seed(self.study, self.queue.pop(0), self.space):
                return

    def _dispatch(self, pool: _Pool) -> None:
        """Give every idle worker a new trial while the budget allows."""
        while pool.idle:
            with self.signals.deferred():  # asked in Optuna, stored in the database and running, or neither
                if not self._start_trial(pool):
                    return

    def _start_trial(self, pool: _Pool) -> bool:
        """Ask the next trial (a seed first, then through the guide) and start it on an idle worker;
        False when the budget is spent. The lease is renewed before anything is written to Optuna, and
        an asked trial that cannot be claimed (the lease lost since, the database failing) is
        abandoned. The guide may prune suggestions on the way: finished in Optuna, never stored."""
        self._reconcile()
        if self.stored >= self.n_trials:
            return False
        self._next_enqueued()
        if self.guide is not None:
            trial, schedule = self.guide.ask(self.study)  # a failure leaves its trial RUNNING: `_reconcile`
        else:
            trial, schedule = self.study.ask(), None
        try:
            if schedule is None:
                schedule = self.space.suggest(trial, encoder_depth=self.encoder_depth, llm_depth=self.llm_depth)
            with self.database.session() as s:
                queries.claim_trial(s, self.job_id, self.owner, trial.number, schedule.to_dict(), ttl_s=self.ttl_s)
        except BaseException as error:
            self._abandon(trial, error)
            raise
        self.stored += 1
        actor = pool.idle.pop()
        self.in_flight[actor.evaluate.remote(trial.number, schedule.to_dict())] = (trial, actor, schedule)
        return True

    def _stop_in_flight(self, reason: str | None) -> None:
        """Kill the workers of the trials still running; with a `reason`, fail those trials (the
        database first). Without one the lease is lost: the new driver repairs them."""
        import ray

        for trial, actor, schedule in self.in_flight.values():
            ray.kill(actor, no_restart=True)
            if reason is None:
                continue

            def fail(trial=trial, schedule=schedule) -> None:
                with self.writing() as (s, job):
                    queries.record_trial(s, job, trial.number, state="failed", schedule=schedule.to_dict(),
                                         error=reason)  # fmt: skip
                tell_failure(self.study, trial)

            _quietly(f"failing trial {trial.number}", fail)
        self.in_flight.clear()

    def _fail(self, reason: str) -> None:
        with self.writing() as (s, job):
            queries.set_job_status(s, job, "failed", error=reason)

    def _record(self, trial, schedule: Schedule, outcome) -> Any:
        """Store a finished trial; returns its metrics summary, or None for a failed trial."""
        with self.writing() as (s, job):
            if isinstance(outcome, str):
                queries.record_trial(s, job, trial.number, state="failed", schedule=schedule.to_dict(), error=outcome)
                return None
            summary = metrics_summary(outcome)
            try:
                self.objectives.values(summary)
            except ValueError as error:  # measured, but not on what the job ranks by: a failed trial
                queries.record_trial(s, job, trial.number, state="failed", schedule=schedule.to_dict(),
                                     metrics=outcome, error=f"cannot be ranked: {error}")  # fmt: skip
                return None
            queries.record_trial(
                s, job, trial.number, state="complete", schedule=schedule.to_dict(), metrics=outcome,
                latency_ms=summary.latency_ms, memory_mib=summary.memory_mib, accuracy=summary.accuracy,
                retention=summary.retention, fidelity=summary.fidelity, speedup=summary.speedup,
                feasible=self.constraints.feasible(summary),
            )  # fmt: skip
            return summary

    def _retire_waiting(self) -> None:
        """No trial is left WAITING in Optuna once the job ends, however it ends (one is there when a
        driver stopped between enqueueing a seed or an exploration draw and asking it): each is asked and
        failed, the database first, under a renewed lease like any other ask."""
        waiting = optuna.trial.TrialState.WAITING
        while any(t.state == waiting for t in self.study.get_trials(deepcopy=False)):
            self._reconcile()
            trial = self.study.ask()
            try:
                schedule = self.space.suggest(trial, encoder_depth=self.encoder_depth, llm_depth=self.llm_depth)
                with self.writing() as (s, job):
                    queries.record_trial(s, job, trial.number, state="failed", schedule=schedule.to_dict(),
                                         error="not run: the job ended before this trial started")  # fmt: skip
            except BaseException as error:
                self._abandon(trial, error)
                raise
            tell_failure(self.study, trial)

    def _close(self, *, cancelled: bool) -> str:
        self._reconcile()  # a trial a stale driver asked meanwhile is on record before the job closes
        self._retire_waiting()
        with self.writing() as (s, job):
            if cancelled:
                queries.set_job_status(s, job, "cancelled")
                return "cancelled"
            trials = queries.list_trials(s, job)
            complete = [t for t in trials if t.state == "complete"]
            if not complete:
                queries.set_job_status(s, job, "failed", error=_no_trial_ran(trials))
                return "failed"
            front = pareto_front((point(t) for t in complete), objective=job.objective)
            queries.publish_front(s, job, [p.ref for p in front])
            queries.set_job_status(s, job, "completed")
            return "completed"


def _no_trial_ran(trials) -> str:
    """The error of a job none of whose trials could be measured: the first real error (an
    interrupted trial says nothing about why the others failed)."""
    failed = [t for t in trials if t.state == "failed"]
    if not failed:
        return "no trial ran"
    first = next((t for t in failed if not (t.error or "").startswith("interrupted")), failed[0])
    return f"no trial could be measured ({len(failed)} failed); trial {first.number}: {first.error}"


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


def _describe(error: BaseException) -> str:
    if isinstance(error, DriverStopped):
        return str(error)
    if isinstance(error, KeyboardInterrupt):
        return "interrupted (Ctrl-C)"
    cause = getattr(error, "cause", None) or error
    return f"{type(cause).__name__}: {cause}".splitlines()[0][:2000]


def progress(database: Database, job_id: str, *, started: float | None = None) -> Progress:
    """Trials done / total, failed, front size, elapsed and the estimate of what is left. `elapsed`
    runs from the job's first start to now, or to its end once it finished (`started`: a
    monotonic start time to measure from instead, the running driver's own)."""
    with database.session() as s:
        job = queries.get_job(s, job_id)
        trials = queries.list_trials(s, job)
        done = [t for t in trials if t.state != "running"]
        failed = sum(t.state == "failed" for t in trials)
        front = pareto_front((point(t) for t in trials if t.state == "complete"), objective=job.objective)
        begun = job.started_at.timestamp() if job.started_at else time.time()
        ended = job.finished_at.timestamp() if job.finished_at and job.status != "running" else time.time()
    elapsed = time.monotonic() - started if started is not None else max(ended - begun, 0.0)
    eta = elapsed / len(done) * (job.n_trials - len(done)) if done else None
    return Progress(len(done), job.n_trials, failed, len(front), elapsed, eta)
