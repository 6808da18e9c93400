"""Property-based tests of the schedule service against its own /openapi.json (schemathesis,
bounded examples, in process): no request makes it fail with a server error, and no write gets
through without a token.

The operations are drawn from schemathesis' strategies under plain hypothesis `@given`, one test
per operation, rather than through schemathesis' pytest plugin (which does not run on the pytest
this project pins)."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from db import Database
from illava_tune.server import create_app, tokens
from tests.illava_tune.test_server import Started, seed_front

EXAMPLES = settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                    database=None)  # fmt: skip
OPEN = {"/healthz", "/readyz", "/openapi.json"}


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    database = Database(f"sqlite:///{tmp_path_factory.mktemp('api') / 'api.db'}")
    database.upgrade()
    seed_front(database)
    write = tokens.create(database, scope="write")[0]
    started = Started()
    app = create_app(database, start_job=started)
    operations = {f"{op.method.upper()} {op.path}": op for op in (r.ok() for r in
                  schemathesis.openapi.from_asgi("/openapi.json", app).get_all_operations())}  # fmt: skip
    return operations, write, started


# The operations the app declares (test_every_operation_is_exercised holds this list to the schema).
OPERATIONS = [
    "GET /healthz", "GET /readyz", "POST /v1/jobs", "GET /v1/jobs", "GET /v1/jobs/{job_id}",
    "POST /v1/jobs/{job_id}/cancel", "POST /v1/jobs/{job_id}/resume", "GET /v1/jobs/{job_id}/front",
    "GET /v1/jobs/{job_id}/front.png", "POST /v1/jobs/{job_id}/trials/{number}/publish", "GET /v1/schedules/best",
    "GET /v1/schedules/best/manifest", "GET /v1/schedules/{schedule_id}", "GET /v1/schedules/{schedule_id}/manifest",
    "POST /v1/schedules/{schedule_id}/publish", "POST /v1/schedules/{schedule_id}/retire",
]  # fmt: skip


def test_every_operation_is_exercised(service):
    assert sorted(service[0]) == sorted(OPERATIONS)


@pytest.mark.parametrize("name", OPERATIONS)
def test_no_request_is_a_server_error_and_none_gets_through_without_a_token(service, name):
    operations, write, started = service
    operation = operations[name]

    @EXAMPLES
    @given(case=operation.as_strategy(), authorized=st.booleans())
    def check(case, authorized):
        before = len(started.calls)
        case.headers = {k: v for k, v in (case.headers or {}).items() if k.lower() != "authorization"}
        if authorized:
            case.headers["Authorization"] = f"Bearer {write}"
        response = case.call()
        assert response.status_code < 500, (name, case.formatted_path, response.text)
        if not authorized and operation.path not in OPEN:
            assert response.status_code == 401, (name, case.formatted_path, response.status_code)
            assert len(started.calls) == before  # no job was started

    check()
