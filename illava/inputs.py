"""Model inputs for Qwen2.5-VL without torchvision and without the Qwen processor class.

transformers' `Qwen2_5_VLProcessor` drags in the torchvision video processor, which the deployment
and test machines may not have. This module builds the same tensors from text with `<image>` and
`<video>` markers, PIL images and lists of PIL frames: images go through the PIL image processor,
video frames through the same resize/normalise steps and a patchify with the video processor's
flatten order, and the text gets the placeholder tokens, left padding and `mm_token_type_ids`
(without which transformers 5.x silently falls back to 1-D positions for vision tokens).
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageDraw
from transformers import BatchFeature, PreTrainedTokenizerBase
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

IMAGE_MARKER = "<image>"
VIDEO_MARKER = "<video>"
_MARKER_RE = re.compile(f"({re.escape(IMAGE_MARKER)}|{re.escape(VIDEO_MARKER)})")
_VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
TEXT_TYPE, IMAGE_TYPE, VIDEO_TYPE = 0, 1, 2


@dataclass
class Sample:
    """One prompt: `text` with `<image>`/`<video>` markers, and the visual inputs in order of appearance."""

    text: str
    images: list[Image.Image] = field(default_factory=list)
    videos: list[list[Image.Image]] = field(default_factory=list)

    def validate(self) -> None:
        """Markers and inputs must pair up one to one, or placeholder counts and features disagree."""
        n_image, n_video = self.text.count(IMAGE_MARKER), self.text.count(VIDEO_MARKER)
        if n_image != len(self.images) or n_video != len(self.videos):
            raise ValueError(
                f"sample text has {n_image} {IMAGE_MARKER} and {n_video} {VIDEO_MARKER} markers but "
                f"{len(self.images)} images and {len(self.videos)} videos were given; they must match"
            )
        leaked = [token for token in _VISION_TOKENS if token in self.text]
        if leaked:
            raise ValueError(f"sample text contains the reserved tokens {leaked}; use {IMAGE_MARKER} / {VIDEO_MARKER}")
        if any(len(video) == 0 for video in self.videos):
            raise ValueError("a video must have at least one frame")


# ---------------------------------------------------------------------------------------------
# Pixels
# ---------------------------------------------------------------------------------------------


def _normalised_frame(image_processor: Qwen2VLImageProcessorPil, frame: Image.Image) -> np.ndarray:
    """One frame through the image processor's own steps, so a still video matches the still image exactly."""
    ip = image_processor
    array = ip.process_image(frame, do_convert_rgb=ip.do_convert_rgb)
    if ip.do_resize:
        array = ip.resize(array, size=ip.size, resample=ip.resample, factor=ip.patch_size * ip.merge_size)
    if ip.do_rescale:
        array = ip.rescale(array, ip.rescale_factor)
    if ip.do_normalize:
        array = ip.normalize(array, ip.image_mean, ip.image_std)
    return np.asarray(array, dtype=np.float32)  # (C, H, W)


