"""Tuning-job lifecycle as plain functions: the CLI (and any HTTP layer) stays thin over these.

Everything a user can get wrong is checked in `submit`, before a job row exists or a worker
starts: the backbone loads, the workload parses, the search space fits the model, the
constraints are satisfiable.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import optuna

import illava
from db import Conflict, Database, NotFound, queries
from db.models import utcnow
from illava import Schedule
from optimizer import SAMPLERS, Constraints, Objectives, SearchSpace, best_for_target, make_study, seed_reductions

from .driver import Progress, point, progress
from .lease import LEASE_S, START_S, check_takeable, describe_lease, driver_id, hand_over, holder_is_gone, release, take


class InvalidInput(ValueError):
    """A submitted value that cannot be tuned: `field` names it (as the API's body does), the
    message says what is wrong and what is allowed."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(message)


@contextmanager
def about_field(field: str) -> Iterator[None]:
    """Errors raised inside are about `field`: they become `InvalidInput`s naming it."""
    try:
        yield
    except InvalidInput:
        raise
    except (ValueError, FileNotFoundError, LookupError) as err:
        raise InvalidInput(field, err.args[0] if isinstance(err, KeyError) and err.args else str(err)) from err


@dataclass(frozen=True)
class JobStatus:
    id: str
    state: str
    backbone: str
    workload: str
    error: str | None
    heartbeat_age_s: float | None  # seconds since the driver last checked in (None: never ran)
    progress: Progress  # trials done / total, failed, front size, elapsed, estimate of what is left
    driver: str | None = None  # the driver holding the job's lease ("host:pid:token"), if any
    lease_expires_at: datetime | None = None  # when that lease runs out without a renewal
    created_at: datetime | None = None  # when the job was submitted

    @property
    def driver_note(self) -> str | None:
        """What a user should know about the job's driver: None while a live driver runs it, or is
        starting it (or none is needed); else who holds it and what to do (`jobs.lease.describe_lease`)."""
        short = self.id[:8]
        if self.state == "queued":
            return self._queued_note(short)
        if self.state != "running":
            return None
        if self.driver is None:
            return f"no driver holds job {short}: `illava-tune resume {short}` continues it"
        if self.lease_expires_at is not None and self.lease_expires_at > utcnow() and not holder_is_gone(self.driver):
            return None
        return describe_lease(self.id, self.driver, self.lease_expires_at)

    def _queued_note(self, short: str) -> str | None:
        """A queued job waits for the driver `submit` started (it holds the job's lease from the start,
        `start_background`): a note once that driver is gone, or when none took the job in `LEASE_S`."""
        if self.driver is None:
            waited = (utcnow() - self.created_at).total_seconds() if self.created_at else 0.0
            if waited < LEASE_S:
                return None
            return (f"no driver has taken job {short} in the {waited:.0f} s since it was submitted: "
                    f"`illava-tune resume {short}` runs it")  # fmt: skip
        if holder_is_gone(self.driver):
            return (f"the driver started for job {short} ({self.driver}) exited before it took the job; its log is "
                    f".illava-jobs/{self.id}.log where the job was submitted. `illava-tune resume {short}` runs the job")  # fmt: skip
        if self.lease_expires_at is not None and self.lease_expires_at > utcnow():
            return None
        return describe_lease(self.id, self.driver, self.lease_expires_at)


def _check_backbone(backbone: str, workload, space: SearchSpace) -> tuple[int, int]:
    """Depths of the backbone's encoder and LLM, with the workload and the space checked against the
    backbone's family; fails like loading would, without loading weights."""
    from illava.backbones import backbone_config

    config = backbone_config(backbone)
    adapter = illava.adapter_for_config(config)
    workload.check_fits(adapter.size_multiple(config), backbone)
    if workload.video_frames and not adapter.encoder_merges_video and SearchSpace.bounds(space.encoder_share)[1] > 0:
        raise ValueError(
            f"backbone {backbone!r} ({adapter.family}) cannot merge videos before its LLM, and workload "
            f"{workload.name!r} has video: search the LLM alone with --encoder-share 0"
        )
    return illava.depths(config)


def submit(
    database: Database,
    *,
    backbone: str,
    workload: Any,
    n_trials: int,
    n_workers: int = 1,
    space: SearchSpace | None = None,
    constraints: Constraints | None = None,
    sampler: str = "tpe",
    seed: int = 0,
    dtype: str = "float32",
    attention: str = "sdpa",
    objective: str = "speedup",
) -> str:
    """Validate everything, then create the job (queued); returns its id. The job is tuned in
    `dtype` with `attention` (`illava.runtime`): its workers load the backbone so, and the job's
    hardware group says so. `objective` is its speed objective (`optimizer.Objectives`)."""
    from illava.runtime import check_attention, dtype_name
    from profiler import check_dataset, detect_hardware, resolve_workload

    if n_trials < 1:
        raise InvalidInput("trials", f"--trials must be >= 1, got {n_trials}")
    if n_workers < 1:
        raise InvalidInput("workers", f"--workers must be >= 1, got {n_workers}")
    if sampler not in SAMPLERS:
        raise InvalidInput("sampler", f"unknown sampler {sampler!r}; allowed: {', '.join(SAMPLERS)}")
    with about_field("objective"):
        objectives = Objectives(objective)
    with about_field("workload"):
        workload = resolve_workload(workload)
    with about_field("dataset"):
        check_dataset(workload)
    space = space or SearchSpace()
    with about_field("backbone"):
        encoder_depth, llm_depth = _check_backbone(backbone, workload, space)
    with about_field("search_space"):
        space.check_fits(encoder_depth=encoder_depth, llm_depth=llm_depth)
        for reduction in seed_reductions(space):
            Schedule.paper_default(reduction, encoder_depth=encoder_depth, llm_depth=llm_depth)
    constraints = constraints or Constraints()
    with about_field("constraints"):
        constraints.check_satisfiable()
    device = "cuda" if _has_cuda() else "cpu"
    with about_field("dtype"):
        dtype = dtype_name(dtype)
    with about_field("attention"):
        attention = check_attention(attention, device)
    hardware = detect_hardware(device, dtype=dtype, attention=attention)
    with database.session() as s:
        job = queries.create_job(
            s,
            backbone=queries.get_or_create_backbone(s, backbone),
            hardware=queries.get_or_create_hardware(s, hardware.to_dict(), key=hardware.key()),
            workload=queries.get_or_create_workload(s, workload.name, workload.to_dict()),
            n_trials=n_trials, n_workers=n_workers, sampler=sampler, seed=seed,
            search_space=space.to_dict(), constraints=constraints.to_dict(), objective=objective,
        )  # fmt: skip
        job_id, study_name = job.id, job.study_name
    # The study exists from the start (optuna-dashboard shows the job at once), and Optuna's tables
    # are created here, one process at a time, rather than by drivers racing on a fresh database.
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "A new study created" line among ours
    with database.schema_lock():
        make_study(database.optuna_storage_url, study_name, sampler=sampler, seed=seed, objectives=objectives)
    return job_id


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def start_background(database: Database, job_id: str, log_dir: Path = Path(".illava-jobs"), *,
                     force: bool = False, ray_address: str | None = None,
                     ray_timeout_s: float | None = None) -> Path:  # fmt: skip
    """Run the driver in a detached process (`python -m jobs run JOB`); returns its log file. It
    connects to the Ray cluster at `ray_address` (else `RAY_ADDRESS`, else starts a local one),
    waiting at most `ray_timeout_s` for it (else `ILLAVA_RAY_CONNECT_TIMEOUT`, else 30 s).

    The job's lease is taken here first, as the driver would take it (`LeaseHeld` now, and no
    process started, while another driver owns the job; `force` as for `jobs.run`), then handed to
    the new process (`jobs.lease.hand_over`): from the start the lease names the process that will
    run the job, so `status` says so when it dies before it gets going, and `resume` replaces it."""
    launcher = driver_id()
    job_id = take(database, job_id, launcher, force=force, ttl_s=START_S)
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{job_id}.log"
    # The URL goes by the environment, not the command line, where `ps` would show its password.
    env = {**os.environ, "DATABASE_URL": database.url}
    token = secrets.token_hex(4)
    command = [sys.executable, "-m", "jobs", "run", job_id, "--handed-from", launcher, "--token", token]
    command += ["--ray-address", ray_address] if ray_address else []
    command += ["--ray-timeout", str(ray_timeout_s)] if ray_timeout_s is not None else []
    try:
        with log.open("ab") as out:
            process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       start_new_session=True)  # fmt: skip
    except BaseException:
        release(database, job_id, launcher)
        raise
    hand_over(database, job_id, launcher, driver_id(process.pid, token))
    return log


