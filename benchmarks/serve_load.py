"""`best` under load: what a fleet of deployments polling `illava-tune serve` costs, on PostgreSQL.

    python benchmarks/serve_load.py --out benchmarks/results/serve-load.md   # 10,000 schedules, 50 clients
    python benchmarks/serve_load.py --rate 2                 # open loop: each of the 50 clients 2 requests/s
    python benchmarks/serve_load.py --quick                  # smoke run: 500 schedules, 5 clients, 2 s

One run, on a PostgreSQL database made for it and dropped at the end (even on Ctrl-C or SIGTERM):
it stores `--schedules` schedules as the fronts of completed jobs (candidates, and a few published
and retired per (backbone, hardware, workload) group) by bulk inserts of the real models, starts
`illava-tune serve` (a subprocess, what users run) on a free loopback port and waits for /readyz,
then measures five phases of `--seconds` each, one after the other:

- `/healthz` from 1 client: the HTTP stack alone (no token, no database);
- `best` from 1 client: one request's service time, no queueing (it also warms the server up);
- `best` from `--clients` concurrent clients, the figure the goal is about (first in the table):
  each client has its own keep-alive connection (all in one asyncio loop in this process) and asks
  `GET /v1/schedules/best` with a read token for a random group and target; a share
  (`--conditional`) sends `If-None-Match` with the ETag last seen for that query, so 304s happen;
- in this process, no HTTP: `jobs.best` (the function `illava-tune best` calls) and
  `tokens.verify` (what each request's `Authorization` costs), each in a sequential loop.

A full run takes 5 x `--seconds` plus seeding plus about 15 s of start-up.

How to read it: latencies are client-side (perf_counter around each request; in `--rate` mode
from the time the request was due, so queueing in the client counts). The N-client p99 against the
1-client p50 is queueing; the 1-client `best` against `/healthz` is the route's own work, and
`jobs.best` plus `tokens.verify` is what the route calls. The cores columns are CPU seconds / wall
seconds over the phase: the server process, every process called postgres on the machine (other
users' queries included), and this process (the clients, or the direct calls); "CPU ms each" is
the server's CPU per request (for the direct rows, this process's per call). Where the cores add
up to the machine's count, the machine, not the server, is the limit: on a small one the clients,
the server and PostgreSQL share it. In a closed loop the mean latency is clients / throughput
(Little's law), so the report also says what throughput the goal would need. Errors are answers
other than 200/304/404, and exceptions (timeouts, refused connections); the exit status is 1 when
there were any, or when the server logged a traceback. Goal (the issue): p99 < 20 ms at 50 clients
with 0 errors.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import platform
import random
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from importlib.metadata import version
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402
from sqlalchemy import create_engine, func, insert, select, text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

import jobs  # noqa: E402
from db import Database, queries  # noqa: E402
from db.models import PublishedSchedule, Trial, TuningJob  # noqa: E402
from illava import Schedule  # noqa: E402
from illava_tune.server import tokens  # noqa: E402
from profiler import Fidelity, HardwareProfile, Measurement, Spread, Workload  # noqa: E402

PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
NAME_PREFIX = "illava_bench_"
GOAL_P99_MS = 20.0
DEPTH = 6  # encoder and LLM depth of the schedules stored (any valid schedule does)
SPEEDUPS = (1.2, 1.5, 2.0)  # targets the clients ask for: a small set, so answers repeat and ETags match
LATENCIES_MS = (25.0, 40.0, 60.0)
# name: (full run, --quick); an option given on the command line wins over both.
SIZES: dict[str, tuple[float, float]] = {
    "schedules": (10_000, 500),
    "backbones": (10, 3),
    "hardware": (4, 2),
    "workloads": (5, 2),
    "clients": (50, 5),
    "seconds": (20.0, 2.0),
}


@dataclass(frozen=True)
class Settings:
    """One run's sizes (see `--help`)."""

    pg_url: str
    schedules: int
    backbones: int
    hardware: int
    workloads: int
    front: int  # candidates per job (its Pareto front)
    published: int  # published schedules per group
    retired: int  # retired schedules per group
    clients: int
    seconds: float
    rate: float | None  # requests/s per client (open loop); None: closed loop
    conditional: float  # share of requests sending If-None-Match when an ETag is known
    candidates: float  # share of requests with candidates=true
    seed: int
    out: Path | None

    @property
    def groups(self) -> int:
        return self.backbones * self.hardware * self.workloads

    @property
    def loop(self) -> str:
        return f"open, {self.rate:g}/s each" if self.rate else "closed"


@dataclass(frozen=True)
class Group:
    """What a deployment asks `best` about: one backbone on one hardware group and workload."""

    backbone: str
    hardware: str
    workload: str


