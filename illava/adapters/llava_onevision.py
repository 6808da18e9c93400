"""LLaVA-OneVision: a SigLIP encoder (full attention per tile, no merger, learned positions), anyres
tiles packed with ``image_newline`` tokens, a projector, and a Qwen2 LLM with 1-D RoPE.

How the family maps onto the engine, and the decisions where iLLaVA says nothing about it:

* **Units and segments.** A unit is one SigLIP token (nothing fuses tokens). Each tile -- the base
  tile (the whole image, resized) and every grid tile of an anyres image -- is a segment, in the
  encoder and in the LLM, like a video frame in the Qwen families: importance and budgets never cross
  a tile. A multi-image prompt's images are one tile each (the library patches only single images).
* **Unpadding.** The library crops the padding an anyres image was letterboxed with after the
  encoder. A grid tile's plan counts only its tokens that survive that crop; the cropped ones are
  dropped just before the first encoder merge (they would be dropped anyway), so what reaches the
  LLM is exactly what the plan says. With no encoder merge they stay until the library's crop.
* **Newlines.** The ``image_newline`` token the library appends to every row of the packed grid
  (and once after a single tile) is structural, not image content: it is never merged, never
  counted by a plan, always kept, and keeps its position. A row whose tokens were all merged away
  still ends with its newline, so the LLM keeps seeing the grid's row structure.
* **Refused, with the reason:** merges before the LLM (in the encoder, or between it and the LLM)
  on an image whose packed grid the library resamples (more than ``anyres_max_N`` tiles' worth after
  unpadding) or one with a grid tile that is all padding -- its tiles no longer map to LLM tokens;
  and on videos, which the library pools 2x2 after the encoder. LLM merges work on all of them
  (such an image's grid is then one segment; a video frame is one).
* ``vision_feature_select_strategy`` must be ``"full"`` (what LLaVA-OneVision checkpoints use);
  ``vision_feature_layer`` may be an index or a list (taps merged like the hidden states).

Built-in: ``tiny-llava-onevision`` (112-pixel tiles of 8x8 SigLIP tokens, anyres up to 2x2 tiles).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import BatchFeature, LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, LlavaOnevisionModel
from transformers.models.llava_onevision.modeling_llava_onevision import (
    get_anyres_image_grid_shape,
    image_size_to_num_patches,
)

from ..engine.vision import EncodedVisual, ItemLayout, VisionRun, VisualCall
from ..inputs import IMAGE_MARKER, VIDEO_MARKER, Sample, left_pad, split_markers
from ..methods.downsample import target_tokens
from . import register_adapter
from ._llava_costs import llava_flops
from .base import BackboneAdapter

TAPS = "features"


@dataclass(frozen=True)
class ImageGrid:
    """Where every token of an image's tiles goes in its packed placeholder run (host)."""

    tiles: int
    layout: ItemLayout
    placement: tuple[int, ...]  # per tile token, tiles in order: packed index, or -1 (cropped by unpadding)
    newlines: tuple[int, ...]  # packed indices of the structural newlines
    tiled_segments: bool  # tiles are the LLM segments (False: the library resamples the grid)


def unpadded_grid(config, image_size: Sequence[int]) -> tuple[int, int, range, range, float]:
    """An anyres image of (height, width) `image_size`: its rows and columns of tiles, the rows and
    columns of its packed token grid that the library's ``unpad_image`` keeps (on shapes only), and
    the ratio above 1.1 of which the library resamples that grid (``anyres_max_N``)."""
    side = config.vision_config.image_size // config.vision_config.patch_size
    height, width = (int(v) for v in image_size)
    rows_of_tiles, cols_of_tiles = get_anyres_image_grid_shape(
        [height, width], config.image_grid_pinpoints, config.vision_config.image_size
    )
    grid_h, grid_w = rows_of_tiles * side, cols_of_tiles * side
    rows, cols = range(grid_h), range(grid_w)
    if width / height > grid_w / grid_h:  # the library's unpad_image, on shapes only
        pad = (grid_h - int(round(height * (grid_w / width), 7))) // 2
        rows = range(pad, grid_h - pad)
    else:
        pad = (grid_w - int(round(width * (grid_h / height), 7))) // 2
        cols = range(pad, grid_w - pad)
    max_tiles = int(config.vision_aspect_ratio.removeprefix("anyres_max_"))  # the library strips these characters
    ratio = math.sqrt(len(rows) * len(cols) / (max_tiles * side * side))
    return rows_of_tiles, cols_of_tiles, rows, cols, ratio


