"""One driver owns a job at a time: who may take a job's lease, and the thread that keeps it.

A driver is named "host:pid:token" (`driver_id`). It takes the job's lease before it reads or
writes anything of the job (`take`), renews it from a background thread while it runs
(`LeaseKeeper`, so a model that takes minutes to load never lets it lapse), and every write it
makes opens with a renewal (`db.queries.renew_lease`), so a driver that lost the job writes
nothing more. The lease is taken when

- no driver holds it (never run, or the last driver stopped and released it);
- its holder is provably gone: a process of this host that no longer exists (a killed driver is
  replaced at once, without waiting for its lease to run out);
- it has expired and the caller forces it (`resume --force`): a driver on another host, or one
  that is alive but stopped checking in, is only replaced on the operator's word, and never while
  its lease is live;
- it was handed over: a detached driver (`jobs.start_background`) takes the job from the process
  that started it. That process takes the lease first (so it is refused at once, like a driver),
  starts the driver and hands the lease to the driver's id (`hand_over`) before the driver has even
  imported its modules, so from the start the lease names the process that will run the job: one
  that dies before taking the job is seen to be gone, and `resume` replaces it.
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
from datetime import datetime
from pathlib import Path

from db import Database, DatabaseError, LeaseHeld, LeaseLost, NotFound, queries
from db.models import utcnow

LEASE_S = 30.0  # how long a lease holds without a renewal
RENEW_S = 1.0  # how often the keeper renews it (and reads the cancel flag)
#: How long the lease of a detached driver that is still starting holds: its imports (torch, Ray) take
#: tens of seconds on a loaded machine, and it renews nothing before it takes the job.
START_S = 120.0


def driver_id(pid: int | None = None, token: str | None = None) -> str:
    """A driver's name, "host:pid:token": this process's with a fresh token, or (`pid`, `token`) that
    of a process this one starts."""
    return f"{socket.gethostname()}:{os.getpid() if pid is None else pid}:{token or secrets.token_hex(4)}"


def holder_is_gone(owner: str) -> bool:
    """Whether `owner` is a driver process of this host that no longer runs (False when unknown)."""
    host, _, rest = owner.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # someone else's process: alive
        return False
    try:  # a zombie (killed, not yet reaped by its parent) answers signal 0 but runs nothing
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def describe_lease(job_id: str, owner: str, expires_at: datetime | None) -> str:
    """Who holds the job and for how long, with what the user can do about it."""
    short = job_id[:8]
    if expires_at is None or holder_is_gone(owner):
        return f"job {short} was run by driver {owner}, which is gone; `illava-tune resume {short}` takes it over"
    left = (expires_at - utcnow()).total_seconds()
    if left > 0:
        return (
            f"job {short} is being run by driver {owner}; its lease is live until {expires_at:%H:%M:%S} UTC "
            f"({left:.0f} s from now, renewed every {RENEW_S:.0f} s while it runs). Wait for it, or stop it with "
            f"`illava-tune cancel {short}`; if that driver is gone, `illava-tune resume {short} --force` "
            "takes the job over once the lease has expired"
        )
    return (
        f"job {short} was run by driver {owner}, whose lease expired at {expires_at:%H:%M:%S} UTC ({-left:.0f} s "
        f"ago) without a renewal; if that driver is gone, `illava-tune resume {short} --force` takes the job over"
    )


def check_takeable(job_id: str, holder: str | None, expires_at: datetime | None, *, force: bool) -> None:
    """Raise `LeaseHeld` unless another driver may take the job from `holder` now: no holder, a
    holder known to be gone, or (with `force`) one whose lease has expired."""
    if holder is None or holder_is_gone(holder):
        return
    expired = expires_at is None or expires_at <= utcnow()
    if not (force and expired):
        raise LeaseHeld(describe_lease(job_id, holder, expires_at), holder, expires_at)


def take(database: Database, job_id: str, owner: str, *, force: bool = False, ttl_s: float = LEASE_S,
         handed_from: str | None = None) -> str:  # fmt: skip
    """Make `owner` the job's driver (see the module docstring for when); returns the full job id.
    `handed_from`: the process that started this driver, whose lease (or, once it handed it over,
    `owner`'s own) is taken whatever its state. Raises `LeaseHeld` naming the holder and when its
    lease expires."""
    for _ in range(10):  # another driver changed the lease between our read and our write: judge again
        with database.session() as s:
            job = queries.get_job(s, job_id)
            current = (job.lease_owner, job.lease_expires_at)
            if job.lease_owner not in (owner, handed_from):
                check_takeable(job.id, *current, force=force)
            if queries.acquire_lease(s, job.id, owner, ttl_s=ttl_s, replacing=current):
                return job.id
    raise LeaseHeld(f"job {job_id}: its lease keeps changing hands; is another driver starting?", *current)  # type: ignore[arg-type]


def hand_over(database: Database, job_id: str, holder: str, driver: str, *, ttl_s: float = START_S) -> bool:
    """Pass `holder`'s lease to `driver` (the process `holder` started to run the job); returns whether
    it did. False, nothing changed, when the lease is no longer `holder`'s: `driver` took it already."""
    with database.session() as s:
        job = queries.get_job(s, job_id)
        if job.lease_owner != holder:
            return False
        return queries.acquire_lease(s, job.id, driver, ttl_s=ttl_s, replacing=(holder, job.lease_expires_at))


def release(database: Database, job_id: str, owner: str) -> None:
    with database.session() as s:
        queries.release_lease(s, job_id, owner)


class LeaseKeeper:
    """Renews `owner`'s lease every `every_s` seconds from a daemon thread and reads the cancel flag.

    `check()` raises `LeaseLost` once a renewal found the job in other hands. A renewal that fails
    for another database error is retried at the next tick: the lease outlives a short outage."""

    def __init__(self, database: Database, job_id: str, owner: str, *, ttl_s: float = LEASE_S,
                 every_s: float = RENEW_S) -> None:  # fmt: skip
        self.database, self.job_id, self.owner = database, job_id, owner
        self.ttl_s, self.every_s = ttl_s, every_s
        self.cancel_requested = False
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{job_id[:8]}", daemon=True)

    def start(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                with self.database.session() as s:
                    job = queries.renew_lease(s, self.job_id, self.owner, ttl_s=self.ttl_s)
                    self.cancel_requested = bool(job.cancel_requested)
            except (LeaseLost, NotFound) as error:  # taken over, released, or the job deleted
                self.lost = str(error)
                return
            except DatabaseError:
                continue

    def check(self) -> None:
        if self.lost is not None:
            raise LeaseLost(self.lost)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
