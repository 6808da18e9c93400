"""The LLM side of the engine: placing kept image features, merging after decoder layers at
prefill, per-layer KV caches, and decoding after a merged prefill -- for any backbone adapter.

Layout is planned on the host. One host copy of ``input_ids`` and the attention mask (free when
they are on the CPU; the library's own position code reads them too) says where every image's
placeholders are; from then on every count -- tokens per segment, per sample, per layer, the
padded length after each merge -- comes from the plans, so merging reads nothing back from the
device. Which tokens a merge keeps is data, and stays on the device: a segment's tokens are found
by a stable sort on segment ids (their counts are known), not by ``nonzero``.

Positions are computed by the adapter on the *unmerged* sequence (3-D mRoPE, interleaved mRoPE,
1-D) and gathered with the tokens, never renumbered. Samples are re-packed left-padded after each
merge, so each decoder layer's KV cache is as long as that layer's input; the per-layer key masks
are kept for decoding. Decoding continues with the unmerged model's positions (`generate` passes
them; otherwise they continue from the prefill).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..methods import PromptView, SegmentSpec, StageRequest
from ..schedule import Plan, Schedule
from .attention import PACKED
from .capture import capture
from .vision import EncodedVisual, MergeTimer, check_map

# ----------------------------------------------------------------------------------- statistics


@dataclass
class RunStats:
    """What the last prefill did; read it with `illava.last_stats(model)`."""

    encoder_units: list[list[int]] = field(default_factory=list)  # per vision block: units per segment
    kept_units: list[torch.Tensor] = field(default_factory=list)  # per image/video: kept placeholder ids
    image_tokens_per_layer: list[list[int]] = field(default_factory=list)  # per decoder layer, per sample (host)
    sequence_per_layer: list[list[int]] = field(default_factory=list)  # per decoder layer, per sample (host)
    merge_seconds: float = 0.0  # wall time in importance + selection + merging + re-packing (when timed)
    _positions: torch.Tensor | None = None  # (P, B, L) positions of the LLM input after the encoder
    _is_image: torch.Tensor | None = None  # (B, L) image-content tokens of that input

    @property
    def llm_image_tokens(self) -> list[torch.Tensor]:
        """Per decoder layer: (B,) image tokens entering it (the plan's counts; kept on the host)."""
        return [torch.tensor(row) for row in self.image_tokens_per_layer]

    @property
    def llm_sequence(self) -> list[torch.Tensor]:
        """Per decoder layer: (B,) real tokens entering it."""
        return [torch.tensor(row) for row in self.sequence_per_layer]

    @property
    def image_positions(self) -> list[torch.Tensor]:
        """Per sample: (P, n) positions of the image tokens that reach the LLM (computed on demand,
        so the forward pays nothing for it)."""
        if self._positions is None:
            return []
        return [self._positions[:, b][:, self._is_image[b]] for b in range(self._is_image.shape[0])]


@dataclass
class EngineState:
    """Per-model state while illava is applied."""

    schedule: Schedule
    adapter: Any
    stats: RunStats = field(default_factory=RunStats)
    key_masks: list[torch.Tensor] | None = None  # per decoder layer: (B, K_l) which cached keys are real
    key_padded: list[bool] | None = None  # per decoder layer: whether its key mask has padding (host)
    key_stage: list[int] | None = None  # per decoder layer: first layer whose cache has the same length and mask
    next_positions: torch.Tensor | None = None  # (B,) position of the next decoded token
    time_merges: bool = False  # synchronise and time the merge work (benchmarks)


# ----------------------------------------------------------------------------------- masks
def layer_mask(key_valid: torch.Tensor, q_len: int, implementation: str, dtype: torch.dtype, padded: bool | None):
    """Mask for `q_len` queries that are the last `q_len` of `key_valid.shape[1]` keys.

    key_valid: (B, K) bool. Flash kernels take the 2-D padding mask; eager an additive
    (B, 1, q, K) float mask; sdpa a boolean one (None when plain causal suffices). `padded`
    says whether `key_valid` has any False, when the caller knows it on the host (otherwise it
    is read from the device, a synchronisation).
    """
    n_keys = key_valid.shape[1]
    no_padding = not padded if padded is not None else bool(key_valid.all())
    if implementation.startswith("flash"):
        return None if no_padding else key_valid.to(torch.int32)
    if implementation in ("sdpa", PACKED) and no_padding and q_len in (1, n_keys):
        return None
    device = key_valid.device
    query_at = torch.arange(n_keys - q_len, n_keys, device=device)  # key index of each query
    allowed = (torch.arange(n_keys, device=device)[None, :] <= query_at[:, None])[None] & key_valid[:, None, :]
    # A padding query sees no real key; let it see itself so its softmax stays finite.
    allowed[:, torch.arange(q_len, device=device), query_at] = True
    allowed = allowed[:, None]  # (B, 1, q, K)
    if implementation in ("sdpa", PACKED):
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, torch.finfo(dtype).min)


