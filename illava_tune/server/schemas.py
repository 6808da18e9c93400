"""What the schedule service takes and returns: Pydantic models, never ORM rows.

Request models forbid unknown fields (a misspelt field is a 422 naming it, never ignored) and
carry the ranges the CLI enforces, so most bad input is refused before any work starts.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Dtype = Literal["float32", "bfloat16", "float16"]
Attention = Literal["eager", "sdpa", "flash_attention_2", "illava_packed"]
Sampler = Literal["tpe", "nsga2", "random"]
Objective = Literal["speedup", "latency"]
JobStateName = Literal["queued", "running", "completed", "failed", "cancelled"]
ScheduleStatus = Literal["candidate", "published", "retired"]
Format = Literal["json", "yaml"]


class SubmitRequest(BaseModel):
    """`illava-tune submit`'s options; paths (a local checkpoint, a workload or dataset file) are
    paths on the server."""

    model_config = ConfigDict(extra="forbid")

    backbone: str = Field("demo", min_length=1, max_length=500, description="built-in name or checkpoint path")
    workload: str | dict[str, Any] | None = Field(
        None, description="a preset name, a workload file on the server, or a workload spec; default per backbone"
    )
    dataset: str | None = Field(None, min_length=1, description="a labelled dataset (file on the server, or demo)")
    limit: int | None = Field(None, ge=1, le=100_000, description="dataset rows (or synthetic samples) per measurement")
    trials: int = Field(12, ge=1, le=10_000)
    workers: int = Field(1, ge=1, le=1024)
    reduction: str = Field("0.5:0.95", description="a ratio (0.778) or a range (0.5:0.95)", max_length=50)
    encoder_share: str = Field("0:0.8", description="a value (0) or a range", max_length=50)
    methods: str = Field("illava", description="reduction methods to search, comma-separated", max_length=200)
    min_retention: float | None = Field(None, gt=0, le=1)
    max_memory_mib: float | None = Field(None, gt=0, allow_inf_nan=False)
    max_latency_ms: float | None = Field(None, gt=0, allow_inf_nan=False)
    sampler: Sampler = "tpe"
    seed: int = Field(0, ge=0, le=2**31 - 1)
    dtype: Dtype = "float32"
    attn: Attention = "sdpa"
    objective: Objective = "speedup"


class ResumeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    force: bool = Field(False, description="take the job over from a driver whose lease has expired")


class JobSummaryOut(BaseModel):
    id: str
    state: JobStateName
    backbone: str
    workload: str
    n_trials: int
    objective: str
    created_at: datetime


class JobOut(BaseModel):
    id: str
    state: JobStateName
    backbone: str
    workload: str
    error: str | None
    done: int = Field(description="trials finished (complete or failed)")
    total: int = Field(description="the trial budget")
    failed: int
    front_size: int
    elapsed_s: float
    eta_s: float | None = Field(description="estimate of the time left (running jobs only)")
    driver: str | None = Field(description="the driver holding the job's lease (host:pid:token)")
    lease_expires_at: datetime | None
    driver_note: str | None = Field(description="what to do about the job's driver, when something is wrong")


class ScheduleOut(BaseModel):
    id: int
    job: str
    status: ScheduleStatus
    on_front: bool = Field(description="on its job's latest front")
    backbone: str
    workload: str
    schedule: dict[str, Any]
    latency_ms: float
    memory_mib: float
    accuracy: float | None
    retention: float | None
    fidelity: float | None
    quality: float | None
    speedup: float | None
    speedup_low: float | None
    speedup_high: float | None
    memory_source: str | None
    hardware: str
    dtype: str
    attention: str


class BestOut(BaseModel):
    met: bool = Field(description="whether the schedule meets the target; else it is the fastest there is")
    gap_ms: float = Field(description="how far above a latency target the schedule is (0 when met)")
    gap_speedup: float = Field(description="how far below a speedup target the schedule is (0 when met)")
    schedule: ScheduleOut
    manifest: str = Field(description="path of the schedule's manifest on this service")


class Problem(BaseModel):
    detail: str


class Health(BaseModel):
    status: str
    database: str | None = None
    revision: str | None = None
