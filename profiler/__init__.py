"""Measures one schedule on one workload. For now: the timing discipline shared by the demo and
the benchmarks (warm up, synchronise, monotonic clock, median and spread)."""

from .timing import Timing, time_call, time_once

__all__ = ["Timing", "time_call", "time_once"]
