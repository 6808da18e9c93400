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
from sqlalchemy import select, update

import jobs
from db import SCHEDULE_STATUSES, Database, DatabaseError, LeaseHeld, LeaseLost, TuningJob, queries
from db.models import utcnow
from illava_tune.cli import main as cli
from jobs.driver import ASKED_BY_STALE
from jobs.lease import holder_is_gone, take
from optimizer import EXPLORE_ROLE, SEED_ATTR
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
    rows = assert_agree(database, job_id)
    assert sorted(rows) == list(range(budget)), rows


def assert_agree(database: Database, job_id: str) -> dict[int, str]:
    """The database and Optuna hold the same trials in the same states, none running or waiting;
    returns the database's {number: state}."""
    rows = {t.number: t.state for t in stored_trials(database, job_id)}
    study = optuna.load_study(study_name=f"illava-{job_id}", storage=database.optuna_storage_url)
    in_optuna = {t.number: t.state for t in study.get_trials(deepcopy=False)}
    assert {number: OPTUNA_STATE.get(state, state) for number, state in rows.items()} == in_optuna
    return rows


def expire_lease(database: Database, job_id: str, *, ago_s: float = 5.0) -> None:
    """What a driver that stopped renewing leaves once its lease period has passed."""
    with database.session() as s:
        s.execute(update(TuningJob).where(TuningJob.id == job_id).values(lease_expires_at=utcnow() - timedelta(seconds=ago_s)))  # fmt: skip


def stop_between_writes(process: subprocess.Popen, database: Database, job_id: str) -> None:
    """SIGSTOP `process` at a moment it holds no lock on the job's row: stopped inside a write, it would
    keep every other driver waiting (as a process stopped with a transaction open does in production)."""
    for _ in range(100):
        os.kill(process.pid, signal.SIGSTOP)
        try:
            with database.session() as s:
                s.execute(select(TuningJob.id).where(TuningJob.id == job_id).with_for_update(nowait=True))
            return
        except DatabaseError:
            os.kill(process.pid, signal.SIGCONT)
            time.sleep(0.05)
    pytest.fail("the driver always held the job's row")


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


# Two driver processes and three trials: slow. The default run has the same race staged in one process below,
# and `resume --force` against live and expired leases (test_resume_refuses_a_live_lease_even_forced_...).
@pytest.mark.slow
def test_a_driver_stopped_past_its_lease_and_replaced_by_resume_force_writes_nothing_more(tmp_path, capsys):
    """The race as an operator meets it, with real processes: a driver stops renewing (SIGSTOP) mid-job;
    `resume` is refused while its lease is live (with --force too) and, once it expired, without --force;
    `resume --force` takes the job over; the stopped driver, woken up, stops without writing anything.
    The database and Optuna agree on every trial and hold exactly the budget."""
    with fresh_database("postgresql", tmp_path) as database:
        job_id = submit(database, tmp_path, n_trials=3, n_workers=1)
        short, url = job_id[:8], ["--database", database.url]
        stale = driver_process(database, "-m", "jobs", "run", job_id)
        try:
            wait_until(lambda: completed(database, job_id) >= 1, "one trial completed", process=stale)
            stop_between_writes(stale, database, job_id)  # alive, renewing nothing: its lease runs out by itself
            for force in ([], ["--force"]):
                assert cli(["resume", short, *force, *url]) == 2
                live = capsys.readouterr().err
                assert re.search(rf"being run by driver \S+:{stale.pid}:\S+; its lease is live until", live), live
            expire_lease(database, job_id)
            assert cli(["resume", short, *url]) == 2
            refused = capsys.readouterr().err
            assert f":{stale.pid}:" in refused and "whose lease expired at" in refused, refused
            assert f"`illava-tune resume {short} --force` takes the job over" in refused
            forced = driver_process(database, "-m", "illava_tune.cli", "resume", short, "--force")
            wait_until(lambda: f":{forced.pid}:" in (jobs.status(database, job_id).driver or ""),
                       "resume --force took the job", process=forced)  # fmt: skip
        finally:
            os.kill(stale.pid, signal.SIGCONT)
        output = stale.communicate(timeout=120)[0]
        assert stale.returncode == 1 and f"no longer holds job {job_id}" in output, output
        output = forced.communicate(timeout=300)[0]
        assert forced.returncode == 0 and f"job {job_id}: completed" in output, output
        assert_budget_kept(database, job_id, 3)
        assert jobs.status(database, job_id).driver is None


