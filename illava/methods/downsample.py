"""downsample: the unmerged model on a lower input resolution, at the same token budget.

VTC-Bench (Liao et al., "Are We Using the Right Benchmark: An Evaluation Framework for Visual Token
Compression Methods", arXiv 2510.07143, 2025) found that simply downsampling the image before the
processor beats many visual token compression methods on the usual benchmarks (on Qwen2-VL-7B); it
is the baseline a reduction method has to beat at the same number of image tokens. Here it is one
more registered method, so a tuning job (``--methods illava,downsample``), ``profile --method
downsample`` and a manifest treat it like any other.

What a schedule means and the choices made:

* ``Schedule(method="downsample", reduction=r, encoder_share=1.0)``: every image and video frame is
  resized *before the processor* so that it yields about what the schedule's plan keeps of its
  full-resolution tokens -- ``sum(schedule.plan(n).kept)`` over its segments (the same budget every
  other method's plan leaves of the same input) -- and the model runs unmerged.
* Where the tokens go (the plan): all of the removal is before the LLM, so the plan is a one-step
  removal before the LLM (`Plan.between`; this method's `encoder_stage` is ``"between"``): every
  decoder layer sees ``plan.kept`` image tokens (`Plan.llm_tokens_at`), which is what the reduction
  axis means for every method. A plan of the full-resolution count cannot say that the encoder, too,
  sees only the downsampled tokens (`Plan.encoder_tokens_at` reports the full count there); the FLOPs
  model therefore counts a downsample schedule as the unmerged model on the downsampled grids
  (`illava.prefill_flops`, exact), not from the plan.
* Stages: it acts at none (no ``merge_*``; `acts_at` is false everywhere) but removes before the LLM
  (`acts_before_llm`), so seeds, the search space and `placement` give it ``encoder_share=1`` and no
  layers. Its layers are ignored: a schedule may carry any, and `placement` normalises them to none.
  An ``encoder_share`` other than 1 is refused (the plan would move part of the budget into the LLM).
  It has no parameters.
* The grid rule (Qwen families, `downsample_grid`): the full-resolution image is the processor's grid
  of ``rows x cols`` LLM tokens (``patch * merge`` pixels each); with ``s = sqrt(kept / (rows*cols))``
  the new grid takes each side from ``floor`` or ``ceil`` of ``side * s`` (so the aspect ratio stays
  within the rounding), choosing the pair whose token count is nearest the target, then the one
  nearest the original aspect ratio, then the larger count, then the wider; a side that ``s`` would
  take below one unit stays at one and the other takes ``floor`` or ``ceil`` of the target. The token
  count is then within ``s * (rows + cols) / 2 + 1/4`` of the target (half a downsampled row and
  column). The image is
  resized once, from the original, to exactly that grid (with the processor's resampling filter), so
  the processor keeps it. The processor's own floor still holds: the target is at least the tokens
  its ``min_pixels`` allows (4 with transformers' default of 56 x 56 pixels, as on the built-ins), so
  at high reductions on small images fewer tokens are not reachable without lowering ``min_pixels``. `illava.prefill_flops` knows only the config, not the processor:
  it assumes that floor is not reached.
* LLaVA-OneVision: the processor tiles every image in fixed tiles of the vision tower's size, so the
  resolution can only choose a smaller anyres grid: an image alone in its prompt is resized to the
  largest scale whose layout's token count is nearest the target (the base tile is always there: the
  fewest is the base tile plus one grid tile). Images of a multi-image prompt and video frames are one
  fixed tile each: unchanged.
* Where it happens: `illava.inputs.build_inputs(..., schedule=...)` / `illava.prepare_samples` resize
  the samples (the adapter's `downsample_sample`), the profiler builds a downsample schedule's inputs
  that way (its paired unmerged reference stays at full resolution), and a deployment with its own
  serving stack asks `illava.downsample_size(schedule, (width, height), model, image_processor)` for
  each image. `illava.apply(model, schedule)` accepts the schedule or its manifest and leaves the model
  unmerged (as `illava.apply_reference` does), with a `DownsampleWarning` that the inputs are what
  must change.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from .base import ReductionMethod


class DownsampleWarning(UserWarning):
    """`illava.apply` was given a downsample schedule: the model stays unmerged, and the schedule's
    effect is on the inputs (`illava.downsample_size`, `illava.prepare_samples`)."""


class Downsample(ReductionMethod):
    """The unmerged model on downsampled inputs (see the module docstring for the rules)."""

    name = "downsample"
    summary = "the unmerged model on a lower input resolution with the same token budget (VTC-Bench's baseline)"
    uses_importance = False  # nothing captured: the model runs unmerged
    encoder_stage = "between"  # the plan's removal is one step before the LLM, no encoder layers

    @property
    def acts_before_llm(self) -> bool:
        return True  # before the LLM -- before the encoder, at the input -- though at no merge stage

    def check_schedule(self, schedule: Any) -> list[str]:
        if schedule.reduction == 0 or schedule.encoder_share == 1:
            return []
        return [
            f"method {self.name!r} shrinks the input, so all of its removal is before the LLM: encoder_share "
            f"must be 1, got {schedule.encoder_share:g} (its layers are ignored; get_method({self.name!r})"
            ".placement(schedule) normalises a schedule)"
        ]


def downsamples(schedule: Any) -> bool:
    """Whether `schedule` (a `Schedule`) is a downsample one: its model runs unmerged and its inputs
    are resized (to their own size at zero reduction)."""
    return isinstance(schedule.reduction_method, Downsample)


def target_tokens(schedule: Any, segment_sizes: Iterable[int]) -> int:
    """The image tokens a downsampled item should yield: what the plan keeps of each of its
    full-resolution segments (an image, a tile), summed."""
    return sum(schedule.plan(size).kept for size in segment_sizes)


def downsample_grid(rows: int, cols: int, target: int) -> tuple[int, int]:
    """The (rows, cols) grid, each side at most the original, nearest `target` tokens (the rule in
    the module docstring). ``downsample_grid(8, 8, 15) == (4, 4)``; ``(6, 4, 6) -> (3, 2)``."""
    if rows < 1 or cols < 1:
        raise ValueError(f"a grid needs at least one row and one column, got {rows} x {cols}")
    if target >= rows * cols:
        return rows, cols
    scale = math.sqrt(max(target, 1) / (rows * cols))

    def sides(length: float, side: int) -> set[int]:
        return {min(max(bound(length), 1), side) for bound in (math.floor, math.ceil)}

    new_rows, new_cols = sides(rows * scale, rows), sides(cols * scale, cols)
    if rows * scale < 1:  # a side held at one unit leaves the rest of the budget to the other
        new_cols = sides(target, cols)
    elif cols * scale < 1:
        new_rows = sides(target, rows)
    aspect = math.log(rows / cols)
    return min(
        ((r, c) for r in new_rows for c in new_cols),
        key=lambda rc: (abs(rc[0] * rc[1] - target), abs(math.log(rc[0] / rc[1]) - aspect), -rc[0] * rc[1], -rc[1]),
    )


__all__ = ["Downsample", "DownsampleWarning", "downsample_grid", "downsamples", "target_tokens"]