def image_segment_sizes(config, image_size: Sequence[int], patching: bool) -> tuple[int, ...]:
    """``image_grid(config, image_size, patching).layout.segment_sizes`` -- the base tile, then each
    grid tile's tokens after unpadding, or the whole resampled grid -- without laying out every token
    (what a downsample target and its search are computed from)."""
    side = config.vision_config.image_size // config.vision_config.patch_size
    if not patching:
        return (side * side,)
    rows_of_tiles, cols_of_tiles, rows, cols, ratio = unpadded_grid(config, image_size)
    sizes = []
    for tile in range(rows_of_tiles * cols_of_tiles):
        top, left = (tile // cols_of_tiles) * side, (tile % cols_of_tiles) * side
        kept_rows = range(max(top, rows.start), min(top + side, rows.stop))
        kept_cols = range(max(left, cols.start), min(left + side, cols.stop))
        sizes.append(len(kept_rows) * len(kept_cols))
    if ratio > 1.1:
        return (side * side, int(len(rows) // ratio) * int(len(cols) // ratio))
    return (side * side, *sizes) if all(sizes) else (side * side, len(rows) * len(cols))


def image_grid(config, image_size: Sequence[int], patching: bool) -> ImageGrid:
    """The packed layout of one image of (height, width) `image_size`, exactly as the library's
    ``pack_image_features`` lays it out (base tile, unpadded grid rows each ending in a newline)."""
    side = config.vision_config.image_size // config.vision_config.patch_size
    n = side * side
    if not patching:
        layout = ItemLayout(n + 1, (*([0] * n), -1), (n,))
        return ImageGrid(1, layout, tuple(range(n)), (n,), True)
    rows_of_tiles, cols_of_tiles, rows, cols, ratio = unpadded_grid(config, image_size)
    tiles = 1 + rows_of_tiles * cols_of_tiles
    placement = list(range(n))
    tile_sizes = [0] * (tiles - 1)
    for tile in range(tiles - 1):
        top, left = (tile // cols_of_tiles) * side, (tile % cols_of_tiles) * side
        for r in range(side):
            for c in range(side):
                row, col = top + r, left + c
                if row in rows and col in cols:
                    placement.append(n + (row - rows.start) * (len(cols) + 1) + (col - cols.start))
                    tile_sizes[tile] += 1
                else:
                    placement.append(-1)
    if ratio > 1.1 or not all(tile_sizes):  # resampled, or a tile all padding: the grid is one segment
        out_rows, out_cols = (
            (int(len(rows) // ratio), int(len(cols) // ratio)) if ratio > 1.1 else (len(rows), len(cols))
        )
        newlines = tuple(n + r * (out_cols + 1) + out_cols for r in range(out_rows))
        segment_of = [0] * n + [*([1] * out_cols), -1] * out_rows
        layout = ItemLayout(len(segment_of), tuple(segment_of), (n, out_rows * out_cols))
        return ImageGrid(tiles, layout, tuple(placement), newlines, False)
    newlines = tuple(n + r * (len(cols) + 1) + len(cols) for r in range(len(rows)))
    segment_of = [-1] * (n + len(rows) * (len(cols) + 1))
    for index, packed in enumerate(placement):
        if packed >= 0:
            segment_of[packed] = index // n  # tile 0 is the base tile
    layout = ItemLayout(len(segment_of), tuple(segment_of), (n, *tile_sizes))
    return ImageGrid(tiles, layout, tuple(placement), newlines, True)


@dataclass(frozen=True)
class LlavaOnevisionSpec:
    vision_layers: int
    vision_hidden: int
    vision_intermediate: int
    vision_heads: int
    tile: int  # pixels per tile side
    text_layers: int
    text_hidden: int
    text_intermediate: int
    text_heads: int
    text_kv_heads: int
    description: str
    patch_size: int = 14


TINY = LlavaOnevisionSpec(
    vision_layers=4, vision_hidden=64, vision_intermediate=128, vision_heads=4, tile=112, text_layers=4,
    text_hidden=128, text_intermediate=256, text_heads=4, text_kv_heads=2, description="unit-test size, a few M parameters",
)  # fmt: skip


class LlavaOnevisionAdapter(BackboneAdapter):
    family = "llava_onevision"
    model_types = ("llava_onevision",)
    position_rows = 1
    extra_special_tokens = ("<image>", "<video>")
    encoder_merges_video = False
    packed_sequence = False  # SigLIP runs tiles as a padded batch

    # ------------------------------------------------------------------ identity and structure
    def classes(self) -> tuple[type, ...]:
        return (LlavaOnevisionForConditionalGeneration, LlavaOnevisionModel)

    def inner_model(self, model):
        if isinstance(model, LlavaOnevisionForConditionalGeneration):
            return model.model
        if isinstance(model, LlavaOnevisionModel):
            return model
        return None

    @staticmethod
    def feature_layers(config, requested=None) -> list[int]:
        """Indices into the tower's hidden states (0: embeddings, i: after layer i-1) of the feature layer(s)."""
        layers = config.vision_feature_layer if requested is None else requested
        layers = [layers] if isinstance(layers, int) else list(layers)
        count = config.vision_config.num_hidden_layers + 1
        return [layer % count for layer in layers]

    def depths(self, config) -> tuple[int, int]:
        return max(self.feature_layers(config)), config.text_config.num_hidden_layers

    def vision_tower(self, inner):
        return inner.vision_tower

    def language_model(self, inner):
        return inner.language_model

    def vision_blocks(self, inner) -> Sequence[torch.nn.Module]:
        return inner.vision_tower.encoder.layers[: self.depths(inner.config)[0]]

    def vision_attention(self, block):
        return block.self_attn

    def placeholder_token_id(self, config, modality: str) -> int:
        return config.image_token_id if modality == "image" else config.video_token_id

    def vision_timing_modules(self, inner):
        return inner.vision_tower.embeddings, inner.multi_modal_projector

    def size_multiple(self, config) -> int:
        return 1  # every image is resized into tiles

    # ------------------------------------------------------------------ encoder
    def visual_call(self, inner, modality: str, arguments: dict[str, Any]) -> VisualCall | None:
        config = inner.config
        pixels = arguments.get("pixel_values_videos" if modality == "video" else "pixel_values")
        if pixels is None:
            return None
        strategy = arguments.get("vision_feature_select_strategy") or config.vision_feature_select_strategy
        if strategy != "full":
            raise NotImplementedError(f"illava: vision_feature_select_strategy {strategy!r}: only 'full' is supported")
        layers = self.feature_layers(config, arguments.get("vision_feature_layer"))
        if max(layers) != self.depths(config)[0]:
            raise NotImplementedError("illava: a vision_feature_layer other than the config's is not supported")
        if modality == "video":
            side = config.vision_config.image_size // config.vision_config.patch_size
            pooled = math.ceil(side / 2) ** 2
            frames = pixels.shape[1]
            items = [
                ItemLayout(
                    frames * pooled + 1, (*(f for f in range(frames) for _ in range(pooled)), -1), (pooled,) * frames
                )
                for _ in range(pixels.shape[0])
            ]
            return VisualCall("video", pixels.flatten(0, 1), {"layers": layers, "frames": frames}, items)
        sizes = arguments.get("image_sizes")
        if sizes is None:
            raise ValueError("illava: pixel_values were given without image_sizes")
        counts = arguments.get("batch_num_images")
        sizes = sizes.tolist()
        patching = [True] * len(sizes) if counts is None else [n == 1 for n in counts.tolist() for _ in range(n)]
        grids = [image_grid(config, size, patch) for size, patch in zip(sizes, patching, strict=True)]
        if pixels.dim() == 5:  # (images, tiles padded to the most, C, H, W): each image's own tiles
            pixels = torch.cat([tiles[: grid.tiles] for tiles, grid in zip(pixels, grids, strict=True)])
        if any(
            grid.tiles != image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size)
            for grid, size, patch in zip(grids, sizes, patching, strict=True)
            if patch
        ):
            raise RuntimeError("illava: the anyres tile count differs from the library's")
        meta = {"layers": layers, "grids": grids, "image_sizes": sizes}
        return VisualCall("image", pixels, meta, [grid.layout for grid in grids])

    def vision_prepare(self, inner, call: VisualCall) -> VisionRun:
        tower = inner.vision_tower
        embedded = tower.embeddings(call.pixel_values.to(tower.dtype))  # (tiles, n, C)
        tiles, n, _ = embedded.shape
        device = embedded.device
        run = VisionRun(
            hidden=embedded.reshape(tiles * n, -1), unit=1, segment_units=[n] * tiles, segment_item=[],
            segment_index_in_item=[], order=torch.empty(0), taps={TAPS: []},
        )  # fmt: skip
        run.context["layers"] = call.meta["layers"]
        if 0 in call.meta["layers"]:
            run.taps[TAPS].append(run.hidden)
        if call.modality == "video":
            frames = call.meta["frames"]
            run.segment_item = [t // frames for t in range(tiles)]
            run.segment_index_in_item = [t % frames for t in range(tiles)]
            run.order = torch.arange(tiles * n, device=device)
            run.no_encoder_merge = (
                "LLaVA-OneVision pools each video frame 2x2 after its encoder, so its frames cannot merge "
                "before the LLM; merge videos in the LLM only (encoder_share=0)"
            )
            return run
        placement, dropped, drop_counts, offset = [], [], [], 0
        for item, (grid, layout) in enumerate(zip(call.meta["grids"], call.items, strict=True)):
            run.segment_item += [item] * grid.tiles
            run.segment_index_in_item += list(range(grid.tiles))
            base = len(placement)
            placement += [offset + p if p >= 0 else -1 for p in grid.placement]
            dropped += [base + i for i, p in enumerate(grid.placement) if p < 0]
            drop_counts += [sum(p < 0 for p in grid.placement[t * n : (t + 1) * n]) for t in range(grid.tiles)]
            offset += layout.placeholders
            if not grid.tiled_segments and run.no_encoder_merge is None:
                height, width = call.meta["image_sizes"][item]
                run.no_encoder_merge = (
                    f"LLaVA-OneVision resamples the tile grid of a {width}x{height} image (more than "
                    f"{inner.config.vision_aspect_ratio}'s tiles after unpadding, or a tile all padding), so its "
                    "tiles do not map to LLM tokens; merge it in the LLM only (encoder_share=0)"
                )
        run.order = torch.tensor(placement, device=device)
        if dropped:
            kept = sorted(set(range(len(placement))) - set(dropped))
            run.drop_before_merge = torch.tensor(kept, device=device)
            run.drop_counts = drop_counts
        return run

    def _tile_batch(self, run: VisionRun, hidden: torch.Tensor):
        """Tiles as a batch (T, L, C) for SigLIP's layers, the key-padding mask its kernel needs (None
        when all tiles are as long), and the flat positions that give the packed sequence back. The
        index tensors are made once per tile layout (they change only at a merge)."""
        lengths = run.segment_units
        longest = max(lengths)
        if all(length == longest for length in lengths):
            return hidden.view(len(lengths), longest, -1), None, None
        key = tuple(lengths)
        cached = run.context.get("tiles")
        if cached is None or cached[0] != key:
            starts = np.cumsum([0, *lengths[:-1]])
            index = [start + min(i, length - 1) for start, length in zip(starts, lengths) for i in range(longest)]
            back = [t * longest + i for t, length in enumerate(lengths) for i in range(length)]
            valid = [[i < length for i in range(longest)] for length in lengths]
            device = hidden.device
            tensors = (torch.tensor(index), torch.tensor(valid), torch.tensor(back))
            run.context["tiles"] = cached = (key, tuple(t.to(device, non_blocking=True) for t in tensors), {})
        _, (index, valid, back), _ = cached
        return hidden[index].view(len(lengths), longest, -1), valid, back

    def _mask_for(self, run: VisionRun, valid, implementation: str, dtype):
        if valid is None:
            return None
        masks = run.context["tiles"][2]
        if (implementation, dtype) not in masks:
            masks[(implementation, dtype)] = self._mask(valid, implementation, dtype)
        return masks[(implementation, dtype)]

    @staticmethod
    def _mask(valid: torch.Tensor | None, implementation: str, dtype: torch.dtype):
        """Key padding for bidirectional attention within each tile."""
        if valid is None:
            return None
        if implementation.startswith("flash"):
            return valid.to(torch.int32)  # (T, L): the flash path unpads
        allowed = valid[:, None, None, :].expand(-1, 1, valid.shape[1], -1)  # (T, 1, L, L)
        if implementation == "sdpa":
            return allowed
        return torch.zeros(allowed.shape, dtype=dtype, device=valid.device).masked_fill_(
            ~allowed, torch.finfo(dtype).min
        )

    def _attend(self, block, run: VisionRun):
        """The residual stream after block's attention, packed (N, C)."""
        batch, valid, back = self._tile_batch(run, run.hidden)
        implementation = block.self_attn.config._attn_implementation or "eager"
        attended, _ = block.self_attn(
            block.layer_norm1(batch), attention_mask=self._mask(valid, implementation, batch.dtype)
        )
        attended = attended.reshape(-1, attended.shape[-1])
        return run.hidden + (attended if back is None else attended[back])

    def vision_block(self, inner, block, run: VisionRun, bounds):
        batch, valid, back = self._tile_batch(run, run.hidden)
        if valid is None:  # the library's own layer on the tile batch, as unmerged
            return block(batch, None).reshape(run.hidden.shape)
        hidden = self._attend(block, run)
        return hidden + block.mlp(block.layer_norm2(hidden))

    def vision_attention_half(self, inner, block, run: VisionRun, bounds):
        return self._attend(block, run)

    def vision_ffn_half(self, inner, block, run: VisionRun):
        return run.hidden + block.mlp(block.layer_norm2(run.hidden))

    def vision_queries_keys(self, captured, run: VisionRun):
        """Un-pad the tile batch's (T, H, L, D) queries and keys into the packed (H, N, D)."""
        _, valid, back = self._tile_batch(run, run.hidden)
        query, key = captured.query, captured.key
        packed = []
        for t in (query, key):
            flat = t.transpose(0, 1).reshape(t.shape[1], -1, t.shape[-1])  # (H, T*L, D)
            packed.append(flat if back is None else flat[:, back])
        return packed[0], packed[1]

    def after_vision_block(self, inner, index: int, run: VisionRun) -> None:
        if index + 1 in run.context["layers"]:
            run.taps[TAPS].append(run.hidden)

    def vision_project(self, inner, run: VisionRun):
        taps = run.taps.pop(TAPS)
        features = taps[0] if len(taps) == 1 else torch.cat(taps, dim=-1)
        return inner.multi_modal_projector(features), {}

    def vision_place(self, inner, call: VisualCall, run: VisionRun, features, extras) -> EncodedVisual:
        newline = inner.image_newline
        if call.modality == "video":
            frames = call.meta["frames"]
            side = inner.config.vision_config.image_size // inner.config.vision_config.patch_size
            pooled = inner.apply_pooling(features.view(-1, side * side, features.shape[-1]))
            pooled = pooled.reshape(len(call.items), frames * pooled.shape[1], -1)
            tail = newline[None, None, :].expand(len(call.items), 1, -1).to(pooled.dtype)
            videos = torch.cat([pooled, tail], dim=1)
            kept = [torch.arange(layout.placeholders, device=videos.device) for layout in call.items]
            return EncodedVisual(last_hidden_state=run.hidden, pooler_output=tuple(videos), kept=kept, items=call.items)
        kept_per_item = [0] * len(call.items)
        for units, item in zip(run.segment_units, run.segment_item, strict=True):
            kept_per_item[item] += units
        outputs, kept, offset = [], [], 0
        for item, (grid, layout, item_features, item_order) in enumerate(
            zip(call.meta["grids"], call.items, torch.split(features, kept_per_item), torch.split(run.order, kept_per_item), strict=True)
        ):  # fmt: skip
            if not grid.tiled_segments:  # nothing merged before the LLM: the library packs it (it resamples)
                n = item_features.shape[0] // grid.tiles
                packed, _ = inner.pack_image_features(
                    [item_features.view(grid.tiles, n, -1)], torch.tensor([call.meta["image_sizes"][item]]),
                    image_newline=newline, vision_aspect_ratio=inner.config.vision_aspect_ratio,
                )  # fmt: skip
                outputs.append(packed[0])
                kept.append(torch.arange(layout.placeholders, device=features.device))
            else:
                local = item_order - offset  # placement of the surviving tokens (cropped ones: negative)
                if run.drop_before_merge is not None:  # not merged, so not dropped yet: crop as the library does
                    keep = torch.tensor([i for i, p in enumerate(grid.placement) if p >= 0], device=features.device)
                    item_features, local = item_features[keep], local[keep]
                lines = torch.tensor(grid.newlines, device=features.device)
                everything = torch.cat([local, lines])
                permutation = torch.argsort(everything)
                rows = torch.cat([item_features, newline[None].expand(len(grid.newlines), -1).to(item_features.dtype)])
                outputs.append(rows[permutation])
                kept.append(everything[permutation])
            offset += layout.placeholders
        return EncodedVisual(last_hidden_state=run.hidden, pooler_output=tuple(outputs), kept=kept, items=call.items)

    # ------------------------------------------------------------------ LLM
    def prefill_positions(self, inner, arguments: dict[str, Any], embeds, cache):
        """As the library's Qwen2 LLM: the given 1-D positions, else 0..L-1 after the cache."""
        position_ids = arguments.get("position_ids")
        batch, length = embeds.shape[:2]
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            return (torch.arange(length, device=embeds.device) + past)[None, None].expand(1, batch, -1)
        return position_ids.expand(batch, -1)[None] if position_ids.dim() == 2 else position_ids

    def rotary(self, lm, hidden, positions):
        return lm.rotary_emb(hidden, positions[0])

    # ------------------------------------------------------------------ inputs
    def chat_turn(self, text: str) -> str:
        return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"

    def build_inputs(self, backbone, samples: list[Sample], *, chat: bool = True, video_fps: float = 2.0):
        """Anyres tiles through the PIL image processor; a sample with several images gets one tile per
        image (as the library patches only single images); video frames go through the same processor
        as one multi-image sample each (padded to square, one tile per frame). `video_fps` is unused:
        the family's positions are 1-D."""
        tokenizer, processor, config = backbone.tokenizer, backbone.image_processor, backbone.config
        for sample in samples:
            sample.validate()
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; batched inputs need one")
        features: dict[str, torch.Tensor] = {}
        image_counts = iter(())
        with_images = [sample.images for sample in samples if sample.images]
        if with_images:
            out = processor(images=with_images, return_tensors="pt")
            counts = torch.tensor([len(sample.images) for sample in samples])
            sizes = out["image_sizes"].tolist()
            patching = [n == 1 for n in counts.tolist() for _ in range(n)]
            features.update(pixel_values=out["pixel_values"], image_sizes=out["image_sizes"], batch_num_images=counts)
            image_counts = iter(
                image_grid(config, s, p).layout.placeholders for s, p in zip(sizes, patching, strict=True)
            )
        videos = [video for sample in samples for video in sample.videos]
        video_counts = iter(())
        if videos:
            if len({len(video) for video in videos}) != 1:
                raise ValueError("LLaVA-OneVision batches videos as one tensor: every video needs the same frame count")
            pixel_videos = [
                processor(images=[list(video)], return_tensors="pt")["pixel_values"][:, 0] for video in videos
            ]
            features["pixel_values_videos"] = torch.stack(pixel_videos)  # (videos, frames, C, H, W)
            side = config.vision_config.image_size // config.vision_config.patch_size
            video_counts = iter([len(videos[0]) * math.ceil(side / 2) ** 2 + 1] * len(videos))
        image_id, video_id = config.image_token_id, config.video_token_id
        ids = []
        for sample in samples:
            row = []
            for piece in split_markers(self.chat_turn(sample.text) if chat else sample.text):
                if piece == IMAGE_MARKER:
                    row += [image_id] * next(image_counts)
                elif piece == VIDEO_MARKER:
                    row += [video_id] * next(video_counts)
                else:
                    row += tokenizer.encode(piece, add_special_tokens=False)
            ids.append(row)
        text = {
            "input_ids": left_pad(ids, tokenizer.pad_token_id),
            "attention_mask": left_pad([[1] * len(row) for row in ids], 0),
        }
        return BatchFeature({**text, **features})

    # ------------------------------------------------------------------ downsampled inputs
    def downsample_size(self, config, image_processor, size, schedule, *, alone: bool = True):
        """An image alone in its prompt is tiled by its size, so the resolution picks its anyres layout:
        of the image as it is and scaled to fit each pinpoint (the largest size of each layout), the
        largest whose token count (base tile and unpadded grid, newlines not counted) is nearest the
        target. Any other image, and a video frame, is one fixed tile: unchanged."""
        if not alone:
            return size
        width, height = size
        target = target_tokens(schedule, image_segment_sizes(config, (height, width), True))

        def fitted(scale: float) -> tuple[int, int]:
            return max(1, math.floor(width * scale + 1e-9)), max(1, math.floor(height * scale + 1e-9))

        def tokens(scale: float) -> int:
            fitted_width, fitted_height = fitted(scale)
            return sum(image_segment_sizes(config, (fitted_height, fitted_width), True))

        fits = {min(w / width, h / height) for h, w in config.image_grid_pinpoints}
        scales = sorted({1.0} | {scale for scale in fits if scale < 1}, reverse=True)
        best = min(scales, key=lambda scale: abs(tokens(scale) - target))  # the first, largest, of equals
        return size if best == 1.0 else fitted(best)

    def downsample_sample(self, config, image_processor, sample: Sample, schedule) -> Sample:
        """Only the image of a single-image prompt changes (the others, and video frames, are one tile)."""
        if len(sample.images) != 1:
            return sample
        return super().downsample_sample(config, image_processor, sample, schedule)

    def downsample_grids(self, config, schedule, grids):
        downsampled = []
        for grid in grids:
            if grid[0] == "image" and grid[2]:  # ("image", (height, width), patched)
                width, height = self.downsample_size(config, None, (grid[1][1], grid[1][0]), schedule)
                grid = ("image", (height, width), True)
            downsampled.append(grid)
        return downsampled

    # ------------------------------------------------------------------ cost
    def cost_modules(self, model):
        from ..flops import CostModules

        inner = self.inner_model(model)
        layer, block = inner.language_model.layers[0], inner.vision_tower.encoder.layers[0]
        return CostModules(
            patch_embed=inner.vision_tower.embeddings.patch_embedding, vision_attention=block.self_attn,
            vision_ffn=block.mlp, vision_width=block.self_attn.embed_dim, merger=inner.multi_modal_projector,
            decoder_layer=layer, q_width=layer.self_attn.q_proj.out_features, lm_head=model.lm_head, taps={},
        )  # fmt: skip

    def flops(self, config, schedule, grids, text_tokens):
        """`grids`: per image ``("image", (height, width), patched)``, per video ``("video", frames)``
        (what `flop_inputs` reads off a batch)."""
        return llava_flops(self, config, schedule, grids, text_tokens, image_grid=image_grid)

    def flop_inputs(self, config, inputs) -> tuple[list, int]:
        grids: list = []
        if inputs.get("image_sizes") is not None:
            counts = inputs.get("batch_num_images")
            sizes = inputs["image_sizes"].tolist()
            patching = [True] * len(sizes) if counts is None else [n == 1 for n in counts.tolist() for _ in range(n)]
            grids += [("image", tuple(size), patch) for size, patch in zip(sizes, patching, strict=True)]
        if inputs.get("pixel_values_videos") is not None:
            grids += [("video", inputs["pixel_values_videos"].shape[1])] * inputs["pixel_values_videos"].shape[0]
        return grids, self.text_tokens(config, inputs)

    # ------------------------------------------------------------------ built-ins
    def builtins(self) -> dict[str, LlavaOnevisionSpec]:
        return {"tiny-llava-onevision": TINY}

    def build_config(self, spec: LlavaOnevisionSpec, token_ids: dict[str, int], vocab_size: int):
        tile = spec.tile
        vision = dict(
            model_type="siglip_vision_model", hidden_size=spec.vision_hidden, intermediate_size=spec.vision_intermediate,
            num_hidden_layers=spec.vision_layers, num_attention_heads=spec.vision_heads, image_size=tile,
            patch_size=spec.patch_size, vision_use_head=False,
        )  # fmt: skip
        text = dict(
            model_type="qwen2", vocab_size=vocab_size, hidden_size=spec.text_hidden,
            intermediate_size=spec.text_intermediate, num_hidden_layers=spec.text_layers,
            num_attention_heads=spec.text_heads, num_key_value_heads=spec.text_kv_heads, rms_norm_eps=1e-6,
            max_position_embeddings=4096, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
            bos_token_id=token_ids["pad"], eos_token_id=token_ids["eos"], pad_token_id=token_ids["pad"],
        )  # fmt: skip
        return LlavaOnevisionConfig(
            vision_config=vision, text_config=text, image_token_index=token_ids["<image>"],
            video_token_index=token_ids["<video>"], image_grid_pinpoints=self._pinpoints(tile),
            vision_feature_layer=-1, vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
            tie_word_embeddings=False,
        )  # fmt: skip

    @staticmethod
    def _pinpoints(tile: int) -> list[list[int]]:
        return [[tile * h, tile * w] for h in (1, 2) for w in (1, 2)]

    def builtin_image_processor(self, spec: LlavaOnevisionSpec):
        from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
            LlavaOnevisionImageProcessorPil,
        )

        size = {"height": spec.tile, "width": spec.tile}
        return LlavaOnevisionImageProcessorPil(
            size=size, crop_size=size, image_grid_pinpoints=self._pinpoints(spec.tile)
        )


ADAPTER = register_adapter(LlavaOnevisionAdapter())
