"""`Database`: where the rows live, how to open a session on them, and the schema's revision.

Thread safety: one `Database` may be shared by threads (the engine's pool is); a session may not.
Processes: a `Database` pickles without its engine (Ray ships it to workers) and builds a new one
on first use on the other side. Processes that create or alter tables in the same database at once
(several first `submit`s, each creating the schema, or Optuna's tables) take turns under
`Database.schema_lock()`.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext, suppress
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, text
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
from .errors import UPGRADE_HINT, DatabaseError, SchemaError

try:
    import fcntl
except ImportError:  # not POSIX: SQLite's schema lock is then a no-op
    fcntl = None  # type: ignore[assignment]

DEFAULT_URL = "sqlite:///illava.db"
_DRIVERS = {"sqlite": "sqlite", "postgresql": "postgresql+psycopg"}
_ALLOWED = "sqlite:///path/to/file.db or postgresql://user:password@host:port/database"

#: The PostgreSQL advisory-lock key of `Database.schema_lock()`, and so of every `upgrade` and
#: `stamp`: the eight ASCII bytes "illavadb" read as one big-endian bigint (0x696C6C6176616462).
#: One fixed key, never derived from anything that changes between releases, so that every
#: version of illava-tune serialises with every other. Advisory locks are scoped to one database,
#: so databases on the same server never wait for each other. Neither Optuna nor Alembic takes
#: advisory locks; an unrelated application would have to pick these exact 64 bits to collide
#: (it would then only wait, never fail).
SCHEMA_LOCK_KEY = int.from_bytes(b"illavadb", "big")
#: How long `schema_lock()` waits by default: creating or migrating the schema takes seconds.
SCHEMA_LOCK_TIMEOUT_S = 300.0
_LOCK_NOT_AVAILABLE = "55P03"  # PostgreSQL's SQLSTATE when lock_timeout ran out


def normalize_url(url: str) -> URL:
    """`url` as SQLAlchemy URL with the driver this package is tested with: `postgresql://` and
    `postgres://` become `postgresql+psycopg://`; a relative SQLite path becomes absolute (against
    the current directory now), so a pickled `Database` opens the same file in any working directory."""
    try:
        parsed = make_url(url)
    except ArgumentError as err:
        raise ValueError(f"not a database URL: {_mask_unparsed(url)!r}; expected {_ALLOWED}") from err
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


def _mask_unparsed(url: str) -> str:
    """A string that is not a URL may still hold a password ("user:secret@host/db"): everything
    before its last "@" but a scheme is hidden."""
    userinfo, at, rest = url.rpartition("@")
    if not at:
        return url
    scheme, separator, _ = userinfo.partition("://")
    return f"{scheme}{separator}***@{rest}" if separator else f"***@{rest}"


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
        self._schema_lock_depth = threading.local()  # `.value`: how deep this thread is in schema_lock()

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
        state.update(_engine=None, _sessionmaker=None, _lock=None, _schema_lock_depth=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._schema_lock_depth = threading.local()

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
            raise DatabaseError(self._describe(err, doing)) from err
        except SQLAlchemyError as err:
            raise DatabaseError(self._describe(err, doing)) from err

    def _describe(self, err: SQLAlchemyError, doing: str) -> str:
        message = describe_error(err, self.masked_url, doing)
        # The driver's own words should never hold the password; make sure.
        return message.replace(self._url.password, "***") if self._url.password else message

    def close(self) -> None:
        """Close the pooled connections (a later use reconnects)."""
        if self._engine is not None:
            self._engine.dispose()

    # ------------------------------------------------------------------ schema
    def upgrade(self, revision: str = "head") -> None:
        """Run this package's Alembic migrations up to `revision` (Optuna's tables are left alone).

        Under `schema_lock()`: of several processes upgrading a fresh database at once, one creates
        the schema and the others, once it is done, find it at `revision` and do nothing. Raises
        `SchemaError` when the illava tables exist but no revision is recorded (see `check_schema`)."""
        with (
            self.translate_errors("upgrading the schema"),
            self.schema_lock(),
            self.engine.begin() as connection,
        ):
            if migrate.current_revision(connection) is None:
                self._refuse_unrecorded_tables(connection)
            migrate.upgrade(connection, revision)

    def stamp(self, revision: str = "head") -> str:
        """Record `revision` ("head", a revision id or its unique prefix) as the schema's revision
        without running any migration, and return its full id: the repair for illava tables whose
        revision row was lost. Only where tables exist and no revision is recorded (a recorded one
        is changed by `upgrade`, never overwritten); `ValueError` for an unknown revision."""
        target = migrate.resolve_revision(revision)
        with (
            self.translate_errors("stamping the schema revision"),
            self.schema_lock(),
            self.engine.begin() as connection,
        ):
            current = migrate.current_revision(connection)
            if current == target:
                return target
            if current is not None:
                raise SchemaError(
                    f"database at {self.masked_url} is already at revision {current}: `db stamp` only records a "
                    f"revision where none is recorded; {UPGRADE_HINT} to migrate it to {migrate.head_revision()}"
                )
            if not migrate.illava_tables(connection):
                raise SchemaError(
                    f"database at {self.masked_url} has no illava tables, so there is no revision to record: "
                    f"{UPGRADE_HINT} to create them"
                )
            migrate.stamp(connection, target)
        return target

    def current_revision(self) -> str | None:
        """The schema revision the database is at; None when it was never migrated (or its
        revision row is lost: `check_schema` tells the two apart)."""
        with self.translate_errors("reading the schema revision"), self.engine.connect() as connection:
            return migrate.current_revision(connection)

    def check_schema(self) -> None:
        """Raise `SchemaError` unless the database is at the revision this package needs, saying
        what to run: `db upgrade` for a database not (fully) migrated, `db stamp` for illava tables
        whose recorded revision is gone."""
        head = migrate.head_revision()
        with self.translate_errors("checking the schema"), self.engine.connect() as connection:
            current = migrate.current_revision(connection)
            if current == head:
                return
            if current is None:
                self._refuse_unrecorded_tables(connection)
                raise migrate.schema_error(self.masked_url, "not migrated yet (no illava tables)", head)
        if current not in migrate.known_revisions():
            raise migrate.newer_schema_error(self.masked_url, current, head)
        raise migrate.schema_error(self.masked_url, f"at revision {current}", head)

    def _refuse_unrecorded_tables(self, connection: Connection) -> None:
        """Raise `SchemaError` when illava tables exist although no revision is recorded (the version
        row was deleted, or the tables were made by hand): migrating would collide with them."""
        if migrate.illava_tables(connection):
            raise migrate.unrecorded_schema_error(self.masked_url, migrate.schema_differences(connection))

    # ------------------------------------------------------------------ schema lock
    @contextmanager
    def schema_lock(self, timeout_s: float = SCHEMA_LOCK_TIMEOUT_S) -> Iterator[None]:
        """Hold this database's schema lock for the block. Whatever creates or alters tables in the
        database runs under it (`upgrade` and `stamp` do; wrap the creation of Optuna's
        `RDBStorage` too), so concurrent first uses take turns instead of colliding in CREATE TABLE.

        PostgreSQL: a session-level advisory lock on `SCHEMA_LOCK_KEY`, held by a connection of its
        own and released when the block ends (or when that connection dies with its process).
        SQLite: an exclusive `flock` on the file `<database file>-schema-lock` beside the database
        (created on first use and left there); nothing for an in-memory database or a `file:` URI.

        Re-entrant within a thread (an `upgrade()` inside the block does not wait for itself);
        another thread or process waits up to `timeout_s` seconds, then gets `DatabaseError`.
        Exceptions raised by the block pass unchanged. Enter it with no transaction of this
        database open in the thread: the holder may need what that transaction holds (SQLite's
        write lock, a table's lock), and the two would wait for each other."""
        depth = getattr(self._schema_lock_depth, "value", 0)
        if depth:
            held = nullcontext()
        elif self.dialect == "postgresql":
            held = self._postgresql_schema_lock(timeout_s)
        else:
            held = self._sqlite_schema_lock(timeout_s)
        with held:
            self._schema_lock_depth.value = depth + 1
            try:
                yield
            finally:
                self._schema_lock_depth.value = depth

    @contextmanager
    def _postgresql_schema_lock(self, timeout_s: float) -> Iterator[None]:
        with self.translate_errors("taking the schema lock"):
            connection = self.engine.connect()
            try:
                # lock_timeout bounds the wait; set for this transaction only, the lock outlives it.
                wait_ms = f"{max(int(timeout_s * 1000), 1)}ms"
                connection.execute(text("SELECT set_config('lock_timeout', :ms, true)"), {"ms": wait_ms})
                connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": SCHEMA_LOCK_KEY})
                connection.commit()
            except OperationalError as err:
                timed_out = getattr(err.orig, "sqlstate", None) == _LOCK_NOT_AVAILABLE
                holder = _schema_lock_holder(connection) if timed_out else None
                _close_quietly(connection)
                if timed_out:
                    by = f" (held by PostgreSQL backend pid {holder})" if holder is not None else ""
                    raise DatabaseError(self._lock_timeout_message(timeout_s) + by) from err
                raise
            except BaseException:
                _close_quietly(connection)
                raise
        try:
            yield
        finally:
            try:
                connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": SCHEMA_LOCK_KEY})
                connection.commit()
            except SQLAlchemyError:
                # Closing the session frees its advisory locks: never hand a locked connection to the pool.
                with suppress(SQLAlchemyError):
                    connection.invalidate()
            _close_quietly(connection)

    @contextmanager
    def _sqlite_schema_lock(self, timeout_s: float) -> Iterator[None]:
        path = self._url.database
        handle = None
        if fcntl is not None and path and path != ":memory:" and not path.startswith("file:"):
            # Never lock (or open and close) the database file itself: closing any descriptor of
            # it drops the POSIX locks SQLite holds on it in this process.
            with suppress(OSError):  # a missing or read-only directory: SQLite says so itself
                handle = open(f"{path}-schema-lock", "a")  # noqa: SIM115 (closed below)
        if handle is None:
            yield
            return
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise DatabaseError(self._lock_timeout_message(timeout_s)) from None
                    time.sleep(0.02)
            yield
        finally:
            handle.close()  # releases the flock

    def _lock_timeout_message(self, timeout_s: float) -> str:
        return (
            f"waited {timeout_s:g} s for the schema lock of {self.masked_url}: another illava-tune is creating or "
            "migrating its tables, or hangs holding the lock"
        )


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


def _schema_lock_holder(connection: Connection) -> int | None:
    """The backend pid that holds the schema lock, if it can be told (best effort, for a message)."""
    query = text(
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 1"
        " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        " AND classid::bigint = :high AND objid::bigint = :low"
    )
    with suppress(SQLAlchemyError):
        connection.rollback()
        return connection.execute(query, {"high": SCHEMA_LOCK_KEY >> 32, "low": SCHEMA_LOCK_KEY & 0xFFFFFFFF}).scalar()
    return None


def _close_quietly(connection: Connection) -> None:
    with suppress(SQLAlchemyError):
        connection.close()


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
