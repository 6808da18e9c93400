"""jobs say which speed they optimise; trials and published schedules carry the paired speedup

Jobs created before this revision optimised the median prefill latency ("latency"); new jobs
default to the speedup over the unmerged model measured in the same interleaved rounds.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("illava_jobs", sa.Column("objective", sa.String(length=16), nullable=False, server_default="latency"))
    op.add_column("illava_trials", sa.Column("speedup", sa.Float(), nullable=True))
    op.add_column("illava_published", sa.Column("speedup", sa.Float(), nullable=True))


def downgrade() -> None:
    # Plain DROP COLUMN (SQLite >= 3.35), never a batch copy: it would cascade to the trials.
    op.drop_column("illava_published", "speedup")
    op.drop_column("illava_trials", "speedup")
    op.drop_column("illava_jobs", "objective")
