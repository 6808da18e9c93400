"""The encoder side of the engine: merges inside vision blocks, for any backbone adapter.

The adapter turns pixel values into a `VisionRun` (tokens in the order its blocks process them,
segments contiguous, with per-unit bookkeeping), runs each block (or each half of a merging
block), and at the end projects the surviving units and places them among the item's LLM
tokens. The engine in between owns everything that does not depend on the family:

* which blocks merge and how much (the schedule's plan per segment, known on the host);
* capturing the block's queries and keys from its own attention call (`capture`);
* calling the reduction method and checking its map against the plan;
* applying the map: hidden states and taps merged, per-token tensors (rotary tables) and
  per-unit ids (placement order, window) gathered, units per segment updated on the host;
* attention boundaries after a merge: frames from the host counts, windows from the kept
  units' window ids (one read per merge, where the library itself reads each block's lengths);
* the between-encoder-and-LLM stage on the projected features;
* statistics: units per segment entering every block.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ..errors import ScheduleError
from ..merge import MergeMap
from ..methods import SegmentSpec, StageRequest
from ..methods.base import unit_importance
from ..schedule import LayerStep, Plan, Schedule
from .attention import Route, is_packed, run_packed
from .capture import capture


# ----------------------------------------------------------------------------------- host layout
@dataclass(frozen=True)
class ItemLayout:
    """How one image or video sits in the prompt, known on the host from its grid or size.

    Placeholders are numbered 0..placeholders-1 in the order they appear in the prompt; each
    belongs to a segment (an image, a video frame, a tile) or is structural (-1: a token the
    family adds that is not image content, such as LLaVA-OneVision's row newlines; never merged,
    never counted by a plan).
    """

    placeholders: int
    segment_of: tuple[int, ...]  # per placeholder: segment index within the item, or -1
    segment_sizes: tuple[int, ...]  # LLM tokens per segment (what a plan is made for)

    @classmethod
    def contiguous(cls, segment_sizes: list[int]) -> ItemLayout:
        """Segments one after another, nothing structural (the Qwen families)."""
        segment_of = tuple(s for s, size in enumerate(segment_sizes) for _ in range(size))
        return cls(len(segment_of), segment_of, tuple(segment_sizes))


@dataclass
class VisualCall:
    """One encoder call: the pixel values of one modality and what the adapter needs with them."""

    modality: str  # "image" or "video"
    pixel_values: torch.Tensor
    meta: dict[str, Any]  # the family's own inputs (grid_thw, image_sizes, ...)
    items: list[ItemLayout]


@dataclass(frozen=True)
class Bounds:
    """Where a block's attention segments (windows, or whole frames/tiles) start and end, in tokens:
    ``cu`` on the device (int32 cu_seqlens), ``host`` the same on the host when it is known there
    (None after a merge inside windows: then only the device knows the kept sizes, and nothing is
    read back), ``longest`` a host-known bound on their lengths (what flash kernels and the padded
    importance need)."""

    cu: torch.Tensor
    host: list[int] | None
    longest: int
    #: What kernels derive from these bounds once and reuse in every block until the next merge
    #: (the packed kernel's padded layout of ragged segments), by name.
    derived: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


@dataclass
class VisionRun:
    """The encoder's working sequence. The adapter builds it; the engine updates it on merges.

    Tokens are in the order the family's blocks process them, segments contiguous and in item order;
    ``unit`` consecutive tokens are kept or dropped together.
    """

    hidden: torch.Tensor  # (N, C)
    unit: int
    segment_units: list[int]  # host: units per encoder segment, now
    segment_item: list[int]  # host: the item of each segment
    segment_index_in_item: list[int]  # host: the segment's index within its item
    order: torch.Tensor  # (U,) each unit's placement index among its item's LLM tokens
    window: torch.Tensor | None = None  # (U,) attention window id per unit (windowed blocks)
    window_units: list[int] | None = None  # host: units per window before any merge
    gathered: dict[str, torch.Tensor] = field(default_factory=dict)  # (N, ...) per token, gathered on merges
    taps: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # (N, C) per token, merged like hidden
    #: Unit indices the family would discard after the encoder anyway (LLaVA-OneVision's unpadding);
    #: removed before the first merge so that what remains is what the plan counts.
    drop_before_merge: torch.Tensor | None = None
    drop_counts: list[int] | None = None  # host: units each segment loses to `drop_before_merge`
    #: Why encoder merges cannot run on this input (None: they can); raised when a plan asks for them.
    no_encoder_merge: str | None = None
    context: dict[str, Any] = field(default_factory=dict)  # adapter-private
    #: (U,) float32: how many original units each unit stands for, once a size-weighted merge (ToMe)
    #: has run; None: all one. Later size-weighted merges weigh by it; the projector does not see it.
    sizes: torch.Tensor | None = None
    #: Whether the blocks after a merge add log(size) of each key to their attention logits (ToMe's
    #: proportional attention: set by a map with ``proportional_attention``, kept to the encoder's end).
    proportional: bool = False
    _bounds: dict[tuple[bool, bool], Bounds] = field(default_factory=dict)
    _merged_windows: bool = False  # whether a merge has changed the windows (their sizes are device-only)

    @property
    def device(self) -> torch.device:
        return self.hidden.device

    def attention_bounds(self, windowed: bool, *, device_only: bool = False) -> Bounds:
        """The attention segments of a block -- windows, or whole segments -- cached until the next
        merge. Segment sizes are always known on the host (the plan); window sizes only until a merge
        inside them. After that, with `device_only` (an attention that takes device bounds and empty
        windows: ``illava_packed``) they are counted on the device and nothing is read back;
        otherwise the windows left are read back once per merge (the library's per-window calls
        read their lengths anyway, three times per block)."""
        key = (windowed, device_only)
        if key not in self._bounds:
            if windowed and self.window is not None and self._merged_windows:
                longest = max(self.window_units) * self.unit
                if device_only:
                    counts = torch.bincount(self.window, minlength=len(self.window_units)) * self.unit
                    cu = torch.nn.functional.pad(counts.cumsum(0), (1, 0)).to(torch.int32)
                    self._bounds[key] = Bounds(cu, None, longest)
                else:  # one read: the kept units per window, empty windows left out on the host
                    counts = torch.bincount(self.window, minlength=len(self.window_units)).tolist()
                    host = list(itertools.accumulate((c * self.unit for c in counts if c), initial=0))
                    cu = torch.tensor(host, dtype=torch.int32).to(self.device, non_blocking=True)
                    self._bounds[key] = Bounds(cu, host, longest)
            else:
                units = self.window_units if windowed and self.window is not None else self.segment_units
                host = list(itertools.accumulate((n * self.unit for n in units), initial=0))
                cu = torch.tensor(host, dtype=torch.int32).to(self.device, non_blocking=True)
                self._bounds[key] = Bounds(cu, host, max(units) * self.unit)
        return self._bounds[key]

    def route(self, adapter, bounds: Bounds) -> Route | None:
        """What a block's attention needs routed to the packed kernel for proportional attention (None
        when this run has none): its bounds and the key bias, log(size) of each token's unit, laid out
        like the keys of the call. A packed tower's call (batch 1) takes the tokens as they are; for a
        batch the adapter pads (LLaVA-OneVision's tiles), the layout is found by running the adapter's
        own un-padding (`vision_queries_keys`) on the positions of the batch -- nothing read back."""
        if not self.proportional:
            return None
        token_bias = self.sizes.log()[:, None].expand(-1, self.unit).reshape(-1)  # (N,)

        def key_bias(batch: int, length: int) -> torch.Tensor:
            if batch == 1 and length == token_bias.shape[0]:
                return token_bias[None]
            positions = torch.arange(batch * length, device=token_bias.device).view(batch, 1, length, 1)
            _, taken_from = adapter.vision_queries_keys(_LayoutProbe(positions, positions), self)  # (1, N, 1)
            laid_out = token_bias.new_zeros(batch * length).index_copy_(0, taken_from.reshape(-1), token_bias)
            return laid_out.view(batch, length)  # padding: 0 (masked by the call anyway)

        return Route(bounds=bounds, key_bias=key_bias)

    def take(self, merge_map: MergeMap, hidden: torch.Tensor, units_after: list[int]) -> None:
        """Apply a merge: hidden and taps merged (size-weighted where the map says so), ids and per-token
        tensors gathered, sizes carried on."""
        sizes = self.sizes
        self.hidden = merge_map.apply(hidden, self.unit, sizes)
        self.taps = {name: [merge_map.apply(t, self.unit, sizes) for t in taps] for name, taps in self.taps.items()}
        if sizes is not None or merge_map.tracks_sizes:
            self.sizes = merge_map.sizes_after(sizes)
        self.proportional = self.proportional or merge_map.proportional_attention
        if self.gathered:
            tokens = merge_map.token_index(self.unit)
            self.gathered = {name: t[tokens] for name, t in self.gathered.items()}
        self.order = self.order[merge_map.keep]
        if self.window is not None:
            self.window = self.window[merge_map.keep]
            self._merged_windows = True
        self.segment_units = units_after
        self._bounds.clear()


@dataclass(frozen=True)
class _LayoutProbe:
    """Stands in for a capture in `VisionRun.route`: "queries" and "keys" that are batch positions."""

    query: torch.Tensor
    key: torch.Tensor


@dataclass
class EncodedVisual(BaseModelOutputWithPooling):
    """What the merged encoder hands the LLM for one modality. `pooler_output` is a tuple with one
    (K_i, C) tensor of kept features per item, in placement order; `kept` says which of the item's
    placeholders they fill. Fields default to None (a transformers `ModelOutput`)."""

    kept: list[torch.Tensor] | None = None  # per item: kept placeholder indices (K_i,), ascending
    extras: dict[str, list[torch.Tensor]] | None = None  # per name, per item: (K_i, ...) features that ride along
    items: list[ItemLayout] | None = None
    encoder_units: list[list[int]] | None = None  # per block: units per segment entering attention
    merge_seconds: float | None = None

    def select(self, items: list[int]) -> EncodedVisual:
        """The same output for the items `items` (repeats allowed), as `generate` expands batches."""
        return EncodedVisual(
            last_hidden_state=self.last_hidden_state,
            pooler_output=tuple(self.pooler_output[i] for i in items),
            kept=[self.kept[i] for i in items],
            extras={name: [values[i] for i in items] for name, values in (self.extras or {}).items()},
            items=[self.items[i] for i in items],
            encoder_units=self.encoder_units,
            merge_seconds=self.merge_seconds,
        )


# ----------------------------------------------------------------------------------- timing
class MergeTimer:
    """Wall time of the merge work when asked for: selection, merging and re-packing, and the
    importance a merge computes itself (the LLM's). A merging vision block's importance comes out of
    the block's own attention, computed explicitly for it (`illava.engine.attention`); what that
    costs over the block's usual kernel is not in it. Synchronises around each merge on CUDA, so it
    is for benchmarks, not for production runs."""

    def __init__(self, enabled: bool, device: torch.device):
        self.enabled, self.device = enabled, device
        self.seconds = 0.0

    def __enter__(self) -> None:
        if self.enabled:
            _sync(self.device)
            self.start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            _sync(self.device)
            self.seconds += time.perf_counter() - self.start


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------- the loop
def segment_specs(steps: list[LayerStep], index_in_item: list[int]) -> list[SegmentSpec]:
    """Stage-request segments, one after another, from their plan steps."""
    specs, start = [], 0
    for step, index in zip(steps, index_in_item, strict=True):
        specs.append(SegmentSpec(start, step.tokens_in, step.kept, step.recycled, index))
        start += step.tokens_in
    return specs


def check_map(merge_map: MergeMap, specs: list[SegmentSpec], where: str) -> None:
    """A method's map must keep what the plan says; its length is host-known, so this reads nothing."""
    expected = sum(spec.kept for spec in specs)
    if merge_map.keep.shape[0] != expected:
        raise RuntimeError(
            f"illava: the method kept {merge_map.keep.shape[0]} units at {where}, the plan says {expected}"
        )


def encode(
    adapter, inner: torch.nn.Module, call: VisualCall, schedule: Schedule, plans: list[Plan], *, time_merges: bool
) -> EncodedVisual:
    """Run the vision encoder of `call` with the merges `plans` (one per segment of the call's
    items, in order) ask for; see the module docstring."""
    method, params = schedule.reduction_method, schedule.params
    run = adapter.vision_prepare(inner, call)
    timer = MergeTimer(time_merges, run.device)
    blocks = adapter.vision_blocks(inner)
    merging = {step.layer for plan in plans for step in plan.encoder if step.removed}
    between = [plan.between for plan in plans]
    merges_before_llm = bool(merging) or any(step is not None and step.removed for step in between)
    if merges_before_llm and run.no_encoder_merge:
        raise ScheduleError(f"illava: {run.no_encoder_merge}")
    if merges_before_llm and len(plans) != len(run.segment_units):
        raise RuntimeError(
            f"illava: the adapter made {len(run.segment_units)} encoder segments for {len(plans)} planned"
        )
    first = min(merging) if merging and run.drop_before_merge is not None else None  # where the drop goes
    encoder_units: list[list[int]] = []
    packed = is_packed(adapter.vision_attention(blocks[0]).config) if len(blocks) else False
    # A between-stage method that uses importance reads the attention of the encoder's last block.
    scored = len(blocks) - 1 if method.uses_importance and any(s is not None and s.removed for s in between) else None
    importance = None
    for index, block in enumerate(blocks):
        if index == first:
            with timer:
                _drop(run)
        encoder_units.append(list(run.segment_units))
        windowed = adapter.vision_block_windowed(inner, index)
        if index in merging:
            steps = [plan.encoder[schedule.encoder_layers.index(index)] for plan in plans]
            _merging_block(adapter, inner, block, index, windowed, run, steps, method, params, timer, packed)
        elif index == scored:
            importance = _scored_block(adapter, inner, block, index, windowed, run, timer)
        else:
            bounds = run.attention_bounds(windowed, device_only=packed or run.proportional)
            with _routed(adapter.vision_attention(block), packed, run.route(adapter, bounds)):
                run.hidden = adapter.vision_block(inner, block, run, bounds)
        adapter.after_vision_block(inner, index, run)
    features, extras = adapter.vision_project(inner, run)  # (U, C_out) per unit, in run order
    if any(step is not None and step.removed for step in between):
        with timer:
            if (
                run.drop_before_merge is not None
            ):  # what the family discards anyway goes first (the plan counts without it)
                keep = MergeMap(keep=run.drop_before_merge)
                features = keep.apply(features)
                extras = {
                    name: keep.apply(t.reshape(t.shape[0], -1)).view(-1, *t.shape[1:]) for name, t in extras.items()
                }
                if importance is not None:
                    importance = importance[keep.keep]
                _drop(run)
            features, extras = _between(run, features, extras, between, method, params, importance)
    encoded = adapter.vision_place(inner, call, run, features, extras)
    encoded.encoder_units = encoder_units
    encoded.merge_seconds = timer.seconds
    return encoded


def _drop(run: VisionRun) -> None:
    """Remove the units the family discards after the encoder anyway, before the first merge."""
    keep = run.drop_before_merge
    run.take(MergeMap(keep=keep), run.hidden, [u - d for u, d in zip(run.segment_units, run.drop_counts, strict=True)])
    run.drop_before_merge = None


def _routed(attention: torch.nn.Module, packed: bool, route: Route | None = None):
    """The block's attention routed to the packed kernel: under ``illava_packed``, and with a `route`
    (proportional attention) under any implementation -- the kernel then adds the key bias."""
    if route is not None:
        return run_packed(attention, route)
    return run_packed(attention) if packed else contextlib.nullcontext()


def _merging_block(adapter, inner, block, index, windowed, run, steps, method, params, timer, packed) -> None:
    """One vision block with Token_Merge between attention and FFN (paper eq. 1)."""
    for segment, (units, step) in enumerate(zip(run.segment_units, steps, strict=True)):
        if step.tokens_in != units:
            raise RuntimeError(
                f"illava: encoder segment {segment} has {units} units, the plan expected {step.tokens_in}"
            )
    bounds = run.attention_bounds(windowed, device_only=packed or run.proportional)
    attention = adapter.vision_attention(block)
    # Routed outside the capture, which then captures from the routed (packed) kernel: the capture
    # routes ``illava_packed`` itself, so without a route only an uncaptured packed block is routed here.
    route = run.route(adapter, bounds)
    routed = _routed(attention, packed and not method.uses_importance, route)
    wants = method.uses_block_importance
    with routed, capture(attention, enabled=method.uses_importance, importance=wants) as captured:
        hidden = adapter.vision_attention_half(inner, block, run, bounds)
    with timer:
        specs = segment_specs(steps, run.segment_index_in_item)
        query, key = adapter.vision_queries_keys(captured, run) if captured else (None, None)
        request = StageRequest(
            stage="encoder", layer=index, hidden=hidden, query=query, key=key,
            importance=captured.importance if captured and wants and adapter.packed_sequence else None,
            segments=specs, unit=run.unit, scale=adapter.attention_scale(attention), bounds=bounds,
        )  # fmt: skip
        merge_map = method.merge(params, request)
        check_map(merge_map, specs, f"vision block {index}")
        run.take(merge_map, hidden, [step.kept for step in steps])
    run.hidden = adapter.vision_ffn_half(inner, block, run)


def _scored_block(adapter, inner, block, index, windowed, run, timer) -> torch.Tensor:
    """A block run with its attention captured: (units,) each unit's importance in it (the column
    mean of its window's or frame's attention, `unit_importance`), for a between-stage method."""
    bounds = run.attention_bounds(windowed)
    attention = adapter.vision_attention(block)
    with capture(attention, enabled=True) as captured:
        run.hidden = adapter.vision_block(inner, block, run, bounds)
    with timer:
        query, key = adapter.vision_queries_keys(captured, run)
        request = StageRequest(
            stage="encoder", layer=index, hidden=run.hidden, query=query, key=key,
            importance=captured.importance if adapter.packed_sequence else None,
            segments=[], unit=run.unit, scale=adapter.attention_scale(attention), bounds=bounds,
        )  # fmt: skip
        return unit_importance(request)


def _between(run, features, extras, steps, method, params, importance):
    """The stage between encoder and LLM, on the projected features (one unit each)."""
    steps = [step if step is not None else LayerStep(-1, units, 0, 0) for step, units in zip(steps, run.segment_units)]
    specs = segment_specs(steps, run.segment_index_in_item)
    request = StageRequest(stage="between", layer=-1, hidden=features, query=None, key=None, segments=specs,
                           importance=importance)  # fmt: skip
    merge_map = method.merge(params, request)
    check_map(merge_map, specs, "the stage between encoder and LLM")
    run.order = run.order[merge_map.keep]
    run.segment_units = [step.kept for step in steps]
    extras = {name: merge_map.apply(t.reshape(t.shape[0], -1)).view(-1, *t.shape[1:]) for name, t in extras.items()}
    return merge_map.apply(features), extras
