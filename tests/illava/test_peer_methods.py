"""The peer methods (FastV, PyramidDrop, DivPrune, VisionZip, SparseVLM, ToMe, text-guided iLLaVA): their rules on hand-made tensors, and the
engine's contract for each of them on every family (counts follow the plan, a padded batch of two
equals each sample alone, cached generation equals a cache-free one, every attention implementation
selects the same, and the same holds in bf16)."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch

import illava
from illava import ScheduleError
from illava.merge import SegmentBatch, last_token_attention, prompt_attention
from illava.methods import PromptView, StageRequest, get_method
from illava.methods.base import SegmentSpec
from illava.methods.divprune import max_min_diverse
from illava.methods.sparsevlm import density_peaks
from tests.illava.test_contract import (
    GREEDY,
    assert_images_merge_independently,
    assert_same_greedy,
    inputs,
    prompts,
    segment_plans,
)
from tests.illava.test_contract import _unpatched as _unpatched  # noqa: F401  (models unpatched after each test)
from tests.illava.test_contract import family as family  # noqa: F401  (the per-family fixture)
from tests.illava.test_contract import runtime as runtime  # noqa: F401  (a family in a deployment's dtype and attention)

#: The peers, and iLLaVA's text-guided variant ("illava+text": `text_guided=True`).
PEERS = ["fastv", "pdrop", "divprune", "visionzip", "sparsevlm", "tome", "illava+text"]
PACKED = "illava_packed"
#: The runtimes of `tests.illava.test_contract.RUNTIMES` in bf16 (fp32 packed: the tests above). bf16 is
#: slow on a CPU: the generation tests run the engine's own kernel by default, sdpa with ``-m slow``.
BF16 = ["bf16-sdpa", "bf16-packed"]
BF16_GENERATE = ["bf16-packed", pytest.param("bf16-sdpa", marks=pytest.mark.slow)]
#: Those whose selection depends on the last prompt token (a new one at every cache-free step).
BY_LAST_TOKEN = {"fastv", "pdrop", "sparsevlm", "illava+text"}


def peer_schedule(family, method: str, reduction: float = 7 / 9) -> illava.Schedule:
    """The paper-default placement moved onto the stages the method acts at."""
    if method == "illava+text":
        return family.default(reduction).with_(text_guided=True)
    return get_method(method).placement(family.default(reduction))


# ----------------------------------------------------------------------------------- rules on tensors
def test_last_token_attention_is_the_softmax_row_of_the_last_valid_token():
    torch.manual_seed(0)
    query, key = torch.randn(2, 4, 7, 8), torch.randn(2, 2, 7, 8)  # 4 query heads on 2 key heads (GQA)
    valid = torch.ones(2, 7, dtype=torch.bool)
    valid[1, :3] = False  # left padding
    got = last_token_attention(query, key, valid, None)
    for b in range(2):
        keys = key[b].repeat_interleave(2, dim=0)[:, valid[b]]  # (H, n, D)
        row = (query[b, :, -1:] @ keys.transpose(1, 2) / 8**0.5).softmax(-1).mean(0)[0]
        torch.testing.assert_close(got[b, valid[b]], row)
        assert torch.all(got[b, ~valid[b]] == 0)


def test_fastv_keeps_the_image_tokens_the_last_token_attends_to_most():
    scores = torch.tensor([0.1, 0.5, 0.05, 0.3, 0.2, 0.9, 0.0, 0.4])  # two segments of four units
    request = StageRequest(stage="llm", layer=1, hidden=torch.randn(8, 4), query=None, key=None,
                           segments=[SegmentSpec(0, 4, 2, 0, 0), SegmentSpec(4, 4, 1, 0, 0)],
                           causal=True, text_importance=scores)  # fmt: skip
    merge_map = get_method("fastv").merge(get_method("fastv").parse_params(None), request)
    assert merge_map.keep.tolist() == [1, 3, 5]  # per segment its top units, in order; nothing recycled
    assert not merge_map.recycles


def test_pyramid_drop_keeps_the_same_fraction_at_every_stage():
    split = get_method("pdrop").llm_split(get_method("pdrop").parse_params(None), 64, 48, 2)
    assert split == [32, 16]  # 64 -> 32 -> 16: each stage keeps half
    for tokens, removed, layers in [(64, 49, 3), (100, 1, 4), (7, 6, 3), (50, 0, 2)]:
        parts = get_method("pdrop").llm_split(None, tokens, removed, layers)
        assert sum(parts) == removed and all(p >= 0 for p in parts) and len(parts) == layers


def _greedy_reference(x: torch.Tensor, k: int) -> list[int]:
    """The greedy max-min rule, written plainly for one segment."""
    x = torch.nn.functional.normalize(x, dim=-1)
    d = (1 - x @ x.T).clamp_min(0)
    n = len(x)
    if n == 1:
        return [0]
    first = max(range(n), key=lambda i: (min(d[i, j] for j in range(n) if j != i), -i))
    chosen = [first]
    while len(chosen) < k:
        rest = [i for i in range(n) if i not in chosen]
        chosen.append(max(rest, key=lambda i: (min(d[i, j] for j in chosen), -i)))
    return sorted(chosen)


def _spread(distance: torch.Tensor, subset) -> float:
    return min(float(distance[i, j]) for i, j in itertools.combinations(subset, 2))


def test_divprune_is_the_greedy_max_min_subset_per_segment_and_near_the_optimum():
    torch.manual_seed(1)
    sizes, kept = [6, 5, 7], [3, 2, 4]
    features = torch.randn(sum(sizes), 5)
    starts = [0, 6, 11]
    batch = SegmentBatch.of(starts, sizes, kept, [0, 0, 0], 1, "cpu")
    chosen = max_min_diverse(features, batch)
    for s, (start, n, k) in enumerate(zip(starts, sizes, kept)):
        got = batch.index[s][chosen[s]].tolist()
        x = features[start : start + n]
        assert [start + i for i in _greedy_reference(x, k)] == got
        # The greedy subset's smallest pairwise distance is within a factor 2 of the best subset's
        # (the classic guarantee of greedy max-min dispersion; checked against brute force).
        xn = torch.nn.functional.normalize(x, dim=-1)
        angles = torch.arccos((xn @ xn.T).clamp(-1, 1))  # angular distance: a metric, same order as cosine
        best = max(_spread(angles, c) for c in itertools.combinations(range(n), k))
        assert _spread(angles, [i - start for i in got]) >= best / 2 - 1e-6


def _left_padded_batch(seed: int = 0):
    torch.manual_seed(seed)
    query, key = torch.randn(2, 4, 9, 8), torch.randn(2, 2, 9, 8)  # 4 query heads on 2 key heads (GQA)
    valid = torch.ones(2, 9, dtype=torch.bool)
    valid[1, :3] = False  # left padding
    return query, key, valid


def _dense_rows(query, key, valid, b: int) -> torch.Tensor:
    """(L, L) sample b's causal attention, heads averaged, written plainly."""
    keys = key[b].repeat_interleave(2, dim=0)
    logits = query[b] @ keys.transpose(1, 2) / 8**0.5  # (H, L, L)
    length = logits.shape[-1]
    hidden = torch.ones(length, length, dtype=torch.bool).triu(1) | ~valid[b][None, :]
    return logits.masked_fill(hidden, float("-inf")).softmax(-1).nan_to_num(0.0).mean(0)


