"""The shipped Alembic migrations: they build exactly the models' schema, `check_schema` tells
when they have not run, and Optuna's tables and version table live beside ours untouched."""

from __future__ import annotations

import importlib.resources
import json

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text

import db
from db import Base, Database, SchemaError, migrate, queries

OUR_TABLES = {table.name for table in Base.metadata.sorted_tables}


def schema_diffs(database: Database) -> list:
    with database.engine.connect() as connection:
        context = MigrationContext.configure(
            connection,
            opts={"include_name": migrate.include_name, "compare_type": True, "version_table": db.VERSION_TABLE},
        )
        return compare_metadata(context, Base.metadata)


def table_names(database: Database) -> set[str]:
    return set(inspect(database.engine).get_table_names())


def test_migrations_ship_inside_the_package():
    migrations = importlib.resources.files("db") / "migrations"
    assert (migrations / "env.py").is_file()
    assert (migrations / "script.py.mako").is_file()
    assert any(entry.name.endswith(".py") for entry in (migrations / "versions").iterdir())
    assert migrate.MIGRATIONS_DIR.is_dir()


def test_tables_are_prefixed_so_they_never_meet_optunas():
    assert all(name.startswith("illava_") for name in OUR_TABLES)
    assert db.VERSION_TABLE == "illava_alembic_version"


def test_upgrade_builds_exactly_the_models_schema(empty_database):
    empty_database.upgrade()
    assert schema_diffs(empty_database) == []
    assert table_names(empty_database) == OUR_TABLES | {db.VERSION_TABLE}
    assert empty_database.current_revision() == db.head_revision()


def schema_snapshot(database: Database) -> dict[str, dict]:
    """Everything reflection tells about our tables, names of constraints and indexes included
    (which `compare_metadata` does not compare)."""
    inspector = inspect(database.engine)
    snapshot = {}
    for table in sorted(OUR_TABLES):
        snapshot[table] = {
            "columns": [(c["name"], str(c["type"]), c["nullable"]) for c in inspector.get_columns(table)],
            "pk": inspector.get_pk_constraint(table),
            "unique": sorted((u["name"], tuple(u["column_names"])) for u in inspector.get_unique_constraints(table)),
            "foreign": sorted(
                (f["name"], tuple(f["constrained_columns"]), f["referred_table"], f["options"].get("ondelete"))
                for f in inspector.get_foreign_keys(table)
            ),
            "check": sorted(
                (c["name"], " ".join(c["sqltext"].split())) for c in inspector.get_check_constraints(table)
            ),
            "indexes": sorted(
                (i["name"], tuple(i["column_names"]), bool(i["unique"])) for i in inspector.get_indexes(table)
            ),
        }
    return snapshot


def test_migrated_schema_equals_create_all(empty_database, another_empty_database):
    empty_database.upgrade()
    Base.metadata.create_all(another_empty_database.engine)
    assert schema_snapshot(empty_database) == schema_snapshot(another_empty_database)


def test_constraint_names_follow_the_convention(empty_database):
    empty_database.upgrade()
    inspector = inspect(empty_database.engine)
    assert [uq["name"] for uq in inspector.get_unique_constraints("illava_trials")] == [
        "uq_illava_trials_job_id_number"
    ]
    assert {fk["name"] for fk in inspector.get_foreign_keys("illava_published")} == {
        f"fk_illava_published_{column}"
        for column in ("job_id", "trial_id", "backbone_id", "hardware_id", "workload_id")
    }
    assert {ck["name"] for ck in inspector.get_check_constraints("illava_jobs")} == {
        "ck_illava_jobs_status", "ck_illava_jobs_n_trials", "ck_illava_jobs_n_workers"
    }  # fmt: skip
    assert inspector.get_pk_constraint("illava_jobs")["name"] == "pk_illava_jobs" or empty_database.dialect == "sqlite"


def test_check_schema_before_and_after_upgrade(empty_database):
    with pytest.raises(SchemaError) as caught:
        empty_database.check_schema()
    message = str(caught.value)
    assert message.startswith(f"database at {empty_database.masked_url} is not migrated yet")
    assert f"this illava-tune needs revision {db.head_revision()}: run `illava-tune db upgrade`" in message
    assert empty_database.current_revision() is None
    empty_database.upgrade()
    empty_database.check_schema()
    empty_database.upgrade()  # a second upgrade is a no-op
    empty_database.check_schema()


def test_downgrade_removes_everything_and_upgrade_comes_back(empty_database):
    empty_database.upgrade()
    with empty_database.engine.begin() as connection:
        migrate.downgrade(connection, "base")
    assert table_names(empty_database) & OUR_TABLES == set()
    with pytest.raises(SchemaError):
        empty_database.check_schema()
    empty_database.upgrade()
    assert schema_diffs(empty_database) == []


def test_a_newer_schema_says_so(empty_database):
    empty_database.upgrade()
    with empty_database.engine.begin() as connection:
        connection.execute(text(f"UPDATE {db.VERSION_TABLE} SET version_num = 'fffffffff'"))
    with pytest.raises(SchemaError, match="revision fffffffff, which this illava-tune does not know"):
        empty_database.check_schema()


