"""Multiple-choice accuracy without timing: one prefill per batch, the answer read off the option-letter logits.

The profiler measures accuracy inside `Profiler.measure`, next to latency and memory. Training (to
watch validation accuracy) and the accuracy benchmark need only the answers, many times over, so this
module scores a list of items with a single forward per batch. It reads the same logits as the
profiler's default ``score="logits"`` (the next-token logits at the answer position, restricted to the
item's option letters), so both give the same choices for the same model and items.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence

import torch

from illava.backbones import Backbone
from illava.inputs import build_inputs

from .datasets import MCQItem
from .measure import _letter_ids


@torch.inference_mode()
def choose(
    backbone: Backbone,
    items: Sequence[MCQItem],
    *,
    batch_size: int = 16,
    progress: Callable[[Iterable], Iterable] | None = None,
) -> list[str]:
    """The option letter the model ranks highest for each item, in order."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    model = backbone.model
    device = next(model.parameters()).device
    letters = _letter_ids(backbone.tokenizer)
    starts = range(0, len(items), batch_size)
    choices: list[str] = []
    for start in progress(starts) if progress else starts:
        chunk = items[start : start + batch_size]
        inputs = build_inputs(backbone.tokenizer, backbone.image_processor, [item.to_sample() for item in chunk])
        logits = model(**inputs.to(device), logits_to_keep=1, use_cache=False).logits[:, -1].float()  # (B, V)
        for row, item in enumerate(chunk):
            options = list(item.options)
            choices.append(options[int(torch.argmax(logits[row, [letters[o] for o in options]]))])
    return choices


def accuracy_by_category(items: Sequence[MCQItem], choices: Sequence[str]) -> dict[str, float]:
    """Share of right answers per item category (``None`` becomes "other"), plus ``all``."""
    if len(items) != len(choices):
        raise ValueError(f"{len(items)} items but {len(choices)} choices")
    right: dict[str, list[bool]] = defaultdict(list)
    for item, choice in zip(items, choices, strict=True):
        right[item.category or "other"].append(choice == item.answer)
        right["all"].append(choice == item.answer)
    return {category: sum(hits) / len(hits) for category, hits in right.items()}


__all__ = ["accuracy_by_category", "choose"]