def test_prompt_attention_is_the_causal_softmax_of_the_last_rows():
    query, key, valid = _left_padded_batch()
    got = prompt_attention(query, key, valid, 3, None)  # (B, 3, L)
    for b in range(2):
        torch.testing.assert_close(got[b], _dense_rows(query, key, valid, b)[-3:])


def _view(question_lengths: list[int], image: slice) -> PromptView:
    query, key, valid = _left_padded_batch(1)
    rows = max(question_lengths)
    question = torch.tensor([[j >= rows - n for j in range(rows)] for n in question_lengths])
    is_image = torch.zeros_like(valid)
    is_image[:, image] = True
    return PromptView(query=query, key=key, valid=valid, image=is_image & valid, question=question)


def test_text_guided_illava_scores_by_the_questions_mean_attention():
    view = _view([3, 2], slice(4, 6))
    got = get_method("illava").text_importance(get_method("illava").parse_params({"text_guided": True}), view)
    for b, n in enumerate([3, 2]):
        expected = _dense_rows(view.query, view.key, view.valid, b)[-n:].mean(0)
        torch.testing.assert_close(got[b], expected)
    assert get_method("illava").uses_text(get_method("illava").parse_params({"text_guided": True}))
    assert not get_method("illava").uses_text(get_method("illava").parse_params(None))


