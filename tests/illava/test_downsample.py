"""The downsample baseline: its schedules and plans, its grid rule, the inputs it builds and counts
on every family (the planned token count within the stated rounding, zero reduction equal to the
unpatched model at full resolution, a padded batch of two equal to each sample alone, cached
generation equal to a cache-free one), its FLOPs, and the manifest `illava.apply` accepts."""

from __future__ import annotations

import math
import warnings

import optuna
import pytest
import torch

import illava
from illava import DownsampleWarning, Schedule, ScheduleError
from illava.adapters.llava_onevision import image_grid, image_segment_sizes
from illava.backbones import build_config, load_backbone
from illava.inputs import build_inputs, prepare_samples
from illava.methods import get_method
from illava.methods.downsample import downsample_grid
from optimizer.space import SearchSpace, schedule_params
from tests.illava.test_contract import GREEDY, layouts, prompts
from tests.illava.test_contract import family as family  # noqa: F401  (the per-family fixture)

DOWNSAMPLE = get_method("downsample")


def downsample(family, reduction: float = 7 / 9) -> Schedule:
    """The paper-default schedule placed as downsample (share 1, no layers)."""
    return DOWNSAMPLE.placement(family.default(reduction))


def item_sizes(backbone, batch) -> list[tuple[int, ...]]:
    """Per image or video of `batch` (images first), the LLM tokens of each of its segments."""
    return [tuple(layout.segment_sizes) for layout in layouts(backbone, batch)]


# ----------------------------------------------------------------------------------- schedules
def test_a_downsample_schedule_acts_at_no_stage_and_its_layers_are_ignored():
    assert "downsample" in illava.method_names()
    assert not any(DOWNSAMPLE.acts_at(stage) for stage in ("encoder", "between", "llm"))
    assert DOWNSAMPLE.acts_before_llm and not DOWNSAMPLE.uses_importance
    placed = DOWNSAMPLE.placement(Schedule.paper_default(7 / 9, encoder_depth=6, llm_depth=6))
    assert (placed.method, placed.encoder_share, placed.encoder_layers, placed.llm_layers) == ("downsample", 1, (), ())
    with_layers = Schedule(method="downsample", reduction=7 / 9, encoder_share=1.0)  # the paper's layers, ignored
    for schedule in (placed, with_layers):
        plan = schedule.plan(64)
        assert plan.kept == plan.after_encoder == 64 - math.floor(7 / 9 * 64) == 15
        assert all(plan.llm_tokens_at(layer) == 15 for layer in range(28))
        schedule.check_fits(encoder_depth=2, llm_depth=2)  # no layer of it needs to exist
    assert DOWNSAMPLE.placement(with_layers) == placed
    with pytest.raises(ScheduleError, match="'downsample' shrinks the input.*encoder_share must be 1, got 0.4"):
        Schedule(method="downsample", reduction=0.5)
    assert Schedule.coerce({"schedule": placed.to_dict()}) == placed == Schedule.from_json(placed.to_json())


def test_the_search_space_suggests_and_reproduces_downsample_schedules():
    space = SearchSpace(methods=("illava", "downsample"))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.enqueue_trial({"reduction": 0.7, "method": "downsample"})
    schedule = space.suggest(study.ask(), encoder_depth=6, llm_depth=6)
    assert schedule == Schedule(method="downsample", reduction=0.7, encoder_share=1.0, encoder_layers=(), llm_layers=())
    assert schedule_params(schedule, space) == {"reduction": 0.7, "method": "downsample"}


def test_the_grid_rule_takes_the_nearest_count_then_the_aspect_ratio():
    assert downsample_grid(8, 8, 15) == (4, 4)  # 16 beats 12 and 9
    assert downsample_grid(6, 4, 6) == (3, 2)  # exact, aspect kept
    assert downsample_grid(8, 8, 22) == (4, 5)  # 20 and 20: equal aspect error, then the wider
    assert downsample_grid(8, 8, 64) == (8, 8) and downsample_grid(1, 10, 3) == (1, 3)
    assert downsample_grid(2, 2, 1) == (1, 1)  # never below one unit a side
    for rows in range(1, 25):
        for cols in range(1, 25):
            for target in range(1, rows * cols + 1, 3):
                new_rows, new_cols = downsample_grid(rows, cols, target)
                scale = math.sqrt(target / (rows * cols))
                assert 1 <= new_rows <= rows and 1 <= new_cols <= cols
                # The stated bound: half a downsampled row and column.
                assert abs(new_rows * new_cols - target) <= scale * (rows + cols) / 2 + 0.25


