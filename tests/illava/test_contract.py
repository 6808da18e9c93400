"""The contract every backbone family keeps, one suite parametrized over all of them (in the style of
Optuna's `testing/pytest_storages.py`): a family added later gets every test by adding its built-in
name to FAMILIES.

Each family is a real transformers model (tiny seeded config) run on the CPU in fp32.
"""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch

import illava
from illava import PAPER_REDUCTIONS, Schedule, ScheduleError
from illava.backbones import load_backbone, save_backbone
from illava.inputs import Sample, build_inputs, synthetic_image, synthetic_video

FAMILIES = ["tiny", "tiny-qwen2-vl", "tiny-qwen3-vl", "tiny-llava-onevision"]
GREEDY = dict(do_sample=False, output_scores=True, return_dict_in_generate=True)


@dataclasses.dataclass
class Family:
    name: str
    sdpa: object
    eager: object

    @functools.cached_property
    def packed(self):
        """The same seeded model under the engine's one-call-per-block attention (built on first use)."""
        return load_backbone(self.name, attn_implementation="illava_packed")

    @property
    def adapter(self):
        return self.sdpa.adapter

    @property
    def unit(self) -> int:
        """Image sides snap to this (28 px for 14-px patches merged 2x2, 32 for 16-px ones)."""
        return max(self.adapter.size_multiple(self.sdpa.model.config), 28)

    def square(self, seed: int):  # 64 LLM tokens on the Qwen families, 5 tiles on LLaVA-OneVision
        return synthetic_image(8 * self.unit, seed)

    def wide(self, seed: int):  # 24 LLM tokens on the Qwen families; letterboxed tiles on LLaVA-OneVision
        return synthetic_image((6 * self.unit, 4 * self.unit), seed)

    def video(self, seed: int, frames: int = 4):
        return synthetic_video(frames, 4 * self.unit, seed=seed)

    def default(self, reduction: float, **overrides) -> Schedule:
        return illava.paper_default_for(self.sdpa.model, reduction, **overrides)

    def video_schedule(self, reduction: float) -> Schedule:
        """The paper's split where the family merges videos in the encoder, else all in the LLM."""
        share = {} if self.adapter.encoder_merges_video else {"encoder_share": 0.0}
        return self.default(reduction, **share)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return Family(
        request.param,
        load_backbone(request.param, attn_implementation="sdpa"),
        load_backbone(request.param, attn_implementation="eager"),
    )


@pytest.fixture(autouse=True)
def _unpatched(request):
    yield
    if "family" in request.fixturenames:
        fam = request.getfixturevalue("family")
        illava.remove(fam.sdpa.model)
        illava.remove(fam.eager.model)
        if "packed" in vars(fam):  # built by a test that used it
            illava.remove(fam.packed.model)


def inputs(backbone, *samples):
    return build_inputs(backbone, list(samples))


def prompts(family):
    """Inputs of every kind the family takes: one image, a padded batch of two, two images in one
    prompt, a video, text only."""
    return {
        "image": [Sample("<image> What is in the picture?", [family.square(1)])],
        "padded": [
            Sample("<image> Short?", [family.wide(2)]),
            Sample("A longer question about <image> and every shape in it, please.", [family.square(3)]),
        ],
        "two_images": [Sample("<image> and <image>: which is brighter?", [family.square(4), family.wide(5)])],
        "video": [Sample("<video> What moves?", videos=[family.video(6)])],
        "text": [Sample("Tell me about shapes."), Sample("Hi")],
    }


def layouts(backbone, batch) -> list:
    """The host-side layout of every image and video of `batch` (images first), from the adapter."""
    inner = backbone.adapter.inner_model(backbone.model)
    found = []
    for modality in ("image", "video"):
        call = backbone.adapter.visual_call(inner, modality, dict(batch))
        found += call.items if call is not None else []
    return found


def segment_plans(backbone, batch, schedule: Schedule) -> list:
    """The plan of every image segment of `batch` (images, then videos)."""
    return [schedule.plan(size) for layout in layouts(backbone, batch) for size in layout.segment_sizes]


# ----------------------------------------------------------------------------------- zero reduction
@torch.no_grad()
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_zero_reduction_equals_the_unpatched_model(family, attn):
    backbone = getattr(family, attn)
    model = backbone.model
    for name, samples in prompts(family).items():
        batch = inputs(backbone, *samples)
        reference = model(**batch).logits
        illava.apply(model, Schedule.vanilla())
        merged = model(**batch).logits
        illava.remove(model)
        valid = batch["attention_mask"].bool()
        assert torch.equal(merged[valid], reference[valid]), f"{family.name}/{attn}: {name}"


