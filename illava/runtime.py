"""The deployment configuration a model runs in: its dtype and its attention implementation.

A schedule's latency (and, in low precision, its kept tokens) means something only in the
configuration it was measured in, so tuning records both and `illava.apply` warns when a manifest
tuned in one configuration is applied to a model running in another.

Attention implementations (`ATTENTIONS`): ``eager`` and ``sdpa`` (transformers'), ``flash_attention_2``
(CUDA with the optional flash-attn package, imported lazily by transformers) and ``illava_packed``
(`illava.engine.attention`: one attention call per vision block, merged or not).
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Mapping
from typing import Any

import torch

from .engine.attention import PACKED

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ATTENTIONS = ("eager", "sdpa", "flash_attention_2", PACKED)
#: What every measurement was taken in before the configuration was recorded (jobs and `profile`
#: loaded every backbone in float32 with sdpa): how a stored profile without the fields is read.
DEFAULT_DTYPE, DEFAULT_ATTENTION = "float32", "sdpa"


class RuntimeMismatchWarning(UserWarning):
    """A manifest tuned in one dtype or attention is applied to a model running in another."""


def dtype_name(dtype: torch.dtype | str) -> str:
    """ "bfloat16" for torch.bfloat16 or "bfloat16"; a ValueError naming the allowed ones otherwise."""
    for name, value in DTYPES.items():
        if dtype in (name, value):
            return name
    raise ValueError(f"unsupported dtype {dtype!r}; allowed: {', '.join(DTYPES)}")


def torch_dtype(dtype: torch.dtype | str) -> torch.dtype:
    return DTYPES[dtype_name(dtype)]


def check_attention(attention: str, device: str | torch.device | None = None) -> str:
    """`attention` if this machine can run it on `device` (None: any device), else a ValueError that
    says why: an unknown name, flash attention without CUDA, or without the flash-attn package."""
    if attention not in ATTENTIONS:
        raise ValueError(f"unsupported attention {attention!r}; allowed: {', '.join(ATTENTIONS)}")
    if attention == "flash_attention_2":
        if device is not None and torch.device(device).type != "cuda":
            raise ValueError("attention 'flash_attention_2' runs on CUDA only; use sdpa or illava_packed on CPU")
        if importlib.util.find_spec("flash_attn") is None:
            raise ValueError(
                "attention 'flash_attention_2' needs the flash-attn package (pip install 'illava-tune[cuda]'); "
                "illava_packed gives one attention call per vision block without it"
            )
    return attention


def model_runtime(model: torch.nn.Module) -> tuple[str, str]:
    """(dtype, attention) `model` runs in: its parameters' dtype and the attention implementation
    of its parts (when the parts differ, "part=impl" pairs joined by commas)."""
    from .adapters import adapter_for

    adapter = adapter_for(model)
    parameter = next(model.parameters(), None)
    dtype = str(parameter.dtype).removeprefix("torch.") if parameter is not None else "unknown"
    configs = adapter.attention_configs(adapter.inner_model(model))
    names = {part: config._attn_implementation for part, config in configs.items()}
    kinds = set(names.values())
    attention = kinds.pop() if len(kinds) == 1 else ",".join(f"{part}={impl}" for part, impl in sorted(names.items()))
    return dtype, attention


def warn_if_mismatched(model: torch.nn.Module, manifest: Mapping[str, Any]) -> None:
    """Warn (`RuntimeMismatchWarning`) when `model` runs in another dtype or attention than the
    configuration `manifest` (an exported manifest: its ``hardware`` says) was tuned in."""
    hardware = manifest.get("hardware")
    if not isinstance(hardware, Mapping):
        return
    tuned = (hardware.get("dtype", DEFAULT_DTYPE), hardware.get("attention", DEFAULT_ATTENTION))
    running = model_runtime(model)
    if running != tuned:
        warnings.warn(
            f"illava: this schedule was tuned in {tuned[0]} with {tuned[1]} attention, and the model runs in "
            f"{running[0]} with {running[1]}; its measured latency and accuracy may not hold here "
            "(tune again with `illava-tune submit --dtype ... --attn ...`)",
            RuntimeMismatchWarning,
            stacklevel=3,
        )
