"""The schedule: where and how much iLLaVA merges, independent of input resolution.

A `Schedule` is the single object every package passes around. It names fractions and layer
indices, never absolute token counts; `Schedule.plan(n)` turns it into exact per-layer counts
for one image segment of `n` LLM tokens.

Conventions (decided here, relied on everywhere):

* Token counts are in **LLM tokens**: for Qwen2.5-VL one LLM token is one 2x2 group of
  encoder patches, so removing one "token" in the encoder removes a whole group of 4 patches.
* `encoder_layers` are 0-based vision block indices; the merge runs inside the block, between
  attention and FFN (paper eq. 1). `llm_layers` are 0-based decoder layer indices; the merge
  runs after that layer (paper eq. 2).
* The total removal is `floor(reduction * n)`, capped so that at least one token per segment
  survives. `encoder_share` of it (rounded) is removed in the encoder, the rest in the LLM,
  each stage spread evenly over its layers with the remainder going to the earliest layers.
  Hence the paper's identity ``kept = N - sum(encoder removals) - sum(LLM removals)`` holds for
  every plan, and with evenly divisible counts it is literally ``N - Rv*Bv - Rt*Bt``.
* At each merging layer that keeps `P` tokens, ``P_c = round(recycle_share * P)`` of them are
  recycled cluster tokens (capped by the tokens being removed there, since a centre needs
  discarded tokens to absorb), and ``P_i = P - P_c`` are informative tokens.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1

#: Methods a schedule may name. ``illava``: importance selection + recycling (the paper).
#: ``prune``: importance selection, discarded tokens dropped (no recycling).
#: ``random``: uniformly random kept tokens (seeded), the baseline every method must beat.
METHODS = ("illava", "prune", "random")

# The paper's default (section 4.1) is stated for Qwen2.5-VL 7B: a 32-block encoder and a
# 28-layer LLM. Shallower (or deeper) models get these layers mapped proportionally.
PAPER_ENCODER_LAYERS = (5, 9, 13)
PAPER_LLM_LAYERS = (2, 8, 14)
PAPER_ENCODER_DEPTH = 32
PAPER_LLM_DEPTH = 28
PAPER_ENCODER_SHARE = 0.4
PAPER_REDUCTIONS = (2 / 3, 7 / 9, 8 / 9)  # the paper's 66.7%, 77.8%, 88.9%


class ScheduleError(ValueError):
    """A schedule that cannot be built or cannot run on a given model; the message says why."""


def map_layers(layers: tuple[int, ...], ref_depth: int, depth: int, *, max_index: int) -> tuple[int, ...]:
    """Map layer indices given for a `ref_depth`-deep stack onto a `depth`-deep one.

    Rule: ``floor(l * depth / ref_depth)``, clipped to ``[0, max_index]``; collisions are
    resolved by moving the later layer up by one (and, when that runs off the end, the earlier
    ones down), so the mapped layers stay distinct and in order. Raises when the stack has fewer
    usable layers than requested. Floor rather than rounding keeps each merge no deeper, relative
    to the stack, than the paper placed it; on the 16-block built-in encoder it also keeps the
    merges on windowed blocks (2, 4, 6), as the paper's 5, 9, 13 are on the 7B encoder.
    """
    if len(layers) > max_index + 1:
        raise ScheduleError(
            f"cannot place {len(layers)} merge layers in a stack with only {max_index + 1} usable layers"
        )
    mapped = [min(max(layer * depth // ref_depth, 0), max_index) for layer in layers]
    for i in range(1, len(mapped)):
        mapped[i] = max(mapped[i], mapped[i - 1] + 1)
    for i in range(len(mapped) - 1, -1, -1):
        limit = max_index - (len(mapped) - 1 - i)
        mapped[i] = min(mapped[i], limit)
    return tuple(mapped)


def _split_evenly(total: int, parts: int) -> list[int]:
    """`total` split into `parts` integers that differ by at most one, larger ones first."""
    if parts == 0:
        return []
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


@dataclass(frozen=True)
class LayerStep:
    """What one merging layer does to one segment."""

    layer: int  # block / decoder layer index
    tokens_in: int  # tokens entering the merge
    removed: int  # R at this layer
    recycled: int  # P_c: cluster tokens among the kept ones

    @property
    def kept(self) -> int:
        return self.tokens_in - self.removed

    @property
    def informative(self) -> int:
        return self.kept - self.recycled


@dataclass(frozen=True)
class Plan:
    """Exact per-layer counts of a schedule for one segment of `n_tokens` LLM tokens."""

    n_tokens: int
    encoder: tuple[LayerStep, ...]
    llm: tuple[LayerStep, ...]

    @property
    def encoder_removed(self) -> int:
        return sum(step.removed for step in self.encoder)

    @property
    def llm_removed(self) -> int:
        return sum(step.removed for step in self.llm)

    @property
    def after_encoder(self) -> int:
        """Image tokens that reach the LLM input."""
        return self.n_tokens - self.encoder_removed

    @property
    def kept(self) -> int:
        """Image tokens left after the last merge: N - sum(Rv) - sum(Rt)."""
        return self.n_tokens - self.encoder_removed - self.llm_removed

    def llm_tokens_at(self, layer: int) -> int:
        """Image tokens entering decoder layer `layer` (merges happen *after* their layer)."""
        tokens = self.after_encoder
        for step in self.llm:
            if step.layer < layer:
                tokens -= step.removed
        return tokens

    def encoder_tokens_at(self, block: int) -> tuple[int, int]:
        """(tokens in attention, tokens in FFN) of vision block `block`, in LLM-token units."""
        tokens = self.n_tokens
        for step in self.encoder:
            if step.layer < block:
                tokens -= step.removed
            elif step.layer == block:
                return tokens, tokens - step.removed
        return tokens, tokens


@dataclass(frozen=True)
class Schedule:
    """Where and how much to merge. Validated on construction; JSON round-trips.

    >>> Schedule(reduction=7 / 9).plan(256).kept
    57
    """

    method: str = "illava"
    reduction: float = 7 / 9  # fraction of a segment's image tokens removed in total, [0, 1)
    encoder_share: float = PAPER_ENCODER_SHARE  # fraction of the removal done in the encoder
    encoder_layers: tuple[int, ...] = PAPER_ENCODER_LAYERS
    llm_layers: tuple[int, ...] = PAPER_LLM_LAYERS
    recycle_share: float = 0.1  # P_c / P at each merging layer
    group_size: int = 5  # M: discarded tokens each cluster token absorbs
    seed: int = 0  # only used by method "random"
    schema_version: int = field(default=SCHEMA_VERSION)

    def __post_init__(self) -> None:
        # Accept lists from JSON; store tuples so schedules are hashable.
        object.__setattr__(self, "encoder_layers", tuple(int(x) for x in self.encoder_layers))
        object.__setattr__(self, "llm_layers", tuple(int(x) for x in self.llm_layers))
        problems = []
        if self.schema_version != SCHEMA_VERSION:
            problems.append(
                f"schema_version {self.schema_version} is not supported (this illava reads {SCHEMA_VERSION})"
            )
        if self.method not in METHODS:
            problems.append(f"unknown method {self.method!r}; allowed: {', '.join(METHODS)}")
        if not 0.0 <= self.reduction < 1.0:
            problems.append(
                f"reduction {self.reduction} is outside [0, 1): it is the fraction of image tokens removed, "
                "and removing all of them (1.0) or more is impossible"
            )
        if not 0.0 <= self.encoder_share <= 1.0:
            problems.append(f"encoder_share {self.encoder_share} is outside [0, 1]")
        if not 0.0 <= self.recycle_share < 1.0:
            problems.append(f"recycle_share {self.recycle_share} is outside [0, 1)")
        if self.group_size < 1:
            problems.append(f"group_size {self.group_size} must be >= 1")
        for name, layers in (("encoder_layers", self.encoder_layers), ("llm_layers", self.llm_layers)):
            if any(layer < 0 for layer in layers):
                problems.append(f"{name} {list(layers)} has a negative index; layers are 0-based")
            if list(layers) != sorted(set(layers)):
                problems.append(f"{name} {list(layers)} must be strictly increasing (no repeats)")
        if self.reduction > 0 and self.encoder_share > 0 and not self.encoder_layers:
            problems.append("encoder_share > 0 needs at least one entry in encoder_layers")
        if self.reduction > 0 and self.encoder_share < 1 and not self.llm_layers:
            problems.append("encoder_share < 1 needs at least one entry in llm_layers")
        if problems:
            raise ScheduleError("invalid schedule: " + "; ".join(problems))

    # ----------------------------------------------------------------------------- builders
    @classmethod
    def paper_default(
        cls,
        reduction: float = 7 / 9,
        *,
        encoder_depth: int = PAPER_ENCODER_DEPTH,
        llm_depth: int = PAPER_LLM_DEPTH,
        **overrides: Any,
    ) -> Schedule:
        """The paper's section 4.1 default: 40% of the removal in the encoder over layers
        5, 9, 13 and 60% in the LLM over layers 2, 8, 14 of Qwen2.5-VL 7B, with those layers
        mapped proportionally (see `map_layers`) onto an `encoder_depth` / `llm_depth` model."""
        encoder_layers = map_layers(
            PAPER_ENCODER_LAYERS, PAPER_ENCODER_DEPTH, encoder_depth, max_index=encoder_depth - 1
        )
        # Merging after the last decoder layer would save nothing; keep LLM merges before it.
        llm_layers = map_layers(PAPER_LLM_LAYERS, PAPER_LLM_DEPTH, llm_depth, max_index=llm_depth - 2)
        fields = dict(reduction=reduction, encoder_layers=encoder_layers, llm_layers=llm_layers)
        fields.update(overrides)
        return cls(**fields)

    @classmethod
    def vanilla(cls) -> Schedule:
        """The schedule that removes nothing."""
        return cls(reduction=0.0)

    def with_(self, **changes: Any) -> Schedule:
        return replace(self, **changes)

    # ----------------------------------------------------------------------------- planning
    @property
    def removes_nothing(self) -> bool:
        return self.reduction == 0.0

    def plan(self, n_tokens: int) -> Plan:
        """Exact per-layer counts for one segment (an image, or one frame of a video)."""
        if n_tokens < 1:
            raise ScheduleError(f"a segment needs at least one token, got {n_tokens}")
        total = min(int(math.floor(self.reduction * n_tokens + 1e-9)), n_tokens - 1)
        # Validation guarantees a stage with a nonzero share has layers to merge in.
        encoder_total = int(math.floor(self.encoder_share * total + 0.5))
        llm_total = total - encoder_total
        tokens = n_tokens
        encoder_steps = []
        for layer, removed in zip(self.encoder_layers, _split_evenly(encoder_total, len(self.encoder_layers))):
            encoder_steps.append(self._step(layer, tokens, removed))
            tokens -= removed
        llm_steps = []
        for layer, removed in zip(self.llm_layers, _split_evenly(llm_total, len(self.llm_layers))):
            llm_steps.append(self._step(layer, tokens, removed))
            tokens -= removed
        return Plan(n_tokens=n_tokens, encoder=tuple(encoder_steps), llm=tuple(llm_steps))

    def _step(self, layer: int, tokens_in: int, removed: int) -> LayerStep:
        kept = tokens_in - removed
        recycled = 0
        if removed > 0 and self.method == "illava":
            recycled = min(int(math.floor(self.recycle_share * kept + 0.5)), removed, kept)
        return LayerStep(layer=layer, tokens_in=tokens_in, removed=removed, recycled=recycled)

    def check_fits(self, *, encoder_depth: int, llm_depth: int) -> None:
        """Raise `ScheduleError` if the layers do not exist in a model of these depths."""
        problems = []
        if self.removes_nothing:
            return
        bad = [layer for layer in self.encoder_layers if layer >= encoder_depth]
        if bad and self.encoder_share > 0:
            problems.append(
                f"encoder layer(s) {bad} out of range: this encoder has {encoder_depth} blocks (0..{encoder_depth - 1})"
            )
        bad = [layer for layer in self.llm_layers if layer >= llm_depth - 1]
        if bad and self.encoder_share < 1:
            problems.append(
                f"LLM layer(s) {bad} out of range: merges run after a decoder layer and before the last one, "
                f"so this {llm_depth}-layer LLM allows 0..{llm_depth - 2}"
            )
        if problems:
            raise ScheduleError("schedule does not fit this model: " + "; ".join(problems))

    # ----------------------------------------------------------------------------- JSON
    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["encoder_layers"] = list(self.encoder_layers)
        data["llm_layers"] = list(self.llm_layers)
        return data

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Schedule:
        if not isinstance(data, dict):
            raise ScheduleError(f"a schedule is a JSON object, got {type(data).__name__}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ScheduleError(f"unknown schedule field(s) {unknown}; allowed: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> Schedule:
        return cls.from_dict(json.loads(text))

    @classmethod
    def coerce(cls, value: Schedule | dict[str, Any] | str | Path) -> Schedule:
        """A schedule from a Schedule, a dict, a manifest dict (with a ``schedule`` key), a JSON
        string or a path to a JSON file."""
        if isinstance(value, Schedule):
            return value
        if isinstance(value, Path) or (isinstance(value, str) and not value.lstrip().startswith("{")):
            path = Path(value)
            if not path.is_file():
                raise ScheduleError(f"schedule file {str(path)!r} does not exist")
            value = json.loads(path.read_text())
        elif isinstance(value, str):
            value = json.loads(value)
        if isinstance(value, dict) and isinstance(value.get("schedule"), dict):
            value = value["schedule"]  # a manifest
        return cls.from_dict(value)