# ----------------------------------------------------------------------------------- counts
@torch.no_grad()
@pytest.mark.parametrize("reduction", PAPER_REDUCTIONS)
def test_token_counts_follow_the_plan(family, reduction):
    model = family.sdpa.model
    schedule = family.default(reduction)
    batch = inputs(family.sdpa, Sample("<image> What colour is the circle?", [family.square(1)]))
    plans = segment_plans(family.sdpa, batch, schedule)
    illava.apply(model, schedule)
    model(**batch)
    stats = illava.last_stats(model)
    encoder_depth, llm_depth = illava.depths(model)
    assert stats.encoder_units == [[plan.encoder_tokens_at(b)[0] for plan in plans] for b in range(encoder_depth)]
    assert [int(n) for (n,) in stats.llm_image_tokens] == [
        sum(plan.llm_tokens_at(layer) for plan in plans) for layer in range(llm_depth)
    ]
    structural = sum(layout.placeholders - sum(layout.segment_sizes) for layout in layouts(family.sdpa, batch))
    assert sum(kept.numel() for kept in stats.kept_units) == sum(plan.after_encoder for plan in plans) + structural
    # The paper's identity on the counts the model actually ran with.
    assert int(stats.llm_image_tokens[-1]) == sum(plan.kept for plan in plans)
    assert all(plan.kept == plan.n_tokens - plan.encoder_removed - plan.llm_removed for plan in plans)
    assert any(plan.encoder_removed for plan in plans) and any(plan.llm_removed for plan in plans)


