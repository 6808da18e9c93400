"""The schema: typed SQLAlchemy 2.0 models of what a tuning job reads and writes.

Every table is prefixed `illava_` because Optuna keeps its study tables in the same database and
one of them is called `trials`. Constraint names come from `NAMING_CONVENTION`, so a migration can
name (and later drop) any of them the same way on SQLite and PostgreSQL. Schedules, workloads,
hardware profiles and measurements are stored as JSON documents the other packages produce
(`to_dict()`); this package never interprets them beyond the few columns it indexes or filters on.

Timestamps are timezone-aware UTC in Python on every backend (`UTCDateTime`).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    true,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

JobState = Literal["queued", "running", "completed", "failed", "cancelled"]
TrialState = Literal["running", "complete", "failed"]
JOB_STATES: tuple[JobState, ...] = ("queued", "running", "completed", "failed", "cancelled")
JOB_FINISHED: tuple[JobState, ...] = ("completed", "failed", "cancelled")
TRIAL_STATES: tuple[TrialState, ...] = ("running", "complete", "failed")
TRIAL_FINISHED: tuple[TrialState, ...] = ("complete", "failed")
ScheduleStatus = Literal["candidate", "published", "retired"]
SCHEDULE_STATUSES: tuple[ScheduleStatus, ...] = ("candidate", "published", "retired")
TokenScope = Literal["read", "write"]
TOKEN_SCOPES: tuple[TokenScope, ...] = ("read", "write")

TABLE_PREFIX = "illava_"

# Short templates on purpose: PostgreSQL cuts identifiers at 63 characters.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s",
    "pk": "pk_%(table_name)s",
}


def _one_of(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN (" + ", ".join(f"'{value}'" for value in values) + ")"


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """`DateTime(timezone=True)` that always hands back an aware UTC datetime.

    PostgreSQL stores `timestamptz` and returns it in the session's time zone; SQLite stores text
    without an offset. Either way the value is normalised to UTC on the way in and out, and a naive
    datetime is refused (its time zone would be a guess)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if not isinstance(value, datetime):
            raise TypeError(f"expected a datetime, got {type(value).__name__}")
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value.isoformat()}: pass a timezone-aware one (UTC)")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _json() -> JSON:
    # none_as_null: Python None is SQL NULL, not the JSON literal `null`.
    return JSON(none_as_null=True)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)

    def to_dict(self) -> dict[str, Any]:
        """Column values by attribute name (datetimes stay datetimes, JSON stays parsed)."""
        return {column.key: getattr(self, column.key) for column in self.__mapper__.column_attrs}

    def __repr__(self) -> str:
        ident = getattr(self, "id", None)
        return f"<{type(self).__name__} id={ident!r}>"


class Backbone(Base):
    """A model that schedules are tuned for, by name (`small`, `qwen2.5-vl-7b`); `path` is where
    the last job that used it loaded it from, `config` its model config as JSON."""

    __tablename__ = "illava_backbones"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    path: Mapped[str | None] = mapped_column(Text)
    config: Mapped[dict[str, Any] | None] = mapped_column(_json())


class HardwareProfileRow(Base):
    """One group of comparable hardware (`profiler.HardwareProfile.key()`) and the first profile seen with it."""

    __tablename__ = "illava_hardware"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(200), unique=True)
    profile: Mapped[dict[str, Any]] = mapped_column(_json())


class WorkloadRow(Base):
    """A workload spec (`profiler.Workload.to_dict()`), deduplicated by the sha256 of its canonical JSON."""

    __tablename__ = "illava_workloads"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), index=True)
    spec: Mapped[dict[str, Any]] = mapped_column(_json())
    fingerprint: Mapped[str] = mapped_column(String(64), unique=True)


