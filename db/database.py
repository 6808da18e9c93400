"""`Database`: where the rows live, how to open a session on them, and the schema's revision.

Thread safety: one `Database` may be shared by threads (the engine's pool is); a session may not.
Processes: a `Database` pickles without its engine (Ray ships it to workers) and builds a new one
on first use on the other side.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import (
    ArgumentError,
    DBAPIError,
    NoSuchModuleError,
    OperationalError,
    SQLAlchemyError,
    StatementError,
)
from sqlalchemy.orm import Session, sessionmaker

from . import migrate
from .errors import UPGRADE_HINT, DatabaseError

DEFAULT_URL = "sqlite:///illava.db"
_DRIVERS = {"sqlite": "sqlite", "postgresql": "postgresql+psycopg"}
_ALLOWED = "sqlite:///path/to/file.db or postgresql://user:password@host:port/database"


def normalize_url(url: str) -> URL:
    """`url` as SQLAlchemy URL with the driver this package is tested with: `postgresql://` and
    `postgres://` become `postgresql+psycopg://`; a relative SQLite path becomes absolute (against
    the current directory now), so a pickled `Database` opens the same file in any working directory."""
    try:
        parsed = make_url(url)
    except ArgumentError as err:
        raise ValueError(f"not a database URL: {url!r}; expected {_ALLOWED}") from err
    backend = parsed.get_backend_name()
    if backend == "postgres":
        backend = "postgresql"
    if backend not in ("sqlite", "postgresql"):
        raise ValueError(f"unsupported database {parsed.drivername!r} in {_mask(parsed)}; expected {_ALLOWED}")
    if "+" not in parsed.drivername:
        parsed = parsed.set(drivername=_DRIVERS[backend])
    elif parsed.drivername.startswith("postgres+"):  # SQLAlchemy knows only the long spelling
        parsed = parsed.set(drivername="postgresql+" + parsed.get_driver_name())
    if (
        backend == "sqlite"
        and parsed.database
        and parsed.database != ":memory:"
        and not parsed.database.startswith("file:")
    ):
        parsed = parsed.set(database=os.path.abspath(parsed.database))
    return parsed


def _mask(url: URL) -> str:
    return url.render_as_string(hide_password=True)


class Database:
    """A database by URL: `DATABASE_URL` from the environment when `url` is None, else
    `sqlite:///illava.db` in the current directory.

    `session()` opens a unit of work; `upgrade()` migrates the schema to what this package needs and
    `check_schema()` says whether that has been done. `connect_timeout` (seconds, PostgreSQL) bounds
    how long an unreachable server takes to fail."""

    def __init__(self, url: str | None = None, *, connect_timeout: int = 10, echo: bool = False) -> None:
        raw = url if url is not None else os.environ.get("DATABASE_URL") or DEFAULT_URL
        self._url = normalize_url(raw)
        self.connect_timeout = connect_timeout
        self.echo = echo
        self._engine: Engine | None = None
        self._sessionmaker: sessionmaker[Session] | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ identity
    @property
    def url(self) -> str:
        """The full URL, password included (what Optuna and Alembic connect with)."""
        return self._url.render_as_string(hide_password=False)

    @property
    def masked_url(self) -> str:
        """The URL with the password replaced by `***`, for messages and logs."""
        return _mask(self._url)

    @property
    def dialect(self) -> str:
        """`sqlite` or `postgresql`."""
        return self._url.get_backend_name()

    @property
    def optuna_storage_url(self) -> str:
        """Optuna's study tables live in the same database (under their own names and version table)."""
        return self.url

    def __repr__(self) -> str:
        return f"Database({self.masked_url!r})"

    # ------------------------------------------------------------------ pickling
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_engine=None, _sessionmaker=None, _lock=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ engine and sessions
    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine, created on first use (creating it does not connect)."""
        if self._engine is None:
            with self._lock:
                if self._engine is None:
                    self._engine = self._create_engine()
                    self._sessionmaker = sessionmaker(self._engine, expire_on_commit=False)
        return self._engine

    def _create_engine(self) -> Engine:
        kwargs: dict[str, Any] = {"echo": self.echo, "pool_pre_ping": True}
        if self.dialect == "postgresql":
            if "connect_timeout" not in self._url.query:
                kwargs["connect_args"] = {"connect_timeout": max(int(self.connect_timeout), 1)}
        else:
            kwargs["connect_args"] = {"timeout": 30.0}  # seconds to wait for another writer's lock
        try:
            engine = create_engine(self._url, **kwargs)
        except (NoSuchModuleError, ImportError) as err:
            raise DatabaseError(f"cannot use {self.masked_url}: the driver is not installed ({err})") from err
        if self.dialect == "sqlite":
            _sqlite_transactions(engine)
        return engine

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session that commits when the block ends and rolls back when it raises. SQLAlchemy and
        driver errors come out as `DatabaseError` saying what failed; other exceptions pass unchanged.
        Objects read in the block stay readable after it (attributes are not expired on commit)."""
        self.engine  # noqa: B018 (creates the sessionmaker)
        assert self._sessionmaker is not None
        session = self._sessionmaker()
        try:
            with self.translate_errors():
                try:
                    yield session
                    session.commit()
                except BaseException:
                    _rollback_quietly(session)
                    raise
        finally:
            session.close()

    @contextmanager
    def translate_errors(self, doing: str = "") -> Iterator[None]:
        """Turn SQLAlchemy and driver errors raised in the block into `DatabaseError`."""
        try:
            yield
        except StatementError as err:
            # A value our own types refused on the way in (a naive datetime) is bad input, not a database failure.
            if not isinstance(err, DBAPIError) and isinstance(err.orig, ValueError | TypeError):
                raise err.orig from err
            raise DatabaseError(describe_error(err, self.masked_url, doing)) from err
        except SQLAlchemyError as err:
            raise DatabaseError(describe_error(err, self.masked_url, doing)) from err

    def close(self) -> None:
        """Close the pooled connections (a later use reconnects)."""
        if self._engine is not None:
            self._engine.dispose()

    # ------------------------------------------------------------------ schema
    def upgrade(self, revision: str = "head") -> None:
        """Run this package's Alembic migrations up to `revision` (Optuna's tables are left alone)."""
        with self.translate_errors("upgrading the schema"), self.engine.begin() as connection:
            migrate.upgrade(connection, revision)

    def current_revision(self) -> str | None:
        """The schema revision the database is at; None when it was never migrated."""
        with self.translate_errors("reading the schema revision"), self.engine.connect() as connection:
            return migrate.current_revision(connection)

    def check_schema(self) -> None:
        """Raise `SchemaError` unless the database is at the revision this package needs."""
        current = self.current_revision()
        head = migrate.head_revision()
        if current == head:
            return
        if current is None:
            raise migrate.schema_error(self.masked_url, "not migrated yet (no illava tables)", head)
        if current not in migrate.known_revisions():
            raise migrate.newer_schema_error(self.masked_url, current, head)
        raise migrate.schema_error(self.masked_url, f"at revision {current}", head)