@pytest.mark.parametrize("optuna_first", [False, True], ids=["ours-then-optuna", "optuna-then-ours"])
def test_optuna_shares_the_database(empty_database, optuna_first):
    optuna = pytest.importorskip("optuna")
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    def use_optuna():
        storage = optuna.storages.RDBStorage(empty_database.optuna_storage_url)
        try:
            study = optuna.create_study(storage=storage, study_name="illava-x", load_if_exists=True)
            study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=2)
            assert len(study.trials) >= 2
        finally:
            storage.engine.dispose()

    if optuna_first:
        use_optuna()
    empty_database.upgrade()
    use_optuna()

    empty_database.check_schema()
    assert schema_diffs(empty_database) == []  # Optuna's tables are not ours to compare
    tables = table_names(empty_database)
    assert {"studies", "trials", "alembic_version"} <= tables  # Optuna's, under its own names
    assert OUR_TABLES | {db.VERSION_TABLE} <= tables
    with empty_database.engine.connect() as connection:
        optuna_revision = connection.execute(text("SELECT version_num FROM alembic_version")).scalar_one()
    assert optuna_revision != db.head_revision()
    with empty_database.session() as session:  # and ours still work beside them
        assert queries.list_jobs(session) == []


def test_0002_keys_stored_hardware_by_what_it_was_measured_in(empty_database):
    """Groups stored before the dtype and attention were recorded were all float32 with sdpa."""
    profile = {"kind": "cpu", "name": "Old CPU", "threads": 4, "memory_mib": 1, "torch": "2.13.0",
               "cuda": None, "driver": None, "mig_profile": None}  # fmt: skip
    empty_database.upgrade("0001")
    insert = text("INSERT INTO illava_hardware (key, profile) VALUES (:key, :profile)")
    with empty_database.engine.begin() as connection:
        connection.execute(insert, {"key": "cpu:Old CPU x4", "profile": json.dumps(profile)})
        connection.execute(insert, {"key": "lab-box", "profile": json.dumps(profile)})

    def rows():
        with empty_database.engine.connect() as connection:
            found = connection.execute(text("SELECT key, profile FROM illava_hardware ORDER BY id")).all()
        return [(key, value if isinstance(value, dict) else json.loads(value)) for key, value in found]

    empty_database.upgrade()
    runtime = {"dtype": "float32", "attention": "sdpa"}
    assert rows() == [("cpu:Old CPU x4 float32/sdpa", {**profile, **runtime}), ("lab-box", {**profile, **runtime})]
    assert queries.hardware_key(rows()[0][1]) == rows()[0][0]  # what new measurements of it are filed under
    with empty_database.engine.begin() as connection:
        migrate.downgrade(connection, "0001")
    assert rows() == [("cpu:Old CPU x4", profile), ("lab-box", profile)]


def test_0003_0004_add_the_lease_and_the_objective_and_their_downgrades_keep_every_job_and_trial(empty_database):
    empty_database.upgrade()
    with empty_database.session() as session:
        job = queries.create_job(
            session, backbone=queries.get_or_create_backbone(session, "tiny"),
            hardware=queries.get_or_create_hardware(session, {"key": "box"}),
            workload=queries.get_or_create_workload(session, "w", {"name": "w"}),
            n_trials=2, n_workers=1, sampler="tpe", seed=0, search_space={}, constraints={},
        )  # fmt: skip
        queries.acquire_lease(session, job.id, "host:1:ab", ttl_s=30, replacing=(None, None))
        queries.record_trial(session, job, 0, state="failed", schedule={"method": "illava"}, error="x")
    with empty_database.engine.begin() as connection:
        migrate.downgrade(connection, "0002")
    with empty_database.engine.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM illava_trials")).scalar_one() == 1
        columns = {c["name"] for c in inspect(connection).get_columns("illava_jobs")}
    assert "lease_owner" not in columns and "lease_expires_at" not in columns
    empty_database.upgrade()
    with empty_database.session() as session:
        again = queries.get_job(session, job.id)
        assert again.lease_owner is None
        assert again.objective == "latency"  # what every job stored before 0004 optimised


def test_0005_makes_stored_fronts_candidates_and_its_downgrade_keeps_them(empty_database):
    with empty_database.engine.begin() as connection:
        migrate.upgrade(connection, "0004")
    with empty_database.engine.begin() as connection:  # a front stored at 0004, by hand (the models are at head)
        for statement in (
            "INSERT INTO illava_backbones (id, name) VALUES (1, 'tiny')",
            "INSERT INTO illava_hardware (id, key, profile) VALUES (1, 'box', '{}')",
            "INSERT INTO illava_workloads (id, name, spec, fingerprint) VALUES (1, 'w', '{}', 'f')",
            "INSERT INTO illava_jobs (id, study_name, backbone_id, hardware_id, workload_id, status, n_trials, "
            "n_workers, sampler, search_space, constraints, created_at, cancel_requested, objective) VALUES "
            "('ab', 'illava-ab', 1, 1, 1, 'completed', 1, 1, 'tpe', '{}', '{}', '2026-12-01 00:00:00+00', false, "
            "'speedup')",
            "INSERT INTO illava_trials (id, job_id, number, state, schedule, started_at) VALUES "
            "(1, 'ab', 0, 'complete', '{}', '2026-12-01 00:00:00+00')",
            "INSERT INTO illava_published (id, job_id, trial_id, backbone_id, hardware_id, workload_id, schedule, "
            "latency_ms, memory_mib, created_at) VALUES (1, 'ab', 1, 1, 1, 1, '{}', 1.0, 1.0, '2026-12-01 00:00:00+00')",
        ):
            connection.execute(text(statement))
    empty_database.upgrade()
    with empty_database.session() as session:
        row = queries.get_published(session, 1)
        assert (row.status, row.on_front, row.published_at) == ("candidate", True, None)  # never published for you
        assert queries.find_schedules(session, backbone="tiny") == []
        queries.create_token(session, key="k", name="n", scope="read", secret_sha256="0" * 64)
    with empty_database.engine.begin() as connection:
        migrate.downgrade(connection, "0004")
    with empty_database.engine.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM illava_published")).scalar_one() == 1
        assert "illava_tokens" not in inspect(connection).get_table_names()
    empty_database.upgrade()
    assert schema_diffs(empty_database) == []
