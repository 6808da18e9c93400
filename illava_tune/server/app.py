"""The schedule service: an HTTP API over the functions the CLI calls (`jobs`, `db`), for the fleet
of inference servers that pull their schedules from it.

Layering as in Prefect's server: each route is a few lines that call one function of `jobs` (which
owns the transaction) and return Pydantic models (`schemas`), never ORM rows. Errors are mapped in
one place (`_problems`): bad input 422 naming the field, unknown ids 404, a conflicting action 409,
the database down 503; a bug is a 500 with a short body and the traceback in the server's log only.

Pulling: `best` and the manifests carry an `ETag` that is the quoted sha256 of the exact body, and
answer `304 Not Modified` to an `If-None-Match` that matches, so a client polling them costs one
query and no transfer until the answer changes (a schedule published or retired). The client can
compute the tag of a body it kept on disk (`illava.fetch_manifest` does: no sidecar file).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Path, Query, Request, Response
from fastapi.exceptions import HTTPException
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field

import jobs
from db import Conflict, Database, DatabaseError, LeaseHeld, NotFound, head_revision, queries
from optimizer import NoMatchError

from . import tokens
from .schemas import (
    Attention,
    BestOut,
    Dtype,
    Format,
    Health,
    JobOut,
    JobStateName,
    JobSummaryOut,
    Problem,
    ResumeRequest,
    ScheduleOut,
    SubmitRequest,
)

log = logging.getLogger("illava_tune.server")
#: Starts a job's driver: `(database, job_id, force=False)`; the default is a detached process.
StartJob = Callable[..., object]
_MEDIA = {"json": "application/json", "yaml": "application/yaml"}
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": Problem, "description": what}
    for code, what in (
        (401, "no token, or an unknown or revoked one"),
        (403, "the token's scope does not allow it"),
        (404, "no such id, or nothing matches"),
        (503, "the database is unreachable"),
    )  # fmt: skip
}


class BestQuery(BaseModel):
    """Which schedule a deployment wants: exactly one target, plus optional caps and filters."""

    model_config = ConfigDict(extra="forbid")

    backbone: str = Field(min_length=1)
    latency_ms: float | None = Field(None, gt=0, allow_inf_nan=False, description="at most this prefill latency")
    speedup: float | None = Field(None, gt=0, allow_inf_nan=False, description="at least this speedup over unmerged")
    hardware: str | None = Field(None, min_length=1, description="hardware group key")
    workload: str | None = Field(None, min_length=1, description="workload name")
    dtype: Dtype | None = None
    attention: Attention | None = None
    max_memory_mib: float | None = Field(None, gt=0, allow_inf_nan=False)
    min_retention: float | None = Field(None, gt=0, le=1)
    candidates: bool = Field(False, description="choose among candidates on fronts too, not only published ones")


def create_app(database: Database, *, public_reads: bool = False, start_job: StartJob | None = None) -> FastAPI:
    """The service on `database`. With `public_reads`, reading needs no token (writing always
    does). `start_job` starts a submitted or resumed job's driver (default: a detached process
    connecting to `RAY_ADDRESS`, `jobs.start_background`)."""
    start = start_job or jobs.start_background
    app = FastAPI(
        title="illava-tune schedule service",
        version=_version(),
        description="Tuning jobs, their Pareto fronts, and the published schedules deployments pull.",
    )
    _problems(app)
    bearer = HTTPBearer(auto_error=False, description="a token from `illava-tune token create`")

    def needs(scope: str) -> Any:
        def check(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:  # noqa: B008
            if credentials is None:
                if scope == "read" and public_reads:
                    return
                raise HTTPException(401, f"this needs a {scope} token: send `Authorization: Bearer TOKEN` "
                                    "(`illava-tune token create`)", headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
            info = tokens.verify(database, credentials.credentials)
            if info is None:
                raise HTTPException(401, "unknown or revoked token", headers={"WWW-Authenticate": "Bearer"})
            if not info.allows(scope):
                raise HTTPException(403, f"token {info.key} ({info.name!r}) has scope {info.scope}; this needs a "
                                    f"{scope} token")  # fmt: skip

        return Depends(check)

    read, write = [needs("read")], [needs("write")]

    @app.get("/healthz", response_model=Health, tags=["health"])
    def healthz() -> Health:
        """The process is up (it does not touch the database)."""
        return Health(status="ok")

    @app.get("/readyz", response_model=Health, tags=["health"], responses={503: _ERRORS[503]})
    def readyz() -> Health:
        """The database is reachable and its schema is the one this service needs."""
        database.check_schema()
        return Health(status="ready", database=database.masked_url, revision=head_revision())

    # ------------------------------------------------------------------------------------ jobs
    @app.post("/v1/jobs", status_code=202, response_model=JobOut, dependencies=write, tags=["jobs"],
              responses={**_ERRORS, 409: {"model": Problem}})  # fmt: skip
    def submit(body: SubmitRequest, response: Response) -> JobOut:
        """Validate everything `illava-tune submit` does, queue the job and start its driver."""
        from illava_tune.tune import submit_job

        job_id = submit_job(database, **body.model_dump())
        start(database, job_id, force=False)
        response.headers["Location"] = f"/v1/jobs/{job_id}"
        return _job(database, job_id)

    @app.get("/v1/jobs", response_model=list[JobSummaryOut], dependencies=read, tags=["jobs"], responses=_ERRORS)
    def list_jobs(limit: Annotated[int, Query(ge=1, le=1000)] = 50,
                  state: JobStateName | None = None) -> list[JobSummaryOut]:  # fmt: skip
        """The newest jobs first."""
        return [JobSummaryOut(**vars(job)) for job in jobs.list_jobs(database, limit=limit, state=state)]

    @app.get("/v1/jobs/{job_id}", response_model=JobOut, dependencies=read, tags=["jobs"], responses=_ERRORS)
    def get_job(job_id: str) -> JobOut:
        """Progress (trials done, failed, front size, elapsed, ETA) and the driver's state."""
        return _job(database, job_id)

    @app.post("/v1/jobs/{job_id}/cancel", response_model=JobOut, dependencies=write, tags=["jobs"],
              responses={**_ERRORS, 409: {"model": Problem, "description": "the job already finished"}})  # fmt: skip
    def cancel(job_id: str) -> JobOut:
        """Stop the job between trials (a queued job stops at once)."""
        return _job(database, jobs.cancel(database, job_id))

    @app.post("/v1/jobs/{job_id}/resume", status_code=202, response_model=JobOut, dependencies=write,
              tags=["jobs"], responses={**_ERRORS, 409: {"model": Problem,
                                                         "description": "finished, or a live driver owns it"}})  # fmt: skip
    def resume(job_id: str, body: ResumeRequest | None = None) -> JobOut:
        """Continue a job whose driver stopped."""
        force = body.force if body is not None else False
        return _job(database, jobs.resume_background(database, job_id, force=force, start=start))

    @app.get("/v1/jobs/{job_id}/front", response_model=list[ScheduleOut], dependencies=read, tags=["jobs"],
             responses=_ERRORS)  # fmt: skip
    def front(job_id: str) -> list[ScheduleOut]:
        """The schedules on the job's Pareto front, fastest first."""
        return [ScheduleOut(**row) for row in jobs.front(database, job_id)]

    @app.get("/v1/jobs/{job_id}/front.png", dependencies=read, tags=["jobs"], response_class=Response,
             responses={**_ERRORS, 200: {"content": {"image/png": {}}, "description": "the front as a PNG"}})  # fmt: skip
    def front_png(job_id: str) -> Response:
        """The front as a PNG: latency against quality."""
        from illava_tune.tune import front_png

        rows = jobs.front(database, job_id)
        if not rows:
            raise NotFound("front of job", job_id, "it has no schedules yet")
        return Response(front_png(rows), media_type="image/png")

    @app.post("/v1/jobs/{job_id}/trials/{number}/publish", response_model=ScheduleOut, dependencies=write,
              tags=["schedules"], responses={**_ERRORS, 409: {"model": Problem,
                                                              "description": "the trial did not complete"}})  # fmt: skip
    def publish_trial(job_id: str, number: Annotated[int, Path(ge=0)]) -> ScheduleOut:
        """Publish one trial of a job, on its front or not."""
        return ScheduleOut(**jobs.publish(database, job=job_id, trial=number))

    # ------------------------------------------------------------------------------------ schedules
    answers = Answers(database)

    @app.get("/v1/schedules/best", response_model=BestOut, dependencies=read, tags=["schedules"],
             responses={**_ERRORS, 304: {"description": "the answer has the ETag sent in If-None-Match"}})  # fmt: skip
    def best(request: Request, query: Annotated[BestQuery, Query()]) -> Response:
        """The best published schedule for a target; when none meets it, the fastest, with the gap."""

        def answer() -> Tagged:
            choice = _best(database, query)
            row = jobs.published(choice.point.ref)
            body = BestOut(met=choice.met, gap_ms=choice.gap_ms, gap_speedup=choice.gap_speedup,
                           schedule=ScheduleOut(**row), manifest=f"/v1/schedules/{row['id']}/manifest")  # fmt: skip
            return Tagged.of(body.model_dump_json().encode(), "application/json")

        return answers.get(("best", query.model_dump_json()), answer).respond(request)

    @app.get("/v1/schedules/best/manifest", dependencies=read, tags=["schedules"], response_class=Response,
             responses={**_ERRORS, 200: {"content": {"application/json": {}, "application/yaml": {}},
                                         "description": "the manifest; X-Illava-Target-Met says if it meets the "
                                         "target"}, 304: {"description": "unchanged"}})  # fmt: skip
    def best_manifest(request: Request, query: Annotated[BestQuery, Query()], format: Format = "json") -> Response:
        """The manifest of the best schedule for a target: what `illava-tune pull` and
        `illava.load_manifest` fetch. `illava.apply(model, manifest)` accepts it."""

        def answer() -> Tagged:
            choice = _best(database, query)
            body = jobs.dump(jobs.manifest(database, choice.point.ref.id), format).encode()
            return Tagged.of(body, _MEDIA[format], {"X-Illava-Target-Met": str(choice.met).lower()})

        return answers.get(("manifest", format, query.model_dump_json()), answer).respond(request)

    @app.get("/v1/schedules/{schedule_id}", response_model=ScheduleOut, dependencies=read, tags=["schedules"],
             responses=_ERRORS)  # fmt: skip
    def get_schedule(schedule_id: int) -> ScheduleOut:
        return ScheduleOut(**jobs.schedule(database, schedule_id))

    @app.get("/v1/schedules/{schedule_id}/manifest", dependencies=read, tags=["schedules"],
             response_class=Response, responses={**_ERRORS, 304: {"description": "unchanged"}})  # fmt: skip
    def manifest(request: Request, schedule_id: int, format: Format = "json") -> Response:
        """One schedule's manifest (`illava-tune export`)."""
        return Tagged.of(jobs.dump(jobs.manifest(database, schedule_id), format).encode(), _MEDIA[format]).respond(
            request
        )

    @app.post("/v1/schedules/{schedule_id}/publish", response_model=ScheduleOut, dependencies=write,
              tags=["schedules"], responses=_ERRORS)  # fmt: skip
    def publish(schedule_id: int) -> ScheduleOut:
        """Give this schedule to deployments: `best` chooses among the published ones."""
        return ScheduleOut(**jobs.publish(database, schedule_id))

    @app.post("/v1/schedules/{schedule_id}/retire", response_model=ScheduleOut, dependencies=write,
              tags=["schedules"], responses={**_ERRORS, 409: {"model": Problem,
                                                              "description": "the schedule is not published"}})  # fmt: skip
    def retire(schedule_id: int) -> ScheduleOut:
        """Withdraw a published schedule; `best` answers with the next best published one."""
        return ScheduleOut(**jobs.retire(database, schedule_id))

    return app


