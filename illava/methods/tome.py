"""ToMe (Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023) inside the vision encoder.

In a merging block, between attention and FFN, each segment's units are split into two alternating
sets A and B; every A unit is joined to the B unit its key is most similar to (cosine), the
``removed`` most similar of those edges are merged (the A unit folded into its B match), and the
rest stay. Merged tokens carry *sizes* (how many original units they stand for); a merge is a
size-weighted average and sizes add up; with proportional attention every later vision block adds
``log(size)`` of each key to its attention logits, so a merged key weighs as its members would.

Choices made here, where the paper (plain ViTs, no windows, no LLM) is silent:

* **Segments.** Matching is per segment -- an image, a video frame, a LLaVA-OneVision tile -- and
  never crosses one; every segment of a call is matched at once, padded into one batch (no Python
  loop over images or windows, nothing read back). Qwen2.5-VL's windowed blocks match within the
  whole frame, not within each window: the plan counts per frame, windows are small and shrink as
  they merge, and the paper's sets alternate over the whole sequence. A merged unit keeps its B
  unit's window, rotary position and placement (the engine rebuilds windows from the survivors).
* **Units.** A unit is ``request.unit`` consecutive tokens (a 2x2 group the Qwen mergers fuse); it
  is matched by the mean of its tokens' keys, heads averaged, and merges position by position
  (token t with token t). Sizes count units: every unit starts at one. A and B alternate in the
  order the blocks process the units (window-major on Qwen2.5-VL).
* **Keys.** The block's own post-rotary keys, as the engine captures them (the paper's ViTs add
  absolute position embeddings, so their keys carry position too).
* **Exact counts.** The paper merges at most half of the tokens in a block (``r <= |A|``). The plan
  may ask for more in one block; then the matching is repeated on the survivors, in the same block,
  until the plan's count is removed -- each round a fresh alternating split, a survivor matched by
  the key of the unit it is (its B unit's). Ties: the first B of equal similarity; among equal
  edges, the earlier A.
* **Where sizes end.** Sizes and proportional attention live in the encoder only. The projector
  (patch merger) fuses each kept group as it would unmerged tokens, and the LLM sees every merged
  feature once, at its B unit's position, with no size bias: ToMe is an encoder method, so all the
  removal is before the LLM (``encoder_share`` must be 1; `placement` moves it there).
* ``prop_attn=False`` keeps the size-weighted average but leaves attention unbiased (the paper's
  ablation); at zero reduction no block merges and nothing changes.
* **LLaVA-OneVision videos are refused** (a `ScheduleError` at the forward, from its adapter), and
  stay so: the library halves each frame's token grid after the encoder (``apply_pooling``,
  bilinear), and a frame merged inside the encoder has no grid left to resample. Its images, and
  videos on the other families, merge as above.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..merge import Fold, MergeMap
from .base import MethodParams, ReductionMethod, StageRequest


@dataclass(frozen=True)
class ToMeParams(MethodParams):
    prop_attn: bool = True  # proportional attention: later vision blocks add log(size) of each key to its logits


class ToMe(ReductionMethod):
    name = "tome"
    summary = "bipartite soft matching in encoder blocks, size-weighted merges, proportional attention (ToMe)"
    params_type = ToMeParams
    uses_importance = True  # the engine captures the block's keys (the similarity) ...
    uses_block_importance = False  # ... and computes no attention column means for it

    def check_params(self, params: ToMeParams) -> list[str]:
        if not isinstance(params.prop_attn, bool):
            return [f"prop_attn must be true or false, got {params.prop_attn!r}"]
        return []

    def describe_params(self, params: ToMeParams) -> str:
        return "prop" if params.prop_attn else "no-prop"

    def merge_encoder(self, params: ToMeParams, request: StageRequest) -> MergeMap:
        if request.key is None:
            raise RuntimeError("tome: the engine passed no keys to the encoder stage")
        segments = request.segments
        merge_map = bipartite_merge(
            unit_metric(request.key, request.unit),
            [s.start for s in segments], [s.units for s in segments], [s.kept for s in segments],
        )  # fmt: skip
        return replace(merge_map, proportional_attention=params.prop_attn)


def unit_metric(key: torch.Tensor, unit: int) -> torch.Tensor:
    """(U, D) float32 unit-length: each unit's key, averaged over heads and over its `unit` tokens.
    key: (Hk, U * unit, D)."""
    mean = key.float().mean(dim=0)  # (T, D)
    return torch.nn.functional.normalize(mean.view(-1, unit, mean.shape[-1]).mean(dim=1), dim=-1)


def matching_rounds(units: list[int], removed: list[int]) -> list[tuple[list[int], list[int]]]:
    """Per round of bipartite matching: (units per segment entering it, units each removes). A round
    removes at most a segment's A set (the ceil(n/2) units at even positions), so the plan's count
    takes more than one round where it is more than that."""
    for n, r in zip(units, removed, strict=True):
        if r and not 0 < r < n:
            raise ValueError(f"tome: a segment of {n} units cannot lose {r} (at least one must stay)")
    rounds = []
    while any(removed):
        now = [min(r, (n + 1) // 2) for n, r in zip(units, removed)]
        rounds.append((units, now))
        units = [n - r for n, r in zip(units, now)]
        removed = [r - m for r, m in zip(removed, now)]
    return rounds


def bipartite_merge(metric: torch.Tensor, starts: list[int], units: list[int], kept: list[int]) -> MergeMap:
    """ToMe's bipartite soft matching on every segment of a call at once: segment ``s`` is units
    ``starts[s] .. starts[s] + units[s] - 1`` of `metric` (U, D, unit-length rows) and keeps
    ``kept[s]`` of them. Returns the map: survivors in order, every unit folded into the survivor it
    merged into, size-weighted. Host-known counts only; nothing is read back."""
    device = metric.device
    total, segments = metric.shape[0], len(units)
    rounds = matching_rounds(list(units), [n - k for n, k in zip(units, kept, strict=True)])
    sentinel = total  # padding: a row of zeros after the real units, never matched
    longest = max(units)
    ids = torch.tensor([a + j if j < n else sentinel for a, n in zip(starts, units) for j in range(longest)])
    ids = ids.view(segments, longest).to(device, non_blocking=True)
    masks = _round_masks(rounds, device)
    metric = torch.cat([metric.float(), metric.new_zeros(1, metric.shape[1], dtype=torch.float32)])
    representative = torch.arange(total + 1, device=device)  # the survivor each unit is merged into, so far
    for a_ok, b_ok, take, stays in masks:
        a, b = ids[:, 0::2], ids[:, 1::2]  # (S, |A|), (S, |B|): alternating, in processing order
        similarity = torch.matmul(metric[a], metric[b].transpose(1, 2)).masked_fill_(~b_ok[:, None, :], -torch.inf)
        match = similarity.argmax(dim=2)  # (S, |A|): each A unit's most similar B unit (the first of equals)
        score = similarity.gather(2, match[..., None])[..., 0].masked_fill_(~a_ok, -torch.inf)
        ranked = score.argsort(dim=1, descending=True, stable=True)
        merged = torch.zeros_like(take).scatter_(1, ranked, take)  # (S, |A|): the `removed` best edges
        into = torch.where(merged, b.gather(1, match), a)
        step = torch.arange(total + 1, device=device).scatter_(0, a.reshape(-1), into.reshape(-1))
        representative = step[representative]
        gone = ids == sentinel
        gone[:, 0::2] |= merged
        position = torch.arange(ids.shape[1], device=device)
        order = torch.where(gone, position + ids.shape[1], position).argsort(dim=1)  # survivors first, in order
        ids = ids.gather(1, order[:, : stays.shape[1]]).masked_fill_(~stays, sentinel)
    keep = ids.reshape(-1).sort().values[: sum(kept)]  # padding (the sentinel) sorts last
    slot = torch.zeros(total + 1, dtype=torch.long, device=device).scatter_(
        0, keep, torch.arange(keep.shape[0], device=device)
    )
    sources = torch.arange(total, device=device)
    fold = Fold(slots=slot[representative[:total]], sources=sources, weights=torch.ones(total, device=device),
                size_weighted=True)  # fmt: skip
    return MergeMap(keep=keep, fold=fold)


def _round_masks(rounds, device) -> list[tuple[torch.Tensor, ...]]:
    """Per round, from the host counts, in one copy to the device: which A and B slots are real,
    which ranks merge (``rank < removed``), and which slots the survivors fill."""
    flags, shapes = [], []
    for counts, removing in rounds:
        width = max(counts)
        size_a, size_b = (width + 1) // 2, width // 2
        after = [n - r for n, r in zip(counts, removing)]
        fields = [
            ([2 * i < n for n in counts for i in range(size_a)], size_a),
            ([2 * i + 1 < n for n in counts for i in range(size_b)], size_b),
            ([i < r for r in removing for i in range(size_a)], size_a),
            ([j < m for m in after for j in range(max(after))], max(after)),
        ]
        for values, columns in fields:
            flags += values
            shapes.append((len(counts), columns))
    if not flags:
        return []
    flat = torch.tensor(flags, dtype=torch.bool).to(device, non_blocking=True)
    parts = torch.split(flat, [rows * columns for rows, columns in shapes])
    tables = [part.view(shape) for part, shape in zip(parts, shapes, strict=True)]
    return [tuple(tables[i : i + 4]) for i in range(0, len(tables), 4)]
