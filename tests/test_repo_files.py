"""Files a user runs by hand: they must at least parse and agree with the docs."""

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_the_readme_points_at_the_compose_files_postgres():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    postgres = compose["services"]["postgres"]
    env = postgres["environment"]
    url = f"postgresql://{env['POSTGRES_USER']}:$POSTGRES_PASSWORD@127.0.0.1:5433/{env['POSTGRES_DB']}"
    assert postgres["ports"] == ["127.0.0.1:5433:5432"]
    assert url in (ROOT / "README.md").read_text()


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pytest -q" in readme.split("\n\n")[1] or "pytest -q" in readme[:1200]
    assert "python -m pytest -q" in ci and "torch==2.13.0" in ci
