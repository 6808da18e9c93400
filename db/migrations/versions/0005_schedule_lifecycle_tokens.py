"""schedules have a lifecycle (candidate, published, retired); the HTTP service's tokens

Schedules stored before this revision were the points of their jobs' fronts: they become
candidates on those fronts. None is published behind the user's back: `illava-tune publish ID`
chooses what deployments are given.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "illava_published", sa.Column("status", sa.String(length=16), nullable=False, server_default="candidate")
    )
    op.add_column("illava_published", sa.Column("on_front", sa.Boolean(), nullable=False, server_default=sa.true()))
    op.add_column("illava_published", sa.Column("published_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("illava_published", sa.Column("retired_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index(op.f("ix_illava_published_status"), "illava_published", ["status"])
    # On SQLite a constraint is added by copying the table (batch mode). That is safe here: no
    # foreign key points at illava_published, so dropping its old copy cascades to nothing.
    with op.batch_alter_table("illava_published") as batch:
        batch.create_check_constraint(
            op.f("ck_illava_published_status"), "status IN ('candidate', 'published', 'retired')"
        )
    op.create_table(
        "illava_tokens",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("scope", sa.String(length=8), nullable=False),
        sa.Column("secret_sha256", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("scope IN ('read', 'write')", name=op.f("ck_illava_tokens_scope")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_illava_tokens")),
        sa.UniqueConstraint("key", name=op.f("uq_illava_tokens_key")),
    )
    op.create_table(
        "illava_changes",
        sa.Column("name", sa.String(length=32), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_illava_changes")),
    )


def downgrade() -> None:
    op.drop_table("illava_changes")
    op.drop_table("illava_tokens")
    with op.batch_alter_table("illava_published") as batch:
        batch.drop_constraint(op.f("ck_illava_published_status"), type_="check")
    op.drop_index(op.f("ix_illava_published_status"), table_name="illava_published")
    # Plain DROP COLUMN (SQLite >= 3.35), never a batch copy.
    for column in ("retired_at", "published_at", "on_front", "status"):
        op.drop_column("illava_published", column)
