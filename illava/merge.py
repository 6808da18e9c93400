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
    boundaries: list[int] | None = None,
    *,
    cu: torch.Tensor | None = None,
    longest: int | None = None,
    scale: float | None = None,
    chunk_size: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    """`attention_importance` (non-causal) of each segment ``[b_i, b_{i+1})`` of a packed sequence.

    query, key: (H, N, D) packed. The segments are given either on the host (`boundaries`:
    cumulative starts ending with N) or on the device (`cu`, int, with `longest` a host-known bound
    on their lengths) -- the second reads nothing back, for windows whose kept sizes only the device
    knows. Returns (N,). Segments up to `chunk_size` long (attention windows) are padded into one
    batched matmul with padded keys masked; longer ones (whole frames, host bounds only) go through
    the chunked `attention_importance` one at a time.
    """
    device = query.device
    key = _expand_kv_heads(key, query.shape[0])
    out = torch.empty(query.shape[1], dtype=torch.float32, device=device)
    if boundaries is not None:
        short = [(a, b - a) for a, b in zip(boundaries[:-1], boundaries[1:]) if 0 < b - a <= chunk_size]
        for a, b in zip(boundaries[:-1], boundaries[1:]):
            if b - a > chunk_size:
                out[a:b] = attention_importance(query[:, a:b], key[:, a:b], scale=scale, chunk_size=chunk_size)
        if not short:
            return out
        # One host-to-device copy for both, and the longest length from the host list (no read back).
        starts, lengths = torch.tensor([[a for a, _ in short], [n for _, n in short]]).to(device, non_blocking=True)
        longest = max(n for _, n in short)
        targets = torch.tensor([a + i for a, n in short for i in range(n)]).to(device, non_blocking=True)
    else:
        if longest is None or longest > chunk_size:
            raise ValueError("device-side segment bounds need a host-known longest length up to chunk_size")
        cu = cu.to(device=device, dtype=torch.long)
        starts, lengths = cu[:-1], cu[1:] - cu[:-1]
        targets = None
    offsets = torch.arange(longest, device=device)
    real = offsets[None, :] < lengths[:, None]  # (S, L)
    index = torch.where(real, starts[:, None] + offsets, 0)
    s = scale if scale is not None else query.shape[-1] ** -0.5
    q = query[:, index].float() * s  # (H, S, L, D)
    k = key[:, index].float()
    scores = torch.matmul(q, k.transpose(-1, -2)).masked_fill_(~real[None, :, None, :], float("-inf"))
    # Padded queries contribute nothing (a segment with no tokens left has only padded rows, whose
    # softmax over no real key is not a number: `where` drops them too).
    probs = torch.where(real[None, :, :, None], scores.softmax(dim=-1), 0.0)
    col_mean = probs.sum(dim=(0, 2)) / (query.shape[0] * lengths[:, None].clamp(min=1))  # (S, L)
    if targets is not None:  # host bounds: the real slots in order are exactly `targets`
        flat = torch.tensor([i * longest + j for i, (_, n) in enumerate(short) for j in range(n)])
        out[targets] = col_mean.view(-1)[flat.to(device, non_blocking=True)]
        return out
    # Device bounds: token t sits in segment w = #(starts <= t) - 1 at offset t - start[w].
    tokens = torch.arange(query.shape[1], device=device)
    segment = torch.searchsorted(cu[1:], tokens, right=True)
    return col_mean[segment, tokens - starts[segment]]


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
class Fold:
    """Units folded into kept units, any number into each (ToMe's bipartite merge folds several
    units into one survivor): a sparse matrix in coordinate form. Entry ``j`` adds
    ``weights[j] * unit[sources[j]]`` into kept slot ``slots[j]``; a slot some entry names becomes
    the sum of its entries (so a survivor that keeps its own value lists itself among its sources),
    every other slot stays the gathered unit. How many entries there are is the caller's (known on
    the host); how many land on each slot may be known on the device only, so applying a fold
    reads nothing back.

    With ``size_weighted`` the weights are relative: entry ``j`` weighs ``weights[j] * size[sources[j]]``
    (a unit's *size*: how many original units it stands for; one where no sizes are given) and
    every folded slot is divided by its total weight -- a size-weighted average, as ToMe merges --
    whose total is also the slot's size afterwards (sizes add up)."""

    slots: torch.Tensor  # (E,) long: positions in `MergeMap.keep`
    sources: torch.Tensor  # (E,) long: unit indices
    weights: torch.Tensor  # (E,) float
    size_weighted: bool = False


