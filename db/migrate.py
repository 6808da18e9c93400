"""Alembic, driven from code: the migrations ship inside the package (`db/migrations/`), there is
no alembic.ini, and the version table is `illava_alembic_version` because Optuna, whose tables
share the database, keeps its own revision in Alembic's default `alembic_version`.

To write the next migration after changing `db/models.py` (run from the repository root against a
database at the current head)::

    python -c "from alembic import command; from db.migrate import alembic_config; \
command.revision(alembic_config(url='sqlite:///dev.db'), 'what changed', autogenerate=True)"

then read and fix the generated file in `db/migrations/versions/`.

Alembic's own log lines (logger `alembic`, at INFO) name the dialect and the migrations run, never
the URL; messages raised from here get the database's masked URL from `Database`.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Connection, inspect

from .errors import UPGRADE_HINT, SchemaError
from .models import TABLE_PREFIX, Base

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


def stamp(connection: Connection, revision: str) -> None:
    """Record `revision` in the version table without running migrations."""
    command.stamp(alembic_config(connection), revision)


def current_revision(connection: Connection) -> str | None:
    context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
    return context.get_current_revision()


def illava_tables(connection: Connection) -> list[str]:
    """The names of this package's tables the database has (the version table not counted)."""
    return sorted(name for name in inspect(connection).get_table_names() if include_name(name, "table", {}))


def schema_differences(connection: Connection) -> list[str]:
    """How the database's illava tables differ from the models of this package's head revision,
    one phrase per difference ("column illava_jobs.x missing"); empty when they match."""
    context = MigrationContext.configure(
        connection, opts={"include_name": include_name, "compare_type": True, "version_table": VERSION_TABLE}
    )
    return [_describe_difference(difference) for difference in compare_metadata(context, Base.metadata)]


def _describe_difference(difference: Any) -> str:
    """One of `compare_metadata`'s entries in words: a tuple ("add_column", schema, table, column),
    ("remove_index", index), ...; or, for one column's modify_* changes, a list of such tuples."""
    if isinstance(difference, list):
        _, _, table, column, *_ = difference[0]
        changed = ", ".join(change[0].removeprefix("modify_") for change in difference)
        return f"column {table}.{column} differs ({changed})"
    operation, *args = difference
    action, _, kind = operation.partition("_")
    subject = args[-1]
    name = getattr(subject, "name", None) or getattr(getattr(subject, "table", None), "name", "?")
    if kind == "column":
        name = f"{args[-2]}.{name}"
    where = {"add": "missing", "remove": "not in the models"}.get(action, action)
    return f"{kind.replace('fk', 'foreign key')} {name} {where}"


@lru_cache(maxsize=1)
def _script() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


def head_revision() -> str:
    """The revision this package's models correspond to."""
    head = _script().get_current_head()
    assert head is not None, f"no migrations in {MIGRATIONS_DIR}"
    return head


def known_revisions() -> set[str]:
    return set(revision_history())


def revision_history() -> list[str]:
    """This package's revisions, oldest first (the last is `head_revision()`)."""
    return [script.revision for script in reversed(list(_script().walk_revisions()))]


def resolve_revision(revision: str) -> str:
    """`revision` ("head", a revision id or a unique prefix of one) as a full revision id;
    `ValueError`, listing the known revisions, when there is no such revision."""
    try:
        script = _script().get_revision(revision)
    except CommandError:
        script = None
    if script is None:
        raise ValueError(f"unknown schema revision {revision!r}; known: {describe_revisions()}, or head")
    return script.revision


def describe_revisions() -> str:
    """The known revisions, oldest first, each with the first words of its description."""
    scripts = [_script().get_revision(revision) for revision in revision_history()]
    return ", ".join(f"{script.revision} ({(script.doc or '').split(':')[0].strip()})" for script in scripts)


def schema_error(where: str, state: str, head: str) -> SchemaError:
    return SchemaError(f"database at {where} is {state}, this illava-tune needs revision {head}: {UPGRADE_HINT}")


def unrecorded_schema_error(where: str, differences: list[str]) -> SchemaError:
    """The illava tables exist but no revision is recorded; `differences` from `schema_differences`."""
    head = head_revision()
    state = f"database at {where} has the illava tables but no recorded schema revision ({VERSION_TABLE} is empty or missing)"
    if not differences:
        return SchemaError(f"{state}; the tables match revision {head}: run `illava-tune db stamp head`")
    shown = "; ".join(differences[:3]) + (f"; and {len(differences) - 3} more" if len(differences) > 3 else "")
    return SchemaError(
        f"{state}, and the tables do not match revision {head} ({shown}): run `illava-tune db stamp REVISION` "
        f"with the revision they were created by (known, oldest first: {describe_revisions()}), "
        "then `illava-tune db upgrade`"
    )


def newer_schema_error(where: str, current: str, head: str) -> SchemaError:
    return SchemaError(
        f"database at {where} is at revision {current}, which this illava-tune does not know (it needs {head}): "
        "the database was migrated by a newer illava-tune; install that version"
    )
