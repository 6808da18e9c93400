"""iLLaVA: training-free two-stage token merging for vision-language models.

    import illava
    illava.apply(model, illava.Schedule.paper_default(0.778, encoder_depth=32, llm_depth=28))
    ...  # model.generate(...) / model(...) now merge image tokens
    illava.remove(model)  # the original model again

This package depends only on torch and transformers; the tuning service builds on it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .flops import Flops, predicted_speedup, prefill_flops
from .patch import PATCHES, SUPPORTED_MODELS
from .schedule import PAPER_REDUCTIONS, SCHEMA_VERSION, LayerStep, Plan, Schedule, ScheduleError

__all__ = [
    "Flops",
    "PAPER_REDUCTIONS",
    "SCHEMA_VERSION",
    "LayerStep",
    "Plan",
    "Schedule",
    "ScheduleError",
    "UnsupportedModelError",
    "apply",
    "depths",
    "is_applied",
    "last_stats",
    "paper_default_for",
    "predicted_speedup",
    "prefill_flops",
    "remove",
]


class UnsupportedModelError(TypeError):
    """`apply` was given a model class no patch supports."""


def _patch_for(model: torch.nn.Module):
    for patch in PATCHES:
        if patch.inner_model(model) is not None:
            return patch
    raise UnsupportedModelError(
        f"illava does not support {type(model).__name__}; supported model classes: {', '.join(SUPPORTED_MODELS)}"
    )


def depths(model_or_config: Any) -> tuple[int, int]:
    """(vision encoder blocks, LLM decoder layers) of a Qwen2.5-VL model or its config."""
    config = getattr(model_or_config, "config", model_or_config)
    return config.vision_config.depth, config.text_config.num_hidden_layers


def paper_default_for(model_or_config: Any, reduction: float = 7 / 9, **overrides: Any) -> Schedule:
    """`Schedule.paper_default` with the paper's layers mapped onto this model's depths."""
    encoder_depth, llm_depth = depths(model_or_config)
    return Schedule.paper_default(reduction, encoder_depth=encoder_depth, llm_depth=llm_depth, **overrides)


def apply(model: torch.nn.Module, schedule: Schedule | dict[str, Any] | str | Path) -> torch.nn.Module:
    """Make `model` merge image tokens as `schedule` says; returns the same model.

    `schedule` may be a `Schedule`, its dict/JSON form, a path to a JSON file, or an exported
    manifest (a dict with a ``schedule`` key). Applying twice replaces the first schedule.
    Raises `ScheduleError` for a schedule that is invalid or does not fit the model.
    """
    patch = _patch_for(model)
    patch.apply(model, Schedule.coerce(schedule))
    return model


def remove(model: torch.nn.Module) -> torch.nn.Module:
    """Undo `apply` (a no-op on an unpatched model); outputs equal the original model's."""
    _patch_for(model).remove(model)
    return model


def is_applied(model: torch.nn.Module) -> bool:
    return _patch_for(model).state_of(model) is not None


def last_stats(model: torch.nn.Module):
    """Counts of the last merged prefill (tokens per encoder block and LLM layer, kept ids)."""
    state = _patch_for(model).state_of(model)
    if state is None:
        raise ValueError("illava is not applied to this model")
    return state.stats