def _version() -> str:
    from importlib.metadata import version

    return version("illava-tune")


def _job(database: Database, job_id: str) -> JobOut:
    st = jobs.status(database, job_id)
    p = st.progress
    return JobOut(id=st.id, state=st.state, backbone=st.backbone, workload=st.workload, error=st.error, done=p.done,
                  total=p.total, failed=p.failed, front_size=p.front_size, elapsed_s=p.elapsed_s, eta_s=p.eta_s,
                  driver=st.driver, lease_expires_at=st.lease_expires_at, driver_note=st.driver_note)  # fmt: skip


def _best(database: Database, query: BestQuery):
    if (query.latency_ms is None) == (query.speedup is None):
        raise jobs.InvalidInput("latency_ms", "give exactly one target: latency_ms (at most, in ms) or speedup "
                                "(at least this many times faster than the unmerged model)")  # fmt: skip
    return jobs.best(database, **query.model_dump())


@dataclass(frozen=True)
class Tagged:
    """A body with its ETag (the quoted sha256 of the bytes) and the headers that go with it."""

    body: bytes
    media_type: str
    etag: str
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def of(cls, body: bytes, media_type: str, headers: dict[str, str] | None = None) -> Tagged:
        return cls(body, media_type, f'"{hashlib.sha256(body).hexdigest()}"', tuple((headers or {}).items()))

    def respond(self, request: Request) -> Response:
        """The body, or 304 when the client's If-None-Match already names it."""
        headers = {"ETag": self.etag, "Cache-Control": "no-cache", **dict(self.headers)}
        if _matches(request.headers.get("if-none-match"), self.etag):
            return Response(status_code=304, headers=headers)
        return Response(self.body, media_type=self.media_type, headers=headers)


