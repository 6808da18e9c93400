"""Tuning jobs tried as an operator would: two drivers on one job, signals, an unreachable Ray, bad
datasets, a budget smaller than the seeds, concurrent first use of a database. Real SQLite, real
PostgreSQL, real Ray (in this process, and in the driver processes the tests start)."""

from __future__ import annotations

import base64
import io
import os
import re
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import optuna
import pytest
from PIL import Image
from sqlalchemy import update

import jobs
from db import SCHEDULE_STATUSES, Database, LeaseHeld, TuningJob, queries
from db.models import utcnow
from illava_tune.cli import main as cli
from jobs.lease import holder_is_gone
from optimizer import SEED_ATTR, WARM_ROLE
from profiler import DatasetError, read_dataset
from tests.db.conftest import fresh_database
from tests.jobs.test_jobs import small_workload, stored_trials, submit

ROOT = Path(__file__).resolve().parents[2]
OPTUNA_STATE = {"complete": optuna.trial.TrialState.COMPLETE, "failed": optuna.trial.TrialState.FAIL}


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    """This process's Ray, which the driver processes below join by address (as drivers join a
    cluster from `ray start`; starting one each would double their time)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def driver_process(database: Database, *args: str, env: dict[str, str] | None = None,
                   cwd: Path = ROOT) -> subprocess.Popen:  # fmt: skip
    """A driver in its own process group, on this process's Ray cluster, as `submit` starts one."""
    import ray

    cluster = {"RAY_ADDRESS": ray.get_runtime_context().gcs_address, "RAY_AUTH_MODE": "token"}
    return subprocess.Popen(
        [sys.executable, *args], cwd=cwd, env={**os.environ, **cluster, "DATABASE_URL": database.url, **(env or {})},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip


def wait_until(condition, what: str, timeout_s: float = 240, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if process is not None and process.poll() is not None:
            pytest.fail(f"the driver exited before {what}: {process.stdout.read()}")
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.2)


def completed(database: Database, job_id: str) -> int:
    return sum(t.state == "complete" for t in stored_trials(database, job_id))


def assert_budget_kept(database: Database, job_id: str, budget: int) -> None:
    """Exactly `budget` trials, numbered 0.., in the database and in Optuna, each in the same state
    in both, none running or waiting."""
    rows = {t.number: t.state for t in stored_trials(database, job_id)}
    study = optuna.load_study(study_name=f"illava-{job_id}", storage=database.optuna_storage_url)
    in_optuna = {t.number: t.state for t in study.get_trials(deepcopy=False)}
    assert sorted(rows) == list(range(budget)), rows
    assert {number: OPTUNA_STATE[state] for number, state in rows.items()} == in_optuna


# The SQLite run is behind `slow` for the default run's time: the lease is one UPDATE on either backend
# (tests/db/test_queries.py runs its races on both), and PostgreSQL is where drivers on several hosts meet.
@pytest.mark.parametrize("backend", [pytest.param("sqlite", marks=pytest.mark.slow), "postgresql"])
def test_one_driver_owns_a_job_through_kills_races_and_signals(backend, tmp_path):
    with fresh_database(backend, tmp_path) as database:
        job_id = submit(database, tmp_path, n_trials=4, n_workers=1)
        first = driver_process(database, "-m", "jobs", "run", job_id)
        wait_until(lambda: completed(database, job_id) >= 1, "one trial completed", process=first)

        with pytest.raises(LeaseHeld, match=rf"being run by driver \S+:{first.pid}:\S+; its lease is live until"):
            jobs.run(database, job_id)  # the first driver is alive: refused, nothing touched
        assert all(t.state != "failed" for t in stored_trials(database, job_id))

        os.killpg(first.pid, signal.SIGKILL)  # mid-job: its lease stays behind, Ray ends its worker
        first.wait()
        status = jobs.status(database, job_id)
        assert status.state == "running" and f":{first.pid}:" in status.driver
        assert "which is gone; `illava-tune resume" in status.driver_note
        resumes = [driver_process(database, "-m", "illava_tune.cli", "resume", job_id[:8]) for _ in range(2)]
        wait_until(lambda: any(process.poll() is not None for process in resumes), "one resume gave up")
        (refused,) = [process for process in resumes if process.poll() is not None]
        (running,) = [process for process in resumes if process is not refused]
        output = refused.communicate()[0]
        assert refused.returncode == 2 and "is being run by driver" in output and "Traceback" not in output, output

        done = completed(database, job_id)
        wait_until(lambda: completed(database, job_id) > done, "the resumed driver completed a trial", process=running)
        running.send_signal(signal.SIGTERM)
        output = running.communicate(timeout=60)[0]
        assert running.returncode == 130 and "stopped by SIGTERM" in output, output
        status = jobs.status(database, job_id)
        assert status.state == "failed" and "SIGTERM" in status.error
        assert status.driver is None  # released: a plain resume takes the job
        assert all(t.state != "running" for t in stored_trials(database, job_id))

        assert jobs.run(database, job_id) == "completed"
        assert_budget_kept(database, job_id, 4)
        assert jobs.status(database, job_id).driver is None


def test_a_queued_job_whose_driver_died_before_taking_it_says_so_and_resumes(tmp_path, capsys):
    database = Database(f"sqlite:///{tmp_path / 'queued.db'}")
    job_id = submit(database, tmp_path, n_trials=1, n_workers=1)
    short = job_id[:8]
    jobs.start_background(database, job_id, log_dir=tmp_path / "logs")
    status = jobs.status(database, job_id)
    pid = int(status.driver.split(":")[1])  # the lease names the new process from the start
    assert pid != os.getpid() and status.state == "queued" and status.driver_note is None  # starting
    os.kill(pid, signal.SIGKILL)  # long before it imported what it needs to take the job
    wait_until(lambda: holder_is_gone(status.driver), "the driver is gone", timeout_s=30)
    status = jobs.status(database, job_id)
    assert status.state == "queued"
    assert f"the driver started for job {short} ({status.driver}) exited before it took the job" in status.driver_note
    assert f"`illava-tune resume {short}` runs the job" in status.driver_note
    assert cli(["status", short, "--database", database.url]) == 0
    assert "exited before it took the job" in capsys.readouterr().out
    assert cli(["resume", short, "--database", database.url]) == 0
    assert jobs.status(database, job_id).state == "completed"
    assert_budget_kept(database, job_id, 1)


def test_a_queued_job_no_driver_took_says_how_to_run_it(tmp_path):
    database = Database(f"sqlite:///{tmp_path / 'orphan.db'}")
    job_id = submit(database, tmp_path, n_trials=1, n_workers=1)  # queued, no driver started (a server died)
    assert jobs.status(database, job_id).driver_note is None  # its driver may be on its way
    with database.session() as s:
        s.execute(update(TuningJob).where(TuningJob.id == job_id).values(created_at=utcnow() - timedelta(minutes=5)))
    short = job_id[:8]
    note = jobs.status(database, job_id).driver_note
    assert re.fullmatch(rf"no driver has taken job {short} in the 30\d s since it was submitted: "
                        rf"`illava-tune resume {short}` runs it", note), note  # fmt: skip


def test_the_ray_timeout_is_the_drivers_and_bad_ones_are_refused_before_a_job_exists(tmp_path, monkeypatch, capsys):
    """--ray-timeout reaches the driver (a silent server makes it wait exactly that long); a bad value, or a
    bad ILLAVA_RAY_CONNECT_TIMEOUT, is a one-line error before any job exists."""
    url = f"sqlite:///{tmp_path / 'timeout.db'}"
    command = ["submit", "--backbone", "tiny", "--workload", str(small_workload(tmp_path)), "--database", url]
    for flag, variable in ((["--ray-timeout", "0"], None), ([], "soon")):
        if variable is not None:
            monkeypatch.setenv("ILLAVA_RAY_CONNECT_TIMEOUT", variable)
        assert cli([*command, *flag]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "must be a number of seconds > 0 (default 30)" in err[0], err
        assert ("ILLAVA_RAY_CONNECT_TIMEOUT" in err[0]) == (variable is not None)
    monkeypatch.delenv("ILLAVA_RAY_CONNECT_TIMEOUT")
    assert not (tmp_path / "timeout.db").exists()  # refused before the database was even opened

    import ray

    database = Database(url)
    job_id = submit(database, tmp_path, n_trials=1, n_workers=1)
    with socket.create_server((ray.util.get_node_ip_address(), 0)) as server:  # accepts, never answers
        address = f"{server.getsockname()[0]}:{server.getsockname()[1]}"
        driver = driver_process(database, "-m", "illava_tune.cli", "resume", job_id, "--ray-address", address,
                                "--ray-timeout", "2")  # fmt: skip
        output = driver.communicate(timeout=120)[0]
    assert driver.returncode == 2 and f"illava-tune: error: {address} is not a Ray cluster" in output, output
    status = jobs.status(database, job_id)
    assert status.state == "failed" and f"{address} is not a Ray cluster" in status.error
    assert "within 2 s" in status.error and "Traceback" not in output


def test_the_seeds_count_toward_the_budget_and_none_is_left_waiting(tmp_path):
    database = Database(f"sqlite:///{tmp_path / 'seeds.db'}")
    job_id = submit(database, tmp_path, n_trials=3, n_workers=1)  # 4 seeds: unmerged + 3 paper ratios
    assert jobs.run(database, job_id) == "completed"
    assert_budget_kept(database, job_id, 3)
    study = optuna.load_study(study_name=f"illava-{job_id}", storage=database.optuna_storage_url)
    assert WARM_ROLE not in {t.user_attrs.get(SEED_ATTR) for t in study.get_trials()}  # no room for a warm start
    assert any(t.schedule["reduction"] == 0.0 for t in stored_trials(database, job_id))
    elapsed = jobs.status(database, job_id).progress.elapsed_s
    time.sleep(1.1)
    assert jobs.status(database, job_id).progress.elapsed_s == elapsed  # a finished job's clock stopped


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_an_unreachable_ray_fails_the_job_fast_and_clearly(tmp_path):
    database = Database(f"sqlite:///{tmp_path / 'noray.db'}")
    job_id = submit(database, tmp_path, n_trials=2, n_workers=1)
    address = f"127.0.0.1:{_free_port()}"
    started = time.monotonic()
    driver = driver_process(database, "-m", "jobs", "run", job_id, env={"RAY_ADDRESS": address})
    output = driver.communicate(timeout=120)[0]
    assert driver.returncode == 1 and time.monotonic() - started < 90, output
    status = jobs.status(database, job_id)
    assert status.state == "failed" and address in status.error, status.error
    assert address in output and "Traceback" not in output
    assert status.driver is None and stored_trials(database, job_id) == []


def test_a_job_whose_every_trial_failed_is_failed(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ILLAVA_TUNE_FAULTS", "raise:0,raise:1")
    url = f"sqlite:///{tmp_path / 'allfail.db'}"
    code = cli(["submit", "--backbone", "tiny", "--workload", str(small_workload(tmp_path)), "--trials", "2",
                "--workers", "1", "--wait", "--database", url])  # fmt: skip
    assert code == 1
    err = capsys.readouterr().err
    assert "injected fault in trial 0" in err
    database = Database(url)
    with database.session() as s:
        (job,) = queries.list_jobs(s)
        assert job.status == "failed" and "no trial could be measured (2 failed)" in job.error
        assert queries.find_schedules(s, backbone="tiny", status=SCHEDULE_STATUSES) == []


# ----------------------------------------------------------------------------------- bad datasets
def _png_base64() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _bad_dataset(kind: str, folder: Path) -> Path:
    header = "index\tquestion\tA\tB\tanswer\timage\n"
    good = f"0\tWhat colour?\tred\tblue\tA\t{_png_base64()}\n"
    files = {
        "missing file": ("missing.tsv", None),
        "an image, not a dataset": ("picture.png", None),
        "no answer column": ("no-answer.tsv", f"index\tquestion\tA\tB\timage\n0\tWhat?\tred\tblue\t{_png_base64()}\n"),
        "answer not an option": ("bad-answer.tsv", header + good + f"1\tWhat?\tred\tblue\tC\t{_png_base64()}\n"),
        "bad base64": ("bad-base64.tsv", header + good + "1\tWhat?\tred\tblue\tA\t@@not base64@@\n"),
        "missing image path": ("no-image.tsv", "index\tquestion\tA\tB\tanswer\timage_path\n0\tWhat?\tred\tblue\tA\tnope.png\n"),
        "short row": ("short.tsv", header + good + "1\tWhat?\tred\n"),
        "bad json": ("bad.jsonl", '{"index": 0, "question": "What?", "A": "red", "B": "blue", "answer": "A"\n'),
    }  # fmt: skip
    name, text = files[kind]
    path = folder / name
    if kind == "an image, not a dataset":
        Image.new("RGB", (8, 8)).save(path)
    elif text is not None:
        path.write_text(text)
    return path


@pytest.mark.parametrize(
    "kind",
    ["missing file", "an image, not a dataset", "no answer column", "answer not an option", "bad base64",
     "missing image path", "short row", "bad json"],
)  # fmt: skip
def test_a_bad_dataset_is_refused_before_any_job_exists(kind, tmp_path, capsys):
    dataset = _bad_dataset(kind, tmp_path)
    with pytest.raises(DatasetError) as expected:  # what `profile` reports for the same file
        read_dataset(dataset, limit=4)
    url = f"sqlite:///{tmp_path / 'bad.db'}"
    code = cli(["submit", "--backbone", "tiny", "--dataset", str(dataset), "--limit", "4", "--trials", "2", "--wait",
                "--database", url])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"illava-tune: error: {expected.value}"]
    with Database(url).session() as s:
        assert queries.list_jobs(s) == []


# ------------------------------------------------------------------------- concurrent first use
def test_four_first_submits_on_a_fresh_postgresql_database_all_succeed(tmp_path):
    with fresh_database("postgresql", tmp_path) as database:
        workload = small_workload(tmp_path)
        command = [sys.executable, "-m", "illava_tune.cli", "submit", "--backbone", "tiny", "--workload",
                   str(workload), "--trials", "1", "--workers", "1"]  # fmt: skip
        submits = [driver_process(database, *command[1:], cwd=tmp_path) for _ in range(4)]  # logs stay there
        outputs = [process.communicate(timeout=180)[0] for process in submits]
        assert [process.returncode for process in submits] == [0] * 4, outputs
        with database.session() as s:
            job_ids = [job.id for job in queries.list_jobs(s)]
        assert len(job_ids) == 4
        for job_id in job_ids:  # the background drivers stop as soon as they see the cancel
            if jobs.status(database, job_id).state in ("queued", "running"):
                jobs.cancel(database, job_id)
        from illava_tune.tune import wait_for

        assert all(wait_for(database, job_id, timeout_s=240) in ("cancelled", "completed") for job_id in job_ids)
        wait_until(lambda: all(jobs.status(database, j).driver is None for j in job_ids), "every driver released")
