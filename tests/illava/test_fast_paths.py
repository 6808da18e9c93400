"""The fast paths against their references: the packed attention against SDPA, the merge batched over
segments against the per-segment one, and a merged forward's host reads against the unmerged one's,
on every family (CPU: the counts are what predict GPU speed here)."""

from __future__ import annotations

import pytest
import torch

import illava
from illava import Schedule
from illava.backbones import load_backbone
from illava.inputs import Sample, build_inputs, synthetic_image, synthetic_video
from illava.merge import SegmentBatch, attention_importance, batched_importance, batched_merge, merge_plan
from profiler.counts import count_call

FAMILIES = ["tiny", "tiny-qwen2-vl", "tiny-qwen3-vl", "tiny-llava-onevision"]
PACKED = "illava_packed"


def prompts(backbone):
    side = max(backbone.adapter.size_multiple(backbone.model.config), 28)
    return {
        "images": [
            Sample("<image> What?", [synthetic_image(16 * side, 1)]),  # 896-class: many windows on Qwen2.5-VL
            Sample("A longer question about <image> here.", [synthetic_image((6 * side, 4 * side), 2)]),
        ],
        "video": [Sample("<video> What moves?", videos=[synthetic_video(4, 4 * side, seed=3)])],
    }


def schedule_for(backbone, kind: str) -> Schedule:
    share = {} if kind != "video" or backbone.adapter.encoder_merges_video else {"encoder_share": 0.0}
    return illava.paper_default_for(backbone.model, 7 / 9, **share)


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request):
    """The same seeded model twice: with sdpa and with the packed attention."""
    return load_backbone(request.param, attn_implementation="sdpa"), load_backbone(
        request.param, attn_implementation=PACKED
    )


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_attention_equals_sdpa_unmerged_and_merged(pair, dtype):
    sdpa, packed = pair
    sdpa.model.to(dtype)
    packed.model.to(dtype)
    tolerance = 1e-5 if dtype == torch.float32 else 5e-2
    try:
        for kind, samples in prompts(sdpa).items():
            batch = build_inputs(sdpa, samples)
            valid = batch["attention_mask"].bool()
            reference = sdpa.model(**batch).logits  # the library's own loop
            illava.apply(packed.model, Schedule.vanilla())  # the engine, one attention call per block
            unmerged = packed.model(**batch).logits
            assert (unmerged[valid].float() - reference[valid].float()).abs().max() <= tolerance, kind
            schedule = schedule_for(sdpa, kind)
            illava.apply(sdpa.model, schedule)
            illava.apply(packed.model, schedule)
            merged_sdpa, merged_packed = sdpa.model(**batch).logits.float(), packed.model(**batch).logits.float()
            bound = tolerance
            if dtype == torch.bfloat16:  # a merge in bf16 can flip which tokens are kept: bound it by bf16's
                # own effect on the sdpa model (its fp32 run), not by a fixed tolerance
                sdpa.model.float()
                rounding = (sdpa.model(**batch).logits.float() - merged_sdpa).abs().max()
                sdpa.model.to(dtype)
                bound = max(tolerance, 2 * float(rounding))
            assert (merged_sdpa - merged_packed).abs().max() <= bound, kind
            illava.remove(sdpa.model)
            illava.remove(packed.model)
    finally:
        sdpa.model.float()
        packed.model.float()


@torch.no_grad()
def test_packed_attention_makes_one_call_per_block_and_merging_adds_none(pair):
    _, packed = pair
    model = packed.model
    batch = build_inputs(packed, prompts(packed)["images"])

    def forward():
        model(**batch, logits_to_keep=1)

    illava.apply(model, Schedule.vanilla())
    forward()
    unmerged = count_call(forward)
    encoder_depth, llm_depth = illava.depths(model)
    blocks = len(packed.adapter.vision_blocks(packed.adapter.inner_model(model)))
    assert unmerged.attention_calls == blocks + llm_depth
    illava.apply(model, illava.paper_default_for(model, 7 / 9))
    forward()
    merged = count_call(forward)
    if packed.adapter.packed_sequence:  # importance comes from the block's own (packed) call
        assert merged.attention_calls == unmerged.attention_calls
    assert merged.host_reads <= unmerged.host_reads, (merged.reads, unmerged.reads)
    illava.remove(model)


