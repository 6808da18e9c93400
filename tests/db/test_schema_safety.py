"""The schema under stress: concurrent first uses take turns under `Database.schema_lock()`, a
lost revision row is named (and `db stamp` repairs it), and no message or log line shows the
password. Real SQLite and PostgreSQL, real processes. Nothing here names a revision or a column:
the databases are built by `upgrade()` from whatever migrations exist."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from sqlalchemy import inspect, text
from sqlalchemy.engine import make_url

import db
from db import Base, Database, DatabaseError, SchemaError, migrate, normalize_url
from tests.db.conftest import fresh_database
from tests.db.test_migrations import schema_diffs

REPO_ROOT = Path(__file__).resolve().parents[2]

# A process that waits for `go` and then does what a first `submit` does: `_database(args,
# create=True)` (upgrade when no revision is recorded, then check) and the creation of Optuna's
# tables under the schema lock -- or, with mode "upgrade", what `illava-tune db upgrade` does.
CONTENDER = """
import sys, time
from pathlib import Path
from db import Database
url, ready, go, mode = sys.argv[1:]
import optuna
Path(ready).touch()
while not Path(go).exists():
    time.sleep(0.002)
database = Database(url)
if mode == "upgrade":
    database.upgrade()
else:
    if database.current_revision() is None:
        database.upgrade()
    database.check_schema()
with database.schema_lock():
    optuna.storages.RDBStorage(database.optuna_storage_url).engine.dispose()
