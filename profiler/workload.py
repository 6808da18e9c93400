"""What a schedule is measured on: the workload.

A schedule's latency means nothing without the inputs it was measured on: how many images or video
frames each sample carries and at what resolution, how long the prompt and the answer are, the batch
size, and whether accuracy comes from a labelled dataset. `Workload` pins all of that down, validates
it on construction (so a bad job spec fails at submission, not hours later on a worker) and round-trips
through JSON and YAML so a manifest can carry it.

Synthetic workloads (no `dataset`) are generated deterministically from `seed`: sample `i` depends only
on `(seed, i)`, so a workload with more samples extends, never reshuffles, a smaller one.

With a `dataset`, the visual inputs come from the dataset rows and are used as they are (the model's
image processor resizes them to its own bounds, as it would in serving); the synthetic-only fields
`images_per_sample`, `image_size`, `video_size` and `prompt_words` are then not used, and `samples` is
the number of rows read.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

import yaml

from illava.inputs import IMAGE_MARKER, VIDEO_MARKER, Sample, synthetic_image, synthetic_video

from .datasets import BUILTIN_DATASETS, read_dataset

# Synthetic image sides must be multiples of the backbone's `size_multiple` (its adapter's: patch size
# times merge size, 28 for Qwen2.5-VL, 32 for Qwen3-VL), so the image processor keeps them as they are
# and the token count is exactly what the size says; `Workload.check_fits` holds a workload to it.
WORKLOAD_SUFFIXES = (".json", ".yaml", ".yml")
T = TypeVar("T")


class WorkloadError(ValueError):
    """A workload spec that cannot be measured; the message names the field, the value and what is allowed."""


@dataclass(frozen=True)
class Workload:
    """What one measurement runs on. Sizes are (width, height) in pixels.

    `video_frames` > 0 gives every sample one video of that many frames (odd counts are padded by the
    processor to whole temporal patches of 2 frames). `output_tokens` is how many tokens are decoded
    when measuring decode speed and greedy agreement with the unmerged model.
    """

    name: str
    images_per_sample: int = 1
    image_size: tuple[int, int] = (448, 448)
    video_frames: int = 0
    video_size: tuple[int, int] = (448, 448)
    prompt_words: int = 16
    output_tokens: int = 16
    batch_size: int = 1
    dataset: str | None = None
    samples: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise WorkloadError(f"workload name must be a non-empty string, got {self.name!r}")
        object.__setattr__(self, "image_size", self._size("image_size"))
        object.__setattr__(self, "video_size", self._size("video_size"))
        for field_name, minimum in _MINIMUMS.items():
            self._check_int(field_name, minimum)
        self._check_dataset()
        if self.dataset is None and self.images_per_sample == 0 and self.video_frames == 0:
            raise self._error(
                "images_per_sample",
                0,
                "at least 1 when video_frames is 0: a synthetic sample needs an image or a video",
            )

    def _error(self, field_name: str, value: object, allowed: str) -> WorkloadError:
        return WorkloadError(f"workload {self.name!r}: {field_name} must be {allowed}, got {value!r}")

    def _check_int(self, field_name: str, minimum: int) -> None:
        value = getattr(self, field_name)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self._error(field_name, value, f"an integer >= {minimum}")

    def _size(self, field_name: str) -> tuple[int, int]:
        """Accept (w, h), [w, h] (what JSON and YAML give back) or one int for a square."""
        value = getattr(self, field_name)
        pair = (value, value) if isinstance(value, int) and not isinstance(value, bool) else value
        allowed = "(width, height), each a positive integer number of pixels"
        if not isinstance(pair, list | tuple) or len(pair) != 2:
            raise self._error(field_name, value, allowed)
        if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pair):
            raise self._error(field_name, value, allowed)
        return (pair[0], pair[1])

    def check_fits(self, size_multiple: int, backbone: str) -> None:
        """Raise `WorkloadError` if a synthetic size is not a multiple of the backbone's `size_multiple`
        (the image processor would resize it, and the workload would not be what it says)."""
        if self.dataset is not None or size_multiple <= 1:
            return
        checked = [("image_size", self.image_size)] if self.images_per_sample else []
        checked += [("video_size", self.video_size)] if self.video_frames else []
        for field_name, (width, height) in checked:
            if width % size_multiple or height % size_multiple:
                near = sorted({max(size_multiple, round(v / size_multiple) * size_multiple) for v in (width, height)})
                raise self._error(
                    field_name, (width, height),
                    f"(width, height), each a multiple of {size_multiple} pixels on {backbone} (its patch size times "
                    f"its merge size; nearest: {near})",
                )  # fmt: skip

    def _check_dataset(self) -> None:
        if self.dataset is None:
            return
        if not isinstance(self.dataset, str) or not self.dataset.strip():
            raise self._error(
                "dataset",
                self.dataset,
                f"a path to a .tsv, .jsonl or .parquet file, a built-in ({', '.join(BUILTIN_DATASETS)}), or null",
            )
        if self.video_frames:
            raise self._error(
                "video_frames", self.video_frames, "0 when a dataset is given (dataset rows carry images, not video)"
            )

    @property
    def synthetic(self) -> bool:
        """True when samples are generated rather than read from a labelled dataset (then no accuracy)."""
        return self.dataset is None

    def describe(self) -> str:
        """One line for tables and logs."""
        if self.dataset is not None:
            visual = f"dataset {self.dataset} (up to {self.samples} rows)"
        else:
            parts = []
            if self.images_per_sample:
                w, h = self.image_size
                parts.append(f"{self.images_per_sample} image{'s' * (self.images_per_sample > 1)} {w}x{h}")
            if self.video_frames:
                w, h = self.video_size
                parts.append(f"{self.video_frames}-frame video {w}x{h}")
            visual = f"{' + '.join(parts)}, {self.prompt_words}-word prompt, {self.samples} samples"
        return f"{self.name}: {visual}, {self.output_tokens} output tokens, batch {self.batch_size}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: sizes become lists."""
        data = asdict(self)
        data["image_size"] = list(self.image_size)
        data["video_size"] = list(self.video_size)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Workload:
        """Inverse of `to_dict`; unknown keys are rejected by name, so a typo never silently falls back to a default."""
        if not isinstance(data, Mapping):
            raise WorkloadError(f"a workload must be a mapping of field names to values, got {type(data).__name__}")
        allowed = [f.name for f in fields(cls)]
        unknown = sorted(str(key) for key in data if key not in allowed)
        if unknown:
            raise WorkloadError(f"unknown workload keys {unknown}; allowed keys are {allowed}")
        if "name" not in data:
            raise WorkloadError(f"a workload needs a 'name'; allowed keys are {allowed}")
        return cls(**data)


