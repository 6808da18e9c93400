"""Applying the engine to a model: the patched inner forward, feature functions and removal.

How the patch hooks in (tomesd style): `apply` swaps the class of the inner multimodal model for a
subclass whose ``forward`` and ``get_<modality>_features`` are the functions below, and the outer
generation class for one whose ``forward`` refuses ``labels`` and whose batch expansion knows
merged encoder outputs; `remove` swaps them back, so the model's own modules and weights are never
touched. The forward reuses the library's modules (blocks, decoder layers, rotary embeddings,
attention kernels) and replaces only the loop around them; with a schedule that removes nothing it
reproduces the library's outputs.

Refused with a clear error on a merged model: static/compiled caches (each layer's cache has its
own length), ``labels``, ``output_hidden_states``/``output_attentions``, and new images in a cached
continuation. Beam search and ``num_return_sequences`` work: the beams of one sample share its merge.
"""

from __future__ import annotations

import functools

import torch
from transformers.cache_utils import DynamicCache

from ..errors import ScheduleError
from ..schedule import Schedule
from .attention import PACKED
from .llm import EngineState, Placement, RunStats, SegmentPlan, Sequence, decode, locate, place, prefill, repack
from .llm import right_aligned as _right_aligned
from .vision import EncodedVisual, encode

MODALITIES = ("image", "video")
#: Attention implementations the engine runs merges with (others are refused at `apply`).
SUPPORTED_ATTENTION = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", PACKED)


def _original(cls: type) -> type:
    return getattr(cls, "_illava_original_class", cls)


def _encode_call(inner, state: EngineState, call) -> EncodedVisual:
    adapter, schedule = state.adapter, state.schedule
    plans = [schedule.plan(size) for layout in call.items for size in layout.segment_sizes]
    return encode(adapter, inner, call, schedule, plans, time_merges=state.time_merges)


# ----------------------------------------------------------------------------------- inner forward
def _forward(self, *args, **kwargs):
    """The inner model's forward with merging (see the module docstring)."""
    state: EngineState = self._illava
    adapter = state.adapter
    arguments = adapter.bind(_original(type(self)).forward, (self, *args), kwargs)
    cache = arguments.pop("cache", None)
    cache = arguments.pop("past_key_values", None) if cache is None else cache
    for flag in ("output_hidden_states", "output_attentions"):
        if arguments.get(flag) or getattr(self.config, flag, False):
            raise NotImplementedError(f"illava: {flag} is not supported on a merged model (layers differ in length)")
    text_config = adapter.text_config(self.config)
    use_cache = arguments.get("use_cache")
    if use_cache is None:
        use_cache = text_config.use_cache
    if cache is None and use_cache:
        cache = DynamicCache(config=text_config)
    if cache is not None and not isinstance(cache, DynamicCache):
        raise NotImplementedError(
            f"illava: {type(cache).__name__} is not supported on a merged model (each layer's cache has its own "
            "length after merging); use the default dynamic cache"
        )
    input_ids, inputs_embeds = arguments.get("input_ids"), arguments.get("inputs_embeds")
    attention_mask = arguments.get("attention_mask")
    encoded_in = arguments.get("mm_encoder_outputs") or {}
    calls = {m: adapter.visual_call(self, m, arguments) for m in MODALITIES}
    if cache is not None and cache.get_seq_length() > 0:
        # Placeholder ids without pixels are ordinary tokens here, as in the unpatched model: a model
        # can generate one (seen with random weights on the GPU), and decoding must not stop on it.
        if any(calls.values()) or any(v is not None for v in encoded_in.values()):
            raise NotImplementedError(
                "illava: new images or videos in a cached continuation are not supported; "
                "run the whole conversation as one prefill"
            )
        hidden = decode(self, input_ids, inputs_embeds, attention_mask, arguments.get("position_ids"), cache,
                        use_cache, state)  # fmt: skip
        return adapter.output(self, hidden, cache if use_cache else None)

    encoded = {}
    for modality in MODALITIES:
        given = encoded_in.get(modality)
        if given is not None and not isinstance(given, EncodedVisual):
            raise ValueError(f"illava: {modality} features were encoded by an unpatched model; pass pixel values")
        if given is None and calls[modality] is not None:
            given = _encode_call(self, state, calls[modality])
        if given is not None:
            encoded[modality] = given
    if encoded and input_ids is None:
        raise ValueError("illava: merging needs input_ids to find the image placeholders")
    state.stats = stats = RunStats()
    lm = adapter.language_model(self)
    embeds = inputs_embeds if inputs_embeds is not None else self.get_input_embeddings()(input_ids)
    batch, length, _ = embeds.shape
    if attention_mask is None:
        attention_mask = torch.ones(batch, length, dtype=torch.long, device=embeds.device)
    positions = adapter.prefill_positions(self, {**arguments, "attention_mask": attention_mask}, embeds, cache)
    # The one read of the prompt (free on the CPU): token ids (the placeholders' places) and the mask.
    ids_host, mask_host = _host_copy(input_ids, attention_mask) if encoded else (None, attention_mask.bool().tolist())

    embeds = embeds.clone()
    keep = attention_mask.bool().clone()
    extras = {
        name: embeds.new_zeros(batch, length, *shape) for name, shape in adapter.llm_extra_shapes(self.config).items()
    }
    placement = _place(self, adapter, ids_host, encoded, embeds, keep, extras, stats)
    lengths = [sum(row) for row in mask_host]
    for segment in placement.segments:
        lengths[segment.sample] -= segment.plan.n_tokens - segment.plan.after_encoder
    segment_ids = torch.tensor(placement.segment_ids, device=embeds.device)
    rope = adapter.rotary(lm, embeds, positions)
    seq = Sequence(embeds, positions, rope, attention_mask.bool(), segment_ids, extras, lengths,
                   question=_question_lengths(placement, mask_host))  # fmt: skip
    index, valid, padded = repack(keep, lengths)
    seq = seq.gather(index, valid, lengths, padded)
    stats._positions, stats._is_image = seq.positions, seq.segment >= 0
    seq = prefill(self, seq, placement.segments, cache, use_cache, state)
    if not all(row[-1] for row in mask_host):  # the caller padded on the right: give the output back that way
        seq.hidden = seq.hidden.gather(1, _right_aligned(seq.valid)[..., None].expand_as(seq.hidden))
    return adapter.output(self, seq.hidden, cache if use_cache else None)