def repack(valid: torch.Tensor, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Gather index (B, L') that packs the True entries of `valid` (B, L) to the right (left
    padding), the new validity mask (B, L') and whether it has padding. `lengths` are the True
    counts per row, known on the host, so nothing is read back."""
    length = max(lengths) if lengths else 0
    counts = torch.tensor(lengths, device=valid.device)
    order = torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices  # real positions first, in order
    rank = torch.arange(length, device=valid.device)[None, :] - (length - counts[:, None])  # (B, L')
    new_valid = rank >= 0
    return order.gather(1, rank.clamp(min=0)), new_valid, min(lengths, default=0) != length


def right_aligned(valid: torch.Tensor) -> torch.Tensor:
    """Gather index (B, L) that moves left-padded rows (real tokens last) to right padding."""
    pads = (~valid).sum(dim=1, keepdim=True)
    return (torch.arange(valid.shape[1], device=valid.device)[None, :] + pads).clamp(max=valid.shape[1] - 1)


# ----------------------------------------------------------------------------------- the sequence
@dataclass
class Sequence:
    """The LLM's working sequence at prefill, left padded, with its host-side bookkeeping."""

    hidden: torch.Tensor  # (B, L, C)
    positions: torch.Tensor  # (P, B, L)
    rope: tuple[torch.Tensor, torch.Tensor]  # (B, L, D) each
    valid: torch.Tensor  # (B, L) bool
    segment: torch.Tensor  # (B, L) global segment id, -1 for text, structural tokens and padding
    extras: dict[str, torch.Tensor]  # (B, L, ...) per-token features that merge like hidden (DeepStack)
    lengths: list[int]  # host: real tokens per sample
    padded: bool | None = None  # whether `valid` has any False (None: not known on the host)
    #: host: per sample, the real tokens after its last image or video (its question and the chat
    #: template's closing tokens); merges never remove them, so they stay the last positions.
    question: list[int] = field(default_factory=list)

    def gather(self, index: torch.Tensor, valid: torch.Tensor, lengths: list[int], padded: bool) -> Sequence:
        """The sequence re-laid along `index` (B, L'), with validity `valid` (B, L')."""

        def along(t: torch.Tensor) -> torch.Tensor:  # (B, L, ...) -> (B, L', ...)
            view = index.view(*index.shape, *([1] * (t.dim() - 2))).expand(-1, -1, *t.shape[2:])
            return t.gather(1, view)

        return Sequence(
            hidden=along(self.hidden),
            positions=self.positions.gather(2, index[None].expand(self.positions.shape[0], -1, -1)),
            rope=(along(self.rope[0]), along(self.rope[1])),
            valid=valid,
            segment=self.segment.gather(1, index).masked_fill(~valid, -1),
            extras={name: along(t) for name, t in self.extras.items()},
            lengths=lengths,
            padded=padded,
            question=self.question,
        )


@dataclass(frozen=True)
class SegmentPlan:
    """One image segment of the batch: where its plan applies."""

    sample: int
    plan: Plan
    index_in_item: int


# ----------------------------------------------------------------------------------- placement
@dataclass
class Placement:
    """Where the visual inputs sit in the prompt (host), and the segments they make."""

    positions: dict[str, list[list[tuple[int, int]]]]  # modality -> per item: (row, col) of each placeholder
    segment_ids: list[list[int]]  # host (B, L): global segment id, -1 elsewhere
    segments: list[SegmentPlan]  # by global id


def locate(ids: list[list[int]], token_ids: dict[str, int], items: dict[str, list]) -> dict[str, list]:
    """Per modality, per item: the (row, col) of each of its placeholders, filled in row-major order
    one item after another (how the library's masked_scatter fills them)."""
    found = {}
    for modality, layouts in items.items():
        token = token_ids[modality]
        spots = [(row, col) for row, line in enumerate(ids) for col, value in enumerate(line) if value == token]
        total = sum(layout.placeholders for layout in layouts)
        if len(spots) != total:
            raise ValueError(
                f"illava: the prompt has {len(spots)} {modality} placeholder tokens but the {modality} inputs need {total}"
            )
        per_item, start = [], 0
        for layout in layouts:
            per_item.append(spots[start : start + layout.placeholders])
            start += layout.placeholders
        found[modality] = per_item
    return found


def place(
    embeds: torch.Tensor,
    keep: torch.Tensor,
    segment_ids: list[list[int]],
    spots: list[list[tuple[int, int]]],
    encoded: EncodedVisual,
    extras: dict[str, torch.Tensor],
    first_segment: int,
) -> int:
    """Write kept features into their placeholders, drop the others from `keep`, label segments on
    the host. Returns the next free global segment id."""
    width = embeds.shape[1]
    device = embeds.device
    flat_rows, flat_kept = [], []
    segment_id = first_segment
    for item_spots, layout, item_kept in zip(spots, encoded.items, encoded.kept, strict=True):
        flat = torch.tensor([row * width + col for row, col in item_spots], device=device)
        for (row, col), segment in zip(item_spots, layout.segment_of, strict=True):
            if segment >= 0:
                segment_ids[row][col] = segment_id + segment
        flat_rows.append(flat)
        flat_kept.append(flat[item_kept])
        segment_id += len(layout.segment_sizes)
    keep.view(-1)[torch.cat(flat_rows)] = False
    kept = torch.cat(flat_kept)
    keep.view(-1)[kept] = True
    features = torch.cat(encoded.pooler_output).to(embeds.dtype)
    embeds.view(-1, embeds.shape[-1])[kept] = features
    for name, values in (encoded.extras or {}).items():
        target = extras[name]
        target.view(-1, *target.shape[2:])[kept] = torch.cat(values).to(target.dtype)
    return segment_id


# ----------------------------------------------------------------------------------- prefill
def prefill(model, seq: Sequence, segments: list[SegmentPlan], cache, use_cache, state: EngineState) -> Sequence:
    """All decoder layers at prefill, merging image tokens after the schedule's LLM layers."""
    adapter = state.adapter
    lm = adapter.language_model(model)
    schedule = state.schedule
    method, params = schedule.reduction_method, schedule.params
    implementation = lm.config._attn_implementation
    merge_steps = {layer: i for i, layer in enumerate(schedule.llm_layers)}
    has_work = any(step.removed for s in segments for step in s.plan.llm)
    timer = MergeTimer(state.time_merges, seq.hidden.device)
    image_tokens = _image_tokens(segments, len(seq.lengths), lambda plan: plan.after_encoder)
    key_masks, key_padded, key_stage = [], [], []
    stage_valid = mask = None
    for index, layer in enumerate(lm.layers):
        if seq.valid is not stage_valid:  # first layer, or the sequence was merged: a new mask
            stage_valid, stage = seq.valid, index
            mask = layer_mask(seq.valid, seq.valid.shape[1], implementation, seq.hidden.dtype, padded=seq.padded)
        key_masks.append(seq.valid)
        key_padded.append(seq.padded)
        key_stage.append(stage)
        state.stats.image_tokens_per_layer.append(image_tokens)
        state.stats.sequence_per_layer.append(list(seq.lengths))
        step = merge_steps.get(index) if has_work else None
        merging = step is not None and any(s.plan.llm[step].removed for s in segments)
        call = dict(attention_mask=mask, position_embeddings=seq.rope, cache=cache, use_cache=use_cache)
        wants = method.uses_importance or method.uses_text(params)
        with capture(adapter.decoder_attention(layer), enabled=merging and wants) as captured:
            seq.hidden = layer(seq.hidden, **call)
        seq.hidden = adapter.after_decoder_layer(model, index, seq.hidden, seq.extras)
        if merging:
            with timer:
                seq = _merge(
                    seq, captured, index, step, segments, method, params, adapter.attention_scale(layer.self_attn)
                )
                image_tokens = _image_tokens(segments, len(seq.lengths), lambda plan, s=step: plan.llm[s].kept)
    state.stats.merge_seconds += timer.seconds
    keeps_cache = use_cache is not False and cache is not None
    state.key_masks = key_masks if keeps_cache else None
    state.key_padded = key_padded if keeps_cache else None
    state.key_stage = key_stage if keeps_cache else None
    state.next_positions = seq.positions[:, :, -1].max(dim=0).values + 1
    seq.hidden = lm.norm(seq.hidden)
    return seq


def prompt_view(seq: Sequence, captured, scale: float | None) -> PromptView:
    """The layer's whole sequence as a method that looks at the text sees it (`PromptView`)."""
    rows = max(max(seq.question, default=0), 1)
    question = [[j >= rows - n for j in range(rows)] for n in seq.question]
    return PromptView(
        query=captured.query, key=captured.key, valid=seq.valid, image=seq.segment >= 0,
        question=torch.tensor(question, dtype=torch.bool).view(len(question), rows).to(seq.valid.device, non_blocking=True),
        scale=scale,
    )  # fmt: skip


def _image_tokens(segments: list[SegmentPlan], batch: int, count) -> list[int]:
    tokens = [0] * batch
    for segment in segments:
        tokens[segment.sample] += count(segment.plan)
    return tokens


def _merge(seq: Sequence, captured, layer: int, step: int, segments: list[SegmentPlan], method, params, scale):
    """Token_Merge after a decoder layer (paper eq. 2): image tokens only, per segment."""
    merging = [(sid, s) for sid, s in enumerate(segments) if s.plan.llm[step].removed]
    batch, length, channels = seq.hidden.shape
    device = seq.hidden.device
    # The merging segments' tokens, segment after segment and in order: a stable sort of the
    # segment ids (counts are known, so the first `total` entries are exactly those tokens).
    ids = torch.tensor([sid for sid, _ in merging], device=device)
    is_merging = (seq.segment[..., None] == ids).any(dim=-1) if len(merging) < len(segments) else seq.segment >= 0
    key = torch.where(is_merging, seq.segment, torch.iinfo(seq.segment.dtype).max).view(-1)
    total = sum(s.plan.llm[step].tokens_in for _, s in merging)
    index = torch.sort(key, stable=True).indices[:total]  # (T,) flat positions
    specs, start = [], 0
    for _, s in merging:
        plan_step = s.plan.llm[step]
        specs.append(SegmentSpec(start, plan_step.tokens_in, plan_step.kept, plan_step.recycled, s.index_in_item))
        start += plan_step.tokens_in

    def rows(t: torch.Tensor) -> torch.Tensor:  # (B, L, ...) -> (T, X)
        return t.reshape(batch * length, -1)[index]

    def heads(t: torch.Tensor) -> torch.Tensor:  # (B, H, L, D) -> (H, T, D)
        return t.transpose(0, 1).reshape(t.shape[1], batch * length, -1)[:, index]

    text = None
    if captured and method.uses_text(params):
        text = method.text_importance(params, prompt_view(seq, captured, scale)).reshape(-1)[index]
    request = StageRequest(
        stage="llm", layer=layer, hidden=rows(seq.hidden),
        query=heads(captured.query) if captured else None, key=heads(captured.key) if captured else None,
        segments=specs, unit=1, scale=scale, causal=True, text_importance=text,
    )  # fmt: skip
    merge_map = method.merge(params, request)
    check_map(merge_map, specs, f"decoder layer {layer}")
    kept = index[merge_map.keep]
    hidden = seq.hidden.reshape(batch * length, channels).index_copy(0, kept, merge_map.apply(request.hidden))
    extras = {}
    for name, t in seq.extras.items():
        flat = t.reshape(batch * length, -1)
        extras[name] = flat.index_copy(0, kept, merge_map.apply(flat[index])).view_as(t)
    valid = seq.valid.clone().view(-1)
    valid[index] = False
    valid[kept] = True
    lengths = list(seq.lengths)
    for _, s in merging:
        lengths[s.sample] -= s.plan.llm[step].removed
    gather_index, new_valid, padded = repack(valid.view(batch, length), lengths)
    merged = Sequence(hidden.view(batch, length, channels), seq.positions, seq.rope, seq.valid, seq.segment, extras,
                      seq.lengths, question=seq.question)  # fmt: skip
    return merged.gather(gather_index, new_valid, lengths, padded)


# ----------------------------------------------------------------------------------- decoding
def decode(model, input_ids, inputs_embeds, attention_mask, position_ids, cache, use_cache, state: EngineState):
    """Tokens after a merged prefill: each layer attends to its own (shorter) cache."""
    adapter = state.adapter
    lm = adapter.language_model(model)
    hidden = inputs_embeds if inputs_embeds is not None else lm.embed_tokens(input_ids)
    batch, q_len, _ = hidden.shape
    if state.key_masks is None or state.key_masks[0].shape[0] != batch:
        raise RuntimeError("illava: this cache was not filled by a merged prefill of the same batch; start a new one")
    if position_ids is None:
        positions = state.next_positions[:, None] + torch.arange(q_len, device=hidden.device)
        positions = positions[None].expand(adapter.position_rows, -1, -1)
    else:
        positions = adapter.decode_positions(position_ids, batch)
    state.next_positions = positions[:, :, -1].max(dim=0).values + 1
    if attention_mask is not None:
        new_valid = attention_mask[:, -q_len:].bool()
        new_padded = not bool(new_valid.all())  # one read per step, not one per layer
    else:
        new_valid, new_padded = torch.ones(batch, q_len, dtype=torch.bool, device=hidden.device), False
    rope = adapter.rotary(lm, hidden, positions)
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
            masks[stage] = (key_valid, padded, layer_mask(key_valid, q_len, implementation, hidden.dtype, padded))
        key_valid, padded, mask = masks[stage]
        state.key_masks[index], state.key_padded[index] = key_valid, padded
        hidden = layer(hidden, attention_mask=mask, position_embeddings=rope, cache=cache, use_cache=use_cache)
    return lm.norm(hidden)
