"""The schedule service end to end, as a platform team runs it: `illava-tune serve` (a real uvicorn
on a loopback port) on PostgreSQL, a job submitted over HTTP and tuned by a real detached driver on
a local Ray, its trials published, and a deployment pulling with ETags (200, then 304, then 200
once another schedule is published) and applying what it pulled."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest
import torch

import illava
from illava.backbones import load_backbone
from illava.inputs import Sample, build_inputs, synthetic_image
from illava_tune.cli import main
from illava_tune.server import tokens
from tests.db.conftest import fresh_database

WORKLOAD = {"name": "e2e", "image_size": [224, 224], "samples": 1, "output_tokens": 2}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(condition, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"{what} did not happen within {timeout_s} s")


def answered(client: httpx.Client, path: str) -> bool:
    try:
        return client.get(path).status_code == 200
    except httpx.TransportError:
        return False


@pytest.mark.parametrize("backend", ["postgresql", pytest.param("sqlite", marks=pytest.mark.slow)])
def test_submit_tune_publish_and_pull_through_a_real_server(backend, tmp_path, capsys):
    with fresh_database(backend, tmp_path) as database:
        database.upgrade()
        write, read = (tokens.create(database, scope=scope)[0] for scope in ("write", "read"))
        port, log = free_port(), tmp_path / "serve.log"
        server = subprocess.Popen(
            [sys.executable, "-m", "illava_tune.cli", "serve", "--port", str(port)],
            env={**os.environ, "DATABASE_URL": database.url}, cwd=tmp_path,
            stdout=log.open("wb"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        client = httpx.Client(base_url=url, timeout=30)
        try:
            wait_until(lambda: answered(client, "/readyz"), 60, "the server answering /readyz")
            _tune_publish_and_pull(client, url, write, read, tmp_path, capsys)
        finally:
            server.terminate()
            server.wait(timeout=30)
            client.close()
        served = log.read_text()
        assert write not in served and read not in served  # no token in the server's log
        assert "Traceback" not in served
        manifest_answers = [line for line in served.splitlines() if "GET /v1/schedules/best/manifest" in line]
        assert [line.split('" ')[-1].split()[0] for line in manifest_answers[:4]] == ["200", "304", "200", "200"]


def _tune_publish_and_pull(client, url, write, read, tmp_path, capsys) -> None:
    writes, reads = {"Authorization": f"Bearer {write}"}, {"Authorization": f"Bearer {read}"}
    body = {"backbone": "tiny", "workload": WORKLOAD, "trials": 2, "reduction": "0.778"}
    assert client.post("/v1/jobs", json=body).status_code == 401  # no token, no job
    submitted = client.post("/v1/jobs", json=body, headers=writes)
    assert submitted.status_code == 202, submitted.text
    job_id = submitted.json()["id"]

    def finished():
        job = client.get(f"/v1/jobs/{job_id}", headers=reads).json()
        return job if job["state"] not in ("queued", "running") else None

    job = wait_until(finished, 300, f"job {job_id} finishing")
    assert (job["state"], job["done"], job["failed"]) == ("completed", 2, 0), job
    front = client.get(f"/v1/jobs/{job_id}/front", headers=reads).json()
    assert front and all(row["status"] == "candidate" for row in front)

    # Nothing is published yet: a deployment asking is told so.
    query = {"backbone": "tiny", "latency_ms": 1e6}
    assert client.get("/v1/schedules/best", params=query, headers=reads).status_code == 404
    first = client.post(f"/v1/jobs/{job_id}/trials/0/publish", headers=writes).json()  # the unmerged seed
    assert first["status"] == "published" and first["schedule"]["reduction"] == 0.0

    target = tmp_path / "schedule.json"
    pull = ["pull", "--server", url, "--backbone", "tiny", "--latency-ms", "1e6", "-o", str(target), "--token", read]
    assert main(pull) == 0
    assert f"updated to schedule #{first['id']}" in capsys.readouterr().out
    pulled = target.read_bytes()
    assert main(pull) == 0
    assert f"unchanged, schedule #{first['id']}" in capsys.readouterr().out  # the server answered 304
    assert target.read_bytes() == pulled

    # Another schedule is published and the first retired: the next pull gets the new answer.
    second = client.post(f"/v1/jobs/{job_id}/trials/1/publish", headers=writes).json()
    assert client.post(f"/v1/schedules/{first['id']}/retire", headers=writes).json()["status"] == "retired"
    assert main(pull) == 0
    assert f"updated to schedule #{second['id']}" in capsys.readouterr().out
    manifest = json.loads(target.read_text())
    assert manifest["provenance"] == {**manifest["provenance"], "schedule": second["id"], "job": job_id}

    # An inference server at start-up: the manifest from the service, applied to its model.
    manifest_url = f"{url}/v1/schedules/best/manifest?backbone=tiny&latency_ms=1000000"
    loaded = illava.load_manifest(manifest_url, token=read, cache=tmp_path / "cache.json")
    assert loaded == manifest
    backbone = load_backbone("tiny")
    illava.apply(backbone.model, loaded)
    with torch.no_grad():
        backbone.model(**build_inputs(backbone, [Sample("<image> hi", [synthetic_image(224, 1)])]))
    plan = illava.Schedule.coerce(loaded).plan(64)
    assert int(illava.last_stats(backbone.model).llm_image_tokens[-1]) == plan.llm_tokens_at(5) < 64
