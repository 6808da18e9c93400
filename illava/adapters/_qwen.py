"""What the Qwen vision-language families share: a packed vision tower whose 2x2 patch merger
fuses 4 consecutive tokens into one LLM token (the unit), frames as segments, 2-D rotary tables
gathered with the tokens, 3-D (m)RoPE positions from the library's own position code, and a
prompt layout of ``<|vision_start|>`` + placeholders + ``<|vision_end|>`` built without the
processor class (whose video processor needs torchvision).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from transformers import BatchFeature
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

from ..engine.attention import takes_bounds
from ..engine.vision import EncodedVisual, ItemLayout, VisionRun, VisualCall
from ..inputs import IMAGE_MARKER, IMAGE_TYPE, TEXT_TYPE, VIDEO_MARKER, VIDEO_TYPE, Sample, left_pad, split_markers
from ..methods.downsample import downsample_grid, target_tokens
from ._qwen_costs import Segment
from .base import BackboneAdapter

VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
RESERVED = (VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)

_PIXELS = {"image": "pixel_values", "video": "pixel_values_videos"}
_GRIDS = {"image": "image_grid_thw", "video": "video_grid_thw"}


def mrope_section(head_dim: int) -> list[int]:
    """Split head_dim/2 rotary frequencies over (t, h, w) as the real Qwen2/2.5-VL models do (16, 24, 24 of 64)."""
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def vision_position_ids(grid_host: list[list[int]], merge: int, device) -> torch.Tensor:
    """(N, 2) (row, column) of every patch, in the towers' block-major order over merge x merge groups
    and repeated per frame: what transformers' ``get_vision_position_ids`` computes, from the host
    copy of the grid (so it reads nothing back; a test holds the two equal)."""
    parts = []
    for t, h, w in grid_host:
        rows = torch.arange(h, device=device)[:, None].expand(h, w)
        cols = torch.arange(w, device=device)[None, :].expand(h, w)
        block = (h // merge, merge, w // merge, merge)
        rows = rows.reshape(block).transpose(1, 2).flatten()
        cols = cols.reshape(block).transpose(1, 2).flatten()
        parts.append(torch.stack([rows, cols], dim=-1).repeat(t, 1))
    return torch.cat(parts)


class QwenAdapter(BackboneAdapter):
    """Base of the Qwen2-VL, Qwen2.5-VL and Qwen3-VL adapters."""

    outer_class: ClassVar[type]
    inner_class: ClassVar[type]
    #: Whether the family's forward takes ``second_per_grid_ts`` (temporal mRoPE spacing of videos).
    timed_videos: ClassVar[bool] = False

    # ------------------------------------------------------------------ identity and structure
    def classes(self) -> tuple[type, ...]:
        return (self.outer_class, self.inner_class)

    def inner_model(self, model):
        if isinstance(model, self.outer_class):
            return model.model
        if isinstance(model, self.inner_class):
            return model
        return None

    def depths(self, config) -> tuple[int, int]:
        return config.vision_config.depth, config.text_config.num_hidden_layers

    def vision_tower(self, inner):
        return inner.visual

    def language_model(self, inner):
        return inner.language_model

    def vision_blocks(self, inner) -> Sequence[torch.nn.Module]:
        return inner.visual.blocks

    def vision_attention(self, block):
        return block.attn

    def placeholder_token_id(self, config, modality: str) -> int:
        return config.image_token_id if modality == "image" else config.video_token_id

    def reset(self, inner) -> None:
        inner.rope_deltas = None

    def vision_timing_modules(self, inner):
        return inner.visual.patch_embed, inner.visual.merger

    def size_multiple(self, config) -> int:
        return config.vision_config.patch_size * config.vision_config.spatial_merge_size

    # ------------------------------------------------------------------ encoder
    def visual_call(self, inner, modality: str, arguments: dict[str, Any]) -> VisualCall | None:
        pixels = arguments.get(_PIXELS[modality])
        if pixels is None:
            return None
        grid = arguments.get(_GRIDS[modality])
        if grid is None:
            raise ValueError(f"illava: {_PIXELS[modality]} were given without {_GRIDS[modality]}")
        unit = inner.config.vision_config.spatial_merge_size**2
        grid_host = grid.tolist()  # the one read of the grid (the library reads it too)
        items = [ItemLayout.contiguous([h * w // unit] * t) for t, h, w in grid_host]
        return VisualCall(modality, pixels, {"grid_thw": grid, "grid_host": grid_host}, items)

    def frames(self, call: VisualCall, unit: int) -> tuple[list[int], list[int], list[int]]:
        """(units per frame, item of each frame, frame index within its item) on the host."""
        units, item_of, index_in_item = [], [], []
        for item, (t, h, w) in enumerate(call.meta["grid_host"]):
            for frame in range(t):
                units.append(h * w // unit)
                item_of.append(item)
                index_in_item.append(frame)
        return units, item_of, index_in_item

    def run(self, call: VisualCall, hidden, cos, sin, order, unit, window=None) -> VisionRun:
        units, item_of, index_in_item = self.frames(call, unit)
        return VisionRun(
            hidden=hidden, unit=unit, segment_units=units, segment_item=item_of, segment_index_in_item=index_in_item,
            order=order, window=window, gathered={"cos": cos, "sin": sin},
        )  # fmt: skip

    @staticmethod
    def _block_kwargs(block, run: VisionRun, bounds) -> dict[str, Any]:
        kwargs = dict(cu_seqlens=bounds.cu, max_seqlen=bounds.longest,
                      position_embeddings=(run.gathered["cos"], run.gathered["sin"]))  # fmt: skip
        if takes_bounds(block.attn.config):
            kwargs["illava_bounds"] = bounds  # the packed kernel's host-known sizes, through the module's kwargs
        return kwargs

    def vision_block(self, inner, block, run: VisionRun, bounds):
        return block(run.hidden, **self._block_kwargs(block, run, bounds))

    def vision_attention_half(self, inner, block, run: VisionRun, bounds):
        return run.hidden + block.attn(block.norm1(run.hidden), **self._block_kwargs(block, run, bounds))

    def vision_ffn_half(self, inner, block, run: VisionRun):
        return run.hidden + block.mlp(block.norm2(run.hidden))

    def vision_project(self, inner, run: VisionRun):
        return inner.visual.merger(run.hidden), {}  # (U, C_out): one row per kept 2x2 group

    def vision_place(self, inner, call: VisualCall, run: VisionRun, features, extras) -> EncodedVisual:
        """Kept groups back in raster order, split per item (`order` is the global raster id)."""
        permutation = torch.argsort(run.order)
        order = run.order[permutation]
        sizes = [sum(layout.segment_sizes) for layout in call.items]
        kept_per_item = [0] * len(call.items)
        for units, item in zip(run.segment_units, run.segment_item, strict=True):
            kept_per_item[item] += units
        offsets = torch.tensor([0, *sizes[:-1]], device=order.device).cumsum(0)
        kept = [ids - offsets[i] for i, ids in enumerate(torch.split(order, kept_per_item))]
        return EncodedVisual(
            last_hidden_state=run.hidden,
            pooler_output=torch.split(features[permutation], kept_per_item),
            kept=kept,
            extras={name: list(torch.split(t[permutation], kept_per_item)) for name, t in extras.items()},
            items=call.items,
        )

    # ------------------------------------------------------------------ LLM
    def position_call(self, inner, arguments: dict[str, Any], embeds, cache):
        """The library's own 3-D position code on the unmerged prompt (None where it gives none)."""
        return inner.compute_3d_position_ids(
            input_ids=arguments.get("input_ids"), image_grid_thw=arguments.get("image_grid_thw"),
            video_grid_thw=arguments.get("video_grid_thw"), inputs_embeds=embeds,
            attention_mask=arguments.get("attention_mask"), cache=cache,
            mm_token_type_ids=arguments.get("mm_token_type_ids"),
            **({"second_per_grid_ts": arguments.get("second_per_grid_ts")} if self.timed_videos else {}),
        )  # fmt: skip

    def prefill_positions(self, inner, arguments: dict[str, Any], embeds, cache):
        """As the library: its 3-D positions when it can compute them, else the text model's own
        fallback (0..L-1 on all three rows, padding not skipped)."""
        position_ids = arguments.get("position_ids")
        if position_ids is None:
            position_ids = self.position_call(inner, arguments, embeds, cache)
        batch, length = embeds.shape[:2]
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            return (torch.arange(length, device=embeds.device) + past)[None, None].expand(3, batch, -1)
        if position_ids.dim() == 3 and position_ids.shape[0] == 4:
            return position_ids[1:]
        if position_ids.dim() == 2:
            return position_ids[None].expand(3, -1, -1)
        return position_ids

    def rotary(self, lm, hidden, positions):
        return lm.rotary_emb(hidden, positions)

    # ------------------------------------------------------------------ inputs
    def chat_turn(self, text: str) -> str:
        return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"

    def video_placeholder(self, tokenizer, grid: list[int], unit: int, fps: float, temporal_patch: int):
        """Ids and types of one video's placeholders: one run for the whole video (Qwen2/2.5-VL)."""
        return self._run_ids(tokenizer, VIDEO_PAD, VIDEO_TYPE, grid[0] * grid[1] * grid[2] // unit)

    def _run_ids(self, tokenizer, pad: str, kind: int, n: int) -> tuple[list[int], list[int]]:
        start, pad_id, end = tokenizer.convert_tokens_to_ids([VISION_START, pad, VISION_END])
        return [start] + [pad_id] * n + [end], [TEXT_TYPE] + [kind] * n + [TEXT_TYPE]

    def build_inputs(self, backbone, samples: list[Sample], *, chat: bool = True, video_fps: float = 2.0):
        """Everything ``forward``/``generate`` needs, left padded, with ``mm_token_type_ids``
        (without which transformers 5.x falls back to 1-D positions for vision tokens)."""
        tokenizer, processor = backbone.tokenizer, backbone.image_processor
        for sample in samples:
            sample.validate(reserved=RESERVED)
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; batched inputs need one")
        images = [image for sample in samples for image in sample.images]
        videos = [video for sample in samples for video in sample.videos]
        features = {**image_features(processor, images), **self._video_features(processor, videos, video_fps)}
        unit = processor.merge_size**2
        image_counts = iter((features["image_grid_thw"].prod(-1) // unit).tolist()) if images else iter(())
        video_grids = iter(features["video_grid_thw"].tolist()) if videos else iter(())
        ids, types = [], []
        for sample in samples:
            text = self.chat_turn(sample.text) if chat else sample.text
            row_ids, row_types = [], []
            for piece in split_markers(text):
                if piece == IMAGE_MARKER:
                    piece_ids, piece_types = self._run_ids(tokenizer, IMAGE_PAD, IMAGE_TYPE, next(image_counts))
                elif piece == VIDEO_MARKER:
                    piece_ids, piece_types = self.video_placeholder(
                        tokenizer, next(video_grids), unit, video_fps, processor.temporal_patch_size
                    )
                else:
                    piece_ids = tokenizer.encode(piece, add_special_tokens=False)
                    piece_types = [TEXT_TYPE] * len(piece_ids)
                row_ids += piece_ids
                row_types += piece_types
            ids.append(row_ids)
            types.append(row_types)
        text_features = {
            "input_ids": left_pad(ids, tokenizer.pad_token_id),  # (B, L)
            "attention_mask": left_pad([[1] * len(row) for row in ids], 0),  # (B, L)
            "mm_token_type_ids": left_pad(types, TEXT_TYPE),  # (B, L)
        }
        return BatchFeature({**text_features, **features})

    # ------------------------------------------------------------------ downsampled inputs
    def downsample_size(self, config, image_processor, size, schedule, *, alone: bool = True):
        """The grid rule of `illava.methods.downsample` on the processor's full-resolution grid (its own
        ``smart_resize`` with its pixel bounds), in LLM tokens of ``patch * merge`` pixels, and then the
        processor's bounds: the target is at least the tokens its ``min_pixels`` allows, and a grid that
        rounding still puts below them comes back as the size the processor enlarges it to, so the size
        returned is one the processor keeps. An image and a video frame alike (`alone` does not matter)."""
        width, height = size
        factor = image_processor.patch_size * image_processor.merge_size
        bounds = image_processor.size

        def processed(height: int, width: int) -> tuple[int, int]:
            return smart_resize(
                height, width, factor=factor, min_pixels=bounds.shortest_edge, max_pixels=bounds.longest_edge
            )

        full_h, full_w = processed(height, width)
        rows, cols = full_h // factor, full_w // factor
        least = math.ceil(bounds.shortest_edge / factor**2)  # the processor's floor, in tokens
        new_rows, new_cols = downsample_grid(rows, cols, max(target_tokens(schedule, [rows * cols]), least))
        new_h, new_w = processed(new_rows * factor, new_cols * factor)
        return size if (new_h, new_w) == (full_h, full_w) else (new_w, new_h)

    def downsample_grids(self, config, schedule, grids):
        """``(t, h, w)`` patch grids (or `Segment`s, one frame each) with each frame's grid downsampled
        by the same rule, in units of ``spatial_merge_size`` patches."""
        merge = config.vision_config.spatial_merge_size
        downsampled = []
        for grid in grids:
            t, h, w = (1, grid.grid_h, grid.grid_w) if isinstance(grid, Segment) else (int(v) for v in grid)
            rows, cols = downsample_grid(h // merge, w // merge, target_tokens(schedule, [h * w // merge**2]))
            downsampled.append((t, rows * merge, cols * merge))
        return downsampled

    def _video_features(self, processor, videos, fps: float) -> dict[str, torch.Tensor]:
        features = video_features(processor, videos, fps)
        if not self.timed_videos:
            features.pop("second_per_grid_ts", None)
        return features

    def cost_modules(self, model):
        from ..flops import CostModules

        inner = self.inner_model(model)
        visual, layer = inner.visual, inner.language_model.layers[0]
        block = visual.blocks[0]
        return CostModules(
            patch_embed=visual.patch_embed.proj, vision_attention=block.attn, vision_ffn=block.mlp,
            vision_width=block.attn.qkv.out_features // 3, merger=visual.merger, decoder_layer=layer,
            q_width=layer.self_attn.q_proj.out_features, lm_head=model.lm_head, taps=self.cost_taps(visual),
        )  # fmt: skip

    def flop_inputs(self, config, inputs) -> tuple[list, int]:
        grids = [row for key in _GRIDS.values() if inputs.get(key) is not None for row in inputs[key].tolist()]
        return grids, self.text_tokens(config, inputs)

    def cost_taps(self, visual) -> dict[int, torch.nn.Module]:
        return {}

    def builtin_image_processor(self, spec):
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        size = spec.patch_size * 2
        # min 2x2 LLM tokens; max 1280 of them (the Qwen2-VL defaults, in this patch size)
        return Qwen2VLImageProcessorPil(
            patch_size=spec.patch_size, merge_size=2, temporal_patch_size=2,
            min_pixels=(2 * size) ** 2, max_pixels=size * size * 1280,
        )  # fmt: skip


# ----------------------------------------------------------------------------------- pixels
def _normalised_frame(processor, frame) -> np.ndarray:
    """One frame through the image processor's own steps, so a still video matches the still image exactly."""
    array = processor.process_image(frame, do_convert_rgb=processor.do_convert_rgb)
    if processor.do_resize:
        array = processor.resize(
            array, size=processor.size, resample=processor.resample, factor=processor.patch_size * processor.merge_size
        )
    if processor.do_rescale:
        array = processor.rescale(array, processor.rescale_factor)
    if processor.do_normalize:
        array = processor.normalize(array, processor.image_mean, processor.image_std)
    return np.asarray(array, dtype=np.float32)  # (C, H, W)


def patchify_frames(frames: np.ndarray, patch_size: int, merge_size: int, temporal_patch_size: int) -> np.ndarray:
    """Flatten frames into patch rows in the order the Qwen processors and vision towers expect.

    Rows run over (t, h/m, w/m, m, m) so that each 2x2 merge group is 4 consecutive rows; each row is
    (C, temporal, p, p), which the tower's Conv3d patch embedding views back into a block.
    """
    n_frames, channels, height, width = frames.shape  # (T, C, H, W)
    if pad := -n_frames % temporal_patch_size:
        frames = np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)], axis=0)
    grid_t = frames.shape[0] // temporal_patch_size
    grid_h, grid_w = height // patch_size, width // patch_size
    m, p = merge_size, patch_size
    blocks = frames.reshape(grid_t, temporal_patch_size, channels, grid_h // m, m, p, grid_w // m, m, p)
    blocks = blocks.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)  # (t, h/m, w/m, m, m, C, tps, p, p)
    return blocks.reshape(grid_t * grid_h * grid_w, channels * temporal_patch_size * p * p)


def video_pixel_values(processor, frames) -> tuple[torch.Tensor, list[int]]:
    """Patch rows and (t, h, w) grid of one video, every frame resized like a still image of that size.

    transformers' own video processors have larger default pixel bounds; here videos follow the
    image processor's bounds so one set of sizes governs a workload.
    """
    sizes = {frame.size for frame in frames}
    if len(sizes) != 1:
        raise ValueError(f"all frames of a video must have the same size, got {sorted(sizes)}")
    stacked = np.stack([_normalised_frame(processor, frame) for frame in frames])  # (T, C, H, W)
    rows = patchify_frames(stacked, processor.patch_size, processor.merge_size, processor.temporal_patch_size)
    grid = [
        math.ceil(len(frames) / processor.temporal_patch_size),
        stacked.shape[2] // processor.patch_size,
        stacked.shape[3] // processor.patch_size,
    ]
    return torch.from_numpy(np.ascontiguousarray(rows)), grid


def image_features(processor, images) -> dict[str, torch.Tensor]:
    if not images:
        return {}
    out = processor(images=images, return_tensors="pt")
    return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"].long()}


def video_features(processor, videos, fps: float) -> dict[str, torch.Tensor]:
    """`second_per_grid_ts` is the time one temporal patch spans: temporal_patch_size / fps."""
    if not videos:
        return {}
    if fps <= 0:
        raise ValueError(f"video_fps must be positive, got {fps}")
    rows, grids = zip(*(video_pixel_values(processor, video) for video in videos), strict=True)
    return {
        "pixel_values_videos": torch.cat(rows, dim=0),
        "video_grid_thw": torch.tensor(grids, dtype=torch.long),
        "second_per_grid_ts": torch.full((len(videos),), processor.temporal_patch_size / fps, dtype=torch.float32),
    }
