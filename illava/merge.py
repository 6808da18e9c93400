"""The iLLaVA merge algorithm on plain tensors; it knows no model.

Everything here works on **one segment** (one image, one video frame, or one attention
window for importance) so that nothing ever crosses a segment boundary, and in **units**: a unit
is `unit` consecutive tokens that are kept or dropped together (4 for the Qwen2.5-VL encoder,
whose patch merger fuses 2x2 groups; 1 in the LLM).

Paper, section 3.2.2, and the choices made where it is silent:

* Importance ``S_avg``: the head-averaged column mean of ``softmax(Q K^T / sqrt(d))``, computed
  in query chunks so no N x N matrix is held. With a causal mask a key at position j is seen by
  fewer queries than one at position 0, so its column *sum* is divided by the number of
  queries that can see it (a plain column mean would favour early tokens). A unit scores the
  mean of its tokens.
* Selection: the ``P_i`` highest-scoring units are informative; the next ``P_c`` are recycle
  centres; the remaining ``R`` units are discarded.
* Recycling: ``S_sub`` is the head-averaged softmax attention from each centre (its tokens as
  queries) to the centres and discarded units (their tokens as keys), no causal mask: it is a
  similarity, not a forward pass. A unit's score is the sum over its key tokens, averaged over
  the centre's query tokens, so each row of ``S_sub`` sums to one. Each centre takes the ``M``
  discarded units it attends to most as members (centres choose independently, so a discarded
  unit may feed several centres, and one no centre picks is dropped), and becomes
  ``sum_k w_k x_k`` over itself and its members with ``w`` its ``S_sub`` row restricted to those
  units and renormalised. Units merge position by position (token t of a group with token t of
  each member group).
* Kept units stay in their original order, so causal order and window layout survive.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: Query rows processed at once when computing importance; bounds memory at
#: `chunk x n_keys` scores per head instead of `n x n`.
DEFAULT_CHUNK = 256  # measured fastest on CPU for 1-2k-token segments


def _expand_kv_heads(key: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(Hk, N, D) -> (H, N, D) for grouped-query attention."""
    if key.shape[0] == n_heads:
        return key
    return key.repeat_interleave(n_heads // key.shape[0], dim=0)


def attention_importance(
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    chunk_size: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    """Head-averaged column mean of softmax(Q K^T * scale) for one segment.

    query: (H, N, D); key: (Hk, N, D) with H % Hk == 0. Returns (N,) float32.
    With `causal`, query i sees keys 0..i and key j's column sum is divided by N - j.
    """
    n_heads, n, dim = query.shape
    key = _expand_kv_heads(key, n_heads)
    scale = dim**-0.5 if scale is None else scale
    col_sum = torch.zeros(n, dtype=torch.float32, device=query.device)
    query = query.float() * scale  # scaling Q (N x D) is cheaper than scaling every score (N x N)
    key_t = key.float().transpose(1, 2)
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        scores = torch.matmul(query[:, start:stop], key_t)  # (H, c, N)
        if causal:
            rows = torch.arange(start, stop, device=query.device)[:, None]
            cols = torch.arange(n, device=query.device)[None, :]
            scores.masked_fill_(cols > rows, float("-inf"))
        col_sum += scores.softmax(dim=-1).sum(dim=(0, 1))
    if causal:
        visible = torch.arange(n, 0, -1, device=query.device, dtype=torch.float32)  # N - j
    else:
        visible = torch.full((n,), float(n), device=query.device)
    return col_sum / (n_heads * visible)


def windowed_importance(
    query: torch.Tensor,
    key: torch.Tensor,
    boundaries: list[int],
    *,
    scale: float | None = None,
    chunk_size: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    """`attention_importance` (non-causal) of each segment ``[b_i, b_{i+1})`` of a packed sequence.

    query, key: (H, N, D) packed; boundaries: cumulative segment starts ending with N.
    Returns (N,). Segments up to `chunk_size` long (attention windows) are padded into one
    batched matmul with padded keys masked; longer ones (whole frames) go through the chunked
    `attention_importance` one at a time.
    """
    out = torch.empty(query.shape[1], dtype=torch.float32, device=query.device)
    key = _expand_kv_heads(key, query.shape[0])
    short = [(a, b - a) for a, b in zip(boundaries[:-1], boundaries[1:]) if 0 < b - a <= chunk_size]
    for a, b in zip(boundaries[:-1], boundaries[1:]):
        if b - a > chunk_size:
            out[a:b] = attention_importance(query[:, a:b], key[:, a:b], scale=scale, chunk_size=chunk_size)
    if short:
        device = query.device
        # One host-to-device copy for both, and the longest length from the host list (no read back).
        starts, lengths = torch.tensor([[a for a, _ in short], [n for _, n in short]]).to(device, non_blocking=True)
        offsets = torch.arange(max(n for _, n in short), device=device)
        real = offsets[None, :] < lengths[:, None]  # (S, L)
        index = torch.where(real, starts[:, None] + offsets, 0)
        s = scale if scale is not None else query.shape[-1] ** -0.5
        q = query[:, index].float() * s  # (H, S, L, D)
        k = key[:, index].float()
        scores = torch.matmul(q, k.transpose(-1, -2)).masked_fill_(~real[None, :, None, :], float("-inf"))
        probs = scores.softmax(dim=-1) * real[None, :, :, None]  # padded queries contribute nothing
        col_mean = probs.sum(dim=(0, 2)) / (query.shape[0] * lengths[:, None])  # (S, L)
        out[index[real]] = col_mean[real]
    return out


@dataclass(frozen=True)
class Selection:
    """Unit indices of one segment, each sorted ascending."""

    keep: torch.Tensor  # (P,) informative + centres, the units that survive
    centres: torch.Tensor  # (P_c,) recycled cluster units, a subset of keep
    discarded: torch.Tensor  # (R,)


def select_units(
    scores: torch.Tensor, n_keep: int, n_recycle: int, *, generator: torch.Generator | None = None
) -> Selection:
    """Top `n_keep - n_recycle` informative units, the next `n_recycle` as centres, the rest
    discarded. With a `generator`, the kept units are drawn uniformly at random instead (the
    random-dropping baseline) and there are no centres."""
    n = scores.shape[0]
    if generator is not None:
        order = torch.randperm(n, generator=generator).to(scores.device)
        n_recycle = 0
    else:
        order = torch.argsort(scores, descending=True, stable=True)
    centres = order[n_keep - n_recycle : n_keep].sort().values
    keep = order[:n_keep].sort().values
    discarded = order[n_keep:].sort().values
    return Selection(keep=keep, centres=centres, discarded=discarded)


def recycle_weights(
    query: torch.Tensor,
    key: torch.Tensor,
    centres: torch.Tensor,
    discarded: torch.Tensor,
    *,
    unit: int,
    group_size: int,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Members and merge weights of each centre.

    query, key: (H, n_units * unit, D) of the segment. Returns ``members`` (P_c, 1 + m) unit
    indices, the centre itself first, and ``weights`` (P_c, 1 + m) summing to one per row,
    with ``m = min(group_size, R)``.
    """
    n_heads = query.shape[0]
    key = _expand_kv_heads(key, n_heads)
    dim = query.shape[-1]
    scale = dim**-0.5 if scale is None else scale
    candidates = torch.cat([centres, discarded])  # keys of S_sub: centres then discarded units
    token_offsets = torch.arange(unit, device=query.device)
    q_tokens = (centres[:, None] * unit + token_offsets).reshape(-1)  # (P_c * unit,)
    k_tokens = (candidates[:, None] * unit + token_offsets).reshape(-1)
    scores = torch.matmul(query[:, q_tokens].float(), key[:, k_tokens].float().transpose(1, 2)) * scale
    probs = scores.softmax(dim=-1).mean(dim=0)  # (P_c*unit, C*unit), heads averaged
    n_c, n_cand = centres.shape[0], candidates.shape[0]
    s_sub = probs.reshape(n_c, unit, n_cand, unit).sum(dim=3).mean(dim=1)  # (P_c, C): rows sum to 1
    m = min(group_size, discarded.shape[0])
    member_scores, member_pos = s_sub[:, n_c:].topk(m, dim=1)  # among discarded units only
    self_scores = s_sub[torch.arange(n_c, device=query.device), torch.arange(n_c, device=query.device)]
    weights = torch.cat([self_scores[:, None], member_scores], dim=1)
    weights = weights / weights.sum(dim=1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)
    members = torch.cat([centres[:, None], discarded[member_pos]], dim=1)
    return members, weights


@dataclass(frozen=True)
class Recycle:
    """Cluster centres among the kept units: slot ``slots[i]`` of the kept units becomes
    ``sum_j weights[i, j] * unit[members[i, j]]`` (the centre itself is among its members)."""

    slots: torch.Tensor  # (P_c,) positions in `MergeMap.keep`
    members: torch.Tensor  # (P_c, 1 + m) unit indices, the centre first
    weights: torch.Tensor  # (P_c, 1 + m), rows sum to one


@dataclass(frozen=True)
class MergeMap:
    """What one Token_Merge does to a sequence of `n` units: which units survive (``keep``, in
    order) and which survivors become weighted sums of others (``recycles``). It is a linear map,
    so the engine applies the same one to hidden states and to every per-unit feature that must
    stay consistent with them (DeepStack features, tapped hidden states); positions and window
    ids are only gathered along ``keep``."""

    keep: torch.Tensor  # (P,) unit indices
    recycles: tuple[Recycle, ...] = ()

    def apply(self, values: torch.Tensor, unit: int = 1) -> torch.Tensor:
        """(n * unit, C) -> (P * unit, C): kept units, centres replaced by their weighted groups.
        Units merge position by position (token t of a group with token t of each member)."""
        channels = values.shape[-1]
        units = values.reshape(-1, unit, channels)  # (n, unit, C)
        kept = units[self.keep]
        for recycle in self.recycles:
            merged = (units[recycle.members] * recycle.weights[..., None, None].to(values.dtype)).sum(dim=1)
            kept = kept.index_copy(0, recycle.slots, merged)  # (P, unit, C)
        return kept.reshape(-1, channels)

    def gather(self, values: torch.Tensor, unit: int = 1) -> torch.Tensor:
        """(n * unit, ...) -> (P * unit, ...): the kept units' rows, nothing merged (positions)."""
        if unit == 1:
            return values[self.keep]
        tokens = (self.keep[:, None] * unit + torch.arange(unit, device=self.keep.device)).reshape(-1)
        return values[tokens]

    @staticmethod
    def concat(maps: list[MergeMap], unit_offsets: list[int]) -> MergeMap:
        """One map over consecutive segments from one map per segment; `unit_offsets[i]` is where
        segment i starts. Recycles with the same member count stay one block (same arithmetic)."""
        if len(maps) == 1 and unit_offsets[0] == 0:
            return maps[0]
        keeps, blocks = [], {}
        kept_offset = 0
        for merge_map, offset in zip(maps, unit_offsets, strict=True):
            keeps.append(merge_map.keep + offset)
            for recycle in merge_map.recycles:
                blocks.setdefault(recycle.members.shape[1], []).append(
                    (recycle.slots + kept_offset, recycle.members + offset, recycle.weights)
                )
            kept_offset += merge_map.keep.shape[0]
        recycles = tuple(
            Recycle(*(torch.cat(parts) for parts in zip(*entries, strict=True))) for entries in blocks.values()
        )
        return MergeMap(keep=torch.cat(keeps), recycles=recycles)


def merge_units(
    hidden: torch.Tensor, selection: Selection, members: torch.Tensor | None, weights: torch.Tensor | None, *, unit: int
) -> torch.Tensor:
    """Hidden states of the kept units, centres replaced by their weighted groups.

    hidden: (n_units * unit, C) -> (P * unit, C), in the order of `selection.keep`.
    """
    return segment_map(selection, members, weights).apply(hidden, unit)


def segment_map(selection: Selection, members: torch.Tensor | None, weights: torch.Tensor | None) -> MergeMap:
    """The `MergeMap` of one segment's selection and (optional) recycling."""
    if members is None or not members.numel():
        return MergeMap(keep=selection.keep)
    slots = torch.searchsorted(selection.keep, selection.centres)
    return MergeMap(keep=selection.keep, recycles=(Recycle(slots, members, weights),))


def merge_plan(
    query: torch.Tensor | None,
    key: torch.Tensor | None,
    scores: torch.Tensor | None,
    *,
    n_units: int,
    n_keep: int,
    n_recycle: int,
    group_size: int,
    unit: int = 1,
    generator: torch.Generator | None = None,
    scale: float | None = None,
    device: torch.device | None = None,
) -> MergeMap:
    """One Token_Merge on one segment as a `MergeMap` over its `n_units` units.

    query/key: (H, n*unit, D) (may be None without recycling); scores: (n,) unit importance (None
    with a `generator`: random selection needs none).
    """
    if generator is not None:
        order = torch.randperm(n_units, generator=generator).to(device if scores is None else scores.device)
        keep = order[:n_keep].sort().values
        return MergeMap(keep=keep)
    selection = select_units(scores, n_keep, n_recycle)
    members = weights = None
    if selection.centres.numel() and selection.discarded.numel():
        members, weights = recycle_weights(
            query, key, selection.centres, selection.discarded, unit=unit, group_size=group_size, scale=scale
        )
    return segment_map(selection, members, weights)


def merge_segment(
    hidden: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    scores: torch.Tensor,
    *,
    n_keep: int,
    n_recycle: int,
    group_size: int,
    unit: int = 1,
    generator: torch.Generator | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One Token_Merge on one segment: returns (kept unit indices (P,), merged hidden (P*unit, C)).

    hidden: (n*unit, C); query/key: (H, n*unit, D); scores: (n,) unit importance.
    """
    merge_map = merge_plan(
        query, key, None if generator is not None else scores, n_units=scores.shape[0], n_keep=n_keep,
        n_recycle=n_recycle, group_size=group_size, unit=unit, generator=generator, scale=scale,
        device=hidden.device,
    )  # fmt: skip
    return merge_map.keep, merge_map.apply(hidden, unit)
