"""What one forward dispatches: aten ops, reads back to the host, and attention calls.

At the sizes illava-tune tunes, a GPU prefill is bound by launches and synchronisations more than by
FLOPs, so these counts predict GPU speed where a CPU timing cannot. They are counted on any device
with a `TorchDispatchMode` (every aten op the forward dispatches) plus a wrapper on
`Tensor.tolist`, which reads a tensor back without dispatching an op.

A *host read* is anything that needs a device value on the host before the forward can go on: a
scalar (`.item()`, ``bool(t)``, ``int(t)``, ``torch.equal``: ``aten._local_scalar_dense`` and the
ops that wrap it), a list (`.tolist()`), or an op whose output size depends on the data
(``nonzero``, boolean-mask indexing, ``masked_select``, ``unique``, ``repeat_interleave`` without an
output size). On a CPU they cost nothing; on a GPU each
one waits for the queue to drain. Inputs read on purpose count too (a model that reads
``grid_thw.tolist()`` on a GPU reads it from the device).

*Kernel ops* are the aten ops that launch work on a GPU: all of them but views, aliasing and tensor
metadata (``view``, ``reshape`` of a contiguous tensor, ``unsqueeze``, ``slice``, ``transpose``,
``expand``, ``detach``, ...), and conversions that return their input as it is (``.to(dtype)`` to the
dtype it has, ``.contiguous()`` of a contiguous tensor), which cost a little host time and no launch.

An *attention call* is one call of the attention function a module looks up in transformers'
`AttentionInterface` (eager, SDPA, flash, ``illava_packed``): one per window or frame for the library's
per-segment vision loop with SDPA, one per block with the packed attention. (A merge's own softmaxes
over scores -- importance, recycling -- are not attention calls; they are in the kernel ops.)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_READ_OPS = {
    "aten._local_scalar_dense.default",
    # Composites that read a scalar: the mode sees them, not the `_local_scalar_dense` they run inside it.
    "aten.item.default",
    "aten.is_nonzero.default",
    "aten.equal.default",
    "aten.nonzero.default",
    "aten.nonzero_static.default",
    "aten.masked_select.default",
    "aten._unique2.default",
    "aten.unique_consecutive.default",
    "aten.unique_dim.default",
    "aten.repeat_interleave.Tensor",
}


_METADATA_OPS = {
    "view", "_unsafe_view", "reshape", "_reshape_alias", "unsqueeze", "squeeze", "expand", "expand_as", "slice",
    "select", "transpose", "permute", "t", "alias", "detach", "detach_", "lift_fresh", "as_strided", "view_as",
    "flatten", "unflatten", "split", "split_with_sizes", "chunk", "unbind", "narrow", "diagonal", "unfold",
    "_to_copy_noop", "resolve_conj", "resolve_neg", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset",
    "dim", "size", "stride", "is_contiguous",
}  # fmt: skip


_CONVERSION_OPS = {"to", "contiguous", "type_as"}  # a launch only when they make a new tensor


def _is_metadata(name: str) -> bool:
    return name.split(".")[1] in _METADATA_OPS if name.startswith("aten.") else False


def _launches(name: str, args: tuple, out: Any) -> bool:
    """Whether the op `name`, which returned `out` for `args`, launched work (see the module doc)."""
    if _is_metadata(name):
        return False
    if name.startswith("aten.") and name.split(".")[1] in _CONVERSION_OPS:
        return not (args and out is args[0])
    return True


@dataclass
class ForwardCounts:
    """Counts of one call; `ops` by name for a closer look."""

    aten_ops: int = 0
    kernel_ops: int = 0
    host_reads: int = 0
    attention_calls: int = 0
    ops: Counter = field(default_factory=Counter)
    reads: Counter = field(default_factory=Counter)

    def to_dict(self) -> dict[str, int]:
        return {"aten_ops": self.aten_ops, "kernel_ops": self.kernel_ops, "host_reads": self.host_reads,
                "attention_calls": self.attention_calls}  # fmt: skip


def _is_read(name: str, args: tuple, kwargs: dict) -> bool:
    if name in _READ_OPS:
        return name != "aten.repeat_interleave.Tensor" or kwargs.get("output_size") is None
    if name.startswith("aten.index.Tensor") or name.startswith("aten.index_put"):
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())
    return False


class _Counter(TorchDispatchMode):
    def __init__(self, counts: ForwardCounts):
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        counts = self.counts
        counts.aten_ops += 1
        counts.ops[name] += 1
        if _is_read(name, args, kwargs):
            counts.host_reads += 1
            counts.reads[name] += 1
        out = func(*args, **kwargs)
        counts.kernel_ops += _launches(name, args, out)
        return out


@contextmanager
def counting() -> Any:
    """Count what the block dispatches; yields the `ForwardCounts` it fills."""
    from transformers.modeling_utils import AttentionInterface

    counts = ForwardCounts()
    original = torch.Tensor.tolist
    get_interface = AttentionInterface.get_interface
    inside = [False]  # an attention function calling another (illava's capture) is one call

    def tolist(tensor: torch.Tensor):
        counts.host_reads += 1
        counts.reads["Tensor.tolist"] += 1
        return original(tensor)

    def counted_interface(self, name, default):
        function = get_interface(self, name, default)

        def attention(*args, **kwargs):
            if inside[0]:
                return function(*args, **kwargs)
            counts.attention_calls += 1
            inside[0] = True
            try:
                return function(*args, **kwargs)
            finally:
                inside[0] = False

        return attention

    torch.Tensor.tolist = tolist
    AttentionInterface.get_interface = counted_interface
    try:
        with _Counter(counts):
            yield counts
    finally:
        torch.Tensor.tolist = original
        AttentionInterface.get_interface = get_interface


def count_call(fn: Callable[[], Any]) -> ForwardCounts:
    """The counts of one call of `fn` (run it once before, outside, so lazy set-up is not counted)."""
    with counting() as counts:
        fn()
    return counts


__all__ = ["ForwardCounts", "count_call", "counting"]