# Smallest allowed value of each integer field.
_MINIMUMS = {
    "images_per_sample": 0,
    "video_frames": 0,
    "prompt_words": 1,
    "output_tokens": 1,
    "batch_size": 1,
    "samples": 1,
    "seed": 0,  # numpy's seeded generator behind synthetic_image rejects negative seeds
}

DEFAULT_PRESET = "single-448"

# video-16 uses 336x336 frames, not 448: 16 frames at 448 are 2048 LLM tokens, which makes one prefill
# of the CPU `small` backbone several seconds; at 336 it is 8 temporal patches x 144 = 1152 tokens.
PRESETS: dict[str, Workload] = {
    "single-448": Workload(name="single-448", images_per_sample=1, image_size=(448, 448)),
    "single-896": Workload(name="single-896", images_per_sample=1, image_size=(896, 896)),
    "multi-4x448": Workload(name="multi-4x448", images_per_sample=4, image_size=(448, 448)),
    "video-16": Workload(name="video-16", images_per_sample=0, video_frames=16, video_size=(336, 336)),
    # The demo VQA benchmark's test split (224x224 images, 64 LLM tokens each): accuracy is an objective.
    "demo-vqa": Workload(name="demo-vqa", dataset="demo", samples=100, output_tokens=4),
}


# ---------------------------------------------------------------------------------------------
# Files and names
# ---------------------------------------------------------------------------------------------


def _parse_file(path: Path) -> Any:
    text = path.read_text(encoding="utf-8")
    try:
        return json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise WorkloadError(f"{path}: not valid {path.suffix.lstrip('.').upper()}: {exc}") from None


def load_workload(path: str | Path) -> Workload:
    """Read a .json/.yaml/.yml workload file.

    `name` defaults to the file stem. A relative `dataset` path is taken relative to the file's folder,
    so a workload file and its dataset can move together.
    """
    path = Path(path)
    if path.suffix.lower() not in WORKLOAD_SUFFIXES:
        raise WorkloadError(f"{path}: workload files must end in one of {list(WORKLOAD_SUFFIXES)}")
    if not path.is_file():
        raise WorkloadError(f"{path}: no such workload file")
    data = _parse_file(path)
    if not isinstance(data, Mapping):
        raise WorkloadError(f"{path}: a workload file must hold a mapping of field names, got {type(data).__name__}")
    data = {"name": path.stem, **data}
    dataset = data.get("dataset")
    if isinstance(dataset, str) and dataset and dataset not in BUILTIN_DATASETS and not Path(dataset).is_absolute():
        data["dataset"] = str(path.parent / dataset)
    try:
        return Workload.from_dict(data)
    except WorkloadError as exc:
        raise WorkloadError(f"{path}: {exc}") from None


