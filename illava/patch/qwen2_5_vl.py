"""iLLaVA on transformers' Qwen2.5-VL (tested range: transformers 5.24.x, see pyproject).

How the patch hooks in: `apply` swaps the class of the inner `Qwen2_5_VLModel` for a subclass
whose `forward` is `_forward` below (tomesd style: `remove` swaps it back, so the model's own
modules, weights and the outer `Qwen2_5_VLForConditionalGeneration` are untouched). The forward
reuses the library's modules (patch embedding, blocks, rotary embeddings, decoder layers,
attention kernels from `ALL_ATTENTION_FUNCTIONS`) and replaces only the loop around them,
reproducing the library's behaviour when nothing is merged:

* Encoder: the library's window permutation, per-frame `cu_seqlens` and rotary tables; in a
  merging block our own minimal block forward runs attention, adds the residual, merges whole
  2x2 groups per frame (paper eq. 1), then runs the FFN. Window boundaries, frame boundaries
  and rotary cos/sin are gathered for the kept groups; the output is put back in raster order.
* LLM input: placeholders of discarded groups are dropped from the sequence; the kept image
  tokens keep the 3-D mRoPE positions the library computes on the *unmerged* sequence.
* LLM: after a merging decoder layer (paper eq. 2), image tokens are merged per image/frame at
  prefill; samples are re-packed left-padded, so each layer's KV cache is as long as that
  layer's input. Per-layer key-padding masks are kept for decoding; decode positions are the
  unmerged model's (`generate` passes them; otherwise they continue from the prefill).

Limitations: static/compiled caches are not supported with merging (each layer's cache has its own
length); `labels`, `output_hidden_states`/`output_attentions` and new images in a cached
continuation are refused with clear errors. Beam search works: the beams of one sample share its
merge, so reordering the cache among them needs nothing more.
"""

from __future__ import annotations

import functools
import itertools
import time
from dataclasses import dataclass, field

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as qwen
from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

from ..merge import attention_importance, merge_segment, windowed_importance
from ..schedule import LayerStep, Plan, Schedule, ScheduleError

SUPPORTED_ATTENTION = ("eager", "sdpa", "flash_attention_2", "flash_attention_3")


# ----------------------------------------------------------------------------------- state
@dataclass
class RunStats:
    """What the last prefill did; read it with `illava.last_stats(model)`."""

    encoder_units: list[list[int]] = field(
        default_factory=list
    )  # per vision block: units per frame (images, then videos)
    kept_units: list[torch.Tensor] = field(default_factory=list)  # per image/video: kept raster LLM-token ids
    llm_image_tokens: list[torch.Tensor] = field(default_factory=list)  # per decoder layer: (B,) image tokens in
    llm_sequence: list[torch.Tensor] = field(default_factory=list)  # per decoder layer: (B,) real tokens in
    image_positions: list[torch.Tensor] = field(
        default_factory=list
    )  # per sample: (3, n) positions of LLM image tokens
    merge_seconds: float = 0.0  # wall time in importance + selection + merging + re-packing


@dataclass
class IllavaState:
    schedule: Schedule
    stats: RunStats = field(default_factory=RunStats)
    key_masks: list[torch.Tensor] | None = None  # per decoder layer: (B, K_l) which cached keys are real
    key_padded: list[bool] | None = None  # per decoder layer: whether its key mask has any False (host side)
    key_stage: list[int] | None = None  # per decoder layer: first layer whose cache has the same length and mask
    next_positions: torch.Tensor | None = None  # (B,) position of the next decoded token
    time_merges: bool = False  # synchronise and time the merge work (benchmarks)


class _MergeTimer:
    def __init__(self, state: IllavaState, device: torch.device):
        self.state, self.device = state, device

    def __enter__(self) -> None:
        if self.state.time_merges:
            _sync(self.device)
            self.start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        if self.state.time_merges:
            _sync(self.device)
            self.state.stats.merge_seconds += time.perf_counter() - self.start


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _generator(schedule: Schedule, stage: int, layer: int, frame: int) -> torch.Generator | None:
    """For method "random": a generator per (stage, layer, frame index within its image/video),
    so what a segment keeps depends on the seed and the segment alone, never on the batch."""
    if schedule.method != "random":
        return None
    return torch.Generator().manual_seed(hash((schedule.seed, stage, layer, frame)) & 0x7FFF_FFFF_FFFF_FFFF)