@dataclass(frozen=True)
class Query:
    group: Group
    target: str  # "speedup" or "latency_ms"
    value: float
    candidates: bool

    def params(self) -> dict[str, str]:
        group = self.group
        params = {"backbone": group.backbone, "hardware": group.hardware, "workload": group.workload}
        params[self.target] = f"{self.value:g}"
        return {**params, "candidates": "true"} if self.candidates else params

    def kwargs(self) -> dict[str, Any]:
        group = self.group
        return {
            "backbone": group.backbone,
            "hardware": group.hardware,
            "workload": group.workload,
            self.target: self.value,
            "candidates": self.candidates,
        }


@dataclass(frozen=True)
class Seeded:
    groups: list[Group]
    statuses: dict[str, int]  # schedules by status, counted back from the database
    jobs: int
    trials: int
    seconds: float


@dataclass
class Tally:
    """What one phase measured."""

    name: str
    clients: int
    loop: str
    http: bool = True  # False: called in this process
    latencies_ms: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    errors: int = 0
    examples: list[str] = field(default_factory=list)  # the first few errors, to print
    conditional_sent: int = 0
    conditional_200: int = 0  # a 200 to a matching If-None-Match: the same query's body changed
    wall_s: float = 0.0
    cores: dict[str, float | None] = field(default_factory=dict)

    def record(self, latency_ms: float, status: int, conditional: bool) -> None:
        self.latencies_ms.append(latency_ms)
        self.statuses[status] += 1
        self.conditional_sent += conditional
        self.conditional_200 += conditional and status == 200

    def error(self, what: str) -> None:
        self.errors += 1
        if len(self.examples) < 5:
            self.examples.append(what)


# ----------------------------------------------------------------------------- the database
@contextmanager
def bench_database(admin_url: str) -> Iterator[Database]:
    """A new PostgreSQL database on the server of `admin_url`, migrated, dropped on the way out."""
    name = f"{NAME_PREFIX}{uuid.uuid4().hex[:12]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5})
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
        database = Database(make_url(admin_url).set(database=name).render_as_string(hide_password=False))
        try:
            database.upgrade()
            yield database
        finally:
            database.close()
            with admin.connect() as connection:
                connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            print(f"dropped database {name}", file=sys.stderr)
    finally:
        admin.dispose()


def seed(database: Database, settings: Settings) -> Seeded:
    """Store the schedules: `settings.schedules` candidates on the fronts of completed jobs spread
    round-robin over the groups, then publish (and retire) a few of each group's."""
    start = time.perf_counter()
    rng = random.Random(settings.seed)
    n_jobs = math.ceil(settings.schedules / settings.front)
    with database.session() as s:
        groups = _reference_rows(s, settings)
        sizes = [settings.front] * (n_jobs - 1) + [settings.schedules - settings.front * (n_jobs - 1)]
        job_rows = [_job_row(groups[index % len(groups)][1]) for index in range(n_jobs)]
        s.execute(insert(TuningJob), job_rows)
        trial_rows = _trial_rows(job_rows, sizes, rng)
        trial_ids = s.scalars(insert(Trial).returning(Trial.id, sort_by_parameter_order=True), trial_rows).all()
        schedule_rows = _schedule_rows(job_rows, trial_rows, trial_ids, sizes, settings)
        s.execute(insert(PublishedSchedule), schedule_rows)
        queries.bump_version(s, queries.SCHEDULES)
    with database.session() as s:
        counted = s.execute(select(PublishedSchedule.status, func.count()).group_by(PublishedSchedule.status))
        statuses = {status: count for status, count in counted}
        n_trials = s.scalar(select(func.count()).select_from(Trial)) or 0
    return Seeded([group for group, _ in groups], statuses, n_jobs, n_trials, time.perf_counter() - start)


def _reference_rows(session: Any, settings: Settings) -> list[tuple[Group, dict[str, int]]]:
    """The backbones, hardware groups and workloads, and every combination of their ids."""
    backbones = [queries.get_or_create_backbone(session, f"bench-backbone-{i}") for i in range(settings.backbones)]
    hardware = [queries.get_or_create_hardware(session, _hardware(i).to_dict()) for i in range(settings.hardware)]
    workloads = [
        queries.get_or_create_workload(session, f"bench-workload-{i}", _workload(i).to_dict())
        for i in range(settings.workloads)
    ]
    return [
        (Group(b.name, h.key, w.name), {"backbone_id": b.id, "hardware_id": h.id, "workload_id": w.id})
        for b in backbones
        for h in hardware
        for w in workloads
    ]