class Answers:
    """The `best` answers this process computed, by query, valid while the database's schedules
    change counter (`db.queries.SCHEDULES`, bumped in the transaction of every publish, retire and
    stored front) reads what it read when they were computed. So a poll costs one small read, and
    a change made through any server process or the CLI is seen at the next request. Errors are
    never kept. At most `size` answers, the least recently used dropped first."""

    def __init__(self, database: Database, size: int = 4096) -> None:
        self.database, self.size = database, size
        self._lock = threading.Lock()
        self._version: int | None = None
        self._entries: OrderedDict[Any, Tagged] = OrderedDict()

    def get(self, key: Any, compute: Callable[[], Tagged]) -> Tagged:
        with self.database.session() as s:
            version = queries.version_of(s, queries.SCHEDULES)
        with self._lock:
            if version != self._version:
                self._entries.clear()
                self._version = version
            elif key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
        # Computed from data at least as new as `version`: kept under it, it is dropped at the next change.
        value = compute()
        with self._lock:
            if self._version == version:
                self._entries[key] = value
                while len(self._entries) > self.size:
                    self._entries.popitem(last=False)
        return value


def _matches(if_none_match: str | None, etag: str) -> bool:
    """RFC 9110's weak comparison for If-None-Match: any listed tag (W/ or not) equal to ours, or `*`."""
    if not if_none_match:
        return False
    tags = [tag.strip().removeprefix("W/") for tag in if_none_match.split(",")]
    return "*" in tags or etag in tags


