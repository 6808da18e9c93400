"""`jobs.cluster.connect` against real addresses: a port where nothing listens, servers that are not Ray,
and a real external cluster started the way the README says (`ray start --head`, token authentication on).

Every connection is made in a fresh Python process: this one may already have Ray initialized by another
test module, and Ray caches its authentication mode and token per process."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from jobs import cluster

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))
AUTH_VARIABLES = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")

# Connects, runs one task, reports where it ran; or reports the ClusterError. Timings exclude Python's start.
# jobs/cluster.py is loaded on its own: the `jobs` package would import torch first (10 s on this machine).
DRIVER = """
import importlib.util, json, sys, time
spec = importlib.util.spec_from_file_location("cluster", "jobs/cluster.py")
cluster = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cluster)
print("connecting", flush=True)
began = time.monotonic()
try:
    started = cluster.connect(sys.argv[1] or None, timeout_s=float(sys.argv[2]) if sys.argv[2] else None)
except cluster.ClusterError as error:
    print(json.dumps({"error": str(error), "elapsed": time.monotonic() - began}))
    sys.exit(0)
import ray
answer = ray.get(ray.remote(lambda: 42).remote())
print(json.dumps({"started": started, "elapsed": time.monotonic() - began, "answer": answer,
                  "gcs": ray.get_runtime_context().gcs_address, "cpus": ray.cluster_resources().get("CPU")}))