class TuningJob(Base):
    """One search for the Pareto front of schedules of a backbone on a hardware and workload.
    `id` is a uuid4 hex; the Optuna study (same database) is `study_name`."""

    __tablename__ = "illava_jobs"
    __table_args__ = (
        CheckConstraint(_one_of("status", JOB_STATES), name="status"),
        CheckConstraint("n_trials >= 1", name="n_trials"),
        CheckConstraint("n_workers >= 1", name="n_workers"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    study_name: Mapped[str] = mapped_column(String(64), unique=True)
    backbone_id: Mapped[int] = mapped_column(ForeignKey("illava_backbones.id"), index=True)
    hardware_id: Mapped[int] = mapped_column(ForeignKey("illava_hardware.id"), index=True)
    workload_id: Mapped[int] = mapped_column(ForeignKey("illava_workloads.id"), index=True)
    status: Mapped[str] = mapped_column(String(16), default="queued")
    n_trials: Mapped[int] = mapped_column(Integer)
    n_workers: Mapped[int] = mapped_column(Integer)
    sampler: Mapped[str] = mapped_column(String(32))
    seed: Mapped[int | None] = mapped_column(Integer)
    search_space: Mapped[dict[str, Any]] = mapped_column(_json())
    constraints: Mapped[dict[str, Any]] = mapped_column(_json())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    error: Mapped[str | None] = mapped_column(Text)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    # The driver that owns the job ("host:pid:token", see `db.queries.acquire_lease`) and until when
    # its lease holds without another check-in. NULL owner: no driver holds the job.
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # The speed the job optimises: "speedup" over the unmerged model (paired rounds) or "latency" in ms.
    # Jobs stored before this column optimised latency, hence the server default.
    objective: Mapped[str] = mapped_column(String(16), default="speedup", server_default="latency")

    # Many-to-one rows load with the job so a job read in a session stays usable after it closes.
    backbone: Mapped[Backbone] = relationship(lazy="joined", innerjoin=True)
    hardware: Mapped[HardwareProfileRow] = relationship(lazy="joined", innerjoin=True)
    workload: Mapped[WorkloadRow] = relationship(lazy="joined", innerjoin=True)
    trials: Mapped[list[Trial]] = relationship(
        back_populates="job", order_by="Trial.number", cascade="all, delete-orphan", passive_deletes=True
    )


class Trial(Base):
    """One measured schedule of a job; `number` is the Optuna trial number, unique per job.
    `metrics` is the whole `profiler.Measurement.to_dict()`; the float columns are the figures the
    search and the queries use (latency in milliseconds, memory in MiB)."""

    __tablename__ = "illava_trials"
    __table_args__ = (
        UniqueConstraint("job_id", "number"),
        CheckConstraint(_one_of("state", TRIAL_STATES), name="state"),
        CheckConstraint("number >= 0", name="number"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("illava_jobs.id", ondelete="CASCADE"))
    number: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16))
    schedule: Mapped[dict[str, Any]] = mapped_column(_json())
    latency_ms: Mapped[float | None] = mapped_column(Float)
    memory_mib: Mapped[float | None] = mapped_column(Float)
    accuracy: Mapped[float | None] = mapped_column(Float)
    retention: Mapped[float | None] = mapped_column(Float)
    fidelity: Mapped[float | None] = mapped_column(Float)
    feasible: Mapped[bool | None] = mapped_column(Boolean)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(_json())
    error: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # Over the unmerged model, median of the paired rounds (`metrics["speedup"]` has the spread).
    speedup: Mapped[float | None] = mapped_column(Float)

    job: Mapped[TuningJob] = relationship(back_populates="trials")


class PublishedSchedule(Base):
    """A schedule deployments may be given: a point of a job's Pareto front (or a trial a user chose),
    copied out of its trial so queries by backbone, hardware and workload need no join through jobs
    and trials.

    Its `status` is its lifecycle: a point of a front is a "candidate"; `publish` makes it
    "published", the set `best` and the HTTP service answer deployments from; `retire` withdraws it
    ("retired", kept for the record). `on_front` says whether it is on its job's latest front: a
    published schedule stays published when a resumed job's front moves on."""

    __tablename__ = "illava_published"
    __table_args__ = (
        Index("ix_illava_published_lookup", "backbone_id", "hardware_id", "workload_id"),
        CheckConstraint(_one_of("status", SCHEDULE_STATUSES), name="status"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("illava_jobs.id", ondelete="CASCADE"), index=True)
    trial_id: Mapped[int] = mapped_column(ForeignKey("illava_trials.id", ondelete="CASCADE"), index=True)
    backbone_id: Mapped[int] = mapped_column(ForeignKey("illava_backbones.id"))
    hardware_id: Mapped[int] = mapped_column(ForeignKey("illava_hardware.id"))
    workload_id: Mapped[int] = mapped_column(ForeignKey("illava_workloads.id"))
    schedule: Mapped[dict[str, Any]] = mapped_column(_json())
    latency_ms: Mapped[float] = mapped_column(Float)
    memory_mib: Mapped[float] = mapped_column(Float)
    accuracy: Mapped[float | None] = mapped_column(Float)
    retention: Mapped[float | None] = mapped_column(Float)
    fidelity: Mapped[float | None] = mapped_column(Float)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(_json())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    speedup: Mapped[float | None] = mapped_column(Float)
    status: Mapped[str] = mapped_column(String(16), default="candidate", server_default="candidate", index=True)
    on_front: Mapped[bool] = mapped_column(Boolean, default=True, server_default=true())
    published_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    retired_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    backbone: Mapped[Backbone] = relationship(lazy="joined", innerjoin=True)
    hardware: Mapped[HardwareProfileRow] = relationship(lazy="joined", innerjoin=True)
    workload: Mapped[WorkloadRow] = relationship(lazy="joined", innerjoin=True)


class ApiToken(Base):
    """A token the HTTP service accepts. The token itself (`ilt_<key>_<secret>`) is shown once when
    it is created; only `key` (public, to find the row) and the sha256 of the secret are stored.
    A "write" token may also read. A revoked token is kept, with `revoked_at`, for the record."""

    __tablename__ = "illava_tokens"
    __table_args__ = (CheckConstraint(_one_of("scope", TOKEN_SCOPES), name="scope"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(32), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    scope: Mapped[str] = mapped_column(String(8))
    secret_sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class ChangeCounter(Base):
    """A counter per kind of change (`name`, "schedules"), bumped in the transaction that makes the
    change: a server holding answers in memory compares one small row to know they are current."""

    __tablename__ = "illava_changes"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    version: Mapped[int] = mapped_column(Integer)