def status(database: Database, job_id: str) -> JobStatus:
    with database.session() as s:
        job = queries.get_job(s, job_id)
        head = (job.id, job.status, job.backbone.name, job.workload.name, job.error)
        now = utcnow()
        beat = (now - job.heartbeat_at).total_seconds() if job.heartbeat_at else None
        driver, expires, created = job.lease_owner, job.lease_expires_at, job.created_at
    p = progress(database, head[0])
    if head[1] != "running":
        p = dataclasses.replace(p, eta_s=None)
    return JobStatus(*head, beat, p, driver=driver, lease_expires_at=expires, created_at=created)


@dataclass(frozen=True)
class JobSummary:
    """A job as `list_jobs` shows it: what it tunes, its state, and when it was created."""

    id: str
    state: str
    backbone: str
    workload: str
    n_trials: int
    objective: str
    created_at: datetime


def list_jobs(database: Database, *, limit: int = 50, state: str | None = None) -> list[JobSummary]:
    """The newest jobs first (optionally only those in `state`)."""
    with database.session() as s:
        return [
            JobSummary(j.id, j.status, j.backbone.name, j.workload.name, j.n_trials, j.objective, j.created_at)
            for j in queries.list_jobs(s, limit, status=state)
        ]


def cancel(database: Database, job_id: str) -> str:
    """Ask a running job to stop (its driver checks between trials); a queued job stops at once.
    A finished job is a `Conflict`."""
    with database.session() as s:
        job = queries.get_job(s, job_id)
        if job.status in ("completed", "cancelled", "failed"):
            raise Conflict(f"job {job.id} is already {job.status}: there is nothing to cancel")
        queries.request_cancel(s, job)
        if job.status == "queued":
            queries.set_job_status(s, job, "cancelled")
        return job.id


