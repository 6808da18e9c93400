"""Qwen2.5-VL: windowed and full-attention vision blocks, 2x2 patch merger, 3-D mRoPE with timed videos.

Family specifics: the vision tokens are window-permuted before the first block (the library's
``get_vision_window_index``), so a unit's placement order is its raster id and window-attention
blocks attend within windows rebuilt from the kept units' window ids; blocks in
``fullatt_block_indexes`` attend within whole frames. Built-ins: ``tiny``, ``small`` (seeded) and the
trained ``demo`` architecture.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLModel

from ..engine.vision import VisionRun, VisualCall
from . import register_adapter
from ._qwen import QwenAdapter, mrope_section, vision_position_ids
from ._qwen_costs import qwen_flops


@dataclass(frozen=True)
class Qwen2_5_VLSpec:
    """The size knobs of a built-in Qwen2.5-VL; everything else follows the real model."""

    vision_depth: int
    vision_hidden: int
    vision_intermediate: int
    vision_heads: int
    fullatt_block_indexes: tuple[int, ...]
    text_layers: int
    text_hidden: int
    text_intermediate: int
    text_heads: int
    text_kv_heads: int
    description: str
    patch_size: int = 14


def window_layout(config, grid_host: list[list[int]]) -> tuple[list[int], list[int]]:
    """The window permutation of the groups (each group's raster id, in processing order) and the groups
    per window, from the host copy of the grid: what transformers' ``get_vision_window_index`` computes
    (windows of ``window_size // merge // patch`` groups a side, row-major, per frame; a test holds the
    two equal), without reading anything back."""
    vision = config.vision_config
    side = vision.window_size // vision.spatial_merge_size // vision.patch_size
    order, sizes, offset = [], [], 0
    for t, h, w in grid_host:
        rows, cols = h // vision.spatial_merge_size, w // vision.spatial_merge_size
        for frame in range(t):
            base = offset + frame * rows * cols
            for top in range(0, rows, side):
                for left in range(0, cols, side):
                    cells = [
                        base + r * cols + c
                        for r in range(top, min(top + side, rows))
                        for c in range(left, min(left + side, cols))
                    ]
                    order += cells
                    sizes.append(len(cells))
        offset += t * rows * cols
    return order, sizes


class Qwen2_5_VLAdapter(QwenAdapter):
    family = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)
    outer_class = Qwen2_5_VLForConditionalGeneration
    inner_class = Qwen2_5_VLModel
    timed_videos = True

    def vision_block_windowed(self, inner, index: int) -> bool:
        return index not in inner.visual.fullatt_block_indexes

    def vision_prepare(self, inner, call: VisualCall) -> VisionRun:
        visual = inner.visual
        unit = visual.spatial_merge_unit
        hidden = visual.patch_embed(call.pixel_values.type(visual.dtype))  # (N, C)
        n = hidden.shape[0]
        order, window_units = window_layout(inner.config, call.meta["grid_host"])
        window_index = torch.tensor(order).to(hidden.device, non_blocking=True)
        hidden = visual.permute_input_for_window_attn(hidden, window_index, seq_len=n)
        position_ids = vision_position_ids(call.meta["grid_host"], visual.spatial_merge_size, hidden.device)
        cos, sin = (
            visual.permute_input_for_window_attn(t, window_index, seq_len=n)
            for t in visual.rotary_pos_emb(hidden, position_ids)
        )
        window = torch.tensor([w for w, units in enumerate(window_units) for _ in range(units)]).to(hidden.device)
        run = self.run(call, hidden, cos, sin, window_index, unit, window=window)
        run.window_units = window_units
        return run

    def flops(self, config, schedule, grids, text_tokens):
        return qwen_flops(self, config, schedule, grids, text_tokens, windowed=True)

    # ------------------------------------------------------------------ built-ins
    def builtins(self) -> dict[str, Qwen2_5_VLSpec]:
        return {"demo": DEMO, "tiny": TINY, "small": SMALL}

    def build_config(self, spec: Qwen2_5_VLSpec, token_ids: dict[str, int], vocab_size: int) -> Qwen2_5_VLConfig:
        text_head_dim = spec.text_hidden // spec.text_heads
        vision = dict(
            depth=spec.vision_depth, hidden_size=spec.vision_hidden, intermediate_size=spec.vision_intermediate,
            num_heads=spec.vision_heads, hidden_act="silu", in_channels=3, patch_size=14, spatial_merge_size=2,
            temporal_patch_size=2, window_size=112, fullatt_block_indexes=list(spec.fullatt_block_indexes),
            out_hidden_size=spec.text_hidden, tokens_per_second=2,
        )  # fmt: skip
        text = dict(
            vocab_size=vocab_size, hidden_size=spec.text_hidden, intermediate_size=spec.text_intermediate,
            num_hidden_layers=spec.text_layers, num_attention_heads=spec.text_heads,
            num_key_value_heads=spec.text_kv_heads, hidden_act="silu", rms_norm_eps=1e-6, max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": mrope_section(text_head_dim)},
            bos_token_id=token_ids["pad"], eos_token_id=token_ids["eos"], pad_token_id=token_ids["pad"],
        )  # fmt: skip
        return Qwen2_5_VLConfig(
            vision_config=vision, text_config=text, image_token_id=token_ids["<|image_pad|>"],
            video_token_id=token_ids["<|video_pad|>"], vision_start_token_id=token_ids["<|vision_start|>"],
            vision_end_token_id=token_ids["<|vision_end|>"], tie_word_embeddings=False,
        )  # fmt: skip


ADAPTER = register_adapter(Qwen2_5_VLAdapter())

# The built-ins: real Qwen2.5-VL models from a config with seeded weights (`demo` is trained from its spec).
TINY = Qwen2_5_VLSpec(
    vision_depth=6, vision_hidden=64, vision_intermediate=128, vision_heads=4, fullatt_block_indexes=(2, 5),
    text_layers=6, text_hidden=128, text_intermediate=256, text_heads=4, text_kv_heads=2,
    description="unit-test size, a few M parameters",
)  # fmt: skip
SMALL = Qwen2_5_VLSpec(
    vision_depth=16, vision_hidden=192, vision_intermediate=512, vision_heads=4, fullatt_block_indexes=(3, 7, 11, 15),
    text_layers=16, text_hidden=768, text_intermediate=2560, text_heads=12, text_kv_heads=2,
    description="CPU benchmark size, ~129M parameters, 7B-like encoder/LLM cost split",
)  # fmt: skip
DEMO = Qwen2_5_VLSpec(
    vision_depth=8, vision_hidden=96, vision_intermediate=192, vision_heads=4, fullatt_block_indexes=(3, 7),
    text_layers=6, text_hidden=192, text_intermediate=512, text_heads=4, text_kv_heads=2,
    description="trained on the demo VQA benchmark; ~4.6M parameters, committed checkpoint",
)  # fmt: skip
