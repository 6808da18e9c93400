"""Model inputs for any supported family, without torchvision and without processor classes.

transformers' multimodal processor classes drag in torchvision video processors, which the
deployment and test machines may not have. A `Sample` is text with `<image>` and `<video>`
markers plus PIL images and lists of PIL frames; `build_inputs(backbone, samples)` hands them to the
backbone's adapter, which lays out the family's placeholders and chat template and runs the
family's PIL image processor (`illava.adapters`). This module holds what is family-free: samples,
markers, padding, and deterministic synthetic pictures and videos.

Under a ``downsample`` schedule (`illava.methods.downsample`) the inputs themselves change: give the
schedule to `build_inputs` (or resize the samples first with `prepare_samples`) and every image and
video frame is resized before the processor, as the family's adapter says (`downsample_sample`).
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from transformers import BatchFeature

from .methods.downsample import downsamples
from .schedule import Schedule

IMAGE_MARKER = "<image>"
VIDEO_MARKER = "<video>"
_MARKER_RE = re.compile(f"({re.escape(IMAGE_MARKER)}|{re.escape(VIDEO_MARKER)})")
TEXT_TYPE, IMAGE_TYPE, VIDEO_TYPE = 0, 1, 2


@dataclass
class Sample:
    """One prompt: `text` with `<image>`/`<video>` markers, and the visual inputs in order of appearance."""

    text: str
    images: list[Image.Image] = field(default_factory=list)
    videos: list[list[Image.Image]] = field(default_factory=list)

    def validate(self, reserved: Sequence[str] = ()) -> None:
        """Markers and inputs must pair up one to one, or placeholder counts and features disagree;
        the family's own placeholder tokens (`reserved`) may not appear in the text."""
        n_image, n_video = self.text.count(IMAGE_MARKER), self.text.count(VIDEO_MARKER)
        if n_image != len(self.images) or n_video != len(self.videos):
            raise ValueError(
                f"sample text has {n_image} {IMAGE_MARKER} and {n_video} {VIDEO_MARKER} markers but "
                f"{len(self.images)} images and {len(self.videos)} videos were given; they must match"
            )
        leaked = [token for token in reserved if token in self.text]
        if leaked:
            raise ValueError(f"sample text contains the reserved tokens {leaked}; use {IMAGE_MARKER} / {VIDEO_MARKER}")
        if any(len(video) == 0 for video in self.videos):
            raise ValueError("a video must have at least one frame")


def split_markers(text: str) -> list[str]:
    """`text` cut at the markers, markers kept as their own pieces (empty pieces dropped)."""
    return [piece for piece in _MARKER_RE.split(text) if piece]


def left_pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(row) for row in rows)
    return torch.tensor([[value] * (width - len(row)) + row for row in rows], dtype=torch.long)  # (B, L)


def build_inputs(
    backbone: Any, samples: list[Sample], *, chat: bool = True, video_fps: float = 2.0, schedule: Schedule | None = None
) -> BatchFeature:
    """Everything the backbone's model needs for `samples` (``forward`` or ``generate``), left padded,
    in the family's own layout. `video_fps` is the rate the given frames were sampled at; it sets the
    temporal spacing of video positions where the family has one. `schedule` (a `Schedule`, optional)
    matters only for a ``downsample`` one: the samples are then resized first (`prepare_samples`)."""
    if not samples:
        raise ValueError("build_inputs needs at least one sample")
    samples = prepare_samples(backbone, samples, schedule) if schedule is not None else list(samples)
    return backbone.adapter.build_inputs(backbone, samples, chat=chat, video_fps=video_fps)


def prepare_samples(backbone: Any, samples: list[Sample], schedule: Schedule | dict[str, Any] | str) -> list[Sample]:
    """`samples` as `schedule` wants them before the processor: for a ``downsample`` schedule each
    image and video frame resized to about the token budget the schedule's plan keeps of it (each
    sample on its own: a batch never changes a sample's size); for every other schedule the samples
    as given. `schedule` may be a `Schedule`, its JSON form or a manifest."""
    schedule = Schedule.coerce(schedule)
    if not downsamples(schedule):
        return list(samples)
    adapter, config = backbone.adapter, backbone.config
    return [adapter.downsample_sample(config, backbone.image_processor, sample, schedule) for sample in samples]


def resized(image: Image.Image, size: tuple[int, int], image_processor: Any = None) -> Image.Image:
    """`image` at (width, height) `size` with the processor's own resampling filter (bicubic where it
    names none); the image itself when it already has that size."""
    size = (int(size[0]), int(size[1]))
    if image.size == size:
        return image
    resample = getattr(image_processor, "resample", None)
    return image.resize(size, resample=Image.Resampling.BICUBIC if resample is None else resample)


def chat_turn(backbone: Any, text: str) -> str:
    """One user turn in the backbone's chat layout, ending where the assistant's answer starts (what
    `build_inputs(chat=True)` wraps each sample's text in; training code writes conversations with it)."""
    return backbone.adapter.chat_turn(text)


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