@dataclass(frozen=True)
class MergeMap:
    """What one Token_Merge does to a sequence of `n` units: which units survive (``keep``, in
    order) and which survivors become weighted sums of others (``recycles``: a fixed number of
    members each; ``fold``: any number, see `Fold`). It is a linear map, so the engine applies the
    same one to hidden states and to every per-unit feature that must stay consistent with them
    (DeepStack features, tapped hidden states); positions and window ids are only gathered along
    ``keep`` (a folded survivor keeps its own). Recycles are applied first; a slot a fold names is
    the fold's.

    Sizes: a map with a size-weighted fold tracks how many original units each survivor stands
    for (`sizes_after`), and with ``proportional_attention`` asks that attention over its survivors
    add ``log(size)`` of each key to the logits (ToMe's proportional attention: a key of size k
    weighs as k equal keys would)."""

    keep: torch.Tensor  # (P,) unit indices
    recycles: tuple[Recycle, ...] = ()
    fold: Fold | None = None
    proportional_attention: bool = False

    @property
    def tracks_sizes(self) -> bool:
        """Whether its survivors have sizes other than one (a size-weighted fold)."""
        return self.fold is not None and self.fold.size_weighted

    def apply(self, values: torch.Tensor, unit: int = 1, sizes: torch.Tensor | None = None) -> torch.Tensor:
        """(n * unit, C) -> (P * unit, C): kept units, centres replaced by their weighted groups, folded
        slots by their folds. Units merge position by position (token t of a group with token t of
        each member). `sizes` (n,): each unit's size, for a size-weighted fold (None: all one)."""
        channels = values.shape[-1]
        units = values.reshape(-1, unit, channels)  # (n, unit, C)
        kept = units[self.keep]
        for recycle in self.recycles:
            merged = (units[recycle.members] * recycle.weights[..., None, None].to(values.dtype)).sum(dim=1)
            kept = kept.index_copy(0, recycle.slots, merged)  # (P, unit, C)
        if self.fold is not None:
            kept = self._folded(units, kept, sizes)
        return kept.reshape(-1, channels)

    def _folded(self, units: torch.Tensor, kept: torch.Tensor, sizes: torch.Tensor | None) -> torch.Tensor:
        fold = self.fold
        weights = self._entry_weights(sizes if fold.size_weighted else None)  # (E,) float32
        exact = torch.promote_types(units.dtype, torch.float32)  # sums in float32 at least, whatever the dtype
        contributions = units[fold.sources].to(exact) * weights[:, None, None].to(exact)  # (E, unit, C)
        summed = torch.zeros(kept.shape, dtype=exact, device=kept.device).index_add_(0, fold.slots, contributions)
        if fold.size_weighted:
            total = weights.new_zeros(kept.shape[0]).index_add_(0, fold.slots, weights)
            summed = summed / total.clamp_min(torch.finfo(total.dtype).tiny)[:, None, None].to(exact)
        return torch.where(self._folded_slots()[:, None, None], summed.to(kept.dtype), kept)

    def _entry_weights(self, sizes: torch.Tensor | None) -> torch.Tensor:
        """(E,) float32: each fold entry's weight, times its source's size when `sizes` are given."""
        weights = self.fold.weights.float()
        return weights if sizes is None else weights * sizes.float()[self.fold.sources]

    def _folded_slots(self) -> torch.Tensor:
        """(P,) bool: the kept slots the fold names."""
        return torch.zeros(self.keep.shape[0], dtype=torch.bool, device=self.keep.device).index_fill_(
            0, self.fold.slots, True
        )

    def sizes_after(self, sizes: torch.Tensor | None) -> torch.Tensor:
        """(P,) float32: the survivors' sizes from the units' `sizes` (n,) (None: all one). A kept
        unit keeps its size (a recycled centre too: recycling tracks no sizes); a folded slot's is the
        sum of its entries' ``weights[j] * size[sources[j]]``."""
        kept = torch.ones(self.keep.shape[0], device=self.keep.device) if sizes is None else sizes.float()[self.keep]
        if self.fold is None:
            return kept
        total = torch.zeros_like(kept).index_add_(0, self.fold.slots, self._entry_weights(sizes))
        return torch.where(self._folded_slots(), total, kept)

    def token_index(self, unit: int = 1) -> torch.Tensor:
        """(P * unit,) long: the kept units' tokens, in order, to index every per-token tensor of the
        sequence with (positions: the kept units' rows, nothing merged)."""
        if unit == 1:
            return self.keep
        return (self.keep[:, None] * unit + torch.arange(unit, device=self.keep.device)).reshape(-1)

    @staticmethod
    def concat(maps: list[MergeMap], unit_offsets: list[int]) -> MergeMap:
        """One map over consecutive segments from one map per segment; `unit_offsets[i]` is where
        segment i starts. Recycles with the same member count stay one block (same arithmetic);
        folds become one fold (their ``size_weighted`` must agree)."""
        if len(maps) == 1 and unit_offsets[0] == 0:
            return maps[0]
        keeps, blocks, folds = [], {}, []
        kept_offset = 0
        for merge_map, offset in zip(maps, unit_offsets, strict=True):
            keeps.append(merge_map.keep + offset)
            for recycle in merge_map.recycles:
                blocks.setdefault(recycle.members.shape[1], []).append(
                    (recycle.slots + kept_offset, recycle.members + offset, recycle.weights)
                )
            if merge_map.fold is not None:
                fold = merge_map.fold
                folds.append((fold.slots + kept_offset, fold.sources + offset, fold.weights, fold.size_weighted))
            kept_offset += merge_map.keep.shape[0]
        recycles = tuple(
            Recycle(*(torch.cat(parts) for parts in zip(*entries, strict=True))) for entries in blocks.values()
        )
        fold = None
        if folds:
            if len({weighted for *_, weighted in folds}) > 1:
                raise ValueError("MergeMap.concat: folds that are size-weighted and folds that are not")
            slots, sources, weights, weighted = zip(*folds, strict=True)
            fold = Fold(torch.cat(slots), torch.cat(sources), torch.cat(weights), weighted[0])
        proportional = any(merge_map.proportional_attention for merge_map in maps)
        return MergeMap(keep=torch.cat(keeps), recycles=recycles, fold=fold, proportional_attention=proportional)


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


