"""The profiler measures a downsample schedule for real: its runs on the downsampled inputs, the
paired reference of every round and the outputs fidelity compares against at full resolution, and
accuracy on the demo benchmark (option scoring) on downsampled option sequences."""

from __future__ import annotations

import dataclasses
import warnings
from collections import Counter

import illava
from illava.methods import get_method
from profiler import Profiler, Workload, resolve_workload


def downsample_for(profiler: Profiler, reduction: float = 7 / 9) -> illava.Schedule:
    return get_method("downsample").placement(illava.paper_default_for(profiler.model, reduction))


def image_tokens_seen(model) -> tuple[list, object]:
    """A hook recording, per forward of `model`, (image placeholders per row, whether it used a cache)."""
    seen = []
    image_id = model.config.image_token_id

    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids")
        if ids is not None and ids.shape[1] > 1:  # prefills, not decoding steps
            seen.append((tuple((ids == image_id).sum(dim=1).tolist()), kwargs.get("use_cache")))

    return seen, model.register_forward_pre_hook(hook, with_kwargs=True)


def test_the_profiler_measures_a_downsample_schedule_end_to_end():
    profiler = Profiler("tiny", repeats=2, warmup=0)
    workload = Workload(name="ds", image_size=(224, 224), samples=2, output_tokens=2, prompt_words=4)
    reference = profiler.reference(workload)
    schedule = downsample_for(profiler)
    seen, handle = image_tokens_seen(profiler.model)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", illava.DownsampleWarning)  # the profiler routes it itself
            result = profiler.measure(schedule, workload)
    finally:
        handle.remove()
    # The paired rounds: the reference at full resolution (64 tokens), then the schedule (8x8 -> 4x4).
    assert [tokens for tokens, _ in seen[:4]] == [(64,), (16,), (64,), (16,)]
    assert {tokens for tokens, _ in seen[4:]} == {(16,)}  # memory, generation, outputs: downsampled
    assert reference.image_tokens_to_llm == 64 and result.image_tokens_to_llm == 16
    assert result.tokens_per_llm_layer == reference.tokens_per_llm_layer - 48
    assert result.schedule == schedule.to_dict() and result.speedup.runs == 2
    assert result.reference_prefill_s.runs == 2 and 0 <= result.fidelity.first_token_agreement <= 1
    assert not illava.is_applied(profiler.model)


def test_demo_benchmark_accuracy_scores_downsampled_option_sequences():
    profiler = Profiler("demo", repeats=1, warmup=0)
    assert profiler.score == "options"
    workload = dataclasses.replace(resolve_workload("demo-vqa"), samples=3, batch_size=3, output_tokens=1)
    reference = profiler.reference(workload)
    seen, handle = image_tokens_seen(profiler.model)
    try:
        result = profiler.measure(downsample_for(profiler), workload)
    finally:
        handle.remove()
    options = Counter(tokens for tokens, use_cache in seen if use_cache is False)  # the option sequences
    assert options == {(16,) * 12: 1}  # 3 items x 4 options, each 224x224 image at 4x4 tokens instead of 8x8
    assert reference.image_tokens_to_llm == 64 and result.image_tokens_to_llm == 16
    assert result.accuracy is not None and result.accuracy_score == "options" and result.retention is not None
