"""The `demo` visual question-answering benchmark: procedurally drawn scenes with four-option questions.

Flat shapes (circle, square, triangle, cross) in six colours and three sizes on a plain background, at
random non-overlapping positions. About a third of the objects are *small* (10-13 px on a 224 px image,
less than one 28 px LLM token), because small objects and fine detail are where token reduction hurts
(iLLaVA paper, appendix A.1). Five question types, in equal shares:

- ``colour``: "What colour is the triangle?" (exactly one triangle in the scene);
- ``shape``: "What shape is the blue object?" (exactly one blue object);
- ``count``: "How many circles are there?" / "How many red objects are there?" (0-3);
- ``position``: "Where is the red circle relative to the blue square?" (left/right/above/below, the
  other axis offset at most half the named one, so exactly one answer is right);
- ``presence``: "Which of these objects is in the image?" (one present, three absent look-alikes that
  share a colour or a shape with something in the scene).

Every object in a scene is a distinct (colour, shape) pair, so "the red circle" always names one object.
Item ``i`` of a split depends only on (split, i, image size): ``random.Random`` seeded with a string
(hashed with SHA-512, the same on every platform) and PIL drawing on integer coordinates, so the test
split has the same bytes on every machine with the same Pillow; a test pins its fingerprint.

Splits: ``train`` (unbounded; the training script streams it), ``val`` (500) and ``test`` (500, 100 per
type). The splits draw from disjoint seed streams.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw

from .items import LETTERS, MCQItem

CATEGORIES = ("colour", "shape", "count", "position", "presence")
SHAPES = ("circle", "square", "triangle", "cross")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 155, 55),
    "blue": (35, 70, 215),
    "yellow": (235, 200, 25),
    "purple": (135, 50, 170),
    "orange": (240, 125, 20),
}
BACKGROUNDS = ((255, 255, 255), (238, 238, 238), (246, 241, 226), (226, 236, 246))
DIRECTIONS = ("left", "right", "above", "below")
# Object side as a fraction of the image side, by size class, and how often each class is drawn.
SIZES = {"small": (0.045, 0.06), "medium": (0.10, 0.14), "large": (0.17, 0.22)}
SIZE_WEIGHTS = {"small": 0.35, "medium": 0.40, "large": 0.25}
SPLIT_SIZES = {"val": 500, "test": 500}
DEFAULT_IMAGE_SIZE = 224
MIN_IMAGE_SIZE = 112


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (inclusive pixel box)

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def centre(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2, (y0 + y1) / 2


class _Retry(Exception):
    """The random layout could not satisfy the question's constraints; draw again."""


# ---------------------------------------------------------------------------------------------
# Scenes
# ---------------------------------------------------------------------------------------------


def _side(rng: random.Random, size_class: str, image_size: int) -> int:
    low, high = SIZES[size_class]
    return max(6, round(rng.uniform(low, high) * image_size))


def _size_class(rng: random.Random) -> str:
    return rng.choices(list(SIZE_WEIGHTS), weights=list(SIZE_WEIGHTS.values()))[0]


def _overlaps(box: tuple[int, int, int, int], others: Sequence[SceneObject], gap: int) -> bool:
    x0, y0, x1, y1 = box
    return any(
        x0 < o.box[2] + gap and o.box[0] < x1 + gap and y0 < o.box[3] + gap and o.box[1] < y1 + gap for o in others
    )