def patchify_frames(frames: np.ndarray, patch_size: int, merge_size: int, temporal_patch_size: int) -> np.ndarray:
    """Flatten frames into patch rows in the order the Qwen2-VL processors and the vision tower expect.

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


def video_pixel_values(
    image_processor: Qwen2VLImageProcessorPil, frames: Sequence[Image.Image]
) -> tuple[torch.Tensor, list[int]]:
    """Patch rows and (t, h, w) grid of one video, every frame resized like a still image of that size.

    transformers' own video processor has larger default pixel bounds (min 128*28*28); here videos
    follow the image processor's bounds so one set of sizes governs a workload.
    """
    sizes = {frame.size for frame in frames}
    if len(sizes) != 1:
        raise ValueError(f"all frames of a video must have the same size, got {sorted(sizes)}")
    stacked = np.stack([_normalised_frame(image_processor, frame) for frame in frames])  # (T, C, H, W)
    ip = image_processor
    rows = patchify_frames(stacked, ip.patch_size, ip.merge_size, ip.temporal_patch_size)
    grid = [
        math.ceil(len(frames) / ip.temporal_patch_size),
        stacked.shape[2] // ip.patch_size,
        stacked.shape[3] // ip.patch_size,
    ]
    return torch.from_numpy(np.ascontiguousarray(rows)), grid


def _image_features(image_processor: Qwen2VLImageProcessorPil, images: list[Image.Image]) -> dict[str, torch.Tensor]:
    if not images:
        return {}
    out = image_processor(images=images, return_tensors="pt")
    return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"].long()}


def _video_features(
    image_processor: Qwen2VLImageProcessorPil, videos: list[list[Image.Image]], fps: float
) -> dict[str, torch.Tensor]:
    """`second_per_grid_ts` is the time one temporal patch spans: temporal_patch_size / fps."""
    if not videos:
        return {}
    if fps <= 0:
        raise ValueError(f"video_fps must be positive, got {fps}")
    rows, grids = zip(*(video_pixel_values(image_processor, video) for video in videos), strict=True)
    seconds = image_processor.temporal_patch_size / fps
    return {
        "pixel_values_videos": torch.cat(rows, dim=0),
        "video_grid_thw": torch.tensor(grids, dtype=torch.long),
        "second_per_grid_ts": torch.full((len(videos),), seconds, dtype=torch.float32),
    }


# ---------------------------------------------------------------------------------------------
# Text and placeholders
# ---------------------------------------------------------------------------------------------


def chat_turn(text: str) -> str:
    """One user turn in Qwen's chat layout, ending where the assistant's answer starts (what
    `build_inputs(chat=True)` wraps each sample's text in; training code writes conversations with it)."""
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


def _token_counts(grids: torch.Tensor | None, merge_size: int) -> Iterator[int]:
    """LLM tokens per visual input: one per 2x2 group of patches (t*h*w / m^2)."""
    if grids is None:
        return iter(())
    return iter((grids.prod(-1) // merge_size**2).tolist())


def _sample_ids(
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    image_counts: Iterator[int],
    video_counts: Iterator[int],
) -> tuple[list[int], list[int]]:
    """Token ids and modality types of one sample; markers become start + N pads + end.

    Splitting at the markers gives the same ids as tokenising the expanded string, because the
    vision tokens are special tokens, which the tokenizer splits out before anything else.
    """
    ids: list[int] = []
    types: list[int] = []
    for piece in _MARKER_RE.split(text):
        if piece in (IMAGE_MARKER, VIDEO_MARKER):
            is_image = piece == IMAGE_MARKER
            n = next(image_counts) if is_image else next(video_counts)
            pad = "<|image_pad|>" if is_image else "<|video_pad|>"
            start, pad_id, end = tokenizer.convert_tokens_to_ids(["<|vision_start|>", pad, "<|vision_end|>"])
            ids += [start] + [pad_id] * n + [end]
            types += [TEXT_TYPE] + [IMAGE_TYPE if is_image else VIDEO_TYPE] * n + [TEXT_TYPE]
        elif piece:
            piece_ids = tokenizer.encode(piece, add_special_tokens=False)
            ids += piece_ids
            types += [TEXT_TYPE] * len(piece_ids)
    return ids, types


def _left_pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(row) for row in rows)
    return torch.tensor([[value] * (width - len(row)) + row for row in rows], dtype=torch.long)  # (B, L)


def build_inputs(
    tokenizer: PreTrainedTokenizerBase,
    image_processor: Qwen2VLImageProcessorPil,
    samples: list[Sample],
    *,
    chat: bool = True,
    video_fps: float = 2.0,
) -> BatchFeature:
    """Everything `Qwen2_5_VLForConditionalGeneration.forward`/`generate` needs, left padded.

    `video_fps` is the rate the given frames were sampled at; it sets the temporal mRoPE spacing.
    """
    if not samples:
        raise ValueError("build_inputs needs at least one sample")
    for sample in samples:
        sample.validate()
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; batched inputs need one")
    images = [image for sample in samples for image in sample.images]
    videos = [video for sample in samples for video in sample.videos]
    features = {**_image_features(image_processor, images), **_video_features(image_processor, videos, video_fps)}
    merge = image_processor.merge_size
    image_counts = _token_counts(features.get("image_grid_thw"), merge)
    video_counts = _token_counts(features.get("video_grid_thw"), merge)
    ids, types = [], []
    for sample in samples:
        text = chat_turn(sample.text) if chat else sample.text
        sample_ids, sample_types = _sample_ids(tokenizer, text, image_counts, video_counts)
        ids.append(sample_ids)
        types.append(sample_types)
    text_features = {
        "input_ids": _left_pad(ids, tokenizer.pad_token_id),  # (B, L)
        "attention_mask": _left_pad([[1] * len(row) for row in ids], 0),  # (B, L)
        "mm_token_type_ids": _left_pad(types, TEXT_TYPE),  # (B, L)
    }
    return BatchFeature({**text_features, **features})


# ---------------------------------------------------------------------------------------------
# Synthetic visual inputs
# ---------------------------------------------------------------------------------------------


def _size(size: int | tuple[int, int]) -> tuple[int, int]:
    width, height = (size, size) if isinstance(size, int) else size
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {size}")
    return width, height


@dataclass(frozen=True)
class _Shape:
    kind: str
    colour: tuple[int, int, int]
    centre: tuple[float, float]  # fractions of (width, height)
    radius: float  # fraction of min(width, height)
    velocity: tuple[float, float]  # fractions per frame


def _scene(seed: int) -> tuple[np.ndarray, list[_Shape]]:
    """Background gradient corners and a few shapes, from Python's seeded RNG (same on every platform)."""
    rng = random.Random(seed)
    corners = np.array([[rng.randrange(256) for _ in range(3)] for _ in range(4)], dtype=np.float32)  # (4, 3)
    shapes = [
        _Shape(
            kind=rng.choice(("rectangle", "ellipse", "triangle")),
            colour=(rng.randrange(256), rng.randrange(256), rng.randrange(256)),
            centre=(rng.uniform(0.15, 0.85), rng.uniform(0.15, 0.85)),
            radius=rng.uniform(0.06, 0.22),
            velocity=(rng.uniform(-0.03, 0.03), rng.uniform(-0.03, 0.03)),
        )
        for _ in range(rng.randint(3, 6))
    ]
    return corners, shapes


def _background(corners: np.ndarray, width: int, height: int) -> np.ndarray:
    """Bilinear blend of four corner colours.  # (H, W, 3)"""
    y = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    x = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :, None]
    top = corners[0] * (1 - x) + corners[1] * x
    bottom = corners[2] * (1 - x) + corners[3] * x
    return top * (1 - y) + bottom * y


def _draw(draw: ImageDraw.ImageDraw, shape: _Shape, frame: int, width: int, height: int) -> None:
    cx = (shape.centre[0] + shape.velocity[0] * frame) % 1.0 * width
    cy = (shape.centre[1] + shape.velocity[1] * frame) % 1.0 * height
    r = shape.radius * min(width, height)
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape.kind == "rectangle":
        draw.rectangle(box, fill=shape.colour)
    elif shape.kind == "ellipse":
        draw.ellipse(box, fill=shape.colour)
    else:
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=shape.colour)


def _render(seed: int, frame: int, width: int, height: int) -> Image.Image:
    corners, shapes = _scene(seed)
    pixels = _background(corners, width, height)
    noise = np.random.default_rng([seed, frame]).integers(-6, 7, size=pixels.shape)
    image = Image.fromarray(np.clip(pixels + noise, 0, 255).astype(np.uint8), mode="RGB")
    draw = ImageDraw.Draw(image)
    for shape in shapes:
        _draw(draw, shape, frame, width, height)
    return image


def synthetic_image(size: int | tuple[int, int], seed: int) -> Image.Image:
    """A deterministic RGB test image: gradient, slight grain and a few flat shapes; `size` is (width, height).

    Flat regions next to edges give token merging something real to find, unlike pure noise.
    """
    width, height = _size(size)
    return _render(seed, 0, width, height)


def synthetic_video(n_frames: int, size: int | tuple[int, int], seed: int) -> list[Image.Image]:
    """Frames of the `synthetic_image` scene with the shapes drifting a little each frame."""
    if n_frames <= 0:
        raise ValueError(f"n_frames must be positive, got {n_frames}")
    width, height = _size(size)
    return [_render(seed, frame, width, height) for frame in range(n_frames)]