def test_a_driver_that_loses_its_job_between_its_renewal_and_its_ask_leaves_optuna_and_the_database_agreeing(
    tmp_path, monkeypatch
):
    """The narrowest window: the driver renewed its lease, then stalled past it inside its ask while
    `resume --force` took the job elsewhere. Its claim fails (`LeaseLost`): the trial it asked is FAIL in
    Optuna, not RUNNING, and the driver that finishes the job records it as never run. Only the moment of
    the stall is staged; the database, Optuna and Ray are real."""
    database = Database(f"sqlite:///{tmp_path / 'stale.db'}")
    job_id = submit(database, tmp_path, n_trials=2, n_workers=1)
    elsewhere = "gpu-node-7:4242:f00d"  # a driver on another machine
    real_ask = optuna.study.Study.ask

    def ask_after_a_stall(study, *args, **kwargs):
        monkeypatch.setattr(optuna.study.Study, "ask", real_ask)
        expire_lease(database, job_id)
        take(database, job_id, elsewhere, force=True, ttl_s=1)  # `resume --force` there; it stops in turn
        return real_ask(study, *args, **kwargs)

    monkeypatch.setattr(optuna.study.Study, "ask", ask_after_a_stall)
    with pytest.raises(LeaseLost, match=f"driver {elsewhere} took it over"):
        jobs.run(database, job_id)
    study = optuna.load_study(study_name=f"illava-{job_id}", storage=database.optuna_storage_url)
    assert [t.state for t in study.get_trials()] == [optuna.trial.TrialState.FAIL]
    assert stored_trials(database, job_id) == []  # the driver that lost the job wrote nothing to the database
    assert jobs.status(database, job_id).driver == elsewhere

    expire_lease(database, job_id)
    with pytest.raises(LeaseHeld, match=rf"driver {elsewhere}, whose lease expired at \S+ UTC \(\d+ s ago\)"):
        jobs.run(database, job_id)  # another host's driver may be alive: only --force replaces it
    assert jobs.run(database, job_id, force=True) == "completed"
    assert_budget_kept(database, job_id, 2)
    first, second = stored_trials(database, job_id)
    assert (first.state, first.error, second.state) == ("failed", ASKED_BY_STALE, "complete")


@pytest.mark.parametrize("where", ["between ask and claim", "between enqueue and ask"])
def test_a_driver_that_fails_around_an_ask_leaves_nothing_running_or_waiting(where, tmp_path, monkeypatch):
    """A database error right after Optuna's ask, or Optuna failing to ask a seed it just enqueued: the
    job fails, and the trial is failed in both places (none RUNNING or WAITING in Optuna)."""
    database = Database(f"sqlite:///{tmp_path / 'fails.db'}")
    job_id = submit(database, tmp_path, n_trials=2, n_workers=1)
    target, name = (queries, "claim_trial") if where == "between ask and claim" else (optuna.study.Study, "ask")
    real = getattr(target, name)

    def fail_once(*args, **kwargs):
        monkeypatch.setattr(target, name, real)
        raise DatabaseError("the database went away")

    monkeypatch.setattr(target, name, fail_once)
    with pytest.raises(DatabaseError):
        jobs.run(database, job_id)
    rows = assert_agree(database, job_id)
    assert rows == {0: "failed"}
    (trial,) = stored_trials(database, job_id)
    cause = "DatabaseError: the database went away" if where == "between ask and claim" else "the job ended"
    assert trial.error.startswith(f"not run: {cause}"), trial.error
    status = jobs.status(database, job_id)
    assert status.state == "failed" and "the database went away" in status.error and status.driver is None


def test_resume_refuses_a_live_lease_even_forced_and_an_expired_one_unforced(tmp_path, capsys):
    """`illava-tune resume` against a driver of another machine and a live process of this one: refused
    while the lease is live, --force or not; once it expired, refused without --force naming the driver and
    when; taken with --force."""
    database = Database(f"sqlite:///{tmp_path / 'force.db'}")
    job_id = submit(database, tmp_path, n_trials=1, n_workers=1)
    short, url = job_id[:8], ["--database", database.url]
    for holder in ("gpu-node-7:4242:f00d", f"{socket.gethostname()}:{os.getpid()}:beef"):
        with database.session() as s:
            queries.set_job_status(s, queries.get_job(s, job_id), "running")
            job = queries.get_job(s, job_id)
            assert queries.acquire_lease(s, job_id, holder, ttl_s=60, replacing=(job.lease_owner, job.lease_expires_at))
        for force in ([], ["--force"]):
            assert cli(["resume", short, *force, *url]) == 2
            err = capsys.readouterr().err
            assert f"job {short} is being run by driver {holder}; its lease is live until" in err, err
        expire_lease(database, job_id, ago_s=42)
        assert cli(["resume", short, *url]) == 2
        err = capsys.readouterr().err
        assert re.search(rf"driver {holder}, whose lease expired at \d\d:\d\d:\d\d UTC \(4\d s ago\)", err), err
        assert f"`illava-tune resume {short} --force` takes the job over" in err
        assert jobs.status(database, job_id).driver == holder and stored_trials(database, job_id) == []
    assert cli(["resume", short, "--force", *url]) == 0
    assert jobs.status(database, job_id).state == "completed" and jobs.status(database, job_id).driver is None
    assert_budget_kept(database, job_id, 1)


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
    assert EXPLORE_ROLE not in {t.user_attrs.get(SEED_ATTR) for t in study.get_trials()}  # no room for a draw
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
