"""The schedule: where and how much to merge, independent of input resolution.

A `Schedule` is the single object every package passes around. It names fractions and layer
indices, never absolute token counts; `Schedule.plan(n)` turns it into exact per-layer counts
for one image segment of `n` LLM tokens.

Conventions (decided here, relied on everywhere):

* Token counts are in **LLM tokens**: for the Qwen families one LLM token is one 2x2 group of
  encoder patches, so removing one "token" in the encoder removes a whole group of 4 patches.
* `encoder_layers` are 0-based vision block indices; the merge runs inside the block, between
  attention and FFN (paper eq. 1). `llm_layers` are 0-based decoder layer indices; the merge
  runs after that layer (paper eq. 2).
* The total removal is `floor(reduction * n)`, capped so that at least one token per segment
  survives. `encoder_share` of it (rounded) is removed in the encoder, the rest in the LLM,
  each stage spread evenly over its layers with the remainder going to the earliest layers.
  Hence the paper's identity ``kept = N - sum(encoder removals) - sum(LLM removals)`` holds for
  every plan, and with evenly divisible counts it is literally ``N - Rv*Bv - Rt*Bt``.
  A method whose ``encoder_stage`` is ``"between"`` removes the encoder share in one step
  after the encoder instead (`Plan.between`), and needs no `encoder_layers`.
* `method` names a registered reduction method (`illava.methods`); `params` are that method's
  own parameters, validated by it. For iLLaVA, at each merging layer that keeps `P` tokens,
  ``P_c = round(recycle_share * P)`` of them are recycled cluster tokens (capped by the tokens
  being removed there, since a centre needs discarded tokens to absorb).
* Schema 2 (this one) keeps method parameters in ``params``; schema 1 schedules (``recycle_share``,
  ``group_size``, ``seed`` at the top level) are still read, their fields moved into ``params``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .errors import ScheduleError
from .methods import MethodParams, ReductionMethod, get_method, method_names
from .methods.base import is_int, is_real, split_evenly

SCHEMA_VERSION = 2
#: Schema versions `Schedule.from_dict` reads.
READABLE_SCHEMAS = (1, 2)
#: Top-level fields of schema 1 that are method parameters in schema 2.
_V1_PARAM_FIELDS = ("recycle_share", "group_size", "seed")

# The paper's default (section 4.1) is stated for Qwen2.5-VL 7B: a 32-block encoder and a
# 28-layer LLM. Shallower (or deeper) models get these layers mapped proportionally.
PAPER_ENCODER_LAYERS = (5, 9, 13)
PAPER_LLM_LAYERS = (2, 8, 14)
PAPER_ENCODER_DEPTH = 32
PAPER_LLM_DEPTH = 28
PAPER_ENCODER_SHARE = 0.4
PAPER_REDUCTIONS = (2 / 3, 7 / 9, 8 / 9)  # the paper's 66.7%, 77.8%, 88.9%


def __getattr__(name: str) -> Any:
    if name == "METHODS":  # the registered method names (a registry now, not a fixed tuple)
        return method_names()
    raise AttributeError(name)


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
    between: LayerStep | None = None  # the encoder share, for methods that merge after the encoder

    @property
    def encoder_removed(self) -> int:
        """Removed before the LLM: in encoder blocks, or in the between step."""
        between = self.between.removed if self.between is not None else 0
        return sum(step.removed for step in self.encoder) + between

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

    @property
    def steps(self) -> tuple[LayerStep, ...]:
        """Every step in the order the tokens go through them."""
        return (*self.encoder, *((self.between,) if self.between is not None else ()), *self.llm)

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


def _layer_list(name: str, value: Any, problems: list[str]) -> tuple[int, ...]:
    """A list of layer indices from a tuple/list of ints; anything else is a problem named by field."""
    if isinstance(value, str | bytes) or not isinstance(value, list | tuple):
        problems.append(f"{name} must be a list of integer layer indices, got {value!r}")
        return ()
    if not all(is_int(layer) for layer in value):
        problems.append(f"{name} must be a list of integer layer indices, got {list(value)!r}")
        return ()
    layers = tuple(value)
    if any(layer < 0 for layer in layers):
        problems.append(f"{name} {list(layers)} has a negative index; layers are 0-based")
    if list(layers) != sorted(set(layers)):
        problems.append(f"{name} {list(layers)} must be strictly increasing (no repeats)")
    return layers


@dataclass(frozen=True)
class Schedule:
    """Where and how much to merge, and with which method. Validated on construction (every
    problem is a `ScheduleError` naming the field and what is allowed); JSON round-trips.

    >>> Schedule(reduction=7 / 9).plan(256).kept
    57
    >>> Schedule(method="random", params={"seed": 3}).params.seed
    3
    """

    method: str = "illava"
    reduction: float = 7 / 9  # fraction of a segment's image tokens removed in total, [0, 1)
    encoder_share: float = PAPER_ENCODER_SHARE  # fraction of the removal done in the encoder
    encoder_layers: tuple[int, ...] = PAPER_ENCODER_LAYERS
    llm_layers: tuple[int, ...] = PAPER_LLM_LAYERS
    params: MethodParams | Mapping[str, Any] | None = None  # the method's own parameters (defaults when None)
    schema_version: int = field(default=SCHEMA_VERSION)

    def __post_init__(self) -> None:
        problems: list[str] = []
        set_ = object.__setattr__
        if not is_int(self.schema_version) or self.schema_version != SCHEMA_VERSION:
            problems.append(
                f"schema_version {self.schema_version!r} is not supported here (Schedule(...) is schema "
                f"{SCHEMA_VERSION}; Schedule.from_dict also reads {list(READABLE_SCHEMAS)})"
            )
        method: ReductionMethod | None = None
        try:
            method = get_method(self.method)
        except ScheduleError as error:
            problems.append(str(error))
        for name in ("reduction", "encoder_share"):
            value = getattr(self, name)
            if not is_real(value):
                problems.append(f"{name} must be a number, got {value!r}")
                continue
            set_(self, name, float(value))
            if name == "reduction" and not 0.0 <= value < 1.0:
                problems.append(
                    f"reduction {value} is outside [0, 1): it is the fraction of image tokens removed, "
                    "and removing all of them (1.0) or more is impossible"
                )
            elif name == "encoder_share" and not 0.0 <= value <= 1.0:
                problems.append(f"encoder_share {value} is outside [0, 1]")
        set_(self, "encoder_layers", _layer_list("encoder_layers", self.encoder_layers, problems))
        set_(self, "llm_layers", _layer_list("llm_layers", self.llm_layers, problems))
        if method is not None:
            try:
                set_(self, "params", method.parse_params(self.params))
            except ScheduleError as error:
                problems.append(str(error))
            except TypeError as error:  # a dataclass rejecting a value it cannot hold
                problems.append(f"params of method {self.method!r}: {error}")
        if not problems:
            problems.extend(method.check_schedule(self))
        if not problems and self.reduction > 0:
            in_blocks = method.encoder_stage == "blocks"
            if self.encoder_share > 0 and in_blocks and not self.encoder_layers:
                problems.append("encoder_share > 0 needs at least one entry in encoder_layers")
            if self.encoder_share < 1 and not self.llm_layers:
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
        mapped proportionally (see `map_layers`) onto an `encoder_depth` / `llm_depth` model.
        `overrides` are fields or the method's parameters by name (as `with_` takes them)."""
        encoder_layers = map_layers(
            PAPER_ENCODER_LAYERS, PAPER_ENCODER_DEPTH, encoder_depth, max_index=encoder_depth - 1
        )
        # Merging after the last decoder layer would save nothing; keep LLM merges before it.
        llm_layers = map_layers(PAPER_LLM_LAYERS, PAPER_LLM_DEPTH, llm_depth, max_index=llm_depth - 2)
        return cls(reduction=reduction, encoder_layers=encoder_layers, llm_layers=llm_layers).with_(**overrides)

    @classmethod
    def vanilla(cls) -> Schedule:
        """The schedule that removes nothing."""
        return cls(reduction=0.0)

    def with_(self, **changes: Any) -> Schedule:
        """A copy with fields changed. The method's parameters may be given by name
        (``with_(method="random", seed=3)``, ``with_(group_size=8)``); changing the method keeps
        only the parameters the new method has, and the rest take its defaults."""
        method_name = changes.get("method", self.method)
        method = get_method(method_name)
        param_names = {f for f in method.params_type.__dataclass_fields__}
        named = {key: changes.pop(key) for key in list(changes) if key in param_names}
        unknown = sorted(set(changes) - set(self.__dataclass_fields__))
        if unknown:
            raise ScheduleError(
                f"unknown schedule field(s) {unknown}; fields: {sorted(self.__dataclass_fields__)}; "
                f"parameters of {method_name!r}: {sorted(param_names) or 'none'}"
            )
        if "params" in changes:
            base = dict(changes.pop("params") or {})
        else:
            current = self.params.to_dict() if isinstance(self.params, MethodParams) else {}
            base = {key: value for key, value in current.items() if key in param_names}
        return replace(self, **changes, params={**base, **named})

    # ----------------------------------------------------------------------------- planning
    @property
    def removes_nothing(self) -> bool:
        return self.reduction == 0.0

    @property
    def reduction_method(self) -> ReductionMethod:
        return get_method(self.method)

    def plan(self, n_tokens: int) -> Plan:
        """Exact per-layer counts for one segment (an image, or one frame of a video)."""
        if not is_int(n_tokens) or n_tokens < 1:
            raise ScheduleError(f"a segment needs at least one token, got {n_tokens!r}")
        total = min(int(math.floor(self.reduction * n_tokens + 1e-9)), n_tokens - 1)
        # Validation guarantees a stage with a nonzero share has layers to merge in.
        encoder_total = int(math.floor(self.encoder_share * total + 0.5))
        llm_total = total - encoder_total
        tokens = n_tokens
        encoder_steps: list[LayerStep] = []
        between = None
        if self.reduction_method.encoder_stage == "between":
            between = self._step(-1, tokens, encoder_total)
            tokens -= encoder_total
        else:
            for layer, removed in zip(self.encoder_layers, split_evenly(encoder_total, len(self.encoder_layers))):
                encoder_steps.append(self._step(layer, tokens, removed))
                tokens -= removed
        llm_steps = []
        split = self.reduction_method.llm_split(self.params, tokens, llm_total, len(self.llm_layers))
        for layer, removed in zip(self.llm_layers, split):
            llm_steps.append(self._step(layer, tokens, removed))
            tokens -= removed
        return Plan(n_tokens=n_tokens, encoder=tuple(encoder_steps), llm=tuple(llm_steps), between=between)

    def _step(self, layer: int, tokens_in: int, removed: int) -> LayerStep:
        recycled = self.reduction_method.recycled(self.params, tokens_in, removed) if removed else 0
        return LayerStep(layer=layer, tokens_in=tokens_in, removed=removed, recycled=recycled)

    def check_fits(self, *, encoder_depth: int, llm_depth: int) -> None:
        """Raise `ScheduleError` if the layers do not exist in a model of these depths."""
        problems = []
        if self.removes_nothing:
            return
        bad = [layer for layer in self.encoder_layers if layer >= encoder_depth]
        if bad and self.encoder_share > 0 and self.reduction_method.encoder_stage == "blocks":
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

    def describe(self) -> str:
        """One line for tables: ``illava r=0.778 enc=0.40 E[5, 9, 13] L[2, 8, 14] rec=0.10 M=5``."""
        if self.removes_nothing:
            return "unmerged"
        method = self.reduction_method
        if not any(method.acts_at(stage) for stage in ("encoder", "between", "llm")):  # downsample: the inputs
            text = f"{self.method} r={self.reduction:.3f} inputs"
        else:
            where = f"E{list(self.encoder_layers)} " if method.encoder_stage == "blocks" else "between "
            text = f"{self.method} r={self.reduction:.3f} enc={self.encoder_share:.2f} {where}L{list(self.llm_layers)}"
        own = self.reduction_method.describe_params(self.params)
        return f"{text} {own}" if own else text

    # ----------------------------------------------------------------------------- JSON
    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "reduction": self.reduction,
            "encoder_share": self.encoder_share,
            "encoder_layers": list(self.encoder_layers),
            "llm_layers": list(self.llm_layers),
            "params": self.params.to_dict(),
            "schema_version": self.schema_version,
        }

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Schedule:
        """A schedule from its JSON form (schema 2, or schema 1 with its method fields at the top)."""
        if not isinstance(data, Mapping):
            raise ScheduleError(f"a schedule is a JSON object, got {type(data).__name__} {data!r}")
        data = dict(data)
        version = data.get("schema_version", SCHEMA_VERSION)
        if not is_int(version):  # True == 1 in Python: a bool is not a version
            raise ScheduleError(f"invalid schedule: schema_version must be an integer, got {version!r}")
        if data.get("params", {}) is None:
            raise ScheduleError("invalid schedule: params must be a JSON object of the method's parameters, got null")
        if version == 1:
            data = _from_schema_1(data)
        elif version not in READABLE_SCHEMAS:
            raise ScheduleError(
                f"invalid schedule: schema_version {version!r} is not supported (this illava reads {list(READABLE_SCHEMAS)})"
            )
        known = set(cls.__dataclass_fields__)
        unknown = sorted(str(key) for key in set(data) - known)
        if unknown:
            raise ScheduleError(f"unknown schedule field(s) {unknown}; allowed: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> Schedule:
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, TypeError) as error:
            raise ScheduleError(f"a schedule in JSON could not be parsed: {error}") from None
        return cls.from_dict(data)

    @classmethod
    def coerce(cls, value: Schedule | Mapping[str, Any] | str | Path) -> Schedule:
        """A schedule from a Schedule, a dict, a manifest dict (with a ``schedule`` key), a JSON
        string or a path to a JSON file; anything else, or anything malformed, is a `ScheduleError`."""
        value = read_document(value)
        if isinstance(value, Schedule):
            return value
        if isinstance(value, Mapping) and "schedule" in value:
            value = value["schedule"]  # a manifest
            if not isinstance(value, Mapping):
                raise ScheduleError(f"the manifest's 'schedule' must be a JSON object, got {type(value).__name__}")
        if not isinstance(value, Mapping):
            raise ScheduleError(
                f"a schedule must be a Schedule, a dict, a manifest, JSON text or a JSON file path; got {type(value).__name__}"
            )
        return cls.from_dict(value)


