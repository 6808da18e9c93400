"""`db.queries`, every function on SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import json
import math
import uuid
from datetime import UTC, datetime

import pytest
from sqlalchemy import func, select

from db import AmbiguousId, BudgetExhausted, Conflict, LeaseLost, NotFound, PublishedSchedule, Trial, TuningJob, queries
from db.queries import _insert_or_get

CPU = {"kind": "cpu", "name": "Test CPU", "memory_mib": 1024, "threads": 2, "torch": "2.13.0", "cuda": None,
       "driver": None, "mig_profile": None}  # fmt: skip
H100 = {**CPU, "kind": "cuda", "name": "NVIDIA H100 80GB HBM3", "threads": 132, "mig_profile": None}
SCHEDULE = {"method": "illava", "reduction": 0.778, "encoder_layers": [1], "llm_layers": [2]}


def make_job(session, *, backbone="small", hardware=CPU, workload=("single-448", {"name": "single-448"}), **overrides):
    values = {"n_trials": 8, "n_workers": 2, "sampler": "tpe", "seed": 0, "search_space": {"reduction": [0.5, 0.95]},
              "constraints": {"min_retention": 0.9}}  # fmt: skip
    values.update(overrides)
    return queries.create_job(
        session,
        backbone=queries.get_or_create_backbone(session, backbone),
        hardware=queries.get_or_create_hardware(session, hardware),
        workload=queries.get_or_create_workload(session, *workload),
        **values,
    )


def complete(session, job, number, latency_ms, memory_mib=100.0, **extra):
    return queries.record_trial(
        session, job, number, state="complete", schedule={**SCHEDULE, "reduction": number / 10},
        latency_ms=latency_ms, memory_mib=memory_mib, accuracy=0.5, retention=0.9, fidelity=0.95, feasible=True,
        metrics={"prefill_s": {"median": latency_ms / 1000}}, **extra,
    )  # fmt: skip


# ----------------------------------------------------------------------------- reference rows
def test_get_or_create_backbone(database):
    with database.session() as session:
        first = queries.get_or_create_backbone(session, "small")
        again = queries.get_or_create_backbone(session, "small")
        assert again is first and first.path is None and first.config is None
        queries.get_or_create_backbone(session, "small", path="/models/small", config={"layers": 4})
    with database.session() as session:
        stored = queries.get_or_create_backbone(session, "small")
        assert (stored.id, stored.path, stored.config) == (first.id, "/models/small", {"layers": 4})
        # Not given is not "clear": the stored path stays.
        assert queries.get_or_create_backbone(session, "small").path == "/models/small"
    with pytest.raises(ValueError, match="backbone name"), database.session() as session:
        queries.get_or_create_backbone(session, " ")


def test_get_or_create_hardware(database):
    with database.session() as session:
        cpu = queries.get_or_create_hardware(session, CPU)
        assert cpu.key == "cpu:Test CPU x2 float32/sdpa" and cpu.profile == CPU
        newer_torch = queries.get_or_create_hardware(session, {**CPU, "torch": "2.14.0"})
        assert newer_torch is cpu and cpu.profile["torch"] == "2.13.0"  # first profile kept
        assert queries.get_or_create_hardware(session, H100).key == "cuda:NVIDIA H100 80GB HBM3 float32/sdpa"
        assert queries.get_or_create_hardware(session, {**H100, "mig_profile": "1g.10gb"}).key == (
            "cuda:NVIDIA H100 80GB HBM3 MIG 1g.10gb float32/sdpa"
        )
        bf16 = queries.get_or_create_hardware(session, {**H100, "dtype": "bfloat16", "attention": "illava_packed"})
        assert bf16.key == "cuda:NVIDIA H100 80GB HBM3 bfloat16/illava_packed"  # its own group
        assert queries.get_or_create_hardware(session, {"key": "lab-box", "kind": "cpu"}).key == "lab-box"
        assert queries.get_or_create_hardware(session, CPU, key="explicit").key == "explicit"
        with pytest.raises(ValueError, match="no 'key' and not the fields"):
            queries.get_or_create_hardware(session, {"kind": "tpu"})
        with pytest.raises(ValueError, match="hardware profile must be a mapping"):
            queries.get_or_create_hardware(session, ["cpu"])


def test_hardware_key_matches_the_profilers():
    from illava import runtime
    from profiler.hardware import HardwareProfile

    assert (queries.DEFAULT_DTYPE, queries.DEFAULT_ATTENTION) == (runtime.DEFAULT_DTYPE, runtime.DEFAULT_ATTENTION)
    bf16 = {**H100, "dtype": "bfloat16", "attention": "flash_attention_2"}
    for profile in (CPU, H100, {**H100, "mig_profile": "3g.40gb"}, bf16, {**CPU, "dtype": "float16"}):
        assert queries.hardware_key(profile) == HardwareProfile.from_dict(profile).key()


def test_get_or_create_workload_by_fingerprint(database):
    spec = {"name": "single-448", "image_size": [448, 448], "batch_size": 1}
    with database.session() as session:
        row = queries.get_or_create_workload(session, "single-448", spec)
        reordered = dict(reversed(list(spec.items())))
        assert queries.get_or_create_workload(session, "renamed", reordered) is row
        assert row.name == "single-448"
        canonical = json.dumps(spec, sort_keys=True, separators=(",", ":"))
        assert row.fingerprint == hashlib.sha256(canonical.encode()).hexdigest()
        other = queries.get_or_create_workload(session, "single-448", {**spec, "batch_size": 4})
        assert other.id != row.id
        with pytest.raises(ValueError, match="workload spec is not storable as JSON"):
            queries.get_or_create_workload(session, "nan", {"x": math.nan})


def test_insert_or_get_survives_losing_the_race(database):
    """A concurrent writer inserted the same key between our lookup and our insert: the savepoint
    rolls back only our insert, and the rest of the transaction still commits."""
    with database.session() as session:
        kept = queries.get_or_create_backbone(session, "kept-in-the-same-transaction")
        theirs = queries.get_or_create_backbone(session, "small")
        from db import Backbone

        ours = _insert_or_get(session, Backbone(name="small"), Backbone.name == "small")
        assert ours is theirs
    with database.session() as session:
        assert queries.get_or_create_backbone(session, kept.name).id == kept.id


# ----------------------------------------------------------------------------- jobs
def test_create_job(database):
    with database.session() as session:
        job = make_job(session)
    assert len(job.id) == 32 and int(job.id, 16) >= 0
    assert job.study_name == f"illava-{job.id}"
    assert job.status == "queued" and job.cancel_requested is False
    assert (job.n_trials, job.n_workers, job.sampler, job.seed) == (8, 2, "tpe", 0)
    assert job.search_space == {"reduction": [0.5, 0.95]} and job.constraints == {"min_retention": 0.9}
    assert job.created_at.tzinfo == UTC
    assert job.started_at is job.finished_at is job.heartbeat_at is job.error is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"n_trials": 0}, "n_trials must be an integer >= 1"),
        ({"n_workers": 1.5}, "n_workers must be an integer >= 1"),
        ({"sampler": ""}, "sampler must be a non-empty string"),
        ({"seed": "7"}, "seed must be an integer or None"),
        ({"search_space": None}, "search_space must be a mapping"),
        ({"constraints": {"max": math.inf}}, "constraints is not storable as JSON"),
    ],
)
def test_create_job_refuses_bad_input(database, overrides, message):
    with pytest.raises(ValueError, match=message), database.session() as session:
        make_job(session, **overrides)


def test_get_job_by_id_and_unique_prefix(database, monkeypatch):
    ids = iter(["abc10000000000000000000000000000", "abc20000000000000000000000000000", "f" * 32])
    monkeypatch.setattr(queries.uuid, "uuid4", lambda: uuid.UUID(next(ids)))
    with database.session() as session:
        first, second, third = (make_job(session) for _ in range(3))
    with database.session() as session:
        assert queries.get_job(session, first.id) is not None
        assert queries.get_job(session, first.id).id == first.id
        assert queries.get_job(session, "abc1").id == first.id
        assert queries.get_job(session, "ABC2").id == second.id
        assert queries.get_job(session, "f").id == third.id
        with pytest.raises(
            AmbiguousId, match=r"prefix 'abc' is ambiguous: it matches abc1.*, abc2.*; give more"
        ) as err:
            queries.get_job(session, "abc")
        assert err.value.matches == [first.id, second.id]
        assert isinstance(err.value, NotFound)
        with pytest.raises(NotFound, match="no tuning job 'abd'"):
            queries.get_job(session, "abd")
        with pytest.raises(NotFound, match="hexadecimal"):
            queries.get_job(session, "abc%")
        with pytest.raises(ValueError, match="non-empty"):
            queries.get_job(session, "")


def test_list_jobs_newest_first(database):
    with database.session() as session:
        jobs = [make_job(session) for _ in range(3)]
        for offset, job in enumerate(jobs):
            job.created_at = datetime(2025, 1, 1 + offset, tzinfo=UTC)
        queries.set_job_status(session, jobs[0], "running")
    with database.session() as session:
        assert [job.id for job in queries.list_jobs(session)] == [job.id for job in reversed(jobs)]
        assert [job.id for job in queries.list_jobs(session, limit=2)] == [jobs[2].id, jobs[1].id]
        assert [job.id for job in queries.list_jobs(session, status="running")] == [jobs[0].id]
        with pytest.raises(ValueError, match="unknown job status 'done'; allowed: queued, running, completed"):
            queries.list_jobs(session, status="done")
        with pytest.raises(ValueError, match="limit"):
            queries.list_jobs(session, limit=0)


def test_job_lifecycle(database):
    with database.session() as session:
        job = make_job(session)
        queries.set_job_status(session, job, "running")
        started = job.started_at
        assert started is not None and job.heartbeat_at is not None and job.finished_at is None
        beat = queries.heartbeat(session, job)
        assert beat >= started and job.heartbeat_at == beat
        queries.set_job_status(session, job, "failed", error="driver died")
        assert job.finished_at >= started and job.error == "driver died"
        queries.set_job_status(session, job, "running")  # resumed
        assert job.started_at == started and job.finished_at is None and job.error is None
        queries.request_cancel(session, job)
        queries.set_job_status(session, job, "cancelled")
        with pytest.raises(ValueError, match="unknown job status 'paused'"):
            queries.set_job_status(session, job, "paused")
    with database.session() as session:
        stored = queries.get_job(session, job.id)
        assert (stored.status, stored.cancel_requested, stored.started_at) == ("cancelled", True, started)
        assert stored.finished_at is not None


def test_job_updates_apply_to_a_job_read_in_an_earlier_session(database):
    with database.session() as session:
        stale = make_job(session)
    with database.session() as session:  # meanwhile, someone asks to cancel
        queries.request_cancel(session, queries.get_job(session, stale.id))
    with database.session() as session:
        assert stale.cancel_requested is False  # the caller's copy is old...
        updated = queries.set_job_status(session, stale, "running")
        assert updated is not stale and updated.status == "running"
        assert queries.heartbeat(session, stale) == updated.heartbeat_at
    with database.session() as session:
        stored = queries.get_job(session, stale.id)
        # ...and was not written back over the newer row.
        assert (stored.status, stored.cancel_requested) == ("running", True)
        assert stored.heartbeat_at == updated.heartbeat_at
    with database.session() as session:
        session.delete(session.get(TuningJob, stale.id))
    with pytest.raises(NotFound, match=f"no tuning job '{stale.id}'"), database.session() as session:
        queries.heartbeat(session, stale)


# ----------------------------------------------------------------------------- trials
def test_record_trial_is_idempotent(database):
    with database.session() as session:
        job = make_job(session)
        running = queries.record_trial(session, job, 0, state="running", schedule=SCHEDULE)
        assert running.finished_at is None and running.latency_ms is None
        started = running.started_at
    # Later, in another transaction (a resumed driver): same row, updated.
    with database.session() as session:
        job = queries.get_job(session, job.id)
        done = complete(session, job, 0, latency_ms=12.5)
        again = complete(session, job, 0, latency_ms=12.0)
        assert done is again and done.id == running.id
    with database.session() as session:
        trials = queries.list_trials(session, job)
        assert len(trials) == 1
        (trial,) = trials
        assert (trial.state, trial.latency_ms, trial.memory_mib, trial.feasible) == ("complete", 12.0, 100.0, True)
        assert trial.metrics == {"prefill_s": {"median": 0.012}}
        assert trial.started_at == started and trial.finished_at >= started
        assert session.scalar(select(func.count()).select_from(Trial)) == 1


def test_record_trial_failed_and_list_by_state(database):
    with database.session() as session:
        job = make_job(session)
        other = make_job(session)
        complete(session, job, 2, latency_ms=5)
        queries.record_trial(session, job, 1, state="failed", schedule=SCHEDULE, error="CUDA out of memory")
        complete(session, job, 0, latency_ms=7)
        complete(session, other, 0, latency_ms=1)  # same number, another job: its own row
    with database.session() as session:
        assert [t.number for t in queries.list_trials(session, job)] == [0, 1, 2]
        assert [t.number for t in queries.list_trials(session, job, state="complete")] == [0, 2]
        (failed,) = queries.list_trials(session, job, state="failed")
        assert failed.error == "CUDA out of memory" and failed.finished_at is not None and failed.metrics is None
        assert len(queries.list_trials(session, other)) == 1
        with pytest.raises(ValueError, match="unknown trial state 'done'"):
            queries.list_trials(session, job, state="done")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"state": "done"}, "unknown trial state 'done'; allowed: running, complete, failed"),
        ({"number": -1}, "trial number must be an integer >= 0"),
        ({"latency_ms": math.nan}, "latency_ms must be a finite number or None"),
        ({"accuracy": "0.5"}, "accuracy must be a finite number or None"),
        ({"feasible": 1}, "feasible must be True, False or None"),
        ({"schedule": "illava"}, "trial schedule must be a mapping"),
        ({"metrics": {"kl": math.inf}}, "trial metrics is not storable as JSON"),
        ({"metrics": {"when": datetime.now(UTC)}}, "trial metrics is not storable as JSON"),
    ],
)
def test_record_trial_refuses_bad_input(database, kwargs, message):
    with database.session() as session:
        job = make_job(session)
        arguments = {"number": 0, "state": "complete", "schedule": SCHEDULE, **kwargs}
        with pytest.raises(ValueError, match=message):
            queries.record_trial(session, job, arguments.pop("number"), **arguments)


# ----------------------------------------------------------------------------- published schedules
def test_publish_front_replaces_the_previous_one(database):
    with database.session() as session:
        job = make_job(session)
        trials = [complete(session, job, n, latency_ms=10.0 - n) for n in range(3)]
        first = queries.publish_front(session, job, trials[:2])
        assert [p.latency_ms for p in first] == [9.0, 10.0]  # fastest first
        published = queries.publish_front(session, job, [trials[2]])
        assert len(published) == 1
    with database.session() as session:
        (row,) = session.scalars(select(PublishedSchedule)).all()
        assert row.id == published[0].id and row.trial_id == trials[2].id and row.job_id == job.id
        assert (row.backbone_id, row.hardware_id, row.workload_id) == (
            job.backbone_id,
            job.hardware_id,
            job.workload_id,
        )
        assert (row.latency_ms, row.memory_mib, row.accuracy, row.retention, row.fidelity) == (
            8.0,
            100.0,
            0.5,
            0.9,
            0.95,
        )
        assert row.schedule == trials[2].schedule and row.metrics == trials[2].metrics
        assert row.created_at.tzinfo == UTC
        assert queries.publish_front(session, job, []) == []
        assert session.scalars(select(PublishedSchedule)).all() == []


def test_publish_front_refuses_trials_that_cannot_be_published(database):
    with database.session() as session:
        job, other = make_job(session), make_job(session)
        good = complete(session, job, 0, latency_ms=1)
        failed = queries.record_trial(session, job, 1, state="failed", schedule=SCHEDULE, error="oom")
        unmeasured = queries.record_trial(session, job, 2, state="complete", schedule=SCHEDULE)
        foreign = complete(session, other, 0, latency_ms=1)
        queries.publish_front(session, job, [good])
        for trials, message in [
            ([failed], "trial 1 of job .* is failed; only complete trials publish"),
            ([unmeasured], "trial 2 .* has no latency_ms or memory_mib"),
            ([foreign], f"trial 0 belongs to job {other.id}, not {job.id}"),
            ([good, good], "the same trial is listed twice"),
        ]:
            with pytest.raises(ValueError, match=message):
                queries.publish_front(session, job, trials)
        # A refused front leaves the published one alone.
        assert [p.trial_id for p in session.scalars(select(PublishedSchedule))] == [good.id]


def test_find_schedules_filters(database):
    other_workload = ("multi-4x448", {"name": "multi-4x448", "images": 4})
    with database.session() as session:
        cpu_job = make_job(session)
        gpu_job = make_job(session, hardware=H100)
        multi_job = make_job(session, workload=other_workload)
        tiny_job = make_job(session, backbone="tiny")
        fronts = {}
        for job, latencies in [(cpu_job, [30, 10]), (gpu_job, [2]), (multi_job, [50]), (tiny_job, [1])]:
            trials = [complete(session, job, n, latency_ms=latency) for n, latency in enumerate(latencies)]
            fronts[job.id] = [p.id for p in queries.publish_front(session, job, trials)]

    def ids(**filters):
        with database.session() as session:
            return [p.id for p in queries.find_schedules(session, status="candidate", **filters)]

    cpu, gpu, multi, tiny = (fronts[job.id] for job in (cpu_job, gpu_job, multi_job, tiny_job))
    assert ids(backbone="small") == gpu + cpu + multi  # fastest first: 2, 10, 30, 50
    assert ids(backbone=cpu_job.backbone) == ids(backbone="small")
    assert ids(backbone="tiny") == tiny
    assert ids(backbone="small", hardware="cpu:Test CPU x2 float32/sdpa") == cpu + multi
    assert ids(backbone="small", hardware=gpu_job.hardware) == gpu
    assert ids(backbone="small", workload="single-448") == gpu + cpu
    assert ids(backbone="small", hardware=cpu_job.hardware, workload=multi_job.workload) == multi
    assert ids(backbone="tiny", hardware="cuda:NVIDIA H100 80GB HBM3 float32/sdpa") == []
    with database.session() as session:
        with pytest.raises(NotFound, match=r"no backbone 'big': known: 'small', 'tiny'"):
            queries.find_schedules(session, backbone="big")
        with pytest.raises(NotFound, match=r"no hardware 'tpu'"):
            queries.find_schedules(session, backbone="small", hardware="tpu")
        with pytest.raises(NotFound, match=r"no workload 'video-16': known: 'multi-4x448', 'single-448'"):
            queries.find_schedules(session, backbone="small", workload="video-16")


def test_get_published(database):
    with database.session() as session:
        job = make_job(session)
        (published,) = queries.publish_front(session, job, [complete(session, job, 0, latency_ms=3)])
    with database.session() as session:
        row = queries.get_published(session, published.id)
        assert row.schedule == published.schedule and row.backbone.name == "small"
        with pytest.raises(NotFound, match=f"no schedule {published.id + 1}"):
            queries.get_published(session, published.id + 1)


def test_a_schedule_is_a_candidate_until_published_and_retire_withdraws_it(database):
    with database.session() as session:
        job = make_job(session)
        fast, slow = queries.publish_front(session, job, [complete(session, job, n, latency_ms=5 + n) for n in (0, 1)])
        assert (fast.status, fast.on_front, fast.published_at) == ("candidate", True, None)
        assert queries.find_schedules(session, backbone="small") == []  # nothing published yet
        version = queries.version_of(session, queries.SCHEDULES)
        queries.publish_schedule(session, slow.id)
        assert queries.version_of(session, queries.SCHEDULES) == version + 1
        queries.publish_schedule(session, slow.id)  # again: nothing changes, no new version
        assert queries.version_of(session, queries.SCHEDULES) == version + 1
        assert [row.id for row in queries.find_schedules(session, backbone="small")] == [slow.id]
        with pytest.raises(Conflict, match=f"schedule {fast.id} is a candidate, not published"):
            queries.retire_schedule(session, fast.id)
        retired = queries.retire_schedule(session, slow.id)
        assert retired.status == "retired" and retired.retired_at is not None
        assert queries.find_schedules(session, backbone="small") == []
        assert [r.id for r in queries.find_schedules(session, backbone="small", status="retired")] == [slow.id]
        assert queries.publish_schedule(session, slow.id).retired_at is None  # a retired one comes back
        with pytest.raises(ValueError, match="unknown schedule status"):
            queries.find_schedules(session, backbone="small", status="live")


def test_a_new_front_keeps_what_a_user_published_and_drops_stale_candidates(database):
    with database.session() as session:
        job = make_job(session)
        trials = [complete(session, job, n, latency_ms=10.0 - n) for n in range(3)]
        first = {row.trial_id: row for row in queries.publish_front(session, job, trials[:2])}
        queries.publish_schedule(session, first[trials[0].id].id)
        second = queries.publish_front(session, job, [trials[2]])  # the resumed job's front moved on
        kept = queries.get_published(session, first[trials[0].id].id)
        assert (kept.status, kept.on_front) == ("published", False)
        assert [row.id for row in queries.job_front(session, job)] == [second[0].id]
        with pytest.raises(NotFound):
            queries.get_published(session, first[trials[1].id].id)  # a candidate off the front is gone
        again = queries.publish_front(session, job, [trials[0], trials[2]])  # back on the front: same row
        assert first[trials[0].id].id in {row.id for row in again} and kept.on_front


def test_publish_a_trial_off_the_front_and_refuse_one_that_did_not_complete(database):
    with database.session() as session:
        job = make_job(session)
        queries.publish_front(session, job, [complete(session, job, 0, latency_ms=3)])
        off_front = complete(session, job, 1, latency_ms=4)
        queries.record_trial(session, job, 2, state="failed", schedule=SCHEDULE, error="oom")
        row = queries.publish_trial(session, job, 1)
        assert (row.trial_id, row.status, row.on_front) == (off_front.id, "published", False)
        assert queries.publish_trial(session, job, 1).id == row.id
        with pytest.raises(Conflict, match="trial 2 of job .* is failed; only complete trials publish"):
            queries.publish_trial(session, job, 2)
        with pytest.raises(NotFound, match="no trial 7"):
            queries.publish_trial(session, job, 7)


def test_tokens_store_no_secret_and_revoke_by_key_or_name(database):
    digest = hashlib.sha256(b"secret").hexdigest()
    with database.session() as session:
        token = queries.create_token(session, key="k1", name="fleet", scope="read", secret_sha256=digest)
        queries.create_token(session, key="k2", name="ci", scope="write", secret_sha256=digest)
        queries.create_token(session, key="k3", name="ci", scope="read", secret_sha256=digest)
        assert queries.find_token(session, "k1").id == token.id and queries.find_token(session, "nope") is None
        with pytest.raises(ValueError, match="unknown token scope 'admin'"):
            queries.create_token(session, key="k4", name="x", scope="admin", secret_sha256=digest)
        with pytest.raises(ValueError, match="64 hex digits"):
            queries.create_token(session, key="k4", name="x", scope="read", secret_sha256="secret")
        assert queries.revoke_token(session, "fleet").revoked_at is not None
        with pytest.raises(NotFound, match="no live token 'fleet'"):
            queries.revoke_token(session, "fleet")
        with pytest.raises(Conflict, match="2 live tokens are named 'ci'"):
            queries.revoke_token(session, "ci")
        assert queries.revoke_token(session, "k3").key == "k3"
        assert [t.key for t in queries.list_tokens(session)] == ["k1", "k2", "k3"]


# ----------------------------------------------------------------------------- the driver's lease
def test_a_lease_is_taken_only_from_the_state_the_taker_saw(database):
    with database.session() as session:
        job_id = make_job(session, n_trials=2).id
    with database.session() as session:
        assert queries.acquire_lease(session, job_id, "a", ttl_s=30, replacing=(None, None))
        seen = (session.get(TuningJob, job_id).lease_owner, session.get(TuningJob, job_id).lease_expires_at)
        assert seen[0] == "a" and seen[1] > datetime.now(UTC)
    with database.session() as session:  # b judged the lease free before a took it: refused
        assert not queries.acquire_lease(session, job_id, "b", ttl_s=30, replacing=(None, None))
    with database.session() as session:  # a renewed after b looked: b's view is stale, refused again
        queries.renew_lease(session, job_id, "a", ttl_s=30)
    with database.session() as session:
        assert not queries.acquire_lease(session, job_id, "b", ttl_s=30, replacing=seen)
        assert session.get(TuningJob, job_id).lease_owner == "a"


def test_a_driver_that_lost_its_lease_writes_nothing(database):
    with database.session() as session:
        job_id = make_job(session, n_trials=2).id
        queries.acquire_lease(session, job_id, "a", ttl_s=30, replacing=(None, None))
    with database.session() as session:
        job = session.get(TuningJob, job_id)
        assert queries.acquire_lease(session, job_id, "b", ttl_s=30, replacing=(job.lease_owner, job.lease_expires_at))
    with pytest.raises(LeaseLost, match="driver b took it over"), database.session() as session:
        queries.claim_trial(session, job_id, "a", 0, SCHEDULE, ttl_s=30)
    with database.session() as session:
        assert queries.list_trials(session, session.get(TuningJob, job_id)) == []
        assert not queries.release_lease(session, job_id, "a")  # a cannot release b's lease
        assert queries.release_lease(session, job_id, "b")
    with pytest.raises(LeaseLost, match="its lease was released"), database.session() as session:
        queries.renew_lease(session, job_id, "b", ttl_s=30)


def test_the_budget_and_the_numbering_are_the_databases(database):
    with database.session() as session:
        job_id = make_job(session, n_trials=2).id
        queries.acquire_lease(session, job_id, "a", ttl_s=30, replacing=(None, None))
    with database.session() as session:
        queries.claim_trial(session, job_id, "a", 0, SCHEDULE, ttl_s=30)
    with pytest.raises(ValueError, match="already has a trial number 0"), database.session() as session:
        queries.claim_trial(session, job_id, "a", 0, SCHEDULE, ttl_s=30)
    with database.session() as session:
        assert queries.claim_trial(session, job_id, "a", 1, SCHEDULE, ttl_s=30).state == "running"
    with pytest.raises(BudgetExhausted, match="already has 2 trials, its budget is 2"), database.session() as session:
        queries.claim_trial(session, job_id, "a", 2, SCHEDULE, ttl_s=30)
