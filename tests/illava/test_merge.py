import pytest
import torch

from illava.merge import (
    Selection,
    attention_importance,
    merge_segment,
    merge_units,
    recycle_weights,
    select_units,
    windowed_importance,
)


def dense_column_mean(q, k, causal=False):
    """Reference: the full softmax matrix, averaged over heads and over the queries that see each key."""
    k = k.repeat_interleave(q.shape[0] // k.shape[0], dim=0)
    scores = q @ k.transpose(1, 2) / q.shape[-1] ** 0.5
    n = q.shape[1]
    if causal:
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        visible = torch.arange(n, 0, -1, dtype=torch.float32)
    else:
        visible = torch.full((n,), float(n))
    return scores.softmax(-1).sum(dim=(0, 1)) / (q.shape[0] * visible)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_chunked_importance_equals_dense(causal, chunk):
    torch.manual_seed(0)
    q, k = torch.randn(4, 50, 16), torch.randn(2, 50, 16)  # grouped-query keys
    got = attention_importance(q, k, causal=causal, chunk_size=chunk)
    torch.testing.assert_close(got, dense_column_mean(q, k, causal), rtol=1e-5, atol=1e-7)


def test_windowed_importance_is_per_segment():
    torch.manual_seed(1)
    q, k = torch.randn(2, 40, 8), torch.randn(2, 40, 8)
    bounds = [0, 16, 32, 36, 40]  # two full windows, two ragged edge windows
    got = windowed_importance(q, k, bounds, chunk_size=8)  # 16 > chunk: exercises both paths
    for a, b in zip(bounds[:-1], bounds[1:]):
        torch.testing.assert_close(got[a:b], dense_column_mean(q[:, a:b], k[:, a:b]), rtol=1e-5, atol=1e-7)
    # No leakage: changing one window's keys leaves other windows' importance untouched.
    k2 = k.clone()
    k2[:, 16:32] += 5 * torch.randn(2, 16, 8)
    other = windowed_importance(q, k2, bounds)
    torch.testing.assert_close(other[:16], got[:16])
    torch.testing.assert_close(other[32:], got[32:])


def test_select_units_splits_informative_centres_discarded():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.8, 0.2])
    sel = select_units(scores, n_keep=3, n_recycle=1)
    assert sel.keep.tolist() == [1, 2, 4]  # top 3 in original order
    assert sel.centres.tolist() == [2]  # third best
    assert sel.discarded.tolist() == [0, 3, 5]
    random_sel = select_units(scores, 3, 1, generator=torch.Generator().manual_seed(0))
    assert random_sel.centres.numel() == 0 and random_sel.keep.numel() == 3


def test_recycled_token_is_its_weighted_combination_and_informative_pass_through():
    torch.manual_seed(2)
    n, c = 12, 6
    hidden, q, k = torch.randn(n, c), torch.randn(2, n, 4), torch.randn(2, n, 4)
    scores = torch.rand(n)
    kept, merged = merge_segment(hidden, q, k, scores, n_keep=5, n_recycle=2, group_size=3)
    sel = select_units(scores, 5, 2)
    assert kept.tolist() == sel.keep.tolist()
    members, weights = recycle_weights(q, k, sel.centres, sel.discarded, unit=1, group_size=3)
    assert members[:, 0].tolist() == sel.centres.tolist()
    assert set(members[:, 1:].flatten().tolist()) <= set(sel.discarded.tolist())
    torch.testing.assert_close(weights.sum(1), torch.ones(2))
    for row, unit in enumerate(kept.tolist()):
        if unit in sel.centres.tolist():
            i = sel.centres.tolist().index(unit)
            expected = (weights[i, :, None] * hidden[members[i]]).sum(0)
            torch.testing.assert_close(merged[row], expected)
        else:
            assert torch.equal(merged[row], hidden[unit])


def test_recycle_members_are_the_most_attended_discarded_units():
    # Centre 0's query points at unit 3's key; unit 3 must be its first member.
    q = torch.zeros(1, 5, 2)
    k = torch.zeros(1, 5, 2)
    q[0, 0] = torch.tensor([10.0, 0.0])
    k[0, 3] = torch.tensor([1.0, 0.0])
    members, weights = recycle_weights(q, k, torch.tensor([0]), torch.tensor([2, 3, 4]), unit=1, group_size=1)
    assert members.tolist() == [[0, 3]]
    assert weights[0, 1] > weights[0, 0]


def test_group_aware_merge_moves_whole_groups():
    torch.manual_seed(3)
    unit, n_units = 4, 6
    hidden = torch.randn(n_units * unit, 3)
    sel = Selection(keep=torch.tensor([0, 2, 5]), centres=torch.tensor([2]), discarded=torch.tensor([1, 3, 4]))
    members = torch.tensor([[2, 4]])
    weights = torch.tensor([[0.25, 0.75]])
    out = merge_units(hidden, sel, members, weights, unit=unit).view(3, unit, 3)
    groups = hidden.view(n_units, unit, 3)
    assert torch.equal(out[0], groups[0]) and torch.equal(out[2], groups[5])
    torch.testing.assert_close(out[1], 0.25 * groups[2] + 0.75 * groups[4])  # token t with token t
    q, k = torch.randn(2, n_units * unit, 4), torch.randn(2, n_units * unit, 4)
    members, weights = recycle_weights(q, k, torch.tensor([2]), torch.tensor([1, 3, 4]), unit=unit, group_size=2)
    assert members.shape == (1, 3)
    torch.testing.assert_close(weights.sum(1), torch.ones(1))