def save_workload(workload: Workload, path: str | Path) -> Path:
    """Write a workload as JSON or YAML (by extension) that `load_workload` reads back equal."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in WORKLOAD_SUFFIXES:
        raise WorkloadError(f"{path}: workload files must end in one of {list(WORKLOAD_SUFFIXES)}")
    data = workload.to_dict()
    text = json.dumps(data, indent=2) + "\n" if suffix == ".json" else yaml.safe_dump(data, sort_keys=False)
    path.write_text(text, encoding="utf-8")
    return path


def default_workload(backbone: str) -> str:
    """The preset a command uses when none is named: the labelled demo benchmark for the `demo`
    backbone (trained on it), the synthetic single-448 image for everything else."""
    return "demo-vqa" if str(backbone) == "demo" else DEFAULT_PRESET


def resolve_workload(spec: str | Path | Workload | None) -> Workload:
    """What a CLI flag or job spec names: None (the default preset), a preset name, or a workload file."""
    if spec is None:
        return PRESETS[DEFAULT_PRESET]
    if isinstance(spec, Workload):
        return spec
    if isinstance(spec, str) and spec in PRESETS:
        return PRESETS[spec]
    path = Path(spec)
    if path.is_file() or path.suffix.lower() in WORKLOAD_SUFFIXES:
        return load_workload(path)
    raise WorkloadError(
        f"unknown workload {str(spec)!r}: not a preset and not a file; presets are {sorted(PRESETS)} "
        f"(default {DEFAULT_PRESET}), or give a path to a {'/'.join(WORKLOAD_SUFFIXES)} file"
    )


# ---------------------------------------------------------------------------------------------
# Synthetic samples
# ---------------------------------------------------------------------------------------------


# Common English words (written for this module), so prompts tokenise like real questions rather than noise.
def check_dataset(workload: Workload) -> None:
    """Open the workload's dataset and check every row it will use (the first `samples`), images
    decoded: a bad file or row fails with the `DatasetError` `profile` gives (file, row, field)
    before a tuning job exists, not in each of its trials. Nothing to do without a dataset."""
    if workload.dataset is not None:
        read_dataset(workload.dataset, limit=workload.samples)


_PROMPT_TEXT = """
what where which how many color colour shape size left right top bottom middle corner edge near far
above below behind front inside outside between next the a an of in on at with and or is are this that
image picture photo video frame scene object objects person people dog cat car tree house road sky
water light dark red blue green yellow white black orange purple small large tall short round square
circle triangle moving still first last describe tell count show find look see happen doing holding
"""
_PROMPT_WORDS = _PROMPT_TEXT.split()


def _prompt(rng: random.Random, n_words: int) -> str:
    words = [rng.choice(_PROMPT_WORDS) for _ in range(n_words)]
    return " ".join(words).capitalize() + "?"


def _seed(rng: random.Random) -> int:
    return rng.randrange(2**31)


def synthetic_sample(workload: Workload, index: int) -> Sample:
    """Sample `index` of a synthetic workload; depends only on (seed, index) and the sizes."""
    rng = random.Random(f"illava-workload:{workload.seed}:{index}")
    images = [synthetic_image(workload.image_size, _seed(rng)) for _ in range(workload.images_per_sample)]
    videos = [synthetic_video(workload.video_frames, workload.video_size, _seed(rng))] if workload.video_frames else []
    markers = IMAGE_MARKER * len(images) + VIDEO_MARKER * len(videos)
    return Sample(text=markers + _prompt(rng, workload.prompt_words), images=images, videos=videos)


def synthetic_samples(workload: Workload) -> list[Sample]:
    """`workload.samples` deterministic samples; markers come first, then the prompt, like Qwen's chat template."""
    if not workload.synthetic:
        raise WorkloadError(
            f"workload {workload.name!r} reads its samples from the dataset {workload.dataset!r}; "
            "use profiler.datasets.read_dataset for it"
        )
    return [synthetic_sample(workload, i) for i in range(workload.samples)]


def batches(items: Iterable[T], batch_size: int) -> Iterator[list[T]]:
    """Consecutive lists of `batch_size` items; the last one may be shorter."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch
