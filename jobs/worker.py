"""The Ray actor that evaluates schedules: it loads the backbone once and measures each schedule
it is handed (apply, profile, remove), so no trial pays for loading a model."""

from __future__ import annotations

import os
from typing import Any

import illava

#: Trial numbers the worker deliberately fails, for fault-injection tests and drills:
#: ``ILLAVA_TUNE_FAULTS="raise:3,crash:5,unranked:6"`` raises in trial 3, kills the worker process
#: in trial 5 and returns trial 6's measurement without its speedup (what the job ranks by). Read by
#: the driver and handed to the actors, never set in normal use.
FAULTS_ENV = "ILLAVA_TUNE_FAULTS"


def parse_faults(text: str | None) -> dict[int, str]:
    faults: dict[int, str] = {}
    for part in (text or "").split(","):
        if part.strip():
            kind, _, number = part.strip().partition(":")
            if kind not in ("raise", "crash", "unranked") or not number.isdigit():
                raise ValueError(f"{FAULTS_ENV}: {part!r} is not raise:N, crash:N or unranked:N")
            faults[int(number)] = kind
    return faults


class TrialWorker:
    """Plain class; the driver wraps it with `ray.remote` (so importing this needs no Ray)."""

    def __init__(self, backbone: str, workload: dict[str, Any], *, device: str, repeats: int, warmup: int,
                 dtype: str = "float32", attention: str = "sdpa", faults: dict[int, str] | None = None):  # fmt: skip
        from profiler import Profiler, Workload

        self.workload = Workload.from_dict(workload)
        self.profiler = Profiler(backbone, device=device, dtype=dtype, attn_implementation=attention,
                                 repeats=repeats, warmup=warmup)  # fmt: skip
        self.faults = faults or {}

    def depths(self) -> tuple[int, int]:
        return illava.depths(self.profiler.model)

    def flop_inputs(self) -> tuple[list, int]:
        """(grids, text tokens) of the batch every trial's prefill is timed on, the workload's first,
        as the FLOPs model takes them (``illava.predicted_speedup(config, schedule, grids, text_tokens)``)."""
        from illava.inputs import build_inputs
        from profiler import read_dataset, synthetic_samples

        workload, backbone = self.workload, self.profiler.backbone
        if workload.dataset is None:
            samples = synthetic_samples(workload)
        else:  # only the first batch's items: their images decoded, no more
            items = read_dataset(workload.dataset, limit=min(workload.samples, workload.batch_size))
            samples = [item.to_sample(self.profiler.answer) for item in items]
        batch = build_inputs(backbone, samples[: workload.batch_size])
        grids, text_tokens = backbone.adapter.flop_inputs(self.profiler.model.config, batch)
        return list(grids), int(text_tokens)

    def evaluate(self, number: int, schedule: dict[str, Any]) -> dict[str, Any]:
        """Measure one schedule; returns `Measurement.to_dict()`. Exceptions propagate to the driver."""
        fault = self.faults.get(number)
        if fault == "raise":
            raise RuntimeError(f"injected fault in trial {number}")
        if fault == "crash":
            os._exit(1)
        measured = self.profiler.measure(schedule, self.workload).to_dict()
        return {**measured, "speedup": None} if fault == "unranked" else measured