def test_sparsevlm_raters_are_the_question_tokens_that_look_at_the_image_at_least_on_average():
    view = _view([3, 3], slice(4, 6))
    method = get_method("sparsevlm")
    got = method.text_importance(method.parse_params(None), view)
    for b in range(2):
        rows = _dense_rows(view.query, view.key, view.valid, b)[-3:]  # the question's rows
        relevance = rows[:, view.image[b]].sum(1)
        raters = rows[relevance >= relevance.mean()]
        assert 1 <= len(raters) < 3 or torch.allclose(relevance, relevance.mean())
        torch.testing.assert_close(got[b], raters.mean(0))


def _between_request(features, importance, sizes, kept, recycled):
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return StageRequest(
        stage="between", layer=-1, hidden=features, query=None, key=None, importance=importance,
        segments=[SegmentSpec(a, n, k, r, 0) for a, n, k, r in zip(starts, sizes, kept, recycled)],
    )  # fmt: skip


def test_visionzip_keeps_the_most_attended_and_merges_the_rest_into_contextual_means():
    torch.manual_seed(2)
    sizes, kept = [10, 8], [4, 3]
    method = get_method("visionzip")
    params = method.parse_params({"contextual_share": 0.5})
    recycled = [method.recycled(params, n, n - k) for n, k in zip(sizes, kept)]
    assert recycled == [2, 2]  # round(0.5 * kept), one dominant left at least
    features, importance = torch.randn(18, 6), torch.rand(18)
    merge_map = method.merge(params, _between_request(features, importance, sizes, kept, recycled))
    out = merge_map.apply(features)
    assert merge_map.keep.shape[0] == sum(kept)
    start = offset = 0  # the segment's first unit in the request, and its first slot in the output
    for n, k, c, seg_keep in zip(sizes, kept, recycled, merge_map.keep.split(kept)):
        ids = list(range(start, start + n))
        dominant = sorted(ids, key=lambda i: -float(importance[i]))[: k - c]
        assert set(dominant) <= set(seg_keep.tolist())  # the most attended survive as they are
        rest = sorted(set(ids) - set(dominant))
        centres = [rest[(j * len(rest)) // c] for j in range(c)]  # spread evenly by position
        assert sorted(seg_keep.tolist()) == sorted(dominant + centres)
        x = torch.nn.functional.normalize(features[rest], dim=-1)
        joins = (x @ torch.nn.functional.normalize(features[centres], dim=-1).T).argmax(1)
        for j, centre in enumerate(centres):
            group = [
                rest[i] for i in range(len(rest)) if rest[i] == centre or (joins[i] == j and rest[i] not in centres)
            ]
            torch.testing.assert_close(out[offset + seg_keep.tolist().index(centre)], features[group].mean(0))
        for d in dominant:
            torch.testing.assert_close(out[offset + seg_keep.tolist().index(d)], features[d])
        start, offset = start + n, offset + k


def test_density_peaks_score_is_density_times_distance_to_a_denser_point():
    torch.manual_seed(3)
    x = torch.randn(1, 7, 4)
    valid = torch.tensor([[True] * 6 + [False]])
    got = density_peaks(x, valid, neighbours=2)
    xn = torch.nn.functional.normalize(x[0, :6], dim=-1)
    d = (1 - xn @ xn.T).clamp_min(0)
    near = torch.stack([d[i][torch.arange(6) != i].sort().values[:2] for i in range(6)])
    density = torch.exp(-near.square().mean(1))
    for i in range(6):
        denser = [j for j in range(6) if density[j] > density[i]]
        delta = min(d[i, j] for j in denser) if denser else d[i].max()
        torch.testing.assert_close(got[0, i], density[i] * delta)
    assert got[0, 6] == float("-inf")


def test_sparsevlm_recycles_the_best_deleted_tokens_into_cluster_means():
    torch.manual_seed(4)
    method = get_method("sparsevlm")
    params = method.parse_params({"recycle_ratio": 1.0, "cluster_ratio": 0.25})
    n, k = 12, 5
    c = method.recycled(params, n, n - k)
    assert c == 2  # round(0.25 * ceil(1.0 * 7))
    hidden, scores = torch.randn(n, 6), torch.rand(n)
    request = StageRequest(stage="llm", layer=1, hidden=hidden, query=None, key=None, causal=True,
                           segments=[SegmentSpec(0, n, k, c, 0)], text_importance=scores)  # fmt: skip
    merge_map = method.merge(params, request)
    ranked = scores.argsort(descending=True).tolist()
    informative, pool = ranked[: k - c], ranked[k - c :]  # tau = 1: every deleted token is recycled
    keep = merge_map.keep.tolist()
    assert set(informative) <= set(keep) and len(keep) == k
    centres = sorted(set(keep) - set(informative))
    assert set(centres) <= set(pool)
    out = merge_map.apply(hidden)
    x = torch.nn.functional.normalize(hidden, dim=-1)
    for centre in centres:
        group = [u for u in pool if u == centre or (u not in centres and
                 max(centres, key=lambda m: float(x[u] @ x[m])) == centre)]  # fmt: skip
        torch.testing.assert_close(out[keep.index(centre)], hidden[group].mean(0))


def test_peer_methods_refuse_schedules_they_cannot_run():
    base = illava.Schedule(reduction=0.5, encoder_layers=(1,), llm_layers=(1, 2))
    with pytest.raises(ScheduleError, match="'fastv' removes no tokens before the LLM: encoder_share must be 0"):
        base.with_(method="fastv")
    with pytest.raises(
        ScheduleError, match="'fastv' merges after at most 1 LLM layer\\(s\\): got llm_layers \\[1, 2\\]"
    ):
        base.with_(method="fastv", encoder_share=0.0)
    with pytest.raises(ScheduleError, match="'divprune' removes tokens only before the LLM: encoder_share must be 1"):
        base.with_(method="divprune")
    assert base.with_(method="pdrop", encoder_share=0.0).plan(64).kept == 32


# ----------------------------------------------------------------------------------- the contract, per family
@torch.no_grad()
@pytest.mark.parametrize("method", PEERS)
def test_token_counts_follow_the_plan(family, method):
    model = family.sdpa.model
    schedule = peer_schedule(family, method)
    batch = inputs(family.sdpa, *prompts(family)["image"])
    plans = segment_plans(family.sdpa, batch, schedule)
    illava.apply(model, schedule)
    assert torch.isfinite(model(**batch).logits).all()
    _, llm_depth = illava.depths(model)
    assert [int(n) for (n,) in illava.last_stats(model).llm_image_tokens] == [
        sum(plan.llm_tokens_at(layer) for plan in plans) for layer in range(llm_depth)
    ]
    assert sum(plan.kept for plan in plans) < sum(plan.n_tokens for plan in plans)


@torch.no_grad()
@pytest.mark.parametrize("method", PEERS)
def test_batch_of_two_with_padding_equals_each_sample_alone(family, method):
    model = family.sdpa.model
    samples = prompts(family)["padded"]
    illava.apply(model, peer_schedule(family, method))
    together = model.generate(**inputs(family.sdpa, *samples), max_new_tokens=3, **GREEDY)
    for row, sample in enumerate(samples):
        alone = model.generate(**inputs(family.sdpa, sample), max_new_tokens=3, **GREEDY)
        assert torch.equal(together.sequences[row, -3:], alone.sequences[0, -3:])
        for a, b in zip(together.scores, alone.scores, strict=True):
            torch.testing.assert_close(a[row], b[0], rtol=0, atol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("method", PEERS)
def test_cached_generate_equals_a_cache_free_reference(family, method):
    """Cached decoding attends to what the prefill kept. Without a cache every step is a new
    prefill: DivPrune (which looks at the image only) selects the same tokens again, so the two
    generations are equal; FastV and PyramidDrop select by the *last* token, which is a new one at
    every cache-free step, so by their definition only the first new token must agree."""
    model = family.eager.model
    illava.apply(model, peer_schedule(family, method))
    steps = 1 if method in BY_LAST_TOKEN else 3
    for name in ("padded",):
        batch = inputs(family.eager, *prompts(family)[name])
        cached = model.generate(**batch, max_new_tokens=steps, **GREEDY)
        recomputed = model.generate(**batch, use_cache=False, max_new_tokens=steps, **GREEDY)
        width = batch["input_ids"].shape[1] + steps
        assert torch.equal(cached.sequences[:, :width], recomputed.sequences[:, :width]), name
        for a, b in zip(cached.scores[:steps], recomputed.scores[:steps], strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


def test_a_manifest_of_every_peer_method_round_trips_and_applies(family):
    for method in PEERS:
        schedule = peer_schedule(family, method)
        manifest = {"schedule": schedule.to_dict()}
        assert illava.Schedule.coerce(manifest) == schedule
        illava.apply(family.sdpa.model, manifest)
        illava.remove(family.sdpa.model)


@torch.no_grad()
@pytest.mark.parametrize("method", PEERS)
def test_a_peer_merged_forward_reads_no_more_than_the_unmerged_model(family, method):
    """The speed rule: every count is on the host before the forward; nothing more is read back.
    iLLaVA's text-guided variant is held to the paper's iLLaVA (whose encoder merges under sdpa read
    the kept windows once per merge, as documented in `illava.engine.vision`): the text adds nothing."""
    from profiler.counts import count_call

    model = family.sdpa.model
    batch = inputs(family.sdpa, *prompts(family)["padded"])

    def forward():
        model(**batch, logits_to_keep=1)

    if method == "illava+text":
        illava.apply(model, family.default(7 / 9))
    forward()
    reference = count_call(forward)
    illava.apply(model, peer_schedule(family, method))
    forward()
    merged = count_call(forward)
    assert merged.host_reads <= reference.host_reads, (family.name, method, merged.reads, reference.reads)


@torch.no_grad()
@pytest.mark.parametrize("method", PEERS)
def test_zero_reduction_of_a_peer_equals_the_unpatched_model(family, method):
    model = family.sdpa.model
    batch = inputs(family.sdpa, *prompts(family)["padded"])
    reference = model(**batch).logits
    illava.apply(model, peer_schedule(family, method, reduction=0.0))
    valid = batch["attention_mask"].bool()
    assert torch.equal(model(**batch).logits[valid], reference[valid])


@torch.no_grad()
@pytest.mark.parametrize("method", PEERS)
def test_a_peer_merges_every_video_frame_by_its_plan(family, method):
    """Each frame is a segment with its own plan (or the family says it cannot merge videos there)."""
    model = family.sdpa.model
    schedule = peer_schedule(family, method)
    batch = inputs(family.sdpa, *prompts(family)["video"])
    plans = segment_plans(family.sdpa, batch, schedule)
    if schedule.encoder_share > 0 and not family.adapter.encoder_merges_video:
        with pytest.raises(ScheduleError):
            illava.apply(model, schedule)
            model(**batch)
        return
    illava.apply(model, schedule)
    assert torch.isfinite(model(**batch).logits).all()
    _, llm_depth = illava.depths(model)
    assert [int(n) for (n,) in illava.last_stats(model).llm_image_tokens] == [
        sum(plan.llm_tokens_at(layer) for plan in plans) for layer in range(llm_depth)
    ]


def video_schedule(family, method: str) -> illava.Schedule | None:
    """`peer_schedule` for a video, or None where the family cannot run it: a family that merges
    videos in the LLM only gives a method that also acts there all of its removal there."""
    schedule = peer_schedule(family, method)
    if schedule.encoder_share == 0 or family.adapter.encoder_merges_video:
        return schedule
    if schedule.reduction_method.acts_at("llm"):
        return schedule.with_(encoder_share=0.0, encoder_layers=())
    return None


def mixed_batches(family, method: str) -> list[tuple[illava.Schedule, list]]:
    """A padded batch of two: one sample with two images, one with a video -- or, where the family
    cannot merge that video under the method's schedule, the images beside a shorter one-image
    sample and the video alone under `video_schedule` (left out where that is None: refused on
    every kernel, see test_a_peer_merges_every_video_frame_by_its_plan)."""
    kinds = prompts(family)
    (two_images,), (video,) = kinds["two_images"], kinds["video"]
    schedule, for_video = peer_schedule(family, method), video_schedule(family, method)
    if for_video == schedule:
        return [(schedule, [two_images, video])]
    alone = [(for_video, [video])] if for_video is not None else []
    return [(schedule, [two_images, kinds["padded"][0]]), *alone]


@torch.no_grad()
@pytest.mark.parametrize("method", PEERS)
def test_a_peer_selects_and_decodes_the_same_under_every_attention(family, method):
    """Importance comes from the captured queries and keys (under ``illava_packed`` from the block's
    own single call), so the kernel changes nothing: on a padded batch with several images and a
    video, eager and the packed kernel keep the tokens sdpa keeps and give its next-token scores
    within sdpa's tolerance, the packed kernel also through a cached decoding step."""
    steps = {"sdpa": 2, PACKED: 2, "eager": 1}  # eager: the merged prefill only (the slowest kernel)
    backbones = {"sdpa": family.sdpa, PACKED: family.packed, "eager": family.eager}
    for schedule, samples in mixed_batches(family, method):
        batch = inputs(family.sdpa, *samples)  # the family's processor: the same inputs for every kernel
        kept, runs = {}, {}
        for attn, backbone in backbones.items():
            illava.apply(backbone.model, schedule)
            runs[attn] = backbone.model.generate(**batch, max_new_tokens=steps[attn], **GREEDY)
            kept[attn] = illava.last_stats(backbone.model).kept_units
        for attn in (PACKED, "eager"):
            where = f"{attn}, {len(samples)} sample(s)"
            assert all(torch.equal(a, b) for a, b in zip(kept["sdpa"], kept[attn], strict=True)), where
            width = batch["input_ids"].shape[1] + steps[attn]
            assert torch.equal(runs["sdpa"].sequences[:, :width], runs[attn].sequences), where
            for a, b in zip(runs["sdpa"].scores, runs[attn].scores, strict=False):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-4, msg=where)


@torch.no_grad()
@pytest.mark.parametrize("method", ["divprune", "visionzip", "tome"])
def test_what_an_image_keeps_before_the_llm_does_not_depend_on_another_image(family, method):
    """The methods that select before the LLM look at each image alone (those in the LLM see the
    whole prompt by definition: the text's attention, the causal order)."""
    assert_images_merge_independently(family, peer_schedule(family, method))


# ----------------------------------------------------------------------------------- in bf16
@torch.no_grad()
@pytest.mark.parametrize("runtime", BF16, indirect=True)
def test_zero_reduction_of_every_peer_equals_the_unpatched_model_in_bf16(runtime):
    """Every peer removing nothing, in bf16 with sdpa and with the packed kernel, against the
    library's bf16 sdpa model on a padded batch (the other inputs: test_contract's runtime tests)."""
    model = runtime.backbone.model
    batch = inputs(runtime.backbone, *prompts(runtime.family)["padded"])
    valid = batch["attention_mask"].bool()
    reference = runtime.reference.model(**batch).logits.float()[valid]
    for method in PEERS:
        illava.apply(model, peer_schedule(runtime.family, method, reduction=0.0))
        merged = model(**batch).logits.float()[valid]
        torch.testing.assert_close(merged, reference, rtol=0, atol=runtime.atol, msg=method)


@torch.no_grad()
@pytest.mark.parametrize("runtime", BF16_GENERATE, indirect=True)
@pytest.mark.parametrize("method", PEERS)
def test_a_peer_in_bf16_batches_and_caches_like_in_fp32(runtime, method):
    """The guarantees iLLaVA keeps in bf16 (test_contract's runtime tests), for every peer: a padded
    batch of two generates what each sample alone does, and cached decoding what a cache-free one
    does (one step for the methods that select by the last token, as in fp32) -- scores within bf16's
    tolerance, a token that differs only where its two candidates tie within it. (Merged bf16 is not
    held to merged fp32: bf16 rounding can change which tokens a method keeps.)"""
    model = runtime.backbone.model
    samples = prompts(runtime.family)["padded"]
    illava.apply(model, peer_schedule(runtime.family, method))
    batch = inputs(runtime.backbone, *samples)
    together = model.generate(**batch, max_new_tokens=2, **GREEDY)
    for row, sample in enumerate(samples):
        alone = model.generate(**inputs(runtime.backbone, sample), max_new_tokens=2, **GREEDY)
        assert_same_greedy(together, alone, runtime.atol, [row], [0])
    steps = 1 if method in BY_LAST_TOKEN else 2
    recomputed = model.generate(**batch, use_cache=False, max_new_tokens=steps, **GREEDY)
    cached = SimpleNamespace(sequences=together.sequences[:, : batch["input_ids"].shape[1] + steps],
                             scores=together.scores[:steps])  # fmt: skip
    assert_same_greedy(cached, recomputed, runtime.atol)
