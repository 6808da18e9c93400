"""The FLOP model of LLaVA-OneVision (`illava.flops` says what is counted).

Every tile (base and grid tiles of an anyres image, a multi-image prompt's single tiles, video frames)
attends within itself in every SigLIP layer: ``n**2`` pairs for its ``n`` tokens. Unmerged, every tile
has all its tokens until the projector (the library crops the letterbox padding after it); with encoder
merges the cropped tokens leave before the first merging layer (as the engine does) and the plan's
counts follow. Newline tokens are LLM tokens that no plan counts; video frames are pooled 2x2 before
the LLM (the pooling's interpolation is not counted).
"""

from __future__ import annotations

import math
from typing import Any

from ..flops import Flops, llm_layers, module_costs
from ..schedule import Schedule


def llava_flops(adapter: Any, config: Any, schedule: Schedule, grids: list, text_tokens: int, *, image_grid) -> Flops:
    """`image_grid(config, size, patched)`: the adapter's packed layout of one image."""
    vision, text = config.vision_config, config.text_config
    depth = adapter.depths(config)[0]
    schedule.check_fits(encoder_depth=depth, llm_depth=text.num_hidden_layers)
    if text_tokens < 0:
        raise ValueError(f"text_tokens must be >= 0, got {text_tokens}")
    units = module_costs(adapter, config).units
    side = vision.image_size // vision.patch_size
    n = side * side
    tiles: list[tuple[int, Any]] = []  # (tokens before the first merge, plan or None for no encoder merge)
    llm_plans, structural, projected = [], 0, 0
    for grid in grids:
        if grid[0] == "video":
            frames = grid[1]
            pooled = math.ceil(side / 2) ** 2
            tiles += [(n, None)] * frames
            projected += frames * n
            llm_plans += [schedule.plan(pooled) for _ in range(frames)]
            structural += 1
            continue
        layout = image_grid(config, grid[1], grid[2])
        plans = [schedule.plan(size) for size in layout.layout.segment_sizes]
        llm_plans += plans
        structural += len(layout.newlines)
        merges = layout.tiled_segments and any(step.removed for plan in plans for step in plan.encoder)
        for tile in range(layout.tiles):
            tiles.append((n, plans[tile] if merges else None))
        projected += sum(plan.after_encoder for plan in plans) if merges else layout.tiles * n
    first = min((step.layer for step in schedule.plan(n).encoder if step.removed), default=None)
    blocks, tokens = [], []
    for block in range(depth):
        block_flops, attn_total, ffn_total = 0.0, 0, 0
        for count, plan in tiles:
            if plan is None or first is None or block < first:
                attn = ffn = count
            else:
                attn, ffn = plan.encoder_tokens_at(block)
            block_flops += attn * units.vision_attn_linear + attn * attn * units.vision_pair + ffn * units.vision_ffn
            attn_total, ffn_total = attn_total + attn, ffn_total + ffn
        blocks.append(block_flops)
        tokens.append((attn_total, ffn_total))
    layers, llm_tokens = llm_layers(config, units, llm_plans, text_tokens + structural)
    return Flops(
        patch_embed=len(tiles) * n * units.patch_embed,
        encoder_blocks=tuple(blocks),
        merger=projected * units.merger,
        llm_layers=layers,
        lm_head=units.lm_head,
        encoder_tokens=tuple(tokens),
        llm_tokens=llm_tokens,
    )
