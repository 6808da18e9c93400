"""The errors `illava` raises on bad input, in one place so every module can raise them."""

from __future__ import annotations


class ScheduleError(ValueError):
    """A schedule that cannot be built or cannot run on a given model; the message says why."""


class UnsupportedModelError(TypeError):
    """`apply` was given a model no backbone adapter supports; the message names the supported ones."""
