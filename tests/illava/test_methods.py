"""Reduction methods as registered values: a method added from outside the package plugs into every
stage the engine calls, including the one between the encoder and the LLM; the registry's errors;
and a method that computes no importance costs no capture."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import illava
from illava import Schedule, ScheduleError
from illava.backbones import load_backbone
from illava.inputs import Sample, build_inputs, synthetic_image
from illava.merge import MergeMap
from illava.methods import MethodParams, ReductionMethod, StageRequest, register_method, unregister_method
from illava.methods.base import check_int

FAMILIES = ["tiny", "tiny-qwen2-vl", "tiny-qwen3-vl", "tiny-llava-onevision"]


@dataclass(frozen=True)
class EveryNthParams(MethodParams):
    stride: int = 2


class KeepLeading(ReductionMethod):
    """A toy method: after the encoder, keep each segment's first units (a VisionZip-style stage
    placement with the simplest possible rule); in the LLM, the last ones."""

    name = "test-leading"
    params_type = EveryNthParams
    uses_importance = False
    encoder_stage = "between"

    def check_params(self, params):
        problems: list[str] = []
        check_int("stride", params.stride, 1, problems)
        return problems

    def _keep(self, request: StageRequest, last: bool) -> MergeMap:
        keeps = []
        for segment in request.segments:
            start = segment.start + (segment.units - segment.kept if last else 0)
            keeps.append(torch.arange(start, start + segment.kept, device=request.hidden.device))
        return MergeMap(keep=torch.cat(keeps))

    def merge_between(self, params, request: StageRequest) -> MergeMap:
        assert request.query is None and request.unit == 1  # projected features, one per LLM token
        return self._keep(request, last=False)

    def merge_llm(self, params, request: StageRequest) -> MergeMap:
        assert request.query is None  # uses_importance = False: nothing captured
        return self._keep(request, last=True)


@pytest.fixture(scope="module", autouse=True)
def leading():
    method = register_method(KeepLeading())
    yield method
    unregister_method(method.name)


@torch.no_grad()
@pytest.mark.parametrize("name", FAMILIES)
def test_a_registered_method_runs_between_the_encoder_and_the_llm(name):
    backbone = load_backbone(name)
    model = backbone.model
    side = max(backbone.adapter.size_multiple(model.config), 28)
    batch = build_inputs(backbone, [Sample("<image> What?", [synthetic_image(8 * side, 1)])])
    schedule = illava.paper_default_for(model, 7 / 9, method="test-leading", stride=3)
    assert schedule.params.stride == 3 and schedule.plan(64).between.removed > 0
    assert schedule.plan(64).encoder == ()  # the encoder share is removed after the encoder, in one step
    illava.apply(model, schedule)
    model(**batch)
    stats = illava.last_stats(model)
    assert len({tuple(units) for units in stats.encoder_units}) == 1, "no merge inside the encoder"
    inner = backbone.adapter.inner_model(model)
    layouts = backbone.adapter.visual_call(inner, "image", dict(batch)).items
    plans = [schedule.plan(n) for layout in layouts for n in layout.segment_sizes]
    _, llm_depth = illava.depths(model)
    assert [int(n) for (n,) in stats.llm_image_tokens] == [
        sum(plan.llm_tokens_at(layer) for plan in plans) for layer in range(llm_depth)
    ]
    kept = stats.kept_units[0]
    first_segment = [i for i, s in enumerate(layouts[0].segment_of) if s == 0]
    leading = kept[: plans[0].after_encoder].tolist()
    if name != "tiny":  # raster order is processing order (Qwen2.5-VL permutes tokens into windows first)
        assert leading == first_segment[: plans[0].after_encoder], "the method's choice is what reaches the LLM"
    assert set(leading) <= set(first_segment) and len(set(leading)) == len(leading)
    greedy = dict(max_new_tokens=3, do_sample=False, output_scores=True, return_dict_in_generate=True)
    assert torch.equal(
        model.generate(**batch, **greedy).sequences, model.generate(**batch, use_cache=False, **greedy).sequences
    )


def test_the_registry_names_what_is_registered_and_refuses_duplicates(leading):
    assert {"illava", "prune", "random", "test-leading"} <= set(illava.method_names())
    with pytest.raises(ValueError, match="already registered"):
        register_method(KeepLeading())
    allowed = ", ".join(illava.method_names())
    assert allowed.startswith("illava, prune, random, fastv, pdrop, divprune") and allowed.endswith("test-leading")
    with pytest.raises(ScheduleError, match=rf"unknown method 'no-such-method'; allowed: {allowed}"):
        Schedule(method="no-such-method")
    with pytest.raises(ScheduleError, match=r"stride must be an integer >= 1, got 0"):
        Schedule(method="test-leading", params={"stride": 0})
    with pytest.raises(TypeError, match="ReductionMethod instance"):
        register_method(object())


def test_a_method_without_importance_costs_no_capture(monkeypatch):
    """random computes no importance: the engine captures no queries or keys for it."""
    from illava.engine import capture as capture_module

    calls = []
    real = capture_module._capturing_attention
    monkeypatch.setattr(capture_module, "_capturing_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    capture_module.AttentionInterface.register(capture_module.CAPTURE, capture_module._capturing_attention)
    try:
        backbone = load_backbone("tiny")
        batch = build_inputs(backbone, [Sample("<image> What?", [synthetic_image(224, 1)])])
        illava.apply(backbone.model, illava.paper_default_for(backbone.model, 7 / 9, method="random"))
        with torch.no_grad():
            backbone.model(**batch)
        assert calls == []
        illava.apply(backbone.model, illava.paper_default_for(backbone.model, 7 / 9))
        with torch.no_grad():
            backbone.model(**batch)
        assert calls, "importance-based merges capture from the merging blocks' own attention calls"
    finally:
        capture_module.AttentionInterface.register(capture_module.CAPTURE, real)
