"""VisionZip (Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language
Models", CVPR 2025): between the encoder and the LLM, keep each image's *dominant* tokens -- those
that receive the most attention in the encoder's last block -- and merge the rest into a few
*contextual* tokens by similarity.

How it runs here, and the choices made where the paper is silent or where this engine differs:

* Dominant tokens: the units with the highest column mean of the encoder's last block's attention
  (heads averaged, within the block's own attention segments: a frame, a tile), which the engine
  captures for a method with ``uses_importance`` acting ``between`` (`StageRequest.importance`).
  The paper's CLIP encoders have a CLS token whose attention it reads; the families here have none,
  so every query counts (the paper's own fallback for encoders without CLS).
* Contextual tokens: ``round(contextual_share * kept)`` of the segment's planned kept tokens (the
  paper's default 10 of 64 is ``contextual_share = 0.15625``), capped so that one dominant token
  remains and at most the removed tokens are merged. Their centres are spread evenly, by position,
  over the tokens that are not dominant; every other non-dominant token joins the centre it is most
  similar to and a contextual token is the mean of its group (`keep_and_cluster`). Similarity is the
  cosine of the projected features the LLM receives (the paper uses the last block's keys; the
  projected features are what the kept tokens become and need no second capture).
* The plan's counts are kept exactly (dominant + contextual == the plan's kept); each image (video
  frame) keeps its own count; all the removal happens before the LLM (``encoder_share`` must be 1).
* Every segment of a call at once; nothing is read back.
* LLaVA-OneVision videos are refused (a `ScheduleError` at the forward, from its adapter): the
  library halves each frame's token grid after the projector (``apply_pooling``), so the features
  this stage sees are a frame's unpooled tokens, not the LLM's. Acting on the pooled tokens would
  take the adapter pooling frames in its ``vision_project``, and the last block's attention pooled
  the same way for the dominant tokens; until then such a video merges with a method that acts in
  the LLM.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..merge import MergeMap
from ._segments import host_slices, keep_and_cluster, ranked_units
from .base import MethodParams, ReductionMethod, StageRequest, check_fraction


@dataclass(frozen=True)
class VisionZipParams(MethodParams):
    contextual_share: float = 10 / 64  # share of the kept tokens that are merged contextual tokens


class VisionZip(ReductionMethod):
    name = "visionzip"
    summary = "before the LLM, the encoder's most attended tokens plus a few merged contextual ones (VisionZip)"
    params_type = VisionZipParams
    encoder_stage = "between"

    def check_params(self, params: VisionZipParams) -> list[str]:
        problems: list[str] = []
        check_fraction("contextual_share", params.contextual_share, problems)
        return problems

    def describe_params(self, params: VisionZipParams) -> str:
        return f"ctx={params.contextual_share:.2f}"

    def recycled(self, params: VisionZipParams, tokens_in: int, removed: int) -> int:
        kept = tokens_in - removed
        return max(min(round(params.contextual_share * kept), kept - 1, removed), 0)

    def merge_between(self, params: VisionZipParams, request: StageRequest) -> MergeMap:
        if request.importance is None:
            raise RuntimeError("visionzip: the engine passed no encoder attention to the between stage")
        ranked, _ = ranked_units(request, request.importance)
        segments = request.segments
        contextual = [s.recycled for s in segments]
        dominant = [s.kept - c for s, c in zip(segments, contextual, strict=True)]
        rest = [s.units - d for s, d in zip(segments, dominant, strict=True)]
        (top_at, top_ok), (rest_at, rest_ok), (centre_at, centre_ok) = host_slices(
            [[(0, d) for d in dominant], list(zip(dominant, rest, strict=True)),
             [(0, c) for c in contextual]], ranked.device,
        )  # fmt: skip
        # The non-dominant units in position order (padding last, then replaced by a real unit) ...
        big = torch.iinfo(torch.long).max
        pool = ranked.gather(1, rest_at).masked_fill(~rest_ok, big).sort(dim=1).values
        pool = torch.where(rest_ok, pool, pool[:, :1])
        # ... and the contextual centres spread evenly over them: position floor(j * n / c).
        width = centre_at.shape[1]
        spread = [(j * n) // c if j < c else 0 for n, c in zip(rest, contextual, strict=True) for j in range(width)]
        spread = torch.tensor(spread, dtype=torch.long).view(len(segments), width).to(ranked.device, non_blocking=True)
        return keep_and_cluster(
            (ranked.gather(1, top_at), top_ok), (pool.gather(1, spread), centre_ok), (pool, rest_ok), request.hidden,
            (dominant, contextual),
        )  # fmt: skip