cluster.disconnect(started)
"""


@dataclass
class Driven:
    outcome: dict
    stderr: str


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def clean_env(**overrides: str) -> dict[str, str]:
    """This process's environment without the Ray address and token settings (a local ray.init in this
    process sets RAY_AUTH_MODE=token), plus `overrides`."""
    env = {name: value for name, value in os.environ.items() if name not in AUTH_VARIABLES}
    return env | overrides


def drive(address: str, timeout_s: float | None, **env: str) -> Driven:
    """`DRIVER` in a fresh process; `timeout_s` None: connect's default (ILLAVA_RAY_CONNECT_TIMEOUT, else 30 s)."""
    timeout = "" if timeout_s is None else str(timeout_s)
    done = subprocess.run([sys.executable, "-c", DRIVER, address, timeout], cwd=REPO, env=clean_env(**env),
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return Driven(json.loads(done.stdout.strip().splitlines()[-1]), done.stderr)


@dataclass
class Head:
    port: int
    home: Path  # HOME of the head node: ~/.ray/auth_token lives there
    token: str
    root: Path  # its --temp-dir is root / "ray"


@pytest.fixture(scope="module")
def head() -> Iterator[Head]:
    """A one-CPU cluster as the README starts it, in its own HOME and temp dir so no other Ray on this machine
    is touched; stopped by signalling its own process group (`ray stop` would stop every Ray here)."""
    root = Path(tempfile.mkdtemp(prefix="rayhead-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    home = root / "home"
    home.mkdir()
    env = clean_env(HOME=str(home), RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")
    subprocess.run([RAY, "get-auth-token", "--generate"], env=env, capture_output=True, check=True, timeout=60)
    port, log = free_port(), root / "head.log"
    with log.open("w") as out:
        process = subprocess.Popen([RAY, "start", "--head", "--block", f"--port={port}", "--num-cpus=1",
                                    "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={root / 'ray'}"],
                                   env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        while "Ray runtime started" not in log.read_text():
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        assert "Token authentication is enabled" in log.read_text()
        yield Head(port, home, (home / ".ray" / "auth_token").read_text().strip(), root)
    finally:
        for number in (signal.SIGTERM, signal.SIGKILL):  # SIGKILL: whatever of the group outlived the SIGTERM
            with contextlib.suppress(ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(process.pid, number)
                process.wait(timeout=15)
        shutil.rmtree(root, ignore_errors=True)


def test_an_address_where_nothing_listens_fails_within_the_timeout():
    address = f"127.0.0.1:{free_port()}"
    outcome = drive(address, 5, RAY_ADDRESS=address).outcome
    assert outcome["elapsed"] < 15
    assert address in outcome["error"] and "no Ray cluster" in outcome["error"]


@pytest.mark.parametrize("reply", [b"", b"-ERR unknown command 'PRI'\r\n"], ids=["silent", "another-protocol"])
def test_a_server_that_is_not_ray_fails_within_the_timeout(reply):
    import ray

    # Ray dials this machine's node IP for a loopback address: listen where it will dial.
    host = ray.util.get_node_ip_address()
    with socket.create_server((host, 0)) as server:
        address = f"{host}:{server.getsockname()[1]}"
        threading.Thread(target=serve, args=(server, reply), daemon=True).start()
        driven = drive(address, 3)
    assert driven.outcome["elapsed"] < 8
    assert driven.outcome["error"].startswith(f"{address} is not a Ray cluster")
    assert "Traceback" not in driven.stderr


def test_the_connection_timeout_comes_from_the_environment():
    """ILLAVA_RAY_CONNECT_TIMEOUT bounds the wait for a server that accepts and never answers (30 s without it)."""
    import ray

    host = ray.util.get_node_ip_address()
    with socket.create_server((host, 0)) as server:
        address = f"{host}:{server.getsockname()[1]}"
        threading.Thread(target=serve, args=(server, b""), daemon=True).start()
        driven = drive(address, None, ILLAVA_RAY_CONNECT_TIMEOUT="2")
    assert 1.5 < driven.outcome["elapsed"] < 6, driven.outcome
    assert "within 2 s" in driven.outcome["error"] and cluster.TIMEOUT_ENV in driven.outcome["error"]


@pytest.mark.parametrize("value", ["0", "-3", "soon", "inf", "nan"])
def test_a_bad_connection_timeout_names_where_it_came_from(monkeypatch, value):
    monkeypatch.setenv(cluster.TIMEOUT_ENV, value)
    with pytest.raises(ValueError, match=f"^{cluster.TIMEOUT_ENV} must be a number of seconds > 0 .*got '{value}'$"):
        cluster.connect_timeout()
    with pytest.raises(ValueError, match="^the Ray connection timeout must be"):
        cluster.connect_timeout(value)
    assert cluster.connect_timeout(7) == 7.0  # an explicit timeout wins over the environment
    monkeypatch.delenv(cluster.TIMEOUT_ENV)
    assert cluster.connect_timeout() == 30.0


def test_sigterm_stops_a_connect_that_waits_for_an_answer():
    """The probe waits in Python's socket calls, where a SIGTERM handler (the driver's) runs at once; inside
    ray.init's C++ retries it waited for minutes."""
    import ray

    host = ray.util.get_node_ip_address()
    with socket.create_server((host, 0)) as server:
        threading.Thread(target=serve, args=(server, b""), daemon=True).start()
        waiting = "import signal, sys; signal.signal(signal.SIGTERM, lambda *_: sys.exit(143));" + DRIVER
        process = subprocess.Popen([sys.executable, "-c", waiting, f"{host}:{server.getsockname()[1]}", "60"],
                                   cwd=REPO, env=clean_env(), stdout=subprocess.PIPE, text=True)  # fmt: skip
        assert process.stdout.readline().strip() == "connecting"
        time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        stopped = time.monotonic()
        assert process.wait(timeout=10) == 143
        assert time.monotonic() - stopped < 3


def serve(server: socket.socket, reply: bytes) -> None:
    """Accept connections and answer each with `reply` (nothing: keep it open and silent)."""
    with contextlib.suppress(OSError):  # the server closes under this thread when the test ends
        while True:
            connection, _ = server.accept()
            connection.sendall(reply)


@pytest.mark.parametrize("where", ["head-node", "other-machine"])
def test_joins_the_cluster_started_as_the_readme_says(head, tmp_path, where):
    """README: `export RAY_AUTH_MODE=token`; off the head node also RAY_AUTH_TOKEN=$(ray get-auth-token)."""
    env = {"RAY_AUTH_MODE": "token", "RAY_ADDRESS": f"127.0.0.1:{head.port}"}
    if where == "head-node":
        env["HOME"] = str(head.home)  # the token file `ray start` found
    else:
        env |= {"HOME": str(tmp_path), "RAY_AUTH_TOKEN": head.token}  # no token file here
    driven = drive("", 30, **env)
    outcome = driven.outcome
    assert outcome.get("started") is True, outcome
    assert outcome["answer"] == 42 and outcome["cpus"] == 1  # this machine has more CPUs than that cluster
    assert outcome["gcs"].endswith(f":{head.port}")
    assert "Token authentication" not in driven.stderr and " INFO " not in driven.stderr  # Ray's notices kept off
    with socket.create_connection(("127.0.0.1", head.port), timeout=5):
        pass  # disconnect left the external cluster running


# Behind `slow` for the default run's time (9 min 29 s with it): joining that cluster is tested above in the
# default run, and a job's driver connects through the same `cluster.connect`.
@pytest.mark.slow
def test_a_tuning_job_runs_on_the_cluster_started_as_the_readme_says(head, tmp_path):
    """README, on the head node: `export RAY_AUTH_MODE=token`, then `RAY_ADDRESS=HEAD:6379 illava-tune submit`.
    The job's worker runs in that cluster (its session logs hold the worker), not in a local one."""
    workload = tmp_path / "workload.yaml"
    workload.write_text("name: on-cluster\nimage_size: [224, 224]\nsamples: 1\noutput_tokens: 2\n")
    url = f"sqlite:///{tmp_path / 'cluster.db'}"
    env = clean_env(HOME=str(head.home), RAY_AUTH_MODE="token", RAY_ADDRESS=f"127.0.0.1:{head.port}")
    done = subprocess.run([sys.executable, "-m", "illava_tune.cli", "submit", "--backbone", "tiny", "--workload",
                           str(workload), "--trials", "1", "--workers", "1", "--wait", "--database", url],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    (job_line,) = [line for line in done.stdout.splitlines() if line.startswith("job ")]
    assert job_line.endswith(": completed")
    assert "Token authentication" not in done.stderr and "Traceback" not in done.stderr
    from db import Database, queries

    with Database(url).session() as s:
        (job,) = queries.list_jobs(s)
        assert [t.state for t in queries.list_trials(s, job)] == ["complete"]
    logs = head.root / "ray" / "session_latest" / "logs"
    assert any(":actor_name:TrialWorker" in log.read_text(errors="replace") for log in logs.glob("worker-*.out"))
    with socket.create_connection(("127.0.0.1", head.port), timeout=5):
        pass  # the job left the cluster running


def test_the_readme_recipe_is_the_one_tested():
    readme = (REPO / "README.md").read_text()
    for step in ("ray get-auth-token --generate", "ray start --head --port=6379", "export RAY_AUTH_MODE=token",
                 "export RAY_AUTH_TOKEN=", "RAY_ADDRESS=HEAD:6379 illava-tune submit"):  # fmt: skip
        assert step in readme, step


@pytest.mark.parametrize(
    "case, wanted",
    [("mode-unset", "set RAY_AUTH_MODE=token"), ("wrong-token", "rejected the token from RAY_AUTH_TOKEN"),
     ("no-token", "RAY_AUTH_MODE=token but no token")],
)  # fmt: skip
def test_a_missing_or_wrong_token_is_one_clear_line(head, tmp_path, case, wanted):
    env = {"HOME": str(head.home)} if case == "mode-unset" else {"HOME": str(tmp_path), "RAY_AUTH_MODE": "token"}
    if case == "wrong-token":
        env["RAY_AUTH_TOKEN"] = "0" * 64
    address = f"127.0.0.1:{head.port}"
    driven = drive(address, 10, **env)
    error = driven.outcome["error"]
    assert wanted in error and address in error and "RAY_AUTH_TOKEN" in error, error
    assert head.token not in error and driven.outcome["elapsed"] < 10
    assert "Traceback" not in driven.stderr


@pytest.mark.parametrize("address", ["not-an-address", "ray://127.0.0.1:1"])
def test_an_unusable_address_is_refused_before_ray_init(monkeypatch, address):
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # probing happens before ray.init, in this process
    monkeypatch.setattr(ray, "init", lambda **_: pytest.fail("ray.init reached"))
    with pytest.raises(cluster.ClusterError, match="127.0.0.1:1|not-an-address"):
        cluster.connect(address, timeout_s=2)


def test_an_initialized_ray_is_left_alone(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "init", lambda **_: pytest.fail("ray.init reached"))
    assert cluster.connect("127.0.0.1:1") is False
    cluster.disconnect(False)


def test_a_signal_while_the_driver_waits_on_ray_keeps_its_reason():
    """Ray catches what a signal handler raises inside `ray.wait` and raises a bare KeyboardInterrupt
    instead; the driver's signal handling gives the reason back (a SIGTERM'd job said "illava-tune: " and
    stored "driver stopped: interrupted (Ctrl-C)")."""
    script = """
import os, signal, threading, time, ray
from jobs.driver import DriverStopped, _StopSignals
ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
ref = ray.remote(lambda: time.sleep(60)).remote()
with _StopSignals() as signals:
    print("waiting", flush=True)
    try:
        ray.wait([ref], timeout=60)
    except KeyboardInterrupt as error:
        stopped = signals.reason_of(error)
        print(type(error).__name__, repr(str(error)), type(stopped).__name__, str(stopped), flush=True)
assert signals.reason_of(KeyboardInterrupt()) is not None and signals.reason_of(ValueError()) is None
"""
    process = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=clean_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True)  # fmt: skip
    assert process.stdout.readline().strip() == "waiting"
    time.sleep(1)
    process.send_signal(signal.SIGTERM)
    assert process.stdout.readline().strip() == "KeyboardInterrupt '' DriverStopped stopped by SIGTERM"
    assert process.wait(timeout=30) == 0
