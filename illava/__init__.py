"""iLLaVA: training-free two-stage token merging for vision-language models.

    import illava
    illava.apply(model, illava.paper_default_for(model, 0.778))
    ...  # model.generate(...) / model(...) now merge image tokens
    illava.remove(model)  # the original model again

A deployment applies a tuned schedule exported by the tuning service: ``illava.apply(model,
illava.load_manifest(url_or_path, cache=...))`` (standard library HTTP; `illava.manifests`). A
``downsample`` schedule changes the inputs, not the model: resize each image to
``illava.downsample_size(schedule, (width, height), model, image_processor)`` before the processor
(or build inputs with ``illava.inputs.build_inputs(..., schedule=schedule)``).

Three kinds of part, each extended by adding a module and registering it: the engine
(`illava.engine`: everything that does not depend on the model family), backbone adapters
(`illava.adapters`: one per family) and reduction methods (`illava.methods`).
This package depends only on torch and transformers; the tuning service builds on it.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from .adapters import BackboneAdapter, adapter_for, adapter_for_config, register_adapter, supported_models
from .engine import model as _engine
from .engine.attention import is_packed
from .errors import ManifestError, ManifestWarning, ScheduleError, UnsupportedModelError
from .flops import Flops
from .inputs import prepare_samples
from .manifests import Fetched, fetch_manifest, load_manifest
from .methods import DownsampleWarning, ReductionMethod, get_method, method_names, register_method
from .methods.downsample import downsamples
from .runtime import ATTENTIONS, DTYPES, RuntimeMismatchWarning, model_runtime, warn_if_mismatched
from .schedule import PAPER_REDUCTIONS, SCHEMA_VERSION, LayerStep, Plan, Schedule, read_document

__all__ = [
    "ATTENTIONS",
    "DTYPES",
    "PAPER_REDUCTIONS",
    "SCHEMA_VERSION",
    "BackboneAdapter",
    "DownsampleWarning",
    "Fetched",
    "Flops",
    "LayerStep",
    "ManifestError",
    "ManifestWarning",
    "Plan",
    "ReductionMethod",
    "RuntimeMismatchWarning",
    "Schedule",
    "ScheduleError",
    "UnsupportedModelError",
    "adapter_for",
    "adapter_for_config",
    "apply",
    "apply_reference",
    "depths",
    "downsample_size",
    "fetch_manifest",
    "get_method",
    "is_applied",
    "last_stats",
    "load_manifest",
    "method_names",
    "model_runtime",
    "paper_default_for",
    "predicted_speedup",
    "prefill_flops",
    "prepare_samples",
    "register_adapter",
    "register_method",
    "remove",
    "supported_models",
    "time_merges",
]


def __getattr__(name: str) -> Any:
    if name == "SUPPORTED_MODELS":  # the registered adapters' classes, read at use
        return supported_models()
    raise AttributeError(name)


def prefill_flops(config: Any, schedule: Schedule, grids: Any, text_tokens: int) -> Flops:
    """Prefill FLOPs of encoding `grids` and prefilling them with `text_tokens` other prompt tokens,
    under `schedule`, for a config of any supported family (`illava.flops` says what is counted).

    `grids` is the family's description of the visual inputs -- for the Qwen families the processor's
    ``(t, h, w)`` patch grids -- and ``adapter.flop_inputs(config, batch)`` reads both off a batch.
    Exact for the unmerged model (tests hold it against torch's FLOP counter for every family).

    `grids` always describe the full-resolution inputs; a ``downsample`` schedule is counted as the
    unmerged model on the grids its rule makes of them (``adapter.downsample_grids``), so its FLOPs,
    its `predicted_speedup` and its `Flops.llm_tokens` are those of the inputs it really runs on."""
    adapter = adapter_for_config(config)
    if downsamples(schedule):
        return adapter.flops(config, Schedule.vanilla(), adapter.downsample_grids(config, schedule, grids), text_tokens)
    return adapter.flops(config, schedule, grids, text_tokens)


def predicted_speedup(config: Any, schedule: Schedule, grids: Any, text_tokens: int) -> float:
    """Vanilla prefill FLOPs over `schedule`'s: the speedup a compute-bound run would show."""
    grids = list(grids)
    vanilla = prefill_flops(config, Schedule.vanilla(), grids, text_tokens)
    return vanilla.total / prefill_flops(config, schedule, grids, text_tokens).total


def depths(model_or_config: Any) -> tuple[int, int]:
    """(vision encoder blocks, LLM decoder layers) of a model or its config, any supported family."""
    config = getattr(model_or_config, "config", model_or_config)
    return adapter_for_config(config).depths(config)


def paper_default_for(model_or_config: Any, reduction: float = 7 / 9, **overrides: Any) -> Schedule:
    """`Schedule.paper_default` with the paper's layers mapped onto this model's depths."""
    encoder_depth, llm_depth = depths(model_or_config)
    return Schedule.paper_default(reduction, encoder_depth=encoder_depth, llm_depth=llm_depth, **overrides)


def apply(model: torch.nn.Module, schedule: Schedule | dict[str, Any] | str | Path) -> torch.nn.Module:
    """Make `model` merge image tokens as `schedule` says; returns the same model.

    `schedule` may be a `Schedule`, its dict/JSON form, a path to a JSON file, or an exported
    manifest (a dict with a ``schedule`` key). Applying twice replaces the first schedule.
    Raises `ScheduleError` for a schedule that is invalid or does not fit the model, and
    `UnsupportedModelError` for a model no adapter supports. A manifest tuned in another dtype or
    attention implementation than `model` runs in is applied with a `RuntimeMismatchWarning`.

    A ``downsample`` schedule leaves the model unmerged (as `apply_reference` does: the first
    schedule removed) and warns (`DownsampleWarning`): its effect is on the inputs, which the caller
    resizes (`downsample_size`, `prepare_samples`).
    """
    adapter = adapter_for(model)
    document = read_document(schedule)
    if isinstance(document, dict) and "schedule" in document:
        warn_if_mismatched(model, document)
    schedule = Schedule.coerce(document)
    if downsamples(schedule) and not schedule.removes_nothing:
        warnings.warn(
            f"illava: a downsample schedule (reduction {schedule.reduction:g}) leaves the model unmerged; resize "
            "each image before the processor to illava.downsample_size(schedule, (width, height), model, "
            "image_processor) (or illava.prepare_samples / build_inputs(..., schedule=...))",
            DownsampleWarning,
            stacklevel=2,
        )
    if downsamples(schedule):
        return apply_reference(model)
    _engine.apply(adapter, model, schedule)
    return model


def downsample_size(
    schedule: Schedule | dict[str, Any] | str | Path, size: tuple[int, int], model_or_config: Any, image_processor: Any,
    *, alone: bool = True,
) -> tuple[int, int]:  # fmt: skip
    """The (width, height) to resize an image of (width, height) `size` to before `image_processor`
    under `schedule` (a `Schedule`, its JSON, a file or a manifest): for a ``downsample`` schedule the
    size at which the family's processor yields about the tokens the schedule's plan keeps of the
    image (`illava.methods.downsample` states the rule per family); `size` itself for any other.
    `alone`: the image is its prompt's only one (pass False for one of several, and for video frames:
    LLaVA-OneVision gives those one fixed tile each, so they keep their size)."""
    schedule = Schedule.coerce(schedule)
    if not downsamples(schedule):
        return size
    config = getattr(model_or_config, "config", model_or_config)
    return adapter_for_config(config).downsample_size(config, image_processor, size, schedule, alone=alone)


def apply_reference(model: torch.nn.Module) -> torch.nn.Module:
    """Make `model` the unmerged reference its merged runs are compared with: the untouched model,
    except under ``illava_packed`` attention, where the engine runs with a schedule that removes
    nothing (transformers' own loop would call the kernel once per window: an unfair baseline)."""
    adapter = adapter_for(model)
    if any(is_packed(config) for config in adapter.attention_configs(adapter.inner_model(model)).values()):
        _engine.apply(adapter, model, Schedule.vanilla())
    else:
        _engine.remove(adapter, model)
    return model


def remove(model: torch.nn.Module) -> torch.nn.Module:
    """Undo `apply` (a no-op on an unpatched model); outputs equal the original model's."""
    _engine.remove(adapter_for(model), model)
    return model


def is_applied(model: torch.nn.Module) -> bool:
    return _engine.state_of(adapter_for(model), model) is not None


def _state(model: torch.nn.Module):
    state = _engine.state_of(adapter_for(model), model)
    if state is None:
        raise ValueError("illava is not applied to this model")
    return state


def last_stats(model: torch.nn.Module):
    """Counts of the last merged prefill (units per encoder block and segment, image tokens and
    sequence length per LLM layer, kept placeholder ids per image/video, their positions)."""
    return _state(model).stats


def time_merges(model: torch.nn.Module, enabled: bool = True) -> None:
    """Time the merge work of every prefill into ``last_stats(model).merge_seconds`` (what it
    covers: `illava.engine.vision.MergeTimer`; it synchronises around each merge on CUDA: for
    benchmarks, not for serving)."""
    _state(model).time_merges = enabled
