"""Seeded random dropping: the baseline every importance-based method must beat."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..merge import MergeMap, merge_plan
from ._segments import each_segment
from .base import MethodParams, ReductionMethod, SegmentSpec, StageRequest, is_int

_STAGE_CODES = {"encoder": 0, "llm": 1, "between": 2}


@dataclass(frozen=True)
class RandomParams(MethodParams):
    seed: int = 0


class RandomDrop(ReductionMethod):
    """Uniformly random kept tokens. Reproducible: what a segment keeps depends only on the seed,
    the stage, the layer and the segment's index within its image or video (never on the batch or
    the process); computes no importance, so nothing is captured for it."""

    name = "random"
    summary = "seeded uniformly random dropping (a baseline)"
    params_type = RandomParams
    uses_importance = False

    def check_params(self, params: RandomParams) -> list[str]:
        if not is_int(params.seed) or params.seed < 0:
            return [f"seed must be an integer >= 0, got {params.seed!r}"]
        return []

    @staticmethod
    def generator(params: RandomParams, stage: str, layer: int, segment: SegmentSpec) -> torch.Generator:
        key = (params.seed, _STAGE_CODES[stage], layer, segment.index_in_item)
        return torch.Generator().manual_seed(hash(key) & 0x7FFF_FFFF_FFFF_FFFF)  # tuples of ints hash stably

    def _merge(self, params: RandomParams, request: StageRequest) -> MergeMap:
        def one(segment: SegmentSpec, _tokens) -> MergeMap:
            return merge_plan(
                None, None, None, n_units=segment.units, n_keep=segment.kept, n_recycle=0, group_size=1,
                generator=self.generator(params, request.stage, request.layer, segment), device=request.hidden.device,
            )  # fmt: skip

        return each_segment(request, one)

    merge_encoder = _merge
    merge_llm = _merge
