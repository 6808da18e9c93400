"""initial schema: backbones, hardware, workloads, tuning jobs, trials, published schedules

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


# Every name is wrapped in op.f(): Alembic applies the models' naming convention to the tables
# built here, and op.f() marks a name as final (the "ck" template would otherwise be applied twice).


def _json() -> sa.JSON:
    return sa.JSON(none_as_null=True)


def upgrade() -> None:
    op.create_table(
        "illava_backbones",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("path", sa.Text(), nullable=True),
        sa.Column("config", _json(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_illava_backbones")),
        sa.UniqueConstraint("name", name=op.f("uq_illava_backbones_name")),
    )
    op.create_table(
        "illava_hardware",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(length=200), nullable=False),
        sa.Column("profile", _json(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_illava_hardware")),
        sa.UniqueConstraint("key", name=op.f("uq_illava_hardware_key")),
    )
    op.create_table(
        "illava_workloads",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("spec", _json(), nullable=False),
        sa.Column("fingerprint", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_illava_workloads")),
        sa.UniqueConstraint("fingerprint", name=op.f("uq_illava_workloads_fingerprint")),
    )
    op.create_index(op.f("ix_illava_workloads_name"), "illava_workloads", ["name"])

    op.create_table(
        "illava_jobs",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("study_name", sa.String(length=64), nullable=False),
        sa.Column("backbone_id", sa.Integer(), nullable=False),
        sa.Column("hardware_id", sa.Integer(), nullable=False),
        sa.Column("workload_id", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("n_trials", sa.Integer(), nullable=False),
        sa.Column("n_workers", sa.Integer(), nullable=False),
        sa.Column("sampler", sa.String(length=32), nullable=False),
        sa.Column("seed", sa.Integer(), nullable=True),
        sa.Column("search_space", _json(), nullable=False),
        sa.Column("constraints", _json(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.CheckConstraint(
            "status IN ('queued', 'running', 'completed', 'failed', 'cancelled')", name=op.f("ck_illava_jobs_status")
        ),
        sa.CheckConstraint("n_trials >= 1", name=op.f("ck_illava_jobs_n_trials")),
        sa.CheckConstraint("n_workers >= 1", name=op.f("ck_illava_jobs_n_workers")),
        sa.ForeignKeyConstraint(["backbone_id"], ["illava_backbones.id"], name=op.f("fk_illava_jobs_backbone_id")),
        sa.ForeignKeyConstraint(["hardware_id"], ["illava_hardware.id"], name=op.f("fk_illava_jobs_hardware_id")),
        sa.ForeignKeyConstraint(["workload_id"], ["illava_workloads.id"], name=op.f("fk_illava_jobs_workload_id")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_illava_jobs")),
        sa.UniqueConstraint("study_name", name=op.f("uq_illava_jobs_study_name")),
    )
    op.create_index(op.f("ix_illava_jobs_backbone_id"), "illava_jobs", ["backbone_id"])
    op.create_index(op.f("ix_illava_jobs_hardware_id"), "illava_jobs", ["hardware_id"])
    op.create_index(op.f("ix_illava_jobs_workload_id"), "illava_jobs", ["workload_id"])
    op.create_index(op.f("ix_illava_jobs_created_at"), "illava_jobs", ["created_at"])

    op.create_table(
        "illava_trials",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.String(length=32), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("schedule", _json(), nullable=False),
        sa.Column("latency_ms", sa.Float(), nullable=True),
        sa.Column("memory_mib", sa.Float(), nullable=True),
        sa.Column("accuracy", sa.Float(), nullable=True),
        sa.Column("retention", sa.Float(), nullable=True),
        sa.Column("fidelity", sa.Float(), nullable=True),
        sa.Column("feasible", sa.Boolean(), nullable=True),
        sa.Column("metrics", _json(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("state IN ('running', 'complete', 'failed')", name=op.f("ck_illava_trials_state")),
        sa.CheckConstraint("number >= 0", name=op.f("ck_illava_trials_number")),
        sa.ForeignKeyConstraint(
            ["job_id"], ["illava_jobs.id"], name=op.f("fk_illava_trials_job_id"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_illava_trials")),
        sa.UniqueConstraint("job_id", "number", name=op.f("uq_illava_trials_job_id_number")),
    )

    op.create_table(
        "illava_published",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.String(length=32), nullable=False),
        sa.Column("trial_id", sa.Integer(), nullable=False),
        sa.Column("backbone_id", sa.Integer(), nullable=False),
        sa.Column("hardware_id", sa.Integer(), nullable=False),
        sa.Column("workload_id", sa.Integer(), nullable=False),
        sa.Column("schedule", _json(), nullable=False),
        sa.Column("latency_ms", sa.Float(), nullable=False),
        sa.Column("memory_mib", sa.Float(), nullable=False),
        sa.Column("accuracy", sa.Float(), nullable=True),
        sa.Column("retention", sa.Float(), nullable=True),
        sa.Column("fidelity", sa.Float(), nullable=True),
        sa.Column("metrics", _json(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["backbone_id"], ["illava_backbones.id"], name=op.f("fk_illava_published_backbone_id")),
        sa.ForeignKeyConstraint(["hardware_id"], ["illava_hardware.id"], name=op.f("fk_illava_published_hardware_id")),
        sa.ForeignKeyConstraint(["workload_id"], ["illava_workloads.id"], name=op.f("fk_illava_published_workload_id")),
        sa.ForeignKeyConstraint(
            ["job_id"], ["illava_jobs.id"], name=op.f("fk_illava_published_job_id"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["trial_id"], ["illava_trials.id"], name=op.f("fk_illava_published_trial_id"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_illava_published")),
    )
    op.create_index(
        op.f("ix_illava_published_lookup"), "illava_published", ["backbone_id", "hardware_id", "workload_id"]
    )
    op.create_index(op.f("ix_illava_published_job_id"), "illava_published", ["job_id"])
    op.create_index(op.f("ix_illava_published_trial_id"), "illava_published", ["trial_id"])


def downgrade() -> None:
    # Dropping a table drops its indexes and constraints; children first.
    for table in ("illava_published", "illava_trials", "illava_jobs", "illava_workloads", "illava_hardware"):
        op.drop_table(table)
    op.drop_table("illava_backbones")
