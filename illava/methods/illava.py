"""iLLaVA (the paper, section 3.2.2): importance selection plus recycling into cluster tokens.

``text_guided=True`` is a variant the paper does not use: in the LLM, importance is the attention
the sample's question (the tokens after its last image: the question and the chat template's
closing tokens) pays each image token, averaged over those query tokens and heads, instead of the
image tokens' own causal column mean. The default stays the paper's, which deliberately scores
image tokens by each other so that the selection does not depend on the question; recycling
(which discarded tokens each centre absorbs) is the same in both. The encoder knows no text, so
encoder merges are unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..merge import MergeMap, SegmentBatch, batched_importance, batched_merge, prompt_attention, rows_mean
from .base import MethodParams, PromptView, ReductionMethod, StageRequest, check_fraction, check_int, unit_importance


@dataclass(frozen=True)
class IllavaParams(MethodParams):
    recycle_share: float = 0.1  # P_c / P: share of the kept tokens at a merge that are recycled cluster tokens
    group_size: int = 5  # M: discarded tokens each cluster token absorbs
    text_guided: bool = False  # LLM importance from the question's attention (a variant; the paper: False)

    def to_dict(self) -> dict:
        """The JSON form; `text_guided` only when set, so the paper's schedules read as they always did."""
        data = super().to_dict()
        if data["text_guided"] is False:
            del data["text_guided"]
        return data


def segment_batch(request: StageRequest, group_size: int) -> SegmentBatch:
    segments = request.segments
    return SegmentBatch.of(
        [s.start for s in segments], [s.units for s in segments], [s.kept for s in segments],
        [s.recycled for s in segments], group_size, request.hidden.device,
    )  # fmt: skip


class Illava(ReductionMethod):
    """Keep the most attended tokens; the next ``recycle_share`` of the kept become cluster
    centres, each the weighted sum of itself and the ``group_size`` discarded tokens it attends to
    most (see `illava.merge` for the exact rules and the choices made where the paper is silent).
    Every segment of a stage call is merged at once (`illava.merge.batched_merge`): no Python loop
    over images, frames or windows, nothing read back."""

    name = "illava"
    summary = "importance selection + recycling into cluster tokens (the paper)"
    params_type = IllavaParams

    def check_params(self, params: IllavaParams) -> list[str]:
        problems: list[str] = []
        check_fraction("recycle_share", params.recycle_share, problems)
        check_int("group_size", params.group_size, 1, problems)
        if not isinstance(params.text_guided, bool):
            problems.append(f"text_guided must be true or false, got {params.text_guided!r}")
        return problems

    def describe_params(self, params: IllavaParams) -> str:
        text = " text-guided" if params.text_guided else ""
        return f"rec={params.recycle_share:.2f} M={params.group_size}{text}"

    def uses_text(self, params: MethodParams) -> bool:
        return getattr(params, "text_guided", False)

    def text_importance(self, params: MethodParams, view: PromptView) -> torch.Tensor:
        """The question's mean attention to each token (`illava.merge.prompt_attention`)."""
        probs = prompt_attention(view.query, view.key, view.valid, view.question.shape[1], view.scale)
        return rows_mean(probs, view.question)

    def recycled(self, params: IllavaParams, tokens_in: int, removed: int) -> int:
        if removed == 0:
            return 0
        kept = tokens_in - removed
        return min(int(math.floor(params.recycle_share * kept + 0.5)), removed, kept)

    def _merge(self, params, request: StageRequest, scores) -> MergeMap:
        batch = segment_batch(request, getattr(params, "group_size", 1))
        if scores is None:  # LLM: causal importance within each segment, all segments at once
            scores = batched_importance(request.query, request.key, batch, causal=request.causal, scale=request.scale)
        else:  # encoder: unit scores of the whole call, laid out per segment
            scores = scores[batch.index].masked_fill_(batch.padding, float("-inf"))
        return batched_merge(scores, request.query, request.key, batch, unit=request.unit, scale=request.scale)

    def merge_encoder(self, params: IllavaParams, request: StageRequest) -> MergeMap:
        return self._merge(params, request, unit_importance(request))  # within windows/frames

    def merge_llm(self, params: IllavaParams, request: StageRequest) -> MergeMap:
        return self._merge(params, request, request.text_importance)  # None: the image's own attention
