"""Tuning jobs: an Optuna search over schedules, evaluated by Ray worker actors (one per GPU, or
CPU workers), every trial stored in the database, owned by one driver at a time (`jobs.lease`),
resumable after a driver dies, cancellable.
Wires `optimizer` + `profiler` + `db` together; nothing imports `jobs`."""

from .api import (
    InvalidInput,
    JobStatus,
    JobSummary,
    NoSchedules,
    about_field,
    best,
    cancel,
    dump,
    front,
    list_jobs,
    manifest,
    publish,
    published,
    resume_background,
    retire,
    schedule,
    seed_reductions,  # noqa: F401  (re-exported: the optimizer's, used by submit)
    start_background,
    status,
    submit,
)
from .driver import DriverStopped, Progress, progress, run

__all__ = [
    "DriverStopped",
    "InvalidInput",
    "JobStatus",
    "JobSummary",
    "NoSchedules",
    "Progress",
    "about_field",
    "best",
    "cancel",
    "dump",
    "front",
    "list_jobs",
    "manifest",
    "progress",
    "publish",
    "published",
    "resume_background",
    "retire",
    "run",
    "schedule",
    "seed_reductions",
    "start_background",
    "status",
    "submit",
]
