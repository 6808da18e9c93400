"""The errors `illava` raises on bad input, in one place so every module can raise them."""

from __future__ import annotations


class ScheduleError(ValueError):
    """A schedule that cannot be built or cannot run on a given model; the message says why."""


class UnsupportedModelError(TypeError):
    """`apply` was given a model no backbone adapter supports; the message names the supported ones."""


class ManifestError(ValueError):
    """A manifest that cannot be loaded: an unreadable or invalid document, an HTTP error answer
    from the schedule service (status, its detail and the URL), or a service that cannot be reached
    with no cached copy to fall back on. The message never holds the token."""


class ManifestWarning(UserWarning):
    """`load_manifest` fell back on a cached copy (the service was unreachable) or could not
    refresh its cache file; the message says which file and what happened."""
