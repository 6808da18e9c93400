"""Built-in backbones and the Qwen input builder, on the real transformers Qwen2.5-VL classes (CPU, fp32)."""

import numpy as np
import pytest
import torch

from illava.adapters._qwen import patchify_frames, video_pixel_values
from illava.backbones import (
    SPECIAL_TOKENS,
    build_config,
    build_image_processor,
    build_tokenizer,
    count_parameters,
    load_backbone,
    save_backbone,
    tokenizer_fingerprint,
)
from illava.inputs import Sample, build_inputs, synthetic_image, synthetic_video

# sha256 of the trained tokenizer JSON. Workers on different machines must build the same built-in
# models; if a tokenizers upgrade changes the trained vocabulary, this fails first.
TOKENIZER_SHA256 = "a22703bf4ed4e9fbace5a244c62d90595e79f39261da6b1448f5da622ca2ec75"


@pytest.fixture(scope="module")
def tiny():
    return load_backbone("tiny")


@pytest.fixture(scope="module")
def tiny_eager():
    return load_backbone("tiny", attn_implementation="eager")


def one_image_inputs(backbone, seed=0, size=112):
    sample = Sample(text="<image>Describe the image in detail.", images=[synthetic_image(size, seed)])
    return build_inputs(backbone, [sample])


@torch.no_grad()
def logits(backbone, inputs):
    return backbone.model(**inputs).logits


# --- tokenizer --------------------------------------------------------------------------------


def test_tokenizer_special_tokens_are_single_ids():
    tokenizer = build_tokenizer()
    ids = [tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS]
    assert len(set(ids)) == len(SPECIAL_TOKENS)
    for token, idx in zip(SPECIAL_TOKENS, ids, strict=True):
        assert tokenizer.encode(token, add_special_tokens=False) == [idx]
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.padding_side == "left"


def test_tokenizer_round_trip_and_size():
    tokenizer = build_tokenizer()
    text = "Describe the image: how many red squares are left of the 3 blue circles? Über café."
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    assert len(ids) < len(text) / 2, "common words should be whole tokens"
    assert 2000 <= len(tokenizer) <= 4096


def test_tokenizer_is_deterministic():
    assert build_tokenizer().get_vocab() == build_tokenizer().get_vocab()
    assert tokenizer_fingerprint() == TOKENIZER_SHA256, (
        "the built-in tokenizer's trained vocabulary changed (tokenizers version?); built-in models change with it"
    )


# --- configs ----------------------------------------------------------------------------------


def test_config_matches_tokenizer_and_architecture():
    tokenizer = build_tokenizer()
    config = build_config("tiny")
    ids = dict(zip(SPECIAL_TOKENS, tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS)), strict=True))
    assert config.image_token_id == ids["<|image_pad|>"] and config.video_token_id == ids["<|video_pad|>"]
    assert config.vision_start_token_id == ids["<|vision_start|>"]
    assert config.vision_end_token_id == ids["<|vision_end|>"]
    assert config.text_config.vocab_size == len(tokenizer)
    assert config.vision_config.out_hidden_size == config.text_config.hidden_size
    assert config.vision_config.tokens_per_second == 2
    for name in ("tiny", "small"):  # the seeded Qwen2.5-VL built-ins
        text = build_config(name).text_config
        head_dim = text.hidden_size // text.num_attention_heads
        assert sum(text.rope_parameters["mrope_section"]) == head_dim // 2
        assert text.num_key_value_heads < text.num_attention_heads


def test_parameter_counts():
    tiny, small = count_parameters("tiny"), count_parameters("small")
    assert 1_000_000 <= tiny["total"] <= 5_000_000
    assert 100_000_000 <= small["total"] <= 150_000_000
    assert small["llm"] > 5 * small["vision"]


def test_image_processor_keeps_benchmark_sizes():
    processor = build_image_processor()
    for size, grid in ((448, 32), (672, 48)):
        out = processor(images=[synthetic_image(size, 0)], return_tensors="pt")
        assert out["image_grid_thw"].tolist() == [[1, grid, grid]]


