"""a job is owned by one driver at a time: the lease's owner and expiry on the job row

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Jobs stored before this revision hold no lease; upgrade with no driver running (a driver of
    # the older version would not take one).
    op.add_column("illava_jobs", sa.Column("lease_owner", sa.String(length=200), nullable=True))
    op.add_column("illava_jobs", sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    # Plain ALTER TABLE ... DROP COLUMN (SQLite >= 3.35 has it), never a batch "move and copy": with
    # foreign keys on, dropping the old copy of illava_jobs would cascade to every trial.
    op.drop_column("illava_jobs", "lease_expires_at")
    op.drop_column("illava_jobs", "lease_owner")