@torch.no_grad()
def test_the_unmerged_reference_under_packed_attention_is_the_engine_removing_nothing(pair):
    """What the profiler and the demo compare merged runs with: one call per block there too."""
    sdpa, packed = pair
    illava.apply_reference(sdpa.model)
    assert not illava.is_applied(sdpa.model)  # sdpa: the untouched library model
    illava.apply_reference(packed.model)
    assert illava.is_applied(packed.model) and illava._state(packed.model).schedule.removes_nothing
    batch = build_inputs(packed, prompts(packed)["images"])
    calls = count_call(lambda: packed.model(**batch, logits_to_keep=1)).attention_calls
    blocks = len(packed.adapter.vision_blocks(packed.adapter.inner_model(packed.model)))
    assert calls == blocks + illava.depths(packed.model)[1]
    illava.remove(packed.model)


@torch.no_grad()
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_a_merged_forward_reads_no_more_than_the_unmerged_library(attn):
    """With the library's own attention implementations, against the unpatched model."""
    for name in FAMILIES:
        backbone = load_backbone(name, attn_implementation=attn)
        model = backbone.model
        for kind, samples in prompts(backbone).items():
            batch = build_inputs(backbone, samples)

            def forward(model=model, batch=batch):
                model(**batch, logits_to_keep=1)

            forward()
            unmerged = count_call(forward)
            illava.apply(model, schedule_for(backbone, kind))
            forward()
            merged = count_call(forward)
            illava.remove(model)
            assert merged.host_reads <= unmerged.host_reads, (name, kind, merged.reads, unmerged.reads)


