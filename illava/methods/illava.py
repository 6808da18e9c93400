"""iLLaVA (the paper, section 3.2.2): importance selection plus recycling into cluster tokens."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..merge import MergeMap, merge_plan
from ._segments import each_segment, segment_importance, unit_importance
from .base import MethodParams, ReductionMethod, StageRequest, check_fraction, check_int


@dataclass(frozen=True)
class IllavaParams(MethodParams):
    recycle_share: float = 0.1  # P_c / P: share of the kept tokens at a merge that are recycled cluster tokens
    group_size: int = 5  # M: discarded tokens each cluster token absorbs


class Illava(ReductionMethod):
    """Keep the most attended tokens; the next ``recycle_share`` of the kept become cluster
    centres, each the weighted sum of itself and the ``group_size`` discarded tokens it attends to
    most (see `illava.merge` for the exact rules and the choices made where the paper is silent)."""

    name = "illava"
    summary = "importance selection + recycling into cluster tokens (the paper)"
    params_type = IllavaParams

    def check_params(self, params: IllavaParams) -> list[str]:
        problems: list[str] = []
        check_fraction("recycle_share", params.recycle_share, problems)
        check_int("group_size", params.group_size, 1, problems)
        return problems

    def describe_params(self, params: IllavaParams) -> str:
        return f"rec={params.recycle_share:.2f} M={params.group_size}"

    def recycled(self, params: IllavaParams, tokens_in: int, removed: int) -> int:
        if removed == 0:
            return 0
        kept = tokens_in - removed
        return min(int(math.floor(params.recycle_share * kept + 0.5)), removed, kept)

    def _merge(self, params: IllavaParams, request: StageRequest, scores_of) -> MergeMap:
        def one(segment, tokens) -> MergeMap:
            return merge_plan(
                request.query[:, tokens], request.key[:, tokens], scores_of(segment, tokens),
                n_units=segment.units, n_keep=segment.kept, n_recycle=segment.recycled,
                group_size=getattr(params, "group_size", 1), unit=request.unit, scale=request.scale,
            )  # fmt: skip

        return each_segment(request, one)

    def merge_encoder(self, params: IllavaParams, request: StageRequest) -> MergeMap:
        scores = unit_importance(request)  # (units,) over the whole block, within windows/frames
        return self._merge(params, request, lambda segment, _: scores[segment.start : segment.start + segment.units])

    def merge_llm(self, params: IllavaParams, request: StageRequest) -> MergeMap:
        return self._merge(params, request, lambda _, tokens: segment_importance(request, tokens))