database.check_schema()
"""


def cli(*argv: str) -> int:
    from illava_tune.cli import main  # imports the CLI's heavy modules only in the tests that use it

    return main(list(argv))


# ----------------------------------------------------------------------------- concurrent first use
def test_four_processes_using_a_fresh_database_at_once_all_succeed(empty_database, tmp_path):
    pytest.importorskip("optuna")
    go = tmp_path / "go"
    modes = ["first-use", "upgrade", "first-use", "upgrade"]
    readies = [tmp_path / f"ready-{i}" for i in range(len(modes))]
    contenders = [
        subprocess.Popen(
            [sys.executable, "-c", CONTENDER, empty_database.url, str(ready), str(go), mode],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for ready, mode in zip(readies, modes, strict=True)
    ]
    try:
        deadline = time.monotonic() + 60
        while not all(ready.exists() for ready in readies):  # all imported, so they start together
            assert time.monotonic() < deadline and all(c.poll() is None for c in contenders)
            time.sleep(0.01)
        go.touch()
        results = [(c.wait(timeout=60), c.communicate()[0]) for c in contenders]
    finally:
        for contender in contenders:
            contender.kill()
    assert [code for code, _ in results] == [0] * len(modes), "\n".join(output for _, output in results)
    empty_database.check_schema()
    assert empty_database.current_revision() == db.head_revision()
    assert schema_diffs(empty_database) == []
    assert {"studies", "trials"} <= set(inspect(empty_database.engine).get_table_names())  # Optuna's


def wait_until_someone_waits_for_the_schema_lock(database: Database) -> None:
    """PostgreSQL shows lock waiters; a SQLite waiter polls its flock unseen, so give it time."""
    if database.dialect == "sqlite":
        time.sleep(1.5)
        return
    waiting = text(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
        " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    )
    deadline = time.monotonic() + 30
    with database.engine.connect() as connection:
        while connection.execute(waiting).scalar_one() == 0:
            assert time.monotonic() < deadline, "nobody waits for the schema lock"
            connection.rollback()
            time.sleep(0.02)


def test_a_held_schema_lock_holds_back_another_process_upgrade(empty_database):
    upgrade = "import sys, time; from db import Database; d = Database(sys.argv[1]); print('go', flush=True); "
    upgrade += "d.upgrade(); print(time.time(), flush=True)"
    with empty_database.schema_lock():
        child = subprocess.Popen([sys.executable, "-c", upgrade, empty_database.url], cwd=REPO_ROOT,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
        try:
            assert child.stdout.readline().strip() == "go"
            wait_until_someone_waits_for_the_schema_lock(empty_database)
            assert child.poll() is None
            assert empty_database.current_revision() is None
        except BaseException:
            child.kill()
            raise
        released = time.time()
    output = child.communicate(timeout=60)[0]
    assert child.returncode == 0, output
    assert float(output.split()[-1]) >= released
    assert empty_database.current_revision() == db.head_revision()


def test_the_schema_lock_is_reentrant_released_on_error_and_times_out_clearly(empty_database):
    other = Database(empty_database.url)  # another engine: another session, as another process
    try:
        with empty_database.schema_lock():
            with empty_database.schema_lock():
                empty_database.upgrade()  # does not wait for its own thread's lock
            with pytest.raises(DatabaseError) as caught, other.schema_lock(timeout_s=0.3):
                pass
            message = str(caught.value)
            assert message.startswith(f"waited 0.3 s for the schema lock of {empty_database.masked_url}: ")
            assert "another illava-tune is creating or migrating its tables" in message
            if empty_database.dialect == "postgresql":
                assert "(held by PostgreSQL backend pid " in message
        with pytest.raises(KeyError), empty_database.schema_lock():
            raise KeyError("the block's own error passes unchanged")
        with other.schema_lock(timeout_s=5):
            other.check_schema()
    finally:
        other.close()


# ----------------------------------------------------------------------------- lost revision row
def lose_revision_row(database: Database, how: str) -> None:
    statement = f"DELETE FROM {db.VERSION_TABLE}" if how == "emptied" else f"DROP TABLE {db.VERSION_TABLE}"
    with database.engine.begin() as connection:
        connection.execute(text(statement))
    assert database.current_revision() is None


def first_use(database: Database) -> None:
    """What `submit` does before anything else."""
    from illava_tune.tune import _database

    _database(SimpleNamespace(database=database.url), create=True)


@pytest.mark.parametrize("how", ["emptied", "dropped"])
def test_tables_without_a_revision_are_named_and_db_stamp_repairs_them(empty_database, how, capsys):
    empty_database.upgrade()
    lose_revision_row(empty_database, how)
    head = db.head_revision()
    for attempt in (empty_database.check_schema, empty_database.upgrade, lambda: first_use(empty_database)):
        with pytest.raises(SchemaError) as caught:
            attempt()
        assert str(caught.value) == (
            f"database at {empty_database.masked_url} has the illava tables but no recorded schema revision "
            f"({db.VERSION_TABLE} is empty or missing); the tables match revision {head}: "
            "run `illava-tune db stamp head`"
        )
    assert cli("db", "stamp", "--database", empty_database.url) == 0
    assert (
        capsys.readouterr().out == f"{empty_database.masked_url}: recorded schema revision {head} (no migrations run)\n"
    )
    empty_database.check_schema()
    assert empty_database.current_revision() == head
    assert schema_diffs(empty_database) == []


def test_tables_unlike_head_are_told_to_stamp_their_own_revision(empty_database):
    empty_database.upgrade()
    leaf = Base.metadata.sorted_tables[-1].name  # no other table refers to the last one
    with empty_database.engine.begin() as connection:
        connection.execute(text(f"DROP TABLE {leaf}"))
    lose_revision_row(empty_database, "emptied")
    with pytest.raises(SchemaError) as caught:
        empty_database.check_schema()
    message = str(caught.value)
    assert message.startswith(
        f"database at {empty_database.masked_url} has the illava tables but no recorded schema revision "
        f"({db.VERSION_TABLE} is empty or missing), and the tables do not match revision {db.head_revision()} ("
    )
    assert f"table {leaf} missing" in message
    assert (
        "run `illava-tune db stamp REVISION` with the revision they were created by (known, oldest first: " in message
    )
    assert all(f"{revision} (" in message for revision in migrate.revision_history())
    assert message.endswith("then `illava-tune db upgrade`")
    assert "stamp head" not in message


def test_tables_of_an_older_revision_are_stamped_then_upgraded(empty_database, capsys):
    oldest, head = migrate.revision_history()[0], db.head_revision()
    empty_database.upgrade(oldest)
    lose_revision_row(empty_database, "emptied")
    assert cli("db", "stamp", oldest, "--database", empty_database.url) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{empty_database.masked_url}: recorded schema revision {oldest} (no migrations run)\n")
    assert (f"run `illava-tune db upgrade` to migrate it to {head}" in out) == (oldest != head)
    assert cli("db", "upgrade", "--database", empty_database.url) == 0
    empty_database.check_schema()
    assert schema_diffs(empty_database) == []


def test_db_stamp_refuses_what_it_cannot_repair(empty_database, capsys):
    with pytest.raises(SchemaError, match=r"has no illava tables, so there is no revision to record: run `illava-tune db upgrade`"):  # fmt: skip
        empty_database.stamp()
    assert empty_database.current_revision() is None
    empty_database.upgrade()
    assert empty_database.stamp("head") == db.head_revision()  # already recorded: nothing to do
    oldest = migrate.revision_history()[0]
    if oldest != db.head_revision():
        with pytest.raises(SchemaError, match=rf"already at revision {db.head_revision()}: `db stamp` only records"):
            empty_database.stamp(oldest)
    assert cli("db", "stamp", "nope", "--database", empty_database.url) == 2
    err = capsys.readouterr().err
    assert "unknown schema revision 'nope'; known: " in err and err.rstrip().endswith(", or head")
    assert cli("db", "check", "head", "--database", empty_database.url) == 2
    assert "`db check` takes no revision" in capsys.readouterr().err
    assert empty_database.current_revision() == db.head_revision()


# ----------------------------------------------------------------------------- secrets
def test_db_commands_never_show_the_password(tmp_path, capsys, caplog):
    # Alembic's and SQLAlchemy's own log lines too (Optuna, once it has run in a process, quiets Alembic's).
    for logger in ("", "alembic", "sqlalchemy"):
        caplog.set_level(logging.DEBUG, logger=logger)
    with fresh_database("postgresql", tmp_path) as database:
        url = make_url(database.url).set(password="s3cret").render_as_string(hide_password=False)
        masked = Database(url).masked_url
        assert cli("db", "check", "--database", url) == 2  # not migrated: an error naming the database
        assert cli("db", "upgrade", "--database", url) == 0
        assert cli("db", "check", "--database", url) == 0
        lose_revision_row(database, "emptied")
        assert cli("db", "upgrade", "--database", url) == 2
        assert cli("db", "stamp", "--database", url) == 0
        assert cli("db", "check", "--database", url) == 0
        captured = capsys.readouterr()
    assert "s3cret" not in captured.out + captured.err + caplog.text
    assert captured.out.count(f"{masked}: ") == 4 and ":***@" in masked
    assert "db stamp head" in captured.err
    assert "Running upgrade" in caplog.text  # Alembic's log was captured
    with pytest.raises(ValueError) as caught:
        normalize_url("postgres:s3cret@db.example/illava")  # no scheme: not a URL, and still masked
    assert "s3cret" not in str(caught.value)
