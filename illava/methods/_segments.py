"""Helpers shared by the built-in methods: one stage request, one segment at a time."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..merge import MergeMap, SegmentBatch, attention_importance, batched_merge, windowed_importance
from .base import SegmentSpec, StageRequest


def each_segment(request: StageRequest, merge: Callable[[SegmentSpec, slice], MergeMap]) -> MergeMap:
    """Call `merge(segment, tokens)` for every segment that removes something (`tokens` is the
    segment's token slice in the request) and keep every unit of the others; one map for all."""
    maps, offsets = [], []
    device = request.hidden.device
    for segment in request.segments:
        offsets.append(segment.start)
        if segment.kept == segment.units:
            maps.append(MergeMap(keep=torch.arange(segment.units, device=device)))
            continue
        tokens = slice(segment.start * request.unit, (segment.start + segment.units) * request.unit)
        maps.append(merge(segment, tokens))
    return MergeMap.concat(maps, offsets)


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


def segment_importance(request: StageRequest, tokens: slice) -> torch.Tensor:
    """Importance of one LLM segment's tokens: causal column mean, each key normalised by the
    number of queries that can see it."""
    return attention_importance(
        request.query[:, tokens], request.key[:, tokens], causal=request.causal, scale=request.scale
    )


def keep_most(request: StageRequest, scores: torch.Tensor) -> MergeMap:
    """Keep each segment's `kept` highest-scoring units (ties: the earlier unit), drop the rest,
    recycle nothing; `scores` (units,) of the whole request. Every segment at once."""
    segments = request.segments
    batch = SegmentBatch.of(
        [s.start for s in segments], [s.units for s in segments], [s.kept for s in segments],
        [0] * len(segments), 1, request.hidden.device,
    )  # fmt: skip
    laid_out = scores.float()[batch.index].masked_fill_(batch.padding, float("-inf"))
    return batched_merge(laid_out, None, None, batch, unit=request.unit, scale=request.scale)
