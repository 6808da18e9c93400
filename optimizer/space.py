"""The search space: which schedules a tuning job may try, and how one Optuna trial picks one.

Every schedule is drawn through these parameters. The names are fixed, so a sampler models the
same parameter across trials and across a resumed study:

====================  ===========  =====================================================
name                  kind         meaning
====================  ===========  =====================================================
reduction             float        fraction of image tokens removed (a fixed ratio is a one-point range)
method                categorical  one of `methods`
encoder_share         float        fraction of the removal done in the encoder
encoder_layer_count   int          how many encoder blocks merge
encoder_layer_{i}     int          slot i < encoder_layer_count, in [0, encoder_depth - 1]
llm_layer_count       int          how many decoder layers merge
llm_layer_{i}         int          slot i < llm_layer_count, in [0, llm_depth - 2]
recycle_share         float        iLLaVA: share of kept tokens that are recycled cluster tokens
group_size            categorical  iLLaVA: M, discarded tokens each cluster token absorbs
contextual_share      float        VisionZip: share of kept tokens that are merged contextual tokens
recycle_ratio         float        SparseVLM: share of removed tokens recycled into cluster tokens
====================  ===========  =====================================================

A method's own parameters are drawn only in trials of that method (conditional parameters, the
Optuna way); parameters not listed here (``text_guided``, ToMe's ``prop_attn``, SparseVLM's
``cluster_ratio``, ``random``'s ``seed``) stay at the method's defaults.

Layer slots are sorted and a collision moves the later layer to the next free one
(`illava.schedule.map_layers` with an identity mapping), so every draw gives distinct,
increasing layers, and a schedule whose layers are already distinct maps to itself: that is what
lets `schedule_params` reproduce any schedule through `study.enqueue_trial`.

A trial whose ``reduction`` is 0 is the unmerged model and draws nothing else. 0 usually lies
outside the range searched; it enters a study only through `seed_study`, as a reference point.
Optuna accepts an enqueued value outside a parameter's range (it warns; `suggest` silences that
warning because seeded reference points are outside on purpose).
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from illava.methods import get_method
from illava.schedule import METHODS, Schedule, map_layers

if TYPE_CHECKING:
    import optuna

FloatRange = float | tuple[float, float]
#: Method parameters the space searches as floats, each with a `SearchSpace` range of its name.
SEARCHED_FLOATS = ("recycle_share", "contextual_share", "recycle_ratio")
IntRange = int | tuple[int, int]


class SearchSpaceError(ValueError):
    """A search space (or a schedule it should reproduce) that cannot be used; the message says why."""


def parse_range(text: str) -> float | int | tuple[float | int, float | int]:
    """``"0.5:0.95"`` -> ``(0.5, 0.95)``, ``"0.778"`` -> ``0.778``, ``"1:3"`` -> ``(1, 3)``.

    Each side is an int when written as one, else a float. Raises `SearchSpaceError` for text
    that is not one number or two numbers separated by ``:`` with the low side first.
    """
    parts = str(text).strip().split(":")
    if len(parts) > 2:
        raise SearchSpaceError(
            f"range {text!r} has {len(parts) - 1} ':'; write one value (0.778) or LOW:HIGH (0.5:0.95)"
        )
    numbers = [_number(part, text) for part in parts]
    if len(numbers) == 1:
        return numbers[0]
    low, high = numbers
    if low > high:
        raise SearchSpaceError(f"range {text!r} has its low side {low} above its high side {high}; write LOW:HIGH")
    return (low, high)


def _number(part: str, text: str) -> float | int:
    part = part.strip()
    try:
        return int(part)
    except ValueError:
        pass
    try:
        value = float(part)
    except ValueError:
        raise SearchSpaceError(f"range {text!r}: {part!r} is not a number; write one value or LOW:HIGH") from None
    if not math.isfinite(value):
        raise SearchSpaceError(f"range {text!r}: {part!r} is not a finite number")
    return value


@dataclass(frozen=True)
class SearchSpace:
    """Where a tuning job may look. A single number fixes that field; a (low, high) pair is searched.

    Defaults: remove 50-95% of image tokens, up to 80% of it in the encoder, over 1-3 encoder
    blocks and 1-3 decoder layers, recycling up to 30% of kept tokens in groups of 3, 5 or 8.
    """

    reduction: FloatRange = (0.5, 0.95)
    encoder_share: FloatRange = (0.0, 0.8)
    encoder_layer_count: IntRange = (1, 3)
    llm_layer_count: IntRange = (1, 3)
    recycle_share: FloatRange = (0.0, 0.3)
    group_size: tuple[int, ...] = (3, 5, 8)
    methods: tuple[str, ...] = ("illava",)
    contextual_share: FloatRange = (0.0, 0.3)  # around VisionZip's 10 of 64 (0.16)
    recycle_ratio: FloatRange = (0.0, 0.6)  # around SparseVLM's 0.3

    def __post_init__(self) -> None:
        problems: list[str] = []
        set_ = object.__setattr__
        set_(self, "reduction", _float_range("reduction", self.reduction, 0.0, 1.0, False, problems))
        set_(self, "encoder_share", _float_range("encoder_share", self.encoder_share, 0.0, 1.0, True, problems))
        for name in SEARCHED_FLOATS:
            set_(self, name, _float_range(name, getattr(self, name), 0.0, 1.0, name == "recycle_ratio", problems))
        set_(self, "encoder_layer_count", _int_range("encoder_layer_count", self.encoder_layer_count, problems))
        set_(self, "llm_layer_count", _int_range("llm_layer_count", self.llm_layer_count, problems))
        set_(self, "group_size", _choices("group_size", self.group_size, problems))
        set_(self, "methods", _methods(self.methods, problems))
        if problems:
            raise SearchSpaceError("invalid search space: " + "; ".join(problems))

    # ------------------------------------------------------------------ ranges
    @staticmethod
    def bounds(value: float | int | tuple) -> tuple:
        """(low, high) of a field: a fixed value is a one-point range."""
        return tuple(value) if isinstance(value, tuple) else (value, value)

    def check_fits(self, *, encoder_depth: int, llm_depth: int) -> None:
        """Raise `SearchSpaceError` if a model of these depths has too few layers for the counts.

        Merges run in encoder blocks 0..encoder_depth-1 and after decoder layers 0..llm_depth-2.
        """
        problems = []
        most_encoder = self.bounds(self.encoder_layer_count)[1]
        most_llm = self.bounds(self.llm_layer_count)[1]
        if encoder_depth < 1 or llm_depth < 2:
            problems.append(
                f"a model needs >= 1 encoder block and >= 2 decoder layers, got {encoder_depth} and {llm_depth}"
            )
        elif most_encoder > encoder_depth:
            problems.append(f"encoder_layer_count goes up to {most_encoder} but the encoder has {encoder_depth} blocks")
        if llm_depth >= 2 and most_llm > llm_depth - 1:
            problems.append(
                f"llm_layer_count goes up to {most_llm} but a {llm_depth}-layer LLM has {llm_depth - 1} layers "
                f"a merge can follow (0..{llm_depth - 2})"
            )
        if problems:
            raise SearchSpaceError("search space does not fit this model: " + "; ".join(problems))

    # ------------------------------------------------------------------ sampling
    def suggest(self, trial: optuna.Trial, *, encoder_depth: int, llm_depth: int) -> Schedule:
        """Draw one schedule through `trial`; always valid and always fits the model."""
        self.check_fits(encoder_depth=encoder_depth, llm_depth=llm_depth)
        with warnings.catch_warnings():
            # Seeded reference points (the unmerged model, paper defaults at other ratios) are
            # enqueued outside the searched ranges on purpose.
            warnings.filterwarnings("ignore", message=r"Fixed parameter .* is out of range", category=UserWarning)
            # The same, read back through `optuna.trial.FixedTrial` (a stored trial's parameters).
            warnings.filterwarnings("ignore", message=r"The value .* is out of the range", category=UserWarning)
            reduction = trial.suggest_float("reduction", *self.bounds(self.reduction))
            if reduction == 0.0:
                return Schedule.vanilla()
            method = trial.suggest_categorical("method", list(self.methods))
            stages = get_method(method)
            before, inside = stages.acts_before_llm, stages.acts_at("llm")
            # A method acting on one side of the LLM only draws nothing for the other (conditional
            # parameters): its share is fixed and its unused layers are empty.
            if before and inside:
                encoder_share = trial.suggest_float("encoder_share", *self.bounds(self.encoder_share))
            else:
                encoder_share = 1.0 if before else 0.0
            in_blocks = before and stages.encoder_stage == "blocks"
            encoder_layers = (
                _suggest_layers(trial, "encoder", self.encoder_layer_count, encoder_depth - 1) if in_blocks else ()
            )
            cap = stages.max_llm_layers
            llm_count = (
                self.llm_layer_count
                if cap is None
                else None
                if cap == 1
                else (1, min(cap, self.bounds(self.llm_layer_count)[1]))
            )
            llm_layers = _suggest_layers(trial, "llm", llm_count, llm_depth - 2) if inside else ()
            params = self._suggest_params(trial, method)
        return Schedule(
            method=method,
            reduction=reduction,
            encoder_share=encoder_share,
            encoder_layers=encoder_layers,
            llm_layers=llm_layers,
            params=params,
        )

    def _suggest_params(self, trial: optuna.Trial, method: str) -> dict[str, Any]:
        """The method's own parameters that this space searches (conditional on the method, the
        Optuna way: a trial of a method without them never suggests them)."""
        names = set(get_method(method).params_type.__dataclass_fields__)
        params: dict[str, Any] = {}
        for name in SEARCHED_FLOATS:
            if name in names:
                params[name] = trial.suggest_float(name, *self.bounds(getattr(self, name)))
        if "group_size" in names:
            params["group_size"] = trial.suggest_categorical("group_size", list(self.group_size))
        return params

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        return {f.name: _jsonable(getattr(self, f.name)) for f in fields(self)}

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SearchSpace:
        """Inverse of `to_dict`; lists become tuples; unknown keys are rejected by name."""
        if not isinstance(data, Mapping):
            raise SearchSpaceError(
                f"a search space must be a mapping of field names to values, got {type(data).__name__}"
            )
        allowed = [f.name for f in fields(cls)]
        unknown = sorted(str(key) for key in data if key not in allowed)
        if unknown:
            raise SearchSpaceError(f"unknown search space keys {unknown}; allowed keys are {allowed}")
        return cls(**{key: tuple(value) if isinstance(value, list) else value for key, value in data.items()})

    @classmethod
    def from_json(cls, text: str) -> SearchSpace:
        return cls.from_dict(json.loads(text))


def schedule_params(schedule: Schedule, space: SearchSpace) -> dict[str, Any]:
    """The parameters that make `space.suggest` reproduce `schedule` (for ``study.enqueue_trial``).

    Values outside the space's ranges are allowed (they are reference points); what `suggest`
    cannot express at all raises `SearchSpaceError`: a method or group size that is not one of
    the space's choices, a stage with no layers, or a non-default ``seed``.
    """
    schedule = Schedule.coerce(schedule)
    if schedule.removes_nothing:
        return {"reduction": 0.0}
    problems = []
    if schedule.method not in space.methods:
        problems.append(f"method {schedule.method!r} is not among the space's methods {list(space.methods)}")
    own = schedule.params.to_dict()
    if "group_size" in own and own["group_size"] not in space.group_size:
        problems.append(f"group_size {own['group_size']} is not among the space's choices {list(space.group_size)}")
    stages = get_method(schedule.method) if schedule.method in space.methods else None
    in_blocks = stages is not None and stages.acts_before_llm and stages.encoder_stage == "blocks"
    if (in_blocks and not schedule.encoder_layers) or (
        stages is not None and stages.acts_at("llm") and not schedule.llm_layers
    ):
        problems.append(
            "suggest always merges in at least one encoder block and one decoder layer where the method acts"
        )
    if stages is not None:
        defaults = dataclasses.asdict(stages.params_type())  # every field, set or not
        for name, value in own.items():
            if name not in (*SEARCHED_FLOATS, "group_size") and value != defaults.get(name):
                problems.append(f"{name} {value!r} is not searched (suggest always uses {defaults.get(name)!r})")
    if problems:
        raise SearchSpaceError("this schedule cannot be reproduced by the search space: " + "; ".join(problems))
    params: dict[str, Any] = {"reduction": float(schedule.reduction), "method": schedule.method}
    if stages.acts_before_llm and stages.acts_at("llm"):
        params["encoder_share"] = float(schedule.encoder_share)
    if in_blocks:
        params["encoder_layer_count"] = len(schedule.encoder_layers)
        params.update({f"encoder_layer_{i}": layer for i, layer in enumerate(schedule.encoder_layers)})
    if stages.acts_at("llm"):
        if stages.max_llm_layers != 1:
            params["llm_layer_count"] = len(schedule.llm_layers)
        params.update({f"llm_layer_{i}": layer for i, layer in enumerate(schedule.llm_layers)})
    for name in SEARCHED_FLOATS:
        if name in own:
            params[name] = float(own[name])
    if "group_size" in own:
        params["group_size"] = own["group_size"]
    return params


# ----------------------------------------------------------------------------------- helpers
def _suggest_layers(trial: optuna.Trial, stage: str, count_range: IntRange | None, max_index: int) -> tuple[int, ...]:
    # None: one layer, not drawn (a method that merges after a single layer has nothing to learn there).
    count = 1 if count_range is None else trial.suggest_int(f"{stage}_layer_count", *SearchSpace.bounds(count_range))
    slots = [trial.suggest_int(f"{stage}_layer_{i}", 0, max_index) for i in range(count)]
    # Identity mapping: sorts nothing itself, only makes sorted slots distinct within [0, max_index].
    return map_layers(tuple(sorted(slots)), 1, 1, max_index=max_index)


def _float_range(name: str, value: Any, low: float, high: float, high_ok: bool, problems: list[str]) -> FloatRange:
    interval = f"[{low}, {high}{']' if high_ok else ')'}"
    pair = _pair(value)
    if pair is None or not all(_is_real(v) for v in pair):
        problems.append(f"{name} must be a number or a (low, high) pair of numbers in {interval}, got {value!r}")
        return value
    lo, hi = float(pair[0]), float(pair[1])
    inside = all(low <= v < high or (high_ok and v == high) for v in (lo, hi))
    if not inside:
        problems.append(f"{name} {value!r} must lie in {interval}")
    elif lo > hi:
        problems.append(f"{name} {value!r} has low {lo} above high {hi}")
    return (lo, hi) if isinstance(value, tuple | list) else lo


def _int_range(name: str, value: Any, problems: list[str]) -> IntRange:
    pair = _pair(value)
    if pair is None or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair):
        problems.append(f"{name} must be an integer or a (low, high) pair of integers >= 1, got {value!r}")
        return value
    if min(pair) < 1:
        problems.append(f"{name} {value!r} must be >= 1: each stage merges in at least one layer")
    elif pair[0] > pair[1]:
        problems.append(f"{name} {value!r} has low {pair[0]} above high {pair[1]}")
    return (pair[0], pair[1]) if isinstance(value, tuple | list) else pair[0]


def _choices(name: str, value: Any, problems: list[str]) -> tuple[int, ...]:
    items = (value,) if isinstance(value, int) else value
    if (
        not isinstance(items, tuple | list)
        or not items
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in items)
    ):
        problems.append(f"{name} must be a non-empty list of integers >= 1, got {value!r}")
        return value
    if len(set(items)) != len(items):
        problems.append(f"{name} {list(items)} repeats a choice")
    return tuple(items)


def _methods(value: Any, problems: list[str]) -> tuple[str, ...]:
    items = (value,) if isinstance(value, str) else value
    if not isinstance(items, tuple | list) or not items:
        problems.append(f"methods must be a non-empty list drawn from {list(METHODS)}, got {value!r}")
        return value
    unknown = [m for m in items if m not in METHODS]
    if unknown:
        problems.append(f"unknown methods {unknown}; allowed: {list(METHODS)}")
    elif len(set(items)) != len(items):
        problems.append(f"methods {list(items)} repeats a method")
    return tuple(items)


def _pair(value: Any) -> tuple[Any, Any] | None:
    if isinstance(value, tuple | list):
        return (value[0], value[1]) if len(value) == 2 else None
    return (value, value)


def _is_real(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
