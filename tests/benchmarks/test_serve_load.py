"""benchmarks/serve_load.py runs end to end on the local PostgreSQL at tiny sizes: a real
`illava-tune serve`, its table for the server and for the direct function, no errors, and its
database dropped afterwards.

Skipped, with the reason, when the PostgreSQL server cannot be reached."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from tests.db.conftest import PG_ADMIN_URL

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "serve_load.py"
TINY = ["--quick", "--schedules", "200", "--clients", "4", "--seconds", "1"]


def _pg_or_skip() -> None:
    engine = create_engine(PG_ADMIN_URL, connect_args={"connect_timeout": 3})
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except Exception as err:  # any reason at all is a reason to skip, and it is reported
        pytest.skip(f"PostgreSQL at {make_url(PG_ADMIN_URL).render_as_string()} is unreachable: {err}")
    finally:
        engine.dispose()


def _databases_named(name: str) -> int:
    engine = create_engine(PG_ADMIN_URL)
    try:
        with engine.connect() as connection:
            return connection.execute(text("SELECT count(*) FROM pg_database WHERE datname = :n"), {"n": name}).scalar()
    finally:
        engine.dispose()


def _table(out: str) -> dict[tuple[str, str], dict[str, str]]:
    """The report's table: (measured, clients) -> its cells by column name."""
    lines = [line for line in out.splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = [dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")))) for line in lines[1:]]
    return {(row["measured"], row["clients"]): row for row in rows}


@pytest.mark.slow  # ~19 s: a real server under load; the service itself is tested in tests/illava_tune
def test_serve_load_reports_server_and_direct_figures_and_drops_its_database(tmp_path):
    _pg_or_skip()
    out_file = tmp_path / "serve-load.md"
    run = subprocess.run(
        [sys.executable, str(SCRIPT), *TINY, "--pg-url", PG_ADMIN_URL, "--out", str(out_file)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    table = _table(run.stdout)
    assert set(table) == {("server: best", "4"), ("server: best", "1"), ("server: /healthz", "1"),
                          ("direct: jobs.best", "1"), ("direct: tokens.verify", "1")}  # fmt: skip
    for row in table.values():
        assert row["errors"] == "0", row
        assert int(row["requests"]) > 0 and float(row["per s"]) > 0, row
        assert 0 < float(row["p50 ms"]) <= float(row["p99 ms"]) <= float(row["max ms"]), row
    load = table["server: best", "4"]
    assert int(load["200"]) + int(load["304"]) == int(load["requests"])  # every query has a published answer
    assert "stored: 200 schedules" in run.stdout and "Goal p99 < 20 ms with 0 errors at 4 clients" in run.stdout
    assert out_file.read_text() == run.stdout.rstrip("\n") + "\n"
    dropped = re.search(r"dropped database (illava_bench_[0-9a-f]+)", run.stderr)
    assert dropped, run.stderr
    assert _databases_named(dropped[1]) == 0
