"""The peer methods (FastV, PyramidDrop, DivPrune): their rules on hand-made tensors, and the
engine's contract for each of them on every family (counts follow the plan, a padded batch of two
equals each sample alone, cached generation equals a cache-free one)."""

from __future__ import annotations

import itertools

import pytest
import torch

import illava
from illava import ScheduleError
from illava.engine.llm import last_token_attention
from illava.merge import SegmentBatch
from illava.methods import StageRequest, get_method
from illava.methods.base import SegmentSpec
from illava.methods.divprune import max_min_diverse
from tests.illava.test_contract import GREEDY, inputs, prompts, segment_plans
from tests.illava.test_contract import family as family  # noqa: F401  (the per-family fixture)

PEERS = ["fastv", "pdrop", "divprune"]


def peer_schedule(family, method: str, reduction: float = 7 / 9) -> illava.Schedule:
    """The paper-default placement moved onto the stages the method acts at."""
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
    steps = 3 if method == "divprune" else 1
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
    """The speed rule: every count is on the host before the forward; nothing more is read back."""
    from profiler.counts import count_call

    model = family.sdpa.model
    batch = inputs(family.sdpa, *prompts(family)["padded"])

    def forward():
        model(**batch, logits_to_keep=1)

    forward()
    unmerged = count_call(forward)
    illava.apply(model, peer_schedule(family, method))
    forward()
    merged = count_call(forward)
    assert merged.host_reads <= unmerged.host_reads, (family.name, method, merged.reads, unmerged.reads)
