"""Helpers shared by the built-in methods: one stage request, one segment at a time."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..merge import MergeMap, Recycle, SegmentBatch, attention_importance, batched_merge
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


def segment_importance(request: StageRequest, tokens: slice) -> torch.Tensor:
    """Importance of one LLM segment's tokens: causal column mean, each key normalised by the
    number of queries that can see it."""
    return attention_importance(
        request.query[:, tokens], request.key[:, tokens], causal=request.causal, scale=request.scale
    )


def selection_batch(request: StageRequest) -> SegmentBatch:
    """The request's segments as a padded batch for a selection that recycles nothing."""
    segments = request.segments
    return SegmentBatch.of(
        [s.start for s in segments], [s.units for s in segments], [s.kept for s in segments],
        [0] * len(segments), 1, request.hidden.device,
    )  # fmt: skip


def keep_most(request: StageRequest, scores: torch.Tensor) -> MergeMap:
    """Keep each segment's `kept` highest-scoring units (ties: the earlier unit), drop the rest,
    recycle nothing; `scores` (units,) of the whole request. Every segment at once."""
    batch = selection_batch(request)
    laid_out = scores.float()[batch.index].masked_fill_(batch.padding, float("-inf"))
    return batched_merge(laid_out, None, None, batch, unit=request.unit, scale=request.scale)


def ranked_units(request: StageRequest, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, L) the call's unit ids of every segment by descending score (ties: the earlier unit;
    padding last) and (S, L) validity, from `scores` (units,) of the whole request."""
    batch = selection_batch(request)
    laid_out = scores.float()[batch.index].masked_fill_(batch.padding, float("-inf"))
    order = torch.argsort(laid_out, dim=1, descending=True, stable=True)
    return batch.index.gather(1, order), batch.valid


def host_slices(spans: list[list[tuple[int, int]]], device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """For each list of per-segment ``(start, length)`` spans: (S, W) positions ``start .. start +
    length - 1`` (padding repeats a real one, or 0) and (S, W) validity -- built on the host and
    copied in one transfer, so slicing a ranked layout by host counts reads nothing back."""
    numbers, flags, shapes = [], [], []
    for span in spans:
        width = max((n for _, n in span), default=0)
        numbers += [start + min(j, max(n - 1, 0)) for start, n in span for j in range(width)]
        flags += [j < n for _, n in span for j in range(width)]
        shapes.append((len(span), width))
    values = torch.tensor(numbers + [int(f) for f in flags], dtype=torch.long).to(device, non_blocking=True)
    positions, validity = values.split([len(numbers), len(flags)])
    out, at = [], 0
    for rows, width in shapes:
        out.append((positions[at : at + rows * width].view(rows, width),
                    validity[at : at + rows * width].view(rows, width).bool()))  # fmt: skip
        at += rows * width
    return out


def keep_and_cluster(
    kept: tuple[torch.Tensor, torch.Tensor],
    centres: tuple[torch.Tensor, torch.Tensor],
    pool: tuple[torch.Tensor, torch.Tensor],
    features: torch.Tensor,
    counts: tuple[list[int], list[int]],
) -> MergeMap:
    """A map that keeps the units `kept` and one cluster token per centre; each of the three is an
    (S, W) tensor of the call's unit ids with its (S, W) validity. Every unit of `pool` (the centres
    among them) joins the centre it is most similar to (cosine of its `features` row), and a cluster
    token is the mean of its members, in its centre's place. `counts` (host): the kept units and
    the centres of each segment. Shared by VisionZip's contextual tokens and SparseVLM's recycling;
    reads nothing back."""
    (kept_ids, kept_ok), (centre_ids, centre_ok), (pool_ids, pool_ok) = kept, centres, pool
    kept_counts, centre_counts = counts
    big = torch.iinfo(torch.long).max
    both = torch.cat([torch.where(kept_ok, kept_ids, big), torch.where(centre_ok, centre_ids, big)], dim=1)
    keep_ids = both.view(-1).sort().values[: sum(kept_counts) + sum(centre_counts)]  # segment after segment
    if not sum(centre_counts):
        return MergeMap(keep=keep_ids)
    x = torch.nn.functional.normalize(features.float(), dim=-1)
    similarity = x[pool_ids] @ x[centre_ids].transpose(1, 2)  # (S, R, C)
    similarity = similarity.masked_fill_(~centre_ok[:, None, :], float("-inf"))
    own = (pool_ids[:, :, None] == centre_ids[:, None, :]) & centre_ok[:, None, :]
    joins = similarity.masked_fill_(own, float("inf")).argmax(dim=2)  # (S, R): the centre each unit joins
    slots = torch.arange(centre_ids.shape[1], device=pool_ids.device)
    member = (joins[:, None, :] == slots[None, :, None]) & pool_ok[:, None, :]  # (S, C, R)
    member &= pool_ids[:, None, :] != centre_ids[..., None]  # the centre counts once, first
    weights = torch.cat([torch.ones(*centre_ids.shape, 1, device=member.device), member.float()], dim=2)
    weights = weights / weights.sum(dim=2, keepdim=True)  # (S, C, 1 + R): the mean of the cluster
    members = torch.cat([centre_ids[..., None], pool_ids[:, None, :].expand(-1, centre_ids.shape[1], -1)], dim=2)
    width = centre_ids.shape[1]
    rows = torch.tensor([s * width + c for s, n in enumerate(centre_counts) for c in range(n)])
    rows = rows.to(pool_ids.device, non_blocking=True)
    members, weights = members.view(-1, members.shape[2])[rows], weights.view(-1, weights.shape[2])[rows]
    slots = torch.searchsorted(keep_ids, centre_ids.view(-1)[rows])  # where each cluster token sits
    return MergeMap(keep=keep_ids, recycles=(Recycle(slots, members, weights),))