def test_llava_segment_sizes_without_the_layout_equal_the_layout():
    config = build_config("tiny-llava-onevision")
    for size in [(224, 224), (112, 168), (168, 112), (50, 300), (300, 50), (80, 80), (223, 97), (1000, 20)]:
        assert image_segment_sizes(config, size, True) == image_grid(config, size, True).layout.segment_sizes


# ----------------------------------------------------------------------------------- inputs, per family
def unit_grids(batch, merge: int) -> list[tuple[int, int, int]]:
    """Qwen families: per image or video of `batch` (images first), (frames, rows, cols) in LLM tokens."""
    rows = [row for key in ("image_grid_thw", "video_grid_thw") if key in batch for row in batch[key].tolist()]
    return [(t, h // merge, w // merge) for t, h, w in rows]


@pytest.mark.parametrize("reduction", [0.5, 7 / 9])
def test_inputs_have_the_planned_token_count(family, reduction):
    """Qwen families: every image and video frame within the grid rule's stated bound of what its
    plan keeps, ``s * (rows + cols) / 2 + 1/4`` with ``s = sqrt(kept / n)``. LLaVA-OneVision: an
    image alone in its prompt takes the anyres layout nearest the plan -- on these images of 2x2 and
    1x2 tiles, the base tile plus one grid tile -- and the images of a multi-image prompt and video
    frames keep their one tile each."""
    backbone, schedule = family.sdpa, downsample(family, reduction)
    qwen = backbone.adapter.size_multiple(backbone.config) > 1
    for name in ("image", "padded", "two_images", "video"):
        samples = prompts(family)[name]
        full, small = build_inputs(backbone, samples), build_inputs(backbone, samples, schedule=schedule)
        before, after = item_sizes(backbone, full), item_sizes(backbone, small)
        if not qwen:
            if name in ("two_images", "video"):
                assert after == before, name
            else:  # single images: 64 + 64 (square) or 64 + 48 (wide, letterboxed) of 320 and 160
                assert [sum(sizes) for sizes in after] == [128 if sum(sizes) == 320 else 112 for sizes in before]
            continue
        merge = backbone.config.vision_config.spatial_merge_size
        for (frames, rows, cols), sizes in zip(unit_grids(full, merge), after, strict=True):
            kept = schedule.plan(rows * cols).kept
            scale = math.sqrt(kept / (rows * cols))
            assert len(sizes) == frames and all(abs(got - kept) <= scale * (rows + cols) / 2 + 0.25 for got in sizes)
            assert all(got < rows * cols for got in sizes), (name, sizes, rows * cols)


@torch.no_grad()
def test_zero_reduction_equals_the_unpatched_model_at_full_resolution(family):
    backbone = family.sdpa
    zero = Schedule(method="downsample", reduction=0.0, encoder_share=1.0, encoder_layers=(), llm_layers=())
    for name, samples in prompts(family).items():
        full, zero_inputs = build_inputs(backbone, samples), build_inputs(backbone, samples, schedule=zero)
        assert full.keys() == zero_inputs.keys() and all(torch.equal(full[k], zero_inputs[k]) for k in full), name
    batch = build_inputs(backbone, prompts(family)["padded"])
    reference = backbone.model(**batch).logits
    illava.apply(backbone.model, family.default(7 / 9))
    illava.apply(backbone.model, zero)  # replaces the first schedule with the untouched model
    assert not illava.is_applied(backbone.model)
    assert torch.equal(backbone.model(**batch).logits, reference)


@torch.no_grad()
def test_batch_of_two_with_padding_equals_each_sample_alone(family):
    """Each sample is resized by its own images, never by the batch's."""
    model, schedule = family.sdpa.model, downsample(family)
    samples = prompts(family)["padded"]
    with pytest.warns(DownsampleWarning):
        illava.apply(model, schedule)
    together = model.generate(**build_inputs(family.sdpa, samples, schedule=schedule), max_new_tokens=3, **GREEDY)
    for row, sample in enumerate(samples):
        alone = model.generate(**build_inputs(family.sdpa, [sample], schedule=schedule), max_new_tokens=3, **GREEDY)
        assert torch.equal(together.sequences[row, -3:], alone.sequences[0, -3:])
        for a, b in zip(together.scores, alone.scores, strict=True):
            torch.testing.assert_close(a[row], b[0], rtol=0, atol=1e-4)


@torch.no_grad()
def test_cached_generate_equals_a_cache_free_reference(family):
    model, schedule = family.sdpa.model, downsample(family)
    batch = build_inputs(family.sdpa, prompts(family)["padded"], schedule=schedule)
    cached = model.generate(**batch, max_new_tokens=3, **GREEDY)
    recomputed = model.generate(**batch, use_cache=False, max_new_tokens=3, **GREEDY)
    assert torch.equal(cached.sequences, recomputed.sequences)
    for a, b in zip(cached.scores, recomputed.scores, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


def test_flops_count_the_unmerged_model_on_the_downsampled_inputs(family):
    """`prefill_flops` of a downsample schedule on the full-resolution grids is the unmerged model's
    on the grids of the inputs it builds, so its per-layer tokens are the downsampled batch's."""
    backbone, schedule = family.sdpa, downsample(family)
    config = backbone.config
    for name in ("image", "video", "two_images"):
        samples = prompts(family)[name]
        full, small = build_inputs(backbone, samples), build_inputs(backbone, samples, schedule=schedule)
        grids, text = backbone.adapter.flop_inputs(config, full)
        small_grids, small_text = backbone.adapter.flop_inputs(config, small)
        assert text == small_text
        flops = illava.prefill_flops(config, schedule, grids, text)
        assert flops == illava.prefill_flops(config, Schedule.vanilla(), small_grids, small_text), name
        assert flops.llm_tokens == (int(small["attention_mask"].sum()),) * len(flops.llm_tokens)
        speedup = illava.predicted_speedup(config, schedule, grids, text)
        unchanged = int(small["attention_mask"].sum()) == int(full["attention_mask"].sum())
        assert speedup == pytest.approx(1.0) if unchanged else speedup > 1.5, (name, speedup)


# ----------------------------------------------------------------------------------- the manifest, the helpers
def test_apply_accepts_a_downsample_manifest_and_leaves_the_model_unmerged(family):
    model, schedule = family.sdpa.model, downsample(family)
    illava.apply(model, family.default(7 / 9))
    with pytest.warns(DownsampleWarning, match="illava.downsample_size"):
        assert illava.apply(model, {"schedule": schedule.to_dict()}) is model
    assert not illava.is_applied(model)  # the first schedule removed, nothing installed (sdpa)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        illava.apply(model, schedule.with_(reduction=0.0))  # nothing to say: nothing changes


def test_the_public_helpers_resize_as_the_inputs_do(family):
    backbone, schedule = family.sdpa, downsample(family)
    sample = prompts(family)["image"][0]
    (image,) = sample.images
    size = illava.downsample_size(schedule, image.size, backbone.model, backbone.image_processor)
    assert prepare_samples(backbone, [sample], schedule)[0].images[0].size == size != image.size
    assert illava.prepare_samples is prepare_samples
    assert illava.downsample_size(family.default(7 / 9), image.size, backbone.model, None) == image.size
    lone_frame = illava.downsample_size(schedule, image.size, backbone.config, backbone.image_processor, alone=False)
    qwen = backbone.adapter.size_multiple(backbone.config) > 1
    assert (lone_frame == size) if qwen else (lone_frame == image.size)  # LLaVA-OneVision: one fixed tile


@torch.no_grad()
def test_under_packed_attention_last_stats_count_the_downsampled_tokens():
    """With ``illava_packed`` the unmerged reference is the engine removing nothing, so a downsample
    model has `last_stats`: every decoder layer sees the downsampled image's tokens."""
    backbone = load_backbone("tiny", attn_implementation="illava_packed")
    schedule = DOWNSAMPLE.placement(illava.paper_default_for(backbone.model, 7 / 9))
    batch = build_inputs(backbone, prompts_tiny(), schedule=schedule)
    with pytest.warns(DownsampleWarning):
        illava.apply(backbone.model, schedule)
    backbone.model(**batch)
    assert [int(n) for (n,) in illava.last_stats(backbone.model).llm_image_tokens] == [16] * 6  # 8x8 -> 4x4
    assert schedule.plan(64).kept == 15  # the plan's budget; the grid rounds it to 16
    illava.remove(backbone.model)


def prompts_tiny():
    from illava.inputs import Sample, synthetic_image

    return [Sample("<image> What is in the picture?", [synthetic_image(224, 1)])]
