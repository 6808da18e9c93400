"""Edge cases of the Qwen2.5-VL patch on the built-in `tiny` backbone: text-only and mixed batches,
right padding, manual decoding, bf16, generate's batch expansion and beam search, odd image sizes,
video, the random baseline's determinism, and what a merged model must refuse loudly."""

import json

import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration

import illava
from illava import Schedule
from illava.backbones import load_backbone
from illava.inputs import Sample, build_inputs, synthetic_image, synthetic_video

SMALL = synthetic_image(112, seed=1)  # 8x8 patches -> 16 LLM tokens, one window
WIDE = synthetic_image((84, 56), seed=2)  # 6 LLM tokens
TINY = synthetic_image(56, seed=3)  # 4 LLM tokens (the processor's minimum)
# Different lengths, so a batch of them is padded.
RIGHT = [Sample("<image>?", [WIDE]), Sample("A much longer question <image> about all of the shapes.", [SMALL])]
GREEDY = dict(do_sample=False, output_scores=True, return_dict_in_generate=True)


@pytest.fixture(scope="module")
def sdpa():
    return load_backbone("tiny", attn_implementation="sdpa", seed=0)


@pytest.fixture(scope="module")
def eager():
    return load_backbone("tiny", attn_implementation="eager", seed=0)


@pytest.fixture(params=["eager", "sdpa"])
def tiny(request):
    return request.getfixturevalue(request.param)


@pytest.fixture(autouse=True)
def _unpatched(request):
    yield
    for name in ("sdpa", "eager"):
        if name in request.fixturenames:
            illava.remove(request.getfixturevalue(name).model)


def inputs(backbone, *samples, **kwargs):
    return build_inputs(backbone, list(samples), **kwargs)


def default(reduction, backbone, **overrides):
    config = backbone.model.config
    return Schedule.paper_default(
        reduction,
        encoder_depth=config.vision_config.depth,
        llm_depth=config.text_config.num_hidden_layers,
        **overrides,
    )


def unpatched_logits(model, batch):
    illava.remove(model)
    return model(**batch).logits


def right_padded(batch, pad_id):
    """The same batch with each row's real tokens moved to the front (padding_side='right')."""
    batch = dict(batch)
    real = batch["attention_mask"].bool()
    for key, fill in (("input_ids", pad_id), ("attention_mask", 0), ("mm_token_type_ids", 0)):
        moved = torch.full_like(batch[key], fill)
        for row in range(moved.shape[0]):
            moved[row, : int(real[row].sum())] = batch[key][row][real[row]]
        batch[key] = moved
    return batch


def appended(batch, tokens):
    """`batch` with one more text token per row (prompt + next token)."""
    batch = dict(batch)
    batch["input_ids"] = torch.cat([batch["input_ids"], tokens], dim=1)
    batch["attention_mask"] = torch.cat([batch["attention_mask"], torch.ones_like(tokens)], dim=1)
    batch["mm_token_type_ids"] = torch.cat([batch["mm_token_type_ids"], torch.zeros_like(tokens)], dim=1)
    return batch


