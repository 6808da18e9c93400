"""The Qwen2.5-VL patch on the built-in `tiny` backbone (a real transformers model)."""

import pytest
import torch

import illava
from illava import PAPER_REDUCTIONS, Schedule, ScheduleError, UnsupportedModelError
from illava.backbones import load_backbone
from illava.inputs import Sample, build_inputs, synthetic_image, synthetic_video

IMAGE = synthetic_image(224, seed=1)  # 16x16 patches -> 64 LLM tokens, 4 windows


@pytest.fixture(scope="module", params=["eager", "sdpa"])
def tiny(request):
    return load_backbone("tiny", attn_implementation=request.param, seed=0)


@pytest.fixture(scope="module")
def tiny_sdpa():
    return load_backbone("tiny", attn_implementation="sdpa", seed=0)


@pytest.fixture(autouse=True)
def _unpatched(request):
    yield
    for name in ("tiny", "tiny_sdpa"):
        if name in request.fixturenames:
            illava.remove(request.getfixturevalue(name).model)


def inputs(backbone, *samples):
    return build_inputs(backbone, list(samples))


def default(reduction, backbone):
    config = backbone.model.config
    return Schedule.paper_default(
        reduction, encoder_depth=config.vision_config.depth, llm_depth=config.text_config.num_hidden_layers
    )