def _question_lengths(placement: Placement, mask_host: list[list[bool]]) -> list[int]:
    """Per sample, the real tokens after its last visual placeholder (0 for a sample without one)."""
    last = [-1] * len(mask_host)
    for per_item in placement.positions.values():
        for spots in per_item:
            for row, col in spots:
                last[row] = max(last[row], col)
    return [sum(row[end + 1 :]) if end >= 0 else 0 for row, end in zip(mask_host, last, strict=True)]


def _host_copy(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[list[list[int]], list[list[bool]]]:
    """Token ids and attention mask on the host, in one read."""
    both = torch.stack([input_ids, attention_mask.to(input_ids.dtype)]).tolist()
    return both[0], [[bool(v) for v in row] for row in both[1]]


def _place(inner, adapter, ids, encoded: dict[str, EncodedVisual], embeds, keep, extras, stats) -> Placement:
    """Kept features into their placeholders (images, then videos), segments labelled on the host."""
    batch, length = keep.shape
    segment_ids = [[-1] * length for _ in range(batch)]
    if not encoded:
        return Placement({}, segment_ids, [])
    token_ids = {m: adapter.placeholder_token_id(inner.config, m) for m in encoded}
    spots = locate(ids, token_ids, {m: e.items for m, e in encoded.items()})
    schedule = inner._illava.schedule
    segments: list[SegmentPlan] = []
    next_segment = 0
    for modality, vision in encoded.items():
        stats.kept_units.extend(vision.kept)
        if stats.encoder_units:  # images then videos: one list per block, segments in order
            for block, units in zip(stats.encoder_units, vision.encoder_units, strict=False):
                block.extend(units)
        else:
            stats.encoder_units = [list(units) for units in vision.encoder_units or []]
        stats.merge_seconds += vision.merge_seconds or 0.0
        for item_spots, layout in zip(spots[modality], vision.items, strict=True):
            sample = item_spots[0][0]
            segments.extend(
                SegmentPlan(sample, schedule.plan(size), index) for index, size in enumerate(layout.segment_sizes)
            )
        next_segment = place(embeds, keep, segment_ids, spots[modality], vision, extras, next_segment)
    return Placement(spots, segment_ids, segments)


# ----------------------------------------------------------------------------------- feature functions
def _features(modality: str):
    def get_features(self, *args, **kwargs):
        """The family's ``get_<modality>_features`` with merging (generate encodes before the prefill)."""
        state: EngineState = self._illava
        original = getattr(_original(type(self)), f"get_{modality}_features")
        arguments = state.adapter.bind(original, (self, *args), kwargs)
        call = state.adapter.visual_call(self, modality, arguments)
        if call is None:
            raise ValueError(f"illava: get_{modality}_features was called without {modality} pixels")
        return _encode_call(self, state, call)

    return get_features


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

    The library groups items per sample by matching feature lengths to placeholder counts, which
    merged features no longer match; here items are grouped by their unmerged placeholder counts.
    """
    ours = {k: v for k, v in mm_encoder_output.items() if isinstance(v, EncodedVisual)}
    rest = {k: v for k, v in mm_encoder_output.items() if k not in ours}
    if rest:
        rest = super(type(self), self)._expand_multimodal_outputs(input_ids, rest, expand_size, inputs_embeds)
    if expand_size == 1 or not ours:
        return {**rest, **ours}
    if input_ids is None:
        raise NotImplementedError("illava: expanding a batch of merged images needs input_ids")
    adapter = self._illava_adapter
    for modality, vision in ours.items():
        token_id = adapter.placeholder_token_id(self.config, modality)
        sizes = iter(enumerate(layout.placeholders for layout in vision.items))
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


# ----------------------------------------------------------------------------------- apply / remove
_PATCHED_CLASSES: dict[type, type] = {}


def _patched_class(original: type, methods: dict) -> type:
    """A subclass of `original` overriding `methods`, made once per class so `apply` never nests.
    It keeps the original's name: `save_pretrained` records the class name as the architecture."""
    if original not in _PATCHED_CLASSES:
        _PATCHED_CLASSES[original] = type(
            original.__name__, (original,), {**methods, "_illava_original_class": original, "__module__": __name__}
        )
    return _PATCHED_CLASSES[original]


def _inner_methods(inner_class: type) -> dict:
    methods = {"forward": _forward}
    for modality in MODALITIES:
        name = f"get_{modality}_features"
        original = getattr(inner_class, name, None)
        if original is not None:
            methods[name] = functools.wraps(original)(_features(modality))
    return methods


def apply(adapter, model: torch.nn.Module, schedule: Schedule) -> None:
    inner = adapter.inner_model(model)
    remove(adapter, model)
    encoder_depth, llm_depth = adapter.depths(inner.config)
    schedule.check_fits(encoder_depth=encoder_depth, llm_depth=llm_depth)
    for part, config in adapter.attention_configs(inner).items():
        if config._attn_implementation not in SUPPORTED_ATTENTION:
            raise ScheduleError(
                f"illava: the {part} uses attention {config._attn_implementation!r}; "
                f"supported: {', '.join(SUPPORTED_ATTENTION)}"
            )
    layer_types = getattr(adapter.language_model(inner).config, "layer_types", None) or []
    if any(kind != "full_attention" for kind in layer_types):
        raise ScheduleError(
            f"illava: decoder layers of types {sorted(set(layer_types))} are not supported (full attention only)"
        )
    inner._illava = EngineState(schedule=schedule, adapter=adapter)
    inner.__class__ = _patched_class(type(inner), _inner_methods(type(inner)))
    adapter.reset(inner)
    if model is not inner:
        outer = {"forward": _outer_forward(type(model)), "_expand_multimodal_outputs": _expand_multimodal_outputs,
                 "_illava_adapter": adapter}  # fmt: skip
        model.__class__ = _patched_class(type(model), outer)


def remove(adapter, model: torch.nn.Module) -> None:
    inner = adapter.inner_model(model)
    for module in {id(model): model, id(inner): inner}.values():
        original = getattr(type(module), "_illava_original_class", None)
        if original is not None:
            module.__class__ = original
    if hasattr(inner, "_illava"):
        del inner._illava
        adapter.reset(inner)


def state_of(adapter, model: torch.nn.Module) -> EngineState | None:
    inner = adapter.inner_model(model)
    return getattr(inner, "_illava", None) if inner is not None else None


__all__ = ["apply", "remove", "state_of"]
