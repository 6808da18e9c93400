"""The contract of a reduction method, and the request the engine hands it at each stage.

A reduction method (tomesd style: a value with named call points) decides *which* image tokens
survive a merge and *what* each survivor becomes. The engine decides *where* merges happen and
*how many* tokens each one removes (from the schedule's plan), gathers the tokens of every segment
(an image, a video frame, a tile) that merges at that point, calls the method once per stage call
with all of them, and applies the returned `MergeMap` to the hidden states and to everything that
rides along (positions, DeepStack features, tapped hidden states).

Stages the engine calls (a method implements those it acts at):

* ``encoder`` -- inside a vision block, between attention and FFN (paper eq. 1), for the blocks in
  ``schedule.encoder_layers``. Tokens come in *units* (``request.unit`` consecutive tokens that a
  projector fuses; a unit is kept or dropped whole).
* ``between`` -- after the encoder (features in LLM tokens, one unit each) and before the LLM, for
  methods whose ``encoder_stage`` is ``"between"`` (VisionZip- or DivPrune-style selection). The
  encoder share of the removal is done here, in one step, instead of in encoder blocks.
* ``llm`` -- after a decoder layer at prefill (paper eq. 2), for ``schedule.llm_layers``; image
  tokens only, one unit each, causal order.

What a method may assume:

* every segment's token count equals ``step.tokens_in`` and it must keep exactly ``step.kept``
  units, of which ``step.recycled`` may be recycled centres (the plan's counts, known on the host);
* ``request.query`` / ``request.key`` are the post-rotary queries and keys the block or layer just
  used (captured from its own attention call), present when ``uses_importance`` is true;
* segments are contiguous in ``request`` and in order; unit ``i`` of the request is tokens
  ``i*unit .. (i+1)*unit - 1``.

What it must never do: read values back to the host (``.item()``, ``.tolist()``, ``nonzero``,
boolean-mask indexing) beyond what its algorithm needs, keep state between calls, let importance or
selection cross a segment boundary (one image must never change what another keeps), or return a
map whose counts differ from the plan's (the engine checks).
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..errors import ScheduleError
from ..merge import MergeMap, windowed_importance

STAGES = ("encoder", "between", "llm")


@dataclass(frozen=True)
class SegmentSpec:
    """One segment inside a stage request: where its units are and what the plan says for it."""

    start: int  # first unit of the segment in the request
    units: int  # units it has (== step.tokens_in)
    kept: int  # units it keeps
    recycled: int  # of the kept, how many may be recycled cluster centres
    index_in_item: int  # which frame/tile of its image or video this is (seeds `random`)


@dataclass
class StageRequest:
    """Everything a method sees at one stage call; built by the engine."""

    stage: str  # one of STAGES
    layer: int  # vision block or decoder layer index (-1 for "between")
    hidden: torch.Tensor  # (T, C), T = units * unit, segments one after another
    query: torch.Tensor | None  # (H, T, D) post-rotary, when the method uses importance
    key: torch.Tensor | None  # (Hk, T, D)
    segments: list[SegmentSpec]
    unit: int = 1
    scale: float | None = None  # the attention's softmax scale
    causal: bool = False  # LLM stage: query i saw keys 0..i
    bounds: Any = None  # encoder: the attention windows/frames (`illava.engine.vision.Bounds`)
    #: Encoder: (T,) each token's column mean of its window's (frame's) attention probabilities, heads
    #: averaged, when the block's own attention call yielded them (eager, or ``illava_packed``); None
    #: otherwise (a method that wants it recomputes it from `query` and `key`). Between, for a method
    #: with ``uses_importance``: (units,) the same for the encoder's last block, a unit scoring the
    #: mean of its tokens (`unit_importance`) -- what VisionZip's dominant tokens are chosen by.
    importance: torch.Tensor | None = None
    #: LLM stage, for a method whose `uses_text` is true: (T,) what its `text_importance` made of
    #: the layer's whole sequence (`PromptView`), laid out like `hidden` -- the text's view of the
    #: image (FastV, PyramidDrop, SparseVLM, text-guided iLLaVA). Between stage, for a method with
    #: ``uses_importance``: None (its importance is in `importance`).
    text_importance: torch.Tensor | None = None


@dataclass
class PromptView:
    """LLM stage: one decoder layer's whole prefill sequence, for methods that look at the text.

    Sequences are left padded (real tokens last), so every sample's *question* -- the tokens after
    its last image or video (the question and the chat template's closing tokens) -- sits in the
    last positions; `question` marks them among the last ``Q`` positions (counts known on the host
    before the forward, so building it reads nothing back)."""

    query: torch.Tensor  # (B, H, L, D) post-rotary, as the layer used them
    key: torch.Tensor  # (B, Hk, L, D)
    valid: torch.Tensor  # (B, L) real tokens
    image: torch.Tensor  # (B, L) image-content tokens
    question: torch.Tensor  # (B, Q) which of the last Q positions are the sample's question
    scale: float | None = None


@dataclass(frozen=True)
class MethodParams:
    """Base of a method's parameters: a frozen dataclass whose fields are the JSON keys of the
    method's sub-dict in a schedule. Subclasses list their fields with defaults."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class ReductionMethod(ABC):
    """A registered reduction method. Subclasses set the class attributes and implement the stages
    they act at; `register_method` makes them available by `name` in schedules."""

    #: Name in schedules, on the command line and in the database.
    name: ClassVar[str]
    #: One line for help texts and the README.
    summary: ClassVar[str] = ""
    #: The dataclass of this method's parameters (fields with defaults).
    params_type: ClassVar[type[MethodParams]] = MethodParams
    #: Whether the engine must capture queries and keys for it (a method that computes no
    #: importance, such as random dropping, leaves it false and costs no capture).
    uses_importance: ClassVar[bool] = True
    #: Whether an encoder merge reads the block's attention column means (`StageRequest.importance`);
    #: a method that needs only the captured keys (ToMe) sets it false, and the packed kernel then
    #: runs its fast path instead of computing them.
    uses_block_importance: ClassVar[bool] = True
    #: Where the encoder share of the removal happens: "blocks" (inside encoder blocks, at
    #: ``schedule.encoder_layers``) or "between" (one step after the encoder).
    encoder_stage: ClassVar[str] = "blocks"
    #: The most LLM layers a schedule of this method may merge after (None: any number).
    max_llm_layers: ClassVar[int | None] = None

    # ------------------------------------------------------------------ parameters
    def parse_params(self, data: Mapping[str, Any] | MethodParams | None) -> MethodParams:
        """Validated parameters from their JSON form; missing keys take their defaults."""
        if isinstance(data, self.params_type):
            return data
        if data is None:
            data = {}
        if isinstance(data, MethodParams):
            data = data.to_dict()
        if not isinstance(data, Mapping):
            raise ScheduleError(
                f"params of method {self.name!r} must be a JSON object, got {type(data).__name__} {data!r}"
            )
        allowed = [f.name for f in dataclasses.fields(self.params_type)]
        unknown = sorted(str(key) for key in data if key not in allowed)
        if unknown:
            raise ScheduleError(
                f"unknown parameter(s) {unknown} for method {self.name!r}; allowed: {allowed or 'none'}"
            )
        params = self.params_type(**data)
        problems = self.check_params(params)
        if problems:
            raise ScheduleError(f"invalid params for method {self.name!r}: " + "; ".join(problems))
        return params

    def check_params(self, params: MethodParams) -> list[str]:
        """Problems with `params`, each naming the field and what is allowed (empty when valid)."""
        return []

    def describe_params(self, params: MethodParams) -> str:
        """The parameters in a few characters, for one-line schedule descriptions."""
        return " ".join(f"{key}={value}" for key, value in params.to_dict().items())

    @property
    def acts_before_llm(self) -> bool:
        """Whether it removes tokens before the LLM (in encoder blocks, or between encoder and LLM)."""
        return self.acts_at("encoder" if self.encoder_stage == "blocks" else "between")

    def placement(self, schedule: Any) -> Any:
        """`schedule` moved onto the stages this method acts at (its reduction kept): all the removal
        in the LLM, or all before it, for a method acting on one side only, and at most
        `max_llm_layers` LLM layers (the first). How a seed or a comparison places a method."""
        changes: dict[str, Any] = {"method": self.name}
        if self.encoder_stage == "between":  # no encoder blocks merge
            changes["encoder_layers"] = ()
        if not self.acts_at("llm"):
            changes.update(encoder_share=1.0, llm_layers=())
        elif not self.acts_before_llm:
            changes.update(encoder_share=0.0, encoder_layers=())
        if self.max_llm_layers is not None and "llm_layers" not in changes:
            changes["llm_layers"] = tuple(schedule.llm_layers)[: self.max_llm_layers]
        return schedule.with_(**changes)

    def check_schedule(self, schedule: Any) -> list[str]:
        """Problems with a schedule that uses this method (empty when it can run): by default, a
        share of the removal at a stage the method does not act at, or too many LLM layers."""
        if schedule.reduction == 0:
            return []
        problems = []
        if (
            self.max_llm_layers is not None
            and schedule.encoder_share < 1
            and len(schedule.llm_layers) > self.max_llm_layers
        ):
            problems.append(
                f"method {self.name!r} merges after at most {self.max_llm_layers} LLM layer(s): got llm_layers "
                f"{list(schedule.llm_layers)}"
            )
        before_llm = "encoder" if self.encoder_stage == "blocks" else "between"
        if schedule.encoder_share > 0 and not self.acts_at(before_llm):
            problems.append(
                f"method {self.name!r} removes no tokens before the LLM: encoder_share must be 0, "
                f"got {schedule.encoder_share:g}"
            )
        if schedule.encoder_share < 1 and not self.acts_at("llm"):
            problems.append(
                f"method {self.name!r} removes tokens only before the LLM: encoder_share must be 1, "
                f"got {schedule.encoder_share:g}"
            )
        return problems

    # ------------------------------------------------------------------ planning
    def recycled(self, params: MethodParams, tokens_in: int, removed: int) -> int:
        """How many of a step's kept tokens are recycled centres (0: this method does not recycle)."""
        return 0

    def llm_split(self, params: MethodParams, tokens_in: int, removed: int, layers: int) -> list[int]:
        """How the LLM share of a segment's removal (`removed` of its `tokens_in` tokens entering the
        LLM) is spread over the schedule's `layers` LLM merges, in order: evenly by default (the
        counts differ by at most one, larger ones first)."""
        return split_evenly(removed, layers)

    # ------------------------------------------------------------------ stages
    def merge(self, params: MethodParams, request: StageRequest) -> MergeMap:
        """The merge at one stage call. The default dispatches to ``merge_<stage>``."""
        handler = getattr(self, f"merge_{request.stage}", None)
        if handler is None:
            raise NotImplementedError(f"method {self.name!r} does not act at the {request.stage!r} stage")
        return handler(params, request)

    def acts_at(self, stage: str) -> bool:
        return callable(getattr(self, f"merge_{stage}", None))

    # ------------------------------------------------------------------ the text's view
    def uses_text(self, params: MethodParams) -> bool:
        """Whether its LLM stage needs `StageRequest.text_importance` (then the engine builds a
        `PromptView` of the merging layer and calls `text_importance`)."""
        return False

    def text_importance(self, params: MethodParams, view: PromptView) -> torch.Tensor:
        """(B, L) a score per token of the sequence from the text's view of it; only the image
        tokens' scores are used. Called when `uses_text` is true."""
        raise NotImplementedError(f"method {self.name!r} does not score tokens by the text")


def split_evenly(total: int, parts: int) -> list[int]:
    """`total` split into `parts` integers that differ by at most one, larger ones first."""
    if parts == 0:
        return []
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def unit_importance(request: StageRequest) -> torch.Tensor:
    """(units,) importance of every unit of the request, never crossing an attention segment.

    Encoder: the column mean of each window's (or frame's) attention, a unit scoring the mean of its
    tokens. LLM: computed per segment in `segment_importance` instead (causal, per image/frame).
    """
    if request.importance is not None:  # from the block's own attention call
        return request.importance.view(-1, request.unit).mean(dim=1)
    query, key, bounds = request.query, request.key, request.bounds
    if bounds is None or bounds.host is not None:
        host = bounds.host if bounds is not None else [0, query.shape[1]]
        scores = windowed_importance(query, key, host, scale=request.scale)
    else:
        scores = windowed_importance(query, key, cu=bounds.cu, longest=bounds.longest, scale=request.scale)
    return scores.view(-1, request.unit).mean(dim=1)


# ----------------------------------------------------------------------------------- field checks
def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool)) and math.isfinite(value)


def check_int(name: str, value: Any, minimum: int, problems: list[str]) -> None:
    if not is_int(value) or value < minimum:
        problems.append(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_fraction(name: str, value: Any, problems: list[str], *, high_open: bool = True) -> None:
    interval = "[0, 1)" if high_open else "[0, 1]"
    if not is_real(value) or value < 0 or (value >= 1 if high_open else value > 1):
        problems.append(f"{name} must be a number in {interval}, got {value!r}")
