"""SparseVLM (Zhang et al., "SparseVLM: Visual Token Sparsification for Efficient Vision-Language
Model Inference", ICML 2025): in the LLM, text *raters* score the image tokens, the lowest-scored are
deleted, and the most relevant of the deleted ones are recycled into a few cluster tokens.

How it runs here, and the choices made where the paper is silent or where this engine differs:

* Raters: of the sample's question tokens (the tokens after its last image: the question and the
  chat template's closing tokens, `PromptView`), those whose attention to the image tokens is at
  least the mean over the question -- the paper's relevance rule. An image token's score is the
  raters' mean attention to it (softmax over the sample's sequence, heads averaged, at the merging
  layer).
* How many tokens go: the paper adapts the count per layer from the rank of the attention matrix;
  here the schedule's plan fixes it (the tuner chooses the budget and layers), so every method is
  compared at the same token counts.
* Recycling: the ``recycled`` cluster tokens take slots of the planned kept count. The deleted
  tokens with the highest scores -- as many as the cluster tokens plus ``ceil(recycle_ratio *
  removed)`` -- are grouped by density-peaks clustering on their hidden states (density from the
  ``NEIGHBOURS`` nearest, by cosine distance; the peaks are the tokens with the largest density x
  distance to any denser token), each joins its most similar peak, and a cluster token is the mean
  of its group, in its peak's place (`keep_and_cluster`). The number of cluster tokens is
  ``round(cluster_ratio * ceil(recycle_ratio * removed))``, at most ``kept - 1``.
* Each image (video frame) keeps its own planned count; merging at prefill only; decoding attends
  to the kept tokens' cache. Every segment of a call at once; nothing is read back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..merge import MergeMap, prompt_attention, rows_mean
from ._segments import host_slices, keep_and_cluster, ranked_units
from .base import MethodParams, PromptView, ReductionMethod, StageRequest, check_fraction

NEIGHBOURS = 5  # k of the density-peaks clustering's k-nearest-neighbour density


@dataclass(frozen=True)
class SparseVLMParams(MethodParams):
    recycle_ratio: float = 0.3  # tau: share of a merge's removed tokens recycled into cluster tokens
    cluster_ratio: float = 0.25  # cluster tokens per recycled token


class SparseVLM(ReductionMethod):
    name = "sparsevlm"
    summary = "in the LLM, question tokens rate the image tokens; the deleted are recycled into clusters (SparseVLM)"
    params_type = SparseVLMParams
    merge_encoder = None  # acts in the LLM only

    def check_params(self, params: SparseVLMParams) -> list[str]:
        problems: list[str] = []
        check_fraction("recycle_ratio", params.recycle_ratio, problems, high_open=False)
        check_fraction("cluster_ratio", params.cluster_ratio, problems, high_open=False)
        return problems

    def describe_params(self, params: SparseVLMParams) -> str:
        return f"tau={params.recycle_ratio:.2f} clu={params.cluster_ratio:.2f}"

    def recycled(self, params: SparseVLMParams, tokens_in: int, removed: int) -> int:
        pooled = math.ceil(params.recycle_ratio * removed)
        return max(min(round(params.cluster_ratio * pooled), tokens_in - removed - 1), 0)

    def uses_text(self, params: MethodParams) -> bool:
        return True

    def text_importance(self, params: MethodParams, view: PromptView) -> torch.Tensor:
        probs = prompt_attention(view.query, view.key, view.valid, view.question.shape[1], view.scale)
        relevance = (probs * view.image[:, None, :]).sum(dim=2)  # (B, Q): each question token's look at the image
        mean = rows_mean(relevance[..., None], view.question)  # (B, 1)
        raters = view.question & (relevance >= mean)
        return rows_mean(probs, raters)

    def merge_llm(self, params: SparseVLMParams, request: StageRequest) -> MergeMap:
        ranked, _ = ranked_units(request, request.text_importance)
        segments = request.segments
        clusters = [s.recycled for s in segments]
        informative = [s.kept - c for s, c in zip(segments, clusters, strict=True)]
        pooled = [
            c + math.ceil(params.recycle_ratio * (s.units - s.kept)) for s, c in zip(segments, clusters, strict=True)
        ]
        (top_at, top_ok), (pool_at, pool_ok), (_, centre_ok) = host_slices(
            [[(0, n) for n in informative], list(zip(informative, pooled, strict=True)), [(0, c) for c in clusters]],
            ranked.device,
        )
        pool = ranked.gather(1, pool_at)  # (S, R) the recycled candidates, best first
        peaks = density_peaks(request.hidden[pool], pool_ok)  # (S, R)
        width = centre_ok.shape[1]
        centres = pool.gather(1, peaks.topk(width, dim=1).indices) if width else pool[:, :0]
        return keep_and_cluster(
            (ranked.gather(1, top_at), top_ok), (centres, centre_ok), (pool, pool_ok), request.hidden,
            (informative, clusters),
        )  # fmt: skip


def density_peaks(features: torch.Tensor, valid: torch.Tensor, neighbours: int = NEIGHBOURS) -> torch.Tensor:
    """(S, R) density-peaks score of each row of `features` (S, R, C) among its segment's valid rows:
    density ``exp(-mean squared cosine distance to the k nearest)`` times the distance to the
    nearest denser row (the farthest row, for the densest); -inf for padding. Ties: the earlier row."""
    x = torch.nn.functional.normalize(features.float(), dim=-1)
    distance = (1 - x @ x.transpose(1, 2)).clamp_min_(0)  # (S, R, R)
    rows = distance.shape[1]
    pair_ok = valid[:, :, None] & valid[:, None, :]
    others = pair_ok & ~torch.eye(rows, dtype=torch.bool, device=distance.device)
    far = torch.finfo(distance.dtype).max
    k = max(min(neighbours, rows - 1), 1)
    nearest = distance.masked_fill(~others, far).topk(k, dim=2, largest=False).values  # (S, R, k)
    real = nearest < far
    density = torch.exp(-(nearest.square() * real).sum(dim=2) / real.sum(dim=2).clamp(min=1))
    # Equal densities are broken by position (earlier = denser), so exactly one row per segment has no denser row.
    rank = density - torch.arange(rows, device=density.device) * 1e-7
    denser = (rank[:, None, :] > rank[:, :, None]) & pair_ok
    to_denser = distance.masked_fill(~denser, far).amin(dim=2)
    widest = distance.masked_fill(~pair_ok, 0.0).amax(dim=2)
    delta = torch.where(to_denser < far, to_denser, widest)
    return (density * delta).masked_fill_(~valid, float("-inf"))
