"""Data access: each function takes a `Session` first, flushes what it wrote and never commits
(the caller's `Database.session()` block owns the transaction).

Bad input (an unknown state, a non-JSON document, a trial of another job) raises `ValueError`
naming what is wrong and what is allowed; a missing row raises `db.NotFound`.
"""

from __future__ import annotations

import hashlib
import json
import math
import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import ColumnElement, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from .errors import AmbiguousId, BudgetExhausted, Conflict, LeaseLost, NotFound
from .models import (
    JOB_FINISHED,
    JOB_STATES,
    SCHEDULE_STATUSES,
    TOKEN_SCOPES,
    TRIAL_FINISHED,
    TRIAL_STATES,
    ApiToken,
    Backbone,
    Base,
    ChangeCounter,
    HardwareProfileRow,
    PublishedSchedule,
    Trial,
    TuningJob,
    WorkloadRow,
    utcnow,
)

Row = TypeVar("Row", bound=Base)
#: How a hardware profile stored before the model's dtype and attention were recorded is read
#: (`illava.runtime.DEFAULT_DTYPE/DEFAULT_ATTENTION`; this package does not import torch).
DEFAULT_DTYPE, DEFAULT_ATTENTION = "float32", "sdpa"
#: The speeds a job may optimise (`optimizer.LATENCY_OBJECTIVES`; this package imports no optimizer).
OBJECTIVES = ("speedup", "latency")
_HEX = frozenset("0123456789abcdef")


# ----------------------------------------------------------------------------- helpers
def canonical_json(document: Any, what: str = "document") -> str:
    """`document` as canonical JSON (sorted keys, no spaces), or ValueError saying why it is not JSON.
    NaN and infinities are refused: PostgreSQL's JSON rejects them and they compare unequal to themselves."""
    try:
        return json.dumps(document, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"{what} is not storable as JSON ({err}); use dicts, lists, str, finite numbers, bool, None"
        ) from err


def _document(value: Any, what: str, *, optional: bool = False) -> dict[str, Any] | None:
    """A JSON object to store: a plain dict copy (tuples become lists, as they come back)."""
    if value is None and optional:
        return None
    if not isinstance(value, Mapping):
        allowed = "a mapping or None" if optional else "a mapping"
        raise ValueError(f"{what} must be {allowed} (a JSON object), got {type(value).__name__}")
    return json.loads(canonical_json(dict(value), what))


