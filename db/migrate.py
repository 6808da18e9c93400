"""Alembic, driven from code: the migrations ship inside the package (`db/migrations/`), there is
no alembic.ini, and the version table is `illava_alembic_version` because Optuna, whose tables
share the database, keeps its own revision in Alembic's default `alembic_version`.

To write the next migration after changing `db/models.py` (run from the repository root against a
database at the current head)::

    python -c "from alembic import command; from db.migrate import alembic_config; \
command.revision(alembic_config(url='sqlite:///dev.db'), 'what changed', autogenerate=True)"

then read and fix the generated file in `db/migrations/versions/`.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection

from .errors import UPGRADE_HINT, SchemaError
from .models import TABLE_PREFIX

MIGRATIONS_DIR = Path(__file__).resolve().with_name("migrations")
VERSION_TABLE = "illava_alembic_version"


def alembic_config(connection: Connection | None = None, *, url: str | None = None) -> Config:
    """An Alembic `Config` for this package's migrations; `connection` (used as is, inside its
    transaction) or `url` says which database."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("path_separator", "os")
    config.set_main_option("file_template", "%%(rev)s_%%(slug)s")
    if url is not None:
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def include_name(name: str | None, type_: str, parent_names: dict[str, str | None]) -> bool:
    """Alembic's view of the database: our tables only (Optuna's live beside them)."""
    if type_ == "table":
        return name is not None and name.startswith(TABLE_PREFIX) and name != VERSION_TABLE
    return True


def upgrade(connection: Connection, revision: str = "head") -> None:
    command.upgrade(alembic_config(connection), revision)


def downgrade(connection: Connection, revision: str) -> None:
    command.downgrade(alembic_config(connection), revision)


def current_revision(connection: Connection) -> str | None:
    context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
    return context.get_current_revision()


@lru_cache(maxsize=1)
def _script() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


def head_revision() -> str:
    """The revision this package's models correspond to."""
    head = _script().get_current_head()
    assert head is not None, f"no migrations in {MIGRATIONS_DIR}"
    return head


def known_revisions() -> set[str]:
    return {script.revision for script in _script().walk_revisions()}


def schema_error(where: str, state: str, head: str) -> SchemaError:
    return SchemaError(f"database at {where} is {state}, this illava-tune needs revision {head}: {UPGRADE_HINT}")


def newer_schema_error(where: str, current: str, head: str) -> SchemaError:
    return SchemaError(
        f"database at {where} is at revision {current}, which this illava-tune does not know (it needs {head}): "
        "the database was migrated by a newer illava-tune; install that version"
    )