def resume_background(database: Database, job_id: str, *, force: bool = False,
                      start: Callable[..., object] | None = None) -> str:  # fmt: skip
    """Continue a job whose driver stopped, in a detached driver (`start_background`); returns its
    id. What the driver would refuse is refused here, so the caller hears it now and not in a log:
    a `Conflict` when there is nothing to resume (completed, cancelled), `LeaseHeld` while another
    driver owns the job (with `force`, one whose lease expired is taken over; see `jobs.lease.take`).
    `start(database, job_id, force=...)` starts the driver (default: `start_background`)."""
    with database.session() as s:
        job = queries.get_job(s, job_id)
        state, owner, expires = job.id, job.lease_owner, job.lease_expires_at
        if job.status in ("completed", "cancelled"):
            raise Conflict(f"job {job.id} is {job.status}: there is nothing to resume")
    check_takeable(state, owner, expires, force=force)
    (start or start_background)(database, state, force=force)
    return state


def front(database: Database, job_id: str) -> list[dict[str, Any]]:
    """The schedules on the job's Pareto front (candidates, or published or retired since), fastest first."""
    with database.session() as s:
        return [published(row) for row in queries.job_front(s, queries.get_job(s, job_id))]


def published(row) -> dict[str, Any]:
    """A schedule as the CLI and the API show it: its figures, the spread of its paired speedup
    (`speedup_low`/`speedup_high`, None before speedups were measured), what its memory figure is
    (`memory_source`) and where it is in its lifecycle (`status`: candidate, published, retired)."""
    metrics = row.metrics or {}
    speedup = metrics.get("speedup") or {}
    return {
        "id": row.id, "job": row.job_id, "status": row.status, "on_front": row.on_front,
        "backbone": row.backbone.name, "workload": row.workload.name, "schedule": row.schedule,
        "latency_ms": row.latency_ms,
        "memory_mib": row.memory_mib, "accuracy": row.accuracy, "retention": row.retention,
        "fidelity": row.fidelity, "quality": row.accuracy if row.accuracy is not None else row.fidelity,
        "speedup": row.speedup, "speedup_low": speedup.get("low"), "speedup_high": speedup.get("high"),
        "memory_source": (metrics.get("peak_memory") or {}).get("objective_source"),
        "hardware": row.hardware.key, "dtype": queries.runtime_of(row.hardware.profile)[0],
        "attention": queries.runtime_of(row.hardware.profile)[1],
    }  # fmt: skip