# --- models -----------------------------------------------------------------------------------


def test_tiny_is_deterministic_and_not_degenerate(tiny):
    inputs = one_image_inputs(tiny)
    first = logits(tiny, inputs)
    again = logits(load_backbone("tiny"), inputs)
    assert torch.equal(first, again)
    assert torch.isfinite(first).all()
    assert first[0].std(dim=0).mean() > 1e-2, "logits should vary along the sequence"
    other_image = logits(tiny, one_image_inputs(tiny, seed=1))
    assert (first[0, -1] - other_image[0, -1]).abs().max() > 1e-3, "the image should change the answer"
    other_seed = logits(load_backbone("tiny", seed=1), inputs)
    assert not torch.allclose(first, other_seed)


def test_seeding_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_backbone("tiny", seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_eager_and_sdpa_agree(tiny, tiny_eager):
    assert tiny.model.config._attn_implementation == "sdpa"
    assert tiny_eager.model.config._attn_implementation == "eager"
    inputs = one_image_inputs(tiny)
    torch.testing.assert_close(logits(tiny_eager, inputs), logits(tiny, inputs), atol=1e-4, rtol=1e-4)


def test_bfloat16_is_the_rounded_fp32_model():
    fp32 = load_backbone("tiny").model.model.visual.patch_embed.proj.weight
    bf16 = load_backbone("tiny", dtype=torch.bfloat16).model.model.visual.patch_embed.proj.weight
    assert bf16.dtype == torch.bfloat16 and torch.equal(bf16, fp32.to(torch.bfloat16))


def test_batched_generate_left_padding(tiny):
    samples = [
        Sample("<image>Describe the image.", [synthetic_image(112, 0)]),
        Sample(
            "What colour is the large square on the left of this picture? <image>", [synthetic_image((168, 112), 1)]
        ),
    ]
    inputs = build_inputs(tiny, samples)
    mask = inputs["attention_mask"]
    assert mask[:, -1].all() and not mask[:, 0].all(), "left padding"
    out = tiny.model.generate(**inputs, max_new_tokens=5, min_new_tokens=5)
    assert out.shape == (2, inputs["input_ids"].shape[1] + 5)
    for i, sample in enumerate(samples):
        single = build_inputs(tiny, [sample])
        alone = tiny.model.generate(**single, max_new_tokens=5, min_new_tokens=5)
        assert torch.equal(alone[0, -5:], out[i, -5:]), "padding must not change a sample's answer"


def test_two_images_and_a_video_forward(tiny):
    video = synthetic_video(5, (112, 84), seed=2)
    sample = Sample(
        "Compare <image> with <image>, then watch <video> and say what moved.",
        images=[synthetic_image(112, 0), synthetic_image((140, 84), 1)],
        videos=[video],
    )
    inputs = build_inputs(tiny, [sample], video_fps=1.0)
    assert inputs["video_grid_thw"].tolist() == [[3, 6, 8]]  # 5 frames padded to 6; 84x112 px
    assert inputs["second_per_grid_ts"].tolist() == [2.0]
    types = inputs["mm_token_type_ids"][0]
    assert (types == 1).sum() == (8 * 8 + 6 * 10) // 4 and (types == 2).sum() == 3 * 6 * 8 // 4
    out = logits(tiny, inputs)
    assert out.shape == (1, inputs["input_ids"].shape[1], len(tiny.tokenizer)) and torch.isfinite(out).all()
    positions, _ = tiny.model.model.get_rope_index(
        inputs["input_ids"],
        inputs["mm_token_type_ids"],
        inputs["image_grid_thw"],
        inputs["video_grid_thw"],
        inputs["second_per_grid_ts"],
        inputs["attention_mask"],
    )
    video_t = positions[0, 0, types == 2]
    steps = video_t.unique().diff()
    assert steps.tolist() == [4, 4], "t step = 2 tokens/s * 2 s per temporal patch (2 frames at 1 fps)"


def test_save_load_round_trip(tiny, tmp_path):
    save_backbone(tiny, tmp_path / "tiny")
    loaded = load_backbone(str(tmp_path / "tiny"))
    inputs = one_image_inputs(tiny)
    assert torch.equal(logits(loaded, inputs), logits(tiny, inputs))
    assert loaded.tokenizer.get_vocab() == tiny.tokenizer.get_vocab()
    assert loaded.image_processor.size == tiny.image_processor.size
    assert loaded.model.generation_config.eos_token_id == tiny.model.generation_config.eos_token_id
    assert loaded.model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("name", ["huge", "/no/such/checkpoint"])
def test_unknown_backbone_is_a_clear_error(name):
    with pytest.raises(ValueError, match=r"tiny.*small|small.*tiny") as err:
        load_backbone(name)
    assert "local checkpoint director" in str(err.value)


# --- inputs -----------------------------------------------------------------------------------


def test_still_video_equals_image_rows():
    processor = build_image_processor()
    image = synthetic_image((140, 112), 4)
    image_rows = processor(images=[image], return_tensors="pt")["pixel_values"]
    video_rows, grid = video_pixel_values(processor, [image, image])
    assert grid == [1, 8, 10]
    assert torch.equal(video_rows, image_rows)


def test_video_rows_interleave_frames_per_channel():
    """Each row holds, per channel, frame 2k's patch then frame 2k+1's, like the tower's Conv3d expects."""
    processor = build_image_processor()
    frames = synthetic_video(4, 56, seed=5)
    video_rows, grid = video_pixel_values(processor, frames)
    assert grid == [2, 4, 4]
    still = [processor(images=[f], return_tensors="pt")["pixel_values"].view(16, 3, 2, 14, 14) for f in frames]
    rows = video_rows.view(2, 16, 3, 2, 14, 14)
    for t in range(2):
        for k in range(2):
            assert torch.equal(rows[t, :, :, k], still[2 * t + k][:, :, 0])


def test_patchify_pads_odd_frame_counts_with_the_last_frame():
    frames = np.random.default_rng(0).standard_normal((3, 3, 28, 28)).astype(np.float32)  # (T, C, H, W)
    padded = np.concatenate([frames, frames[-1:]])
    assert np.array_equal(patchify_frames(frames, 14, 2, 2), patchify_frames(padded, 14, 2, 2))


def test_placeholders_and_chat_template(tiny):
    tok = tiny.tokenizer
    inputs = build_inputs(tiny, [Sample("<image>Hi", [synthetic_image(56, 0)])])
    text = tok.decode(inputs["input_ids"][0])
    pads = "<|image_pad|>" * 4
    assert text == f"<|im_start|>user\n<|vision_start|>{pads}<|vision_end|>Hi<|im_end|>\n<|im_start|>assistant\n"
    expanded = tok(text, add_special_tokens=False)["input_ids"]
    assert inputs["input_ids"][0].tolist() == expanded, "segment-wise tokenising equals whole-string tokenising"
    plain = build_inputs(tiny, [Sample("Hi there")], chat=False)
    assert tok.decode(plain["input_ids"][0]) == "Hi there" and "pixel_values" not in plain


def test_marker_count_mismatch_is_a_clear_error(tiny):
    with pytest.raises(ValueError, match="markers"):
        build_inputs(tiny, [Sample("<image><image>", [synthetic_image(56, 0)])])
    with pytest.raises(ValueError, match="reserved"):
        build_inputs(tiny, [Sample("<|image_pad|>")])


def test_synthetic_inputs_are_deterministic_and_structured():
    a, b = synthetic_image((64, 48), 3), synthetic_image((64, 48), 3)
    assert a.size == (64, 48) and a.tobytes() == b.tobytes()
    assert a.tobytes() != synthetic_image((64, 48), 4).tobytes()
    pixels = np.asarray(a, dtype=np.float32)
    assert np.abs(np.diff(pixels, axis=1)).mean() < 20, "mostly smooth, not noise"
    frames = synthetic_video(3, 64, seed=1)
    assert len(frames) == 3 and frames[0].tobytes() != frames[1].tobytes()
