"""Backbone adapters, registered by model class and by ``config.model_type`` (the way
transformers' Auto classes map a ``model_type`` to a class).

Nothing outside this package names a model family: the engine, the profiler, the jobs and the CLI
ask `adapter_for(model)` or `adapter_for_config(config)`. Adding a family is one module here with
a `BackboneAdapter` subclass, a `register_adapter` call and its built-in ``tiny`` config (see the
README's "Adding a backbone").
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..errors import UnsupportedModelError
from .base import SUPPORTED_ATTENTION, BackboneAdapter

_ADAPTERS: list[BackboneAdapter] = []


def register_adapter(adapter: BackboneAdapter) -> BackboneAdapter:
    """Make `adapter` answer for its model classes and model types (a later registration of the
    same family replaces the earlier one)."""
    if not isinstance(adapter, BackboneAdapter):
        raise TypeError(f"register_adapter takes a BackboneAdapter instance, got {type(adapter).__name__}")
    _ADAPTERS[:] = [a for a in _ADAPTERS if a.family != adapter.family]
    _ADAPTERS.append(adapter)
    return adapter


def adapters() -> tuple[BackboneAdapter, ...]:
    return tuple(_ADAPTERS)


def supported_models() -> tuple[str, ...]:
    """Model class names `illava.apply` accepts, for error messages."""
    return tuple(name for adapter in _ADAPTERS for name in adapter.class_names)


def supported_model_types() -> tuple[str, ...]:
    return tuple(model_type for adapter in _ADAPTERS for model_type in adapter.model_types)


def adapter_for(model: torch.nn.Module) -> BackboneAdapter:
    """The adapter of `model` (an outer generation model or its inner multimodal model)."""
    for adapter in _ADAPTERS:
        if adapter.inner_model(model) is not None:
            return adapter
    raise UnsupportedModelError(
        f"illava does not support {type(model).__name__}; supported model classes: {', '.join(supported_models())}"
    )


def adapter_for_config(config: Any) -> BackboneAdapter:
    """The adapter of a config object, a ``config.json`` dict, or a checkpoint directory."""
    if isinstance(config, str | Path):
        file = Path(config) / "config.json" if Path(config).is_dir() else Path(config)
        try:
            config = json.loads(file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise UnsupportedModelError(f"{str(file)!r} could not be read as a model config: {error}") from None
        if not isinstance(config, dict):
            raise UnsupportedModelError(f"{str(file)!r} is not a model config (a JSON object)")
    model_type = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    for adapter in _ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    raise UnsupportedModelError(
        f"model_type {model_type!r} is not supported; supported model types: {', '.join(supported_model_types())}"
    )


#: Built-in adapter modules, in the order `adapter_for` tries them (each registers itself on import).
BUILTIN_ADAPTERS = ("qwen2_5_vl", "qwen2_vl", "qwen3_vl", "llava_onevision")


def _register_builtins() -> None:
    import importlib

    for name in BUILTIN_ADAPTERS:
        importlib.import_module(f"{__name__}.{name}")


_register_builtins()

__all__ = [
    "SUPPORTED_ATTENTION",
    "BackboneAdapter",
    "adapter_for",
    "adapter_for_config",
    "adapters",
    "register_adapter",
    "supported_model_types",
    "supported_models",
]