def describe_error(err: SQLAlchemyError, where: str, doing: str = "") -> str:
    """One line saying what failed and where, with the driver's own words."""
    orig = getattr(err, "orig", None)
    detail = " ".join(str(orig if orig is not None else err).split())
    if isinstance(err, OperationalError) and err.statement is None:
        return f"cannot connect to {where}: {detail}"
    what = f"{doing} failed" if doing else "database operation failed"
    message = f"{what} on {where}: {type(err).__name__}: {detail}"
    lowered = detail.lower()
    if "no such table" in lowered or ("relation" in lowered and "does not exist" in lowered):
        message += f" (is the schema created? {UPGRADE_HINT})"
    return message


def _rollback_quietly(session: Session) -> None:
    # A rollback on a dead connection raises too; the error worth reporting is the first one.
    with suppress(SQLAlchemyError):
        session.rollback()


def _sqlite_transactions(engine: Engine) -> None:
    """pysqlite begins transactions lazily and commits before DDL, which breaks SAVEPOINT and
    transactional migrations; take over BEGIN ourselves (the recipe in SQLAlchemy's SQLite docs)
    and turn on foreign keys, which SQLite leaves off per connection.

    BEGIN IMMEDIATE, not a deferred BEGIN: a deferred transaction that has read and then writes must
    upgrade its lock, and when another connection is already waiting to commit SQLite refuses that
    upgrade at once ("database is locked") instead of waiting out the busy timeout, since neither
    could go on. A job's driver and a CLI cancelling it hit that under load. Taking the write lock at
    BEGIN makes every transaction wait its turn (up to the 30 s timeout); they are all short."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")
