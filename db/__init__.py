"""Storage of tuning jobs, their trials and the published schedules: SQLAlchemy 2.0 models,
sessions and Alembic migrations; SQLite by default, PostgreSQL in production.

Layers, as in the rest of the service: the schema (`db.models`), data-access functions that take a
session, flush and never commit (`db.queries`), and `Database`, which owns engines, transactions
and the schema revision. Schedules, workloads, hardware profiles and measurements are stored as
the JSON their own packages produce; nothing here imports those packages.
"""

from . import queries
from .database import DEFAULT_URL, Database, normalize_url
from .errors import AmbiguousId, BudgetExhausted, Conflict, DatabaseError, LeaseHeld, LeaseLost, NotFound, SchemaError
from .migrate import VERSION_TABLE, head_revision
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
    JobState,
    PublishedSchedule,
    Trial,
    TrialState,
    TuningJob,
    WorkloadRow,
)

__all__ = [
    "DEFAULT_URL",
    "JOB_FINISHED",
    "JOB_STATES",
    "SCHEDULE_STATUSES",
    "TOKEN_SCOPES",
    "TRIAL_FINISHED",
    "TRIAL_STATES",
    "VERSION_TABLE",
    "AmbiguousId",
    "ApiToken",
    "Backbone",
    "BudgetExhausted",
    "Base",
    "ChangeCounter",
    "Conflict",
    "Database",
    "DatabaseError",
    "HardwareProfileRow",
    "JobState",
    "LeaseHeld",
    "LeaseLost",
    "NotFound",
    "PublishedSchedule",
    "SchemaError",
    "Trial",
    "TrialState",
    "TuningJob",
    "WorkloadRow",
    "head_revision",
    "normalize_url",
    "queries",
]