# ----------------------------------------------------------------------------------- batched merge
@pytest.mark.parametrize("unit", [1, 4])
@pytest.mark.parametrize("causal", [False, True])
def test_the_batched_merge_equals_the_per_segment_one(unit, causal):
    """Ragged segments, some not merging, different recycled counts: the same kept units and the same
    merged values as `merge_plan` segment by segment."""
    torch.manual_seed(0)
    units, kept, recycled = [9, 14, 5, 11], [4, 14, 2, 6], [1, 0, 1, 2]
    starts = [sum(units[:i]) for i in range(len(units))]
    heads, dim, channels = 3, 8, 5
    tokens = sum(units) * unit
    query, key = torch.randn(heads, tokens, dim), torch.randn(heads, tokens, dim)
    hidden = torch.randn(tokens, channels)
    batch = SegmentBatch.of(starts, units, kept, recycled, group_size=3, device="cpu")
    if unit == 1:
        scores = batched_importance(query, key, batch, causal=causal, scale=0.3)
    else:
        flat = torch.rand(sum(units))
        scores = flat[batch.index].masked_fill(batch.padding, float("-inf"))
    merged = batched_merge(scores, query, key, batch, unit=unit, scale=0.3)
    keeps, rows = [], []
    for s, (start, n) in enumerate(zip(starts, units)):
        tokens_s = slice(start * unit, (start + n) * unit)
        seg_scores = scores[s, :n]
        if unit == 1:
            reference = attention_importance(query[:, tokens_s], key[:, tokens_s], causal=causal, scale=0.3)
            torch.testing.assert_close(seg_scores, reference, rtol=1e-5, atol=1e-6)
        one = merge_plan(query[:, tokens_s], key[:, tokens_s], seg_scores, n_units=n, n_keep=kept[s],
                         n_recycle=recycled[s], group_size=3, unit=unit, scale=0.3)  # fmt: skip
        keeps.append(one.keep + start)
        rows.append(one.apply(hidden[tokens_s], unit))
    assert torch.equal(merged.keep, torch.cat(keeps))
    torch.testing.assert_close(merged.apply(hidden, unit), torch.cat(rows), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("lengths", [[16, 16, 16], [9, 0, 16, 5]], ids=["equal", "ragged"])
def test_the_explicit_attention_in_chunks_equals_sdpa_and_the_importance(lengths, monkeypatch):
    """The path a merging block takes under illava_packed: output equal to SDPA per segment, the
    importance equal to the reference column means, whether it runs at once or in chunks."""
    from illava.engine import attention

    torch.manual_seed(0)
    heads, dim, n = 2, 8, sum(lengths)
    query, key, value = (torch.randn(1, heads, n, dim) for _ in range(3))
    bounds = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    expected_out = torch.zeros(n, heads, dim)
    expected_importance = torch.zeros(n)
    for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        if b > a:
            q, k, v = (t[0, :, a:b] for t in (query, key, value))
            expected_out[a:b] = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(0, 1)
            expected_importance[a:b] = attention_importance(q, k)
    for budget in (2**30, 3 * heads * 16 * 4, 1):  # at once, by query rows, one row at a time
        monkeypatch.setitem(attention.EXPLICIT_BUDGET_BYTES, "cpu", budget)
        out, importance = attention._explicit(query, key, value, bounds, lengths, max(lengths), None)
        torch.testing.assert_close(out[0], expected_out, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(importance, expected_importance, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_equal_windows_of_an_unmerged_block_take_the_batched_call_not_the_padded_one(monkeypatch):
    """The engine hands the packed kernel its host-known bounds also while it routes a block there
    (the module's config then names the routed kernel): equal windows are one batched call."""
    import illava.engine.attention as attention

    packed = load_backbone("tiny", attn_implementation=PACKED)
    sample = Sample("<image> What?", [synthetic_image(8 * 28, 1)])  # 8x8 groups: four equal windows
    batch = build_inputs(packed, [sample])
    illava.apply_reference(packed.model)
    padded, real = [], attention._padded

    def counted(*args, **kwargs):
        padded.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(attention, "_padded", counted)
    packed.model(**batch, logits_to_keep=1)
    illava.remove(packed.model)
    assert padded == []
    wide = build_inputs(packed, [Sample("<image> What?", [synthetic_image((6 * 28, 4 * 28), 2)])])
    illava.apply(packed.model, illava.paper_default_for(packed.model, 7 / 9))
    packed.model(**wide, logits_to_keep=1)  # merged windows are ragged: the padded call serves them
    illava.remove(packed.model)
    assert padded


@torch.no_grad()
def test_merging_blocks_get_their_bounds_and_ragged_windows_are_laid_out_once_per_merge(monkeypatch):
    """A merging block's captured call hands the packed kernel the block's host-known bounds (so equal
    windows take the batched path there too), and the padded layout of ragged windows is built once per
    merge and reused by every block until the next one, not rebuilt in each block."""
    import illava.engine.attention as attention

    packed = load_backbone("tiny", attn_implementation=PACKED)
    batch = build_inputs(packed, [Sample("<image> What?", [synthetic_image(16 * 28, 1)])])  # 16 windows
    paper = illava.paper_default_for(packed.model, 7 / 9)
    # One encoder merge, in the first block: every windowed block after it sees the same ragged windows.
    schedule = Schedule(reduction=7 / 9, encoder_share=0.4, encoder_layers=(0,), llm_layers=paper.llm_layers)
    inner = packed.adapter.inner_model(packed.model)
    windowed = [
        i for i in range(1, len(packed.adapter.vision_blocks(inner))) if packed.adapter.vision_block_windowed(inner, i)
    ]
    assert len(windowed) >= 2
    explicit, layouts, real_explicit, real_of = [], [], attention._explicit, attention.PaddedLayout.of

    def watched_explicit(*args, **kwargs):
        explicit.append(args[8] if len(args) > 8 else kwargs.get("bounds"))
        return real_explicit(*args, **kwargs)

    def watched_of(*args, **kwargs):
        layouts.append(1)
        return real_of(*args, **kwargs)

    monkeypatch.setattr(attention, "_explicit", watched_explicit)
    monkeypatch.setattr(attention.PaddedLayout, "of", watched_of)
    illava.apply(packed.model, schedule)
    packed.model(**batch, logits_to_keep=1)
    illava.remove(packed.model)
    assert len(explicit) == 1 and explicit[0] is not None
    assert len(layouts) == 1  # built in the first windowed block after the merge, reused by the others


@torch.no_grad()
@pytest.mark.parametrize("method", ["fastv", "pdrop", "divprune", "visionzip", "sparsevlm", "tome"])
def test_every_peer_method_gives_the_same_merged_model_under_packed_attention(pair, method):
    """The peers capture what they need from the block's own call, so the one-call-per-block kernel
    changes nothing about what they keep (fp32, to sdpa's tolerance). A noise image: the synthetic
    pictures' flat regions give identical patches, whose exact ties (VisionZip's and SparseVLM's
    nearest centre) either kernel's last-bit rounding may break either way. (Text-guided iLLaVA, padded
    batches, several images, video and cached decoding under the packed kernel:
    `test_a_peer_selects_and_decodes_the_same_under_every_attention` in test_peer_methods.py; on this
    noise image text-guided iLLaVA meets a near-tie on Qwen2-VL: inputs 7e-8 apart recycle other
    members at its second LLM merge.)"""
    import numpy as np
    from PIL import Image

    sdpa, packed = pair
    schedule = illava.get_method(method).placement(schedule_for(sdpa, "images"))
    side = 8 * max(sdpa.adapter.size_multiple(sdpa.model.config), 28)
    noise = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    batch = build_inputs(sdpa, [Sample("<image> What?", [Image.fromarray(noise)])])
    logits = []
    for backbone in (sdpa, packed):
        illava.apply(backbone.model, schedule)
        logits.append(backbone.model(**batch).logits)
        illava.remove(backbone.model)
    assert (logits[0] - logits[1]).abs().max() <= 1e-5
