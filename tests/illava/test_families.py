"""What is particular to one family: Qwen2.5-VL without ``mm_token_type_ids``, Qwen3-VL's DeepStack
features, LLaVA-OneVision's unpadding, newlines and resampled grids; and the registries."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import illava
from illava import Schedule, ScheduleError, UnsupportedModelError
from illava.adapters import adapter_for_config, supported_model_types
from illava.backbones import load_backbone, save_backbone
from illava.inputs import Sample, build_inputs, synthetic_image, synthetic_video

GREEDY = dict(do_sample=False, output_scores=True, return_dict_in_generate=True)


# ----------------------------------------------------------------------------------- Qwen2.5-VL
@torch.no_grad()
@pytest.mark.parametrize("kind", ["video", "padded"])
def test_without_mm_token_type_ids_zero_reduction_follows_the_library(kind):
    """transformers falls back to 1-D positions without the field; so must a patched model."""
    backbone = load_backbone("tiny")
    model = backbone.model
    samples = {
        "video": [Sample("<video> What moves?", videos=[synthetic_video(4, 112, seed=7)])],
        "padded": [
            Sample("<image> Short?", [synthetic_image(224, 1)]),
            Sample("A longer question about <image> and its shapes.", [synthetic_image((168, 112), 4)]),
        ],
    }[kind]
    batch = dict(build_inputs(backbone, samples))
    del batch["mm_token_type_ids"]
    reference = model(**batch).logits
    illava.apply(model, Schedule.vanilla())
    valid = batch["attention_mask"].bool()
    assert torch.equal(model(**batch).logits[valid], reference[valid])


@torch.no_grad()
def test_without_mm_token_type_ids_a_merged_forward_and_generate_agree():
    backbone = load_backbone("tiny")
    model = backbone.model
    batch = dict(build_inputs(backbone, [Sample("<video> What moves?", videos=[synthetic_video(4, 112, seed=7)])]))
    del batch["mm_token_type_ids"]
    illava.apply(model, illava.paper_default_for(model, 7 / 9))
    forward = model(**batch).logits[:, -1]
    first_step = model.generate(**batch, max_new_tokens=1, **GREEDY).scores[0]
    torch.testing.assert_close(forward, first_step, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------- Qwen3-VL
@torch.no_grad()
def test_deepstack_features_follow_the_tokens_they_belong_to():
    """With an LLM merge after layer 0 and no recycling, what DeepStack adds after layer 1 is, row by
    row, the unmerged encoder's DeepStack feature of a surviving token (never one of a dropped token,
    never one shifted onto another token)."""
    backbone = load_backbone("tiny-qwen3-vl")
    model = backbone.model
    adapter = backbone.adapter
    batch = build_inputs(backbone, [Sample("<image> What is here?", [synthetic_image(256, 1)])])
    inner = adapter.inner_model(model)
    original = inner.get_image_features(batch["pixel_values"], batch["image_grid_thw"]).deepstack_features
    original_layer1 = original[1][0]  # (64, C): the second DeepStack feature of each image token
    schedule = Schedule(method="prune", reduction=0.5, encoder_share=0.0, encoder_layers=(), llm_layers=(0,))
    added = {}
    real = type(adapter).after_decoder_layer

    def spy(self, inner_model, index, hidden, extras):
        added[index] = extras["deepstack"][:, :, index].clone() if index < extras["deepstack"].shape[2] else None
        return real(self, inner_model, index, hidden, extras)

    illava.apply(model, schedule)
    try:
        type(adapter).after_decoder_layer = spy
        model(**batch)
    finally:
        type(adapter).after_decoder_layer = real
    rows = added[1][0]
    rows = rows[rows.abs().sum(dim=-1) > 0]  # the image tokens (text tokens get nothing)
    assert rows.shape[0] == schedule.plan(64).llm_tokens_at(1) == 32
    matches = (rows[:, None, :] == original_layer1[None]).all(dim=-1)  # (32, 64): bit-equal rows
    assert matches.sum(dim=1).tolist() == [1] * 32, "each added row is exactly one token's own feature"
    assert len(set(matches.float().argmax(dim=1).tolist())) == 32, "and no token's feature is added twice"


# ----------------------------------------------------------------------------------- LLaVA-OneVision
@pytest.fixture(scope="module")
def llava():
    return load_backbone("tiny-llava-onevision")


@torch.no_grad()
def test_letterbox_padding_leaves_before_the_first_merge_and_newlines_stay(llava):
    model, adapter = llava.model, llava.adapter
    batch = build_inputs(llava, [Sample("<image> Wide?", [synthetic_image((168, 112), 4)])])
    (layout,) = adapter.visual_call(adapter.inner_model(model), "image", dict(batch)).items
    assert layout.segment_sizes == (64, 48, 48)  # base tile, and two grid tiles that lose 2 of 8 columns
    newlines = [i for i, segment in enumerate(layout.segment_of) if segment < 0]
    assert len(newlines) == 8  # one per row of the unpadded 8 x 12 grid
    schedule = illava.paper_default_for(model, 7 / 9)
    illava.apply(model, schedule)
    model(**batch)
    stats = illava.last_stats(model)
    assert stats.encoder_units[0] == [64, 48, 48]  # the first block merges: the padding already left
    (kept,) = stats.kept_units
    assert set(newlines) <= set(kept.tolist()), "every row keeps its newline"
    assert kept.numel() == sum(schedule.plan(n).after_encoder for n in layout.segment_sizes) + len(newlines)


@torch.no_grad()
def test_a_resampled_grid_merges_in_the_llm_only_and_says_why_not_in_the_encoder(llava, tmp_path):
    """anyres_max_1 makes the library resample a 2x2-tile grid: its tiles no longer map to LLM tokens."""
    save_backbone(llava, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "vision_aspect_ratio": "anyres_max_1"}))
    backbone = load_backbone(str(tmp_path / "m"))
    model = backbone.model
    batch = build_inputs(backbone, [Sample("<image> Big?", [synthetic_image(224, 4)])])
    (layout,) = backbone.adapter.visual_call(backbone.adapter.inner_model(model), "image", dict(batch)).items
    assert len(layout.segment_sizes) == 2  # the base tile and the resampled grid
    reference = model(**batch).logits
    illava.apply(model, Schedule.vanilla())
    assert torch.equal(model(**batch).logits, reference)
    illava.apply(model, illava.paper_default_for(model, 7 / 9))
    with pytest.raises(ScheduleError, match=r"resamples the tile grid of a 224x224 image.*encoder_share=0"):
        model(**batch)
    schedule = illava.paper_default_for(model, 7 / 9, encoder_share=0.0)
    illava.apply(model, schedule)
    model(**batch)
    plans = [schedule.plan(n) for n in layout.segment_sizes]
    assert int(illava.last_stats(model).llm_image_tokens[-1]) == sum(plan.kept for plan in plans)


def test_only_the_full_feature_strategy_is_supported(llava):
    model = llava.model
    batch = build_inputs(llava, [Sample("<image> Hi", [synthetic_image(112, 1)])])
    illava.apply(model, illava.paper_default_for(model, 7 / 9))
    try:
        with pytest.raises(NotImplementedError, match="vision_feature_select_strategy 'default'"):
            model(**batch, vision_feature_select_strategy="default")
    finally:
        illava.remove(model)


# ----------------------------------------------------------------------------------- registries
def test_an_unsupported_checkpoint_names_its_model_type_and_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "blip-2"}))
    with pytest.raises(ValueError, match=r"model_type 'blip-2' is not supported; supported model types: qwen2_5_vl"):
        load_backbone(str(tmp_path))
    assert {"qwen2_5_vl", "qwen2_vl", "qwen3_vl", "llava_onevision"} <= set(supported_model_types())
    with pytest.raises(UnsupportedModelError, match="model_type 'blip-2'"):
        adapter_for_config({"model_type": "blip-2"})


@pytest.mark.parametrize("text", ["{oops", "[1, 2]"])
def test_a_malformed_config_json_names_the_file(tmp_path, text):
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ValueError, match=r"config.json' .*(could not be read as a model config|is not a model config)"):
        load_backbone(str(tmp_path))


def test_every_family_maps_the_paper_default_onto_its_depths():
    for name in ("tiny", "tiny-qwen2-vl", "tiny-qwen3-vl", "tiny-llava-onevision"):
        config = load_backbone(name).model.config
        encoder_depth, llm_depth = illava.depths(config)
        schedule = illava.paper_default_for(config, 7 / 9)
        expected = Schedule.paper_default(7 / 9, encoder_depth=encoder_depth, llm_depth=llm_depth)
        assert dataclasses.astuple(schedule) == dataclasses.astuple(expected)
        schedule.check_fits(encoder_depth=encoder_depth, llm_depth=llm_depth)