# ----------------------------------------------------------------------------------- encoder
def _attend_segments(
    attn: torch.nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, cu_host: list[int]
):
    """Bidirectional attention within each segment of a packed sequence, via the model's kernel.

    q, k, v: (1, H, N, D) -> (N, H*D); `cu` the segments' cu_seqlens, `cu_host` the same on the
    host. Mirrors the library's vision attention dispatch.
    """
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, qwen.eager_attention_forward)
    lengths = [b - a for a, b in zip(cu_host[:-1], cu_host[1:])]
    if qwen.is_flash_attention_requested(attn.config):
        max_len = max(lengths)
        out, _ = interface(
            attn, q, k, v, attention_mask=None, scaling=attn.scaling, dropout=0.0, is_causal=False,
            cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max_len, max_length_k=max_len,
        )  # fmt: skip
    else:
        parts = zip(*(torch.split(t, lengths, dim=2) for t in (q, k, v)))
        out = torch.cat(
            [interface(attn, a, b, c, attention_mask=None, scaling=attn.scaling, dropout=0.0, is_causal=False)[0]
             for a, b, c in parts],
            dim=1,
        )  # fmt: skip
    return out.reshape(q.shape[2], -1)


def _boundaries(segment_of_unit: torch.Tensor, unit: int) -> tuple[torch.Tensor, list[int]]:
    """cu_seqlens (int32, in tokens) of the runs of equal ids in `segment_of_unit`, as a tensor on
    its device and as a host list (one device-to-host read for both)."""
    _, counts = torch.unique_consecutive(segment_of_unit, return_counts=True)
    sizes = counts * unit
    cu = torch.nn.functional.pad(sizes.cumsum(0), (1, 0)).to(torch.int32)
    return cu, list(itertools.accumulate(sizes.tolist(), initial=0))


@dataclass
class _VisionLayout:
    """Per-unit bookkeeping of the vision sequence in window order; gathered on every merge."""

    frame: torch.Tensor  # (U,) global frame id
    window: torch.Tensor  # (U,) global window id
    raster: torch.Tensor  # (U,) raster LLM-token id over all items
    _segments: dict[bool, tuple[torch.Tensor, list[int]]] = field(default_factory=dict)

    def take(self, keep: torch.Tensor) -> _VisionLayout:
        return _VisionLayout(self.frame[keep], self.window[keep], self.raster[keep])

    def segments(self, full: bool, unit: int) -> tuple[torch.Tensor, list[int]]:
        """cu_seqlens in tokens of frames (`full`) or windows, as a tensor and a host list; cached
        until a merge."""
        if full not in self._segments:
            self._segments[full] = _boundaries(self.frame if full else self.window, unit)
        return self._segments[full]


def _merging_block(
    block: torch.nn.Module,
    hidden: torch.Tensor,
    cu: torch.Tensor,
    cu_host: list[int],
    rope: tuple[torch.Tensor, torch.Tensor],
    frame_sizes: list[int],
    steps: list[LayerStep],
    schedule: Schedule,
    state: IllavaState,
    unit: int,
    index: int,
    frame_in_item: list[int],
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """One vision block (number `index`) with Token_Merge between attention and FFN (paper eq. 1).

    hidden: (N, C) in window order, frames contiguous and in order, `frame_sizes` units each.
    Returns (hidden of kept units, kept unit indices, units per frame after the merge).
    """
    attn = block.attn
    n = hidden.shape[0]
    x = block.norm1(hidden)
    q, k, v = attn.qkv(x).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)  # (N, H, D) each
    q, k = qwen.apply_rotary_pos_emb_vision(q, k, *rope)
    q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # (1, H, N, D)
    hidden = hidden + attn.proj(_attend_segments(attn, q, k, v, cu, cu_host))

    with _MergeTimer(state, hidden.device):
        q, k = q[0], k[0]  # (H, N, D)
        scores = windowed_importance(q, k, cu_host, scale=attn.scaling).view(-1, unit).mean(dim=1)  # (U,)
        parts, keep_parts, sizes_after = [], [], []
        start = 0
        for frame, size in enumerate(frame_sizes):
            step = steps[frame]
            if step.tokens_in != size:
                raise RuntimeError(f"illava: frame {frame} has {size} units, plan expected {step.tokens_in}")
            tokens = slice(start * unit, (start + size) * unit)
            if step.removed == 0:
                keep, merged = torch.arange(size, device=hidden.device), hidden[tokens]
                sizes_after.append(size)
            else:
                keep, merged = merge_segment(
                    hidden[tokens], q[:, tokens], k[:, tokens], scores[start : start + size],
                    n_keep=step.kept, n_recycle=step.recycled, group_size=schedule.group_size,
                    unit=unit, generator=_generator(schedule, 0, index, frame_in_item[frame]), scale=attn.scaling,
                )  # fmt: skip
                sizes_after.append(step.kept)
            parts.append(merged)
            keep_parts.append(keep + start)
            start += size
        hidden = torch.cat(parts)
        keep = torch.cat(keep_parts)
    hidden = hidden + block.mlp(block.norm2(hidden))
    return hidden, keep, sizes_after