def _number(value: Any, what: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number or None, got {value!r}")
    return float(value)


def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be an integer >= 1, got {value!r}")
    return value


def _first(session: Session, model: type[Row], *where: ColumnElement[bool]) -> Row | None:
    return session.scalars(select(model).where(*where).limit(1)).first()


def _insert_or_get(session: Session, row: Row, *where: ColumnElement[bool]) -> Row:
    """Insert `row`; when a concurrent writer inserted the same unique key first, return theirs.
    The insert runs in a SAVEPOINT so losing the race leaves the caller's transaction intact."""
    try:
        with session.begin_nested():
            session.add(row)
    except IntegrityError:
        existing = _first(session, type(row), *where)
        if existing is None:
            raise
        return existing
    return row


# ----------------------------------------------------------------------------- reference rows
def get_or_create_backbone(
    session: Session, name: str, path: str | None = None, config: Mapping[str, Any] | None = None
) -> Backbone:
    """The backbone called `name`, created if new. A `path` or `config` given replaces the stored
    one (the latest job's is the one worth keeping: paths differ between machines)."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"backbone name must be a non-empty string, got {name!r}")
    config_doc = _document(config, "backbone config", optional=True)
    backbone = _first(session, Backbone, Backbone.name == name)
    if backbone is None:
        backbone = _insert_or_get(session, Backbone(name=name, path=path, config=config_doc), Backbone.name == name)
    if path is not None:
        backbone.path = str(path)
    if config_doc is not None:
        backbone.config = config_doc
    session.flush()
    return backbone


def runtime_of(profile: Mapping[str, Any]) -> tuple[str, str]:
    """(dtype, attention) a stored hardware profile was measured in."""
    return profile.get("dtype") or DEFAULT_DTYPE, profile.get("attention") or DEFAULT_ATTENTION


def hardware_key(profile: Mapping[str, Any]) -> str:
    """The grouping key of a hardware profile dict: its `"key"` field, else computed from its fields
    exactly as `profiler.HardwareProfile.key()` does (this package does not import the profiler)."""
    if profile.get("key"):
        return str(profile["key"])
    kind, name = profile.get("kind"), profile.get("name")
    runtime = "/".join(runtime_of(profile))
    if kind == "cuda" and name:
        mig = profile.get("mig_profile")
        return f"cuda:{name}" + (f" MIG {mig}" if mig else "") + f" {runtime}"
    if kind == "cpu" and name and profile.get("threads") is not None:
        return f"cpu:{name} x{profile['threads']} {runtime}"
    raise ValueError(
        "hardware profile has no 'key' and not the fields to compute one "
        f"(kind 'cuda' with name, or kind 'cpu' with name and threads): got keys {sorted(profile)}"
    )


def get_or_create_hardware(
    session: Session, profile: Mapping[str, Any], *, key: str | None = None
) -> HardwareProfileRow:
    """The hardware group of `profile` (a `HardwareProfile.to_dict()`, by `key`, else the profile's
    "key" field, else `hardware_key`), created with this profile if new. An existing row keeps the
    first profile seen: versions differ within a group and each trial's metrics carry its own."""
    document = _document(profile, "hardware profile")
    assert document is not None
    key = key or hardware_key(document)
    row = _first(session, HardwareProfileRow, HardwareProfileRow.key == key)
    if row is None:
        row = _insert_or_get(session, HardwareProfileRow(key=key, profile=document), HardwareProfileRow.key == key)
    session.flush()
    return row


def workload_fingerprint(spec: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of a workload spec."""
    return hashlib.sha256(canonical_json(dict(spec), "workload spec").encode()).hexdigest()


def get_or_create_workload(session: Session, name: str, spec: Mapping[str, Any]) -> WorkloadRow:
    """The workload whose spec (a `Workload.to_dict()`) has this fingerprint, created if new; the
    same spec under another name is the same workload (the first name is kept)."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"workload name must be a non-empty string, got {name!r}")
    document = _document(spec, "workload spec")
    assert document is not None
    fingerprint = workload_fingerprint(document)
    row = _first(session, WorkloadRow, WorkloadRow.fingerprint == fingerprint)
    if row is None:
        row = _insert_or_get(
            session,
            WorkloadRow(name=name, spec=document, fingerprint=fingerprint),
            WorkloadRow.fingerprint == fingerprint,
        )
    session.flush()
    return row


# ----------------------------------------------------------------------------- jobs
def create_job(
    session: Session,
    *,
    backbone: Backbone,
    hardware: HardwareProfileRow,
    workload: WorkloadRow,
    n_trials: int,
    n_workers: int,
    sampler: str,
    seed: int | None,
    search_space: Mapping[str, Any],
    constraints: Mapping[str, Any],
    objective: str = "speedup",
) -> TuningJob:
    """A new job, status "queued", id a uuid4 hex, Optuna study name `illava-<id>`; `objective` is
    the speed it optimises ("speedup" or "latency")."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; allowed: {', '.join(OBJECTIVES)}")
    if not isinstance(sampler, str) or not sampler.strip():
        raise ValueError(f"sampler must be a non-empty string, got {sampler!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"seed must be an integer or None, got {seed!r}")
    job_id = uuid.uuid4().hex
    job = TuningJob(
        id=job_id,
        study_name=f"illava-{job_id}",
        backbone=backbone,
        hardware=hardware,
        workload=workload,
        status="queued",
        n_trials=_positive_int(n_trials, "n_trials"),
        n_workers=_positive_int(n_workers, "n_workers"),
        sampler=sampler,
        seed=seed,
        search_space=_document(search_space, "search_space"),
        constraints=_document(constraints, "constraints"),
        cancel_requested=False,
        objective=objective,
        created_at=utcnow(),
    )
    session.add(job)
    session.flush()
    return job


def get_job(session: Session, job_id: str) -> TuningJob:
    """The job with this id, or with the only id that starts with `job_id` (like a git hash).
    Raises `NotFound`, or `AmbiguousId` (a `NotFound`) when several ids start with the prefix."""
    if not isinstance(job_id, str) or not job_id.strip():
        raise ValueError(f"a job id must be a non-empty string, got {job_id!r}")
    prefix = job_id.strip().lower()
    job = session.get(TuningJob, prefix)
    if job is not None:
        return job
    if not set(prefix) <= _HEX:
        raise NotFound("tuning job", job_id, "job ids are hexadecimal (0-9, a-f)")
    # The prefix is hex only, so it holds no LIKE wildcards.
    matches = list(session.scalars(select(TuningJob).where(TuningJob.id.like(f"{prefix}%")).limit(6)))
    if not matches:
        raise NotFound("tuning job", job_id)
    if len(matches) > 1:
        raise AmbiguousId("tuning job", job_id, sorted(match.id for match in matches))
    return matches[0]


def list_jobs(session: Session, limit: int = 50, *, status: str | None = None) -> list[TuningJob]:
    """The newest jobs first, optionally only those with `status`."""
    query = select(TuningJob).order_by(TuningJob.created_at.desc(), TuningJob.id).limit(_positive_int(limit, "limit"))
    if status is not None:
        query = query.where(TuningJob.status == _job_state(status))
    return list(session.scalars(query))


def _job_state(status: str) -> str:
    if status not in JOB_STATES:
        raise ValueError(f"unknown job status {status!r}; allowed: {', '.join(JOB_STATES)}")
    return status


def _attached(session: Session, job: TuningJob) -> TuningJob:
    """`job` as a row of this session: a job read in an earlier session is reloaded by id (never
    merged, which would write its stale values over newer ones, such as a cancel request)."""
    if job in session:
        return job
    fresh = session.get(TuningJob, job.id)
    if fresh is None:
        raise NotFound("tuning job", job.id)
    return fresh


def set_job_status(session: Session, job: TuningJob, status: str, error: str | None = None) -> TuningJob:
    """Set the status and error (None clears it). "running" stamps `started_at` the first time and
    clears `finished_at` (a resumed job runs again); a final status stamps `finished_at`.

    Like `heartbeat` and `request_cancel`, this changes the session's own row of the job: a `job`
    read in an earlier session is reloaded by id, and the returned row is the updated one."""
    status = _job_state(status)
    job = _attached(session, job)
    job.status = status
    now = utcnow()
    if status == "running":
        job.started_at = job.started_at or now
        job.finished_at = None
        job.heartbeat_at = now
    elif status in JOB_FINISHED:
        job.finished_at = now
    job.error = error
    session.flush()
    return job


def heartbeat(session: Session, job: TuningJob) -> datetime:
    """Stamp the job as alive now (the driver calls this while it runs)."""
    job = _attached(session, job)
    job.heartbeat_at = utcnow()
    session.flush()
    return job.heartbeat_at


def request_cancel(session: Session, job: TuningJob) -> TuningJob:
    """Flag the job for cancellation; its driver stops between trials."""
    job = _attached(session, job)
    job.cancel_requested = True
    session.flush()
    return job


# ----------------------------------------------------------------------------- the driver's lease
# One driver owns a job at a time. Every change below is one UPDATE of the job row with its condition
# in the WHERE clause, so it is atomic on both backends: PostgreSQL locks the row and re-checks the
# condition after a concurrent writer commits; SQLite's BEGIN IMMEDIATE runs writers one at a time.
# The row lock also fences the driver's other writes: `renew_lease` opens each of its transactions.


def _lease_update(session: Session, job_id: str, *where: ColumnElement[bool], **values: Any) -> bool:
    statement = update(TuningJob).where(TuningJob.id == job_id, *where).values(**values)
    result = session.execute(statement.execution_options(synchronize_session=False))
    job = session.get(TuningJob, job_id, populate_existing=True)  # the session's row shows the update
    return result.rowcount == 1 and job is not None


def acquire_lease(
    session: Session, job_id: str, owner: str, *, ttl_s: float, replacing: tuple[str | None, datetime | None]
) -> bool:
    """Make `owner` the job's driver, with a lease `ttl_s` from now, if the lease is still exactly
    `replacing` (the (owner, expiry) the caller read and judged free to take: no owner, expired, or
    a driver known to be dead). Returns whether it did: False means someone changed the lease
    between the read and this write, and the caller must read it again."""
    old_owner, old_expiry = replacing
    now = utcnow()
    return _lease_update(
        session, job_id,
        TuningJob.lease_owner.is_(None) if old_owner is None else TuningJob.lease_owner == old_owner,
        TuningJob.lease_expires_at.is_(None) if old_expiry is None else TuningJob.lease_expires_at == old_expiry,
        lease_owner=owner, lease_expires_at=now + timedelta(seconds=ttl_s), heartbeat_at=now,
    )  # fmt: skip


def renew_lease(session: Session, job_id: str, owner: str, *, ttl_s: float) -> TuningJob:
    """Extend `owner`'s lease by `ttl_s` from now and stamp the heartbeat; returns the job row (its
    `cancel_requested` is current). Raises `LeaseLost` when `owner` no longer holds the job."""
    now = utcnow()
    held = _lease_update(session, job_id, TuningJob.lease_owner == owner,
                         lease_expires_at=now + timedelta(seconds=ttl_s), heartbeat_at=now)  # fmt: skip
    if not held:
        job = session.get(TuningJob, job_id)
        holder = job.lease_owner if job is not None else None
        raise LeaseLost(
            f"driver {owner} no longer holds job {job_id}: "
            + (f"driver {holder} took it over" if holder else "its lease was released")
        )
    return session.get(TuningJob, job_id)  # type: ignore[return-value]


def release_lease(session: Session, job_id: str, owner: str) -> bool:
    """Give up `owner`'s lease (nothing happens when another driver holds it); returns whether it did."""
    return _lease_update(session, job_id, TuningJob.lease_owner == owner, lease_owner=None, lease_expires_at=None)


def claim_trial(
    session: Session, job_id: str, owner: str, number: int, schedule: Mapping[str, Any], *, ttl_s: float
) -> Trial:
    """Start trial `number` for the job's driver `owner`: the lease is renewed (which locks the job
    row), the budget checked against the trials stored and the trial inserted as running, in one
    transaction. Raises `LeaseLost`, `BudgetExhausted`, or ValueError when the number is taken."""
    job = renew_lease(session, job_id, owner, ttl_s=ttl_s)
    stored = session.scalar(select(func.count()).select_from(Trial).where(Trial.job_id == job_id)) or 0
    if stored >= job.n_trials:
        raise BudgetExhausted(f"job {job_id} already has {stored} trials, its budget is {job.n_trials}")
    if _first(session, Trial, Trial.job_id == job_id, Trial.number == number) is not None:
        raise ValueError(f"job {job_id} already has a trial number {number}")
    return record_trial(session, job, number, state="running", schedule=schedule)


# ----------------------------------------------------------------------------- trials
def record_trial(
    session: Session,
    job: TuningJob,
    number: int,
    *,
    state: str,
    schedule: Mapping[str, Any],
    metrics: Mapping[str, Any] | None = None,
    latency_ms: float | None = None,
    memory_mib: float | None = None,
    accuracy: float | None = None,
    retention: float | None = None,
    fidelity: float | None = None,
    speedup: float | None = None,
    feasible: bool | None = None,
    error: str | None = None,
) -> Trial:
    """Store trial `number` of `job` as described by the arguments. Idempotent on (job, number): a
    second call for the same number replaces the stored values (`started_at` is kept), never adds a
    row. A final state ("complete", "failed") stamps `finished_at`."""
    if state not in TRIAL_STATES:
        raise ValueError(f"unknown trial state {state!r}; allowed: {', '.join(TRIAL_STATES)}")
    if isinstance(number, bool) or not isinstance(number, int) or number < 0:
        raise ValueError(f"trial number must be an integer >= 0, got {number!r}")
    if feasible is not None and not isinstance(feasible, bool):
        raise ValueError(f"feasible must be True, False or None, got {feasible!r}")
    values: dict[str, Any] = {
        "state": state,
        "schedule": _document(schedule, "trial schedule"),
        "metrics": _document(metrics, "trial metrics", optional=True),
        "latency_ms": _number(latency_ms, "latency_ms"),
        "memory_mib": _number(memory_mib, "memory_mib"),
        "accuracy": _number(accuracy, "accuracy"),
        "retention": _number(retention, "retention"),
        "fidelity": _number(fidelity, "fidelity"),
        "speedup": _number(speedup, "speedup"),
        "feasible": feasible,
        "error": error,
        "finished_at": utcnow() if state in TRIAL_FINISHED else None,
    }
    where = (Trial.job_id == job.id, Trial.number == number)
    trial = _first(session, Trial, *where)
    if trial is None:
        trial = _insert_or_get(session, Trial(job_id=job.id, number=number, started_at=utcnow(), **values), *where)
    for name, value in values.items():
        setattr(trial, name, value)
    session.flush()
    return trial


def list_trials(session: Session, job: TuningJob, state: str | None = None) -> list[Trial]:
    """The job's trials by number, optionally only those in `state`."""
    query = select(Trial).where(Trial.job_id == job.id).order_by(Trial.number)
    if state is not None:
        if state not in TRIAL_STATES:
            raise ValueError(f"unknown trial state {state!r}; allowed: {', '.join(TRIAL_STATES)}")
        query = query.where(Trial.state == state)
    return list(session.scalars(query))


# ----------------------------------------------------------------------------- schedules and their lifecycle
#: The change counter every write to the schedules bumps (`schedules_version`).
SCHEDULES = "schedules"


def _check_publishable(job: TuningJob, trial: Trial) -> None:
    if trial.job_id != job.id:
        raise ValueError(f"trial {trial.number} belongs to job {trial.job_id}, not {job.id}")
    if trial.state != "complete":
        raise Conflict(f"trial {trial.number} of job {job.id} is {trial.state}; only complete trials publish")
    if trial.latency_ms is None or trial.memory_mib is None:
        raise Conflict(f"trial {trial.number} of job {job.id} has no latency_ms or memory_mib to publish")


def _schedule_row(job: TuningJob, trial: Trial, **values: Any) -> PublishedSchedule:
    return PublishedSchedule(
        job_id=job.id, trial_id=trial.id, backbone_id=job.backbone_id, hardware_id=job.hardware_id,
        workload_id=job.workload_id, schedule=trial.schedule, latency_ms=trial.latency_ms,
        memory_mib=trial.memory_mib, accuracy=trial.accuracy, retention=trial.retention, fidelity=trial.fidelity,
        speedup=trial.speedup, metrics=trial.metrics, created_at=utcnow(), **values,
    )  # fmt: skip


def publish_front(session: Session, job: TuningJob, trials: Iterable[Trial]) -> list[PublishedSchedule]:
    """Store `trials` (the job's Pareto front) as its candidate schedules, in place of its previous
    front. Each must be a complete trial of this job with latency and memory measured.

    A schedule a user published or retired keeps its row, id and status: if its trial is on the new
    front it stays `on_front`, else it is marked off the front (published is a user's choice, never
    undone by a resumed job). Candidates no longer on the front are deleted."""
    chosen = list(trials)
    for trial in chosen:
        _check_publishable(job, trial)
    numbers = [trial.number for trial in chosen]
    if len(set(numbers)) != len(numbers):
        raise ValueError(f"the same trial is listed twice in the front: numbers {sorted(numbers)}")
    on_front = {trial.id for trial in chosen}
    kept: dict[int, PublishedSchedule] = {}
    for row in session.scalars(select(PublishedSchedule).where(PublishedSchedule.job_id == job.id)):
        if row.status == "candidate" and row.trial_id not in on_front:
            session.delete(row)
        else:
            row.on_front = row.trial_id in on_front
            kept[row.trial_id] = row
    front = [kept.get(trial.id) or _schedule_row(job, trial, status="candidate", on_front=True) for trial in chosen]
    session.add_all(front)
    bump_version(session, SCHEDULES)
    session.flush()
    return sorted(front, key=lambda row: (row.latency_ms, row.id))


def job_front(session: Session, job: TuningJob) -> list[PublishedSchedule]:
    """The schedules on the job's latest front, whatever their status, fastest first."""
    query = select(PublishedSchedule).where(PublishedSchedule.job_id == job.id, PublishedSchedule.on_front)
    return list(session.scalars(query.order_by(PublishedSchedule.latency_ms, PublishedSchedule.id)))


def publish_schedule(session: Session, schedule_id: int) -> PublishedSchedule:
    """Make the schedule `published`: `best` and the service answer deployments with it (a retired
    one comes back). Publishing a published schedule changes nothing."""
    row = get_published(session, schedule_id)
    if row.status != "published":
        row.status, row.published_at, row.retired_at = "published", utcnow(), None
        bump_version(session, SCHEDULES)
        session.flush()
    return row


def publish_trial(session: Session, job: TuningJob, number: int) -> PublishedSchedule:
    """Publish trial `number` of `job`: its schedule row if it has one (it is on the front), else a
    new row off the front. Raises `Conflict` for a trial that is not complete or not measured."""
    trial = _first(session, Trial, Trial.job_id == job.id, Trial.number == number)
    if trial is None:
        raise NotFound("trial", number, f"job {job.id} has trials 0..{len(list_trials(session, job)) - 1}")
    _check_publishable(job, trial)
    row = _first(session, PublishedSchedule, PublishedSchedule.trial_id == trial.id)
    if row is None:
        row = _schedule_row(job, trial, status="candidate", on_front=False)
        session.add(row)
        session.flush()
    return publish_schedule(session, row.id)


def retire_schedule(session: Session, schedule_id: int) -> PublishedSchedule:
    """Withdraw a published schedule: deployments are no longer given it. Raises `Conflict` for a
    schedule that is not published; retiring a retired one changes nothing."""
    row = get_published(session, schedule_id)
    if row.status == "candidate":
        raise Conflict(f"schedule {row.id} is a candidate, not published: there is nothing to retire")
    if row.status == "published":
        row.status, row.retired_at = "retired", utcnow()
        bump_version(session, SCHEDULES)
        session.flush()
    return row


def bump_version(session: Session, name: str) -> None:
    """Count one change of kind `name` (in the caller's transaction)."""
    statement = update(ChangeCounter).where(ChangeCounter.name == name).values(version=ChangeCounter.version + 1)
    statement = statement.execution_options(synchronize_session=False)
    if session.execute(statement).rowcount:
        return
    try:
        with session.begin_nested():
            session.add(ChangeCounter(name=name, version=1))
    except IntegrityError:  # a concurrent writer counted the first change
        session.execute(statement)


def version_of(session: Session, name: str) -> int:
    """How many changes of kind `name` were counted (0: none yet)."""
    return session.scalar(select(ChangeCounter.version).where(ChangeCounter.name == name)) or 0


def find_schedules(
    session: Session,
    *,
    backbone: Backbone | str,
    hardware: HardwareProfileRow | str | None = None,
    workload: WorkloadRow | str | None = None,
    status: str | Sequence[str] = "published",
) -> list[PublishedSchedule]:
    """Schedules of `backbone` (a row or its name) in `status` (one or several of
    `SCHEDULE_STATUSES`), optionally only on `hardware` (a row or its key) and `workload` (a row,
    or a name: every workload of that name), fastest first. A name or key that matches nothing
    raises `NotFound` listing the known ones."""
    statuses = (status,) if isinstance(status, str) else tuple(status)
    unknown = [s for s in statuses if s not in SCHEDULE_STATUSES]
    if unknown or not statuses:
        raise ValueError(f"unknown schedule status {unknown or statuses}; allowed: {', '.join(SCHEDULE_STATUSES)}")
    query = select(PublishedSchedule).where(
        PublishedSchedule.backbone_id == _backbone_id(session, backbone), PublishedSchedule.status.in_(statuses)
    )
    if hardware is not None:
        query = query.where(PublishedSchedule.hardware_id == _hardware_id(session, hardware))
    if workload is not None:
        query = query.where(PublishedSchedule.workload_id.in_(_workload_ids(session, workload)))
    return list(session.scalars(query.order_by(PublishedSchedule.latency_ms, PublishedSchedule.id)))


def _known(session: Session, column: Any) -> str:
    names = sorted(set(session.scalars(select(column))))
    return ", ".join(map(repr, names)) if names else "none yet"


def _backbone_id(session: Session, backbone: Backbone | str) -> int:
    if isinstance(backbone, Backbone):
        return backbone.id
    row = _first(session, Backbone, Backbone.name == backbone)
    if row is None:
        raise NotFound("backbone", backbone, f"known: {_known(session, Backbone.name)}")
    return row.id


def _hardware_id(session: Session, hardware: HardwareProfileRow | str) -> int:
    if isinstance(hardware, HardwareProfileRow):
        return hardware.id
    row = _first(session, HardwareProfileRow, HardwareProfileRow.key == hardware)
    if row is None:
        raise NotFound("hardware", hardware, f"known: {_known(session, HardwareProfileRow.key)}")
    return row.id


def _workload_ids(session: Session, workload: WorkloadRow | str) -> Sequence[int]:
    if isinstance(workload, WorkloadRow):
        return [workload.id]
    ids = list(session.scalars(select(WorkloadRow.id).where(WorkloadRow.name == workload)))
    if not ids:
        raise NotFound("workload", workload, f"known: {_known(session, WorkloadRow.name)}")
    return ids


def get_published(session: Session, schedule_id: int) -> PublishedSchedule:
    """The schedule (candidate, published or retired) with this id, or `NotFound`."""
    row = session.get(PublishedSchedule, schedule_id)
    if row is None:
        raise NotFound("schedule", schedule_id)
    return row


# ----------------------------------------------------------------------------- the service's tokens
def create_token(session: Session, *, key: str, name: str, scope: str, secret_sha256: str) -> ApiToken:
    """Store a token by its public `key` and the sha256 (hex) of its secret; never the secret."""
    if scope not in TOKEN_SCOPES:
        raise ValueError(f"unknown token scope {scope!r}; allowed: {', '.join(TOKEN_SCOPES)}")
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"a token name must be a non-empty string, got {name!r}")
    if len(secret_sha256) != 64 or not set(secret_sha256) <= _HEX:
        raise ValueError("secret_sha256 must be the 64 hex digits of a sha256")
    token = ApiToken(key=key, name=name.strip(), scope=scope, secret_sha256=secret_sha256, created_at=utcnow())
    session.add(token)
    session.flush()
    return token