# ----------------------------------------------------------------------------------- batched over segments
@dataclass(frozen=True)
class SegmentBatch:
    """The segments of one stage call laid out as a padded (S, L) batch, with every count a merge
    needs, built on the host and copied to the device in one transfer: segment `s` is units
    ``start[s] .. start[s] + units[s] - 1`` of the call. The batched merge reads nothing back."""

    units: list[int]  # host: units per segment
    kept: list[int]  # host: units each keeps
    recycled: list[int]  # host: of those, recycled centres
    group_size: int  # M
    index: torch.Tensor  # (S, L) long: the call's unit ids, padding clamped to the segment's last unit
    valid: torch.Tensor  # (S, L) bool
    padding: torch.Tensor  # (S, L) bool: ~valid
    keep_at: torch.Tensor  # (S, K) long: ranks 0..K-1 (the kept), with validity `keep_ok`
    keep_ok: torch.Tensor  # (S, K) bool
    centre_at: torch.Tensor  # (S, C) long: the centres' ranks (informative .. kept - 1)
    discard_at: torch.Tensor  # (S, D) long: the discarded's ranks (kept .. units - 1)
    discard_bad: torch.Tensor  # (S, D) bool: discarded slots a segment does not fill
    candidate_bad: torch.Tensor  # (S, C + D) bool: recycling candidates (centres, then discarded) a segment lacks
    member_ok: torch.Tensor  # (S, 1, m) bool: member slots each segment fills (min(M, discarded))
    member_bad: torch.Tensor  # (S, 1, m) bool: ~member_ok
    centre_rows: torch.Tensor  # (P_c,) long: rows of the real centres in the flattened (S*C)

    @classmethod
    def of(cls, starts, units, kept, recycled, group_size: int, device) -> SegmentBatch:
        longest, most_kept = max(units), max(kept)
        removed = [n - k for n, k in zip(units, kept)]
        centres, discards = max(recycled), max(removed)
        members = min(group_size, discards) if centres else 0
        rows = len(units)
        numbers = [
            [start + min(j, n - 1) for start, n in zip(starts, units) for j in range(longest)],
            [min(j, k - 1) for k in kept for j in range(most_kept)],
            [min(k - r + j, k - 1) for k, r in zip(kept, recycled) for j in range(centres)],
            [min(k + j, n - 1) for n, k in zip(units, kept) for j in range(discards)],
            [s * centres + c for s, r in enumerate(recycled) for c in range(r)],
        ]
        flags = [
            [j < n for n in units for j in range(longest)],
            [j >= n for n in units for j in range(longest)],
            [j < k for k in kept for j in range(most_kept)],
            [j >= r for r in removed for j in range(discards)],
            [
                c >= r_c if c < centres else c >= centres + r
                for r_c, r in zip(recycled, removed)
                for c in range(centres + discards)
            ],
            [j < min(group_size, r) for r in removed for j in range(members)],
            [j >= min(group_size, r) for r in removed for j in range(members)],
        ]
        longs = _split(torch.tensor([v for f in numbers for v in f], dtype=torch.long).to(device, non_blocking=True),
                       numbers, [(rows, longest), (rows, most_kept), (rows, centres), (rows, discards), (-1,)])  # fmt: skip
        bools = _split(torch.tensor([v for f in flags for v in f], dtype=torch.bool).to(device, non_blocking=True),
                       flags, [(rows, longest), (rows, longest), (rows, most_kept), (rows, discards),
                               (rows, centres + discards), (rows, 1, members), (rows, 1, members)])  # fmt: skip
        index, keep_at, centre_at, discard_at, centre_rows = longs
        valid, padding, keep_ok, discard_bad, candidate_bad, member_ok, member_bad = bools
        return cls(
            list(units), list(kept), list(recycled), group_size, index, valid, padding, keep_at, keep_ok, centre_at,
            discard_at, discard_bad, candidate_bad, member_ok, member_bad, centre_rows,
        )  # fmt: skip