def read_document(value: Any) -> Any:
    """`value` with a JSON file path or JSON text read into what it holds; anything else as given.
    An unreadable file or malformed JSON is a `ScheduleError`."""
    if isinstance(value, Path) or (isinstance(value, str) and not value.lstrip().startswith(("{", "["))):
        path = Path(value)
        if not path.is_file():
            raise ScheduleError(f"schedule file {str(path)!r} does not exist")
        try:
            value = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise ScheduleError(f"schedule file {str(path)!r} could not be read: {error}") from None
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise ScheduleError(f"schedule file {str(path)!r} is not valid JSON: {error}") from None
    elif isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise ScheduleError(f"a schedule in JSON could not be parsed: {error}") from None
    return value


def _from_schema_1(data: dict[str, Any]) -> dict[str, Any]:
    """Schema 1 -> 2: the method's fields move into ``params``; those the method does not have
    (schema 1 stored all three for every method) are dropped."""
    method = get_method(data.get("method", "illava"))
    names = set(method.params_type.__dataclass_fields__)
    params = {}
    for key in _V1_PARAM_FIELDS:
        if key in data:
            value = data.pop(key)
            if key in names:
                params[key] = value
    data["params"] = params
    data["schema_version"] = SCHEMA_VERSION
    return data
