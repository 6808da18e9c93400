"""DivPrune (Alvar et al., "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal
Models", CVPR 2025): between the encoder and the LLM, keep a max-min diverse subset of each
image's tokens.

The subset is chosen greedily, as the paper does for its max-min diversity problem: first the
token farthest from its nearest neighbour, then, again and again, the token whose distance to the
nearest token already kept is largest. Distance is cosine distance (1 - cosine similarity) between
the projected features the LLM would receive. Choices where the paper is silent: ties go to the
earlier token; each image (video frame) keeps its planned count independently; all the removal
happens before the LLM (``encoder_share`` must be 1). The greedy steps run for every segment of a
call at once (one loop over steps, none over images), and nothing is read back.

LLaVA-OneVision videos are refused (a `ScheduleError` at the forward, from its adapter): the library
halves each frame's token grid after the projector (``apply_pooling``), which the adapter does where
it places the features, so the stage between encoder and LLM sees a frame's unpooled tokens, not
the LLM's. Selecting among the pooled tokens instead would take the adapter pooling frames in its
``vision_project`` (the plan already counts pooled tokens); until it does, such a video merges with
a method that acts in the LLM.
"""

from __future__ import annotations

import torch

from ..merge import MergeMap, SegmentBatch
from ._segments import selection_batch
from .base import MethodParams, ReductionMethod, StageRequest


class DivPrune(ReductionMethod):
    name = "divprune"
    summary = "before the LLM, keep a max-min diverse subset of each image's tokens (DivPrune)"
    params_type = MethodParams
    uses_importance = False
    encoder_stage = "between"

    def merge_between(self, params: MethodParams, request: StageRequest) -> MergeMap:
        batch = selection_batch(request)
        chosen = max_min_diverse(request.hidden, batch)  # (S, L) bool
        ids = torch.where(chosen, batch.index, torch.iinfo(torch.long).max).view(-1)
        return MergeMap(keep=ids.sort().values[: sum(batch.kept)])


def max_min_diverse(features: torch.Tensor, batch: SegmentBatch) -> torch.Tensor:
    """(S, L) bool: each segment's greedy max-min diverse subset of `batch.kept[s]` units, by cosine
    distance between the rows of `features` (T, C)."""
    x = torch.nn.functional.normalize(features.float()[batch.index], dim=-1)  # (S, L, C)
    distance = (1 - x @ x.transpose(1, 2)).clamp_min_(0)  # (S, L, L)
    pair_ok = batch.valid[:, :, None] & batch.valid[:, None, :]
    eye = torch.eye(distance.shape[1], dtype=torch.bool, device=distance.device)
    far = torch.finfo(distance.dtype).max
    # The first pick: the unit farthest from its nearest neighbour (a lone unit: itself).
    nearest = distance.masked_fill(~pair_ok | eye, far).amin(dim=2).masked_fill_(batch.padding, -1.0)
    chosen = torch.zeros_like(batch.valid)
    wanted = torch.tensor(batch.kept, device=distance.device)
    to_selected = torch.full_like(nearest, far)  # distance of each unit to the nearest chosen one
    for step in range(max(batch.kept)):
        score = nearest if step == 0 else to_selected.masked_fill(chosen | batch.padding, -1.0)
        pick = score.argmax(dim=1)  # (S,): the first of equal scores
        active = step < wanted  # segments that still choose
        chosen[torch.arange(len(pick), device=pick.device), pick] |= active
        picked = distance.gather(1, pick[:, None, None].expand(-1, 1, distance.shape[2])).squeeze(1)  # (S, L)
        to_selected = torch.where(active[:, None], torch.minimum(to_selected, picked), to_selected)
    return chosen & batch.valid
