"""The FLOP model of the Qwen vision-language families (`illava.flops` says what is counted).

One LLM token is one ``spatial_merge_size**2`` group of encoder patches. Every image and every video
frame (one temporal patch) is a segment with its own plan. Qwen2.5-VL's windowed blocks attend within
windows tiled the way transformers' ``get_vision_window_index`` tiles them; its other blocks, and all
blocks of Qwen2-VL and Qwen3-VL, within whole frames. Qwen3-VL's DeepStack mergers run on every group
that leaves their block. Per-token costs come from the modules themselves (`module_costs`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ..flops import Flops, UnitCosts, int_field, llm_layers, module_costs
from ..schedule import Plan, Schedule


@dataclass(frozen=True)
class Segment:
    """One image, or one frame (temporal patch) of a video, in encoder patches."""

    grid_h: int
    grid_w: int


#: A segment, or one row of a processor's ``image_grid_thw`` / ``video_grid_thw``: ``(t, h, w)``
#: in patches, which stands for ``t`` segments of ``h x w`` patches.
GridLike = Segment | Sequence[int]


def unit_costs(config: Any) -> UnitCosts:
    """Per-unit FLOPs of a Qwen model, read off its modules (built on the meta device)."""
    from . import adapter_for_config

    return module_costs(adapter_for_config(config), config).units


def segments_of(grids: Iterable[GridLike], spatial_merge_size: int) -> list[Segment]:
    """Segments from `Segment`s and ``(t, h, w)`` rows (a ``grid_thw`` tensor works too).

    A ``(t, h, w)`` row becomes ``t`` segments because the encoder's full attention and its
    windows never cross a frame, and the schedule plans each frame on its own.
    """
    segments = []
    for grid in grids:
        if isinstance(grid, Segment):
            segments.append(grid)
            continue
        row = [int(x) for x in grid]
        if len(row) != 3 or row[0] < 1:
            raise ValueError(f"grid {row} is not a (t, h, w) row with t >= 1")
        segments.extend([Segment(row[1], row[2])] * row[0])
    for segment in segments:
        if (
            min(segment.grid_h, segment.grid_w) < 1
            or segment.grid_h % spatial_merge_size
            or segment.grid_w % spatial_merge_size
        ):
            raise ValueError(f"{segment} must be positive multiples of spatial_merge_size={spatial_merge_size} patches")
    return segments


def window_patch_counts(config: Any, segment: Segment) -> list[int]:
    """Patches in each attention window of one segment, tiled the way transformers'
    ``get_vision_window_index`` tiles it: squares of ``window_size // merge // patch_size`` groups
    from the top-left corner, the last row and column of windows cut short by the frame edge."""
    vision = config.vision_config
    merge = vision.spatial_merge_size
    side = vision.window_size // merge // vision.patch_size  # in groups
    if side < 1:
        raise ValueError(
            f"window_size={vision.window_size} is smaller than one {merge}x{merge} group of "
            f"{vision.patch_size}-pixel patches; the windows cannot be tiled like that"
        )
    rows, cols = segment.grid_h // merge, segment.grid_w // merge
    return [
        min(side, rows - top) * min(side, cols - left) * merge * merge
        for top in range(0, rows, side)
        for left in range(0, cols, side)
    ]


def block_pairs(attn_patches: int, full_patches: int, window_square_sum: int | None) -> float:
    """Attention (query, key) pairs of one block on one segment.

    Full attention is exact: ``n**2``. Windowed attention is approximated: the unmerged windows are
    exact (``sum len**2``), and after merges every window is assumed to keep the same fraction of
    its tokens, so the sum scales by ``(kept / total)**2``. Real merges keep tokens unevenly and
    the rebuilt windows are then somewhat larger in ``sum len**2`` than this.
    """
    if window_square_sum is None:
        return float(attn_patches) ** 2
    return window_square_sum * (attn_patches / full_patches) ** 2


def _encoder_blocks(
    config: Any, units: UnitCosts, segments: list[Segment], plans: list[Plan], windowed: bool
) -> tuple[tuple[float, ...], tuple[tuple[int, int], ...]]:
    """FLOPs and (attention, FFN) patch counts of every vision block, summed over segments."""
    vision = config.vision_config
    group = vision.spatial_merge_size**2
    full_blocks = set(vision.fullatt_block_indexes) if windowed else set(range(vision.depth))
    square_sums = [sum(n * n for n in window_patch_counts(config, s)) for s in segments] if windowed else None
    flops, tokens = [], []
    for block in range(vision.depth):
        block_flops, attn_total, ffn_total = 0.0, 0, 0
        for i, plan in enumerate(plans):
            attn_groups, ffn_groups = plan.encoder_tokens_at(block)
            attn, ffn = attn_groups * group, ffn_groups * group
            window = None if block in full_blocks else square_sums[i]
            pairs = block_pairs(attn, plan.n_tokens * group, window)
            block_flops += attn * units.vision_attn_linear + pairs * units.vision_pair + ffn * units.vision_ffn
            attn_total, ffn_total = attn_total + attn, ffn_total + ffn
        flops.append(block_flops)
        tokens.append((attn_total, ffn_total))
    return tuple(flops), tuple(tokens)


def qwen_flops(
    adapter: Any, config: Any, schedule: Schedule, grids: Iterable[GridLike], text_tokens: int, *, windowed: bool
) -> Flops:
    """FLOPs of encoding `grids` and prefilling them with `text_tokens` other prompt tokens.

    `grids` holds `Segment`s or ``(t, h, w)`` patch grids (as the processor's ``image_grid_thw``);
    `text_tokens` counts every prompt token that is not an image/video placeholder (chat template
    and vision start/end markers included).

    Exact for the vanilla model (a test holds it against torch's FLOP counter). Two approximations
    under merging: windowed vision attention assumes every window loses the same fraction of its
    tokens (see `block_pairs`), and decoder attention counts the causal ``n(n+1)/2`` pairs (see
    `illava.flops.causal_pairs`).
    """
    vision, text = config.vision_config, config.text_config
    schedule.check_fits(encoder_depth=vision.depth, llm_depth=text.num_hidden_layers)
    if text_tokens < 0:
        raise ValueError(f"text_tokens must be >= 0, got {text_tokens}")
    segments = segments_of(grids, int_field(vision, "spatial_merge_size"))
    if not segments and text_tokens == 0:
        raise ValueError("an empty prompt: give at least one image/frame or one text token")
    costs = module_costs(adapter, config)
    units = costs.units
    group = vision.spatial_merge_size**2
    plans = [schedule.plan(s.grid_h * s.grid_w // group) for s in segments]
    encoder_blocks, encoder_tokens = _encoder_blocks(config, units, segments, plans, windowed)
    encoder_blocks = tuple(
        flops + costs.taps.get(block, 0.0) * sum(plan.encoder_tokens_at(block)[1] for plan in plans)
        for block, flops in enumerate(encoder_blocks)
    )  # DeepStack mergers on the groups leaving their block
    layers, llm_tokens = llm_layers(config, units, plans, text_tokens)
    return Flops(
        patch_embed=sum(s.grid_h * s.grid_w for s in segments) * units.patch_embed,
        encoder_blocks=encoder_blocks,
        merger=sum(plan.after_encoder for plan in plans) * units.merger,
        llm_layers=layers,
        lm_head=units.lm_head,
        encoder_tokens=encoder_tokens,
        llm_tokens=llm_tokens,
    )
