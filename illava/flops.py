"""A compute model of a schedule: FLOPs of a Qwen2.5-VL vision encoder and LLM prefill.

Why this exists: a measured speedup only means something next to the speedup the token counts
*predict*. If the two disagree, either the patch does not remove what the plan says, or the
hardware does not turn fewer FLOPs into less time (memory-bound kernels, launch overhead, the
cost of scoring tokens). This module is the prediction; it reads every size off the model config
so it follows the real module shapes (a test checks that against an instantiated model).

What is counted (a multiply-add is 2 FLOPs):

* every linear layer and the patch-embedding Conv3d: ``2 * in * out`` per token (biases ignored);
* attention's quadratic part: ``QK^T`` and ``AV`` cost ``2 * 2 * d`` per (query, key) pair, where
  ``d = heads * head_dim`` counts *query* heads (GQA shares K/V but every query head still does
  its own products);
* the vision patch merger MLP on the groups that leave the encoder, and ``lm_head`` on the last
  prompt token only (what ``generate`` computes at prefill).

What is not: norms, rotary embeddings, softmax, activations, residual adds, embedding lookups
(all linear in the token count and small next to the matmuls), and the cost of the merge itself
(importance scores, recycling), which is what a measurement adds on top of this ideal.

Token bookkeeping follows `illava.schedule`: a plan counts LLM tokens, one LLM token is one
``spatial_merge_size**2`` group of encoder patches, an encoder merge at block ``b`` sits between
its attention and its FFN, an LLM merge after layer ``i`` shortens layers ``i+1..``. Every image
and every video frame (one temporal patch) is a segment with its own plan.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from illava.schedule import Plan, Schedule

if TYPE_CHECKING:
    from transformers import Qwen2_5_VLConfig


@dataclass(frozen=True)
class Segment:
    """One image, or one frame (temporal patch) of a video, in encoder patches."""

    grid_h: int
    grid_w: int


#: A segment, or one row of a processor's ``image_grid_thw`` / ``video_grid_thw``: ``(t, h, w)``
#: in patches, which stands for ``t`` segments of ``h x w`` patches.
GridLike = Segment | Sequence[int]


@dataclass(frozen=True)
class UnitCosts:
    """FLOPs per unit of work, read off a config; the prefill total is these times token counts.

    Kept as a separate object so tests can hold each number against the parameter count of the
    module it stands for.
    """

    patch_embed: float  # per patch: the Conv3d
    vision_attn_linear: float  # per patch entering a block: qkv + proj
    vision_ffn: float  # per patch after a block's merge: gate, up, down
    vision_pair: float  # per (query, key) pair in a vision attention segment: QK^T + AV
    merger: float  # per group leaving the encoder: the patch merger's two linears
    llm_linear: float  # per token per decoder layer: q, k, v, o + gate, up, down
    llm_pair: float  # per (query, key) pair in a decoder layer: QK^T + AV
    lm_head: float  # per token that gets logits


@dataclass(frozen=True)
class Flops:
    """Prefill FLOPs of one input under one schedule, per stage, plus the token counts behind them."""

    patch_embed: float
    encoder_blocks: tuple[float, ...]  # per vision block
    merger: float
    llm_layers: tuple[float, ...]  # per decoder layer
    lm_head: float
    encoder_tokens: tuple[tuple[int, int], ...]  # patches in (attention, FFN) of each block, all segments
    llm_tokens: tuple[int, ...]  # sequence length entering each decoder layer (text + image)

    @property
    def encoder(self) -> float:
        return self.patch_embed + sum(self.encoder_blocks) + self.merger

    @property
    def llm(self) -> float:
        return sum(self.llm_layers) + self.lm_head

    @property
    def total(self) -> float:
        return self.encoder + self.llm


def _int_field(config: Any, name: str) -> int:
    """A config size that must be a plain positive int here (Qwen2.5-VL's modules assume so)."""
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{type(config).__name__}.{name} = {value!r}: the FLOP model needs a positive int")
    return value


def unit_costs(config: Qwen2_5_VLConfig) -> UnitCosts:
    """Per-unit FLOPs of a Qwen2.5-VL model, with the shapes its modules are built with."""
    vision, text = config.vision_config, config.text_config
    width = _int_field(vision, "hidden_size")
    merged_width = width * _int_field(vision, "spatial_merge_size") ** 2  # the merger's input: one group
    patch_volume = _int_field(vision, "in_channels") * _int_field(vision, "temporal_patch_size")
    patch_volume *= _int_field(vision, "patch_size") ** 2
    hidden = _int_field(text, "hidden_size")
    head_dim = hidden // _int_field(text, "num_attention_heads")  # the model ignores any config.head_dim
    q_width = text.num_attention_heads * head_dim
    kv_width = _int_field(text, "num_key_value_heads") * head_dim
    return UnitCosts(
        patch_embed=2.0 * patch_volume * width,
        vision_attn_linear=2.0 * (width * 3 * width + width * width),
        vision_ffn=2.0 * 3 * width * _int_field(vision, "intermediate_size"),
        vision_pair=2.0 * 2 * width,
        merger=2.0 * (merged_width * merged_width + merged_width * _int_field(vision, "out_hidden_size")),
        llm_linear=2.0 * (hidden * q_width + 2 * hidden * kv_width + q_width * hidden)
        + 2.0 * 3 * hidden * _int_field(text, "intermediate_size"),
        llm_pair=2.0 * 2 * q_width,
        lm_head=2.0 * hidden * _int_field(text, "vocab_size"),
    )


def segments_of(grids: Iterable[GridLike], spatial_merge_size: int) -> list[Segment]:
    """Segments from `Segment`s and ``(t, h, w)`` rows (a ``grid_thw`` tensor works too).

    A ``(t, h, w)`` row becomes ``t`` segments because the encoder's full attention and its
    windows never cross a frame, and the schedule plans each frame on its own.
    """
    segments = []
    for grid in grids:
        if isinstance(grid, Segment):
            segments.append(grid)
            continue
        row = [int(x) for x in grid]
        if len(row) != 3 or row[0] < 1:
            raise ValueError(f"grid {row} is not a (t, h, w) row with t >= 1")
        segments.extend([Segment(row[1], row[2])] * row[0])
    for segment in segments:
        if (
            min(segment.grid_h, segment.grid_w) < 1
            or segment.grid_h % spatial_merge_size
            or segment.grid_w % spatial_merge_size
        ):
            raise ValueError(f"{segment} must be positive multiples of spatial_merge_size={spatial_merge_size} patches")
    return segments


def window_patch_counts(config: Qwen2_5_VLConfig, segment: Segment) -> list[int]:
    """Patches in each attention window of one segment, tiled the way transformers'
    ``get_vision_window_index`` tiles it: squares of ``window_size // merge // patch_size`` groups
    from the top-left corner, the last row and column of windows cut short by the frame edge."""
    vision = config.vision_config
    merge = vision.spatial_merge_size
    side = vision.window_size // merge // vision.patch_size  # in groups
    if side < 1:
        raise ValueError(
            f"window_size={vision.window_size} is smaller than one {merge}x{merge} group of "
            f"{vision.patch_size}-pixel patches; Qwen2.5-VL cannot tile windows like that"
        )
    rows, cols = segment.grid_h // merge, segment.grid_w // merge
    return [
        min(side, rows - top) * min(side, cols - left) * merge * merge
        for top in range(0, rows, side)
        for left in range(0, cols, side)
    ]


def _block_pairs(attn_patches: int, full_patches: int, window_square_sum: int | None) -> float:
    """Attention (query, key) pairs of one block on one segment.

    Full attention is exact: ``n**2``. Windowed attention is approximated: the unmerged windows are
    exact (``sum len**2``), and after merges every window is assumed to keep the same fraction of
    its tokens, so the sum scales by ``(kept / total)**2``. Real merges keep tokens unevenly and
    the rebuilt windows are then somewhat larger in ``sum len**2`` than this.
    """
    if window_square_sum is None:
        return float(attn_patches) ** 2
    return window_square_sum * (attn_patches / full_patches) ** 2


def _encoder_blocks(
    config: Qwen2_5_VLConfig, units: UnitCosts, segments: list[Segment], plans: list[Plan]
) -> tuple[tuple[float, ...], tuple[tuple[int, int], ...]]:
    """FLOPs and (attention, FFN) patch counts of every vision block, summed over segments."""
    vision = config.vision_config
    group = vision.spatial_merge_size**2
    full_blocks = set(vision.fullatt_block_indexes)
    square_sums = [sum(n * n for n in window_patch_counts(config, s)) for s in segments]
    flops, tokens = [], []
    for block in range(vision.depth):
        block_flops, attn_total, ffn_total = 0.0, 0, 0
        for plan, square_sum in zip(plans, square_sums, strict=True):
            attn_groups, ffn_groups = plan.encoder_tokens_at(block)
            attn, ffn = attn_groups * group, ffn_groups * group
            pairs = _block_pairs(attn, plan.n_tokens * group, None if block in full_blocks else square_sum)
            block_flops += attn * units.vision_attn_linear + pairs * units.vision_pair + ffn * units.vision_ffn
            attn_total, ffn_total = attn_total + attn, ffn_total + ffn
        flops.append(block_flops)
        tokens.append((attn_total, ffn_total))
    return tuple(flops), tuple(tokens)


def causal_pairs(n_tokens: int, window: int | None = None) -> int:
    """(query, key) pairs a causal prefill of `n_tokens` computes: query ``i`` sees keys ``0..i``,
    i.e. ``n(n+1)/2``, or at most `window` keys under sliding-window attention. Kernels that skip
    fully masked tiles (flash attention, SDPA's causal path) do about this much work; a dense
    masked matmul does ``n**2``, so on such backends the prediction is optimistic."""
    if window is None or n_tokens <= window:
        return n_tokens * (n_tokens + 1) // 2
    return window * (window + 1) // 2 + (n_tokens - window) * window


def _llm_layers(
    config: Qwen2_5_VLConfig, units: UnitCosts, plans: list[Plan], text_tokens: int
) -> tuple[tuple[float, ...], tuple[int, ...]]:
    """FLOPs and sequence length of every decoder layer at prefill."""
    text = config.text_config
    layer_types = getattr(text, "layer_types", None) or ["full_attention"] * text.num_hidden_layers
    flops, tokens = [], []
    for layer in range(text.num_hidden_layers):
        n_tokens = text_tokens + sum(plan.llm_tokens_at(layer) for plan in plans)
        window = text.sliding_window if layer_types[layer] == "sliding_attention" else None
        flops.append(n_tokens * units.llm_linear + causal_pairs(n_tokens, window) * units.llm_pair)
        tokens.append(n_tokens)
    return tuple(flops), tuple(tokens)


def prefill_flops(config: Qwen2_5_VLConfig, schedule: Schedule, grids: Iterable[GridLike], text_tokens: int) -> Flops:
    """FLOPs of encoding `grids` and prefilling them with `text_tokens` other prompt tokens.

    `grids` holds `Segment`s or ``(t, h, w)`` patch grids (as the processor's ``image_grid_thw``);
    `text_tokens` counts every prompt token that is not an image/video placeholder (chat template
    and vision start/end markers included).

    Exact for the vanilla model (a test holds it against torch's FLOP counter). Two approximations
    under merging: windowed vision attention assumes every window loses the same fraction of its
    tokens (see `_block_pairs`), and decoder attention counts the causal ``n(n+1)/2`` pairs (see
    `causal_pairs`).
    """
    vision, text = config.vision_config, config.text_config
    schedule.check_fits(encoder_depth=vision.depth, llm_depth=text.num_hidden_layers)
    if text_tokens < 0:
        raise ValueError(f"text_tokens must be >= 0, got {text_tokens}")
    segments = segments_of(grids, vision.spatial_merge_size)
    if not segments and text_tokens == 0:
        raise ValueError("an empty prompt: give at least one image/frame or one text token")
    units = unit_costs(config)
    group = vision.spatial_merge_size**2
    plans = [schedule.plan(s.grid_h * s.grid_w // group) for s in segments]
    encoder_blocks, encoder_tokens = _encoder_blocks(config, units, segments, plans)
    llm_layers, llm_tokens = _llm_layers(config, units, plans, text_tokens)
    return Flops(
        patch_embed=sum(s.grid_h * s.grid_w for s in segments) * units.patch_embed,
        encoder_blocks=encoder_blocks,
        merger=sum(plan.after_encoder for plan in plans) * units.merger,
        llm_layers=llm_layers,
        lm_head=units.lm_head,
        encoder_tokens=encoder_tokens,
        llm_tokens=llm_tokens,
    )


def predicted_speedup(
    config: Qwen2_5_VLConfig, schedule: Schedule, grids: Iterable[GridLike], text_tokens: int
) -> float:
    """Vanilla prefill FLOPs over `schedule`'s: the speedup a compute-bound run would show."""
    grids = list(grids)
    vanilla = prefill_flops(config, Schedule.vanilla(), grids, text_tokens)
    return vanilla.total / prefill_flops(config, schedule, grids, text_tokens).total