def _place(
    rng: random.Random, objects: list[SceneObject], shape: str, colour: str, image_size: int, *, centre=None
) -> SceneObject:
    """Add one object at a free random spot (or near `centre`), or raise _Retry."""
    size_class = _size_class(rng)
    side = _side(rng, size_class, image_size)
    margin = max(2, image_size // 56)
    for _ in range(60):
        if centre is None:
            x0 = rng.randint(margin, image_size - margin - side)
            y0 = rng.randint(margin, image_size - margin - side)
        else:
            x0, y0 = round(centre[0] - side / 2), round(centre[1] - side / 2)
            if not (margin <= x0 <= image_size - margin - side and margin <= y0 <= image_size - margin - side):
                raise _Retry
        box = (x0, y0, x0 + side - 1, y0 + side - 1)
        if not _overlaps(box, objects, gap=margin):
            obj = SceneObject(shape, colour, size_class, box)
            objects.append(obj)
            return obj
        if centre is not None:
            raise _Retry
    raise _Retry


def _fill(rng: random.Random, objects: list[SceneObject], image_size: int, total: int, allowed) -> None:
    """Add distractor objects (distinct colour-shape pairs for which `allowed(shape, colour)`) up to `total`."""
    used = {(o.shape, o.colour) for o in objects}
    pairs = [(s, c) for s in SHAPES for c in COLOURS if (s, c) not in used and allowed(s, c)]
    rng.shuffle(pairs)
    for shape, colour in pairs[: max(0, total - len(objects))]:
        try:
            _place(rng, objects, shape, colour, image_size)
        except _Retry:
            continue  # a crowded scene keeps fewer distractors


def draw_scene(objects: Sequence[SceneObject], background: tuple[int, int, int], image_size: int) -> Image.Image:
    image = Image.new("RGB", (image_size, image_size), background)
    draw = ImageDraw.Draw(image)
    for obj in objects:
        fill = COLOURS[obj.colour]
        x0, y0, x1, y1 = obj.box
        if obj.shape == "circle":
            draw.ellipse(obj.box, fill=fill)
        elif obj.shape == "square":
            draw.rectangle(obj.box, fill=fill)
        elif obj.shape == "triangle":
            draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)
        else:  # cross: a plus sign with arms a third of the side thick
            third = max(1, (x1 - x0 + 1) // 3)
            draw.rectangle((x0 + third, y0, x1 - third, y1), fill=fill)
            draw.rectangle((x0, y0 + third, x1, y1 - third), fill=fill)
    return image


# ---------------------------------------------------------------------------------------------
# Questions
# ---------------------------------------------------------------------------------------------


def four_options(rng: random.Random, correct: str, pool: Sequence[str]) -> tuple[dict[str, str], str]:
    """Four options: `correct` and three others from `pool`, in a seeded order."""
    texts = [correct, *rng.sample([p for p in pool if p != correct], 3)]
    rng.shuffle(texts)
    return dict(zip(LETTERS, texts)), LETTERS[texts.index(correct)]


def _n_objects(rng: random.Random) -> int:
    return rng.randint(2, 6)


def _colour_question(rng, size):
    objects: list[SceneObject] = []
    target = _place(rng, objects, rng.choice(SHAPES), rng.choice(list(COLOURS)), size)
    _fill(rng, objects, size, _n_objects(rng), lambda s, c: s != target.shape)
    options, answer = four_options(rng, target.colour, list(COLOURS))
    return objects, f"What colour is the {target.shape}?", options, answer


def _shape_question(rng, size):
    objects: list[SceneObject] = []
    target = _place(rng, objects, rng.choice(SHAPES), rng.choice(list(COLOURS)), size)
    _fill(rng, objects, size, _n_objects(rng), lambda s, c: c != target.colour)
    options, answer = four_options(rng, target.shape, SHAPES)
    return objects, f"What shape is the {target.colour} object?", options, answer


def _count_question(rng, size):
    count = rng.randint(0, 3)
    objects: list[SceneObject] = []
    if rng.random() < 0.5:
        shape = rng.choice(SHAPES)
        for colour in rng.sample(list(COLOURS), count):
            _place(rng, objects, shape, colour, size)
        _fill(rng, objects, size, max(count + 1, _n_objects(rng)), lambda s, c: s != shape)
        question = f"How many {shape}s are there?"
    else:
        colour = rng.choice(list(COLOURS))
        for shape in rng.sample(SHAPES, count):
            _place(rng, objects, shape, colour, size)
        _fill(rng, objects, size, max(count + 1, _n_objects(rng)), lambda s, c: c != colour)
        question = f"How many {colour} objects are there?"
    options, answer = four_options(rng, str(count), ("0", "1", "2", "3"))
    return objects, question, options, answer


def _position_question(rng, size):
    pairs = rng.sample([(s, c) for s in SHAPES for c in COLOURS], 2)
    objects: list[SceneObject] = []
    reference = _place(rng, objects, *pairs[1], size)
    direction = rng.choice(DIRECTIONS)
    distance = rng.uniform(0.2, 0.55) * size
    across = rng.uniform(-0.45, 0.45) * distance
    sign = -1 if direction in ("left", "above") else 1
    rx, ry = reference.centre
    centre = (
        (rx + sign * distance, ry + across) if direction in ("left", "right") else (rx + across, ry + sign * distance)
    )
    target = _place(rng, objects, *pairs[0], size, centre=centre)
    _fill(rng, objects, size, _n_objects(rng), lambda s, c: True)
    options, answer = four_options(rng, direction, DIRECTIONS)
    return objects, f"Where is the {target.name} relative to the {reference.name}?", options, answer


def absent_lookalikes(objects: Sequence[SceneObject]) -> list[str]:
    """Names of objects not in the scene that share a colour or a shape with one that is."""
    present = {(o.shape, o.colour) for o in objects}
    shapes, colours = {o.shape for o in objects}, {o.colour for o in objects}
    return [f"{c} {s}" for s in SHAPES for c in COLOURS if (s, c) not in present and (s in shapes or c in colours)]


def _presence_question(rng, size):
    objects: list[SceneObject] = []
    _fill(rng, objects, size, _n_objects(rng), lambda s, c: True)
    if not objects:
        raise _Retry
    target = rng.choice(objects)
    lookalikes = absent_lookalikes(objects)
    if len(lookalikes) < 3:
        raise _Retry
    texts = [target.name, *rng.sample(lookalikes, 3)]
    rng.shuffle(texts)
    return (
        objects,
        "Which of these objects is in the image?",
        dict(zip(LETTERS, texts)),
        LETTERS[texts.index(target.name)],
    )


_QUESTIONS = {
    "colour": _colour_question,
    "shape": _shape_question,
    "count": _count_question,
    "position": _position_question,
    "presence": _presence_question,
}


@dataclass(frozen=True)
class DemoScene:
    """One generated question with the scene it is about (what tests check the answer against)."""

    stream: str
    index: int
    category: str
    objects: tuple[SceneObject, ...]
    background: tuple[int, int, int]
    question: str
    options: dict[str, str]
    answer: str
    image_size: int

    def item(self) -> MCQItem:
        image = draw_scene(self.objects, self.background, self.image_size)
        return MCQItem(f"{self.stream}-{self.index}", self.question, self.options, self.answer, (image,), self.category)


def demo_scene(stream: str, index: int, *, image_size: int = DEFAULT_IMAGE_SIZE) -> DemoScene:
    """Scene and question `index` of the seed stream `stream` (``train``, ``val``, ``test`` or any other name).

    The question type cycles through CATEGORIES with the index, so any 5 consecutive items hold one of each.
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be an integer >= {MIN_IMAGE_SIZE}, got {image_size!r}")
    category = CATEGORIES[index % len(CATEGORIES)]
    for attempt in range(100):
        rng = random.Random(f"illava-demo-vqa:{stream}:{index}:{image_size}:{attempt}")
        background = rng.choice(BACKGROUNDS)
        try:
            objects, question, options, answer = _QUESTIONS[category](rng, image_size)
        except _Retry:
            continue
        return DemoScene(stream, index, category, tuple(objects), background, question, options, answer, image_size)
    raise RuntimeError(f"could not lay out item {index} of {stream!r} at {image_size} px")  # pragma: no cover


def demo_item(stream: str, index: int, *, image_size: int = DEFAULT_IMAGE_SIZE) -> MCQItem:
    """`demo_scene(...)` drawn: the multiple-choice item the profiler and the trainer read."""
    return demo_scene(stream, index, image_size=image_size).item()


def demo_split(
    split: str, n: int | None = None, *, start: int = 0, image_size: int = DEFAULT_IMAGE_SIZE
) -> list[MCQItem]:
    """Items ``start .. start+n`` of a split; `n` defaults to the split's size (``train`` has none: give `n`)."""
    if split not in ("train", *SPLIT_SIZES):
        raise ValueError(f"unknown demo split {split!r}; splits are train, {', '.join(SPLIT_SIZES)}")
    if n is None:
        if split == "train":
            raise ValueError("the train split is unbounded: give the number of items")
        n = SPLIT_SIZES[split] - start
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if split in SPLIT_SIZES and start + n > SPLIT_SIZES[split]:
        raise ValueError(f"the {split} split has {SPLIT_SIZES[split]} items; asked for {start}..{start + n}")
    return [demo_item(split, i, image_size=image_size) for i in range(start, start + n)]


def fingerprint(items: Sequence[MCQItem]) -> str:
    """sha256 over questions, options, answers and pixels: equal fingerprints mean byte-identical items."""
    digest = hashlib.sha256()
    for item in items:
        digest.update(repr((item.index, item.question, sorted(item.options.items()), item.answer)).encode())
        for image in item.images:
            digest.update(image.tobytes())
    return digest.hexdigest()


__all__ = [
    "CATEGORIES",
    "COLOURS",
    "DEFAULT_IMAGE_SIZE",
    "SHAPES",
    "SPLIT_SIZES",
    "DemoScene",
    "SceneObject",
    "absent_lookalikes",
    "demo_item",
    "demo_scene",
    "demo_split",
    "draw_scene",
    "four_options",
    "fingerprint",
]
