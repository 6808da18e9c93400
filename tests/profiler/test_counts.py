"""`profiler.counts`: what it calls a kernel op (a launch on a GPU) and a host read, op by op."""

from __future__ import annotations

import pytest
import torch

from profiler.counts import count_call


@pytest.fixture
def x() -> torch.Tensor:
    with torch.inference_mode():  # as the forwards it counts run: conversions reach the dispatch mode
        return torch.randn(4, 6)


@pytest.mark.parametrize(
    ("op", "aten", "kernels"),
    [
        (lambda t: t.to(torch.float32), 1, 0),  # to its own dtype: the tensor itself comes back
        (lambda t: t.to(torch.float64), 1, 1),  # a real conversion: one copy
        (lambda t: t.view(6, 4).unsqueeze(0).transpose(1, 2), 3, 0),  # views: metadata only
        (lambda t: t.add_(1.0), 1, 1),  # in place returns its input, and still launches
        (lambda t: t.t().contiguous(), 2, 1),  # a transpose made contiguous: one copy
        (lambda t: t.softmax(-1).sum(dim=0), 2, 2),
    ],
)
def test_kernel_ops_count_launches(x, op, aten, kernels):
    with torch.inference_mode():
        counts = count_call(lambda: op(x))
    assert (counts.aten_ops, counts.kernel_ops, counts.host_reads) == (aten, kernels, 0), dict(counts.ops)


def test_host_reads_are_the_ops_that_wait_for_the_device(x):
    with torch.inference_mode():
        counts = count_call(lambda: (x[x > 0], x.sum().item(), x[:, 0].tolist(), x[torch.tensor([0, 2])]))
    assert counts.host_reads == 3, dict(counts.reads)  # boolean mask, .item(), .tolist(); not an index list
    assert set(counts.reads) == {"aten.index.Tensor", "aten.item.default", "Tensor.tolist"}
