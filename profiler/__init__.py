"""Measures one schedule on one workload: latency with its spread, the encoder/merger/LLM
breakdown, decode speed, peak memory, accuracy and fidelity against the unmerged model, on the
hardware it detects. Builds on `illava`; knows nothing of the optimizer, jobs or the database."""

from .datasets import DatasetError, make_demo_dataset, parse_choice, read_dataset, write_dataset
from .hardware import HardwareProfile, detect_hardware
from .items import MCQItem
from .measure import Fidelity, Measurement, Profiler, Spread
from .memory import MemoryReading, MemorySampler, NvmlStatus, TensorPeak, nvml_status, tensor_peak
from .timing import Timing, paired_ratios, time_call, time_once
from .workload import (
    PRESETS,
    Workload,
    WorkloadError,
    check_dataset,
    load_workload,
    resolve_workload,
    synthetic_samples,
)

__all__ = [
    "PRESETS",
    "DatasetError",
    "Fidelity",
    "HardwareProfile",
    "MCQItem",
    "Measurement",
    "MemoryReading",
    "MemorySampler",
    "NvmlStatus",
    "Profiler",
    "Spread",
    "TensorPeak",
    "Timing",
    "Workload",
    "WorkloadError",
    "detect_hardware",
    "check_dataset",
    "load_workload",
    "make_demo_dataset",
    "nvml_status",
    "paired_ratios",
    "parse_choice",
    "read_dataset",
    "resolve_workload",
    "synthetic_samples",
    "tensor_peak",
    "time_call",
    "time_once",
    "write_dataset",
]
