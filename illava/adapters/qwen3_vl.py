"""Qwen3-VL (dense): 16-pixel patches, a learned position embedding interpolated per grid, full
attention per frame, 2x2 patch merger, DeepStack, interleaved mRoPE, time-stamped video frames.

Family specifics:

* DeepStack: the outputs of the blocks in ``deepstack_visual_indexes`` go through their own mergers
  and are added to the hidden states after the first decoder layers at the image positions. Here
  those block outputs are taps: merged exactly like the hidden states at every later encoder merge
  (so a recycled cluster token's DeepStack feature is the same weighted sum of its members'), put
  through their mergers with the survivors, placed with the image tokens, and carried along -- and
  merged -- with them in the LLM, so every added feature belongs to the token it is added to.
* The learned position embedding is interpolated per grid by the library's own index/weight helper
  and added before the first block, so merged tokens keep theirs.
* A video is one placeholder run per temporal patch, each after its ``<t seconds>`` time stamp (the
  Qwen3-VL processor's layout); positions come from the library, which splits videos per frame.

Built-in: ``tiny-qwen3-vl`` (image sides snap to 32 pixels: 16-pixel patches, 2x2 merge).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLModel
from transformers.vision_utils import get_vision_interpolation_indices_and_weights

from ..engine.vision import VisionRun, VisualCall
from ..inputs import TEXT_TYPE, VIDEO_TYPE
from . import register_adapter
from ._qwen import VIDEO_PAD, QwenAdapter, vision_position_ids
from ._qwen_costs import qwen_flops

DEEPSTACK = "deepstack"


@dataclass(frozen=True)
class Qwen3VLSpec:
    vision_depth: int
    vision_hidden: int
    vision_intermediate: int
    vision_heads: int
    deepstack_visual_indexes: tuple[int, ...]
    text_layers: int
    text_hidden: int
    text_intermediate: int
    text_heads: int
    text_kv_heads: int
    text_head_dim: int
    description: str
    patch_size: int = 16


TINY = Qwen3VLSpec(
    vision_depth=4, vision_hidden=64, vision_intermediate=128, vision_heads=4, deepstack_visual_indexes=(1, 2),
    text_layers=4, text_hidden=128, text_intermediate=256, text_heads=4, text_kv_heads=2, text_head_dim=32,
    description="unit-test size, a few M parameters",
)  # fmt: skip


class Qwen3VLAdapter(QwenAdapter):
    family = "qwen3_vl"
    model_types = ("qwen3_vl",)
    outer_class = Qwen3VLForConditionalGeneration
    inner_class = Qwen3VLModel
    llm_extras = (DEEPSTACK,)

    # ------------------------------------------------------------------ encoder
    def vision_prepare(self, inner, call: VisualCall) -> VisionRun:
        visual = inner.visual
        grid = call.meta["grid_thw"]
        unit = visual.spatial_merge_size**2
        indices, weights = get_vision_interpolation_indices_and_weights(
            grid, num_grid_per_side=visual.num_grid_per_side, mode=visual.interpolation_mode,
            align_corners=visual.interpolation_align_corners, spatial_merge_size=visual.config.spatial_merge_size,
        )  # fmt: skip
        hidden = visual.patch_embed(call.pixel_values.type(visual.dtype))
        hidden = hidden + (visual.pos_embed(indices) * weights[:, :, None]).sum(1).to(hidden.dtype)
        cos, sin = visual.rotary_pos_emb(
            hidden, vision_position_ids(call.meta["grid_host"], visual.spatial_merge_size, hidden.device)
        )
        order = torch.arange(hidden.shape[0] // unit, device=hidden.device)
        run = self.run(call, hidden, cos, sin, order, unit)
        run.taps[DEEPSTACK] = []
        return run

    def after_vision_block(self, inner, index: int, run: VisionRun) -> None:
        if index in inner.visual.deepstack_visual_indexes:
            run.taps[DEEPSTACK].append(run.hidden)

    def vision_project(self, inner, run: VisionRun):
        visual = inner.visual
        stacked = torch.stack(
            [merger(tap) for merger, tap in zip(visual.deepstack_merger_list, run.taps[DEEPSTACK], strict=True)], dim=1
        )  # (U, k, C_out)
        return visual.merger(run.hidden), {DEEPSTACK: stacked}

    def cost_taps(self, visual):
        return dict(zip(visual.deepstack_visual_indexes, visual.deepstack_merger_list, strict=True))

    # ------------------------------------------------------------------ LLM
    def llm_extra_shapes(self, config) -> dict[str, tuple[int, ...]]:
        return {DEEPSTACK: (len(config.vision_config.deepstack_visual_indexes), config.text_config.hidden_size)}

    def after_decoder_layer(self, inner, index: int, hidden, extras):
        deepstack = extras[DEEPSTACK]
        if index < deepstack.shape[2]:
            # Zero on every token but the image tokens: the same additions the library makes at visual_pos_masks.
            return hidden + deepstack[:, :, index]
        return hidden

    def position_call(self, inner, arguments, embeds, cache):
        return inner.compute_3d_position_ids(
            input_ids=arguments.get("input_ids"), inputs_embeds=embeds,
            image_grid_thw=arguments.get("image_grid_thw"), video_grid_thw=arguments.get("video_grid_thw"),
            attention_mask=arguments.get("attention_mask"), cache=cache,
            mm_token_type_ids=arguments.get("mm_token_type_ids"),
        )  # fmt: skip

    # ------------------------------------------------------------------ inputs
    def video_placeholder(self, tokenizer, grid, unit: int, fps: float, temporal_patch: int):
        """One run per temporal patch after its time stamp: the mean time of the patch's frames."""
        ids, types = [], []
        frame_tokens = grid[1] * grid[2] // unit
        for t in range(grid[0]):
            stamp = (temporal_patch * t + temporal_patch * t + temporal_patch - 1) / 2 / fps
            stamp_ids = tokenizer.encode(f"<{stamp:.1f} seconds>", add_special_tokens=False)
            run_ids, run_types = self._run_ids(tokenizer, VIDEO_PAD, VIDEO_TYPE, frame_tokens)
            ids += stamp_ids + run_ids
            types += [TEXT_TYPE] * len(stamp_ids) + run_types
        return ids, types

    # ------------------------------------------------------------------ cost and built-ins
    def flops(self, config, schedule, grids, text_tokens):
        return qwen_flops(self, config, schedule, grids, text_tokens, windowed=False)

    def builtins(self) -> dict[str, Qwen3VLSpec]:
        return {"tiny-qwen3-vl": TINY}

    def build_config(self, spec: Qwen3VLSpec, token_ids: dict[str, int], vocab_size: int) -> Qwen3VLConfig:
        half = spec.text_head_dim // 2
        height = width = (half * 5) // 16  # the real model's 24/20/20 of 64, interleaved
        vision = dict(
            depth=spec.vision_depth, hidden_size=spec.vision_hidden, intermediate_size=spec.vision_intermediate,
            num_heads=spec.vision_heads, patch_size=spec.patch_size, spatial_merge_size=2, temporal_patch_size=2,
            out_hidden_size=spec.text_hidden, num_position_embeddings=64,
            deepstack_visual_indexes=list(spec.deepstack_visual_indexes),
        )  # fmt: skip
        text = dict(
            vocab_size=vocab_size, hidden_size=spec.text_hidden, intermediate_size=spec.text_intermediate,
            num_hidden_layers=spec.text_layers, num_attention_heads=spec.text_heads,
            num_key_value_heads=spec.text_kv_heads, head_dim=spec.text_head_dim, rms_norm_eps=1e-6,
            max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 5e5, "mrope_interleaved": True,
                             "mrope_section": [half - height - width, height, width]},
            bos_token_id=token_ids["pad"], eos_token_id=token_ids["eos"], pad_token_id=token_ids["pad"],
        )  # fmt: skip
        return Qwen3VLConfig(
            vision_config=vision, text_config=text, image_token_id=token_ids["<|image_pad|>"],
            video_token_id=token_ids["<|video_pad|>"], vision_start_token_id=token_ids["<|vision_start|>"],
            vision_end_token_id=token_ids["<|vision_end|>"], tie_word_embeddings=False,
        )  # fmt: skip


ADAPTER = register_adapter(Qwen3VLAdapter())