def _problems(app: FastAPI) -> None:
    """Every error the functions behind the routes raise, as the status it means and a body that says why."""

    def problem(status: int, detail: Any) -> JSONResponse:
        return JSONResponse({"detail": detail}, status_code=status)

    @app.exception_handler(jobs.InvalidInput)
    def invalid(request: Request, err: jobs.InvalidInput) -> JSONResponse:
        where = "body" if request.method == "POST" else "query"
        return problem(422, [{"loc": [where, err.field], "msg": str(err), "type": "value_error"}])

    for kind, status in ((NotFound, 404), (jobs.NoSchedules, 404), (NoMatchError, 404), (Conflict, 409),
                         (LeaseHeld, 409), (DatabaseError, 503)):  # fmt: skip
        app.add_exception_handler(kind, lambda request, err, status=status: problem(status, str(err)))

    @app.exception_handler(ValueError)
    def bad_value(request: Request, err: ValueError) -> JSONResponse:
        return problem(422, [{"loc": ["body" if request.method == "POST" else "query"], "msg": str(err),
                              "type": "value_error"}])  # fmt: skip

    @app.exception_handler(Exception)
    def unexpected(request: Request, err: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)  # the path only: queries may name files
        return problem(500, f"internal error ({type(err).__name__}); the server's log has the details")
