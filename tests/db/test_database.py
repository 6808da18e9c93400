"""`Database`: URLs, sessions and their errors, pickling."""

from __future__ import annotations

import pickle
import time
from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import select

from db import Backbone, Database, DatabaseError, SchemaError, Trial, TuningJob, normalize_url, queries


# ----------------------------------------------------------------------------- URLs
def test_default_url_is_sqlite_file_in_current_directory(monkeypatch, tmp_path):
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.chdir(tmp_path)
    database = Database()
    assert database.url == f"sqlite:///{tmp_path / 'illava.db'}"
    assert database.dialect == "sqlite"


def test_url_from_environment(monkeypatch):
    monkeypatch.setenv("DATABASE_URL", "postgresql://u:pw@db.example:5433/illava")
    database = Database()
    assert database.url == "postgresql+psycopg://u:pw@db.example:5433/illava"
    assert database.optuna_storage_url == database.url
    assert database.dialect == "postgresql"


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("postgresql://u@h/d", "postgresql+psycopg://u@h/d"),
        ("postgres://u@h/d", "postgresql+psycopg://u@h/d"),
        ("postgresql+psycopg://u@h/d", "postgresql+psycopg://u@h/d"),
        ("postgres+psycopg://u:p@h:1/d", "postgresql+psycopg://u:p@h:1/d"),
        ("sqlite:////abs/x.db", "sqlite:////abs/x.db"),
        ("sqlite://", "sqlite://"),
    ],
)
def test_normalize_url(given, expected):
    assert normalize_url(given).render_as_string(hide_password=False) == expected


@pytest.mark.parametrize("bad", ["not a url", "mysql://u@h/d", "oracle://x"])
def test_bad_urls_are_refused_with_what_is_allowed(bad):
    with pytest.raises(ValueError, match="sqlite:///path/to/file.db or postgresql://"):
        Database(bad)


