"""Every db test runs on SQLite (a temporary file) and on PostgreSQL (the server on 127.0.0.1:5432,
or ILLAVA_TEST_PG_URL), each in a database made for it and dropped afterwards.

Fixtures, all parametrized over both backends:
- `empty_database`: a fresh database, never migrated (one per test).
- `database`: a migrated database shared by the tests of a module, emptied after each test.
PostgreSQL tests are skipped, with the reason, only when the server cannot be reached.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import pytest
from sqlalchemy import create_engine, delete, text
from sqlalchemy.engine import make_url

from db import Base, Database

BACKENDS = ["sqlite", "postgresql"]
PG_ADMIN_URL = os.environ.get("ILLAVA_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


@cache
def _pg_unreachable() -> str | None:
    """Why PostgreSQL cannot be used, or None when it can."""
    engine = create_engine(PG_ADMIN_URL, connect_args={"connect_timeout": 3})
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except Exception as err:  # any reason at all is a reason to skip, and it is reported
        why = " ".join(str(getattr(err, "orig", None) or err).split())
        return f"PostgreSQL at {make_url(PG_ADMIN_URL).render_as_string()} is unreachable: {why}"
    finally:
        engine.dispose()
    return None


@contextmanager
def fresh_database(backend: str, directory: Path) -> Iterator[Database]:
    """A new, empty database on `backend`, dropped (or left to the temporary directory) afterwards."""
    if backend == "sqlite":
        database = Database(f"sqlite:///{directory / 'illava.db'}")
        try:
            yield database
        finally:
            database.close()
        return
    reason = _pg_unreachable()
    if reason:
        pytest.skip(reason)
    name = f"illava_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
        database = Database(make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False))
        try:
            yield database
        finally:
            database.close()
            with admin.connect() as connection:
                connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def empty_database(backend: str, tmp_path: Path) -> Iterator[Database]:
    with fresh_database(backend, tmp_path) as database:
        yield database


@pytest.fixture
def another_empty_database(backend: str, tmp_path: Path) -> Iterator[Database]:
    """A second fresh database on the same backend as `empty_database`."""
    directory = tmp_path / "another"
    directory.mkdir()
    with fresh_database(backend, directory) as database:
        yield database


@pytest.fixture(scope="module", params=BACKENDS)
def migrated_database(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Database]:
    with fresh_database(request.param, tmp_path_factory.mktemp(request.param)) as database:
        database.upgrade()
        yield database


@pytest.fixture
def database(migrated_database: Database) -> Iterator[Database]:
    yield migrated_database
    with migrated_database.session() as session:
        for table in reversed(Base.metadata.sorted_tables):
            session.execute(delete(table))
