"""Qwen2-VL: full attention per frame in every vision block, 2x2 patch merger, 3-D mRoPE.

Family specifics: none beyond the shared Qwen ones -- the tokens are processed in placement order
(no window permutation), every block attends within whole frames, and videos carry no time stamps
(``second_per_grid_ts`` is not an input). Built-in: ``tiny-qwen2-vl``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLModel

from ..engine.vision import VisionRun, VisualCall
from . import register_adapter
from ._qwen import QwenAdapter, mrope_section, vision_position_ids
from ._qwen_costs import qwen_flops


@dataclass(frozen=True)
class Qwen2VLSpec:
    vision_depth: int
    vision_embed: int
    vision_heads: int
    text_layers: int
    text_hidden: int
    text_intermediate: int
    text_heads: int
    text_kv_heads: int
    description: str
    patch_size: int = 14


TINY = Qwen2VLSpec(
    vision_depth=4, vision_embed=64, vision_heads=4, text_layers=4, text_hidden=128, text_intermediate=256,
    text_heads=4, text_kv_heads=2, description="unit-test size, a few M parameters",
)  # fmt: skip


class Qwen2VLAdapter(QwenAdapter):
    family = "qwen2_vl"
    model_types = ("qwen2_vl",)
    outer_class = Qwen2VLForConditionalGeneration
    inner_class = Qwen2VLModel

    def vision_prepare(self, inner, call: VisualCall) -> VisionRun:
        visual = inner.visual
        unit = visual.spatial_merge_size**2
        hidden = visual.patch_embed(call.pixel_values.type(visual.dtype))  # (N, C), groups of 4 consecutive
        cos, sin = visual.rotary_pos_emb(
            hidden, vision_position_ids(call.meta["grid_host"], visual.spatial_merge_size, hidden.device)
        )
        order = torch.arange(hidden.shape[0] // unit, device=hidden.device)  # already in raster order
        return self.run(call, hidden, cos, sin, order, unit)

    def flops(self, config, schedule, grids, text_tokens):
        return qwen_flops(self, config, schedule, grids, text_tokens, windowed=False)

    def builtins(self) -> dict[str, Qwen2VLSpec]:
        return {"tiny-qwen2-vl": TINY}

    def build_config(self, spec: Qwen2VLSpec, token_ids: dict[str, int], vocab_size: int) -> Qwen2VLConfig:
        vision = dict(
            depth=spec.vision_depth, embed_dim=spec.vision_embed, hidden_size=spec.text_hidden, mlp_ratio=2,
            num_heads=spec.vision_heads, hidden_act="quick_gelu", patch_size=spec.patch_size, spatial_merge_size=2,
            temporal_patch_size=2,
        )  # fmt: skip
        text = dict(
            vocab_size=vocab_size, hidden_size=spec.text_hidden, intermediate_size=spec.text_intermediate,
            num_hidden_layers=spec.text_layers, num_attention_heads=spec.text_heads,
            num_key_value_heads=spec.text_kv_heads, rms_norm_eps=1e-6, max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                             "mrope_section": mrope_section(spec.text_hidden // spec.text_heads)},
            bos_token_id=token_ids["pad"], eos_token_id=token_ids["eos"], pad_token_id=token_ids["pad"],
        )  # fmt: skip
        return Qwen2VLConfig(
            vision_config=vision, text_config=text, image_token_id=token_ids["<|image_pad|>"],
            video_token_id=token_ids["<|video_pad|>"], vision_start_token_id=token_ids["<|vision_start|>"],
            vision_end_token_id=token_ids["<|vision_end|>"], tie_word_embeddings=False,
        )  # fmt: skip


ADAPTER = register_adapter(Qwen2VLAdapter())