# ----------------------------------------------------------------------------------- batches, caches
@torch.no_grad()
def test_batch_of_two_with_padding_equals_each_sample_alone(family):
    model = family.sdpa.model
    samples = prompts(family)["padded"]
    illava.apply(model, family.default(7 / 9))
    together = model.generate(**inputs(family.sdpa, *samples), max_new_tokens=5, **GREEDY)
    for row, sample in enumerate(samples):
        alone = model.generate(**inputs(family.sdpa, sample), max_new_tokens=5, **GREEDY)
        assert torch.equal(together.sequences[row, -5:], alone.sequences[0, -5:])
        for a, b in zip(together.scores, alone.scores, strict=True):
            torch.testing.assert_close(a[row], b[0], rtol=0, atol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_cached_generate_equals_a_cache_free_reference(family, attn):
    backbone = getattr(family, attn)
    model = backbone.model
    illava.apply(model, family.default(7 / 9))
    for name in ("image", "padded"):
        batch = inputs(backbone, *prompts(family)[name])
        cached = model.generate(**batch, max_new_tokens=6, **GREEDY)
        recomputed = model.generate(**batch, use_cache=False, max_new_tokens=6, **GREEDY)
        assert torch.equal(cached.sequences, recomputed.sequences), name
        for a, b in zip(cached.scores, recomputed.scores, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("reduction", [0.0, 7 / 9])
def test_generate_expands_merged_images_for_several_sequences(family, reduction):
    """num_return_sequences and beams repeat each sample's images with it (generate's batch expansion)."""
    model = family.sdpa.model
    batch = inputs(family.sdpa, *prompts(family)["two_images"])
    illava.apply(model, family.default(reduction))
    kwargs = dict(max_new_tokens=1, output_logits=True, return_dict_in_generate=True)
    single = model.generate(**batch, do_sample=False, **kwargs).logits[0]
    torch.manual_seed(0)
    expanded = model.generate(**batch, do_sample=True, num_return_sequences=2, **kwargs).logits[0]
    torch.testing.assert_close(expanded, single.expand(2, -1), rtol=0, atol=1e-5)
    beams = model.generate(**batch, max_new_tokens=3, num_beams=2, num_return_sequences=2, do_sample=False)
    assert beams.shape[0] == 2


# ----------------------------------------------------------------------------------- in the deployment's runtime
#: (dtype, attention, absolute tolerance on logits): the equivalences above, where users deploy.
RUNTIMES = {
    "fp32-packed": (torch.float32, "illava_packed", 1e-5),
    "bf16-sdpa": (torch.bfloat16, "sdpa", 2e-2),
    "bf16-packed": (torch.bfloat16, "illava_packed", 2e-2),
}


@dataclasses.dataclass
class InRuntime:
    reference: object  # the unpatched model with sdpa, in the runtime's dtype
    backbone: object  # the model in the runtime's dtype and attention
    atol: float
    family: Family


@pytest.fixture(scope="module", params=list(RUNTIMES))
def runtime(request, family):
    dtype, attn, atol = RUNTIMES[request.param]
    backbone = load_backbone(family.name, attn_implementation=attn, dtype=dtype)
    reference = load_backbone(family.name, attn_implementation="sdpa", dtype=dtype)
    # On a CPU with AMX (Intel Xeon), oneDNN's bf16 matmuls round differently for a batch of two than
    # for one prompt, enough to flip a near-tie in a merge's importance (a third LLM merge keeping
    # token 7 alone and 8 in the batch: a 0.09 logit gap). That is the kernel's choice, not the
    # engine's batching, which these tests hold; with oneDNN off the two round alike here.
    mkldnn = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = mkldnn and dtype != torch.bfloat16
    try:
        yield InRuntime(reference, backbone, atol, Family(family.name, backbone, backbone))
    finally:
        torch.backends.mkldnn.enabled = mkldnn
        illava.remove(backbone.model)


def assert_same_greedy(a, b, atol: float, rows_a=None, rows_b=None) -> None:
    """Two greedy generations agree: scores within `atol` at every step, tokens equal -- except
    that a row may take another token where its two candidates score within `atol` of each other
    (a tie low precision may break either way); that row is not compared after it."""
    rows_a = list(range(a.sequences.shape[0])) if rows_a is None else rows_a
    rows_b = list(range(b.sequences.shape[0])) if rows_b is None else rows_b
    steps = len(a.scores)
    for ra, rb in zip(rows_a, rows_b, strict=True):
        for step in range(steps):
            sa, sb = a.scores[step][ra].float(), b.scores[step][rb].float()
            torch.testing.assert_close(sa, sb, rtol=0, atol=atol)
            ta, tb = int(a.sequences[ra, step - steps]), int(b.sequences[rb, step - steps])
            if ta != tb:
                assert abs(float(sa[ta] - sa[tb])) <= atol, f"row {ra} step {step}: {ta} vs {tb} is not a tie"
                break


@torch.no_grad()
def test_zero_reduction_equals_the_unpatched_model_in_every_runtime(runtime):
    """The engine removing nothing, in this dtype and attention, against the library's sdpa model."""
    model = runtime.backbone.model
    for name, samples in prompts(runtime.family).items():
        batch = inputs(runtime.backbone, *samples)
        reference = runtime.reference.model(**batch).logits.float()
        illava.apply(model, Schedule.vanilla())
        merged = model(**batch).logits.float()
        valid = batch["attention_mask"].bool()
        torch.testing.assert_close(merged[valid], reference[valid], rtol=0, atol=runtime.atol, msg=name)


@torch.no_grad()
def test_batch_equals_single_in_every_runtime(runtime):
    model = runtime.backbone.model
    samples = prompts(runtime.family)["padded"]
    illava.apply(model, runtime.family.default(7 / 9))
    together = model.generate(**inputs(runtime.backbone, *samples), max_new_tokens=5, **GREEDY)
    for row, sample in enumerate(samples):
        alone = model.generate(**inputs(runtime.backbone, sample), max_new_tokens=5, **GREEDY)
        assert_same_greedy(together, alone, runtime.atol, [row], [0])


@torch.no_grad()
def test_cached_equals_recomputed_in_every_runtime(runtime):
    model = runtime.backbone.model
    illava.apply(model, runtime.family.default(7 / 9))
    for name in ("image", "padded"):
        batch = inputs(runtime.backbone, *prompts(runtime.family)[name])
        cached = model.generate(**batch, max_new_tokens=6, **GREEDY)
        recomputed = model.generate(**batch, use_cache=False, max_new_tokens=6, **GREEDY)
        assert_same_greedy(cached, recomputed, runtime.atol)


# ----------------------------------------------------------------------------------- images and videos
@torch.no_grad()
def assert_images_merge_independently(family, schedule) -> None:
    """What the first image keeps before the LLM does not depend on the second image of the prompt."""
    model = family.sdpa.model
    illava.apply(model, schedule)

    def kept(second):
        model(**inputs(family.sdpa, Sample("<image> and <image>: which?", [family.square(4), second])))
        return illava.last_stats(model).kept_units

    first, other = kept(family.wide(5)), kept(family.wide(6))
    assert torch.equal(first[0], other[0]), "changing the second image changes nothing about the first"


def test_two_images_merge_independently(family):
    assert_images_merge_independently(family, family.default(7 / 9))


@torch.no_grad()
def test_video_frames_are_segments_and_merge(family):
    model = family.sdpa.model
    schedule = family.video_schedule(7 / 9)
    batch = inputs(family.sdpa, *prompts(family)["video"])
    plans = segment_plans(family.sdpa, batch, schedule)
    assert len(plans) >= 2, "a video has one segment per frame (temporal patch)"
    illava.apply(model, schedule)
    logits = model(**batch).logits
    assert torch.isfinite(logits).all()
    stats = illava.last_stats(model)
    _, llm_depth = illava.depths(model)
    assert [int(n) for (n,) in stats.llm_image_tokens] == [
        sum(plan.llm_tokens_at(layer) for plan in plans) for layer in range(llm_depth)
    ]
    cached = model.generate(**batch, max_new_tokens=4, **GREEDY)
    recomputed = model.generate(**batch, use_cache=False, max_new_tokens=4, **GREEDY)
    assert torch.equal(cached.sequences, recomputed.sequences)


def test_a_family_that_cannot_merge_videos_in_the_encoder_says_so(family):
    if family.adapter.encoder_merges_video:
        pytest.skip(f"{family.name} merges videos in its encoder")
    model = family.sdpa.model
    illava.apply(model, family.default(7 / 9))
    with pytest.raises(ScheduleError, match="encoder_share=0"):
        model(**inputs(family.sdpa, *prompts(family)["video"]))


# ----------------------------------------------------------------------------------- apply / remove
@torch.no_grad()
def test_remove_restores_and_apply_twice_is_safe(family):
    model = family.sdpa.model
    batch = inputs(family.sdpa, *prompts(family)["image"])
    reference = model(**batch).logits
    classes = (type(model), type(family.adapter.inner_model(model)))
    illava.apply(model, family.default(2 / 3))
    first = model(**batch).logits
    illava.apply(model, family.default(2 / 3))  # twice: the same, not patched on top of itself
    assert type(family.adapter.inner_model(model)).__mro__[1] is classes[1]
    assert torch.equal(model(**batch).logits, first)
    assert first.shape[1] < reference.shape[1]
    illava.remove(model)
    illava.remove(model)  # a no-op on an unpatched model
    assert (type(model), type(family.adapter.inner_model(model))) == classes
    assert not illava.is_applied(model)
    assert torch.equal(model(**batch).logits, reference)


def test_a_schedule_that_does_not_fit_names_the_field_and_the_range(family):
    model = family.sdpa.model
    encoder_depth, llm_depth = illava.depths(model)
    with pytest.raises(
        ScheduleError, match=rf"encoder layer\(s\) \[{encoder_depth}\] out of range.*0..{encoder_depth - 1}"
    ):
        illava.apply(model, family.default(7 / 9).with_(encoder_layers=(0, encoder_depth)))
    with pytest.raises(
        ScheduleError, match=rf"LLM layer\(s\) \[{llm_depth - 1}\] out of range.*allows 0..{llm_depth - 2}"
    ):
        illava.apply(model, family.default(7 / 9).with_(llm_layers=(llm_depth - 1,)))
    assert not illava.is_applied(model)


# ----------------------------------------------------------------------------------- methods and checkpoints
@torch.no_grad()
def test_every_method_runs_and_keeps_the_same_counts(family):
    model = family.sdpa.model
    batch = inputs(family.sdpa, *prompts(family)["image"])
    counts = {}
    for method in illava.method_names():
        try:
            schedule = family.default(7 / 9).with_(method=method)
        except ScheduleError:  # a method acting at other stages (fastv, divprune): test_peer_methods.py
            continue
        illava.apply(model, schedule)
        assert torch.isfinite(model(**batch).logits).all()
        counts[method] = [int(n) for (n,) in illava.last_stats(model).llm_image_tokens]
    assert {"illava", "prune", "random"} <= set(counts)
    assert len({tuple(c) for c in counts.values()}) == 1, counts


@torch.no_grad()
def test_a_saved_checkpoint_loads_by_its_model_type(family, tmp_path):
    save_backbone(family.sdpa, tmp_path / family.name)
    loaded = load_backbone(str(tmp_path / family.name))
    assert type(loaded.adapter) is type(family.adapter)
    batch = inputs(family.sdpa, *prompts(family)["image"])
    assert torch.equal(
        loaded.model(**inputs(loaded, *prompts(family)["image"])).logits, family.sdpa.model(**batch).logits
    )
    illava.apply(loaded.model, family.default(7 / 9))
    assert torch.isfinite(loaded.model(**batch).logits).all()
