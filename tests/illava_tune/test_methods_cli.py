"""`illava-tune submit --methods`: the comma-separated list a user types becomes the job's search
space, and what cannot be searched is refused, with a message naming it, before any job exists."""

from __future__ import annotations

import pytest

import illava
import jobs
from db import Database, queries
from illava_tune.cli import main
from optimizer import SearchSpace

SUBMIT = ["submit", "--backbone", "tiny", "--trials", "3"]


@pytest.fixture
def cli(tmp_path, monkeypatch):
    """`main` on a fresh SQLite file; a submitted job stays queued: the detached driver it would start
    is recorded instead (the job's run is tests/jobs' business)."""
    url = f"sqlite:///{tmp_path / 'methods.db'}"
    monkeypatch.setenv("DATABASE_URL", url)
    monkeypatch.chdir(tmp_path)
    started: list[str] = []

    def start_background(database, job_id, *args, **kwargs):
        started.append(job_id)
        return tmp_path / "driver.log"

    monkeypatch.setattr(jobs, "start_background", start_background)
    return Database(url), started


def searched_methods(database: Database, job_id: str) -> tuple[str, ...]:
    with database.session() as s:
        return SearchSpace.from_dict(queries.get_job(s, job_id).search_space).methods


@pytest.mark.parametrize(
    ("typed", "methods"),
    [
        ("fastv,divprune", ("fastv", "divprune")),
        (" tome , downsample,", ("tome", "downsample")),  # spaces around names, a trailing comma
        ("divprune,illava", ("divprune", "illava")),  # in the order typed
        (",".join(illava.method_names()), illava.method_names()),  # every registered method
    ],
)
def test_submit_methods_is_a_comma_separated_list(cli, capsys, typed, methods):
    database, started = cli
    assert main([*SUBMIT, "--methods", typed]) == 0
    job_id = capsys.readouterr().out.strip()
    assert started == [job_id]
    assert searched_methods(database, job_id) == methods


def test_submit_searches_illava_alone_by_default(cli, capsys):
    database, _ = cli
    assert main(SUBMIT) == 0
    assert searched_methods(database, capsys.readouterr().out.strip()) == ("illava",)


@pytest.mark.parametrize(
    ("typed", "message"),
    [
        ("fastv,no-such-method", "unknown methods ['no-such-method']; allowed: "),
        ("FastV", "unknown methods ['FastV']; allowed: "),  # names are case-sensitive, as in schedules
        ("fastv,fastv", "methods ['fastv', 'fastv'] repeats a method"),
        (",", "methods must be a non-empty list drawn from "),
    ],
)
def test_submit_refuses_methods_it_cannot_search_before_any_job_exists(cli, capsys, typed, message):
    database, started = cli
    assert main([*SUBMIT, "--methods", typed]) == 2
    error = capsys.readouterr().err
    assert error.startswith("illava-tune: error: ") and message in error
    if "allowed" in message or "drawn from" in message:
        assert all(repr(name) in error for name in illava.method_names())  # every method a user may type
    assert started == [] and jobs.list_jobs(database) == []