def _split(flat: torch.Tensor, fields: list[list], shapes: list[tuple]) -> list[torch.Tensor]:
    return [part.view(shape) for part, shape in zip(torch.split(flat, [len(f) for f in fields]), shapes)]


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float32 else t.float()


def batched_importance(
    query: torch.Tensor, key: torch.Tensor, batch: SegmentBatch, *, causal: bool, scale: float | None
):
    """`attention_importance` of every segment at once: (S, L) float32 (padding: -inf).

    query, key: (H, T, D) of the call's tokens (one unit each); each segment's tokens attend only to
    each other, causally when `causal`."""
    n_heads, longest = query.shape[0], batch.index.shape[1]
    key = _expand_kv_heads(key, n_heads)
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    q = _f32(query[:, batch.index]) * scale  # (H, S, L, D)
    k = _f32(key[:, batch.index])
    hidden = batch.padding[:, None, :]  # (S, 1, L): keys that do not exist
    if causal:
        hidden = hidden | torch.ones(longest, longest, dtype=torch.bool, device=q.device).triu_(1)
    scores = torch.matmul(q, k.transpose(-1, -2)).masked_fill_(hidden, float("-inf"))
    column = scores.softmax(-1).nan_to_num_(0.0).mul_(batch.valid[:, :, None]).sum(dim=(0, 2))  # (S, L)
    lengths = batch.valid.sum(dim=1, keepdim=True)
    visible = lengths - torch.arange(longest, device=q.device) if causal else lengths  # N - j, or N
    return (column / (n_heads * visible.clamp(min=1))).masked_fill_(batch.padding, float("-inf"))


