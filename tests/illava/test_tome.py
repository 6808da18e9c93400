"""ToMe: bipartite matching, token sizes and proportional attention on hand-made tensors, and what
is ToMe's own on every family (the key bias's layout, zero reduction under eager and sdpa, images
every attention implementation applying the same proportional attention,
host reads under eager and sdpa). The shared per-method contract -- counts follow the plan, video
frames, a padded batch equals each sample alone, cached generation -- runs for ToMe in
tests/illava/test_peer_methods.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import illava
from illava import Schedule, ScheduleError
from illava.backbones import load_backbone
from illava.engine.attention import Route, packed_attention, run_packed
from illava.engine.vision import Bounds, VisionRun
from illava.inputs import Sample, synthetic_image
from illava.merge import Fold, MergeMap, Recycle
from illava.methods import StageRequest, get_method
from illava.methods.base import SegmentSpec
from illava.methods.tome import bipartite_merge, matching_rounds, unit_metric
from tests.illava.test_contract import _unpatched as _unpatched  # noqa: F401  (removes the patch after each test)
from tests.illava.test_contract import family as family  # noqa: F401  (the per-family fixture)
from tests.illava.test_contract import inputs, prompts

TOME = get_method("tome")


def tome_schedule(family, reduction: float = 7 / 9, **params) -> Schedule:
    """The paper-default encoder layers with all of the removal in the encoder (ToMe's placement)."""
    return TOME.placement(family.default(reduction)).with_(**params)


# ----------------------------------------------------------------------------------- matching on tensors
def _reference(metric: torch.Tensor, kept: int) -> tuple[list[int], dict[int, list[int]]]:
    """ToMe's rule written plainly for one segment: survivors in order, and the units each stands for."""
    survivors, members = list(range(len(metric))), {i: [i] for i in range(len(metric))}
    left = len(metric) - kept
    while left:
        a, b = survivors[0::2], survivors[1::2]
        edges = []
        for rank, i in enumerate(a):
            similarity = [float(metric[i] @ metric[j]) for j in b]
            best = max(range(len(b)), key=lambda t: (similarity[t], -t))
            edges.append((similarity[best], -rank, i, b[best]))
        merging = sorted(edges, reverse=True)[: min(left, len(a))]
        for _, _, i, j in merging:
            members[j] += members.pop(i)
            survivors.remove(i)
        left -= len(merging)
    return survivors, members


def _groups(merge_map: MergeMap) -> dict[int, list[int]]:
    """Survivor unit id -> the unit ids folded into it."""
    groups: dict[int, list[int]] = {int(k): [] for k in merge_map.keep}
    for slot, source in zip(merge_map.fold.slots.tolist(), merge_map.fold.sources.tolist(), strict=True):
        groups[int(merge_map.keep[slot])].append(source)
    return {k: sorted(v) for k, v in groups.items()}


def test_the_matching_merges_the_most_similar_pairs():
    # One segment of six units: A = 0, 2, 4 and B = 1, 3, 5. Unit 0 is nearly unit 1, unit 2 close
    # to unit 3, unit 4 like none of them: removing two merges 0 into 1 and 2 into 3.
    x, y, z, w = torch.eye(4)
    metric = torch.nn.functional.normalize(torch.stack([x, x + 0.01 * y, y, y + 0.3 * x, z, w]), dim=-1)
    merge_map = bipartite_merge(metric, [0], [6], [4])
    assert merge_map.keep.tolist() == [1, 3, 4, 5]
    assert _groups(merge_map) == {1: [0, 1], 3: [2, 3], 4: [4], 5: [5]}
    # Several A units may fold into one B unit: 0 and 2 are both closest to 1.
    metric = torch.nn.functional.normalize(torch.stack([x, x, x + 0.1 * y, z]), dim=-1)
    merge_map = bipartite_merge(metric, [0], [4], [2])
    assert merge_map.keep.tolist() == [1, 3]
    assert _groups(merge_map) == {1: [0, 1, 2], 3: [3]}


@pytest.mark.parametrize("unit", [1, 4])
def test_the_batched_matching_is_the_rule_per_segment_and_never_crosses_one(unit):
    """Ragged segments: one removing nothing, two removing more than half of their units (two
    rounds of matching in one block), one less than half."""
    torch.manual_seed(0)
    units, kept = [9, 14, 5, 11], [3, 14, 1, 8]
    assert len(matching_rounds(units, [n - k for n, k in zip(units, kept)])) == 2
    starts = [sum(units[:i]) for i in range(len(units))]
    key = torch.randn(3, sum(units) * unit, 8)
    metric = unit_metric(key, unit)
    merge_map = bipartite_merge(metric, starts, units, kept)
    groups = _groups(merge_map)
    assert merge_map.keep.shape[0] == sum(kept)
    for start, n, k in zip(starts, units, kept, strict=True):
        survivors, members = _reference(metric[start : start + n], k)
        assert [start + i for i in survivors] == [int(u) for u in merge_map.keep if start <= u < start + n]
        assert {start + i: sorted(start + m for m in v) for i, v in members.items()} == {
            u: g for u, g in groups.items() if start <= u < start + n
        }
    assert matching_rounds([9, 14, 5, 11], [5, 0, 3, 3]) == [([9, 14, 5, 11], [5, 0, 3, 3])]
    assert matching_rounds([6], [5]) == [([6], [3]), ([3], [2])]  # 6 -> 3 -> 1
    with pytest.raises(ValueError, match="cannot lose 3"):
        matching_rounds([3], [3])


def test_sizes_add_up_and_a_merge_is_their_weighted_average_across_merges():
    x, z = torch.eye(2)
    metric = torch.nn.functional.normalize(torch.stack([x, x, x, z]), dim=-1)
    values = torch.randn(4, 3)
    first = bipartite_merge(metric, [0], [4], [2])  # 0 and 2 fold into 1; 3 stays
    sizes = first.sizes_after(None)
    assert first.tracks_sizes and sizes.tolist() == [3.0, 1.0]
    merged = first.apply(values)
    torch.testing.assert_close(merged, torch.stack([values[:3].mean(0), values[3]]))
    # A later merge weighs each unit by its size: the survivor is the mean over all four originals.
    second = bipartite_merge(torch.nn.functional.normalize(torch.stack([x, x]), dim=-1), [0], [2], [1])
    assert second.sizes_after(sizes).tolist() == [4.0]
    torch.testing.assert_close(second.apply(merged, sizes=sizes), values.mean(0, keepdim=True))
    # Units of four tokens merge token by token; sizes count units.
    grouped = torch.randn(16, 3)
    torch.testing.assert_close(
        first.apply(grouped, unit=4, sizes=None).view(2, 4, 3),
        torch.stack([grouped.view(4, 4, 3)[:3].mean(0), grouped.view(4, 4, 3)[3]]),
    )


def test_a_fold_is_a_general_linear_term_that_keeps_the_existing_map():
    values = torch.randn(5, 2)
    keep = torch.tensor([0, 2, 4])
    plain = MergeMap(keep=keep)
    assert torch.equal(plain.apply(values), values[keep]) and plain.sizes_after(None).tolist() == [1.0] * 3
    fold = Fold(slots=torch.tensor([1, 1, 1]), sources=torch.tensor([1, 2, 3]), weights=torch.tensor([0.5, 0.25, 0.25]))
    recycle = Recycle(torch.tensor([0]), torch.tensor([[0, 1]]), torch.tensor([[0.5, 0.5]]))
    merge_map = MergeMap(keep=keep, recycles=(recycle,), fold=fold)
    expected = torch.stack([(values[0] + values[1]) / 2, 0.5 * values[1] + 0.25 * (values[2] + values[3]), values[4]])
    torch.testing.assert_close(merge_map.apply(values), expected)
    assert not merge_map.tracks_sizes and merge_map.sizes_after(None).tolist() == [1.0, 1.0, 1.0]
    # concat over two segments offsets sources by units and slots by kept units.
    both = MergeMap.concat([merge_map, merge_map], [0, 5])
    torch.testing.assert_close(both.apply(torch.cat([values, values])), torch.cat([expected, expected]))
    with pytest.raises(ValueError, match="size-weighted"):
        MergeMap.concat([merge_map, bipartite_merge(torch.eye(2), [0], [2], [1])], [0, 5])


# ----------------------------------------------------------------------------------- proportional attention
def _duplicated(query, key, value, sizes, lengths):
    """Plain attention per segment where a key of size k is k identical keys: (N, H, D)."""
    out, start = [], 0
    for length in lengths:
        q, k, v = (t[:, start : start + length] for t in (query, key, value))  # (H, n, D)
        s = sizes[start : start + length]
        attended = torch.nn.functional.scaled_dot_product_attention(
            q, k.repeat_interleave(s, dim=1), v.repeat_interleave(s, dim=1)
        )
        out.append(attended.transpose(0, 1))
        start += length
    return torch.cat(out)


@pytest.mark.parametrize("lengths", [[6, 6, 6], [5, 0, 9, 2]], ids=["equal", "ragged"])
@pytest.mark.parametrize("importance", [False, True], ids=["sdpa", "explicit"])
def test_a_key_of_size_k_attends_as_k_identical_keys(lengths, importance):
    torch.manual_seed(0)
    heads, dim, n = 2, 8, sum(lengths)
    query, key, value = (torch.randn(heads, n, dim) for _ in range(3))
    sizes = torch.randint(1, 4, (n,))
    expected = _duplicated(query, key, value, sizes, lengths)
    module = torch.nn.Module()
    module.config = SimpleNamespace(_attn_implementation_internal="sdpa")
    host = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    cu = torch.tensor(host, dtype=torch.int32)
    bias = sizes.float().log()
    route = Route(bounds=Bounds(cu, host, max(lengths)), key_bias=lambda batch, length: bias.view(batch, length))
    with run_packed(module, route):
        out, _ = packed_attention(
            module, query[None], key[None], value[None], None, cu_seq_lens_q=cu, max_length_q=max(lengths),
            illava_importance=[] if importance else None,
        )  # fmt: skip
    torch.testing.assert_close(out[0], expected, rtol=1e-5, atol=1e-6)


def test_proportional_attention_on_a_padded_batch_goes_through_its_mask():
    """SigLIP-style calls: tiles as a batch with a key-padding mask; sizes bias the real keys."""
    torch.manual_seed(1)
    lengths, heads, dim = [4, 7], 2, 8
    query, key, value = (torch.randn(2, heads, 7, dim) for _ in range(3))
    sizes = torch.randint(1, 4, (2, 7))
    valid = torch.arange(7)[None, :] < torch.tensor(lengths)[:, None]
    module = torch.nn.Module()
    module.config = SimpleNamespace(_attn_implementation_internal="eager")
    route = Route(key_bias=lambda batch, length: sizes.float().log().view(batch, length))
    for mask in (valid[:, None, None, :].expand(-1, 1, 7, -1), torch.zeros(2, 1, 7, 7).masked_fill(~valid[:, None, None, :], -1e9)):  # fmt: skip
        with run_packed(module, route):
            out, _ = packed_attention(module, query, key, value, mask, is_causal=False)
        for b, length in enumerate(lengths):
            flat = (t[b, :, :length] for t in (query, key, value))
            expected = _duplicated(*flat, sizes[b, :length], [length])
            torch.testing.assert_close(out[b, :length], expected, rtol=1e-5, atol=1e-6)


def test_the_key_bias_is_laid_out_like_each_familys_keys(family):
    """Packed towers take the token order as it is; LLaVA-OneVision's padded tiles are found through
    the adapter's own un-padding."""
    adapter, unit = family.adapter, 1 if family.name == "tiny-llava-onevision" else 4
    units = [3, 5]
    run = VisionRun(hidden=torch.randn(sum(units) * unit, 2), unit=unit, segment_units=units, segment_item=[0, 1],
                    segment_index_in_item=[0, 0], order=torch.arange(sum(units)))  # fmt: skip
    run.sizes, run.proportional = torch.arange(1.0, 9.0), True
    token_bias = run.sizes.log().repeat_interleave(unit)
    key_bias = run.route(adapter, bounds=None).key_bias
    if adapter.packed_sequence:
        torch.testing.assert_close(key_bias(1, 8 * unit)[0], token_bias)
    else:  # tiles padded to the longest
        laid_out = key_bias(2, 5)
        torch.testing.assert_close(laid_out[0, :3], token_bias[:3])
        torch.testing.assert_close(laid_out[1], token_bias[3:])
    assert VisionRun(hidden=run.hidden, unit=unit, segment_units=units, segment_item=[0, 1],
                     segment_index_in_item=[0, 0], order=run.order).route(adapter, None) is None  # fmt: skip


# ----------------------------------------------------------------------------------- the schedule
def test_tome_acts_only_in_the_encoder_and_validates_its_parameters():
    base = Schedule(reduction=0.5, encoder_layers=(1,), llm_layers=(1, 2))
    with pytest.raises(ScheduleError, match="'tome' removes tokens only before the LLM: encoder_share must be 1"):
        base.with_(method="tome")
    placed = TOME.placement(base)
    assert (placed.method, placed.encoder_share, placed.llm_layers, placed.encoder_layers) == ("tome", 1.0, (), (1,))
    assert placed.params.prop_attn is True and placed.plan(64).kept == 32
    with pytest.raises(ScheduleError, match="prop_attn must be true or false, got 'yes'"):
        placed.with_(prop_attn="yes")
    assert Schedule.from_json(placed.with_(prop_attn=False).to_json()).params.prop_attn is False
    assert "no-prop" in placed.with_(prop_attn=False).describe()
    request = StageRequest(stage="encoder", layer=0, hidden=torch.randn(4, 2), query=None, key=None,
                           segments=[SegmentSpec(0, 4, 2, 0, 0)])  # fmt: skip
    with pytest.raises(RuntimeError, match="no keys"):
        TOME.merge(placed.params, request)


# ----------------------------------------------------------------------------------- the contract, per family
@torch.no_grad()
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_zero_reduction_equals_the_unpatched_model(family, attn):
    backbone = getattr(family, attn)
    model = backbone.model
    batch = inputs(backbone, *prompts(family)["padded"])
    reference = model(**batch).logits
    illava.apply(model, tome_schedule(family, 0.0))
    merged = model(**batch).logits
    valid = batch["attention_mask"].bool()
    assert torch.equal(merged[valid], reference[valid]), f"{family.name}/{attn}"


@torch.no_grad()
def test_every_attention_implementation_applies_the_same_proportional_attention(family):
    """eager, sdpa and illava_packed agree after ToMe merges, and the sizes do bias them (without
    proportional attention the outputs differ)."""
    packed = load_backbone(family.name, attn_implementation="illava_packed")
    batch = inputs(family.sdpa, *prompts(family)["image"])
    logits = {}
    runs = [("eager", family.eager, True), ("sdpa", family.sdpa, True), ("illava_packed", packed, True),
            ("sdpa", family.sdpa, False)]  # fmt: skip
    for name, backbone, prop_attn in runs:
        illava.apply(backbone.model, tome_schedule(family, prop_attn=prop_attn))
        logits[name, prop_attn] = backbone.model(**batch).logits
    for name in ("sdpa", "illava_packed"):
        torch.testing.assert_close(logits[name, True], logits["eager", True], rtol=0, atol=1e-4)
    gap = (logits["sdpa", True] - logits["sdpa", False]).abs().max()
    assert gap > 1e-3, f"proportional attention changed nothing ({float(gap):g})"


@torch.no_grad()
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_a_tome_merged_forward_reads_no_more_than_the_unmerged_model(family, attn):
    """The speed rule: every count is on the host before the forward; nothing more is read back
    (proportional attention included: the routed blocks read nothing)."""
    from profiler.counts import count_call

    model = getattr(family, attn).model
    batch = inputs(family.sdpa, *prompts(family)["padded"])

    def forward():
        model(**batch, logits_to_keep=1)

    forward()
    unmerged = count_call(forward)
    illava.apply(model, tome_schedule(family))
    forward()
    merged = count_call(forward)
    assert merged.host_reads <= unmerged.host_reads, (family.name, merged.reads, unmerged.reads)


@torch.no_grad()
def test_under_packed_attention_tome_costs_no_importance_computation(monkeypatch):
    """ToMe reads only the captured keys, so its merging blocks take the packed kernel's fast path;
    iLLaVA's, which read the column means, take the explicit one that computes them."""
    import illava.engine.attention as attention

    packed = load_backbone("tiny", attn_implementation="illava_packed")
    batch = inputs(packed, Sample("<image> What?", [synthetic_image(8 * 28, 1)]))
    explicit, real = [], attention._explicit

    def counted(*args, **kwargs):
        explicit.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(attention, "_explicit", counted)
    for method, expected in (("tome", 0), ("illava", 3)):
        explicit.clear()
        schedule = illava.paper_default_for(packed.model, 7 / 9)
        illava.apply(packed.model, get_method(method).placement(schedule) if method == "tome" else schedule)
        packed.model(**batch)
        illava.remove(packed.model)
        assert len(explicit) == expected, method  # illava: one per merging block (3 on tiny)