@dataclass
class IllavaVisionOutput(BaseModelOutputWithPooling):
    """What the merged encoder hands the LLM: `pooler_output` is a tuple with one (K_i, C_out)
    tensor of kept features per image/video, in raster order; the rest says which were kept."""

    kept_units: list[torch.Tensor] | None = None  # per item: kept raster LLM-token ids
    grid_thw: torch.Tensor | None = None
    encoder_units: list[list[int]] | None = None  # per block: units per frame entering attention
    merge_seconds: float | None = None  # (ModelOutput fields must default to None)

    def select(self, items: list[int]) -> IllavaVisionOutput:
        """The same output for the images `items` (repeats allowed), as `generate` expands batches.
        Statistics describe the encoder run and are kept as they are."""
        return IllavaVisionOutput(
            last_hidden_state=self.last_hidden_state,
            pooler_output=tuple(self.pooler_output[i] for i in items),
            kept_units=[self.kept_units[i] for i in items],
            grid_thw=self.grid_thw[items],
            encoder_units=self.encoder_units,
            merge_seconds=self.merge_seconds,
        )


def encode(
    visual: torch.nn.Module,
    pixel_values: torch.Tensor,
    grid_thw: torch.Tensor,
    schedule: Schedule,
    *,
    time_merges: bool = False,
) -> IllavaVisionOutput:
    """The vision encoder with merging, for the images (or videos) of `grid_thw`."""
    state = IllavaState(schedule=schedule, time_merges=time_merges)  # collects this call's stats
    unit = visual.spatial_merge_unit
    hidden = visual.patch_embed(pixel_values.type(visual.dtype))  # (N, C)
    n = hidden.shape[0]
    window_index, cu_window = get_vision_window_index(
        grid_thw, spatial_merge_size=visual.spatial_merge_size, window_size=visual.window_size,
        patch_size=visual.patch_size,
    )  # fmt: skip
    hidden = visual.permute_input_for_window_attn(hidden, window_index, seq_len=n)
    position_ids = get_vision_position_ids(grid_thw, visual.spatial_merge_size)
    rope = tuple(
        visual.permute_input_for_window_attn(t, window_index, seq_len=n)
        for t in visual.rotary_pos_emb(hidden, position_ids)
    )

    frame_units = [h * w // unit for t, h, w in grid_thw.tolist() for _ in range(t)]
    frame_in_item = [i for t, _, _ in grid_thw.tolist() for i in range(t)]
    device = hidden.device
    layout = _VisionLayout(
        frame=torch.repeat_interleave(
            torch.arange(len(frame_units), device=device), torch.tensor(frame_units, device=device)
        ),
        window=torch.repeat_interleave(
            torch.arange(len(cu_window) - 1, device=device), ((cu_window[1:] - cu_window[:-1]) // unit).to(device)
        ),
        raster=window_index.to(device),
    )
    plans = [schedule.plan(units) for units in frame_units]
    steps_at = {step.layer: [plan.encoder[i] for plan in plans] for i, step in enumerate(plans[0].encoder)}

    units = list(frame_units)  # units per frame, kept on the host (what the plan says each merge leaves)
    for index, block in enumerate(visual.blocks):
        cu, cu_host = layout.segments(index in visual.fullatt_block_indexes, unit)
        state.stats.encoder_units.append(list(units))
        steps = steps_at.get(index)
        if steps is not None and any(step.removed for step in steps):
            hidden, keep, units = _merging_block(
                block, hidden, cu, cu_host, rope, units, steps, schedule, state, unit, index, frame_in_item
            )
            with _MergeTimer(state, device):
                layout = layout.take(keep)
                tokens = (keep[:, None] * unit + torch.arange(unit, device=device)).reshape(-1)
                rope = tuple(t[tokens] for t in rope)
        else:
            max_len = max(b - a for a, b in zip(cu_host[:-1], cu_host[1:]))
            hidden = block(hidden, cu_seqlens=cu, max_seqlen=max_len, position_embeddings=rope)

    features = visual.merger(hidden)  # (K, C_out), one row per kept group
    order = torch.argsort(layout.raster)
    features, raster = features[order], layout.raster[order]
    item_sizes = [t * h * w // unit for t, h, w in grid_thw.tolist()]
    offsets = torch.tensor([0, *item_sizes], device=device).cumsum(0)
    kept = []
    for item in range(len(item_sizes)):
        ids = raster[(raster >= offsets[item]) & (raster < offsets[item + 1])]
        kept.append(ids - offsets[item])
    return IllavaVisionOutput(
        last_hidden_state=hidden,
        pooler_output=torch.split(features, [ids.numel() for ids in kept]),
        kept_units=kept,
        grid_thw=grid_thw,
        encoder_units=state.stats.encoder_units,
        merge_seconds=state.stats.merge_seconds,
    )


# ----------------------------------------------------------------------------------- LLM
def _layer_mask(
    key_valid: torch.Tensor, q_len: int, implementation: str, dtype: torch.dtype, padded: bool | None = None
):
    """Mask for `q_len` queries that are the last `q_len` of `key_valid.shape[1]` keys.

    key_valid: (B, K) bool. Flash kernels take the 2-D padding mask; eager an additive
    (B, 1, q, K) float mask; sdpa a boolean one (None when plain causal suffices). `padded`
    says whether `key_valid` has any False, when the caller knows it on the host (otherwise it
    is read from the device, a synchronisation).
    """
    batch, n_keys = key_valid.shape
    no_padding = not padded if padded is not None else bool(key_valid.all())
    if implementation.startswith("flash"):
        return None if no_padding else key_valid.to(torch.int32)
    if implementation == "sdpa" and no_padding and q_len in (1, n_keys):
        return None
    device = key_valid.device
    query_at = torch.arange(n_keys - q_len, n_keys, device=device)  # key index of each query
    allowed = (torch.arange(n_keys, device=device)[None, :] <= query_at[:, None])[None] & key_valid[:, None, :]
    # A padding query sees no real key; let it see itself so its softmax stays finite.
    allowed[:, torch.arange(q_len, device=device), query_at] = True
    allowed = allowed[:, None]  # (B, 1, q, K)
    if implementation == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, torch.finfo(dtype).min)


def _repack(valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Gather index (B, L') that packs the True entries of `valid` (B, L) to the right
    (left padding), the new validity mask (B, L'), and whether that mask has padding."""
    counts = valid.sum(dim=1)
    shortest, length = torch.stack([counts.min(), counts.max()]).tolist() if counts.numel() else (0, 0)
    order = torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices  # real positions first, in order
    slots = torch.arange(length, device=valid.device)[None, :]
    rank = slots - (length - counts[:, None])  # (B, L')
    new_valid = rank >= 0
    index = order.gather(1, rank.clamp(min=0))
    return index, new_valid, shortest != length


def _right_aligned(valid: torch.Tensor) -> torch.Tensor:
    """Gather index (B, L) that moves left-padded rows (real tokens last) to right padding."""
    pads = (~valid).sum(dim=1, keepdim=True)
    return (torch.arange(valid.shape[1], device=valid.device)[None, :] + pads).clamp(max=valid.shape[1] - 1)


@dataclass
class _Sequence:
    """The LLM's working sequence at prefill, left padded."""

    hidden: torch.Tensor  # (B, L, C)
    positions: torch.Tensor  # (3, B, L)
    rope: tuple[torch.Tensor, torch.Tensor]  # (B, L, D) each
    valid: torch.Tensor  # (B, L) bool
    segment: torch.Tensor  # (B, L) image/frame segment id, -1 for text and padding
    padded: bool | None = None  # whether `valid` has any False (None: not known on the host)

    def gather(self, index: torch.Tensor, valid: torch.Tensor, padded: bool | None = None) -> _Sequence:
        """The sequence re-laid along `index` (B, L'), with validity `valid` (B, L')."""

        def along_length(t: torch.Tensor) -> torch.Tensor:  # (B, L, X) -> (B, L', X)
            return t.gather(1, index[..., None].expand(-1, -1, t.shape[-1]))

        return _Sequence(
            hidden=along_length(self.hidden),
            positions=self.positions.gather(2, index[None].expand(self.positions.shape[0], -1, -1)),
            rope=(along_length(self.rope[0]), along_length(self.rope[1])),
            valid=valid,
            segment=self.segment.gather(1, index).masked_fill(~valid, -1),
            padded=padded,
        )


def _decoder_layer_capturing(layer, hidden, mask, rope, cache, use_cache):
    """A decoder layer that also returns its post-rotary queries and keys (B, H, L, D).

    Same computation as the library's `Qwen2_5_VLDecoderLayer` (pre-norm attention and MLP
    with residuals, kernel from `ALL_ATTENTION_FUNCTIONS`); written out only because the
    merge needs Q and K, which the fused kernels do not expose.
    """
    attn = layer.self_attn
    batch, length, _ = hidden.shape
    x = layer.input_layernorm(hidden)
    q, k, v = (
        proj(x).view(batch, length, -1, attn.head_dim).transpose(1, 2)
        for proj in (attn.q_proj, attn.k_proj, attn.v_proj)
    )
    q, k = qwen.apply_rotary_pos_emb(q, k, *rope)
    keys, values = k, v
    if cache is not None and use_cache is not False:
        keys, values = cache.update(k, v, attn.layer_idx)
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, qwen.eager_attention_forward)
    out, _ = interface(
        attn, q, keys, values, mask, dropout=0.0, scaling=attn.scaling, sliding_window=attn.sliding_window
    )
    hidden = hidden + attn.o_proj(out.reshape(batch, length, -1))
    hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    return hidden, q, k


def _merge_llm(
    seq: _Sequence,
    q: torch.Tensor,
    k: torch.Tensor,
    layer: int,
    step_index: int,
    plans: dict[int, Plan],
    frame_in_item: dict[int, int],
    schedule: Schedule,
    scale: float,
) -> _Sequence:
    """Token_Merge after a decoder layer (paper eq. 2): image tokens only, per segment."""
    hidden = seq.hidden.clone()
    keep = seq.valid.clone()
    for b in range(hidden.shape[0]):
        segments = seq.segment[b]
        for segment in torch.unique(segments[segments >= 0]).tolist():
            step = plans[segment].llm[step_index]
            if step.removed == 0:
                continue
            idx = (segments == segment).nonzero().squeeze(1)
            if idx.numel() != step.tokens_in:
                raise RuntimeError(
                    f"illava: segment {segment} has {idx.numel()} tokens, plan expected {step.tokens_in}"
                )
            q_seg, k_seg = q[b][:, idx], k[b][:, idx]
            scores = attention_importance(q_seg, k_seg, causal=True, scale=scale)
            kept, merged = merge_segment(
                hidden[b, idx], q_seg, k_seg, scores, n_keep=step.kept, n_recycle=step.recycled,
                group_size=schedule.group_size, unit=1, scale=scale,
                generator=_generator(schedule, 1, layer, frame_in_item[segment]),
            )  # fmt: skip
            hidden[b, idx[kept]] = merged
            keep[b, idx] = False
            keep[b, idx[kept]] = True
    index, valid, padded = _repack(keep)
    return _Sequence(hidden, seq.positions, seq.rope, seq.valid, seq.segment).gather(index, valid, padded)


def _prefill_llm(
    model, seq: _Sequence, plans: dict[int, Plan], frame_in_item: dict[int, int], cache, use_cache, state: IllavaState
) -> _Sequence:
    lm = model.language_model
    schedule = state.schedule
    implementation = lm.config._attn_implementation
    merge_steps = {layer: i for i, layer in enumerate(schedule.llm_layers)}
    has_work = any(step.removed for plan in plans.values() for step in plan.llm)
    key_masks, key_padded, key_stage = [], [], []
    stage_valid = None
    for index, layer in enumerate(lm.layers):
        if seq.valid is not stage_valid:  # first layer, or the sequence was merged: a new mask and new counts
            stage_valid, stage = seq.valid, index
            mask = _layer_mask(seq.valid, seq.valid.shape[1], implementation, seq.hidden.dtype, padded=seq.padded)
            image_tokens, sequence = (seq.segment >= 0).sum(dim=1), seq.valid.sum(dim=1)
        key_masks.append(seq.valid)
        key_padded.append(seq.padded)
        key_stage.append(stage)
        state.stats.llm_image_tokens.append(image_tokens)
        state.stats.llm_sequence.append(sequence)
        if has_work and index in merge_steps:
            hidden, q, k = _decoder_layer_capturing(layer, seq.hidden, mask, seq.rope, cache, use_cache)
            seq.hidden = hidden
            with _MergeTimer(state, hidden.device):
                seq = _merge_llm(
                    seq, q, k, index, merge_steps[index], plans, frame_in_item, schedule, layer.self_attn.scaling
                )
        else:
            seq.hidden = layer(
                seq.hidden, attention_mask=mask, position_embeddings=seq.rope, cache=cache, use_cache=use_cache
            )
    keeps_cache = use_cache is not False and cache is not None
    state.key_masks = key_masks if keeps_cache else None
    state.key_padded = key_padded if keeps_cache else None
    state.key_stage = key_stage if keeps_cache else None
    state.next_positions = seq.positions[:, :, -1].max(dim=0).values + 1
    seq.hidden = lm.norm(seq.hidden)
    return seq


def _decode_llm(model, input_ids, inputs_embeds, attention_mask, position_ids, cache, use_cache, state) -> torch.Tensor:
    """Tokens after a merged prefill: each layer attends to its own (shorter) cache."""
    lm = model.language_model
    hidden = inputs_embeds if inputs_embeds is not None else lm.embed_tokens(input_ids)
    batch, q_len, _ = hidden.shape
    if state.key_masks is None or state.key_masks[0].shape[0] != batch:
        raise RuntimeError("illava: this cache was not filled by a merged prefill of the same batch; start a new one")
    if position_ids is None:
        positions = state.next_positions[:, None] + torch.arange(q_len, device=hidden.device)
        positions = positions[None].expand(3, -1, -1)
    else:
        positions = position_ids[1:] if position_ids.shape[0] == 4 else position_ids
        positions = positions.expand(3, batch, -1) if positions.dim() == 3 else positions[None].expand(3, -1, -1)
    state.next_positions = positions[:, :, -1].max(dim=0).values + 1
    if attention_mask is not None:
        new_valid = attention_mask[:, -q_len:].bool()
        new_padded = not bool(new_valid.all())  # one read per step, not one per layer
    else:
        new_valid, new_padded = torch.ones(batch, q_len, dtype=torch.bool, device=hidden.device), False
    rope = lm.rotary_emb(hidden, positions)
    implementation = lm.config._attn_implementation
    masks = {}  # per stage (layers whose caches share length and padding): this step's mask
    for index, layer in enumerate(lm.layers):
        cached = cache.layers[index].get_seq_length()
        if cached != state.key_masks[index].shape[1]:
            raise RuntimeError(
                f"illava: layer {index} caches {cached} keys but the merged prefill left "
                f"{state.key_masks[index].shape[1]}; the cache does not belong to this run"
            )
        stage = state.key_stage[index]
        if stage not in masks:
            key_valid = torch.cat([state.key_masks[index], new_valid], dim=1)
            padded = state.key_padded[index]
            padded = (not bool(key_valid.all()) if padded is None else padded) or new_padded
            masks[stage] = (key_valid, padded, _layer_mask(key_valid, q_len, implementation, hidden.dtype, padded))
        key_valid, padded, mask = masks[stage]
        state.key_masks[index], state.key_padded[index] = key_valid, padded
        hidden = layer(hidden, attention_mask=mask, position_embeddings=rope, cache=cache, use_cache=use_cache)
    return lm.norm(hidden)


# ----------------------------------------------------------------------------------- forward
def _mm_token_types(config, input_ids: torch.Tensor) -> torch.Tensor:
    types = torch.zeros_like(input_ids, dtype=torch.int32)
    types[input_ids == config.image_token_id] = 1
    types[input_ids == config.video_token_id] = 2
    return types


def _place_visual(
    input_ids: torch.Tensor,
    embeds: torch.Tensor,
    keep: torch.Tensor,
    segment: torch.Tensor,
    token_id: int,
    vision: IllavaVisionOutput,
    unit: int,
    first_segment: int,
) -> int:
    """Write kept features into their placeholders, mark dropped placeholders, label segments.

    Placeholders fill in row-major order, one contiguous run per image/video (as the library's
    masked_scatter does). Returns the next free segment id.
    """
    grid_thw, kept = vision.grid_thw, vision.kept_units
    features = torch.cat(vision.pooler_output)
    places = (input_ids == token_id).nonzero()  # (T, 2)
    sizes = [t * h * w // unit for t, h, w in grid_thw.tolist()]
    if places.shape[0] != sum(sizes):
        raise ValueError(f"illava: {places.shape[0]} placeholder tokens for visual inputs of {sum(sizes)} tokens")
    feature_rows = []
    segment_id = first_segment
    for item_places, item_kept, (t, h, w) in zip(torch.split(places, sizes), kept, grid_thw.tolist()):
        frame_size = h * w // unit
        rows, cols = item_places[:, 0], item_places[:, 1]
        segment[rows, cols] = segment_id + torch.arange(item_places.shape[0], device=rows.device) // frame_size
        dropped = torch.ones(item_places.shape[0], dtype=torch.bool, device=rows.device)
        dropped[item_kept] = False
        keep[rows[dropped], cols[dropped]] = False
        feature_rows.append(item_places[item_kept])
        segment_id += t
    rows = torch.cat(feature_rows)
    embeds[rows[:, 0], rows[:, 1]] = features.to(embeds.dtype)
    return segment_id


def _forward(
    self,
    input_ids: torch.LongTensor | None = None,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.LongTensor | None = None,
    cache=None,
    inputs_embeds: torch.Tensor | None = None,
    use_cache: bool | None = None,
    pixel_values: torch.Tensor | None = None,
    pixel_values_videos: torch.Tensor | None = None,
    image_grid_thw: torch.LongTensor | None = None,
    video_grid_thw: torch.LongTensor | None = None,
    mm_token_type_ids: torch.IntTensor | None = None,
    second_per_grid_ts: torch.Tensor | None = None,
    mm_encoder_outputs=None,
    **kwargs,
):
    """`Qwen2_5_VLModel.forward` with iLLaVA merging (see the module docstring)."""
    state: IllavaState = self._illava
    cache = kwargs.pop("past_key_values", cache)
    for flag in ("output_hidden_states", "output_attentions"):
        if kwargs.get(flag) or getattr(self.config, flag, False):
            raise NotImplementedError(f"illava: {flag} is not supported on a merged model (layers differ in length)")
    if use_cache is None:
        use_cache = self.config.text_config.use_cache
    if cache is None and use_cache:
        cache = qwen.DynamicCache(config=self.config.text_config)
    if cache is not None and not isinstance(cache, qwen.DynamicCache):
        raise NotImplementedError(
            f"illava: {type(cache).__name__} is not supported on a merged model (each layer's cache has its own "
            "length after merging); use the default dynamic cache"
        )
    past = cache.get_seq_length() if cache is not None else 0
    if past > 0:
        # Placeholder ids without pixels are ordinary tokens here, as in the unpatched model: a model
        # can generate one (seen with random weights on the GPU), and decoding must not stop on it.
        visual = (pixel_values, pixel_values_videos, *(mm_encoder_outputs or {}).values())
        if any(v is not None for v in visual):
            raise NotImplementedError(
                "illava: new images or videos in a cached continuation are not supported; "
                "run the whole conversation as one prefill"
            )
        hidden = _decode_llm(self, input_ids, inputs_embeds, attention_mask, position_ids, cache, use_cache, state)
        return qwen.MultimodalBaseModelOutputWithPast(last_hidden_state=hidden, cache=cache if use_cache else None)

    if input_ids is None and (pixel_values is not None or pixel_values_videos is not None or mm_encoder_outputs):
        raise ValueError("illava: merging needs input_ids to find the image placeholders")
    state.stats = RunStats()
    embeds = inputs_embeds if inputs_embeds is not None else self.get_input_embeddings()(input_ids)
    batch, length, _ = embeds.shape
    if attention_mask is None:
        attention_mask = torch.ones(batch, length, dtype=torch.long, device=embeds.device)
    if position_ids is None and input_ids is not None:
        if mm_token_type_ids is None:
            mm_token_type_ids = _mm_token_types(self.config, input_ids)
        position_ids = self.compute_3d_position_ids(
            input_ids=input_ids, image_grid_thw=image_grid_thw, video_grid_thw=video_grid_thw,
            inputs_embeds=embeds, attention_mask=attention_mask, cache=None,
            second_per_grid_ts=second_per_grid_ts, mm_token_type_ids=mm_token_type_ids,
        )  # fmt: skip
    if position_ids is None:
        text = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        position_ids = text[None].expand(3, -1, -1)
    elif position_ids.shape[0] == 4:
        position_ids = position_ids[1:]
    elif position_ids.dim() == 2:
        position_ids = position_ids[None].expand(3, -1, -1)

    embeds = embeds.clone()
    keep = attention_mask.bool().clone()
    segment = torch.full((batch, length), -1, dtype=torch.long, device=embeds.device)
    unit = self.visual.spatial_merge_unit
    next_segment = 0
    frame_plans: dict[int, Plan] = {}
    frame_in_item: dict[int, int] = {}  # segment id -> frame index within its image/video
    encoded = mm_encoder_outputs or {}
    for modality, values, grid, token_id in (
        ("image", pixel_values, image_grid_thw, self.config.image_token_id),
        ("video", pixel_values_videos, video_grid_thw, self.config.video_token_id),
    ):
        vision = encoded.get(modality)
        if vision is None and values is not None:
            vision = encode(self.visual, values, grid, state.schedule, time_merges=state.time_merges)
        if vision is None:
            continue
        if not isinstance(vision, IllavaVisionOutput):
            raise ValueError(f"illava: {modality} features were encoded by an unpatched model; pass pixel values")
        state.stats.kept_units.extend(vision.kept_units)
        if state.stats.encoder_units:  # images then videos: one list per block, frames in order
            for block, frames in zip(state.stats.encoder_units, vision.encoder_units):
                block.extend(frames)
        else:
            state.stats.encoder_units = [list(frames) for frames in vision.encoder_units]
        state.stats.merge_seconds += vision.merge_seconds or 0.0
        first = next_segment
        next_segment = _place_visual(input_ids, embeds, keep, segment, token_id, vision, unit, first)
        frame_sizes = [h * w // unit for t, h, w in vision.grid_thw.tolist() for _ in range(t)]
        frame_indices = (i for t, _, _ in vision.grid_thw.tolist() for i in range(t))
        for segment_id, size, frame in zip(range(first, next_segment), frame_sizes, frame_indices):
            frame_plans[segment_id] = state.schedule.plan(size)
            frame_in_item[segment_id] = frame

    rope = self.language_model.rotary_emb(embeds, position_ids)
    seq = _Sequence(embeds, position_ids, rope, attention_mask.bool(), segment)
    with _MergeTimer(state, embeds.device):
        index, valid, padded = _repack(keep)
        seq = seq.gather(index, valid, padded)
    state.stats.image_positions = [seq.positions[:, b][:, seq.segment[b] >= 0] for b in range(batch)]
    seq = _prefill_llm(self, seq, frame_plans, frame_in_item, cache, use_cache, state)
    if not attention_mask[:, -1].all():  # the caller padded on the right: give the output back that way
        seq.hidden = seq.hidden.gather(1, _right_aligned(seq.valid)[..., None].expand_as(seq.hidden))
    return qwen.MultimodalBaseModelOutputWithPast(last_hidden_state=seq.hidden, cache=cache if use_cache else None)


# ----------------------------------------------------------------------------------- apply / remove
def _get_image_features(self, pixel_values: torch.Tensor, image_grid_thw: torch.LongTensor | None = None, **kwargs):
    """`get_image_features` with merging (generate encodes images before the prefill)."""
    return encode(
        self.visual, pixel_values, image_grid_thw, self._illava.schedule, time_merges=self._illava.time_merges
    )


def _get_video_features(
    self, pixel_values_videos: torch.Tensor, video_grid_thw: torch.LongTensor | None = None, **kwargs
):
    return encode(
        self.visual, pixel_values_videos, video_grid_thw, self._illava.schedule, time_merges=self._illava.time_merges
    )


def _outer_forward(original: type):
    """`original.forward` (the outer model's), refusing `labels`, which it would consume itself.
    Keeps the original signature: `generate` validates its kwargs against it."""

    @functools.wraps(original.forward)
    def forward(self, *args, **kwargs):
        if kwargs.get("labels") is not None:
            raise ValueError("illava: labels are not supported on a merged model (the sequence is shortened)")
        return original.forward(self, *args, **kwargs)

    return forward


def _expand_multimodal_outputs(self, input_ids, mm_encoder_output, expand_size=1, inputs_embeds=None):
    """`generate`'s batch expansion (num_return_sequences, beams) for merged encoder outputs.

    The library groups images per sample by matching feature lengths to placeholder counts,
    which merged features no longer match; here images are grouped by their unmerged sizes and
    every per-image field is repeated together.
    """
    ours = {k: v for k, v in mm_encoder_output.items() if isinstance(v, IllavaVisionOutput)}
    rest = {k: v for k, v in mm_encoder_output.items() if k not in ours}
    if rest:
        rest = super(type(self), self)._expand_multimodal_outputs(input_ids, rest, expand_size, inputs_embeds)
    if expand_size == 1 or not ours:
        return {**rest, **ours}
    if input_ids is None:
        raise NotImplementedError("illava: expanding a batch of merged images needs input_ids")
    unit = self.model.visual.spatial_merge_unit
    for modality, vision in ours.items():
        token_id = self.config.image_token_id if modality == "image" else self.config.video_token_id
        sizes = iter(enumerate(t * h * w // unit for t, h, w in vision.grid_thw.tolist()))
        order = []
        for placeholders in (input_ids == token_id).sum(dim=1).tolist():
            items, covered = [], 0
            while covered < placeholders:
                item, size = next(sizes)
                items.append(item)
                covered += size
            order.extend(items * expand_size)
        ours[modality] = vision.select(order)
    return {**rest, **ours}


_PATCHED_CLASSES: dict[type, type] = {}


def _patched_class(original: type, methods: dict) -> type:
    """A subclass of `original` overriding `methods`, made once per class so `apply` never nests.
    It keeps the original's name: `save_pretrained` records the class name as the architecture."""
    if original not in _PATCHED_CLASSES:
        _PATCHED_CLASSES[original] = type(
            original.__name__, (original,), {**methods, "_illava_original_class": original, "__module__": __name__}
        )
    return _PATCHED_CLASSES[original]


_INNER_METHODS = {
    "forward": _forward,
    "get_image_features": _get_image_features,
    "get_video_features": _get_video_features,
}


def inner_model(model: torch.nn.Module) -> torch.nn.Module | None:
    """The `Qwen2_5_VLModel` inside `model`, or None if this is not a Qwen2.5-VL model."""
    if isinstance(model, qwen.Qwen2_5_VLForConditionalGeneration):
        return model.model
    if isinstance(model, qwen.Qwen2_5_VLModel):
        return model
    return None


def apply(model: torch.nn.Module, schedule: Schedule) -> None:
    inner = inner_model(model)
    remove(model)
    schedule.check_fits(encoder_depth=len(inner.visual.blocks), llm_depth=len(inner.language_model.layers))
    for part, config in (("vision encoder", inner.visual.config), ("language model", inner.language_model.config)):
        if config._attn_implementation not in SUPPORTED_ATTENTION:
            raise ScheduleError(
                f"illava: the {part} uses attention {config._attn_implementation!r}; supported: {', '.join(SUPPORTED_ATTENTION)}"
            )
    inner._illava = IllavaState(schedule=schedule)
    inner.__class__ = _patched_class(type(inner), _INNER_METHODS)
    inner.rope_deltas = None
    if model is not inner:
        outer = {"forward": _outer_forward(type(model)), "_expand_multimodal_outputs": _expand_multimodal_outputs}
        model.__class__ = _patched_class(type(model), outer)


def remove(model: torch.nn.Module) -> None:
    inner = inner_model(model)
    for module in {id(model): model, id(inner): inner}.values():
        original = getattr(type(module), "_illava_original_class", None)
        if original is not None:
            module.__class__ = original
    if hasattr(inner, "_illava"):
        del inner._illava
        inner.rope_deltas = None


def state_of(model: torch.nn.Module) -> IllavaState | None:
    inner = inner_model(model)
    return getattr(inner, "_illava", None) if inner is not None else None
