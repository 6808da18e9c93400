"""The schedule service through its HTTP API (FastAPI's TestClient), on SQLite and PostgreSQL:
tokens, the candidate -> published -> retired lifecycle, `best` with ETags, the errors a client
gets (422 naming the field, 404, 409, 503) and the jobs routes. The end-to-end run through a real
uvicorn and a real tuning job is in test_server_e2e.py."""

from __future__ import annotations

import hashlib
import json

import pytest
from fastapi.testclient import TestClient

import illava
from db import Database, queries
from illava.backbones import backbone_config
from illava_tune.server import create_app, tokens
from tests.db.conftest import fresh_database

CPU = {"key": "cpu:Test CPU x2 float32/sdpa", "kind": "cpu", "name": "Test CPU", "threads": 2,
       "dtype": "float32", "attention": "sdpa"}  # fmt: skip
# (reduction, latency ms, speedup, quality) of the seeded front: slower is more accurate.
FRONT = [(0.0, 20.0, 1.0, 1.0), (0.5, 15.0, 1.3, 0.95), (0.778, 10.0, 2.0, 0.8)]


class Started:
    """Records the drivers the service would start (these tests run no Ray; the e2e test does)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, bool]] = []

    def __call__(self, database: Database, job_id: str, *, force: bool = False) -> None:
        self.calls.append((job_id, force))


def seed_front(database: Database, *, backbone: str = "tiny", workload: str = "w") -> tuple[str, list[int]]:
    """A completed job on `backbone` with FRONT as its candidates; (job id, schedule ids fastest first)."""
    encoder_depth, llm_depth = illava.depths(backbone_config("tiny"))
    with database.session() as s:
        job = queries.create_job(
            s, backbone=queries.get_or_create_backbone(s, backbone), hardware=queries.get_or_create_hardware(s, CPU),
            workload=queries.get_or_create_workload(s, workload, {"name": workload}), n_trials=len(FRONT) + 1,
            n_workers=1, sampler="tpe", seed=0, search_space={}, constraints={},
        )  # fmt: skip
        trials = []
        for number, (reduction, latency, speedup, quality) in enumerate(FRONT):
            schedule = illava.Schedule.paper_default(reduction, encoder_depth=encoder_depth, llm_depth=llm_depth)
            metrics = {"speedup": {"median": speedup, "low": speedup - 0.05, "high": speedup + 0.05},
                       "peak_memory": {"objective_source": "test figure"}}  # fmt: skip
            trials.append(queries.record_trial(
                s, job, number, state="complete", schedule=schedule.to_dict(), latency_ms=latency, memory_mib=100.0,
                accuracy=quality, retention=quality, fidelity=quality, speedup=speedup, feasible=True, metrics=metrics,
            ))  # fmt: skip
        queries.record_trial(s, job, len(FRONT), state="failed", schedule=trials[0].schedule, error="oom")
        front = queries.publish_front(s, job, trials)
        queries.set_job_status(s, job, "completed")
        return job.id, [row.id for row in front]


@pytest.fixture(params=["sqlite", "postgresql"])
def service(request, tmp_path):
    with fresh_database(request.param, tmp_path) as database:
        database.upgrade()
        started = Started()
        client = TestClient(create_app(database, start_job=started))
        client.database, client.started = database, started
        client.write = {"Authorization": f"Bearer {tokens.create(database, scope='write', name='ops')[0]}"}
        client.read = {"Authorization": f"Bearer {tokens.create(database, scope='read', name='fleet')[0]}"}
        yield client


def best(client, **query):
    return client.get("/v1/schedules/best", params={"backbone": "tiny", **query}, headers=client.read)


# ----------------------------------------------------------------------------------------- tokens
WRITES = [("post", "/v1/jobs"), ("post", "/v1/jobs/ab/cancel"), ("post", "/v1/jobs/ab/resume"),
          ("post", "/v1/schedules/1/publish"), ("post", "/v1/schedules/1/retire"),
          ("post", "/v1/jobs/ab/trials/0/publish")]  # fmt: skip
READS = ["/v1/jobs", "/v1/jobs/ab", "/v1/jobs/ab/front", "/v1/schedules/1", "/v1/schedules/1/manifest",
         "/v1/schedules/best?backbone=tiny&speedup=1.5"]  # fmt: skip


def test_writes_need_a_write_token_and_reads_a_read_token(service):
    seed_front(service.database)
    for method, path in WRITES:
        missing = getattr(service, method)(path, json={})
        assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer", path
        refused = getattr(service, method)(path, json={}, headers=service.read)
        assert refused.status_code == 403 and "has scope read; this needs a write token" in refused.json()["detail"]
    for path in READS:
        assert service.get(path).status_code == 401, path
        assert service.get(path, headers=service.read).status_code in (200, 404), path
        assert service.get(path, headers=service.write).status_code in (200, 404), path  # write may read
    for bad in ("Bearer nonsense", "Bearer ilt_000000000000_x", "Basic dXNlcjpwYXNz",
                service.read["Authorization"][:-2] + "xx"):  # fmt: skip
        answer = service.get("/v1/jobs", headers={"Authorization": bad})
        assert answer.status_code == 401 and bad.split()[-1] not in answer.text
    assert service.get("/healthz").status_code == 200 and service.get("/openapi.json").status_code == 200


def test_a_revoked_token_is_refused_and_the_database_keeps_only_hashes(service):
    token = service.read["Authorization"].split()[1]
    assert service.get("/v1/jobs", headers=service.read).status_code == 200
    (fleet,) = [info for info in tokens.list_all(service.database) if info.name == "fleet"]
    assert fleet.last_used_at is not None
    with service.database.session() as s:
        stored = json.dumps([row.to_dict() for row in queries.list_tokens(s)], default=str)
    assert token not in stored and token.split("_", 2)[2] not in stored
    assert hashlib.sha256(token.split("_", 2)[2].encode()).hexdigest() in stored
    tokens.revoke(service.database, "fleet")
    assert service.get("/v1/jobs", headers=service.read).status_code == 401


def test_public_reads_need_no_token_but_writes_still_do(service):
    public = TestClient(create_app(service.database, public_reads=True, start_job=Started()))
    seed_front(service.database)
    assert public.get("/v1/jobs").status_code == 200
    assert public.post("/v1/schedules/1/publish").status_code == 401
    assert public.get("/v1/jobs", headers={"Authorization": "Bearer wrong"}).status_code == 401


# ------------------------------------------------------------------------------ lifecycle and best
def test_best_answers_from_published_schedules_with_an_etag_until_the_answer_changes(service):
    job_id, (fast, middle, unmerged) = seed_front(service.database)
    nothing = best(service, speedup=1.2)
    assert nothing.status_code == 404 and "3 candidate schedules of 'tiny' wait on fronts" in nothing.json()["detail"]
    candidate = best(service, speedup=1.2, candidates=True).json()
    assert candidate["schedule"]["id"] == middle and candidate["schedule"]["status"] == "candidate"

    published = service.post(f"/v1/schedules/{fast}/publish", headers=service.write)
    assert published.status_code == 200 and published.json()["status"] == "published"
    first = best(service, speedup=1.2)
    assert first.status_code == 200 and first.json()["met"] is True and first.json()["schedule"]["id"] == fast
    etag = first.headers["etag"]
    assert etag == f'"{hashlib.sha256(first.content).hexdigest()}"' and first.headers["cache-control"] == "no-cache"
    again = service.get("/v1/schedules/best", params={"backbone": "tiny", "speedup": 1.2},
                        headers={**service.read, "If-None-Match": etag})  # fmt: skip
    assert again.status_code == 304 and again.content == b"" and again.headers["etag"] == etag
    assert service.get("/v1/schedules/best", params={"backbone": "tiny", "speedup": 1.2},
                       headers={**service.read, "If-None-Match": f'W/"x", {etag}'}).status_code == 304  # fmt: skip

    # A more accurate schedule that still meets 1.2x is published: the answer changes.
    service.post(f"/v1/schedules/{middle}/publish", headers=service.write)
    changed = service.get("/v1/schedules/best", params={"backbone": "tiny", "speedup": 1.2},
                          headers={**service.read, "If-None-Match": etag})  # fmt: skip
    assert changed.status_code == 200 and changed.json()["schedule"]["id"] == middle
    assert changed.headers["etag"] != etag
    # Retired, it is no longer given: the answer is the fast one again, with the first ETag.
    retired = service.post(f"/v1/schedules/{middle}/retire", headers=service.write)
    assert retired.json()["status"] == "retired"
    assert best(service, speedup=1.2).headers["etag"] == etag

    unmet = best(service, speedup=5.0).json()  # nothing is 5x faster: the fastest, with the gap
    assert (unmet["met"], unmet["schedule"]["id"], unmet["gap_speedup"]) == (False, fast, pytest.approx(3.0))
    assert best(service, latency_ms=5.0).json()["gap_ms"] == pytest.approx(5.0)
    assert best(service, speedup=1.2, min_retention=0.9).status_code == 404  # the floor leaves nothing published
    assert unmerged != fast


def test_best_answers_are_kept_until_the_schedules_change_through_any_process(service, monkeypatch):
    import jobs

    _, (fast, middle, _) = seed_front(service.database)
    service.post(f"/v1/schedules/{fast}/publish", headers=service.write)
    computed, real = [], jobs.best
    monkeypatch.setattr(jobs, "best", lambda *args, **kwargs: computed.append(1) or real(*args, **kwargs))
    assert [best(service, speedup=1.2).json()["schedule"]["id"] for _ in range(3)] == [fast] * 3
    assert len(computed) == 1  # asked three times, worked out once
    other = TestClient(create_app(Database(service.database.url), start_job=Started()))  # another server process
    assert other.post(f"/v1/schedules/{middle}/publish", headers=service.write).status_code == 200
    assert best(service, speedup=1.2).json()["schedule"]["id"] == middle and len(computed) == 2
    assert best(service, speedup=2.0).json()["schedule"]["id"] == fast and len(computed) == 3  # another query


def test_manifests_carry_etags_and_say_whether_the_target_is_met(service):
    job_id, (fast, _, _) = seed_front(service.database)
    service.post(f"/v1/schedules/{fast}/publish", headers=service.write)
    answer = service.get("/v1/schedules/best/manifest", params={"backbone": "tiny", "speedup": 1.5},
                         headers=service.read)  # fmt: skip
    manifest = answer.json()
    assert answer.headers["x-illava-target-met"] == "true" and manifest["provenance"]["schedule"] == fast
    assert answer.headers["etag"] == f'"{hashlib.sha256(answer.content).hexdigest()}"'
    assert illava.Schedule.coerce(manifest) == illava.Schedule.from_dict(manifest["schedule"])
    by_id = service.get(f"/v1/schedules/{fast}/manifest", headers=service.read)
    assert by_id.content == answer.content  # the same document, so the same tag
    unmet = service.get("/v1/schedules/best/manifest", params={"backbone": "tiny", "speedup": 9},
                        headers=service.read)  # fmt: skip
    assert unmet.status_code == 200 and unmet.headers["x-illava-target-met"] == "false"
    yaml = service.get(f"/v1/schedules/{fast}/manifest", params={"format": "yaml"}, headers=service.read)
    assert yaml.headers["content-type"].startswith("application/yaml") and "schedule:" in yaml.text


def test_conflicts_are_409_and_unknown_ids_404(service):
    job_id, (fast, _, _) = seed_front(service.database)
    retire = service.post(f"/v1/schedules/{fast}/retire", headers=service.write)
    assert retire.status_code == 409 and "is a candidate, not published" in retire.json()["detail"]
    failed = service.post(f"/v1/jobs/{job_id}/trials/{len(FRONT)}/publish", headers=service.write)
    assert failed.status_code == 409 and "is failed; only complete trials publish" in failed.json()["detail"]
    trial = service.post(f"/v1/jobs/{job_id}/trials/1/publish", headers=service.write)
    assert trial.status_code == 200 and trial.json()["status"] == "published"
    for path in ("/v1/schedules/999", "/v1/schedules/999/manifest", "/v1/jobs/feedbeef", "/v1/jobs/feedbeef/front"):
        missing = service.get(path, headers=service.read)
        assert missing.status_code == 404 and ("999" in missing.text or "feedbeef" in missing.text)
    assert service.post("/v1/schedules/999/publish", headers=service.write).status_code == 404
    assert service.post(f"/v1/jobs/{job_id}/cancel", headers=service.write).status_code == 409
    resume = service.post(f"/v1/jobs/{job_id}/resume", headers=service.write)
    assert resume.status_code == 409 and "completed: there is nothing to resume" in resume.json()["detail"]


@pytest.mark.parametrize(
    ("query", "field", "message"),
    [
        ({"backbone": "nope", "speedup": 1.2}, "backbone", "no backbone 'nope': known: 'tiny'"),
        ({"speedup": 1.2, "hardware": "tpu"}, "hardware", "no hardware 'tpu'"),
        ({"speedup": 1.2, "workload": "video"}, "workload", "no workload 'video': known: 'w'"),
        ({}, "latency_ms", "give exactly one target"),
        ({"speedup": 1.2, "latency_ms": 3}, "latency_ms", "give exactly one target"),
        ({"speedup": -1}, "speedup", "greater than 0"),
        ({"speedup": "fast"}, "speedup", "valid number"),
        ({"speedup": 1.2, "dtype": "int8"}, "dtype", "'float32', 'bfloat16' or 'float16'"),
        ({"speedup": 1.2, "min_retention": 2}, "min_retention", "less than or equal to 1"),
        ({"speedup": 1.2, "colour": "red"}, "colour", "Extra inputs are not permitted"),
    ],
)
def test_a_bad_best_query_is_a_422_naming_the_field(service, query, field, message):
    seed_front(service.database)
    answer = service.get("/v1/schedules/best", params={"backbone": "tiny", **query}, headers=service.read)
    assert answer.status_code == 422
    (problem,) = answer.json()["detail"]
    assert problem["loc"][-1] == field and message in problem["msg"]


def test_best_never_compares_latencies_across_hardware_groups(service):
    seed_front(service.database)
    gpu = {**CPU, "key": "cuda:H100 float32/sdpa", "kind": "cuda", "name": "H100"}
    with service.database.session() as s:  # the same backbone tuned on a second hardware group
        job = queries.create_job(
            s, backbone=queries.get_or_create_backbone(s, "tiny"), hardware=queries.get_or_create_hardware(s, gpu),
            workload=queries.get_or_create_workload(s, "w", {"name": "w"}), n_trials=1, n_workers=1, sampler="tpe",
            seed=0, search_space={}, constraints={},
        )  # fmt: skip
        trial = queries.record_trial(s, job, 0, state="complete", schedule={"method": "illava", "reduction": 0.0},
                                     latency_ms=1.0, memory_mib=1.0, fidelity=1.0, speedup=1.0)  # fmt: skip
        queries.publish_front(s, job, [trial])
    answer = best(service, speedup=1.0, candidates=True)
    assert answer.status_code == 422 and answer.json()["detail"][0]["loc"][-1] == "hardware"
    assert "2 hardware groups" in answer.json()["detail"][0]["msg"]
    assert best(service, speedup=1.0, candidates=True, hardware=CPU["key"]).status_code == 200


# ------------------------------------------------------------------------------------------- jobs
def test_submit_validates_like_the_cli_and_starts_the_driver(service, tmp_path):
    for body, field, message in [
        ({"backbone": "nope"}, "backbone", "unknown backbone 'nope'"),
        ({"backbone": "tiny", "trials": 0}, "trials", "greater than or equal to 1"),
        ({"backbone": "tiny", "reduction": "0.9:0.5"}, "reduction", "low side 0.9 above its high side"),
        ({"backbone": "tiny", "reduction": "2.5"}, "reduction", "reduction 2.5 must lie in [0.0, 1.0)"),
        ({"backbone": "tiny", "encoder_share": "0:1.5"}, "encoder_share", "encoder_share"),
        ({"backbone": "tiny", "workload": "nope"}, "workload", "unknown workload 'nope'"),
        ({"backbone": "tiny", "workload": {"name": "x", "colour": 1}}, "workload", "unknown workload keys ['colour']"),
        ({"backbone": "tiny", "dataset": str(tmp_path / "missing.tsv")}, "dataset", "no such dataset file"),
        ({"backbone": "tiny", "sampler": "grid"}, "sampler", "'tpe', 'nsga2' or 'random'"),
        ({"backbone": "tiny", "methods": "illava,no-such-method"}, "methods", "unknown methods ['no-such-method']"),
        ({"backbone": "tiny", "trails": 3}, "trails", "Extra inputs are not permitted"),
    ]:
        answer = service.post("/v1/jobs", json=body, headers=service.write)
        assert answer.status_code == 422, body
        problem = answer.json()["detail"][0]
        assert problem["loc"] == ["body", field] and message in problem["msg"], (body, problem)
    assert service.started.calls == [] and service.get("/v1/jobs", headers=service.read).json() == []

    body = {"backbone": "tiny", "workload": {"name": "api", "image_size": [224, 224], "samples": 1}, "trials": 2}
    answer = service.post("/v1/jobs", json=body, headers=service.write)
    assert answer.status_code == 202, answer.text
    job = answer.json()
    assert answer.headers["location"] == f"/v1/jobs/{job['id']}" and (job["state"], job["total"]) == ("queued", 2)
    assert service.started.calls == [(job["id"], False)]
    (listed,) = service.get("/v1/jobs", headers=service.read).json()
    assert (listed["id"], listed["workload"], listed["objective"]) == (job["id"], "api", "speedup")
    assert service.get(f"/v1/jobs/{job['id'][:8]}", headers=service.read).json()["id"] == job["id"]  # a prefix

    resumed = service.post(f"/v1/jobs/{job['id']}/resume", json={"force": True}, headers=service.write)
    assert resumed.status_code == 202 and service.started.calls[-1] == (job["id"], True)
    cancelled = service.post(f"/v1/jobs/{job['id']}/cancel", headers=service.write)
    assert cancelled.json()["state"] == "cancelled"
    assert service.get("/v1/jobs", params={"state": "running"}, headers=service.read).json() == []


def test_resume_refuses_a_job_a_live_driver_owns(service):
    job_id, _ = seed_front(service.database)
    with service.database.session() as s:
        queries.set_job_status(s, queries.get_job(s, job_id), "running")
        queries.acquire_lease(s, job_id, "otherhost:1:abcd", ttl_s=60, replacing=(None, None))
    answer = service.post(f"/v1/jobs/{job_id}/resume", headers=service.write)
    assert answer.status_code == 409 and "otherhost:1:abcd" in answer.json()["detail"]
    assert service.started.calls == []


def test_a_jobs_front_as_json_and_png(service):
    job_id, ids = seed_front(service.database)
    front = service.get(f"/v1/jobs/{job_id}/front", headers=service.read).json()
    assert [row["id"] for row in front] == ids and front[0]["speedup_low"] == pytest.approx(1.95)
    png = service.get(f"/v1/jobs/{job_id}/front.png", headers=service.read)
    assert png.headers["content-type"] == "image/png" and png.content.startswith(b"\x89PNG")
    status = service.get(f"/v1/jobs/{job_id}", headers=service.read).json()
    assert (status["state"], status["done"], status["failed"], status["front_size"]) == ("completed", 4, 1, 3)


# ------------------------------------------------------------------------------------ health, 503
def test_a_database_that_is_down_is_a_503_and_the_server_keeps_serving(tmp_path):
    down = Database("postgresql://postgres@127.0.0.1:9/nothing", connect_timeout=2)
    client = TestClient(create_app(down, public_reads=True, start_job=Started()))
    assert client.get("/healthz").json() == {"status": "ok", "database": None, "revision": None}
    for path in ("/readyz", "/v1/jobs", "/v1/schedules/best?backbone=tiny&speedup=1.2"):
        answer = client.get(path)
        assert answer.status_code == 503 and "127.0.0.1:9" in answer.json()["detail"], path
        assert "Traceback" not in answer.text
    assert client.post("/v1/schedules/1/publish", headers={"Authorization": "Bearer ilt_a_b"}).status_code == 503
    assert client.get("/healthz").status_code == 200


def test_readyz_says_when_the_schema_is_not_current(tmp_path):
    database = Database(f"sqlite:///{tmp_path / 'old.db'}")
    client = TestClient(create_app(database, start_job=Started()))
    answer = client.get("/readyz")
    assert answer.status_code == 503 and "illava-tune db upgrade" in answer.json()["detail"]
    database.upgrade()
    assert client.get("/readyz").json()["status"] == "ready"


# ------------------------------------------------------------------------------------------- CLI
def test_the_token_publish_and_retire_commands(tmp_path, capsys):
    from illava_tune.cli import main

    url = f"sqlite:///{tmp_path / 'cli.db'}"
    assert main(["token", "create", "--scope", "write", "--name", "ci", "--database", url]) == 0
    out, err = capsys.readouterr()
    token = out.strip()
    assert token.startswith("ilt_") and "shown once" in err and token not in err
    database = Database(url)
    assert tokens.verify(database, token).scope == "write"
    assert main(["token", "list", "--database", url]) == 0
    listed = capsys.readouterr().out
    assert "write  ci" in listed and "live" in listed and token.split("_", 2)[2] not in listed
    assert main(["token", "revoke", "ci", "--database", url]) == 0 and tokens.verify(database, token) is None
    assert main(["token", "revoke", "ci", "--database", url]) == 2
    assert "no live token 'ci'" in capsys.readouterr().err

    job_id, (fast, _, _) = seed_front(database)
    assert main(["retire", str(fast), "--database", url]) == 2
    assert f"schedule {fast} is a candidate, not published" in capsys.readouterr().err
    assert main(["publish", "--job", job_id[:8], "--trial", "3", "--database", url]) == 2
    err = capsys.readouterr().err
    assert "trial 3 of job" in err and "is failed; only complete trials publish" in err
    assert main(["publish", str(fast), "--database", url]) == 0
    assert f"published schedule #{fast}" in capsys.readouterr().out
    assert main(["retire", str(fast), "--database", url]) == 0
    assert f"retired schedule #{fast}" in capsys.readouterr().out
    assert main(["publish", "--database", url]) == 2  # neither an id nor a trial
    assert "publish a schedule by id" in capsys.readouterr().err


def test_pull_without_a_service_or_a_target_is_one_clear_line(tmp_path, capsys):
    from illava_tune.cli import main

    # `pull` is a client: an unreachable server without a cached copy is one clear line, exit 2.
    target = tmp_path / "schedule.json"
    argv = ["pull", "--server", "http://127.0.0.1:9", "--backbone", "tiny", "--speedup", "1.2", "-o", str(target)]
    assert main(argv) == 2
    assert "cannot reach" in capsys.readouterr().err and not target.exists()
    assert main(["pull", "--server", "http://127.0.0.1:9", "-o", str(target)]) == 2  # no target
    assert "pull takes --schedule ID, or --backbone with one target" in capsys.readouterr().err
