"""Repeatable wall-clock timing of a callable: warm-up runs first, device synchronised around
every run, a monotonic clock, and the median with its spread rather than one number."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Timing:
    samples: tuple[float, ...]  # seconds, one per timed run

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def low(self) -> float:
        return min(self.samples)

    @property
    def high(self) -> float:
        return max(self.samples)

    @property
    def spread(self) -> float:
        """(max - min) / median: the relative range of the timed runs."""
        return (self.high - self.low) / self.median if self.median else 0.0


def paired_ratios(reference: Timing, other: Timing) -> Timing:
    """Ratio ``reference / other`` of each round of two interleaved timings: the speedup of `other`
    over `reference` when both are seconds. Round r of both saw the same machine state, so drift
    (clock boost, a busy neighbour) cancels in the ratio, which it does not in a ratio of medians."""
    if len(reference.samples) != len(other.samples):
        raise ValueError(
            f"paired timings need one run of each per round, got {len(reference.samples)} reference runs "
            f"and {len(other.samples)} others"
        )
    return Timing(tuple(r / o for r, o in zip(reference.samples, other.samples, strict=True)))


def _sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn: Callable[[], object], device: torch.device | None = None) -> float:
    """Seconds one call of `fn` takes, with the device synchronised before and after."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def time_call(
    fn: Callable[[], object], *, repeats: int = 5, warmup: int = 1, device: torch.device | None = None
) -> Timing:
    """Run `fn` `warmup` times untimed, then `repeats` times timed. Inputs must be prepared by
    the caller outside `fn`, so only the work itself is measured."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    return Timing(tuple(time_once(fn, device) for _ in range(repeats)))
