"""The patch on the benchmark-sized `small` backbone (16 + 16 layers, 448x448 images): slower,
so behind the `slow` marker (`pytest -m slow`)."""

import pytest
import torch

import illava
from illava import PAPER_REDUCTIONS, Schedule
from illava.backbones import load_backbone
from illava.inputs import Sample, build_inputs, synthetic_image

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def small():
    return load_backbone("small")


@torch.no_grad()
def test_small_zero_reduction_equals_unpatched_and_counts_follow_the_plan(small):
    batch = build_inputs(small, [Sample("<image> What is here?", [synthetic_image(448, 0)])])
    reference = small.model(**batch).logits
    illava.apply(small.model, Schedule.vanilla())
    torch.testing.assert_close(small.model(**batch).logits, reference, rtol=0, atol=1e-5)
    for reduction in PAPER_REDUCTIONS:
        schedule = Schedule.paper_default(reduction, encoder_depth=16, llm_depth=16)
        illava.apply(small.model, schedule)
        small.model(**batch)
        plan = schedule.plan(256)
        counts = [int(n) for (n,) in illava.last_stats(small.model).llm_image_tokens]
        assert counts == [plan.llm_tokens_at(layer) for layer in range(16)]
    illava.remove(small.model)


@torch.no_grad()
def test_small_cached_generation_equals_recompute(small):
    batch = build_inputs(small, [Sample("<image> Describe it.", [synthetic_image(448, 1)])])
    illava.apply(small.model, Schedule.paper_default(7 / 9, encoder_depth=16, llm_depth=16))
    kwargs = dict(max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True)
    cached = small.model.generate(**batch, **kwargs)
    recomputed = small.model.generate(**batch, use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, recomputed.sequences)
    for a, b in zip(cached.scores, recomputed.scores):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    illava.remove(small.model)
