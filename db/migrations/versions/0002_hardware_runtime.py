"""hardware groups carry the model's dtype and attention: stored groups are re-keyed as float32/sdpa

Until this revision jobs and `profile` loaded every backbone in float32 with sdpa, and a hardware
group's key named the device only ("cpu:Intel Xeon x8"). Keys now end in "<dtype>/<attention>", so
the groups measured before are what they were measured in: "cpu:Intel Xeon x8 float32/sdpa", and
their profiles gain the two fields. Keys chosen by hand (not the device-derived form) are left alone.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

RUNTIME = {"dtype": "float32", "attention": "sdpa"}
SUFFIX = " float32/sdpa"

hardware = sa.table(
    "illava_hardware",
    sa.column("id", sa.Integer()),
    sa.column("key", sa.String(200)),
    sa.column("profile", sa.JSON(none_as_null=True)),
)


def _device_key(profile: dict) -> str | None:
    """The key revision 0001's code derived from a profile (None: the profile cannot give one)."""
    kind, name = profile.get("kind"), profile.get("name")
    if kind == "cuda" and name:
        mig = profile.get("mig_profile")
        return f"cuda:{name}" + (f" MIG {mig}" if mig else "")
    if kind == "cpu" and name and profile.get("threads") is not None:
        return f"cpu:{name} x{profile['threads']}"
    return None


def upgrade() -> None:
    connection = op.get_bind()
    for row in connection.execute(sa.select(hardware.c.id, hardware.c.key, hardware.c.profile)).all():
        profile = dict(row.profile or {})
        if "dtype" in profile or "attention" in profile:
            continue
        values = {"profile": {**profile, **RUNTIME}}
        if row.key == _device_key(profile):
            values["key"] = row.key + SUFFIX
        connection.execute(sa.update(hardware).where(hardware.c.id == row.id).values(**values))


def downgrade() -> None:
    connection = op.get_bind()
    for row in connection.execute(sa.select(hardware.c.id, hardware.c.key, hardware.c.profile)).all():
        profile = dict(row.profile or {})
        if {k: profile.get(k) for k in RUNTIME} != RUNTIME:
            continue  # measured in another configuration: kept as its own group, under its own key
        values = {"profile": {k: v for k, v in profile.items() if k not in RUNTIME}}
        if row.key.endswith(SUFFIX) and row.key[: -len(SUFFIX)] == _device_key(profile):
            values["key"] = row.key[: -len(SUFFIX)]
        connection.execute(sa.update(hardware).where(hardware.c.id == row.id).values(**values))
