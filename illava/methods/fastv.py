"""FastV and PyramidDrop: text-guided pruning of image tokens inside the LLM.

FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", ECCV 2024): after decoder layer
K, keep the image tokens that the last prompt token attends to most and drop the others for every
later layer. PyramidDrop (Xing et al., CVPR 2025): the same rule at several layers (stages), each
dropping the same share of the image tokens it receives.

Choices where the papers are silent or where this engine differs:

* "Attends to most" is the softmax probability from the last prompt token at that layer, over its
  sample's whole sequence, averaged over heads (`illava.merge.last_token_attention`); with
  several images, each image (video frame) keeps its own planned count by that score, so an image
  never loses tokens to another (the engine's per-segment contract).
* K and the budget come from the schedule: ``llm_layers`` (one layer for ``fastv``) and the
  reduction; both remove nothing in the encoder (``encoder_share`` must be 0).
* PyramidDrop's per-stage ratio lambda is not a parameter: it follows from the schedule's reduction
  and its number of stages, so that every stage keeps the same fraction lambda of what reaches it
  (lambda ** stages = the fraction of image tokens kept) -- the paper's geometric pyramid, at the
  budget the tuner chose.
* Merging happens at prefill only; decoding attends to the kept tokens' cache (as in both papers).
"""

from __future__ import annotations

import torch

from ..merge import MergeMap, last_token_attention
from ._segments import keep_most
from .base import MethodParams, PromptView, ReductionMethod, StageRequest


class FastV(ReductionMethod):
    name = "fastv"
    summary = "after one LLM layer K, keep the image tokens the last prompt token attends to most (FastV)"
    params_type = MethodParams
    max_llm_layers = 1  # its K (several stages: PyramidDrop)
    merge_encoder = None  # acts in the LLM only

    def uses_text(self, params: MethodParams) -> bool:
        return True

    def text_importance(self, params: MethodParams, view: PromptView) -> torch.Tensor:
        return last_token_attention(view.query, view.key, view.valid, view.scale)

    def merge_llm(self, params: MethodParams, request: StageRequest) -> MergeMap:
        return keep_most(request, request.text_importance)


class PyramidDrop(FastV):
    name = "pdrop"
    summary = "FastV's rule at several LLM stages, each keeping the same fraction of what reaches it (PyramidDrop)"

    max_llm_layers = None

    def llm_split(self, params: MethodParams, tokens_in: int, removed: int, layers: int) -> list[int]:
        """Geometric: stage i keeps round(tokens_in * lambda ** i) with lambda ** layers = kept / tokens_in."""
        if layers == 0:
            return []
        kept = tokens_in - removed
        ratio = (kept / tokens_in) ** (1 / layers)
        targets = [round(tokens_in * ratio**stage) for stage in range(1, layers)] + [kept]
        split, before = [], tokens_in
        for target in targets:
            target = min(max(target, kept), before)  # never below the final count, never growing
            split.append(before - target)
            before = target
        return split