def _hardware(index: int) -> HardwareProfile:
    return HardwareProfile(
        kind="cuda",
        name=f"Bench GPU {index}",
        memory_mib=81_559,
        threads=132,
        torch="2.13.0",
        cuda="12.8",
        driver="570.00",
        mig_profile=None,
        dtype="bfloat16",
        attention="sdpa",
    )


def _workload(index: int) -> Workload:
    return Workload(name=f"bench-workload-{index}", images_per_sample=1 + index % 3, image_size=(448 + 64 * index, 448))


def _job_row(ids: dict[str, int]) -> dict[str, Any]:
    job_id, now = uuid.uuid4().hex, datetime.now(UTC)
    return {
        "id": job_id,
        "study_name": f"illava-{job_id}",
        **ids,
        "status": "completed",
        "n_trials": 40,
        "n_workers": 1,
        "sampler": "tpe",
        "seed": 0,
        "search_space": {},
        "constraints": {},
        "created_at": now - timedelta(hours=1),
        "started_at": now - timedelta(hours=1),
        "finished_at": now,
        "heartbeat_at": now,
        "cancel_requested": False,
        "objective": "speedup",
    }


def _trial_rows(job_rows: list[dict[str, Any]], sizes: list[int], rng: random.Random) -> list[dict[str, Any]]:
    """Each job's trials: its front (`size` points trading speed for accuracy), then half as many
    dominated ones (slower and less accurate, off the front)."""
    rows: list[dict[str, Any]] = []
    for job, size in zip(job_rows, sizes):
        unmerged_ms = rng.uniform(40.0, 120.0)
        reductions = sorted(round(rng.uniform(0.5, 0.95), 2) for _ in range(size))
        points = [_point(r, unmerged_ms, rng) for r in reductions]
        points += [_dominated(rng.choice(points[:size]), rng) for _ in range(size // 2)]
        rows += [_trial_row(job["id"], number, point) for number, point in enumerate(points)]
    return rows


@dataclass(frozen=True)
class _Point:
    reduction: float
    latency_ms: float
    speedup: float
    memory_mib: float
    accuracy: float


def _point(reduction: float, unmerged_ms: float, rng: random.Random) -> _Point:
    speedup = 1.0 + 1.8 * (reduction - 0.4) * rng.uniform(0.9, 1.1)
    accuracy = min(0.9, 0.9 - 0.5 * (reduction - 0.5) * rng.uniform(0.8, 1.2))
    return _Point(reduction, unmerged_ms / speedup, speedup, 16_000 * (1 - 0.2 * reduction), accuracy)


def _dominated(point: _Point, rng: random.Random) -> _Point:
    worse = rng.uniform(1.05, 1.3)
    return _Point(
        point.reduction, point.latency_ms * worse, point.speedup / worse, point.memory_mib, point.accuracy / worse
    )


def _trial_row(job_id: str, number: int, point: _Point) -> dict[str, Any]:
    schedule, metrics = _schedule(point.reduction), _measurement(point)
    now = datetime.now(UTC)
    return {
        "job_id": job_id,
        "number": number,
        "state": "complete",
        "schedule": schedule,
        "latency_ms": point.latency_ms,
        "memory_mib": point.memory_mib,
        "accuracy": point.accuracy,
        "retention": point.accuracy / 0.9,
        "fidelity": None,
        "feasible": True,
        "metrics": metrics,
        "error": None,
        "started_at": now,
        "finished_at": now,
        "speedup": point.speedup,
    }


_SCHEDULES: dict[float, dict[str, Any]] = {}


def _schedule(reduction: float) -> dict[str, Any]:
    if reduction not in _SCHEDULES:
        _SCHEDULES[reduction] = Schedule.paper_default(reduction, encoder_depth=DEPTH, llm_depth=DEPTH).to_dict()
    return _SCHEDULES[reduction]


def _measurement(point: _Point) -> dict[str, Any]:
    """A document shaped like a real trial's metrics (`Measurement.to_dict()`), so rows weigh what they do."""
    seconds = point.latency_ms / 1000

    def spread(median: float) -> Spread:
        return Spread(median, median * 1.05, median * 0.95, median * 1.1, 0.03, 9)

    return Measurement(
        backbone="bench",
        schedule=_schedule(point.reduction),
        workload=_workload(0).to_dict(),
        hardware=_hardware(0).to_dict(),
        versions={"torch": "2.13.0", "transformers": "4.57.0", "illava": "bench"},
        prefill_s=spread(seconds),
        encoder_s=spread(seconds * 0.3),
        merger_s=spread(seconds * 0.02),
        llm_s=spread(seconds * 0.68),
        decode_tokens_per_s=40.0,
        samples_per_s=1 / (seconds + 0.4),
        image_tokens_to_llm=256 * (1 - point.reduction),
        tokens_per_llm_layer=300.0,
        peak_memory={"objective_mib": point.memory_mib, "objective_source": "seeded by benchmarks/serve_load.py"},
        accuracy=point.accuracy,
        retention=point.accuracy / 0.9,
        fidelity=Fidelity(0.95, 0.01, 0.9),
        n_samples=200,
        accuracy_score="choice",
        speedup=spread(point.speedup),
        reference_prefill_s=spread(seconds * point.speedup),
    ).to_dict()


def _schedule_rows(
    job_rows: list, trial_rows: list, trial_ids: Sequence[int], fronts: list[int], settings: Settings
) -> list[dict[str, Any]]:
    """A candidate row per front point; in each group's first job, a few spread over its front are
    published and a few retired."""
    rows, offset, now, seen = [], 0, datetime.now(UTC), set()
    for job, size in zip(job_rows, fronts):
        group = (job["backbone_id"], job["hardware_id"], job["workload_id"])
        status = _statuses(size, settings) if group not in seen else ["candidate"] * size
        seen.add(group)
        for index in range(size):
            trial, trial_id = trial_rows[offset + index], trial_ids[offset + index]
            rows.append(_published_row(job, trial, trial_id, status[index], now))
        offset += size + size // 2
    return rows


def _statuses(size: int, settings: Settings) -> list[str]:
    """Statuses of one front, by reduction: `published + retired` points spread over it, the
    retired ones at every other of those (then from the slow end), the rest candidates."""
    published = min(settings.published, size)
    retired = min(settings.retired, size - published)
    n = published + retired
    chosen = [round(rank * (size - 1) / max(n - 1, 1)) for rank in range(n)]
    retired_ranks = set((list(range(1, n, 2)) + list(range(n - 1, -1, -2)))[:retired])
    status = ["candidate"] * size
    for rank, index in enumerate(chosen):
        status[index] = "retired" if rank in retired_ranks else "published"
    return status


def _published_row(job: dict, trial: dict, trial_id: int, status: str, now: datetime) -> dict[str, Any]:
    copied = ("schedule", "latency_ms", "memory_mib", "accuracy", "retention", "fidelity", "metrics", "speedup")
    return {
        "job_id": job["id"],
        "trial_id": trial_id,
        "backbone_id": job["backbone_id"],
        "hardware_id": job["hardware_id"],
        "workload_id": job["workload_id"],
        **{name: trial[name] for name in copied},
        "created_at": now,
        "status": status,
        "on_front": True,
        "published_at": now if status != "candidate" else None,
        "retired_at": now if status == "retired" else None,
    }


# ----------------------------------------------------------------------------- the server
@contextmanager
def serving(database: Database, log_file: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    """`illava-tune serve` on a free loopback port, answering /readyz: (its URL, the process)."""
    port = _free_port()
    command = [sys.executable, "-m", "illava_tune.cli", "serve", "--port", str(port), "--log-level", "warning"]
    # The URL goes in the environment, not the command line, where `ps` would show a password.
    env = {**os.environ, "DATABASE_URL": database.url}
    with log_file.open("wb") as log:
        server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=log_file.parent)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, server, log_file)
        yield url, server
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, server: subprocess.Popen, log_file: Path, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    with httpx.Client(base_url=url, timeout=5) as client:
        while time.monotonic() < deadline:
            if server.poll() is not None:
                raise SystemExit(f"the server exited ({server.returncode}):\n{_tail(log_file)}")
            try:
                if client.get("/readyz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
    raise SystemExit(f"the server did not answer /readyz within {timeout_s:g} s:\n{_tail(log_file)}")


def _tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


# ----------------------------------------------------------------------------- CPU use
_TICK = os.sysconf("SC_CLK_TCK")


def _cpu_of(pid: int) -> float | None:
    """CPU seconds (user + system) of a process so far, None when it cannot be read."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / _TICK


def _tree_cpu(pid: int) -> float | None:
    """CPU seconds so far of a process and its live children (any the server starts)."""
    own = _cpu_of(pid)
    if own is None:
        return None
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                own += _cpu_of(int(entry.name)) or 0.0
        except (OSError, ValueError, IndexError):
            continue
    return own


def _postgres_cpu() -> dict[int, float]:
    """CPU seconds so far of every process called postgres, by pid (none readable: a remote server)."""
    seconds: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "comm").read_text().strip() == "postgres":
                used = _cpu_of(int(entry.name))
                if used is not None:
                    seconds[int(entry.name)] = used
        except OSError:  # the process ended meanwhile
            continue
    return seconds


@dataclass(frozen=True)
class _CpuClock:
    server: float | None
    postgres: dict[int, float]
    this_process: float

    @classmethod
    def now(cls, server_pid: int) -> _CpuClock:
        return cls(_tree_cpu(server_pid), _postgres_cpu(), time.process_time())

    def cores_since(self, before: _CpuClock, wall_s: float) -> dict[str, float | None]:
        """Cores busy between `before` and now. A PostgreSQL process that ended in between is lost
        (an undercount); one that started is counted from zero."""
        server = None if self.server is None or before.server is None else self.server - before.server
        postgres = sum(used - before.postgres.get(pid, 0.0) for pid, used in self.postgres.items())
        spent = {
            "server": server,
            "postgres": postgres if self.postgres else None,
            "this process": self.this_process - before.this_process,
        }
        return {name: None if used is None else used / wall_s for name, used in spent.items()}


@contextmanager
def measuring_cpu(tally: Tally, server_pid: int) -> Iterator[None]:
    before, start = _CpuClock.now(server_pid), time.perf_counter()
    yield
    tally.cores = _CpuClock.now(server_pid).cores_since(before, time.perf_counter() - start)


# ----------------------------------------------------------------------------- load
def all_queries(groups: Sequence[Group], candidates: float, rng: random.Random) -> list[Query]:
    """Every (group, target) the clients ask, each with or without candidates=true."""
    targets = [("speedup", value) for value in SPEEDUPS] + [("latency_ms", value) for value in LATENCIES_MS]
    return [Query(group, target, value, rng.random() < candidates) for group in groups for target, value in targets]


@dataclass
class Fleet:
    """The clients of one phase and what they share: the queries they ask (None: /healthz), the
    last ETag seen for each query, and the tally."""

    url: str
    token: str
    probes: Sequence[Query] | None
    tally: Tally
    etags: dict[Query, str] = field(default_factory=dict)
    conditional: float = 0.0  # share of requests sending If-None-Match when an ETag is known

    async def run(self, clients: int, seconds: float, rate: float | None, seed: int) -> None:
        """`clients` clients, each on its own keep-alive connection, for `seconds`; each warms its
        connection up with one request that is checked but not timed."""
        sessions = [self._client() for _ in range(clients)]
        try:
            first = self.probes[0] if self.probes else None
            await asyncio.gather(*(self._send(http, first, time.perf_counter(), timed=False) for http in sessions))
            start = time.perf_counter()
            rngs = [random.Random(seed * 1000 + index) for index in range(clients)]
            await asyncio.gather(*(self._loop(http, rng, start + seconds, rate) for http, rng in zip(sessions, rngs)))
            self.tally.wall_s = time.perf_counter() - start
        finally:
            await asyncio.gather(*(http.aclose() for http in sessions))

    def _client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.url,
            timeout=30,
            headers={"Authorization": f"Bearer {self.token}"},
            limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
        )

    async def _loop(self, http: httpx.AsyncClient, rng: random.Random, deadline: float, rate: float | None) -> None:
        """One client: closed loop (the next request when the last is answered), or open loop at
        `rate`, timed from when each request was due."""
        due = time.perf_counter() + (rng.random() / rate if rate else 0.0)  # open-loop clients out of step
        while True:
            if rate:
                await asyncio.sleep(max(0.0, due - time.perf_counter()))
                started, due = due, due + 1 / rate
            else:
                started = time.perf_counter()
            if started >= deadline:
                return
            query = rng.choice(self.probes) if self.probes else None
            await self._send(http, query, started, send_tag=rng.random() < self.conditional)

    async def _send(self, http: httpx.AsyncClient, query: Query | None, started: float, *, send_tag: bool = False,
                    timed: bool = True) -> None:  # fmt: skip
        tag = self.etags.get(query) if send_tag and query is not None else None
        try:
            if query is None:
                response = await http.get("/healthz")
            else:
                headers = {"If-None-Match": tag} if tag else {}
                response = await http.get("/v1/schedules/best", params=query.params(), headers=headers)
        except httpx.HTTPError as err:
            self.tally.error(f"{type(err).__name__}: {err}")
            return
        if timed:
            self.tally.record((time.perf_counter() - started) * 1000, response.status_code, tag is not None)
        self._check(response, query, tag)

    def _check(self, response: httpx.Response, query: Query | None, tag: str | None) -> None:
        status = response.status_code
        if status not in (200, 304, 404):
            self.tally.error(f"HTTP {status}: {response.text[:300]}")
        elif status == 304 and not tag:
            self.tally.error("304 to a request without If-None-Match")
        elif status == 200 and query is not None:
            if "etag" in response.headers:
                self.etags[query] = response.headers["etag"]
            else:
                self.tally.error("a 200 from best without an ETag")


def run_direct(name: str, call: Callable[[], object], seconds: float, tally: Tally) -> None:
    """`call` in a sequential loop in this process for `seconds`: no HTTP, no concurrency."""
    start = time.perf_counter()
    deadline = start + seconds
    while (before := time.perf_counter()) < deadline:
        try:
            call()
        except jobs.NoSchedules:
            tally.statuses[404] += 1
        except Exception as err:  # any failure is an error of the run, and reported
            tally.error(f"{name}: {type(err).__name__}: {err}")
        tally.latencies_ms.append((time.perf_counter() - before) * 1000)
    tally.wall_s = time.perf_counter() - start


def verify_or_fail(database: Database, token: str) -> Callable[[], object]:
    def verify() -> object:
        if tokens.verify(database, token) is None:
            raise RuntimeError("the read token did not verify")
        return None

    return verify


# ----------------------------------------------------------------------------- the report
def percentile(ordered: Sequence[float], share: float) -> float:
    """Nearest rank: the smallest value with at least `share` of the values at or below it."""
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


COLUMNS = (
    "measured",
    "clients",
    "loop",
    "requests",
    "per s",
    "p50 ms",
    "p90 ms",
    "p99 ms",
    "max ms",
    "200",
    "304",
    "404",
    "errors",
    "server cores",
    "PostgreSQL cores",
    "this process cores",
    "CPU ms each",
)


def table_row(tally: Tally) -> list[str]:
    ordered = sorted(tally.latencies_ms)
    n = len(ordered)
    times = [f"{percentile(ordered, share):.2f}" for share in (0.5, 0.9, 0.99, 1.0)] if n else ["-"] * 4
    codes = [str(tally.statuses[code]) for code in (200, 304)] if tally.http else ["-", "-"]
    cores = [
        f"{tally.cores[name]:.2f}" if tally.cores.get(name) is not None else "-"
        for name in ("server", "postgres", "this process")
    ]
    per_s = f"{n / tally.wall_s:.0f}" if tally.wall_s > 0 else "-"
    return [
        tally.name,
        str(tally.clients),
        tally.loop,
        str(n),
        per_s,
        *times,
        *codes,
        str(tally.statuses[404]),
        str(tally.errors),
        *cores,
        _cpu_each(tally),
    ]


def _cpu_each(tally: Tally) -> str:
    """CPU milliseconds per request of the process doing the work: the server's, or this one's for direct calls."""
    busy = tally.cores.get("server" if tally.http else "this process")
    if busy is None or not tally.latencies_ms:
        return "-"
    return f"{busy * tally.wall_s * 1000 / len(tally.latencies_ms):.2f}"


def markdown_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or "unknown CPU",
    )
    return f"{cpu}, {os.cpu_count()} cores; Python {platform.python_version()}"


def postgres_version(admin_url: str) -> str:
    engine = create_engine(admin_url, connect_args={"connect_timeout": 5})
    try:
        with engine.connect() as connection:
            return str(connection.execute(text("SHOW server_version")).scalar())
    finally:
        engine.dispose()


def report(argv: Sequence[str], settings: Settings, seeded: Seeded, tallies: list[Tally], tracebacks: int) -> str:
    """The Markdown report; `tallies[0]` is the phase the goal is about (`settings.clients` clients)."""
    load = tallies[0]
    ordered = sorted(load.latencies_ms)
    p99 = percentile(ordered, 0.99) if ordered else math.inf
    met = p99 < GOAL_P99_MS and load.errors == 0 and bool(ordered) and not tracebacks
    statuses = ", ".join(f"{status} {count:,}" for status, count in sorted(seeded.statuses.items()))
    lines = [
        "## `best` under load (benchmarks/serve_load.py)",
        "",
        f"- command: `{shlex.join(['python', 'benchmarks/serve_load.py', *argv])}`",
        f"- date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; machine: {machine()}; PostgreSQL "
        f"{postgres_version(settings.pg_url)}; uvicorn {version('uvicorn')}, httpx {version('httpx')}",
        f"- stored: {sum(seeded.statuses.values()):,} schedules ({statuses}) on the fronts of {seeded.jobs:,} jobs "
        f"with {seeded.trials:,} trials, {len(seeded.groups)} groups ({settings.backbones} backbones x "
        f"{settings.hardware} hardware x {settings.workloads} workloads); seeded in {seeded.seconds:.1f} s",
        "- server: `illava-tune serve` (one process)",
        f"- load: each phase {settings.seconds:g} s; `best` for a random group and target (speedup "
        f"{'/'.join(f'{v:g}' for v in SPEEDUPS)} or latency_ms {'/'.join(f'{v:g}' for v in LATENCIES_MS)}), "
        f"{settings.candidates:.0%} of the queries with candidates=true, {settings.conditional:.0%} of the requests "
        f"with If-None-Match once an ETag is known ({load.conditional_sent:,} sent at {settings.clients} clients, "
        f"{load.conditional_200:,} of them answered 200, i.e. the body changed)",
        "",
        markdown_table([table_row(tally) for tally in tallies]),
        "",
        f"Goal p99 < {GOAL_P99_MS:g} ms with 0 errors at {settings.clients} clients ({load.loop} loop): "
        f"{'met' if met else 'NOT met'} (p99 {p99:.2f} ms, {load.errors} errors).",
        "",
        f"The clients (this process), the server and PostgreSQL ran on the same {os.cpu_count()} cores: the cores "
        "columns say how much of them each used; latencies are client-side, queueing in the client included.",
    ]
    if not settings.rate and load.wall_s > 0:
        lines += ["", _littles_law(load)]
    if tracebacks:
        lines += ["", f"The server logged {tracebacks} traceback(s) (a 500 or a crash): the run is not valid."]
    for tally in tallies:
        lines += [f"- {tally.name}: error: {example}" for example in tally.examples]
    return "\n".join(lines) + "\n"


def _littles_law(load: Tally) -> str:
    """What a closed loop measures: with every client always waiting, mean latency = clients / throughput."""
    throughput = len(load.latencies_ms) / load.wall_s
    mean_ms = sum(load.latencies_ms) / max(len(load.latencies_ms), 1)
    return (
        f"In a closed loop each client waits for its answer, so the mean latency is clients / throughput "
        f"(Little's law; here {load.clients} / {throughput:.0f} per s = {1000 * load.clients / throughput:.1f} ms, "
        f"measured mean {mean_ms:.1f} ms): a p99 under {GOAL_P99_MS:g} ms at {load.clients} clients needs more "
        f"than {1000 * load.clients / GOAL_P99_MS:,.0f} requests/s. `--rate` offers a fixed load instead."
    )


# ----------------------------------------------------------------------------- main
def parse(argv: Sequence[str]) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--pg-url",
        default=os.environ.get("ILLAVA_TEST_PG_URL", PG_URL),
        help="an admin URL of the PostgreSQL server: the run creates its own database there "
        f"({NAME_PREFIX}<hex>) and drops it (default: $ILLAVA_TEST_PG_URL, else %(default)s)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke-run sizes: " + ", ".join(f"--{name} {quick:g}" for name, (_, quick) in SIZES.items()),
    )
    parser.add_argument("--schedules", type=int, help=f"schedules stored (default {SIZES['schedules'][0]:g})")
    parser.add_argument("--backbones", type=int, help=f"backbones (default {SIZES['backbones'][0]:g})")
    parser.add_argument("--hardware", type=int, help=f"hardware groups (default {SIZES['hardware'][0]:g})")
    parser.add_argument(
        "--workloads",
        type=int,
        help=f"workloads (default {SIZES['workloads'][0]:g}); the groups are backbones x hardware x workloads",
    )
    parser.add_argument("--front", type=int, default=10, help="schedules on each job's front (default %(default)s)")
    parser.add_argument("--published", type=int, default=3, help="published schedules per group (default %(default)s)")
    parser.add_argument("--retired", type=int, default=1, help="retired schedules per group (default %(default)s)")
    parser.add_argument("--clients", type=int, help=f"concurrent clients (default {SIZES['clients'][0]:g})")
    parser.add_argument(
        "--seconds", type=float, help=f"length of each phase in seconds (default {SIZES['seconds'][0]:g})"
    )
    parser.add_argument(
        "--rate",
        type=float,
        help="requests/s per client, open loop (default: closed loop, each "
        "client sending its next request when the last is answered)",
    )
    parser.add_argument(
        "--conditional",
        type=float,
        default=0.5,
        help="share of requests sending If-None-Match with the last ETag seen for that query (default %(default)s)",
    )
    parser.add_argument(
        "--candidates",
        type=float,
        default=0.0,
        help="share of the queries asking candidates=true "
        "(every front point, not only the published ones; default %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the stored data and the queries")
    parser.add_argument("--out", type=Path, help="also write the report (Markdown) to this file")
    args = parser.parse_args(argv)
    sizes = {
        name: type(full)(getattr(args, name) if getattr(args, name) is not None else (quick if args.quick else full))
        for name, (full, quick) in SIZES.items()
    }
    settings = Settings(
        pg_url=args.pg_url,
        front=args.front,
        published=args.published,
        retired=args.retired,
        rate=args.rate,
        conditional=args.conditional,
        candidates=args.candidates,
        seed=args.seed,
        out=args.out,
        **sizes,
    )
    _validate(parser, settings)
    return settings


def _validate(parser: argparse.ArgumentParser, settings: Settings) -> None:
    positive = ("schedules", "backbones", "hardware", "workloads", "front", "published", "clients", "seconds")
    for name in positive:
        if getattr(settings, name) <= 0:
            parser.error(f"--{name} must be > 0")
    if settings.retired < 0 or (settings.rate is not None and settings.rate <= 0):
        parser.error("--retired must be >= 0 and --rate > 0")
    if not (0 <= settings.conditional <= 1 and 0 <= settings.candidates <= 1):
        parser.error("--conditional and --candidates are shares between 0 and 1")
    if math.ceil(settings.schedules / settings.front) < settings.groups:
        parser.error(
            f"--schedules {settings.schedules} make {math.ceil(settings.schedules / settings.front)} jobs of "
            f"--front {settings.front}, fewer than the {settings.groups} groups (backbones x hardware x "
            "workloads): every group needs a job"
        )


def _stop_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, so the server is stopped and the database dropped."""

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, stop)


def measure(settings: Settings, database: Database, seeded: Seeded, url: str, server_pid: int,
            token: str) -> list[Tally]:  # fmt: skip
    """The phases, one after the other, the 1-client ones first (they warm the server up); the
    `settings.clients` one comes first in the answer."""
    probes = all_queries(seeded.groups, settings.candidates, random.Random(settings.seed))
    etags: dict[Query, str] = {}  # what the 1-client phase saw the N clients know: a fleet already polling
    seconds, seed = settings.seconds, settings.seed

    def http(clients: int, rate: float | None, queries: Sequence[Query] | None) -> Callable[[Tally], None]:
        def phase(tally: Tally) -> None:
            fleet = Fleet(url, token, queries, tally, etags if queries else {}, settings.conditional)
            asyncio.run(fleet.run(clients, seconds, rate, seed))

        return phase

    load = Tally("server: best", settings.clients, settings.loop)
    phases: list[tuple[Tally, Callable[[Tally], None]]] = [
        (Tally("server: /healthz", 1, "closed"), http(1, None, None)),
        (Tally("server: best", 1, "closed"), http(1, None, probes)),
        (load, http(settings.clients, settings.rate, probes)),
        (Tally("direct: jobs.best", 1, "closed", http=False),
         lambda t: run_direct("jobs.best", _direct_best(database, probes, seed), seconds, t)),
        (Tally("direct: tokens.verify", 1, "closed", http=False),
         lambda t: run_direct("tokens.verify", verify_or_fail(database, token), seconds, t)),
    ]  # fmt: skip
    for tally, phase in phases:
        print(f"measuring {tally.name} from {tally.clients} client(s) for {seconds:g} s", file=sys.stderr)
        with measuring_cpu(tally, server_pid):
            phase(tally)
    return [load] + [tally for tally, _ in phases if tally is not load]


def _direct_best(database: Database, probes: Sequence[Query], seed: int) -> Callable[[], object]:
    rng = random.Random(seed)
    return lambda: jobs.best(database, **rng.choice(probes).kwargs())


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    settings = parse(argv)
    _stop_on_sigterm()
    with bench_database(settings.pg_url) as database, tempfile.TemporaryDirectory(prefix="serve-load-") as folder:
        seeded = seed(database, settings)
        counts = ", ".join(f"{count} {status}" for status, count in sorted(seeded.statuses.items()))
        print(f"stored {counts} schedules in {seeded.seconds:.1f} s", file=sys.stderr)
        token, _ = tokens.create(database, scope="read", name="serve-load")
        log_file = Path(folder) / "serve.log"
        with serving(database, log_file) as (url, server):
            tallies = measure(settings, database, seeded, url, server.pid, token)
        tracebacks = log_file.read_text(errors="replace").count("Traceback")
        if tracebacks:
            print(f"the server logged {tracebacks} traceback(s); its log ends:\n{_tail(log_file)}", file=sys.stderr)
    markdown = report(argv, settings, seeded, tallies, tracebacks)
    print(markdown)
    if settings.out is not None:
        settings.out.write_text(markdown)
    return 1 if tracebacks or any(tally.errors for tally in tallies) else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM; the database was dropped on the way out
        print("interrupted", file=sys.stderr)
        sys.exit(130)