def test_relative_sqlite_path_is_resolved_once(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    database = Database("sqlite:///sub/jobs.db")
    monkeypatch.chdir("/")
    assert pickle.loads(pickle.dumps(database)).url == f"sqlite:///{tmp_path / 'sub' / 'jobs.db'}"


def test_password_is_masked_in_repr_and_messages():
    database = Database("postgresql://postgres:s3cret@127.0.0.1:1/test", connect_timeout=2)
    assert "s3cret" not in repr(database)
    assert "s3cret" in database.url  # Optuna and Alembic need the real one
    with pytest.raises(DatabaseError) as caught:
        database.check_schema()
    assert "s3cret" not in str(caught.value)
    assert "postgres:***@127.0.0.1:1" in str(caught.value)


# ----------------------------------------------------------------------------- connection errors
def test_unreachable_postgres_fails_fast_with_a_clear_error():
    database = Database("postgresql://postgres@127.0.0.1:1/test", connect_timeout=2)
    start = time.monotonic()
    expected = r"^cannot connect to postgresql\+psycopg://postgres@127\.0\.0\.1:1/test: "
    with pytest.raises(DatabaseError, match=expected), database.session() as session:
        queries.list_jobs(session)
    assert time.monotonic() - start < 5
    with pytest.raises(DatabaseError, match="cannot connect") as caught:
        database.check_schema()
    assert not isinstance(caught.value, SchemaError)  # unreachable is not "needs an upgrade"
    with pytest.raises(DatabaseError, match="cannot connect"):
        database.upgrade()


def test_sqlite_in_missing_directory_is_a_clear_error(tmp_path):
    database = Database(f"sqlite:///{tmp_path}/missing/dir/x.db")
    with pytest.raises(DatabaseError, match="cannot connect to sqlite:///.*unable to open database file"):
        database.upgrade()


def test_missing_tables_suggest_the_upgrade(empty_database):
    with pytest.raises(DatabaseError, match="run `illava-tune db upgrade`"), empty_database.session() as session:
        queries.list_jobs(session)


# ----------------------------------------------------------------------------- sessions
def test_session_commits(database):
    with database.session() as session:
        queries.get_or_create_backbone(session, "small")
    with database.session() as session:
        assert session.scalars(select(Backbone.name)).all() == ["small"]


def test_session_rolls_back_and_passes_other_errors_through(database):
    with pytest.raises(KeyError, match="boom"), database.session() as session:
        queries.get_or_create_backbone(session, "small")
        raise KeyError("boom")
    with database.session() as session:
        assert session.scalars(select(Backbone)).all() == []


def test_constraint_violation_is_a_database_error_and_rolls_back(database):
    with pytest.raises(DatabaseError, match=r"failed on .*IntegrityError") as caught, database.session() as session:
        queries.get_or_create_backbone(session, "kept-only-if-committed")
        session.add(Backbone(name="twice"))
        session.add(Backbone(name="twice"))
        session.flush()
    assert database.masked_url in str(caught.value)
    with database.session() as session:
        assert session.scalars(select(Backbone)).all() == []


def test_check_constraints_are_enforced(database):
    with pytest.raises(DatabaseError, match="IntegrityError"), database.session() as session:
        job = _job(session)
        job.status = "exploded"  # bypasses set_job_status' own check
        session.flush()


def test_foreign_keys_are_enforced(database):
    # SQLite leaves them off unless every connection turns them on.
    with pytest.raises(DatabaseError, match="IntegrityError"), database.session() as session:
        session.add(Trial(job_id="0" * 32, number=0, state="running", schedule={}, started_at=datetime.now(UTC)))
        session.flush()


def test_rows_stay_readable_after_the_session(database):
    with database.session() as session:
        job = _job(session)
    assert job.backbone.name == "small"
    assert job.workload.spec == {"name": "w", "size": [448, 448]}
    assert job.hardware.key == "cpu:Test CPU x2 float32/sdpa"


# ----------------------------------------------------------------------------- types
def test_timestamps_are_aware_utc(database):
    plus_two = timezone(timedelta(hours=2))
    moment = datetime(2025, 1, 2, 3, 4, 5, 678901, tzinfo=plus_two)
    with database.session() as session:
        job = _job(session)
        job.heartbeat_at = moment
    with database.session() as session:
        stored = session.get(TuningJob, job.id)
        assert stored.heartbeat_at == moment
        assert stored.heartbeat_at.tzinfo == UTC
        assert stored.created_at.tzinfo == UTC
        assert abs(datetime.now(UTC) - stored.created_at) < timedelta(minutes=5)


def test_naive_datetimes_are_refused(database):
    expected = "naive datetime 2025-01-01T00:00:00: pass a timezone-aware one"
    with pytest.raises(ValueError, match=expected), database.session() as session:
        job = _job(session)
        job.heartbeat_at = datetime(2025, 1, 1)
        session.flush()


def test_json_round_trip(database):
    document = {"nested": {"list": [1, 2.5, None, True, "x"]}, "unicode": "é", "tuple": (1, 2)}
    with database.session() as session:
        backbone = queries.get_or_create_backbone(session, "b", config=document)
    with database.session() as session:
        assert session.get(Backbone, backbone.id).config == {**document, "tuple": [1, 2]}


# ----------------------------------------------------------------------------- pickling
def test_pickle_round_trip_then_query(database):
    with database.session() as session:
        queries.get_or_create_backbone(session, "small")
    database.engine  # noqa: B018 (an engine exists and must not travel)
    copy = pickle.loads(pickle.dumps(database))
    assert copy.url == database.url
    assert copy._engine is None
    with copy.session() as session:
        assert [b.name for b in session.scalars(select(Backbone))] == ["small"]
        queries.get_or_create_backbone(session, "tiny")
    copy.close()
    with database.session() as session:
        assert sorted(session.scalars(select(Backbone.name))) == ["small", "tiny"]


def _job(session) -> TuningJob:
    return queries.create_job(
        session,
        backbone=queries.get_or_create_backbone(session, "small"),
        hardware=queries.get_or_create_hardware(session, {"kind": "cpu", "name": "Test CPU", "threads": 2}),
        workload=queries.get_or_create_workload(session, "w", {"name": "w", "size": (448, 448)}),
        n_trials=4,
        n_workers=1,
        sampler="tpe",
        seed=0,
        search_space={},
        constraints={},
    )


def test_sqlite_writers_wait_for_each_other_instead_of_failing(tmp_path):
    """A transaction that reads and then writes while another is waiting to commit: with a deferred
    BEGIN, SQLite refuses the lock upgrade at once ("database is locked"); each must wait its turn."""
    import threading

    from sqlalchemy import text

    database = Database(f"sqlite:///{tmp_path / 'lock.db'}")
    with database.session() as session:
        session.execute(text("CREATE TABLE t (x INTEGER)"))
    errors = []

    def other_writer() -> None:
        try:
            with database.session() as session:
                session.execute(text("INSERT INTO t VALUES (2)"))
        except Exception as err:  # noqa: BLE001 (reported by the assertion below)
            errors.append(err)

    with database.session() as session:
        session.execute(text("SELECT count(*) FROM t")).scalar()
        thread = threading.Thread(target=other_writer)
        thread.start()
        time.sleep(0.5)  # the other writer is now waiting for its turn
        session.execute(text("INSERT INTO t VALUES (1)"))
    thread.join(timeout=60)
    assert not errors and not thread.is_alive()
    with database.session() as session:
        assert session.execute(text("SELECT x FROM t ORDER BY x")).scalars().all() == [1, 2]