def batched_merge(
    scores: torch.Tensor,
    query: torch.Tensor | None,
    key: torch.Tensor | None,
    batch: SegmentBatch,
    *,
    unit: int,
    scale: float | None,
) -> MergeMap:
    """One Token_Merge on every segment of a call at once: the same selection and recycling as
    `merge_plan` per segment (see the module docstring), batched over padded segments.

    scores: (S, L) unit importance, padding -inf; query/key: (H, T*unit, D) of the call (needed
    only when something is recycled)."""
    order = torch.argsort(scores, dim=1, descending=True, stable=True)  # (S, L): padding last
    ranked = batch.index.gather(1, order)  # (S, L): the call's unit ids by rank
    kept_ids = torch.where(batch.keep_ok, ranked.gather(1, batch.keep_at), torch.iinfo(torch.long).max)
    keep_ids = kept_ids.view(-1).sort().values[: sum(batch.kept)]  # ascending: segment after segment
    if not max(batch.recycled) or query is None:
        return MergeMap(keep=keep_ids)
    centres = ranked.gather(1, batch.centre_at)  # (S, C) unit ids (padded rows repeat a kept unit)
    discarded = ranked.gather(1, batch.discard_at)  # (S, D)
    segments, n_centres = centres.shape
    candidates = torch.cat([centres, discarded], dim=1)  # (S, C + D): centres first, as `recycle_weights`
    key_bad = batch.candidate_bad
    key = _expand_kv_heads(key, query.shape[0])
    if unit == 1:
        q_tokens, k_tokens = centres, candidates
    else:
        offsets = torch.arange(unit, device=scores.device)
        q_tokens = (centres[..., None] * unit + offsets).view(segments, -1)  # (S, C*u)
        k_tokens = (candidates[..., None] * unit + offsets).view(segments, -1)
        key_bad = key_bad.repeat_interleave(unit, dim=1)
    s = query.shape[-1] ** -0.5 if scale is None else scale
    logits = torch.matmul(_f32(query[:, q_tokens]) * s, _f32(key[:, k_tokens]).transpose(-1, -2))
    probs = logits.masked_fill_(key_bad[None, :, None, :], float("-inf")).softmax(dim=-1).mean(dim=0)
    width = candidates.shape[1]
    s_sub = probs.view(segments, n_centres, unit, width, unit).sum(dim=4).mean(dim=2)  # (S, C, K)
    members_n = batch.member_ok.shape[2]
    member_scores = s_sub[:, :, n_centres:].masked_fill(batch.discard_bad[:, None, :], float("-inf"))
    member_scores, member_pos = member_scores.topk(members_n, dim=2)  # (S, C, m)
    self_scores = s_sub[:, :, :n_centres].diagonal(dim1=1, dim2=2)  # (S, C): each centre's own column
    weights = torch.cat([self_scores[..., None], member_scores.masked_fill(batch.member_bad, 0.0)], dim=2)
    weights = weights / weights.sum(dim=2, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)
    member_ids = discarded.gather(1, member_pos.view(segments, -1)).view_as(member_pos)
    members = torch.cat([centres[..., None], torch.where(batch.member_ok, member_ids, centres[..., None])], dim=2)
    rows = batch.centre_rows
    members, weights = members.view(-1, members_n + 1)[rows], weights.view(-1, members_n + 1)[rows]
    slots = torch.searchsorted(keep_ids, centres.view(-1)[rows])
    return MergeMap(keep=keep_ids, recycles=(Recycle(slots, members, weights),))


# ----------------------------------------------------------------------------------- the text's view (LLM stage)
def prompt_attention(
    query: torch.Tensor, key: torch.Tensor, valid: torch.Tensor, rows: int, scale: float | None
) -> torch.Tensor:
    """(B, rows, L) float32: the causal attention probabilities of the last `rows` positions of a
    left-padded prefill (heads averaged). query (B, H, L, D), key (B, Hk, L, D) post-rotary, valid
    (B, L). Only `rows` query rows are computed: no L x L buffer, nothing read back."""
    batch, heads, length, dim = query.shape
    if key.shape[1] != heads:  # grouped-query attention: each key head serves several query heads
        key = key.repeat_interleave(heads // key.shape[1], dim=1)
    s = dim**-0.5 if scale is None else scale
    logits = torch.matmul(query[:, :, -rows:].float() * s, key.float().transpose(-1, -2))  # (B, H, rows, L)
    at = torch.arange(length - rows, length, device=query.device)  # each row's own position
    hidden = (torch.arange(length, device=query.device)[None, :] > at[:, None])[None] | ~valid[:, None, :]
    return logits.masked_fill_(hidden[:, None], float("-inf")).softmax(dim=-1).nan_to_num_(0.0).mean(dim=1)


def last_token_attention(
    query: torch.Tensor, key: torch.Tensor, valid: torch.Tensor, scale: float | None
) -> torch.Tensor:
    """(B, L) the attention probability each token receives from its sample's last token (softmax
    over the sample's valid tokens, heads averaged), for a left-padded prefill (the engine's layout:
    the last position is every sample's last real token); `prompt_attention` of one row."""
    return prompt_attention(query, key, valid, 1, scale)[:, 0]


def rows_mean(probs: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(B, L): the mean of `probs` (B, Q, L) over the rows `rows` (B, Q) bool marks (0 where none)."""
    weights = rows.to(probs.dtype)
    return (probs * weights[..., None]).sum(dim=1) / weights.sum(dim=1, keepdim=True).clamp(min=1)