def frame_sizes(grid_thw):
    return [h * w // 4 for t, h, w in grid_thw.tolist() for _ in range(t)]


# ------------------------------------------------------------------------------------ text only, mixed batches
@torch.no_grad()
def test_text_only_prompts_equal_the_unpatched_model(tiny):
    model = tiny.model
    batch = inputs(tiny, Sample("Tell me about the shapes and their colours."), Sample("Hi"))
    reference = unpatched_logits(model, batch)
    reference_gen = model.generate(**batch, max_new_tokens=4, **GREEDY)
    illava.apply(model, default(7 / 9, tiny))  # merging is configured but there is nothing to merge
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(model(**batch).logits[valid], reference[valid], rtol=0, atol=1e-5)
    generated = model.generate(**batch, max_new_tokens=4, **GREEDY)
    assert torch.equal(generated.sequences, reference_gen.sequences)
    for a, b in zip(generated.scores, reference_gen.scores):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert [int(n) for n in illava.last_stats(model).llm_image_tokens[0]] == [0, 0]


MIXED = {
    "image_and_text_only": [Sample("<image> What is it?", [SMALL]), Sample("No picture here, only some words.")],
    "two_images_and_one": [
        Sample("<image> and <image>: which is brighter?", [WIDE, TINY]),
        Sample("Look at <image> now.", [SMALL]),
    ],
}


@torch.no_grad()
@pytest.mark.parametrize("name", MIXED)
def test_mixed_batches_equal_each_sample_alone(sdpa, name):
    model, samples = sdpa.model, MIXED[name]
    batch = inputs(sdpa, *samples)
    reference = unpatched_logits(model, batch)
    illava.apply(model, Schedule.vanilla())
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(model(**batch).logits[valid], reference[valid], rtol=0, atol=1e-5)

    schedule = default(8 / 9, sdpa)
    illava.apply(model, schedule)
    together = model(**batch).logits[:, -1]
    stats = illava.last_stats(model)
    assert torch.isfinite(together).all()
    for row, sample in enumerate(samples):
        alone = model(**inputs(sdpa, sample)).logits[0, -1]
        torch.testing.assert_close(together[row], alone, rtol=0, atol=1e-4)
        sizes = [16 if image is SMALL else 6 if image is WIDE else 4 for image in sample.images]
        assert int(stats.llm_image_tokens[-1][row]) == sum(schedule.plan(n).kept for n in sizes)


@torch.no_grad()
def test_zero_reduction_generate_equals_unpatched(tiny):
    model = tiny.model
    batch = inputs(tiny, Sample("<image> Shapes?", [SMALL]), Sample("A longer question about <image> please.", [WIDE]))
    illava.remove(model)
    reference = model.generate(**batch, max_new_tokens=5, **GREEDY)
    illava.apply(model, Schedule.vanilla())
    generated = model.generate(**batch, max_new_tokens=5, **GREEDY)
    assert torch.equal(generated.sequences, reference.sequences)
    for a, b in zip(generated.scores, reference.scores):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@torch.no_grad()
def test_cached_generation_of_a_padded_batch_equals_recompute(tiny):
    model = tiny.model
    batch = inputs(tiny, *RIGHT)
    illava.apply(model, default(7 / 9, tiny))
    cached = model.generate(**batch, max_new_tokens=4, **GREEDY)
    recomputed = model.generate(**batch, max_new_tokens=4, use_cache=False, **GREEDY)
    assert torch.equal(cached.sequences, recomputed.sequences)
    for a, b in zip(cached.scores, recomputed.scores):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


# ------------------------------------------------------------------------------------ manual decoding
@torch.no_grad()
@pytest.mark.parametrize("pass_positions", [True, False], ids=["positions", "no_positions"])
def test_manual_decode_steps_equal_recompute(tiny, pass_positions):
    model = tiny.model
    batch = inputs(
        tiny, Sample("<image> What?", [SMALL]), Sample("A longer question <image> about the shapes.", [WIDE])
    )
    illava.apply(model, default(7 / 9, tiny))
    cache = model(**batch, use_cache=True).cache
    current, steps = batch, []
    for tokens in (torch.tensor([[57], [99]]), torch.tensor([[12, 13], [300, 301]])):  # one token, then a chunk
        current = appended(current, tokens)
        kwargs = {}
        if pass_positions:  # the unmerged model's positions, as generate passes them
            positions, _ = model.model.get_rope_index(
                current["input_ids"], current["mm_token_type_ids"], image_grid_thw=current["image_grid_thw"],
                attention_mask=current["attention_mask"],
            )  # fmt: skip
            kwargs["position_ids"] = positions[:, :, -tokens.shape[1] :]
        out = model(input_ids=tokens, cache=cache, attention_mask=current["attention_mask"], **kwargs)
        cache = out.cache
        steps.append((dict(current), out.logits))
    # Recompute afterwards: a prefill resets the merge state the open cache depends on.
    for prompt, logits in steps:
        recomputed = model(**prompt, use_cache=False).logits[:, -logits.shape[1] :]
        torch.testing.assert_close(logits, recomputed, rtol=0, atol=1e-4)


@torch.no_grad()
def test_decode_after_a_long_video_continues_like_recompute(sdpa):
    """Temporal mRoPE ids of a slow video run past the text after it; the next token must still get
    the position a full recompute (and `generate`) gives it: last text position + 1."""
    model = sdpa.model
    batch = inputs(sdpa, Sample("<video>", videos=[synthetic_video(4, 56, seed=4)]), chat=False, video_fps=0.25)
    positions, _ = model.model.get_rope_index(
        batch["input_ids"], batch["mm_token_type_ids"], video_grid_thw=batch["video_grid_thw"],
        second_per_grid_ts=batch["second_per_grid_ts"],
    )  # fmt: skip
    assert positions[0, 0].max() > positions[0, 0, -1]  # the case this test is about
    tokens = torch.tensor([[57]])
    full = appended(batch, tokens)
    for schedule in (Schedule.vanilla(), default(7 / 9, sdpa)):
        illava.apply(model, schedule)
        cache = model(**batch, use_cache=True).cache
        step = model(input_ids=tokens, cache=cache, attention_mask=full["attention_mask"]).logits[:, -1]
        torch.testing.assert_close(step, model(**full).logits[:, -1], rtol=0, atol=1e-4)


# ------------------------------------------------------------------------------------ right padding


@torch.no_grad()
def test_right_padded_batch_puts_each_last_token_at_the_end(sdpa):
    """The output keeps the input's padding side: each sample's last token sits at its merged length - 1."""
    model = sdpa.model
    batch = right_padded(inputs(sdpa, *RIGHT), sdpa.tokenizer.pad_token_id)
    assert not batch["attention_mask"][:, -1].all()
    illava.apply(model, default(7 / 9, sdpa))
    logits = model(**batch).logits
    lengths = illava.last_stats(model).llm_sequence[-1].tolist()
    assert lengths[0] != lengths[1]  # the merged rows really are padded
    for row, sample in enumerate(RIGHT):
        alone = model(**inputs(sdpa, sample)).logits[0, -1]
        torch.testing.assert_close(logits[row, lengths[row] - 1], alone, rtol=0, atol=1e-4)


@torch.no_grad()
def test_zero_reduction_right_padded_equals_unpatched(sdpa):
    model = sdpa.model
    batch = right_padded(inputs(sdpa, *RIGHT), sdpa.tokenizer.pad_token_id)
    assert not batch["attention_mask"][:, -1].all()
    reference = unpatched_logits(model, batch)
    illava.apply(model, Schedule.vanilla())
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(model(**batch).logits[valid], reference[valid], rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------ dtype
@torch.no_grad()
def test_bf16_runs_and_is_finite():
    backbone = load_backbone("tiny", attn_implementation="sdpa", dtype=torch.bfloat16, seed=0)
    model = backbone.model
    batch = inputs(backbone, Sample("<image> What?", [SMALL]), Sample("Text <image> here.", [WIDE]))
    reference = model(**batch).logits
    illava.apply(model, Schedule.vanilla())
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(model(**batch).logits[valid], reference[valid], rtol=0, atol=1e-2)
    illava.apply(model, default(8 / 9, backbone))
    logits = model(**batch).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    assert model.generate(**batch, max_new_tokens=3, do_sample=False).shape[1] == batch["input_ids"].shape[1] + 3


# ------------------------------------------------------------------------------------ batch expansion in generate
@torch.no_grad()
@pytest.mark.parametrize("reduction", [0.0, 7 / 9])
def test_num_return_sequences_with_images(sdpa, reduction):
    model = sdpa.model
    batch = inputs(sdpa, Sample("<image> What?", [SMALL]))
    illava.apply(model, default(reduction, sdpa))
    kwargs = dict(max_new_tokens=1, output_logits=True, return_dict_in_generate=True)
    single = model.generate(**batch, do_sample=False, **kwargs).logits[0]
    torch.manual_seed(0)
    expanded = model.generate(**batch, do_sample=True, num_return_sequences=2, **kwargs).logits[0]
    torch.testing.assert_close(expanded, single.expand(2, -1), rtol=0, atol=1e-5)


@torch.no_grad()
def test_beam_search_on_text_only_prompts_equals_unpatched(sdpa):
    model = sdpa.model
    batch = inputs(sdpa, Sample("Tell me about the shapes and colours."), Sample("Hi"))
    kwargs = dict(max_new_tokens=4, num_beams=2, num_return_sequences=2, return_dict_in_generate=True)
    illava.remove(model)
    reference = model.generate(**batch, **kwargs)
    illava.apply(model, default(7 / 9, sdpa))
    generated = model.generate(**batch, **kwargs)
    assert torch.equal(generated.sequences, reference.sequences)
    torch.testing.assert_close(generated.sequences_scores, reference.sequences_scores, rtol=0, atol=1e-5)


@torch.no_grad()
def test_beam_search_with_images_works_or_says_why(sdpa):
    model = sdpa.model
    batch = inputs(sdpa, Sample("<image> What?", [SMALL]))
    kwargs = dict(max_new_tokens=3, num_beams=2, return_dict_in_generate=True)
    illava.remove(model)
    reference = model.generate(**batch, **kwargs)
    illava.apply(model, Schedule.vanilla())
    try:
        generated = model.generate(**batch, **kwargs)
    except (ValueError, RuntimeError, NotImplementedError) as error:
        assert "beam" in str(error).lower()
    else:
        assert torch.equal(generated.sequences, reference.sequences)


# ------------------------------------------------------------------------------------ odd visual inputs
@torch.no_grad()
@pytest.mark.parametrize("size", [56, 28, (252, 140)], ids=["56", "28", "252x140"])
def test_small_and_ragged_images(sdpa, size):
    """56 px = 4 LLM tokens (28 px is resized up to it); 252x140 has ragged 8x8-patch windows."""
    model = sdpa.model
    batch = inputs(sdpa, Sample("Look: <image> what is there?", [synthetic_image(size, seed=5)]))
    (n_tokens,) = frame_sizes(batch["image_grid_thw"])
    reference = unpatched_logits(model, batch)
    unmerged, _ = model.model.get_rope_index(
        batch["input_ids"], batch["mm_token_type_ids"], image_grid_thw=batch["image_grid_thw"]
    )
    illava.apply(model, Schedule.vanilla())
    torch.testing.assert_close(model(**batch).logits, reference, rtol=0, atol=1e-5)

    schedule = default(8 / 9, sdpa)
    plan = schedule.plan(n_tokens)
    illava.apply(model, schedule)
    logits = model(**batch).logits
    stats = illava.last_stats(model)
    assert torch.isfinite(logits).all()
    assert plan.kept >= 1 and plan.encoder_removed + plan.llm_removed > 0
    assert [units for (units,) in stats.encoder_units] == [
        plan.encoder_tokens_at(b)[0] for b in range(model.config.vision_config.depth)
    ]
    assert [int(n) for (n,) in stats.llm_image_tokens] == [
        plan.llm_tokens_at(layer) for layer in range(model.config.text_config.num_hidden_layers)
    ]
    kept = stats.kept_units[0]
    assert kept.numel() == plan.after_encoder and torch.equal(kept, torch.unique(kept)) and int(kept.max()) < n_tokens
    is_image = batch["input_ids"][0] == model.config.image_token_id
    assert torch.equal(stats.image_positions[0], unmerged[:, 0, is_image][:, kept])


VISUAL = {
    "odd_frames": Sample("<video> What moves?", videos=[synthetic_video(3, 56, seed=6)]),
    "two_videos": Sample(
        "<video> and <video>: same?", videos=[synthetic_video(3, 56, seed=6), synthetic_video(2, (84, 56), seed=7)]
    ),
    "image_and_video": Sample("<video> then <image>?", [WIDE], videos=[synthetic_video(4, 56, seed=8)]),
}


@torch.no_grad()
@pytest.mark.parametrize("name", VISUAL)
def test_videos_and_mixed_modalities(sdpa, name):
    model = sdpa.model
    batch = inputs(sdpa, VISUAL[name])
    reference = unpatched_logits(model, batch)
    illava.apply(model, Schedule.vanilla())
    torch.testing.assert_close(model(**batch).logits, reference, rtol=0, atol=1e-5)

    schedule = default(7 / 9, sdpa)
    illava.apply(model, schedule)
    logits = model(**batch).logits
    stats = illava.last_stats(model)
    assert torch.isfinite(logits).all()
    grids = [g for key in ("image_grid_thw", "video_grid_thw") if key in batch for g in batch[key]]
    assert [k.numel() for k in stats.kept_units] == [
        sum(schedule.plan(n).after_encoder for n in frame_sizes(grid[None])) for grid in grids
    ]
    frames = frame_sizes(torch.stack(grids))
    assert int(stats.llm_image_tokens[-1][0]) == sum(schedule.plan(n).kept for n in frames)
    # Merged decoding still agrees with a recompute.
    tokens = torch.tensor([[57]])
    cache = model(**batch, use_cache=True).cache
    step = model(input_ids=tokens, cache=cache).logits[:, -1]
    torch.testing.assert_close(step, model(**appended(batch, tokens)).logits[:, -1], rtol=0, atol=1e-4)


# ------------------------------------------------------------------------------------ random baseline
@torch.no_grad()
def test_random_method_is_deterministic(sdpa):
    model = sdpa.model
    batch = inputs(sdpa, Sample("<image> and <image>?", [SMALL, WIDE]))

    def run(seed):
        illava.apply(model, default(7 / 9, sdpa, method="random", seed=seed))
        logits = model(**batch).logits
        return [k.clone() for k in illava.last_stats(model).kept_units], logits

    (kept_a, logits_a), (kept_b, logits_b), (kept_c, _) = run(0), run(0), run(1)
    assert all(torch.equal(a, b) for a, b in zip(kept_a, kept_b))
    assert torch.equal(logits_a, logits_b)
    assert not all(torch.equal(a, c) for a, c in zip(kept_a, kept_c))


@torch.no_grad()
def test_random_method_does_not_depend_on_the_rest_of_the_batch(sdpa):
    model = sdpa.model
    illava.apply(model, default(7 / 9, sdpa, method="random"))
    sample = Sample("<image> other", [WIDE])
    model(**inputs(sdpa, sample))
    alone = illava.last_stats(model).kept_units[0]
    model(**inputs(sdpa, Sample("<image> What?", [SMALL]), sample))
    assert torch.equal(illava.last_stats(model).kept_units[1], alone)


# ------------------------------------------------------------------------------------ weights
@torch.no_grad()
def test_apply_leaves_the_state_dict_and_saved_checkpoint_unchanged(sdpa, tmp_path):
    model = sdpa.model
    before = {key: value.clone() for key, value in model.state_dict().items()}
    illava.apply(model, default(7 / 9, sdpa))
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[key], value) for key, value in before.items())
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    loaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="sdpa")
    assert not illava.is_applied(loaded)
    assert all(torch.equal(value, before[key]) for key, value in loaded.state_dict().items())
    assert illava.is_applied(model)