def best(database: Database, *, backbone: str, latency_ms: float | None = None, speedup: float | None = None,
         hardware: str | None = None, workload: str | None = None, max_memory_mib: float | None = None,
         min_retention: float | None = None, job: str | None = None, dtype: str | None = None,
         attention: str | None = None, candidates: bool = False):  # fmt: skip
    """The best schedule for a target: under `latency_ms`, or at least `speedup` times faster than
    the unmerged model measured in the same job (optionally only `job`'s, or only those tuned in
    `dtype` / with `attention`); see `best_for_target`. It is chosen among the published schedules,
    what deployments are given; with `candidates`, among every schedule on a front too (retired ones
    never). No schedule to choose from is a `NoSchedules` error saying what there is.

    Latencies are compared within one hardware group only: when the schedules that match come
    from several (devices, dtypes or attentions), this is an `InvalidInput` about `hardware`
    listing them, never a pick across them."""
    statuses = ("published", "candidate") if candidates else ("published",)
    with database.session() as s:
        try:
            rows = queries.find_schedules(s, backbone=backbone, hardware=hardware, workload=workload, status=statuses)
        except NotFound as err:  # an unknown backbone, hardware or workload name: err.kind says which
            raise InvalidInput(err.kind, str(err)) from err
        if job is not None:
            rows = [row for row in rows if row.job_id == queries.get_job(s, job).id]
        if dtype is not None or attention is not None:
            rows = [row for row in rows if _runs_in(row.hardware.profile, dtype, attention)]
        if not rows:
            wanted = "".join(
                f", {label} {value}"
                for label, value in (("hardware", hardware), ("workload", workload), ("dtype", dtype),
                                     ("attention", attention), ("job", job)) if value
            )  # fmt: skip
            hint = "run `illava-tune submit` first"
            if not candidates:
                waiting = len(queries.find_schedules(s, backbone=backbone, status="candidate"))
                if waiting:
                    hint = (f"{waiting} candidate schedule{'s' * (waiting > 1)} of {backbone!r} wait on fronts: "
                            "publish one (`illava-tune publish ID`), or ask for candidates")  # fmt: skip
            what = "schedules" if candidates else "published schedules"
            raise NoSchedules(f"no {what} for backbone {backbone!r}{wanted}; {hint}")
        groups = sorted({row.hardware.key for row in rows})
        if len(groups) > 1:
            raise InvalidInput(
                "hardware",
                f"schedules of backbone {backbone!r} were tuned on {len(groups)} hardware groups, whose latencies "
                f"do not compare: {'; '.join(groups)}. Choose one with --hardware (or --dtype / --attn)",
            )
        return best_for_target([point(row) for row in rows], latency_ms=latency_ms, min_speedup=speedup,
                               max_memory_mib=max_memory_mib, min_retention=min_retention)  # fmt: skip


class NoSchedules(LookupError):
    """No schedule to choose from for a `best` query (none published, or none at all)."""


def publish(database: Database, schedule_id: int | None = None, *, job: str | None = None,
            trial: int | None = None) -> dict[str, Any]:  # fmt: skip
    """Publish a schedule by its id, or trial `trial` of `job` (on the front or not): `best`, the
    service and `pull` give it to deployments. A trial that did not complete is a `Conflict`."""
    if (schedule_id is None) == (job is None or trial is None):
        raise ValueError("publish takes a schedule id, or a job and a trial number")
    with database.session() as s:
        if schedule_id is not None:
            return published(queries.publish_schedule(s, schedule_id))
        return published(queries.publish_trial(s, queries.get_job(s, job), trial))  # type: ignore[arg-type]


def retire(database: Database, schedule_id: int) -> dict[str, Any]:
    """Withdraw a published schedule; deployments asking `best` get the next best published one."""
    with database.session() as s:
        return published(queries.retire_schedule(s, schedule_id))


def schedule(database: Database, schedule_id: int) -> dict[str, Any]:
    """One schedule (any status) as `published` shows it."""
    with database.session() as s:
        return published(queries.get_published(s, schedule_id))


def _runs_in(profile: dict[str, Any], dtype: str | None, attention: str | None) -> bool:
    tuned = queries.runtime_of(profile)
    return (dtype is None or tuned[0] == dtype) and (attention is None or tuned[1] == attention)


def manifest(database: Database, schedule_id: int) -> dict[str, Any]:
    """The export DESIGN describes: schedule + backbone + workload + hardware + metrics + provenance.
    `illava.apply(model, manifest)` accepts it."""
    from importlib.metadata import version

    with database.session() as s:
        row = queries.get_published(s, schedule_id)
        return {
            "manifest_version": 1,
            "schedule": Schedule.from_dict(row.schedule).to_dict(),
            "backbone": {"name": row.backbone.name, "path": row.backbone.path},
            "workload": row.workload.spec,
            "hardware": row.hardware.profile,
            "metrics": row.metrics,
            "reference": _reference(row, queries.get_job(s, row.job_id).objective),
            "provenance": {
                "schedule": row.id,
                "job": row.job_id,
                "trial": row.trial_id,
                "illava-tune": version("illava-tune"),
            },  # fmt: skip
        }


def _reference(row, objective: str) -> dict[str, Any]:
    """What the schedule's speed was measured against: the unmerged model, prefill interleaved
    with the schedule's in the same rounds on the same worker, workload and hardware."""
    metrics = row.metrics or {}
    reference = metrics.get("reference_prefill_s") or {}
    return {
        "model": "unmerged",
        "prefill_ms": None if reference.get("median") is None else reference["median"] * 1000.0,
        "speedup": metrics.get("speedup"),
        "job_objective": objective,
    }


def dump(manifest_dict: dict[str, Any], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(manifest_dict, indent=2)
    if fmt == "yaml":
        import yaml

        return yaml.safe_dump(manifest_dict, sort_keys=False)
    raise ValueError(f"unknown format {fmt!r}; allowed: json, yaml")