@torch.no_grad()
def test_zero_reduction_equals_unpatched(tiny):
    batch = inputs(
        tiny,
        Sample("<image> What is in the picture?", [IMAGE]),
        Sample("Describe <image> in one long sentence, please.", [synthetic_image((168, 112), seed=2)]),
    )
    reference = tiny.model(**batch).logits
    illava.apply(tiny.model, Schedule.vanilla())
    merged = tiny.model(**batch).logits
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(merged[valid], reference[valid], rtol=0, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("reduction", PAPER_REDUCTIONS)
def test_token_counts_follow_the_plan(tiny_sdpa, reduction):
    model = tiny_sdpa.model
    schedule = default(reduction, tiny_sdpa)
    plan = schedule.plan(64)
    illava.apply(model, schedule)
    model(**inputs(tiny_sdpa, Sample("<image> What colour is the circle?", [IMAGE])))
    stats = illava.last_stats(model)
    assert [units for (units,) in stats.encoder_units] == [
        plan.encoder_tokens_at(b)[0] for b in range(model.config.vision_config.depth)
    ]
    assert [int(n) for (n,) in stats.llm_image_tokens] == [
        plan.llm_tokens_at(layer) for layer in range(model.config.text_config.num_hidden_layers)
    ]
    assert stats.kept_units[0].numel() == plan.after_encoder
    # The paper's identity on the counts the model actually ran with.
    removed_llm = int(stats.llm_image_tokens[0]) - plan.kept
    assert plan.kept == 64 - plan.encoder_removed - removed_llm
    assert plan.encoder_removed > 0 and removed_llm > 0


@torch.no_grad()
def test_kept_tokens_keep_their_original_3d_positions(tiny_sdpa):
    model = tiny_sdpa.model
    batch = inputs(tiny_sdpa, Sample("Look: <image> what is there?", [synthetic_image((224, 168), seed=3)]))
    positions, _ = model.model.get_rope_index(
        batch["input_ids"], batch["mm_token_type_ids"], image_grid_thw=batch["image_grid_thw"]
    )
    is_image = batch["input_ids"][0] == model.config.image_token_id
    unmerged = positions[:, 0, is_image]  # (3, 48), raster order
    illava.apply(model, default(7 / 9, tiny_sdpa))
    model(**batch)
    stats = illava.last_stats(model)
    kept = stats.kept_units[0]
    assert kept.numel() < is_image.sum()
    assert torch.equal(stats.image_positions[0], unmerged[:, kept])
    # Raster ids really are grid cells: height and width positions follow from the id.
    grid_w = 224 // 28  # synthetic_image sizes are (width, height)
    assert torch.equal(unmerged[1, kept] - unmerged[1].min(), kept // grid_w)
    assert torch.equal(unmerged[2, kept] - unmerged[2].min(), kept % grid_w)


@torch.no_grad()
def test_cached_generation_equals_recompute(tiny):
    batch = inputs(tiny, Sample("<image> Tell me about the shapes.", [IMAGE]))
    illava.apply(tiny.model, default(7 / 9, tiny))
    kwargs = dict(max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True)
    cached = tiny.model.generate(**batch, **kwargs)
    recomputed = tiny.model.generate(**batch, use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, recomputed.sequences)
    for a, b in zip(cached.scores, recomputed.scores):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


@torch.no_grad()
def test_batch_of_two_equals_each_alone(tiny_sdpa):
    model = tiny_sdpa.model
    samples = [
        Sample("<image> Short?", [IMAGE]),
        Sample(
            "A longer question about <image> and the colours of every shape in it.", [synthetic_image((168, 112), 4)]
        ),
    ]
    illava.apply(model, default(7 / 9, tiny_sdpa))
    kwargs = dict(max_new_tokens=5, do_sample=False, output_scores=True, return_dict_in_generate=True)
    together = model.generate(**inputs(tiny_sdpa, *samples), **kwargs)
    for row, sample in enumerate(samples):
        alone = model.generate(**inputs(tiny_sdpa, sample), **kwargs)
        assert torch.equal(together.sequences[row, -5:], alone.sequences[0, -5:])
        for a, b in zip(together.scores, alone.scores):
            torch.testing.assert_close(a[row], b[0], rtol=0, atol=1e-4)


@torch.no_grad()
def test_two_images_are_merged_independently(tiny_sdpa):
    model = tiny_sdpa.model
    schedule = default(7 / 9, tiny_sdpa)
    illava.apply(model, schedule)

    def run(second):
        sample = Sample("<image> and <image>: which is brighter?", [IMAGE, second])
        batch = inputs(tiny_sdpa, sample)
        vision = model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
        model(**batch)
        return vision, illava.last_stats(model)

    vision_a, stats_a = run(synthetic_image((168, 112), seed=5))
    vision_b, stats_b = run(synthetic_image((168, 112), seed=6))
    assert [k.numel() for k in stats_a.kept_units] == [schedule.plan(64).after_encoder, schedule.plan(24).after_encoder]
    # Changing the second image changes nothing about the first: no importance crosses images.
    assert torch.equal(stats_a.kept_units[0], stats_b.kept_units[0])
    torch.testing.assert_close(vision_a.pooler_output[0], vision_b.pooler_output[0], rtol=0, atol=1e-6)
    assert not torch.equal(stats_a.kept_units[1], stats_b.kept_units[1]) or not torch.allclose(
        vision_a.pooler_output[1], vision_b.pooler_output[1]
    )
    assert int(stats_a.llm_image_tokens[-1]) == schedule.plan(64).kept + schedule.plan(24).kept


@torch.no_grad()
def test_video_frames_are_segments(tiny_sdpa):
    model = tiny_sdpa.model
    schedule = default(7 / 9, tiny_sdpa)
    illava.apply(model, schedule)
    frames = synthetic_video(4, 112, seed=7)  # 2 temporal patches of 4x4 groups... of 16 tokens each

    def kept_per_frame(video):
        batch = inputs(tiny_sdpa, Sample("<video> What moves?", videos=[video]))
        assert batch["video_grid_thw"][0, 0] == 2
        out = model(**batch)
        assert torch.isfinite(out.logits).all()
        kept = illava.last_stats(model).kept_units[0]
        return [kept[(kept >= 16 * t) & (kept < 16 * (t + 1))] for t in range(2)]

    first = kept_per_frame(frames)
    assert [k.numel() for k in first] == [schedule.plan(16).after_encoder] * 2
    changed = frames[:2] + synthetic_video(2, 112, seed=8)  # only the second temporal patch differs
    assert torch.equal(kept_per_frame(changed)[0], first[0])


@torch.no_grad()
def test_remove_restores_outputs_and_apply_is_idempotent(tiny_sdpa):
    model = tiny_sdpa.model
    batch = inputs(tiny_sdpa, Sample("<image> Anything?", [IMAGE]))
    reference = model(**batch).logits
    original_class = type(model.model)
    illava.apply(model, default(2 / 3, tiny_sdpa))
    first = model(**batch).logits
    illava.apply(model, default(2 / 3, tiny_sdpa))  # twice: same result, not double-patched
    assert type(model.model).__mro__[1] is original_class
    torch.testing.assert_close(model(**batch).logits, first, rtol=0, atol=0)
    assert first.shape[1] < reference.shape[1]
    illava.remove(model)
    illava.remove(model)  # removing an unpatched model is a no-op
    assert type(model.model) is original_class and not illava.is_applied(model)
    assert torch.equal(model(**batch).logits, reference)


@torch.no_grad()
def test_baseline_methods_run_and_differ(tiny_sdpa):
    model = tiny_sdpa.model
    batch = inputs(tiny_sdpa, Sample("<image> Anything?", [IMAGE]))
    one_merge = Schedule(reduction=0.5, encoder_share=1.0, encoder_layers=(1,), llm_layers=())
    kept, features = {}, {}
    for method in ("illava", "prune", "random"):
        illava.apply(model, one_merge.with_(method=method))
        features[method] = model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"]).pooler_output[
            0
        ]
        model(**batch)
        kept[method] = illava.last_stats(model).kept_units[0]
    assert kept["illava"].numel() == kept["prune"].numel() == kept["random"].numel() == 32
    # One merge: the same importance selection; recycling changes the features downstream of it.
    assert torch.equal(kept["illava"], kept["prune"])
    assert not torch.allclose(features["illava"], features["prune"])
    assert not torch.equal(kept["random"], kept["illava"])


@pytest.mark.parametrize(
    ("schedule", "message"),
    [
        ({"encoder_layers": [1, 9]}, r"encoder layer\(s\) \[9\] out of range: this encoder has 6 blocks \(0..5\)"),
        ({"llm_layers": [5]}, r"LLM layer\(s\) \[5\] out of range.*allows 0..4"),
        ({"reduction": 1.0}, r"reduction 1.0 is outside \[0, 1\).*removing all of them"),
        ({"encoder_share": -0.5}, r"encoder_share -0.5 is outside \[0, 1\]"),
        ({"method": "no-such-method"}, r"unknown method 'no-such-method'; allowed: illava, prune, random"),
    ],
)
def test_invalid_schedules_fail_at_apply(tiny_sdpa, schedule, message):
    with pytest.raises(ScheduleError, match=message):
        illava.apply(tiny_sdpa.model, schedule)
    assert not illava.is_applied(tiny_sdpa.model)


def test_unsupported_model_names_the_supported_ones():
    with pytest.raises(UnsupportedModelError, match="supported model classes: Qwen2_5_VLForConditionalGeneration"):
        illava.apply(torch.nn.Linear(2, 2), Schedule())


def test_apply_accepts_a_manifest_and_a_json_file(tiny_sdpa, tmp_path):
    schedule = default(2 / 3, tiny_sdpa)
    illava.apply(tiny_sdpa.model, {"schedule": schedule.to_dict(), "backbone": {"name": "tiny"}})
    assert illava.last_stats(tiny_sdpa.model) is not None
    path = tmp_path / "schedule.json"
    path.write_text(schedule.to_json())
    illava.apply(tiny_sdpa.model, path)
    assert illava.is_applied(tiny_sdpa.model)