# ------------------------------------------------------------------------------------ silently ignored inputs
@torch.no_grad()
def test_output_hidden_states_is_honoured_or_refused(sdpa):
    model = sdpa.model
    batch = inputs(sdpa, Sample("<image> What?", [SMALL]))
    reference = model(**batch, output_hidden_states=True).hidden_states
    assert len(reference) == model.config.text_config.num_hidden_layers + 1
    illava.apply(model, Schedule.vanilla())
    try:
        out = model(**batch, output_hidden_states=True)
    except (ValueError, NotImplementedError) as error:
        assert "hidden" in str(error)
    else:
        assert out.hidden_states is not None and len(out.hidden_states) == len(reference)


@torch.no_grad()
def test_new_image_in_a_cached_continuation_is_not_ignored(sdpa):
    model = sdpa.model
    first = inputs(sdpa, Sample("<image> What?", [SMALL]), chat=False)
    both = inputs(sdpa, Sample("<image> What?<image> and this?", [SMALL, TINY]), chat=False)
    n = first["input_ids"].shape[1]
    assert torch.equal(both["input_ids"][:, :n], first["input_ids"])
    illava.apply(model, Schedule.vanilla())
    continued = []
    for with_pixels in (True, False):
        cache = model(**first, use_cache=True).cache
        extra = (
            dict(pixel_values=both["pixel_values"][first["pixel_values"].shape[0] :],
                 image_grid_thw=both["image_grid_thw"][1:])
            if with_pixels else {}
        )  # fmt: skip
        try:
            continued.append(model(input_ids=both["input_ids"][:, n:], cache=cache, **extra).logits)
        except (ValueError, NotImplementedError):
            return  # refusing loudly is acceptable
    assert not torch.equal(continued[0], continued[1])