def find_token(session: Session, key: str) -> ApiToken | None:
    """The token with this public key (revoked or not), or None."""
    return _first(session, ApiToken, ApiToken.key == key)


def list_tokens(session: Session) -> list[ApiToken]:
    """Every token, oldest first, revoked ones included."""
    return list(session.scalars(select(ApiToken).order_by(ApiToken.created_at, ApiToken.id)))


def revoke_token(session: Session, key_or_name: str) -> ApiToken:
    """Revoke the live token whose key or name is `key_or_name`. `NotFound` when there is none,
    `Conflict` when a name belongs to several live tokens (revoke by key)."""
    live = select(ApiToken).where(ApiToken.revoked_at.is_(None))
    matches = list(session.scalars(live.where(ApiToken.key == key_or_name))) or list(
        session.scalars(live.where(ApiToken.name == key_or_name))
    )
    if not matches:
        raise NotFound("live token", key_or_name, "`illava-tune token list` shows them")
    if len(matches) > 1:
        raise Conflict(f"{len(matches)} live tokens are named {key_or_name!r}: revoke one by its key")
    matches[0].revoked_at = utcnow()
    session.flush()
    return matches[0]


def touch_token(session: Session, token_id: int, when: datetime) -> None:
    """Record that the token was used at `when`."""
    session.execute(update(ApiToken).where(ApiToken.id == token_id).values(last_used_at=when))