@torch.no_grad()
def test_labels_are_refused_clearly_through_the_outer_model(sdpa):
    model = sdpa.model
    batch = inputs(sdpa, Sample("<image> What?", [SMALL]))
    illava.apply(model, default(7 / 9, sdpa))
    with pytest.raises(ValueError, match="labels are not supported"):
        model(**batch, labels=batch["input_ids"])


@torch.no_grad()
def test_a_static_cache_is_refused_clearly(sdpa):
    model = sdpa.model
    batch = inputs(sdpa, Sample("<image> What?", [SMALL]))
    illava.apply(model, default(7 / 9, sdpa))
    with pytest.raises(NotImplementedError, match="StaticCache is not supported on a merged model"):
        model.generate(**batch, max_new_tokens=2, do_sample=False, cache_implementation="static")


class _ForceToken:
    """A logits processor that makes `token` the greedy choice at generated step `step`."""

    def __init__(self, token: int, step: int, prompt_length: int):
        self.token, self.step, self.prompt_length = token, step, prompt_length

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] - self.prompt_length == self.step:
            scores = scores.clone()
            scores[:, self.token] = scores.max() + 10
        return scores


@torch.no_grad()
def test_a_generated_placeholder_token_is_decoded_like_the_unpatched_model(sdpa):
    """Found on the GPU: a model that generates the image placeholder id (random weights do) must
    not stop `generate`; without pixels it is an ordinary token, as in the unpatched model."""
    from transformers import LogitsProcessorList

    model = sdpa.model
    batch = inputs(sdpa, Sample("<image> What?", [SMALL]))
    force = LogitsProcessorList([_ForceToken(model.config.image_token_id, 1, batch["input_ids"].shape[1])])
    kwargs = dict(max_new_tokens=4, min_new_tokens=4, logits_processor=force, **GREEDY)
    reference = model.generate(**batch, **kwargs)
    assert reference.sequences[0, batch["input_ids"].shape[1] + 1] == model.config.image_token_id
    illava.apply(model, Schedule.vanilla())
    same = model.generate(**batch, **kwargs)
    assert torch.equal(same.sequences, reference.sequences)
    for a, b in zip(same.scores, reference.scores):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    illava.apply(model, default(7 / 9, sdpa))
    merged = model.generate(**batch, **kwargs)
    assert merged.sequences.shape == reference.sequences.shape
